//! `--prune`: what a prune costs, and what it costs the ends meanwhile.
//!
//! For each `--batch` size, two fresh databases of `--sessions` ended
//! sessions (2 agents holding 5 locks between them, a 1 KiB saved context, ended 10
//! days ago):
//!
//! - `orm`: `SessionManager::prune` deletes them all (`completed_after` one
//!   day), once alone and once (on another such database) with ends: before
//!   it, `--iters` ends of open sessions (1 agent, 5 locks) are timed one at
//!   a time (idle); during it, ends are timed the same way until it
//!   finishes. Each line gives sessions pruned per second and, with ends,
//!   both ends' p99;
//! - `raw`: the same deletes as hand-written SQL, a batch per transaction
//!   (select the batch's ids, then one DELETE per table by id list), with
//!   the same ends timed before and during it: the floor the library's
//!   figures are ratios of.
//!
//! On `sqlite-wal` a last line follows the file: its size after 10 000
//! sessions, and after pruning them and making 10 000 more.
use std::time::{Duration, Instant};

use demiarch_sessions::RetentionPolicy;
use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseConnection, Statement, TransactionTrait};
use serde::Serialize;

use crate::args::Args;
use crate::fixture::{BackendKind, BoxResult, Fixture};
use crate::manager_config;
use crate::report::{peak_rss_kb, print_json, round1, summarize};

const OP: &str = "prune";
/// Open sessions made for the ends timed during a prune.
const TARGETS: u64 = 20_000;
/// Sessions of the file-size case, per round.
const FILE_SESSIONS: u64 = 10_000;

#[derive(Debug, Serialize)]
struct RateLine {
    op: &'static str,
    backend: &'static str,
    #[serde(rename = "impl")]
    implementation: &'static str,
    batch: u32,
    sessions: u64,
    seconds: f64,
    sessions_per_s: f64,
    /// Ends timed while nothing else ran, and while the prune ran (none:
    /// the prune ran alone).
    idle_ends: usize,
    idle_end_p99_us: f64,
    ends_during: usize,
    during_end_p99_us: f64,
    peak_rss_kb: u64,
}

#[derive(Debug, Serialize)]
struct FileLine {
    op: &'static str,
    backend: &'static str,
    case: &'static str,
    sessions: u64,
    bytes_after_first: u64,
    bytes_after_second: u64,
    ratio: f64,
}

pub async fn run(args: &Args) -> BoxResult<()> {
    for &batch in &args.prune_batches {
        for with_ends in [false, true] {
            let orm = rate(args, batch, Pruner::Orm, with_ends).await?;
            let raw = rate(args, batch, Pruner::Raw, with_ends).await?;
            print_json(&orm)?;
            print_json(&raw)?;
        }
    }
    if args.backend == BackendKind::SqliteWal {
        print_json(&file_size(args).await?)?;
    }
    Ok(())
}

/// A fresh database holding `sessions` sessions ended ten days ago.
async fn ended_sessions(args: &Args, sessions: u64) -> BoxResult<Fixture> {
    let fx = Fixture::open(args.backend, manager_config(args)).await?;
    fx.create_sessions(sessions, 2, 5).await?;
    let ten_days_ago = chrono::Utc::now() - chrono::Duration::days(10);
    fx.end_all_open(ten_days_ago, 1024).await?;
    Ok(fx)
}

fn policy(batch: u32) -> RetentionPolicy {
    RetentionPolicy {
        completed_after: Some(Duration::from_secs(24 * 60 * 60)),
        batch,
        ..RetentionPolicy::default()
    }
}

/// Which prune a rate line times.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pruner {
    Orm,
    Raw,
}

/// One prune's rate; `with_ends`, with ends timed before it (idle) and
/// one after another while it runs.
async fn rate(args: &Args, batch: u32, pruner: Pruner, with_ends: bool) -> BoxResult<RateLine> {
    let sessions = u64::try_from(args.sessions)?;
    let fx = ended_sessions(args, sessions).await?;
    let targets = if with_ends { TARGETS } else { 0 };
    let mut targets = fx.create_sessions(targets, 1, 5).await?.into_iter();
    fx.analyze().await?;
    let manager = fx.manager.clone();
    let mut idle = Vec::with_capacity(args.iters);
    for _ in 0..args.iters * usize::from(with_ends) {
        let session = targets.next().ok_or("out of open sessions to end")?;
        let started = Instant::now();
        manager.end_session(session).await?;
        idle.push(started.elapsed());
    }
    let started = Instant::now();
    let prune = match pruner {
        Pruner::Orm => {
            let manager = manager.clone();
            tokio::spawn(async move {
                let report = manager
                    .prune(&policy(batch))
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(report.sessions_deleted)
            })
        }
        Pruner::Raw => {
            let db = manager.write_connection().clone();
            tokio::spawn(async move { raw_prune(&db, batch).await.map_err(|e| e.to_string()) })
        }
    };
    let mut during = Vec::new();
    while with_ends && !prune.is_finished() {
        let Some(session) = targets.next() else { break };
        let end = Instant::now();
        manager.end_session(session).await?;
        // Only ends that overlapped the prune.
        if !prune.is_finished() {
            during.push(end.elapsed());
        }
    }
    let deleted = prune.await??;
    let seconds = started.elapsed().as_secs_f64();
    fx.close().await?;
    if deleted != sessions {
        return Err(format!("the prune deleted {deleted} sessions of {sessions}").into());
    }
    let (_, idle_p99) = summarize(&idle);
    let (_, during_p99) = summarize(&during);
    Ok(RateLine {
        op: OP,
        backend: args.backend.name(),
        implementation: match pruner {
            Pruner::Orm => "orm",
            Pruner::Raw => "raw",
        },
        batch,
        sessions,
        seconds: round3(seconds),
        sessions_per_s: round1(sessions as f64 / seconds),
        idle_ends: idle.len(),
        idle_end_p99_us: idle_p99,
        ends_during: during.len(),
        during_end_p99_us: during_p99,
        peak_rss_kb: peak_rss_kb(),
    })
}

