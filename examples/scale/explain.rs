//! `--explain`: the plan of every statement of both ends on the chosen
//! backend. The library's statements are the ones it really ran, recorded by
//! SeaORM's metric callback during an `end_session` call, so they cannot drift
//! from src/session/end.rs; the seed's are its three statements.
use std::sync::{Arc, Mutex, PoisonError};

use demiarch_sessions::{Config, SessionManager};
use sea_orm::{ConnectionTrait, DatabaseBackend, QueryResult, Statement, Value};
use uuid::Uuid;

use crate::fixture::{BoxResult, Fixture};
use crate::raw_seed::{SEED_SQL, SEED_SQL_POSTGRES};

/// Every statement `end_session` runs for a fresh session, then for the same
/// session again (the already-ended path reads the row).
pub async fn orm_statements(fx: &Fixture, locks: u64) -> BoxResult<Vec<Statement>> {
    let recorded: Arc<Mutex<Vec<Statement>>> = Arc::default();
    let sink = recorded.clone();
    let mut conn = fx.connection().clone();
    conn.set_metric_callback(move |info| {
        sink.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(info.statement.clone());
    });
    let recorder = SessionManager::new(conn, Config::default())?;
    let session = fx.target_session(locks, 1024).await?;
    let first = recorder.end_session(session).await?;
    if first.locks_released != locks {
        return Err(format!(
            "end_session released {} locks, expected {locks}",
            first.locks_released
        )
        .into());
    }
    recorder.end_session(session).await?;
    let statements = recorded
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    Ok(statements)
}

/// The seed's three statements with the values its end would bind.
pub async fn seed_statements(fx: &Fixture, locks: u64) -> BoxResult<Vec<Statement>> {
    let backend = fx.connection().get_database_backend();
    let sql = if backend == DatabaseBackend::Postgres {
        SEED_SQL_POSTGRES
    } else {
        SEED_SQL
    };
    let session = fx.target_session(locks, 1024).await?;
    let id = session.to_string();
    let context =
        serde_json::json!({"version": 1, "windows": fx.manager.contexts().windows(session)});
    let details = serde_json::json!({"session_id": id, "cleanup_ms": 0});
    let values: [Vec<Value>; 3] = [
        vec![Value::from(context), Value::from(id.clone())],
        vec![Value::from(id)],
        vec![
            Value::from(Uuid::new_v4().to_string()),
            Value::from(details),
        ],
    ];
    Ok(sql
        .iter()
        .zip(values)
        .map(|(sql, values)| Statement::from_sql_and_values(backend, *sql, values))
        .collect())
}

/// The plan's lines for one statement.
pub async fn plan(conn: &impl ConnectionTrait, stmt: &Statement) -> BoxResult<Vec<String>> {
    let prefix = match stmt.db_backend {
        DatabaseBackend::Sqlite => "EXPLAIN QUERY PLAN ",
        _ => "EXPLAIN ",
    };
    let explain = Statement {
        sql: format!("{prefix}{}", stmt.sql),
        values: stmt.values.clone(),
        db_backend: stmt.db_backend,
    };
    let rows = conn
        .query_all_raw(explain)
        .await
        .map_err(|e| format!("EXPLAIN {}: {e}", stmt.sql))?;
    rows.iter()
        .map(|row| match stmt.db_backend {
            DatabaseBackend::Sqlite => Ok(text(row, "detail")),
            DatabaseBackend::Postgres => Ok(text(row, "QUERY PLAN")),
            _ => Ok(["select_type", "table", "type", "key", "rows", "Extra"]
                .iter()
                .map(|c| format!("{c}={}", text(row, c)))
                .collect::<Vec<_>>()
                .join(" ")),
        })
        .collect()
}

/// A column as text, whatever its type.
fn text(row: &QueryResult, col: &str) -> String {
    if let Ok(v) = row.try_get::<Option<String>>("", col) {
        return v.unwrap_or_else(|| "NULL".into());
    }
    if let Ok(v) = row.try_get::<Option<i64>>("", col) {
        return v.map_or_else(|| "NULL".into(), |v| v.to_string());
    }
    if let Ok(v) = row.try_get::<Option<u64>>("", col) {
        return v.map_or_else(|| "NULL".into(), |v| v.to_string());
    }
    if let Ok(v) = row.try_get::<Option<f64>>("", col) {
        return v.map_or_else(|| "NULL".into(), |v| v.to_string());
    }
    "?".into()
}

/// Whether a plan line reads a whole table (or a whole index).
pub fn is_full_scan(backend: DatabaseBackend, line: &str) -> bool {
    match backend {
        DatabaseBackend::Sqlite => {
            line.trim_start().starts_with("SCAN") && !line.contains("CONSTANT ROW")
        }
        DatabaseBackend::Postgres => line.contains("Seq Scan"),
        // MariaDB lists a plain INSERT as `type=ALL` with no rows read.
        _ => {
            !line.contains("select_type=INSERT")
                && (line.contains("type=ALL") || line.contains("type=index "))
        }
    }
}

pub async fn run(fx: &Fixture, locks: u64) -> BoxResult<()> {
    let backend = fx.connection().get_database_backend();
    for (name, statements) in [
        ("orm", orm_statements(fx, locks).await?),
        ("raw-seed", seed_statements(fx, locks).await?),
    ] {
        println!("== {name} on {} ==", fx.backend.name());
        for stmt in &statements {
            let lines = plan(fx.connection(), stmt).await?;
            let verdict = if lines.iter().any(|l| is_full_scan(backend, l)) {
                "FULL SCAN"
            } else {
                "index only"
            };
            println!("-- [{verdict}] {}", one_line(&stmt.sql));
            for line in &lines {
                println!("     {line}");
            }
        }
    }
    Ok(())
}

fn one_line(sql: &str) -> String {
    sql.split_whitespace().collect::<Vec<_>>().join(" ")
}
