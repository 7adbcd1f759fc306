//! Waiting for a lock: the queue in `lock_waiters`, hand-over on every kind of
//! release, timeouts, dropped waits, deadlock refusal and lock delay, on every
//! backend and across manager instances.
mod common;

use std::time::Duration;

use common::*;
use demiarch_sessions::{Config, Error, LockOptions, SessionManager};
use entity::{audit_log, lock_waiters, resource_locks};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use tokio::time::Instant;
use uuid::Uuid;

fn waiting(ms: u64) -> LockOptions {
    LockOptions {
        ttl: None,
        wait: Some(Duration::from_millis(ms)),
    }
}

async fn waiter_rows(db: &TestDb) -> Vec<lock_waiters::Model> {
    lock_waiters::Entity::find()
        .order_by_asc(lock_waiters::Column::Ticket)
        .all(db.manager.connection())
        .await
        .expect("read lock_waiters")
}

/// The lock rows of one resource, in grant order.
async fn grants_of(db: &TestDb, key: &str) -> Vec<resource_locks::Model> {
    resource_locks::Entity::find()
        .filter(resource_locks::Column::ResourceKey.eq(key))
        .order_by_asc(resource_locks::Column::FencingToken)
        .all(db.manager.connection())
        .await
        .expect("read resource_locks")
}

/// Waits, a bounded while, until `check` holds: for things another task or
/// instance does in the background.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let give_up = Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(Instant::now() < give_up, "gave up waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn queued(db: &TestDb, n: usize) {
    eventually(&format!("{n} waiters are queued"), || async {
        waiter_rows(db).await.len() == n
    })
    .await;
}

/// Another instance on the same store: on in-memory SQLite, a manager with
/// its own instance id on the same connection.
async fn other_instance(db: &TestDb) -> SessionManager {
    if db.backend == Backend::SqliteMemory {
        return SessionManager::new(db.manager.connection().clone(), test_config())
            .expect("second manager");
    }
    db.peer_manager().await
}

/// Starts `agent` waiting up to `ms` for `file/key` on `m`, in a task.
fn spawn_wait(
    m: &SessionManager,
    agent: Uuid,
    key: &str,
    ms: u64,
) -> tokio::task::JoinHandle<demiarch_sessions::Result<demiarch_sessions::LockGrant>> {
    let (m, key) = (m.clone(), key.to_owned());
    tokio::spawn(async move { m.acquire_lock_with(agent, "file", &key, waiting(ms)).await })
}

async fn agent_in_new_session(m: &SessionManager, kind: &str) -> (Uuid, Uuid) {
    let session = m.start_session().await.expect("start");
    let agent = m.register_agent(session, kind).await.expect("register");
    (session, agent)
}

/// Every `lock_deadlock` audit row, oldest first.
async fn deadlock_rows(db: &TestDb) -> Vec<audit_log::Model> {
    audit_log::Entity::find()
        .filter(audit_log::Column::EventType.eq("lock_deadlock"))
        .order_by_asc(audit_log::Column::Seq)
        .all(db.manager.connection())
        .await
        .expect("read lock_deadlock rows")
}

/// One agent of a cycle: the agent, its session, its type, and the file it
/// waits for (the refused one: asked to wait for).
type Member<'a> = (Uuid, Uuid, &'a str, &'a str);

