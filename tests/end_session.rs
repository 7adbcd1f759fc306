//! Integration tests for `SessionManager::end_session` (story 6.5) and the lock
//! invariants it relies on. Every test asserts on the rows in the database.
mod common;
use common::id;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::{SubsecRound, Utc};
use common::*;
use demiarch_sessions::{Config, ContextWindow, Error, SessionManager};
use entity::{agent_executions, resource_locks};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, SqlErr, Statement,
};
use serde_json::json;
use uuid::Uuid;

// ---- helpers local to this file ------------------------------------------------

/// A populated session plus one more lock, acquired by its first agent and
/// released with `release_lock` before anything else happens.
async fn populated_with_released(
    db: &TestDb,
    agents: usize,
    locks_per_agent: usize,
) -> (Uuid, Vec<Uuid>, Uuid) {
    let (session, ids) = populated_session(db, agents, locks_per_agent).await;
    let grant = db
        .manager
        .acquire_lock(ids[0], "file", &format!("{session}/released-early"))
        .await
        .expect("acquire extra lock");
    db.manager
        .release_lock(grant.lock_id)
        .await
        .expect("release extra lock");
    (session, ids, grant.lock_id)
}

/// Where an injected failure strikes inside an end.
#[derive(Clone, Copy)]
enum Failing {
    /// The `session_end` audit INSERT.
    AuditInsert,
    /// The release of the session's held locks, before the audit INSERT.
    LockRelease,
}

impl Failing {
    fn table(self) -> &'static str {
        match self {
            Failing::AuditInsert => "audit_log",
            Failing::LockRelease => "resource_locks",
        }
    }
}

