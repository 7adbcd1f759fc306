//! The store as an operator sees it: one set of typed documents that the
//! CLI prints with `--json`, the JSON API answers with and the dashboard's
//! pages render. Each is built from the library's reads; none is parsed
//! back from text.
//!
//! Lists are paged by cursor: a page names the cursor of the next one
//! (`next_cursor`), which the next request passes back, so a deep page
//! costs what the first one does.
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub mod human;
mod read;

pub(crate) use read::newest_seq;

use crate::{
    AgentInfo, AuditEvent, AuditFilter, AuditRecord, CorruptRow, Error, LockFilter, LockInfo,
    LockWaiter, ReleaseReason, Result, SessionInfo, SessionManager, SessionStatus,
    CONTEXT_FORMAT_VERSION,
};
use read::{AuditPageFilter, LockPageFilter, SessionPageFilter};

/// The most rows one page of a list holds.
pub const MAX_PAGE: u64 = 500;
/// The rows of a page when the query names no limit.
pub const DEFAULT_PAGE: u64 = 50;
/// The newest locks and audit rows a session's document shows.
pub const SESSION_DETAIL_LIMIT: u64 = 1000;
/// How recently an open session's owner must have heartbeated to count as
/// alive: an operator's end is refused without `force` within it.
pub const ALIVE_WITHIN: Duration = Duration::from_secs(30);

/// Open sessions: `active` or `paused`.
fn open(status: SessionStatus) -> bool {
    matches!(status, SessionStatus::Active | SessionStatus::Paused)
}

/// Milliseconds from `from` to `to`, negative if `to` is earlier.
fn millis_between(from: DateTime<Utc>, to: DateTime<Utc>) -> i64 {
    (to - from).num_milliseconds()
}

/// How many sessions the store holds in each status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "web", derive(utoipa::ToSchema))]
pub struct StatusCounts {
    pub active: u64,
    pub paused: u64,
    pub interrupted: u64,
    pub completed: u64,
}

impl StatusCounts {
    /// The count of one status.
    pub fn of(&self, status: SessionStatus) -> u64 {
        match status {
            SessionStatus::Active => self.active,
            SessionStatus::Paused => self.paused,
            SessionStatus::Interrupted => self.interrupted,
            SessionStatus::Completed => self.completed,
        }
    }

    /// Every session, whatever its status.
    pub fn total(&self) -> u64 {
        self.active + self.paused + self.interrupted + self.completed
    }
}

/// A session with what an operator judges it by: how long ago its owner
/// heartbeated, and whether recovery would interrupt it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "web", derive(utoipa::ToSchema))]
pub struct SessionView {
    pub id: Uuid,
    pub status: SessionStatus,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    /// The manager instance that owns it (heartbeats for it).
    pub owner_instance: Option<String>,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    /// When a prune cleared its saved context.
    pub context_cleared_at: Option<DateTime<Utc>>,
    /// Milliseconds since its owner's last heartbeat, while it is open.
    pub heartbeat_age_ms: Option<i64>,
    /// Open, and silent for longer than the recovery threshold
    /// (`stale_after_ms`): `recover` would interrupt it.
    pub stale: bool,
    /// Open, owned, and heartbeated within [`ALIVE_WITHIN`]: ending it needs
    /// `force`, since its owner's live context would not be saved.
    pub alive: bool,
}

