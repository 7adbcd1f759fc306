//! The yardstick: the end of the story's seed ("Session End Flow" in
//! story-6.5-session-end-and-cleanup.md), its three statements run verbatim
//! through sqlx on the pool of the library's own writes (same pragmas, same server session
//! settings), as prepared statements cached per connection, sqlx's default.
//!
//! It runs on a database of its own, made like the library's; with
//! `--impl both` (or `all`) the databases are timed in one interleaved loop.
//!
//! Deviations from the seed, each forced by our schema or driver:
//! - `release_reason = 'session_end'` is set together with `released_at`: our
//!   CHECK constraint requires both or neither.
//! - PostgreSQL takes `$1`, `$2` placeholders; the context is bound as JSON so
//!   PostgreSQL accepts it for its `jsonb` column.
//!
//! Kept as the seed has them, although they are traps the library avoids:
//! `CURRENT_TIMESTAMP` (on SQLite it writes `YYYY-MM-DD HH:MM:SS` text, which
//! sorts before the RFC 3339 text the library writes for the same second and
//! drops the sub-seconds; on MariaDB it is the session time zone's local time),
//! the `agent_id IN (SELECT …)` subquery (it ignores our `session_id` column and
//! walks every lock, held or released, of each agent), the audit row without
//! `session_id` (so the one-`session_end`-per-session index does not apply),
//! no cancelling of running agents, and sqlx's plain `BEGIN` (deferred on SQLite).
//!
//! `raw-full` ([`FULL_SQL`]) is the same end with the library's extra durable
//! work added by hand (cancelled agents, times bound from Rust, the audit
//! row's session id), on the same kind of database: the yardstick for the
//! library's own cost, as raw-seed is for the story's.
use std::error::Error;
use std::time::Instant;

use chrono::{SubsecRound, Utc};

use demiarch_sessions::{ContextWindow, SessionManager, CONTEXT_FORMAT_VERSION};
use sea_orm::sqlx;
use sea_orm::DatabaseBackend;
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use crate::args::Impl;

/// The seed's statements with `?` placeholders (SQLite, MariaDB/MySQL).
pub const SEED_SQL: [&str; 3] = [
    "UPDATE global_sessions
     SET status = 'completed',
         completed_at = CURRENT_TIMESTAMP,
         context_data = ?
     WHERE id = ?",
    "UPDATE resource_locks
     SET released_at = CURRENT_TIMESTAMP, release_reason = 'session_end'
     WHERE released_at IS NULL
     AND agent_id IN (
         SELECT id FROM agent_executions WHERE session_id = ?
     )",
    "INSERT INTO audit_log (id, event_type, event_time, details)
     VALUES (?, 'session_end', CURRENT_TIMESTAMP, ?)",
];

/// The same statements with PostgreSQL's numbered placeholders.
pub const SEED_SQL_POSTGRES: [&str; 3] = [
    "UPDATE global_sessions
     SET status = 'completed',
         completed_at = CURRENT_TIMESTAMP,
         context_data = $1
     WHERE id = $2",
    "UPDATE resource_locks
     SET released_at = CURRENT_TIMESTAMP, release_reason = 'session_end'
     WHERE released_at IS NULL
     AND agent_id IN (
         SELECT id FROM agent_executions WHERE session_id = $1
     )",
    "INSERT INTO audit_log (id, event_type, event_time, details)
     VALUES ($1, 'session_end', CURRENT_TIMESTAMP, $2)",
];

/// `raw-full`: the seed's statements plus the durable work the library's end
/// does and the seed does not, written the seed's way (plain `BEGIN`, the
/// seed's release subquery, one statement per step), so that
/// raw-full / raw-seed is the cost of that work and orm / raw-full the
/// library's cost against hand-written SQL doing it. Not like for like in
/// everything: raw-full has no already-ended guard (`status <> 'completed'`)
/// and no `BEGIN IMMEDIATE`, which the library needs for correctness. The
/// work added:
/// - the session's running agents are cancelled (a fourth statement);
/// - every time is bound from Rust, as the library binds it (RFC 3339 text
///   with microseconds on SQLite), and the session's `updated_at` is set;
/// - the audit row carries its `session_id` (so the one-`session_end` index
///   applies) and the released and cancelled counts in its details.
pub const FULL_SQL: [&str; 4] = [
    "UPDATE global_sessions
     SET status = 'completed', updated_at = ?, completed_at = ?, context_data = ?
     WHERE id = ?",
    "UPDATE resource_locks
     SET released_at = ?, release_reason = 'session_end'
     WHERE released_at IS NULL
     AND agent_id IN (
         SELECT id FROM agent_executions WHERE session_id = ?
     )",
    "UPDATE agent_executions
     SET status = 'cancelled', completed_at = ?
     WHERE session_id = ? AND status = 'running'",
    "INSERT INTO audit_log (id, event_type, event_time, session_id, details)
     VALUES (?, 'session_end', ?, ?, ?)",
];

