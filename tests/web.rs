//! The dashboard router mounted in-process, as an app mounts it: under a
//! prefix, with the app's access policy. Every request goes through the
//! router; rows are read back from the database.
#![cfg(feature = "web")]
mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, request::Parts, Request, StatusCode};
use axum::Router;
use common::{each_backend, TestDb};
use demiarch_sessions::views::{AuditPage, LocksPage, SessionDetail, SessionsPage};
use demiarch_sessions::web::{self, Access, AccessPolicy, TokenAccess, WebOptions};
use demiarch_sessions::{
    AuditEvent, AuditFilter, LockOptions, RetentionPolicy, SessionManager, SessionStatus,
};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;
use uuid::Uuid;

const PREFIX: &str = "/ops/sessions";

/// The app: its own route and the dashboard under [`PREFIX`], with `access`.
fn app(manager: &SessionManager, access: Arc<dyn AccessPolicy>) -> Router {
    let dashboard = web::router(
        Arc::new(manager.clone()),
        WebOptions {
            access,
            ..WebOptions::default()
        },
    );
    Router::new()
        .route("/", axum::routing::get(|| async { "the app" }))
        .nest(PREFIX, dashboard)
}

/// Access by the `x-role` header: admin, viewer, or nobody.
fn by_role() -> Arc<dyn AccessPolicy> {
    Arc::new(
        |parts: &Parts| match parts.headers.get("x-role").and_then(|v| v.to_str().ok()) {
            Some("admin") => Access::Full,
            Some("viewer") => Access::ReadOnly,
            Some("banned") => Access::Forbidden,
            _ => Access::Unauthorized,
        },
    )
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

impl Answer {
    fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not the document ({e}): {}", self.body))
    }

    fn error(&self) -> String {
        let doc: Value = self.json();
        doc["error"].as_str().expect("an error line").to_owned()
    }
}

async fn send(app: &Router, method: &str, uri: &str, role: &str, body: Option<Value>) -> Answer {
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::HOST, "127.0.0.1:7878")
        .header("x-role", role);
    let body = match body {
        Some(json) => {
            request = request.header(header::CONTENT_TYPE, "application/json");
            Body::from(json.to_string())
        }
        None => Body::empty(),
    };
    let response = app
        .clone()
        .oneshot(request.body(body).expect("request"))
        .await
        .expect("answer");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

async fn get(app: &Router, uri: &str, role: &str) -> Answer {
    send(app, "GET", uri, role, None).await
}

/// Every `href="…"`, `action="…"` and `data-base="…"` value in a page.
fn links(page: &str) -> Vec<String> {
    let mut found = Vec::new();
    for attribute in ["href=\"", "action=\"", "data-base=\""] {
        let mut rest = page;
        while let Some(at) = rest.find(attribute) {
            rest = &rest[at + attribute.len()..];
            let end = rest.find('"').unwrap_or(rest.len());
            found.push(rest[..end].to_owned());
        }
    }
    found
}

async fn session_with_lock(m: &SessionManager, key: &str) -> (Uuid, Uuid, Uuid) {
    let s = m.start_session().await.expect("start");
    let a = m.register_agent(s, "coder").await.expect("agent");
    let lock = m.acquire_lock(a, "file", key).await.expect("lock");
    (s, a, lock.lock_id)
}

