//! `--watch`: how soon a change feed (`SessionManager::watch`) delivers an
//! event, and how many it keeps up with. One JSON line per case, each on a
//! fresh database with the first `--background` count:
//!
//! - `same-process`: a feed of `session_end` events on the manager that ends
//!   the sessions. Each of `--iters` sessions (one agent, two locks) is ended
//!   with `end_session`; `p50_us`/`p99_us`/`max_us` run from `end_session`'s
//!   return (its commit and wake-up are done) to the instant the feed's
//!   consumer received the event, counted as 0 when the event arrived first
//!   (`before_return` says how often); `from_call_*` run from the call of
//!   `end_session`, and `end_*` is `end_session` itself.
//! - `across-instances`: the same with the feed on a second manager
//!   connected to the same database, as another instance of the app:
//!   woken by PostgreSQL's `NOTIFY`, by `Config::watch_poll_interval`
//!   elsewhere. Skipped on in-memory SQLite, where a second connect is a
//!   database of its own: the line says so.
//! - `throughput`: a writer appends audit rows at `--watch-rate` events per
//!   second for `--watch-seconds`, in a batch every 10 ms (one transaction
//!   each, through the same `audit_head` lock the library's appends take),
//!   while one feed consumes them. Rows written so wake no feed, so the feed
//!   looks every 10 ms (`poll_interval_ms`). `delivered_per_s` is the feed's
//!   rate over the whole run, `lag_*` run from a batch's commit to the
//!   receipt of its last event, and `drain_per_s` is how fast a feed then
//!   reads the whole log again from `after: Some(0)`.
//! - `library-writers`: 4 tasks start sessions on the manager as fast as it
//!   lets them for `--watch-seconds`, each start one `session_start` event
//!   that wakes the feed; `lag_*` run from `start_session`'s return to the
//!   feed's receipt of its event (0 when the event came first).
//!
//! The latency cases do 3 untimed rounds first.
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use demiarch_sessions::entity::{audit_head, audit_log};
use demiarch_sessions::{AuditFilter, Config, SessionManager, WatchOptions};
use futures::StreamExt;
use sea_orm::{ActiveValue::Set, EntityTrait, QuerySelect, TransactionTrait};
use serde::Serialize;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::args::Args;
use crate::fixture::{BoxResult, Fixture};
use crate::report::{peak_rss_kb, print_json, round1, summarize, SkippedLine};
use crate::{manager_config, open_populated, WARMUP};

const OP: &str = "watch";
/// How long the consumer waits for one event before the case fails.
const RECEIPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The throughput writer's batch interval.
const BATCH_EVERY: Duration = Duration::from_millis(10);
/// The throughput feed's poll interval: its writer's rows wake nobody.
const RAW_POLL: Duration = Duration::from_millis(10);
/// Tasks starting sessions in `library-writers`.
const WRITERS: usize = 4;

#[derive(Debug, Serialize)]
struct LatencyLine {
    op: &'static str,
    backend: &'static str,
    case: &'static str,
    background_sessions: u64,
    iters: usize,
    /// From `end_session`'s return to the feed's receipt.
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    /// Events received before `end_session` returned.
    before_return: usize,
    from_call_p50_us: f64,
    from_call_p99_us: f64,
    end_p50_us: f64,
    end_p99_us: f64,
    poll_interval_ms: u64,
    peak_rss_kb: u64,
}

#[derive(Debug, Serialize)]
struct ThroughputLine {
    op: &'static str,
    backend: &'static str,
    case: &'static str,
    target_per_s: u64,
    seconds: u64,
    written: usize,
    written_per_s: f64,
    delivered: usize,
    delivered_per_s: f64,
    in_order: bool,
    lag_p50_us: f64,
    lag_p99_us: f64,
    drained: usize,
    drain_per_s: f64,
    page_size: u64,
    poll_interval_ms: u64,
    peak_rss_kb: u64,
}

