//! The queries behind the views: cursor pages, counts and the activity
//! series, through the entities and the query builder.
use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use sea_orm::entity::prelude::TextUuid;
use sea_orm::sea_query::{Expr, ExprTrait, LikeExpr, Query};
use sea_orm::{
    ColumnTrait, Condition, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect, Select,
};
use uuid::Uuid;

use entity::{agent_executions, audit_log, global_sessions, lock_waiters, resource_locks};

use crate::query::{session_columns, session_info, SessionRow};
use crate::{AuditEvent, AuditRecord, Listing, LockInfo, Result, SessionInfo, SessionStatus};

/// A LIKE pattern matching values that start with `prefix`, its wildcards
/// escaped.
fn starts_with(prefix: &str) -> LikeExpr {
    let mut pattern = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    LikeExpr::new(pattern).escape('\\')
}

/// Which sessions a page of them holds.
pub(crate) struct SessionPageFilter {
    pub status: Option<SessionStatus>,
    pub id_prefix: Option<String>,
    pub agent_type: Option<String>,
    /// Only sessions after this one in the order (newest first).
    pub before: Option<(DateTime<Utc>, Uuid)>,
    pub limit: u64,
}

pub(crate) async fn status_counts(db: &DatabaseConnection) -> Result<Vec<(SessionStatus, u64)>> {
    let rows: Vec<(String, i64)> = global_sessions::Entity::find()
        .select_only()
        .column(global_sessions::Column::Status)
        .column_as(global_sessions::Column::Id.count(), "n")
        .group_by(global_sessions::Column::Status)
        .into_tuple()
        .all(db)
        .await?;
    rows.into_iter()
        .map(|(status, n)| Ok((status.parse()?, u64::try_from(n).unwrap_or(0))))
        .collect()
}

pub(crate) async fn session_page(
    db: &DatabaseConnection,
    f: &SessionPageFilter,
) -> Result<Listing<SessionInfo>> {
    use global_sessions::Column as C;
    let mut query = session_columns();
    if let Some(status) = f.status {
        query = query.filter(C::Status.eq(status.as_str()));
    }
    if let Some(prefix) = &f.id_prefix {
        query = query.filter(Expr::col(C::Id).like(starts_with(prefix)));
    }
    if let Some(agent_type) = &f.agent_type {
        query = query.filter(
            C::Id.in_subquery(
                Query::select()
                    .column(agent_executions::Column::SessionId)
                    .from(agent_executions::Entity)
                    .and_where(agent_executions::Column::AgentType.eq(agent_type.as_str()))
                    .to_owned(),
            ),
        );
    }
    if let Some((at, id)) = f.before {
        // `started_at <= at` bounds the index range; the rest picks the
        // rows after the cursor within it.
        query = query.filter(C::StartedAt.lte(at)).filter(
            Condition::any().add(C::StartedAt.lt(at)).add(
                Condition::all()
                    .add(C::StartedAt.eq(at))
                    .add(C::Id.lt(TextUuid(id))),
            ),
        );
    }
    let rows: Vec<SessionRow> = query
        .order_by_desc(C::StartedAt)
        .order_by_desc(C::Id)
        .limit(f.limit)
        .into_tuple()
        .all(db)
        .await?;
    Ok(rows.into_iter().map(session_info).collect())
}

/// The agent type of each of these agents, in one query.
pub(crate) async fn agent_types(
    db: &DatabaseConnection,
    ids: BTreeSet<Uuid>,
) -> Result<HashMap<Uuid, String>> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(TextUuid, String)> = agent_executions::Entity::find()
        .select_only()
        .column(agent_executions::Column::Id)
        .column(agent_executions::Column::AgentType)
        .filter(agent_executions::Column::Id.is_in(ids.into_iter().map(TextUuid)))
        .into_tuple()
        .all(db)
        .await?;
    Ok(rows.into_iter().map(|(id, t)| (id.0, t)).collect())
}

/// Which locks a page of them holds.
pub(crate) struct LockPageFilter {
    pub held_only: bool,
    pub session_id: Option<Uuid>,
    /// A resource type, and a prefix of its keys.
    pub resource: Option<(String, Option<String>)>,
    pub agent_type: Option<String>,
    pub id_prefix: Option<String>,
    /// Only locks with a lower fencing token (issued earlier).
    pub before_token: Option<i64>,
    pub limit: u64,
}

