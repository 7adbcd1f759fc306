//! Command-line arguments of the scale example, parsed by hand (a dozen flags).
use std::error::Error;
use std::path::PathBuf;

use demiarch_sessions::Config;

use crate::fixture::BackendKind;

pub const USAGE: &str = "\
usage: scale --backend <sqlite-memory|sqlite-wal|postgres|mysql> [options]

  --impl <orm|raw-seed|raw-full|both|all>
                               which end to time, interleaved (both: orm and raw-seed;
                               all: the three; raw-full: the seed plus the library's extra
                               durable work, see raw_seed.rs) [orm]
  --locks N[,N...]             locks per target session, held by 4 agents round-robin [100]
  --context-bytes N[,N...]     size of the target session's one context window [1024]
  --background N[,N...]        sessions present before timing, 2 agents x 5 locks each [1000]
  --iters N                    timed ends per impl and combination (after 3 warm-up ends) [50]
  --cleanup-timeout-ms N       the library's Config::cleanup_timeout (story AC6: 2000) [2000]
  --max-connections N          the library's Config::max_connections (pool size) [8]

Every --background x --locks pair gets its own fresh database; all
combinations (and both impls) are timed in one interleaved loop, so that
load on the machine falls on all of them alike.

modes (default: time ends, one JSON line per impl and combination):
  --concurrency N              throughput: end --sessions sessions serially, then with N tasks
  --instances I                --concurrency: spread the N tasks over I managers on one store
                               (as I processes of an app), each impl on each manager's pool [1]
  --sessions N                 sessions per throughput phase; with --prune, ended
                               sessions to prune (the issue's figure: 100000) [1000]
  --rounds N                   throughput rounds (serial + concurrent phase each) [3]
  --acquire                    time acquire_lock instead of end_session, beside the
                               one-statement floor (an INSERT … RETURNING) on the same pool
  --lockload C,I               acquire + release pairs on distinct resources from C clients
                               over I managers on one store, beside the raw-SQL floor
                               (INSERT … RETURNING, then UPDATE) at the same concurrency
                               and the library's one-client figure; medians of 3 runs
  --lockload-seconds N         how long each --lockload run lasts [3]
  --handoff                    time a lock's hand-over to a waiting acquire (LockOptions::wait):
                               in one process, to a second manager on the same database,
                               and a queue of 16 waiters draining against uncontended pairs;
                               --iters of each case, after 3 warm-up ones
  --watch                      time the change feed (SessionManager::watch): delivery of an
                               end's event in one process and to a second manager (--iters
                               each, after 3 warm-up ones), and a feed keeping up with a
                               writer of --watch-rate events/s for --watch-seconds
  --dashboard                  time the dashboard (demiarch-sessions serve, from
                               $DEMIARCH_SESSIONS_BIN or target/release/demiarch-sessions):
                               its pages and /api/v1/sessions over --background sessions,
                               and the live stream's delivery of an end
  --watch-rate N               events per second the --watch writer appends [5000]
  --watch-seconds N            how long the --watch writer runs [3]
  --prune                      time SessionManager::prune over --sessions ended sessions
                               (2 agents, 5 locks, 1 KiB context) against raw SQL deletes,
                               and --iters ends before and during it; on sqlite-wal, the
                               file's size after 10 000 sessions, pruned, and 10 000 more
  --lock-lost                  time SessionManager::lock_lost: from a release's return to the
                               watch's resolution, in one process and on a second manager
                               (--iters each, after 3 warm-up ones)
  --batch N[,N...]             --prune: RetentionPolicy::batch, one pair of lines each [1000]
  --explain                    print the query plan of every statement of both ends
  --wal-pages                  sqlite-wal: pages each end writes to the WAL, per table/index
  --chart OUT.svg --from FILE  draw median end latency against locks from JSON lines

server backends read TEST_POSTGRES_URL / TEST_MYSQL_URL and create (then drop)
a fresh database there; build with --features postgres,mysql.";

fn parse_backend(s: &str) -> Result<BackendKind, Box<dyn Error>> {
    Ok(match s {
        "sqlite-memory" => BackendKind::SqliteMemory,
        "sqlite-wal" => BackendKind::SqliteWal,
        "postgres" => BackendKind::Postgres,
        "mysql" => BackendKind::MySql,
        other => return Err(format!("unknown --backend {other:?}\n\n{USAGE}").into()),
    })
}

