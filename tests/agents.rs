//! Agents finish: completed or failed, their locks released and handed over
//! at once, their own wait dropped, one `agent_finished` audit row; and the
//! races with an acquire and with their session's end. On every backend,
//! asserting on rows.
mod common;

use std::time::Duration;

use common::*;
use demiarch_sessions::{AgentOutcome, AgentStatus, Error, LockOptions, MAX_NAME_BYTES};
use entity::{agent_executions, lock_waiters, resource_locks};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use uuid::Uuid;

async fn agent_row(db: &TestDb, agent: Uuid) -> agent_executions::Model {
    agent_executions::Entity::find_by_id(agent.to_string())
        .one(db.manager.connection())
        .await
        .expect("read agent")
        .expect("agent row")
}

async fn locks_of_agent(db: &TestDb, agent: Uuid) -> Vec<resource_locks::Model> {
    resource_locks::Entity::find()
        .filter(resource_locks::Column::AgentId.eq(agent.to_string()))
        .all(db.manager.connection())
        .await
        .expect("read locks")
}

async fn waits_of(db: &TestDb, agent: Uuid) -> usize {
    lock_waiters::Entity::find()
        .filter(lock_waiters::Column::AgentId.eq(agent.to_string()))
        .all(db.manager.connection())
        .await
        .expect("read waiters")
        .len()
}

fn waiting(ms: u64) -> LockOptions {
    LockOptions {
        wait: Some(Duration::from_millis(ms)),
        ..LockOptions::default()
    }
}

