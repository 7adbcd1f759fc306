//! The test harness: every test gets its own fresh, migrated database, so tests
//! run in parallel and never share state.
//!
//! `each_backend` runs a test body once per backend: in-memory SQLite and a
//! temporary file-backed WAL SQLite always. It says on stderr which backends
//! it ran and which it skipped.
#![allow(dead_code)]

use std::future::Future;

use demiarch_sessions::{Config, SessionManager};
use entity::{agent_executions, audit_log, global_sessions, resource_locks};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use tempfile::TempDir;
use uuid::Uuid;

pub use sea_orm::entity::prelude::TextUuid;

/// A backend a test can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    SqliteMemory,
    SqliteFile,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::SqliteMemory => "sqlite-memory",
            Backend::SqliteFile => "sqlite-wal",
        }
    }
}

/// A fresh database and a manager on it. Keeps the temporary directory alive.
pub struct TestDb {
    pub backend: Backend,
    pub manager: SessionManager,
    pub url: String,
    dir: Option<TempDir>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> Self {
        Self::with_config(backend, Config::default()).await
    }

    pub async fn with_config(backend: Backend, config: Config) -> Self {
        let (url, dir) = match backend {
            Backend::SqliteMemory => ("sqlite::memory:".to_owned(), None),
            Backend::SqliteFile => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("sessions.db").display());
                (url, Some(dir))
            }
        };
        let manager = SessionManager::connect_with(&url, config)
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        Self { backend, manager, url, dir }
    }

    /// The directory holding a file database, if any.
    pub fn dir(&self) -> Option<&std::path::Path> {
        self.dir.as_ref().map(|d| d.path())
    }

    pub fn is_file(&self) -> bool {
        self.backend == Backend::SqliteFile
    }
}

/// Runs `body` on every available backend, each with a fresh database.
pub async fn each_backend<F, Fut>(test: &str, body: F)
where
    F: Fn(TestDb) -> Fut,
    Fut: Future<Output = ()>,
{
    each_backend_with(test, Config::default(), body).await
}

pub async fn each_backend_with<F, Fut>(test: &str, config: Config, body: F)
where
    F: Fn(TestDb) -> Fut,
    Fut: Future<Output = ()>,
{
    for backend in [Backend::SqliteMemory, Backend::SqliteFile] {
        body(TestDb::with_config(backend, config.clone()).await).await;
        eprintln!("{test}: ran on {}", backend.name());
    }
}

// ---- Reading rows back, so tests assert on the database, not on return values.

pub async fn session_row(db: &TestDb, id: Uuid) -> global_sessions::Model {
    global_sessions::Entity::find_by_id(TextUuid(id))
        .one(db.manager.connection())
        .await
        .expect("query session")
        .unwrap_or_else(|| panic!("session {id} row missing"))
}

pub async fn agent_rows(db: &TestDb, session: Uuid) -> Vec<agent_executions::Model> {
    agent_executions::Entity::find()
        .filter(agent_executions::Column::SessionId.eq(TextUuid(session)))
        .order_by_asc(agent_executions::Column::StartedAt)
        .all(db.manager.connection())
        .await
        .expect("query agents")
}

pub async fn lock_rows(db: &TestDb, session: Uuid) -> Vec<resource_locks::Model> {
    resource_locks::Entity::find()
        .filter(resource_locks::Column::SessionId.eq(TextUuid(session)))
        .order_by_asc(resource_locks::Column::FencingToken)
        .all(db.manager.connection())
        .await
        .expect("query locks")
}

pub async fn all_locks(db: &TestDb) -> Vec<resource_locks::Model> {
    resource_locks::Entity::find()
        .order_by_asc(resource_locks::Column::FencingToken)
        .all(db.manager.connection())
        .await
        .expect("query locks")
}

pub async fn audit_rows(db: &TestDb, session: Uuid) -> Vec<audit_log::Model> {
    audit_log::Entity::find()
        .filter(audit_log::Column::SessionId.eq(TextUuid(session)))
        .order_by_asc(audit_log::Column::EventTime)
        .all(db.manager.connection())
        .await
        .expect("query audit")
}

pub async fn audit_of(db: &TestDb, session: Uuid, event: &str) -> Vec<audit_log::Model> {
    audit_rows(db, session)
        .await
        .into_iter()
        .filter(|r| r.event_type == event)
        .collect()
}

/// Every row of every table, for "nothing changed" assertions.
#[derive(Debug, PartialEq)]
pub struct Snapshot {
    pub sessions: Vec<global_sessions::Model>,
    pub agents: Vec<agent_executions::Model>,
    pub locks: Vec<resource_locks::Model>,
    pub audit: Vec<audit_log::Model>,
}

pub async fn snapshot(db: &TestDb) -> Snapshot {
    let c = db.manager.connection();
    Snapshot {
        sessions: global_sessions::Entity::find()
            .order_by_asc(global_sessions::Column::Id)
            .all(c)
            .await
            .expect("sessions"),
        agents: agent_executions::Entity::find()
            .order_by_asc(agent_executions::Column::Id)
            .all(c)
            .await
            .expect("agents"),
        locks: resource_locks::Entity::find()
            .order_by_asc(resource_locks::Column::Id)
            .all(c)
            .await
            .expect("locks"),
        audit: audit_log::Entity::find()
            .order_by_asc(audit_log::Column::Id)
            .all(c)
            .await
            .expect("audit"),
    }
}

/// A session with `agents` agents holding `locks_per_agent` locks each.
pub async fn populated_session(db: &TestDb, agents: usize, locks_per_agent: usize) -> (Uuid, Vec<Uuid>) {
    let m = &db.manager;
    let session = m.start_session().await.expect("start");
    let mut ids = Vec::new();
    for a in 0..agents {
        let agent = m.register_agent(session, &format!("agent-{a}")).await.expect("register");
        for l in 0..locks_per_agent {
            m.acquire_lock(agent, "file", &format!("{session}/{a}/{l}"))
                .await
                .expect("acquire");
        }
        ids.push(agent);
    }
    (session, ids)
}
