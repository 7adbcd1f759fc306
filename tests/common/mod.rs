//! The test harness: every test gets its own fresh, migrated database, so tests
//! run in parallel and never share state.
//!
//! `each_backend` runs a test body once per backend: in-memory SQLite and a
//! temporary file-backed WAL SQLite always; PostgreSQL when `TEST_POSTGRES_URL`
//! is set and MariaDB/MySQL when `TEST_MYSQL_URL` is set (each test then gets
//! its own freshly created database, dropped afterwards). Each test binary
//! says once, on the terminal, which backends it ran and which it skipped.
#![allow(dead_code)]

use std::future::Future;
use std::io::Write;
use std::sync::{Arc, Once};

use sea_orm::{ConnectionTrait, Database, DatabaseConnection};

use demiarch_sessions::{Config, SessionManager};
use entity::{agent_executions, audit_log, global_sessions, lock_waiters, resource_locks};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use tempfile::TempDir;
use uuid::Uuid;

pub use sea_orm::entity::prelude::TextUuid;

/// A backend a test can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    SqliteMemory,
    SqliteFile,
    Postgres,
    MySql,
}

impl Backend {
    pub const ALL: [Backend; 4] = [
        Backend::SqliteMemory,
        Backend::SqliteFile,
        Backend::Postgres,
        Backend::MySql,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Backend::SqliteMemory => "sqlite-memory",
            Backend::SqliteFile => "sqlite-wal",
            Backend::Postgres => "postgres",
            Backend::MySql => "mysql",
        }
    }

    pub fn is_sqlite(self) -> bool {
        matches!(self, Backend::SqliteMemory | Backend::SqliteFile)
    }

    /// The server URL to create test databases on, or why the backend is skipped.
    fn server_url(self) -> Result<Option<String>, String> {
        let (var, feature_on) = match self {
            Backend::SqliteMemory | Backend::SqliteFile => return Ok(None),
            Backend::Postgres => ("TEST_POSTGRES_URL", cfg!(feature = "postgres")),
            Backend::MySql => ("TEST_MYSQL_URL", cfg!(feature = "mysql")),
        };
        match std::env::var(var) {
            Ok(url) if !url.is_empty() && feature_on => Ok(Some(url)),
            Ok(url) if !url.is_empty() => Err(format!(
                "{var} is set but the `{}` feature is off (use --all-features)",
                self.name()
            )),
            _ => Err(format!("{var} is not set")),
        }
    }

    /// Whether tests run on this backend here, or why not.
    pub fn availability(self) -> Result<(), String> {
        self.server_url().map(|_| ())
    }
}

/// Says once per test binary which backends run and which are skipped. Written
/// straight to the terminal: the test harness captures `eprintln!`.
fn announce_backends() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let mut lines = String::new();
        for backend in Backend::ALL {
            match backend.availability() {
                Ok(()) => lines.push_str(&format!("backend {}: running\n", backend.name())),
                Err(why) => {
                    lines.push_str(&format!("backend {}: SKIPPED ({why})\n", backend.name()))
                }
            }
        }
        let _ = std::io::stderr().write_all(lines.as_bytes());
    });
}

/// Replaces the database name in a server URL.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_part = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{host_part}/{name}?{q}"),
        None => format!("{host_part}/{name}"),
    }
}

/// A freshly created, uniquely named database on a server, dropped by `drop_now`.
struct ServerDb {
    admin: DatabaseConnection,
    name: String,
    backend: Backend,
}

impl ServerDb {
    async fn create(backend: Backend, server_url: &str) -> (Self, String) {
        let admin = Database::connect(server_url)
            .await
            .unwrap_or_else(|e| panic!("connect to {server_url}: {e}"));
        let name = format!("dsess_{}", Uuid::new_v4().simple());
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("create database {name}: {e}"));
        let url = with_database(server_url, &name);
        (
            Self {
                admin,
                name,
                backend,
            },
            url,
        )
    }

    async fn drop_now(self) {
        let sql = match self.backend {
            Backend::Postgres => format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            _ => format!("DROP DATABASE IF EXISTS {}", self.name),
        };
        let _ = self.admin.execute_unprepared(&sql).await;
    }
}

