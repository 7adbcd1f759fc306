//! The pages, rendered with maud from the typed views. Links, forms and
//! script calls are built under the mount point ([`Here::to`]).
use std::time::Duration;

use axum::extract::{Form, Path, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Extension;
use chrono::{DateTime, Utc};
use maud::{html, Markup, PreEscaped, DOCTYPE};
use serde::Deserialize;
use uuid::Uuid;

use super::error::ApiError;
use super::{Here, Shared, TOKEN_COOKIE};
use crate::views::human::{ago, millis, short, time};
use crate::views::{
    AuditPage, AuditQuery, LockState, LockView, LocksQuery, SessionDetail, SessionView,
    SessionsPage, SessionsQuery,
};
use crate::{AgentStatus, AuditEvent, SessionStatus};

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:0;color:#1f2937}\
nav{background:#111827;padding:8px 16px;display:flex;gap:16px;align-items:center}\
nav a{color:#e5e7eb;text-decoration:none}nav a.here{color:#fff;font-weight:600}\
nav .right{margin-left:auto;color:#9ca3af}main{padding:16px;max-width:1200px}\
table{border-collapse:collapse;width:100%;margin:8px 0}th,td{text-align:left;padding:4px 8px;\
border-bottom:1px solid #e5e7eb;font-variant-numeric:tabular-nums;vertical-align:top}th{background:#f3f4f6}\
.badge{display:inline-block;padding:0 6px;border-radius:8px;font-size:12px;background:#e5e7eb}\
.s-active{background:#d1fae5;color:#065f46}.s-paused{background:#e0e7ff;color:#3730a3}\
.s-interrupted{background:#fef3c7;color:#92400e}.s-completed{background:#f3f4f6;color:#4b5563}\
.stale{background:#fee2e2;color:#991b1b}.expired{background:#fee2e2;color:#991b1b}\
.counts a{margin-right:12px}.counts a.here{font-weight:600}form.filters{margin:8px 0;display:flex;gap:8px;flex-wrap:wrap}\
.empty{color:#6b7280;padding:16px;border:1px dashed #d1d5db;text-align:center}\
button{cursor:pointer}#message{margin:8px 0;color:#b91c1c;white-space:pre-wrap}#message.ok{color:#065f46}\
code,pre{font-family:ui-monospace,monospace}pre{background:#f9fafb;padding:8px;overflow:auto}\
.charts{display:flex;gap:24px;flex-wrap:wrap}figure{margin:0}figcaption{color:#4b5563;font-size:12px}\
.actions{margin:8px 0;display:flex;gap:8px;flex-wrap:wrap;align-items:center}details.act{border:1px solid #e5e7eb;padding:4px 8px}\
.muted{color:#6b7280}.paging{display:flex;gap:16px}";

/// The pages' one script. Actions POST JSON to the API under the mount
/// point; every page listens to the change feed and redraws its `main`
/// when something commits (the audit page adds the rows themselves).
const SCRIPT: &str = r#"
const base = document.body.dataset.base;
function say(text, ok) {
  const m = document.getElementById('message');
  m.textContent = text; m.className = ok ? 'ok' : '';
}
async function act(path, body, confirmText) {
  if (confirmText && !confirm(confirmText)) return null;
  const r = await fetch(base + path, {method: 'POST', headers: {'Content-Type': 'application/json'},
                                      body: JSON.stringify(body || {})});
  const doc = await r.json().catch(() => ({error: 'no answer'}));
  if (!r.ok) { say(doc.error); return null; }
  await redraw();
  return doc;
}
function endSession(id) {
  const force = document.getElementById('force') && document.getElementById('force').checked;
  act('/api/v1/sessions/' + id + '/end' + (force ? '?force=true' : ''), {}, 'End session ' + id + '?');
}
function pauseSession(id, pause) {
  act('/api/v1/sessions/' + id + (pause ? '/pause' : '/unpause'), {},
      (pause ? 'Pause' : 'Unpause') + ' session ' + id + '?');
}
function finishAgent(id, failed) {
  let body = {};
  if (failed) {
    const reason = prompt('Why did this agent fail? (recorded in the audit log)');
    if (!reason) return;
    body = {failed: reason};
  }
  act('/api/v1/agents/' + id + '/finish', body, failed ? null : 'Mark agent ' + id + ' completed and release its locks?');
}
function releaseLock(id) {
  const reason = prompt('Why release this lock? (recorded in the audit log)');
  if (reason) act('/api/v1/locks/' + id + '/release', {reason});
}
async function recoverStale(staleAfter) {
  const doc = await act('/api/v1/recover?stale_after=' + staleAfter, {}, 'Interrupt open sessions silent for ' + staleAfter + '?');
  if (doc) say('Interrupted ' + doc.interrupted.length + ' sessions, released ' + doc.locks_released + ' locks.', true);
}
async function prune(form) {
  const body = {dry_run: form.dry_run.checked};
  for (const f of ['completed_after', 'context_after', 'audit_after']) if (form[f].value) body[f] = form[f].value;
  if (form.keep_last.value) body.keep_last = Number(form.keep_last.value);
  const doc = await act('/api/v1/prune', body, body.dry_run ? null : 'Delete what this policy selects?');
  if (doc) say((doc.dry_run ? 'Would delete: ' : 'Deleted: ') + doc.sessions_deleted + ' sessions, ' +
               doc.contexts_cleared + ' contexts cleared, ' + doc.audit_deleted + ' audit rows.', true);
  return false;
}
let pending = null;
// The page's live stream. A browser keeps few connections per host: the
// stream is closed when the page is left (also into the back-forward
// cache) and opened again when it is shown from there.
let source = null;
window.addEventListener('pagehide', () => { if (source) { source.close(); source = null; } });
window.addEventListener('pageshow', (e) => { if (e.persisted && !source) listen(); });
async function redraw() {
  const r = await fetch(location.href, {headers: {'Accept': 'text/html'}});
  if (!r.ok) return;
  const page = new DOMParser().parseFromString(await r.text(), 'text/html');
  const fresh = page.getElementById('view');
  const view = document.getElementById('view');
  if (fresh && view) view.replaceWith(fresh);
}
function audit_row(ev) {
  const tr = document.createElement('tr');
  const cells = [String(ev.seq), ev.event_time, ev.event_type, ev.session_id || '-', JSON.stringify(ev.details)];
  for (const text of cells) { const td = document.createElement('td'); td.textContent = text; tr.appendChild(td); }
  return tr;
}
function listen() {
  const after = document.body.dataset.after;
  if (after === undefined) return;
  source = new EventSource(base + '/events?after=' + after);
  source.addEventListener('audit', (e) => {
    const live = document.getElementById('live');
    if (live) { live.prepend(audit_row(JSON.parse(e.data))); const empty = document.getElementById('no-events'); if (empty) empty.remove(); return; }
    // Several commits in a burst: one redraw, at most every 300 ms.
    if (!pending) pending = setTimeout(() => { pending = null; redraw(); }, 300);
  });
  source.addEventListener('compacted', (e) => {
    say('events through seq ' + e.data + ' were pruned; the page resumes after them', true);
  });
}
listen();
"#;

/// `after`: the seq the page's live updates resume after; without one the
/// page does not listen.
fn layout(here: &Here, title: &str, nav: &str, after: Option<i64>, body: Markup) -> Markup {
    let link = |path: &str, name: &str, label: &str| {
        html! { a href=(here.to(path)) class=[(nav == name).then_some("here")] { (label) } }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · demiarch-sessions" }
                style { (PreEscaped(STYLE)) }
            }
            body data-base=(here.base) data-after=[after] {
                nav {
                    (link("/", "sessions", "Sessions"))
                    (link("/locks", "locks", "Locks"))
                    (link("/audit", "audit", "Audit log"))
                    span .right {
                        @if !here.access.can_act() { span #read-only { "read-only" } }
                    }
                }
                main {
                    h1 { (title) }
                    div #message {}
                    div #view { (body) }
                }
                script { (PreEscaped(SCRIPT)) }
            }
        }
    }
}

/// A page that could not be built: the error, in the page's frame.
fn error_page(here: &Here, e: ApiError) -> Response {
    let status = e.status;
    (
        status,
        layout(
            here,
            "Error",
            "",
            None,
            html! { p .empty { (e.message) } p { a href=(here.to("/")) { "Back to the sessions" } } },
        ),
    )
        .into_response()
}

/// `3m ago` with the absolute time on hover.
fn when(at: DateTime<Utc>, now: DateTime<Utc>) -> Markup {
    html! { time datetime=(at.to_rfc3339()) title=(time(at)) { (ago(at, now)) } }
}

fn when_opt(at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Markup {
    match at {
        Some(at) => when(at, now),
        None => html! { span .muted { "-" } },
    }
}

/// A short id with the full one on hover.
fn id(id: Uuid) -> Markup {
    html! { code title=(id) { (short(id)) } }
}

fn session_link(here: &Here, session: Uuid) -> Markup {
    html! { a href=(here.to(&format!("/sessions/{session}"))) { (id(session)) } }
}

fn status_badge(status: SessionStatus) -> Markup {
    html! { span .badge class={ "s-" (status) } { (status) } }
}

/// The seq the live stream starts after, read before the page's rows so
/// that no commit falls between them; `None` if it cannot be read (the
/// page then does not listen).
async fn newest(web: &Shared) -> Option<i64> {
    crate::views::newest_seq(web.manager.connection())
        .await
        .ok()
}

fn query<T: serde::de::DeserializeOwned>(q: Option<String>) -> Result<T, ApiError> {
    super::api::query(q)
}

/// A page link keeping the query's filters, with another cursor.
fn with_cursor(path: &str, pairs: &[(&str, Option<String>)], cursor: Option<&str>) -> String {
    let mut url = String::from(path);
    let mut sep = '?';
    for (name, value) in pairs {
        if let Some(value) = value.as_deref().filter(|v| !v.is_empty()) {
            url.push(sep);
            url.push_str(name);
            url.push('=');
            url.push_str(&encode(value));
            sep = '&';
        }
    }
    if let Some(cursor) = cursor {
        url.push(sep);
        url.push_str("cursor=");
        url.push_str(&encode(cursor));
    }
    url
}

/// Percent-encodes a query value.
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b))
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

// ---- sessions -------------------------------------------------------------

pub(crate) async fn sessions(
    State(web): State<Shared>,
    Extension(here): Extension<Here>,
    RawQuery(q): RawQuery,
) -> Response {
    let q: SessionsQuery = match query(q) {
        Ok(q) => q,
        Err(e) => return error_page(&here, e),
    };
    let after = newest(&web).await;
    let page = match web.views().sessions(&q).await {
        Ok(page) => page,
        Err(e) => return error_page(&here, e.into()),
    };
    let activity = match web.views().activity().await {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the dashboard's activity");
            None
        }
    };
    let stale_after =
        humantime::format_duration(Duration::from_millis(page.stale_after_ms)).to_string();
    let body = html! {
        (counts(&here, &page, &q))
        form .filters method="get" action=(here.to("/")) {
            select name="status" {
                option value="" { "any status" }
                @for s in [SessionStatus::Active, SessionStatus::Paused, SessionStatus::Interrupted, SessionStatus::Completed] {
                    option value=(s) selected[q.status == Some(s)] { (s) }
                }
            }
            input name="agent_type" placeholder="agent type" value=[q.agent_type.as_deref()];
            input name="q" placeholder="session id prefix" value=[q.q.as_deref()];
            button type="submit" { "Filter" }
            @if q != SessionsQuery::default() { a href=(here.to("/")) { "clear" } }
        }
        @if let Some(activity) = &activity {
            div .charts {
                (super::svg::bars("ends-chart", "Sessions ended", &activity.ends))
                (super::svg::bars("waits-chart", "Lock waits (granted)", &activity.lock_waits))
                p .muted { (activity.waiting_now) " agents waiting for a lock now" }
            }
        }
        @if here.access.can_act() {
            div .actions {
                button #recover onclick={ "recoverStale('" (stale_after) "')" } { "Recover stale sessions (silent " (stale_after) ")" }
                details .act {
                    summary { "Prune…" }
                    form #prune onsubmit="return prune(this), false" {
                        input name="completed_after" placeholder="completed after (30d)";
                        input name="context_after" placeholder="context after (7d)";
                        input name="audit_after" placeholder="audit after (90d)";
                        input name="keep_last" type="number" min="0" placeholder="keep last N";
                        label { input name="dry_run" type="checkbox" checked; " dry run" }
                        button type="submit" { "Prune" }
                    }
                }
            }
        }
        (session_table(&here, &page))
        div .paging {
            @if q.cursor.is_some() {
                a #newest href=(with_cursor(&here.to("/"), &session_filters(&q), None)) { "← newest" }
            }
            @if let Some(next) = &page.next_cursor {
                a #older href=(with_cursor(&here.to("/"), &session_filters(&q), Some(next))) { "older →" }
            }
        }
    };
    layout(&here, "Sessions", "sessions", after, body).into_response()
}

fn session_filters(q: &SessionsQuery) -> Vec<(&'static str, Option<String>)> {
    vec![
        ("status", q.status.map(|s| s.to_string())),
        ("agent_type", q.agent_type.clone()),
        ("q", q.q.clone()),
        ("limit", q.limit.map(|l| l.to_string())),
    ]
}

fn counts(here: &Here, page: &SessionsPage, q: &SessionsQuery) -> Markup {
    html! {
        p .counts #counts {
            a href=(here.to("/")) class=[q.status.is_none().then_some("here")] { "all " strong { (page.counts.total()) } }
            @for s in [SessionStatus::Active, SessionStatus::Paused, SessionStatus::Interrupted, SessionStatus::Completed] {
                a href=(with_cursor(&here.to("/"), &[("status", Some(s.to_string()))], None)) class=[(q.status == Some(s)).then_some("here")] data-status=(s) {
                    (s) " " strong { (page.counts.of(s)) }
                }
            }
        }
    }
}

fn heartbeat(s: &SessionView, now: DateTime<Utc>) -> Markup {
    html! {
        @match (s.status, s.last_heartbeat_at) {
            (SessionStatus::Active | SessionStatus::Paused, Some(at)) => {
                (when(at, now))
                @if s.stale { " " span .badge.stale title="silent past the recovery threshold: recover interrupts it" { "stale" } }
            }
            (SessionStatus::Active | SessionStatus::Paused, None) => {
                span .muted { "never" }
                @if s.stale { " " span .badge.stale { "stale" } }
            }
            _ => { span .muted { "-" } }
        }
    }
}

fn session_table(here: &Here, page: &SessionsPage) -> Markup {
    let now = page.now;
    html! {
        @if page.sessions.is_empty() {
            p .empty #no-sessions {
                @if page.counts.total() == 0 {
                    "No sessions yet: they appear here when an app calls start_session."
                } @else {
                    "No sessions match these filters."
                }
            }
        } @else {
            table #sessions {
                tr { th { "Session" } th { "Status" } th { "Started" } th { "Ended" } th { "Heartbeat" } th { "Owner" } }
                @for s in &page.sessions {
                    tr .session data-id=(s.id) {
                        td { a href=(here.to(&format!("/sessions/{}", s.id))) { (id(s.id)) } }
                        td { (status_badge(s.status)) }
                        td { (when(s.started_at, now)) }
                        td { (when_opt(s.completed_at, now)) }
                        td { (heartbeat(s, now)) }
                        td { @match &s.owner_instance { Some(o) => code title=(o) { (o.chars().take(8).collect::<String>()) }, None => span .muted { "-" } } }
                    }
                }
            }
        }
    }
}

// ---- one session ----------------------------------------------------------

pub(crate) async fn session(
    State(web): State<Shared>,
    Extension(here): Extension<Here>,
    Path(given): Path<String>,
) -> Response {
    let id = match web.manager.find_session(&given).await {
        Ok(id) => id,
        Err(e @ crate::Error::SessionNotFound(_)) => {
            let e = super::api::pruned(&web, &given).await.unwrap_or(e.into());
            return error_page(&here, e);
        }
        Err(e) => return error_page(&here, e.into()),
    };
    let after = newest(&web).await;
    let detail = match web.views().session(id).await {
        Ok(d) => d,
        Err(e) => return error_page(&here, e.into()),
    };
    let title = format!("Session {id}");
    layout(
        &here,
        &title,
        "sessions",
        after,
        session_body(&here, &detail),
    )
    .into_response()
}

fn session_body(here: &Here, d: &SessionDetail) -> Markup {
    let s = &d.session;
    let now = d.now;
    let open = matches!(s.status, SessionStatus::Active | SessionStatus::Paused);
    html! {
        p {
            "Status " strong #status .badge class={ "s-" (s.status) } { (s.status) }
            " · started " (when(s.started_at, now))
            @if let Some(at) = s.completed_at { " · ended " (when(at, now)) }
            @if open { " · heartbeat " (heartbeat(s, now)) }
            @if let Some(owner) = &s.owner_instance { " · owner " code { (owner) } }
        }
        @if open && here.access.can_act() {
            div .actions {
                button #end onclick={ "endSession('" (s.id) "')" } { "End Session" }
                label { input #force type="checkbox"; " even though its owner still heartbeats" }
                @if s.status == SessionStatus::Paused {
                    button #unpause onclick={ "pauseSession('" (s.id) "', false)" } { "Unpause" }
                } @else {
                    button #pause onclick={ "pauseSession('" (s.id) "', true)" } { "Pause" }
                }
            }
        }
        h2 { "Agents (" (d.agents.len()) ")" }
        @if d.agents.is_empty() {
            p .empty { "No agents registered in this session." }
        } @else {
            table #agents {
                tr { th { "Agent" } th { "Type" } th { "Outcome" } th { "Started" } th { "Ended" } th {} }
                @for a in &d.agents {
                    tr id={ "agent-" (a.id) } {
                        td { (id(a.id)) }
                        td { (a.agent_type) }
                        td .outcome { (a.status) }
                        td { (when(a.started_at, now)) }
                        td { (when_opt(a.completed_at, now)) }
                        td {
                            @if a.status == AgentStatus::Running && here.access.can_act() {
                                button .finish onclick={ "finishAgent('" (a.id) "', false)" } { "Finish" }
                                " "
                                button .fail onclick={ "finishAgent('" (a.id) "', true)" } { "Fail…" }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Locks (" (d.locks.len()) ")" }
        (lock_table(here, &d.locks, now, false))
        h2 { "Context" }
        @if let Some(e) = &d.context.error {
            p .empty { "Unreadable: " (e) }
        } @else if let Some(at) = s.context_cleared_at {
            p .empty { "Cleared by a prune " (when(at, now)) "." }
        } @else if !d.context.saved {
            p .empty {
                @match s.status {
                    SessionStatus::Interrupted => "None saved: interrupted before it could save its context.",
                    _ => "Not saved yet: its live windows are with the process that owns it.",
                }
            }
        } @else {
            details #context-details {
                summary { (d.context.windows) " windows, " (d.context.bytes) " bytes: " (d.context.keys.join(", ")) }
                pre #context { (serde_json::to_string_pretty(&d.context.content).unwrap_or_default()) }
            }
        }
        h2 { "Audit trail (" (d.audit.len()) ")" }
        @if d.audit.is_empty() {
            p .empty { "No audit rows for this session." }
        } @else {
            table #audit {
                tr { th { "Seq" } th { "Time" } th { "Event" } th { "Details" } }
                @for e in &d.audit {
                    tr { td { (e.seq) } td { (when(e.event_time, now)) } td { (e.event_type) } td { code { (e.details.to_string()) } } }
                }
            }
        }
    }
}

// ---- locks ----------------------------------------------------------------

fn lock_state(l: &LockView) -> Markup {
    html! {
        @match l.state {
            LockState::Held => span .badge.s-active { "held" },
            LockState::Expired => span .badge.expired title="past its ttl: the next sweep or acquire releases it" { "expired" },
            LockState::Released => span .badge.s-completed {
                "released (" (l.release_reason.map(|r| r.to_string()).unwrap_or_else(|| "unknown".into())) ")"
            },
        }
    }
}

fn lock_table(here: &Here, locks: &[LockView], now: DateTime<Utc>, with_session: bool) -> Markup {
    html! {
        @if locks.is_empty() {
            p .empty #no-locks { "No locks here." }
        } @else {
            table .locks {
                tr {
                    th { "Lock" } th { "Resource" } th { "Token" }
                    @if with_session { th { "Session" } }
                    th { "Holder" } th { "Acquired" } th { "Held for" } th { "TTL left" } th { "State" } th { "Waiters" } th {}
                }
                @for l in locks {
                    tr .lock data-held=(l.held) data-id=(l.id) {
                        td { (id(l.id)) }
                        td { code { (l.resource_type) "/" (l.resource_key) } }
                        td { (l.fencing_token) }
                        @if with_session { td { (session_link(here, l.session_id)) } }
                        td {
                            (l.agent_type.as_deref().unwrap_or("?")) " "
                            a href=(here.to(&format!("/sessions/{}#agent-{}", l.session_id, l.agent_id))) { (id(l.agent_id)) }
                        }
                        td { (when(l.acquired_at, now)) }
                        td .held-for { (millis(l.held_for_ms)) }
                        td .ttl {
                            @match (l.state, l.ttl_remaining_ms) {
                                (LockState::Released, _) => span .muted { "-" },
                                (LockState::Expired, _) => span .badge.expired { "expired" },
                                (_, Some(ms)) => span title=[l.expires_at.map(time)] { (millis(ms)) },
                                (_, None) => span .muted { "none" },
                            }
                        }
                        td .state { (lock_state(l)) }
                        td {
                            @if l.waiters.is_empty() { span .muted { "-" } }
                            @for w in &l.waiters {
                                div { (w.position) ". " (w.agent_type.as_deref().unwrap_or("?")) " "
                                    a href=(here.to(&format!("/sessions/{}#agent-{}", w.session_id, w.agent_id))) { (id(w.agent_id)) }
                                    " since " (when(w.since, now)) }
                            }
                        }
                        td {
                            @if l.held && here.access.can_act() {
                                button .release onclick={ "releaseLock('" (l.id) "')" } { "Force release" }
                            }
                        }
                    }
                }
            }
        }
    }
}

pub(crate) async fn locks(
    State(web): State<Shared>,
    Extension(here): Extension<Here>,
    RawQuery(q): RawQuery,
) -> Response {
    let q: LocksQuery = match query(q) {
        Ok(q) => q,
        Err(e) => return error_page(&here, e),
    };
    let after = newest(&web).await;
    let page = match web.views().locks(&q).await {
        Ok(page) => page,
        Err(e) => return error_page(&here, e.into()),
    };
    let held = q.held.unwrap_or(true);
    let filters = vec![
        ("held", q.held.map(|h| h.to_string())),
        ("session", q.session.map(|s| s.to_string())),
        ("resource", q.resource.clone()),
        ("agent_type", q.agent_type.clone()),
        ("q", q.q.clone()),
        ("limit", q.limit.map(|l| l.to_string())),
    ];
    let body = html! {
        p .counts { strong #held-total { (page.held_total) } " locks held in the store" }
        form .filters method="get" action=(here.to("/locks")) {
            select name="held" {
                option value="true" selected[held] { "held" }
                option value="false" selected[!held] { "held and released" }
            }
            input name="resource" placeholder="resource (type/key prefix)" value=[q.resource.as_deref()];
            input name="agent_type" placeholder="agent type" value=[q.agent_type.as_deref()];
            input name="q" placeholder="lock id prefix" value=[q.q.as_deref()];
            @if let Some(s) = q.session { input type="hidden" name="session" value=(s); }
            button type="submit" { "Filter" }
            a href=(here.to("/locks")) { "clear" }
        }
        (lock_table(&here, &page.locks, page.now, true))
        div .paging {
            @if q.cursor.is_some() { a href=(with_cursor(&here.to("/locks"), &filters, None)) { "← newest" } }
            @if let Some(next) = &page.next_cursor {
                a #older href=(with_cursor(&here.to("/locks"), &filters, Some(next))) { "older →" }
            }
        }
    };
    let title = match held {
        true => "Held locks",
        false => "Locks",
    };
    layout(&here, title, "locks", after, body).into_response()
}

// ---- audit ----------------------------------------------------------------

pub(crate) async fn audit(
    State(web): State<Shared>,
    Extension(here): Extension<Here>,
    RawQuery(q): RawQuery,
) -> Response {
    let mut q: AuditQuery = match query(q) {
        Ok(q) => q,
        Err(e) => return error_page(&here, e),
    };
    // The page reads newest first; `after` is the stream's business.
    q.after = None;
    let page: AuditPage = match web.views().audit(&q).await {
        Ok(page) => page,
        Err(e) => return error_page(&here, e.into()),
    };
    let now = Utc::now();
    let filters = vec![
        ("event", q.event.map(|e| e.as_str().to_owned())),
        ("session", q.session.map(|s| s.to_string())),
        ("limit", q.limit.map(|l| l.to_string())),
    ];
    let live = q.cursor.is_none() && q.event.is_none() && q.session.is_none();
    let body = html! {
        p .muted {
            @if live { "New events appear at the top as they commit, from any process or host." }
            @else { "Filtered or older events: not live. " a href=(here.to("/audit")) { "Live log" } }
        }
        form .filters method="get" action=(here.to("/audit")) {
            select name="event" {
                option value="" { "any event" }
                @for e in AuditEvent::ALL { option value=(e.as_str()) selected[q.event == Some(e)] { (e.as_str()) } }
            }
            input name="session" placeholder="session id" value=[q.session.map(|s| s.to_string())];
            button type="submit" { "Filter" }
        }
        table {
            thead { tr { th { "Seq" } th { "Time" } th { "Event" } th { "Session" } th { "Details" } } }
            @let rows = html! {
                @for e in &page.events {
                    tr {
                        td { (e.seq) }
                        td { (when(e.event_time, now)) }
                        td { a href=(here.to(&format!("/audit?event={}", e.event_type))) { (e.event_type) } }
                        td { @match e.session_id { Some(s) => (session_link(&here, s)), None => span .muted { "-" } } }
                        td { code { (e.details.to_string()) } }
                    }
                }
            };
            @if live { tbody #live { (rows) } } @else { tbody { (rows) } }
        }
        @if page.events.is_empty() { p .empty #no-events { "No audit events match." } }
        div .paging {
            @if q.cursor.is_some() { a href=(with_cursor(&here.to("/audit"), &filters, None)) { "← newest" } }
            @if let Some(next) = &page.next_cursor {
                a #older href=(with_cursor(&here.to("/audit"), &filters, Some(next))) { "older →" }
            }
        }
    };
    let after = match live {
        true => Some(page.newest_seq),
        false => newest(&web).await,
    };
    layout(&here, "Audit log", "audit", after, body).into_response()
}

// ---- login ----------------------------------------------------------------

pub(crate) async fn login_form(
    State(web): State<Shared>,
    Extension(here): Extension<Here>,
) -> Response {
    if !web.options.access.has_login() {
        return Redirect::to(&here.to("/")).into_response();
    }
    login_page(&here, StatusCode::OK, None)
}

fn login_page(here: &Here, status: StatusCode, message: Option<&str>) -> Response {
    let body = html! {
        form #login method="post" action=(here.to("/login")) {
            p { "This dashboard asks for its access token." }
            @if let Some(m) = message { p #login-error style="color:#b91c1c" { (m) } }
            input #token type="password" name="token" autocomplete="current-password" placeholder="token" autofocus;
            " "
            button type="submit" { "Log in" }
        }
    };
    (status, layout(here, "Log in", "", None, body)).into_response()
}

#[derive(Deserialize)]
pub(crate) struct Login {
    token: String,
}

/// Checks the token, keeps it in an HttpOnly, SameSite=Strict cookie
/// scoped to the mount point, then opens the sessions page.
pub(crate) async fn login(
    State(web): State<Shared>,
    Extension(here): Extension<Here>,
    form: Result<Form<Login>, axum::extract::rejection::FormRejection>,
) -> Response {
    if !web.options.access.has_login() {
        return Redirect::to(&here.to("/")).into_response();
    }
    let Ok(Form(login)) = form else {
        return login_page(&here, StatusCode::BAD_REQUEST, Some("Type the token."));
    };
    if !web.options.access.login(login.token.trim()) {
        return login_page(&here, StatusCode::UNAUTHORIZED, Some("Wrong token."));
    }
    let path = match here.base.is_empty() {
        true => "/".to_owned(),
        false => here.base.clone(),
    };
    let cookie = format!(
        "{TOKEN_COOKIE}={}; HttpOnly; SameSite=Strict; Path={path}",
        login.token.trim()
    );
    match HeaderValue::from_str(&cookie) {
        Ok(cookie) => (
            StatusCode::SEE_OTHER,
            [(header::SET_COOKIE, cookie)],
            Redirect::to(&here.to("/")),
        )
            .into_response(),
        Err(_) => login_page(
            &here,
            StatusCode::BAD_REQUEST,
            Some("That token cannot be kept in a cookie."),
        ),
    }
}

/// Forgets the login cookie.
pub(crate) async fn logout(Extension(here): Extension<Here>) -> Response {
    let path = match here.base.is_empty() {
        true => "/".to_owned(),
        false => here.base.clone(),
    };
    let cookie = format!("{TOKEN_COOKIE}=; HttpOnly; SameSite=Strict; Path={path}; Max-Age=0");
    match HeaderValue::from_str(&cookie) {
        Ok(cookie) => (
            [(header::SET_COOKIE, cookie)],
            Redirect::to(&here.to("/login")),
        )
            .into_response(),
        Err(_) => Redirect::to(&here.to("/login")).into_response(),
    }
}