/// Which implementation of the end is timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Impl {
    /// The library: `SessionManager::end_session`.
    Orm,
    /// The story's seed SQL run verbatim through sqlx (see raw_seed.rs).
    RawSeed,
    /// The seed's SQL plus the durable work the library's end adds (see
    /// raw_seed.rs): what the library's end costs written by hand.
    RawFull,
}

impl Impl {
    pub fn name(self) -> &'static str {
        match self {
            Self::Orm => "orm",
            Self::RawSeed => "raw-seed",
            Self::RawFull => "raw-full",
        }
    }
}

#[derive(Clone, Debug)]
pub enum Mode {
    End,
    Throughput {
        concurrency: usize,
        instances: usize,
        sessions: usize,
        rounds: usize,
    },
    Acquire,
    Handoff,
    Watch,
    Dashboard,
    Prune,
    LockLost,
    LockLoad {
        clients: usize,
        instances: usize,
        seconds: u64,
    },
    Explain,
    WalPages,
    Chart {
        out: PathBuf,
        from: PathBuf,
    },
}

#[derive(Clone, Debug)]
pub struct Args {
    pub backend: BackendKind,
    pub impls: Vec<Impl>,
    pub locks: Vec<u64>,
    pub context_bytes: Vec<usize>,
    pub background: Vec<u64>,
    pub iters: usize,
    /// `Config::cleanup_timeout` for the manager under test.
    pub cleanup_timeout_ms: u64,
    /// `Config::max_connections` for the manager under test.
    pub max_connections: u32,
    /// `--watch`: the writer's events per second, and how long it runs.
    pub watch_rate: u64,
    pub watch_seconds: u64,
    /// `--prune`: ended sessions, and the batch sizes to try.
    pub sessions: usize,
    pub prune_batches: Vec<u32>,
    pub mode: Mode,
}

fn number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, Box<dyn Error>> {
    value
        .replace('_', "")
        .parse()
        .map_err(|_| format!("{flag} expects a number, got {value:?}").into())
}

fn list<T: std::str::FromStr>(flag: &str, value: &str) -> Result<Vec<T>, Box<dyn Error>> {
    value.split(',').map(|v| number(flag, v.trim())).collect()
}

