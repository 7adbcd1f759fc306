//! The one error type of the library, and [`CorruptRow`].
use sea_orm::DbErr;
use serde::Serialize;
use uuid::Uuid;

/// A stored value this library cannot read: a row of `table` whose `column`
/// holds `value`, which is not of the form the library writes there (edited
/// by hand, or written by another program).
///
/// Such a row never makes a list fail: the list readers
/// ([`SessionManager::list_sessions`](crate::SessionManager::list_sessions),
/// [`agents`](crate::SessionManager::agents),
/// [`locks`](crate::SessionManager::locks),
/// [`audit_events`](crate::SessionManager::audit_events)) return the rows
/// they can read in [`Listing::rows`](crate::Listing::rows) and name the
/// others in [`Listing::corrupt`](crate::Listing::corrupt). A read of one row
/// ([`SessionManager::session`](crate::SessionManager::session)) and the
/// audit feed ([`SessionManager::watch`](crate::SessionManager::watch), which
/// goes on past it) give [`Error::CorruptRow`] instead.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[cfg_attr(feature = "web", derive(utoipa::ToSchema))]
pub struct CorruptRow {
    /// The table, such as `audit_log`.
    pub table: &'static str,
    /// The row's primary key as stored: its `id`, or for `audit_log` its `seq`.
    pub id: String,
    /// The column that holds the value, such as `event_type`.
    pub column: &'static str,
    /// The value as stored; `NULL` for a missing one.
    pub value: String,
}

impl std::fmt::Display for CorruptRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} row {}: {} {:?} is not a value this library writes",
            self.table, self.id, self.column, self.value
        )
    }
}

