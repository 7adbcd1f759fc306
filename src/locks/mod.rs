//! Resource locks: acquire (at once or by waiting in a queue), renew,
//! release, sweep, and fencing.
//!
//! Two holders at once are impossible by the database's unique index over
//! held locks. Who gets a free resource is decided in one transaction that
//! first takes the resource's turn (`db::resource_turn`), which serializes
//! the grants of that resource: the first live waiter in the queue
//! (`queue`), or, when nobody waits, whoever asks.
mod deadlock;
pub(crate) mod lost;
mod queue;
mod wait;
pub(crate) mod wake;

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::entity::prelude::TextUuid;
use sea_orm::sea_query::{Expr, Query};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, DatabaseTransaction, EntityTrait, JoinType,
    QueryFilter, QueryOrder, QuerySelect, RelationDef, SqlErr, UpdateMany,
};
use serde::Serialize;
use uuid::Uuid;

use entity::{agent_executions, global_sessions, resource_locks};

pub(crate) use queue::leave_session;
pub use queue::LockWaiter;
pub(crate) use wait::acquire;

use self::queue::Entry;
use self::wake::Resource;
use crate::audit::{self, AuditEvent};
use crate::status::{AgentStatus, ReleaseReason, SessionStatus};
use crate::{db, validate, Config, Error, Result};

/// A granted lock. `fencing_token` strictly increases over the grants of a
/// resource (and is unique in the store): pass it to the protected resource
/// so it can refuse a holder that was replaced
/// (see [`SessionManager::validate_fence`](crate::SessionManager::validate_fence)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct LockGrant {
    pub lock_id: Uuid,
    pub fencing_token: i64,
}

/// How a lock is taken.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LockOptions {
    /// Time to live. A lock past it is released (reason `expired`) by
    /// `sweep_locks`, or by the next acquire of the same resource; keep it with
    /// `renew_lock`. `None`: held until released or its session ends. A lock
    /// handed over after a wait counts its time to live from the hand-over.
    pub ttl: Option<Duration>,
    /// Queue for the resource up to this long when it is held, in its lock
    /// delay, or already waited for, and take it when it is handed over: in
    /// arrival order, across every manager on the store. `Some(0)` takes a
    /// free resource and otherwise returns [`Error::LockWaitTimeout`] at once.
    /// `None`: refuse at once ([`Error::LockHeld`], or [`Error::LockDelay`]
    /// in a lock delay). See
    /// [`SessionManager::acquire_lock_with`](crate::SessionManager::acquire_lock_with).
    pub wait: Option<Duration>,
}

/// What one `sweep_locks` call released.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    /// Held locks past their time to live.
    pub expired: u64,
    /// Held locks of sessions that are completed or interrupted.
    pub orphaned: u64,
    /// Transactions used (each released at most `Config::sweep_batch` locks and
    /// wrote one `locks_swept` audit row).
    pub batches: u64,
}

/// What one attempt at a resource came to, short of an error.
pub(crate) enum Attempt {
    /// `swept`: the attempt released an expired holder first, and wrote its
    /// `locks_swept` audit row.
    Granted {
        grant: LockGrant,
        swept: bool,
    },
    Refused(Box<Refusal>),
}

/// Why an attempt was not granted, and the caller's place in the queue.
pub(crate) struct Refusal {
    /// The holder; `None` when the resource is free but waiters are queued
    /// ahead, or it is in its lock delay.
    pub holder: Option<resource_locks::Model>,
    /// Time left of the resource's lock delay, if it is in one.
    pub delay_ms: Option<u64>,
    /// The caller's entry, when it waits.
    pub entry: Option<Entry>,
    /// The attempt released an expired holder: the head waiter can go.
    pub expired_one: bool,
}

/// One acquire's inputs.
#[derive(Clone)]
pub(crate) struct Request {
    pub agent_id: Uuid,
    pub resource: Resource,
    pub ttl: Option<chrono::Duration>,
    /// For a waiting acquire, when its queue entry counts as abandoned.
    pub wait_until: Option<DateTime<Utc>>,
}

