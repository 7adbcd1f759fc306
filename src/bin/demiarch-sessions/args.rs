//! The command line, as clap derive types, and the database URL it resolves to.
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use demiarch_sessions::SessionStatus;

/// The database used when neither `--database-url` nor `DATABASE_URL` is given.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://demiarch-sessions.db";

/// The help heading of the options every command takes.
const GLOBAL: &str = "Global options";

/// Shown at the end of `--help`: what scripts can rely on.
const AFTER_LONG_HELP: &str = "\
Database:
  --database-url, else DATABASE_URL, else ./demiarch-sessions.db (SQLite, created
  and migrated on first use). A plain path such as `data/sessions.db` is a SQLite
  file; postgres:// and mysql:// URLs need a build with those features.
  Commands that only read (sessions list/show, locks list/waiters, audit tail,
  prune --dry-run, serve --read-only) open an existing store read-only: they
  migrate and write nothing, so they work on a read-only file or mount, and
  need a store at the latest schema (any other command migrates it). A SQLite
  URL with ?mode=ro opens every command read-only; writes then exit 2.

Ids:
  A session id may be given in full or as a unique prefix of 8 or more hex
  digits, like a git hash.

Output:
  Aligned tables for people; --json prints one JSON document on stdout (an
  array for lists, an object otherwise; audit tail --follow: one JSON object
  per line). Errors are one line on stderr.

Exit codes:
  0  success
  1  internal error: an unexpected database failure or a malformed stored row
  2  invalid input: bad arguments, a malformed id, an ambiguous id prefix, a write
     to a store opened read-only
  3  not found: no session has that id or id prefix
  4  timeout: the database stayed busy past the budget; nothing changed, retry
  5  database unreachable: cannot open or connect, not a database, schema too new,
     or (read-only) not migrated to the latest schema
  6  conflict: the state of a session or lock forbids it (e.g. its owner is still
     alive, the resource is held, waiting would deadlock), or another prune runs
  7  compacted: audit events after the --after given were pruned; the message
     names the seq to resume after
  8  archive: the prune archive file cannot be written; nothing more was deleted
  9  address in use: serve cannot listen on --listen (taken by another program)";

