//! Read-only views of the store for apps and the operator CLI: sessions,
//! agents, locks and the audit log, newest first and paged.
//!
//! The views are typed: ids are [`Uuid`]s, statuses and reasons the enums
//! of their columns. A row holding a value this library cannot read does not
//! make a list fail: the list names it in [`Listing::corrupt`] and returns
//! the others.
use chrono::{DateTime, Utc};
use sea_orm::entity::prelude::TextUuid;
use sea_orm::{
    ColumnTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use entity::{agent_executions, audit_log, global_sessions, resource_locks};

use crate::audit::AuditEvent;
use crate::status::{AgentStatus, ReleaseReason, SessionStatus};
use crate::{db, validate, CorruptRow, Error, Result};

/// What a list read returned: the rows it could read, in the list's order,
/// and the rows among them holding a value this library cannot read (an id
/// that is not a UUID, an unknown status, reason or event type), each named
/// by a [`CorruptRow`].
///
/// `limit` and `offset` count both: a page of `limit` rows is
/// `rows.len() + corrupt.len()` long.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Listing<T> {
    pub rows: Vec<T>,
    pub corrupt: Vec<CorruptRow>,
}

impl<T> Default for Listing<T> {
    fn default() -> Self {
        Self {
            rows: Vec::new(),
            corrupt: Vec::new(),
        }
    }
}

impl<T> FromIterator<Result<T, CorruptRow>> for Listing<T> {
    fn from_iter<I: IntoIterator<Item = Result<T, CorruptRow>>>(iter: I) -> Self {
        let mut listing = Listing::default();
        for row in iter {
            match row {
                Ok(row) => listing.rows.push(row),
                Err(corrupt) => listing.corrupt.push(corrupt),
            }
        }
        listing
    }
}

/// The page size when a filter gives none.
pub const DEFAULT_PAGE: u64 = 50;

/// Which sessions `list_sessions` returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionFilter {
    pub status: Option<SessionStatus>,
    /// Page size (default 50).
    pub limit: Option<u64>,
    /// Rows to skip, for the next page.
    pub offset: u64,
}

/// A session without its (possibly large) saved context.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "web", derive(utoipa::ToSchema))]
pub struct SessionInfo {
    pub id: Uuid,
    pub status: SessionStatus,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    /// The manager instance that owns it (heartbeats for it).
    pub owner_instance: Option<String>,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    /// When a prune cleared its saved context ([`RetentionPolicy::context_after`](crate::RetentionPolicy::context_after));
    /// its `session_context` is then empty.
    pub context_cleared_at: Option<DateTime<Utc>>,
}