/// A fresh database and a manager on it. Keeps the temporary directory alive.
pub struct TestDb {
    pub backend: Backend,
    pub manager: SessionManager,
    pub url: String,
    // Shared so `each_backend` can keep the directory until the test body has
    // finished: an `async move` body that only uses `db.manager` captures just
    // that field, and the rest of `db` would be dropped before the body runs.
    dir: Option<Arc<TempDir>>,
    server: Option<ServerDb>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> Self {
        Self::with_config(backend, test_config()).await
    }

    /// A fresh database on `backend`. Panics if the backend is unavailable:
    /// check `Backend::availability` first (as `each_backend` does).
    pub async fn with_config(backend: Backend, config: Config) -> Self {
        let (url, dir, server) = match backend {
            Backend::SqliteMemory => ("sqlite::memory:".to_owned(), None, None),
            Backend::SqliteFile => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("sessions.db").display());
                (url, Some(Arc::new(dir)), None)
            }
            Backend::Postgres | Backend::MySql => {
                let server_url = backend
                    .server_url()
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| panic!("{} is not available", backend.name()));
                let (server, url) = ServerDb::create(backend, &server_url).await;
                (url, None, Some(server))
            }
        };
        let manager = SessionManager::connect_with(&url, config)
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        Self {
            backend,
            manager,
            url,
            dir,
            server,
        }
    }

    /// Closes the pool and drops a server database.
    pub async fn cleanup(self) {
        let _ = self.manager.close().await;
        if let Some(server) = self.server {
            server.drop_now().await;
        }
    }

    /// The directory holding a file database, if any.
    pub fn dir(&self) -> Option<&std::path::Path> {
        self.dir.as_ref().map(|d| d.path())
    }

    pub fn is_file(&self) -> bool {
        self.backend == Backend::SqliteFile
    }

    pub fn is_sqlite(&self) -> bool {
        self.backend.is_sqlite()
    }

    /// A second manager with its own pool on the same database: another app
    /// instance (another host, for a server). On in-memory SQLite, where a
    /// second pool would be a second database, a clone of the first.
    pub async fn peer_manager(&self) -> SessionManager {
        if self.backend == Backend::SqliteMemory {
            return self.manager.clone();
        }
        SessionManager::connect_with(&self.url, self.manager.config().clone())
            .await
            .unwrap_or_else(|e| panic!("second manager on {}: {e}", self.url))
    }

    /// A second, independent connection to the same database (another process's view).
    pub async fn second_connection(&self) -> DatabaseConnection {
        Database::connect(&self.url)
            .await
            .expect("second connection")
    }
}

/// Runs `body` on every available backend, each with a fresh database.
pub async fn each_backend<F, Fut>(test: &str, body: F)
where
    F: Fn(TestDb) -> Fut,
    Fut: Future<Output = ()>,
{
    each_backend_with(test, test_config(), body).await
}

/// The default configuration, except that the heartbeat (which refreshes
/// `last_heartbeat_at`) is too slow to fire during a test and disturb a
/// "nothing changed" comparison. Tests of the heartbeat set their own.
pub fn test_config() -> Config {
    Config {
        heartbeat_interval: std::time::Duration::from_secs(3600),
        ..Config::default()
    }
}

/// Runs `body` on every available backend. The body gets a `TestDb` whose
/// database is dropped after the body returns (server backends).
pub async fn each_backend_with<F, Fut>(test: &str, config: Config, body: F)
where
    F: Fn(TestDb) -> Fut,
    Fut: Future<Output = ()>,
{
    announce_backends();
    for backend in Backend::ALL {
        if backend.availability().is_err() {
            continue;
        }
        let db = TestDb::with_config(backend, config.clone()).await;
        let server = db
            .server
            .as_ref()
            .map(|s| (s.admin.clone(), s.name.clone(), s.backend));
        let keep_dir = db.dir.clone();
        body(db).await;
        drop(keep_dir);
        if let Some((admin, name, backend)) = server {
            ServerDb {
                admin,
                name,
                backend,
            }
            .drop_now()
            .await;
        }
        eprintln!("{test}: passed on {}", backend.name());
    }
}

