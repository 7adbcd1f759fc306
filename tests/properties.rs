//! A property test: random interleavings of start, register, acquire, release,
//! end and sweep over several sessions. After every step:
//! - at most one held lock per resource;
//! - no held lock belongs to a completed session;
//! - exactly one `session_end` audit row per completed session, none otherwise;
//! - ending session X never changes a row of any other session.
//!
//! It also checks every refusal is one the model expects, never a raw
//! database error. Runs on every backend the harness offers.
mod common;
use common::id;

use std::collections::BTreeMap;

use common::*;
use demiarch_sessions::{Error, LockOptions};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use sea_orm::{ConnectionTrait, Statement};
use uuid::Uuid;

#[derive(Clone, Debug)]
enum Op {
    Start,
    Register(usize),
    Acquire {
        agent: usize,
        resource: usize,
        ttl: bool,
    },
    Release(usize),
    End(usize),
    Sweep,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::Start),
        2 => (0..8usize).prop_map(Op::Register),
        5 => (0..16usize, 0..6usize, any::<bool>())
            .prop_map(|(agent, resource, ttl)| Op::Acquire { agent, resource, ttl }),
        2 => (0..32usize).prop_map(Op::Release),
        2 => (0..8usize).prop_map(Op::End),
        1 => Just(Op::Sweep),
    ]
}

/// One row per table of everything outside `session`, to compare across an end.
async fn rows_outside(db: &TestDb, session: Uuid) -> Snapshot {
    let mut all = snapshot(db).await;
    all.sessions.retain(|s| id(&s.id) != session);
    all.agents.retain(|a| id(&a.session_id) != session);
    all.locks.retain(|l| id(&l.session_id) != session);
    all.audit.retain(|r| {
        r.session_id.as_deref() != Some(session.to_string().as_str())
            && r.event_type != "locks_swept"
    });
    all
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    let conn = db.manager.connection();
    let row = conn
        .query_one_raw(Statement::from_string(conn.get_database_backend(), sql))
        .await
        .expect("invariant query")
        .expect("one row");
    row.try_get_by_index::<i64>(0).expect("count")
}

async fn check_invariants(db: &TestDb, step: usize) {
    let doubly_held = count(
        db,
        "SELECT COUNT(*) FROM (SELECT resource_type, resource_key FROM resource_locks \
         WHERE released_at IS NULL GROUP BY resource_type, resource_key HAVING COUNT(*) > 1) d",
    )
    .await;
    assert_eq!(doubly_held, 0, "step {step}: a resource has two holders");
    let held_by_completed = count(
        db,
        "SELECT COUNT(*) FROM resource_locks l JOIN global_sessions s ON s.id = l.session_id \
         WHERE l.released_at IS NULL AND s.status = 'completed'",
    )
    .await;
    assert_eq!(
        held_by_completed, 0,
        "step {step}: a completed session holds a lock"
    );
    let wrong_end_rows = count(
        db,
        "SELECT COUNT(*) FROM global_sessions s WHERE \
         (SELECT COUNT(*) FROM audit_log a WHERE a.session_id = s.id AND a.event_type = 'session_end') \
         <> CASE WHEN s.status = 'completed' THEN 1 ELSE 0 END",
    )
    .await;
    assert_eq!(
        wrong_end_rows, 0,
        "step {step}: session_end rows do not match completed sessions"
    );
}

async fn run_ops(db: &TestDb, ops: Vec<Op>) {
    let m = &db.manager;
    let mut sessions: Vec<Uuid> = vec![m.start_session().await.expect("start")];
    let mut agents: Vec<(Uuid, Uuid)> = Vec::new(); // (agent, session)
    let mut ended: BTreeMap<Uuid, bool> = BTreeMap::new();
    let mut grants: Vec<Uuid> = Vec::new();
    // Resource names unique to this case, so cases sharing a database never collide.
    let case = Uuid::new_v4();
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Start => sessions.push(m.start_session().await.expect("start")),
            Op::Register(i) => {
                let session = sessions[i % sessions.len()];
                match m.register_agent(session, "worker").await {
                    Ok(agent) => {
                        assert!(
                            !ended.contains_key(&session),
                            "registered into an ended session"
                        );
                        agents.push((agent, session));
                    }
                    Err(Error::SessionNotActive { .. }) => assert!(ended.contains_key(&session)),
                    Err(e) => panic!("step {step}: register failed: {e:?}"),
                }
            }
            Op::Acquire {
                agent,
                resource,
                ttl,
            } => {
                let Some(&(agent, session)) = agents.get(agent % agents.len().max(1)) else {
                    continue;
                };
                let options = LockOptions {
                    ttl: ttl.then(|| std::time::Duration::from_millis(1)),
                    wait: None,
                };
                let key = format!("{case}/{resource}");
                match m.acquire_lock_with(agent, "file", &key, options).await {
                    Ok(grant) => {
                        assert!(!ended.contains_key(&session), "granted in an ended session");
                        grants.push(grant.lock_id);
                    }
                    Err(Error::LockHeld { .. }) => {}
                    Err(Error::SessionNotActive { .. } | Error::AgentNotRunning { .. }) => {
                        assert!(ended.contains_key(&session))
                    }
                    Err(e) => panic!("step {step}: acquire failed: {e:?}"),
                }
            }
            Op::Release(i) => {
                if let Some(&lock) = grants.get(i % grants.len().max(1)) {
                    m.release_lock(lock).await.expect("release");
                }
            }
            Op::End(i) => {
                let session = sessions[i % sessions.len()];
                let others_before = rows_outside(db, session).await;
                let report = m.end_session(session).await.expect("end");
                assert_eq!(report.already_ended, ended.contains_key(&session));
                ended.insert(session, true);
                assert_eq!(
                    rows_outside(db, session).await,
                    others_before,
                    "step {step}: ending {session} changed another session's rows"
                );
            }
            Op::Sweep => {
                m.sweep_locks().await.expect("sweep");
            }
        }
        check_invariants(db, step).await;
    }
}

#[test]
fn random_interleavings_keep_the_invariants() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    for backend in Backend::ALL {
        if backend.availability().is_err() {
            continue;
        }
        let db = rt.block_on(TestDb::new(backend));
        let cases = if backend.is_sqlite() { 64 } else { 16 };
        let mut runner = TestRunner::new(ProptestConfig {
            cases,
            failure_persistence: None,
            ..ProptestConfig::default()
        });
        let result = runner.run(&proptest::collection::vec(op(), 1..40), |ops| {
            rt.block_on(run_ops(&db, ops));
            Ok(())
        });
        if let Err(e) = result {
            panic!("{}: {e}", backend.name());
        }
        eprintln!(
            "random_interleavings_keep_the_invariants: {cases} cases passed on {}",
            backend.name()
        );
        rt.block_on(db.cleanup());
    }
}