impl SessionView {
    /// The view of `info` at `now`, with `stale_after` as the recovery
    /// threshold.
    pub fn new(info: SessionInfo, now: DateTime<Utc>, stale_after: Duration) -> Self {
        let is_open = open(info.status);
        let last = info.last_heartbeat_at.unwrap_or(info.updated_at);
        let silent = (now - last).to_std().unwrap_or_default();
        let heartbeat_age_ms = match is_open {
            true => info.last_heartbeat_at.map(|at| millis_between(at, now)),
            false => None,
        };
        let alive = is_open && info.owner_instance.is_some() && {
            match info.last_heartbeat_at {
                // A heartbeat in the future (clock skew) counts as recent.
                Some(at) => (now - at).to_std().map_or(true, |d| d < ALIVE_WITHIN),
                None => false,
            }
        };
        Self {
            id: info.id,
            status: info.status,
            started_at: info.started_at,
            updated_at: info.updated_at,
            completed_at: info.completed_at,
            owner_instance: info.owner_instance,
            last_heartbeat_at: info.last_heartbeat_at,
            context_cleared_at: info.context_cleared_at,
            heartbeat_age_ms,
            stale: is_open && silent > stale_after,
            alive,
        }
    }
}

/// Which sessions a sessions page lists.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "web", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "web", into_params(parameter_in = Query))]
#[serde(deny_unknown_fields)]
pub struct SessionsQuery {
    /// Only sessions in this status.
    pub status: Option<SessionStatus>,
    /// Only sessions whose id starts with these hex digits.
    pub q: Option<String>,
    /// Only sessions with an agent of this type.
    pub agent_type: Option<String>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Rows per page, 1 to 500 (default 50).
    pub limit: Option<u64>,
}

/// One page of sessions, newest first, and the counts per status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "web", derive(utoipa::ToSchema))]
pub struct SessionsPage {
    /// Every session in the store, by status (filters aside).
    pub counts: StatusCounts,
    pub sessions: Vec<SessionView>,
    /// Pass as `cursor` for the next page; `None` on the last one.
    pub next_cursor: Option<String>,
    /// Rows of this page holding a value the library cannot read, named.
    #[serde(default, skip_deserializing)]
    pub corrupt: Vec<CorruptRow>,
    /// The recovery threshold the `stale` flags were judged by.
    pub stale_after_ms: u64,
    /// The time the page was read at.
    pub now: DateTime<Utc>,
}

/// What a session saved for recovery.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "web", derive(utoipa::ToSchema))]
pub struct ContextSummary {
    /// Whether the session saved its context (it was ended).
    pub saved: bool,
    pub windows: usize,
    pub keys: Vec<String>,
    /// Size of the saved context as stored.
    pub bytes: usize,
    /// Why the saved context cannot be read, if it cannot.
    pub error: Option<String>,
    /// The saved windows, as stored (empty unless `saved`).
    #[cfg_attr(feature = "web", schema(value_type = Vec<Object>))]
    pub content: Vec<serde_json::Value>,
}

/// The state of a lock as an operator reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "web", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum LockState {
    /// Held, within its time to live (or without one).
    Held,
    /// Still held in the table but past its time to live: the next sweep
    /// or acquire of the resource releases it.
    Expired,
    /// Released.
    Released,
}

/// A lock with its holder's type, its waiters and its timings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "web", derive(utoipa::ToSchema))]
pub struct LockView {
    pub id: Uuid,
    pub session_id: Uuid,
    pub agent_id: Uuid,
    /// The holder's agent type, if its row is readable.
    pub agent_type: Option<String>,
    pub resource_type: String,
    pub resource_key: String,
    pub fencing_token: i64,
    pub acquired_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub released_at: Option<DateTime<Utc>>,
    pub release_reason: Option<ReleaseReason>,
    pub state: LockState,
    /// Whether it is still held (not released), expired or not.
    pub held: bool,
    /// How long it was held: until now while held, until its release after.
    pub held_for_ms: i64,
    /// Milliseconds left of its time to live while held (negative once
    /// expired); `None` without a ttl or once released.
    pub ttl_remaining_ms: Option<i64>,
    /// The agents waiting for its resource, next in line first (none once
    /// released).
    pub waiters: Vec<WaiterView>,
}

/// An agent waiting for a resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "web", derive(utoipa::ToSchema))]
pub struct WaiterView {
    pub agent_id: Uuid,
    pub agent_type: Option<String>,
    pub session_id: Uuid,
    pub since: DateTime<Utc>,
    /// 1 for the next to be granted.
    pub position: u32,
}

