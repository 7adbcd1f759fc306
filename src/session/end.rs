//! Ending a session with cleanup: story 6.5, top to bottom in the order it lists.
//!
//! 1. Serialize the session's context windows (before any transaction opens,
//!    so the write lock is never held while user data is serialized).
//! 2. In one transaction (SQLite: `BEGIN IMMEDIATE`), bounded by
//!    `Config::cleanup_timeout`:
//!    a. mark the session `completed` with `completed_at` and `context_data`
//!    — one conditional UPDATE that both checks and changes it;
//!    b. release every held lock of the session (reason `session_end`);
//!    c. cancel its agents that are still running;
//!    d. append the `session_end` audit row.
//! 3. Commit, then drop the session's live windows from the registry.
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sea_orm::entity::prelude::TextUuid;
use sea_orm::sea_query::Expr;
use sea_orm::sea_query::{Query, QueryStatementBuilder};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DatabaseBackend, DatabaseTransaction, EntityTrait,
    QueryFilter, QuerySelect, QueryTrait, Statement, UpdateMany,
};
use serde::Serialize;
use tracing::{field, info_span, warn, Instrument};
use uuid::Uuid;

use entity::{agent_executions, global_sessions, resource_locks};

use crate::audit::{self, AuditEvent};
use crate::context::SavedContext;
use crate::status::{AgentStatus, SessionStatus};
use crate::{db, validate, Error, Result, SessionManager};

/// What `end_session` did.
#[derive(Clone, Debug, Serialize)]
pub struct EndSessionReport {
    pub session_id: Uuid,
    /// When the session was ended (the first end's time if `already_ended`).
    pub completed_at: DateTime<Utc>,
    /// The session was already completed: nothing was written.
    pub already_ended: bool,
    pub locks_released: u64,
    pub agents_cancelled: u64,
    pub context_windows: u64,
    pub context_bytes: u64,
    /// Wall time of the whole call, commit included.
    pub cleanup_ms: u64,
}

/// What the transaction changed; the report adds the timing.
struct Cleanup {
    completed_at: DateTime<Utc>,
    already_ended: bool,
    locks_released: u64,
    agents_cancelled: u64,
}

pub(crate) async fn end_session(
    manager: &SessionManager,
    session_id: Uuid,
) -> Result<EndSessionReport> {
    let span = info_span!(
        "end_session",
        %session_id,
        locks_released = field::Empty,
        cleanup_ms = field::Empty,
        already_ended = field::Empty,
    );
    async move {
        let started = Instant::now();
        validate::id("session_id", session_id)?;
        let budget = manager.config().cleanup_timeout;

        // AC4: serialized before the transaction begins.
        let context = SavedContext::capture(
            &manager.context_source().windows(session_id),
            manager.config().max_context_bytes,
        )?;
        let (context_windows, context_bytes) = (context.windows, context.bytes);
        let now = db::now();

        // AC6: everything up to the commit is bounded. The commit itself is not
        // cancelled midway: a cancelled COMMIT would leave the caller unsure
        // whether the session ended. A dropped transaction rolls back.
        let work = async {
            let txn = db::begin_write(manager.store()).await?;
            let cleanup = cleanup_in(&txn, session_id, now, context, started).await?;
            Ok::<_, Error>((txn, cleanup))
        };
        let (txn, cleanup) = match tokio::time::timeout(budget, work).await {
            Ok(Ok(done)) => done,
            // The server (or SQLite's busy handler) gave up waiting first.
            Ok(Err(Error::Database(e))) if db::is_lock_timeout(&e) => {
                let elapsed_ms = millis(started.elapsed());
                warn!(elapsed_ms, error = %e, "session cleanup was blocked and rolled back");
                return Err(Error::Timeout { elapsed_ms });
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                let elapsed_ms = millis(started.elapsed());
                warn!(
                    elapsed_ms,
                    budget_ms = millis(budget),
                    "session cleanup timed out and was rolled back"
                );
                return Err(Error::Timeout { elapsed_ms });
            }
        };
        txn.commit().await?;
        if !cleanup.already_ended {
            manager.context_source().clear(session_id);
        }

        let elapsed = started.elapsed();
        manager.metrics_recorder().record_end(
            cleanup.already_ended,
            cleanup.locks_released,
            elapsed,
        );
        let report = EndSessionReport {
            session_id,
            completed_at: cleanup.completed_at,
            already_ended: cleanup.already_ended,
            locks_released: cleanup.locks_released,
            agents_cancelled: cleanup.agents_cancelled,
            context_windows: if cleanup.already_ended {
                0
            } else {
                context_windows
            },
            context_bytes: if cleanup.already_ended {
                0
            } else {
                context_bytes
            },
            cleanup_ms: millis(elapsed),
        };
        let span = tracing::Span::current();
        span.record("locks_released", report.locks_released);
        span.record("cleanup_ms", report.cleanup_ms);
        span.record("already_ended", report.already_ended);
        if elapsed > budget {
            warn!(
                cleanup_ms = report.cleanup_ms,
                budget_ms = millis(budget),
                "session cleanup exceeded its budget"
            );
        }
        Ok(report)
    }
    .instrument(span)
    .await
}

