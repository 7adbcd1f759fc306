//! `--handoff`: how soon a waiting acquire (`LockOptions::wait`) receives a
//! lock its holder releases, and how fast a queue drains. One JSON line per
//! case, each on a fresh database with the first `--background` count:
//!
//! - `one-process`: a holder agent takes a fresh resource; a waiter agent of
//!   another session on the same manager asks for it with a 10 s wait; once
//!   `lock_waiters` shows the waiter at position 1, the holder calls
//!   `release_lock`. `p50_us`/`p99_us`/`max_us` run from `release_lock`'s
//!   return (its commit is done) to the instant the waiter's call returned
//!   the grant; `from_release_start_*` from the call of `release_lock`, and
//!   `release_*` is `release_lock` itself.
//! - `across-instances`: the same with the waiter's session on a second
//!   manager connected to the same database (as another instance of the app
//!   would be), woken by PostgreSQL's `NOTIFY` or its
//!   `Config::lock_poll_interval` poll elsewhere. Skipped on in-memory SQLite,
//!   where a second connect is a database of its own: the line says so.
//! - `drain-16`: 16 agents of their own sessions queue in turn for a held
//!   resource (each joins once the previous one shows in `lock_waiters`, so
//!   the arrival order is known) and release the lock as soon as it is
//!   theirs. A drain runs from the call of the holder's `release_lock` to the
//!   last grant: 1 release, then 16 grants and 15 releases, the same work as
//!   16 uncontended `acquire_lock` + `release_lock` pairs of one agent on free
//!   resources, which every round also times (the two alternate which goes
//!   first). `ratio` is the uncontended rate over the drain's; `in_order`
//!   says every drain granted in arrival order (fencing tokens increasing
//!   along the queue).
//!
//! Every case does 3 untimed rounds, then `--iters` timed ones.
use std::time::{Duration, Instant};

use demiarch_sessions::{LockOptions, SessionManager};
use serde::Serialize;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::args::Args;
use crate::fixture::{BoxResult, Fixture};
use crate::report::{peak_rss_kb, print_json, round1, summarize, SkippedLine};
use crate::{manager_config, median, open_populated, WARMUP};

/// How long each waiter is prepared to wait; far beyond any hand-over.
const WAIT: Duration = Duration::from_secs(10);
/// Waiters queued in a drain.
const DRAIN_WAITERS: usize = 16;
/// How often the queue is read while a waiter joins it.
const QUEUE_LOOK: Duration = Duration::from_millis(1);
/// The longest a waiter may take to show in the queue.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(10);
const RESOURCE_TYPE: &str = "file";

/// `one-process` and `across-instances`.
#[derive(Debug, Serialize)]
struct HandoffLine {
    op: &'static str,
    backend: &'static str,
    case: &'static str,
    background_sessions: u64,
    iters: usize,
    /// From `release_lock`'s return to the waiter's grant.
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    /// From the call of `release_lock` to the waiter's grant.
    from_release_start_p50_us: f64,
    from_release_start_p99_us: f64,
    /// `release_lock` itself.
    release_p50_us: f64,
    release_p99_us: f64,
    poll_interval_ms: u64,
    peak_rss_kb: u64,
}

/// `drain-16`.
#[derive(Debug, Serialize)]
struct DrainLine {
    op: &'static str,
    backend: &'static str,
    case: &'static str,
    background_sessions: u64,
    iters: usize,
    waiters: usize,
    /// One drain: from the call of the holder's `release_lock` to the last grant.
    p50_us: f64,
    p99_us: f64,
    /// Medians over the rounds.
    grants_per_s: f64,
    uncontended_pairs_per_s: f64,
    /// `uncontended_pairs_per_s / grants_per_s`.
    ratio: f64,
    /// Every drain granted in arrival order.
    in_order: bool,
    out_of_order_drains: usize,
    peak_rss_kb: u64,
}

const OP: &str = "lock_handoff";

pub async fn run(args: &Args) -> BoxResult<()> {
    let fx = open_populated(args, args.background[0]).await?;
    print_json(&closing(one_process(args, &fx).await, fx).await?)?;
    let fx = open_populated(args, args.background[0]).await?;
    match closing(across_instances(args, &fx).await, fx).await? {
        Ok(line) => print_json(&line)?,
        Err(skipped) => print_json(&skipped)?,
    }
    let fx = open_populated(args, args.background[0]).await?;
    print_json(&closing(drain(args, &fx).await, fx).await?)?;
    Ok(())
}

/// Drops a case's database whether or not the case succeeded.
async fn closing<T>(outcome: BoxResult<T>, fx: Fixture) -> BoxResult<T> {
    fx.close().await?;
    outcome
}

/// An agent of a session of its own, started on `manager`.
async fn agent(manager: &SessionManager, kind: &str) -> BoxResult<Uuid> {
    let session = manager.start_session().await?;
    Ok(manager.register_agent(session, kind).await?)
}

fn waiting() -> LockOptions {
    LockOptions {
        wait: Some(WAIT),
        ..LockOptions::default()
    }
}

