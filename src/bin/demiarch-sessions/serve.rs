//! `serve`: the operator dashboard and its JSON API on the store that
//! `--database-url` names.
//!
//! - The API under `/api/v1/` answers with the documents `--json` prints,
//!   built by the same commands; the pages render those documents.
//! - `/events` streams the audit log (the change feed) as Server-Sent
//!   Events; `/metrics` is the Prometheus text of the library's metrics.
//! - Security: loopback only unless a token is set; with a token every
//!   request carries it (`Authorization: Bearer`, or the cookie `/login`
//!   sets, `SameSite=Strict`); every change is a POST from the same origin
//!   (an `Origin` or `Sec-Fetch-Site` of another site is refused);
//!   `--read-only` hides and refuses every action; bodies are limited to
//!   16 KiB and pages to 500 rows; errors are one line, never a trace;
//!   header read time, request time and connections are bounded (`listen`).
//!   Every stored value reaches a page through maud, which escapes it.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use demiarch_sessions::{Error, Operator, SessionStatus, WatchOptions};
use futures::{Stream, StreamExt};
use maud::{html, Markup, PreEscaped, DOCTYPE};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::commands::{Ctx, Tail};
use crate::exit::{Failure, CONFLICT, INTERNAL, INVALID_INPUT, NOT_FOUND, TIMEOUT, UNREACHABLE};

/// The most rows a page or an API list returns.
const MAX_PAGE: u64 = 500;
/// Rows per page of the sessions page.
const SESSIONS_PAGE: u64 = 50;
/// How often the live stream looks for commits no wake-up announces (other
/// processes on a SQLite file, other instances on MariaDB).
pub const WATCH_POLL: Duration = Duration::from_millis(25);
/// The largest request body taken.
const MAX_BODY: usize = 16 * 1024;
const COOKIE: &str = "demiarch_token";

pub struct Options {
    pub listen: SocketAddr,
    pub token: Option<String>,
    pub read_only: bool,
    pub limits: crate::listen::Limits,
}

struct App {
    ctx: Ctx,
    token: Option<String>,
    read_only: bool,
    prometheus: PrometheusHandle,
    /// The port it listens on, for the `Host` check.
    port: u16,
    /// Becomes true when the server stops: the live streams end then.
    stopping: tokio::sync::watch::Receiver<bool>,
}

type Shared = Arc<App>;

impl App {
    /// The commands, as the dashboard runs them: JSON out, the time of the
    /// request, and the dashboard named in the audit rows of its actions.
    fn ctx(&self, reason: Option<String>) -> Ctx {
        Ctx {
            manager: self.ctx.manager.clone(),
            json: true,
            now: Utc::now(),
            url: self.ctx.url.clone(),
            operator: Some(Operator {
                via: "dashboard".into(),
                reason,
            }),
        }
    }
}

pub async fn run(ctx: Ctx, options: Options) -> Result<String, Failure> {
    if !options.listen.ip().is_loopback() && options.token.is_none() {
        return Err(Failure::new(
            INVALID_INPUT,
            format!(
                "refusing to listen on {} without --token: anyone who can reach it could end \
                 sessions; pass --token (or DEMIARCH_DASHBOARD_TOKEN), or listen on 127.0.0.1",
                options.listen
            ),
        ));
    }
    let usable = |t: &str| {
        t.len() >= 16
            && t.bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b';' | b',' | b'"' | b'\\'))
    };
    if options.token.as_deref().is_some_and(|t| !usable(t)) {
        return Err(Failure::new(
            INVALID_INPUT,
            "invalid --token: use at least 16 printable ASCII characters, without ; , \" or \\",
        ));
    }
    let prometheus = PrometheusBuilder::new().install_recorder().map_err(|e| {
        Failure::new(
            INTERNAL,
            format!("cannot install the metrics recorder: {e}"),
        )
    })?;
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|e| {
            Failure::new(
                UNREACHABLE,
                format!("cannot listen on {}: {e}", options.listen),
            )
        })?;
    let address = listener
        .local_addr()
        .map_err(|e| Failure::new(INTERNAL, format!("cannot read the listening address: {e}")))?;
    // Histograms are drained by a scrape; without one they would only grow.
    let upkeep = prometheus.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let app = Arc::new(App {
        ctx,
        token: options.token,
        read_only: options.read_only,
        prometheus,
        port: address.port(),
        stopping,
    });
    eprintln!(
        "Dashboard of {} on http://{address}/{}",
        app.ctx.url,
        if app.read_only { " (read-only)" } else { "" }
    );
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        // Stops taking connections and ends the live streams, which would
        // otherwise keep it open.
        let _ = stop.send(true);
    });
    let stopping = app.stopping.clone();
    crate::listen::serve(listener, router(app), options.limits, stopping).await;
    Ok(String::new())
}

