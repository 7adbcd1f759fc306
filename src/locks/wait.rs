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
//! Each attempt (one transaction, and the wake-ups after its commit) and
//! each look at the queue is a detached call (`crate::detached`), so
//! dropping the acquire future (a timeout or `select!` around it) never cuts
//! a transaction midway. A dropped acquire's entry is removed by a task
//! spawned on the runtime, one write transaction after the drop, and an
//! attempt whose answer nobody received is undone: its grant released, its
//! entry removed. Should that write fail, the entry is ignored once its
//! wait, plus a margin, has run out.
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use uuid::Uuid;

use super::queue::{self, Entry, Look};
use super::wake::{self, Freed, Resource};
use super::{attempt, Attempt, LockGrant, LockOptions, Refusal, Request};
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
    let mut cleanup = Cleanup::new(manager, &resource, agent_id).await;
    let Some(wait) = wait else {
        let outcome = cleanup.attempt(&request, None).await?;
        return match outcome {
            Attempt::Granted { grant, .. } => Ok(grant),
            Attempt::Refused(refusal) => Err(refused_now(&resource, *refusal)),
        };
    };
    let started = Instant::now();
    let deadline = started
        .checked_add(wait)
        .unwrap_or_else(|| started + crate::MAX_ARGUMENT_DURATION);
    let poll = manager.config().lock_poll_interval;
    let entry_life = validate::duration("wait", wait.saturating_add(abandon_margin(poll)), true)
        .unwrap_or_else(|_| chrono::Duration::days(3660));
    request.wait_until = Some(db::now() + entry_life);
    manager
        .lock_wakers()
        .ensure_listening(manager.store(), manager.instance_id());
    let registration = manager.lock_wakers().register(&resource);
    let mut timers = Timers::new(poll);
    let mut next = Next::Attempt;
    let mut first = true;
    loop {
        // Enabled before looking at the queue, so no wake-up in between is lost.
        let notified = registration.notified();
        let maybe = registration.maybe_notified();
        tokio::pin!(notified, maybe);
        notified.as_mut().enable();
        maybe.as_mut().enable();
        if next == Next::Look {
            next = match cleanup.entry {
                None => Next::Attempt,
                Some(entry) => {
                    let (store, looked_at) = (manager.store().clone(), resource.clone());
                    let look = crate::detached::run(manager.tasks(), async move {
                        queue::look(&*store, entry, &looked_at, db::now()).await
                    });
                    match look.await {
                        // Its session ended or was recovered: the attempt says which.
                        Ok(Look::Gone) => {
                            registration.leave();
                            cleanup.entry = None;
                            Next::Attempt
                        }
                        Ok(Look::Free) if !timers.delayed() => Next::Attempt,
                        Ok(Look::First { expires_at }) => {
                            timers.holder_expires(expires_at);
                            if timers.expiry_due() {
                                Next::Attempt
                            } else {
                                Next::Wait
                            }
                        }
                        Ok(_) => Next::Wait,
                        Err(e) if e.is_timeout() => {
                            timers.retry_soon();
                            Next::Wait
                        }
                        Err(e) => {
                            registration.leave();
                            cleanup.finish().await;
                            return Err(e);
                        }
                    }
                }
            };
        }
        if next == Next::Attempt {
            // The first attempt runs to its end, as an acquire that does not
            // wait would; later ones are bounded by the wait (one dropped
            // here is undone).
            let queued = cleanup.entry.is_some();
            let attempt = cleanup.attempt(&request, cleanup.entry);
            let outcome = if first {
                first = false;
                Ok(attempt.await)
            } else {
                tokio::time::timeout_at(deadline, attempt).await
            };
            match outcome {
                Ok(Ok(Attempt::Granted { grant, .. })) => {
                    if queued {
                        crate::metrics::record_handoff();
                    }
                    return Ok(grant);
                }
                Ok(Ok(Attempt::Refused(refusal))) => {
                    cleanup.entry = refusal.entry;
                    if let Some(entry) = refusal.entry {
                        registration.queued(entry.ticket);
                    }
                    timers.refused(&refusal);
                }
                // Busy: look again shortly.
                Ok(Err(e)) if e.is_timeout() => timers.retry_soon(),
                Ok(Err(e)) => {
                    registration.leave();
                    cleanup.finish().await;
                    return Err(e);
                }
                Err(_) => {}
            }
        }
        let poll_at = timers.poll_at;
        tokio::select! {
            biased;
            _ = tokio::time::sleep_until(deadline) => {
                registration.leave();
                cleanup.finish().await;
                return Err(timed_out(manager, &resource, started).await);
            }
            _ = &mut notified => {
                next = if registration.first_here() { Next::Attempt } else { Next::Wait };
            }
            _ = &mut maybe => {
                next = if registration.first_here() { Next::Look } else { Next::Wait };
            }
            _ = timers.due() => next = Next::Look,
            _ = tokio::time::sleep_until(poll_at) => {
                timers.polled();
                next = Next::Look;
            }
        }
    }
}