#[derive(Debug, Serialize)]
struct WritersLine {
    op: &'static str,
    backend: &'static str,
    case: &'static str,
    writers: usize,
    seconds: u64,
    written: usize,
    written_per_s: f64,
    delivered: usize,
    in_order: bool,
    lag_p50_us: f64,
    lag_p99_us: f64,
    lag_max_us: f64,
    peak_rss_kb: u64,
}

pub async fn run(args: &Args) -> BoxResult<()> {
    let fx = open_populated(args, args.background[0]).await?;
    let line = latency(args, &fx, None, "same-process").await;
    fx.close().await?;
    print_json(&line?)?;

    let fx = open_populated(args, args.background[0]).await?;
    let outcome = match fx.second_manager(manager_config(args)).await? {
        Some(other) => {
            let line = latency(args, &fx, Some(&other), "across-instances").await;
            other.close().await?;
            Some(line)
        }
        None => None,
    };
    fx.close().await?;
    match outcome {
        Some(line) => print_json(&line?)?,
        None => print_json(&SkippedLine {
            op: OP,
            backend: args.backend.name(),
            case: "across-instances",
            skipped: "in-memory SQLite: a second manager would open a database of its own",
        })?,
    }

    let config = Config {
        watch_poll_interval: RAW_POLL,
        ..manager_config(args)
    };
    let fx = Fixture::open(args.backend, config).await?;
    let line = throughput(args, &fx).await;
    fx.close().await?;
    print_json(&line?)?;

    let fx = Fixture::open(args.backend, manager_config(args)).await?;
    let line = library_writers(args, &fx).await;
    fx.close().await?;
    print_json(&line?)?;
    Ok(())
}

/// Receipts of a feed's events, by session, sent by its consumer task.
type Receipts = mpsc::UnboundedReceiver<(Option<Uuid>, Instant)>;

fn consume(manager: &SessionManager, options: WatchOptions) -> Receipts {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut feed = Box::pin(manager.watch(options));
    tokio::spawn(async move {
        while let Some(item) = feed.next().await {
            let Ok(event) = item else { continue };
            if tx.send((event.session_id, Instant::now())).is_err() {
                return;
            }
        }
    });
    rx
}

/// The seq of the newest event: where a feed of what follows starts.
async fn newest_seq(manager: &SessionManager) -> BoxResult<i64> {
    let newest = manager
        .audit_events(AuditFilter {
            limit: Some(1),
            ..AuditFilter::default()
        })
        .await?
        .rows;
    Ok(newest.first().map_or(0, |e| e.seq))
}

/// Waits for the feed to deliver `session`'s event.
async fn receipt_of(receipts: &mut Receipts, session: Uuid) -> BoxResult<Instant> {
    loop {
        match tokio::time::timeout(RECEIPT_TIMEOUT, receipts.recv()).await {
            Ok(Some((Some(id), at))) if id == session => return Ok(at),
            Ok(Some(_)) => continue,
            Ok(None) => return Err("the feed's consumer stopped".into()),
            Err(_) => {
                return Err(
                    format!("no event of session {session} within {RECEIPT_TIMEOUT:?}").into(),
                )
            }
        }
    }
}

