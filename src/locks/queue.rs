//! The lock queue as the database keeps it (`lock_waiters`): who waits for
//! which resource, in arrival order, and the waits-for graph it implies.
//!
//! Every transaction that queues or grants on a resource first takes the
//! resource's turn ([`db::resource_turn`]), which serializes them per
//! resource on every instance: each sees the resource's queue and holder as
//! the previous one left them. A waiter's `ticket` is drawn (from the fencing
//! tokens' source) in its turn, so a resource's tickets follow the order in
//! which its queueings commit. A queueing also takes the store-wide
//! [`db::wait_order`] before it looks for a cycle, so of two waits that would
//! close one cycle the second sees the first; a grant that nobody waits for
//! never takes it.
//!
//! An entry past its `expires_at` (its wait plus a margin) was abandoned by a
//! waiter that could not remove it: it is ignored, and removed by the next
//! waiter to queue on the resource or by the agent's next wait.
use chrono::{DateTime, Utc};
use sea_orm::entity::prelude::TextUuid;
use sea_orm::ActiveValue::Set;
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    SqlErr,
};
use serde::Serialize;
use uuid::Uuid;

use entity::{lock_waiters, resource_locks};

use super::wake::Resource;
use crate::{db, Error, Result};

/// One agent waiting for a resource, as `SessionManager::lock_waiters` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LockWaiter {
    pub agent_id: Uuid,
    /// The waiter's session.
    pub session_id: Uuid,
    /// When it joined the queue. Never decreases along the queue.
    pub since: DateTime<Utc>,
    /// 1 for the head of the queue, the next waiter to be granted.
    pub position: u32,
}

/// A queued waiter: its row and its place in the order, and when it joined
/// (kept with the lock it is granted, `waited_since`). Two entries are the
/// same when their row and ticket are.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry {
    pub id: Uuid,
    pub ticket: i64,
    pub since: DateTime<Utc>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.ticket == other.ticket
    }
}

impl Eq for Entry {}

fn on(resource: &Resource) -> Condition {
    Condition::all()
        .add(lock_waiters::Column::ResourceType.eq(resource.0.as_str()))
        .add(lock_waiters::Column::ResourceKey.eq(resource.1.as_str()))
}

fn live(now: DateTime<Utc>) -> Condition {
    Condition::all().add(lock_waiters::Column::ExpiresAt.gt(now))
}

/// The first live waiter on the resource.
pub(crate) async fn head(
    conn: &impl ConnectionTrait,
    resource: &Resource,
    now: DateTime<Utc>,
) -> Result<Option<Entry>> {
    let row: Option<(TextUuid, i64, DateTime<Utc>)> = lock_waiters::Entity::find()
        .select_only()
        .column(lock_waiters::Column::Id)
        .column(lock_waiters::Column::Ticket)
        .column(lock_waiters::Column::Since)
        .filter(on(resource))
        .filter(live(now))
        .order_by_asc(lock_waiters::Column::Ticket)
        .limit(1)
        .into_tuple()
        .one(conn)
        .await?;
    Ok(row.map(|(id, ticket, since)| Entry {
        id: id.0,
        ticket,
        since,
    }))
}

/// What a waiter needs to know to decide whether to try for the resource.
pub(crate) enum Look {
    /// Its entry is gone: its session ended or was recovered.
    Gone,
    /// Someone is queued ahead of it.
    Behind,
    /// It is the head; the resource's holder, if any, and when that expires.
    First { expires_at: Option<DateTime<Utc>> },
    /// It is the head and the resource is free.
    Free,
}

