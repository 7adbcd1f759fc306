//! Resource locks: acquire, renew, release, sweep, and fencing.
//!
//! Whether a resource is free is decided by the database's unique index over
//! held locks, never by a read-then-write check: the insert either succeeds or
//! fails with a unique violation, which becomes [`Error::LockHeld`].
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::entity::prelude::TextUuid;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr,
    EntityTrait, JoinType, QueryFilter, QueryOrder, QuerySelect, RelationDef, SqlErr,
};
use serde::Serialize;
use uuid::Uuid;

use entity::{agent_executions, global_sessions, lock_fencing, resource_locks};

use crate::audit::{self, AuditEvent};
use crate::status::{AgentStatus, ReleaseReason, SessionStatus};
use crate::{db, validate, Config, Error, Result};

/// A granted lock. `fencing_token` strictly increases over all grants: pass it
/// to the protected resource so it can refuse a holder that was replaced
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
    /// `renew_lock`. `None`: held until released or its session ends.
    pub ttl: Option<Duration>,
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

pub(crate) async fn acquire(
    conn: &db::Store,
    config: &Config,
    agent_id: Uuid,
    resource_type: &str,
    resource_key: &str,
    options: &LockOptions,
) -> Result<LockGrant> {
    validate::id("agent_id", agent_id)?;
    validate::name("resource_type", resource_type)?;
    validate::name("resource_key", resource_key)?;
    let ttl = options
        .ttl
        .map(|ttl| validate::duration("ttl", ttl, false))
        .transpose()?;

    // At most two attempts: the second only after releasing an expired holder.
    let mut attempt = 0;
    loop {
        attempt += 1;
        match try_acquire(conn, config, agent_id, resource_type, resource_key, ttl).await? {
            Acquired::Granted(grant) => return Ok(grant),
            Acquired::Held => {
                let now = db::now();
                let holder = current_holder(&**conn, resource_type, resource_key).await;
                if let Ok(Some(holder)) = &holder {
                    let expired = holder.expires_at.is_some_and(|at| at <= now);
                    if expired && attempt == 1 && expire_lock(conn, holder).await? {
                        continue;
                    }
                }
                let holder = holder.ok().flatten();
                return Err(Error::LockHeld {
                    resource_type: resource_type.to_owned(),
                    resource_key: resource_key.to_owned(),
                    holder_agent_id: holder
                        .as_ref()
                        .and_then(|h| db::stored_id("agent_id", &h.agent_id).ok()),
                    fencing_token: holder.as_ref().map(|h| h.fencing_token),
                });
            }
        }
    }
}

enum Acquired {
    Granted(LockGrant),
    Held,
}

async fn try_acquire(
    conn: &db::Store,
    config: &Config,
    agent_id: Uuid,
    resource_type: &str,
    resource_key: &str,
    ttl: Option<chrono::Duration>,
) -> Result<Acquired> {
    let txn = db::begin_write(conn).await?;
    let session_id = check_holder(&txn, agent_id).await?;
    let now = db::now();
    if !config.lock_delay.is_zero() {
        check_lock_delay(&txn, config.lock_delay, resource_type, resource_key, now).await?;
    }
    let fencing_token = next_fencing_token(&txn).await?;
    let lock_id = Uuid::new_v4();
    let row = resource_locks::ActiveModel {
        id: Set(lock_id.to_string()),
        agent_id: Set(agent_id.to_string()),
        session_id: Set(session_id.to_string()),
        resource_type: Set(resource_type.to_owned()),
        resource_key: Set(resource_key.to_owned()),
        fencing_token: Set(fencing_token),
        acquired_at: Set(now.into()),
        expires_at: Set(ttl.map(|ttl| (now + ttl).into())),
        released_at: Set(None),
        release_reason: Set(None),
    };
    match resource_locks::Entity::insert(row)
        .exec_without_returning(&*txn)
        .await
    {
        Ok(_) => {}
        // The only unique keys are the random id, the counter-issued fencing
        // token and the held-lock index: a violation here means "held".
        Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
            txn.rollback().await?;
            return Ok(Acquired::Held);
        }
        Err(e) => return Err(e.into()),
    }
    txn.commit().await?;
    Ok(Acquired::Granted(LockGrant {
        lock_id,
        fencing_token,
    }))
}

/// The agent must be running and its session active; returns the session.
///
/// The session row is read `FOR SHARE` (PostgreSQL, MariaDB; SQLite's
/// `BEGIN IMMEDIATE` already serializes writers), so an acquire and an end of
/// the same session serialize on it: an acquire that locked it first commits
/// its lock before the end's release runs and is released by it; an acquire
/// that waits behind an end re-reads the row once the end commits and sees
/// `completed`. The agent is read first and without a lock, so this never
/// waits on an agent row while holding the session row.
async fn check_holder(txn: &DatabaseTransaction, agent_id: Uuid) -> Result<Uuid> {
    let agent: Option<(String, TextUuid)> = agent_executions::Entity::find()
        .select_only()
        .column(agent_executions::Column::Status)
        .column(agent_executions::Column::SessionId)
        .filter(agent_executions::Column::Id.eq(TextUuid(agent_id)))
        .into_tuple()
        .one(txn)
        .await?;
    let (agent_status, session_id) = agent.ok_or(Error::AgentNotFound(agent_id))?;
    crate::session::start::lock_active_session(txn, session_id.0).await?;
    if agent_status != AgentStatus::Running.as_str() {
        return Err(Error::AgentNotRunning {
            agent_id,
            status: agent_status,
        });
    }
    Ok(session_id.0)
}

