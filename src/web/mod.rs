//! The operator dashboard and its JSON API, as an axum [`Router`] an app
//! mounts anywhere (`Router::nest("/ops/sessions", router(…))`); the
//! `demiarch-sessions serve` command serves the same router.
//!
//! - Pages: sessions (counts, filters, charts), one session (agents, locks,
//!   saved context, audit trail), locks, the audit log, and a login page
//!   for tokens. Every page updates itself from the change feed.
//! - The API under `api/v1/` answers with the typed documents of
//!   [`crate::views`], the ones the CLI prints with `--json`; its OpenAPI
//!   3.1 contract is `api/v1/openapi.json`.
//! - `events` streams the audit log as Server-Sent Events (the id is the
//!   seq, so a browser resumes); `metrics` is the Prometheus text of the
//!   library's metrics when [`WebOptions::metrics`] is set.
//!
//! Every link, form, script call and stream is relative to where the router
//! is mounted. Who may read and act is the [`AccessPolicy`]'s decision;
//! changes are POSTs, refused (403) from another site (`Origin`,
//! `Sec-Fetch-Site`) and under [`Access::ReadOnly`]. Bodies are limited to
//! 16 KiB and pages to 500 rows; errors are one JSON line,
//! `{"error": "…"}`. Every stored value reaches a page through maud, which
//! escapes it.
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, OriginalUri, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::SessionManager;

mod access;
mod api;
mod error;
mod listen;
mod openapi;
mod pages;
mod svg;

pub use access::{loopback_host, Access, AccessPolicy, LoopbackAccess, TokenAccess, TOKEN_COOKIE};
pub use error::{status_of, ApiError};
pub use listen::{serve, Limits, REQUEST_TIMEOUT};
pub use openapi::openapi_json;

/// The largest request body taken.
pub const MAX_BODY: usize = 16 * 1024;

/// How the dashboard is served.
#[derive(Clone)]
pub struct WebOptions {
    /// Who may read and act. Default: everything, from loopback only.
    pub access: Arc<dyn AccessPolicy>,
    /// The Prometheus recorder's handle `metrics` renders; without one,
    /// `metrics` answers 404 (the app exports metrics its own way).
    pub metrics: Option<PrometheusHandle>,
    /// Open sessions silent for longer are shown stale, and the recover
    /// action interrupts them. Default 5 minutes.
    pub stale_after: Duration,
    /// Named as `via` in the audit rows of the dashboard's actions.
    /// Default `dashboard`.
    pub via: String,
    /// When it turns true, the live streams end (so a server can stop).
    pub shutdown: Option<tokio::sync::watch::Receiver<bool>>,
    /// How old the counts per status, the locks held and the charts may
    /// be: counting a large store on every page and live redraw would cost
    /// more than the page. Default 2 s; zero reads them for every page.
    pub aggregates_ttl: Duration,
}

impl Default for WebOptions {
    fn default() -> Self {
        Self {
            access: Arc::new(LoopbackAccess::full()),
            metrics: None,
            stale_after: Duration::from_secs(300),
            via: "dashboard".into(),
            shutdown: None,
            aggregates_ttl: Duration::from_secs(2),
        }
    }
}

impl std::fmt::Debug for WebOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebOptions")
            .field("metrics", &self.metrics.is_some())
            .field("stale_after", &self.stale_after)
            .field("via", &self.via)
            .finish_non_exhaustive()
    }
}

/// What every handler shares.
pub(crate) struct Web {
    pub manager: Arc<SessionManager>,
    pub options: WebOptions,
    /// Counts and charts, at most [`WebOptions::aggregates_ttl`] old.
    pub aggregates: crate::views::Aggregates,
}

pub(crate) type Shared = Arc<Web>;

impl Web {
    pub fn views(&self) -> crate::views::Views<'_> {
        crate::views::Views::new(&self.manager, self.options.stale_after)
            .with_aggregates(&self.aggregates)
    }

    pub fn operator(&self, reason: Option<String>) -> crate::Operator {
        crate::Operator {
            via: self.options.via.clone(),
            reason,
        }
    }

    /// Resolves once the server stops (never without a shutdown signal).
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let shutdown = self.options.shutdown.clone();
        async move {
            match shutdown {
                Some(mut flag) => {
                    let _ = flag.wait_for(|stop| *stop).await;
                }
                None => std::future::pending::<()>().await,
            }
        }
    }
}

/// Where the router is mounted and what the request may do, for the
/// handlers.
#[derive(Clone, Debug)]
pub(crate) struct Here {
    /// The path the router is mounted at, without a trailing slash (empty
    /// at the root).
    pub base: String,
    pub access: Access,
}

impl Here {
    /// A path under the mount point: `to("/locks")`. The root is the mount
    /// point itself (`/ops/sessions`, as `Router::nest` routes it).
    pub fn to(&self, path: &str) -> String {
        match (path, self.base.is_empty()) {
            ("/", false) => self.base.clone(),
            _ => format!("{}{path}", self.base),
        }
    }
}

