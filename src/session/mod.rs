//! A session's life: starting it and its agents, ending it (story 6.5), and
//! reading back what it saved.
pub(crate) mod end;
pub(crate) mod pause;
pub(crate) mod recovery;
pub(crate) mod start;

pub use recovery::RecoveryReport;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect};
use serde::Serialize;
use uuid::Uuid;

use entity::{agent_executions, global_sessions, resource_locks};

use crate::status::{AgentStatus, ReleaseReason};
use crate::Result;

/// What `end_session` did.
#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "web", derive(utoipa::ToSchema))]
pub struct EndSessionReport {
    pub session_id: Uuid,
    /// When the session was ended (the first end's time if `already_ended`).
    pub completed_at: DateTime<Utc>,
    /// The session was already completed: nothing was written.
    pub already_ended: bool,
    pub locks_released: u64,
    pub agents_cancelled: u64,
    /// Context windows saved with the session.
    pub context_windows: u64,
    pub context_bytes: u64,
    /// Live windows dropped without being saved, because the session had
    /// already been ended (by another call, instance or the operator CLI).
    pub context_windows_discarded: u64,
    /// Wall time of the whole call, commit included.
    pub cleanup_ms: u64,
}

/// What [`close_holdings`] released and cancelled.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Closed {
    pub locks_released: u64,
    pub agents_cancelled: u64,
}

/// Releases every held lock of the session (with `reason`), removes its
/// agents from the lock queues and cancels its running agents, inside the caller's transaction, which has already read the
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
    crate::locks::leave_session(txn, session_id).await?;
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

/// When the session was completed, as its row says now; `None` when it is not
/// completed, or the read failed. Settles an end whose COMMIT gave no answer.
pub(crate) async fn completed_at(
    db: &impl ConnectionTrait,
    session_id: Uuid,
) -> Option<DateTime<Utc>> {
    let row: Option<Option<sea_orm::entity::prelude::DateTimeWithTimeZone>> =
        global_sessions::Entity::find_by_id(session_id.to_string())
            .select_only()
            .column(global_sessions::Column::CompletedAt)
            .into_tuple()
            .one(db)
            .await
            .ok()?;
    row.flatten().map(|at| at.to_utc())
}