/// A trigger named `fail_end` that makes one step of every end fail, per backend.
async fn create_failing_trigger(db: &TestDb, at: Failing) {
    let (event, condition) = match at {
        Failing::AuditInsert => ("INSERT", "NEW.event_type = 'session_end'"),
        Failing::LockRelease => ("UPDATE", "NEW.release_reason = 'session_end'"),
    };
    let table = at.table();
    let statements: Vec<String> = match db.backend {
        Backend::Postgres => vec![
            format!(
                "CREATE FUNCTION fail_end() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                 IF {condition} THEN RAISE EXCEPTION 'injected failure'; END IF; \
                 RETURN NEW; END $$"
            ),
            format!(
                "CREATE TRIGGER fail_end BEFORE {event} ON {table} FOR EACH ROW \
                 EXECUTE FUNCTION fail_end()"
            ),
        ],
        Backend::MySql => vec![format!(
            "CREATE TRIGGER fail_end BEFORE {event} ON {table} FOR EACH ROW \
             BEGIN IF {condition} THEN \
             SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'injected failure'; END IF; END"
        )],
        Backend::SqliteMemory | Backend::SqliteFile => vec![format!(
            "CREATE TRIGGER fail_end BEFORE {event} ON {table} \
             WHEN {condition} \
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        )],
    };
    for sql in statements {
        db.manager
            .connection()
            .execute_unprepared(&sql)
            .await
            .expect("create trigger");
    }
}

async fn drop_failing_trigger(db: &TestDb, at: Failing) {
    let sql = match db.backend {
        Backend::Postgres => format!("DROP TRIGGER fail_end ON {}", at.table()),
        _ => "DROP TRIGGER fail_end".to_owned(),
    };
    db.manager
        .connection()
        .execute_unprepared(&sql)
        .await
        .expect("drop trigger");
}

/// Held (unreleased) lock rows on one resource, over every session.
async fn held_on(
    db: &TestDb,
    resource_type: &str,
    resource_key: &str,
) -> Vec<resource_locks::Model> {
    all_locks(db)
        .await
        .into_iter()
        .filter(|l| {
            l.resource_type == resource_type
                && l.resource_key == resource_key
                && l.released_at.is_none()
        })
        .collect()
}

fn json_u64(details: &serde_json::Value, key: &str) -> u64 {
    details[key]
        .as_u64()
        .unwrap_or_else(|| panic!("details.{key} is not an unsigned integer: {details}"))
}

// ---- 1. AC1/AC2 ------------------------------------------------------------------

#[tokio::test]
async fn end_marks_session_completed_with_timestamps() {
    each_backend(
        "end_marks_session_completed_with_timestamps",
        |db| async move {
            let (session, _) = populated_session(&db, 1, 1).await;
            let started = session_row(&db, session).await;
            assert_eq!(started.status, "active");
            assert_eq!(started.completed_at, None);

            let before = Utc::now();
            let report = db.manager.end_session(session).await.expect("end");
            let after = Utc::now();

            let row = session_row(&db, session).await;
            assert_eq!(row.status, "completed");
            let completed_at = row.completed_at.expect("completed_at set");
            assert!(
                completed_at >= before - chrono::Duration::microseconds(1),
                "completed_at {completed_at} is before the call started ({before})"
            );
            assert!(
                completed_at <= after,
                "completed_at {completed_at} is after the call returned ({after})"
            );
            assert_eq!(completed_at, report.completed_at);
            assert_eq!(row.updated_at, completed_at);
            assert_eq!(
                row.started_at, started.started_at,
                "started_at must not change"
            );
            assert_eq!(report.session_id, session);
            assert!(!report.already_ended);
        },
    )
    .await;
}

// ---- 2. AC3 ----------------------------------------------------------------------

#[tokio::test]
async fn end_releases_locks_and_cancels_agents_of_that_session_only() {
    each_backend(
        "end_releases_locks_and_cancels_agents_of_that_session_only",
        |db| async move {
            let (session, agents, early) = populated_with_released(&db, 3, 4).await;
            let (other, _, _) = populated_with_released(&db, 3, 4).await;

            // A fourth agent that already finished: it must not be cancelled.
            let done = db
                .manager
                .register_agent(session, "finished")
                .await
                .expect("register");
            let done_at = Utc::now() - chrono::Duration::seconds(5);
            agent_executions::Entity::update_many()
                .col_expr(agent_executions::Column::Status, Expr::value("completed"))
                .col_expr(agent_executions::Column::CompletedAt, Expr::value(done_at))
                .filter(agent_executions::Column::Id.eq(TextUuid(done)))
                .exec(db.manager.connection())
                .await
                .expect("finish agent");

            let early_before = lock_rows(&db, session)
                .await
                .into_iter()
                .find(|l| id(&l.id) == early)
                .expect("early lock row");
            assert_eq!(early_before.release_reason.as_deref(), Some("released"));
            let early_released_at = early_before.released_at.expect("released early");
            let done_before = agent_rows(&db, session)
                .await
                .into_iter()
                .find(|a| id(&a.id) == done)
                .expect("finished agent row");
            let other_before = rows_of(&db, other).await;
            assert_eq!(other_before.2.len(), 13);

            let report = db.manager.end_session(session).await.expect("end");
            assert_eq!(report.locks_released, 12);
            assert_eq!(report.agents_cancelled, 3);

            let completed_at = session_row(&db, session)
                .await
                .completed_at
                .expect("completed_at");
            assert_eq!(completed_at, report.completed_at);

            let locks = lock_rows(&db, session).await;
            assert_eq!(locks.len(), 13);
            let mut released_now = 0;
            for lock in &locks {
                if id(&lock.id) == early {
                    assert_eq!(lock.release_reason.as_deref(), Some("released"));
                    assert_eq!(
                        lock.released_at,
                        Some(early_released_at),
                        "early release time kept"
                    );
                    assert_eq!(lock, &early_before, "early released lock untouched");
                } else {
                    assert_eq!(
                        lock.released_at,
                        Some(completed_at),
                        "lock {} released_at",
                        lock.id
                    );
                    assert_eq!(lock.release_reason.as_deref(), Some("session_end"));
                    released_now += 1;
                }
            }
            assert_eq!(released_now, 12);
            assert!(
                all_locks(&db)
                    .await
                    .iter()
                    .filter(|l| id(&l.session_id) == session)
                    .all(|l| l.released_at.is_some()),
                "no held lock of the ended session remains"
            );

            let agent_models = agent_rows(&db, session).await;
            assert_eq!(agent_models.len(), 4);
            for agent in &agent_models {
                if id(&agent.id) == done {
                    assert_eq!(agent, &done_before, "finished agent untouched");
                } else {
                    assert!(agents.contains(&id(&agent.id)));
                    assert_eq!(agent.status, "cancelled");
                    assert_eq!(agent.completed_at, Some(completed_at));
                }
            }

            assert_eq!(
                rows_of(&db, other).await,
                other_before,
                "other session's rows unchanged"
            );
            assert_eq!(other_before.0.status, "active");
        },
    )
    .await;
}

// ---- 3. AC4 ----------------------------------------------------------------------

#[tokio::test]
async fn end_saves_context_windows_in_order_and_clears_registry() {
    each_backend(
        "end_saves_context_windows_in_order_and_clears_registry",
        |db| async move {
            let (session, _) = populated_session(&db, 1, 1).await;
            let contexts = db.manager.contexts();
            contexts
                .put(session, "b", json!({"plan": ["step 1", "step 2"], "n": 1}))
                .expect("put window");
            contexts
                .put(session, "a", json!(["file.rs", 42, null, {"nested": true}]))
                .expect("put window");
            let new_b = json!({"plan": ["step 3"], "n": 2, "text": "héllo \"quoted\"\n"});
            contexts
                .put(session, "b", new_b.clone())
                .expect("put window");

            let expected_windows = vec![
                ContextWindow {
                    key: "b".into(),
                    data: new_b.clone(),
                },
                ContextWindow {
                    key: "a".into(),
                    data: json!(["file.rs", 42, null, {"nested": true}]),
                },
            ];
            assert_eq!(
                contexts.windows(session),
                expected_windows,
                "replace kept position"
            );

            let report = db.manager.end_session(session).await.expect("end");

            let saved = session_row(&db, session)
                .await
                .context_data
                .expect("context_data set");
            let expected = json!({
                "version": 1,
                "windows": [
                    {"key": "b", "data": new_b},
                    {"key": "a", "data": ["file.rs", 42, null, {"nested": true}]},
                ]
            });
            assert_eq!(saved, expected);
            assert_eq!(
                db.manager
                    .session_context(session)
                    .await
                    .expect("session_context"),
                expected_windows
            );
            assert!(
                db.manager.contexts().windows(session).is_empty(),
                "registry cleared"
            );
            assert_eq!(report.context_windows, 2);
            assert_eq!(
                report.context_bytes,
                serde_json::to_string(&saved).expect("serialize").len() as u64
            );
        },
    )
    .await;
}

// ---- 4. AC5 ----------------------------------------------------------------------

#[tokio::test]
async fn end_writes_one_audit_row_and_ids_are_text() {
    each_backend(
        "end_writes_one_audit_row_and_ids_are_text",
        |db| async move {
            let (session, _) = populated_session(&db, 2, 3).await;
            db.manager
                .contexts()
                .put(session, "k", json!({"x": 1}))
                .expect("put window");

            let report = db.manager.end_session(session).await.expect("end");
            let completed_at = session_row(&db, session)
                .await
                .completed_at
                .expect("completed_at");

            let ends = audit_of(&db, session, "session_end").await;
            assert_eq!(ends.len(), 1, "exactly one session_end row");
            let end = &ends[0];
            assert_eq!(end.session_id, Some(session.to_string()));
            assert_eq!(end.event_time, completed_at);

            let details = &end.details;
            let keys: BTreeSet<&str> = details
                .as_object()
                .expect("details is an object")
                .keys()
                .map(String::as_str)
                .collect();
            let expected_keys: BTreeSet<&str> = [
                "session_id",
                "cleanup_ms",
                "locks_released",
                "agents_cancelled",
                "context_windows",
                "context_bytes",
            ]
            .into_iter()
            .collect();
            assert_eq!(keys, expected_keys);
            assert_eq!(details["session_id"], json!(session.to_string()));
            assert_eq!(json_u64(details, "locks_released"), 6);
            assert_eq!(json_u64(details, "agents_cancelled"), 2);
            assert_eq!(json_u64(details, "context_windows"), 1);
            let saved = session_row(&db, session)
                .await
                .context_data
                .expect("context_data");
            let bytes = serde_json::to_string(&saved).expect("serialize").len() as u64;
            assert_eq!(json_u64(details, "context_bytes"), bytes);
            assert!(json_u64(details, "cleanup_ms") <= report.cleanup_ms);
            assert_eq!(report.locks_released, 6);
            assert_eq!(report.agents_cancelled, 2);
            assert_eq!(report.context_bytes, bytes);

            // Readable with the sqlite3 shell: ids and JSON are stored as text.
            if db.is_sqlite() {
                let row = db
                    .manager
                    .connection()
                    .query_one_raw(Statement::from_string(
                        DbBackend::Sqlite,
                        "SELECT typeof(id), id, typeof(context_data) FROM global_sessions",
                    ))
                    .await
                    .expect("raw query")
                    .expect("one session row");
                assert_eq!(
                    row.try_get_by_index::<String>(0).expect("typeof(id)"),
                    "text"
                );
                let id: String = row.try_get_by_index(1).expect("id");
                assert_eq!(id, session.hyphenated().to_string());
                assert_eq!(id, id.to_lowercase());
                assert_eq!(
                    row.try_get_by_index::<String>(2)
                        .expect("typeof(context_data)"),
                    "text"
                );

                let row = db
                    .manager
                    .connection()
                    .query_one_raw(Statement::from_string(
                        DbBackend::Sqlite,
                        "SELECT typeof(id), typeof(session_id), session_id, typeof(details) \
                 FROM audit_log WHERE event_type = 'session_end'",
                    ))
                    .await
                    .expect("raw audit query")
                    .expect("audit row");
                assert_eq!(row.try_get_by_index::<String>(0).expect("typeof"), "text");
                assert_eq!(row.try_get_by_index::<String>(1).expect("typeof"), "text");
                assert_eq!(
                    row.try_get_by_index::<String>(2).expect("session_id"),
                    session.to_string()
                );
                assert_eq!(row.try_get_by_index::<String>(3).expect("typeof"), "text");
            }
        },
    )
    .await;
}

// ---- 5. Idempotence and non-active sessions --------------------------------------

#[tokio::test]
async fn ending_twice_is_a_no_op_and_paused_or_interrupted_sessions_end() {
    each_backend(
        "ending_twice_is_a_no_op_and_paused_or_interrupted_sessions_end",
        |db| async move {
            let (session, _) = populated_session(&db, 2, 2).await;
            db.manager
                .contexts()
                .put(session, "k", json!("v"))
                .expect("put window");
            let first = db.manager.end_session(session).await.expect("first end");
            assert!(!first.already_ended);
            assert_eq!(first.locks_released, 4);

            // Windows put after the end must not be counted or saved by a second end.
            db.manager
                .contexts()
                .put(session, "late", json!("ignored"))
                .expect("put window");
            let before = snapshot(&db).await;
            let second = db.manager.end_session(session).await.expect("second end");
            assert_eq!(snapshot(&db).await, before, "second end wrote nothing");

            assert!(second.already_ended);
            assert_eq!(second.completed_at, first.completed_at);
            assert_eq!(second.locks_released, 0);
            assert_eq!(second.agents_cancelled, 0);
            assert_eq!(second.context_windows, 0);
            assert_eq!(second.context_bytes, 0);
            assert_eq!(audit_of(&db, session, "session_end").await.len(), 1);
            assert_eq!(
                session_row(&db, session).await.completed_at,
                Some(first.completed_at.into())
            );

            // Interrupting a session (by recovery, as another instance would)
            // already released its locks and cancelled its agents: the end
            // finds nothing left to release.
            for (status, released, cancelled, reason) in [
                ("paused", 2, 1, "session_end"),
                ("interrupted", 0, 0, "orphaned"),
            ] {
                let (s, _) = populated_session(&db, 1, 2).await;
                if status == "interrupted" {
                    let other_instance = SessionManager::new(
                        db.manager.connection().clone(),
                        db.manager.config().clone(),
                    )
                    .expect("manager");
                    let recovered = other_instance
                        .recover_stale(Duration::ZERO)
                        .await
                        .expect("recover");
                    assert!(recovered.interrupted.contains(&s));
                } else {
                    set_session_status(&db, s, status).await;
                }
                assert_eq!(session_row(&db, s).await.status, status);

                let report = db
                    .manager
                    .end_session(s)
                    .await
                    .unwrap_or_else(|e| panic!("end {status}: {e}"));
                assert!(!report.already_ended);
                assert_eq!(report.locks_released, released, "{status}");
                assert_eq!(report.agents_cancelled, cancelled, "{status}");

                let row = session_row(&db, s).await;
                assert_eq!(row.status, "completed", "{status} session completed");
                assert_eq!(row.completed_at, Some(report.completed_at.into()));
                assert!(row.context_data.is_some());
                assert!(lock_rows(&db, s)
                    .await
                    .iter()
                    .all(|l| l.release_reason.as_deref() == Some(reason)));
                assert!(agent_rows(&db, s)
                    .await
                    .iter()
                    .all(|a| a.status == "cancelled"));
                let ends = audit_of(&db, s, "session_end").await;
                assert_eq!(ends.len(), 1, "{status} session has one session_end row");
                assert_eq!(ends[0].event_time, report.completed_at);
            }
        },
    )
    .await;
}

// ---- 6. Bad ids ------------------------------------------------------------------

#[tokio::test]
async fn unknown_and_nil_session_ids_are_refused() {
    each_backend("unknown_and_nil_session_ids_are_refused", |db| async move {
        let (session, _) = populated_session(&db, 1, 2).await;
        let before = snapshot(&db).await;

        let unknown = Uuid::new_v4();
        match db.manager.end_session(unknown).await {
            Err(Error::SessionNotFound(id)) => assert_eq!(id, unknown),
            other => panic!("expected SessionNotFound, got {other:?}"),
        }
        assert_eq!(snapshot(&db).await, before, "unknown id changed nothing");

        match db.manager.end_session(Uuid::nil()).await {
            Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "session_id"),
            other => panic!("expected InvalidInput, got {other:?}"),
        }
        assert_eq!(snapshot(&db).await, before, "nil id changed nothing");
        assert_eq!(session_row(&db, session).await.status, "active");
    })
    .await;
}

// ---- 7. Atomicity ----------------------------------------------------------------

#[tokio::test]
async fn failed_audit_insert_rolls_back_the_whole_end() {
    failed_step_rolls_back_the_whole_end(
        "failed_audit_insert_rolls_back_the_whole_end",
        Failing::AuditInsert,
    )
    .await;
}

#[tokio::test]
async fn failed_lock_release_rolls_back_the_whole_end() {
    failed_step_rolls_back_the_whole_end(
        "failed_lock_release_rolls_back_the_whole_end",
        Failing::LockRelease,
    )
    .await;
}

/// An end that fails at `at` leaves every row as it was, audit row included,
/// keeps the live windows, and the next end succeeds once the fault is gone.
async fn failed_step_rolls_back_the_whole_end(name: &str, at: Failing) {
    each_backend(name, move |db| async move {
        let (session, _) = populated_session(&db, 2, 2).await;
        let windows = vec![ContextWindow {
            key: "plan".into(),
            data: json!({"step": 3}),
        }];
        db.manager
            .contexts()
            .put(session, "plan", json!({"step": 3}))
            .expect("put window");
        create_failing_trigger(&db, at).await;
        let before = snapshot(&db).await;

        match db.manager.end_session(session).await {
            Err(Error::Database(e)) => {
                assert!(
                    e.to_string().contains("injected failure"),
                    "unexpected error: {e}"
                )
            }
            other => panic!("expected Database error, got {other:?}"),
        }
        assert_eq!(snapshot(&db).await, before, "failed end changed nothing");
        let row = session_row(&db, session).await;
        assert_eq!(row.status, "active");
        assert_eq!(row.context_data, None);
        assert!(lock_rows(&db, session)
            .await
            .iter()
            .all(|l| l.released_at.is_none()));
        assert!(agent_rows(&db, session)
            .await
            .iter()
            .all(|a| a.status == "running"));
        assert_eq!(
            db.manager.contexts().windows(session),
            windows,
            "windows kept"
        );

        drop_failing_trigger(&db, at).await;

        let report = db
            .manager
            .end_session(session)
            .await
            .expect("end after fix");
        assert!(!report.already_ended);
        assert_eq!(report.locks_released, 4);
        let locks = lock_rows(&db, session).await;
        assert_eq!(locks.len(), 4);
        assert!(locks
            .iter()
            .all(|l| l.released_at == Some(report.completed_at.into())
                && l.release_reason.as_deref() == Some("session_end")));
        assert_eq!(audit_of(&db, session, "session_end").await.len(), 1);
        assert_eq!(session_row(&db, session).await.status, "completed");
        assert_eq!(
            db.manager.session_context(session).await.expect("saved"),
            windows
        );
    })
    .await;
}

// ---- 8. Context size limit -------------------------------------------------------

#[tokio::test]
async fn oversized_context_is_refused_and_kept() {
    let config = Config {
        max_context_bytes: 100,
        ..Default::default()
    };
    each_backend_with(
        "oversized_context_is_refused_and_kept",
        config,
        |db| async move {
            let (session, _) = populated_session(&db, 1, 1).await;
            db.manager
                .contexts()
                .put(session, "big", json!("x".repeat(1000)))
                .expect("put window");
            let windows = db.manager.contexts().windows(session);
            let before = snapshot(&db).await;

            match db.manager.end_session(session).await {
                Err(Error::ContextTooLarge { bytes, limit }) => {
                    assert!(bytes > 100, "bytes {bytes}");
                    assert!(bytes >= 1000, "bytes {bytes} counts the whole window");
                    assert_eq!(limit, 100);
                }
                other => panic!("expected ContextTooLarge, got {other:?}"),
            }
            assert_eq!(snapshot(&db).await, before, "nothing changed");
            assert_eq!(
                db.manager.contexts().windows(session),
                windows,
                "windows kept"
            );

            db.manager
                .contexts()
                .put(session, "big", json!("small"))
                .expect("put window");
            let report = db
                .manager
                .end_session(session)
                .await
                .expect("end after trim");
            assert!(report.context_bytes <= 100);
            let row = session_row(&db, session).await;
            assert_eq!(row.status, "completed");
            assert_eq!(
                row.context_data,
                Some(json!({"version": 1, "windows": [{"key": "big", "data": "small"}]}))
            );
            assert_eq!(audit_of(&db, session, "session_end").await.len(), 1);
        },
    )
    .await;
}

// ---- 9. Timeout (AC6) ------------------------------------------------------------

#[tokio::test]
async fn cleanup_times_out_when_the_write_lock_is_held_and_rolls_back() {
    let config = Config {
        cleanup_timeout: Duration::from_millis(300),
        busy_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    each_backend_with(
        "cleanup_times_out_when_the_write_lock_is_held_and_rolls_back",
        config,
        |db| async move {
            if db.backend == Backend::SqliteMemory {
                eprintln!(
                    "timeout test: skipped on {} (one connection: nothing else can block it)",
                    db.backend.name()
                );
                return;
            }
            let (session, _) = populated_session(&db, 2, 2).await;
            db.manager
                .contexts()
                .put(session, "k", json!(1))
                .expect("put window");
            let before = snapshot(&db).await;

            // Another process holds what the end needs: SQLite's write lock, or
            // the session's row lock on a server.
            let (blocker, blocking) = block_session(&db, session).await;

            let t = Instant::now();
            let result = db.manager.end_session(session).await;
            let wall = t.elapsed();
            match result {
                Err(Error::Timeout { elapsed_ms }) => {
                    assert!(elapsed_ms >= 300, "elapsed_ms {elapsed_ms} < budget");
                    assert!(
                        elapsed_ms <= wall.as_millis() as u64 + 1,
                        "elapsed_ms {elapsed_ms} > wall {wall:?}"
                    );
                }
                other => panic!("expected Timeout, got {other:?} after {wall:?}"),
            }
            assert!(wall < Duration::from_secs(2), "end_session took {wall:?}");

            blocking.rollback().await.expect("rollback blocker");
            blocker.close().await.expect("close blocker");

            assert_eq!(snapshot(&db).await, before, "timed-out end changed nothing");
            assert_eq!(session_row(&db, session).await.status, "active");
            assert!(lock_rows(&db, session)
                .await
                .iter()
                .all(|l| l.released_at.is_none()));
            assert!(audit_of(&db, session, "session_end").await.is_empty());
            assert_eq!(
                db.manager.contexts().windows(session).len(),
                1,
                "windows kept"
            );

            let report = db
                .manager
                .end_session(session)
                .await
                .expect("end after the blocker is gone");
            assert!(!report.already_ended);
            assert_eq!(report.locks_released, 4);
            assert_eq!(session_row(&db, session).await.status, "completed");
            assert!(lock_rows(&db, session)
                .await
                .iter()
                .all(|l| l.release_reason.as_deref() == Some("session_end")));
            assert_eq!(audit_of(&db, session, "session_end").await.len(), 1);
        },
    )
    .await;
}

/// A manager built with `SessionManager::new` on a connection the library did
/// not set up (no server-side lock timeout of its own) is bounded all the
/// same, whether the end waits for the session's row or, inside the
/// release of its held locks, for one of its lock rows.
#[tokio::test]
async fn end_on_a_connection_set_up_by_the_app_is_still_bounded() {
    let config = Config {
        cleanup_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    each_backend_with(
        "end_on_a_connection_set_up_by_the_app_is_still_bounded",
        config.clone(),
        move |db| {
            let config = config.clone();
            async move {
                if db.is_sqlite() {
                    eprintln!(
                        "app-connection timeout test: skipped on {} (row locks are a server's)",
                        db.backend.name()
                    );
                    return;
                }
                let manager =
                    SessionManager::new(db.second_connection().await, config).expect("manager");
                for row in ["global_sessions", "resource_locks"] {
                    let (session, _) = populated_session(&db, 2, 2).await;
                    let before = snapshot(&db).await;
                    let column = if row == "global_sessions" {
                        "id"
                    } else {
                        "session_id"
                    };
                    let (blocker, blocking) = lock_row_of(&db, row, column, session).await;

                    let t = Instant::now();
                    // A hang is the failure this test looks for: give up long
                    // before the test harness would.
                    let result =
                        tokio::time::timeout(Duration::from_secs(10), manager.end_session(session))
                            .await
                            .unwrap_or_else(|_| panic!("{row} blocked: end_session hung"));
                    let wall = t.elapsed();
                    assert!(
                        matches!(result, Err(Error::Timeout { .. })),
                        "{row} blocked: expected Timeout, got {result:?} after {wall:?}"
                    );
                    assert!(
                        wall < Duration::from_secs(2),
                        "{row} blocked: took {wall:?}"
                    );
                    blocking.rollback().await.expect("rollback blocker");
                    blocker.close().await.expect("close blocker");
                    assert_eq!(
                        snapshot(&db).await,
                        before,
                        "{row} blocked: nothing changed"
                    );

                    let report = manager.end_session(session).await.expect("end, unblocked");
                    assert_eq!(report.locks_released, 4);
                    assert_eq!(session_row(&db, session).await.status, "completed");
                }
                manager.close().await.expect("close");
            }
        },
    )
    .await;
}

// ---- 10. Locks -------------------------------------------------------------------

#[tokio::test]
async fn held_lock_is_refused_naming_its_holder() {
    each_backend("held_lock_is_refused_naming_its_holder", |db| async move {
        let m = &db.manager;
        let s1 = m.start_session().await.expect("start");
        let a1 = m.register_agent(s1, "coder").await.expect("register");
        let grant = m
            .acquire_lock(a1, "file", "src/main.rs")
            .await
            .expect("acquire");
        let s2 = m.start_session().await.expect("start");
        let a2 = m.register_agent(s2, "reviewer").await.expect("register");

        match m.acquire_lock(a2, "file", "src/main.rs").await {
            Err(Error::LockHeld {
                resource_type,
                resource_key,
                holder_agent_id,
                fencing_token,
            }) => {
                assert_eq!(resource_type, "file");
                assert_eq!(resource_key, "src/main.rs");
                assert_eq!(holder_agent_id, Some(a1));
                assert_eq!(fencing_token, Some(grant.fencing_token));
            }
            other => panic!("expected LockHeld, got {other:?}"),
        }

        let held = held_on(&db, "file", "src/main.rs").await;
        assert_eq!(held.len(), 1, "exactly one held row");
        assert_eq!(id(&held[0].id), grant.lock_id);
        assert_eq!(id(&held[0].agent_id), a1);
        assert_eq!(held[0].fencing_token, grant.fencing_token);
        assert!(
            lock_rows(&db, s2).await.is_empty(),
            "refused agent has no lock row"
        );

        // A different key of the same type is free.
        let other = m
            .acquire_lock(a2, "file", "src/lib.rs")
            .await
            .expect("other key");
        assert!(other.fencing_token > grant.fencing_token);
    })
    .await;
}

#[tokio::test]
async fn fencing_tokens_increase_and_ended_sessions_free_their_resources() {
    each_backend(
        "fencing_tokens_increase_and_ended_sessions_free_their_resources",
        |db| async move {
            let m = &db.manager;
            let s1 = m.start_session().await.expect("start");
            let a1 = m.register_agent(s1, "coder").await.expect("register");
            let mut grants = Vec::new();
            for k in 0..5 {
                grants.push(
                    m.acquire_lock(a1, "file", &format!("f{k}"))
                        .await
                        .expect("acquire"),
                );
            }
            // A refused acquire in between must not break the ordering.
            let s2 = m.start_session().await.expect("start");
            let a2 = m.register_agent(s2, "reviewer").await.expect("register");
            assert!(matches!(
                m.acquire_lock(a2, "file", "f0").await,
                Err(Error::LockHeld { .. })
            ));
            grants.push(m.acquire_lock(a1, "file", "f5").await.expect("acquire"));

            for pair in grants.windows(2) {
                assert!(
                    pair[1].fencing_token > pair[0].fencing_token,
                    "tokens {pair:?}"
                );
            }
            let rows = lock_rows(&db, s1).await;
            assert_eq!(
                rows.iter()
                    .map(|r| (id(&r.id), r.fencing_token))
                    .collect::<Vec<_>>(),
                grants
                    .iter()
                    .map(|g| (g.lock_id, g.fencing_token))
                    .collect::<Vec<_>>(),
                "rows carry the granted tokens"
            );
            let last = grants.last().expect("grants").fencing_token;

            m.end_session(s1).await.expect("end");
            assert!(held_on(&db, "file", "f0").await.is_empty());

            let again = m
                .acquire_lock(a2, "file", "f0")
                .await
                .expect("re-acquire after end");
            assert!(
                again.fencing_token > last,
                "{} > {last}",
                again.fencing_token
            );
            let held = held_on(&db, "file", "f0").await;
            assert_eq!(held.len(), 1);
            assert_eq!(id(&held[0].agent_id), a2);
            assert_eq!(id(&held[0].session_id), s2);
            assert_eq!(held[0].fencing_token, again.fencing_token);
            let old = lock_rows(&db, s1).await;
            assert_eq!(old.len(), 6, "old rows are kept as history");
            assert!(old
                .iter()
                .all(|l| l.release_reason.as_deref() == Some("session_end")));
        },
    )
    .await;
}

#[tokio::test]
async fn completed_session_takes_no_agents_or_locks() {
    each_backend(
        "completed_session_takes_no_agents_or_locks",
        |db| async move {
            let (session, agents) = populated_session(&db, 1, 1).await;
            db.manager.end_session(session).await.expect("end");
            let before = snapshot(&db).await;

            match db.manager.register_agent(session, "late").await {
                Err(Error::SessionNotActive { session_id, status }) => {
                    assert_eq!(session_id, session);
                    assert_eq!(status, "completed");
                }
                other => panic!("expected SessionNotActive, got {other:?}"),
            }
            match db
                .manager
                .acquire_lock(agents[0], "file", "new-resource")
                .await
            {
                Err(Error::SessionNotActive { session_id, status }) => {
                    assert_eq!(session_id, session);
                    assert_eq!(status, "completed");
                }
                other => panic!("expected SessionNotActive, got {other:?}"),
            }
            assert_eq!(snapshot(&db).await, before, "refusals wrote nothing");
            assert!(held_on(&db, "file", "new-resource").await.is_empty());
        },
    )
    .await;
}

#[tokio::test]
async fn database_refuses_a_second_held_lock_on_a_resource() {
    each_backend(
        "database_refuses_a_second_held_lock_on_a_resource",
        |db| async move {
            let m = &db.manager;
            let session = m.start_session().await.expect("start");
            let agent = m.register_agent(session, "coder").await.expect("register");
            let grant = m
                .acquire_lock(agent, "file", "shared.txt")
                .await
                .expect("acquire");
            let before = all_locks(&db).await;

            // Same agent, session and resource; fresh id and fencing token.
            let duplicate = placeholders(
                &db,
                "INSERT INTO resource_locks \
             (id, agent_id, session_id, resource_type, resource_key, fencing_token, \
              acquired_at, expires_at, released_at, release_reason) \
             SELECT ?, agent_id, session_id, resource_type, resource_key, ?, \
              acquired_at, NULL, NULL, NULL \
             FROM resource_locks WHERE id = ?",
            );
            let err = exec_sql(
                &db,
                &duplicate,
                vec![
                    Uuid::new_v4().to_string().into(),
                    (grant.fencing_token + 1000).into(),
                    grant.lock_id.to_string().into(),
                ],
            )
            .await
            .expect_err("a second held lock must be refused by the database");
            assert!(
                matches!(err.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))),
                "expected a unique violation, got {err:?}"
            );
            let message = err.to_string();
            if db.is_sqlite() {
                assert!(message.contains("UNIQUE constraint failed"), "{message}");
                assert!(
                    message.contains("resource_locks.resource_type")
                        && message.contains("resource_locks.resource_key"),
                    "violation must come from the held-lock index: {message}"
                );
            } else {
                assert!(
                    message.contains("ux_resource_locks_held"),
                    "violation must come from the held-lock index: {message}"
                );
            }
            assert_eq!(all_locks(&db).await, before, "refused insert left no row");

            // The same row, released, is history and is accepted.
            let released = placeholders(
                &db,
                "INSERT INTO resource_locks \
             (id, agent_id, session_id, resource_type, resource_key, fencing_token, \
              acquired_at, expires_at, released_at, release_reason) \
             SELECT ?, agent_id, session_id, resource_type, resource_key, ?, \
              acquired_at, NULL, acquired_at, 'released' \
             FROM resource_locks WHERE id = ?",
            );
            let released_id = Uuid::new_v4();
            let res = exec_sql(
                &db,
                &released,
                vec![
                    released_id.to_string().into(),
                    (grant.fencing_token + 1000).into(),
                    grant.lock_id.to_string().into(),
                ],
            )
            .await
            .expect("a released row on a held resource is allowed");
            assert_eq!(res.rows_affected(), 1);

            let rows = all_locks(&db).await;
            assert_eq!(rows.len(), before.len() + 1);
            let inserted = rows
                .iter()
                .find(|l| id(&l.id) == released_id)
                .expect("inserted row");
            assert_eq!(inserted.release_reason.as_deref(), Some("released"));
            assert!(inserted.released_at.is_some());
            let held = held_on(&db, "file", "shared.txt").await;
            assert_eq!(held.len(), 1);
            assert_eq!(id(&held[0].id), grant.lock_id);
        },
    )
    .await;
}

// ---- 6. The database itself releases an ended session's locks ---------------------

/// A session completed or interrupted by a hand-written UPDATE that bypasses
/// the library releases nothing by itself (the database only refuses, it
/// never performs a step of the end): its locks stay held until the sweep
/// finds them orphaned and releases them, and other sessions are untouched.
#[tokio::test]
async fn hand_written_status_change_leaves_orphans_that_the_sweep_releases() {
    each_backend(
        "hand_written_status_change_leaves_orphans_that_the_sweep_releases",
        |db| async move {
            let (bystander, _) = populated_session(&db, 1, 2).await;
            let bystander_before = (
                lock_rows(&db, bystander).await,
                agent_rows(&db, bystander).await,
            );
            let ended_at = Utc::now().trunc_subsecs(6);
            for status in ["completed", "interrupted"] {
                let (s, _) = populated_session(&db, 2, 3).await;
                let sql = placeholders(
                    &db,
                    "UPDATE global_sessions SET status = ?, updated_at = ?, completed_at = ?, \
                     context_data = ? WHERE id = ?",
                );
                let completed_at = (status == "completed").then_some(ended_at);
                let context = (status == "completed").then(|| json!({"version": 1, "windows": []}));
                let res = exec_sql(
                    &db,
                    &sql,
                    vec![
                        status.into(),
                        ended_at.into(),
                        completed_at.into(),
                        context.into(),
                        s.to_string().into(),
                    ],
                )
                .await
                .unwrap_or_else(|e| panic!("hand-written {status}: {e}"));
                assert_eq!(res.rows_affected(), 1);
                let locks = lock_rows(&db, s).await;
                assert_eq!(locks.len(), 6);
                assert!(
                    locks.iter().all(|l| l.released_at.is_none()),
                    "{status}: the UPDATE alone releases nothing"
                );

                let swept = db.manager.sweep_locks().await.expect("sweep");
                assert_eq!(swept.orphaned, 6, "{status}");
                assert_eq!(swept.expired, 0, "{status}");
                for lock in &lock_rows(&db, s).await {
                    assert!(lock.released_at.is_some(), "{status}");
                    assert_eq!(lock.release_reason.as_deref(), Some("orphaned"), "{status}");
                }
                let audit = snapshot(&db).await.audit;
                assert!(
                    audit.iter().any(|r| r.event_type == "locks_swept"
                        && r.details["orphaned"] == json!(6)),
                    "{status}: the sweep's audit row counts the orphans"
                );
                // The resources are free again.
                let (_, agents) = populated_session(&db, 1, 0).await;
                db.manager
                    .acquire_lock(agents[0], &locks[0].resource_type, &locks[0].resource_key)
                    .await
                    .unwrap_or_else(|e| panic!("re-acquire after {status}: {e}"));
            }
            assert_eq!(
                (
                    lock_rows(&db, bystander).await,
                    agent_rows(&db, bystander).await
                ),
                bystander_before,
                "another session's locks and agents are untouched"
            );
        },
    )
    .await;
}