/// The floor: the same deletes in hand-written SQL, a batch per transaction
/// (the batch's ids, then one DELETE per table by id list); the sessions
/// deleted.
async fn raw_prune(db: &DatabaseConnection, batch: u32) -> BoxResult<u64> {
    let backend = db.get_database_backend();
    let cutoff = (chrono::Utc::now() - chrono::Duration::days(1)).to_rfc3339();
    let select = format!(
        "SELECT id FROM global_sessions WHERE status IN ('completed', 'interrupted') \
         AND updated_at < {} ORDER BY updated_at, id LIMIT {batch}{}",
        timestamp(backend, &cutoff),
        if backend == DatabaseBackend::Sqlite {
            ""
        } else {
            " FOR UPDATE SKIP LOCKED"
        }
    );
    let mut deleted = 0u64;
    loop {
        let txn = match backend {
            DatabaseBackend::Sqlite => {
                db.begin_with_options(sea_orm::TransactionOptions {
                    sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
                    ..Default::default()
                })
                .await?
            }
            _ => db.begin().await?,
        };
        let rows = txn
            .query_all_raw(Statement::from_string(backend, select.clone()))
            .await?;
        let ids: Vec<String> = rows
            .iter()
            .map(|row| row.try_get_by_index::<String>(0))
            .collect::<Result<_, _>>()?;
        if ids.is_empty() {
            txn.rollback().await?;
            return Ok(deleted);
        }
        for chunk in ids.chunks(900) {
            let list = chunk
                .iter()
                .map(|id| format!("'{id}'"))
                .collect::<Vec<_>>()
                .join(",");
            for (table, column) in [
                ("resource_locks", "session_id"),
                ("lock_waiters", "session_id"),
                ("agent_executions", "session_id"),
                ("global_sessions", "id"),
            ] {
                let done = txn
                    .execute_unprepared(&format!("DELETE FROM {table} WHERE {column} IN ({list})"))
                    .await?;
                if table == "global_sessions" {
                    deleted += done.rows_affected();
                }
            }
        }
        txn.commit().await?;
        if ids.len() < batch as usize {
            return Ok(deleted);
        }
    }
}

/// A timestamp literal as each backend stores it.
fn timestamp(backend: DatabaseBackend, rfc3339: &str) -> String {
    match backend {
        DatabaseBackend::Postgres => format!("'{rfc3339}'::timestamptz"),
        DatabaseBackend::MySql => {
            let at = chrono::DateTime::parse_from_rfc3339(rfc3339)
                .map(|t| t.naive_utc().format("%Y-%m-%d %H:%M:%S%.6f").to_string())
                .unwrap_or_default();
            format!("'{at}'")
        }
        _ => format!("'{rfc3339}'"),
    }
}

/// The SQLite file's size: 10 000 sessions, pruned, then 10 000 more.
async fn file_size(args: &Args) -> BoxResult<FileLine> {
    let fx = ended_sessions(args, FILE_SESSIONS).await?;
    let file = fx.sqlite_file().ok_or("not a SQLite file")?;
    let size = |fx: &Fixture| {
        let db = fx.manager.write_connection().clone();
        let file = file.clone();
        async move {
            // Everything in the WAL goes to the file first.
            db.execute_unprepared("PRAGMA wal_checkpoint(TRUNCATE)")
                .await?;
            Ok::<u64, Box<dyn std::error::Error>>(std::fs::metadata(&file)?.len())
        }
    };
    let first = size(&fx).await?;
    fx.manager
        .prune(&RetentionPolicy {
            completed_after: Some(Duration::ZERO),
            ..RetentionPolicy::default()
        })
        .await?;
    fx.create_sessions(FILE_SESSIONS, 2, 5).await?;
    fx.end_all_open(chrono::Utc::now(), 1024).await?;
    let second = size(&fx).await?;
    fx.close().await?;
    Ok(FileLine {
        op: OP,
        backend: args.backend.name(),
        case: "file-size",
        sessions: FILE_SESSIONS,
        bytes_after_first: first,
        bytes_after_second: second,
        ratio: round3(second as f64 / first as f64),
    })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