fn router(app: Shared) -> Router {
    let guarded = Router::new()
        .route("/", get(sessions_page))
        .route("/sessions/{id}", get(session_page))
        .route("/locks", get(locks_page))
        .route("/audit", get(audit_page))
        .route("/api/v1/sessions", get(api_sessions))
        .route("/api/v1/sessions/{id}", get(api_session))
        .route("/api/v1/sessions/{id}/end", post(api_end))
        .route("/api/v1/sessions/{id}/pause", post(api_pause))
        .route("/api/v1/sessions/{id}/unpause", post(api_unpause))
        .route("/api/v1/locks", get(api_locks))
        .route("/api/v1/locks/{id}/release", post(api_release))
        .route("/api/v1/audit", get(api_audit))
        .route("/api/v1/recover", post(api_recover))
        .route("/events", get(events))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(app.clone(), guard));
    Router::new()
        .route("/login", get(login))
        .merge(guarded)
        .fallback(|| async { failure(StatusCode::NOT_FOUND, "no such page") })
        .layer(middleware::map_response(one_line_errors))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(app.clone(), local_host))
        .with_state(app)
}

// ---- security -------------------------------------------------------------------

/// One error line: `{"error": …}`.
fn failure(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// The HTTP status of a command's failure, by its exit code's class.
fn http_status(f: &Failure) -> StatusCode {
    match f.code {
        INVALID_INPUT => StatusCode::BAD_REQUEST,
        NOT_FOUND => StatusCode::NOT_FOUND,
        CONFLICT => StatusCode::CONFLICT,
        TIMEOUT | UNREACHABLE => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn from_failure(f: Failure) -> Response {
    let line = f.line();
    failure(http_status(&f), line.trim_start_matches("error: "))
}

/// Every answer: framing by another site refused, and errors that are not
/// one JSON line already (axum's own rejections: a malformed query or body,
/// a body over the limit) made one.
async fn one_line_errors(response: Response) -> Response {
    let status = response.status();
    let one_line_already = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| {
            let v = v.as_bytes();
            v.starts_with(b"application/json") || v.starts_with(b"text/html")
        });
    let mut response =
        if (status.is_client_error() || status.is_server_error()) && !one_line_already {
            let body = axum::body::to_bytes(response.into_body(), MAX_BODY)
                .await
                .unwrap_or_default();
            let text = String::from_utf8_lossy(&body);
            let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
            match line.is_empty() {
                true => failure(status, status.canonical_reason().unwrap_or("error")),
                false => failure(status, &line),
            }
        } else {
            response
        };
    let headers = response.headers_mut();
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static("frame-ancestors 'none'"),
    );
    response
}

/// Without a token, only requests addressed to this host's loopback name
/// are served: a page of another site whose name was re-pointed at
/// 127.0.0.1 (DNS rebinding) sends its own name as `Host`.
async fn local_host(State(app): State<Shared>, request: Request, next: Next) -> Response {
    if app.token.is_none() {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let port = app.port;
        let local = ["127.0.0.1", "localhost", "[::1]"]
            .iter()
            .any(|name| host == format!("{name}:{port}"));
        if !local {
            return failure(
                StatusCode::FORBIDDEN,
                "refused: without --token only requests to 127.0.0.1, localhost or [::1] are served",
            );
        }
    }
    next.run(request).await
}

fn token_matches(given: &str, token: &str) -> bool {
    given.as_bytes().ct_eq(token.as_bytes()).into()
}

/// The token a request carries: its bearer header, or the login cookie.
fn carried(headers: &HeaderMap) -> Option<String> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(token) = bearer {
        return Some(token.trim().to_owned());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            c.trim()
                .strip_prefix(&format!("{COOKIE}="))
                .map(str::to_owned)
        })
}