impl Args {
    pub fn parse(mut argv: impl Iterator<Item = String>) -> Result<Self, Box<dyn Error>> {
        let mut backend = None;
        let mut impls = vec![Impl::Orm];
        let mut locks = vec![100];
        let mut context_bytes = vec![1024];
        let mut background = vec![1000];
        let mut iters = 50;
        let mut cleanup_timeout_ms = 2000;
        let mut max_connections = Config::default().max_connections;
        let mut concurrency = None;
        let mut instances = 1;
        let mut sessions = 1000;
        let mut rounds = 3;
        let mut acquire = false;
        let mut handoff = false;
        let mut watch = false;
        let mut dashboard = false;
        let mut prune = false;
        let mut lock_lost = false;
        let mut lockload: Option<(usize, usize)> = None;
        let mut lockload_seconds = 3;
        let mut prune_batches = vec![1000];
        let mut watch_rate = 5000;
        let mut watch_seconds = 3;
        let mut explain = false;
        let mut wal_pages = false;
        let mut chart = None;
        let mut from = None;
        while let Some(flag) = argv.next() {
            let mut value = || {
                argv.next()
                    .ok_or_else(|| format!("{flag} needs a value\n\n{USAGE}"))
            };
            match flag.as_str() {
                "--backend" => backend = Some(parse_backend(&value()?)?),
                "--impl" => {
                    impls = match value()?.as_str() {
                        "orm" => vec![Impl::Orm],
                        "raw-seed" => vec![Impl::RawSeed],
                        "raw-full" => vec![Impl::RawFull],
                        "both" => vec![Impl::Orm, Impl::RawSeed],
                        "all" => vec![Impl::Orm, Impl::RawSeed, Impl::RawFull],
                        other => return Err(format!("unknown --impl {other:?}\n\n{USAGE}").into()),
                    }
                }
                "--locks" => locks = list("--locks", &value()?)?,
                "--context-bytes" => context_bytes = list("--context-bytes", &value()?)?,
                "--background" => background = list("--background", &value()?)?,
                "--iters" => iters = number("--iters", &value()?)?,
                "--max-connections" => max_connections = number("--max-connections", &value()?)?,
                "--cleanup-timeout-ms" => {
                    cleanup_timeout_ms = number("--cleanup-timeout-ms", &value()?)?
                }
                "--concurrency" => concurrency = Some(number("--concurrency", &value()?)?),
                "--instances" => instances = number("--instances", &value()?)?,
                "--sessions" => sessions = number("--sessions", &value()?)?,
                "--rounds" => rounds = number("--rounds", &value()?)?,
                "--acquire" => acquire = true,
                "--handoff" => handoff = true,
                "--watch" => watch = true,
                "--dashboard" => dashboard = true,
                "--prune" => prune = true,
                "--lock-lost" => lock_lost = true,
                "--lockload" => {
                    let v: Vec<usize> = list("--lockload", &value()?)?;
                    match v[..] {
                        [c, i] if c > 0 && i > 0 => lockload = Some((c, i)),
                        _ => {
                            return Err(format!(
                                "--lockload expects CLIENTS,INSTANCES, both at least 1\n\n{USAGE}"
                            )
                            .into())
                        }
                    }
                }
                "--lockload-seconds" => lockload_seconds = number("--lockload-seconds", &value()?)?,
                "--batch" => prune_batches = list("--batch", &value()?)?,
                "--watch-rate" => watch_rate = number("--watch-rate", &value()?)?,
                "--watch-seconds" => watch_seconds = number("--watch-seconds", &value()?)?,
                "--explain" => explain = true,
                "--wal-pages" => wal_pages = true,
                "--chart" => chart = Some(PathBuf::from(value()?)),
                "--from" => from = Some(PathBuf::from(value()?)),
                "-h" | "--help" => return Err(USAGE.into()),
                other => return Err(format!("unknown argument {other:?}\n\n{USAGE}").into()),
            }
        }
        let other_mode = chart.is_some()
            || from.is_some()
            || concurrency.is_some()
            || acquire
            || handoff
            || explain
            || wal_pages;
        let lockload_mode = lockload.is_some();
        if [watch, dashboard, prune, lock_lost, lockload_mode]
            .iter()
            .filter(|m| **m)
            .count()
            + usize::from(other_mode)
            > 1
            && (watch || dashboard || prune || lock_lost || lockload_mode)
        {
            return Err(format!(
                "choose one mode: --watch, --dashboard, --prune, --lock-lost and --lockload go alone\n\n{USAGE}"
            )
            .into());
        }
        let mode = match (chart, from, concurrency, acquire, handoff, explain, wal_pages) {
            _ if watch => Mode::Watch,
            _ if dashboard => Mode::Dashboard,
            _ if prune => Mode::Prune,
            _ if lock_lost => Mode::LockLost,
            _ if lockload.is_some() => {
                let (clients, instances) = lockload.unwrap_or((1, 1));
                Mode::LockLoad {
                    clients,
                    instances,
                    seconds: lockload_seconds.max(1),
                }
            }
            (Some(out), Some(from), None, false, false, false, false) => Mode::Chart { out, from },
            (Some(_), None, ..) | (None, Some(_), ..) => {
                return Err(format!("--chart and --from go together\n\n{USAGE}").into())
            }
            (None, None, Some(concurrency), false, false, false, false) if concurrency > 0 => {
                Mode::Throughput {
                    concurrency,
                    instances: instances.max(1),
                    sessions,
                    rounds: rounds.max(1),
                }
            }
            (None, None, None, true, false, false, false) => Mode::Acquire,
            (None, None, None, false, true, false, false) => Mode::Handoff,
            (None, None, None, false, false, true, false) => Mode::Explain,
            (None, None, None, false, false, false, true) => Mode::WalPages,
            (None, None, None, false, false, false, false) => Mode::End,
            _ => {
                return Err(format!(
                    "choose one mode: --concurrency N (N > 0), --acquire, --handoff, --watch, --explain, --wal-pages or --chart\n\n{USAGE}"
                )
                .into())
            }
        };
        let backend = match (&mode, backend) {
            (_, Some(b)) => b,
            // A chart reads results only.
            (Mode::Chart { .. }, None) => BackendKind::SqliteMemory,
            (_, None) => return Err(format!("--backend is required\n\n{USAGE}").into()),
        };
        if iters == 0 {
            return Err("--iters must be at least 1".into());
        }
        if locks.is_empty() || context_bytes.is_empty() || background.is_empty() {
            return Err("--locks, --context-bytes and --background need a value".into());
        }
        Ok(Self {
            backend,
            impls,
            locks,
            context_bytes,
            background,
            iters,
            cleanup_timeout_ms,
            max_connections,
            watch_rate,
            watch_seconds,
            sessions,
            prune_batches,
            mode,
        })
    }
}
