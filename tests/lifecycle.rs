//! The life around an end: ownership and heartbeat, recovering what a crashed
//! instance left open, resuming from saved context, graceful shutdown, and
//! the listings apps and the CLI read.
mod common;

use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use demiarch_sessions::{AuditFilter, Config, Error, SessionFilter, SessionManager, SessionStatus};
use entity::global_sessions;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use serde_json::json;
use uuid::Uuid;

/// Makes a session look abandoned: its owner last heartbeated an hour ago.
async fn age_heartbeat(db: &TestDb, session: Uuid) {
    let res = global_sessions::Entity::update_many()
        .col_expr(
            global_sessions::Column::LastHeartbeatAt,
            Expr::value(Utc::now() - chrono::Duration::hours(1)),
        )
        .filter(global_sessions::Column::Id.eq(TextUuid(session)))
        .exec(db.manager.connection())
        .await
        .expect("age heartbeat");
    assert_eq!(res.rows_affected, 1);
}

/// A second app instance on the same database, with its own instance id.
async fn other_instance(db: &TestDb) -> SessionManager {
    let peer = db.peer_manager().await;
    if db.backend == Backend::SqliteMemory {
        // One in-memory database per pool: share the connection, new identity.
        return SessionManager::new(db.manager.connection().clone(), db.manager.config().clone())
            .expect("manager");
    }
    peer
}

#[tokio::test]
async fn sessions_record_their_owner_and_heartbeat() {
    let config = Config {
        heartbeat_interval: Duration::from_millis(50),
        ..Default::default()
    };
    each_backend_with(
        "sessions_record_their_owner_and_heartbeat",
        config,
        |db| async move {
            let session = db.manager.start_session().await.expect("start");
            let row = session_row(&db, session).await;
            assert_eq!(
                row.owner_instance,
                Some(db.manager.instance_id().to_string())
            );
            let first = row.last_heartbeat_at.expect("heartbeat set at start");
            // Wait (bounded, by polling, not by timing) for the heartbeat to move.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let now = session_row(&db, session)
                    .await
                    .last_heartbeat_at
                    .expect("heartbeat");
                if now > first {
                    break;
                }
                assert!(Instant::now() < deadline, "heartbeat never advanced");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Ended sessions are no longer heartbeated.
            db.manager.end_session(session).await.expect("end");
            let after_end = session_row(&db, session).await.last_heartbeat_at;
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(session_row(&db, session).await.last_heartbeat_at, after_end);
        },
    )
    .await;
}

#[tokio::test]
async fn recover_stale_interrupts_only_abandoned_sessions() {
    each_backend(
        "recover_stale_interrupts_only_abandoned_sessions",
        |db| async move {
            let crashed = other_instance(&db).await;
            // The crashed instance's session, with agents and locks.
            let abandoned = crashed.start_session().await.expect("start");
            let agent = crashed
                .register_agent(abandoned, "coder")
                .await
                .expect("register");
            for k in 0..3 {
                crashed
                    .acquire_lock(agent, "file", &format!("{abandoned}/{k}"))
                    .await
                    .expect("acquire");
            }
            age_heartbeat(&db, abandoned).await;
            // The same instance's other session heartbeated recently: alive.
            let alive = crashed.start_session().await.expect("start");
            // This instance's own session, even with an old heartbeat, is never touched.
            let (own, _) = populated_session(&db, 1, 2).await;
            age_heartbeat(&db, own).await;
            let untouched_before = (
                session_row(&db, alive).await,
                lock_rows(&db, own).await,
                session_row(&db, own).await,
            );

            let report = db
                .manager
                .recover_stale(Duration::from_secs(60))
                .await
                .expect("recover");
            assert_eq!(report.interrupted, vec![abandoned]);
            assert_eq!(report.locks_released, 3);
            assert_eq!(report.agents_cancelled, 1);

            let row = session_row(&db, abandoned).await;
            assert_eq!(row.status, "interrupted");
            assert!(row.completed_at.is_none(), "interrupted is not completed");
            for lock in lock_rows(&db, abandoned).await {
                assert!(lock.released_at.is_some());
                assert_eq!(lock.release_reason.as_deref(), Some("orphaned"));
            }
            assert!(agent_rows(&db, abandoned)
                .await
                .iter()
                .all(|a| a.status == "cancelled"));
            let audit = audit_of(&db, abandoned, "session_interrupted").await;
            assert_eq!(audit.len(), 1);
            assert_eq!(audit[0].details["locks_released"], json!(3));
            assert_eq!(
                (
                    session_row(&db, alive).await,
                    lock_rows(&db, own).await,
                    session_row(&db, own).await
                ),
                untouched_before,
                "live sessions were touched"
            );

            // Nothing left to recover; the interrupted session can still be ended.
            let again = db
                .manager
                .recover_stale(Duration::from_secs(60))
                .await
                .expect("recover");
            assert!(again.interrupted.is_empty());
            let end = db
                .manager
                .end_session(abandoned)
                .await
                .expect("end interrupted");
            assert!(!end.already_ended);
            assert_eq!(session_row(&db, abandoned).await.status, "completed");
        },
    )
    .await;
}

