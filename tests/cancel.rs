//! Every public async call dropped at every await, on every backend: round n
//! drops the call after its n-th pending poll, until a round completes
//! undropped. After each drop the store's invariants hold (once the call's
//! detached work has finished) and the same manager serves a fresh read and
//! a fresh write within a bound.
mod common;

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use common::{each_backend_with, test_config, Backend, TestDb, TextUuid};
use demiarch_sessions::{
    AuditFilter, Config, LockFilter, LockOptions, Operator, SessionFilter, SessionManager,
};
use entity::{agent_executions, audit_log, global_sessions, lock_waiters, resource_locks};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use uuid::Uuid;

type Call = Pin<Box<dyn Future<Output = Option<Uuid>> + Send>>;

/// The most rounds a call gets before the test calls it unbounded.
const MAX_ROUNDS: usize = 64;
/// How long a dropped call's detached work may take to settle.
const SETTLE: Duration = Duration::from_secs(10);
/// How soon the manager must serve a fresh call after a drop.
const SERVES_WITHIN: Duration = Duration::from_secs(5);

/// Polls `call` until it has been pending `n` times, then drops it; whether
/// it completed first, and with what.
async fn poll_then_drop(call: Call, n: usize) -> Option<Option<Uuid>> {
    let mut call = call;
    let mut pending = 0;
    // A call that stops being woken (a wait nobody ends) is dropped too.
    let polled = std::future::poll_fn(|cx| match call.as_mut().poll(cx) {
        Poll::Ready(done) => Poll::Ready(Some(done)),
        Poll::Pending => {
            pending += 1;
            if pending >= n {
                Poll::Ready(None)
            } else {
                Poll::Pending
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(5), polled)
        .await
        .ok()
        .flatten()
}

/// What one round sets up: an open session with an agent holding a lock
/// (and a live context window), a second agent, a completed session, a
/// free resource, a resource whose holder has expired, and a resource held
/// by the first agent that a waiter will get once the holder lets go.
struct Fixture {
    session: Uuid,
    other_agent: Uuid,
    held: Uuid,
    completed: Uuid,
    round: String,
}

/// Grants the test received: every held lock must be one of them.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<HashSet<Uuid>>>);

impl Received {
    fn add(&self, lock: Uuid) {
        self.0.lock().expect("received").insert(lock);
    }
    fn has(&self, lock: Uuid) -> bool {
        self.0.lock().expect("received").contains(&lock)
    }
}

async fn fixture(m: &SessionManager, received: &Received, round: &str) -> Fixture {
    let session = m.start_session().await.expect("start");
    let agent = m.register_agent(session, "coder").await.expect("agent");
    let other_agent = m.register_agent(session, "reviewer").await.expect("agent");
    let held = m
        .acquire_lock(agent, "file", &format!("{round}/held"))
        .await
        .expect("held");
    received.add(held.lock_id);
    let expiring = m
        .acquire_lock_with(
            agent,
            "file",
            &format!("{round}/expired"),
            LockOptions {
                ttl: Some(Duration::from_millis(1)),
                wait: None,
            },
        )
        .await
        .expect("expiring");
    received.add(expiring.lock_id);
    m.contexts()
        .put(session, "plan", serde_json::json!({ "round": round }))
        .expect("window");
    let completed = m.start_session().await.expect("start");
    m.end_session(completed).await.expect("end");
    tokio::time::sleep(Duration::from_millis(3)).await;
    Fixture {
        session,
        other_agent,
        held: held.lock_id,
        completed,
        round: round.to_owned(),
    }
}

/// One public call on a round's fixture; the lock it was granted, if any.
fn call(name: &str, m: &SessionManager, f: &Fixture, received: &Received) -> Call {
    let (m, received) = (m.clone(), received.clone());
    let (session, other, held) = (f.session, f.other_agent, f.held);
    let (completed, round) = (f.completed, f.round.clone());
    let operator = Operator {
        via: "test".into(),
        reason: Some("dropped".into()),
    };
    let granted = move |lock: Uuid| {
        received.add(lock);
        Some(lock)
    };
    match name {
        "start_session" => {
            Box::pin(async move { m.start_session().await.ok().map(|_| Uuid::nil()) })
        }
        "register_agent" => Box::pin(async move { m.register_agent(session, "x").await.ok() }),
        "acquire_lock" => Box::pin(async move {
            let grant = m
                .acquire_lock(other, "file", &format!("{round}/free"))
                .await;
            grant.ok().and_then(|g| granted(g.lock_id))
        }),
        "acquire_lock (expired holder)" => Box::pin(async move {
            let grant = m
                .acquire_lock(other, "file", &format!("{round}/expired"))
                .await;
            grant.ok().and_then(|g| granted(g.lock_id))
        }),
        "acquire_lock_with (wait)" => Box::pin(async move {
            let releaser = m.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = releaser.release_lock(held).await;
            });
            let options = LockOptions {
                ttl: None,
                wait: Some(Duration::from_secs(3)),
            };
            let grant = m
                .acquire_lock_with(other, "file", &format!("{round}/held"), options)
                .await;
            grant.ok().and_then(|g| granted(g.lock_id))
        }),
        "lock_waiters" => Box::pin(async move {
            m.lock_waiters("file", &format!("{round}/held"))
                .await
                .ok()
                .map(|_| Uuid::nil())
        }),
        "renew_lock" => Box::pin(async move {
            m.renew_lock(held, Duration::from_secs(60))
                .await
                .ok()
                .map(|_| Uuid::nil())
        }),
        "sweep_locks" => Box::pin(async move { m.sweep_locks().await.ok().map(|_| Uuid::nil()) }),
        "validate_fence" => Box::pin(async move {
            m.validate_fence("file", &format!("{round}/held"), 1)
                .await
                .ok()
                .map(|_| Uuid::nil())
        }),
        "release_lock" => {
            Box::pin(async move { m.release_lock(held).await.ok().map(|_| Uuid::nil()) })
        }
        "release_lock_by" => Box::pin(async move {
            m.release_lock_by(held, &operator)
                .await
                .ok()
                .map(|_| Uuid::nil())
        }),
        "end_session" => {
            Box::pin(async move { m.end_session(session).await.ok().map(|_| Uuid::nil()) })
        }
        "end_session_by" => Box::pin(async move {
            m.end_session_by(session, &operator)
                .await
                .ok()
                .map(|_| Uuid::nil())
        }),
        "session_context" => {
            Box::pin(async move { m.session_context(completed).await.ok().map(|_| Uuid::nil()) })
        }
        "recover_stale" => Box::pin(async move {
            m.recover_stale(Duration::from_secs(1))
                .await
                .ok()
                .map(|_| Uuid::nil())
        }),
        "recover_stale_by" => Box::pin(async move {
            m.recover_stale_by(Duration::from_secs(1), &operator)
                .await
                .ok()
                .map(|_| Uuid::nil())
        }),
        "resume_session" => Box::pin(async move { m.resume_session(completed).await.ok() }),
        "list_sessions" => Box::pin(async move {
            m.list_sessions(SessionFilter::default())
                .await
                .ok()
                .map(|_| Uuid::nil())
        }),
        "session" => Box::pin(async move { m.session(session).await.ok().map(|_| Uuid::nil()) }),
        "find_session" => Box::pin(async move {
            m.find_session(&session.simple().to_string()[..12])
                .await
                .ok()
        }),
        "agents" => Box::pin(async move { m.agents(session).await.ok().map(|_| Uuid::nil()) }),
        "locks" => Box::pin(async move {
            m.locks(LockFilter::default())
                .await
                .ok()
                .map(|_| Uuid::nil())
        }),
        "audit_events" => Box::pin(async move {
            m.audit_events(AuditFilter::default())
                .await
                .ok()
                .map(|_| Uuid::nil())
        }),
        "record_store_gauges" => {
            Box::pin(async move { m.record_store_gauges().await.ok().map(|_| Uuid::nil()) })
        }
        "finish_agent" => Box::pin(async move {
            m.finish_agent(other, demiarch_sessions::AgentOutcome::Completed)
                .await
                .ok()
                .map(|_| Uuid::nil())
        }),
        "pause_session" => {
            Box::pin(async move { m.pause_session(session).await.ok().map(|_| Uuid::nil()) })
        }
        "unpause_session" => {
            Box::pin(async move { m.unpause_session(session).await.ok().map(|_| Uuid::nil()) })
        }
        "prune" => Box::pin(async move {
            m.prune(&prune_everything_ended())
                .await
                .ok()
                .map(|_| Uuid::nil())
        }),
        "prune_dry_run" => Box::pin(async move {
            m.prune_dry_run(&prune_everything_ended())
                .await
                .ok()
                .map(|_| Uuid::nil())
        }),
        other => panic!("no such call {other}"),
    }
}

/// Every ended session, its context and the audit log up to now.
fn prune_everything_ended() -> demiarch_sessions::RetentionPolicy {
    demiarch_sessions::RetentionPolicy {
        completed_after: Some(Duration::ZERO),
        context_after: Some(Duration::ZERO),
        audit_after: Some(Duration::ZERO),
        ..Default::default()
    }
}

const CALLS: [&str; 29] = [
    "start_session",
    "register_agent",
    "acquire_lock",
    "acquire_lock (expired holder)",
    "acquire_lock_with (wait)",
    "lock_waiters",
    "renew_lock",
    "sweep_locks",
    "validate_fence",
    "release_lock",
    "release_lock_by",
    "end_session",
    "end_session_by",
    "session_context",
    "recover_stale",
    "recover_stale_by",
    "resume_session",
    "list_sessions",
    "session",
    "find_session",
    "agents",
    "locks",
    "audit_events",
    "record_store_gauges",
    "finish_agent",
    "pause_session",
    "unpause_session",
    "prune",
    "prune_dry_run",
];

/// What is wrong with the store now, if anything.
async fn violation(db: &TestDb, received: &Received) -> Option<String> {
    let c = db.manager.connection();
    let sessions = global_sessions::Entity::find().all(c).await.ok()?;
    let locks = resource_locks::Entity::find()
        .filter(resource_locks::Column::ReleasedAt.is_null())
        .all(c)
        .await
        .ok()?;
    let ends = audit_log::Entity::find()
        .filter(audit_log::Column::EventType.eq("session_end"))
        .all(c)
        .await
        .ok()?;
    let running = agent_executions::Entity::find()
        .filter(agent_executions::Column::Status.eq("running"))
        .all(c)
        .await
        .ok()?;
    let waiters = lock_waiters::Entity::find().all(c).await.ok()?;
    for s in &sessions {
        let id = common::id(&s.id);
        let ended = s.status == "completed" || s.status == "interrupted";
        if s.status == "completed" {
            if s.completed_at.is_none() || s.context_data.is_none() {
                return Some(format!(
                    "session {id} is completed without its end's columns"
                ));
            }
            let rows = ends
                .iter()
                .filter(|e| e.session_id.as_deref() == Some(&s.id))
                .count();
            if rows != 1 {
                return Some(format!(
                    "session {id} is completed with {rows} session_end rows"
                ));
            }
            if !db.manager.contexts().windows(id).is_empty() {
                return Some(format!("session {id} is completed with live windows"));
            }
        }
        if ended {
            if let Some(l) = locks.iter().find(|l| l.session_id == s.id) {
                return Some(format!("lock {} is held by ended session {id}", l.id));
            }
            if let Some(a) = running.iter().find(|a| a.session_id == s.id) {
                return Some(format!("agent {} runs in ended session {id}", a.id));
            }
        }
    }
    if let Some(l) = locks.iter().find(|l| !received.has(common::id(&l.id))) {
        return Some(format!(
            "lock {} is held but its grant was never received",
            l.id
        ));
    }
    if let Some(w) = waiters.first() {
        return Some(format!(
            "agent {} is still queued for {}/{}",
            w.agent_id, w.resource_type, w.resource_key
        ));
    }
    None
}

/// Waits until the store is consistent; panics naming what is not.
async fn settled(db: &TestDb, received: &Received, what: &str) {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let wrong = violation(db, received).await;
        match wrong {
            None => return,
            Some(wrong) if tokio::time::Instant::now() >= deadline => {
                panic!("{} after {what}: {wrong}", db.backend.name())
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// The manager still answers a read and a write promptly.
async fn serves(m: &SessionManager, backend: Backend, what: &str) {
    let read = tokio::time::timeout(SERVES_WITHIN, m.list_sessions(SessionFilter::default())).await;
    assert!(
        matches!(read, Ok(Ok(_))),
        "{} after {what}: a fresh read failed: {read:?}",
        backend.name()
    );
    let write = tokio::time::timeout(SERVES_WITHIN, m.start_session()).await;
    let session = match write {
        Ok(Ok(session)) => session,
        other => panic!(
            "{} after {what}: a fresh write failed: {other:?}",
            backend.name()
        ),
    };
    let end = tokio::time::timeout(SERVES_WITHIN, m.end_session(session)).await;
    assert!(
        matches!(end, Ok(Ok(_))),
        "{} after {what}: a fresh end failed: {end:?}",
        backend.name()
    );
}

/// A small pool, so that a connection a dropped call kept would soon
/// starve the manager, and a short wait for one.
fn small_pool() -> Config {
    Config {
        max_connections: 2,
        connect_timeout: Duration::from_secs(3),
        ..test_config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_dropped_at_every_await_leaves_the_store_consistent_and_the_manager_serving() {
    each_backend_with(
        "every_call_dropped_at_every_await_leaves_the_store_consistent_and_the_manager_serving",
        small_pool(),
        |db| async move {
            let m = db.manager.clone();
            let received = Received::default();
            let mut drops = 0;
            for name in CALLS {
                let mut completed = false;
                for n in 1..=MAX_ROUNDS {
                    let round = format!("{name}-{n}");
                    let f = fixture(&m, &received, &round).await;
                    if name.starts_with("recover_stale") {
                        // Another instance's session, unheard from for a minute.
                        let old = chrono::Utc::now() - chrono::Duration::seconds(60);
                        global_sessions::Entity::update_many()
                            .col_expr(
                                global_sessions::Column::OwnerInstance,
                                Expr::value(Uuid::new_v4().to_string()),
                            )
                            .col_expr(global_sessions::Column::LastHeartbeatAt, Expr::value(old))
                            .filter(global_sessions::Column::Id.eq(TextUuid(f.session)))
                            .exec(m.connection())
                            .await
                            .expect("make the session stale");
                    }
                    let outcome = poll_then_drop(call(name, &m, &f, &received), n).await;
                    let what = format!("{name} dropped after {n} pending polls");
                    settled(&db, &received, &what).await;
                    serves(&m, db.backend, &what).await;
                    // The round's own session ends, so the next round starts clean.
                    let _ = m.end_session(f.session).await;
                    settled(&db, &received, &what).await;
                    if outcome.is_some() {
                        completed = true;
                        break;
                    }
                    drops += 1;
                }
                assert!(
                    completed,
                    "{name} never completed within {MAX_ROUNDS} rounds"
                );
            }
            assert!(
                drops >= CALLS.len(),
                "every call was dropped at least once ({drops} drops)"
            );
            eprintln!(
                "{}: {drops} drops, each left the store consistent",
                db.backend.name()
            );
            db.cleanup().await;
        },
    )
    .await;
}

/// A manager of its own on the test's store (on in-memory SQLite, on a
/// database of its own), for calls that stop a manager.
async fn own_manager(db: &TestDb) -> (SessionManager, Option<TestDb>) {
    if db.backend == Backend::SqliteMemory {
        let own = TestDb::with_config(Backend::SqliteMemory, small_pool()).await;
        (own.manager.clone(), Some(own))
    } else {
        (db.peer_manager().await, None)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_and_close_dropped_at_every_await_still_end_and_close() {
    each_backend_with(
        "shutdown_and_close_dropped_at_every_await_still_end_and_close",
        small_pool(),
        |db| async move {
            for stop in ["shutdown", "close"] {
                let mut completed = false;
                for n in 1..=MAX_ROUNDS {
                    let (peer, _own) = own_manager(&db).await;
                    let session = peer.start_session().await.expect("start");
                    let agent = peer.register_agent(session, "coder").await.expect("agent");
                    peer.acquire_lock(agent, "file", &format!("{stop}-{n}"))
                        .await
                        .expect("lock");
                    peer.contexts()
                        .put(session, "plan", serde_json::json!(n))
                        .expect("window");
                    let stopping = peer.clone();
                    let call: Call = match stop {
                        "shutdown" => Box::pin(async move {
                            stopping
                                .shutdown(Duration::from_secs(2))
                                .await
                                .ok()
                                .map(|_| Uuid::nil())
                        }),
                        _ => Box::pin(
                            async move { stopping.close().await.ok().map(|_| Uuid::nil()) },
                        ),
                    };
                    let outcome = poll_then_drop(call, n).await;
                    let what = format!("{stop} dropped after {n} pending polls");
                    if stop == "shutdown" {
                        // The dropped shutdown still ends the session, whole.
                        let deadline = tokio::time::Instant::now() + SETTLE;
                        loop {
                            let row = global_sessions::Entity::find_by_id(session.to_string())
                                .one(peer.connection())
                                .await
                                .expect("read")
                                .expect("row");
                            let held = resource_locks::Entity::find()
                                .filter(resource_locks::Column::SessionId.eq(TextUuid(session)))
                                .filter(resource_locks::Column::ReleasedAt.is_null())
                                .all(peer.connection())
                                .await
                                .expect("locks");
                            let windows = peer.contexts().windows(session).len();
                            if row.status == "completed" && held.is_empty() && windows == 0 {
                                break;
                            }
                            assert!(
                                tokio::time::Instant::now() < deadline,
                                "{} after {what}: {} with {} held locks and {windows} windows",
                                db.backend.name(),
                                row.status,
                                held.len()
                            );
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        let _ = peer.close().await;
                    } else {
                        // Closed whatever happened to the caller.
                        let after = tokio::time::timeout(
                            SERVES_WITHIN,
                            peer.list_sessions(SessionFilter::default()),
                        )
                        .await;
                        assert!(
                            matches!(after, Ok(Err(demiarch_sessions::Error::ManagerClosed))),
                            "{} after {what}: {after:?}",
                            db.backend.name()
                        );
                    }
                    serves(&db.manager, db.backend, &what).await;
                    if outcome.is_some() {
                        completed = true;
                        break;
                    }
                }
                assert!(
                    completed,
                    "{stop} never completed within {MAX_ROUNDS} rounds"
                );
            }
            db.cleanup().await;
        },
    )
    .await;
}

/// Connecting migrates a new file: a connect dropped at any await leaves a
/// file the next connect opens and uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_dropped_at_every_await_leaves_a_file_the_next_connect_uses() {
    let dir = tempfile::tempdir().expect("temp dir");
    for n in 1..=MAX_ROUNDS {
        let url = format!("sqlite://{}", dir.path().join(format!("{n}.db")).display());
        let connecting = url.clone();
        let call: Call = Box::pin(async move {
            SessionManager::connect(&connecting)
                .await
                .ok()
                .map(|_| Uuid::nil())
        });
        let outcome = poll_then_drop(call, n).await;
        let again = tokio::time::timeout(SETTLE, async {
            // The dropped connect may still be migrating: the next one waits its turn.
            loop {
                match SessionManager::connect(&url).await {
                    Ok(m) => break m,
                    Err(e) if e.is_timeout() => tokio::time::sleep(Duration::from_millis(20)).await,
                    Err(e) => panic!("connect after a connect dropped after {n} polls: {e}"),
                }
            }
        })
        .await
        .expect("connects");
        let session = again.start_session().await.expect("the store works");
        again.end_session(session).await.expect("and ends sessions");
        again.close().await.expect("close");
        if outcome.is_some() {
            return;
        }
    }
    panic!("connect never completed within {MAX_ROUNDS} rounds");
}