#[tokio::test]
async fn mounted_under_a_prefix_every_link_form_and_call_stays_under_it() {
    each_backend("mounted_under_a_prefix", |db: TestDb| async move {
        let m = &db.manager;
        let (session, _, _) = session_with_lock(m, "src/main.rs").await;
        let app = app(m, by_role());
        assert_eq!(get(&app, "/", "admin").await.body, "the app");
        for page in [
            PREFIX.to_owned(),
            format!("{PREFIX}/sessions/{session}"),
            format!("{PREFIX}/locks"),
            format!("{PREFIX}/audit"),
        ] {
            let answer = get(&app, &page, "admin").await;
            assert_eq!(answer.status, StatusCode::OK, "{page}: {}", answer.body);
            let found = links(&answer.body);
            assert!(found.iter().any(|l| l == PREFIX), "{page}: no data-base");
            for link in &found {
                assert!(
                    link.starts_with(PREFIX),
                    "{page}: {link:?} leaves the mount point"
                );
            }
        }
        // The script builds every call from the body's data-base.
        let page = get(&app, PREFIX, "admin").await.body;
        assert!(page.contains("fetch(base + path"), "{page}");
        assert!(page.contains("new EventSource(base + '/events"), "{page}");
        // The API answers under the prefix, and not at the root.
        let api = get(&app, &format!("{PREFIX}/api/v1/sessions"), "admin").await;
        let doc: SessionsPage = api.json();
        assert_eq!(doc.sessions[0].id, session);
        assert_eq!(doc.counts.active, 1);
        assert_eq!(
            get(&app, "/api/v1/sessions", "admin").await.status,
            StatusCode::NOT_FOUND
        );
        db.cleanup().await;
    })
    .await;
}

#[tokio::test]
async fn the_access_policy_decides_and_read_only_hides_and_refuses_actions() {
    each_backend("access_policy", |db: TestDb| async move {
        let m = &db.manager;
        let (session, _, lock) = session_with_lock(m, "src/lib.rs").await;
        let app = app(m, by_role());
        let page = format!("{PREFIX}/sessions/{session}");

        // Full: the actions are offered.
        let full = get(&app, &page, "admin").await.body;
        assert!(
            full.contains("id=\"end\"") && full.contains("class=\"release\""),
            "{full}"
        );

        // Read-only: shown, no action, and every POST refused, changing nothing.
        let viewer = get(&app, &page, "viewer").await;
        assert_eq!(viewer.status, StatusCode::OK);
        assert!(!viewer.body.contains("id=\"end\""), "{}", viewer.body);
        assert!(!viewer.body.contains("Force release"), "{}", viewer.body);
        assert!(viewer.body.contains("read-only"));
        for (uri, body) in [
            (
                format!("{PREFIX}/api/v1/sessions/{session}/end?force=true"),
                None,
            ),
            (format!("{PREFIX}/api/v1/sessions/{session}/pause"), None),
            (
                format!("{PREFIX}/api/v1/locks/{lock}/release"),
                Some(serde_json::json!({"reason": "test"})),
            ),
            (format!("{PREFIX}/api/v1/recover?stale_after=1s"), None),
            (
                format!("{PREFIX}/api/v1/prune"),
                Some(serde_json::json!({"completed_after": "1s"})),
            ),
        ] {
            let answer = send(&app, "POST", &uri, "viewer", body).await;
            assert_eq!(
                answer.status,
                StatusCode::FORBIDDEN,
                "{uri}: {}",
                answer.body
            );
            assert!(answer.error().contains("read-only"), "{}", answer.body);
        }
        assert_eq!(
            m.session(session).await.expect("row").status,
            SessionStatus::Active
        );
        let held = m
            .locks(demiarch_sessions::LockFilter {
                lock_id: Some(lock),
                ..Default::default()
            })
            .await
            .expect("locks");
        assert!(held.rows[0].released_at.is_none());

        // Forbidden: refused whatever it asks.
        let banned = get(&app, &format!("{PREFIX}/api/v1/sessions"), "banned").await;
        assert_eq!(banned.status, StatusCode::FORBIDDEN);
        // No credentials: the API says 401, a page goes to the login page.
        let anonymous = get(&app, &format!("{PREFIX}/api/v1/sessions"), "").await;
        assert_eq!(
            anonymous.status,
            StatusCode::UNAUTHORIZED,
            "{}",
            anonymous.body
        );
        // This policy has no login page: a page says 401 rather than
        // sending the browser to one.
        let page = get(&app, &format!("{PREFIX}/locks"), "").await;
        assert_eq!(page.status, StatusCode::UNAUTHORIZED, "{}", page.body);
        assert!(page.headers.get(header::LOCATION).is_none());

        // Full access acts: the end is in the rows.
        let end = send(
            &app,
            "POST",
            &format!("{PREFIX}/api/v1/sessions/{session}/end?force=true"),
            "admin",
            Some(serde_json::json!({"reason": "from the test"})),
        )
        .await;
        assert_eq!(end.status, StatusCode::OK, "{}", end.body);
        assert_eq!(
            m.session(session).await.expect("row").status,
            SessionStatus::Completed
        );
        let rows = common::audit_of(&db, session, "session_end").await;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].details["operator"]["via"], "dashboard");
        assert_eq!(rows[0].details["operator"]["reason"], "from the test");
        db.cleanup().await;
    })
    .await;
}

