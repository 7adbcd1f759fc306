//! A holder learns that its lock is gone, whichever way it went, on the
//! instance that released it or another one; at its time to live with no
//! sweep; not early after a renewal. On every backend.
mod common;

use std::future::Future;
use std::time::Duration;

use common::*;
use demiarch_sessions::{
    AgentOutcome, Error, LockLoss, LockOptions, Operator, ReleaseReason, SessionManager,
};
use entity::{global_sessions, resource_locks};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use uuid::Uuid;

async fn lock_row(db: &TestDb, lock: Uuid) -> resource_locks::Model {
    resource_locks::Entity::find_by_id(lock.to_string())
        .one(db.manager.connection())
        .await
        .expect("read lock")
        .expect("lock row")
}

/// A watch of the lock on `watcher`, started (and first polled) now.
fn watch(watcher: &SessionManager, lock: Uuid) -> tokio::task::JoinHandle<Result<LockLoss, Error>> {
    tokio::spawn(watcher.lock_lost(lock))
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: lock_lost did not resolve within 10 s"))
}

/// One way a lock goes: the release it makes, and the reason it must give.
async fn check(db: &TestDb, watcher: &SessionManager, case: &str, reason: ReleaseReason) {
    let m = &db.manager;
    let (session, agents) = populated_session(db, 1, 0).await;
    let lock = m
        .acquire_lock(agents[0], "file", &format!("lost/{case}/{session}"))
        .await
        .expect("acquire")
        .lock_id;
    let lost = watch(watcher, lock);
    // Armed and waiting.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!lost.is_finished(), "{case}: resolved while held");
    match case {
        "release_lock" => m.release_lock(lock).await.expect("release"),
        "release_lock_by" => {
            let operator = Operator {
                via: "test".into(),
                reason: Some("stuck".into()),
            };
            m.release_lock_by(lock, &operator)
                .await
                .expect("release_by")
        }
        "end_session" => {
            m.end_session(session).await.expect("end");
        }
        "finish_agent" => {
            m.finish_agent(agents[0], AgentOutcome::Completed)
                .await
                .expect("finish");
        }
        "recover_stale" => {
            let old = chrono::Utc::now() - chrono::Duration::hours(1);
            global_sessions::Entity::update_many()
                .col_expr(
                    global_sessions::Column::OwnerInstance,
                    Expr::value(Uuid::new_v4().to_string()),
                )
                .col_expr(global_sessions::Column::LastHeartbeatAt, Expr::value(old))
                .filter(global_sessions::Column::Id.eq(session.to_string()))
                .exec(m.connection())
                .await
                .expect("make stale");
            m.recover_stale(Duration::from_secs(60))
                .await
                .expect("recover");
        }
        "sweep_locks" => {
            // Its session marked ended by hand: the sweep finds it orphaned.
            set_session_status(db, session, "interrupted").await;
            m.sweep_locks().await.expect("sweep");
        }
        other => panic!("no case {other}"),
    }
    let loss = within(case, lost).await.expect("task").expect("a loss");
    let row = lock_row(db, lock).await;
    assert_eq!(loss.lock_id, lock);
    assert_eq!(loss.reason, reason, "{}: {case}", db.backend.name());
    assert_eq!(
        Some(loss.at),
        row.released_at.map(|t| t.to_utc()),
        "{case}: at"
    );
}

#[tokio::test]
async fn lock_lost_fires_for_every_release_here_and_on_another_instance() {
    each_backend(
        "lock_lost_fires_for_every_release_here_and_on_another_instance",
        |db| async move {
            let peer = db.peer_manager().await;
            for watcher in [&db.manager, &peer] {
                for (case, reason) in [
                    ("release_lock", ReleaseReason::Released),
                    ("release_lock_by", ReleaseReason::Released),
                    ("end_session", ReleaseReason::SessionEnd),
                    ("finish_agent", ReleaseReason::AgentFinished),
                    ("recover_stale", ReleaseReason::Orphaned),
                    ("sweep_locks", ReleaseReason::Orphaned),
                ] {
                    check(&db, watcher, case, reason).await;
                }
            }
        },
    )
    .await;
}