/// The dashboard and its API on `manager`, to serve or to mount under any
/// prefix.
///
/// ```no_run
/// use std::sync::Arc;
///
/// use demiarch_sessions::web::{router, WebOptions};
/// use demiarch_sessions::SessionManager;
///
/// #[tokio::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let manager = Arc::new(SessionManager::connect("sqlite://sessions.db").await?);
///     let app = axum::Router::new()
///         .route("/", axum::routing::get(|| async { "my app" }))
///         .nest("/ops/sessions", router(manager, WebOptions::default()));
///     let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
///     axum::serve(
///         listener,
///         app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
///     )
///     .await?;
///     Ok(())
/// }
/// ```
pub fn router(manager: Arc<SessionManager>, options: WebOptions) -> Router {
    let aggregates = crate::views::Aggregates::new(options.aggregates_ttl);
    let web: Shared = Arc::new(Web {
        manager,
        options,
        aggregates,
    });
    Router::new()
        .route("/", get(pages::sessions))
        .route("/sessions/{id}", get(pages::session))
        .route("/locks", get(pages::locks))
        .route("/audit", get(pages::audit))
        .route("/login", get(pages::login_form).post(pages::login))
        .route("/logout", post(pages::logout))
        .route("/api/v1/openapi.json", get(api::openapi))
        .route("/api/v1/sessions", get(api::sessions))
        .route("/api/v1/sessions/{id}", get(api::session))
        .route("/api/v1/sessions/{id}/end", post(api::end))
        .route("/api/v1/sessions/{id}/pause", post(api::pause))
        .route("/api/v1/sessions/{id}/unpause", post(api::unpause))
        .route("/api/v1/agents/{id}/finish", post(api::finish))
        .route("/api/v1/locks", get(api::locks))
        .route("/api/v1/locks/{id}/release", post(api::release))
        .route("/api/v1/audit", get(api::audit))
        .route("/api/v1/activity", get(api::activity))
        .route("/api/v1/recover", post(api::recover))
        .route("/api/v1/prune", post(api::prune))
        .route("/events", get(api::events))
        .route("/metrics", get(api::metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such page or route") })
        .layer(middleware::map_response(one_line_errors))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(web.clone(), guard))
        .with_state(web)
}

/// The mount point: the original path minus the path the router sees.
fn base_of(request: &Request) -> String {
    let inner = request.uri().path();
    let full = request
        .extensions()
        .get::<OriginalUri>()
        .map(|o| o.path().to_owned())
        .unwrap_or_else(|| inner.to_owned());
    let base = match inner {
        "/" => full.trim_end_matches('/'),
        _ => full.strip_suffix(inner).unwrap_or(""),
    };
    base.trim_end_matches('/').to_owned()
}

/// A request for data (the API, the stream, metrics) rather than a page.
fn for_data(path: &str) -> bool {
    path.starts_with("/api/") || path == "/events" || path == "/metrics"
}

/// A change must come from this dashboard's own pages or from a script:
/// a browser request from another site says so in `Origin` or
/// `Sec-Fetch-Site`.
fn same_origin(parts: &axum::http::request::Parts) -> bool {
    let headers = &parts.headers;
    let host = access::host_of(parts);
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        // `https://` behind a TLS-terminating proxy that keeps `Host`.
        return host.as_deref().is_some_and(|host| {
            origin == format!("http://{host}") || origin == format!("https://{host}")
        });
    }
    match headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        Some(site) => site == "same-origin" || site == "none",
        None => true,
    }
}

/// Asks the access policy, then refuses what it does not allow: no access
/// (403), missing credentials (401, or the login page for a browser),
/// changes under read-only access or from another site (403).
async fn guard(State(web): State<Shared>, request: Request, next: Next) -> Response {
    let base = base_of(&request);
    let (mut parts, body) = request.into_parts();
    let access = match web.options.access.access(&parts) {
        // A store opened read-only takes no action, whoever asks.
        Access::Full if web.manager.is_read_only() => Access::ReadOnly,
        access => access,
    };
    let path = parts.uri.path().to_owned();
    let login = path == "/login" || path == "/logout";
    match access {
        Access::Forbidden => {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "refused: this dashboard does not serve this request (for the built-in policy: \
                 only requests to 127.0.0.1, localhost or [::1] are served without a token)",
            )
            .into_response()
        }
        Access::Unauthorized if !login => {
            if for_data(&path) || !web.options.access.has_login() {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong token: send Authorization: Bearer TOKEN, or log in at \
                     the login page",
                )
                .into_response();
            }
            return Redirect::to(&format!("{base}/login")).into_response();
        }
        _ => {}
    }
    if parts.method != Method::GET && parts.method != Method::HEAD {
        if !same_origin(&parts) {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "refused: the request came from another site",
            )
            .into_response();
        }
        if !login && !access.can_act() {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "this dashboard is read-only for you: actions are off",
            )
            .into_response();
        }
    }
    parts.extensions.insert(Here { base, access });
    next.run(Request::from_parts(parts, body)).await
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
                true => ApiError::new(status, status.canonical_reason().unwrap_or("error")),
                false => ApiError::new(status, line),
            }
            .into_response()
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

/// A JSON document as an answer.
pub(crate) fn json<T: serde::Serialize>(value: T) -> Response {
    Json(value).into_response()
}
