//! `--lockload CLIENTS,INSTANCES`: acquire + release pairs on distinct
//! resources (no two clients want the same one) through the public API,
//! against a raw-SQL floor measured in the same minutes; and `--acquire`'s
//! one-statement floor.
//!
//! The floor is the least a lock table can do: one `INSERT … RETURNING` into
//! a table with a unique index over held rows (partial on SQLite and
//! PostgreSQL; on MariaDB, which has no partial index, a `held` column that
//! is NULL once released), then one `UPDATE` that releases it, each in its
//! own implicit transaction, through sqlx on the same pools the managers
//! write through.
//!
//! Clients are spread over INSTANCES managers on one store (as INSTANCES
//! processes of an app would open it), each client with its own session,
//! agent and resource. Each side runs for `--lockload-seconds`, three times,
//! alternating which goes first; the line prints the medians of both sides
//! and the library's one-client figure from the same run.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{SubsecRound, Utc};
use demiarch_sessions::SessionManager;
use sea_orm::{sqlx, ConnectionTrait, DatabaseBackend, DatabaseConnection};
use serde::Serialize;
use uuid::Uuid;

use crate::args::Args;
use crate::fixture::{BackendKind, BoxResult, Fixture};
use crate::report::{peak_rss_kb, print_json, summarize};
use crate::{manager_config, median, with_fixture, Errors};

/// Runs of each side; the line prints their medians.
const RUNS: usize = 3;

/// The floor's table, per backend.
fn floor_ddl(backend: DatabaseBackend) -> [&'static str; 2] {
    match backend {
        DatabaseBackend::Postgres => [
            "CREATE TABLE floor_locks (
                id BIGSERIAL PRIMARY KEY,
                resource_type TEXT NOT NULL,
                resource_key TEXT NOT NULL,
                holder TEXT NOT NULL,
                acquired_at TIMESTAMPTZ NOT NULL,
                released_at TIMESTAMPTZ)",
            "CREATE UNIQUE INDEX ux_floor_locks_held ON floor_locks (resource_type, resource_key)
             WHERE released_at IS NULL",
        ],
        DatabaseBackend::MySql => [
            "CREATE TABLE floor_locks (
                id BIGINT AUTO_INCREMENT PRIMARY KEY,
                resource_type VARCHAR(255) NOT NULL,
                resource_key VARCHAR(255) NOT NULL,
                holder CHAR(36) NOT NULL,
                acquired_at DATETIME(6) NOT NULL,
                released_at DATETIME(6) NULL,
                held TINYINT NULL)",
            "CREATE UNIQUE INDEX ux_floor_locks_held ON floor_locks (resource_type, resource_key, held)",
        ],
        _ => [
            "CREATE TABLE floor_locks (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                resource_type TEXT NOT NULL,
                resource_key TEXT NOT NULL,
                holder TEXT NOT NULL,
                acquired_at TEXT NOT NULL,
                released_at TEXT)",
            "CREATE UNIQUE INDEX ux_floor_locks_held ON floor_locks (resource_type, resource_key)
             WHERE released_at IS NULL",
        ],
    }
}

/// The floor's acquire and release, per backend.
fn floor_sql(backend: DatabaseBackend) -> [&'static str; 2] {
    match backend {
        DatabaseBackend::Postgres => [
            "INSERT INTO floor_locks (resource_type, resource_key, holder, acquired_at)
             VALUES ($1, $2, $3, $4) RETURNING id",
            "UPDATE floor_locks SET released_at = $1 WHERE id = $2 AND released_at IS NULL",
        ],
        DatabaseBackend::MySql => [
            "INSERT INTO floor_locks (resource_type, resource_key, holder, acquired_at, held)
             VALUES (?, ?, ?, ?, 1) RETURNING id",
            "UPDATE floor_locks SET released_at = ?, held = NULL WHERE id = ? AND released_at IS NULL",
        ],
        _ => [
            "INSERT INTO floor_locks (resource_type, resource_key, holder, acquired_at)
             VALUES (?, ?, ?, ?) RETURNING id",
            "UPDATE floor_locks SET released_at = ? WHERE id = ? AND released_at IS NULL",
        ],
    }
}

/// Creates the floor's table on the store.
pub async fn create_floor(conn: &DatabaseConnection) -> BoxResult<()> {
    for ddl in floor_ddl(conn.get_database_backend()) {
        conn.execute_unprepared(ddl).await?;
    }
    Ok(())
}