#[tokio::test]
async fn lock_lost_fires_at_the_ttl_without_a_sweep_and_not_before_a_renewal_runs_out() {
    each_backend(
        "lock_lost_fires_at_the_ttl_without_a_sweep_and_not_before_a_renewal_runs_out",
        |db| async move {
            let m = db.manager.clone();
            let (_, agents) = populated_session(&db, 1, 0).await;
            let ttl = |ms| LockOptions {
                ttl: Some(Duration::from_millis(ms)),
                ..LockOptions::default()
            };
            // Expiry, nobody sweeping.
            let lock = m
                .acquire_lock_with(agents[0], "file", "ttl", ttl(300))
                .await
                .expect("acquire")
                .lock_id;
            let loss = within("expiry", m.lock_lost(lock)).await.expect("a loss");
            let row = lock_row(&db, lock).await;
            assert_eq!(loss.reason, ReleaseReason::Expired);
            assert_eq!(Some(loss.at), row.expires_at.map(|t| t.to_utc()));
            assert!(row.released_at.is_none(), "nothing swept it");
            assert!(chrono::Utc::now() >= loss.at, "not before its time");
            // Already gone: at once.
            let again = within("again", m.lock_lost(lock)).await.expect("a loss");
            assert_eq!(again, loss);

            // A renewal moves the moment.
            let renewed = m
                .acquire_lock_with(agents[0], "file", "renewed", ttl(400))
                .await
                .expect("acquire")
                .lock_id;
            let lost = watch(&m, renewed);
            tokio::time::sleep(Duration::from_millis(150)).await;
            m.renew_lock(renewed, Duration::from_secs(5))
                .await
                .expect("renew");
            tokio::time::sleep(Duration::from_millis(600)).await;
            assert!(
                !lost.is_finished(),
                "{}: lock_lost fired after a renewal, before the new ttl",
                db.backend.name()
            );
            m.release_lock(renewed).await.expect("release");
            let loss = within("after renewal", lost)
                .await
                .expect("task")
                .expect("loss");
            assert_eq!(loss.reason, ReleaseReason::Released);
        },
    )
    .await;
}

#[tokio::test]
async fn lock_lost_refuses_bad_ids_and_dropped_watches_leave_nothing() {
    each_backend(
        "lock_lost_refuses_bad_ids_and_dropped_watches_leave_nothing",
        |db| async move {
            let m = db.manager.clone();
            let unknown = Uuid::new_v4();
            assert!(matches!(
                m.lock_lost(unknown).await,
                Err(Error::LockNotFound(id)) if id == unknown
            ));
            assert!(matches!(
                m.lock_lost(Uuid::nil()).await,
                Err(Error::InvalidInput {
                    field: "lock_id",
                    ..
                })
            ));
            let (session, agents) = populated_session(&db, 1, 0).await;
            let lock = m
                .acquire_lock(agents[0], "file", "dropped")
                .await
                .expect("acquire")
                .lock_id;
            // A thousand watches, each polled until it waits, then dropped.
            for _ in 0..1000 {
                let watch = m.lock_lost(lock);
                let _ = tokio::time::timeout(Duration::from_millis(1), watch).await;
            }
            let before = snapshot(&db).await;
            // The manager serves, a new watch still works, and nothing changed.
            let lost = watch(&m, lock);
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(snapshot(&db).await, before);
            m.end_session(session).await.expect("end");
            let loss = within("after drops", lost)
                .await
                .expect("task")
                .expect("loss");
            assert_eq!(loss.reason, ReleaseReason::SessionEnd);
            // Close waits for every task the manager runs: none is left
            // behind by the dropped watches.
            tokio::time::timeout(Duration::from_secs(5), m.close())
                .await
                .expect("close did not wait for leftover tasks")
                .expect("close");
        },
    )
    .await;
}
