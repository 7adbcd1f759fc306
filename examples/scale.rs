//! The measuring instrument for ending sessions at scale.
//!
//! ```text
//! cargo run --release --example scale -- --backend sqlite-wal --impl orm \
//!     --locks 100 --context-bytes 1024 --background 1000 --iters 50
//! ```
//! prints one JSON line per implementation and configuration:
//! `{"impl":"orm","backend":"sqlite-wal","locks":100,"context_bytes":1024,
//!   "background_sessions":1000,"iters":50,"median_us":…,"p99_us":…,"peak_rss_kb":…}`
//!
//! Workload: first `--background` sessions, each with 2 agents holding 5
//! locks; then `--iters` (plus 3 warm-up) target sessions, each with 4 agents
//! holding `--locks` locks round-robin and one context window of
//! `--context-bytes`. Each target session is created just before its end, and
//! only the ends are timed, one at a time.
//!
//! `--impl both` times the library (`orm`) and the seed's SQL (`raw-seed`, see
//! scale/raw_seed.rs), each on a database of its own made the same way.
//! `--impl raw-full` (in `--impl all`) adds a third: the seed's SQL
//! plus the durable work the library's end does and the seed does not, to
//! tell the cost of that work from the cost of the library. Lists (`--locks 0,100,10000`, `--background 1000,100000`,
//! `--context-bytes 1024,1048576`) are timed in one interleaved loop: every
//! `--background` x `--locks` pair and implementation has its own fresh
//! database, and each round ends one session of every combination and
//! implementation, in rotating order, so load from elsewhere on the machine
//! falls on all of them alike and their ratios can be trusted.
//!
//! Other modes: `--concurrency N` (throughput, serial vs N tasks), `--acquire`
//! (acquire_lock latency), `--handoff` (how soon a waiting acquire receives a
//! released lock: in one process, on a second manager, and a queue of 16
//! draining; see scale/handoff.rs), `--watch` (how soon and how many events a
//! change feed delivers; see scale/watch.rs), `--prune` (a prune's rate against
//! raw SQL, ends during it, a SQLite file's growth; see scale/prune.rs),
//! `--lock-lost` (how soon a holder learns its lock went; see
//! scale/lock_lost.rs),
//! `--explain` (query plans), `--wal-pages`
//! (what each end writes to SQLite's WAL, per table and index), `--chart` (the
//! SVG in docs/). See `--help` and docs/performance.md.
use std::error::Error;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use demiarch_sessions::entity::resource_locks;
use demiarch_sessions::{Config, SessionManager};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use uuid::Uuid;

#[path = "scale/args.rs"]
mod args;
#[path = "scale/chart.rs"]
mod chart;
#[path = "scale/dashboard.rs"]
mod dashboard;
#[path = "scale/explain.rs"]
mod explain;
#[path = "scale/fixture.rs"]
mod fixture;
#[path = "scale/handoff.rs"]
mod handoff;
#[path = "scale/lock_lost.rs"]
mod lock_lost;
#[path = "scale/lockload.rs"]
mod lockload;
#[path = "scale/prune.rs"]
mod prune;
#[path = "scale/raw_seed.rs"]
mod raw_seed;
#[path = "scale/report.rs"]
mod report;
#[path = "scale/wal_pages.rs"]
mod wal_pages;
#[path = "scale/watch.rs"]
mod watch;

use args::{Args, Impl, Mode};
use fixture::{BoxResult, Fixture};
use report::{peak_rss_kb, print_json, summarize, AcquireLine, EndLine, ThroughputLine};

/// Untimed ends (per implementation and combination) before the timed ones.
const WARMUP: usize = 3;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args = Args::parse(std::env::args().skip(1))?;
    match args.mode.clone() {
        Mode::End => time_ends(&args).await,
        Mode::Throughput {
            concurrency,
            instances,
            sessions,
            rounds,
        } => throughput(&args, concurrency, instances, sessions, rounds).await,
        Mode::Acquire => time_acquires(&args).await,
        Mode::Handoff => handoff::run(&args).await,
        Mode::Watch => watch::run(&args).await,
        Mode::Dashboard => dashboard::run(&args).await,
        Mode::Prune => prune::run(&args).await,
        Mode::LockLost => lock_lost::run(&args).await,
        Mode::LockLoad {
            clients,
            instances,
            seconds,
        } => lockload::run(&args, clients, instances, seconds).await,
        Mode::Explain => {
            let locks = args.locks[0];
            with_fixture(&args, |fx| async move { explain::run(&fx, locks).await }).await
        }
        Mode::WalPages => wal_pages::run(&args).await,
        Mode::Chart { out, from } => chart::draw(&out, &from),
    }
}