/// Returns once `lock_waiters` shows `agent` at `position` of the queue of
/// `key`; fails if `waiter` (the task of its acquire) ended first.
async fn queued<T>(
    manager: &SessionManager,
    key: &str,
    agent: Uuid,
    position: u32,
    waiter: &JoinHandle<T>,
) -> BoxResult<()> {
    let started = Instant::now();
    loop {
        let waiters = manager
            .lock_waiters(RESOURCE_TYPE, key)
            .await
            .map_err(|e| format!("lock_waiters of {key}: {e}"))?;
        if waiters
            .iter()
            .any(|w| w.agent_id == agent && w.position == position)
        {
            return Ok(());
        }
        if waiter.is_finished() {
            return Err(format!("the waiter for {key} returned before it was queued").into());
        }
        if started.elapsed() > QUEUE_TIMEOUT {
            return Err(format!(
                "agent {agent} did not show at position {position} of {key} within {QUEUE_TIMEOUT:?}"
            )
            .into());
        }
        tokio::time::sleep(QUEUE_LOOK).await;
    }
}

/// One hand-over's times.
struct Handover {
    from_released: Duration,
    from_release_start: Duration,
    release: Duration,
}

/// `holder` (on `holder_side`) takes `key`, `waiter` (on `waiter_side`) queues
/// for it, and the holder releases it once the waiter is at the head.
async fn hand_over(
    holder_side: &SessionManager,
    holder: Uuid,
    waiter_side: &SessionManager,
    waiter: Uuid,
    key: &str,
) -> BoxResult<Handover> {
    let held = holder_side
        .acquire_lock(holder, RESOURCE_TYPE, key)
        .await
        .map_err(|e| format!("the holder's acquire_lock of {key}: {e}"))?;
    let task = {
        let (manager, key) = (waiter_side.clone(), key.to_owned());
        tokio::spawn(async move {
            let grant = manager
                .acquire_lock_with(waiter, RESOURCE_TYPE, &key, waiting())
                .await;
            (grant, Instant::now())
        })
    };
    if let Err(e) = queued(holder_side, key, waiter, 1, &task).await {
        if task.is_finished() {
            if let (Err(waited), _) = task.await? {
                return Err(format!("waiting for {key}: {waited}").into());
            }
        }
        return Err(e);
    }
    let release_start = Instant::now();
    holder_side
        .release_lock(held.lock_id)
        .await
        .map_err(|e| format!("the holder's release_lock of {key}: {e}"))?;
    let released = Instant::now();
    let (grant, granted_at) = task.await?;
    let grant = grant.map_err(|e| format!("waiting for {key}: {e}"))?;
    waiter_side
        .release_lock(grant.lock_id)
        .await
        .map_err(|e| format!("the waiter's release_lock of {key}: {e}"))?;
    Ok(Handover {
        // A waiter in the same process may be granted while `release_lock`
        // still sends PostgreSQL's NOTIFY: that counts as no time at all.
        from_released: granted_at.saturating_duration_since(released),
        from_release_start: granted_at.saturating_duration_since(release_start),
        release: released - release_start,
    })
}

/// `WARMUP` + `--iters` hand-overs from a holder on `fx`'s manager to a
/// waiter on `waiter_side`.
async fn time_handovers(
    args: &Args,
    fx: &Fixture,
    waiter_side: &SessionManager,
    case: &'static str,
) -> BoxResult<HandoffLine> {
    let holder = agent(&fx.manager, "holder").await?;
    let waiter = agent(waiter_side, "waiter").await?;
    let (mut from_released, mut from_start, mut release) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..WARMUP + args.iters {
        let key = format!("handoff/{case}/{holder}/{i}");
        let times = hand_over(&fx.manager, holder, waiter_side, waiter, &key)
            .await
            .map_err(|e| format!("{case} hand-over {i} on {}: {e}", fx.backend.name()))?;
        if i >= WARMUP {
            from_released.push(times.from_released);
            from_start.push(times.from_release_start);
            release.push(times.release);
        }
    }
    let (p50_us, p99_us) = summarize(&from_released);
    let (from_release_start_p50_us, from_release_start_p99_us) = summarize(&from_start);
    let (release_p50_us, release_p99_us) = summarize(&release);
    let max = from_released.iter().max().copied().unwrap_or_default();
    Ok(HandoffLine {
        op: OP,
        backend: fx.backend.name(),
        case,
        background_sessions: args.background[0],
        iters: args.iters,
        p50_us,
        p99_us,
        max_us: round1(max.as_secs_f64() * 1e6),
        from_release_start_p50_us,
        from_release_start_p99_us,
        release_p50_us,
        release_p99_us,
        poll_interval_ms: u64::try_from(fx.manager.config().lock_poll_interval.as_millis())?,
        peak_rss_kb: peak_rss_kb(),
    })
}

async fn one_process(args: &Args, fx: &Fixture) -> BoxResult<HandoffLine> {
    time_handovers(args, fx, &fx.manager, "one-process").await
}

