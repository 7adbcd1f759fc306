//! Databases for the scale example and the benches: a fresh database per run
//! on each backend, and sessions created in bulk with exactly the rows the
//! library writes, so a million of them can be made in minutes instead of hours.
//!
//! A bulk-created session has: its `global_sessions` row (active), its
//! `session_start` audit row, its running agents and their held locks (type
//! `file`, a key unique to the session, fencing tokens reserved from the
//! `lock_fencing` counter, so the library keeps issuing larger ones).
use std::error::Error;

use chrono::{DateTime, SubsecRound, Utc};
use demiarch_sessions::entity::{
    agent_executions, audit_log, global_sessions, lock_fencing, resource_locks,
};
use demiarch_sessions::{Config, SessionManager};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, Database, DatabaseBackend, DatabaseConnection,
    DatabaseTransaction, EntityTrait, QueryFilter, Statement, TransactionTrait,
};
use tempfile::TempDir;
use uuid::Uuid;

pub type BoxResult<T> = Result<T, Box<dyn Error>>;

/// The database file of a `sqlite-wal` fixture, in its temporary directory.
const SQLITE_FILE: &str = "scale.db";

/// Rows per multi-row INSERT: 1 000 locks bind 10 000 values, well under
/// every backend's limit (SQLite 32 766, PostgreSQL and MySQL 65 535).
const ROWS_PER_INSERT: usize = 1000;
/// Rows written per transaction while bulk-creating sessions.
const ROWS_PER_TXN: u64 = 20_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    SqliteMemory,
    SqliteWal,
    Postgres,
    MySql,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::SqliteMemory => "sqlite-memory",
            Self::SqliteWal => "sqlite-wal",
            Self::Postgres => "postgres",
            Self::MySql => "mysql",
        }
    }
}

/// A database created for one measurement, dropped by [`Fixture::close`].
pub struct Fixture {
    pub manager: SessionManager,
    pub backend: BackendKind,
    server: Option<(DatabaseConnection, String)>,
    /// Keeps a `sqlite-wal` database's directory until the fixture is dropped.
    dir: Option<TempDir>,
    /// What the manager was connected with.
    url: String,
}

impl Fixture {
    /// A fresh, migrated database on `backend` and a manager on it with the
    /// library's production settings (the URL goes through `connect_with`).
    pub async fn open(backend: BackendKind, config: Config) -> BoxResult<Self> {
        let (url, server, dir) = match backend {
            BackendKind::SqliteMemory => ("sqlite::memory:".to_owned(), None, None),
            BackendKind::SqliteWal => {
                let dir = tempfile::tempdir()
                    .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
                let url = format!("sqlite://{}", dir.path().join(SQLITE_FILE).display());
                (url, None, Some(dir))
            }
            BackendKind::Postgres | BackendKind::MySql => {
                let (server_url, name, admin) = create_server_database(backend).await?;
                let url = with_database(&server_url, &name);
                (url, Some((admin, name)), None)
            }
        };
        let manager = match SessionManager::connect_with(&url, config).await {
            Ok(manager) => manager,
            Err(e) => {
                if let Some((admin, name)) = &server {
                    drop_server_database(backend, admin, name).await;
                }
                return Err(format!("cannot connect the library to {url}: {e}").into());
            }
        };
        Ok(Self {
            manager,
            backend,
            server,
            dir,
            url,
        })
    }

    /// A second manager on the same database, as another instance of the app
    /// would open it; `None` on in-memory SQLite, where every connect is a
    /// database of its own. The caller closes it.
    pub async fn second_manager(&self, config: Config) -> BoxResult<Option<SessionManager>> {
        if self.backend == BackendKind::SqliteMemory {
            return Ok(None);
        }
        let manager = SessionManager::connect_with(&self.url, config)
            .await
            .map_err(|e| format!("cannot connect a second manager to {}: {e}", self.url))?;
        Ok(Some(manager))
    }