/// The configuration of the manager under test.
fn manager_config(args: &Args) -> Config {
    Config {
        cleanup_timeout: Duration::from_millis(args.cleanup_timeout_ms),
        max_connections: args.max_connections,
        ..Config::default()
    }
}

/// A fresh database holding `background` sessions.
async fn open_populated(args: &Args, background: u64) -> BoxResult<Fixture> {
    let fx = Fixture::open(args.backend, manager_config(args)).await?;
    let populated: BoxResult<()> = fx
        .populate_background(background)
        .await
        .map_err(|e| format!("populating {background} background sessions: {e}").into());
    if let Err(e) = populated {
        fx.close().await?;
        return Err(e);
    }
    Ok(fx)
}

/// Opens a fresh database with the first `--background` count, runs `body`,
/// and drops the database whether or not `body` succeeded.
async fn with_fixture<F, Fut>(args: &Args, body: F) -> BoxResult<()>
where
    F: FnOnce(Arc<Fixture>) -> Fut,
    Fut: std::future::Future<Output = BoxResult<()>>,
{
    let fx = Arc::new(open_populated(args, args.background[0]).await?);
    // The body owns its clone and drops it when it finishes.
    let outcome = body(fx.clone()).await;
    match Arc::into_inner(fx) {
        Some(fx) => fx.close().await?,
        None => return Err("the database is still in use by a task".into()),
    }
    outcome
}

/// Ends `session` with `implementation`; returns the number of locks released.
/// The seed leaves the live windows in memory: [`forget_windows`] drops them
/// afterwards, untimed, so a long run does not grow.
async fn end_session(
    manager: &SessionManager,
    implementation: Impl,
    session: Uuid,
) -> BoxResult<u64> {
    Ok(match implementation {
        Impl::Orm => manager.end_session(session).await?.locks_released,
        Impl::RawSeed | Impl::RawFull => {
            raw_seed::end_session(manager, implementation, session).await?
        }
    })
}

/// Drops the live windows a hand-written end left in memory (the library's
/// end removes its own).
fn forget_windows(manager: &SessionManager, implementation: Impl, session: Uuid) {
    if implementation != Impl::Orm {
        manager.contexts().remove(session);
    }
}

/// Ends `session` and returns the time the end took.
async fn time_one_end(
    fx: &Fixture,
    implementation: Impl,
    session: Uuid,
    expected_locks: u64,
) -> BoxResult<Duration> {
    let started = Instant::now();
    let released = end_session(&fx.manager, implementation, session).await?;
    let elapsed = started.elapsed();
    forget_windows(&fx.manager, implementation, session);
    if released != expected_locks {
        return Err(format!(
            "{} released {released} locks of session {session}, expected {expected_locks}",
            implementation.name()
        )
        .into());
    }
    Ok(elapsed)
}

/// One timed configuration and its samples per implementation.
struct Cell {
    /// Per implementation: its own database (each has the schema it runs on).
    fixtures: Vec<usize>,
    background: u64,
    locks: u64,
    context_bytes: usize,
    samples: Vec<Vec<Duration>>,
}

async fn time_ends(args: &Args) -> BoxResult<()> {
    let mut fixtures = Vec::new();
    let outcome = time_ends_with(args, &mut fixtures).await;
    for fx in fixtures {
        fx.close().await?;
    }
    for line in outcome? {
        print_json(&line)?;
    }
    Ok(())
}

