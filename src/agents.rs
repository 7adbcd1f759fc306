//! An agent's own end: it finished its work, or failed. Its locks go at
//! once, not when its session ends.
use chrono::{DateTime, Utc};
use sea_orm::entity::prelude::TextUuid;
use sea_orm::sea_query::Expr;
use sea_orm::ActiveValue::{Set, Unchanged};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect,
};
use serde::Serialize;
use uuid::Uuid;

use entity::{agent_executions, global_sessions, lock_waiters, resource_locks};

use crate::audit::{self, AuditEvent};
use crate::locks::wake::Freed;
use crate::locks::IDS_PER_STATEMENT;
use crate::status::{AgentStatus, ReleaseReason};
use crate::{db, validate, Error, Result};

/// How an agent's work ended, for [`SessionManager::finish_agent`](crate::SessionManager::finish_agent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentOutcome {
    /// It did what it was for.
    Completed,
    /// It stopped on an error; `reason` says which (recorded in the audit
    /// row; a name: not empty, at most
    /// [`MAX_NAME_BYTES`](crate::MAX_NAME_BYTES)).
    Failed { reason: String },
}

impl AgentOutcome {
    fn status(&self) -> AgentStatus {
        match self {
            Self::Completed => AgentStatus::Completed,
            Self::Failed { .. } => AgentStatus::Failed,
        }
    }
}

/// What `finish_agent` did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "web", derive(utoipa::ToSchema))]
pub struct FinishReport {
    pub agent_id: Uuid,
    pub session_id: Uuid,
    /// The agent's status now: `completed` or `failed` (the first finish's,
    /// if `already_finished`).
    pub status: AgentStatus,
    /// Its held locks, released with reason `agent_finished`.
    pub locks_released: u64,
    /// It had finished before: nothing was written.
    pub already_finished: bool,
    /// When it finished (the first finish's, if `already_finished`).
    pub completed_at: Option<DateTime<Utc>>,
}

/// Finishes the agent in one transaction: its status and `completed_at`,
/// its held locks released (reason `agent_finished`), its queue entry
/// removed and one `agent_finished` audit row. Returns what was freed, for
/// the waiters.
///
/// The session row is locked first, exclusively, as an end locks it: an
/// acquire (which reads it `FOR SHARE` before the agent's status) and an
/// end of the session serialize with the finish, so no lock is granted to
/// an agent that finished, and an end and a finish never cross.
pub(crate) async fn finish(
    store: &db::Store,
    agent_id: Uuid,
    outcome: AgentOutcome,
) -> Result<(FinishReport, Freed)> {
    validate::id("agent_id", agent_id)?;
    if let AgentOutcome::Failed { reason } = &outcome {
        validate::name("reason", reason)?;
    }
    let txn = db::begin_write(store).await?;
    let session: Option<TextUuid> = agent_executions::Entity::find()
        .select_only()
        .column(agent_executions::Column::SessionId)
        .filter(agent_executions::Column::Id.eq(TextUuid(agent_id)))
        .into_tuple()
        .one(&*txn)
        .await?;
    let session_id = session.ok_or(Error::AgentNotFound(agent_id))?.0;
    global_sessions::Entity::find_by_id(session_id.to_string())
        .select_only()
        .column(global_sessions::Column::Id)
        .lock_exclusive()
        .into_tuple::<String>()
        .one(&*txn)
        .await?;
    // Read under the session's lock: what an end or another finish left.
    let agent = agent_executions::Entity::find_by_id(agent_id.to_string())
        .one(&*txn)
        .await?
        .ok_or(Error::AgentNotFound(agent_id))?;
    let status: AgentStatus = db::stored("agent_executions", &agent.id, "status", &agent.status)?;
    match status {
        AgentStatus::Running => {}
        AgentStatus::Completed | AgentStatus::Failed => {
            txn.rollback().await?;
            let report = FinishReport {
                agent_id,
                session_id,
                status,
                locks_released: 0,
                already_finished: true,
                completed_at: agent.completed_at.map(|at| at.to_utc()),
            };
            return Ok((report, Freed::Nothing));
        }
        AgentStatus::Cancelled => {
            txn.rollback().await?;
            return Err(Error::AgentNotRunning {
                agent_id,
                status: agent.status,
            });
        }
    }
    let now = db::now();
    let status = outcome.status();
    agent_executions::ActiveModel {
        id: Unchanged(agent.id),
        status: Set(status.as_str().to_owned()),
        completed_at: Set(Some(now.into())),
        ..Default::default()
    }
    .update_without_returning(&*txn)
    .await?;
    let (locks_released, freed) = release_agent_locks(&*txn, agent_id, now).await?;
    lock_waiters::Entity::delete_many()
        .filter(lock_waiters::Column::AgentId.eq(TextUuid(agent_id)))
        .exec(&*txn)
        .await?;
    let reason = match &outcome {
        AgentOutcome::Failed { reason } => Some(reason.as_str()),
        AgentOutcome::Completed => None,
    };
    let details = serde_json::json!({
        "agent_id": agent_id,
        "session_id": session_id,
        "outcome": status.as_str(),
        "reason": reason,
        "locks_released": locks_released,
    });
    audit::append(
        &*txn,
        AuditEvent::AgentFinished,
        Some(session_id),
        details,
        now,
    )
    .await?;
    txn.commit().await?;
    let report = FinishReport {
        agent_id,
        session_id,
        status,
        locks_released,
        already_finished: false,
        completed_at: Some(now),
    };
    Ok((report, freed))
}

/// Releases the agent's held locks (reason `agent_finished`); how many, and
/// which resources that freed.
async fn release_agent_locks(
    txn: &impl ConnectionTrait,
    agent_id: Uuid,
    now: DateTime<Utc>,
) -> Result<(u64, Freed)> {
    let held: Vec<(String, String, String)> = resource_locks::Entity::find()
        .select_only()
        .column(resource_locks::Column::Id)
        .column(resource_locks::Column::ResourceType)
        .column(resource_locks::Column::ResourceKey)
        .filter(resource_locks::Column::AgentId.eq(TextUuid(agent_id)))
        .filter(resource_locks::Column::ReleasedAt.is_null())
        .into_tuple()
        .all(txn)
        .await?;
    let mut released = 0;
    for chunk in held.chunks(IDS_PER_STATEMENT) {
        released += resource_locks::Entity::update_many()
            .col_expr(resource_locks::Column::ReleasedAt, Expr::value(now))
            .col_expr(
                resource_locks::Column::ReleaseReason,
                Expr::value(ReleaseReason::AgentFinished.as_str()),
            )
            .filter(resource_locks::Column::Id.is_in(chunk.iter().map(|(id, ..)| id.as_str())))
            .filter(resource_locks::Column::ReleasedAt.is_null())
            .exec(txn)
            .await?
            .rows_affected;
    }
    let freed = match held.as_slice() {
        [] => Freed::Nothing,
        [(_, resource_type, resource_key)] => {
            Freed::One((resource_type.clone(), resource_key.clone()))
        }
        _ => Freed::All,
    };
    Ok((released, freed))
}
