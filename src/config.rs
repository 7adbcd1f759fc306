//! Configuration and its defaults.
use std::time::Duration;

/// Tuning for a [`SessionManager`](crate::SessionManager).
///
/// Fields are public so that `Config { cleanup_timeout, ..Default::default() }`
/// works.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The budget of `end_session` (story 6.5 AC6: 2 s): each lock wait on the
    /// server is bounded by it, and everything up to the commit by a timer a
    /// quarter later (at least 20 ms). Past it the call returns
    /// [`Error::Timeout`](crate::Error::Timeout) and rolls back. The commit
    /// itself is never cut short.
    pub cleanup_timeout: Duration,
    /// Largest serialized context (`context_data`) one session may save.
    pub max_context_bytes: usize,
    /// How long a SQLite connection waits for another writer before giving up
    /// (`PRAGMA busy_timeout`).
    pub busy_timeout: Duration,
    /// Most locks one transaction of `sweep_locks` releases, so a sweep over a
    /// million stale locks never holds the write lock for long. At most
    /// [`MAX_SWEEP_BATCH`]: each batch's `locks_swept` audit row names every
    /// lock it released, and must fit in one statement on every backend.
    pub sweep_batch: u64,
    /// After an involuntary release (expired or orphaned), how long the resource
    /// stays unavailable, so a holder that was swept away can notice before
    /// another takes over. A clean release or end frees it at once. Zero by
    /// default (Consul's default is 15 s).
    pub lock_delay: Duration,
    /// How often a manager refreshes `last_heartbeat_at` of the open sessions it
    /// owns, so that other instances' `recover_stale` can tell it is alive.
    /// Pick `recover_stale`'s `stale_after` several times longer.
    pub heartbeat_interval: Duration,
    /// How long connecting, or waiting for a pooled connection, may take
    /// before the call fails.
    pub connect_timeout: Duration,
    /// Pool size for file databases and servers. A SQLite file opened by
    /// `SessionManager::connect` gets one more connection, for the manager's
    /// writes. An in-memory SQLite database always uses one connection, since
    /// each connection would be its own database.
    pub max_connections: u32,
    /// How often a waiting acquire (`LockOptions::wait`) looks at its queue:
    /// the bound on noticing a hand-over or the end of its own session where
    /// no wake-up reaches it (another process on a SQLite file, another
    /// instance on MariaDB); taking the lock then is one more transaction.
    /// 100 ms by default.
    pub lock_poll_interval: Duration,
    /// How often a caught-up [`watch`](crate::SessionManager::watch) feed
    /// looks for new audit events when no wake-up reaches it (another
    /// process on a SQLite file, another instance on MariaDB); this
    /// manager's own writes, and other instances' on PostgreSQL, wake it at
    /// once. Each look is one read. 100 ms by default.
    pub watch_poll_interval: Duration,
    /// The most audit rows a feed reads at once, and so holds in memory
    /// while its consumer falls behind. 500 by default.
    pub watch_page_size: u64,
    /// What the manager prunes in the background, every `prune_interval`
    /// (see [`SessionManager::prune`](crate::SessionManager::prune)); `None`
    /// (the default) prunes nothing. Of all the instances of a store, one
    /// prunes at a time; the others skip their turn.
    pub retention: Option<crate::RetentionPolicy>,
    /// How often the background prune runs when `retention` is set: the
    /// first right after connecting, then every interval. One hour by
    /// default.
    pub prune_interval: Duration,
    /// Opens the store read-only: `connect_with` migrates nothing (it checks
    /// that the store is at the latest migration instead, and refuses it
    /// otherwise), a SQLite file is opened with `SQLITE_OPEN_READONLY` and
    /// never created, a server connection runs every transaction `READ
    /// ONLY`, and no background task that writes is started. Every write
    /// call is refused with [`Error::ReadOnly`](crate::Error::ReadOnly)
    /// naming it, before it touches the database. A SQLite URL with
    /// `?mode=ro` does the same. `false` by default.
    ///
    /// The SQLite file itself is never written. In a writable directory
    /// SQLite may leave an empty `-wal` and a `-shm` index beside a WAL
    /// store (it needs them to read safely alongside writers); where they
    /// cannot be created (a read-only file system) and no `-wal` exists,
    /// the file is read as immutable. An in-memory database cannot be
    /// opened read-only (it would be empty), nor can `retention` be set.
    pub read_only: bool,
}

/// The longest timeout or interval a [`Config`] takes: one day. (PostgreSQL
/// refuses a `lock_timeout` of 2^31 ms, about 24.8 days, or more.)
pub const MAX_CONFIG_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// The shortest budget or interval a [`Config`] takes, and the shortest
/// budget an end is attempted with.
pub(crate) const MIN_BUDGET: Duration = Duration::from_millis(1);

/// The largest [`Config::sweep_batch`]: ten thousand locks, whose
/// `locks_swept` audit row (about 3 MB) fits in one statement on every
/// backend, MariaDB's default 16 MiB packet included.
pub const MAX_SWEEP_BATCH: u64 = 10_000;

/// The most bytes of context one session may save: 256 MiB (PostgreSQL's
/// `jsonb` holds at most 255 MiB; MariaDB's default packet limit is smaller).
pub const MAX_CONTEXT_BYTES_LIMIT: usize = 256 * 1024 * 1024;

