//! The commands: each reads or changes the store through `SessionManager`
//! and returns what to print on stdout.
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use demiarch_sessions::entity::{agent_executions, resource_locks};
use demiarch_sessions::{
    AgentOutcome, AuditEvent, AuditFilter, AuditRecord, Config, Error, LockFilter, LockInfo,
    LockWaiter, Operator, RetentionPolicy, SessionFilter, SessionInfo, SessionManager,
    SessionStatus, CONTEXT_FORMAT_VERSION,
};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::args::{self, AgentsCommand, AuditCommand, Cli, Command, LocksCommand, SessionsCommand};
use crate::exit::{Failure, CONFLICT, INVALID_INPUT, NOT_FOUND, UNREACHABLE};
use crate::output::{self, count, short, Spinner};

/// An open session whose owner heartbeated this recently is taken to be
/// alive: three of the default heartbeat intervals (10 s).
pub const ALIVE_WITHIN: Duration = Duration::from_secs(30);

/// The most rows `sessions show` lists per section.
const SHOW_LIMIT: u64 = 1000;

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
            ctx.sessions_list(status.map(Into::into), limit, 0).await
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
                limits: crate::listen::Limits {
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

/// The agents waiting for each held lock's resource, by lock id; a lock
/// nobody waits for is not in it.
pub type Queues = HashMap<Uuid, Vec<LockWaiter>>;

/// A lock for JSON output: the stored row plus its agent's type and the
/// agents waiting for its resource (none once it is released).
#[derive(Serialize)]
pub struct LockView<'a> {
    pub id: Uuid,
    pub session_id: Uuid,
    pub agent_id: Uuid,
    pub agent_type: Option<&'a str>,
    pub resource_type: &'a str,
    pub resource_key: &'a str,
    pub fencing_token: i64,
    pub acquired_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub released_at: Option<DateTime<Utc>>,
    pub release_reason: Option<&'a str>,
    pub held: bool,
    pub waiters: &'a [LockWaiter],
}

/// What `sessions show` says about a session's context.
#[derive(Serialize)]
struct ContextSummary {
    /// Whether the session saved its context (it was ended).
    saved: bool,
    windows: usize,
    keys: Vec<String>,
    /// Size of the saved `context_data` JSON.
    bytes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
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

    pub async fn sessions_list(
        &self,
        status: Option<SessionStatus>,
        limit: u64,
        offset: u64,
    ) -> Result<String, Failure> {
        let filter = SessionFilter {
            status,
            limit: Some(limit),
            offset,
        };
        let sessions = self
            .manager
            .list_sessions(filter)
            .await
            .map_err(|e| Failure::during("listing sessions", e))?;
        if self.json {
            return output::json(&sessions);
        }
        if sessions.is_empty() {
            let which = status.map(|s| format!(" {s}")).unwrap_or_default();
            return Ok(format!(
                "No{which} sessions in {}. Run `demiarch-sessions demo` to create one.\n",
                self.url
            ));
        }
        let mut table = output::table(["ID", "STATUS", "STARTED", "TOOK", "HEARTBEAT"]);
        for s in &sessions {
            table.add_row(vec![
                s.id.to_string(),
                s.status.to_string(),
                output::time_ago(s.started_at, self.now),
                s.completed_at
                    .map(|at| output::between(s.started_at, at))
                    .unwrap_or_else(|| "-".into()),
                self.heartbeat(s),
            ]);
        }
        let mut text = output::render(&table);
        text.push('\n');
        if sessions.len() as u64 == limit {
            text.push_str(&format!("(the newest {limit} shown; --limit shows more)\n"));
        }
        Ok(text)
    }

    /// `4s ago` for an open session, `-` once it is closed.
    fn heartbeat(&self, s: &SessionInfo) -> String {
        match (open(s.status), s.last_heartbeat_at) {
            (true, Some(at)) => output::ago(at, self.now),
            (true, None) => "never".into(),
            (false, _) => "-".into(),
        }
    }

