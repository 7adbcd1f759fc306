//! `end_session` at 0, 100 and 10 000 locks on in-memory SQLite, so a
//! regression shows in review:
//!
//! ```text
//! cargo bench --bench end_session
//! ```
//!
//! Each sample gets a fresh database with 1 000 background sessions (2 agents
//! x 5 locks each) and, made before the clock starts, one target session per
//! iteration: 4 agents holding the locks round-robin and a 1 KiB context
//! window. Only the ends are timed. The scale example (examples/scale.rs)
//! measures the same workload on every backend and against the seed's SQL.
use std::error::Error;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode};
use demiarch_sessions::Config;

#[allow(dead_code)]
#[path = "../examples/scale/fixture.rs"]
mod fixture;

use fixture::{BackendKind, BoxResult, Fixture};

const BACKGROUND_SESSIONS: u64 = 1000;
const CONTEXT_BYTES: usize = 1024;

/// Ends `iters` fresh sessions holding `locks` locks; returns the time spent ending them.
async fn time_ends(iters: u64, locks: u64) -> BoxResult<Duration> {
    let fx = Fixture::open(BackendKind::SqliteMemory, Config::default()).await?;
    fx.populate_background(BACKGROUND_SESSIONS).await?;
    let sessions = fx.create_sessions(iters, 4, locks).await?;
    let text = fixture::context_text(CONTEXT_BYTES);
    for &id in &sessions {
        fx.manager
            .contexts()
            .put(id, "window-0", serde_json::Value::String(text.clone()))?;
    }
    let mut total = Duration::ZERO;
    for id in sessions {
        let started = Instant::now();
        let report = fx.manager.end_session(id).await?;
        total += started.elapsed();
        if report.locks_released != locks {
            return Err(format!(
                "end_session released {} locks, expected {locks}",
                report.locks_released
            )
            .into());
        }
    }
    fx.close().await?;
    Ok(total)
}

fn main() -> Result<(), Box<dyn Error>> {
    let runtime = tokio::runtime::Runtime::new()?;
    let mut criterion = Criterion::default().configure_from_args();
    let mut group = criterion.benchmark_group("end_session");
    for locks in [0u64, 100, 10_000] {
        if locks >= 10_000 {
            // ~15 ms an end plus setup: few, equal-sized samples.
            group
                .sampling_mode(SamplingMode::Flat)
                .sample_size(10)
                .warm_up_time(Duration::from_secs(1))
                .measurement_time(Duration::from_secs(3));
        } else {
            group
                .sample_size(20)
                .warm_up_time(Duration::from_millis(500))
                .measurement_time(Duration::from_secs(2));
        }
        group.bench_with_input(BenchmarkId::new("locks", locks), &locks, |b, &locks| {
            b.to_async(&runtime).iter_custom(|iters| async move {
                time_ends(iters, locks)
                    .await
                    .unwrap_or_else(|e| panic!("end_session bench with {locks} locks failed: {e}"))
            });
        });
    }
    group.finish();
    criterion.final_summary();
    Ok(())
}