async fn time_ends_with(args: &Args, fixtures: &mut Vec<Fixture>) -> BoxResult<Vec<EndLine>> {
    let mut cells = Vec::new();
    for &background in &args.background {
        for &locks in &args.locks {
            let mut per_impl = Vec::with_capacity(args.impls.len());
            for _ in &args.impls {
                fixtures.push(open_populated(args, background).await?);
                per_impl.push(fixtures.len() - 1);
            }
            for &context_bytes in &args.context_bytes {
                cells.push(Cell {
                    fixtures: per_impl.clone(),
                    background,
                    locks,
                    context_bytes,
                    samples: vec![Vec::with_capacity(args.iters); args.impls.len()],
                });
            }
        }
    }

    let slots = cells.len() * args.impls.len();
    for round in 0..WARMUP + args.iters {
        // Rotate the starting point so no combination always runs first or
        // right after the same neighbour.
        for step in 0..slots {
            let slot = (round + step) % slots;
            let cell = &mut cells[slot / args.impls.len()];
            let k = slot % args.impls.len();
            let fx = &fixtures[cell.fixtures[k]];
            let session = fx.target_session(cell.locks, cell.context_bytes).await?;
            let elapsed = time_one_end(fx, args.impls[k], session, cell.locks)
                .await
                .map_err(|e| {
                    format!(
                        "{} end of a session with {} locks and {} context bytes ({} background sessions) on {}: {e}",
                        args.impls[k].name(),
                        cell.locks,
                        cell.context_bytes,
                        cell.background,
                        args.backend.name()
                    )
                })?;
            if round >= WARMUP {
                cell.samples[k].push(elapsed);
            }
        }
    }

    let rss = peak_rss_kb();
    let mut lines = Vec::new();
    for cell in &cells {
        for (implementation, samples) in args.impls.iter().zip(&cell.samples) {
            let (median_us, p99_us) = summarize(samples);
            lines.push(EndLine {
                implementation: implementation.name().to_owned(),
                backend: args.backend.name().to_owned(),
                locks: cell.locks,
                context_bytes: cell.context_bytes,
                background_sessions: cell.background,
                iters: args.iters,
                median_us,
                p99_us,
                peak_rss_kb: rss,
            });
        }
    }
    Ok(lines)
}

/// `sessions` target sessions with their context windows, made untimed.
async fn target_sessions(
    fx: &Fixture,
    sessions: usize,
    locks: u64,
    context_bytes: usize,
) -> BoxResult<Vec<Uuid>> {
    let ids = fx
        .create_sessions(u64::try_from(sessions)?, 4, locks)
        .await?;
    let text = fixture::context_text(context_bytes);
    for &id in &ids {
        fx.manager
            .contexts()
            .put(id, "window-0", serde_json::Value::String(text.clone()))?;
    }
    Ok(ids)
}

#[derive(Default)]
struct Errors {
    count: AtomicU64,
    first: Mutex<Option<String>>,
}

impl Errors {
    fn record(&self, e: impl std::fmt::Display) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first.lock().unwrap_or_else(PoisonError::into_inner);
        if first.is_none() {
            *first = Some(e.to_string());
        }
    }
}