pub(crate) type SessionRow = (
    String,
    String,
    DateTime<Utc>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Option<String>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

pub(crate) fn session_info(row: SessionRow) -> Result<SessionInfo, CorruptRow> {
    const TABLE: &str = "global_sessions";
    Ok(SessionInfo {
        id: db::stored_id(TABLE, &row.0, "id", &row.0)?,
        status: db::stored(TABLE, &row.0, "status", &row.1)?,
        started_at: row.2,
        updated_at: row.3,
        completed_at: row.4,
        owner_instance: row.5,
        last_heartbeat_at: row.6,
        context_cleared_at: row.7,
    })
}

pub(crate) fn session_columns() -> sea_orm::Select<global_sessions::Entity> {
    use global_sessions::Column as C;
    global_sessions::Entity::find().select_only().columns([
        C::Id,
        C::Status,
        C::StartedAt,
        C::UpdatedAt,
        C::CompletedAt,
        C::OwnerInstance,
        C::LastHeartbeatAt,
        C::ContextClearedAt,
    ])
}

pub(crate) async fn list_sessions(
    db: &DatabaseConnection,
    filter: &SessionFilter,
) -> Result<Listing<SessionInfo>> {
    let mut query = session_columns();
    if let Some(status) = filter.status {
        query = query.filter(global_sessions::Column::Status.eq(status.as_str()));
    }
    let rows: Vec<SessionRow> = query
        .order_by_desc(global_sessions::Column::StartedAt)
        .order_by_desc(global_sessions::Column::Id)
        .limit(page_bound("limit", filter.limit.unwrap_or(DEFAULT_PAGE))?)
        .offset(page_bound("offset", filter.offset)?)
        .into_tuple()
        .all(db)
        .await?;
    Ok(rows.into_iter().map(session_info).collect())
}

pub(crate) async fn session(db: &DatabaseConnection, id: Uuid) -> Result<SessionInfo> {
    validate::id("session_id", id)?;
    let row: Option<SessionRow> = session_columns()
        .filter(global_sessions::Column::Id.eq(TextUuid(id)))
        .into_tuple()
        .one(db)
        .await?;
    Ok(session_info(row.ok_or(Error::SessionNotFound(id))?)?)
}

/// The one session whose id starts with `prefix` (at least 8 hex characters,
/// as git accepts abbreviated hashes).
pub(crate) async fn session_by_prefix(db: &DatabaseConnection, prefix: &str) -> Result<Uuid> {
    let prefix = prefix.trim().to_ascii_lowercase();
    if let Ok(id) = Uuid::parse_str(&prefix) {
        return session(db, id).await.map(|s| s.id);
    }
    let matches = ids_with_prefix::<global_sessions::Entity>(
        db,
        global_sessions::Column::Id,
        &prefix,
        "session id",
    )
    .await?;
    match matches.as_slice() {
        [one] => Ok(*one),
        [] => Err(Error::SessionPrefixNotFound { prefix }),
        _ => Err(Error::AmbiguousId { prefix }),
    }
}

/// The one lock whose id starts with `prefix` (at least 8 hex characters),
/// as for sessions.
pub(crate) async fn lock_by_prefix(db: &DatabaseConnection, prefix: &str) -> Result<Uuid> {
    let prefix = prefix.trim().to_ascii_lowercase();
    if let Ok(id) = Uuid::parse_str(&prefix) {
        validate::id("lock_id", id)?;
        let found: Option<TextUuid> = resource_locks::Entity::find()
            .select_only()
            .column(resource_locks::Column::Id)
            .filter(resource_locks::Column::Id.eq(TextUuid(id)))
            .into_tuple()
            .one(db)
            .await?;
        return found.map(|id| id.0).ok_or(Error::LockNotFound(id));
    }
    let matches = ids_with_prefix::<resource_locks::Entity>(
        db,
        resource_locks::Column::Id,
        &prefix,
        "lock id",
    )
    .await?;
    match matches.as_slice() {
        [one] => Ok(*one),
        [] => Err(Error::LockPrefixNotFound { prefix }),
        _ => Err(Error::AmbiguousId { prefix }),
    }
}

/// At most two ids in `column` that start with `prefix`, which must be 8
/// or more hex digits (hyphens allowed); `field` names it when it is not.
async fn ids_with_prefix<E: EntityTrait>(
    db: &DatabaseConnection,
    column: E::Column,
    prefix: &str,
    field: &'static str,
) -> Result<Vec<Uuid>> {
    if prefix.len() < 8 || !prefix.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Err(Error::InvalidInput {
            field,
            reason: format!("{prefix:?} is neither a UUID nor a prefix of 8 or more hex digits"),
        });
    }
    // Only hex digits and hyphens reach LIKE, so no wildcard can sneak in.
    let matches: Vec<TextUuid> = E::find()
        .select_only()
        .column(column)
        .filter(column.like(format!("{prefix}%")))
        .limit(2)
        .into_tuple()
        .all(db)
        .await?;
    Ok(matches.into_iter().map(|id| id.0).collect())
}

