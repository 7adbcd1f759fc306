//! The audit vocabulary and the one function that appends a row.
//!
//! The log is append-only: nothing in this library updates an audit row,
//! and only a prune deletes them, oldest first, at or below the compaction
//! horizon it raises first; the database's triggers refuse anything else.
use chrono::{DateTime, Utc};
use sea_orm::{ActiveValue::Set, ConnectionTrait, EntityTrait};
use uuid::Uuid;

use entity::audit_log;

/// The kinds of audit event this library writes. It serializes (serde) and
/// displays as the `event_type` stored, such as `"session_end"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "web", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
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
    /// An operator released a lock on its holder's behalf
    /// (`SessionManager::release_lock_by`), with the reason given.
    LockReleased,
    /// A session was paused: it keeps its locks, takes no new work, and its
    /// agents' waits were removed.
    SessionPaused,
    /// A paused session was made active again.
    SessionUnpaused,
    /// An agent finished its work, completed or failed
    /// (`SessionManager::finish_agent`); its locks were released.
    AgentFinished,
    /// A prune deleted ended sessions whole (agents, locks, waiters) or
    /// cleared saved contexts; its counts.
    SessionsPruned,
    /// A prune deleted old audit rows and raised the compaction horizon;
    /// names the horizon and the prune's counts.
    AuditCompacted,
    /// A waiting acquire was refused because its wait would close a cycle
    /// of agents, each waiting for a lock the next holds
    /// ([`Error::Deadlock`](crate::Error::Deadlock)). Written after the
    /// refusal, in a transaction of its own, in the refused agent's session;
    /// names each agent of the cycle (id, type, session) with the resource it
    /// waits for and the lock on it the next one holds.
    LockDeadlock,
}

impl AuditEvent {
    /// Every kind, in the order of the declaration.
    pub const ALL: [AuditEvent; 12] = [
        Self::SessionStart,
        Self::SessionEnd,
        Self::SessionInterrupted,
        Self::SessionResumed,
        Self::LocksSwept,
        Self::LockReleased,
        Self::SessionPaused,
        Self::SessionUnpaused,
        Self::AgentFinished,
        Self::SessionsPruned,
        Self::AuditCompacted,
        Self::LockDeadlock,
    ];

    /// The kind stored as `event_type`, if it is one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == name)
    }

    /// The `event_type` stored in `audit_log`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SessionStart => "session_start",
            Self::SessionEnd => "session_end",
            Self::LocksSwept => "locks_swept",
            Self::SessionInterrupted => "session_interrupted",
            Self::SessionResumed => "session_resumed",
            Self::LockReleased => "lock_released",
            Self::SessionPaused => "session_paused",
            Self::SessionUnpaused => "session_unpaused",
            Self::AgentFinished => "agent_finished",
            Self::SessionsPruned => "sessions_pruned",
            Self::AuditCompacted => "audit_compacted",
            Self::LockDeadlock => "lock_deadlock",
        }
    }
}

/// Who asked for an operation on someone else's behalf (an operator's
/// dashboard or script): recorded, with the action, in the `operator` field
/// of the operation's audit rows.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Operator {
    /// Where the request came from, such as `"dashboard"`.
    pub via: String,
    /// Why, in the operator's words.
    pub reason: Option<String>,
}

impl Operator {
    /// The `operator` field of an audit row for `action`, once the names
    /// were checked.
    pub(crate) fn details(&self, action: &str) -> crate::Result<serde_json::Value> {
        crate::validate::name("via", &self.via)?;
        if let Some(reason) = &self.reason {
            crate::validate::name("reason", reason)?;
        }
        Ok(serde_json::json!({ "action": action, "via": self.via, "reason": self.reason }))
    }
}

impl std::str::FromStr for AuditEvent {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        Self::from_name(s).ok_or_else(|| {
            let known: Vec<_> = Self::ALL.iter().map(|e| e.as_str()).collect();
            crate::Error::InvalidInput {
                field: "audit event type",
                reason: format!("{s:?} is not one; known: {}", known.join(", ")),
            }
        })
    }
}

impl std::fmt::Display for AuditEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Appends one audit row, as its ActiveModel, inside the caller's
/// transaction, which must commit (or roll back) right after: it first takes
/// the audit log's turn ([`db::audit_turn`](crate::db::audit_turn)), so that
/// the database hands out `seq` in commit order (see the `watch` module), and
/// holds it until the transaction ends.
pub(crate) async fn append<C: ConnectionTrait>(
    txn: &C,
    event: AuditEvent,
    session_id: Option<Uuid>,
    details: serde_json::Value,
    at: DateTime<Utc>,
) -> crate::Result<()> {
    crate::db::audit_turn(txn).await?;
    let row = audit_log::ActiveModel {
        id: Set(Uuid::new_v4().to_string()),
        event_type: Set(event.as_str().to_owned()),
        event_time: Set(at.into()),
        session_id: Set(session_id.map(|id| id.to_string())),
        details: Set(details),
        ..Default::default()
    };
    audit_log::Entity::insert(row)
        .exec_without_returning(txn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::AuditEvent;

    /// Serde and `Display` give the stored text, and both read it back.
    #[test]
    fn names_are_the_stored_text() {
        for event in AuditEvent::ALL {
            let json = serde_json::to_string(&event).unwrap();
            assert_eq!(json, format!("\"{}\"", event.as_str()));
            assert_eq!(serde_json::from_str::<AuditEvent>(&json).unwrap(), event);
            assert_eq!(event.as_str().parse::<AuditEvent>().unwrap(), event);
            assert_eq!(event.to_string(), event.as_str());
        }
        assert!("no_such_event".parse::<AuditEvent>().is_err());
    }
}