/// Tries for the resource in one transaction: grants it when it is free (an
/// expired holder is released first), out of its lock delay and nobody is
/// queued ahead of the caller; otherwise, for a waiting acquire not yet
/// queued, queues it at the tail unless that would close a waits-for cycle
/// ([`Error::Deadlock`], nothing queued: the transaction rolls back, and a
/// `lock_deadlock` audit row naming the cycle is written in one of its own).
/// `queued` is the caller's entry.
pub(crate) async fn attempt(
    conn: &db::Store,
    config: &Config,
    request: &Request,
    queued: Option<Entry>,
    lock_id: Uuid,
) -> Result<Attempt> {
    let resource = &request.resource;
    let txn = db::begin_write(conn).await?;
    let session_id = check_holder(&txn, request.agent_id).await?;
    // The resource's turn serializes every grant and every queueing of this
    // resource on every instance (see `queue`): what follows sees its queue
    // and holder as the previous such transaction left them. Other
    // resources go on meanwhile. The time is read once the turn is ours.
    db::resource_turn(&txn, resource).await?;
    let now = db::now();
    let mut holder = queue::holder_of(&*txn, resource).await?;
    // The `locks_swept` row of an expired holder released here, appended
    // just before the commit, as every audit row is.
    let mut swept = None;
    if let Some(expired) = holder.as_ref().filter(|h| is_expired(h, now)) {
        swept = expire_in(&txn, expired, now).await?;
        holder = if swept.is_some() {
            None
        } else {
            queue::holder_of(&*txn, resource).await?
        };
    }
    let delay_ms = match config.lock_delay.is_zero() {
        true => None,
        false => lock_delay_left(&txn, config.lock_delay, resource, now).await?,
    };
    let free = holder.is_none() && delay_ms.is_none();
    // Only a free resource needs the queue's head: is anyone before us?
    let ahead = free
        && queue::head(&*txn, resource, now)
            .await?
            .is_some_and(|head| Some(head) != queued);
    if free && !ahead {
        let waited_since = queued.map(|entry| entry.since);
        let ticket = db::next_token(&txn).await?;
        if insert_lock(
            &txn,
            request,
            session_id,
            ticket,
            lock_id,
            waited_since,
            now,
        )
        .await?
        {
            if let Some(entry) = queued {
                queue::leave(&*txn, entry).await?;
            }
            let expired_one = swept.is_some();
            append_swept(&txn, swept, now).await?;
            txn.commit().await?;
            return Ok(Attempt::Granted {
                grant: LockGrant {
                    lock_id,
                    fencing_token: ticket,
                },
                swept: expired_one,
            });
        }
        // Taken by a writer outside the queue (the app's own SQL).
        txn.rollback().await?;
        return Ok(Attempt::Refused(Box::new(Refusal {
            holder: queue::holder_of(&**conn, resource).await?,
            delay_ms,
            entry: queued,
            expired_one: false,
        })));
    }
    let expired_one = swept.is_some();
    let mut entry = queued;
    let mut changed = expired_one;
    if let (Some(expires_at), None) = (request.wait_until, entry) {
        // Queueing is ordered store-wide, so that of two waits that would
        // close one cycle between them the second sees the first.
        db::wait_order(&txn).await?;
        if let Some(holder) = &holder {
            let me = request.agent_id;
            if let Some(links) = queue::cycle(&*txn, me, resource, holder, now).await? {
                txn.rollback().await?;
                deadlock::record(conn, me, session_id, &links, now).await;
                let agents = links.into_iter().map(|link| link.agent_id).collect();
                return Err(Error::Deadlock { agents });
            }
        }
        let arrival = queue::Arrival {
            agent_id: request.agent_id,
            session_id,
            resource,
            ticket: db::next_token(&txn).await?,
            expires_at,
        };
        entry = Some(queue::enqueue(&*txn, arrival, now).await?);
        changed = true;
    }
    if changed {
        append_swept(&txn, swept, now).await?;
        txn.commit().await?;
    } else {
        txn.rollback().await?;
    }
    Ok(Attempt::Refused(Box::new(Refusal {
        holder,
        delay_ms,
        entry,
        expired_one,
    })))
}

pub(crate) fn is_expired(lock: &resource_locks::Model, now: DateTime<Utc>) -> bool {
    lock.expires_at.is_some_and(|at| at.to_utc() <= now)
}

