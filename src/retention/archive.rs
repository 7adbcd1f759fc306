//! The prune archive: what a prune deletes or clears, appended to a file as
//! JSON lines and flushed to disk before the deleting transaction commits.
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use entity::{agent_executions, audit_log, global_sessions, lock_waiters, resource_locks};

use crate::{Error, Result};

/// One line of a prune archive ([`RetentionPolicy::archive`](crate::RetentionPolicy::archive)):
/// a row as the store held it just before the prune deleted or cleared it,
/// in the generated entities' own form, so that
/// `entity::…::ActiveModel::from(model)` puts it back.
///
/// A line is written before its transaction commits: if that commit then
/// fails, the rows stay in the store and a later prune archives them again,
/// so a restore takes each `id` (each audit `seq`) once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ArchiveLine {
    /// A deleted session: its row (saved context included), agents, locks
    /// and queued waiters.
    Session {
        session: global_sessions::Model,
        agents: Vec<agent_executions::Model>,
        locks: Vec<resource_locks::Model>,
        waiters: Vec<lock_waiters::Model>,
    },
    /// A saved context that was cleared; the session's row stays.
    Context {
        session_id: Uuid,
        cleared_at: DateTime<Utc>,
        context_data: serde_json::Value,
    },
    /// A deleted audit row.
    Audit { row: audit_log::Model },
}

/// The archive file of one prune, opened for appending. A batch's lines
/// are written as they are read ([`write`](Self::write)), flushed to disk
/// once ([`sync`](Self::sync)) before the batch commits, and cut off again
/// ([`abort`](Self::abort)) if the batch does not get that far.
pub(crate) struct Archive {
    path: PathBuf,
    file: tokio::fs::File,
    /// Where the batch under way began.
    batch_start: u64,
}

impl Archive {
    /// Opens (or creates, mode 0600 on Unix: it holds saved contexts) the
    /// file. A last line cut short by a crash mid-write is cut off, so the
    /// file stays one JSON object per line.
    pub(crate) async fn open(path: &Path) -> Result<Self> {
        let created = !path.exists();
        let mut options = tokio::fs::OpenOptions::new();
        options.create(true).read(true).append(true);
        #[cfg(unix)]
        options.mode(0o600);
        let file = options.open(path).await.map_err(|e| failed(path, &e))?;
        let mut archive = Self {
            path: path.to_owned(),
            file,
            batch_start: 0,
        };
        archive.cut_torn_line().await?;
        if created {
            // The new file's name, durably: its lines are synced before each
            // delete commits, so the file must not vanish in a power loss.
            sync_dir(path).map_err(|e| failed(path, &e))?;
        }
        Ok(archive)
    }

    async fn cut_torn_line(&mut self) -> Result<()> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let len = self.len().await?;
        if len == 0 {
            return Ok(());
        }
        // The last line ends at the last newline; look back a block at a time.
        let mut end = len;
        let mut block = vec![0u8; 64 * 1024];
        let keep = loop {
            let start = end.saturating_sub(block.len() as u64);
            let size = usize::try_from(end - start).unwrap_or(block.len());
            let read = async {
                self.file.seek(std::io::SeekFrom::Start(start)).await?;
                self.file.read_exact(&mut block[..size]).await
            };
            read.await.map_err(|e| failed(&self.path, &e))?;
            if let Some(i) = block[..size].iter().rposition(|b| *b == b'\n') {
                break start + i as u64 + 1;
            }
            if start == 0 {
                break 0;
            }
            end = start;
        };
        if keep < len {
            self.file
                .set_len(keep)
                .await
                .map_err(|e| failed(&self.path, &e))?;
        }
        Ok(())
    }

    async fn len(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .await
            .map_err(|e| failed(&self.path, &e))?
            .len())
    }

    /// Starts a batch's lines.
    pub(crate) async fn begin(&mut self) -> Result<()> {
        self.batch_start = self.len().await?;
        Ok(())
    }

    /// Appends `lines` to the batch under way (not yet on disk).
    pub(crate) async fn write(&mut self, lines: &[ArchiveLine]) -> Result<()> {
        let mut text = Vec::new();
        for line in lines {
            serde_json::to_writer(&mut text, line).map_err(|e| failed(&self.path, &e))?;
            text.push(b'\n');
        }
        self.file
            .write_all(&text)
            .await
            .map_err(|e| failed(&self.path, &e))
    }

    /// Flushes the batch's lines to disk.
    pub(crate) async fn sync(&mut self) -> Result<()> {
        let synced = async {
            self.file.flush().await?;
            self.file.sync_data().await
        };
        synced.await.map_err(|e| failed(&self.path, &e))
    }

    /// Cuts off the lines of a batch that will not commit.
    pub(crate) async fn abort(&mut self) {
        let _ = self.file.flush().await;
        if let Err(e) = self.file.set_len(self.batch_start).await {
            tracing::warn!(path = %self.path.display(), error = %e,
                "cannot cut an aborted batch's lines off the prune archive");
        }
    }
}

#[cfg(unix)]
fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_: &Path) -> std::io::Result<()> {
    Ok(())
}

fn failed(path: &Path, e: &dyn std::fmt::Display) -> Error {
    Error::Archive {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}
