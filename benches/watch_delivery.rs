//! A change feed's delivery in the same process, on in-memory SQLite with
//! 1 000 background sessions (2 agents x 5 locks each): from
//! `end_session`'s return to the instant the feed (`SessionManager::watch`,
//! `session_end` events) yielded the end's event, 0 when it came first.
//! Starting each session (one agent, one lock) is not timed.
//!
//! ```text
//! cargo bench --bench watch_delivery
//! ```
use std::error::Error;
use std::pin::Pin;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};
use demiarch_sessions::{AuditFilter, AuditRecord, Config, SessionManager, WatchOptions};
use futures::{Stream, StreamExt};

#[allow(dead_code)]
#[path = "../examples/scale/fixture.rs"]
mod fixture;

use fixture::{BackendKind, Fixture};

const BACKGROUND_SESSIONS: u64 = 1000;

type Feed = Pin<Box<dyn Stream<Item = demiarch_sessions::Result<AuditRecord>> + Send>>;

/// One session ended: the time from `end_session`'s return to its event.
async fn delivery(manager: &SessionManager, feed: &mut Feed) -> Duration {
    let session = manager.start_session().await.expect("start_session");
    let agent = manager
        .register_agent(session, "coder")
        .await
        .expect("register_agent");
    manager
        .acquire_lock(agent, "file", &format!("{session}/main.rs"))
        .await
        .expect("acquire_lock");
    manager.end_session(session).await.expect("end_session");
    let returned = Instant::now();
    let event = tokio::time::timeout(Duration::from_secs(10), feed.next())
        .await
        .expect("the end's event within 10 s")
        .expect("the feed goes on")
        .expect("an event, not an error");
    let received = Instant::now();
    assert_eq!(event.session_id, Some(session));
    received.saturating_duration_since(returned)
}

fn main() -> Result<(), Box<dyn Error>> {
    let runtime = tokio::runtime::Runtime::new()?;
    let (fx, feed) = runtime.block_on(async {
        let fx = Fixture::open(BackendKind::SqliteMemory, Config::default()).await?;
        fx.populate_background(BACKGROUND_SESSIONS).await?;
        let newest = fx
            .manager
            .audit_events(AuditFilter {
                limit: Some(1),
                ..AuditFilter::default()
            })
            .await?
            .rows;
        let feed: Feed = Box::pin(fx.manager.watch(WatchOptions {
            after: Some(newest.first().map_or(0, |e| e.seq)),
            event_types: vec!["session_end".into()],
            ..WatchOptions::default()
        }));
        Ok::<_, Box<dyn Error>>((fx, feed))
    })?;
    let feed = tokio::sync::Mutex::new(feed);

    let mut criterion = Criterion::default().configure_from_args();
    let mut group = criterion.benchmark_group("watch_delivery");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(1));
    group.bench_function("same_process", |b| {
        b.to_async(&runtime).iter_custom(|iters| {
            let (fx, feed) = (&fx, &feed);
            async move {
                let mut feed = feed.lock().await;
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += delivery(&fx.manager, &mut feed).await;
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