impl LockView {
    fn new(
        l: LockInfo,
        agent_types: &HashMap<Uuid, String>,
        waiters: &[LockWaiter],
        now: DateTime<Utc>,
    ) -> Self {
        let state = match (l.released_at, l.expires_at) {
            (Some(_), _) => LockState::Released,
            (None, Some(exp)) if exp <= now => LockState::Expired,
            (None, _) => LockState::Held,
        };
        let held_for_ms = millis_between(l.acquired_at, l.released_at.unwrap_or(now)).max(0);
        let ttl_remaining_ms = match l.released_at {
            None => l.expires_at.map(|exp| millis_between(now, exp)),
            Some(_) => None,
        };
        let waiters = match l.released_at {
            None => waiters
                .iter()
                .map(|w| WaiterView {
                    agent_id: w.agent_id,
                    agent_type: agent_types.get(&w.agent_id).cloned(),
                    session_id: w.session_id,
                    since: w.since,
                    position: w.position,
                })
                .collect(),
            Some(_) => Vec::new(),
        };
        Self {
            id: l.id,
            session_id: l.session_id,
            agent_id: l.agent_id,
            agent_type: agent_types.get(&l.agent_id).cloned(),
            resource_type: l.resource_type,
            resource_key: l.resource_key,
            fencing_token: l.fencing_token,
            acquired_at: l.acquired_at,
            expires_at: l.expires_at,
            released_at: l.released_at,
            release_reason: l.release_reason,
            state,
            held: l.released_at.is_none(),
            held_for_ms,
            ttl_remaining_ms,
            waiters,
        }
    }
}

/// One session whole: its agents, locks, saved context and audit trail.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "web", derive(utoipa::ToSchema))]
pub struct SessionDetail {
    pub session: SessionView,
    pub agents: Vec<AgentInfo>,
    /// Its newest locks (at most [`SESSION_DETAIL_LIMIT`]), held or not.
    pub locks: Vec<LockView>,
    pub context: ContextSummary,
    /// Its newest audit rows (at most [`SESSION_DETAIL_LIMIT`]), oldest first.
    pub audit: Vec<AuditRecord>,
    /// Rows of this page holding a value the library cannot read, named.
    #[serde(default, skip_deserializing)]
    pub corrupt: Vec<CorruptRow>,
    pub now: DateTime<Utc>,
}

/// Which locks a locks page lists.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "web", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "web", into_params(parameter_in = Query))]
#[serde(deny_unknown_fields)]
pub struct LocksQuery {
    /// Only locks still held (default true).
    pub held: Option<bool>,
    /// Only this session's locks.
    pub session: Option<Uuid>,
    /// Only resources whose `type/key` starts with this.
    pub resource: Option<String>,
    /// Only locks whose holder is of this agent type.
    pub agent_type: Option<String>,
    /// Only the lock whose id starts with these hex digits.
    pub q: Option<String>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Rows per page, 1 to 500 (default 50).
    pub limit: Option<u64>,
}

/// One page of locks, newest grant first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "web", derive(utoipa::ToSchema))]
pub struct LocksPage {
    pub locks: Vec<LockView>,
    /// Locks held in the whole store.
    pub held_total: u64,
    /// Rows of this page holding a value the library cannot read, named.
    #[serde(default, skip_deserializing)]
    pub corrupt: Vec<CorruptRow>,

    pub next_cursor: Option<String>,
    pub now: DateTime<Utc>,
}

/// Which audit rows an audit page lists.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "web", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "web", into_params(parameter_in = Query))]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only rows after this seq; answers `410 Gone` when a prune deleted
    /// some of them.
    pub after: Option<i64>,
    /// Only this session's rows.
    pub session: Option<Uuid>,
    /// Only rows of this event type.
    pub event: Option<AuditEvent>,
    /// The `next_cursor` of the previous page (older rows).
    pub cursor: Option<String>,
    /// Rows per page, 1 to 500 (default 50).
    pub limit: Option<u64>,
}

