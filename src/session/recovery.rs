//! Reading back what a session saved.
use sea_orm::entity::prelude::TextUuid;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect};
use uuid::Uuid;

use entity::global_sessions;

use crate::context::{self, ContextWindow};
use crate::{validate, Error, Result, SessionManager};

pub(crate) async fn session_context(
    manager: &SessionManager,
    session_id: Uuid,
) -> Result<Vec<ContextWindow>> {
    validate::id("session_id", session_id)?;
    let row: Option<Option<serde_json::Value>> = global_sessions::Entity::find()
        .select_only()
        .column(global_sessions::Column::ContextData)
        .filter(global_sessions::Column::Id.eq(TextUuid(session_id)))
        .into_tuple()
        .one(manager.connection())
        .await
        .map_err(|e| match e {
            sea_orm::DbErr::Conn(_) | sea_orm::DbErr::ConnectionAcquire(_) => Error::Database(e),
            // The row was found but its context_data does not decode as JSON.
            other => Error::CorruptContext {
                session_id,
                reason: other.to_string(),
            },
        })?;
    match row {
        None => Err(Error::SessionNotFound(session_id)),
        Some(Some(saved)) => context::decode(session_id, saved),
        Some(None) => Ok(manager.context_source().windows(session_id)),
    }
}
