//! Serving a router over HTTP/1 with bounds on what a client that never
//! finishes a request can hold:
//!
//! - **Header read time.** A connection must deliver a request's headers
//!   within `header_timeout` of opening, and within the same time of its
//!   previous response when kept alive; otherwise it is closed. So an idle
//!   connection, authenticated or not, lives at most `header_timeout`.
//! - **Request time.** A request must be answered (its headers; a stream's
//!   body may then run on) within [`REQUEST_TIMEOUT`], slow bodies included.
//! - **Connections.** At most `max_connections` are served at once. When a
//!   new one arrives at the cap, the oldest connection that is not in a
//!   request (none sent yet, or kept alive between requests) is closed to
//!   make room; a connection whose response is still streaming (the live
//!   events) counts as in a request. When every connection is in a
//!   request, the new one is closed at once. Idle connections therefore
//!   never keep an operator's request out, however they got idle.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;

/// The longest a request may take to be answered.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The bounds a server keeps.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// How long a connection may take to send a request's headers.
    pub header_timeout: Duration,
    /// How many connections are served at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            max_connections: 256,
        }
    }
}

/// How long a stopping server waits for the responses under way.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The connections being served, oldest first, each with its requests in
/// progress (from the headers read to the response's last byte), and a way
/// to close it.
#[derive(Default)]
struct Connections {
    next: u64,
    open: BTreeMap<u64, (Arc<AtomicUsize>, watch::Sender<bool>)>,
}

impl Connections {
    /// Makes room for one more connection, closing the oldest one that has
    /// not sent a request yet if at the cap; false if there is no room.
    fn make_room(&mut self, cap: usize) -> bool {
        if self.open.len() < cap {
            return true;
        }
        let idle = self
            .open
            .iter()
            .find(|(_, (requests, _))| requests.load(Ordering::SeqCst) == 0)
            .map(|(id, _)| *id);
        match idle.and_then(|id| self.open.remove(&id)) {
            Some((_, close)) => {
                let _ = close.send(true);
                true
            }
            None => false,
        }
    }
}

/// One request in progress on a connection, until dropped with its response.
struct InRequest(Arc<AtomicUsize>);

impl InRequest {
    fn start(requests: &Arc<AtomicUsize>) -> Self {
        requests.fetch_add(1, Ordering::SeqCst);
        Self(requests.clone())
    }
}

impl Drop for InRequest {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connection's place among the open ones, given up however its task ends.
struct Slot {
    id: u64,
    connections: Arc<Mutex<Connections>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.open.remove(&self.id);
    }
}

/// Serves `router` on `listener` until `stopping` turns true; then lets the
/// requests in progress finish and returns. Each request carries the
/// peer's `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    mut stopping: watch::Receiver<bool>,
) {
    let connections = Arc::new(Mutex::new(Connections::default()));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = turned_true(&mut stopping) => break,
        };
        while tasks.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, or a connection reset before it
                // was accepted: wait a moment rather than spin.
                tracing::warn!(error = %e, "could not accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let requests = Arc::new(AtomicUsize::new(0));
        let (close, mut closing) = watch::channel(false);
        let slot = {
            let mut open = connections.lock().unwrap_or_else(PoisonError::into_inner);
            if !open.make_room(limits.max_connections) {
                drop(stream);
                continue;
            }
            let id = open.next;
            open.next += 1;
            open.open.insert(id, (requests.clone(), close));
            Slot {
                id,
                connections: connections.clone(),
            }
        };
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            let in_request = InRequest::start(&requests);
            // For access policies that judge the peer (`LoopbackAccess`).
            request.extensions_mut().insert(ConnectInfo(peer));
            let answer = router.clone().oneshot(request.map(Body::new));
            async move {
                let response = match tokio::time::timeout(REQUEST_TIMEOUT, answer).await {
                    Ok(answered) => answered?,
                    Err(_) => timed_out(),
                };
                // In a request until the response's body is done (or dropped).
                Ok::<_, std::convert::Infallible>(response.map(|body| {
                    Body::new(body.map_frame(move |frame| {
                        let _ = &in_request;
                        frame
                    }))
                }))
            }
        });
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let mut stopping = stopping.clone();
        tasks.spawn(async move {
            let _slot = slot;
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = turned_true(&mut closing) => {}
                _ = turned_true(&mut stopping) => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(STOP_GRACE, connection).await;
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Resolves once `flag` is true, or its sender is gone.
async fn turned_true(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|on| *on).await.map(|_| ());
}

fn timed_out() -> Response {
    let body = serde_json::json!({
        "error": format!("the request was not answered within {REQUEST_TIMEOUT:?}"),
    });
    (StatusCode::REQUEST_TIMEOUT, axum::Json(body)).into_response()
}