/// The statements of the end, inside the caller's transaction.
async fn cleanup_in(
    txn: &DatabaseTransaction,
    session_id: Uuid,
    now: DateTime<Utc>,
    context: SavedContext,
    started: Instant,
) -> Result<Cleanup> {
    let id = TextUuid(session_id);
    // AC1, AC2, AC4: one conditional update both checks and ends the session.
    // It is the first statement, so on PostgreSQL and MariaDB it takes the
    // session row's exclusive lock (what `SELECT … FOR UPDATE` would) before
    // anything else is touched: acquires and registrations, which read the row
    // `FOR SHARE`, wait for this end to commit and then see `completed`.
    // AC3: the same statement releases every held lock of the session and
    // cancels its running agents: the status trigger (migration 000003) does
    // both as the row changes to `completed`.
    let ended = global_sessions::Entity::update_many()
        .col_expr(
            global_sessions::Column::Status,
            Expr::value(SessionStatus::Completed.as_str()),
        )
        .col_expr(global_sessions::Column::UpdatedAt, Expr::value(now))
        .col_expr(global_sessions::Column::CompletedAt, Expr::value(now))
        .col_expr(
            global_sessions::Column::ContextData,
            json_text(txn.get_database_backend(), context.text),
        )
        .filter(global_sessions::Column::Id.eq(id))
        .filter(global_sessions::Column::Status.ne(SessionStatus::Completed.as_str()));
    let Some(Closed {
        locks_released,
        agents_cancelled,
    }) = close_session(txn, ended, id).await?
    else {
        return already_ended(txn, session_id).await;
    };

    // AC5: the one audit row. Its cleanup_ms is the time up to this write; the
    // report's adds the commit.
    let details = serde_json::json!({
        "session_id": session_id,
        "cleanup_ms": millis(started.elapsed()),
        "locks_released": locks_released,
        "agents_cancelled": agents_cancelled,
        "context_windows": context.windows,
        "context_bytes": context.bytes,
    });
    audit::append(txn, AuditEvent::SessionEnd, Some(session_id), details, now).await?;

    Ok(Cleanup {
        completed_at: now,
        already_ended: false,
        locks_released,
        agents_cancelled,
    })
}

/// JSON text bound for a JSON column. PostgreSQL's `jsonb` takes it through a
/// cast; SQLite stores the text as is and MariaDB's JSON column is text.
/// Binding the text the context was serialized to once, rather than a
/// `serde_json::Value` that the driver would serialize again, keeps a
/// megabyte context to one pass.
fn json_text(backend: DatabaseBackend, text: String) -> sea_orm::sea_query::SimpleExpr {
    use sea_orm::ExprTrait;
    let value = Expr::value(text);
    if backend == DatabaseBackend::Postgres {
        value.cast_as("jsonb")
    } else {
        value
    }
}

/// What the status trigger released as a session row was closed.
pub(crate) struct Closed {
    pub locks_released: u64,
    pub agents_cancelled: u64,
}

