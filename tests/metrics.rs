//! The library's events through the `metrics` facade, as a recorder the app
//! installs sees them (one test: the recorder is global to this binary).
mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use demiarch_sessions::{Error, LockOptions, WatchOptions};
use entity::global_sessions;
use futures::StreamExt;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::MetricKind;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};

type Readings = HashMap<(MetricKind, String, Vec<(String, String)>), DebugValue>;

fn reading<'a>(
    all: &'a Readings,
    kind: MetricKind,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<&'a DebugValue> {
    let mut labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    labels.sort();
    all.get(&(kind, name.to_owned(), labels))
}

fn counter(all: &Readings, name: &str, labels: &[(&str, &str)]) -> u64 {
    match reading(all, MetricKind::Counter, name, labels) {
        Some(DebugValue::Counter(n)) => *n,
        _ => 0,
    }
}

fn gauge(all: &Readings, name: &str) -> f64 {
    match reading(all, MetricKind::Gauge, name, &[]) {
        Some(DebugValue::Gauge(v)) => v.into_inner(),
        other => panic!("no gauge {name}: {other:?}"),
    }
}

fn samples(all: &Readings, name: &str, labels: &[(&str, &str)]) -> usize {
    match reading(all, MetricKind::Histogram, name, labels) {
        Some(DebugValue::Histogram(v)) => v.len(),
        _ => 0,
    }
}

