//! An axum app with routes of its own and the session dashboard mounted at
//! `/ops/sessions`, behind the app's own authentication.
//!
//! The app's login is a stand-in (`/login?user=admin` or `?user=viewer`
//! sets a cookie naming the user); a real app puts its own there. The
//! dashboard asks the app who the request is from through an
//! [`AccessPolicy`] closure: admins get full access, viewers read-only,
//! anyone else is refused (403) until the app's login says who they are.
//!
//! ```text
//! cargo run --example mounted_dashboard -- sqlite://sessions.db 127.0.0.1:8080
//! open http://127.0.0.1:8080/login?user=admin, then /ops/sessions
//! ```
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Query, Request};
use axum::http::{header, request::Parts, HeaderMap};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use demiarch_sessions::web::{self, Access, AccessPolicy, WebOptions};
use demiarch_sessions::SessionManager;
use serde::Deserialize;

/// Who the app says the request is from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum User {
    Admin,
    Viewer,
}

/// The app's own authentication: reads its cookie and records the user in
/// the request's extensions, where the dashboard's policy finds it.
async fn authenticate(mut request: Request, next: Next) -> Response {
    if let Some(user) = user_of(request.headers()) {
        request.extensions_mut().insert(user);
    }
    next.run(request).await
}

fn user_of(headers: &HeaderMap) -> Option<User> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| match c.trim() {
            "app_user=admin" => Some(User::Admin),
            "app_user=viewer" => Some(User::Viewer),
            _ => None,
        })
}

#[derive(Deserialize)]
struct LoginQuery {
    user: String,
}

/// The stand-in login: a real app checks a password or an identity provider.
async fn login(Query(q): Query<LoginQuery>) -> Response {
    let cookie = match q.user.as_str() {
        "admin" => "app_user=admin; HttpOnly; SameSite=Strict; Path=/",
        "viewer" => "app_user=viewer; HttpOnly; SameSite=Strict; Path=/",
        _ => return (axum::http::StatusCode::UNAUTHORIZED, "unknown user").into_response(),
    };
    (
        [(header::SET_COOKIE, cookie)],
        Redirect::to("/ops/sessions"),
    )
        .into_response()
}

/// The app: its own pages, and the dashboard under `/ops/sessions`.
pub fn app(manager: Arc<SessionManager>) -> Router {
    let access = |request: &Parts| match request.extensions.get::<User>() {
        Some(User::Admin) => Access::Full,
        Some(User::Viewer) => Access::ReadOnly,
        None => Access::Forbidden,
    };
    let access: Arc<dyn AccessPolicy> = Arc::new(access);
    let dashboard = web::router(
        manager,
        WebOptions {
            access,
            via: "ops-console".into(),
            ..WebOptions::default()
        },
    );
    Router::new()
        .route(
            "/",
            get(|| async { "The app's home page. The dashboard is at /ops/sessions." }),
        )
        .route("/login", get(login))
        .nest("/ops/sessions", dashboard)
        .layer(middleware::from_fn(authenticate))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "sqlite://sessions.db".into());
    let listen: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:8080".into())
        .parse()?;
    let manager = Arc::new(SessionManager::connect(&url).await?);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("http://{listen}/login?user=admin, then /ops/sessions");
    axum::serve(listener, app(manager.clone())).await?;
    manager.close().await?;
    Ok(())
}
