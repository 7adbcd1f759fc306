//! Recovering what crashed processes left behind, and reading back what a
//! session saved.
use std::time::Duration;

use sea_orm::entity::prelude::{DateTimeWithTimeZone, TextUuid};
use sea_orm::ActiveValue::{Set, Unchanged};
use sea_orm::{ActiveModelTrait, ColumnTrait, Condition, EntityTrait, QueryFilter, QuerySelect};
use serde::Serialize;
use uuid::Uuid;

use entity::global_sessions;

use crate::audit::{self, AuditEvent};
use crate::context::{self, ContextWindow};
use crate::session::{close_holdings, Closed};
use crate::status::{ReleaseReason, SessionStatus};
use crate::{db, validate, Error, Result, SessionManager};

pub(crate) async fn session_context(
    manager: &SessionManager,
    session_id: Uuid,
) -> Result<Vec<ContextWindow>> {
    validate::id("session_id", session_id)?;
    type Row = (Option<serde_json::Value>, Option<DateTimeWithTimeZone>);
    let row: Option<Row> = global_sessions::Entity::find()
        .select_only()
        .column(global_sessions::Column::ContextData)
        .column(global_sessions::Column::ContextClearedAt)
        .filter(global_sessions::Column::Id.eq(TextUuid(session_id)))
        .into_tuple()
        .one(manager.connection())
        .await
        .map_err(|e| {
            if is_decode_error(&e) {
                // The row was found but its context_data does not decode as JSON.
                Error::CorruptContext {
                    session_id,
                    reason: e.to_string(),
                }
            } else {
                Error::Database(e)
            }
        })?;
    match row {
        None => Err(Error::SessionNotFound(session_id)),
        Some((Some(saved), _)) => context::decode(session_id, saved),
        // Cleared by a prune.
        Some((None, Some(_))) => Ok(Vec::new()),
        Some((None, None)) => Ok(manager.context_source().windows(session_id)),
    }
}

/// Whether reading a value failed in decoding it, not in reaching the database.
fn is_decode_error(e: &sea_orm::DbErr) -> bool {
    use sea_orm::{DbErr, RuntimeErr};
    match e {
        DbErr::Type(_) | DbErr::Json(_) | DbErr::TryIntoErr { .. } => true,
        DbErr::Query(RuntimeErr::SqlxError(inner)) => matches!(
            inner.as_ref(),
            sea_orm::sqlx::Error::ColumnDecode { .. } | sea_orm::sqlx::Error::Decode(_)
        ),
        _ => false,
    }
}

/// What `recover_stale` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "web", derive(utoipa::ToSchema))]
pub struct RecoveryReport {
    /// Sessions marked `interrupted`, each in its own transaction.
    pub interrupted: Vec<Uuid>,
    /// Their held locks, released with reason `orphaned`.
    pub locks_released: u64,
    /// Their running agents, now `cancelled`.
    pub agents_cancelled: u64,
}

/// Open sessions whose owner has not heartbeated since `cutoff`. Sessions
/// owned by this instance are alive by definition and never match.
fn stale(cutoff: chrono::DateTime<chrono::Utc>, me: Uuid) -> Condition {
    Condition::all()
        .add(global_sessions::Column::Status.is_in(SessionStatus::open_names()))
        .add(
            Condition::any()
                .add(global_sessions::Column::LastHeartbeatAt.lt(cutoff))
                .add(
                    Condition::all()
                        .add(global_sessions::Column::LastHeartbeatAt.is_null())
                        .add(global_sessions::Column::UpdatedAt.lt(cutoff)),
                ),
        )
        .add(
            Condition::any()
                .add(global_sessions::Column::OwnerInstance.is_null())
                .add(global_sessions::Column::OwnerInstance.ne(me.to_string())),
        )
}

pub(crate) async fn recover_stale(
    manager: &SessionManager,
    stale_after: Duration,
    operator: Option<serde_json::Value>,
) -> Result<RecoveryReport> {
    let stale_after = validate::duration("stale_after", stale_after, true)?;
    let me = manager.instance_id();
    let candidates: Vec<TextUuid> = global_sessions::Entity::find()
        .select_only()
        .column(global_sessions::Column::Id)
        .filter(stale(db::now() - stale_after, me))
        .into_tuple()
        .all(manager.connection())
        .await?;
    let mut report = RecoveryReport::default();
    for TextUuid(id) in candidates {
        let txn = db::begin_write(manager.store()).await?;
        let now = db::now();
        // Re-checked under the row lock: an owner that heartbeated or ended
        // the session meanwhile keeps it.
        // Only the id: the saved context stays unread.
        let locked: Option<String> = global_sessions::Entity::find_by_id(id.to_string())
            .select_only()
            .column(global_sessions::Column::Id)
            .filter(stale(now - stale_after, me))
            .lock_exclusive()
            .into_tuple()
            .one(&*txn)
            .await?;
        let Some(locked) = locked else {
            txn.rollback().await?;
            continue;
        };
        let session = global_sessions::ActiveModel {
            id: Unchanged(locked),
            status: Set(SessionStatus::Interrupted.as_str().to_owned()),
            updated_at: Set(now.into()),
            ..Default::default()
        };
        session.update_without_returning(&*txn).await?;
        let Closed {
            locks_released,
            agents_cancelled,
        } = close_holdings(&*txn, id, ReleaseReason::Orphaned, now).await?;
        let mut details = serde_json::json!({
            "session_id": id,
            "locks_released": locks_released,
            "agents_cancelled": agents_cancelled,
        });
        if let Some(operator) = &operator {
            details["operator"] = operator.clone();
        }
        audit::append(
            &*txn,
            AuditEvent::SessionInterrupted,
            Some(id),
            details,
            now,
        )
        .await?;
        txn.commit().await?;
        report.interrupted.push(id);
        report.locks_released += locks_released;
        report.agents_cancelled += agents_cancelled;
    }
    Ok(report)
}

pub(crate) async fn resume_session(manager: &SessionManager, from: Uuid) -> Result<Uuid> {
    validate::id("session_id", from)?;
    let row: Option<(String, Option<serde_json::Value>)> = global_sessions::Entity::find()
        .select_only()
        .column(global_sessions::Column::Status)
        .column(global_sessions::Column::ContextData)
        .filter(global_sessions::Column::Id.eq(TextUuid(from)))
        .into_tuple()
        .one(manager.connection())
        .await?;
    let (status, saved) = row.ok_or(Error::SessionNotFound(from))?;
    if SessionStatus::open_names().contains(&status.as_str()) {
        return Err(Error::SessionStillOpen {
            session_id: from,
            status,
        });
    }
    let windows = match saved {
        Some(saved) => context::decode(from, saved)?,
        None => Vec::new(),
    };
    let count = windows.len();
    let to = crate::session::start::insert_session(
        manager.store(),
        manager.instance_id(),
        AuditEvent::SessionResumed,
        |to| serde_json::json!({ "session_id": to, "resumed_from": from, "context_windows": count }),
    )
    .await?;
    manager.contexts().replace(to, windows);
    manager.start_heartbeat();
    Ok(to)
}
