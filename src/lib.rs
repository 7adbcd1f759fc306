//! # demiarch-sessions
//!
//! The global session store of an AI-agent orchestrator, embedded in the app:
//! sessions, the agent executions inside them, the resource locks those agents
//! hold, their context windows, and an append-only audit log. SQLite is the
//! embedded default.
//!
//! Its heart is [`SessionManager::end_session`] (story 6.5): in one
//! transaction, within `Config::cleanup_timeout`, the session is marked
//! completed, its context saved for recovery, every lock its agents hold
//! released and the audit record written.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> demiarch_sessions::Result<()> {
//! use demiarch_sessions::SessionManager;
//!
//! let manager = SessionManager::connect("sqlite::memory:").await?;
//! let session = manager.start_session().await?;
//! let agent = manager.register_agent(session, "coder").await?;
//! let grant = manager.acquire_lock(agent, "file", "src/main.rs").await?;
//! manager.contexts().put(session, "plan", serde_json::json!({"step": 1}))?;
//!
//! let report = manager.end_session(session).await?;
//! assert_eq!(report.locks_released, 1);
//! assert_eq!(report.context_windows, 1);
//!
//! // The resource is free again, with a higher fencing token.
//! let next_session = manager.start_session().await?;
//! let next_agent = manager.register_agent(next_session, "reviewer").await?;
//! let next = manager.acquire_lock(next_agent, "file", "src/main.rs").await?;
//! assert!(next.fencing_token > grant.fencing_token);
//!
//! // The saved context comes back for recovery.
//! let saved = manager.session_context(session).await?;
//! assert_eq!(saved[0].key, "plan");
//! # Ok(())
//! # }
//! ```
mod agents;
mod audit;
mod config;
mod context;
mod db;
mod detached;
mod error;
mod lifecycle;
mod locks;
mod manager;
mod metrics;
mod query;
mod retention;
mod session;
mod status;
mod validate;
pub mod views;
mod watch;
#[cfg(feature = "web")]
pub mod web;

pub use agents::{AgentOutcome, FinishReport};
pub use audit::{AuditEvent, Operator};
pub use config::{Config, MAX_CONFIG_DURATION, MAX_CONTEXT_BYTES_LIMIT, MAX_SWEEP_BATCH};
pub use context::{
    ContextRegistry, ContextSource, ContextWindow, CONTEXT_FORMAT_VERSION, MAX_CONTEXT_DEPTH,
};
pub use error::{CorruptRow, Error, Result};
pub use lifecycle::{ShutdownFailure, ShutdownReport};
pub use locks::lost::LockLoss;
pub use locks::{LockGrant, LockOptions, LockWaiter, SweepReport};
pub use manager::SessionManager;
pub use metrics::MetricsSnapshot;
pub use query::{
    AgentInfo, AuditFilter, AuditRecord, Listing, LockFilter, LockInfo, SessionFilter, SessionInfo,
};
pub use retention::{ArchiveLine, PruneReport, RetentionPolicy, MAX_PRUNE_BATCH};
pub use session::{EndSessionReport, RecoveryReport};
pub use status::{AgentStatus, ReleaseReason, SessionStatus};
pub use validate::{MAX_ARGUMENT_DURATION, MAX_NAME_BYTES};
pub use watch::WatchOptions;

/// The generated entities, for apps that query the store directly.
pub use entity;
/// The schema migrations, for apps that own their connection
/// ([`SessionManager::new`]) and run `Migrator::up` themselves.
pub use migration::Migrator;

/// The README's examples are compiled and run as doc tests, so it cannot
/// drift from the code.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