    /// The URL the manager was connected with.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn connection(&self) -> &DatabaseConnection {
        self.manager.connection()
    }

    /// The database file of a `sqlite-wal` fixture.
    pub fn sqlite_file(&self) -> Option<std::path::PathBuf> {
        self.dir.as_ref().map(|dir| dir.path().join(SQLITE_FILE))
    }

    /// Closes the pool and drops a server database.
    pub async fn close(self) -> BoxResult<()> {
        self.manager.close().await?;
        if let Some((admin, name)) = &self.server {
            drop_server_database(self.backend, admin, name).await;
        }
        Ok(())
    }

    /// Refreshes the planner statistics after a bulk load on the servers, as
    /// autovacuum (PostgreSQL) or persistent statistics (InnoDB) would soon do;
    /// SQLite is left as the library leaves it (no `ANALYZE`).
    pub async fn analyze(&self) -> BoxResult<()> {
        let sql = match self.backend {
            BackendKind::Postgres => "ANALYZE",
            BackendKind::MySql => {
                "ANALYZE TABLE global_sessions, agent_executions, resource_locks, audit_log"
            }
            BackendKind::SqliteMemory | BackendKind::SqliteWal => return Ok(()),
        };
        self.connection()
            .execute_unprepared(sql)
            .await
            .map_err(|e| format!("{sql}: {e}"))?;
        Ok(())
    }

    /// Creates `count` active sessions, each with `agents` running agents that
    /// hold `locks` held locks between them round-robin. Returns their ids.
    ///
    /// Written through the manager's write connection, as an app's sessions,
    /// agents and locks are: on a SQLite file, a write through any other
    /// connection would leave the next end to start with a cold page cache.
    pub async fn create_sessions(
        &self,
        count: u64,
        agents: usize,
        locks: u64,
    ) -> BoxResult<Vec<Uuid>> {
        let rows_per_session = 2 + agents as u64 + locks;
        let per_txn = std::cmp::max(ROWS_PER_TXN / rows_per_session, 1);
        let mut ids = Vec::with_capacity(usize::try_from(count)?);
        let mut made = 0;
        while made < count {
            let n = std::cmp::min(per_txn, count - made);
            let txn = self.manager.write_connection().begin().await?;
            ids.extend(insert_sessions(&txn, n, agents, locks).await?);
            txn.commit().await?;
            made += n;
        }
        Ok(ids)
    }

    /// Ends every open session in bulk, as `end_session` leaves them, at
    /// `ended_at`: completed with a saved context of one window of
    /// `context_bytes`, agents cancelled, locks released. Returns how many.
    pub async fn end_all_open(
        &self,
        ended_at: DateTime<Utc>,
        context_bytes: usize,
    ) -> BoxResult<u64> {
        let context = serde_json::json!({
            "version": demiarch_sessions::CONTEXT_FORMAT_VERSION,
            "windows": [{ "key": "window-0", "data": context_text(context_bytes) }],
        });
        let txn = self.manager.write_connection().begin().await?;
        resource_locks::Entity::update_many()
            .col_expr(resource_locks::Column::ReleasedAt, Expr::value(ended_at))
            .col_expr(
                resource_locks::Column::ReleaseReason,
                Expr::value("session_end"),
            )
            .filter(resource_locks::Column::ReleasedAt.is_null())
            .exec(&txn)
            .await?;
        agent_executions::Entity::update_many()
            .col_expr(agent_executions::Column::Status, Expr::value("cancelled"))
            .col_expr(agent_executions::Column::CompletedAt, Expr::value(ended_at))
            .filter(agent_executions::Column::Status.eq("running"))
            .exec(&txn)
            .await?;
        let ended = global_sessions::Entity::update_many()
            .col_expr(global_sessions::Column::Status, Expr::value("completed"))
            .col_expr(global_sessions::Column::CompletedAt, Expr::value(ended_at))
            .col_expr(global_sessions::Column::UpdatedAt, Expr::value(ended_at))
            .col_expr(global_sessions::Column::ContextData, Expr::value(context))
            .filter(global_sessions::Column::Status.eq("active"))
            .exec(&txn)
            .await?
            .rows_affected;
        txn.commit().await?;
        Ok(ended)
    }

    /// The `--background` sessions: 2 agents holding 5 locks each. On
    /// SQLite and PostgreSQL in bulk SQL (a recursive CTE, `generate_series`),
    /// so a million fit in minutes; on MariaDB/MySQL through multi-row inserts.
    pub async fn populate_background(&self, sessions: u64) -> BoxResult<()> {
        match self.backend {
            BackendKind::MySql => {
                self.create_sessions(sessions, 2, 10).await?;
            }
            _ => {
                let mut made = 0;
                while made < sessions {
                    let n = std::cmp::min(BULK_SESSIONS_PER_TXN, sessions - made);
                    let txn = self.manager.write_connection().begin().await?;
                    bulk_sessions(&txn, n).await?;
                    txn.commit().await?;
                    made += n;
                }
            }
        }
        self.analyze().await
    }

    /// One target session: 4 agents holding `locks` locks round-robin and one
    /// context window of `context_bytes` in the manager's registry.
    pub async fn target_session(&self, locks: u64, context_bytes: usize) -> BoxResult<Uuid> {
        let ids = self.create_sessions(1, 4, locks).await?;
        let id = *ids.first().ok_or("no target session was created")?;
        self.manager.contexts().put(
            id,
            "window-0",
            serde_json::Value::String(context_text(context_bytes)),
        )?;
        Ok(id)
    }
}