/// One page of the audit log, newest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "web", derive(utoipa::ToSchema))]
pub struct AuditPage {
    pub events: Vec<AuditRecord>,
    /// Rows of this page holding a value the library cannot read, named.
    #[serde(default, skip_deserializing)]
    pub corrupt: Vec<CorruptRow>,
    pub next_cursor: Option<String>,
    /// The highest seq in the log, for a live stream to resume after.
    pub newest_seq: i64,
}

/// One resource's queue: who holds it and who waits, next in line first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "web", derive(utoipa::ToSchema))]
pub struct QueueView {
    pub resource_type: String,
    pub resource_key: String,
    /// The lock held on it, if any.
    pub holder: Option<LockView>,
    pub waiters: Vec<WaiterView>,
    pub now: DateTime<Utc>,
}

/// Counts per minute over the last hour, oldest minute first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "web", derive(utoipa::ToSchema))]
pub struct Series {
    /// The start of the first minute.
    pub since: DateTime<Utc>,
    /// 60 counts, one per minute.
    pub per_minute: Vec<u64>,
}

/// The charts of the sessions page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "web", derive(utoipa::ToSchema))]
pub struct Activity {
    /// Sessions ended (with cleanup) per minute.
    pub ends: Series,
    /// Waits for a lock that ended in a grant, per minute the wait began.
    pub lock_waits: Series,
    /// Agents waiting for a lock right now.
    pub waiting_now: u64,
}

/// A list read page by page: [`Views::up_to`] joins its pages.
#[allow(async_fn_in_trait)]
pub trait Paged: Sized {
    /// What selects the rows.
    type Query: Clone;
    /// Reads the page `query` names.
    async fn read(views: &Views<'_>, query: &Self::Query) -> Result<Self>;
    /// `query`, for `limit` rows (after `cursor`, if given).
    fn narrow(query: &mut Self::Query, cursor: Option<String>, limit: u64);
    /// The rows on the page, readable or not.
    fn rows(&self) -> u64;
    /// The cursor of the next page, taken out.
    fn take_next(&mut self) -> Option<String>;
    /// Sets the cursor of the next page.
    fn set_next(&mut self, cursor: Option<String>);
    /// The next page's rows after this page's, and its cursor.
    fn append(&mut self, next: Self);
}

macro_rules! paged {
    ($page:ty, $query:ty, $read:ident, $rows:ident) => {
        impl Paged for $page {
            type Query = $query;
            async fn read(views: &Views<'_>, query: &$query) -> Result<Self> {
                views.$read(query).await
            }
            fn narrow(query: &mut $query, cursor: Option<String>, limit: u64) {
                if cursor.is_some() {
                    query.cursor = cursor;
                }
                query.limit = Some(limit);
            }
            fn rows(&self) -> u64 {
                (self.$rows.len() + self.corrupt.len()) as u64
            }
            fn take_next(&mut self) -> Option<String> {
                self.next_cursor.take()
            }
            fn set_next(&mut self, cursor: Option<String>) {
                self.next_cursor = cursor;
            }
            fn append(&mut self, next: Self) {
                self.$rows.extend(next.$rows);
                self.corrupt.extend(next.corrupt);
                self.next_cursor = next.next_cursor;
            }
        }
    };
}

paged!(SessionsPage, SessionsQuery, sessions, sessions);
paged!(LocksPage, LocksQuery, locks, locks);
paged!(AuditPage, AuditQuery, audit, events);

/// A page limit as the views take it: 1 to [`MAX_PAGE`].
pub fn page_limit(limit: Option<u64>) -> Result<u64> {
    match limit.unwrap_or(DEFAULT_PAGE) {
        n @ 1..=MAX_PAGE => Ok(n),
        n => Err(Error::InvalidInput {
            field: "limit",
            reason: format!("{n} is not between 1 and {MAX_PAGE}"),
        }),
    }
}

/// The `(started_at in µs, id)` a sessions page's cursor holds.
fn id_cursor(field: &'static str, text: &str) -> Result<(DateTime<Utc>, Uuid)> {
    let bad = || Error::InvalidInput {
        field,
        reason: format!("{text:?} is not a cursor this store gave out"),
    };
    let (micros, rest) = text.split_once('.').ok_or_else(bad)?;
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    let at = DateTime::<Utc>::from_timestamp_micros(micros).ok_or_else(bad)?;
    let id = Uuid::parse_str(rest).map_err(|_| bad())?;
    Ok((at, id))
}

/// The `seq` or fencing token an audit or locks page's cursor holds.
fn number_cursor(text: &str) -> Result<i64> {
    match text.parse::<i64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(Error::InvalidInput {
            field: "cursor",
            reason: format!("{text:?} is not a cursor this store gave out"),
        }),
    }
}