/// A change must come from this dashboard's own pages or from a script:
/// a browser request from another site says so in `Origin` or
/// `Sec-Fetch-Site`.
fn same_origin(headers: &HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        // `https://` behind a TLS-terminating proxy that keeps `Host`.
        return host.is_some_and(|host| {
            origin == format!("http://{host}") || origin == format!("https://{host}")
        });
    }
    match headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        Some(site) => site == "same-origin" || site == "none",
        None => true,
    }
}

async fn guard(State(app): State<Shared>, request: Request, next: Next) -> Response {
    if let Some(token) = &app.token {
        let ok = carried(request.headers()).is_some_and(|given| token_matches(&given, token));
        if !ok {
            return failure(
                StatusCode::UNAUTHORIZED,
                "missing or wrong token: send Authorization: Bearer TOKEN, or open /login?token=TOKEN",
            );
        }
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        if app.read_only {
            return failure(
                StatusCode::FORBIDDEN,
                "this dashboard is read-only: actions are off",
            );
        }
        if !same_origin(request.headers()) {
            return failure(
                StatusCode::FORBIDDEN,
                "refused: the request came from another site",
            );
        }
    }
    next.run(request).await
}

#[derive(Deserialize)]
struct Login {
    token: String,
}

/// Sets the token cookie for the pages, then goes to the sessions page.
async fn login(State(app): State<Shared>, Query(login): Query<Login>) -> Response {
    let Some(token) = &app.token else {
        return Redirect::to("/").into_response();
    };
    if !token_matches(&login.token, token) {
        return failure(StatusCode::UNAUTHORIZED, "wrong token");
    }
    let cookie = format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/");
    match HeaderValue::from_str(&cookie) {
        Ok(cookie) => ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response(),
        Err(_) => failure(StatusCode::BAD_REQUEST, "the token cannot be a cookie"),
    }
}

// ---- the JSON API -------------------------------------------------------------------

/// A document the commands printed, as the response.
fn document(result: Result<String, Failure>) -> Response {
    match result {
        Ok(text) => ([(header::CONTENT_TYPE, "application/json")], text).into_response(),
        Err(f) => from_failure(f),
    }
}

fn parsed(result: Result<String, Failure>) -> Result<Value, Failure> {
    let text = result?;
    serde_json::from_str(&text)
        .map_err(|e| Failure::new(INTERNAL, format!("a command printed malformed JSON: {e}")))
}

fn page_size(limit: Option<u64>, default: u64) -> Result<u64, Failure> {
    match limit.unwrap_or(default) {
        n @ 1..=MAX_PAGE => Ok(n),
        n => Err(Failure::new(
            INVALID_INPUT,
            format!("invalid limit: {n} is not between 1 and {MAX_PAGE}"),
        )),
    }
}

#[derive(Deserialize, Default)]
struct SessionsQuery {
    status: Option<String>,
    limit: Option<u64>,
    offset: Option<u64>,
}

fn status_of(text: Option<&str>) -> Result<Option<SessionStatus>, Failure> {
    match text.filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(text) => text.parse::<SessionStatus>().map(Some).map_err(|_| {
            Failure::new(
                INVALID_INPUT,
                format!("invalid status {text:?}: one of active, paused, interrupted, completed"),
            )
        }),
    }
}

async fn sessions_doc(app: &App, q: &SessionsQuery) -> Result<String, Failure> {
    let status = status_of(q.status.as_deref())?;
    let limit = page_size(q.limit, SESSIONS_PAGE)?;
    app.ctx(None)
        .sessions_list(status, limit, q.offset.unwrap_or(0))
        .await
}

async fn api_sessions(State(app): State<Shared>, Query(q): Query<SessionsQuery>) -> Response {
    document(sessions_doc(&app, &q).await)
}

async fn api_session(State(app): State<Shared>, Path(id): Path<String>) -> Response {
    document(app.ctx(None).sessions_show(&id).await)
}

#[derive(Deserialize, Default)]
struct EndQuery {
    #[serde(default)]
    force: bool,
}