/// An agent execution.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "web", derive(utoipa::ToSchema))]
pub struct AgentInfo {
    pub id: Uuid,
    pub session_id: Uuid,
    pub agent_type: String,
    pub status: AgentStatus,
    pub started_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

pub(crate) async fn agents(
    db: &DatabaseConnection,
    session_id: Uuid,
) -> Result<Listing<AgentInfo>> {
    validate::id("session_id", session_id)?;
    const TABLE: &str = "agent_executions";
    Ok(agent_executions::Entity::find()
        .filter(agent_executions::Column::SessionId.eq(TextUuid(session_id)))
        .order_by_asc(agent_executions::Column::StartedAt)
        .all(db)
        .await?
        .into_iter()
        .map(|a| {
            Ok(AgentInfo {
                id: db::stored_id(TABLE, &a.id, "id", &a.id)?,
                session_id: db::stored_id(TABLE, &a.id, "session_id", &a.session_id)?,
                status: db::stored(TABLE, &a.id, "status", &a.status)?,
                agent_type: a.agent_type,
                started_at: a.started_at.to_utc(),
                completed_at: a.completed_at.map(|at| at.to_utc()),
            })
        })
        .collect())
}

/// Which locks `locks` returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LockFilter {
    pub session_id: Option<Uuid>,
    /// Only this lock.
    pub lock_id: Option<Uuid>,
    /// Only locks still held.
    pub held_only: bool,
    pub limit: Option<u64>,
    pub offset: u64,
}

/// One resource lock, held or released.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LockInfo {
    pub id: Uuid,
    pub session_id: Uuid,
    pub agent_id: Uuid,
    pub resource_type: String,
    pub resource_key: String,
    pub fencing_token: i64,
    pub acquired_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    /// `None` while held.
    pub released_at: Option<DateTime<Utc>>,
    /// Why it was released; `None` while held.
    pub release_reason: Option<ReleaseReason>,
}

impl LockInfo {
    pub(crate) fn from_row(l: resource_locks::Model) -> Result<Self, CorruptRow> {
        const TABLE: &str = "resource_locks";
        Ok(Self {
            id: db::stored_id(TABLE, &l.id, "id", &l.id)?,
            session_id: db::stored_id(TABLE, &l.id, "session_id", &l.session_id)?,
            agent_id: db::stored_id(TABLE, &l.id, "agent_id", &l.agent_id)?,
            release_reason: match &l.release_reason {
                Some(reason) => Some(db::stored(TABLE, &l.id, "release_reason", reason)?),
                None => None,
            },
            resource_type: l.resource_type,
            resource_key: l.resource_key,
            fencing_token: l.fencing_token,
            acquired_at: l.acquired_at.to_utc(),
            expires_at: l.expires_at.map(|at| at.to_utc()),
            released_at: l.released_at.map(|at| at.to_utc()),
        })
    }
}

pub(crate) async fn locks(
    db: &DatabaseConnection,
    filter: &LockFilter,
) -> Result<Listing<LockInfo>> {
    let mut query = resource_locks::Entity::find();
    if let Some(session) = filter.session_id {
        query = query.filter(resource_locks::Column::SessionId.eq(TextUuid(session)));
    }
    if let Some(lock) = filter.lock_id {
        query = query.filter(resource_locks::Column::Id.eq(TextUuid(lock)));
    }
    if filter.held_only {
        query = query.filter(resource_locks::Column::ReleasedAt.is_null());
    }
    Ok(query
        .order_by_desc(resource_locks::Column::FencingToken)
        .limit(page_bound("limit", filter.limit.unwrap_or(DEFAULT_PAGE))?)
        .offset(page_bound("offset", filter.offset)?)
        .all(db)
        .await?
        .into_iter()
        .map(LockInfo::from_row)
        .collect())
}