/// A hex id prefix as a filter: lower case, hex digits and hyphens only.
fn id_prefix(field: &'static str, text: Option<&str>) -> Result<Option<String>> {
    let Some(text) = text.map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    if text.len() > 36 || !text.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Err(Error::InvalidInput {
            field,
            reason: format!("{text:?} is not the start of an id (hex digits and hyphens)"),
        });
    }
    Ok(Some(text.to_ascii_lowercase()))
}

fn non_empty(text: Option<&str>) -> Option<String> {
    text.map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
}

/// The store-wide aggregates the pages show (counts per status, locks held,
/// the activity charts), kept for `ttl` between reads: counting every row
/// of a large store on every page and every live redraw would cost more
/// than the page. A dashboard keeps one; the CLI reads them fresh.
#[derive(Debug)]
pub struct Aggregates {
    ttl: Duration,
    counts: std::sync::Mutex<Option<(std::time::Instant, (StatusCounts, u64))>>,
    activity: std::sync::Mutex<Option<(std::time::Instant, Activity)>>,
}

impl Aggregates {
    /// Aggregates at most `ttl` old.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            counts: std::sync::Mutex::new(None),
            activity: std::sync::Mutex::new(None),
        }
    }

    fn fresh<T: Clone>(
        &self,
        slot: &std::sync::Mutex<Option<(std::time::Instant, T)>>,
    ) -> Option<T> {
        let kept = slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        kept.as_ref()
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, v)| v.clone())
    }

    fn keep<T>(slot: &std::sync::Mutex<Option<(std::time::Instant, T)>>, value: T) {
        let mut kept = slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *kept = Some((std::time::Instant::now(), value));
    }
}

/// The reads behind the operator surface, on one manager.
#[derive(Clone, Copy)]
pub struct Views<'a> {
    manager: &'a SessionManager,
    stale_after: Duration,
    aggregates: Option<&'a Aggregates>,
}

impl<'a> Views<'a> {
    /// The views of `manager`'s store; `stale_after` is the recovery
    /// threshold sessions are judged stale by.
    pub fn new(manager: &'a SessionManager, stale_after: Duration) -> Self {
        Self {
            manager,
            stale_after,
            aggregates: None,
        }
    }

    /// The same views, with the store-wide aggregates kept in `aggregates`.
    pub fn with_aggregates(mut self, aggregates: &'a Aggregates) -> Self {
        self.aggregates = Some(aggregates);
        self
    }

    /// Sessions per status and locks held, from the aggregates when they
    /// are fresh.
    async fn totals(&self) -> Result<(StatusCounts, u64)> {
        if let Some(kept) = self.aggregates.and_then(|a| a.fresh(&a.counts)) {
            return Ok(kept);
        }
        let counts = self.counts().await?;
        let (_, held) = crate::query::store_counts(self.manager.connection()).await?;
        if let Some(a) = self.aggregates {
            Aggregates::keep(&a.counts, (counts.clone(), held));
        }
        Ok((counts, held))
    }