/// What a waiter does on its next turn.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Next {
    Attempt,
    Look,
    Wait,
}

/// A waiter's clocks: its next poll, the end of the resource's lock delay,
/// its holder's expiry, and a retry after the database was busy.
struct Timers {
    poll: Duration,
    poll_at: Instant,
    delay_until: Option<Instant>,
    expiry_at: Option<Instant>,
    retry_at: Option<Instant>,
}

/// How soon a waiter looks again after the database was busy.
const BUSY_RETRY: Duration = Duration::from_millis(20);

impl Timers {
    fn new(poll: Duration) -> Self {
        Self {
            poll,
            poll_at: Instant::now() + poll,
            delay_until: None,
            expiry_at: None,
            retry_at: None,
        }
    }

    fn retry_soon(&mut self) {
        self.retry_at = Some(Instant::now() + BUSY_RETRY.min(self.poll));
    }

    fn polled(&mut self) {
        self.poll_at = Instant::now() + self.poll;
    }

    fn refused(&mut self, refusal: &Refusal) {
        self.delay_until = refusal
            .delay_ms
            .map(|ms| Instant::now() + Duration::from_millis(ms));
        self.holder_expires(
            refusal
                .holder
                .as_ref()
                .and_then(|h| h.expires_at)
                .map(|at| at.to_utc()),
        );
    }

    fn holder_expires(&mut self, at: Option<DateTime<Utc>>) {
        self.expiry_at = at.map(|at| match (at - db::now()).to_std() {
            Ok(left) => Instant::now() + left,
            Err(_) => Instant::now(),
        });
    }

    fn delayed(&self) -> bool {
        self.delay_until.is_some_and(|at| at > Instant::now())
    }

    fn expiry_due(&self) -> bool {
        self.expiry_at.is_some_and(|at| at <= Instant::now())
    }

    /// Fires at the first of the lock delay's end, the holder's expiry and
    /// a busy retry.
    async fn due(&mut self) {
        let at = [self.delay_until, self.expiry_at, self.retry_at]
            .into_iter()
            .flatten()
            .min();
        let Some(at) = at else {
            return std::future::pending().await;
        };
        tokio::time::sleep_until(at).await;
        self.delay_until = None;
        self.expiry_at = None;
        self.retry_at = None;
    }
}

/// The error of a wait that ran out, naming the holder as it is now.
async fn timed_out(manager: &SessionManager, resource: &Resource, started: Instant) -> Error {
    let now = db::now();
    let (store, looked_at) = (manager.store().clone(), resource.clone());
    let holder = crate::detached::run(manager.tasks(), async move {
        Ok(queue::holder_of(&*store, &looked_at).await?)
    });
    let holder = match holder.await {
        Ok(holder) => holder.filter(|h| !super::is_expired(h, now)),
        Err(e) => {
            tracing::debug!(error = %e, "could not read the holder of a timed-out wait");
            None
        }
    };
    Error::LockWaitTimeout {
        resource_type: resource.0.clone(),
        resource_key: resource.1.clone(),
        waited_ms: db::millis(started.elapsed()),
        holder_agent_id: holder
            .and_then(|h| db::stored_id("resource_locks", &h.id, "agent_id", &h.agent_id).ok()),
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
            .and_then(|h| db::stored_id("resource_locks", &h.id, "agent_id", &h.agent_id).ok()),
        fencing_token: holder.as_ref().map(|h| h.fencing_token),
    }
}

/// What an acquire leaves behind if it stops early: its queue entry. Its
/// attempts run in tasks of their own, so dropping the acquire never cuts a
/// transaction midway; an attempt that finds its caller gone undoes what it
/// did.
///
/// Each such clean-up holds the agent's gate until it is done, and an
/// acquire passes through the gate before it starts, so an agent that gives
/// up a wait and asks again never meets the entry it just left.
struct Cleanup<'a> {
    manager: &'a SessionManager,
    resource: &'a Resource,
    entry: Option<Entry>,
    gate: Gate,
}

type Gate = Arc<tokio::sync::Mutex<()>>;
type GateGuard = tokio::sync::OwnedMutexGuard<()>;

impl<'a> Cleanup<'a> {
    async fn new(manager: &'a SessionManager, resource: &'a Resource, agent_id: Uuid) -> Self {
        let gate = manager.lock_wakers().agent_gate(agent_id);
        drop(gate.lock().await);
        Self {
            manager,
            resource,
            entry: None,
            gate,
        }
    }