#[tokio::test]
async fn operations_report_through_the_metrics_facade() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");
    // The facade is the same on every backend: in-memory SQLite is enough.
    let db = TestDb::new(Backend::SqliteMemory).await;
    let m = db.manager.clone();

    // Ends: one with two locks, then the same again.
    let (ended, _) = populated_session(&db, 1, 2).await;
    m.end_session(ended).await.expect("end");
    m.end_session(ended).await.expect("end again");

    // Waits: b queues for a's lock, a's wait for b's closes a cycle, a lets go
    // and b is handed it; c's wait for b's lock times out.
    let session = m.start_session().await.expect("start");
    let a = m.register_agent(session, "a").await.expect("agent");
    let b = m.register_agent(session, "b").await.expect("agent");
    let c = m.register_agent(session, "c").await.expect("agent");
    let held = m.acquire_lock(a, "file", "one").await.expect("a takes one");
    m.acquire_lock(b, "file", "two").await.expect("b takes two");
    let wait = |ms| LockOptions {
        wait: Some(Duration::from_millis(ms)),
        ..LockOptions::default()
    };
    let waiter = {
        let m = m.clone();
        tokio::spawn(async move { m.acquire_lock_with(b, "file", "one", wait(10_000)).await })
    };
    while m
        .lock_waiters("file", "one")
        .await
        .expect("waiters")
        .is_empty()
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let refused = m.acquire_lock_with(a, "file", "two", wait(10_000)).await;
    assert!(
        matches!(refused, Err(Error::Deadlock { .. })),
        "{refused:?}"
    );
    m.release_lock(held.lock_id).await.expect("release");
    waiter.await.expect("task").expect("b is handed one");
    let timed_out = m.acquire_lock_with(c, "file", "two", wait(50)).await;
    assert!(
        matches!(timed_out, Err(Error::LockWaitTimeout { .. })),
        "{timed_out:?}"
    );

    // A sweep of one expired lock, a recovery of one stale session.
    let ttl = LockOptions {
        ttl: Some(Duration::from_millis(1)),
        ..LockOptions::default()
    };
    m.acquire_lock_with(c, "file", "brief", ttl)
        .await
        .expect("brief lock");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(m.sweep_locks().await.expect("sweep").expired, 1);
    let stale = m.start_session().await.expect("start");
    global_sessions::Entity::update_many()
        .col_expr(
            global_sessions::Column::OwnerInstance,
            Expr::value(uuid::Uuid::new_v4().to_string()),
        )
        .col_expr(
            global_sessions::Column::LastHeartbeatAt,
            Expr::value(chrono::Utc::now() - chrono::Duration::hours(1)),
        )
        .filter(global_sessions::Column::Id.eq(stale.to_string()))
        .exec(m.connection())
        .await
        .expect("make it stale");
    assert_eq!(
        m.recover_stale(Duration::from_secs(60))
            .await
            .expect("recover")
            .interrupted,
        vec![stale]
    );

    // A prune of the two ended sessions (the first, and the interrupted one).
    let pruned = m
        .prune(&demiarch_sessions::RetentionPolicy {
            completed_after: Some(Duration::ZERO),
            ..Default::default()
        })
        .await
        .expect("prune");
    assert_eq!(
        (
            pruned.sessions_deleted,
            pruned.agents_deleted,
            pruned.locks_deleted
        ),
        (2, 1, 2)
    );

    // A feed delivers one event; the store's gauges are counted.
    let mut feed = Box::pin(m.watch(WatchOptions {
        after: Some(0),
        ..WatchOptions::default()
    }));
    feed.next().await.expect("an item").expect("an event");
    let (open, held_locks) = m.record_store_gauges().await.expect("gauges");
    assert_eq!(
        (open, held_locks),
        (1, 2),
        "the waits' session is open, b holds one and two"
    );

    let all: Readings = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let (kind, key) = key.into_parts();
            let mut labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            ((kind, key.name().to_owned(), labels), value)
        })
        .collect();
    let pruned = "demiarch_sessions_pruned_total";
    assert_eq!(counter(&all, pruned, &[("kind", "sessions")]), 2);
    assert_eq!(counter(&all, pruned, &[("kind", "agents")]), 1);
    assert_eq!(counter(&all, pruned, &[("kind", "locks")]), 2);
    assert_eq!(counter(&all, pruned, &[("kind", "audit")]), 0);
    assert_eq!(
        samples(&all, "demiarch_sessions_prune_duration_seconds", &[]),
        1
    );
    let last = gauge(&all, "demiarch_sessions_last_prune_timestamp_seconds");
    let now = chrono::Utc::now().timestamp() as f64;
    assert!(
        (now - 60.0..=now + 1.0).contains(&last),
        "last prune at {last}, now {now}"
    );
    let ends = "demiarch_sessions_ends_total";
    assert_eq!(counter(&all, ends, &[("outcome", "ended")]), 1);
    assert_eq!(counter(&all, ends, &[("outcome", "already_ended")]), 1);
    assert_eq!(
        samples(&all, "demiarch_sessions_end_duration_seconds", &[]),
        2
    );
    assert_eq!(
        counter(&all, "demiarch_sessions_locks_released_by_end_total", &[]),
        2
    );
    let waits = "demiarch_sessions_lock_waits_total";
    assert_eq!(counter(&all, waits, &[("outcome", "granted")]), 1);
    assert_eq!(counter(&all, waits, &[("outcome", "deadlock")]), 1);
    assert_eq!(counter(&all, waits, &[("outcome", "timeout")]), 1);
    assert_eq!(
        samples(
            &all,
            "demiarch_sessions_lock_wait_duration_seconds",
            &[("outcome", "timeout")]
        ),
        1
    );
    assert_eq!(
        counter(&all, "demiarch_sessions_lock_handoffs_total", &[]),
        1
    );
    assert_eq!(
        counter(
            &all,
            "demiarch_sessions_locks_swept_total",
            &[("reason", "expired")]
        ),
        1
    );
    assert_eq!(
        counter(
            &all,
            "demiarch_sessions_locks_swept_total",
            &[("reason", "orphaned")]
        ),
        0
    );
    assert_eq!(
        counter(&all, "demiarch_sessions_sessions_recovered_total", &[]),
        1
    );
    assert!(samples(&all, "demiarch_sessions_watch_lag_seconds", &[]) >= 1);
    assert_eq!(gauge(&all, "demiarch_sessions_active_sessions"), 1.0);
    assert_eq!(gauge(&all, "demiarch_sessions_held_locks"), 2.0);
    assert_eq!(gauge(&all, "demiarch_sessions_end_budget_seconds"), 2.0);
    // The in-process snapshot agrees.
    let snapshot = m.metrics();
    assert_eq!(
        (
            snapshot.sessions_ended,
            snapshot.ends_already_ended,
            snapshot.locks_swept
        ),
        (1, 1, 1)
    );
    db.cleanup().await;
}
