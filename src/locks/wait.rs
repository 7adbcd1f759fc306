//! An acquire from start to finish: one attempt, or, with `LockOptions::wait`,
//! a place in the queue kept until the resource is handed over, the wait runs
//! out, or the waiter's session ends.
//!
//! Hand-over is pull, not push: a release only frees the resource and wakes
//! the head waiter (see `wake`), which then takes it in its own transaction.
//! So a grant is only ever made to a caller that is there to receive it, and
//! nobody else can take the free resource meanwhile, since a later arrival
//! finds the head still queued ahead of it.
//!
//! Each attempt (one transaction) runs in a task of its own, so dropping the
//! acquire future (a timeout or `select!` around it) never cuts a
//! transaction midway. A dropped acquire's entry is removed by a task
//! spawned on the runtime, one write transaction after the drop, and an
//! attempt that finds its caller gone releases what it was granted. Should
//! that write fail, the entry is ignored once its wait, plus a margin, has
//! run out.
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use tokio::time::Instant;
use uuid::Uuid;

use entity::resource_locks;

use super::queue::{self, Entry, Look};
use super::wake::{self, Freed, Resource};
use super::{attempt, Attempt, LockGrant, LockOptions, Refusal, Request};
use crate::status::ReleaseReason;
use crate::{db, validate, Error, Result, SessionManager};

/// How long past its wait a waiter's entry is kept before it counts as
/// abandoned: enough for the waiter to remove it itself.
fn abandon_margin(poll: Duration) -> Duration {
    Duration::from_secs(1).saturating_add(poll.saturating_mul(2))
}

pub(crate) async fn acquire(
    manager: &SessionManager,
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
    let wait = options
        .wait
        .map(|wait| validate::duration("wait", wait, true).map(|_| wait))
        .transpose()?;
    let resource: Resource = (resource_type.to_owned(), resource_key.to_owned());
    let mut request = Request {
        agent_id,
        resource: resource.clone(),
        ttl,
        wait_until: None,
    };
    let mut cleanup = Cleanup::new(manager, &resource);
    let Some(wait) = wait else {
        let outcome = cleanup.attempt(&request, None).await?;
        return match outcome {
            Attempt::Granted(grant) => Ok(grant),
            Attempt::Refused(refusal) => {
                if refusal.expired_one {
                    cleanup.announce().await;
                }
                Err(refused_now(&resource, *refusal))
            }
        };
    };
    let started = Instant::now();
    let deadline = started.checked_add(wait);
    let margin = abandon_margin(manager.config().lock_poll_interval);
    let entry_life = validate::duration("wait", wait.saturating_add(margin), true)
        .unwrap_or_else(|_| chrono::Duration::days(3660));
    request.wait_until = Some(db::now() + entry_life);
    manager
        .lock_wakers()
        .ensure_listening(manager.store(), manager.instance_id());
    let registration = manager.lock_wakers().register(&resource);
    let poll = manager.config().lock_poll_interval;
    let mut try_now = true;
    let mut wake_at: Option<Instant> = None;
    loop {
        let notified = registration.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if try_now {
            match cleanup.attempt(&request, cleanup.entry).await {
                Ok(Attempt::Granted(grant)) => return Ok(grant),
                Ok(Attempt::Refused(refusal)) => {
                    if refusal.expired_one {
                        cleanup.announce().await;
                    }
                    cleanup.entry = refusal.entry;
                    if let Some(entry) = refusal.entry {
                        registration.queued(entry.ticket);
                    }
                    wake_at = refusal
                        .delay_ms
                        .map(|ms| Instant::now() + Duration::from_millis(ms));
                }
                Err(e) => {
                    registration.leave();
                    cleanup.finish().await;
                    return Err(e);
                }
            }
        }
        let at_deadline = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        let at_wake = async {
            match wake_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = at_deadline => {
                registration.leave();
                cleanup.finish().await;
                let holder = queue::holder_of(&**manager.store(), &resource).await.ok().flatten();
                return Err(Error::LockWaitTimeout {
                    resource_type: resource.0.clone(),
                    resource_key: resource.1.clone(),
                    waited_ms: db::millis(started.elapsed()),
                    holder_agent_id: holder.and_then(|h| db::stored_id("agent_id", &h.agent_id).ok()),
                });
            }
            _ = &mut notified => try_now = registration.first_here(),
            _ = at_wake => {
                wake_at = None;
                try_now = true;
            }
            _ = tokio::time::sleep(poll) => {
                let Some(entry) = cleanup.entry else {
                    try_now = true;
                    continue;
                };
                let now = db::now();
                try_now = match queue::look(&**manager.store(), entry, &resource, now).await {
                    // Its session ended or was recovered: the attempt says which.
                    Ok(Look::Gone) => {
                        registration.leave();
                        cleanup.entry = None;
                        true
                    }
                    Ok(Look::Free) => true,
                    Ok(Look::Behind | Look::First { expires_at: None }) => false,
                    Ok(Look::First { expires_at: Some(at) }) => match (at.signed_duration_since(now)).to_std() {
                        Ok(left) if !left.is_zero() => {
                            let at = Instant::now() + left;
                            wake_at = Some(wake_at.map_or(at, |w| w.min(at)));
                            false
                        }
                        _ => true,
                    },
                    Err(e) => {
                        registration.leave();
                        cleanup.finish().await;
                        return Err(e);
                    }
                };
            }
        }
    }
}

/// The error of an acquire that does not wait.
fn refused_now(resource: &Resource, refusal: Refusal) -> Error {
    if let Some(retry_after_ms) = refusal.delay_ms {
        return Error::LockDelay {
            resource_type: resource.0.clone(),
            resource_key: resource.1.clone(),
            retry_after_ms,
        };
    }
    let holder = refusal.holder;
    Error::LockHeld {
        resource_type: resource.0.clone(),
        resource_key: resource.1.clone(),
        holder_agent_id: holder
            .as_ref()
            .and_then(|h| db::stored_id("agent_id", &h.agent_id).ok()),
        fencing_token: holder.as_ref().map(|h| h.fencing_token),
    }
}