/// Everything a call can fail with. Each variant names the id or field at
/// fault; match on it rather than on the message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No session has this id.
    #[error("session {0} not found")]
    SessionNotFound(Uuid),
    /// No agent execution has this id.
    #[error("agent {0} not found")]
    AgentNotFound(Uuid),
    /// No lock has this id.
    #[error("lock {0} not found")]
    LockNotFound(Uuid),
    /// The session exists but is not `active`, so it takes no new agents or locks.
    #[error("session {session_id} is {status}, not active; unpause it if paused, else start or resume a session")]
    SessionNotActive { session_id: Uuid, status: String },
    /// The agent exists but is no longer `running`, so it takes no new locks.
    #[error("agent {agent_id} is {status}, not running; register a new agent")]
    AgentNotRunning { agent_id: Uuid, status: String },
    /// Another holder has this resource. `holder_agent_id` and `fencing_token`
    /// describe the holder seen just after the refusal (`None` if it was
    /// released in between).
    #[error("{resource_type}/{resource_key} is held by agent {} (fencing token {}); retry after it is released",
        .holder_agent_id.map(|a| a.to_string()).unwrap_or_else(|| "unknown".into()),
        .fencing_token.map(|t| t.to_string()).unwrap_or_else(|| "unknown".into()))]
    LockHeld {
        resource_type: String,
        resource_key: String,
        holder_agent_id: Option<Uuid>,
        fencing_token: Option<i64>,
    },
    /// The resource was released involuntarily (expired or orphaned) less than
    /// `Config::lock_delay` ago and cannot be taken yet.
    #[error("{resource_type}/{resource_key} was released involuntarily and is unavailable for another {retry_after_ms} ms (lock delay)")]
    LockDelay {
        resource_type: String,
        resource_key: String,
        retry_after_ms: u64,
    },
    /// A waiting acquire's `wait` ran out, and this call never gets the lock.
    /// The agent has left the queue (should that write have failed, its entry
    /// lapses shortly after). `holder_agent_id` is the holder seen at the end
    /// (`None`: free with others queued ahead, in its lock delay, or the
    /// holder could not be read).
    #[error("waited {waited_ms} ms for {resource_type}/{resource_key}, held by agent {}; not queued any more",
        .holder_agent_id.map(|a| a.to_string()).unwrap_or_else(|| "nobody (free but others queued ahead, or in its lock delay)".into()))]
    LockWaitTimeout {
        resource_type: String,
        resource_key: String,
        waited_ms: u64,
        holder_agent_id: Option<Uuid>,
    },
    /// Waiting would close a cycle of agents, each waiting for a lock the
    /// next holds: `agents` in waits-for order, starting with the caller's
    /// agent, each once. Nothing was queued; release a lock and retry. A
    /// `lock_deadlock` audit row in the agent's session names the cycle
    /// (should writing it fail, the refusal stands and a warning is logged).
    #[error("deadlock: waiting would close the cycle {}; nothing was queued", .agents.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(" -> "))]
    Deadlock { agents: Vec<Uuid> },
    /// The agent already waits for a resource (an agent waits for one at a
    /// time), or an entry of its that could not be removed has not lapsed yet.
    #[error("agent {agent_id} already waits for {}/{}; an agent waits for one resource at a time",
        .resource_type.as_deref().unwrap_or("?"), .resource_key.as_deref().unwrap_or("?"))]
    AlreadyWaiting {
        agent_id: Uuid,
        resource_type: Option<String>,
        resource_key: Option<String>,
    },
    /// The lock exists but is no longer held (released, swept or expired).
    #[error("lock {lock_id} is no longer held ({reason}); acquire the resource again")]
    LockNotHeld { lock_id: Uuid, reason: String },
    /// The session is still open (active or paused); end it first.
    #[error("session {session_id} is still {status}; end it or let recovery interrupt it first")]
    SessionStillOpen { session_id: Uuid, status: String },
    /// No session id starts with this prefix.
    #[error("no session id starts with {prefix:?}")]
    SessionPrefixNotFound { prefix: String },
    /// No lock id starts with the prefix given.
    #[error("no lock id starts with {prefix:?}")]
    LockPrefixNotFound { prefix: String },
    /// More than one session id starts with this prefix.
    #[error("session id prefix {prefix:?} matches more than one session; give more characters")]
    AmbiguousId { prefix: String },
    /// The operation did not finish within its budget; it was rolled back and
    /// nothing changed. Retrying later is safe.
    #[error("timed out after {elapsed_ms} ms; nothing was changed, retry later")]
    Timeout { elapsed_ms: u64 },
    /// The serialized context windows exceed `Config::max_context_bytes`.
    /// Nothing changed and the windows are kept: trim them and retry.
    #[error(
        "context is {bytes} bytes, over the {limit}-byte limit; trim the context windows and retry"
    )]
    ContextTooLarge { bytes: usize, limit: usize },
    /// The serialized context windows are within `Config::max_context_bytes`
    /// but more than the server takes in one statement: `limit` is what its
    /// `setting` (MariaDB/MySQL's `max_allowed_packet`, `value` bytes)
    /// leaves for the context. Nothing changed and the windows are kept:
    /// raise the setting on the server, or trim the windows, and retry.
    #[error(
        "context is {bytes} bytes, over the {limit} bytes the server's {setting} ({value}) takes; raise {setting} or trim the context windows and retry"
    )]
    ContextTooLargeForServer {
        bytes: usize,
        limit: usize,
        setting: &'static str,
        value: u64,
    },
    /// A caller-supplied value was rejected before touching the database.
    #[error("invalid {field}: {reason}")]
    InvalidInput { field: &'static str, reason: String },
    /// The saved context of a session cannot be read back.
    #[error("saved context of session {session_id} is unreadable: {reason}")]
    CorruptContext { session_id: Uuid, reason: String },
    /// The database file cannot be created or opened (missing directory,
    /// permissions). Nothing was written.
    #[error("cannot create or open the database file {path}: {reason}")]
    CannotOpen { path: String, reason: String },
    /// The URL names a file that is not a SQLite database. Nothing was written to it.
    #[error("{path} is not a SQLite database; point the URL at a new file or an existing store")]
    NotADatabase { path: String },
    /// The database was migrated by a newer version of this library.
    #[error("the database schema is newer than this library (unknown migrations: {}); upgrade demiarch-sessions", .unknown.join(", "))]
    SchemaTooNew { unknown: Vec<String> },
    /// A stored row holds a value this library cannot read; the
    /// [`CorruptRow`] names the table, row, column and value.
    #[error("stored row is malformed: {0}")]
    CorruptRow(CorruptRow),
    /// A table the migrations fill with one row (`audit_head`,
    /// `lock_fencing`, `retention`) has none: the store was not migrated
    /// by this library, or its row was deleted by hand.
    #[error("{table} has no row; run the migrations")]
    MissingRow { table: &'static str },
    /// The manager (or a clone) was shut down: its heartbeat has stopped, so
    /// it starts no session, agent or lock that other instances would then
    /// recover from under it. Ending, reading and sweeping still work.
    #[error(
        "this manager was shut down and takes no new sessions, agents or locks; connect a new one"
    )]
    ManagerShutDown,
    /// The manager opened the store read-only (`Config::read_only`, or a
    /// SQLite URL with `?mode=ro`) and refuses `operation`, a write, before
    /// touching the database. Nothing changed.
    #[error("{operation} refused: this manager opened the store read-only; connect without Config::read_only (or ?mode=ro) to write")]
    ReadOnly { operation: &'static str },
    /// The manager was asked to open the store read-only, but the store is
    /// not at the latest schema of this library (`missing` names the
    /// migrations not applied; all of them for an empty database), and a
    /// read-only manager migrates nothing. Nothing was written.
    #[error("store at {store} is not migrated to the latest schema (missing: {}); open it writable once, or run the migration CLI (`cargo run -p demiarch-sessions-migration -- up`)", .missing.join(", "))]
    NotMigrated { store: String, missing: Vec<String> },
    /// The manager (or a clone) was closed: its connections are gone.
    #[error("this manager was closed; connect a new one")]
    ManagerClosed,
    /// The session's live context cannot be saved as it is. Nothing changed
    /// and the windows are kept: fix the named window and retry.
    #[error("context window {key:?} of session {session_id} cannot be saved: {reason}")]
    ContextRefused {
        session_id: Uuid,
        key: String,
        reason: String,
    },
    /// The SQLite file this manager opened was deleted or replaced while it
    /// ran; nothing was written, since the write would go to the old file.
    #[error("the database file {path} was deleted or replaced while in use; reconnect to the file now at that path")]
    DatabaseMoved { path: String },
    /// A call's work ended without an answer: the tokio runtime shut down
    /// under it. What it wrote is consistent: every write is one
    /// transaction. (A panic in the work is resumed in the caller instead.)
    #[error("internal error: {0}")]
    Internal(String),
    /// The audit rows after `after` were partly deleted by a prune: the log
    /// is whole only after `compacted_through`. Nothing was skipped
    /// silently: read on from `compacted_through` (or later), knowing that
    /// the rows in between may be gone.
    #[error("audit events after seq {after} were compacted away: the log is whole only after seq {compacted_through}")]
    Compacted { after: i64, compacted_through: i64 },
    /// A prune could not write its archive file; that batch deleted
    /// nothing, and the prune stopped.
    #[error("cannot write the prune archive {path}: {reason}; nothing more was deleted")]
    Archive { path: String, reason: String },
    /// Another prune (this instance's or another's) holds the store's prune
    /// lease: this one did not start, or (its own lease having lapsed) was
    /// taken over and stopped before its next batch. Retry after the other
    /// finishes (its lease runs until `until` unless renewed).
    #[error("another prune ({pruner}) is under way{}; retry when it finishes", .until.map(|t| format!(" (lease until {})", t.to_rfc3339())).unwrap_or_default())]
    PruneInProgress {
        pruner: String,
        until: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Waiting for a shutdown signal failed.
    #[error("cannot listen for shutdown signals: {0}")]
    Signal(#[from] std::io::Error),
    /// The database refused or failed; the transaction was rolled back.
    #[error("database error: {0}")]
    Database(#[from] DbErr),
}

impl From<CorruptRow> for Error {
    fn from(row: CorruptRow) -> Self {
        Error::CorruptRow(row)
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether the call gave up waiting for another writer: a
    /// [`Timeout`](Error::Timeout), or a database error that is SQLite's busy
    /// or locked, a PostgreSQL lock or statement timeout, a MariaDB/MySQL
    /// lock-wait or statement-time limit, or a wait for a pooled connection
    /// past `Config::connect_timeout`. Such a call changed nothing and can be
    /// retried.
    pub fn is_timeout(&self) -> bool {
        match self {
            Error::Timeout { .. } => true,
            Error::Database(e) => crate::db::is_lock_timeout(e),
            _ => false,
        }
    }
}