/// Until the resource has a queued waiter.
async fn until_queued(db: &TestDb, resource_key: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while db
        .manager
        .lock_waiters("file", resource_key)
        .await
        .expect("waiters")
        .is_empty()
    {
        assert!(tokio::time::Instant::now() < deadline, "never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_completed_agent_releases_its_locks_and_they_are_handed_over() {
    each_backend(
        "a_completed_agent_releases_its_locks_and_they_are_handed_over",
        |db| async move {
            let m = db.manager.clone();
            let session = m.start_session().await.expect("start");
            let a = m.register_agent(session, "a").await.expect("agent a");
            let b = m.register_agent(session, "b").await.expect("agent b");
            let x = m.acquire_lock(a, "file", "x").await.expect("a takes x");
            m.acquire_lock(a, "file", "y").await.expect("a takes y");
            let waiter = {
                let m = m.clone();
                tokio::spawn(
                    async move { m.acquire_lock_with(b, "file", "x", waiting(10_000)).await },
                )
            };
            until_queued(&db, "x").await;

            let report = m
                .finish_agent(a, AgentOutcome::Completed)
                .await
                .expect("finish");
            assert_eq!(
                (
                    report.agent_id,
                    report.session_id,
                    report.status,
                    report.locks_released
                ),
                (a, session, AgentStatus::Completed, 2)
            );
            assert!(!report.already_finished);

            let row = agent_row(&db, a).await;
            assert_eq!(row.status, "completed");
            assert!(row.completed_at.is_some());
            let locks = locks_of_agent(&db, a).await;
            assert_eq!(locks.len(), 2);
            for lock in &locks {
                assert!(
                    lock.released_at.is_some(),
                    "{}: released",
                    db.backend.name()
                );
                assert_eq!(lock.release_reason.as_deref(), Some("agent_finished"));
            }
            let audit = audit_of(&db, session, "agent_finished").await;
            assert_eq!(audit.len(), 1);
            assert_eq!(audit[0].details["agent_id"], a.to_string());
            assert_eq!(audit[0].details["outcome"], "completed");
            assert_eq!(audit[0].details["locks_released"], 2);
            assert!(audit[0].details["reason"].is_null());

            // The waiter is handed x, with a higher fencing token.
            let grant = tokio::time::timeout(Duration::from_secs(10), waiter)
                .await
                .expect("the waiter was handed x in time")
                .expect("task")
                .expect("grant");
            assert!(grant.fencing_token > x.fencing_token);
            let held: Vec<_> = locks_of_agent(&db, b)
                .await
                .into_iter()
                .filter(|l| l.released_at.is_none())
                .collect();
            assert_eq!(held.len(), 1);
            assert_eq!(held[0].resource_key, "x");
            assert_eq!(waits_of(&db, b).await, 0);
        },
    )
    .await;
}

#[tokio::test]
async fn a_failed_agent_records_why_and_its_own_wait_ends() {
    each_backend(
        "a_failed_agent_records_why_and_its_own_wait_ends",
        |db| async move {
            let m = db.manager.clone();
            let session = m.start_session().await.expect("start");
            let holder = m.register_agent(session, "holder").await.expect("agent");
            let c = m.register_agent(session, "c").await.expect("agent");
            m.acquire_lock(holder, "file", "z").await.expect("holder takes z");
            let wait = {
                let m = m.clone();
                tokio::spawn(async move { m.acquire_lock_with(c, "file", "z", waiting(10_000)).await })
            };
            until_queued(&db, "z").await;
            let reason = "the tool crashed";
            let report = m
                .finish_agent(
                    c,
                    AgentOutcome::Failed {
                        reason: reason.into(),
                    },
                )
                .await
                .expect("finish");
            assert_eq!((report.status, report.locks_released), (AgentStatus::Failed, 0));
            assert_eq!(waits_of(&db, c).await, 0, "its wait is gone with it");
            let outcome = tokio::time::timeout(Duration::from_secs(10), wait)
                .await
                .expect("the wait ended in time")
                .expect("task");
            assert!(
                matches!(&outcome, Err(Error::AgentNotRunning { agent_id, status }) if *agent_id == c && status == "failed"),
                "{}: {outcome:?}",
                db.backend.name()
            );
            assert!(locks_of_agent(&db, c).await.is_empty(), "nothing granted to c");
            assert_eq!(agent_row(&db, c).await.status, "failed");
            let audit = audit_of(&db, session, "agent_finished").await;
            assert_eq!(audit.len(), 1);
            assert_eq!(audit[0].details["outcome"], "failed");
            assert_eq!(audit[0].details["reason"], reason);
        },
    )
    .await;
}

#[tokio::test]
async fn finishing_twice_writes_nothing_and_a_finished_or_cancelled_agent_does_no_more() {
    each_backend(
        "finishing_twice_writes_nothing_and_a_finished_or_cancelled_agent_does_no_more",
        |db| async move {
            let m = db.manager.clone();
            let (session, agents) = populated_session(&db, 2, 1).await;
            let (a, e) = (agents[0], agents[1]);
            let first = m.finish_agent(a, AgentOutcome::Completed).await.expect("finish");
            let before = snapshot(&db).await;
            let again = m
                .finish_agent(
                    a,
                    AgentOutcome::Failed {
                        reason: "late".into(),
                    },
                )
                .await
                .expect("again");
            assert!(again.already_finished);
            assert_eq!(again.status, AgentStatus::Completed, "the first finish stands");
            assert_eq!(again.completed_at, first.completed_at);
            assert_eq!(again.locks_released, 0);
            assert_eq!(snapshot(&db).await, before, "a second finish wrote nothing");

            let refused = m.acquire_lock(a, "file", "after").await;
            assert!(
                matches!(&refused, Err(Error::AgentNotRunning { status, .. }) if status == "completed"),
                "{refused:?}"
            );
            assert_eq!(snapshot(&db).await, before, "a finished agent took nothing");

            m.end_session(session).await.expect("end");
            assert_eq!(agent_row(&db, e).await.status, "cancelled");
            let after_end = snapshot(&db).await;
            let cancelled = m.finish_agent(e, AgentOutcome::Completed).await;
            assert!(
                matches!(&cancelled, Err(Error::AgentNotRunning { status, .. }) if status == "cancelled"),
                "{cancelled:?}"
            );
            assert_eq!(snapshot(&db).await, after_end);
            assert_eq!(agent_row(&db, a).await.status, "completed", "the end left it");
        },
    )
    .await;
}

#[tokio::test]
async fn bad_finishes_are_refused_by_name_and_change_nothing() {
    each_backend(
        "bad_finishes_are_refused_by_name_and_change_nothing",
        |db| async move {
            let m = db.manager.clone();
            let (_, agents) = populated_session(&db, 1, 1).await;
            let before = snapshot(&db).await;
            let field = |r: Result<_, Error>| match r {
                Err(Error::InvalidInput { field, .. }) => field,
                other => panic!("not refused by field: {other:?}"),
            };
            assert_eq!(
                field(m.finish_agent(Uuid::nil(), AgentOutcome::Completed).await),
                "agent_id"
            );
            for reason in [String::new(), "  ".into(), "x".repeat(MAX_NAME_BYTES + 1)] {
                let outcome = AgentOutcome::Failed { reason };
                assert_eq!(field(m.finish_agent(agents[0], outcome).await), "reason");
            }
            let unknown = Uuid::new_v4();
            assert!(matches!(
                m.finish_agent(unknown, AgentOutcome::Completed).await,
                Err(Error::AgentNotFound(id)) if id == unknown
            ));
            assert_eq!(snapshot(&db).await, before);
        },
    )
    .await;
}

/// A finish and an acquire of the same agent, at once, from two instances:
/// whichever goes first, no lock stays held by a finished agent.
#[tokio::test]
async fn a_finish_racing_an_acquire_never_leaves_a_finished_agent_holding() {
    each_backend(
        "a_finish_racing_an_acquire_never_leaves_a_finished_agent_holding",
        |db| async move {
            let peer = db.peer_manager().await;
            let rounds = if db.is_sqlite() { 20 } else { 12 };
            let (mut granted, mut refused) = (0, 0);
            for round in 0..rounds {
                let session = db.manager.start_session().await.expect("start");
                let agent = db
                    .manager
                    .register_agent(session, "a")
                    .await
                    .expect("agent");
                let key = format!("race-{round}");
                let (finish, acquire) = tokio::join!(
                    db.manager.finish_agent(agent, AgentOutcome::Completed),
                    peer.acquire_lock(agent, "file", &key)
                );
                finish.expect("finish");
                match acquire {
                    Ok(_) => granted += 1,
                    Err(Error::AgentNotRunning { .. }) => refused += 1,
                    Err(e) => panic!("{}: the acquire failed otherwise: {e}", db.backend.name()),
                }
                assert_eq!(agent_row(&db, agent).await.status, "completed");
                let held: Vec<_> = locks_of_agent(&db, agent)
                    .await
                    .into_iter()
                    .filter(|l| l.released_at.is_none())
                    .collect();
                assert!(
                    held.is_empty(),
                    "{} round {round}: a finished agent holds {held:?}",
                    db.backend.name()
                );
                db.manager.end_session(session).await.expect("end");
            }
            eprintln!(
                "{}: {rounds} races: {granted} acquires first (then released by the finish), \
                 {refused} refused",
                db.backend.name()
            );
        },
    )
    .await;
}

/// A finish and an end of the agent's session at once: the agent ends
/// completed (finish first) or cancelled (end first), never holding a lock.
#[tokio::test]
async fn a_finish_racing_the_end_of_its_session_leaves_rows_consistent() {
    each_backend(
        "a_finish_racing_the_end_of_its_session_leaves_rows_consistent",
        |db| async move {
            let peer = db.peer_manager().await;
            for round in 0..10 {
                let (session, agents) = populated_session(&db, 2, 2).await;
                let (finish, end) = tokio::join!(
                    peer.finish_agent(agents[0], AgentOutcome::Completed),
                    db.manager.end_session(session)
                );
                let end = end.expect("end");
                let status = agent_row(&db, agents[0]).await.status;
                match finish {
                    Ok(report) => {
                        assert_eq!(status, "completed", "round {round}");
                        assert_eq!(report.locks_released, 2);
                        assert_eq!(end.locks_released, 2, "the end released the other agent's");
                    }
                    Err(Error::AgentNotRunning { .. }) => {
                        assert_eq!(status, "cancelled", "round {round}");
                        assert_eq!(end.locks_released, 4);
                    }
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

/// A finish racing the grant of the agent's own wait: the holder lets go
/// just as the waiter is finished. Whichever commits first, the finished
/// waiter never holds the lock.
#[tokio::test]
async fn a_finish_racing_a_waiters_grant_never_leaves_the_waiter_holding() {
    each_backend(
        "a_finish_racing_a_waiters_grant_never_leaves_the_waiter_holding",
        |db| async move {
            let peer = db.peer_manager().await;
            let m = db.manager.clone();
            for round in 0..10 {
                let session = m.start_session().await.expect("start");
                let holder = m.register_agent(session, "holder").await.expect("agent");
                let waiter = m.register_agent(session, "waiter").await.expect("agent");
                let key = format!("grant-race-{round}");
                let held = m
                    .acquire_lock(holder, "file", &key)
                    .await
                    .expect("held")
                    .lock_id;
                let wait = {
                    let m = m.clone();
                    let key = key.clone();
                    tokio::spawn(async move {
                        m.acquire_lock_with(waiter, "file", &key, waiting(10_000))
                            .await
                    })
                };
                until_queued(&db, &key).await;
                let (released, finished) = tokio::join!(
                    m.release_lock(held),
                    peer.finish_agent(waiter, AgentOutcome::Completed)
                );
                released.expect("release");
                finished.expect("finish");
                let outcome = tokio::time::timeout(Duration::from_secs(10), wait)
                    .await
                    .expect("the wait ended in time")
                    .expect("task");
                match outcome {
                    Ok(_) | Err(Error::AgentNotRunning { .. }) => {}
                    Err(e) => panic!("{}: the wait failed otherwise: {e}", db.backend.name()),
                }
                assert_eq!(agent_row(&db, waiter).await.status, "completed");
                let held_by_waiter: Vec<_> = locks_of_agent(&db, waiter)
                    .await
                    .into_iter()
                    .filter(|l| l.released_at.is_none())
                    .collect();
                assert!(
                    held_by_waiter.is_empty(),
                    "{} round {round}: the finished waiter holds {held_by_waiter:?}",
                    db.backend.name()
                );
                assert_eq!(waits_of(&db, waiter).await, 0);
                m.end_session(session).await.expect("end");
            }
        },
    )
    .await;
}