#[derive(Deserialize, Default)]
struct Reason {
    reason: Option<String>,
}

fn reason_of(body: Option<Json<Reason>>) -> Option<String> {
    body.and_then(|Json(r)| r.reason)
        .filter(|r| !r.trim().is_empty())
}

async fn api_end(
    State(app): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<EndQuery>,
    body: Option<Json<Reason>>,
) -> Response {
    let ctx = app.ctx(reason_of(body));
    document(ctx.sessions_end(&id, q.force).await)
}

async fn api_pause(state: State<Shared>, id: Path<String>, body: Option<Json<Reason>>) -> Response {
    set_paused(state, id, body, true).await
}

async fn api_unpause(
    state: State<Shared>,
    id: Path<String>,
    body: Option<Json<Reason>>,
) -> Response {
    set_paused(state, id, body, false).await
}

async fn set_paused(
    State(app): State<Shared>,
    Path(id): Path<String>,
    body: Option<Json<Reason>>,
    pause: bool,
) -> Response {
    let ctx = app.ctx(reason_of(body));
    document(ctx.sessions_pause(&id, pause).await)
}

async fn api_release(
    State(app): State<Shared>,
    Path(id): Path<String>,
    body: Option<Json<Reason>>,
) -> Response {
    let Ok(lock_id) = Uuid::parse_str(&id) else {
        return failure(
            StatusCode::BAD_REQUEST,
            &format!("invalid lock id {id:?}: not a UUID"),
        );
    };
    let Some(reason) = reason_of(body) else {
        return failure(
            StatusCode::BAD_REQUEST,
            "a reason is required: send {\"reason\": \"…\"}",
        );
    };
    let ctx = app.ctx(Some(reason));
    let Some(operator) = &ctx.operator else {
        return failure(StatusCode::INTERNAL_SERVER_ERROR, "no operator");
    };
    match ctx.manager.release_lock_by(lock_id, operator).await {
        // Released now, or already before: either way no longer held.
        Ok(()) => Json(json!({ "lock_id": lock_id, "held": false })).into_response(),
        Err(e) => from_failure(Failure::during(&format!("releasing lock {lock_id}"), e)),
    }
}

#[derive(Deserialize, Default)]
struct LocksQuery {
    held: Option<bool>,
    session: Option<String>,
    limit: Option<u64>,
}

async fn locks_doc(app: &App, q: &LocksQuery) -> Result<String, Failure> {
    let limit = page_size(q.limit, MAX_PAGE)?;
    app.ctx(None)
        .locks_list(q.held.unwrap_or(false), q.session.as_deref(), limit)
        .await
}

async fn api_locks(State(app): State<Shared>, Query(q): Query<LocksQuery>) -> Response {
    document(locks_doc(&app, &q).await)
}

#[derive(Deserialize, Default)]
struct AuditQuery {
    after: Option<i64>,
    session: Option<String>,
    event: Option<String>,
    limit: Option<u64>,
}

async fn audit_doc(app: &App, q: &AuditQuery) -> Result<String, Failure> {
    if let Some(after) = q.after.filter(|a| *a < 0) {
        return Err(Failure::new(
            INVALID_INPUT,
            format!("invalid after: {after} is negative"),
        ));
    }
    let tail = Tail {
        lines: page_size(q.limit, 100)?,
        session: q.session.as_deref(),
        event: q.event.as_deref(),
        after: q.after,
    };
    app.ctx(None).audit_tail(tail).await
}

async fn api_audit(State(app): State<Shared>, Query(q): Query<AuditQuery>) -> Response {
    document(audit_doc(&app, &q).await)
}

#[derive(Deserialize, Default)]
struct RecoverQuery {
    stale_after: Option<String>,
}

async fn api_recover(
    State(app): State<Shared>,
    Query(q): Query<RecoverQuery>,
    body: Option<Json<Reason>>,
) -> Response {
    let text = q.stale_after.unwrap_or_else(|| "5m".into());
    let stale_after = match humantime::parse_duration(&text) {
        Ok(d) if !d.is_zero() => d,
        _ => {
            return failure(
                StatusCode::BAD_REQUEST,
                &format!("invalid stale_after {text:?}: write a duration such as 30s or 5m"),
            )
        }
    };
    document(app.ctx(reason_of(body)).recover(stale_after).await)
}