// ---- Reading rows back, so tests assert on the database, not on return values.

pub async fn session_row(db: &TestDb, id: Uuid) -> global_sessions::Model {
    global_sessions::Entity::find_by_id(id.to_string())
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
    pub waiters: Vec<lock_waiters::Model>,
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
        waiters: lock_waiters::Entity::find()
            .order_by_asc(lock_waiters::Column::Ticket)
            .all(c)
            .await
            .expect("lock waiters"),
    }
}

/// A session with `agents` agents holding `locks_per_agent` locks each.
pub async fn populated_session(
    db: &TestDb,
    agents: usize,
    locks_per_agent: usize,
) -> (Uuid, Vec<Uuid>) {
    let m = &db.manager;
    let session = m.start_session().await.expect("start");
    let mut ids = Vec::new();
    for a in 0..agents {
        let agent = m
            .register_agent(session, &format!("agent-{a}"))
            .await
            .expect("register");
        for l in 0..locks_per_agent {
            m.acquire_lock(agent, "file", &format!("{session}/{a}/{l}"))
                .await
                .expect("acquire");
        }
        ids.push(agent);
    }
    (session, ids)
}

/// Runs raw SQL with values on the test database (placeholders already in the
/// backend's form: see `placeholders`).
pub async fn exec_sql(
    db: &TestDb,
    sql: &str,
    values: Vec<sea_orm::Value>,
) -> Result<sea_orm::ExecResult, sea_orm::DbErr> {
    let conn = db.manager.connection();
    conn.execute_raw(sea_orm::Statement::from_sql_and_values(
        conn.get_database_backend(),
        sql,
        values,
    ))
    .await
}

/// Rewrites `?` placeholders as `$1, $2, …` on PostgreSQL.
pub fn placeholders(db: &TestDb, sql: &str) -> String {
    if db.backend != Backend::Postgres {
        return sql.to_owned();
    }
    let mut out = String::new();
    let mut n = 0;
    for ch in sql.chars() {
        if ch == '?' {
            n += 1;
            out.push_str(&format!("${n}"));
        } else {
            out.push(ch);
        }
    }
    out
}

/// Sets a session's status by hand (to make it paused, interrupted…).
pub async fn set_session_status(db: &TestDb, session: Uuid, status: &str) {
    use sea_orm::sea_query::Expr;
    let res = global_sessions::Entity::update_many()
        .col_expr(global_sessions::Column::Status, Expr::value(status))
        .filter(global_sessions::Column::Id.eq(TextUuid(session)))
        .exec(db.manager.connection())
        .await
        .expect("set session status");
    assert_eq!(
        res.rows_affected, 1,
        "status update must hit the session row"
    );
}

/// Everything stored about one session, sorted by id so two reads compare equal.
pub type SessionRows = (
    global_sessions::Model,
    Vec<agent_executions::Model>,
    Vec<resource_locks::Model>,
    Vec<audit_log::Model>,
);

pub async fn rows_of(db: &TestDb, session: Uuid) -> SessionRows {
    let mut agents = agent_rows(db, session).await;
    agents.sort_by_key(|a| a.id.clone());
    let mut locks = lock_rows(db, session).await;
    locks.sort_by_key(|l| l.id.clone());
    let mut audit = audit_rows(db, session).await;
    audit.sort_by_key(|a| a.id.clone());
    (session_row(db, session).await, agents, locks, audit)
}