/// [`FULL_SQL`] with PostgreSQL's numbered placeholders.
pub const FULL_SQL_POSTGRES: [&str; 4] = [
    "UPDATE global_sessions
     SET status = 'completed', updated_at = $1, completed_at = $2, context_data = $3
     WHERE id = $4",
    "UPDATE resource_locks
     SET released_at = $1, release_reason = 'session_end'
     WHERE released_at IS NULL
     AND agent_id IN (
         SELECT id FROM agent_executions WHERE session_id = $2
     )",
    "UPDATE agent_executions
     SET status = 'cancelled', completed_at = $1
     WHERE session_id = $2 AND status = 'running'",
    "INSERT INTO audit_log (id, event_type, event_time, session_id, details)
     VALUES ($1, 'session_end', $2, $3, $4)",
];

/// What `context_data` holds, the same envelope the library writes, serialized
/// straight into the bound parameter.
#[derive(Serialize)]
struct Envelope<'a> {
    version: u32,
    windows: &'a [ContextWindow],
}

/// The windows as the parameter the seed binds for `context_data`.
fn envelope(windows: &[ContextWindow]) -> sqlx::types::Json<Envelope<'_>> {
    sqlx::types::Json(Envelope {
        version: CONTEXT_FORMAT_VERSION,
        windows,
    })
}

/// The seed's end, in its order: begin, serialize the context, update the
/// session, release the locks, append the audit row, commit. Returns the
/// number of locks released.
macro_rules! seed_end {
    ($pool:expr, $sql:expr, $manager:expr, $session_id:expr, $start:expr) => {{
        let mut tx = $pool.begin().await?;
        // 1. Serialize context before cleanup
        let windows = $manager.contexts().windows($session_id);
        let context_data = envelope(&windows);
        let session_id = $session_id.to_string();
        // 2. Update session status
        sqlx::query($sql[0])
            .bind(context_data)
            .bind(&session_id)
            .execute(&mut *tx)
            .await?;
        // 3. Release all locks for this session
        let released = sqlx::query($sql[1])
            .bind(&session_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        // 4. Create audit log entry
        sqlx::query($sql[2])
            .bind(Uuid::new_v4().to_string())
            .bind(sqlx::types::Json(json!({
                "session_id": session_id,
                "cleanup_ms": $start.elapsed().as_millis(),
            })))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(released)
    }};
}

/// The `raw-full` end ([`FULL_SQL`]): the seed's, plus the agents'
/// cancellation, times bound from Rust, and the audit row's session id and
/// counts. Returns the number of locks released.
macro_rules! full_end {
    ($pool:expr, $sql:expr, $manager:expr, $session_id:expr, $start:expr) => {{
        let mut tx = $pool.begin().await?;
        // Microseconds, as the library binds its times.
        let now = Utc::now().trunc_subsecs(6);
        let windows = $manager.contexts().windows($session_id);
        let context_data = envelope(&windows);
        let session_id = $session_id.to_string();
        sqlx::query($sql[0])
            .bind(now)
            .bind(now)
            .bind(context_data)
            .bind(&session_id)
            .execute(&mut *tx)
            .await?;
        let released = sqlx::query($sql[1])
            .bind(now)
            .bind(&session_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let cancelled = sqlx::query($sql[2])
            .bind(now)
            .bind(&session_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query($sql[3])
            .bind(Uuid::new_v4().to_string())
            .bind(now)
            .bind(&session_id)
            .bind(sqlx::types::Json(json!({
                "session_id": session_id,
                "cleanup_ms": $start.elapsed().as_millis(),
                "context_windows": windows.len(),
                "locks_released": released,
                "agents_cancelled": cancelled,
            })))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(released)
    }};
}

/// Ends `session_id` the seed's way (`raw-seed`, or `raw-full` with the
/// library's extra work) on the pool the manager's own writes use (on a
/// SQLite file its one writer connection, whose page cache the seed then
/// shares with the library, as it would as the app's only writer).
pub async fn end_session(
    manager: &SessionManager,
    implementation: Impl,
    session_id: Uuid,
) -> Result<u64, Box<dyn Error>> {
    let start = Instant::now();
    let conn = manager.write_connection();
    let full = match implementation {
        Impl::RawSeed => false,
        Impl::RawFull => true,
        Impl::Orm => return Err("raw_seed::end_session ends the seed's way only".into()),
    };
    // One macro per end: sqlx's pools have a type per backend.
    macro_rules! either_end {
        ($pool:expr, $seed_sql:expr, $full_sql:expr) => {
            if full {
                full_end!($pool, $full_sql, manager, session_id, start)
            } else {
                seed_end!($pool, $seed_sql, manager, session_id, start)
            }
        };
    }
    match conn.get_database_backend() {
        DatabaseBackend::Sqlite => {
            either_end!(conn.get_sqlite_connection_pool(), SEED_SQL, FULL_SQL)
        }
        #[cfg(feature = "postgres")]
        DatabaseBackend::Postgres => either_end!(
            conn.get_postgres_connection_pool(),
            SEED_SQL_POSTGRES,
            FULL_SQL_POSTGRES
        ),
        #[cfg(feature = "mysql")]
        DatabaseBackend::MySql => {
            either_end!(conn.get_mysql_connection_pool(), SEED_SQL, FULL_SQL)
        }
        #[allow(unreachable_patterns)]
        other => Err(format!(
            "{}: backend {other:?} is not compiled in",
            implementation.name()
        )
        .into()),
    }
}