/// The operator CLI of the demiarch session store.
#[derive(Debug, Parser)]
#[command(
    name = "demiarch-sessions",
    version,
    about = "Inspect and operate the demiarch session store: sessions, agents, locks, audit log.",
    long_about = "Inspect and operate the demiarch session store: sessions, the agents in \
                  them, the resource locks they hold and the append-only audit log.\n\n\
                  New here? Run `demiarch-sessions demo`, then `demiarch-sessions sessions list`.",
    after_long_help = AFTER_LONG_HELP,
    propagate_version = true
)]
pub struct Cli {
    /// Database URL (sqlite://path.db, postgres://…, mysql://…) or a SQLite file path.
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        hide_env_values = true,
        value_name = "URL",
        help_heading = GLOBAL
    )]
    pub database_url: Option<String>,

    /// Print one JSON document on stdout instead of tables (with
    /// `audit tail --follow`, one JSON object per line).
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub json: bool,

    /// Budget for ending a session, whole transaction included; past it
    /// nothing changes and the exit code is 4.
    #[arg(long, global = true, help_heading = GLOBAL, value_name = "DURATION", default_value = "2s", value_parser = positive_duration)]
    pub cleanup_timeout: Duration,

    /// How long a SQLite statement waits for another writer before giving up.
    #[arg(long, global = true, help_heading = GLOBAL, value_name = "DURATION", default_value = "5s", value_parser = positive_duration)]
    pub busy_timeout: Duration,

    /// How long to wait for the database to open (and migrate) before giving up
    /// with exit code 5.
    #[arg(long, global = true, help_heading = GLOBAL, value_name = "DURATION", default_value = "10s", value_parser = positive_duration)]
    pub connect_timeout: Duration,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one session end to end (agents, locks, context), end it and show
    /// the report. Start here.
    Demo,
    /// List, inspect and end sessions.
    #[command(subcommand)]
    Sessions(SessionsCommand),
    /// List resource locks and their queues, and release stale ones.
    #[command(subcommand)]
    Locks(LocksCommand),
    /// Finish agents.
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// Interrupt open sessions whose owning process stopped heartbeating
    /// (it crashed): their locks are released and running agents cancelled.
    Recover {
        /// How long without a heartbeat makes a session stale. Keep it several
        /// times the owners' heartbeat interval (10s by default).
        #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = positive_duration)]
        stale_after: Duration,
    },
    /// Read the append-only audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Delete ended sessions, clear old saved contexts and compact the audit
    /// log, in short batches. Open sessions are never touched.
    Prune {
        /// Delete sessions completed or interrupted longer ago than this
        /// (with their agents, locks and waiters).
        #[arg(long, value_name = "AGE", value_parser = age)]
        completed_after: Option<Duration>,
        /// Clear the saved context of sessions ended longer ago than this,
        /// keeping their rows.
        #[arg(long, value_name = "AGE", value_parser = age)]
        context_after: Option<Duration>,
        /// Delete audit rows older than this (not those of open sessions);
        /// feeds from before them are told (`audit tail --after`: exit 7).
        #[arg(long, value_name = "AGE", value_parser = age)]
        audit_after: Option<Duration>,
        /// Keep the N most recently ended sessions whatever their age.
        #[arg(long, value_name = "N")]
        keep_last: Option<u64>,
        /// Append what is deleted or cleared to this file as JSON lines,
        /// flushed to disk before each batch commits.
        #[arg(long, value_name = "FILE")]
        archive: Option<std::path::PathBuf>,
        /// Sessions, contexts or audit rows per transaction.
        #[arg(long, value_name = "N", default_value_t = 1000)]
        batch: u32,
        /// Count what would go; delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Serve the operator dashboard and its JSON API (/api/v1/…, /events,
    /// /metrics) until Ctrl-C.
    Serve {
        /// Address to listen on: `PORT` (on 127.0.0.1), `localhost:PORT` or
        /// `IP:PORT`; anything but loopback needs --token.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7878", value_parser = listen_address)]
        listen: std::net::SocketAddr,
        /// Every request must carry it: `Authorization: Bearer TOKEN`, or
        /// the cookie a browser gets by logging in at /login.
        #[arg(
            long,
            value_name = "TOKEN",
            env = "DEMIARCH_DASHBOARD_TOKEN",
            hide_env_values = true
        )]
        token: Option<String>,
        /// Show everything, change nothing: every action is hidden and refused.
        #[arg(long)]
        read_only: bool,
        /// A connection must send a request's headers within this time of
        /// opening, or of its previous response; idle ones close after it.
        #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = positive_duration)]
        header_timeout: Duration,
        /// Connections served at once. At the cap, the oldest one that has
        /// not sent a request yet is closed to make room for a new one.
        #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        max_connections: u32,
    },
}