/// Which audit rows `audit_events` returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditFilter {
    pub session_id: Option<Uuid>,
    /// An `event_type` such as `session_end`.
    pub event_type: Option<String>,
    /// Events at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Events before this time.
    pub until: Option<DateTime<Utc>>,
    /// Events with a `seq` greater than this one; below the compaction
    /// horizon, [`Error::Compacted`](crate::Error::Compacted).
    pub after: Option<i64>,
    pub limit: Option<u64>,
    pub offset: u64,
}

/// One audit row.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "web", derive(utoipa::ToSchema))]
pub struct AuditRecord {
    /// The row's place in the log, set by the database: unique, starting at
    /// 1, increasing in commit order. The cursor of
    /// [`SessionManager::watch`](crate::SessionManager::watch).
    pub seq: i64,
    pub id: Uuid,
    pub event_type: AuditEvent,
    pub event_time: DateTime<Utc>,
    pub session_id: Option<Uuid>,
    pub details: serde_json::Value,
}

pub(crate) async fn audit_events(
    db: &DatabaseConnection,
    filter: &AuditFilter,
) -> Result<Listing<AuditRecord>> {
    let mut query = audit_log::Entity::find();
    if let Some(session) = filter.session_id {
        query = query.filter(audit_log::Column::SessionId.eq(session.to_string()));
    }
    if let Some(event) = &filter.event_type {
        query = query.filter(audit_log::Column::EventType.eq(event.as_str()));
    }
    if let Some(since) = filter.since {
        query = query.filter(audit_log::Column::EventTime.gte(since));
    }
    if let Some(until) = filter.until {
        query = query.filter(audit_log::Column::EventTime.lt(until));
    }
    if let Some(after) = filter.after {
        if after < 0 {
            return Err(crate::Error::InvalidInput {
                field: "after",
                reason: format!("{after} is negative (seq starts at 1)"),
            });
        }
        query = query.filter(audit_log::Column::Seq.gt(after));
    }
    let rows = query
        .order_by_desc(audit_log::Column::Seq)
        .limit(page_bound("limit", filter.limit.unwrap_or(DEFAULT_PAGE))?)
        .offset(page_bound("offset", filter.offset)?)
        .all(db)
        .await?;
    if let Some(after) = filter.after {
        // After the rows, as a feed does: see `watch::read_page`.
        crate::retention::check_horizon(db, after).await?;
    }
    Ok(rows.into_iter().map(AuditRecord::from_row).collect())
}

impl AuditRecord {
    pub(crate) fn from_row(r: audit_log::Model) -> Result<Self, CorruptRow> {
        const TABLE: &str = "audit_log";
        let seq = r.seq.to_string();
        Ok(AuditRecord {
            seq: r.seq,
            id: db::stored_id(TABLE, &seq, "id", &r.id)?,
            event_type: AuditEvent::from_name(&r.event_type)
                .ok_or_else(|| db::corrupt(TABLE, &seq, "event_type", &r.event_type))?,
            event_time: r.event_time.to_utc(),
            session_id: match &r.session_id {
                Some(id) => Some(db::stored_id(TABLE, &seq, "session_id", id)?),
                None => None,
            },
            details: r.details,
        })
    }
}

/// Open sessions (`active` or `paused`) and held locks in the store.
pub(crate) async fn store_counts(db: &DatabaseConnection) -> Result<(u64, u64)> {
    let sessions = global_sessions::Entity::find()
        .filter(global_sessions::Column::Status.is_in(SessionStatus::open_names()))
        .count(db)
        .await?;
    let locks = resource_locks::Entity::find()
        .filter(resource_locks::Column::ReleasedAt.is_null())
        .count(db)
        .await?;
    Ok((sessions, locks))
}

/// A limit or offset every backend binds: at most `i64::MAX`.
fn page_bound(field: &'static str, value: u64) -> Result<u64> {
    match i64::try_from(value) {
        Ok(_) => Ok(value),
        Err(_) => Err(Error::InvalidInput {
            field,
            reason: format!("{value} is over {}", i64::MAX),
        }),
    }
}