    /// Up to `rows` rows of a list from `query` on, read [`MAX_PAGE`] at a
    /// time and joined into one page whose `next_cursor` goes on after them.
    pub async fn up_to<P: Paged>(&self, mut query: P::Query, rows: u64) -> Result<P> {
        P::narrow(&mut query, None, rows.clamp(1, MAX_PAGE));
        let mut page = P::read(self, &query).await?;
        while let Some(cursor) = page.take_next() {
            let left = rows.saturating_sub(page.rows());
            if left == 0 {
                page.set_next(Some(cursor));
                break;
            }
            P::narrow(&mut query, Some(cursor), left.min(MAX_PAGE));
            let next = P::read(self, &query).await?;
            page.append(next);
        }
        Ok(page)
    }

    /// How many sessions are in each status.
    pub async fn counts(&self) -> Result<StatusCounts> {
        let mut counts = StatusCounts::default();
        for (status, n) in read::status_counts(self.manager.connection()).await? {
            match status {
                SessionStatus::Active => counts.active = n,
                SessionStatus::Paused => counts.paused = n,
                SessionStatus::Interrupted => counts.interrupted = n,
                SessionStatus::Completed => counts.completed = n,
            }
        }
        Ok(counts)
    }

    /// A page of sessions, newest first.
    pub async fn sessions(&self, query: &SessionsQuery) -> Result<SessionsPage> {
        let limit = page_limit(query.limit)?;
        let before = match query.cursor.as_deref().filter(|c| !c.is_empty()) {
            Some(c) => Some(id_cursor("cursor", c)?),
            None => None,
        };
        let filter = SessionPageFilter {
            status: query.status,
            id_prefix: id_prefix("q", query.q.as_deref())?,
            agent_type: non_empty(query.agent_type.as_deref()),
            before,
            limit: limit + 1,
        };
        let now = Utc::now();
        let listing = read::session_page(self.manager.connection(), &filter).await?;
        let read = (listing.rows.len() + listing.corrupt.len()) as u64;
        let mut rows = listing.rows;
        let next_cursor = match read > limit {
            true => {
                rows.truncate(limit as usize);
                rows.last()
                    .map(|s| format!("{}.{}", s.started_at.timestamp_micros(), s.id))
            }
            false => None,
        };
        Ok(SessionsPage {
            counts: self.totals().await?.0,
            sessions: rows
                .into_iter()
                .map(|s| SessionView::new(s, now, self.stale_after))
                .collect(),
            next_cursor,
            corrupt: listing.corrupt,
            stale_after_ms: u64::try_from(self.stale_after.as_millis()).unwrap_or(u64::MAX),
            now,
        })
    }

    /// One session whole.
    pub async fn session(&self, id: Uuid) -> Result<SessionDetail> {
        let m = self.manager;
        let info = m.session(id).await?;
        let agents = m.agents(id).await?;
        let mut corrupt = agents.corrupt;
        let agents = agents.rows;
        let locks = m
            .locks(LockFilter {
                session_id: Some(id),
                limit: Some(SESSION_DETAIL_LIMIT),
                ..LockFilter::default()
            })
            .await?;
        corrupt.extend(locks.corrupt);
        let locks = locks.rows;
        let audit = m
            .audit_events(AuditFilter {
                session_id: Some(id),
                limit: Some(SESSION_DETAIL_LIMIT),
                ..AuditFilter::default()
            })
            .await?;
        corrupt.extend(audit.corrupt);
        let mut audit = audit.rows;
        audit.reverse();
        let context = self.context(&info).await?;
        let now = Utc::now();
        let mut known: HashMap<Uuid, String> = agents
            .iter()
            .map(|a| (a.id, a.agent_type.clone()))
            .collect();
        let locks = self.lock_views(locks, &mut known, now).await?;
        Ok(SessionDetail {
            session: SessionView::new(info, now, self.stale_after),
            agents,
            locks,
            context,
            audit,
            corrupt,
            now,
        })
    }