#[tokio::test]
async fn resume_starts_a_new_session_from_saved_context() {
    each_backend(
        "resume_starts_a_new_session_from_saved_context",
        |db| async move {
            let m = &db.manager;
            let from = m.start_session().await.expect("start");
            m.contexts()
                .put(from, "plan", json!({"step": 4}))
                .expect("put window");
            m.contexts()
                .put(from, "notes", json!(["a", "b"]))
                .expect("put window");
            let saved = m.contexts().windows(from);

            match m.resume_session(from).await {
                Err(Error::SessionStillOpen { session_id, status }) => {
                    assert_eq!(session_id, from);
                    assert_eq!(status, "active");
                }
                other => panic!("expected SessionStillOpen, got {other:?}"),
            }
            m.end_session(from).await.expect("end");

            let to = m.resume_session(from).await.expect("resume");
            assert_ne!(to, from);
            let row = session_row(&db, to).await;
            assert_eq!(row.status, "active");
            assert_eq!(row.owner_instance, Some(m.instance_id().to_string()));
            assert_eq!(
                m.contexts().windows(to),
                saved,
                "registry refilled in order"
            );
            let audit = audit_of(&db, to, "session_resumed").await;
            assert_eq!(audit.len(), 1);
            assert_eq!(audit[0].details["resumed_from"], json!(from.to_string()));
            assert_eq!(audit[0].details["session_id"], json!(to.to_string()));
            // The resumed session saves the same context when it ends.
            m.end_session(to).await.expect("end resumed");
            assert_eq!(m.session_context(to).await.expect("context"), saved);

            assert!(matches!(
                m.resume_session(Uuid::new_v4()).await,
                Err(Error::SessionNotFound(_))
            ));
        },
    )
    .await;
}

#[tokio::test]
async fn shutdown_ends_this_instances_open_sessions_once() {
    each_backend(
        "shutdown_ends_this_instances_open_sessions_once",
        |db| async move {
            let m = &db.manager;
            let mut open = Vec::new();
            for _ in 0..3 {
                open.push(populated_session(&db, 2, 2).await.0);
            }
            let done = m.start_session().await.expect("start");
            m.end_session(done).await.expect("end");
            let other = other_instance(&db).await;
            let foreign = other.start_session().await.expect("start");

            let report = m.shutdown(Duration::from_secs(10)).await.expect("shutdown");
            open.sort();
            assert_eq!(report.ended, open);
            assert!(
                report.already_ended.is_empty()
                    && report.timed_out.is_empty()
                    && report.failed.is_empty()
            );
            for s in &open {
                assert_eq!(session_row(&db, *s).await.status, "completed");
                assert_eq!(audit_of(&db, *s, "session_end").await.len(), 1);
                assert!(lock_rows(&db, *s)
                    .await
                    .iter()
                    .all(|l| l.released_at.is_some()));
            }
            assert_eq!(
                session_row(&db, foreign).await.status,
                "active",
                "another instance's session"
            );

            let before = snapshot(&db).await;
            let twice = m
                .shutdown(Duration::from_secs(10))
                .await
                .expect("second shutdown");
            assert!(twice.ended.is_empty() && twice.timed_out.is_empty());
            assert_eq!(
                snapshot(&db).await,
                before,
                "a second shutdown changed nothing"
            );
        },
    )
    .await;
}

