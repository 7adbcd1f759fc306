//! `--lock-lost`: how soon `SessionManager::lock_lost` resolves after the
//! lock is released, timed from the release's return (its commit) to the
//! watch's resolution, `--iters` times after 3 warm-up ones:
//!
//! - `same-process`: the watch is on the manager that releases;
//! - `other-instance`: on a second manager on the same database (woken by
//!   `NOTIFY` on PostgreSQL, else by its `lock_poll_interval` poll).
use std::time::{Duration, Instant};

use demiarch_sessions::SessionManager;
use serde::Serialize;

use crate::args::Args;
use crate::fixture::{BoxResult, Fixture};
use crate::manager_config;
use crate::report::{print_json, summarize, SkippedLine};

const OP: &str = "lock_lost";
const WARMUP: usize = 3;

#[derive(Debug, Serialize)]
struct Line {
    op: &'static str,
    backend: &'static str,
    case: &'static str,
    iters: usize,
    p50_us: f64,
    p99_us: f64,
}

pub async fn run(args: &Args) -> BoxResult<()> {
    let fx = Fixture::open(args.backend, manager_config(args)).await?;
    let outcome = cases(args, &fx).await;
    fx.close().await?;
    outcome
}

async fn cases(args: &Args, fx: &Fixture) -> BoxResult<()> {
    let manager = &fx.manager;
    let line = time(args, manager, manager).await?;
    print_json(&Line {
        case: "same-process",
        ..line
    })?;
    match fx.second_manager(manager_config(args)).await? {
        Some(peer) => {
            let line = time(args, manager, &peer).await;
            peer.close().await?;
            print_json(&Line {
                case: "other-instance",
                ..line?
            })?;
        }
        None => print_json(&SkippedLine {
            op: OP,
            backend: args.backend.name(),
            case: "other-instance",
            skipped: "an in-memory database has no second instance",
        })?,
    }
    Ok(())
}

async fn time(args: &Args, releaser: &SessionManager, watcher: &SessionManager) -> BoxResult<Line> {
    let session = releaser.start_session().await?;
    let agent = releaser.register_agent(session, "holder").await?;
    let mut samples = Vec::with_capacity(args.iters);
    for i in 0..args.iters + WARMUP {
        let lock = releaser
            .acquire_lock(agent, "file", &format!("lost/{session}/{i}"))
            .await?
            .lock_id;
        let watch = watcher.lock_lost(lock);
        let watch = tokio::spawn(async move {
            let loss = watch.await;
            (loss, Instant::now())
        });
        // Armed: the watch has read the row and waits.
        tokio::time::sleep(Duration::from_millis(20)).await;
        releaser.release_lock(lock).await?;
        let released = Instant::now();
        let (loss, at) = watch.await?;
        loss?;
        if i >= WARMUP {
            samples.push(at.saturating_duration_since(released));
        }
    }
    releaser.end_session(session).await?;
    let (p50_us, p99_us) = summarize(&samples);
    Ok(Line {
        op: OP,
        backend: args.backend.name(),
        case: "",
        iters: samples.len(),
        p50_us,
        p99_us,
    })
}