    async fn context(&self, info: &SessionInfo) -> Result<ContextSummary> {
        let saved = info.status == SessionStatus::Completed && info.context_cleared_at.is_none();
        match self.manager.session_context(info.id).await {
            Ok(windows) => {
                let keys: Vec<String> = windows.iter().map(|w| w.key.clone()).collect();
                let content: Vec<serde_json::Value> = windows
                    .iter()
                    .map(|w| serde_json::to_value(w).unwrap_or(serde_json::Value::Null))
                    .collect();
                let bytes = match saved {
                    // Measured as the library measures context_bytes.
                    true => serde_json::to_vec(&serde_json::json!({
                        "version": CONTEXT_FORMAT_VERSION,
                        "windows": windows,
                    }))
                    .map(|v| v.len())
                    .unwrap_or(0),
                    false => 0,
                };
                Ok(ContextSummary {
                    saved,
                    windows: keys.len(),
                    keys,
                    bytes,
                    error: None,
                    content,
                })
            }
            // An unreadable context is reported, not fatal to the rest.
            Err(e @ Error::CorruptContext { .. }) => Ok(ContextSummary {
                saved,
                windows: 0,
                keys: Vec::new(),
                bytes: 0,
                error: Some(e.to_string()),
                content: Vec::new(),
            }),
            Err(e) => Err(e),
        }
    }

    /// Locks with their waiters and the agent types of holders and waiters.
    async fn lock_views(
        &self,
        locks: Vec<LockInfo>,
        known: &mut HashMap<Uuid, String>,
        now: DateTime<Utc>,
    ) -> Result<Vec<LockView>> {
        let mut queues: HashMap<Uuid, Vec<LockWaiter>> = HashMap::new();
        for l in locks.iter().filter(|l| l.released_at.is_none()) {
            let waiters = self
                .manager
                .lock_waiters(&l.resource_type, &l.resource_key)
                .await?;
            if !waiters.is_empty() {
                queues.insert(l.id, waiters);
            }
        }
        let wanted: BTreeSet<Uuid> = locks
            .iter()
            .map(|l| l.agent_id)
            .chain(queues.values().flatten().map(|w| w.agent_id))
            .filter(|id| !known.contains_key(id))
            .collect();
        known.extend(read::agent_types(self.manager.connection(), wanted).await?);
        Ok(locks
            .into_iter()
            .map(|l| {
                let waiters = queues.get(&l.id).map_or(&[][..], Vec::as_slice);
                LockView::new(l, known, waiters, now)
            })
            .collect())
    }

    /// A page of locks, newest grant first.
    pub async fn locks(&self, query: &LocksQuery) -> Result<LocksPage> {
        let limit = page_limit(query.limit)?;
        let before = match query.cursor.as_deref().filter(|c| !c.is_empty()) {
            Some(c) => Some(number_cursor(c)?),
            None => None,
        };
        let resource = non_empty(query.resource.as_deref());
        let filter = LockPageFilter {
            held_only: query.held.unwrap_or(true),
            session_id: query.session,
            resource: resource.map(|r| match r.split_once('/') {
                Some((t, k)) => (t.to_owned(), Some(k.to_owned())),
                None => (r, None),
            }),
            agent_type: non_empty(query.agent_type.as_deref()),
            id_prefix: id_prefix("q", query.q.as_deref())?,
            before_token: before,
            limit: limit + 1,
        };
        let now = Utc::now();
        let listing = read::lock_page(self.manager.connection(), &filter).await?;
        let read = (listing.rows.len() + listing.corrupt.len()) as u64;
        let mut rows = listing.rows;
        let next_cursor = match read > limit {
            true => {
                rows.truncate(limit as usize);
                rows.last().map(|l| l.fencing_token.to_string())
            }
            false => None,
        };
        let (_, held_total) = self.totals().await?;
        let locks = self.lock_views(rows, &mut HashMap::new(), now).await?;
        Ok(LocksPage {
            locks,
            held_total,
            corrupt: listing.corrupt,
            next_cursor,
            now,
        })
    }