/// Looks at the queue from a waiter's place, reading only.
pub(crate) async fn look(
    conn: &impl ConnectionTrait,
    entry: Entry,
    resource: &Resource,
    now: DateTime<Utc>,
) -> Result<Look> {
    let mine = lock_waiters::Entity::find_by_id(entry.id.to_string())
        .select_only()
        .column(lock_waiters::Column::Ticket)
        .into_tuple::<i64>()
        .one(conn)
        .await?;
    if mine.is_none() {
        return Ok(Look::Gone);
    }
    if head(conn, resource, now).await? != Some(entry) {
        return Ok(Look::Behind);
    }
    let holder = holder_of(conn, resource).await?;
    Ok(match holder {
        None => Look::Free,
        Some(h) => Look::First {
            expires_at: h.expires_at.map(|at| at.to_utc()),
        },
    })
}

/// The held lock on a resource, if any.
pub(crate) async fn holder_of(
    conn: &impl ConnectionTrait,
    resource: &Resource,
) -> std::result::Result<Option<resource_locks::Model>, sea_orm::DbErr> {
    resource_locks::Entity::find()
        .filter(resource_locks::Column::ResourceType.eq(resource.0.as_str()))
        .filter(resource_locks::Column::ResourceKey.eq(resource.1.as_str()))
        .filter(resource_locks::Column::ReleasedAt.is_null())
        .one(conn)
        .await
}

/// What a new entry is made of.
pub(crate) struct Arrival<'a> {
    pub agent_id: Uuid,
    pub session_id: Uuid,
    pub resource: &'a Resource,
    pub ticket: i64,
    /// Past it, the entry counts as abandoned.
    pub expires_at: DateTime<Utc>,
}

