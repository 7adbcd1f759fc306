//! `SessionManager`: connecting, accessors, and the public operations. Each
//! operation opens at most one transaction and delegates to the module that
//! owns the behaviour.
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use sea_orm::DatabaseConnection;
use tokio_util::task::TaskTracker;
use tracing::instrument;
use uuid::Uuid;

use crate::audit::Operator;
use crate::context::{ContextRegistry, ContextSource, ContextWindow};
use crate::lifecycle::{self, Periodic, ShutdownReport};
use crate::locks::wake::{self, Freed, Wakers};
use crate::locks::{LockGrant, LockOptions, LockWaiter, SweepReport};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::query::{
    self, AgentInfo, AuditFilter, AuditRecord, Listing, LockFilter, LockInfo, SessionFilter,
    SessionInfo,
};
use crate::retention::{self, PruneReport, RetentionPolicy};
use crate::session::recovery::RecoveryReport;
use crate::session::EndSessionReport;
use crate::watch::WatchOptions;
use crate::{db, detached, locks, session, Config, Error, Result};

/// The handle apps keep: cheap to clone, safe to share across tasks.
///
/// Every `async` method is safe to drop at any await (a timeout, a
/// `select!`): its work runs in a task of its own, to its end, and only the
/// wait for its answer is dropped. A lock granted to a dropped acquire is
/// released, and a dropped wait leaves the queue; everything else a dropped
/// call wrote stands, as if it had been awaited.
///
/// A manager opened read-only ([`Config::read_only`]) refuses every call
/// that writes (starting, registering, acquiring, renewing, releasing,
/// finishing, pausing, ending, sweeping, recovering, resuming, pruning) with
/// [`Error::ReadOnly`](crate::Error::ReadOnly) naming the call, before it
/// touches the database; reads, `watch` and `lock_lost` work as usual.
#[derive(Clone)]
pub struct SessionManager {
    db: db::Store,
    config: Arc<Config>,
    contexts: Arc<ContextRegistry>,
    source: Arc<dyn ContextSource>,
    metrics: Arc<Metrics>,
    instance_id: Uuid,
    heartbeat: Arc<Periodic>,
    /// The background prune of `Config::retention`.
    pruner: Arc<Periodic>,
    state: Arc<AtomicU8>,
    lock_wakers: Arc<Wakers>,
    /// The tasks its calls run in (see [`detached`]), which `close` waits for.
    tasks: TaskTracker,
}

/// Where a manager is in its life; shared by its clones.
const OPEN: u8 = 0;
const SHUT_DOWN: u8 = 1;
const CLOSED: u8 = 2;