pub(crate) async fn lock_page(
    db: &DatabaseConnection,
    f: &LockPageFilter,
) -> Result<Listing<LockInfo>> {
    use resource_locks::Column as C;
    let mut query = resource_locks::Entity::find();
    if f.held_only {
        query = query.filter(C::ReleasedAt.is_null());
    }
    if let Some(session) = f.session_id {
        query = query.filter(C::SessionId.eq(TextUuid(session)));
    }
    match &f.resource {
        Some((kind, Some(key))) => {
            query = query
                .filter(C::ResourceType.eq(kind.as_str()))
                .filter(Expr::col(C::ResourceKey).like(starts_with(key)));
        }
        Some((kind, None)) => {
            query = query.filter(Expr::col(C::ResourceType).like(starts_with(kind)));
        }
        None => {}
    }
    if let Some(agent_type) = &f.agent_type {
        query = query.filter(
            C::AgentId.in_subquery(
                Query::select()
                    .column(agent_executions::Column::Id)
                    .from(agent_executions::Entity)
                    .and_where(agent_executions::Column::AgentType.eq(agent_type.as_str()))
                    .to_owned(),
            ),
        );
    }
    if let Some(prefix) = &f.id_prefix {
        query = query.filter(Expr::col(C::Id).like(starts_with(prefix)));
    }
    if let Some(token) = f.before_token {
        query = query.filter(C::FencingToken.lt(token));
    }
    Ok(query
        .order_by_desc(C::FencingToken)
        .limit(f.limit)
        .all(db)
        .await?
        .into_iter()
        .map(LockInfo::from_row)
        .collect())
}

/// The lock held on a resource, if any.
pub(crate) async fn held_lock(
    db: &DatabaseConnection,
    resource_type: &str,
    resource_key: &str,
) -> Result<Option<LockInfo>> {
    let row = resource_locks::Entity::find()
        .filter(resource_locks::Column::ResourceType.eq(resource_type))
        .filter(resource_locks::Column::ResourceKey.eq(resource_key))
        .filter(resource_locks::Column::ReleasedAt.is_null())
        .one(db)
        .await?;
    Ok(row.map(LockInfo::from_row).transpose()?)
}

/// Which audit rows a page of them holds.
pub(crate) struct AuditPageFilter {
    pub session_id: Option<Uuid>,
    pub event: Option<AuditEvent>,
    /// Only rows after this seq.
    pub after: Option<i64>,
    /// Newest first below this seq.
    pub before: Option<i64>,
    pub limit: u64,
}

pub(crate) async fn audit_page(
    db: &DatabaseConnection,
    f: &AuditPageFilter,
) -> Result<Listing<AuditRecord>> {
    use audit_log::Column as C;
    let mut query = audit_log::Entity::find();
    if let Some(session) = f.session_id {
        query = query.filter(C::SessionId.eq(TextUuid(session)));
    }
    if let Some(event) = f.event {
        query = query.filter(C::EventType.eq(event.as_str()));
    }
    if let Some(before) = f.before {
        query = query.filter(C::Seq.lt(before));
    }
    if let Some(after) = f.after {
        query = query.filter(C::Seq.gt(after));
    }
    let rows = query.order_by_desc(C::Seq).limit(f.limit).all(db).await?;
    if let Some(after) = f.after {
        // After the rows, as a feed does: see `watch::read_page`.
        crate::retention::check_horizon(db, after).await?;
    }
    Ok(rows.into_iter().map(AuditRecord::from_row).collect())
}

/// The highest seq in the log (0 when it is empty).
pub(crate) async fn newest_seq(db: &DatabaseConnection) -> Result<i64> {
    let newest: Option<Option<i64>> = audit_log::Entity::find()
        .select_only()
        .column_as(audit_log::Column::Seq.max(), "newest")
        .into_tuple()
        .one(db)
        .await?;
    Ok(newest.flatten().unwrap_or(0))
}

/// How many rows of `rows` have `column` in each minute from `since`: one
/// count per minute, each a range of an index on `column`.
async fn per_minute<E: EntityTrait>(
    db: &DatabaseConnection,
    rows: Select<E>,
    column: E::Column,
    since: DateTime<Utc>,
    minutes: u32,
) -> Result<Vec<u64>>
where
    E::Model: Sync,
{
    let mut counts = Vec::with_capacity(minutes as usize);
    for minute in 0..minutes {
        let from = since + chrono::Duration::minutes(i64::from(minute));
        let n = rows
            .clone()
            .filter(column.gte(from))
            .filter(column.lt(from + chrono::Duration::minutes(1)))
            .count(db)
            .await?;
        counts.push(n);
    }
    Ok(counts)
}

/// `event` rows written per minute from `since`, by the (event_type,
/// event_time) index.
pub(crate) async fn events_per_minute(
    db: &DatabaseConnection,
    event: AuditEvent,
    since: DateTime<Utc>,
    minutes: u32,
) -> Result<Vec<u64>> {
    let rows = audit_log::Entity::find().filter(audit_log::Column::EventType.eq(event.as_str()));
    per_minute(db, rows, audit_log::Column::EventTime, since, minutes).await
}

/// Locks whose holder waited for them, per minute the wait began, by the
/// (waited_since) index.
pub(crate) async fn waits_per_minute(
    db: &DatabaseConnection,
    since: DateTime<Utc>,
    minutes: u32,
) -> Result<Vec<u64>> {
    let rows = resource_locks::Entity::find();
    per_minute(
        db,
        rows,
        resource_locks::Column::WaitedSince,
        since,
        minutes,
    )
    .await
}

/// Agents in a lock queue now.
pub(crate) async fn waiting_now(db: &DatabaseConnection) -> Result<u64> {
    Ok(lock_waiters::Entity::find().count(db).await?)
}