/// Queues the agent at the tail, inside the caller's transaction (which holds
/// the resource's row and the order of queueings, and drew `ticket`). Abandoned entries of the resource and
/// of the agent are removed first.
pub(crate) async fn enqueue(
    txn: &impl ConnectionTrait,
    arrival: Arrival<'_>,
    now: DateTime<Utc>,
) -> Result<Entry> {
    if let Some(resource) = waiting_for(txn, arrival.agent_id, now).await? {
        return Err(Error::AlreadyWaiting {
            agent_id: arrival.agent_id,
            resource_type: Some(resource.0),
            resource_key: Some(resource.1),
        });
    }
    let agent = arrival.agent_id.to_string();
    lock_waiters::Entity::delete_many()
        .filter(
            Condition::any()
                .add(on(arrival.resource))
                .add(lock_waiters::Column::AgentId.eq(agent.as_str())),
        )
        .filter(lock_waiters::Column::ExpiresAt.lte(now))
        .exec(txn)
        .await?;
    // Clocks of different hosts may disagree: never report a later arrival
    // as having come first.
    let tail: Option<sea_orm::entity::prelude::DateTimeWithTimeZone> = lock_waiters::Entity::find()
        .select_only()
        .column(lock_waiters::Column::Since)
        .filter(on(arrival.resource))
        .order_by_desc(lock_waiters::Column::Ticket)
        .limit(1)
        .into_tuple()
        .one(txn)
        .await?;
    let since = tail.map_or(now, |t| t.to_utc().max(now));
    let id = Uuid::new_v4();
    let row = lock_waiters::ActiveModel {
        id: Set(id.to_string()),
        ticket: Set(arrival.ticket),
        agent_id: Set(agent),
        session_id: Set(arrival.session_id.to_string()),
        resource_type: Set(arrival.resource.0.clone()),
        resource_key: Set(arrival.resource.1.clone()),
        since: Set(since.into()),
        expires_at: Set(arrival.expires_at.max(since).into()),
    };
    match lock_waiters::Entity::insert(row)
        .exec_without_returning(txn)
        .await
    {
        Ok(_) => Ok(Entry {
            id,
            ticket: arrival.ticket,
            since,
        }),
        // The id is random and the ticket drawn once: the agent's own
        // unique index refused a second wait, queued meanwhile by a writer
        // that does not draw from the counter.
        Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
            Err(Error::AlreadyWaiting {
                agent_id: arrival.agent_id,
                resource_type: None,
                resource_key: None,
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// Removes one entry; whether it was there.
pub(crate) async fn leave(conn: &impl ConnectionTrait, entry: Entry) -> Result<bool> {
    let gone = lock_waiters::Entity::delete_by_id(entry.id.to_string())
        .exec(conn)
        .await?
        .rows_affected;
    Ok(gone > 0)
}

/// Removes every waiter of a session, inside the caller's transaction.
pub(crate) async fn leave_session(conn: &impl ConnectionTrait, session_id: Uuid) -> Result<u64> {
    Ok(lock_waiters::Entity::delete_many()
        .filter(lock_waiters::Column::SessionId.eq(session_id.to_string()))
        .exec(conn)
        .await?
        .rows_affected)
}

/// The resource an agent waits for, if any.
async fn waiting_for(
    conn: &impl ConnectionTrait,
    agent_id: Uuid,
    now: DateTime<Utc>,
) -> Result<Option<Resource>> {
    Ok(lock_waiters::Entity::find()
        .select_only()
        .column(lock_waiters::Column::ResourceType)
        .column(lock_waiters::Column::ResourceKey)
        .filter(lock_waiters::Column::AgentId.eq(agent_id.to_string()))
        .filter(live(now))
        .into_tuple()
        .one(conn)
        .await?)
}

/// The most agents a cycle is followed through; a longer chain is not a cycle
/// through the caller (an agent waits for one resource, so the chain from it
/// is a path that either returns to it or ends).
const MAX_CYCLE: usize = 10_000;

/// One edge of the waits-for graph: an agent, the resource it waits for (or,
/// for the caller, would wait for), and the lock on it that the next agent
/// of the cycle holds.
#[derive(Clone, Debug)]
pub(crate) struct Link {
    pub agent_id: Uuid,
    pub resource: Resource,
    pub held: resource_locks::Model,
}

/// The cycle that `me` waiting for `resource`, whose current holder's lock
/// is `held`, would close, in waits-for order starting with `me`; `None` if
/// it closes none. A waits-for edge runs from a waiter to its resource's
/// current holder.
pub(crate) async fn cycle(
    conn: &impl ConnectionTrait,
    me: Uuid,
    resource: &Resource,
    held: &resource_locks::Model,
    now: DateTime<Utc>,
) -> Result<Option<Vec<Link>>> {
    let mut links = vec![Link {
        agent_id: me,
        resource: resource.clone(),
        held: held.clone(),
    }];
    let mut next = db::stored_id("resource_locks", &held.id, "agent_id", &held.agent_id)?;
    while links.len() <= MAX_CYCLE {
        if next == me {
            return Ok(Some(links));
        }
        if links.iter().any(|link| link.agent_id == next) {
            // A cycle that does not pass through `me`: not ours to refuse.
            return Ok(None);
        }
        let Some(resource) = waiting_for(conn, next, now).await? else {
            return Ok(None);
        };
        // A holder past its ttl is as good as gone: not an edge.
        let Some(lock) = holder_of(conn, &resource)
            .await?
            .filter(|lock| !super::is_expired(lock, now))
        else {
            return Ok(None);
        };
        let holder = db::stored_id("resource_locks", &lock.id, "agent_id", &lock.agent_id)?;
        links.push(Link {
            agent_id: next,
            resource,
            held: lock,
        });
        next = holder;
    }
    Ok(None)
}

/// A resource's live waiters, head first.
pub(crate) async fn waiters(
    conn: &impl ConnectionTrait,
    resource: &Resource,
    now: DateTime<Utc>,
) -> Result<Vec<LockWaiter>> {
    let rows = lock_waiters::Entity::find()
        .filter(on(resource))
        .filter(live(now))
        .order_by_asc(lock_waiters::Column::Ticket)
        .all(conn)
        .await?;
    rows.into_iter()
        .zip(1u32..)
        .map(|(row, position)| {
            Ok(LockWaiter {
                agent_id: db::stored_id("lock_waiters", &row.id, "agent_id", &row.agent_id)?,
                session_id: db::stored_id("lock_waiters", &row.id, "session_id", &row.session_id)?,
                since: row.since.to_utc(),
                position,
            })
        })
        .collect()
}