/// The floor's one-statement acquire; returns the row's id.
pub async fn floor_acquire(conn: &DatabaseConnection, key: &str, holder: Uuid) -> BoxResult<i64> {
    let backend = conn.get_database_backend();
    let [insert, _] = floor_sql(backend);
    let now = Utc::now().trunc_subsecs(6);
    let holder = holder.to_string();
    macro_rules! run {
        ($pool:expr) => {{
            let (id,): (i64,) = sqlx::query_as(insert)
                .bind("load")
                .bind(key)
                .bind(&holder)
                .bind(now)
                .fetch_one($pool)
                .await?;
            Ok(id)
        }};
    }
    match backend {
        DatabaseBackend::Sqlite => run!(conn.get_sqlite_connection_pool()),
        #[cfg(feature = "postgres")]
        DatabaseBackend::Postgres => run!(conn.get_postgres_connection_pool()),
        #[cfg(feature = "mysql")]
        DatabaseBackend::MySql => run!(conn.get_mysql_connection_pool()),
        #[allow(unreachable_patterns)]
        other => Err(format!("backend {other:?} is not compiled in").into()),
    }
}

/// The floor's one-statement release.
pub async fn floor_release(conn: &DatabaseConnection, id: i64) -> BoxResult<()> {
    let backend = conn.get_database_backend();
    let [_, update] = floor_sql(backend);
    let now = Utc::now().trunc_subsecs(6);
    macro_rules! run {
        ($pool:expr) => {{
            let done = sqlx::query(update)
                .bind(now)
                .bind(id)
                .execute($pool)
                .await?;
            if done.rows_affected() != 1 {
                return Err(format!("floor lock {id} was not held").into());
            }
            Ok(())
        }};
    }
    match backend {
        DatabaseBackend::Sqlite => run!(conn.get_sqlite_connection_pool()),
        #[cfg(feature = "postgres")]
        DatabaseBackend::Postgres => run!(conn.get_postgres_connection_pool()),
        #[cfg(feature = "mysql")]
        DatabaseBackend::MySql => run!(conn.get_mysql_connection_pool()),
        #[allow(unreachable_patterns)]
        other => Err(format!("backend {other:?} is not compiled in").into()),
    }
}

/// One `--lockload` line.
#[derive(Debug, Serialize)]
struct LockLoadLine {
    mode: &'static str,
    backend: &'static str,
    clients: usize,
    instances: usize,
    seconds: u64,
    /// Medians over the runs, pairs per second.
    library_pairs_per_s: f64,
    floor_pairs_per_s: f64,
    ratio_to_floor: f64,
    /// The library with one client on one instance, in the same run.
    library_one_client_pairs_per_s: f64,
    ratio_to_one_client: f64,
    /// Acquire latency of the library's run with the median rate.
    library_acquire_p50_us: f64,
    library_acquire_p99_us: f64,
    floor_acquire_p50_us: f64,
    floor_acquire_p99_us: f64,
    library_runs: Vec<f64>,
    floor_runs: Vec<f64>,
    one_client_runs: Vec<f64>,
    errors: u64,
    first_error: Option<String>,
    peak_rss_kb: u64,
}

/// What one side's run came to.
struct Run {
    pairs_per_s: f64,
    acquire: Vec<Duration>,
}

/// A client of the library: its manager, agent and resource key.
#[derive(Clone)]
struct Client {
    manager: SessionManager,
    agent: Uuid,
    key: String,
}

