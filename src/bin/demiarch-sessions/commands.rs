//! The commands: each reads or changes the store through `SessionManager`
//! and returns what to print on stdout.
use std::time::Duration;

use chrono::{DateTime, Utc};
use demiarch_sessions::views::{
    AuditPage, AuditQuery, LocksPage, LocksQuery, SessionView, SessionsPage, SessionsQuery, Views,
};
use demiarch_sessions::{
    AgentOutcome, AuditEvent, AuditFilter, AuditRecord, Config, Listing, LockFilter, Operator,
    RetentionPolicy, SessionInfo, SessionManager, SessionStatus,
};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::args::{self, AgentsCommand, AuditCommand, Cli, Command, LocksCommand, SessionsCommand};
use crate::exit::{Failure, CONFLICT, INVALID_INPUT, NOT_FOUND, UNREACHABLE};
use crate::output::{self, count, short, Spinner};
use crate::render;

/// An open session whose owner heartbeated this recently is taken to be
/// alive: three of the default heartbeat intervals (10 s).
pub const ALIVE_WITHIN: Duration = demiarch_sessions::views::ALIVE_WITHIN;
/// The silence after which `sessions` flags an open session stale, as
/// `recover`'s default `--stale-after`.
const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(300);

/// The rows a list read could read; each row it could not is named in a
/// warning on stderr.
pub fn readable<T>(listing: Listing<T>) -> Vec<T> {
    for row in &listing.corrupt {
        eprintln!("warning: skipped a stored row: {row}");
    }
    listing.rows
}

/// Opens the database and runs the command; the result is stdout's text.
pub async fn run(cli: Cli) -> Result<String, Failure> {
    let url = args::database_url(cli.database_url.as_deref());
    let shown = args::redacted(&url);
    backend_compiled_in(&url, &shown)?;
    let mut config = Config {
        cleanup_timeout: cli.cleanup_timeout,
        busy_timeout: cli.busy_timeout,
        // Reads open an existing store read-only; a missing SQLite file is
        // created (and migrated) as on every first use.
        read_only: cli.command.opens_read_only() && !args::sqlite_store_missing(&url),
        ..Config::default()
    };
    if matches!(cli.command, Command::Serve { .. }) {
        // The live stream should show a commit made by another process on
        // a SQLite file (or another MariaDB instance) well within 100 ms.
        config.watch_poll_interval = crate::serve::WATCH_POLL;
    }
    let connect = SessionManager::connect_with(&url, config);
    let manager = match tokio::time::timeout(cli.connect_timeout, connect).await {
        Ok(Ok(manager)) => manager,
        Ok(Err(e)) => return Err(Failure::connect(&shown, e)),
        Err(_) => {
            return Err(Failure::new(
                UNREACHABLE,
                format!(
                    "the database {shown} did not answer within {}; check that it is up \
                     or raise --connect-timeout",
                    output::span(cli.connect_timeout)
                ),
            ))
        }
    };
    let ctx = Ctx {
        manager,
        json: cli.json,
        now: Utc::now(),
        url: shown,
        operator: None,
    };
    match cli.command {
        Command::Demo => crate::demo::run(&ctx).await,
        Command::Sessions(SessionsCommand::List { status, limit }) => {
            ctx.sessions_list(status.map(Into::into), limit).await
        }
        Command::Sessions(SessionsCommand::Show { id }) => ctx.sessions_show(&id).await,
        Command::Sessions(SessionsCommand::End { id, force }) => ctx.sessions_end(&id, force).await,
        Command::Sessions(SessionsCommand::Pause { id }) => ctx.sessions_pause(&id, true).await,
        Command::Sessions(SessionsCommand::Unpause { id }) => ctx.sessions_pause(&id, false).await,
        Command::Locks(LocksCommand::List {
            held,
            session,
            limit,
        }) => ctx.locks_list(held, session.as_deref(), limit).await,
        Command::Locks(LocksCommand::Waiters {
            resource_type,
            resource_key,
        }) => ctx.locks_waiters(&resource_type, &resource_key).await,
        Command::Locks(LocksCommand::Sweep) => ctx.locks_sweep().await,
        Command::Locks(LocksCommand::Release { lock_id, reason }) => {
            ctx.locks_release(&lock_id, reason).await
        }
        Command::Recover { stale_after } => ctx.recover(stale_after).await,
        Command::Agents(AgentsCommand::Finish { agent_id, failed }) => {
            ctx.agents_finish(agent_id, failed).await
        }
        Command::Prune {
            completed_after,
            context_after,
            audit_after,
            keep_last,
            archive,
            batch,
            dry_run,
        } => {
            let policy = RetentionPolicy {
                completed_after,
                context_after,
                audit_after,
                keep_last,
                batch,
                archive,
            };
            ctx.prune(&policy, dry_run).await
        }
        Command::Serve {
            listen,
            token,
            read_only,
            header_timeout,
            max_connections,
        } => {
            let options = crate::serve::Options {
                listen,
                token,
                read_only,
                limits: demiarch_sessions::web::Limits {
                    header_timeout,
                    max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
                },
            };
            crate::serve::run(ctx, options).await
        }
        Command::Audit(AuditCommand::Tail {
            lines,
            session,
            event,
            after,
            follow,
        }) => {
            let tail = Tail {
                lines,
                session: session.as_deref(),
                event: event.as_deref(),
                after,
            };
            match follow {
                true => crate::follow::run(&ctx, tail).await,
                false => ctx.audit_tail(tail).await,
            }
        }
    }
}