async fn latency(
    args: &Args,
    fx: &Fixture,
    watcher: Option<&SessionManager>,
    case: &'static str,
) -> BoxResult<LatencyLine> {
    let writer = &fx.manager;
    let watcher = watcher.unwrap_or(writer);
    let mut receipts = consume(
        watcher,
        WatchOptions {
            after: Some(newest_seq(writer).await?),
            event_types: vec!["session_end".into()],
            ..WatchOptions::default()
        },
    );
    let (mut from_return, mut from_call, mut ends) = (Vec::new(), Vec::new(), Vec::new());
    let mut before_return = 0;
    for round in 0..WARMUP + args.iters {
        let session = writer.start_session().await?;
        let agent = writer.register_agent(session, "coder").await?;
        for key in ["a", "b"] {
            writer
                .acquire_lock(agent, "file", &format!("{session}/{key}"))
                .await?;
        }
        let called = Instant::now();
        writer.end_session(session).await?;
        let returned = Instant::now();
        let received = receipt_of(&mut receipts, session).await?;
        if round < WARMUP {
            continue;
        }
        if received < returned {
            before_return += 1;
        }
        from_return.push(received.saturating_duration_since(returned));
        from_call.push(received.saturating_duration_since(called));
        ends.push(returned - called);
    }
    let (p50, p99) = summarize(&from_return);
    let (from_call_p50, from_call_p99) = summarize(&from_call);
    let (end_p50, end_p99) = summarize(&ends);
    let max = from_return.iter().max().copied().unwrap_or_default();
    Ok(LatencyLine {
        op: OP,
        backend: args.backend.name(),
        case,
        background_sessions: args.background[0],
        iters: args.iters,
        p50_us: p50,
        p99_us: p99,
        max_us: round1(max.as_secs_f64() * 1e6),
        before_return,
        from_call_p50_us: from_call_p50,
        from_call_p99_us: from_call_p99,
        end_p50_us: end_p50,
        end_p99_us: end_p99,
        poll_interval_ms: watcher.config().watch_poll_interval.as_millis() as u64,
        peak_rss_kb: peak_rss_kb(),
    })
}

/// Appends `n` audit rows in one transaction, as the library appends: the
/// `audit_head` lock first, so seqs are committed in order.
async fn append_batch(manager: &SessionManager, n: usize) -> BoxResult<()> {
    let txn = manager
        .write_connection()
        .begin_with_options(sea_orm::TransactionOptions {
            sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
            ..Default::default()
        })
        .await?;
    audit_head::Entity::find_by_id(1)
        .lock_exclusive()
        .one(&txn)
        .await?
        .ok_or("audit_head has no row")?;
    let now = chrono::Utc::now();
    let rows = (0..n).map(|_| audit_log::ActiveModel {
        id: Set(Uuid::new_v4().to_string()),
        event_type: Set("locks_swept".to_owned()),
        event_time: Set(now.into()),
        session_id: Set(None),
        details: Set(serde_json::json!({ "locks": [] })),
        ..Default::default()
    });
    audit_log::Entity::insert_many(rows)
        .exec_without_returning(&txn)
        .await?;
    txn.commit().await?;
    Ok(())
}

async fn throughput(args: &Args, fx: &Fixture) -> BoxResult<ThroughputLine> {
    let manager = fx.manager.clone();
    let rate = args.watch_rate.max(100);
    let seconds = args.watch_seconds.max(1);
    let batch = (rate as usize) / 100;
    let batches = (seconds * 100) as usize;
    let total = batch * batches;
    let receipts = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let consumer = {
        let (receipts, mut feed) = (
            receipts.clone(),
            Box::pin(manager.watch(WatchOptions {
                after: Some(newest_seq(&manager).await?),
                ..WatchOptions::default()
            })),
        );
        tokio::spawn(async move {
            let mut last = 0;
            let mut in_order = true;
            while let Some(item) = feed.next().await {
                let event = item.map_err(|e| e.to_string())?;
                in_order &= event.seq > last;
                last = event.seq;
                let mut got = receipts.lock().unwrap_or_else(PoisonError::into_inner);
                got.push(Instant::now());
                if got.len() == total {
                    return Ok::<_, String>(in_order);
                }
            }
            Err("the feed ended".into())
        })
    };
    let mut commits = Vec::with_capacity(batches);
    let mut tick = tokio::time::interval(BATCH_EVERY);
    let started = Instant::now();
    for _ in 0..batches {
        tick.tick().await;
        append_batch(&manager, batch).await?;
        commits.push(Instant::now());
    }
    let written_s = started.elapsed().as_secs_f64();
    let in_order = tokio::time::timeout(RECEIPT_TIMEOUT, consumer)
        .await
        .map_err(|_| "the feed did not deliver every event")???;
    let got = receipts
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let delivered_s = (got[total - 1] - started).as_secs_f64();
    let lags: Vec<Duration> = commits
        .iter()
        .enumerate()
        .map(|(i, commit)| got[(i + 1) * batch - 1].saturating_duration_since(*commit))
        .collect();
    let (lag_p50, lag_p99) = summarize(&lags);

    let drain_started = Instant::now();
    let mut again = Box::pin(manager.watch(WatchOptions {
        after: Some(0),
        ..WatchOptions::default()
    }));
    for _ in 0..total {
        tokio::time::timeout(RECEIPT_TIMEOUT, again.next())
            .await
            .map_err(|_| "the drain stalled")?
            .ok_or("the drain ended")??;
    }
    let drain_s = drain_started.elapsed().as_secs_f64();
    Ok(ThroughputLine {
        op: OP,
        backend: args.backend.name(),
        case: "throughput",
        target_per_s: rate,
        seconds,
        written: total,
        written_per_s: round1(total as f64 / written_s),
        delivered: got.len(),
        delivered_per_s: round1(total as f64 / delivered_s),
        in_order,
        lag_p50_us: lag_p50,
        lag_p99_us: lag_p99,
        drained: total,
        drain_per_s: round1(total as f64 / drain_s),
        page_size: manager.config().watch_page_size,
        poll_interval_ms: manager.config().watch_poll_interval.as_millis() as u64,
        peak_rss_kb: peak_rss_kb(),
    })
}

