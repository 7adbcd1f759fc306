//! Sessions pause and go on: a paused session keeps its locks, refuses new
//! agents, locks and waits, drops its agents' waits, is not recovered while
//! its owner heartbeats, and ends cleanly. On every backend, asserting on
//! rows.
mod common;

use std::time::Duration;

use common::*;
use demiarch_sessions::{Config, Error, LockOptions, Operator};
use entity::{global_sessions, lock_waiters};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use uuid::Uuid;

fn paused_refusal<T: std::fmt::Debug>(result: Result<T, Error>, session: Uuid) {
    match result {
        Err(Error::SessionNotActive { session_id, status }) => {
            assert_eq!((session_id, status.as_str()), (session, "paused"));
        }
        other => panic!("not refused as paused: {other:?}"),
    }
}

#[tokio::test]
async fn a_paused_session_keeps_its_locks_refuses_new_work_and_ends_cleanly() {
    each_backend(
        "a_paused_session_keeps_its_locks_refuses_new_work_and_ends_cleanly",
        |db| async move {
            let m = db.manager.clone();
            let (session, agents) = populated_session(&db, 2, 2).await;
            // Another session holds what the first one's agent waits for.
            let (_, others) = populated_session(&db, 1, 0).await;
            m.acquire_lock(others[0], "file", "busy")
                .await
                .expect("busy");
            let wait = {
                let m = m.clone();
                let agent = agents[1];
                tokio::spawn(async move {
                    let options = LockOptions {
                        wait: Some(Duration::from_secs(10)),
                        ..LockOptions::default()
                    };
                    m.acquire_lock_with(agent, "file", "busy", options).await
                })
            };
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while m
                .lock_waiters("file", "busy")
                .await
                .expect("waiters")
                .is_empty()
            {
                assert!(tokio::time::Instant::now() < deadline, "never queued");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let locks_before = lock_rows(&db, session).await;

            m.pause_session(session).await.expect("pause");
            assert_eq!(session_row(&db, session).await.status, "paused");
            assert_eq!(
                lock_rows(&db, session).await,
                locks_before,
                "it keeps its locks"
            );
            let waits = lock_waiters::Entity::find()
                .filter(lock_waiters::Column::SessionId.eq(session.to_string()))
                .all(m.connection())
                .await
                .expect("waiters");
            assert!(waits.is_empty(), "its waits are gone");
            let waited = tokio::time::timeout(Duration::from_secs(10), wait)
                .await
                .expect("the wait ended in time")
                .expect("task");
            paused_refusal(waited, session);
            let audit = audit_of(&db, session, "session_paused").await;
            assert_eq!(audit.len(), 1);
            assert_eq!(audit[0].details["waits_removed"], 1);

            // No new agents, locks or waits.
            let before = snapshot(&db).await;
            paused_refusal(m.register_agent(session, "late").await, session);
            paused_refusal(m.acquire_lock(agents[0], "file", "new").await, session);
            let options = LockOptions {
                wait: Some(Duration::from_millis(200)),
                ..LockOptions::default()
            };
            paused_refusal(
                m.acquire_lock_with(agents[0], "file", "busy", options)
                    .await,
                session,
            );
            // Pausing again changes nothing and writes nothing.
            m.pause_session(session).await.expect("pause again");
            assert_eq!(
                snapshot(&db).await,
                before,
                "refusals and a second pause wrote nothing"
            );

            // It ends like an active session.
            let report = m.end_session(session).await.expect("end a paused session");
            assert_eq!(report.locks_released, 4);
            assert_eq!(session_row(&db, session).await.status, "completed");
            assert!(lock_rows(&db, session)
                .await
                .iter()
                .all(|l| l.release_reason.as_deref() == Some("session_end")));
            assert!(matches!(
                m.pause_session(session).await,
                Err(Error::SessionNotActive { status, .. }) if status == "completed"
            ));
        },
    )
    .await;
}

#[tokio::test]
async fn unpausing_lets_it_work_again_and_operators_are_named() {
    each_backend(
        "unpausing_lets_it_work_again_and_operators_are_named",
        |db| async move {
            let m = db.manager.clone();
            let (session, agents) = populated_session(&db, 1, 1).await;
            let before = snapshot(&db).await;
            m.unpause_session(session)
                .await
                .expect("unpause an active session");
            assert_eq!(
                snapshot(&db).await,
                before,
                "unpausing an active session writes nothing"
            );
            let operator = Operator {
                via: "test".into(),
                reason: Some("maintenance".into()),
            };
            m.pause_session_by(session, &operator).await.expect("pause");
            m.unpause_session_by(session, &operator)
                .await
                .expect("unpause");
            assert_eq!(session_row(&db, session).await.status, "active");
            m.acquire_lock(agents[0], "file", "after")
                .await
                .expect("works again");
            m.register_agent(session, "new")
                .await
                .expect("and takes agents");
            let paused = audit_of(&db, session, "session_paused").await;
            let unpaused = audit_of(&db, session, "session_unpaused").await;
            assert_eq!((paused.len(), unpaused.len()), (1, 1));
            assert_eq!(paused[0].details["operator"]["action"], "pause_session");
            assert_eq!(unpaused[0].details["operator"]["reason"], "maintenance");

            let bad = Operator {
                via: " ".into(),
                reason: None,
            };
            let before = snapshot(&db).await;
            assert!(matches!(
                m.pause_session_by(session, &bad).await,
                Err(Error::InvalidInput { field: "via", .. })
            ));
            assert!(matches!(
                m.pause_session(Uuid::nil()).await,
                Err(Error::InvalidInput {
                    field: "session_id",
                    ..
                })
            ));
            let unknown = Uuid::new_v4();
            assert!(matches!(
                m.unpause_session(unknown).await,
                Err(Error::SessionNotFound(id)) if id == unknown
            ));
            assert_eq!(snapshot(&db).await, before);
        },
    )
    .await;
}

/// A paused session of a live owner is not recovered: the owner's heartbeat
/// goes on for it.
#[tokio::test]
async fn a_paused_session_is_heartbeated_and_not_recovered() {
    let config = Config {
        heartbeat_interval: Duration::from_millis(100),
        ..test_config()
    };
    each_backend_with(
        "a_paused_session_is_heartbeated_and_not_recovered",
        config,
        |db| async move {
            let m = db.manager.clone();
            let (session, _) = populated_session(&db, 1, 1).await;
            m.pause_session(session).await.expect("pause");
            // As if it had not heartbeated for an hour.
            let old = chrono::Utc::now() - chrono::Duration::hours(1);
            global_sessions::Entity::update_many()
                .col_expr(global_sessions::Column::LastHeartbeatAt, Expr::value(old))
                .filter(global_sessions::Column::Id.eq(session.to_string()))
                .exec(m.connection())
                .await
                .expect("age the heartbeat");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let beat = session_row(&db, session).await.last_heartbeat_at;
                if beat.is_some_and(|b| b.to_utc() > old + chrono::Duration::minutes(30)) {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{}: the owner did not heartbeat its paused session",
                    db.backend.name()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let peer = db.peer_manager().await;
            let recovered = peer
                .recover_stale(Duration::from_secs(60))
                .await
                .expect("recover");
            assert!(recovered.interrupted.is_empty(), "{recovered:?}");
            assert_eq!(session_row(&db, session).await.status, "paused");
        },
    )
    .await;
}

/// A pause and an end of the same session at once: it ends completed with
/// every lock released, whichever came first.
#[tokio::test]
async fn a_pause_racing_an_end_leaves_the_session_ended_whole() {
    each_backend(
        "a_pause_racing_an_end_leaves_the_session_ended_whole",
        |db| async move {
            let peer = db.peer_manager().await;
            for round in 0..10 {
                let (session, _) = populated_session(&db, 2, 2).await;
                let (pause, end) =
                    tokio::join!(peer.pause_session(session), db.manager.end_session(session));
                let end = end.expect("end");
                assert_eq!(end.locks_released, 4, "round {round}");
                match pause {
                    Ok(()) => {}
                    Err(Error::SessionNotActive { status, .. }) => assert_eq!(status, "completed"),
                    Err(e) => panic!("{}: {e}", db.backend.name()),
                }
                assert_eq!(session_row(&db, session).await.status, "completed");
                assert!(lock_rows(&db, session)
                    .await
                    .iter()
                    .all(|l| l.released_at.is_some()));
            }
        },
    )
    .await;
}
