//! `--wal-pages` (sqlite-wal only): how many pages one end writes to the
//! write-ahead log, and which table or index each page belongs to. Every page
//! a commit changes is written to the WAL, and with the library's
//! `synchronous=FULL` each commit is also fsynced, so on a file database an
//! end's cost follows its page count; this is where one end's pages go, per
//! implementation. It uses the first `--background` and `--context-bytes`
//! values.
//!
//! Before each end (untimed) the WAL is checkpointed and truncated
//! (`PRAGMA wal_checkpoint(TRUNCATE)`); after it, every frame in the WAL is
//! the end's. A frame's page is named by the `dbstat` virtual table read after
//! the end; pages it does not list (free-list pages) count as `(free)`.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use sea_orm::{ConnectionTrait, Statement};
use serde::Serialize;

use crate::args::{Args, Impl};
use crate::fixture::{BackendKind, BoxResult, Fixture};
use crate::{end_session, forget_windows, open_populated, WARMUP};

/// The WAL header (32 bytes) and each frame's header (24 bytes), fixed by
/// SQLite's file format.
const WAL_HEADER: usize = 32;
const FRAME_HEADER: usize = 24;

/// `--wal-pages`: one line per implementation and lock count.
#[derive(Debug, Serialize)]
struct WalPagesLine {
    mode: &'static str,
    #[serde(rename = "impl")]
    implementation: &'static str,
    backend: &'static str,
    locks: u64,
    context_bytes: usize,
    background_sessions: u64,
    ends: usize,
    /// Mean WAL frames (pages) written per end.
    pages_per_end: f64,
    /// The same, per table or index, largest first in the docs.
    by_object: BTreeMap<String, f64>,
}

pub async fn run(args: &Args) -> BoxResult<()> {
    if args.backend != BackendKind::SqliteWal {
        return Err("--wal-pages needs --backend sqlite-wal".into());
    }
    let background = args.background[0];
    let context_bytes = args.context_bytes[0];
    for &locks in &args.locks {
        for &implementation in &args.impls {
            let fx = open_populated(args, background).await?;
            let counted = count_pages(&fx, implementation, locks, context_bytes, args.iters).await;
            fx.close().await?;
            let (total, by_object) = counted?;
            let per_end = |n: u64| (n as f64 / args.iters as f64 * 100.0).round() / 100.0;
            crate::report::print_json(&WalPagesLine {
                mode: "wal-pages",
                implementation: implementation.name(),
                backend: args.backend.name(),
                locks,
                context_bytes,
                background_sessions: background,
                ends: args.iters,
                pages_per_end: per_end(total),
                by_object: by_object
                    .into_iter()
                    .map(|(name, n)| (name, per_end(n)))
                    .collect(),
            })?;
        }
    }
    Ok(())
}

/// Ends `iters` sessions (after the warm-up) and counts their WAL pages.
async fn count_pages(
    fx: &Fixture,
    implementation: Impl,
    locks: u64,
    context_bytes: usize,
    iters: usize,
) -> BoxResult<(u64, BTreeMap<String, u64>)> {
    let file = fx
        .sqlite_file()
        .ok_or("--wal-pages needs a database file")?;
    let wal = file.with_file_name(format!(
        "{}-wal",
        file.file_name()
            .and_then(|n| n.to_str())
            .ok_or("database file name")?
    ));
    let mut total = 0;
    let mut by_object = BTreeMap::new();
    for round in 0..WARMUP + iters {
        let session = fx.target_session(locks, context_bytes).await?;
        truncate_wal(fx).await?;
        let released = end_session(&fx.manager, implementation, session).await?;
        forget_windows(&fx.manager, implementation, session);
        if released != locks {
            return Err(format!("released {released} locks, expected {locks}").into());
        }
        let pages = wal_pages(&wal)?;
        if round < WARMUP {
            continue;
        }
        let owners = page_owners(fx).await?;
        for page in pages {
            let name = owners.get(&page).map_or("(free)", String::as_str);
            *by_object.entry(name.to_owned()).or_insert(0) += 1;
            total += 1;
        }
    }
    Ok((total, by_object))
}

/// Checkpoints everything and empties the WAL file.
async fn truncate_wal(fx: &Fixture) -> BoxResult<()> {
    let row = fx
        .connection()
        .query_one_raw(Statement::from_string(
            fx.connection().get_database_backend(),
            "PRAGMA wal_checkpoint(TRUNCATE)",
        ))
        .await?
        .ok_or("wal_checkpoint returned no row")?;
    let busy: i64 = row.try_get_by_index(0)?;
    if busy != 0 {
        return Err("wal_checkpoint(TRUNCATE) could not finish: a reader is active".into());
    }
    Ok(())
}

/// The page number of every frame in the WAL file, in order.
fn wal_pages(wal: &Path) -> BoxResult<Vec<u32>> {
    let bytes = std::fs::read(wal).map_err(|e| format!("reading {}: {e}", wal.display()))?;
    if bytes.len() < WAL_HEADER {
        return Ok(Vec::new());
    }
    let word = |at: usize| -> BoxResult<u32> {
        let four = bytes.get(at..at + 4).ok_or("truncated WAL")?;
        Ok(u32::from_be_bytes(four.try_into()?))
    };
    let page_size = usize::try_from(word(8)?)?;
    let frame = FRAME_HEADER + page_size;
    (0..(bytes.len() - WAL_HEADER) / frame)
        .map(|i| word(WAL_HEADER + i * frame))
        .collect()
}

/// The table or index each page of the database belongs to.
async fn page_owners(fx: &Fixture) -> BoxResult<HashMap<u32, String>> {
    let rows = fx
        .connection()
        .query_all_raw(Statement::from_string(
            fx.connection().get_database_backend(),
            "SELECT pageno, name FROM dbstat",
        ))
        .await?;
    rows.iter()
        .map(|row| {
            let page: i64 = row.try_get_by_index(0)?;
            let name: String = row.try_get_by_index(1)?;
            Ok((u32::try_from(page)?, name))
        })
        .collect()
}
