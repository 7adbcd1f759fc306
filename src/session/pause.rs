//! Pausing a session and going on: a paused session keeps its locks (its
//! workspace) but takes no new agents, locks or waits until it is unpaused.
use sea_orm::entity::prelude::TextUuid;
use sea_orm::ActiveValue::{Set, Unchanged};
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QuerySelect};
use uuid::Uuid;

use entity::{global_sessions, lock_waiters};

use crate::audit::{self, AuditEvent};
use crate::status::SessionStatus;
use crate::{db, validate, Error, Result};

/// Pauses (`pause`) or unpauses the session, in one transaction that locks
/// its row first, as an end does. Pausing removes its agents' waits. A
/// session already in the asked-for state is left as it is and nothing is
/// written: `Ok(false)`. Whether it changed.
pub(crate) async fn set_paused(
    store: &db::Store,
    session_id: Uuid,
    pause: bool,
    operator: Option<serde_json::Value>,
) -> Result<bool> {
    validate::id("session_id", session_id)?;
    let txn = db::begin_write(store).await?;
    let status: Option<String> = global_sessions::Entity::find()
        .select_only()
        .column(global_sessions::Column::Status)
        .filter(global_sessions::Column::Id.eq(TextUuid(session_id)))
        .lock_exclusive()
        .into_tuple()
        .one(&*txn)
        .await?;
    let status: String = status.ok_or(Error::SessionNotFound(session_id))?;
    let status: SessionStatus = db::stored(
        "global_sessions",
        &session_id.to_string(),
        "status",
        &status,
    )?;
    let (from, to, event) = match pause {
        true => (
            SessionStatus::Active,
            SessionStatus::Paused,
            AuditEvent::SessionPaused,
        ),
        false => (
            SessionStatus::Paused,
            SessionStatus::Active,
            AuditEvent::SessionUnpaused,
        ),
    };
    if status == to {
        txn.rollback().await?;
        return Ok(false);
    }
    if status != from {
        txn.rollback().await?;
        return Err(Error::SessionNotActive {
            session_id,
            status: status.as_str().to_owned(),
        });
    }
    let now = db::now();
    global_sessions::ActiveModel {
        id: Unchanged(session_id.to_string()),
        status: Set(to.as_str().to_owned()),
        updated_at: Set(now.into()),
        ..Default::default()
    }
    .update_without_returning(&*txn)
    .await?;
    let waits_removed = match pause {
        true => {
            lock_waiters::Entity::delete_many()
                .filter(lock_waiters::Column::SessionId.eq(TextUuid(session_id)))
                .exec(&*txn)
                .await?
                .rows_affected
        }
        false => 0,
    };
    let mut details = serde_json::json!({ "session_id": session_id });
    if pause {
        details["waits_removed"] = waits_removed.into();
    }
    if let Some(operator) = operator {
        details["operator"] = operator;
    }
    audit::append(&*txn, event, Some(session_id), details, now).await?;
    txn.commit().await?;
    Ok(true)
}