/// Refuses a resource released involuntarily less than `delay` ago.
async fn check_lock_delay(
    txn: &DatabaseTransaction,
    delay: Duration,
    resource_type: &str,
    resource_key: &str,
    now: DateTime<Utc>,
) -> Result<()> {
    let delay = validate::duration("lock_delay", delay, false)?;
    let last: Option<Option<DateTime<Utc>>> = resource_locks::Entity::find()
        .select_only()
        .column(resource_locks::Column::ReleasedAt)
        .filter(resource_locks::Column::ResourceType.eq(resource_type))
        .filter(resource_locks::Column::ResourceKey.eq(resource_key))
        .filter(resource_locks::Column::ReleaseReason.is_in([
            ReleaseReason::Expired.as_str(),
            ReleaseReason::Orphaned.as_str(),
        ]))
        .filter(resource_locks::Column::ReleasedAt.gt(now - delay))
        .order_by_desc(resource_locks::Column::ReleasedAt)
        .into_tuple()
        .one(txn)
        .await?;
    if let Some(Some(released_at)) = last {
        let wait = (released_at + delay - now).num_milliseconds().max(1);
        return Err(Error::LockDelay {
            resource_type: resource_type.to_owned(),
            resource_key: resource_key.to_owned(),
            retry_after_ms: u64::try_from(wait).unwrap_or(1),
        });
    }
    Ok(())
}

/// Issues the next fencing token from the single-row counter. The row update
/// serializes issuers (it holds the row until commit), so tokens strictly
/// increase in grant order, and reading the row back in the same transaction
/// sees our own increment.
async fn next_fencing_token(txn: &DatabaseTransaction) -> Result<i64> {
    use sea_orm::ExprTrait;
    lock_fencing::Entity::update_many()
        .col_expr(
            lock_fencing::Column::LastToken,
            Expr::col(lock_fencing::Column::LastToken).add(1),
        )
        .filter(lock_fencing::Column::Id.eq(1))
        .exec(txn)
        .await?;
    let counter = lock_fencing::Entity::find_by_id(1).one(txn).await?;
    counter.map(|c| c.last_token).ok_or_else(|| {
        Error::CorruptRow("lock_fencing has no counter row; run the migrations".into())
    })
}

/// The held lock on a resource, if any.
async fn current_holder<C: ConnectionTrait>(
    conn: &C,
    resource_type: &str,
    resource_key: &str,
) -> std::result::Result<Option<resource_locks::Model>, DbErr> {
    resource_locks::Entity::find()
        .filter(resource_locks::Column::ResourceType.eq(resource_type))
        .filter(resource_locks::Column::ResourceKey.eq(resource_key))
        .filter(resource_locks::Column::ReleasedAt.is_null())
        .one(conn)
        .await
}

/// Releases one held lock whose time to live ran out; false if it was
/// renewed or released meanwhile.
async fn expire_lock(conn: &db::Store, lock: &resource_locks::Model) -> Result<bool> {
    let txn = db::begin_write(conn).await?;
    let now = db::now();
    let released = release_batch(
        &txn,
        std::slice::from_ref(lock),
        ReleaseReason::Expired,
        now,
    )
    .await?;
    if released.is_empty() {
        return Ok(false);
    }
    audit::append(
        &*txn,
        AuditEvent::LocksSwept,
        None,
        swept_details(&released),
        now,
    )
    .await?;
    txn.commit().await?;
    Ok(true)
}

pub(crate) async fn release(conn: &db::Store, lock_id: Uuid) -> Result<()> {
    validate::id("lock_id", lock_id)?;
    let txn = db::begin_write(conn).await?;
    let released = resource_locks::Entity::update_many()
        .col_expr(resource_locks::Column::ReleasedAt, Expr::value(db::now()))
        .col_expr(
            resource_locks::Column::ReleaseReason,
            Expr::value(ReleaseReason::Released.as_str()),
        )
        .filter(resource_locks::Column::Id.eq(TextUuid(lock_id)))
        .filter(resource_locks::Column::ReleasedAt.is_null())
        .exec(&*txn)
        .await?
        .rows_affected;
    if released == 0 {
        let exists = resource_locks::Entity::find_by_id(lock_id.to_string())
            .select_only()
            .column(resource_locks::Column::Id)
            .into_tuple::<TextUuid>()
            .one(&*txn)
            .await?;
        if exists.is_none() {
            return Err(Error::LockNotFound(lock_id));
        }
    }
    txn.commit().await?;
    Ok(())
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
    let holder = current_holder(conn, resource_type, resource_key).await?;
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
                .filter(global_sessions::Column::Status.is_in([
                    SessionStatus::Completed.as_str(),
                    SessionStatus::Interrupted.as_str(),
                ]))
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
    let ids: Vec<&str> = locks.iter().map(|l| l.id.as_str()).collect();
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
    if released == locks.len() as u64 {
        return Ok(locks.iter().map(|l| SweptLock::new(l, reason)).collect());
    }
    // Some were released concurrently (servers): name only the ones we released.
    let ours = resource_locks::Entity::find()
        .filter(resource_locks::Column::Id.is_in(ids))
        .filter(resource_locks::Column::ReleasedAt.eq(now))
        .filter(resource_locks::Column::ReleaseReason.eq(reason.as_str()))
        .all(txn)
        .await?;
    Ok(ours.iter().map(|l| SweptLock::new(l, reason)).collect())
}
