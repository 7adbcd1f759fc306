//! The audit vocabulary and the one function that appends a row.
//!
//! The log is append-only: nothing in this library updates or deletes an
//! audit row (and on SQLite, triggers refuse it).
use chrono::{DateTime, Utc};
use sea_orm::{
    entity::prelude::TextUuid, ActiveValue::Set, ConnectionTrait, DatabaseBackend, EntityTrait,
    QueryTrait, Statement,
};
use uuid::Uuid;

use entity::audit_log;

/// The kinds of audit event this library writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AuditEvent {
    /// A session was started.
    SessionStart,
    /// A session was ended with cleanup (story 6.5).
    SessionEnd,
    /// A session whose owner stopped heartbeating was marked interrupted by
    /// `recover_stale`; its locks were released and running agents cancelled.
    SessionInterrupted,
    /// A new session was started from an ended one's saved context.
    SessionResumed,
    /// Stale locks were released (by `sweep_locks`, or by an acquire that found
    /// the resource's holder expired). Names each lock.
    LocksSwept,
}

impl AuditEvent {
    /// The `event_type` stored in `audit_log`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SessionStart => "session_start",
            Self::SessionEnd => "session_end",
            Self::LocksSwept => "locks_swept",
            Self::SessionInterrupted => "session_interrupted",
            Self::SessionResumed => "session_resumed",
        }
    }
}

impl std::fmt::Display for AuditEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Appends one audit row inside the caller's transaction.
pub(crate) async fn append<C: ConnectionTrait>(
    txn: &C,
    event: AuditEvent,
    session_id: Option<Uuid>,
    details: serde_json::Value,
    at: DateTime<Utc>,
) -> crate::Result<()> {
    let backend = txn.get_database_backend();
    txn.execute_raw(Row::new(event, session_id, details, at).insert(backend))
        .await?;
    Ok(())
}

/// One audit row, with a fresh id.
#[derive(Clone, Debug)]
pub(crate) struct Row {
    id: Uuid,
    event: AuditEvent,
    session_id: Option<Uuid>,
    details: serde_json::Value,
    at: DateTime<Utc>,
}

impl Row {
    pub(crate) fn new(
        event: AuditEvent,
        session_id: Option<Uuid>,
        details: serde_json::Value,
        at: DateTime<Utc>,
    ) -> Self {
        Self {
            id: Uuid::new_v4(),
            event,
            session_id,
            details,
            at,
        }
    }

    /// Its INSERT, built from the entity.
    pub(crate) fn insert(self, backend: DatabaseBackend) -> Statement {
        let row = audit_log::ActiveModel {
            id: Set(TextUuid(self.id)),
            event_type: Set(self.event.as_str().to_owned()),
            event_time: Set(self.at),
            session_id: Set(self.session_id.map(|id| id.to_string())),
            details: Set(self.details),
        };
        audit_log::Entity::insert(row).build(backend)
    }

    /// The values [`insert`](Self::insert) binds, in its order.
    pub(crate) fn into_values(self) -> Vec<sea_orm::Value> {
        self.into_columns().into_iter().map(|(_, v)| v).collect()
    }

    /// Each column of the row with its value, in the order of
    /// [`insert`](Self::insert).
    pub(crate) fn into_columns(self) -> [(audit_log::Column, sea_orm::Value); 5] {
        [
            (audit_log::Column::Id, TextUuid(self.id).into()),
            (audit_log::Column::EventType, self.event.as_str().into()),
            (audit_log::Column::EventTime, self.at.into()),
            (
                audit_log::Column::SessionId,
                self.session_id.map(|id| id.to_string()).into(),
            ),
            (audit_log::Column::Details, self.details.into()),
        ]
    }
}