#[tokio::test]
async fn a_token_logs_a_browser_in_with_a_cookie_scoped_to_the_mount_point() {
    let db = TestDb::new(common::Backend::SqliteMemory).await;
    let token = "a-token-of-32-characters-at-least";
    let access: Arc<dyn AccessPolicy> = Arc::new(TokenAccess::new(token).expect("token"));
    let app = app(&db.manager, access);
    let page = get(&app, PREFIX, "").await;
    assert!(page.status.is_redirection());
    assert_eq!(page.headers[header::LOCATION], format!("{PREFIX}/login"));
    let form = get(&app, &format!("{PREFIX}/login"), "").await;
    assert_eq!(form.status, StatusCode::OK);
    assert!(form.body.contains("type=\"password\""), "{}", form.body);

    let login = |token: &str| {
        Request::builder()
            .method("POST")
            .uri(format!("{PREFIX}/login"))
            .header(header::HOST, "127.0.0.1:7878")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!("token={token}")))
            .expect("request")
    };
    let wrong = app
        .clone()
        .oneshot(login("wrong-token-of-enough-length"))
        .await
        .expect("answer");
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(wrong.headers().get(header::SET_COOKIE).is_none());
    let right = app.clone().oneshot(login(token)).await.expect("answer");
    assert!(right.status().is_redirection(), "{:?}", right.status());
    let cookie = right.headers()[header::SET_COOKIE]
        .to_str()
        .expect("cookie")
        .to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(cookie.contains(&format!("Path={PREFIX}")), "{cookie}");
    let pair = cookie.split(';').next().expect("pair").to_owned();
    let with_cookie = app
        .clone()
        .oneshot(
            Request::builder()
                .uri(format!("{PREFIX}/api/v1/sessions"))
                .header(header::HOST, "127.0.0.1:7878")
                .header(header::COOKIE, pair)
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("answer");
    assert_eq!(with_cookie.status(), StatusCode::OK);
    let bearer = app
        .clone()
        .oneshot(
            Request::builder()
                .uri(format!("{PREFIX}/api/v1/sessions"))
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("answer");
    assert_eq!(bearer.status(), StatusCode::OK);
    assert!(TokenAccess::new("short").is_err());
    db.cleanup().await;
}

#[tokio::test]
async fn cursor_pages_visit_every_session_once_with_filters_and_counts() {
    each_backend("cursor_pages", |db: TestDb| async move {
        let m = &db.manager;
        let mut started = Vec::new();
        for n in 0..23 {
            let s = m.start_session().await.expect("start");
            if n % 3 == 0 {
                m.register_agent(s, "reviewer").await.expect("agent");
            }
            if n % 2 == 0 {
                m.end_session(s).await.expect("end");
            }
            started.push(s);
        }
        let app = app(m, by_role());
        let walk = |filter: String| {
            let app = app.clone();
            async move {
                let mut seen = Vec::new();
                let mut cursor: Option<String> = None;
                let mut pages = 0;
                loop {
                    let uri = match &cursor {
                        Some(c) => format!("{PREFIX}/api/v1/sessions?limit=5{filter}&cursor={c}"),
                        None => format!("{PREFIX}/api/v1/sessions?limit=5{filter}"),
                    };
                    let page: SessionsPage = get(&app, &uri, "admin").await.json();
                    assert!(page.sessions.len() <= 5);
                    seen.extend(page.sessions.iter().map(|s| s.id));
                    pages += 1;
                    match page.next_cursor {
                        Some(next) => cursor = Some(next),
                        None => break,
                    }
                    assert!(pages < 100, "paging never ends");
                }
                seen
            }
        };
        let all = walk(String::new()).await;
        let mut expected = started.clone();
        expected.reverse();
        assert_eq!(all, expected, "newest first, each once");
        let completed = walk("&status=completed".into()).await;
        assert_eq!(completed.len(), 12);
        for id in &completed {
            assert_eq!(
                m.session(*id).await.expect("row").status,
                SessionStatus::Completed
            );
        }
        let reviewers = walk("&agent_type=reviewer".into()).await;
        assert_eq!(reviewers.len(), 8);
        let prefix = started[7].to_string()[..11].to_owned();
        assert_eq!(walk(format!("&q={prefix}")).await, vec![started[7]]);
        let page: SessionsPage = get(&app, &format!("{PREFIX}/api/v1/sessions"), "admin")
            .await
            .json();
        assert_eq!((page.counts.active, page.counts.completed), (11, 12));
        // The page shows the counts and a link to the next page.
        let html = get(&app, &format!("{PREFIX}?limit=5"), "admin").await;
        assert!(
            html.body.contains("id=\"older\""),
            "{:?} {}",
            html.status,
            html.body
        );
        db.cleanup().await;
    })
    .await;
}

#[tokio::test]
async fn statuses_come_from_errors_and_messages_speak_http() {
    each_backend("statuses_from_errors", |db: TestDb| async move {
        let m = &db.manager;
        let (session, _, _) = session_with_lock(m, "a").await;
        let app = app(m, by_role());
        let missing = Uuid::new_v4();
        let cases = [
            (
                format!("{PREFIX}/api/v1/sessions/{missing}"),
                StatusCode::NOT_FOUND,
                "not found",
            ),
            (
                format!("{PREFIX}/api/v1/sessions?limit=0"),
                StatusCode::BAD_REQUEST,
                "limit",
            ),
            (
                format!("{PREFIX}/api/v1/sessions?limit=501"),
                StatusCode::BAD_REQUEST,
                "limit",
            ),
            (
                format!("{PREFIX}/api/v1/sessions?cursor=nope"),
                StatusCode::BAD_REQUEST,
                "cursor",
            ),
            (
                format!("{PREFIX}/api/v1/sessions?status=sleeping"),
                StatusCode::BAD_REQUEST,
                "status",
            ),
            (
                format!("{PREFIX}/api/v1/locks?q=zz"),
                StatusCode::BAD_REQUEST,
                "q",
            ),
            (
                format!("{PREFIX}/api/v1/audit?event=nothing"),
                StatusCode::BAD_REQUEST,
                "event",
            ),
            (
                format!("{PREFIX}/api/v1/audit?after=-1"),
                StatusCode::BAD_REQUEST,
                "after",
            ),
        ];
        for (uri, status, needle) in cases {
            let answer = get(&app, &uri, "admin").await;
            assert_eq!(answer.status, status, "{uri}: {}", answer.body);
            let line = answer.error();
            assert!(line.contains(needle), "{uri}: {needle:?} not in {line:?}");
            assert!(!line.contains('\n'));
        }
        // This test's manager heartbeats for the session: an end without
        // force is refused, in HTTP's words, and changes nothing.
        let refused = send(
            &app,
            "POST",
            &format!("{PREFIX}/api/v1/sessions/{session}/end"),
            "admin",
            None,
        )
        .await;
        assert_eq!(refused.status, StatusCode::CONFLICT, "{}", refused.body);
        let line = refused.error();
        assert!(
            line.contains("?force=true") && !line.contains("--force"),
            "{line}"
        );
        assert_eq!(
            m.session(session).await.expect("row").status,
            SessionStatus::Active
        );
        let release = send(
            &app,
            "POST",
            &format!("{PREFIX}/api/v1/locks/{missing}/release"),
            "admin",
            Some(serde_json::json!({"reason": "x"})),
        )
        .await;
        assert_eq!(release.status, StatusCode::NOT_FOUND, "{}", release.body);
        let no_reason = send(
            &app,
            "POST",
            &format!("{PREFIX}/api/v1/locks/{missing}/release"),
            "admin",
            None,
        )
        .await;
        assert_eq!(no_reason.status, StatusCode::BAD_REQUEST);
        assert!(no_reason.error().contains("reason"));
        db.cleanup().await;
    })
    .await;
}

#[tokio::test]
async fn lock_views_show_ttl_left_expiry_and_a_held_time_frozen_at_release() {
    each_backend("lock_views", |db: TestDb| async move {
        let m = &db.manager;
        let s = m.start_session().await.expect("start");
        let a = m.register_agent(s, "coder").await.expect("agent");
        let short = m
            .acquire_lock_with(
                a,
                "file",
                "short",
                LockOptions {
                    ttl: Some(Duration::from_millis(1)),
                    ..LockOptions::default()
                },
            )
            .await
            .expect("lock");
        let long = m
            .acquire_lock_with(
                a,
                "file",
                "long",
                LockOptions {
                    ttl: Some(Duration::from_secs(600)),
                    ..LockOptions::default()
                },
            )
            .await
            .expect("lock");
        let gone = m.acquire_lock(a, "file", "gone").await.expect("lock");
        m.release_lock(gone.lock_id).await.expect("release");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let app = app(m, by_role());
        let read = || async {
            let page: LocksPage = get(&app, &format!("{PREFIX}/api/v1/locks?held=false"), "admin")
                .await
                .json();
            page
        };
        let first = read().await;
        let by_key = |page: &LocksPage, key: &str| {
            page.locks
                .iter()
                .find(|l| l.resource_key == key)
                .cloned()
                .expect(key)
        };
        let expired = by_key(&first, "short");
        assert_eq!(expired.id, short.lock_id);
        assert_eq!(expired.state, demiarch_sessions::views::LockState::Expired);
        assert!(expired.ttl_remaining_ms.is_some_and(|ms| ms < 0));
        let held = by_key(&first, "long");
        assert_eq!(held.id, long.lock_id);
        assert!(held.ttl_remaining_ms.is_some_and(|ms| ms > 500_000));
        let released = by_key(&first, "gone");
        assert_eq!(
            released.release_reason,
            Some(demiarch_sessions::ReleaseReason::Released)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let second = read().await;
        assert_eq!(
            by_key(&second, "gone").held_for_ms,
            released.held_for_ms,
            "frozen at release"
        );
        assert!(by_key(&second, "long").held_for_ms >= held.held_for_ms + 50);
        // The page says it in words.
        let html = get(&app, &format!("{PREFIX}/locks?held=false"), "admin")
            .await
            .body;
        assert!(
            html.contains("expired") && html.contains("released (released)"),
            "{html}"
        );
        db.cleanup().await;
    })
    .await;
}

#[tokio::test]
async fn actions_write_their_audit_rows() {
    each_backend("web_actions", |db: TestDb| async move {
        let m = &db.manager;
        let (session, agent, lock) = session_with_lock(m, "k").await;
        let app = app(m, by_role());
        let finish = send(
            &app,
            "POST",
            &format!("{PREFIX}/api/v1/agents/{agent}/finish"),
            "admin",
            Some(serde_json::json!({"failed": "tests broke"})),
        )
        .await;
        assert_eq!(finish.status, StatusCode::OK, "{}", finish.body);
        let rows = common::agent_rows(&db, session).await;
        assert_eq!(rows[0].status, "failed");
        assert!(common::lock_rows(&db, session).await[0]
            .released_at
            .is_some());
        assert_eq!(
            common::audit_of(&db, session, "agent_finished").await.len(),
            1
        );
        let _ = lock;

        let pause = send(
            &app,
            "POST",
            &format!("{PREFIX}/api/v1/sessions/{session}/pause"),
            "admin",
            None,
        )
        .await;
        assert_eq!(pause.status, StatusCode::OK, "{}", pause.body);
        assert_eq!(common::session_row(&db, session).await.status, "paused");
        let paused = common::audit_of(&db, session, "session_paused").await;
        assert_eq!(paused[0].details["operator"]["via"], "dashboard");

        // A dry-run prune counts and deletes nothing.
        let before = common::snapshot(&db).await;
        let dry = send(
            &app,
            "POST",
            &format!("{PREFIX}/api/v1/prune"),
            "admin",
            Some(serde_json::json!({"audit_after": "1s", "dry_run": true})),
        )
        .await;
        assert_eq!(dry.status, StatusCode::OK, "{}", dry.body);
        assert_eq!(common::snapshot(&db).await, before);
        let bad = send(
            &app,
            "POST",
            &format!("{PREFIX}/api/v1/prune"),
            "admin",
            Some(serde_json::json!({"audit_after": "soon"})),
        )
        .await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
        assert!(bad.error().contains("audit_after"), "{}", bad.body);

        // The session's document and the audit page agree with the rows.
        let detail: SessionDetail = get(
            &app,
            &format!("{PREFIX}/api/v1/sessions/{session}"),
            "admin",
        )
        .await
        .json();
        assert_eq!(detail.session.status, SessionStatus::Paused);
        assert_eq!(detail.agents[0].id, agent);
        let audit: AuditPage = get(
            &app,
            &format!("{PREFIX}/api/v1/audit?session={session}&event=agent_finished"),
            "admin",
        )
        .await
        .json();
        assert_eq!(audit.events.len(), 1);
        assert_eq!(audit.events[0].event_type, AuditEvent::AgentFinished);
        let all = m
            .audit_events(AuditFilter {
                session_id: Some(session),
                ..Default::default()
            })
            .await
            .expect("audit");
        assert_eq!(detail.audit.len(), all.rows.len());
        let _ = RetentionPolicy::default();
        db.cleanup().await;
    })
    .await;
}

#[test]
fn the_committed_openapi_document_is_the_generated_one() {
    let generated = web::openapi_json();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
    if std::env::var_os("REGENERATE_OPENAPI").is_some() {
        std::fs::write(path, format!("{generated}\n")).expect("write docs/openapi.json");
    }
    let committed = std::fs::read_to_string(path).expect("docs/openapi.json");
    assert_eq!(
        committed.trim_end(),
        generated.trim_end(),
        "docs/openapi.json is stale: REGENERATE_OPENAPI=1 cargo test --test web"
    );
    let doc: Value = serde_json::from_str(&generated).expect("JSON");
    assert!(doc["openapi"].as_str().expect("version").starts_with("3.1"));
    for path in [
        "/api/v1/sessions",
        "/api/v1/sessions/{id}/end",
        "/api/v1/locks/{id}/release",
        "/api/v1/prune",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
}

/// Each (method, path, status) the contract documents, answered by one
/// request that reaches it.
#[tokio::test]
async fn every_documented_status_is_reachable() {
    use demiarch_sessions::entity::retention;
    use sea_orm::{ActiveModelTrait, ActiveValue::Set, EntityTrait};

    let db = TestDb::new(common::Backend::SqliteMemory).await;
    let m = &db.manager;
    let (alive, agent, lock) = session_with_lock(m, "reach").await;
    let ended = m.start_session().await.expect("start");
    let cancelled = m.register_agent(ended, "coder").await.expect("agent");
    m.end_session(ended).await.expect("end");
    let missing = Uuid::new_v4();

    let token = "a-token-of-32-characters-at-least";
    let full = app(m, Arc::new(TokenAccess::new(token).expect("token")));
    let read_only = app(
        m,
        Arc::new(TokenAccess::new(token).expect("token").read_only()),
    );
    let forbidden = app(m, Arc::new(|_: &Parts| Access::Forbidden));
    let call = |app: Router, method: &str, uri: String, body: Option<Value>, credentials: bool| {
        let method = method.to_owned();
        async move {
            let mut request = Request::builder()
                .method(method.as_str())
                .uri(uri)
                .header(header::HOST, "127.0.0.1:7878");
            if credentials {
                request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
            }
            let body = match body {
                Some(json) => Body::from(json.to_string()),
                None => Body::empty(),
            };
            app.oneshot(request.body(body).expect("request"))
                .await
                .expect("answer")
                .status()
                .as_u16()
        }
    };

    let doc: Value = serde_json::from_str(&web::openapi_json()).expect("contract");
    let mut documented = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("item") {
            for status in op["responses"].as_object().expect("responses").keys() {
                documented.push((method.to_uppercase(), path.clone(), status.clone()));
            }
        }
    }
    assert!(documented.len() > 30, "{documented:?}");
    for (method, path, status) in documented {
        let want: u16 = status.parse().expect("a status");
        let at = |id: &str| format!("{PREFIX}{}", path.replace("{id}", id));
        let (uri, body): (String, Option<Value>) = match (path.as_str(), want) {
            ("/api/v1/sessions/{id}/end", 200) => (at(&ended.to_string()), None),
            ("/api/v1/sessions/{id}/end", 409) => (at(&alive.to_string()), None),
            ("/api/v1/sessions/{id}/pause" | "/api/v1/sessions/{id}/unpause", 409) => {
                (at(&ended.to_string()), None)
            }
            ("/api/v1/agents/{id}/finish", 200) => (at(&agent.to_string()), None),
            ("/api/v1/agents/{id}/finish", 409) => (at(&cancelled.to_string()), None),
            (_, 413) => (
                at(&alive.to_string()),
                Some(serde_json::json!({"reason": "x".repeat(17 * 1024)})),
            ),
            ("/api/v1/locks/{id}/release", 200) => (
                at(&lock.to_string()),
                Some(serde_json::json!({"reason": "reach"})),
            ),
            ("/api/v1/locks/{id}/release", 404) => (
                at(&missing.to_string()),
                Some(serde_json::json!({"reason": "reach"})),
            ),
            (_, 200 | 401 | 403) => (at(&alive.to_string()), None),
            (_, 404) => (at(&missing.to_string()), None),
            (_, 400) if path.contains("{id}") => (at("zz"), None),
            ("/api/v1/recover", 400) => (format!("{}?stale_after=soon", at("")), None),
            ("/api/v1/prune", 400) => (at(""), Some(serde_json::json!({"audit_after": "soon"}))),
            ("/api/v1/audit", 400) => (format!("{}?after=-1", at("")), None),
            (_, 400) => (format!("{}?limit=0", at("")), None),
            ("/api/v1/audit", 410) => {
                let horizon = retention::Entity::find()
                    .one(m.connection())
                    .await
                    .expect("retention")
                    .expect("row");
                let mut raised: retention::ActiveModel = horizon.into();
                raised.compacted_through = Set(2);
                raised
                    .update(m.connection())
                    .await
                    .expect("raise the horizon");
                (format!("{}?after=0", at("")), None)
            }
            ("/api/v1/prune", 409) => {
                let row = retention::Entity::find()
                    .one(m.connection())
                    .await
                    .expect("retention")
                    .expect("row");
                let mut leased: retention::ActiveModel = row.into();
                leased.pruner = Set(Some("another instance".into()));
                leased.pruner_until = Set(Some(
                    (chrono::Utc::now() + chrono::Duration::hours(1)).into(),
                ));
                leased.update(m.connection()).await.expect("take the lease");
                (at(""), Some(serde_json::json!({"audit_after": "90d"})))
            }
            other => panic!("no request reaches {method} {path} {other:?}"),
        };
        let got = match want {
            401 => call(full.clone(), &method, uri.clone(), body, false).await,
            403 if method == "POST" => {
                call(read_only.clone(), &method, uri.clone(), body, true).await
            }
            403 => call(forbidden.clone(), &method, uri.clone(), body, true).await,
            _ => call(full.clone(), &method, uri.clone(), body, true).await,
        };
        assert_eq!(got, want, "{method} {uri}");
    }
    db.cleanup().await;
}

#[tokio::test]
async fn the_activity_charts_count_ends_and_granted_waits() {
    each_backend("activity", |db: TestDb| async move {
        let m = &db.manager;
        let s = m.start_session().await.expect("start");
        let holder = m.register_agent(s, "coder").await.expect("agent");
        let waiter = m.register_agent(s, "reviewer").await.expect("agent");
        let lock = m.acquire_lock(holder, "file", "w").await.expect("lock");
        let waiting = {
            let m = m.clone();
            tokio::spawn(async move {
                m.acquire_lock_with(
                    waiter,
                    "file",
                    "w",
                    LockOptions {
                        wait: Some(Duration::from_secs(10)),
                        ..LockOptions::default()
                    },
                )
                .await
            })
        };
        while m.lock_waiters("file", "w").await.expect("queue").is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        m.release_lock(lock.lock_id).await.expect("release");
        let granted = waiting
            .await
            .expect("task")
            .expect("granted after the wait");
        for _ in 0..2 {
            let ended = m.start_session().await.expect("start");
            m.end_session(ended).await.expect("end");
        }
        let rows = common::all_locks(&db).await;
        let waited: Vec<_> = rows.iter().filter(|l| l.waited_since.is_some()).collect();
        assert_eq!(waited.len(), 1, "{rows:?}");
        assert_eq!(waited[0].id, granted.lock_id.to_string());
        let app = app(m, by_role());
        let activity: demiarch_sessions::views::Activity =
            get(&app, &format!("{PREFIX}/api/v1/activity"), "admin")
                .await
                .json();
        assert_eq!(activity.ends.per_minute.len(), 60);
        assert_eq!(activity.ends.per_minute.iter().sum::<u64>(), 2);
        assert_eq!(activity.lock_waits.per_minute.iter().sum::<u64>(), 1);
        assert_eq!(activity.waiting_now, 0);
        let page = get(&app, PREFIX, "admin").await.body;
        assert!(
            page.contains("id=\"ends-chart\"") && page.contains("<rect"),
            "{page}"
        );
        db.cleanup().await;
    })
    .await;
}

/// The pages' counts are at most `aggregates_ttl` old: kept within it, read
/// again after it (zero reads them for every page).
#[tokio::test]
async fn counts_are_kept_for_the_aggregates_ttl_and_no_longer() {
    let db = TestDb::new(common::Backend::SqliteMemory).await;
    let m = &db.manager;
    let counted = |ttl: Duration| {
        web::router(
            Arc::new(m.clone()),
            WebOptions {
                access: by_role(),
                aggregates_ttl: ttl,
                ..WebOptions::default()
            },
        )
    };
    let kept = counted(Duration::from_secs(3600));
    let fresh = counted(Duration::ZERO);
    let active = |app: Router| async move {
        let page: SessionsPage = get(&app, "/api/v1/sessions", "admin").await.json();
        (page.counts.active, page.sessions.len())
    };
    assert_eq!(active(kept.clone()).await, (0, 0));
    m.start_session().await.expect("start");
    // The list is read fresh; the count is the one kept.
    assert_eq!(active(kept.clone()).await, (0, 1));
    assert_eq!(active(fresh.clone()).await, (1, 1));
    db.cleanup().await;
}