#[tokio::test]
async fn shutdown_past_its_deadline_leaves_sessions_open_not_half_ended() {
    let config = Config {
        cleanup_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    each_backend_with(
        "shutdown_past_its_deadline_leaves_sessions_open_not_half_ended",
        config,
        |db| async move {
            if db.backend != Backend::SqliteFile {
                return; // a writer that blocks everything is a SQLite notion
            }
            let (session, _) = populated_session(&db, 1, 2).await;
            let before = snapshot(&db).await;
            let (_blocker, blocking) = block_session(&db, session).await;
            let report = db
                .manager
                .shutdown(Duration::from_millis(200))
                .await
                .expect("shutdown");
            assert_eq!(report.timed_out, vec![session]);
            assert!(report.ended.is_empty());
            blocking.rollback().await.expect("rollback");
            assert_eq!(snapshot(&db).await, before, "nothing half-ended");
        },
    )
    .await;
}

#[tokio::test]
async fn listings_are_newest_first_filtered_and_paged() {
    each_backend(
        "listings_are_newest_first_filtered_and_paged",
        |db| async move {
            let m = &db.manager;
            let mut ids = Vec::new();
            for i in 0..5 {
                let s = m.start_session().await.expect("start");
                if i % 2 == 0 {
                    m.end_session(s).await.expect("end");
                }
                ids.push(s);
            }
            let all = m
                .list_sessions(SessionFilter::default())
                .await
                .expect("list")
                .rows;
            let listed: Vec<Uuid> = all.iter().map(|s| s.id).collect();
            let mut newest_first = ids.clone();
            newest_first.reverse();
            assert_eq!(listed, newest_first);
            let completed = m
                .list_sessions(SessionFilter {
                    status: Some(SessionStatus::Completed),
                    ..Default::default()
                })
                .await
                .expect("list completed")
                .rows;
            assert_eq!(
                completed.iter().map(|s| s.id).collect::<Vec<_>>(),
                vec![ids[4], ids[2], ids[0]]
            );
            let page2 = m
                .list_sessions(SessionFilter {
                    limit: Some(2),
                    offset: 2,
                    ..Default::default()
                })
                .await
                .expect("page 2")
                .rows;
            assert_eq!(
                page2.iter().map(|s| s.id).collect::<Vec<_>>(),
                vec![ids[2], ids[1]]
            );

            let ends = m
                .audit_events(AuditFilter {
                    event_type: Some("session_end".into()),
                    ..Default::default()
                })
                .await
                .expect("audit")
                .rows;
            assert_eq!(
                ends.iter().map(|e| e.session_id).collect::<Vec<_>>(),
                vec![Some(ids[4]), Some(ids[2]), Some(ids[0])]
            );
            let of_one = m
                .audit_events(AuditFilter {
                    session_id: Some(ids[0]),
                    ..Default::default()
                })
                .await
                .expect("audit of one")
                .rows;
            assert_eq!(
                of_one
                    .iter()
                    .map(|e| e.event_type.as_str())
                    .collect::<Vec<_>>(),
                vec!["session_end", "session_start"]
            );
            let none_yet = m
                .audit_events(AuditFilter {
                    since: Some(Utc::now() + chrono::Duration::hours(1)),
                    ..Default::default()
                })
                .await
                .expect("audit since")
                .rows;
            assert!(none_yet.is_empty());

            // Ids by unique prefix, like git.
            let prefix = &ids[3].to_string()[..8];
            let matching = ids
                .iter()
                .filter(|id| id.to_string().starts_with(prefix))
                .count();
            if matching == 1 {
                assert_eq!(m.find_session(prefix).await.expect("prefix"), ids[3]);
            }
            assert!(matches!(
                m.find_session("abc").await,
                Err(Error::InvalidInput { .. })
            ));
            assert!(matches!(
                m.find_session("%%%%%%%%").await,
                Err(Error::InvalidInput { .. })
            ));
            assert!(matches!(
                m.find_session("ffffffff-ffff").await,
                Err(Error::SessionPrefixNotFound { .. })
            ));
            assert_eq!(
                m.find_session(&ids[1].to_string()).await.expect("full id"),
                ids[1]
            );
        },
    )
    .await;
}

/// `SessionManager::new` is a plain function: building a manager outside any
/// runtime does not panic, and its heartbeat starts with its first session.
#[test]
fn a_manager_built_outside_a_runtime_does_not_panic() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let db = rt.block_on(TestDb::new(Backend::SqliteMemory));
    let outside =
        SessionManager::new(db.manager.connection().clone(), Config::default()).expect("manager");
    let session = rt.block_on(outside.start_session()).expect("start");
    let row = rt.block_on(session_row(&db, session));
    assert_eq!(row.owner_instance, Some(outside.instance_id().to_string()));
}