    pub async fn sessions_show(&self, id: &str) -> Result<String, Failure> {
        let id = match self.resolve(id).await {
            Err(missing) if missing.code == NOT_FOUND => {
                return Err(self.pruned(id).await.unwrap_or(missing))
            }
            found => found?,
        };
        let info = self.session(id).await?;
        let doing = format!("reading session {id}");
        let agents = self
            .manager
            .agents(id)
            .await
            .map_err(|e| Failure::during(&doing, e))?;
        let locks = self
            .manager
            .locks(LockFilter {
                session_id: Some(id),
                limit: Some(SHOW_LIMIT),
                ..LockFilter::default()
            })
            .await
            .map_err(|e| Failure::during(&doing, e))?;
        let mut audit = self
            .manager
            .audit_events(AuditFilter {
                session_id: Some(id),
                limit: Some(SHOW_LIMIT),
                ..AuditFilter::default()
            })
            .await
            .map_err(|e| Failure::during(&doing, e))?;
        audit.reverse();
        let context = self.context_summary(&info).await?;
        let queues = self.queues(&locks).await?;
        let mut agent_types: HashMap<Uuid, String> = agents
            .iter()
            .map(|a| (a.id, a.agent_type.clone()))
            .collect();
        // Waiters of this session's locks may belong to other sessions.
        let strangers: Vec<Uuid> = queues
            .values()
            .flatten()
            .map(|w| w.agent_id)
            .filter(|id| !agent_types.contains_key(id))
            .collect();
        agent_types.extend(self.agent_types(strangers).await?);

        if self.json {
            let locks: Vec<LockView> = locks
                .iter()
                .map(|l| lock_view(l, &agent_types, &queues))
                .collect();
            return output::json(&json!({
                "session": info,
                "agents": agents,
                "locks": locks,
                "context": context,
                "audit": audit,
            }));
        }

        let mut rows = vec![
            ("Session", info.id.to_string()),
            ("Status", info.status.to_string()),
            ("Started", output::time_ago(info.started_at, self.now)),
        ];
        if let Some(at) = info.completed_at {
            rows.push(("Ended", output::time_ago(at, self.now)));
            rows.push(("Took", output::between(info.started_at, at)));
        } else if info.status == SessionStatus::Interrupted {
            rows.push(("Interrupted", output::time_ago(info.updated_at, self.now)));
        } else {
            rows.push(("Updated", output::time_ago(info.updated_at, self.now)));
        }
        if let Some(owner) = &info.owner_instance {
            rows.push(("Owner", owner.clone()));
        }
        if open(info.status) {
            rows.push(("Last heartbeat", self.liveness(&info)));
        }
        rows.push(("Context", context_line(&info, &context)));
        let mut text = output::fields(rows);
        text.push_str("\n\n");

        text.push_str(&format!("Agents ({})\n", agents.len()));
        if !agents.is_empty() {
            let mut table = output::table(["AGENT", "TYPE", "STATUS", "STARTED", "ENDED"]);
            for a in &agents {
                table.add_row(vec![
                    short(a.id),
                    a.agent_type.clone(),
                    a.status.to_string(),
                    output::time_ago(a.started_at, self.now),
                    a.completed_at
                        .map(|at| output::time_ago(at, self.now))
                        .unwrap_or_else(|| "-".into()),
                ]);
            }
            text.push_str(&output::render(&table));
            text.push('\n');
        }

        text.push_str(&format!("\nLocks ({})\n", shown_count(locks.len())));
        if !locks.is_empty() {
            text.push_str(&output::render(&self.lock_table(
                &locks,
                &agent_types,
                Some(&queues),
                false,
            )));
            text.push('\n');
        }

        text.push_str(&format!("\nAudit trail ({})\n", shown_count(audit.len())));
        if !audit.is_empty() {
            let mut table = output::table(["SEQ", "TIME", "EVENT", "DETAILS"]);
            for event in &audit {
                table.add_row(vec![
                    event.seq.to_string(),
                    output::time_ago(event.event_time, self.now),
                    event.event_type.clone(),
                    output::details(&event.details),
                ]);
            }
            text.push_str(&output::render(&table));
            text.push('\n');
        }
        Ok(text)
    }

    /// `4s ago (alive)` or `10m ago (stale: recover will interrupt it)`.
    fn liveness(&self, info: &SessionInfo) -> String {
        match info.last_heartbeat_at {
            Some(at) if alive(info, self.now) => {
                format!("{} (owner alive)", output::ago(at, self.now))
            }
            Some(at) => format!(
                "{} (owner silent: `demiarch-sessions recover` interrupts it)",
                output::ago(at, self.now)
            ),
            None => "never".into(),
        }
    }