/// Inserts the granted lock; false if the held-lock index refused it.
async fn insert_lock(
    txn: &DatabaseTransaction,
    request: &Request,
    session_id: Uuid,
    fencing_token: i64,
    lock_id: Uuid,
    waited_since: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<bool> {
    let row = resource_locks::ActiveModel {
        id: Set(lock_id.to_string()),
        agent_id: Set(request.agent_id.to_string()),
        session_id: Set(session_id.to_string()),
        resource_type: Set(request.resource.0.clone()),
        resource_key: Set(request.resource.1.clone()),
        fencing_token: Set(fencing_token),
        acquired_at: Set(now.into()),
        expires_at: Set(request.ttl.map(|ttl| (now + ttl).into())),
        released_at: Set(None),
        release_reason: Set(None),
        waited_since: Set(waited_since.map(Into::into)),
    };
    match resource_locks::Entity::insert(row)
        .exec_without_returning(txn)
        .await
    {
        Ok(_) => Ok(true),
        // The only unique keys are the random id, the counter-issued fencing
        // token and the held-lock index: a violation here means "held".
        Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The agent must be running and its session active; returns the session.
///
/// The session row is read `FOR SHARE` (PostgreSQL, MariaDB; SQLite's
/// `BEGIN IMMEDIATE` already serializes writers), found from the agent in the
/// same statement, so an acquire and an end of the same session serialize on
/// it: an acquire that locked it first commits its lock before the end's
/// release runs and is released by it; an acquire that waits behind an end
/// re-reads the row once the end commits and sees `completed`. A finish
/// locks the session row too, so the agent's status is read after it: an
/// acquire never sees a finished agent as running. No agent row is locked,
/// so this never waits on one while holding the session row.
async fn check_holder(txn: &DatabaseTransaction, agent_id: Uuid) -> Result<Uuid> {
    let agent_session = Query::select()
        .column(agent_executions::Column::SessionId)
        .from(agent_executions::Entity)
        .and_where(agent_executions::Column::Id.eq(TextUuid(agent_id)))
        .to_owned();
    let session: Option<(TextUuid, String)> = global_sessions::Entity::find()
        .select_only()
        .column(global_sessions::Column::Id)
        .column(global_sessions::Column::Status)
        .filter(global_sessions::Column::Id.in_subquery(agent_session))
        .lock_shared()
        .into_tuple()
        .one(txn)
        .await?;
    let (session_id, status) = session.ok_or(Error::AgentNotFound(agent_id))?;
    if status != SessionStatus::Active.as_str() {
        return Err(Error::SessionNotActive {
            session_id: session_id.0,
            status,
        });
    }
    let agent_status: String = agent_executions::Entity::find()
        .select_only()
        .column(agent_executions::Column::Status)
        .filter(agent_executions::Column::Id.eq(TextUuid(agent_id)))
        .into_tuple()
        .one(txn)
        .await?
        .ok_or(Error::AgentNotFound(agent_id))?;
    if agent_status != AgentStatus::Running.as_str() {
        return Err(Error::AgentNotRunning {
            agent_id,
            status: agent_status,
        });
    }
    Ok(session_id.0)
}

/// How long the resource stays in its lock delay (released involuntarily
/// less than `delay` ago), if it is in one.
async fn lock_delay_left(
    txn: &DatabaseTransaction,
    delay: Duration,
    resource: &Resource,
    now: DateTime<Utc>,
) -> Result<Option<u64>> {
    let delay = validate::duration("lock_delay", delay, false)?;
    let last: Option<Option<DateTime<Utc>>> = resource_locks::Entity::find()
        .select_only()
        .column(resource_locks::Column::ReleasedAt)
        .filter(resource_locks::Column::ResourceType.eq(resource.0.as_str()))
        .filter(resource_locks::Column::ResourceKey.eq(resource.1.as_str()))
        .filter(resource_locks::Column::ReleaseReason.is_in([
            ReleaseReason::Expired.as_str(),
            ReleaseReason::Orphaned.as_str(),
        ]))
        .filter(resource_locks::Column::ReleasedAt.gt(now - delay))
        .order_by_desc(resource_locks::Column::ReleasedAt)
        .into_tuple()
        .one(txn)
        .await?;
    Ok(last.flatten().map(|released_at| {
        let left = (released_at + delay - now).num_milliseconds().max(1);
        u64::try_from(left).unwrap_or(1)
    }))
}

/// Releases one held lock whose time to live ran out, inside the caller's
/// transaction; the details of its `locks_swept` audit row, or `None` if it
/// was renewed or released meanwhile.
async fn expire_in(
    txn: &DatabaseTransaction,
    lock: &resource_locks::Model,
    now: DateTime<Utc>,
) -> Result<Option<serde_json::Value>> {
    let released =
        release_batch(txn, std::slice::from_ref(lock), ReleaseReason::Expired, now).await?;
    Ok((!released.is_empty()).then(|| swept_details(&released)))
}

/// Appends the `locks_swept` row of [`expire_in`], if any: the last
/// statement before the commit.
async fn append_swept(
    txn: &DatabaseTransaction,
    swept: Option<serde_json::Value>,
    now: DateTime<Utc>,
) -> Result<()> {
    match swept {
        Some(details) => audit::append(txn, AuditEvent::LocksSwept, None, details, now).await,
        None => Ok(()),
    }
}

/// Releases a held lock; returns its resource, which may now be handed over,
/// or `None` if it was already released. With `operator` (the `operator`
/// field), a release asked for on the holder's behalf, which writes a
/// `lock_released` audit row.
pub(crate) async fn release(
    conn: &db::Store,
    lock_id: Uuid,
    operator: Option<serde_json::Value>,
) -> Result<Option<Resource>> {
    validate::id("lock_id", lock_id)?;
    let Some(operator) = operator else {
        // The holder's own release: the update names what it released.
        let update = release_update(lock_id, db::now());
        if let Some(lock) = db::update_one_alone(conn, update, lock_id.to_string()).await? {
            return Ok(Some((lock.resource_type, lock.resource_key)));
        }
        let known = resource_locks::Entity::find_by_id(lock_id.to_string())
            .select_only()
            .column(resource_locks::Column::Id)
            .into_tuple::<String>()
            .one(&**conn)
            .await?;
        return match known {
            Some(_) => Ok(None),
            None => Err(Error::LockNotFound(lock_id)),
        };
    };
    let txn = db::begin_write(conn).await?;
    let lock = resource_locks::Entity::find_by_id(lock_id.to_string())
        .one(&*txn)
        .await?
        .ok_or(Error::LockNotFound(lock_id))?;
    // The session first, `FOR SHARE`, as an end takes it (`FOR UPDATE`)
    // before its locks: the two never wait for each other crosswise, and
    // the audit row's foreign key finds it already locked, so nothing
    // waits once `audit_head` is held.
    global_sessions::Entity::find_by_id(lock.session_id.as_str())
        .select_only()
        .column(global_sessions::Column::Id)
        .lock_shared()
        .into_tuple::<String>()
        .one(&*txn)
        .await?;
    let now = db::now();
    let released = release_held(&txn, lock_id, now).await?;
    if released {
        let details = serde_json::json!({
            "lock_id": lock_id,
            "resource_type": lock.resource_type,
            "resource_key": lock.resource_key,
            "agent_id": lock.agent_id,
            "fencing_token": lock.fencing_token,
            "operator": operator,
        });
        let session = db::stored_id("resource_locks", &lock.id, "session_id", &lock.session_id)?;
        audit::append(&*txn, AuditEvent::LockReleased, Some(session), details, now).await?;
    }
    txn.commit().await?;
    Ok(released.then_some((lock.resource_type, lock.resource_key)))
}

/// The live waiters of a resource, head first.
pub(crate) async fn waiters(
    conn: &DatabaseConnection,
    resource_type: &str,
    resource_key: &str,
) -> Result<Vec<LockWaiter>> {
    validate::name("resource_type", resource_type)?;
    validate::name("resource_key", resource_key)?;
    let resource = (resource_type.to_owned(), resource_key.to_owned());
    queue::waiters(conn, &resource, db::now()).await
}

/// Releases one lock (reason `released`) inside the caller's transaction, if
/// it is still held; whether it was.
pub(crate) async fn release_held(
    txn: &DatabaseTransaction,
    lock_id: Uuid,
    now: DateTime<Utc>,
) -> Result<bool> {
    let released = release_update(lock_id, now).exec(txn).await?.rows_affected;
    Ok(released > 0)
}

/// The update that releases one lock (reason `released`) if it is held.
fn release_update(lock_id: Uuid, now: DateTime<Utc>) -> UpdateMany<resource_locks::Entity> {
    resource_locks::Entity::update_many()
        .col_expr(resource_locks::Column::ReleasedAt, Expr::value(now))
        .col_expr(
            resource_locks::Column::ReleaseReason,
            Expr::value(ReleaseReason::Released.as_str()),
        )
        .filter(resource_locks::Column::Id.eq(TextUuid(lock_id)))
        .filter(resource_locks::Column::ReleasedAt.is_null())
}

pub(crate) async fn renew(conn: &db::Store, lock_id: Uuid, ttl: Duration) -> Result<()> {
    validate::id("lock_id", lock_id)?;
    let ttl = validate::duration("ttl", ttl, false)?;
    let txn = db::begin_write(conn).await?;
    let now = db::now();
    let renewed = resource_locks::Entity::update_many()
        .col_expr(resource_locks::Column::ExpiresAt, Expr::value(now + ttl))
        .filter(resource_locks::Column::Id.eq(TextUuid(lock_id)))
        .filter(resource_locks::Column::ReleasedAt.is_null())
        .filter(
            sea_orm::Condition::any()
                .add(resource_locks::Column::ExpiresAt.is_null())
                .add(resource_locks::Column::ExpiresAt.gt(now)),
        )
        .exec(&*txn)
        .await?
        .rows_affected;
    if renewed == 0 {
        let lock = resource_locks::Entity::find_by_id(lock_id.to_string())
            .one(&*txn)
            .await?
            .ok_or(Error::LockNotFound(lock_id))?;
        let reason = lock
            .release_reason
            .unwrap_or_else(|| ReleaseReason::Expired.as_str().to_owned());
        return Err(Error::LockNotHeld { lock_id, reason });
    }
    txn.commit().await?;
    Ok(())
}

pub(crate) async fn validate_fence(
    conn: &DatabaseConnection,
    resource_type: &str,
    resource_key: &str,
    fencing_token: i64,
) -> Result<bool> {
    validate::name("resource_type", resource_type)?;
    validate::name("resource_key", resource_key)?;
    let resource = (resource_type.to_owned(), resource_key.to_owned());
    let holder = queue::holder_of(conn, &resource).await?;
    let now = db::now();
    Ok(holder.is_some_and(|h| {
        h.fencing_token == fencing_token && h.expires_at.is_none_or(|at| at > now)
    }))
}

/// One released lock as the audit log names it.
#[derive(Serialize)]
struct SweptLock {
    lock_id: String,
    resource_type: String,
    resource_key: String,
    agent_id: String,
    session_id: String,
    fencing_token: i64,
    reason: &'static str,
}

impl SweptLock {
    fn new(lock: &resource_locks::Model, reason: ReleaseReason) -> Self {
        Self {
            lock_id: lock.id.clone(),
            resource_type: lock.resource_type.clone(),
            resource_key: lock.resource_key.clone(),
            agent_id: lock.agent_id.clone(),
            session_id: lock.session_id.clone(),
            fencing_token: lock.fencing_token,
            reason: reason.as_str(),
        }
    }
}

fn swept_details(locks: &[SweptLock]) -> serde_json::Value {
    let count =
        |reason: ReleaseReason| locks.iter().filter(|l| l.reason == reason.as_str()).count();
    serde_json::json!({
        "expired": count(ReleaseReason::Expired),
        "orphaned": count(ReleaseReason::Orphaned),
        "locks": locks,
    })
}

/// A lock's session, for finding the locks of ended sessions.
fn lock_session() -> RelationDef {
    resource_locks::Entity::belongs_to(global_sessions::Entity)
        .from(resource_locks::Column::SessionId)
        .to(global_sessions::Column::Id)
        .into()
}

pub(crate) async fn sweep(conn: &db::Store, batch: u64) -> Result<SweepReport> {
    let batch = batch.max(1);
    let mut report = SweepReport::default();
    loop {
        let txn = db::begin_write(conn).await?;
        let now = db::now();
        let expired = resource_locks::Entity::find()
            .filter(resource_locks::Column::ReleasedAt.is_null())
            .filter(resource_locks::Column::ExpiresAt.is_not_null())
            .filter(resource_locks::Column::ExpiresAt.lte(now))
            .limit(batch)
            .all(&*txn)
            .await?;
        let room = batch - expired.len() as u64;
        let orphaned = if room == 0 {
            Vec::new()
        } else {
            resource_locks::Entity::find()
                .join(JoinType::InnerJoin, lock_session())
                .filter(resource_locks::Column::ReleasedAt.is_null())
                .filter(global_sessions::Column::Status.is_in(SessionStatus::ended_names()))
                .limit(room)
                .all(&*txn)
                .await?
        };
        let found = (expired.len() + orphaned.len()) as u64;
        if found == 0 {
            txn.rollback().await?;
            break;
        }
        let mut released = release_batch(&txn, &expired, ReleaseReason::Expired, now).await?;
        released.extend(release_batch(&txn, &orphaned, ReleaseReason::Orphaned, now).await?);
        if !released.is_empty() {
            audit::append(
                &*txn,
                AuditEvent::LocksSwept,
                None,
                swept_details(&released),
                now,
            )
            .await?;
        }
        txn.commit().await?;
        report.batches += 1;
        for lock in &released {
            if lock.reason == ReleaseReason::Expired.as_str() {
                report.expired += 1;
            } else {
                report.orphaned += 1;
            }
        }
        if found < batch {
            break;
        }
    }
    Ok(report)
}

/// The most ids one statement binds in an `IN` list: under 999, the
/// smallest variable limit a SQLite build may have.
pub(crate) const IDS_PER_STATEMENT: usize = 900;

/// Releases the given locks if still held (and, for `expired`, still past
/// their time to live); returns those it released. Shared by the sweep and by
/// the acquire that meets an expired holder.
async fn release_batch(
    txn: &DatabaseTransaction,
    locks: &[resource_locks::Model],
    reason: ReleaseReason,
    now: DateTime<Utc>,
) -> Result<Vec<SweptLock>> {
    if locks.is_empty() {
        return Ok(Vec::new());
    }
    let mut swept = Vec::with_capacity(locks.len());
    // One statement per chunk: a list of ids is bound one variable each, and
    // every backend caps the variables of a statement (SQLite at 32 766).
    for chunk in locks.chunks(IDS_PER_STATEMENT) {
        let ids: Vec<&str> = chunk.iter().map(|l| l.id.as_str()).collect();
        let mut release = resource_locks::Entity::update_many()
            .col_expr(resource_locks::Column::ReleasedAt, Expr::value(now))
            .col_expr(
                resource_locks::Column::ReleaseReason,
                Expr::value(reason.as_str()),
            )
            .filter(resource_locks::Column::Id.is_in(ids.clone()))
            .filter(resource_locks::Column::ReleasedAt.is_null());
        if reason == ReleaseReason::Expired {
            // Re-checked in the UPDATE itself: a lock renewed after it was found
            // (on the servers, by a concurrent `renew_lock`) is never expired.
            release = release.filter(resource_locks::Column::ExpiresAt.lte(now));
        }
        let released = release.exec(txn).await?.rows_affected;
        if released == chunk.len() as u64 {
            swept.extend(chunk.iter().map(|l| SweptLock::new(l, reason)));
            continue;
        }
        // Some were released concurrently (servers): name only the ones we released.
        let ours = resource_locks::Entity::find()
            .filter(resource_locks::Column::Id.is_in(ids))
            .filter(resource_locks::Column::ReleasedAt.eq(now))
            .filter(resource_locks::Column::ReleaseReason.eq(reason.as_str()))
            .all(txn)
            .await?;
        swept.extend(ours.iter().map(|l| SweptLock::new(l, reason)));
    }
    Ok(swept)
}