/// Runs `body` from every client for `seconds`; pairs per second over all.
async fn drive<C, F, Fut>(clients: &[C], seconds: u64, errors: &Arc<Errors>, body: F) -> Run
where
    C: Clone + Send + 'static,
    F: Fn(C) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<Duration, String>> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut handles = Vec::new();
    for client in clients {
        let (client, stop, errors, body) =
            (client.clone(), stop.clone(), errors.clone(), body.clone());
        handles.push(tokio::spawn(async move {
            let mut acquire = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match body(client.clone()).await {
                    Ok(took) => acquire.push(took),
                    Err(e) => {
                        errors.record(e);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            acquire
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acquire = Vec::new();
    for handle in handles {
        match handle.await {
            Ok(samples) => acquire.extend(samples),
            Err(e) => errors.record(e),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    Run {
        pairs_per_s: acquire.len() as f64 / elapsed,
        acquire,
    }
}

async fn library_pair(client: Client) -> Result<Duration, String> {
    let started = Instant::now();
    let grant = client
        .manager
        .acquire_lock(client.agent, "load", &client.key)
        .await
        .map_err(|e| format!("acquire: {e}"))?;
    let took = started.elapsed();
    client
        .manager
        .release_lock(grant.lock_id)
        .await
        .map_err(|e| format!("release: {e}"))?;
    Ok(took)
}

async fn floor_pair(client: (DatabaseConnection, String, Uuid)) -> Result<Duration, String> {
    let (conn, key, holder) = client;
    let started = Instant::now();
    let id = floor_acquire(&conn, &key, holder)
        .await
        .map_err(|e| format!("floor acquire: {e}"))?;
    let took = started.elapsed();
    floor_release(&conn, id)
        .await
        .map_err(|e| format!("floor release: {e}"))?;
    Ok(took)
}

pub async fn run(args: &Args, clients: usize, instances: usize, seconds: u64) -> BoxResult<()> {
    if args.backend == BackendKind::SqliteMemory && instances > 1 {
        return Err("--lockload on sqlite-memory takes one instance: every connect is a database of its own".into());
    }
    let line: Arc<Mutex<Option<LockLoadLine>>> = Arc::default();
    let out = line.clone();
    with_fixture(args, |fx| async move {
        let (line, others) = measure(args, &fx, clients, instances, seconds).await?;
        for manager in others {
            manager.close().await?;
        }
        *out.lock().unwrap_or_else(PoisonError::into_inner) = Some(line);
        Ok(())
    })
    .await?;
    let taken = line.lock().unwrap_or_else(PoisonError::into_inner).take();
    if let Some(line) = taken {
        print_json(&line)?;
    }
    Ok(())
}

async fn measure(
    args: &Args,
    fx: &Fixture,
    clients: usize,
    instances: usize,
    seconds: u64,
) -> BoxResult<(LockLoadLine, Vec<SessionManager>)> {
    let mut others = Vec::new();
    let mut managers = vec![fx.manager.clone()];
    for _ in 1..instances.max(1) {
        match fx.second_manager(manager_config(args)).await? {
            Some(manager) => {
                others.push(manager.clone());
                managers.push(manager);
            }
            None => break,
        }
    }
    create_floor(fx.connection()).await?;
    let mut library = Vec::new();
    let mut floor = Vec::new();
    for (i, manager) in (0..clients).map(|i| (i, &managers[i % managers.len()])) {
        let session = manager.start_session().await?;
        let agent = manager.register_agent(session, "load").await?;
        let key = format!("client-{i}");
        library.push(Client {
            manager: manager.clone(),
            agent,
            key: key.clone(),
        });
        floor.push((manager.write_connection().clone(), key, agent));
    }
    let one = vec![library[0].clone()];
    let errors = Arc::new(Errors::default());
    let (mut lib_runs, mut floor_runs, mut one_runs) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..RUNS {
        let lib_first = round % 2 == 0;
        for side in 0..3 {
            match (side, lib_first) {
                (0, true) | (1, false) => {
                    lib_runs.push(drive(&library, seconds, &errors, library_pair).await)
                }
                (0, false) | (1, true) => {
                    floor_runs.push(drive(&floor, seconds, &errors, floor_pair).await)
                }
                _ => one_runs.push(drive(&one, seconds, &errors, library_pair).await),
            }
        }
    }
    let rates = |runs: &[Run]| {
        runs.iter()
            .map(|r| crate::report::round1(r.pairs_per_s))
            .collect::<Vec<_>>()
    };
    let middle = |runs: &[Run]| -> (f64, f64) {
        let m = median(&runs.iter().map(|r| r.pairs_per_s).collect::<Vec<_>>());
        let run = runs.iter().min_by(|a, b| {
            (a.pairs_per_s - m)
                .abs()
                .total_cmp(&(b.pairs_per_s - m).abs())
        });
        run.map(|r| summarize(&r.acquire)).unwrap_or((0.0, 0.0))
    };
    let lib = median(&rates(&lib_runs));
    let flo = median(&rates(&floor_runs));
    let one_rate = median(&rates(&one_runs));
    let (lib_p50, lib_p99) = middle(&lib_runs);
    let (floor_p50, floor_p99) = middle(&floor_runs);
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            (a / b * 1000.0).round() / 1000.0
        } else {
            0.0
        }
    };
    let line = LockLoadLine {
        mode: "lockload",
        backend: args.backend.name(),
        clients,
        instances: managers.len(),
        seconds,
        library_pairs_per_s: lib,
        floor_pairs_per_s: flo,
        ratio_to_floor: ratio(lib, flo),
        library_one_client_pairs_per_s: one_rate,
        ratio_to_one_client: ratio(lib, one_rate),
        library_acquire_p50_us: lib_p50,
        library_acquire_p99_us: lib_p99,
        floor_acquire_p50_us: floor_p50,
        floor_acquire_p99_us: floor_p99,
        library_runs: rates(&lib_runs),
        floor_runs: rates(&floor_runs),
        one_client_runs: rates(&one_runs),
        errors: errors.count.load(Ordering::Relaxed),
        first_error: errors
            .first
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone(),
        peak_rss_kb: peak_rss_kb(),
    };
    Ok((line, others))
}