impl std::fmt::Debug for SessionManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionManager")
            .field("backend", &self.db.get_database_backend())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl SessionManager {
    /// Connects with the default [`Config`]. See [`connect_with`](Self::connect_with).
    ///
    /// # Errors
    /// [`Error::Database`](crate::Error::Database) when the database cannot be
    /// opened or migrated.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, Config::default()).await
    }

    /// Connects to `url` (`sqlite://path.db`, `sqlite::memory:`), applies the
    /// production settings and runs pending migrations.
    ///
    /// A SQLite file is created if missing (mode 0600 on Unix, with
    /// `auto_vacuum = INCREMENTAL`, so that a prune can shrink it) and opened
    /// in WAL mode with `synchronous=FULL`, foreign keys on and
    /// `Config::busy_timeout`.
    /// Every `sqlite::memory:` connect is a fresh, empty database.
    ///
    /// With `Config::read_only` (or a SQLite URL with `?mode=ro`) it
    /// creates and migrates nothing: the store must exist at the latest
    /// schema, and every write call is refused (see [`is_read_only`](Self::is_read_only)).
    ///
    /// # Errors
    /// [`Error::Database`](crate::Error::Database) when the database cannot be
    /// opened or migrated; [`Error::InvalidInput`](crate::Error::InvalidInput)
    /// when the URL is malformed or the file cannot be created;
    /// read-only, [`Error::CannotOpen`](crate::Error::CannotOpen) for a
    /// missing file and [`Error::NotMigrated`](crate::Error::NotMigrated)
    /// for a store not at the latest schema.
    pub async fn connect_with(url: &str, config: Config) -> Result<Self> {
        config.validate()?;
        let url = url.to_owned();
        detached::run(&TaskTracker::new(), async move {
            let store = db::connect(&url, &config).await?;
            Ok(Self::from_store(store, config))
        })
        .await
    }

    /// Wraps a connection the app owns. The app runs `migration::Migrator`
    /// itself, and sets SQLite's pragmas (foreign keys on, WAL, busy timeout).
    /// With `Config::read_only` the manager refuses every write call; the
    /// connection itself is as the app opened it.
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) naming a `config`
    /// field out of range (see [`Config::validate`]).
    pub fn new(db: DatabaseConnection, config: Config) -> Result<Self> {
        config.validate()?;
        let store = db::Store::new(
            db,
            config.busy_timeout,
            config.cleanup_timeout,
            config.read_only,
        );
        Ok(Self::from_store(store, config))
    }

    fn from_store(db: db::Store, config: Config) -> Self {
        let contexts = Arc::new(ContextRegistry::default());
        let manager = Self {
            db,
            config: Arc::new(config),
            source: contexts.clone(),
            contexts,
            metrics: Arc::default(),
            instance_id: Uuid::new_v4(),
            heartbeat: Arc::default(),
            pruner: Arc::default(),
            state: Arc::default(),
            lock_wakers: Arc::default(),
            tasks: TaskTracker::new(),
        };
        manager.start_pruner();
        manager
    }

    /// Makes `end_session` read live context windows from `source` instead of
    /// the built-in registry.
    #[must_use]
    pub fn with_context_source(mut self, source: Arc<dyn ContextSource>) -> Self {
        self.source = source;
        self
    }

    /// The underlying connection, for queries of the app's own. On a SQLite
    /// file opened by [`connect`](Self::connect) the manager's own writes do
    /// not use it: see [`write_connection`](Self::write_connection).
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// The connection the manager's own writes go through. On a SQLite file
    /// opened by [`connect`](Self::connect) it is a pool of one connection,
    /// kept open and apart from [`connection`](Self::connection)'s so that
    /// its page cache stays warm from one write to the next; the manager lets
    /// one write at a time use it. Elsewhere it is the same as `connection`.
    ///
    /// An app that writes through it queues behind this manager's writes for
    /// the connection (at most `Config::connect_timeout`), and this manager's
    /// writes queue behind the app's for as long as it holds the connection
    /// (a transaction, an unfinished stream): past `connect_timeout` they
    /// fail with an error for which [`Error::is_timeout`](crate::Error::is_timeout)
    /// is true, having changed nothing. Never call the manager from inside a
    /// transaction on it.
    pub fn write_connection(&self) -> &DatabaseConnection {
        self.db.writer()
    }

    /// Stops the heartbeat, lets the calls under way finish (a dropped
    /// call's work included; at most `cleanup_timeout` plus
    /// `connect_timeout`), and closes the manager's connections (on a SQLite
    /// file, the writer and the pool), waiting for those in use to come back.
    /// It ends no session: call [`shutdown`](Self::shutdown) first for that.
    /// Calls on this manager or its clones afterwards fail. Without it, the
    /// connections close once the manager and all its clones are dropped.
    ///
    /// # Errors
    /// [`Error::Database`](crate::Error::Database) if closing failed.
    pub async fn close(&self) -> Result<()> {
        self.state.store(CLOSED, Ordering::SeqCst);
        let m = self.clone();
        // Not among the tasks it waits for.
        let untracked = TaskTracker::new();
        detached::run(&untracked, async move {
            m.heartbeat.stop().await;
            m.pruner.stop().await;
            m.lock_wakers.stop();
            // Calls already under way (a dropped one's work, an undo) finish
            // on the pool first; each is bounded by its own timeouts.
            m.tasks.close();
            let bound = m
                .config
                .cleanup_timeout
                .saturating_add(m.config.connect_timeout);
            if tokio::time::timeout(bound, m.tasks.wait()).await.is_err() {
                tracing::warn!(
                    running = m.tasks.len(),
                    "calls still running when the manager closed; they will fail"
                );
            }
            Ok(m.db.close().await?)
        })
        .await
    }

    /// Runs `call` on a clone of this manager in a task of its own, so that
    /// dropping the caller's future cuts nothing: see [`detached`].
    async fn detached<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: FnOnce(SessionManager) -> Fut,
        Fut: std::future::Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        detached::run(&self.tasks, call(self.clone())).await
    }

    /// The tasks this manager's calls run in.
    pub(crate) fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether this manager opened the store read-only (`Config::read_only`,
    /// or a SQLite URL with `?mode=ro`): its write calls return
    /// [`Error::ReadOnly`](crate::Error::ReadOnly) naming themselves, and
    /// change nothing.
    pub fn is_read_only(&self) -> bool {
        self.db.read_only()
    }

    /// The built-in in-memory registry of live context windows.
    pub fn contexts(&self) -> &ContextRegistry {
        &self.contexts
    }

    /// The pool and its write gate, for the operations that write.
    pub(crate) fn store(&self) -> &db::Store {
        &self.db
    }

    pub(crate) fn context_source(&self) -> &dyn ContextSource {
        self.source.as_ref()
    }

    /// This manager's instance id: the owner recorded on the sessions it starts.
    pub fn instance_id(&self) -> Uuid {
        self.instance_id
    }

    pub(crate) fn heartbeat(&self) -> &Periodic {
        &self.heartbeat
    }

    pub(crate) fn pruner(&self) -> &Periodic {
        &self.pruner
    }

    pub(crate) fn start_heartbeat(&self) {
        let (db, owner) = (self.db.clone(), self.instance_id);
        self.heartbeat.ensure_started(
            self.config.heartbeat_interval,
            false,
            "session heartbeat",
            move |_| {
                let db = db.clone();
                async move { lifecycle::beat(&db, owner).await.map(drop) }
            },
        );
    }

    /// Starts the background prune of `Config::retention`, if any (and if
    /// there is a runtime to run it on).
    fn start_pruner(&self) {
        let Some(policy) = self.config.retention.clone() else {
            return;
        };
        if self.is_read_only() {
            // `Config::validate` refuses the pair; a URL's `?mode=ro` gets here.
            tracing::warn!("the store is open read-only: Config::retention is not applied");
            return;
        }
        let (db, wakers, instance) = (self.db.clone(), self.lock_wakers.clone(), self.instance_id);
        let lock_delay = self.config.lock_delay;
        self.pruner.ensure_started(
            self.config.prune_interval,
            true,
            "background prune",
            move |stop| {
                let (db, wakers, policy) = (db.clone(), wakers.clone(), policy.clone());
                async move {
                    let (report, outcome) =
                        retention::prune(&db, &policy, lock_delay, Some(stop), None).await;
                    pruned(&db, &wakers, instance, &report).await;
                    match outcome {
                        Ok(()) => Ok(()),
                        // Another prune works (or took over a lapsed lease).
                        Err(Error::PruneInProgress { pruner, .. }) if report.batches == 0 => {
                            tracing::debug!(%pruner, "another prune is under way; skipped");
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                }
            },
        );
    }

    /// This manager's lock waiters, for waking them.
    pub(crate) fn lock_wakers(&self) -> &Arc<Wakers> {
        &self.lock_wakers
    }

    /// Wakes the waiters of what a committed write freed, and the change
    /// feeds if it `appended` an audit row, here and on other instances.
    async fn announce(&self, freed: Freed, appended: bool) {
        wake::announce(
            &self.db,
            &self.lock_wakers,
            self.instance_id,
            freed,
            appended,
        )
        .await;
    }

    pub(crate) fn metrics_recorder(&self) -> &Metrics {
        &self.metrics
    }

    /// Counts of ends, locks released, sweeps and timeouts, and cleanup
    /// duration percentiles, since this manager was created. The same events
    /// also go to the `metrics` facade (see [`MetricsSnapshot`] for the
    /// names), for an app that installs an exporter.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }

    /// Counts the store's open sessions and held locks (every manager's)
    /// and sets the `demiarch_sessions_active_sessions` and
    /// `demiarch_sessions_held_locks` gauges of the `metrics` facade, and
    /// `demiarch_sessions_end_budget_seconds`. An exporter calls it before a
    /// scrape; it is two counting reads.
    ///
    /// # Errors
    /// [`Error::Database`](crate::Error::Database).
    pub async fn record_store_gauges(&self) -> Result<(u64, u64)> {
        self.usable()?;
        self.detached(|m| async move {
            let (sessions, locks) = query::store_counts(&m.db).await?;
            crate::metrics::record_store_gauges(sessions, locks, m.config.cleanup_timeout);
            Ok((sessions, locks))
        })
        .await
    }

    /// Refuses every call once the manager was closed.
    pub(crate) fn usable(&self) -> Result<()> {
        match self.state.load(Ordering::SeqCst) {
            CLOSED => Err(Error::ManagerClosed),
            _ => Ok(()),
        }
    }

    /// The one check at the start of every write call: refuses
    /// `operation` on a read-only store, then as [`usable`](Self::usable).
    fn writes(&self, operation: &'static str) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::ReadOnly { operation });
        }
        self.usable()
    }

    /// Refuses new sessions, agents and locks (`operation`) on a read-only
    /// store, and once the manager was shut down (its heartbeat has
    /// stopped, so other instances would recover them) or closed.
    fn takes_new_work(&self, operation: &'static str) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::ReadOnly { operation });
        }
        match self.state.load(Ordering::SeqCst) {
            OPEN => Ok(()),
            SHUT_DOWN => Err(Error::ManagerShutDown),
            _ => Err(Error::ManagerClosed),
        }
    }

    /// Starts an `active` session and records `session_start` in the audit log.
    ///
    /// # Errors
    /// [`Error::Database`](crate::Error::Database) when the write fails.
    #[instrument(skip(self), err)]
    pub async fn start_session(&self) -> Result<Uuid> {
        self.takes_new_work("start_session")?;
        self.detached(|m| async move {
            let id = session::start::start_session(&m.db, m.instance_id).await?;
            m.start_heartbeat();
            m.announce(Freed::Nothing, true).await;
            Ok(id)
        })
        .await
    }

    /// Registers a `running` agent execution in an active session.
    ///
    /// # Errors
    /// [`Error::SessionNotFound`](crate::Error::SessionNotFound),
    /// [`Error::SessionNotActive`](crate::Error::SessionNotActive),
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for a nil id or a bad
    /// `agent_type`.
    #[instrument(skip(self), err)]
    pub async fn register_agent(&self, session_id: Uuid, agent_type: &str) -> Result<Uuid> {
        self.takes_new_work("register_agent")?;
        let agent_type = agent_type.to_owned();
        self.detached(|m| async move {
            session::start::register_agent(&m.db, session_id, &agent_type).await
        })
        .await
    }

    /// Takes the lock on (`resource_type`, `resource_key`) for a running agent
    /// of an active session, at once. The database's unique index over held
    /// locks decides: two callers can never both hold it. While other agents
    /// wait for the resource it is refused even if free: they come first.
    ///
    /// # Errors
    /// [`Error::LockHeld`](crate::Error::LockHeld) when someone holds it or
    /// waits for it;
    /// [`Error::AgentNotFound`](crate::Error::AgentNotFound),
    /// [`Error::AgentNotRunning`](crate::Error::AgentNotRunning),
    /// [`Error::SessionNotActive`](crate::Error::SessionNotActive),
    /// [`Error::InvalidInput`](crate::Error::InvalidInput);
    /// [`Error::Timeout`](crate::Error::Timeout) when the database stayed
    /// busy; [`Error::Database`](crate::Error::Database).
    #[instrument(skip(self), err)]
    pub async fn acquire_lock(
        &self,
        agent_id: Uuid,
        resource_type: &str,
        resource_key: &str,
    ) -> Result<LockGrant> {
        self.takes_new_work("acquire_lock")?;
        self.acquire_lock_with(
            agent_id,
            resource_type,
            resource_key,
            LockOptions::default(),
        )
        .await
    }

    /// [`acquire_lock`](Self::acquire_lock) with options: a time to live, and
    /// waiting in the resource's queue.
    ///
    /// With `wait: Some(d)`, a held resource puts the agent in the queue,
    /// which lives in the database and is shared by every manager on it.
    /// Waiters are handed the resource in arrival order as each holder lets
    /// go: released, its session ended or recovered, or its time to live run
    /// out (no `sweep_locks` needed). Each hand-over is a new grant with a
    /// higher fencing token. A wake-up reaches this manager's waiters at once,
    /// other instances' on PostgreSQL through `NOTIFY`, and every waiter also
    /// looks at the queue every `Config::lock_poll_interval`. Waiting also
    /// waits out a lock delay.
    ///
    /// A wait that would close a cycle of agents, each waiting for a lock
    /// another holds, is refused at once with [`Error::Deadlock`], changing
    /// no lock or queue row; a `lock_deadlock` audit row naming the cycle
    /// (its agents, the resources they wait for and the locks on them) is
    /// then written in a transaction of its own (should that fail, the
    /// refusal stands and a warning is logged). An agent waits for one
    /// resource at a time.
    ///
    /// Dropping the future (a timeout or `select!` around it) leaves the
    /// queue within one write transaction, done by a spawned task, and never
    /// leaves a grant that nobody received. [`lock_waiters`](Self::lock_waiters)
    /// shows the queue.
    ///
    /// # Errors
    /// As `acquire_lock`, plus [`Error::LockDelay`](crate::Error::LockDelay)
    /// while the resource is in its lock delay (without `wait`);
    /// [`Error::LockWaitTimeout`](crate::Error::LockWaitTimeout) when `wait`
    /// ran out (the agent is no longer queued and never gets the lock from
    /// this call); [`Error::Deadlock`](crate::Error::Deadlock);
    /// [`Error::AlreadyWaiting`](crate::Error::AlreadyWaiting);
    /// `SessionNotActive` or `AgentNotRunning` when the waiter's session ends
    /// while it waits; a database error other than a busy one (which is
    /// retried) ends the wait; [`Error::InvalidInput`](crate::Error::InvalidInput) for
    /// a zero `ttl`, or a `ttl` or `wait` over ten years.
    #[instrument(skip(self), err)]
    pub async fn acquire_lock_with(
        &self,
        agent_id: Uuid,
        resource_type: &str,
        resource_key: &str,
        options: LockOptions,
    ) -> Result<LockGrant> {
        self.takes_new_work("acquire_lock_with")?;
        let started = std::time::Instant::now();
        let result = locks::acquire(self, agent_id, resource_type, resource_key, &options).await;
        if options.wait.is_some() {
            self.metrics.record_lock_wait(&result, started.elapsed());
        }
        result
    }

    /// The agents waiting for a resource, head first, from every manager on
    /// the store.
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for a bad name;
    /// [`Error::Database`](crate::Error::Database).
    pub async fn lock_waiters(
        &self,
        resource_type: &str,
        resource_key: &str,
    ) -> Result<Vec<LockWaiter>> {
        self.usable()?;
        let resource = (resource_type.to_owned(), resource_key.to_owned());
        self.detached(|m| async move { locks::waiters(&m.db, &resource.0, &resource.1).await })
            .await
    }

    /// Extends a held lock's time to live to `ttl` from now.
    ///
    /// # Errors
    /// [`Error::LockNotFound`](crate::Error::LockNotFound);
    /// [`Error::LockNotHeld`](crate::Error::LockNotHeld) when it was released
    /// or has expired (renewing cannot revive it).
    #[instrument(skip(self), err)]
    pub async fn renew_lock(&self, lock_id: Uuid, ttl: std::time::Duration) -> Result<()> {
        self.writes("renew_lock")?;
        self.detached(|m| async move { locks::renew(&m.db, lock_id, ttl).await })
            .await
    }

    /// Releases expired locks (reason `expired`) and the held locks of
    /// completed or interrupted sessions (reason `orphaned`), in transactions of
    /// at most `Config::sweep_batch` locks, each writing one `locks_swept`
    /// audit row that names every lock it released.
    ///
    /// # Errors
    /// [`Error::Database`](crate::Error::Database); batches already committed stay.
    #[instrument(skip(self), err)]
    pub async fn sweep_locks(&self) -> Result<SweepReport> {
        self.writes("sweep_locks")?;
        self.detached(|m| async move {
            let report = match locks::sweep(&m.db, m.config.sweep_batch).await {
                Ok(report) => report,
                Err(e) => {
                    // Batches committed before the failure freed locks too.
                    m.announce(Freed::All, true).await;
                    return Err(e);
                }
            };
            m.metrics.record_sweep(&report);
            if report.expired + report.orphaned > 0 {
                m.announce(Freed::All, true).await;
            }
            Ok(report)
        })
        .await
    }

    /// Whether `fencing_token` belongs to the current, unexpired holder of the
    /// resource. A protected resource calls this before honouring a write, so
    /// a holder that was swept away or replaced is refused.
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for a bad name.
    #[instrument(skip(self), err)]
    pub async fn validate_fence(
        &self,
        resource_type: &str,
        resource_key: &str,
        fencing_token: i64,
    ) -> Result<bool> {
        self.usable()?;
        let resource = (resource_type.to_owned(), resource_key.to_owned());
        self.detached(|m| async move {
            locks::validate_fence(&m.db, &resource.0, &resource.1, fencing_token).await
        })
        .await
    }

    /// Ends an agent's life when its work is done, without waiting for its
    /// session to end: in one transaction its status becomes `completed` or
    /// `failed` (with `completed_at`), its held locks are released (reason
    /// `agent_finished`) and handed to their waiters, its own wait (if any)
    /// is dropped, and one `agent_finished` audit row records the outcome.
    /// Finishing it again writes nothing (`already_finished`); a finished
    /// agent cannot acquire.
    ///
    /// # Errors
    /// [`Error::AgentNotFound`](crate::Error::AgentNotFound),
    /// [`Error::AgentNotRunning`](crate::Error::AgentNotRunning) for an agent
    /// its session's end or a recovery cancelled,
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) naming `agent_id`
    /// or `reason`.
    #[instrument(skip(self), err)]
    pub async fn finish_agent(
        &self,
        agent_id: Uuid,
        outcome: crate::AgentOutcome,
    ) -> Result<crate::FinishReport> {
        self.writes("finish_agent")?;
        self.detached(|m| async move {
            let (report, freed) = crate::agents::finish(&m.db, agent_id, outcome).await?;
            if !report.already_finished {
                m.announce(freed, true).await;
            }
            Ok(report)
        })
        .await
    }

    /// Resolves once the lock is no longer safely held, with how and when:
    /// released by its holder, its session's end (here or on another
    /// instance), a recovery, a sweep or an acquire that took over the
    /// expired lock, an operator, or its agent's finish; or its time to live
    /// passing without a renewal, even before anything sweeps it (a renewal
    /// moves that moment). A holder runs its work under `tokio::select!`
    /// with it and stops when it resolves (see `examples/guarded_work.rs`).
    ///
    /// Delivery: at once for this manager's writes and, on PostgreSQL, other
    /// instances' (`NOTIFY`); otherwise within `Config::lock_poll_interval`.
    /// Dropping the future leaves nothing behind.
    ///
    /// # Errors
    /// [`Error::LockNotFound`](crate::Error::LockNotFound) at once for an
    /// unknown id, [`Error::InvalidInput`](crate::Error::InvalidInput) for
    /// the nil id, [`Error::ManagerClosed`](crate::Error::ManagerClosed),
    /// [`Error::Database`](crate::Error::Database) when a read fails.
    pub fn lock_lost(
        &self,
        lock_id: Uuid,
    ) -> impl std::future::Future<Output = Result<crate::LockLoss>> + Send + 'static {
        locks::lost::lock_lost(self.clone(), lock_id)
    }

    /// Releases a held lock (reason `released`), and wakes the resource's
    /// head waiter. Releasing a lock that is already released is a no-op.
    ///
    /// # Errors
    /// [`Error::LockNotFound`](crate::Error::LockNotFound),
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for the nil id.
    #[instrument(skip(self), err)]
    pub async fn release_lock(&self, lock_id: Uuid) -> Result<()> {
        self.writes("release_lock")?;
        self.detached(|m| async move {
            if let Some(resource) = locks::release(&m.db, lock_id, None).await? {
                // The caller has its answer once the release committed; the
                // wake-ups go out after it, in a task of this manager's
                // (`close` waits for them).
                let tasks = m.tasks().clone();
                tasks.spawn(async move { m.announce(Freed::One(resource), false).await });
            }
            Ok(())
        })
        .await
    }

    /// [`release_lock`](Self::release_lock) on the holder's behalf, by an
    /// operator who must give a reason: the release also writes a
    /// `lock_released` audit row naming the lock, its holder and
    /// `operator`. Releasing a lock already released writes nothing.
    ///
    /// # Errors
    /// As `release_lock`, and [`Error::InvalidInput`](crate::Error::InvalidInput)
    /// naming `reason` (missing or empty) or `via`.
    #[instrument(skip(self), err)]
    pub async fn release_lock_by(&self, lock_id: Uuid, operator: &Operator) -> Result<()> {
        self.writes("release_lock_by")?;
        if operator.reason.is_none() {
            return Err(Error::InvalidInput {
                field: "reason",
                reason: "is required to release another agent's lock".into(),
            });
        }
        let details = operator.details("release_lock")?;
        self.detached(|m| async move {
            if let Some(resource) = locks::release(&m.db, lock_id, Some(details)).await? {
                m.announce(Freed::One(resource), true).await;
            }
            Ok(())
        })
        .await
    }

    /// Ends a session with cleanup (story 6.5): saves its context windows,
    /// marks it completed, releases every lock its agents hold, cancels its
    /// running agents and writes one `session_end` audit row — in one
    /// transaction, within `Config::cleanup_timeout`. Ending an ended session
    /// returns the first end's time with `already_ended: true` and writes nothing.
    ///
    /// # Errors
    /// [`Error::SessionNotFound`](crate::Error::SessionNotFound),
    /// [`Error::ContextTooLarge`](crate::Error::ContextTooLarge),
    /// [`Error::ContextTooLargeForServer`](crate::Error::ContextTooLargeForServer),
    /// [`Error::ContextRefused`](crate::Error::ContextRefused),
    /// [`Error::Timeout`](crate::Error::Timeout),
    /// [`Error::Database`](crate::Error::Database); on every error nothing changed.
    pub async fn end_session(&self, session_id: Uuid) -> Result<EndSessionReport> {
        self.end_session_within(session_id, self.config.cleanup_timeout)
            .await
    }

    /// [`end_session`](Self::end_session) with everything before its commit
    /// bounded by `budget` instead of `Config::cleanup_timeout`.
    pub(crate) async fn end_session_within(
        &self,
        session_id: Uuid,
        budget: std::time::Duration,
    ) -> Result<EndSessionReport> {
        self.end_with("end_session", session_id, budget, None).await
    }

    /// [`end_session`](Self::end_session) asked for by an operator on the
    /// session's behalf: its `session_end` audit row also names `operator`
    /// (`{"action": "end_session", "via": …, "reason": …}`).
    ///
    /// # Errors
    /// As `end_session`, and [`Error::InvalidInput`](crate::Error::InvalidInput)
    /// naming `via` or `reason`.
    pub async fn end_session_by(
        &self,
        session_id: Uuid,
        operator: &Operator,
    ) -> Result<EndSessionReport> {
        self.writes("end_session_by")?;
        let details = operator.details("end_session")?;
        self.end_with(
            "end_session_by",
            session_id,
            self.config.cleanup_timeout,
            Some(details),
        )
        .await
    }

    /// Pauses an active session: it keeps its locks (its workspace) and
    /// its owner goes on heartbeating for it, so `recover_stale` leaves it
    /// alone, but it takes no new agents, locks or waits
    /// ([`Error::SessionNotActive`](crate::Error::SessionNotActive) with
    /// status `paused`) and its agents' waits are removed (a waiting
    /// acquire returns that error). One `session_paused` audit row. Ending
    /// a paused session works as ending an active one. Pausing a paused
    /// session changes nothing, writes nothing and returns `Ok(())`.
    ///
    /// # Errors
    /// [`Error::SessionNotFound`](crate::Error::SessionNotFound),
    /// [`Error::SessionNotActive`](crate::Error::SessionNotActive) for an
    /// ended session, [`Error::InvalidInput`](crate::Error::InvalidInput)
    /// for the nil id.
    #[instrument(skip(self), err)]
    pub async fn pause_session(&self, session_id: Uuid) -> Result<()> {
        self.pause_with("pause_session", session_id, true, None)
            .await
    }

    /// Makes a paused session active again (one `session_unpaused` audit
    /// row). Unpausing an active session changes nothing, writes nothing and
    /// returns `Ok(())`.
    ///
    /// # Errors
    /// As [`pause_session`](Self::pause_session).
    #[instrument(skip(self), err)]
    pub async fn unpause_session(&self, session_id: Uuid) -> Result<()> {
        self.pause_with("unpause_session", session_id, false, None)
            .await
    }

    /// [`pause_session`](Self::pause_session) asked for by an operator: the
    /// audit row also names `operator`.
    ///
    /// # Errors
    /// As `pause_session`, and [`Error::InvalidInput`](crate::Error::InvalidInput)
    /// naming `via` or `reason`.
    pub async fn pause_session_by(&self, session_id: Uuid, operator: &Operator) -> Result<()> {
        self.writes("pause_session_by")?;
        let details = operator.details("pause_session")?;
        self.pause_with("pause_session_by", session_id, true, Some(details))
            .await
    }

    /// [`unpause_session`](Self::unpause_session) asked for by an operator.
    ///
    /// # Errors
    /// As `pause_session_by`.
    pub async fn unpause_session_by(&self, session_id: Uuid, operator: &Operator) -> Result<()> {
        self.writes("unpause_session_by")?;
        let details = operator.details("unpause_session")?;
        self.pause_with("unpause_session_by", session_id, false, Some(details))
            .await
    }

    async fn pause_with(
        &self,
        operation: &'static str,
        session_id: Uuid,
        pause: bool,
        operator: Option<serde_json::Value>,
    ) -> Result<()> {
        self.writes(operation)?;
        self.detached(|m| async move {
            if session::pause::set_paused(&m.db, session_id, pause, operator).await? {
                // Waits removed: their acquires learn at once.
                m.announce(Freed::All, true).await;
            }
            Ok(())
        })
        .await
    }

    async fn end_with(
        &self,
        operation: &'static str,
        session_id: Uuid,
        budget: std::time::Duration,
        operator: Option<serde_json::Value>,
    ) -> Result<EndSessionReport> {
        self.writes(operation)?;
        self.detached(|m| async move {
            let result = session::end::end_session(&m, session_id, budget, operator).await;
            match &result {
                Ok(report) if report.already_ended => {}
                Ok(_) => m.announce(Freed::All, true).await,
                Err(crate::Error::Timeout { .. }) => m.metrics.record_end_timeout(),
                Err(_) => m.metrics.record_end_failure(),
            }
            result
        })
        .await
    }

    /// The saved context of an ended session (none once a prune cleared
    /// it), or the live windows of an open one.
    ///
    /// # Errors
    /// [`Error::SessionNotFound`](crate::Error::SessionNotFound),
    /// [`Error::CorruptContext`](crate::Error::CorruptContext) when the stored
    /// JSON is not what this library wrote.
    #[instrument(skip(self), err)]
    pub async fn session_context(&self, session_id: Uuid) -> Result<Vec<ContextWindow>> {
        self.usable()?;
        self.detached(|m| async move { session::recovery::session_context(&m, session_id).await })
            .await
    }

    /// Interrupts open sessions whose owner has not heartbeated for
    /// `stale_after` (a crashed process): each, in its own transaction, becomes
    /// `interrupted`, its held locks are released (reason `orphaned`), its
    /// running agents cancelled, and a `session_interrupted` audit row written.
    /// Sessions this manager owns, or whose owner is alive, are never touched.
    ///
    /// # Errors
    /// [`Error::Database`](crate::Error::Database); sessions already recovered stay so.
    #[instrument(skip(self), err)]
    pub async fn recover_stale(&self, stale_after: std::time::Duration) -> Result<RecoveryReport> {
        self.recover_with("recover_stale", stale_after, None).await
    }

    /// [`recover_stale`](Self::recover_stale) asked for by an operator: each
    /// `session_interrupted` audit row also names `operator`.
    ///
    /// # Errors
    /// As `recover_stale`, and [`Error::InvalidInput`](crate::Error::InvalidInput)
    /// naming `via` or `reason`.
    pub async fn recover_stale_by(
        &self,
        stale_after: std::time::Duration,
        operator: &Operator,
    ) -> Result<RecoveryReport> {
        self.writes("recover_stale_by")?;
        let details = operator.details("recover_stale")?;
        self.recover_with("recover_stale_by", stale_after, Some(details))
            .await
    }

    async fn recover_with(
        &self,
        operation: &'static str,
        stale_after: std::time::Duration,
        operator: Option<serde_json::Value>,
    ) -> Result<RecoveryReport> {
        self.writes(operation)?;
        self.detached(|m| async move {
            let report = match session::recovery::recover_stale(&m, stale_after, operator).await {
                Ok(report) => report,
                Err(e) => {
                    // Sessions recovered before the failure freed locks too.
                    m.announce(Freed::All, true).await;
                    return Err(e);
                }
            };
            m.metrics.record_recovery(report.interrupted.len());
            if !report.interrupted.is_empty() {
                m.announce(Freed::All, true).await;
            }
            Ok(report)
        })
        .await
    }

    /// Starts a new active session from an interrupted or completed one: the
    /// registry is refilled from its saved context, and a `session_resumed`
    /// audit row names both ids.
    ///
    /// # Errors
    /// [`Error::SessionNotFound`](crate::Error::SessionNotFound),
    /// [`Error::SessionStillOpen`](crate::Error::SessionStillOpen),
    /// [`Error::CorruptContext`](crate::Error::CorruptContext).
    #[instrument(skip(self), err)]
    pub async fn resume_session(&self, from: Uuid) -> Result<Uuid> {
        self.takes_new_work("resume_session")?;
        self.detached(|m| async move {
            let id = session::recovery::resume_session(&m, from).await?;
            m.announce(Freed::Nothing, true).await;
            Ok(id)
        })
        .await
    }

    /// Sessions, newest first, without their saved context. A row holding a
    /// value this library cannot read is named in
    /// [`Listing::corrupt`](crate::Listing::corrupt), not returned.
    ///
    /// # Errors
    /// [`Error::Database`](crate::Error::Database).
    pub async fn list_sessions(&self, filter: SessionFilter) -> Result<Listing<SessionInfo>> {
        self.usable()?;
        self.detached(|m| async move { query::list_sessions(&m.db, &filter).await })
            .await
    }

    /// One session, without its saved context.
    ///
    /// # Errors
    /// [`Error::SessionNotFound`](crate::Error::SessionNotFound);
    /// [`Error::CorruptRow`](crate::Error::CorruptRow) when its row holds a
    /// value this library cannot read (an unknown status).
    pub async fn session(&self, session_id: Uuid) -> Result<SessionInfo> {
        self.usable()?;
        self.detached(|m| async move { query::session(&m.db, session_id).await })
            .await
    }

    /// The session whose id is `prefix` or starts with it (8 or more hex digits).
    ///
    /// # Errors
    /// [`Error::AmbiguousId`](crate::Error::AmbiguousId) when none or several
    /// match; [`Error::InvalidInput`](crate::Error::InvalidInput) for a short
    /// or non-hex prefix.
    pub async fn find_session(&self, prefix: &str) -> Result<Uuid> {
        self.usable()?;
        let prefix = prefix.to_owned();
        self.detached(|m| async move { query::session_by_prefix(&m.db, &prefix).await })
            .await
    }

    /// The lock whose id is `prefix` or starts with it (8 or more hex
    /// digits), as `locks list` shows them.
    ///
    /// # Errors
    /// [`Error::LockPrefixNotFound`](crate::Error::LockPrefixNotFound),
    /// [`Error::LockNotFound`](crate::Error::LockNotFound) for a full id,
    /// [`Error::AmbiguousId`](crate::Error::AmbiguousId) when several match,
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for a short or
    /// non-hex prefix.
    pub async fn find_lock(&self, prefix: &str) -> Result<Uuid> {
        self.usable()?;
        let prefix = prefix.to_owned();
        self.detached(|m| async move { query::lock_by_prefix(&m.db, &prefix).await })
            .await
    }

    /// The agents of a session, oldest first. A row holding a value this
    /// library cannot read is named in
    /// [`Listing::corrupt`](crate::Listing::corrupt), not returned.
    ///
    /// # Errors
    /// [`Error::Database`](crate::Error::Database).
    pub async fn agents(&self, session_id: Uuid) -> Result<Listing<AgentInfo>> {
        self.usable()?;
        self.detached(|m| async move { query::agents(&m.db, session_id).await })
            .await
    }

    /// Locks, newest grant first. A row holding a value this library cannot
    /// read is named in [`Listing::corrupt`](crate::Listing::corrupt), not
    /// returned.
    ///
    /// # Errors
    /// [`Error::Database`](crate::Error::Database).
    pub async fn locks(&self, filter: LockFilter) -> Result<Listing<LockInfo>> {
        self.usable()?;
        self.detached(|m| async move { query::locks(&m.db, &filter).await })
            .await
    }

    /// Watches the audit log: every matching event committed after
    /// `options.after` (`None`: after the newest one committed when the
    /// stream is first polled), in `seq` order, then live ones as they
    /// commit, from every manager, process and host on the store.
    ///
    /// Each event arrives exactly once, in `seq` order, and `seq` order is
    /// commit order on every backend: a consumer that stores the `seq` of
    /// the last event it handled and later watches with `after: Some(seq)`
    /// receives every matching event committed since, none twice, none
    /// skipped. Delivery is at once for this manager's own writes, by
    /// `NOTIFY` for other instances' on PostgreSQL, and within
    /// `Config::watch_poll_interval` otherwise (another process on a SQLite
    /// file, another instance on MariaDB).
    ///
    /// The stream reads pages of `Config::watch_page_size` rows and holds no
    /// connection while it waits, so a slow consumer costs one page of
    /// memory and an idle one nothing from the pool. A read that fails (the
    /// database is down, a connection was lost) comes through as an `Err`
    /// item; the stream then reads again from its last `seq` every poll
    /// interval until the database answers. It ends only when dropped,
    /// with two exceptions that no retry could cure: options that are
    /// refused (one [`Error::InvalidInput`](crate::Error::InvalidInput)
    /// naming `after`, `session_id` or `event_types`, then the end), and
    /// this manager being closed (one
    /// [`Error::ManagerClosed`](crate::Error::ManagerClosed), then the end).
    /// A row holding a value this library cannot read (an unknown
    /// `event_type`, a `session_id` that is not a UUID) comes through as one
    /// [`Error::CorruptRow`](crate::Error::CorruptRow) naming its `seq`, and
    /// the stream goes on after it.
    ///
    /// ```
    /// # #[tokio::main]
    /// # async fn main() -> demiarch_sessions::Result<()> {
    /// use futures::StreamExt;
    /// use demiarch_sessions::{SessionManager, WatchOptions};
    ///
    /// let manager = SessionManager::connect("sqlite::memory:").await?;
    /// let mut ends = Box::pin(manager.watch(WatchOptions {
    ///     after: Some(0),
    ///     event_types: vec!["session_end".into()],
    ///     ..WatchOptions::default()
    /// }));
    /// let session = manager.start_session().await?;
    /// manager.end_session(session).await?;
    /// let event = ends.next().await.expect("the stream goes on")?;
    /// assert_eq!(event.session_id, Some(session));
    /// // Store event.seq; resume later with `after: Some(event.seq)`.
    /// # Ok(())
    /// # }
    /// ```
    pub fn watch(
        &self,
        options: WatchOptions,
    ) -> impl futures::Stream<Item = Result<AuditRecord>> + Send + 'static {
        crate::watch::watch(self, options)
    }

    /// Audit rows, newest (highest `seq`) first, by session, event type and
    /// time range. A row holding a value this library cannot read is named
    /// in [`Listing::corrupt`](crate::Listing::corrupt), not returned.
    ///
    /// # Errors
    /// [`Error::Database`](crate::Error::Database).
    pub async fn audit_events(&self, filter: AuditFilter) -> Result<Listing<AuditRecord>> {
        self.usable()?;
        self.detached(|m| async move { query::audit_events(&m.db, &filter).await })
            .await
    }

    /// Applies a retention policy now: deletes ended sessions, clears old
    /// saved contexts and compacts the audit log, a batch per transaction,
    /// as the policy says (see [`RetentionPolicy`]). Open sessions and
    /// everything of theirs are never touched. One prune at a time works on
    /// a store, whichever instance runs it.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> demiarch_sessions::Result<()> {
    /// use std::time::Duration;
    /// use demiarch_sessions::{RetentionPolicy, SessionManager};
    ///
    /// let manager = SessionManager::connect("sqlite::memory:").await?;
    /// let session = manager.start_session().await?;
    /// manager.end_session(session).await?;
    /// let report = manager
    ///     .prune(&RetentionPolicy {
    ///         completed_after: Some(Duration::ZERO),
    ///         ..RetentionPolicy::default()
    ///     })
    ///     .await?;
    /// assert_eq!(report.sessions_deleted, 1);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) naming a policy
    /// field; [`Error::PruneInProgress`](crate::Error::PruneInProgress) while
    /// another prune works (nothing deleted);
    /// [`Error::Archive`](crate::Error::Archive) when the archive cannot be
    /// written (that batch deleted nothing); [`Error::Database`](crate::Error::Database).
    /// Batches committed before a failure stay (the metrics count them, and
    /// their audit rows are announced); a later prune goes on from there.
    ///
    /// Sessions with a lock released involuntarily within
    /// `Config::lock_delay` are kept until that delay is over: the release
    /// row is what holds the resource off.
    pub async fn prune(&self, policy: &RetentionPolicy) -> Result<PruneReport> {
        self.writes("prune")?;
        self.prune_with_progress(policy, |_| {}).await
    }

    /// [`prune`](Self::prune), calling `progress` after each batch with the
    /// counts so far (for a progress bar).
    ///
    /// # Errors
    /// As `prune`.
    pub async fn prune_with_progress<F>(
        &self,
        policy: &RetentionPolicy,
        progress: F,
    ) -> Result<PruneReport>
    where
        F: Fn(&PruneReport) + Send + Sync + 'static,
    {
        self.writes("prune_with_progress")?;
        policy.validate()?;
        let policy = policy.clone();
        self.detached(|m| async move {
            let lock_delay = m.config.lock_delay;
            let progress = Some(Box::new(progress) as retention::Progress);
            let (report, outcome) =
                retention::prune(&m.db, &policy, lock_delay, None, progress).await;
            // What committed before a failure is counted and announced too.
            pruned(&m.db, &m.lock_wakers, m.instance_id, &report).await;
            outcome.map(|()| report)
        })
        .await
    }

    /// Counts what [`prune`](Self::prune) with `policy` would delete and
    /// clear now, and the horizon it would leave, deleting nothing (the
    /// report's `dry_run` is true).
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) naming a policy
    /// field; [`Error::Database`](crate::Error::Database).
    pub async fn prune_dry_run(&self, policy: &RetentionPolicy) -> Result<PruneReport> {
        self.usable()?;
        policy.validate()?;
        let policy = policy.clone();
        self.detached(|m| async move { retention::preview(&*m.db, &policy).await })
            .await
    }

    /// Ends, concurrently, every open session this instance owns, after
    /// stopping its heartbeat, and then takes no new sessions, agents or
    /// locks. Each end has `deadline` (at most `Config::cleanup_timeout`) up
    /// to its commit, and its commit is never cut short, so shutdown can take
    /// a little longer than `deadline`. What it cannot end stays open, never
    /// half-ended, for another instance's `recover_stale`; an end whose commit
    /// has not returned `cleanup_timeout` later is reported among the
    /// failures, its outcome unknown. Calling it again is harmless.
    ///
    /// # Errors
    /// [`Error::Database`](crate::Error::Database) when the open sessions
    /// cannot be listed.
    #[instrument(skip(self), err)]
    pub async fn shutdown(&self, deadline: std::time::Duration) -> Result<ShutdownReport> {
        self.usable()?;
        let _ = self
            .state
            .compare_exchange(OPEN, SHUT_DOWN, Ordering::SeqCst, Ordering::SeqCst);
        self.detached(|m| async move { lifecycle::shutdown(&m, deadline).await })
            .await
    }

    /// Waits for Ctrl-C or SIGTERM, then [`shutdown`](Self::shutdown)s within
    /// `deadline`. Wire it into the app's main:
    ///
    /// ```no_run
    /// # #[tokio::main]
    /// # async fn main() -> demiarch_sessions::Result<()> {
    /// use std::time::Duration;
    /// let manager = demiarch_sessions::SessionManager::connect("sqlite://app.db").await?;
    /// // Sessions a crashed earlier run left open, unheard from for a minute.
    /// manager.recover_stale(Duration::from_secs(60)).await?;
    /// let app = manager.clone();
    /// tokio::spawn(async move { /* the app's work with `app` */ });
    /// let report = manager.shutdown_on_signal(Duration::from_secs(5)).await?;
    /// eprintln!("ended {} sessions", report.ended.len());
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::Signal`](crate::Error::Signal) when signals cannot be
    /// listened for; otherwise as `shutdown`.
    pub async fn shutdown_on_signal(
        &self,
        deadline: std::time::Duration,
    ) -> Result<ShutdownReport> {
        lifecycle::shutdown_signal().await?;
        self.shutdown(deadline).await
    }
}

/// After a prune: its metrics, and the change feeds woken for the audit
/// rows it appended.
async fn pruned(db: &db::Store, wakers: &Wakers, instance: Uuid, report: &PruneReport) {
    crate::metrics::record_prune(report);
    if report.batches > 0 {
        wake::announce(db, wakers, instance, Freed::Nothing, true).await;
    }
}