impl Command {
    /// Whether the command only reads the store, so that it opens it
    /// read-only (`Config::read_only`): the listings, `audit tail`,
    /// `prune --dry-run`, and `serve --read-only`. The serve wrapper can also
    /// ask the manager (`SessionManager::is_read_only`).
    pub fn opens_read_only(&self) -> bool {
        match self {
            Command::Sessions(SessionsCommand::List { .. } | SessionsCommand::Show { .. })
            | Command::Locks(LocksCommand::List { .. } | LocksCommand::Waiters { .. })
            | Command::Audit(AuditCommand::Tail { .. }) => true,
            Command::Prune { dry_run, .. } => *dry_run,
            Command::Serve { read_only, .. } => *read_only,
            Command::Demo
            | Command::Sessions(
                SessionsCommand::End { .. }
                | SessionsCommand::Pause { .. }
                | SessionsCommand::Unpause { .. },
            )
            | Command::Locks(LocksCommand::Sweep | LocksCommand::Release { .. })
            | Command::Agents(AgentsCommand::Finish { .. })
            | Command::Recover { .. } => false,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum SessionsCommand {
    /// Sessions, newest first.
    List {
        /// Only sessions with this status.
        #[arg(long, value_enum)]
        status: Option<StatusArg>,
        /// At most this many sessions.
        #[arg(long, default_value_t = 50, value_parser = positive_count)]
        limit: u64,
    },
    /// One session: its agents, locks, saved context and audit trail.
    Show {
        /// Session id, or a unique prefix of 8 or more hex digits.
        id: String,
    },
    /// End a session with cleanup: save its context, release its locks,
    /// cancel its agents, write the audit record.
    End {
        /// Session id, or a unique prefix of 8 or more hex digits.
        id: String,
        /// End it even though its owning process still heartbeats (that
        /// process's live context windows are then not saved).
        #[arg(long)]
        force: bool,
    },
    /// Pause an active session: it keeps its locks but takes no new agents,
    /// locks or waits (its agents' waits are removed) until unpaused.
    Pause {
        /// Session id, or a unique prefix of 8 or more hex digits.
        id: String,
    },
    /// Make a paused session active again.
    Unpause {
        /// Session id, or a unique prefix of 8 or more hex digits.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum LocksCommand {
    /// Locks, newest grant first.
    List {
        /// Only locks still held.
        #[arg(long)]
        held: bool,
        /// Only the locks of this session (id or unique prefix).
        #[arg(long, value_name = "ID")]
        session: Option<String>,
        /// At most this many locks.
        #[arg(long, default_value_t = 50, value_parser = positive_count)]
        limit: u64,
    },
    /// The agents queued for one resource, next in line first.
    Waiters {
        /// The resource's type, as the lock names it (e.g. `file`).
        #[arg(value_name = "TYPE")]
        resource_type: String,
        /// The resource's key (e.g. `src/main.rs`).
        #[arg(value_name = "KEY")]
        resource_key: String,
    },
    /// Release expired locks and the locks of ended or interrupted sessions.
    Sweep,
    /// Release one lock on its holder's behalf; its waiters are handed it and
    /// a lock_released audit row names the reason.
    Release {
        /// Lock id (the LOCK column of `locks list`), or a unique prefix of
        /// 8 or more hex digits.
        lock_id: String,
        /// Why, in the operator's words (recorded in the audit log).
        #[arg(long, value_name = "TEXT")]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    /// Finish an agent's work: completed, or failed with a reason. Its locks
    /// are released and handed to their waiters at once.
    Finish {
        /// The agent's full id.
        #[arg(value_name = "AGENT_ID")]
        agent_id: uuid::Uuid,
        /// It failed, for this reason (recorded in the audit log).
        #[arg(long, value_name = "REASON")]
        failed: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// The newest audit events, printed oldest first like tail(1); with
    /// --follow, then every new one as it commits, until interrupted.
    Tail {
        /// How many events.
        #[arg(short = 'n', long = "lines", value_name = "N", default_value_t = 20, value_parser = positive_count)]
        lines: u64,
        /// Only the events of this session (id or unique prefix).
        #[arg(long, value_name = "ID")]
        session: Option<String>,
        /// Only events of this type (session_start, session_end,
        /// session_interrupted, session_resumed, locks_swept, lock_released,
        /// session_paused, session_unpaused, agent_finished, sessions_pruned,
        /// audit_compacted, lock_deadlock).
        #[arg(long, value_name = "EVENT")]
        event: Option<String>,
        /// Only events after this seq (the SEQ column; with --json, "seq"):
        /// resume from the last event handled. With --follow, every one of
        /// them, then the new ones; without, the newest N of them.
        #[arg(long, value_name = "SEQ", value_parser = clap::value_parser!(i64).range(0..))]
        after: Option<i64>,
        /// Keep printing events as they commit, from any process or host,
        /// until Ctrl-C; with --json, one JSON object per line.
        #[arg(short = 'f', long)]
        follow: bool,
    },
}

/// `--status` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StatusArg {
    Active,
    Paused,
    Interrupted,
    Completed,
}

impl From<StatusArg> for SessionStatus {
    fn from(status: StatusArg) -> Self {
        match status {
            StatusArg::Active => SessionStatus::Active,
            StatusArg::Paused => SessionStatus::Paused,
            StatusArg::Interrupted => SessionStatus::Interrupted,
            StatusArg::Completed => SessionStatus::Completed,
        }
    }
}

/// A count of at least one.
fn positive_count(text: &str) -> Result<u64, String> {
    match text.trim().parse::<u64>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{text:?} is not a whole number")),
    }
}

/// An age for `prune`: a humantime duration (`30d`, `12h`), zero included.
fn age(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{e} (write an age such as 30d, 12h or 90m)"))
}

/// A humantime duration (`200ms`, `5m`, `1h 30m`) greater than zero.
fn positive_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text)
        .map_err(|e| format!("{e} (write a duration such as 500ms, 30s or 5m)"))?;
    if duration.is_zero() {
        return Err("must be longer than zero".to_owned());
    }
    Ok(duration)
}

const SCHEMES: [&str; 5] = ["sqlite:", "postgres:", "postgresql:", "mysql:", "mariadb:"];

/// The URL to connect to: the given one, a plain path as a SQLite file, or
/// the default.
pub fn database_url(given: Option<&str>) -> String {
    match given.map(str::trim).filter(|u| !u.is_empty()) {
        None => DEFAULT_DATABASE_URL.to_owned(),
        Some(url) if SCHEMES.iter().any(|s| url.starts_with(s)) || url.contains("://") => {
            url.to_owned()
        }
        Some(path) => format!("sqlite://{path}"),
    }
}

/// Whether `url` names a SQLite file that does not exist yet (an in-memory
/// database counts as missing): opening it read-only would find no store.
pub fn sqlite_store_missing(url: &str) -> bool {
    if !url.starts_with("sqlite:") {
        return false;
    }
    if url.contains(":memory:") || url.contains("mode=memory") {
        return true;
    }
    #[cfg(feature = "sqlite")]
    {
        match url.parse::<sea_orm::sqlx::sqlite::SqliteConnectOptions>() {
            Ok(options) => !options.get_filename().exists(),
            // The connect reports the malformed URL.
            Err(_) => false,
        }
    }
    #[cfg(not(feature = "sqlite"))]
    false
}

/// The URL with any password replaced, fit for messages.
pub fn redacted(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if !scheme.starts_with("sqlite") {
            if let Some((auth, host)) = rest.split_once('@') {
                if let Some((user, _password)) = auth.split_once(':') {
                    return format!("{scheme}://{user}:***@{host}");
                }
            }
        }
    }
    url.to_owned()
}

/// `7980`, `localhost:7980`, `127.0.0.1:7980` or `[::1]:7980`.
fn listen_address(text: &str) -> Result<std::net::SocketAddr, String> {
    let text = text.trim();
    if let Ok(port) = text.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    if let Some(port) = text.strip_prefix("localhost:") {
        return port
            .parse::<u16>()
            .map(|port| std::net::SocketAddr::from(([127, 0, 0, 1], port)))
            .map_err(|_| format!("{port:?} is not a port (0 to 65535)"));
    }
    text.parse().map_err(|_| {
        format!("{text:?} is not PORT, localhost:PORT or IP:PORT (such as 127.0.0.1:7878)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(database_url(None), DEFAULT_DATABASE_URL);
        assert_eq!(database_url(Some("")), DEFAULT_DATABASE_URL);
        assert_eq!(database_url(Some("foo.db")), "sqlite://foo.db");
        assert_eq!(database_url(Some("/tmp/x.db")), "sqlite:///tmp/x.db");
        assert_eq!(database_url(Some("sqlite::memory:")), "sqlite::memory:");
        assert_eq!(database_url(Some("postgres://u@h/d")), "postgres://u@h/d");
        assert_eq!(redacted("postgres://u:secret@h/d"), "postgres://u:***@h/d");
        assert_eq!(redacted("sqlite://a.db"), "sqlite://a.db");
    }

    #[test]
    fn durations() {
        assert_eq!(positive_duration("200ms"), Ok(Duration::from_millis(200)));
        assert!(positive_duration("0s").is_err());
        assert!(positive_duration("soon").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