#[derive(Deserialize, Default)]
struct EventsQuery {
    after: Option<i64>,
}

/// The change feed as Server-Sent Events: each event's id is its seq, so a
/// browser that reconnects resumes after the last one it got.
async fn events(
    State(app): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let resumed = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let options = WatchOptions {
        after: resumed.or(q.after),
        ..WatchOptions::default()
    };
    let mut stopping = app.stopping.clone();
    let stopped = async move {
        let _ = stopping.wait_for(|stop| *stop).await;
    };
    let feed = app
        .ctx
        .manager
        .watch(options)
        .map(|item| {
            Ok(match item {
                Ok(record) => Event::default()
                    .id(record.seq.to_string())
                    .event("audit")
                    .json_data(&record)
                    .unwrap_or_else(|_| {
                        Event::default()
                            .event("feed-error")
                            .data("an event could not be encoded")
                    }),
                // Rows after the browser's last event were pruned: told, and
                // its next reconnection resumes after the horizon (the feed
                // ends here).
                Err(Error::Compacted {
                    compacted_through, ..
                }) => Event::default()
                    .id(compacted_through.to_string())
                    .event("compacted")
                    .data(compacted_through.to_string()),
                // A read failed; the feed retries by itself.
                Err(e) => Event::default().event("feed-error").data(e.to_string()),
            })
        })
        .take_until(stopped);
    Sse::new(feed).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

async fn metrics(State(app): State<Shared>) -> Response {
    if let Err(e) = app.ctx.manager.record_store_gauges().await {
        return from_failure(Failure::during("counting sessions and locks", e));
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.prometheus.render(),
    )
        .into_response()
}

// ---- pages ------------------------------------------------------------------------

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:0;color:#222}\
nav{background:#1f2937;padding:8px 16px}nav a{color:#e5e7eb;margin-right:16px;text-decoration:none}\
main{padding:16px}table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:4px 8px;\
border-bottom:1px solid #e5e7eb;font-variant-numeric:tabular-nums}th{background:#f3f4f6}\
.status-active{color:#047857}.status-completed{color:#6b7280}.status-interrupted{color:#b45309}\
button{cursor:pointer}#message{margin:8px 0;color:#b91c1c}code,pre{font-family:ui-monospace,monospace}\
pre{background:#f9fafb;padding:8px;overflow:auto}";

/// The pages' one script: actions POST to the API, the audit page listens
/// to `/events`.
const SCRIPT: &str = r#"
async function act(url, body, confirmText) {
  if (confirmText && !confirm(confirmText)) return;
  const r = await fetch(url, {method: 'POST', headers: {'Content-Type': 'application/json'},
                              body: JSON.stringify(body || {})});
  const doc = await r.json().catch(() => ({error: 'no answer'}));
  if (!r.ok) { document.getElementById('message').textContent = doc.error; return; }
  location.reload();
}
function endSession(id) {
  const force = document.getElementById('force') && document.getElementById('force').checked;
  act('/api/v1/sessions/' + id + '/end' + (force ? '?force=true' : ''), {}, 'End session ' + id + '?');
}
function pauseSession(id, pause) {
  act('/api/v1/sessions/' + id + (pause ? '/pause' : '/unpause'), {},
      (pause ? 'Pause' : 'Unpause') + ' session ' + id + '?');
}
function releaseLock(id) {
  const reason = prompt('Why release this lock? (recorded in the audit log)');
  if (reason) act('/api/v1/locks/' + id + '/release', {reason});
}
function recoverStale() { act('/api/v1/recover?stale_after=5m', {}, 'Interrupt sessions silent for 5 minutes?'); }
function listen() {
  const rows = document.getElementById('live');
  if (!rows) return;
  const source = new EventSource('/events?after=' + (rows.dataset.after || 0));
  source.addEventListener('audit', (e) => {
    const ev = JSON.parse(e.data);
    const tr = document.createElement('tr');
    for (const text of [ev.seq, ev.event_time, ev.event_type, ev.session_id || '-', JSON.stringify(ev.details)]) {
      const td = document.createElement('td'); td.textContent = text; tr.appendChild(td);
    }
    rows.prepend(tr);
  });
  // A prune deleted events after the last one shown: said, and the stream
  // resumes after the horizon.
  source.addEventListener('compacted', (e) => {
    const tr = document.createElement('tr');
    const td = document.createElement('td'); td.colSpan = 5;
    td.textContent = 'events through seq ' + e.data + ' were pruned; resuming after it';
    tr.appendChild(td); rows.prepend(tr);
  });
}
listen();
"#;

fn layout(app: &App, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · demiarch-sessions" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                nav {
                    a href="/" { "Sessions" }
                    a href="/locks" { "Locks" }
                    a href="/audit" { "Audit (live)" }
                    @if app.read_only { span style="color:#fbbf24" { "read-only" } }
                }
                main {
                    h1 { (title) }
                    div #message {}
                    (body)
                }
                script { (PreEscaped(SCRIPT)) }
            }
        }
    }
}