impl Config {
    /// Refuses a value the library cannot honour, naming the field: under
    /// 1 ms or over [`MAX_CONFIG_DURATION`] for `cleanup_timeout`,
    /// `connect_timeout`, `heartbeat_interval`, `lock_poll_interval`,
    /// `watch_poll_interval`, `prune_interval`, `busy_timeout` and
    /// `lock_delay` (the last two may be zero, which turns them off); `sweep_batch`,
    /// `max_connections` and `watch_page_size` of zero or over ten thousand
    /// ([`MAX_SWEEP_BATCH`] for the first);
    /// `max_context_bytes` under 64 (the empty context needs 26) or over
    /// [`MAX_CONTEXT_BYTES_LIMIT`]; a `retention` policy that
    /// [`RetentionPolicy::validate`](crate::RetentionPolicy::validate) refuses,
    /// or any `retention` together with `read_only` (a read-only manager
    /// prunes nothing).
    /// `SessionManager::connect_with` and `new` call it.
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) naming the field
    /// as `Config::<field>` (`Config::retention.<field>` for the policy's).
    pub fn validate(&self) -> crate::Result<()> {
        for (field, value, zero_ok) in [
            ("cleanup_timeout", self.cleanup_timeout, false),
            ("connect_timeout", self.connect_timeout, false),
            ("heartbeat_interval", self.heartbeat_interval, false),
            ("busy_timeout", self.busy_timeout, true),
            ("lock_delay", self.lock_delay, true),
            ("lock_poll_interval", self.lock_poll_interval, false),
            ("watch_poll_interval", self.watch_poll_interval, false),
            ("prune_interval", self.prune_interval, false),
        ] {
            if value.is_zero() && zero_ok {
                continue;
            }
            if value < MIN_BUDGET {
                let reason = if zero_ok {
                    format!("{value:?} is under 1 ms (zero turns it off)")
                } else {
                    format!("{value:?} is under 1 ms")
                };
                return Err(invalid(field, reason));
            }
            if value > MAX_CONFIG_DURATION {
                return Err(invalid(field, format!("{value:?} is longer than one day")));
            }
        }
        if !(1..=MAX_SWEEP_BATCH).contains(&self.sweep_batch) {
            return Err(invalid(
                "sweep_batch",
                format!(
                    "{} is not between 1 and {MAX_SWEEP_BATCH} (one batch's audit row \
                     names every lock it releases)",
                    self.sweep_batch
                ),
            ));
        }
        if !(1..=10_000).contains(&self.max_connections) {
            return Err(invalid(
                "max_connections",
                format!("{} is not between 1 and 10 000", self.max_connections),
            ));
        }
        if !(1..=10_000).contains(&self.watch_page_size) {
            return Err(invalid(
                "watch_page_size",
                format!("{} is not between 1 and 10 000", self.watch_page_size),
            ));
        }
        if !(64..=MAX_CONTEXT_BYTES_LIMIT).contains(&self.max_context_bytes) {
            return Err(invalid(
                "max_context_bytes",
                format!(
                    "{} is not between 64 bytes (the empty context) and 256 MiB",
                    self.max_context_bytes
                ),
            ));
        }
        if let Some(policy) = &self.retention {
            if self.read_only {
                return Err(invalid(
                    "retention",
                    "a read-only manager prunes nothing; set retention to None or \
                     read_only to false"
                        .to_owned(),
                ));
            }
            policy.validate().map_err(|e| match e {
                crate::Error::InvalidInput { field, reason } => crate::Error::InvalidInput {
                    field: retention_field(field),
                    reason,
                },
                other => other,
            })?;
        }
        Ok(())
    }
}

/// A `Config` field's name as errors give it: `Config::<field>`.
fn config_field(field: &'static str) -> &'static str {
    match field {
        "cleanup_timeout" => "Config::cleanup_timeout",
        "connect_timeout" => "Config::connect_timeout",
        "heartbeat_interval" => "Config::heartbeat_interval",
        "busy_timeout" => "Config::busy_timeout",
        "lock_delay" => "Config::lock_delay",
        "lock_poll_interval" => "Config::lock_poll_interval",
        "watch_poll_interval" => "Config::watch_poll_interval",
        "prune_interval" => "Config::prune_interval",
        "sweep_batch" => "Config::sweep_batch",
        "max_connections" => "Config::max_connections",
        "watch_page_size" => "Config::watch_page_size",
        "max_context_bytes" => "Config::max_context_bytes",
        "retention" => "Config::retention",
        "read_only" => "Config::read_only",
        _ => "Config",
    }
}

/// A field of `Config::retention`'s policy as errors give it.
fn retention_field(field: &'static str) -> &'static str {
    match field {
        "completed_after" => "Config::retention.completed_after",
        "context_after" => "Config::retention.context_after",
        "audit_after" => "Config::retention.audit_after",
        "keep_last" => "Config::retention.keep_last",
        "batch" => "Config::retention.batch",
        "archive" => "Config::retention.archive",
        _ => "Config::retention",
    }
}

fn invalid(field: &'static str, reason: String) -> crate::Error {
    crate::Error::InvalidInput {
        field: config_field(field),
        reason,
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            cleanup_timeout: Duration::from_secs(2),
            max_context_bytes: 16 * 1024 * 1024,
            busy_timeout: Duration::from_secs(5),
            sweep_batch: 1000,
            lock_delay: Duration::ZERO,
            heartbeat_interval: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            max_connections: 8,
            lock_poll_interval: Duration::from_millis(100),
            watch_poll_interval: Duration::from_millis(100),
            watch_page_size: 500,
            retention: None,
            prune_interval: Duration::from_secs(60 * 60),
            read_only: false,
        }
    }
}