async fn across_instances(
    args: &Args,
    fx: &Fixture,
) -> BoxResult<Result<HandoffLine, SkippedLine>> {
    const CASE: &str = "across-instances";
    let Some(second) = fx.second_manager(manager_config(args)).await? else {
        return Ok(Err(SkippedLine {
            op: OP,
            backend: fx.backend.name(),
            case: CASE,
            skipped: "an in-memory SQLite database has no second instance: every connect is a database of its own",
        }));
    };
    let timed = time_handovers(args, fx, &second, CASE).await;
    second.close().await?;
    Ok(Ok(timed?))
}

/// One drain of `waiters` on `key`: its time and whether it granted in
/// arrival order.
async fn drain_once(
    manager: &SessionManager,
    holder: Uuid,
    waiters: &[Uuid],
    key: &str,
) -> BoxResult<(Duration, bool)> {
    type Granted = Result<(i64, Instant), demiarch_sessions::Error>;
    let held = manager.acquire_lock(holder, RESOURCE_TYPE, key).await?;
    let mut tasks: Vec<JoinHandle<Granted>> = Vec::with_capacity(waiters.len());
    for (position, &agent) in (1..).zip(waiters) {
        let task = {
            let (manager, key) = (manager.clone(), key.to_owned());
            tokio::spawn(async move {
                let grant = manager
                    .acquire_lock_with(agent, RESOURCE_TYPE, &key, waiting())
                    .await?;
                let granted_at = Instant::now();
                manager.release_lock(grant.lock_id).await?;
                Ok((grant.fencing_token, granted_at))
            })
        };
        if let Err(e) = queued(manager, key, agent, position, &task).await {
            if task.is_finished() {
                task.await??;
            }
            return Err(e);
        }
        tasks.push(task);
    }
    let release_start = Instant::now();
    manager.release_lock(held.lock_id).await?;
    let mut last = release_start;
    let mut tokens = Vec::with_capacity(tasks.len());
    for task in tasks {
        let (token, granted_at) = task.await??;
        tokens.push(token);
        last = last.max(granted_at);
    }
    let in_order = tokens.windows(2).all(|w| w[0] < w[1]);
    Ok((last - release_start, in_order))
}

/// `count` acquire_lock + release_lock pairs of `agent` on free resources.
async fn uncontended(
    manager: &SessionManager,
    agent: Uuid,
    count: usize,
    round: usize,
) -> BoxResult<Duration> {
    let keys: Vec<String> = (0..count)
        .map(|j| format!("handoff/uncontended/{agent}/{round}/{j}"))
        .collect();
    let started = Instant::now();
    for key in &keys {
        let grant = manager.acquire_lock(agent, RESOURCE_TYPE, key).await?;
        manager.release_lock(grant.lock_id).await?;
    }
    Ok(started.elapsed())
}

async fn drain(args: &Args, fx: &Fixture) -> BoxResult<DrainLine> {
    let manager = &fx.manager;
    let holder = agent(manager, "holder").await?;
    let solo = agent(manager, "solo").await?;
    let mut waiters = Vec::with_capacity(DRAIN_WAITERS);
    for _ in 0..DRAIN_WAITERS {
        waiters.push(agent(manager, "waiter").await?);
    }
    let (mut drains, mut pairs) = (Vec::new(), Vec::new());
    let mut out_of_order = 0;
    for round in 0..WARMUP + args.iters {
        let key = format!("handoff/drain/{holder}/{round}");
        let mut drained = None;
        let mut paired = None;
        // Alternate which goes first, so drift falls on both alike.
        for step in 0..2 {
            if (round + step) % 2 == 0 {
                drained = Some(
                    drain_once(manager, holder, &waiters, &key)
                        .await
                        .map_err(|e| format!("drain {round} on {}: {e}", fx.backend.name()))?,
                );
            } else {
                paired = Some(uncontended(manager, solo, DRAIN_WAITERS, round).await?);
            }
        }
        let ((drain_time, in_order), pair_time) =
            drained.zip(paired).ok_or("a round was skipped")?;
        if round >= WARMUP {
            drains.push(drain_time);
            pairs.push(pair_time);
            if !in_order {
                out_of_order += 1;
            }
        }
    }
    let (p50_us, p99_us) = summarize(&drains);
    let rate = |times: &[Duration]| {
        let rates: Vec<f64> = times
            .iter()
            .map(|t| DRAIN_WAITERS as f64 / t.as_secs_f64())
            .collect();
        median(&rates)
    };
    let (grants_per_s, uncontended_pairs_per_s) = (rate(&drains), rate(&pairs));
    Ok(DrainLine {
        op: OP,
        backend: fx.backend.name(),
        case: "drain-16",
        background_sessions: args.background[0],
        iters: args.iters,
        waiters: DRAIN_WAITERS,
        p50_us,
        p99_us,
        grants_per_s: round1(grants_per_s),
        uncontended_pairs_per_s: round1(uncontended_pairs_per_s),
        ratio: (uncontended_pairs_per_s / grants_per_s * 1000.0).round() / 1000.0,
        in_order: out_of_order == 0,
        out_of_order_drains: out_of_order,
        peak_rss_kb: peak_rss_kb(),
    })
}