/// Refuses a URL whose backend this build cannot open, before connecting.
fn backend_compiled_in(url: &str, shown: &str) -> Result<(), Failure> {
    let missing = if url.starts_with("postgres") {
        (!cfg!(feature = "postgres")).then_some(("PostgreSQL", "postgres"))
    } else if url.starts_with("mysql") || url.starts_with("mariadb") {
        (!cfg!(feature = "mysql")).then_some(("MySQL/MariaDB", "mysql"))
    } else if url.starts_with("sqlite") {
        (!cfg!(feature = "sqlite")).then_some(("SQLite", "sqlite"))
    } else {
        None
    };
    match missing {
        Some((name, feature)) => Err(Failure::new(
            INVALID_INPUT,
            format!(
                "this build cannot open {name} databases ({shown}); rebuild with \
                 `--features {feature}`"
            ),
        )),
        None => Ok(()),
    }
}

/// What `audit tail` reads.
pub struct Tail<'a> {
    pub lines: u64,
    pub session: Option<&'a str>,
    pub event: Option<&'a str>,
    pub after: Option<i64>,
}

/// What every command works with.
pub struct Ctx {
    pub manager: SessionManager,
    pub json: bool,
    /// The time relative ages are measured from.
    pub now: DateTime<Utc>,
    /// The database URL, password redacted.
    pub url: String,
    /// Who asks, when it is an operator on someone's behalf (the dashboard):
    /// ends and recoveries name it in their audit rows.
    pub operator: Option<Operator>,
}

impl Ctx {
    /// The session named by a full id or a unique prefix of 8+ hex digits.
    pub async fn resolve(&self, id: &str) -> Result<Uuid, Failure> {
        self.manager
            .find_session(id)
            .await
            .map_err(|e| Failure::during(&format!("looking up session {id}"), e))
    }

    /// Why a session given by its full id is missing, when an audit row
    /// still tells that it existed: a prune deleted it.
    async fn pruned(&self, id: &str) -> Option<Failure> {
        let id = Uuid::parse_str(id.trim()).ok()?;
        let last = self
            .manager
            .audit_events(AuditFilter {
                session_id: Some(id),
                limit: Some(1),
                ..AuditFilter::default()
            })
            .await
            .ok()?
            .rows
            .pop()?;
        Some(Failure::new(
            NOT_FOUND,
            format!(
                "session {id} was pruned: its rows are gone, its audit rows remain (the last: \
                 {} at {}, seq {})",
                last.event_type,
                output::time_ago(last.event_time, self.now),
                last.seq
            ),
        ))
    }

    async fn session(&self, id: Uuid) -> Result<SessionInfo, Failure> {
        self.manager
            .session(id)
            .await
            .map_err(|e| Failure::during(&format!("reading session {id}"), e))
    }