    async fn context_summary(&self, info: &SessionInfo) -> Result<ContextSummary, Failure> {
        let saved = info.status == SessionStatus::Completed;
        match self.manager.session_context(info.id).await {
            Ok(windows) => {
                let keys: Vec<String> = windows.iter().map(|w| w.key.clone()).collect();
                let bytes = if saved {
                    // Measured as the library measures context_bytes.
                    serde_json::to_vec(&json!({
                        "version": CONTEXT_FORMAT_VERSION,
                        "windows": windows,
                    }))
                    .map(|v| v.len())
                    .unwrap_or(0)
                } else {
                    0
                };
                Ok(ContextSummary {
                    saved,
                    windows: keys.len(),
                    keys,
                    bytes,
                    error: None,
                })
            }
            // An unreadable context is reported, not fatal to the rest of `show`.
            Err(e @ Error::CorruptContext { .. }) => Ok(ContextSummary {
                saved,
                windows: 0,
                keys: Vec::new(),
                bytes: 0,
                error: Some(e.to_string()),
            }),
            Err(e) => Err(Failure::during(&format!("reading session {}", info.id), e)),
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
        let info = self.session(id).await?;
        if !force && alive(&info, self.now) {
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
        let session_id = match session {
            Some(id) => Some(self.resolve(id).await?),
            None => None,
        };
        let locks = self
            .manager
            .locks(LockFilter {
                session_id,
                held_only: held,
                limit: Some(limit),
                ..LockFilter::default()
            })
            .await
            .map_err(|e| Failure::during("listing locks", e))?;
        let queues = self.queues(&locks).await?;
        let holders = locks.iter().map(|l| l.agent_id);
        let waiters = queues.values().flatten().map(|w| w.agent_id);
        let agent_types = self.agent_types(holders.chain(waiters)).await?;
        if self.json {
            let locks: Vec<LockView> = locks
                .iter()
                .map(|l| lock_view(l, &agent_types, &queues))
                .collect();
            return output::json(&locks);
        }
        if locks.is_empty() {
            let which = if held { " held" } else { "" };
            let whose = session_id
                .map(|id| format!(" by session {}", short(id)))
                .unwrap_or_default();
            return Ok(format!("No locks{which}{whose}.\n"));
        }
        let mut text = output::render(&self.lock_table(&locks, &agent_types, Some(&queues), true));
        text.push('\n');
        if locks.len() as u64 == limit {
            text.push_str(&format!("(the newest {limit} shown; --limit shows more)\n"));
        }
        Ok(text)
    }

    /// The queue of each held lock's resource, one query per held lock.
    pub async fn queues(&self, locks: &[LockInfo]) -> Result<Queues, Failure> {
        let mut queues = Queues::new();
        for l in locks.iter().filter(|l| l.released_at.is_none()) {
            let waiters = self
                .manager
                .lock_waiters(&l.resource_type, &l.resource_key)
                .await
                .map_err(|e| {
                    let doing = format!(
                        "reading the queue of {}/{}",
                        l.resource_type, l.resource_key
                    );
                    Failure::during(&doing, e)
                })?;
            if !waiters.is_empty() {
                queues.insert(l.id, waiters);
            }
        }
        Ok(queues)
    }

    /// The agent type of each of these agents, in one query.
    async fn agent_types(
        &self,
        ids: impl IntoIterator<Item = Uuid>,
    ) -> Result<HashMap<Uuid, String>, Failure> {
        let ids: BTreeSet<Uuid> = ids.into_iter().collect();
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let agents = agent_executions::Entity::find()
            .filter(agent_executions::Column::Id.is_in(ids.into_iter().map(|id| id.to_string())))
            .all(self.manager.connection())
            .await
            .map_err(|e| Failure::during("reading agents", Error::Database(e)))?;
        Ok(agents
            .into_iter()
            .filter_map(|a| Some((Uuid::parse_str(&a.id).ok()?, a.agent_type)))
            .collect())
    }

    /// The locks as a table; with `queues`, a WAITERS column shows who
    /// waits for each.
    pub fn lock_table(
        &self,
        locks: &[LockInfo],
        agent_types: &HashMap<Uuid, String>,
        queues: Option<&Queues>,
        with_session: bool,
    ) -> comfy_table::Table {
        let mut header = vec!["LOCK", "TOKEN", "RESOURCE"];
        if with_session {
            header.push("SESSION");
        }
        header.extend(["AGENT", "ACQUIRED", "STATE"]);
        if queues.is_some() {
            header.push("WAITERS");
        }
        let mut table = output::table(header);
        for l in locks {
            let mut row = vec![
                short(l.id),
                l.fencing_token.to_string(),
                format!("{}/{}", l.resource_type, l.resource_key),
            ];
            if with_session {
                row.push(short(l.session_id));
            }
            row.extend([
                agent_label(l.agent_id, agent_types),
                output::time_ago(l.acquired_at, self.now),
                self.lock_state(l),
            ]);
            if let Some(queues) = queues {
                row.push(queue_cell(queued(queues, l.id), agent_types));
            }
            table.add_row(row);
        }
        table
    }

    fn lock_state(&self, l: &LockInfo) -> String {
        match (l.released_at, l.expires_at) {
            (Some(at), _) => format!(
                "released {} ({})",
                output::ago(at, self.now),
                l.release_reason.as_deref().unwrap_or("unknown reason")
            ),
            (None, Some(exp)) if exp <= self.now => {
                format!(
                    "held, expired {} (sweep releases it)",
                    output::ago(exp, self.now)
                )
            }
            (None, Some(exp)) => format!("held, expires {}", output::ago(exp, self.now)),
            (None, None) => "held".into(),
        }
    }

    async fn locks_waiters(
        &self,
        resource_type: &str,
        resource_key: &str,
    ) -> Result<String, Failure> {
        let resource = format!("{resource_type}/{resource_key}");
        let doing = format!("reading the queue of {resource}");
        let waiters = self
            .manager
            .lock_waiters(resource_type, resource_key)
            .await
            .map_err(|e| Failure::during(&doing, e))?;
        if self.json {
            return output::json(&waiters);
        }
        let holder = resource_locks::Entity::find()
            .filter(resource_locks::Column::ResourceType.eq(resource_type))
            .filter(resource_locks::Column::ResourceKey.eq(resource_key))
            .filter(resource_locks::Column::ReleasedAt.is_null())
            .one(self.manager.connection())
            .await
            .map_err(|e| Failure::during(&doing, Error::Database(e)))?;
        let holder_id = holder
            .as_ref()
            .and_then(|h| Uuid::parse_str(&h.agent_id).ok());
        let ids = waiters.iter().map(|w| w.agent_id).chain(holder_id);
        let agent_types = self.agent_types(ids).await?;
        let held = match (&holder, holder_id) {
            (Some(h), Some(id)) => format!(
                "held by {}, fencing token {}",
                agent_label(id, &agent_types),
                h.fencing_token
            ),
            (Some(h), None) => format!(
                "held by {}, fencing token {}",
                output::short_text(&h.agent_id),
                h.fencing_token
            ),
            (None, _) => "not held".into(),
        };
        if waiters.is_empty() {
            return Ok(format!("Nobody waits for {resource} ({held}).\n"));
        }
        let verb = if waiters.len() == 1 { "waits" } else { "wait" };
        let mut text = format!(
            "{} {verb} for {resource} ({held}), next in line first.\n",
            count(waiters.len() as u64, "agent")
        );
        let mut table = output::table(["POSITION", "AGENT", "TYPE", "SESSION", "WAITING SINCE"]);
        for w in &waiters {
            table.add_row(vec![
                w.position.to_string(),
                short(w.agent_id),
                agent_types
                    .get(&w.agent_id)
                    .cloned()
                    .unwrap_or_else(|| "-".into()),
                short(w.session_id),
                output::time_ago(w.since, self.now),
            ]);
        }
        text.push_str(&output::render(&table));
        text.push('\n');
        Ok(text)
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
                found.map(|mut locks| locks.pop())
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
                lock.release_reason.as_deref().unwrap_or("released")
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
        let event = tail.event.map(str::trim);
        if let Some(event) = event.filter(|e| AuditEvent::from_name(e).is_none()) {
            let known: Vec<&str> = AuditEvent::ALL.iter().map(|e| e.as_str()).collect();
            let why = match event.is_empty() {
                true => "must not be empty".to_owned(),
                false => format!("{event:?} is not an audit event type"),
            };
            return Err(Failure::new(
                INVALID_INPUT,
                format!("invalid --event: {why}; one of {}", known.join(", ")),
            ));
        }
        let filter = AuditFilter {
            session_id,
            event_type: event.map(str::to_owned),
            after: tail.after,
            limit: Some(tail.lines),
            ..AuditFilter::default()
        };
        let mut events = self
            .manager
            .audit_events(filter.clone())
            .await
            .map_err(|e| Failure::during("reading the audit log", e))?;
        events.reverse();
        Ok((events, filter))
    }

    pub async fn audit_tail(&self, tail: Tail<'_>) -> Result<String, Failure> {
        let (events, _) = self.audit_newest(&tail).await?;
        if self.json {
            return output::json(&events);
        }
        if events.is_empty() {
            return Ok("No audit events match.\n".to_owned());
        }
        let mut table = output::table(["SEQ", "TIME", "EVENT", "SESSION", "DETAILS"]);
        for e in &events {
            table.add_row(vec![
                e.seq.to_string(),
                output::time_ago(e.event_time, self.now),
                e.event_type.clone(),
                e.session_id
                    .as_deref()
                    .map(output::short_text)
                    .unwrap_or_else(|| "-".into()),
                output::details(&e.details),
            ]);
        }
        let mut text = output::render(&table);
        text.push('\n');
        Ok(text)
    }
}

pub fn lock_view<'a>(
    l: &'a LockInfo,
    agent_types: &'a HashMap<Uuid, String>,
    queues: &'a Queues,
) -> LockView<'a> {
    LockView {
        id: l.id,
        session_id: l.session_id,
        agent_id: l.agent_id,
        agent_type: agent_types.get(&l.agent_id).map(String::as_str),
        resource_type: &l.resource_type,
        resource_key: &l.resource_key,
        fencing_token: l.fencing_token,
        acquired_at: l.acquired_at,
        expires_at: l.expires_at,
        released_at: l.released_at,
        release_reason: l.release_reason.as_deref(),
        held: l.released_at.is_none(),
        waiters: queued(queues, l.id),
    }
}

