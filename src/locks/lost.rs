//! Telling a holder that its lock is gone: released (by itself, its
//! session's end, a recovery, a sweep, an operator, its agent's finish) or
//! past its time to live, swept or not.
//!
//! The watch reads the lock's row, and waits for whichever comes first: a
//! wake-up for the lock's resource (this manager's writes at once, other
//! instances' on PostgreSQL through `NOTIFY`), the end of its time to live,
//! or `Config::lock_poll_interval`. The wake-up is armed before each read,
//! so a release between the read and the wait is not missed.
use chrono::{DateTime, Utc};
use sea_orm::entity::prelude::TextUuid;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect};
use serde::Serialize;
use uuid::Uuid;

use entity::resource_locks;

use crate::status::ReleaseReason;
use crate::{db, detached, validate, Error, Result, SessionManager};

/// How and when a lock stopped being safely held
/// ([`SessionManager::lock_lost`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LockLoss {
    pub lock_id: Uuid,
    /// Why: how it was released, or `expired` when its time to live passed
    /// (swept or not).
    pub reason: ReleaseReason,
    /// When it was released, or when its time to live ended.
    pub at: DateTime<Utc>,
}

type LockRow = (
    String,
    String,
    Option<sea_orm::entity::prelude::DateTimeWithTimeZone>,
    Option<sea_orm::entity::prelude::DateTimeWithTimeZone>,
    Option<String>,
);

/// The lock's resource, time to live, release time and reason.
async fn read(manager: &SessionManager, lock_id: Uuid) -> Result<Option<LockRow>> {
    let db = manager.connection().clone();
    // In a task of its own: a dropped watch never cuts a read midway.
    detached::run(manager.tasks(), async move {
        Ok(resource_locks::Entity::find()
            .select_only()
            .column(resource_locks::Column::ResourceType)
            .column(resource_locks::Column::ResourceKey)
            .column(resource_locks::Column::ExpiresAt)
            .column(resource_locks::Column::ReleasedAt)
            .column(resource_locks::Column::ReleaseReason)
            .filter(resource_locks::Column::Id.eq(TextUuid(lock_id)))
            .into_tuple()
            .one(&db)
            .await?)
    })
    .await
}

/// The loss the row shows now, if any.
fn lost(lock_id: Uuid, row: &LockRow, now: DateTime<Utc>) -> Result<Option<LockLoss>> {
    let (_, _, expires_at, released_at, reason) = row;
    if let Some(at) = released_at {
        let reason = match reason {
            Some(reason) => db::stored(
                "resource_locks",
                &lock_id.to_string(),
                "release_reason",
                reason,
            )?,
            None => ReleaseReason::Released,
        };
        return Ok(Some(LockLoss {
            lock_id,
            reason,
            at: at.to_utc(),
        }));
    }
    Ok(expires_at
        .map(|at| at.to_utc())
        .filter(|at| *at <= now)
        .map(|at| LockLoss {
            lock_id,
            reason: ReleaseReason::Expired,
            at,
        }))
}

pub(crate) async fn lock_lost(manager: SessionManager, lock_id: Uuid) -> Result<LockLoss> {
    validate::id("lock_id", lock_id)?;
    manager.usable()?;
    let first = read(&manager, lock_id)
        .await?
        .ok_or(Error::LockNotFound(lock_id))?;
    if let Some(loss) = lost(lock_id, &first, db::now())? {
        return Ok(loss);
    }
    let wakers = manager.lock_wakers().clone();
    wakers.ensure_listening(manager.store(), manager.instance_id());
    // Dropped with the watch: nothing stays registered.
    let registration = wakers.register(&(first.0.clone(), first.1.clone()));
    let poll = manager.config().lock_poll_interval;
    loop {
        let freed = registration.notified();
        let maybe = registration.maybe_notified();
        tokio::pin!(freed, maybe);
        freed.as_mut().enable();
        maybe.as_mut().enable();
        manager.usable()?;
        // A row gone (its session pruned) was released long ago.
        let row = read(&manager, lock_id)
            .await?
            .ok_or(Error::LockNotFound(lock_id))?;
        let now = db::now();
        if let Some(loss) = lost(lock_id, &row, now)? {
            return Ok(loss);
        }
        let until_expiry = row
            .2
            .map(|at| (at.to_utc() - now).to_std().unwrap_or_default());
        let wait = until_expiry.map_or(poll, |left| left.min(poll));
        tokio::select! {
            () = &mut freed => {}
            () = &mut maybe => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}