    /// The views of the store, with the default recovery threshold.
    fn views(&self) -> Views<'_> {
        Views::new(&self.manager, DEFAULT_STALE_AFTER)
    }

    pub async fn sessions_list(
        &self,
        status: Option<SessionStatus>,
        limit: u64,
    ) -> Result<String, Failure> {
        let query = SessionsQuery {
            status,
            ..SessionsQuery::default()
        };
        let page: SessionsPage = self
            .views()
            .up_to(query, limit)
            .await
            .map_err(|e| Failure::during("listing sessions", e))?;
        match self.json {
            true => output::json(&page),
            false => Ok(render::sessions(&page, status, &self.url, limit)),
        }
    }

    pub async fn sessions_show(&self, id: &str) -> Result<String, Failure> {
        let id = match self.resolve(id).await {
            Err(missing) if missing.code == NOT_FOUND => {
                return Err(self.pruned(id).await.unwrap_or(missing))
            }
            found => found?,
        };
        let detail = self
            .views()
            .session(id)
            .await
            .map_err(|e| Failure::during(&format!("reading session {id}"), e))?;
        match self.json {
            true => output::json(&detail),
            false => Ok(render::session(&detail)),
        }
    }

    pub async fn sessions_pause(&self, id: &str, pause: bool) -> Result<String, Failure> {
        let id = self.resolve(id).await?;
        let before = self.session(id).await?.status;
        let (verb, done) = match pause {
            true => ("pausing", SessionStatus::Paused),
            false => ("unpausing", SessionStatus::Active),
        };
        let doing = format!("{verb} session {id}");
        match (pause, &self.operator) {
            (true, Some(op)) => self.manager.pause_session_by(id, op).await,
            (true, None) => self.manager.pause_session(id).await,
            (false, Some(op)) => self.manager.unpause_session_by(id, op).await,
            (false, None) => self.manager.unpause_session(id).await,
        }
        .map_err(|e| Failure::during(&doing, e))?;
        let info = self.session(id).await?;
        if self.json {
            return output::json(&info);
        }
        Ok(match before == done {
            true => format!("Session {id} was already {done}; nothing was changed.\n"),
            false => format!("Session {id} is {}.\n", info.status),
        })
    }

    pub async fn sessions_end(&self, id: &str, force: bool) -> Result<String, Failure> {
        let id = self.resolve(id).await?;
        let info = SessionView::new(self.session(id).await?, self.now, DEFAULT_STALE_AFTER);
        if !force && info.alive {
            let beat = info
                .last_heartbeat_at
                .map(|at| output::ago(at, self.now))
                .unwrap_or_default();
            return Err(Failure::new(
                CONFLICT,
                format!(
                    "session {id} is {} and its owning process heartbeated {beat}: its live \
                     context windows are there and would not be saved; let that process end \
                     it, or pass --force",
                    info.status
                ),
            ));
        }
        let report = match &self.operator {
            Some(operator) => self.manager.end_session_by(id, operator).await,
            None => self.manager.end_session(id).await,
        }
        .map_err(|e| Failure::during(&format!("ending session {id}"), e))?;
        if self.json {
            return output::json(&report);
        }
        if report.already_ended {
            return Ok(format!(
                "Session {id} was already ended at {}; nothing changed.\n",
                output::time(report.completed_at)
            ));
        }
        let mut text = format!(
            "Ended session {id} in {}.\n",
            output::millis(report.cleanup_ms)
        );
        text.push_str(&output::fields([
            ("Completed at", output::time(report.completed_at)),
            ("Locks released", report.locks_released.to_string()),
            ("Agents cancelled", report.agents_cancelled.to_string()),
            (
                "Context saved",
                format!(
                    "{}, {} bytes",
                    count(report.context_windows, "window"),
                    report.context_bytes
                ),
            ),
        ]));
        text.push('\n');
        Ok(text)
    }

    pub async fn locks_list(
        &self,
        held: bool,
        session: Option<&str>,
        limit: u64,
    ) -> Result<String, Failure> {
        let session = match session {
            Some(id) => Some(self.resolve(id).await?),
            None => None,
        };
        let query = LocksQuery {
            held: Some(held),
            session,
            ..LocksQuery::default()
        };
        let page: LocksPage = self
            .views()
            .up_to(query, limit)
            .await
            .map_err(|e| Failure::during("listing locks", e))?;
        match self.json {
            true => output::json(&page),
            false => Ok(render::locks(&page, held, session, limit)),
        }
    }

    async fn locks_waiters(
        &self,
        resource_type: &str,
        resource_key: &str,
    ) -> Result<String, Failure> {
        let doing = format!("reading the queue of {resource_type}/{resource_key}");
        let queue = self
            .views()
            .queue(resource_type, resource_key)
            .await
            .map_err(|e| Failure::during(&doing, e))?;
        match self.json {
            true => output::json(&queue),
            false => Ok(render::queue(&queue)),
        }
    }

    async fn agents_finish(
        &self,
        agent_id: Uuid,
        failed: Option<String>,
    ) -> Result<String, Failure> {
        let outcome = match failed {
            Some(reason) => AgentOutcome::Failed { reason },
            None => AgentOutcome::Completed,
        };
        let report = self
            .manager
            .finish_agent(agent_id, outcome)
            .await
            .map_err(|e| Failure::during(&format!("finishing agent {agent_id}"), e))?;
        if self.json {
            return output::json(&report);
        }
        Ok(match report.already_finished {
            true => format!(
                "Agent {agent_id} had already finished ({}); nothing was changed.\n",
                report.status
            ),
            false => format!(
                "Agent {agent_id} {}: released {} (an agent_finished audit row records it).\n",
                report.status,
                count(report.locks_released, "lock"),
            ),
        })
    }

    async fn locks_release(&self, lock_id: &str, reason: String) -> Result<String, Failure> {
        let id = self
            .manager
            .find_lock(lock_id)
            .await
            .map_err(|e| Failure::during(&format!("looking up lock {lock_id}"), e))?;
        let operator = match &self.operator {
            Some(operator) => Operator {
                reason: Some(reason),
                ..operator.clone()
            },
            None => Operator {
                via: "cli".into(),
                reason: Some(reason),
            },
        };
        let doing = format!("releasing lock {id}");
        let lookup = |m: &SessionManager| {
            let m = m.clone();
            async move {
                let found = m
                    .locks(LockFilter {
                        lock_id: Some(id),
                        ..LockFilter::default()
                    })
                    .await;
                found.map(|locks| readable(locks).pop())
            }
        };
        let before = lookup(&self.manager)
            .await
            .map_err(|e| Failure::during(&doing, e))?;
        self.manager
            .release_lock_by(id, &operator)
            .await
            .map_err(|e| Failure::during(&doing, e))?;
        let after = lookup(&self.manager)
            .await
            .map_err(|e| Failure::during(&doing, e))?;
        if self.json {
            return output::json(&after);
        }
        let Some(lock) = after else {
            return Err(Failure::new(NOT_FOUND, format!("lock {id} not found")));
        };
        let was_held = before.is_some_and(|l| l.released_at.is_none());
        Ok(match was_held {
            true => format!(
                "Released lock {} ({}/{}, fencing token {}); its waiters are handed it and a \
                 lock_released audit row names the reason.\n",
                short(id),
                lock.resource_type,
                lock.resource_key,
                lock.fencing_token
            ),
            false => format!(
                "Lock {} was already released ({}); nothing was changed.\n",
                short(id),
                lock.release_reason.map_or("released", |r| r.as_str())
            ),
        })
    }

    async fn locks_sweep(&self) -> Result<String, Failure> {
        let report = {
            let _spinner = Spinner::start("sweeping stale locks");
            self.manager
                .sweep_locks()
                .await
                .map_err(|e| Failure::during("sweeping locks", e))?
        };
        if self.json {
            return output::json(&report);
        }
        let released = report.expired + report.orphaned;
        if released == 0 {
            return Ok(
                "Nothing to sweep: no held lock has expired or outlived its session.\n".into(),
            );
        }
        let mut text = format!(
            "Released {}: {} expired, {} orphaned, in {} (each wrote a locks_swept audit row).\n",
            count(released, "lock"),
            report.expired,
            report.orphaned,
            count(report.batches, "transaction"),
        );
        text.push_str("See them: demiarch-sessions audit tail --event locks_swept\n");
        Ok(text)
    }

    pub async fn recover(&self, stale_after: Duration) -> Result<String, Failure> {
        if stale_after < ALIVE_WITHIN {
            warn(&format!(
                "--stale-after {} is short: sessions of live processes that heartbeat less \
                 often are interrupted too",
                output::span(stale_after)
            ));
        }
        let report = {
            let _spinner = Spinner::start("recovering stale sessions");
            match &self.operator {
                Some(operator) => self.manager.recover_stale_by(stale_after, operator).await,
                None => self.manager.recover_stale(stale_after).await,
            }
            .map_err(|e| Failure::during("recovering stale sessions", e))?
        };
        if self.json {
            return output::json(&report);
        }
        let silent = output::span(stale_after);
        if report.interrupted.is_empty() {
            return Ok(format!(
                "No stale sessions: every open session heartbeated within the last {silent}.\n"
            ));
        }
        let mut text = format!(
            "Interrupted {} silent for over {silent}: {} released, {} cancelled.\n",
            count(report.interrupted.len() as u64, "session"),
            count(report.locks_released, "lock"),
            count(report.agents_cancelled, "agent"),
        );
        let mut table = output::table(["SESSION", "STARTED", "LAST HEARTBEAT"]);
        for id in &report.interrupted {
            let info = self.session(*id).await?;
            table.add_row(vec![
                id.to_string(),
                output::time_ago(info.started_at, self.now),
                info.last_heartbeat_at
                    .map(|at| output::time_ago(at, self.now))
                    .unwrap_or_else(|| "never".into()),
            ]);
        }
        text.push_str(&output::render(&table));
        text.push('\n');
        Ok(text)
    }

    /// The newest `tail.lines` matching events, oldest first, and the filter
    /// they were read with.
    pub async fn audit_newest(
        &self,
        tail: &Tail<'_>,
    ) -> Result<(Vec<AuditRecord>, AuditFilter), Failure> {
        let session_id = match tail.session {
            Some(id) => Some(self.resolve(id).await?),
            None => None,
        };
        let event = tail.event.map(event_of).transpose()?;
        let filter = AuditFilter {
            session_id,
            event_type: event.map(|e| e.as_str().to_owned()),
            after: tail.after,
            limit: Some(tail.lines),
            ..AuditFilter::default()
        };
        let mut events = readable(
            self.manager
                .audit_events(filter.clone())
                .await
                .map_err(|e| Failure::during("reading the audit log", e))?,
        );
        events.reverse();
        Ok((events, filter))
    }

    pub async fn audit_tail(&self, tail: Tail<'_>) -> Result<String, Failure> {
        let session = match tail.session {
            Some(id) => Some(self.resolve(id).await?),
            None => None,
        };
        let query = AuditQuery {
            after: tail.after,
            session,
            event: tail.event.map(event_of).transpose()?,
            cursor: None,
            limit: None,
        };
        let page: AuditPage = self
            .views()
            .up_to(query, tail.lines)
            .await
            .map_err(|e| Failure::during("reading the audit log", e))?;
        match self.json {
            true => output::json(&page),
            false => Ok(render::audit(&page, self.now)),
        }
    }
}

/// The audit event `--event` names.
fn event_of(text: &str) -> Result<AuditEvent, Failure> {
    let text = text.trim();
    AuditEvent::from_name(text).ok_or_else(|| {
        let known: Vec<&str> = AuditEvent::ALL.iter().map(|e| e.as_str()).collect();
        let why = match text.is_empty() {
            true => "must not be empty".to_owned(),
            false => format!("{text:?} is not an audit event type"),
        };
        Failure::new(
            INVALID_INPUT,
            format!("invalid --event: {why}; one of {}", known.join(", ")),
        )
    })
}

/// A warning line on stderr; stdout stays the command's output.
fn warn(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "warning: {message}");
}

/// A value as JSON, for embedding in a larger document (null if it cannot be).
pub fn value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}