    /// A page of the audit log.
    pub async fn audit(&self, query: &AuditQuery) -> Result<AuditPage> {
        let limit = page_limit(query.limit)?;
        let before = match query.cursor.as_deref().filter(|c| !c.is_empty()) {
            Some(c) => Some(number_cursor(c)?),
            None => None,
        };
        if let Some(after) = query.after.filter(|a| *a < 0) {
            return Err(Error::InvalidInput {
                field: "after",
                reason: format!("{after} is negative (seq starts at 1)"),
            });
        }
        let filter = AuditPageFilter {
            session_id: query.session,
            event: query.event,
            after: query.after,
            before,
            limit: limit + 1,
        };
        // Before the rows: a feed resuming after it misses no commit.
        let newest_seq = read::newest_seq(self.manager.connection()).await?;
        let listing = read::audit_page(self.manager.connection(), &filter).await?;
        let read = (listing.rows.len() + listing.corrupt.len()) as u64;
        let mut events = listing.rows;
        let next_cursor = match read > limit {
            true => {
                events.truncate(limit as usize);
                events.last().map(|e| e.seq.to_string())
            }
            false => None,
        };
        Ok(AuditPage {
            events,
            corrupt: listing.corrupt,
            next_cursor,
            newest_seq,
        })
    }

    /// Who holds `resource_type`/`resource_key` and who waits for it.
    pub async fn queue(&self, resource_type: &str, resource_key: &str) -> Result<QueueView> {
        let m = self.manager;
        let waiters = m.lock_waiters(resource_type, resource_key).await?;
        let held = read::held_lock(m.connection(), resource_type, resource_key).await?;
        let now = Utc::now();
        let wanted: BTreeSet<Uuid> = waiters
            .iter()
            .map(|w| w.agent_id)
            .chain(held.iter().map(|l| l.agent_id))
            .collect();
        let agent_types = read::agent_types(m.connection(), wanted).await?;
        let holder = held.map(|l| LockView::new(l, &agent_types, &waiters, now));
        let waiters = waiters
            .iter()
            .map(|w| WaiterView {
                agent_id: w.agent_id,
                agent_type: agent_types.get(&w.agent_id).cloned(),
                session_id: w.session_id,
                since: w.since,
                position: w.position,
            })
            .collect();
        Ok(QueueView {
            resource_type: resource_type.to_owned(),
            resource_key: resource_key.to_owned(),
            holder,
            waiters,
            now,
        })
    }

    /// Ends and lock waits per minute over the last hour.
    pub async fn activity(&self) -> Result<Activity> {
        if let Some(kept) = self.aggregates.and_then(|a| a.fresh(&a.activity)) {
            return Ok(kept);
        }
        let activity = self.read_activity().await?;
        if let Some(a) = self.aggregates {
            Aggregates::keep(&a.activity, activity.clone());
        }
        Ok(activity)
    }

    async fn read_activity(&self) -> Result<Activity> {
        const MINUTES: u32 = 60;
        let now = Utc::now();
        // The start of the minute 59 minutes ago: the last bar is this one.
        let minute_start = now
            - chrono::Duration::seconds(i64::from(chrono::Timelike::second(&now)))
            - chrono::Duration::nanoseconds(i64::from(chrono::Timelike::nanosecond(&now)));
        let since = minute_start - chrono::Duration::minutes(i64::from(MINUTES - 1));
        let db = self.manager.connection();
        Ok(Activity {
            ends: Series {
                since,
                per_minute: read::events_per_minute(db, AuditEvent::SessionEnd, since, MINUTES)
                    .await?,
            },
            lock_waits: Series {
                since,
                per_minute: read::waits_per_minute(db, since, MINUTES).await?,
            },
            waiting_now: read::waiting_now(db).await?,
        })
    }
}
