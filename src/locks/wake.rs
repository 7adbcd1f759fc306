//! Waking the waiters of a resource that may have become free, and the
//! change feeds (`watch`) when an audit row was appended.
//!
//! The queue itself lives in the database (`lock_waiters`); this is only the
//! wake-up, and losing one costs latency, never order or safety:
//! - within one manager (and its clones), a release wakes the first of its
//!   own waiters queued on that resource at once;
//! - across instances on PostgreSQL, the releasing manager sends a `NOTIFY`
//!   that every other manager on the database `LISTEN`s for;
//! - everywhere, each waiter also looks at the queue every
//!   `Config::lock_poll_interval`, which is what wakes waiters across
//!   processes on a SQLite file and across instances on MariaDB.
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use sea_orm::DatabaseBackend;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::db;

/// A resource: its type and key.
pub(crate) type Resource = (String, String);

/// The channel every manager on a PostgreSQL database listens on.
#[cfg(feature = "postgres")]
const CHANNEL: &str = "demiarch_sessions_locks";

/// PostgreSQL refuses a `NOTIFY` payload of 8000 bytes or more; a longer one
/// becomes "everything may have changed".
#[cfg(feature = "postgres")]
const MAX_PAYLOAD: usize = 7900;

/// One manager's waiters, by resource, its change feeds, and its `LISTEN` task.
#[derive(Default)]
pub(crate) struct Wakers {
    slots: Mutex<HashMap<Resource, Arc<Slot>>>,
    /// Bumped when an audit row may have been committed; feeds wait on it.
    appended: tokio::sync::watch::Sender<u64>,
    /// Per agent, held while a given-up acquire of it is cleaned up.
    gates: Mutex<HashMap<Uuid, Weak<tokio::sync::Mutex<()>>>>,
    listener: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The local waiters of one resource.
#[derive(Default)]
struct Slot {
    /// This resource was freed: the first waiter tries for it.
    freed: Notify,
    /// Something was freed, which is not known (a session's end): the first
    /// waiter looks at its queue, reading only, before it tries.
    maybe: Notify,
    /// Queue tickets of this manager's waiters that are queued on it.
    tickets: Mutex<BTreeSet<i64>>,
}

impl Drop for Wakers {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.listener).take() {
            task.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Wakers {
    /// Registers a waiter on `resource`; it is woken until dropped.
    pub(crate) fn register(self: &Arc<Self>, resource: &Resource) -> Registration {
        let slot = lock(&self.slots)
            .entry(resource.clone())
            .or_default()
            .clone();
        Registration {
            wakers: Arc::downgrade(self),
            resource: resource.clone(),
            slot,
            ticket: Mutex::new(None),
        }
    }

    /// A change feed's wake-up: it changes whenever an audit row may have
    /// been committed, by this manager or (on PostgreSQL) another instance.
    pub(crate) fn appended(&self) -> tokio::sync::watch::Receiver<u64> {
        self.appended.subscribe()
    }

    fn wake_feeds(&self) {
        self.appended.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The agent's gate (see `wait`), shared while anyone holds it.
    pub(crate) fn agent_gate(&self, agent_id: Uuid) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = lock(&self.gates);
        gates.retain(|_, gate| gate.strong_count() > 0);
        if let Some(gate) = gates.get(&agent_id).and_then(Weak::upgrade) {
            return gate;
        }
        let gate = Arc::default();
        gates.insert(agent_id, Arc::downgrade(&gate));
        gate
    }

    /// Wakes this manager's first waiter on each resource.
    /// `maybe`: the resources may have been freed; `None`: any may have.
    fn wake_local(&self, resources: Option<&[Resource]>, maybe: bool) {
        let slots = lock(&self.slots);
        let wake = |s: &Arc<Slot>| match maybe {
            true => s.maybe.notify_waiters(),
            false => s.freed.notify_waiters(),
        };
        match resources {
            Some(resources) => resources.iter().filter_map(|r| slots.get(r)).for_each(wake),
            None => slots.values().for_each(|s| s.maybe.notify_waiters()),
        }
    }

    /// Wakes every waiter to look at its queue, and every feed.
    #[cfg(feature = "postgres")]
    fn wake_all(&self) {
        self.wake_local(None, true);
        self.wake_feeds();
    }

    /// Stops listening for other instances' releases.
    pub(crate) fn stop(&self) {
        if let Some(task) = lock(&self.listener).take() {
            task.abort();
        }
    }

    /// On PostgreSQL, starts listening for other instances' releases, once, on
    /// a connection of its own (one more connection to the server per manager
    /// that has waited or watched).
    #[allow(unused_variables)]
    pub(crate) fn ensure_listening(self: &Arc<Self>, store: &db::Store, instance: Uuid) {
        #[cfg(feature = "postgres")]
        if store.get_database_backend() == DatabaseBackend::Postgres {
            let mut listener = lock(&self.listener);
            if listener.is_some() {
                return;
            }
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return;
            };
            // A pool of its own, so the listening connection never takes one
            // of the manager's (or the app's) connections away.
            let options = store.get_postgres_connection_pool().connect_options();
            let pool = sea_orm::sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect_lazy_with((*options).clone());
            *listener = Some(runtime.spawn(listen(pool, Arc::downgrade(self), instance)));
        }
    }
}

/// Resources a write may have freed.
pub(crate) enum Freed {
    /// None (a session's start).
    Nothing,
    One(Resource),
    /// A waiter left the queue of this resource: if it was the head of a
    /// free resource, the next waiter can go.
    Maybe(Resource),
    /// Unknown which (a session's end releases all its locks at once).
    All,
}

impl Freed {
    fn resources(&self) -> Option<&[Resource]> {
        match self {
            Freed::One(r) | Freed::Maybe(r) => Some(std::slice::from_ref(r)),
            Freed::Nothing => Some(&[]),
            Freed::All => None,
        }
    }
}

/// Wakes the waiters of what a committed write freed, and the change feeds
/// if it `appended` an audit row: this manager's at once, and on PostgreSQL
/// other instances' through `NOTIFY`. Failing to notify is logged and
/// otherwise ignored: waiters and feeds also poll.
pub(crate) async fn announce(
    store: &db::Store,
    wakers: &Wakers,
    instance: Uuid,
    freed: Freed,
    appended: bool,
) {
    let maybe = !matches!(freed, Freed::One(_));
    wakers.wake_local(freed.resources(), maybe);
    if appended {
        wakers.wake_feeds();
    }
    let nothing = matches!(freed, Freed::Nothing) && !appended;
    if nothing || store.get_database_backend() != DatabaseBackend::Postgres {
        return;
    }
    #[cfg(feature = "postgres")]
    {
        use sea_orm::sea_query::{Func, Query};
        use sea_orm::ConnectionTrait;
        let notify = Query::select()
            .expr(
                Func::cust("pg_notify")
                    .args([CHANNEL.into(), payload(instance, &freed, appended).into()]),
            )
            .to_owned();
        if let Err(e) = store.execute(&notify).await {
            tracing::debug!(error = %e, "wake-up not sent; other instances will poll");
        }
    }
    #[cfg(not(feature = "postgres"))]
    let _ = (instance, appended);
}

#[cfg(feature = "postgres")]
fn payload(instance: Uuid, freed: &Freed, appended: bool) -> String {
    let maybe = !matches!(freed, Freed::One(_));
    let resources = freed.resources();
    let text = serde_json::json!({
        "from": instance, "resources": resources, "maybe": maybe, "appended": appended,
    })
    .to_string();
    if text.len() <= MAX_PAYLOAD {
        text
    } else {
        serde_json::json!({ "from": instance, "resources": null, "appended": appended }).to_string()
    }
}

/// Wakes this manager's waiters and feeds on what other instances announce.
/// A lost connection may have lost notifications, so reconnecting wakes
/// everyone.
#[cfg(feature = "postgres")]
async fn listen(pool: sea_orm::sqlx::PgPool, wakers: Weak<Wakers>, instance: Uuid) {
    use sea_orm::sqlx::postgres::PgListener;
    #[derive(serde::Deserialize)]
    struct Payload {
        from: Uuid,
        resources: Option<Vec<Resource>>,
        #[serde(default)]
        maybe: bool,
        #[serde(default)]
        appended: bool,
    }
    let retry = std::time::Duration::from_secs(1);
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(e) if pool.is_closed() => return tracing::debug!(error = %e, "pool closed"),
            Err(_) => {
                tokio::time::sleep(retry).await;
                continue;
            }
        };
        if listener.listen(CHANNEL).await.is_err() {
            tokio::time::sleep(retry).await;
            continue;
        }
        // Releases and appends announced before this point were not heard.
        match wakers.upgrade() {
            Some(wakers) => wakers.wake_all(),
            None => return,
        }
        loop {
            let received = listener.try_recv().await;
            let Some(wakers) = wakers.upgrade() else {
                return;
            };
            match received {
                Ok(Some(note)) => match serde_json::from_str::<Payload>(note.payload()) {
                    Ok(p) if p.from == instance => {}
                    Ok(p) => {
                        wakers.wake_local(p.resources.as_deref(), p.maybe);
                        if p.appended {
                            wakers.wake_feeds();
                        }
                    }
                    Err(_) => wakers.wake_all(),
                },
                // The connection was lost; the next call reconnects.
                Ok(None) => wakers.wake_all(),
                Err(_) if pool.is_closed() => return,
                Err(_) => {
                    wakers.wake_all();
                    break;
                }
            }
        }
    }
}