/// `bytes` of plain ASCII prose-like text (no JSON escapes needed).
pub fn context_text(bytes: usize) -> String {
    const WORDS: &str = "the agent read src/main.rs and planned the next step of the refactor ";
    WORDS.chars().cycle().take(bytes).collect()
}

fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// Background sessions per transaction of the bulk fill.
const BULK_SESSIONS_PER_TXN: u64 = 100_000;

/// A random (version 4) UUID's text, in SQLite's SQL.
const SQLITE_UUID: &str = "lower(hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' \
    || substr(hex(randomblob(2)), 2) || '-' || substr('89ab', 1 + (abs(random()) % 4), 1) \
    || substr(hex(randomblob(2)), 2) || '-' || hex(randomblob(6)))";

/// `n` background sessions (2 running agents, 10 held locks, a
/// `session_start` row each) in five `INSERT … SELECT` statements over a
/// temporary table of ids, inside the caller's transaction (SQLite and
/// PostgreSQL).
async fn bulk_sessions(txn: &DatabaseTransaction, n: u64) -> BoxResult<()> {
    let backend = txn.get_database_backend();
    let token = reserve_tokens(txn, n * 10).await?;
    let at = sea_orm::Value::from(sea_orm::prelude::DateTimeWithTimeZone::from(now()));
    let (create, uuid, details, ten, p1, p2) = if backend == DatabaseBackend::Postgres {
        (
            format!(
                "CREATE TEMPORARY TABLE bg ON COMMIT DROP AS SELECT g AS n, \
                 gen_random_uuid()::text AS sid, gen_random_uuid()::text AS a0, \
                 gen_random_uuid()::text AS a1 FROM generate_series(1, {n}) g"
            ),
            "gen_random_uuid()::text".to_owned(),
            "jsonb_build_object('session_id', sid)",
            "generate_series(0, 9) AS t(l)",
            "$1",
            "$2",
        )
    } else {
        (
            format!(
                "CREATE TEMPORARY TABLE bg AS WITH RECURSIVE c(n) AS \
                 (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < {n}) \
                 SELECT n, {SQLITE_UUID} AS sid, {SQLITE_UUID} AS a0, {SQLITE_UUID} AS a1 FROM c"
            ),
            SQLITE_UUID.to_owned(),
            "json_object('session_id', sid)",
            "(WITH RECURSIVE t(l) AS (SELECT 0 UNION ALL SELECT l + 1 FROM t WHERE l < 9) \
             SELECT l FROM t) AS t",
            "?1",
            "?2",
        )
    };
    let statements = [
        format!(
            "INSERT INTO global_sessions (id, status, started_at, updated_at) \
             SELECT sid, 'active', {p1}, {p1} FROM bg"
        ),
        format!(
            "INSERT INTO audit_log (id, event_type, event_time, session_id, details) \
             SELECT {uuid}, 'session_start', {p1}, sid, {details} FROM bg ORDER BY n"
        ),
        format!(
            "INSERT INTO agent_executions (id, session_id, agent_type, status, started_at) \
             SELECT a0, sid, 'agent-0', 'running', {p1} FROM bg \
             UNION ALL SELECT a1, sid, 'agent-1', 'running', {p1} FROM bg"
        ),
        format!(
            "INSERT INTO resource_locks \
             (id, agent_id, session_id, resource_type, resource_key, fencing_token, acquired_at) \
             SELECT {uuid}, CASE WHEN t.l % 2 = 0 THEN a0 ELSE a1 END, sid, 'file', \
             sid || '/' || t.l, {p2} + (n - 1) * 10 + t.l, {p1} FROM bg CROSS JOIN {ten}"
        ),
    ];
    txn.execute_unprepared(&create).await?;
    for (i, sql) in statements.iter().enumerate() {
        let values = if i == 3 {
            vec![at.clone(), token.into()]
        } else {
            vec![at.clone()]
        };
        txn.execute_raw(Statement::from_sql_and_values(backend, sql, values))
            .await
            .map_err(|e| format!("{sql}: {e}"))?;
    }
    if backend != DatabaseBackend::Postgres {
        txn.execute_unprepared("DROP TABLE temp.bg").await?;
    }
    Ok(())
}