/// Ends every session in `ids` from `tasks` tasks, spread over `managers`;
/// returns ends per second.
async fn end_all(
    managers: &[SessionManager],
    implementation: Impl,
    ids: Vec<Uuid>,
    locks: u64,
    tasks: usize,
    errors: &Arc<Errors>,
) -> BoxResult<f64> {
    let ids = Arc::new(ids);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut handles = Vec::with_capacity(tasks);
    for task in 0..tasks {
        let manager = managers[task % managers.len()].clone();
        let (ids, next, errors) = (ids.clone(), next.clone(), errors.clone());
        handles.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&id) = ids.get(i) else { break };
                let ended = end_session(&manager, implementation, id).await;
                forget_windows(&manager, implementation, id);
                match ended {
                    Ok(released) if released == locks => {}
                    Ok(released) => errors.record(format!(
                        "session {id}: released {released} locks, expected {locks}"
                    )),
                    Err(e) => errors.record(e),
                }
            }
        }));
    }
    for handle in handles {
        handle.await?;
    }
    Ok(ids.len() as f64 / started.elapsed().as_secs_f64())
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Rounds of `sessions` ends one at a time and `sessions` ends from
/// `concurrency` tasks over `instances` managers (alternating which phase
/// goes first); reports the median rate of each phase.
async fn throughput(
    args: &Args,
    concurrency: usize,
    instances: usize,
    sessions: usize,
    rounds: usize,
) -> BoxResult<()> {
    let locks = args.locks[0];
    let context_bytes = args.context_bytes[0];
    for &implementation in &args.impls {
        let line: Arc<Mutex<Option<ThroughputLine>>> = Arc::default();
        let out = line.clone();
        with_fixture(args, |fx| async move {
            let mut managers = vec![fx.manager.clone()];
            for _ in 1..instances {
                match fx.second_manager(manager_config(args)).await? {
                    Some(manager) => managers.push(manager),
                    None => break,
                }
            }
            let serial_errors = Arc::new(Errors::default());
            let concurrent_errors = Arc::new(Errors::default());
            let (mut serial, mut concurrent) = (Vec::new(), Vec::new());
            for round in 0..rounds {
                let phases = if round % 2 == 0 {
                    [1, concurrency]
                } else {
                    [concurrency, 1]
                };
                for tasks in phases {
                    let ids = target_sessions(&fx, sessions, locks, context_bytes).await?;
                    let (rates, errors) = if tasks == 1 {
                        (&mut serial, &serial_errors)
                    } else {
                        (&mut concurrent, &concurrent_errors)
                    };
                    let on = if tasks == 1 {
                        &managers[..1]
                    } else {
                        &managers[..]
                    };
                    rates.push(end_all(on, implementation, ids, locks, tasks, errors).await?);
                }
            }

            // Every target lock was released: only the background's are held.
            let background = args.background[0];
            let held = resource_locks::Entity::find()
                .filter(resource_locks::Column::ReleasedAt.is_null())
                .count(fx.connection())
                .await?;
            if held != background * 10 {
                concurrent_errors.record(format!(
                    "{held} locks still held, expected the background's {}",
                    background * 10
                ));
            }
            let first_error = [&serial_errors, &concurrent_errors].iter().find_map(|e| {
                e.first
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone()
            });
            let (serial_per_s, concurrent_per_s) = (median(&serial), median(&concurrent));
            *out.lock().unwrap_or_else(PoisonError::into_inner) = Some(ThroughputLine {
                mode: "throughput",
                implementation: implementation.name().to_owned(),
                backend: fx.backend.name().to_owned(),
                locks,
                context_bytes,
                background_sessions: background,
                sessions,
                concurrency,
                instances: managers.len(),
                rounds,
                serial_per_s: report::round1(serial_per_s),
                concurrent_per_s: report::round1(concurrent_per_s),
                ratio: (concurrent_per_s / serial_per_s * 1000.0).round() / 1000.0,
                serial_rounds: serial.iter().map(|&r| report::round1(r)).collect(),
                concurrent_rounds: concurrent.iter().map(|&r| report::round1(r)).collect(),
                serial_errors: serial_errors.count.load(Ordering::Relaxed),
                concurrent_errors: concurrent_errors.count.load(Ordering::Relaxed),
                first_error,
                peak_rss_kb: peak_rss_kb(),
            });
            for manager in managers.into_iter().skip(1) {
                manager.close().await?;
            }
            Ok(())
        })
        .await?;
        let taken = line.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(line) = taken {
            print_json(&line)?;
        }
    }
    Ok(())
}

async fn time_acquires(args: &Args) -> BoxResult<()> {
    let line: Arc<Mutex<Option<AcquireLine>>> = Arc::default();
    let out = line.clone();
    with_fixture(args, |fx| async move {
        let manager = &fx.manager;
        let session = manager.start_session().await?;
        let agent = manager.register_agent(session, "bench").await?;
        lockload::create_floor(fx.connection()).await?;
        let floor_conn = manager.write_connection();
        let mut samples = Vec::with_capacity(args.iters);
        let mut floor = Vec::with_capacity(args.iters);
        for i in 0..WARMUP + args.iters {
            let key = format!("acquire/{session}/{i}");
            let started = Instant::now();
            manager.acquire_lock(agent, "file", &key).await?;
            let took = started.elapsed();
            let started = Instant::now();
            lockload::floor_acquire(floor_conn, &key, agent).await?;
            let floor_took = started.elapsed();
            if i >= WARMUP {
                samples.push(took);
                floor.push(floor_took);
            }
        }
        let (floor_median_us, floor_p99_us) = summarize(&floor);
        let (median_us, p99_us) = summarize(&samples);
        *out.lock().unwrap_or_else(PoisonError::into_inner) = Some(AcquireLine {
            op: "acquire_lock",
            backend: fx.backend.name().to_owned(),
            background_sessions: args.background[0],
            iters: args.iters,
            median_us,
            p99_us,
            floor_median_us,
            floor_p99_us,
            ratio_to_floor: (median_us / floor_median_us * 1000.0).round() / 1000.0,
            peak_rss_kb: peak_rss_kb(),
        });
        Ok(())
    })
    .await?;
    let taken = line.lock().unwrap_or_else(PoisonError::into_inner).take();
    if let Some(line) = taken {
        print_json(&line)?;
    }
    Ok(())
}