/// A waiter's place among its manager's waiters on one resource.
pub(crate) struct Registration {
    wakers: Weak<Wakers>,
    resource: Resource,
    slot: Arc<Slot>,
    ticket: Mutex<Option<i64>>,
}

impl Registration {
    /// A wake-up to wait for. Create it before looking at the queue, so a
    /// release in between is not missed.
    pub(crate) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.slot.freed.notified()
    }

    /// A wake-up for "something was freed, maybe this": see [`notified`](Self::notified).
    pub(crate) fn maybe_notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.slot.maybe.notified()
    }

    /// Records the waiter's queue ticket, once it is queued.
    pub(crate) fn queued(&self, ticket: i64) {
        let mut mine = lock(&self.ticket);
        if *mine != Some(ticket) {
            let mut tickets = lock(&self.slot.tickets);
            if let Some(old) = *mine {
                tickets.remove(&old);
            }
            tickets.insert(ticket);
            *mine = Some(ticket);
        }
    }

    /// Gives up the waiter's place among this manager's waiters without the
    /// lock; if it was first, the next one looks at the queue.
    pub(crate) fn leave(&self) {
        if self.forget() {
            self.slot.maybe.notify_waiters();
        }
    }

    /// Removes the waiter's ticket; whether it was this manager's first.
    fn forget(&self) -> bool {
        let Some(ticket) = lock(&self.ticket).take() else {
            return false;
        };
        let mut tickets = lock(&self.slot.tickets);
        let first = tickets.first() == Some(&ticket);
        tickets.remove(&ticket);
        first
    }

    /// Whether no other waiter of this manager is ahead of this one: only
    /// the first of them tries the resource when woken.
    pub(crate) fn first_here(&self) -> bool {
        match *lock(&self.ticket) {
            Some(ticket) => lock(&self.slot.tickets).first() == Some(&ticket),
            None => true,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.forget();
        let Some(wakers) = self.wakers.upgrade() else {
            return;
        };
        let mut slots = lock(&wakers.slots);
        // The map's and ours: no other waiter uses the slot.
        if Arc::strong_count(&self.slot) == 2 {
            slots.remove(&self.resource);
        }
    }
}
