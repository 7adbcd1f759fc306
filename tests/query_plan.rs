//! Ending a session reads no table in full: on SQLite, `EXPLAIN QUERY PLAN` of
//! every statement `end_session` runs shows index searches only, so the cost
//! of an end does not grow with the number of sessions and locks stored.
//!
//! The statements are the ones the library really ran, recorded by SeaORM's
//! metric callback on a clone of the manager's connection, so this test
//! cannot drift from src/session/end.rs.
mod common;

use std::sync::{Arc, Mutex, PoisonError};

use common::{populated_session, Backend, TestDb};
use demiarch_sessions::SessionManager;
use sea_orm::{ConnectionTrait, Statement};

/// The plan's `detail` lines for one recorded statement, run with its own values.
async fn query_plan(db: &TestDb, stmt: &Statement) -> Vec<String> {
    let explain = Statement {
        sql: format!("EXPLAIN QUERY PLAN {}", stmt.sql),
        values: stmt.values.clone(),
        db_backend: stmt.db_backend,
    };
    db.manager
        .connection()
        .query_all_raw(explain)
        .await
        .unwrap_or_else(|e| panic!("EXPLAIN QUERY PLAN {}: {e}", stmt.sql))
        .iter()
        .map(|row| row.try_get::<String>("", "detail").expect("detail column"))
        .collect()
}

/// A full pass over a table or an index (`SCAN t`, `SCAN t USING INDEX i`).
fn is_full_scan(detail: &str) -> bool {
    detail.starts_with("SCAN") && !detail.contains("CONSTANT ROW")
}

/// A lookup through a key (`SEARCH t USING [COVERING] INDEX i (col=?)`).
fn is_index_search(detail: &str) -> bool {
    detail.starts_with("SEARCH") && (detail.contains("INDEX") || detail.contains("PRIMARY KEY"))
}

#[tokio::test]
async fn every_statement_of_end_session_uses_an_index() {
    let db = TestDb::new(Backend::SqliteMemory).await;
    // Other sessions' rows, so that a scan would have something to read.
    for _ in 0..3 {
        populated_session(&db, 2, 5).await;
    }
    let (session, _) = populated_session(&db, 4, 10).await;

    let recorded: Arc<Mutex<Vec<Statement>>> = Arc::default();
    let sink = recorded.clone();
    let mut conn = db.manager.connection().clone();
    conn.set_metric_callback(move |info| {
        sink.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(info.statement.clone());
    });
    let recorder = SessionManager::new(conn, db.manager.config().clone()).expect("manager");
    recorder
        .contexts()
        .put(session, "plan", serde_json::json!({"step": 1}))
        .expect("put window");
    let report = recorder.end_session(session).await.expect("end_session");
    assert_eq!(report.locks_released, 40);
    // Ending again takes the already-ended path, which reads the session row.
    let again = recorder.end_session(session).await.expect("second end");
    assert!(again.already_ended);

    let statements: Vec<Statement> = recorded
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let sqls: Vec<String> = statements.iter().map(|s| s.sql.clone()).collect();
    for start in [
        r#"UPDATE "global_sessions""#,
        r#"UPDATE "resource_locks""#,
        r#"UPDATE "agent_executions""#,
        r#"INSERT INTO "audit_log""#,
        r#"SELECT "global_sessions""#,
    ] {
        assert!(
            sqls.iter().any(|s| s.trim_start().starts_with(start)),
            "no {start} was recorded; recorded: {sqls:#?}"
        );
    }

    for stmt in &statements {
        let plan = query_plan(&db, stmt).await;
        assert!(
            !plan.iter().any(|d| is_full_scan(d)),
            "full scan in the plan of {}\nplan: {plan:#?}",
            stmt.sql
        );
        // Every statement that reads a table finds its rows through an index.
        let verb = stmt.sql.split_whitespace().next().unwrap_or("");
        if matches!(verb, "UPDATE" | "DELETE" | "SELECT") || stmt.sql.contains(" FROM ") {
            assert!(
                plan.iter().any(|d| is_index_search(d)),
                "no index search in the plan of {}\nplan: {plan:#?}",
                stmt.sql
            );
        }
    }
    db.cleanup().await;
}