/// What an acquire leaves behind if it stops early: its queue entry. Its
/// attempts run in tasks of their own, so dropping the acquire never cuts a
/// transaction midway; an attempt that finds its caller gone undoes what it
/// did.
struct Cleanup<'a> {
    manager: &'a SessionManager,
    resource: &'a Resource,
    entry: Option<Entry>,
}

impl<'a> Cleanup<'a> {
    fn new(manager: &'a SessionManager, resource: &'a Resource) -> Self {
        Self {
            manager,
            resource,
            entry: None,
        }
    }

    /// One attempt, run to its end even if this future is dropped.
    async fn attempt(&mut self, request: &Request, queued: Option<Entry>) -> Result<Attempt> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return attempt(
                self.manager.store(),
                self.manager.config(),
                request,
                queued,
                Uuid::new_v4(),
            )
            .await;
        };
        let (manager, request) = (self.manager.clone(), request.clone());
        let (reply, outcome) = tokio::sync::oneshot::channel();
        let resource = self.resource.clone();
        runtime.spawn(async move {
            let store = manager.store();
            let done = attempt(store, manager.config(), &request, queued, Uuid::new_v4()).await;
            if let Err(Ok(unreceived)) = reply.send(done) {
                undo(&manager, &request.resource, unreceived).await;
            }
        });
        let mut answer = Answer {
            manager: self.manager,
            resource,
            outcome: Some(outcome),
        };
        let outcome = match answer.outcome.as_mut() {
            Some(outcome) => outcome.await,
            None => return Err(Error::CorruptRow("a lock attempt was awaited twice".into())),
        };
        answer.outcome = None;
        let outcome = outcome.map_err(|_| {
            Error::CorruptRow("a lock attempt's task ended without an answer".into())
        })?;
        if matches!(outcome, Ok(Attempt::Granted(_))) {
            // The grant's transaction removed the entry.
            self.entry = None;
        }
        outcome
    }

    /// Wakes the head waiter: the resource may be free.
    async fn announce(&self) {
        let freed = Freed::One(self.resource.clone());
        let (store, instance) = (self.manager.store(), self.manager.instance_id());
        wake::announce(store, self.manager.lock_wakers(), instance, freed).await;
    }

    /// Leaves the queue now, if queued.
    async fn finish(&mut self) {
        let entry = self.entry.take();
        abandon(self.manager, self.resource, entry, None).await;
    }
}

/// An attempt's answer, still to be received. Dropped unreceived, it stops
/// the attempt's task from sending (the task then undoes the attempt), or
/// undoes an answer that was sent but never read.
struct Answer<'a> {
    manager: &'a SessionManager,
    resource: Resource,
    outcome: Option<tokio::sync::oneshot::Receiver<Result<Attempt>>>,
}

impl Drop for Answer<'_> {
    fn drop(&mut self) {
        let Some(mut outcome) = self.outcome.take() else {
            return;
        };
        outcome.close();
        let Ok(Ok(unreceived)) = outcome.try_recv() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (manager, resource) = (self.manager.clone(), self.resource.clone());
        runtime.spawn(async move { undo(&manager, &resource, unreceived).await });
    }
}

/// Undoes an attempt nobody received: its grant, or the entry it queued.
async fn undo(manager: &SessionManager, resource: &Resource, unreceived: Attempt) {
    let (entry, grant) = match unreceived {
        Attempt::Granted(grant) => (None, Some(grant.lock_id)),
        Attempt::Refused(refusal) => (refusal.entry, None),
    };
    abandon(manager, resource, entry, grant).await;
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let Some(entry) = self.entry.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (manager, resource) = (self.manager.clone(), self.resource.clone());
        runtime.spawn(async move { abandon(&manager, &resource, Some(entry), None).await });
    }
}

/// Removes an entry and releases a grant nobody received, in one
/// transaction, then wakes the next waiter. Failures are logged: the entry
/// then lapses at its `expires_at`.
async fn abandon(
    manager: &SessionManager,
    resource: &Resource,
    entry: Option<Entry>,
    grant: Option<Uuid>,
) {
    if entry.is_none() && grant.is_none() {
        return;
    }
    let work = async {
        let txn = db::begin_write(manager.store()).await?;
        if let Some(entry) = entry {
            queue::leave(&*txn, entry).await?;
        }
        if let Some(lock_id) = grant {
            release_unreceived(&txn, lock_id, db::now()).await?;
        }
        txn.commit().await?;
        Ok::<(), Error>(())
    };
    match work.await {
        Ok(()) => {
            let freed = Freed::One(resource.clone());
            let wakers = manager.lock_wakers();
            wake::announce(manager.store(), wakers, manager.instance_id(), freed).await;
        }
        Err(e) => tracing::warn!(error = %e, "could not leave the lock queue; the entry lapses"),
    }
}

async fn release_unreceived(
    txn: &sea_orm::DatabaseTransaction,
    lock_id: Uuid,
    now: DateTime<Utc>,
) -> Result<()> {
    resource_locks::Entity::update_many()
        .col_expr(resource_locks::Column::ReleasedAt, Expr::value(now))
        .col_expr(
            resource_locks::Column::ReleaseReason,
            Expr::value(ReleaseReason::Released.as_str()),
        )
        .filter(resource_locks::Column::Id.eq(lock_id.to_string()))
        .filter(resource_locks::Column::ReleasedAt.is_null())
        .exec(txn)
        .await?;
    Ok(())
}