/// The agents waiting for a lock's resource; none if nobody does.
fn queued(queues: &Queues, lock_id: Uuid) -> &[LockWaiter] {
    queues.get(&lock_id).map_or(&[], Vec::as_slice)
}

/// `3 (next: reviewer 3f2a9c1d)`, or `-` when nobody waits.
fn queue_cell(queue: &[LockWaiter], agent_types: &HashMap<Uuid, String>) -> String {
    match queue.first() {
        Some(next) => format!(
            "{} (next: {})",
            queue.len(),
            agent_label(next.agent_id, agent_types)
        ),
        None => "-".into(),
    }
}

/// `coder 3f2a9c1d`, or the short id alone when the type is unknown.
fn agent_label(id: Uuid, agent_types: &HashMap<Uuid, String>) -> String {
    match agent_types.get(&id) {
        Some(kind) => format!("{kind} {}", short(id)),
        None => short(id),
    }
}

/// A warning line on stderr; stdout stays the command's output.
fn warn(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "warning: {message}");
}

/// `3`, or `the newest 1000` when `sessions show` hit its limit.
fn shown_count(n: usize) -> String {
    if n as u64 >= SHOW_LIMIT {
        format!("the newest {n}")
    } else {
        n.to_string()
    }
}

fn open(status: SessionStatus) -> bool {
    matches!(status, SessionStatus::Active | SessionStatus::Paused)
}