async fn library_writers(args: &Args, fx: &Fixture) -> BoxResult<WritersLine> {
    let manager = fx.manager.clone();
    let seconds = args.watch_seconds.max(1);
    let mut feed = Box::pin(manager.watch(WatchOptions {
        after: Some(newest_seq(&manager).await?),
        ..WatchOptions::default()
    }));
    let (tx, mut started) = mpsc::unbounded_channel::<(Uuid, Instant)>();
    let until = Instant::now() + Duration::from_secs(seconds);
    let began = Instant::now();
    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        let (manager, tx) = (manager.clone(), tx.clone());
        writers.push(tokio::spawn(async move {
            while Instant::now() < until {
                let session = manager.start_session().await.map_err(|e| e.to_string())?;
                let _ = tx.send((session, Instant::now()));
            }
            Ok::<_, String>(())
        }));
    }
    drop(tx);
    let mut receipts = std::collections::HashMap::new();
    let (mut last, mut in_order) = (0, true);
    let mut returned = std::collections::HashMap::new();
    let mut writers_done = false;
    let mut written_s = seconds as f64;
    loop {
        tokio::select! {
            item = tokio::time::timeout(RECEIPT_TIMEOUT, feed.next()) => {
                let event = item.map_err(|_| "the feed stalled")?.ok_or("the feed ended")??;
                in_order &= event.seq > last;
                last = event.seq;
                if let Some(id) = event.session_id {
                    receipts.insert(id, Instant::now());
                }
            }
            start = started.recv(), if !writers_done => match start {
                Some((session, at)) => { returned.insert(session, at); }
                None => {
                    writers_done = true;
                    written_s = began.elapsed().as_secs_f64();
                }
            },
        }
        if writers_done && receipts.len() == returned.len() {
            break;
        }
    }
    for writer in writers {
        writer.await??;
    }
    let lags: Vec<Duration> = returned
        .iter()
        .filter_map(|(id, at)| {
            receipts
                .get(id)
                .map(|got| got.saturating_duration_since(*at))
        })
        .collect();
    let (lag_p50, lag_p99) = summarize(&lags);
    let max = lags.iter().max().copied().unwrap_or_default();
    Ok(WritersLine {
        op: OP,
        backend: args.backend.name(),
        case: "library-writers",
        writers: WRITERS,
        seconds,
        written: returned.len(),
        written_per_s: round1(returned.len() as f64 / written_s),
        delivered: receipts.len(),
        in_order,
        lag_p50_us: lag_p50,
        lag_p99_us: lag_p99,
        lag_max_us: round1(max.as_secs_f64() * 1e6),
        peak_rss_kb: peak_rss_kb(),
    })
}