/// Runs `update`, an UPDATE of one session row to `completed` or
/// `interrupted`. The status trigger of migration 000003 releases the
/// session's held locks and cancels its running agents within that statement.
/// Returns how many, or `None` when the update matched no row.
///
/// How the counts come back depends on the backend: on SQLite the UPDATE
/// itself counts the held locks and running agents in its `RETURNING` clause
/// (computed as the row changes, before the trigger runs; SQLite has one
/// writer at a time, so the trigger changes exactly those rows); on
/// PostgreSQL and MariaDB the trigger leaves its row counts in a
/// transaction-local setting / session variable, read right after. (On the
/// servers `RETURNING` would count from the statement's snapshot, which can
/// predate a lock committed while the UPDATE waited for the session row.)
pub(crate) async fn close_session(
    txn: &DatabaseTransaction,
    update: UpdateMany<global_sessions::Entity>,
    session_id: TextUuid,
) -> Result<Option<Closed>> {
    let backend = txn.get_database_backend();
    let row = if backend == DatabaseBackend::Sqlite {
        let mut update = update.into_query();
        update.returning(
            Query::returning().exprs([
                count_where(
                    resource_locks::Entity,
                    Condition::all()
                        .add(resource_locks::Column::SessionId.eq(session_id))
                        .add(resource_locks::Column::ReleasedAt.is_null()),
                ),
                count_where(
                    agent_executions::Entity,
                    Condition::all()
                        .add(agent_executions::Column::SessionId.eq(session_id))
                        .add(agent_executions::Column::Status.eq(AgentStatus::Running.as_str())),
                ),
            ]),
        );
        match txn.query_one_raw(backend.build(&update)).await? {
            Some(row) => row,
            None => return Ok(None),
        }
    } else {
        if update.exec(txn).await?.rows_affected == 0 {
            return Ok(None);
        }
        let read = if backend == DatabaseBackend::Postgres {
            "SELECT CAST(current_setting('demiarch.locks_released') AS BIGINT), \
                    CAST(current_setting('demiarch.agents_cancelled') AS BIGINT)"
        } else {
            "SELECT CAST(@demiarch_locks_released AS SIGNED), \
                    CAST(@demiarch_agents_cancelled AS SIGNED)"
        };
        txn.query_one_raw(Statement::from_string(backend, read))
            .await?
            .ok_or_else(|| Error::CorruptRow("the session-end trigger left no counts".into()))?
    };
    let count = |index: usize| -> Result<u64> {
        let n: i64 = row.try_get_by_index(index)?;
        u64::try_from(n).map_err(|_| Error::CorruptRow(format!("negative row count {n}")))
    };
    Ok(Some(Closed {
        locks_released: count(0)?,
        agents_cancelled: count(1)?,
    }))
}

/// `(SELECT COUNT(*) FROM table WHERE condition)`.
fn count_where<E: EntityTrait>(table: E, condition: Condition) -> sea_orm::sea_query::SimpleExpr {
    Query::select()
        .expr(Expr::cust("COUNT(*)"))
        .from(table)
        .cond_where(condition)
        .to_owned()
        .into_sub_query_statement()
        .into()
}

/// The conditional update touched nothing: the session is unknown or was
/// already completed. Only then is the row read.
async fn already_ended(txn: &DatabaseTransaction, session_id: Uuid) -> Result<Cleanup> {
    let row: Option<(String, Option<DateTime<Utc>>)> = global_sessions::Entity::find()
        .select_only()
        .column(global_sessions::Column::Status)
        .column(global_sessions::Column::CompletedAt)
        .filter(global_sessions::Column::Id.eq(TextUuid(session_id)))
        .into_tuple()
        .one(txn)
        .await?;
    match row {
        None => Err(Error::SessionNotFound(session_id)),
        Some((_, Some(completed_at))) => Ok(Cleanup {
            completed_at,
            already_ended: true,
            locks_released: 0,
            agents_cancelled: 0,
        }),
        Some((status, None)) => Err(Error::CorruptRow(format!(
            "session {session_id} is {status} yet was not updated by its end"
        ))),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
