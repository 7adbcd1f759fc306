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
//! Every lock wait in steps 2 to 8 is bounded by the server's lock timeout
//! (`Config::cleanup_timeout`), and the whole by the client's timer a little
//! later (`db::backstop`).
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sea_orm::entity::prelude::DateTimeWithTimeZone;
use sea_orm::ActiveValue::{Set, Unchanged};
use sea_orm::{ActiveModelTrait, ConnectionTrait, EntityTrait, QuerySelect};
use tracing::{field, info_span, warn, Instrument};
use uuid::Uuid;

use entity::global_sessions;

use super::{close_holdings, Closed, EndSessionReport};
use crate::audit::{self, AuditEvent};
use crate::config::MIN_BUDGET;
use crate::context::SavedContext;
use crate::db::{self, millis};
use crate::status::{ReleaseReason, SessionStatus};
use crate::{validate, Error, Result, SessionManager};

/// `operator`: the `operator` field of the audit row, for an end asked for
/// on the session's behalf.
pub(crate) async fn end_session(
    manager: &SessionManager,
    session_id: Uuid,
    budget: Duration,
    operator: Option<serde_json::Value>,
) -> Result<EndSessionReport> {
    let span = info_span!("end_session", %session_id, locks_released = field::Empty,
        cleanup_ms = field::Empty, already_ended = field::Empty);
    async move {
        let started = Instant::now();
        validate::id("session_id", session_id)?;
        // 1. Before the transaction: the write lock is never held while user
        // data is serialized.
        let windows = manager.context_source().windows(session_id);
        let context =
            SavedContext::capture(session_id, windows, manager.config().max_context_bytes)?;
        let (windows, bytes) = (context.windows, context.bytes);

        if budget < MIN_BUDGET {
            // Too short to finish: refused before touching the database.
            return Err(Error::Timeout {
                elapsed_ms: millis(started.elapsed()),
            });
        }
        let work = async {
            // What the server takes in one statement (read once per manager).
            if let Some((limit, packet)) = manager.store().context_limit().await? {
                if bytes > limit {
                    let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
                    return Err(Error::ContextTooLargeForServer {
                        bytes: size(bytes),
                        limit: size(limit),
                        setting: "max_allowed_packet",
                        value: packet,
                    });
                }
            }
            let txn = db::begin_write(manager.store()).await?; // 2.
            let ended = end_in(&*txn, session_id, context, started, operator).await?;
            Ok::<_, Error>((txn, ended))
        };
        let work = tokio::time::timeout(db::backstop(budget), work).await;
        let (txn, ended) = db::within_budget(work, started)?;
        // 9. Never cancelled midway; one whose reply is lost may still have
        // applied, so then the row decides.
        if ended.already_ended {
            txn.rollback().await?;
        } else if let Err(e) = txn.commit().await {
            let row = super::completed_at(manager.connection(), session_id).await;
            if row != Some(ended.completed_at) {
                return Err(e.into());
            }
        }
        // 10. The live windows go either way: saved, or (the session ended
        // first elsewhere) never to be saved, counted as discarded.
        manager.context_source().clear(session_id);
        let (windows, bytes, discarded) = if ended.already_ended {
            (0, 0, windows)
        } else {
            (windows, bytes, 0)
        };
        if discarded > 0 {
            warn!(
                discarded,
                "session already ended: its live context windows were not saved"
            );
        }
        let report = EndSessionReport {
            session_id,
            completed_at: ended.completed_at,
            already_ended: ended.already_ended,
            locks_released: ended.closed.locks_released,
            agents_cancelled: ended.closed.agents_cancelled,
            context_windows: windows,
            context_bytes: bytes,
            context_windows_discarded: discarded,
            cleanup_ms: millis(started.elapsed()),
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
    operator: Option<serde_json::Value>,
) -> Result<Ended> {
    // 3. Only what the decision needs: the saved context stays unread.
    let id = session_id.to_string();
    let session: Option<(String, Option<DateTimeWithTimeZone>)> =
        global_sessions::Entity::find_by_id(id.as_str())
            .select_only()
            .columns([
                global_sessions::Column::Status,
                global_sessions::Column::CompletedAt,
            ])
            .lock_exclusive()
            .into_tuple()
            .one(txn)
            .await?;
    // 4.
    let (status, completed_at) = session.ok_or(Error::SessionNotFound(session_id))?;
    if status == SessionStatus::Completed.as_str() {
        let completed_at = completed_at.ok_or_else(|| {
            db::corrupt(
                "global_sessions",
                &session_id.to_string(),
                "completed_at",
                "NULL",
            )
        })?;
        let closed = Closed::default();
        return Ok(Ended {
            completed_at: completed_at.to_utc(),
            already_ended: true,
            closed,
        });
    }
    // 5.
    let now = db::now();
    let session = global_sessions::ActiveModel {
        id: Unchanged(id),
        status: Set(SessionStatus::Completed.as_str().to_owned()),
        completed_at: Set(Some(now.into())),
        updated_at: Set(now.into()),
        context_data: Set(Some(context.data)),
        ..Default::default()
    };
    session.update_without_returning(txn).await?;
    // 6, 7.
    let closed = close_holdings(txn, session_id, ReleaseReason::SessionEnd, now).await?;
    // 8. (AC5) Its cleanup_ms is the time up to this insert; the report's
    // adds the commit.
    let mut details = serde_json::json!({
        "session_id": session_id,
        "cleanup_ms": millis(started.elapsed()),
        "context_windows": context.windows,
        "context_bytes": context.bytes,
        "locks_released": closed.locks_released,
        "agents_cancelled": closed.agents_cancelled,
    });
    if let Some(operator) = operator {
        details["operator"] = operator;
    }
    audit::append(txn, AuditEvent::SessionEnd, Some(session_id), details, now).await?;
    Ok(Ended {
        completed_at: now,
        already_ended: false,
        closed,
    })
}

/// What the end's transaction came to.
struct Ended {
    completed_at: DateTime<Utc>,
    /// The session was already completed; nothing was written.
    already_ended: bool,
    closed: Closed,
}