/// The last fencing token the store issued, which `snapshot` does not
/// cover: on PostgreSQL the `lock_fencing_seq` sequence's, elsewhere the
/// `lock_fencing` counter row's.
pub async fn fencing_counter(db: &TestDb) -> i64 {
    let conn = db.manager.connection();
    if db.backend == Backend::Postgres {
        let row = conn
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DatabaseBackend::Postgres,
                "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END \
                 FROM lock_fencing_seq",
            ))
            .await
            .expect("read lock_fencing_seq")
            .expect("a row");
        return row.try_get_by_index::<i64>(0).expect("last value");
    }
    entity::lock_fencing::Entity::find_by_id(1)
        .one(conn)
        .await
        .expect("read lock_fencing")
        .expect("lock_fencing counter row")
        .last_token
}

/// Another process holding what an end of `session` needs: on a second
/// connection, SQLite's write lock (`BEGIN IMMEDIATE`) or, on a server, the
/// session's row lock (`SELECT … FOR UPDATE`). Roll the transaction back and
/// close the connection to let go.
pub async fn block_session(
    db: &TestDb,
    session: Uuid,
) -> (DatabaseConnection, sea_orm::DatabaseTransaction) {
    use sea_orm::{SqliteTransactionMode, TransactionOptions, TransactionTrait};
    if db.is_sqlite() {
        let blocker = db.second_connection().await;
        let blocking = blocker
            .begin_with_options(TransactionOptions {
                sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                ..Default::default()
            })
            .await
            .expect("BEGIN IMMEDIATE on the blocker");
        (blocker, blocking)
    } else {
        lock_row_of(db, "global_sessions", "id", session).await
    }
}

/// On a server: a second connection whose open transaction holds the row
/// lock (`SELECT … FOR UPDATE`) of the first row of `table` whose `column`
/// is `session`. Roll the transaction back and close the connection to let go.
pub async fn lock_row_of(
    db: &TestDb,
    table: &str,
    column: &str,
    session: Uuid,
) -> (DatabaseConnection, sea_orm::DatabaseTransaction) {
    use sea_orm::{Statement, TransactionTrait};
    let blocker = db.second_connection().await;
    let txn = blocker.begin().await.expect("BEGIN on the blocker");
    let sql = placeholders(
        db,
        &format!("SELECT 1 FROM {table} WHERE {column} = ? LIMIT 1 FOR UPDATE"),
    );
    txn.query_one_raw(Statement::from_sql_and_values(
        txn.get_database_backend(),
        sql,
        [session.to_string().into()],
    ))
    .await
    .unwrap_or_else(|e| panic!("lock a row of {table}: {e}"))
    .unwrap_or_else(|| panic!("no row of {table} to lock"));
    (blocker, txn)
}

/// A UUID column as stored (its text), parsed.
pub fn id(text: &str) -> Uuid {
    Uuid::parse_str(text).unwrap_or_else(|e| panic!("stored id {text:?} is not a UUID: {e}"))
}

/// `demiarch-sessions serve` on `url` with `args`, listening on a free
/// loopback port; the child and its base address (`http://127.0.0.1:PORT`),
/// once it listens. Kill the child to stop it.
#[cfg(feature = "cli")]
pub fn serve(url: &str, args: &[&str]) -> (std::process::Child, String) {
    serve_limited(url, args, None)
}

/// [`serve`] under an open-files limit (`ulimit -n`), when given.
#[cfg(feature = "cli")]
pub fn serve_limited(
    url: &str,
    args: &[&str],
    open_files: Option<u32>,
) -> (std::process::Child, String) {
    use std::io::BufRead;
    let bin = env!("CARGO_BIN_EXE_demiarch-sessions");
    let mut command = match open_files {
        Some(limit) => {
            let mut shell = std::process::Command::new("sh");
            shell
                .arg("-c")
                .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                .arg(bin);
            shell
        }
        None => std::process::Command::new(bin),
    };
    let mut child = command
        .env_remove("DATABASE_URL")
        .env_remove("DEMIARCH_DASHBOARD_TOKEN")
        .args(["--database-url", url, "serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start serve");
    let mut line = String::new();
    std::io::BufReader::new(child.stderr.take().expect("stderr"))
        .read_line(&mut line)
        .expect("serve's first line");
    let base = line
        .split("on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(|b| b.trim_end_matches('/').to_owned())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    (child, base)
}
