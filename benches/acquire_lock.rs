//! `acquire_lock` of a free resource on in-memory SQLite with 1 000 background
//! sessions (2 agents x 5 locks each), so a regression shows in review:
//!
//! ```text
//! cargo bench --bench acquire_lock
//! ```
use std::error::Error;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::Criterion;
use demiarch_sessions::Config;

#[allow(dead_code)]
#[path = "../examples/scale/fixture.rs"]
mod fixture;

use fixture::{BackendKind, Fixture};

const BACKGROUND_SESSIONS: u64 = 1000;

fn main() -> Result<(), Box<dyn Error>> {
    let runtime = tokio::runtime::Runtime::new()?;
    let (fx, agent, session) = runtime.block_on(async {
        let fx = Fixture::open(BackendKind::SqliteMemory, Config::default()).await?;
        fx.populate_background(BACKGROUND_SESSIONS).await?;
        let session = fx.manager.start_session().await?;
        let agent = fx.manager.register_agent(session, "bench").await?;
        Ok::<_, Box<dyn Error>>((fx, agent, session))
    })?;
    // Every acquire takes a resource no one holds.
    let next_key = AtomicU64::new(0);

    let mut criterion = Criterion::default().configure_from_args();
    let mut group = criterion.benchmark_group("acquire_lock");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    group.bench_function("free_resource", |b| {
        b.to_async(&runtime).iter_custom(|iters| {
            let (fx, next_key) = (&fx, &next_key);
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let key = format!(
                        "bench/{session}/{}",
                        next_key.fetch_add(1, Ordering::Relaxed)
                    );
                    let started = Instant::now();
                    fx.manager
                        .acquire_lock(agent, "file", &key)
                        .await
                        .unwrap_or_else(|e| panic!("acquire_lock {key}: {e}"));
                    total += started.elapsed();
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