fn error_page(app: &App, f: Failure) -> Response {
    let line = f.line();
    (
        http_status(&f),
        layout(app, "Error", html! { p { (line) } }),
    )
        .into_response()
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

async fn sessions_page(State(app): State<Shared>, Query(q): Query<SessionsQuery>) -> Response {
    let doc = match parsed(sessions_doc(&app, &q).await) {
        Ok(doc) => doc,
        Err(f) => return error_page(&app, f),
    };
    let rows = doc.as_array().cloned().unwrap_or_default();
    let offset = q.offset.unwrap_or(0);
    let limit = q.limit.unwrap_or(SESSIONS_PAGE);
    let status = q.status.clone().unwrap_or_default();
    let link = |offset: u64| format!("/?status={status}&limit={limit}&offset={offset}");
    let body = html! {
        p {
            "Status: "
            @for s in ["", "active", "paused", "interrupted", "completed"] {
                a href={ "/?status=" (s) } { @if s.is_empty() { "all" } @else { (s) } } " "
            }
            @if !app.read_only { button #recover onclick="recoverStale()" { "Recover stale sessions" } }
        }
        table #sessions {
            tr { th { "Session" } th { "Status" } th { "Started" } th { "Updated" } th { "Owner" } }
            @for s in &rows {
                tr {
                    td { a href={ "/sessions/" (text(&s["id"])) } { code { (text(&s["id"])) } } }
                    td class={ "status-" (text(&s["status"])) } { (text(&s["status"])) }
                    td { (text(&s["started_at"])) }
                    td { (text(&s["updated_at"])) }
                    td { (text(&s["owner_instance"])) }
                }
            }
        }
        p {
            @if offset > 0 { a href=(link(offset.saturating_sub(limit))) { "← newer" } " " }
            @if rows.len() as u64 == limit { a href=(link(offset + limit)) { "older →" } }
        }
    };
    layout(&app, "Sessions", body).into_response()
}

async fn session_page(State(app): State<Shared>, Path(id): Path<String>) -> Response {
    let ctx = app.ctx(None);
    let doc = match parsed(ctx.sessions_show(&id).await) {
        Ok(doc) => doc,
        Err(f) => return error_page(&app, f),
    };
    let session = &doc["session"];
    let session_id = text(&session["id"]);
    let saved = match Uuid::parse_str(&session_id) {
        Ok(sid) => match ctx.manager.session_context(sid).await {
            Ok(windows) => serde_json::to_string_pretty(&windows).unwrap_or_default(),
            Err(e) => format!("unreadable: {e}"),
        },
        Err(_) => String::new(),
    };
    let open = matches!(text(&session["status"]).as_str(), "active" | "paused");
    let empty = Vec::new();
    let list = |v: &Value| v.as_array().cloned().unwrap_or_else(|| empty.clone());
    let body = html! {
        p {
            "Status: " strong #status class={ "status-" (text(&session["status"])) } { (text(&session["status"])) }
            " · started " (text(&session["started_at"]))
            " · owner " (text(&session["owner_instance"]))
        }
        @if open && !app.read_only {
            p {
                button #end onclick={ "endSession('" (session_id) "')" } { "End Session" }
                label { input #force type="checkbox"; " even though its owner still heartbeats" }
                " "
                @if text(&session["status"]) == "paused" {
                    button #unpause onclick={ "pauseSession('" (session_id) "', false)" } { "Unpause" }
                } @else {
                    button #pause onclick={ "pauseSession('" (session_id) "', true)" } { "Pause" }
                }
            }
        }
        h2 { "Agents" }
        table #agents {
            tr { th { "Agent" } th { "Type" } th { "Outcome" } th { "Started" } th { "Ended" } }
            @for a in list(&doc["agents"]) {
                tr { td { code { (text(&a["id"])) } } td { (text(&a["agent_type"])) } td { (text(&a["status"])) } td { (text(&a["started_at"])) } td { (text(&a["completed_at"])) } }
            }
        }
        h2 { "Locks" }
        (lock_table(&app, &list(&doc["locks"])))
        h2 { "Context" }
        details { summary { (text(&doc["context"]["windows"])) " windows" } pre #context { (saved) } }
        h2 { "Audit trail" }
        table #audit {
            tr { th { "Seq" } th { "Time" } th { "Event" } th { "Details" } }
            @for e in list(&doc["audit"]) {
                tr { td { (text(&e["seq"])) } td { (text(&e["event_time"])) } td { (text(&e["event_type"])) } td { code { (e["details"].to_string()) } } }
            }
        }
    };
    layout(&app, &format!("Session {session_id}"), body).into_response()
}

fn lock_table(app: &App, locks: &[Value]) -> Markup {
    let now = Utc::now();
    html! {
        table .locks {
            tr { th { "Resource" } th { "Holder" } th { "Held for" } th { "TTL" } th { "State" } th { "Waiters" } th {} }
            @for l in locks {
                @let held = l["held"].as_bool().unwrap_or(false);
                @let age = l["acquired_at"].as_str()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| format!("{}s", (now - t.to_utc()).num_seconds().max(0)))
                    .unwrap_or_default();
                tr .lock data-held=(held) {
                    td { (text(&l["resource_type"])) "/" (text(&l["resource_key"])) }
                    td { (text(&l["agent_type"])) " " code { (text(&l["agent_id"])) } }
                    td { (age) }
                    td { (text(&l["expires_at"])) }
                    td .state { @if held { "held" } @else { "released (" (text(&l["release_reason"])) ")" } }
                    td {
                        @for w in l["waiters"].as_array().cloned().unwrap_or_default() {
                            div { (text(&w["position"])) ". " code { (text(&w["agent_id"])) } }
                        }
                    }
                    td {
                        @if held && !app.read_only {
                            button .release onclick={ "releaseLock('" (text(&l["id"])) "')" } { "Force release" }
                        }
                    }
                }
            }
        }
    }
}