/// `row` is the `lock_deadlock` row of a refusal of `cycle[0]`, in its
/// session, naming every agent of `cycle` in order with the file it waits
/// for and the lock the next one holds on it (one of `locks`, held).
fn assert_names_cycle(
    row: &audit_log::Model,
    cycle: &[Member<'_>],
    locks: &[resource_locks::Model],
) {
    assert_eq!(row.event_type, "lock_deadlock");
    assert_eq!(row.session_id, Some(cycle[0].1.to_string()));
    let details = &row.details;
    assert_eq!(details["agent_id"], cycle[0].0.to_string(), "{details}");
    let agents: Vec<String> = cycle.iter().map(|m| m.0.to_string()).collect();
    assert_eq!(details["agents"], serde_json::json!(agents), "{details}");
    let named = details["cycle"].as_array().expect("cycle is a list");
    assert_eq!(named.len(), cycle.len(), "{details}");
    for (i, ((agent, session, kind, key), named)) in cycle.iter().zip(named).enumerate() {
        let next = cycle[(i + 1) % cycle.len()].0.to_string();
        assert_eq!(named["agent_id"], agent.to_string(), "{details}");
        assert_eq!(named["session_id"], session.to_string(), "{details}");
        assert_eq!(named["agent_type"], *kind, "{details}");
        let waits_for = &named["waits_for"];
        assert_eq!(waits_for["resource_type"], "file", "{details}");
        assert_eq!(waits_for["resource_key"], *key, "{details}");
        assert_eq!(waits_for["held_by"], next, "{details}");
        let lock = locks
            .iter()
            .find(|l| waits_for["lock_id"] == l.id.as_str())
            .unwrap_or_else(|| panic!("no lock row named by {waits_for}"));
        assert_eq!(
            (
                lock.agent_id.as_str(),
                lock.resource_key.as_str(),
                lock.released_at
            ),
            (next.as_str(), *key, None),
            "the named lock is the next agent's, held"
        );
        assert_eq!(waits_for["fencing_token"], lock.fencing_token, "{details}");
    }
}

/// What a refused wait left: the rows of `before` and one more audit row, a
/// `lock_deadlock` naming `cycle` (see [`assert_names_cycle`]).
async fn assert_refusal_recorded(db: &TestDb, before: &Snapshot, cycle: &[Member<'_>]) {
    let after = snapshot(db).await;
    assert_eq!(
        (&after.sessions, &after.agents, &after.locks, &after.waiters),
        (
            &before.sessions,
            &before.agents,
            &before.locks,
            &before.waiters
        ),
        "a refused wait changed rows"
    );
    let added: Vec<&audit_log::Model> = after
        .audit
        .iter()
        .filter(|row| !before.audit.contains(row))
        .collect();
    assert_eq!(added.len(), 1, "one audit row per refusal: {added:?}");
    assert_eq!(after.audit.len(), before.audit.len() + 1);
    assert_names_cycle(added[0], cycle, &after.locks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_are_granted_in_arrival_order_across_instances() {
    each_backend("fifo", |db| async move {
        let m1 = db.manager.clone();
        let m2 = other_instance(&db).await;
        let (_, holder) = agent_in_new_session(&m1, "holder").await;
        let first = m1.acquire_lock(holder, "file", "q").await.expect("hold");
        let mut waiters = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..4 {
            let m = if i % 2 == 0 { m1.clone() } else { m2.clone() };
            let (session, agent) = agent_in_new_session(&m, &format!("waiter-{i}")).await;
            waiters.push((agent, session));
            tasks.push(tokio::spawn(async move {
                let grant = m
                    .acquire_lock_with(agent, "file", "q", waiting(30_000))
                    .await
                    .expect("waiter is handed the lock");
                m.release_lock(grant.lock_id).await.expect("release");
                grant
            }));
            queued(&db, i + 1).await;
        }

        // Every instance sees the whole queue, head first.
        for m in [&m1, &m2] {
            let queue = m.lock_waiters("file", "q").await.expect("lock_waiters");
            let seen: Vec<(Uuid, Uuid, u32)> = queue
                .iter()
                .map(|w| (w.agent_id, w.session_id, w.position))
                .collect();
            let expected: Vec<(Uuid, Uuid, u32)> = waiters
                .iter()
                .zip(1..)
                .map(|(&(agent, session), position)| (agent, session, position))
                .collect();
            assert_eq!(seen, expected);
            assert!(queue.windows(2).all(|w| w[0].since <= w[1].since));
        }

        // No barging: while anyone waits, an acquire that does not wait is
        // refused, even right after the release.
        let (_, barger) = agent_in_new_session(&m2, "barger").await;
        m1.release_lock(first.lock_id).await.expect("release");
        match m2.acquire_lock(barger, "file", "q").await {
            Err(Error::LockHeld { .. }) => {}
            other => panic!("a later arrival got ahead of the queue: {other:?}"),
        }

        let started = Instant::now();
        let mut tokens = vec![first.fencing_token];
        for task in tasks {
            tokens.push(task.await.expect("waiter task").fencing_token);
        }
        // Each hand-over is woken, not found by the 30 s wait running out.
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(tokens.windows(2).all(|t| t[0] < t[1]), "{tokens:?}");

        let rows = grants_of(&db, "q").await;
        let order: Vec<Uuid> = rows.iter().map(|l| id(&l.agent_id)).collect();
        let mut expected = vec![holder];
        expected.extend(waiters.iter().map(|w| w.0));
        assert_eq!(order, expected, "grants follow arrival order");
        assert!(rows.iter().all(|l| l.released_at.is_some()));
        assert!(waiter_rows(&db).await.is_empty());
        db.cleanup().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_wait_leaves_the_queue_and_never_gets_the_lock() {
    each_backend("wait timeout", |db| async move {
        let m = &db.manager;
        let (_, holder) = agent_in_new_session(m, "holder").await;
        let (_, waiter) = agent_in_new_session(m, "waiter").await;
        let held = m.acquire_lock(holder, "file", "t").await.expect("hold");
        let started = Instant::now();
        match m.acquire_lock_with(waiter, "file", "t", waiting(300)).await {
            Err(Error::LockWaitTimeout {
                resource_type,
                resource_key,
                waited_ms,
                holder_agent_id,
            }) => {
                assert_eq!(
                    (resource_type.as_str(), resource_key.as_str()),
                    ("file", "t")
                );
                assert!(waited_ms >= 300, "waited {waited_ms} ms");
                assert!(waited_ms < 3_000, "waited {waited_ms} ms for a 300 ms wait");
                assert_eq!(holder_agent_id, Some(holder));
            }
            other => panic!("expected LockWaitTimeout, got {other:?}"),
        }
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(waiter_rows(&db).await.is_empty(), "entry left behind");

        m.release_lock(held.lock_id).await.expect("release");
        tokio::time::sleep(m.config().lock_poll_interval * 3).await;
        let rows = grants_of(&db, "t").await;
        assert_eq!(rows.len(), 1, "the timed-out waiter was granted later");
        assert!(rows[0].released_at.is_some());
        db.cleanup().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_wait_leaves_the_queue_while_the_resource_stays_held() {
    each_backend("dropped wait", |db| async move {
        let m = db.manager.clone();
        let (_, holder) = agent_in_new_session(&m, "holder").await;
        let (_, dropped) = agent_in_new_session(&m, "dropped").await;
        let (_, next) = agent_in_new_session(&m, "next").await;
        let held = m.acquire_lock(holder, "file", "d").await.expect("hold");

        let wait = m.acquire_lock_with(dropped, "file", "d", waiting(30_000));
        assert!(tokio::time::timeout(Duration::from_millis(300), wait)
            .await
            .is_err());
        // Gone while the resource is still held: no hand-over needed.
        eventually("the dropped wait left the queue", || async {
            waiter_rows(&db).await.is_empty()
        })
        .await;

        let m2 = m.clone();
        let task = tokio::spawn(async move {
            m2.acquire_lock_with(next, "file", "d", waiting(30_000))
                .await
                .expect("next waiter")
        });
        queued(&db, 1).await;
        m.release_lock(held.lock_id).await.expect("release");
        let grant = task.await.expect("task");
        let rows = grants_of(&db, "d").await;
        let holders: Vec<Uuid> = rows.iter().map(|l| id(&l.agent_id)).collect();
        assert_eq!(holders, vec![holder, next]);
        assert_eq!(rows[1].fencing_token, grant.fencing_token);
        db.cleanup().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_dropped_at_any_moment_leaves_no_grant_that_nobody_holds() {
    each_backend("drop anywhere", |db| async move {
        let m = &db.manager;
        let (_, agent) = agent_in_new_session(m, "agent").await;
        for step in 0..40u64 {
            let key = format!("drop/{step}");
            let call = m.acquire_lock_with(agent, "file", &key, waiting(1_000));
            match tokio::time::timeout(Duration::from_micros(step * 75), call).await {
                Ok(grant) => {
                    let grant = grant.expect("free resource");
                    m.release_lock(grant.lock_id).await.expect("release");
                }
                Err(_) => {
                    let what = format!(
                        "{}: step {step}: a dropped acquire leaves nothing held",
                        db.backend.name()
                    );
                    eventually(&what, || async {
                        grants_of(&db, &key)
                            .await
                            .iter()
                            .all(|l| l.released_at.is_some())
                            && waiter_rows(&db).await.is_empty()
                    })
                    .await
                }
            }
        }

        // Queued behind a holder, dropped at any moment, or by a timeout of
        // exactly its wait: the entry goes, and the agent is never granted.
        let (_, holder) = agent_in_new_session(m, "holder").await;
        let held = m.acquire_lock(holder, "file", "held").await.expect("hold");
        for step in 0..20u64 {
            let (wait, cut) = match step {
                0..=14 => (30_000, Duration::from_micros(step * 300)),
                _ => (200, Duration::from_millis(200)),
            };
            let call = m.acquire_lock_with(agent, "file", "held", waiting(wait));
            let outcome = tokio::time::timeout(cut, call).await;
            assert!(
                matches!(outcome, Err(_) | Ok(Err(Error::LockWaitTimeout { .. }))),
                "{outcome:?}"
            );
            let what = format!(
                "{}: queued step {step}: the entry leaves",
                db.backend.name()
            );
            eventually(&what, || async { waiter_rows(&db).await.is_empty() }).await;
        }
        m.release_lock(held.lock_id).await.expect("release");
        tokio::time::sleep(m.config().lock_poll_interval * 3).await;
        assert_eq!(
            grants_of(&db, "held").await.len(),
            1,
            "a dropped waiter was granted"
        );
        db.cleanup().await;
    })
    .await;
}

/// How the holder of `file/h` lets go, in `every_kind_of_release_hands_over`.
#[derive(Clone, Copy, Debug)]
enum LetGo {
    Release,
    EndSession,
    SweepOrphaned,
    ExpiredUnswept,
    RecoverStale,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_release_hands_over_to_the_head_waiter() {
    // No poll fires during the test: each hand-over is the release's own wake-up.
    let config = Config {
        lock_poll_interval: Duration::from_secs(600),
        ..test_config()
    };
    each_backend_with("hand-over", config, |db| async move {
        for how in [
            LetGo::Release,
            LetGo::EndSession,
            LetGo::SweepOrphaned,
            LetGo::ExpiredUnswept,
            LetGo::RecoverStale,
        ] {
            let m = db.manager.clone();
            let key = format!("h/{how:?}");
            // A crashed instance holds the lock for recovery to take away.
            let owner = match how {
                LetGo::RecoverStale => other_instance(&db).await,
                _ => m.clone(),
            };
            let (holder_session, holder) = agent_in_new_session(&owner, "holder").await;
            let ttl = match how {
                LetGo::ExpiredUnswept => Some(Duration::from_millis(300)),
                _ => None,
            };
            let held = owner
                .acquire_lock_with(holder, "file", &key, LockOptions { ttl, wait: None })
                .await
                .expect("hold");
            let (_, waiter) = agent_in_new_session(&m, "waiter").await;
            let m2 = m.clone();
            let key2 = key.clone();
            let task = tokio::spawn(async move {
                let options = LockOptions {
                    ttl: Some(Duration::from_secs(60)),
                    wait: Some(Duration::from_secs(30)),
                };
                m2.acquire_lock_with(waiter, "file", &key2, options).await
            });
            queued(&db, 1).await;
            match how {
                LetGo::Release => m.release_lock(held.lock_id).await.expect("release"),
                LetGo::EndSession => {
                    m.end_session(holder_session).await.expect("end");
                }
                LetGo::SweepOrphaned => {
                    // A status changed by hand leaves the lock for the sweep.
                    set_session_status(&db, holder_session, "interrupted").await;
                    assert_eq!(m.sweep_locks().await.expect("sweep").orphaned, 1);
                }
                LetGo::ExpiredUnswept => {}
                LetGo::RecoverStale => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let report = m
                        .recover_stale(Duration::from_millis(10))
                        .await
                        .expect("recover");
                    assert_eq!(report.interrupted, vec![holder_session]);
                }
            }
            let grant = task
                .await
                .expect("task")
                .unwrap_or_else(|e| panic!("{how:?}: waiter not handed the lock: {e}"));
            assert!(grant.fencing_token > held.fencing_token, "{how:?}");
            let rows = grants_of(&db, &key).await;
            assert_eq!(rows.len(), 2, "{how:?}");
            let reason = rows[0].release_reason.as_deref();
            let expected = match how {
                LetGo::Release => "released",
                LetGo::EndSession => "session_end",
                LetGo::ExpiredUnswept => "expired",
                LetGo::SweepOrphaned | LetGo::RecoverStale => "orphaned",
            };
            assert_eq!(reason, Some(expected), "{how:?}");
            assert_eq!(id(&rows[1].agent_id), waiter);
            assert!(rows[1].released_at.is_none());
            // The ttl counts from the hand-over.
            let granted = rows[1].acquired_at;
            let expires = rows[1].expires_at.expect("ttl");
            assert_eq!(expires - granted, chrono::Duration::seconds(60), "{how:?}");
            assert!(waiter_rows(&db).await.is_empty());
            m.release_lock(grant.lock_id).await.expect("release");
        }
        db.cleanup().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_or_recovering_a_waiters_session_takes_it_out_of_the_queue() {
    each_backend("waiter's session ends", |db| async move {
        let m = db.manager.clone();
        let (_, holder) = agent_in_new_session(&m, "holder").await;
        m.acquire_lock(holder, "file", "s").await.expect("hold");

        // Ended by this instance: the end's own transaction removes the entry.
        let (session, waiter) = agent_in_new_session(&m, "waiter").await;
        let task = spawn_wait(&m, waiter, "s", 30_000);
        queued(&db, 1).await;
        m.end_session(session).await.expect("end");
        assert!(waiter_rows(&db).await.is_empty(), "end left its waiter");
        match task.await.expect("task") {
            Err(Error::SessionNotActive { session_id, .. }) => assert_eq!(session_id, session),
            Err(Error::AgentNotRunning { agent_id, .. }) => assert_eq!(agent_id, waiter),
            other => panic!("expected the waiter to learn its session ended: {other:?}"),
        }

        // A crashed instance's waiter: recovery removes it.
        let crashed = other_instance(&db).await;
        let (session, waiter) = agent_in_new_session(&crashed, "waiter").await;
        let task = spawn_wait(&crashed, waiter, "s", 30_000);
        queued(&db, 1).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let report = m
            .recover_stale(Duration::from_millis(10))
            .await
            .expect("recover");
        assert_eq!(report.interrupted, vec![session]);
        assert!(
            waiter_rows(&db).await.is_empty(),
            "recovery left the waiter"
        );
        match task.await.expect("task") {
            Err(Error::SessionNotActive { session_id, status }) => {
                assert_eq!((session_id, status.as_str()), (session, "interrupted"));
            }
            other => panic!("expected SessionNotActive, got {other:?}"),
        }
        db.cleanup().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_that_closes_a_cycle_is_refused_with_the_cycle() {
    each_backend("deadlock", |db| async move {
        let m = db.manager.clone();
        let (sa, a) = agent_in_new_session(&m, "coder").await;
        let (sb, b) = agent_in_new_session(&m, "reviewer").await;
        let (sc, c) = agent_in_new_session(&m, "tester").await;
        m.acquire_lock(a, "file", "a.rs").await.expect("a");
        m.acquire_lock(b, "file", "b.rs").await.expect("b");
        let held_c = m.acquire_lock(c, "file", "c.rs").await.expect("c");

        // Two agents: b waits for a's file; a asking for b's closes the cycle.
        let b_waits = spawn_wait(&m, b, "a.rs", 3_000);
        queued(&db, 1).await;
        let before = snapshot(&db).await;
        match m
            .acquire_lock_with(a, "file", "b.rs", waiting(30_000))
            .await
        {
            Err(Error::Deadlock { agents }) => assert_eq!(agents, vec![a, b]),
            other => panic!("expected Deadlock, got {other:?}"),
        }
        let cycle = [(a, sa, "coder", "b.rs"), (b, sb, "reviewer", "a.rs")];
        assert_refusal_recorded(&db, &before, &cycle).await;
        assert!(matches!(
            b_waits.await.expect("task"),
            Err(Error::LockWaitTimeout { .. })
        ));

        // Three agents: b waits for c, c for a; a asking for b's closes it.
        let b_waits = spawn_wait(&m, b, "c.rs", 30_000);
        queued(&db, 1).await;
        let c_waits = spawn_wait(&m, c, "a.rs", 30_000);
        queued(&db, 2).await;
        let before = snapshot(&db).await;
        match m
            .acquire_lock_with(a, "file", "b.rs", waiting(30_000))
            .await
        {
            Err(Error::Deadlock { agents }) => assert_eq!(agents, vec![a, b, c]),
            other => panic!("expected Deadlock, got {other:?}"),
        }
        assert_eq!(
            waiter_rows(&db).await.len(),
            2,
            "the refused wait was queued"
        );
        let cycle = [
            (a, sa, "coder", "b.rs"),
            (b, sb, "reviewer", "c.rs"),
            (c, sc, "tester", "a.rs"),
        ];
        assert_refusal_recorded(&db, &before, &cycle).await;
        assert_eq!(deadlock_rows(&db).await.len(), 2, "one row per refusal");
        // Breaking the cycle by hand: c gives up c.rs, so b gets it.
        m.release_lock(held_c.lock_id).await.expect("release c");
        b_waits.await.expect("task").expect("b is handed c.rs");
        c_waits.abort();
        db.cleanup().await;
    })
    .await;
}

/// Makes every `lock_deadlock` audit INSERT fail (a trigger named
/// `fail_deadlock_row`), or, with `on: false`, lets them through again.
async fn fail_deadlock_rows(db: &TestDb, on: bool) {
    let statements: Vec<&str> = match (db.backend, on) {
        (Backend::Postgres, true) => vec![
            "CREATE FUNCTION fail_deadlock_row() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF NEW.event_type = 'lock_deadlock' THEN RAISE EXCEPTION 'injected failure'; \
             END IF; RETURN NEW; END $$",
            "CREATE TRIGGER fail_deadlock_row BEFORE INSERT ON audit_log FOR EACH ROW \
             EXECUTE FUNCTION fail_deadlock_row()",
        ],
        (Backend::Postgres, false) => vec!["DROP TRIGGER fail_deadlock_row ON audit_log"],
        (Backend::MySql, true) => vec![
            "CREATE TRIGGER fail_deadlock_row BEFORE INSERT ON audit_log FOR EACH ROW \
             BEGIN IF NEW.event_type = 'lock_deadlock' THEN \
             SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'injected failure'; END IF; END",
        ],
        (_, true) => vec![
            "CREATE TRIGGER fail_deadlock_row BEFORE INSERT ON audit_log \
             WHEN NEW.event_type = 'lock_deadlock' \
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
        ],
        (_, false) => vec!["DROP TRIGGER fail_deadlock_row"],
    };
    for sql in statements {
        exec_sql(db, sql, vec![]).await.expect("the trigger");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_whose_audit_row_cannot_be_written_is_still_a_deadlock() {
    each_backend("deadlock row fails", |db| async move {
        let m = db.manager.clone();
        let (sa, a) = agent_in_new_session(&m, "coder").await;
        let (sb, b) = agent_in_new_session(&m, "reviewer").await;
        m.acquire_lock(a, "file", "a.rs").await.expect("a");
        m.acquire_lock(b, "file", "b.rs").await.expect("b");
        let b_waits = spawn_wait(&m, b, "a.rs", 30_000);
        queued(&db, 1).await;
        fail_deadlock_rows(&db, true).await;
        let before = snapshot(&db).await;
        match m
            .acquire_lock_with(a, "file", "b.rs", waiting(30_000))
            .await
        {
            Err(Error::Deadlock { agents }) => assert_eq!(agents, vec![a, b]),
            other => panic!("expected Deadlock, got {other:?}"),
        }
        assert_eq!(snapshot(&db).await, before, "a refused wait changed rows");
        // The store goes on: the next refusal is recorded.
        fail_deadlock_rows(&db, false).await;
        let before = snapshot(&db).await;
        assert!(matches!(
            m.acquire_lock_with(a, "file", "b.rs", waiting(30_000))
                .await,
            Err(Error::Deadlock { .. })
        ));
        let cycle = [(a, sa, "coder", "b.rs"), (b, sb, "reviewer", "a.rs")];
        assert_refusal_recorded(&db, &before, &cycle).await;
        b_waits.abort();
        db.cleanup().await;
    })
    .await;
}

/// A refusing acquire dropped at any moment: no lock or queue row changes,
/// and it writes its `lock_deadlock` row once or, dropped before its attempt
/// began, not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_wait_dropped_at_any_moment_changes_no_lock_and_writes_at_most_one_row() {
    each_backend("deadlock dropped", |db| async move {
        let m = db.manager.clone();
        let (sa, a) = agent_in_new_session(&m, "coder").await;
        let (sb, b) = agent_in_new_session(&m, "reviewer").await;
        m.acquire_lock(a, "file", "a.rs").await.expect("a");
        m.acquire_lock(b, "file", "b.rs").await.expect("b");
        let b_waits = spawn_wait(&m, b, "a.rs", 60_000);
        queued(&db, 1).await;
        let before = snapshot(&db).await;
        let mut written = 0;
        for step in 0..30u64 {
            let call = m.acquire_lock_with(a, "file", "b.rs", waiting(30_000));
            let cut = tokio::time::timeout(Duration::from_micros(step * 100), call).await;
            assert!(
                matches!(cut, Err(_) | Ok(Err(Error::Deadlock { .. }))),
                "step {step}: {cut:?}"
            );
            // The agent's next acquire waits for the dropped one's attempt.
            assert!(matches!(
                m.acquire_lock_with(a, "file", "b.rs", waiting(30_000))
                    .await,
                Err(Error::Deadlock { .. })
            ));
            let after = snapshot(&db).await;
            assert_eq!(
                (&after.locks, &after.waiters),
                (&before.locks, &before.waiters),
                "{}: step {step}: a refused wait changed lock rows",
                db.backend.name()
            );
            let rows = deadlock_rows(&db).await;
            let added = rows.len() - written;
            assert!(
                (1..=2).contains(&added),
                "{}: step {step}: {added} rows for one refusal and one dropped",
                db.backend.name()
            );
            written = rows.len();
            let cycle = [(a, sa, "coder", "b.rs"), (b, sb, "reviewer", "a.rs")];
            for row in &rows {
                assert_names_cycle(row, &cycle, &after.locks);
            }
        }
        b_waits.abort();
        db.cleanup().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_waits_closing_a_cycle_at_once_are_refused_exactly_once() {
    each_backend("simultaneous deadlock", |db| async move {
        let m1 = db.manager.clone();
        let m2 = other_instance(&db).await;
        for round in 0..5 {
            let (ka, kb) = (format!("x/{round}/a"), format!("x/{round}/b"));
            let (sa, a) = agent_in_new_session(&m1, "a").await;
            let (sb, b) = agent_in_new_session(&m2, "b").await;
            let held_a = m1.acquire_lock(a, "file", &ka).await.expect("a");
            let held_b = m2.acquire_lock(b, "file", &kb).await.expect("b");
            let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2));
            let (ma, mb) = (m1.clone(), m2.clone());
            let (ba, bb) = (barrier.clone(), barrier.clone());
            let (kb2, ka2) = (kb.clone(), ka.clone());
            let wa = tokio::spawn(async move {
                ba.wait().await;
                ma.acquire_lock_with(a, "file", &kb2, waiting(2_000)).await
            });
            let wb = tokio::spawn(async move {
                bb.wait().await;
                mb.acquire_lock_with(b, "file", &ka2, waiting(2_000)).await
            });
            let (ra, rb) = (wa.await.expect("a"), wb.await.expect("b"));
            let refused = [&ra, &rb]
                .iter()
                .filter(|r| matches!(r, Err(Error::Deadlock { .. })))
                .count();
            assert_eq!(refused, 1, "round {round}: {ra:?} / {rb:?}");
            // The other waited out its 2 s: nobody released.
            for r in [&ra, &rb] {
                if !matches!(r, Err(Error::Deadlock { .. })) {
                    assert!(matches!(r, Err(Error::LockWaitTimeout { .. })), "{r:?}");
                }
            }
            // One row, for the refusal; the locks are as they were.
            let a_refused = matches!(ra, Err(Error::Deadlock { .. }));
            let cycle = match a_refused {
                true => [(a, sa, "a", kb.as_str()), (b, sb, "b", ka.as_str())],
                false => [(b, sb, "b", ka.as_str()), (a, sa, "a", kb.as_str())],
            };
            let rows: Vec<_> = deadlock_rows(&db)
                .await
                .into_iter()
                .filter(|r| [Some(sa.to_string()), Some(sb.to_string())].contains(&r.session_id))
                .collect();
            assert_eq!(rows.len(), 1, "round {round}: {rows:?}");
            let locks = [grants_of(&db, &ka).await, grants_of(&db, &kb).await].concat();
            assert_eq!(
                locks.iter().map(|l| l.id.clone()).collect::<Vec<_>>(),
                [held_a.lock_id.to_string(), held_b.lock_id.to_string()],
                "round {round}: only the two held locks"
            );
            assert_names_cycle(&rows[0], &cycle, &locks);
            m1.release_lock(held_a.lock_id).await.expect("release");
            m2.release_lock(held_b.lock_id).await.expect("release");
            assert!(waiter_rows(&db).await.is_empty());
        }
        db.cleanup().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_acquire_waits_out_the_lock_delay() {
    let config = Config {
        lock_delay: Duration::from_millis(600),
        ..test_config()
    };
    each_backend_with("lock delay wait", config, |db| async move {
        let m = &db.manager;
        let (_, holder) = agent_in_new_session(m, "holder").await;
        let (_, waiter) = agent_in_new_session(m, "waiter").await;
        let ttl = LockOptions {
            ttl: Some(Duration::from_millis(100)),
            wait: None,
        };
        m.acquire_lock_with(holder, "file", "delay", ttl)
            .await
            .expect("hold");
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(m.sweep_locks().await.expect("sweep").expired, 1);
        assert!(matches!(
            m.acquire_lock(waiter, "file", "delay").await,
            Err(Error::LockDelay { .. })
        ));
        m.acquire_lock_with(waiter, "file", "delay", waiting(10_000))
            .await
            .expect("handed over after the delay");
        let rows = grants_of(&db, "delay").await;
        let released = rows[0].released_at.expect("expired");
        assert!(rows[1].acquired_at - released >= chrono::Duration::milliseconds(600));
        db.cleanup().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_refuses_bad_input_and_a_second_wait_changing_nothing() {
    each_backend("wait misuse", |db| async move {
        let m = db.manager.clone();
        let (_, holder) = agent_in_new_session(&m, "holder").await;
        let (_, waiter) = agent_in_new_session(&m, "waiter").await;
        m.acquire_lock(holder, "file", "one").await.expect("hold");
        m.acquire_lock(holder, "file", "two").await.expect("hold");
        let before = snapshot(&db).await;
        for wait in [Duration::MAX, Duration::from_secs(11 * 365 * 24 * 3600)] {
            let options = LockOptions {
                ttl: None,
                wait: Some(wait),
            };
            match m.acquire_lock_with(waiter, "file", "one", options).await {
                Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "wait"),
                other => panic!("expected InvalidInput(wait), got {other:?}"),
            }
        }
        assert_eq!(snapshot(&db).await, before);

        // A wait of zero takes a free resource like an acquire that does not wait.
        let grant = m
            .acquire_lock_with(waiter, "file", "free", waiting(0))
            .await
            .expect("a free resource with a zero wait");
        m.release_lock(grant.lock_id).await.expect("release");
        match m.acquire_lock_with(waiter, "file", "one", waiting(0)).await {
            Err(Error::LockWaitTimeout { waited_ms, .. }) => assert!(waited_ms < 3_000),
            other => panic!("expected LockWaitTimeout, got {other:?}"),
        }
        assert!(waiter_rows(&db).await.is_empty());

        let first = spawn_wait(&m, waiter, "one", 30_000);
        queued(&db, 1).await;
        let before = snapshot(&db).await;
        match m
            .acquire_lock_with(waiter, "file", "two", waiting(30_000))
            .await
        {
            Err(Error::AlreadyWaiting {
                agent_id,
                resource_key,
                ..
            }) => {
                assert_eq!(agent_id, waiter);
                assert_eq!(resource_key.as_deref(), Some("one"));
            }
            other => panic!("expected AlreadyWaiting, got {other:?}"),
        }
        assert_eq!(snapshot(&db).await, before);
        first.abort();
        eventually("the aborted wait left", || async {
            waiter_rows(&db).await.is_empty()
        })
        .await;
        db.cleanup().await;
    })
    .await;
}

/// With a poll interval far longer than the test, only a wake-up can hand
/// the lock over in time: within one manager on every backend, and across
/// instances through PostgreSQL's `NOTIFY`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_wakes_the_head_waiter_without_waiting_for_a_poll() {
    let config = Config {
        lock_poll_interval: Duration::from_secs(600),
        ..test_config()
    };
    each_backend_with("wake-up", config, |db| async move {
        let m = db.manager.clone();
        let mut instances = vec![("one manager", m.clone())];
        if db.backend == Backend::Postgres {
            instances.push(("another instance", db.peer_manager().await));
        }
        for (round, (how, waiter_manager)) in instances.into_iter().enumerate() {
            let key = format!("wake/{round}");
            let (_, holder) = agent_in_new_session(&m, "holder").await;
            let (_, waiter) = agent_in_new_session(&waiter_manager, "waiter").await;
            let held = m.acquire_lock(holder, "file", &key).await.expect("hold");
            let task = spawn_wait(&waiter_manager, waiter, &key, 30_000);
            queued(&db, 1).await;
            let released = Instant::now();
            m.release_lock(held.lock_id).await.expect("release");
            let grant = task.await.expect("task").expect("handed over");
            assert!(
                released.elapsed() < Duration::from_secs(20),
                "{how}: the hand-over waited for something other than a wake-up"
            );
            assert_eq!(id(&grants_of(&db, &key).await[1].agent_id), waiter);

            // Its own session ended elsewhere: the wake-up reaches it too.
            let (other_session, other) = agent_in_new_session(&m, "other").await;
            let task = spawn_wait(&waiter_manager, other, &key, 30_000);
            queued(&db, 1).await;
            let ended = Instant::now();
            m.end_session(other_session).await.expect("end");
            assert!(task.await.expect("task").is_err(), "{how}");
            assert!(ended.elapsed() < Duration::from_secs(20), "{how}");
            waiter_manager
                .release_lock(grant.lock_id)
                .await
                .expect("release");
        }
        db.cleanup().await;
    })
    .await;
}
