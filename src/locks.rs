//! Resource locks: acquire, release, and the fencing counter.
//!
//! Whether a resource is free is decided by the database's unique index over
//! held locks, never by a read-then-write check: the insert either succeeds or
//! fails with a unique violation, which becomes [`Error::LockHeld`].
use sea_orm::entity::prelude::TextUuid;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseBackend, DatabaseConnection,
    DatabaseTransaction, DbErr, EntityTrait, ExprTrait, QueryFilter, QuerySelect, SqlErr,
};
use uuid::Uuid;

use entity::{agent_executions, lock_fencing, resource_locks};

use crate::status::{AgentStatus, ReleaseReason};
use crate::{db, validate, Error, Result};

/// A granted lock. `fencing_token` strictly increases over all grants: pass it
/// to the protected resource so it can refuse a holder that was replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LockGrant {
    pub lock_id: Uuid,
    pub fencing_token: i64,
}

pub(crate) async fn acquire(
    conn: &DatabaseConnection,
    agent_id: Uuid,
    resource_type: &str,
    resource_key: &str,
) -> Result<LockGrant> {
    validate::id("agent_id", agent_id)?;
    validate::name("resource_type", resource_type)?;
    validate::name("resource_key", resource_key)?;

    let txn = db::begin_write(conn).await?;
    let session_id = check_holder(&txn, agent_id).await?;
    let fencing_token = next_fencing_token(&txn).await?;
    let lock_id = Uuid::new_v4();
    let row = resource_locks::ActiveModel {
        id: Set(TextUuid(lock_id)),
        agent_id: Set(TextUuid(agent_id)),
        session_id: Set(TextUuid(session_id)),
        resource_type: Set(resource_type.to_owned()),
        resource_key: Set(resource_key.to_owned()),
        fencing_token: Set(fencing_token),
        acquired_at: Set(db::now()),
        expires_at: Set(None),
        released_at: Set(None),
        release_reason: Set(None),
    };
    match resource_locks::Entity::insert(row)
        .exec_without_returning(&txn)
        .await
    {
        Ok(_) => {}
        // The only unique keys are the random id, the counter-issued fencing
        // token and the held-lock index: a violation here means "held".
        Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
            txn.rollback().await?;
            return Err(lock_held(conn, resource_type, resource_key).await);
        }
        Err(e) => return Err(e.into()),
    }
    txn.commit().await?;
    Ok(LockGrant {
        lock_id,
        fencing_token,
    })
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

/// Issues the next fencing token from the single-row counter. The row update
/// serializes issuers, so tokens strictly increase in grant order.
async fn next_fencing_token(txn: &DatabaseTransaction) -> Result<i64> {
    let bump = lock_fencing::Entity::update_many()
        .col_expr(
            lock_fencing::Column::LastToken,
            Expr::col(lock_fencing::Column::LastToken).add(1),
        )
        .filter(lock_fencing::Column::Id.eq(1));
    let row = if txn.get_database_backend() == DatabaseBackend::MySql {
        // No UPDATE … RETURNING: the row stays locked until commit, so reading
        // it back in the same transaction sees our own increment.
        bump.exec(txn).await?;
        lock_fencing::Entity::find_by_id(1).one(txn).await?
    } else {
        bump.exec_with_returning(txn).await?.into_iter().next()
    };
    row.map(|r| r.last_token).ok_or_else(|| {
        Error::CorruptRow("lock_fencing has no counter row; run the migrations".into())
    })
}

/// Describes the current holder for a refused acquire (best effort: it may
/// have been released since).
async fn lock_held(conn: &DatabaseConnection, resource_type: &str, resource_key: &str) -> Error {
    let holder: std::result::Result<Option<(TextUuid, i64)>, DbErr> =
        resource_locks::Entity::find()
            .select_only()
            .column(resource_locks::Column::AgentId)
            .column(resource_locks::Column::FencingToken)
            .filter(resource_locks::Column::ResourceType.eq(resource_type))
            .filter(resource_locks::Column::ResourceKey.eq(resource_key))
            .filter(resource_locks::Column::ReleasedAt.is_null())
            .into_tuple()
            .one(conn)
            .await;
    let (holder_agent_id, fencing_token) = match holder {
        Ok(Some((agent, token))) => (Some(agent.0), Some(token)),
        _ => (None, None),
    };
    Error::LockHeld {
        resource_type: resource_type.to_owned(),
        resource_key: resource_key.to_owned(),
        holder_agent_id,
        fencing_token,
    }
}

pub(crate) async fn release(conn: &DatabaseConnection, lock_id: Uuid) -> Result<()> {
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
        .exec(&txn)
        .await?
        .rows_affected;
    if released == 0 {
        let exists = resource_locks::Entity::find_by_id(TextUuid(lock_id))
            .select_only()
            .column(resource_locks::Column::Id)
            .into_tuple::<TextUuid>()
            .one(&txn)
            .await?;
        if exists.is_none() {
            return Err(Error::LockNotFound(lock_id));
        }
    }
    txn.commit().await?;
    Ok(())
}
