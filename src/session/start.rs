//! Starting sessions and registering their agents.
use sea_orm::entity::prelude::TextUuid;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseTransaction, EntityTrait, QueryFilter, QuerySelect,
};
use uuid::Uuid;

use entity::{agent_executions, global_sessions};

use crate::audit::{self, AuditEvent};
use crate::status::{AgentStatus, SessionStatus};
use crate::{db, validate, Error, Result};

pub(crate) async fn start_session(conn: &db::Store, owner: Uuid) -> Result<Uuid> {
    insert_session(
        conn,
        owner,
        AuditEvent::SessionStart,
        |id| serde_json::json!({ "session_id": id }),
    )
    .await
}

/// Inserts an active session owned by `owner` and its audit row, in one
/// transaction; `details` gets the new id.
pub(crate) async fn insert_session(
    conn: &db::Store,
    owner: Uuid,
    event: AuditEvent,
    details: impl FnOnce(Uuid) -> serde_json::Value,
) -> Result<Uuid> {
    let id = Uuid::new_v4();
    let now = db::now();
    let txn = db::begin_write(conn).await?;
    let row = global_sessions::ActiveModel {
        id: Set(id.to_string()),
        status: Set(SessionStatus::Active.as_str().to_owned()),
        started_at: Set(now.into()),
        updated_at: Set(now.into()),
        completed_at: Set(None),
        context_data: Set(None),
        owner_instance: Set(Some(owner.to_string())),
        last_heartbeat_at: Set(Some(now.into())),
        context_cleared_at: Set(None),
    };
    global_sessions::Entity::insert(row)
        .exec_without_returning(&*txn)
        .await?;
    audit::append(&*txn, event, Some(id), details(id), now).await?;
    txn.commit().await?;
    Ok(id)
}

pub(crate) async fn register_agent(
    conn: &db::Store,
    session_id: Uuid,
    agent_type: &str,
) -> Result<Uuid> {
    validate::id("session_id", session_id)?;
    validate::name("agent_type", agent_type)?;
    let txn = db::begin_write(conn).await?;
    lock_active_session(&txn, session_id).await?;
    let id = Uuid::new_v4();
    let row = agent_executions::ActiveModel {
        id: Set(id.to_string()),
        session_id: Set(session_id.to_string()),
        agent_type: Set(agent_type.to_owned()),
        status: Set(AgentStatus::Running.as_str().to_owned()),
        started_at: Set(db::now().into()),
        completed_at: Set(None),
    };
    agent_executions::Entity::insert(row)
        .exec_without_returning(&*txn)
        .await?;
    txn.commit().await?;
    Ok(id)
}

/// Reads the session's status `FOR SHARE` and requires it to be active. The
/// share lock makes the caller's insert serialize with an end of the session,
/// which takes the row exclusively (see `session::end`).
pub(crate) async fn lock_active_session(txn: &DatabaseTransaction, session_id: Uuid) -> Result<()> {
    let status: Option<String> = global_sessions::Entity::find()
        .select_only()
        .column(global_sessions::Column::Status)
        .filter(global_sessions::Column::Id.eq(TextUuid(session_id)))
        .lock_shared()
        .into_tuple()
        .one(txn)
        .await?;
    let status = status.ok_or(Error::SessionNotFound(session_id))?;
    if status != SessionStatus::Active.as_str() {
        return Err(Error::SessionNotActive { session_id, status });
    }
    Ok(())
}
