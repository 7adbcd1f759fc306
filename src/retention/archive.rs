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

/// The archive file of one prune, opened for appending.
pub(crate) struct Archive {
    path: PathBuf,
    file: tokio::fs::File,
}

impl Archive {
    pub(crate) async fn open(path: &Path) -> Result<Self> {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await
            .map_err(|e| failed(path, &e))?;
        Ok(Self {
            path: path.to_owned(),
            file,
        })
    }

    /// Appends `lines` and flushes them to disk. On failure the file is cut
    /// back to where it was, so no partial line stays behind.
    pub(crate) async fn append(&mut self, lines: &[ArchiveLine]) -> Result<()> {
        let mut text = Vec::new();
        for line in lines {
            serde_json::to_writer(&mut text, line).map_err(|e| failed(&self.path, &e))?;
            text.push(b'\n');
        }
        let before = self
            .file
            .metadata()
            .await
            .map_err(|e| failed(&self.path, &e))?
            .len();
        let written = async {
            self.file.write_all(&text).await?;
            self.file.flush().await?;
            self.file.sync_data().await
        }
        .await;
        if let Err(e) = written {
            let _ = self.file.set_len(before).await;
            return Err(failed(&self.path, &e));
        }
        Ok(())
    }
}

fn failed(path: &Path, e: &dyn std::fmt::Display) -> Error {
    Error::Archive {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}