/// Reserves `n` fencing tokens from where the library draws them; returns
/// the first.
async fn reserve_tokens(txn: &DatabaseTransaction, n: u64) -> BoxResult<i64> {
    use sea_orm::ExprTrait;
    let step = i64::try_from(n)?;
    if txn.get_database_backend() == DatabaseBackend::Postgres {
        // Bulk SQL: the sequence, where the schema has one, moved on by `n` at once.
        let sql = format!(
            "SELECT setval(to_regclass('lock_fencing_seq'), \
             nextval(to_regclass('lock_fencing_seq')) + {step} - 1)"
        );
        let row = txn
            .query_one_raw(Statement::from_string(DatabaseBackend::Postgres, sql))
            .await?;
        if let Some(last) = row.and_then(|r| r.try_get_by_index::<Option<i64>>(0).ok().flatten()) {
            return Ok(last - step + 1);
        }
    }
    lock_fencing::Entity::update_many()
        .col_expr(
            lock_fencing::Column::LastToken,
            Expr::col(lock_fencing::Column::LastToken).add(step),
        )
        .filter(lock_fencing::Column::Id.eq(1))
        .exec(txn)
        .await?;
    let last = lock_fencing::Entity::find_by_id(1)
        .one(txn)
        .await?
        .ok_or("lock_fencing has no counter row; were the migrations run?")?
        .last_token;
    Ok(last - step + 1)
}

// Columns added by later migrations keep their defaults (`..Default::default()`).
#[allow(clippy::needless_update)]
async fn insert_sessions(
    txn: &DatabaseTransaction,
    count: u64,
    agents: usize,
    locks: u64,
) -> BoxResult<Vec<Uuid>> {
    let at = now();
    let total_locks = count * locks;
    let mut token = if total_locks > 0 {
        reserve_tokens(txn, total_locks).await?
    } else {
        0
    };
    let ids: Vec<Uuid> = (0..count).map(|_| Uuid::new_v4()).collect();

    let sessions = ids.iter().map(|&id| global_sessions::ActiveModel {
        id: Set(id.to_string()),
        status: Set("active".to_owned()),
        started_at: Set(at.into()),
        updated_at: Set(at.into()),
        completed_at: Set(None),
        context_data: Set(None),
        ..Default::default()
    });
    insert_chunked(sessions, |chunk| {
        global_sessions::Entity::insert_many(chunk).exec_without_returning(txn)
    })
    .await?;

    let audit = ids.iter().map(|&id| audit_log::ActiveModel {
        id: Set(Uuid::new_v4().to_string()),
        event_type: Set("session_start".to_owned()),
        event_time: Set(at.into()),
        session_id: Set(Some(id.to_string())),
        details: Set(serde_json::json!({ "session_id": id })),
        ..Default::default()
    });
    insert_chunked(audit, |chunk| {
        audit_log::Entity::insert_many(chunk).exec_without_returning(txn)
    })
    .await?;

    let mut agent_rows = Vec::with_capacity(ids.len() * agents);
    let mut lock_rows = Vec::new();
    for &session in &ids {
        let agent_ids: Vec<Uuid> = (0..agents).map(|_| Uuid::new_v4()).collect();
        for (a, &agent) in agent_ids.iter().enumerate() {
            agent_rows.push(agent_executions::ActiveModel {
                id: Set(agent.to_string()),
                session_id: Set(session.to_string()),
                agent_type: Set(format!("agent-{a}")),
                status: Set("running".to_owned()),
                started_at: Set(at.into()),
                completed_at: Set(None),
            });
        }
        for l in 0..locks {
            let agent = agent_ids
                .get(usize::try_from(l)? % agents.max(1))
                .ok_or("a session with locks needs at least one agent")?;
            lock_rows.push(resource_locks::ActiveModel {
                id: Set(Uuid::new_v4().to_string()),
                agent_id: Set(agent.to_string()),
                session_id: Set(session.to_string()),
                resource_type: Set("file".to_owned()),
                resource_key: Set(format!("{session}/{l}")),
                fencing_token: Set(token),
                acquired_at: Set(at.into()),
                expires_at: Set(None),
                released_at: Set(None),
                release_reason: Set(None),
                waited_since: Set(None),
            });
            token += 1;
            if lock_rows.len() == ROWS_PER_INSERT {
                flush_agents_then_locks(txn, &mut agent_rows, &mut lock_rows).await?;
            }
        }
    }
    flush_agents_then_locks(txn, &mut agent_rows, &mut lock_rows).await?;
    Ok(ids)
}