    /// One attempt, and the wake-ups after its commit, run to their end even
    /// if this future is dropped; an attempt nobody received is undone.
    async fn attempt(&mut self, request: &Request, queued: Option<Entry>) -> Result<Attempt> {
        // Taken before the task exists, so the agent's next acquire always
        // comes after this attempt and its undo.
        let guard = self.gate.clone().lock_owned().await;
        let (manager, request) = (self.manager.clone(), request.clone());
        let work = async move {
            let store = manager.store();
            let tried = attempt(store, manager.config(), &request, queued, Uuid::new_v4()).await;
            let done = match tried {
                Err(refused @ Error::Deadlock { .. }) => {
                    // For the feeds: the refusal's `lock_deadlock` row (or
                    // nothing, should it have failed; they look and go on).
                    let (wakers, instance) = (manager.lock_wakers(), manager.instance_id());
                    wake::announce(store, wakers, instance, Freed::Nothing, true).await;
                    return Err(refused);
                }
                tried => tried?,
            };
            announce_attempt(&manager, &request.resource, &done).await;
            Ok((done, guard))
        };
        let (manager, resource) = (self.manager.clone(), self.resource.clone());
        let undo = move |(unreceived, guard): (Attempt, GateGuard)| async move {
            undo(&manager, &resource, unreceived, guard).await;
        };
        let tasks = self.manager.tasks();
        let (outcome, _guard) = crate::detached::run_or_undo(tasks, work, undo).await?;
        if matches!(outcome, Attempt::Granted { .. }) {
            // The grant's transaction removed the entry.
            self.entry = None;
        }
        Ok(outcome)
    }

    /// Leaves the queue now, if queued, in a task of its own so that
    /// dropping this future does not cut the write midway.
    async fn finish(&mut self) {
        let Some(entry) = self.entry else {
            // An undo of an attempt cut by the deadline may still be running.
            drop(self.gate.lock().await);
            return;
        };
        let guard = self.gate.clone().lock_owned().await;
        let (manager, resource) = (self.manager.clone(), self.resource.clone());
        let leaving = crate::detached::run(self.manager.tasks(), async move {
            abandon(&manager, &resource, Some(entry), None).await;
            drop(guard);
            Ok(())
        });
        self.entry = None;
        let _ = leaving.await;
    }
}

/// Wakes whoever an attempt's commit concerns: the feeds for the
/// `locks_swept` row of an expired holder it released, and, when it was then
/// refused, the head waiter (the resource may be free).
async fn announce_attempt(manager: &SessionManager, resource: &Resource, done: &Attempt) {
    let freed = match done {
        Attempt::Granted { swept: true, .. } => Freed::Nothing,
        Attempt::Refused(refusal) if refusal.expired_one => Freed::One(resource.clone()),
        _ => return,
    };
    let (store, instance) = (manager.store(), manager.instance_id());
    wake::announce(store, manager.lock_wakers(), instance, freed, true).await;
}

/// Undoes an attempt nobody received: its grant, or the entry it queued.
async fn undo(
    manager: &SessionManager,
    resource: &Resource,
    unreceived: Attempt,
    guard: GateGuard,
) {
    let (entry, grant) = match unreceived {
        Attempt::Granted { grant, .. } => (None, Some(grant.lock_id)),
        Attempt::Refused(refusal) => (refusal.entry, None),
    };
    abandon(manager, resource, entry, grant).await;
    drop(guard);
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let Some(entry) = self.entry.take() else {
            return;
        };
        let (manager, resource) = (self.manager.clone(), self.resource.clone());
        // Taken here, before the agent can ask again; if a clean-up of the
        // same agent holds it, this one queues behind it.
        let held = self.gate.clone().try_lock_owned();
        let gate = self.gate.clone();
        crate::detached::spawn(self.manager.tasks(), async move {
            let guard = match held {
                Ok(guard) => guard,
                Err(_) => gate.lock_owned().await,
            };
            abandon(&manager, &resource, Some(entry), None).await;
            drop(guard);
        });
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
            super::release_held(&txn, lock_id, db::now()).await?;
        }
        txn.commit().await?;
        Ok::<(), Error>(())
    };
    match work.await {
        Ok(()) => {
            let freed = match grant {
                Some(_) => Freed::One(resource.clone()),
                None => Freed::Maybe(resource.clone()),
            };
            let wakers = manager.lock_wakers();
            wake::announce(manager.store(), wakers, manager.instance_id(), freed, false).await;
        }
        Err(e) => tracing::warn!(
            error = %e,
            "could not leave the lock queue or release an unreceived grant: the entry lapses \
             after its wait, the grant at its ttl or its session's end"
        ),
    }
}
