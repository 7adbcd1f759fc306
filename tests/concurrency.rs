//! Races between real tasks, many rounds each, on every backend. Half the
//! tasks go through a second manager with its own pool (a second app instance
//! on the same database), so the database, not one process, has to serialize.
mod common;
use common::id;

use std::collections::BTreeSet;

use common::*;
use demiarch_sessions::{Error, SessionManager};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use tokio::task::JoinSet;

use entity::{audit_log, resource_locks};

const TASKS: usize = 16;

fn rounds(db: &TestDb) -> usize {
    if db.is_sqlite() {
        20
    } else {
        10
    }
}

/// The two managers tasks alternate between.
async fn managers(db: &TestDb) -> [SessionManager; 2] {
    [db.manager.clone(), db.peer_manager().await]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_tasks_ending_one_session_end_it_exactly_once() {
    each_backend(
        "sixteen_tasks_ending_one_session_end_it_exactly_once",
        |db| async move {
            let pair = managers(&db).await;
            for round in 0..rounds(&db) {
                let (session, _) = populated_session(&db, 2, 3).await;
                let mut tasks = JoinSet::new();
                for t in 0..TASKS {
                    let m = pair[t % 2].clone();
                    tasks.spawn(async move { m.end_session(session).await });
                }
                let mut first_ends = 0;
                let mut released = 0;
                let mut completed_at = BTreeSet::new();
                while let Some(joined) = tasks.join_next().await {
                    let report = joined
                        .expect("task")
                        .unwrap_or_else(|e| panic!("round {round}: an end failed: {e:?}"));
                    if !report.already_ended {
                        first_ends += 1;
                    }
                    released += report.locks_released;
                    completed_at.insert(report.completed_at);
                }
                assert_eq!(first_ends, 1, "round {round}: exactly one end did the work");
                assert_eq!(released, 6, "round {round}: locks released once, in total");
                assert_eq!(
                    completed_at.len(),
                    1,
                    "round {round}: every report names the same end"
                );
                assert_eq!(audit_of(&db, session, "session_end").await.len(), 1);
                let row = session_row(&db, session).await;
                assert_eq!(row.status, "completed");
                assert_eq!(
                    row.completed_at.map(|at| at.to_utc()),
                    completed_at.into_iter().next()
                );
                assert!(lock_rows(&db, session)
                    .await
                    .iter()
                    .all(|l| l.released_at.is_some()));
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_agents_racing_for_one_resource_get_one_grant() {
    each_backend(
        "sixteen_agents_racing_for_one_resource_get_one_grant",
        |db| async move {
            let pair = managers(&db).await;
            let session = db.manager.start_session().await.expect("start");
            let mut agents = Vec::new();
            for a in 0..TASKS {
                agents.push(
                    db.manager
                        .register_agent(session, &format!("agent-{a}"))
                        .await
                        .expect("register"),
                );
            }
            for round in 0..rounds(&db) {
                let key = format!("contended-{round}");
                let mut tasks = JoinSet::new();
                for (t, agent) in agents.iter().copied().enumerate() {
                    let m = pair[t % 2].clone();
                    let key = key.clone();
                    tasks.spawn(async move { (agent, m.acquire_lock(agent, "file", &key).await) });
                }
                let mut grants = Vec::new();
                let mut refused = 0;
                while let Some(joined) = tasks.join_next().await {
                    match joined.expect("task") {
                        (agent, Ok(grant)) => grants.push((agent, grant)),
                        (_, Err(Error::LockHeld { resource_key, .. })) => {
                            assert_eq!(resource_key, key);
                            refused += 1;
                        }
                        (_, Err(other)) => {
                            panic!("round {round}: raw error reached the caller: {other:?}")
                        }
                    }
                }
                assert_eq!(grants.len(), 1, "round {round}: one grant");
                assert_eq!(refused, TASKS - 1, "round {round}: the rest refused");
                let held = resource_locks::Entity::find()
                    .filter(resource_locks::Column::ResourceKey.eq(key.as_str()))
                    .filter(resource_locks::Column::ReleasedAt.is_null())
                    .all(db.manager.connection())
                    .await
                    .expect("held rows");
                assert_eq!(held.len(), 1, "round {round}: one held row");
                assert_eq!(id(&held[0].id), grants[0].1.lock_id);
                assert_eq!(id(&held[0].agent_id), grants[0].0);
            }
        },
    )
    .await;
}

/// Agents keep acquiring while their session ends. Afterwards no held lock
/// belongs to the ended session: every acquire either committed before the
/// end (and was released by it) or was refused with SessionNotActive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acquires_racing_an_end_leave_no_held_lock_behind() {
    each_backend(
        "acquires_racing_an_end_leave_no_held_lock_behind",
        |db| async move {
            let pair = managers(&db).await;
            for round in 0..rounds(&db) {
                let session = db.manager.start_session().await.expect("start");
                let mut agents = Vec::new();
                for a in 0..4 {
                    agents.push(
                        db.manager
                            .register_agent(session, &format!("a{a}"))
                            .await
                            .expect("register"),
                    );
                }
                let mut tasks = JoinSet::new();
                for (t, agent) in agents.iter().copied().enumerate() {
                    let m = pair[t % 2].clone();
                    tasks.spawn(async move {
                        let mut granted = 0u64;
                        for i in 0..8 {
                            match m
                                .acquire_lock(agent, "file", &format!("{session}/{t}/{i}"))
                                .await
                            {
                                Ok(_) => granted += 1,
                                Err(Error::SessionNotActive { .. })
                                | Err(Error::AgentNotRunning { .. }) => break,
                                Err(other) => panic!("unexpected acquire error: {other:?}"),
                            }
                        }
                        Ok::<u64, Error>(granted)
                    });
                }
                let ender = pair[round % 2].clone();
                let end = tokio::spawn(async move {
                    tokio::task::yield_now().await;
                    ender.end_session(session).await
                });
                let report = end.await.expect("end task").expect("end_session");
                let mut granted = 0;
                while let Some(joined) = tasks.join_next().await {
                    granted += joined.expect("task").expect("acquirer");
                }
                let locks = lock_rows(&db, session).await;
                assert_eq!(
                    locks.len() as u64,
                    granted,
                    "round {round}: every grant has its row"
                );
                assert!(
                    locks.iter().all(|l| l.released_at.is_some()),
                    "round {round}: a lock outlived its session"
                );
                assert_eq!(
                    report.locks_released,
                    locks
                        .iter()
                        .filter(|l| l.release_reason.as_deref() == Some("session_end"))
                        .count() as u64,
                    "round {round}: the end released exactly the locks granted before it"
                );
                assert_eq!(
                    locks.len() as u64,
                    report.locks_released,
                    "round {round}: none granted after the end"
                );
            }
        },
    )
    .await;
}

/// Eight writers at once, mixing every write operation: none sees
/// "database is locked" or any other raw error inside the busy budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_way_write_contention_surfaces_no_busy_error() {
    each_backend(
        "eight_way_write_contention_surfaces_no_busy_error",
        |db| async move {
            let pair = managers(&db).await;
            let mut tasks = JoinSet::new();
            for t in 0..8 {
                let m = pair[t % 2].clone();
                tasks.spawn(async move {
                    for i in 0..10 {
                        let session = m.start_session().await?;
                        let agent = m.register_agent(session, "worker").await?;
                        let grant = m.acquire_lock(agent, "file", &format!("w{t}/{i}")).await?;
                        if i % 2 == 0 {
                            m.release_lock(grant.lock_id).await?;
                        }
                        m.contexts()
                            .put(session, "k", serde_json::json!(i))
                            .expect("put window");
                        m.end_session(session).await?;
                    }
                    Ok::<(), Error>(())
                });
            }
            while let Some(joined) = tasks.join_next().await {
                if let Err(e) = joined.expect("task") {
                    panic!("a writer saw an error under contention: {e:?}");
                }
            }
            let ends = audit_log::Entity::find()
                .filter(audit_log::Column::EventType.eq("session_end"))
                .count(db.manager.connection())
                .await
                .expect("count");
            assert_eq!(ends, 80);
            let held = resource_locks::Entity::find()
                .filter(resource_locks::Column::ReleasedAt.is_null())
                .count(db.manager.connection())
                .await
                .expect("count");
            assert_eq!(held, 0);
        },
    )
    .await;
}

/// On a SQLite file the manager writes through a connection of its own, apart
/// from the pool `connection()` hands out. With that pool cut to one
/// connection and held by the app in an open read transaction, an end still
/// goes through (a shared pool would wait for the connection until
/// `connect_timeout`), the app's snapshot keeps seeing the session active,
/// and the rows afterwards are the end's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_do_not_wait_for_the_app_holding_the_read_pool() {
    use sea_orm::TransactionTrait;
    let config = demiarch_sessions::Config {
        max_connections: 1,
        connect_timeout: std::time::Duration::from_secs(1),
        ..test_config()
    };
    let db = TestDb::with_config(Backend::SqliteFile, config).await;
    let (session, agents) = populated_session(&db, 2, 3).await;

    let app = db.manager.connection().begin().await.expect("app's read");
    let seen = entity::global_sessions::Entity::find_by_id(session.to_string())
        .one(&app)
        .await
        .expect("read in the app's transaction")
        .expect("session row");
    assert_eq!(seen.status, "active");

    let report = db
        .manager
        .end_session(session)
        .await
        .expect("end while the app holds the read pool's only connection");
    assert_eq!(report.locks_released, 6);

    let still = entity::global_sessions::Entity::find_by_id(session.to_string())
        .one(&app)
        .await
        .expect("read again in the app's transaction")
        .expect("session row");
    assert_eq!(
        still.status, "active",
        "the app's snapshot predates the end"
    );
    app.commit().await.expect("end the app's read");

    let (row, agent_rows, locks, audit) = rows_of(&db, session).await;
    assert_eq!(row.status, "completed");
    assert_eq!(agent_rows.len(), agents.len());
    assert!(agent_rows.iter().all(|a| a.status == "cancelled"));
    assert_eq!(locks.len(), 6);
    assert!(locks.iter().all(|l| l.released_at.is_some()));
    assert_eq!(
        audit
            .iter()
            .filter(|a| a.event_type == "session_end")
            .count(),
        1
    );
    db.cleanup().await;
}

/// The other side: an app holding the writer itself (a transaction on
/// `write_connection()`) makes the manager's writes wait for it, at most
/// `connect_timeout`, and then fail with an error that says so and change
/// nothing; once the app lets go, they go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_behind_the_app_holding_the_writer_time_out_and_change_nothing() {
    use sea_orm::TransactionTrait;
    let config = demiarch_sessions::Config {
        connect_timeout: std::time::Duration::from_millis(300),
        ..test_config()
    };
    let db = TestDb::with_config(Backend::SqliteFile, config).await;
    let (session, _agents) = populated_session(&db, 1, 2).await;
    let before = snapshot(&db).await;

    let app = db
        .manager
        .write_connection()
        .begin()
        .await
        .expect("app's transaction on the writer");
    let started = db.manager.start_session().await;
    let ended = db.manager.end_session(session).await;
    for (call, result) in [("start", started.map(|_| ())), ("end", ended.map(|_| ()))] {
        let err = result.expect_err(&format!("{call} while the app holds the writer"));
        assert!(err.is_timeout(), "{call}: a timeout, got {err:?}");
    }
    assert_eq!(snapshot(&db).await, before, "nothing changed");
    app.rollback().await.expect("app lets go");

    db.manager
        .end_session(session)
        .await
        .expect("end afterwards");
    assert_eq!(session_row(&db, session).await.status, "completed");
    db.cleanup().await;
}
