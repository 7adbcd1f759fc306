//! The audit vocabulary and the one function that appends a row.
//!
//! The log is append-only: nothing in this library updates or deletes an
//! audit row (and on SQLite, triggers refuse it).
use chrono::{DateTime, Utc};
use sea_orm::{ActiveValue::Set, ConnectionTrait, EntityTrait};
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

/// Appends one audit row, as its ActiveModel, inside the caller's transaction.
pub(crate) async fn append<C: ConnectionTrait>(
    txn: &C,
    event: AuditEvent,
    session_id: Option<Uuid>,
    details: serde_json::Value,
    at: DateTime<Utc>,
) -> crate::Result<()> {
    let row = audit_log::ActiveModel {
        id: Set(Uuid::new_v4().to_string()),
        event_type: Set(event.as_str().to_owned()),
        event_time: Set(at.into()),
        session_id: Set(session_id.map(|id| id.to_string())),
        details: Set(details),
    };
    audit_log::Entity::insert(row)
        .exec_without_returning(txn)
        .await?;
    Ok(())
}
