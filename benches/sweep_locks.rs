//! `sweep_locks` on in-memory SQLite, so a regression shows in review:
//!
//! ```text
//! cargo bench --bench sweep_locks
//! ```
//!
//! Each iteration gets a fresh database with 1 000 background sessions (2
//! agents x 5 locks each, all held and not due) and, made before the clock
//! starts, 100 sessions holding 10 locks each that the sweep must release:
//! - `expired`: the locks' time to live ran out (their `expires_at` is an hour
//!   ago);
//! - `orphaned`: their sessions are interrupted yet the locks are still held,
//!   as a writer that bypassed the library leaves them.
//!
//! Only the `sweep_locks` call is timed; it must release exactly the 1 000 locks
//! (one batch at the default `Config::sweep_batch`).
use std::error::Error;
use std::time::{Duration, Instant};

use chrono::Utc;
use criterion::{BenchmarkId, Criterion, SamplingMode};
use demiarch_sessions::Config;
use entity::{global_sessions, resource_locks};
use sea_orm::entity::prelude::TextUuid;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};

#[allow(dead_code)]
#[path = "../examples/scale/fixture.rs"]
mod fixture;

use fixture::{BackendKind, BoxResult, Fixture};

const BACKGROUND_SESSIONS: u64 = 1000;
const SWEPT_SESSIONS: u64 = 100;
const LOCKS_PER_SESSION: u64 = 10;

#[derive(Clone, Copy)]
enum Due {
    Expired,
    Orphaned,
}

impl Due {
    fn name(self) -> &'static str {
        match self {
            Due::Expired => "expired",
            Due::Orphaned => "orphaned",
        }
    }
}

/// Runs `iters` sweeps, each over a fresh database; returns the time spent in them.
async fn time_sweeps(iters: u64, due: Due) -> BoxResult<Duration> {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let fx = Fixture::open(BackendKind::SqliteMemory, Config::default()).await?;
        fx.populate_background(BACKGROUND_SESSIONS).await?;
        let ids: Vec<TextUuid> = fx
            .create_sessions(SWEPT_SESSIONS, 2, LOCKS_PER_SESSION)
            .await?
            .into_iter()
            .map(TextUuid)
            .collect();
        match due {
            Due::Expired => {
                resource_locks::Entity::update_many()
                    .col_expr(
                        resource_locks::Column::ExpiresAt,
                        Expr::value(Utc::now() - chrono::Duration::hours(1)),
                    )
                    .filter(resource_locks::Column::SessionId.is_in(ids))
                    .exec(fx.connection())
                    .await?;
            }
            Due::Orphaned => {
                global_sessions::Entity::update_many()
                    .col_expr(global_sessions::Column::Status, Expr::value("interrupted"))
                    .filter(global_sessions::Column::Id.is_in(ids))
                    .exec(fx.connection())
                    .await?;
            }
        }
        let started = Instant::now();
        let report = fx.manager.sweep_locks().await?;
        total += started.elapsed();
        let (released, expected) = match due {
            Due::Expired => (report.expired + report.orphaned, report.expired),
            Due::Orphaned => (report.expired + report.orphaned, report.orphaned),
        };
        let want = SWEPT_SESSIONS * LOCKS_PER_SESSION;
        if released != want || expected != want {
            return Err(format!(
                "sweep_locks released {report:?}, expected {want} {}",
                due.name()
            )
            .into());
        }
        fx.close().await?;
    }
    Ok(total)
}

fn main() -> Result<(), Box<dyn Error>> {
    let runtime = tokio::runtime::Runtime::new()?;
    let mut criterion = Criterion::default().configure_from_args();
    let mut group = criterion.benchmark_group("sweep_locks");
    // Setup (a fresh database per sweep) dwarfs the sweep: few, equal samples.
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for due in [Due::Expired, Due::Orphaned] {
        let locks = SWEPT_SESSIONS * LOCKS_PER_SESSION;
        group.bench_with_input(BenchmarkId::new(due.name(), locks), &due, |b, &due| {
            b.to_async(&runtime).iter_custom(|iters| async move {
                time_sweeps(iters, due)
                    .await
                    .unwrap_or_else(|e| panic!("sweep_locks bench ({}) failed: {e}", due.name()))
            });
        });
    }
    group.finish();
    criterion.final_summary();
    Ok(())
}