/// An open session whose owner heartbeated within `ALIVE_WITHIN`.
fn alive(info: &SessionInfo, now: DateTime<Utc>) -> bool {
    let Some(at) = info.last_heartbeat_at else {
        return false;
    };
    let recent = (now - at)
        .to_std()
        .map(|d| d < ALIVE_WITHIN)
        // A heartbeat in the future (clock skew) counts as recent.
        .unwrap_or(true);
    open(info.status) && info.owner_instance.is_some() && recent
}

fn context_line(info: &SessionInfo, context: &ContextSummary) -> String {
    if let Some(error) = &context.error {
        return format!("unreadable: {error}");
    }
    if let Some(at) = info.context_cleared_at {
        return format!(
            "cleared by a prune at {} (the session was ended before its --context-after)",
            at.format("%Y-%m-%d %H:%M:%S UTC")
        );
    }
    if !context.saved {
        return match info.status {
            SessionStatus::Interrupted => {
                "none saved (interrupted before it could save its context)".into()
            }
            _ => "not saved yet (its live windows are with the process that owns it)".into(),
        };
    }
    if context.windows == 0 {
        return "saved, no windows".into();
    }
    format!(
        "saved, {} ({}), {} bytes",
        count(context.windows as u64, "window"),
        context.keys.join(", "),
        context.bytes
    )
}

/// A value as JSON, for embedding in a larger document (null if it cannot be).
pub fn value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}
