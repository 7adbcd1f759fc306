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
//!   new one arrives at the cap, the oldest connection that has not sent a
//!   complete request header yet is closed to make room; when every
//!   connection has, the new one is closed at once. An attacker's idle
//!   connections therefore never keep an operator's request out, and file
//!   descriptors stay under the cap.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
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
    pub header_timeout: Duration,
    pub max_connections: usize,
}

/// The connections being served, oldest first, each with whether it has
/// sent a complete request header yet, and a way to close it.
#[derive(Default)]
struct Connections {
    next: u64,
    open: BTreeMap<u64, (Arc<AtomicBool>, watch::Sender<bool>)>,
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
            .find(|(_, (requested, _))| !requested.load(Ordering::SeqCst))
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

/// Serves `router` on `listener` until `stopping` turns true; then lets the
/// requests in progress finish and returns.
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
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, or a connection reset before it
                // was accepted: wait a moment rather than spin.
                tracing::warn!(error = %e, "could not accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let requested = Arc::new(AtomicBool::new(false));
        let (close, mut closing) = watch::channel(false);
        let id = {
            let mut open = connections.lock().unwrap_or_else(PoisonError::into_inner);
            if !open.make_room(limits.max_connections) {
                drop(stream);
                continue;
            }
            let id = open.next;
            open.next += 1;
            open.open.insert(id, (requested.clone(), close));
            id
        };
        let router = router.clone();
        let seen = requested.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            seen.store(true, Ordering::SeqCst);
            let answer = router.clone().oneshot(request.map(Body::new));
            async move {
                match tokio::time::timeout(REQUEST_TIMEOUT, answer).await {
                    Ok(answered) => answered,
                    Err(_) => Ok(timed_out()),
                }
            }
        });
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let (connections, mut stopping) = (connections.clone(), stopping.clone());
        tasks.spawn(async move {
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = turned_true(&mut closing) => {}
                _ = turned_true(&mut stopping) => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            let mut open = connections.lock().unwrap_or_else(PoisonError::into_inner);
            open.open.remove(&id);
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