async fn locks_page(State(app): State<Shared>) -> Response {
    let q = LocksQuery {
        held: Some(true),
        ..LocksQuery::default()
    };
    let doc = match parsed(locks_doc(&app, &q).await) {
        Ok(doc) => doc,
        Err(f) => return error_page(&app, f),
    };
    let locks = doc.as_array().cloned().unwrap_or_default();
    let body = html! { (lock_table(&app, &locks)) };
    layout(&app, "Held locks", body).into_response()
}

async fn audit_page(State(app): State<Shared>) -> Response {
    let q = AuditQuery::default();
    let doc = match parsed(audit_doc(&app, &q).await) {
        Ok(doc) => doc,
        Err(f) => return error_page(&app, f),
    };
    let mut events = doc.as_array().cloned().unwrap_or_default();
    // The stream goes on after the newest row shown, so none is missed.
    let newest = events
        .last()
        .map(|e| text(&e["seq"]))
        .unwrap_or_else(|| "0".into());
    events.reverse();
    let body = html! {
        p { "New events appear at the top as they commit, from any process or host." }
        table {
            thead { tr { th { "Seq" } th { "Time" } th { "Event" } th { "Session" } th { "Details" } } }
            tbody #live data-after=(newest) {
                @for e in &events {
                    tr { td { (text(&e["seq"])) } td { (text(&e["event_time"])) } td { (text(&e["event_type"])) } td { (text(&e["session_id"])) } td { (e["details"].to_string()) } }
                }
            }
        }
    };
    layout(&app, "Audit log", body).into_response()
}
