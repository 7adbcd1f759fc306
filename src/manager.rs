//! `SessionManager`: connecting, accessors, and the public operations. Each
//! operation opens at most one transaction and delegates to the module that
//! owns the behaviour.
use std::sync::Arc;

use sea_orm::DatabaseConnection;
use tracing::instrument;
use uuid::Uuid;

use crate::context::{ContextRegistry, ContextSource, ContextWindow};
use crate::locks::LockGrant;
use crate::session::EndSessionReport;
use crate::{db, locks, session, Config, Result};

/// The handle apps keep: cheap to clone, safe to share across tasks.
#[derive(Clone)]
pub struct SessionManager {
    db: DatabaseConnection,
    config: Arc<Config>,
    contexts: Arc<ContextRegistry>,
    source: Arc<dyn ContextSource>,
}

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
    /// A SQLite file is created if missing (mode 0600 on Unix) and opened in WAL
    /// mode with `synchronous=FULL`, foreign keys on and `Config::busy_timeout`.
    /// Every `sqlite::memory:` connect is a fresh, empty database.
    ///
    /// # Errors
    /// [`Error::Database`](crate::Error::Database) when the database cannot be
    /// opened or migrated; [`Error::InvalidInput`](crate::Error::InvalidInput)
    /// when the URL is malformed or the file cannot be created.
    pub async fn connect_with(url: &str, config: Config) -> Result<Self> {
        let db = db::connect(url, &config).await?;
        Ok(Self::new(db, config))
    }

    /// Wraps a connection the app owns. The app runs `migration::Migrator`
    /// itself, and sets SQLite's pragmas (foreign keys on, WAL, busy timeout).
    pub fn new(db: DatabaseConnection, config: Config) -> Self {
        let contexts = Arc::new(ContextRegistry::default());
        Self {
            db,
            config: Arc::new(config),
            source: contexts.clone(),
            contexts,
        }
    }

    /// Makes `end_session` read live context windows from `source` instead of
    /// the built-in registry.
    #[must_use]
    pub fn with_context_source(mut self, source: Arc<dyn ContextSource>) -> Self {
        self.source = source;
        self
    }

    /// The underlying connection, for queries of the app's own.
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The built-in in-memory registry of live context windows.
    pub fn contexts(&self) -> &ContextRegistry {
        &self.contexts
    }

    pub(crate) fn context_source(&self) -> &dyn ContextSource {
        self.source.as_ref()
    }

    /// Starts an `active` session and records `session_start` in the audit log.
    ///
    /// # Errors
    /// [`Error::Database`](crate::Error::Database) when the write fails.
    #[instrument(skip(self), err)]
    pub async fn start_session(&self) -> Result<Uuid> {
        session::start::start_session(&self.db).await
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
        session::start::register_agent(&self.db, session_id, agent_type).await
    }

    /// Takes the lock on (`resource_type`, `resource_key`) for a running agent
    /// of an active session. The database's unique index over held locks
    /// decides: two callers can never both hold it.
    ///
    /// # Errors
    /// [`Error::LockHeld`](crate::Error::LockHeld) when someone holds it;
    /// [`Error::AgentNotFound`](crate::Error::AgentNotFound),
    /// [`Error::AgentNotRunning`](crate::Error::AgentNotRunning),
    /// [`Error::SessionNotActive`](crate::Error::SessionNotActive),
    /// [`Error::InvalidInput`](crate::Error::InvalidInput).
    #[instrument(skip(self), err)]
    pub async fn acquire_lock(
        &self,
        agent_id: Uuid,
        resource_type: &str,
        resource_key: &str,
    ) -> Result<LockGrant> {
        locks::acquire(&self.db, agent_id, resource_type, resource_key).await
    }

    /// Releases a held lock (reason `released`). Releasing a lock that is
    /// already released is a no-op.
    ///
    /// # Errors
    /// [`Error::LockNotFound`](crate::Error::LockNotFound),
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for the nil id.
    #[instrument(skip(self), err)]
    pub async fn release_lock(&self, lock_id: Uuid) -> Result<()> {
        locks::release(&self.db, lock_id).await
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
    /// [`Error::Timeout`](crate::Error::Timeout),
    /// [`Error::Database`](crate::Error::Database); on every error nothing changed.
    pub async fn end_session(&self, session_id: Uuid) -> Result<EndSessionReport> {
        session::end::end_session(self, session_id).await
    }

    /// The saved context of an ended session, or the live windows of an open one.
    ///
    /// # Errors
    /// [`Error::SessionNotFound`](crate::Error::SessionNotFound),
    /// [`Error::CorruptContext`](crate::Error::CorruptContext) when the stored
    /// JSON is not what this library wrote.
    #[instrument(skip(self), err)]
    pub async fn session_context(&self, session_id: Uuid) -> Result<Vec<ContextWindow>> {
        session::recovery::session_context(self, session_id).await
    }
}
