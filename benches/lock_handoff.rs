//! A lock's hand-over to a waiting acquire in the same process, on in-memory
//! SQLite with 1 000 background sessions (2 agents x 5 locks each): from
//! `release_lock`'s return to the instant the waiter's
//! `acquire_lock_with(.., LockOptions { wait, .. })` returned the grant.
//! Setting up each hand-over (the holder's acquire, the waiter joining the
//! queue) and releasing the waiter's lock afterwards are not timed.
//!
//! ```text
//! cargo bench --bench lock_handoff
//! ```
use std::error::Error;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};
use demiarch_sessions::{Config, LockOptions, SessionManager};
use uuid::Uuid;

#[allow(dead_code)]
#[path = "../examples/scale/fixture.rs"]
mod fixture;

use fixture::{BackendKind, Fixture};

const BACKGROUND_SESSIONS: u64 = 1000;
/// How long the waiter is prepared to wait; far beyond any hand-over.
const WAIT: Duration = Duration::from_secs(10);

/// One hand-over of a fresh resource from `holder` to `waiter`: the time from
/// the holder's release to the waiter's grant.
async fn hand_over(manager: &SessionManager, holder: Uuid, waiter: Uuid, key: &str) -> Duration {
    let held = manager
        .acquire_lock(holder, "file", key)
        .await
        .unwrap_or_else(|e| panic!("acquire_lock {key}: {e}"));
    let task = {
        let (manager, key) = (manager.clone(), key.to_owned());
        tokio::spawn(async move {
            let options = LockOptions {
                wait: Some(WAIT),
                ..LockOptions::default()
            };
            let grant = manager
                .acquire_lock_with(waiter, "file", &key, options)
                .await
                .unwrap_or_else(|e| panic!("waiting for {key}: {e}"));
            (grant, Instant::now())
        })
    };
    // Release only once the waiter is queued at the head.
    let queued = Instant::now();
    loop {
        let waiters = manager
            .lock_waiters("file", key)
            .await
            .unwrap_or_else(|e| panic!("lock_waiters {key}: {e}"));
        if waiters
            .iter()
            .any(|w| w.agent_id == waiter && w.position == 1)
        {
            break;
        }
        assert!(
            !task.is_finished(),
            "the waiter for {key} returned unqueued"
        );
        assert!(queued.elapsed() < WAIT, "the waiter for {key} never queued");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    manager
        .release_lock(held.lock_id)
        .await
        .unwrap_or_else(|e| panic!("release_lock {key}: {e}"));
    let released = Instant::now();
    let (grant, granted_at) = task.await.expect("the waiter's task panicked");
    manager
        .release_lock(grant.lock_id)
        .await
        .unwrap_or_else(|e| panic!("release_lock of the waiter's {key}: {e}"));
    granted_at.saturating_duration_since(released)
}

fn main() -> Result<(), Box<dyn Error>> {
    let runtime = tokio::runtime::Runtime::new()?;
    let (fx, holder, waiter) = runtime.block_on(async {
        let fx = Fixture::open(BackendKind::SqliteMemory, Config::default()).await?;
        fx.populate_background(BACKGROUND_SESSIONS).await?;
        let mut agents = Vec::new();
        for kind in ["holder", "waiter"] {
            let session = fx.manager.start_session().await?;
            agents.push(fx.manager.register_agent(session, kind).await?);
        }
        Ok::<_, Box<dyn Error>>((fx, agents[0], agents[1]))
    })?;
    // Every hand-over is of a resource no one held before.
    let next_key = AtomicU64::new(0);

    let mut criterion = Criterion::default().configure_from_args();
    let mut group = criterion.benchmark_group("lock_handoff");
    // Each hand-over costs several times what is timed (the setup), so the
    // run takes longer than measurement_time says.
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(1));
    group.bench_function("one_process", |b| {
        b.to_async(&runtime).iter_custom(|iters| {
            let (fx, next_key) = (&fx, &next_key);
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let key = format!(
                        "bench/handoff/{holder}/{}",
                        next_key.fetch_add(1, Ordering::Relaxed)
                    );
                    total += hand_over(&fx.manager, holder, waiter, &key).await;
                }
                total
            }
        });
    });
    group.finish();
    criterion.final_summary();
    runtime.block_on(fx.close())?;
    Ok(())
}
