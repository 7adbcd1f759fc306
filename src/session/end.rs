//! Ending a session with cleanup (story 6.5), top to bottom in the order the
//! story lists it, the same on every backend:
//!
//! 1. capture and size-check the session's context windows, outside any
//!    transaction;
//! 2. open the write transaction (`BEGIN IMMEDIATE` on SQLite);
//! 3. read the session, locked exclusively on the servers, so acquires and
//!    registrations (which read it `FOR SHARE`) serialize behind the end;
//! 4. decide "not found" and "already ended" there;
//! 5. update the session through its ActiveModel: status, completed_at,
//!    updated_at and the saved context;
//! 6. release its held locks and 7. cancel its running agents
//!    ([`close_holdings`], which recovery calls too);
//! 8. insert the `session_end` audit row;
//! 9. commit, never cancelled midway;
//! 10. drop the live windows, record metrics, close the span.
//!
//! Steps 2 to 8 are bounded by `Config::cleanup_timeout` on the client, and
//! every lock wait by the server's own lock timeout (see `db::begin_write`).
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, IntoActiveModel,
    QueryFilter, QuerySelect,
};
use serde::Serialize;
use tracing::{field, info_span, warn, Instrument};
use uuid::Uuid;

use entity::{agent_executions, global_sessions, resource_locks};

use crate::audit::{self, AuditEvent};
use crate::context::SavedContext;
use crate::status::{AgentStatus, ReleaseReason, SessionStatus};
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

pub(crate) async fn end_session(
    manager: &SessionManager,
    session_id: Uuid,
) -> Result<EndSessionReport> {
    let span = info_span!("end_session", %session_id, locks_released = field::Empty,
        cleanup_ms = field::Empty, already_ended = field::Empty);
    async move {
        let started = Instant::now();
        validate::id("session_id", session_id)?;
        let budget = manager.config().cleanup_timeout;
        // 1. Before the transaction: the write lock is never held while user
        // data is serialized.
        let windows = manager.context_source().windows(session_id);
        let context = SavedContext::capture(windows, manager.config().max_context_bytes)?;
        let (windows, bytes) = (context.windows, context.bytes);

        let work = async {
            let txn = db::begin_write(manager.store()).await?; // 2.
            let closed = end_in(&*txn, session_id, context, started).await?;
            Ok::<_, Error>((txn, closed))
        };
        let (txn, closed) = db::within_budget(tokio::time::timeout(budget, work).await, started)?;
        // 9. A cancelled COMMIT would leave the caller unsure whether the
        // session ended, so it runs to completion.
        let report = match closed {
            Ended::Already { completed_at } => {
                txn.rollback().await?;
                report(
                    session_id,
                    completed_at,
                    true,
                    Closed::default(),
                    (0, 0),
                    started,
                )
            }
            Ended::Now {
                completed_at,
                closed,
            } => {
                txn.commit().await?;
                // 10.
                manager.context_source().clear(session_id);
                report(
                    session_id,
                    completed_at,
                    false,
                    closed,
                    (windows, bytes),
                    started,
                )
            }
        };
        let took = started.elapsed();
        manager
            .metrics_recorder()
            .record_end(report.already_ended, report.locks_released, took);
        let span = tracing::Span::current();
        span.record("locks_released", report.locks_released);
        span.record("cleanup_ms", report.cleanup_ms);
        span.record("already_ended", report.already_ended);
        if took > budget {
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

/// Steps 3 to 8, inside the end's transaction.
async fn end_in(
    txn: &impl ConnectionTrait,
    session_id: Uuid,
    context: SavedContext,
    started: Instant,
) -> Result<Ended> {
    // 3.
    let session = global_sessions::Entity::find_by_id(session_id.to_string())
        .lock_exclusive()
        .one(txn)
        .await?;
    // 4.
    let session = session.ok_or(Error::SessionNotFound(session_id))?;
    if session.status == SessionStatus::Completed.as_str() {
        let completed_at = session.completed_at.ok_or_else(|| {
            Error::CorruptRow(format!(
                "session {session_id} is completed without completed_at"
            ))
        })?;
        return Ok(Ended::Already {
            completed_at: completed_at.to_utc(),
        });
    }
    // 5.
    let now = db::now();
    let mut session = session.into_active_model();
    session.status = Set(SessionStatus::Completed.as_str().to_owned());
    session.completed_at = Set(Some(now.into()));
    session.updated_at = Set(now.into());
    session.context_data = Set(Some(context.data));
    session.update_without_returning(txn).await?;
    // 6, 7.
    let closed = close_holdings(txn, session_id, ReleaseReason::SessionEnd, now).await?;
    // 8. (AC5) Its cleanup_ms is the time up to this insert; the report's
    // adds the commit.
    let details = serde_json::json!({
        "session_id": session_id,
        "cleanup_ms": millis(started.elapsed()),
        "context_windows": context.windows,
        "context_bytes": context.bytes,
        "locks_released": closed.locks_released,
        "agents_cancelled": closed.agents_cancelled,
    });
    audit::append(txn, AuditEvent::SessionEnd, Some(session_id), details, now).await?;
    Ok(Ended::Now {
        completed_at: now,
        closed,
    })
}

/// What the end's transaction came to.
enum Ended {
    /// The session was already completed; nothing was written.
    Already { completed_at: DateTime<Utc> },
    Now {
        completed_at: DateTime<Utc>,
        closed: Closed,
    },
}

/// What [`close_holdings`] released and cancelled.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Closed {
    pub locks_released: u64,
    pub agents_cancelled: u64,
}

/// Releases every held lock of the session (with `reason`) and cancels its
/// running agents, inside the caller's transaction, which has already read the
/// session row exclusively. Ending a session and recovering a stale one both
/// close it this way.
pub(crate) async fn close_holdings(
    txn: &impl ConnectionTrait,
    session_id: Uuid,
    reason: ReleaseReason,
    now: DateTime<Utc>,
) -> Result<Closed> {
    let session = session_id.to_string();
    let locks_released = resource_locks::Entity::update_many()
        .col_expr(resource_locks::Column::ReleasedAt, Expr::value(now))
        .col_expr(
            resource_locks::Column::ReleaseReason,
            Expr::value(reason.as_str()),
        )
        .filter(resource_locks::Column::SessionId.eq(session.as_str()))
        .filter(resource_locks::Column::ReleasedAt.is_null())
        .exec(txn)
        .await?
        .rows_affected;
    let agents_cancelled = agent_executions::Entity::update_many()
        .col_expr(
            agent_executions::Column::Status,
            Expr::value(AgentStatus::Cancelled.as_str()),
        )
        .col_expr(agent_executions::Column::CompletedAt, Expr::value(now))
        .filter(agent_executions::Column::SessionId.eq(session.as_str()))
        .filter(agent_executions::Column::Status.eq(AgentStatus::Running.as_str()))
        .exec(txn)
        .await?
        .rows_affected;
    Ok(Closed {
        locks_released,
        agents_cancelled,
    })
}

fn report(
    session_id: Uuid,
    completed_at: DateTime<Utc>,
    already_ended: bool,
    closed: Closed,
    (context_windows, context_bytes): (u64, u64),
    started: Instant,
) -> EndSessionReport {
    EndSessionReport {
        session_id,
        completed_at,
        already_ended,
        locks_released: closed.locks_released,
        agents_cancelled: closed.agents_cancelled,
        context_windows,
        context_bytes,
        cleanup_ms: millis(started.elapsed()),
    }
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