/// Writes the pending agents (a lock's foreign key needs its agent) and locks.
async fn flush_agents_then_locks(
    txn: &DatabaseTransaction,
    agents: &mut Vec<agent_executions::ActiveModel>,
    locks: &mut Vec<resource_locks::ActiveModel>,
) -> BoxResult<()> {
    insert_chunked(agents.drain(..), |chunk| {
        agent_executions::Entity::insert_many(chunk).exec_without_returning(txn)
    })
    .await?;
    insert_chunked(locks.drain(..), |chunk| {
        resource_locks::Entity::insert_many(chunk).exec_without_returning(txn)
    })
    .await?;
    Ok(())
}

async fn insert_chunked<M, F, Fut, T>(rows: impl Iterator<Item = M>, mut insert: F) -> BoxResult<()>
where
    F: FnMut(Vec<M>) -> Fut,
    Fut: std::future::Future<Output = Result<T, sea_orm::DbErr>>,
{
    let mut chunk = Vec::with_capacity(ROWS_PER_INSERT);
    for row in rows {
        chunk.push(row);
        if chunk.len() == ROWS_PER_INSERT {
            insert(std::mem::take(&mut chunk)).await?;
        }
    }
    if !chunk.is_empty() {
        insert(chunk).await?;
    }
    Ok(())
}

/// The server URL from `TEST_POSTGRES_URL` / `TEST_MYSQL_URL`, a fresh
/// database created on it, and the admin connection that will drop it.
async fn create_server_database(
    backend: BackendKind,
) -> BoxResult<(String, String, DatabaseConnection)> {
    let (var, compiled, feature) = match backend {
        BackendKind::Postgres => ("TEST_POSTGRES_URL", cfg!(feature = "postgres"), "postgres"),
        _ => ("TEST_MYSQL_URL", cfg!(feature = "mysql"), "mysql"),
    };
    if !compiled {
        return Err(format!(
            "backend {} needs the `{feature}` feature: cargo run --release --features {feature} --example scale …",
            backend.name()
        )
        .into());
    }
    let server_url = std::env::var(var)
        .ok()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            format!("{var} is not set: point it at a server the example may create databases on")
        })?;
    let admin = Database::connect(server_url.as_str())
        .await
        .map_err(|e| format!("cannot connect to {var}={server_url}: {e}"))?;
    let name = format!("dsess_scale_{}", Uuid::new_v4().simple());
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .map_err(|e| format!("cannot create database {name} on {server_url}: {e}"))?;
    Ok((server_url, name, admin))
}

async fn drop_server_database(backend: BackendKind, admin: &DatabaseConnection, name: &str) {
    let sql = if admin.get_database_backend() == DatabaseBackend::Postgres {
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    } else {
        format!("DROP DATABASE IF EXISTS {name}")
    };
    if let Err(e) = admin.execute_unprepared(&sql).await {
        eprintln!(
            "warning: could not drop {} database {name}: {e}",
            backend.name()
        );
    }
}

/// `scheme://user@host:port/db?query` with `db` replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let authority_end = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{name}", &base[..authority_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}
