//! Configuration and its defaults.
use std::time::Duration;

/// Tuning for a [`SessionManager`](crate::SessionManager).
///
/// Fields are public so that `Config { cleanup_timeout, ..Default::default() }`
/// works.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Upper bound on the whole of `end_session` (story 6.5 AC6: 2 s). Past it
    /// the call returns [`Error::Timeout`](crate::Error::Timeout) and rolls back.
    pub cleanup_timeout: Duration,
    /// Largest serialized context (`context_data`) one session may save.
    pub max_context_bytes: usize,
    /// How long a SQLite connection waits for another writer before giving up
    /// (`PRAGMA busy_timeout`).
    pub busy_timeout: Duration,
    /// Most locks one transaction of `sweep_locks` releases, so a sweep over a
    /// million stale locks never holds the write lock for long.
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
        }
    }
}
