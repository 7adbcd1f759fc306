//! `demiarch-sessions serve` driven over HTTP, as scripts and browsers use
//! it, on a temporary SQLite file: the API's documents are the CLI's, the
//! actions write their audit rows, and each security rule holds (tokens,
//! read-only, other sites, loopback, escaping, limits, one-line errors).
//! Rows are read back through the library.
#![cfg(feature = "cli")]
mod common;

use std::process::{Child, Command};
use std::time::Duration;

use demiarch_sessions::{AuditFilter, LockOptions, SessionManager, SessionStatus};
use serde_json::Value;
use tempfile::TempDir;
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_demiarch-sessions");
const TOKEN: &str = "a-token-of-32-characters-at-least";

struct Served {
    child: Child,
    base: String,
    url: String,
    _dir: TempDir,
}

impl Served {
    /// `serve` on a fresh database with `args`, once it listens.
    fn start(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("d.db").display());
        let (child, base) = common::serve(&url, args);
        Self {
            child,
            base,
            url,
            _dir: dir,
        }
    }

    fn cli(&self, args: &[&str]) -> Value {
        let out = Command::new(BIN)
            .env_remove("DATABASE_URL")
            .args(["--database-url", &self.url, "--json"])
            .args(args)
            .output()
            .expect("run the CLI");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("CLI JSON")
    }

    async fn manager(&self) -> SessionManager {
        SessionManager::connect_with(&self.url, common::test_config())
            .await
            .expect("connect")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

async fn get(url: &str) -> (u16, String) {
    let r = client().get(url).send().await.expect("GET");
    (r.status().as_u16(), r.text().await.expect("body"))
}

/// An error answer: the status and one JSON line `{"error": …}`.
fn assert_error(status: u16, body: &str, want: u16, needle: &str) {
    assert_eq!(status, want, "{body}");
    let doc: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    let line = doc["error"].as_str().expect("an error line");
    assert!(!line.contains('\n') && !line.contains("panicked"), "{line}");
    assert!(line.contains(needle), "{needle:?} not in {line:?}");
}

/// `doc` without what depends on the moment it was read (`now`, and the ages
/// and times left measured from it), so two reads of the same rows compare
/// equal.
fn timeless(doc: &Value) -> Value {
    match doc {
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .filter(|(key, _)| {
                    !matches!(
                        key.as_str(),
                        "now" | "heartbeat_age_ms" | "held_for_ms" | "ttl_remaining_ms"
                    )
                })
                .map(|(key, value)| (key.clone(), timeless(value)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(timeless).collect()),
        other => other.clone(),
    }
}

/// A session of another instance (its owner still heartbeats) with an agent holding `key`.
async fn session_with_lock(m: &SessionManager, key: &str) -> (Uuid, Uuid) {
    let s = m.start_session().await.expect("start");
    let a = m.register_agent(s, "coder").await.expect("agent");
    let lock = m
        .acquire_lock_with(a, "file", key, LockOptions::default())
        .await
        .expect("lock");
    (s, lock.lock_id)
}

#[tokio::test]
async fn the_api_returns_the_clis_documents_and_actions_write_their_audit_rows() {
    let served = Served::start(&[]);
    let m = served.manager().await;
    let (s, lock) = session_with_lock(&m, "src/main.rs").await;
    let base = &served.base;

    for (path, args) in [
        ("/api/v1/sessions", vec!["sessions", "list"]),
        ("/api/v1/locks?held=true", vec!["locks", "list", "--held"]),
        (
            "/api/v1/audit?after=0",
            vec!["audit", "tail", "--after", "0", "-n", "100"],
        ),
    ] {
        let (status, body) = get(&format!("{base}{path}")).await;
        assert_eq!(status, 200, "{path}: {body}");
        let api: Value = serde_json::from_str(&body).expect("JSON");
        assert!(api["now"].is_string() || path.starts_with("/api/v1/audit"));
        assert_eq!(
            timeless(&api),
            timeless(&served.cli(&args)),
            "{path} is the CLI's document"
        );
    }
    let (status, body) = get(&format!("{base}/api/v1/sessions/{s}")).await;
    assert_eq!(status, 200);
    let show: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        timeless(&show),
        timeless(&served.cli(&["sessions", "show", &s.to_string()])),
        "/api/v1/sessions/{{id}} is the CLI's document"
    );
    assert_eq!(show["session"]["alive"], true);
    assert_eq!(show["locks"][0]["resource_key"], "src/main.rs");
    assert_eq!(show["locks"][0]["state"], "held");

    // Ending refuses a live owner without force, and changes nothing.
    let end = format!("{base}/api/v1/sessions/{s}/end");
    let r = client().post(&end).send().await.expect("POST");
    let status = r.status().as_u16();
    assert_error(status, &r.text().await.expect("body"), 409, "heartbeat");
    assert_eq!(
        m.session(s).await.expect("session").status,
        SessionStatus::Active
    );
    // Releasing needs a reason.
    let release = format!("{base}/api/v1/locks/{lock}/release");
    let r = client()
        .post(&release)
        .json(&serde_json::json!({}))
        .send()
        .await
        .expect("POST");
    let status = r.status().as_u16();
    assert_error(status, &r.text().await.expect("body"), 400, "reason");
    let r = client()
        .post(&release)
        .json(&serde_json::json!({"reason": "stuck agent"}))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status().as_u16(), 200);
    let view = r.json::<Value>().await.expect("JSON");
    assert_eq!(view["id"], lock.to_string(), "{view}");
    assert_eq!(view["held"], false, "{view}");
    assert_eq!(view["state"], "released", "{view}");
    assert_eq!(view["release_reason"], "released", "{view}");
    let released = m
        .audit_events(AuditFilter {
            event_type: Some("lock_released".into()),
            ..AuditFilter::default()
        })
        .await
        .expect("audit")
        .rows;
    assert_eq!(released.len(), 1);
    assert_eq!(
        released[0].details["operator"],
        serde_json::json!({"action": "release_lock", "via": "dashboard", "reason": "stuck agent"})
    );
    assert_eq!(released[0].details["resource_key"], "src/main.rs");
    // Pausing and unpausing name the dashboard too; the page offers both.
    for (action, status) in [
        ("pause", SessionStatus::Paused),
        ("unpause", SessionStatus::Active),
    ] {
        let r = client()
            .post(format!("{base}/api/v1/sessions/{s}/{action}"))
            .json(&serde_json::json!({"reason": "maintenance"}))
            .send()
            .await
            .expect("POST");
        assert_eq!(r.status().as_u16(), 200, "{action}");
        assert_eq!(m.session(s).await.expect("session").status, status);
        let (_, page) = get(&format!("{base}/sessions/{s}")).await;
        let offered = match status {
            SessionStatus::Paused => "id=\"unpause\"",
            _ => "id=\"pause\"",
        };
        assert!(page.contains(offered), "{action}: {page}");
    }
    let pauses = m
        .audit_events(AuditFilter {
            session_id: Some(s),
            event_type: Some("session_paused".into()),
            ..AuditFilter::default()
        })
        .await
        .expect("audit")
        .rows;
    assert_eq!(pauses[0].details["operator"]["via"], "dashboard");
    assert_eq!(pauses[0].details["operator"]["reason"], "maintenance");
    // Forced, the end goes through and names the dashboard.
    let r = client()
        .post(format!("{end}?force=true"))
        .send()
        .await
        .expect("POST");
    assert_eq!(
        r.status().as_u16(),
        200,
        "{}",
        r.text().await.unwrap_or_default()
    );
    assert_eq!(
        m.session(s).await.expect("session").status,
        SessionStatus::Completed
    );
    let ends = m
        .audit_events(AuditFilter {
            session_id: Some(s),
            event_type: Some("session_end".into()),
            ..AuditFilter::default()
        })
        .await
        .expect("audit")
        .rows;
    assert_eq!(ends[0].details["operator"]["via"], "dashboard");
    assert_eq!(ends[0].details["operator"]["action"], "end_session");

    // /metrics is Prometheus text, with the store's gauges counted.
    let (status, body) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("demiarch_sessions_active_sessions 0"),
        "{body}"
    );
    assert!(
        body.contains("demiarch_sessions_ends_total{outcome=\"ended\"} 1"),
        "{body}"
    );
    m.close().await.expect("close");
}

#[tokio::test]
async fn the_live_stream_delivers_an_end_made_by_another_process() {
    let served = Served::start(&[]);
    let m = served.manager().await;
    let (s, _) = session_with_lock(&m, "a").await;
    let mut events = client()
        .get(format!("{}/events", served.base))
        .send()
        .await
        .expect("GET /events");
    assert_eq!(events.status().as_u16(), 200);
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    // Another process ends the session while the stream is open.
    tokio::time::sleep(Duration::from_millis(300)).await;
    m.end_session(s).await.expect("end");
    let mut seen = String::new();
    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    while !seen.contains("session_end") {
        let chunk = tokio::time::timeout_at(give_up, events.chunk())
            .await
            .expect("an event within 20 s")
            .expect("read")
            .expect("more");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let data = seen
        .lines()
        .find(|l| l.starts_with("data:") && l.contains("session_end"))
        .expect("a data line");
    let event: Value = serde_json::from_str(data.trim_start_matches("data:").trim()).expect("JSON");
    assert_eq!(event["session_id"], s.to_string());
    assert!(
        seen.contains(&format!("id: {}", event["seq"])),
        "the SSE id is the seq: {seen}"
    );
    m.close().await.expect("close");
}

#[tokio::test]
async fn a_token_is_required_everywhere_and_a_wrong_one_changes_nothing() {
    let served = Served::start(&["--token", TOKEN]);
    let m = served.manager().await;
    let (s, _) = session_with_lock(&m, "a").await;
    let base = &served.base;
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    // Data answers 401; a page sends the browser to the login form, and
    // shows nothing of the store.
    for path in [
        "/api/v1/sessions",
        &format!("/api/v1/sessions/{s}"),
        "/api/v1/locks",
        "/api/v1/audit",
        "/metrics",
        "/events",
    ] {
        let (status, body) = get(&format!("{base}{path}")).await;
        assert_error(status, &body, 401, "token");
    }
    for path in ["/", "/locks", "/audit", &format!("/sessions/{s}")] {
        let r = no_redirects
            .get(format!("{base}{path}"))
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status().as_u16(), 303, "{path}");
        assert_eq!(r.headers()["location"], "/login", "{path}");
        assert!(r.headers().get("set-cookie").is_none(), "{path}");
        let (status, page) = get(&format!("{base}{path}")).await;
        assert_eq!(status, 200, "{path}: the login form");
        assert!(page.contains("name=\"token\""), "{path}: {page}");
        assert!(!page.contains(&s.to_string()), "{path} shows the store");
    }
    for auth in ["Bearer wrong", "", "Basic abc"] {
        let r = client()
            .post(format!("{base}/api/v1/sessions/{s}/end?force=true"))
            .header("Authorization", auth)
            .send()
            .await
            .expect("POST");
        let status = r.status().as_u16();
        assert_error(status, &r.text().await.expect("body"), 401, "token");
    }
    assert_eq!(
        m.session(s).await.expect("session").status,
        SessionStatus::Active,
        "nothing changed"
    );
    let r = client()
        .get(format!("{base}/api/v1/sessions"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status().as_u16(), 200);
    // A token in a URL is no login (it would stay in histories and logs):
    // the form is shown, and no cookie is set.
    let r = no_redirects
        .get(format!("{base}/login?token={TOKEN}"))
        .send()
        .await
        .expect("login");
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers().get("set-cookie").is_none());
    // A browser logs in once by posting the form; the cookie is HttpOnly and
    // SameSite=Strict, and it is sent on to the sessions page.
    let r = no_redirects
        .post(format!("{base}/login"))
        .form(&[("token", TOKEN)])
        .send()
        .await
        .expect("login");
    assert_eq!(r.status().as_u16(), 303);
    assert_eq!(r.headers()["location"], "/");
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .expect("cookie")
        .to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let r = client()
        .get(format!("{base}/"))
        .header("Cookie", cookie.split(';').next().expect("pair"))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status().as_u16(), 200);
    let page = r.text().await.expect("body");
    assert!(
        page.contains(&s.to_string()),
        "the session is listed: {page}"
    );
    // A wrong token is refused with the form again, and no cookie.
    let r = no_redirects
        .post(format!("{base}/login"))
        .form(&[("token", "wrong")])
        .send()
        .await
        .expect("login");
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    assert!(r.text().await.expect("body").contains("Wrong token"));
    // A login posted from another site is refused like any change.
    let r = no_redirects
        .post(format!("{base}/login"))
        .header("Origin", "http://evil.example")
        .form(&[("token", TOKEN)])
        .send()
        .await
        .expect("login");
    let status = r.status().as_u16();
    assert_error(status, &r.text().await.expect("body"), 403, "another site");
    assert_eq!(
        m.session(s).await.expect("session").status,
        SessionStatus::Active,
        "nothing changed"
    );
    m.close().await.expect("close");
}

#[tokio::test]
async fn read_only_hides_and_refuses_every_action() {
    let served = Served::start(&["--read-only"]);
    let m = served.manager().await;
    let (s, lock) = session_with_lock(&m, "a").await;
    let base = &served.base;
    for path in [
        format!("/api/v1/sessions/{s}/end?force=true"),
        format!("/api/v1/locks/{lock}/release"),
        "/api/v1/recover".to_owned(),
    ] {
        let r = client()
            .post(format!("{base}{path}"))
            .json(&serde_json::json!({"reason": "x"}))
            .send()
            .await
            .expect("POST");
        let status = r.status().as_u16();
        assert_error(status, &r.text().await.expect("body"), 403, "read-only");
    }
    assert_eq!(
        m.session(s).await.expect("session").status,
        SessionStatus::Active
    );
    assert!(m.locks(Default::default()).await.expect("locks").rows[0]
        .released_at
        .is_none());
    for path in [
        "/".to_owned(),
        format!("/sessions/{s}"),
        "/locks".to_owned(),
    ] {
        let (status, page) = get(&format!("{base}{path}")).await;
        assert_eq!(status, 200);
        for button in ["End Session", "Force release", "Recover stale"] {
            assert!(
                !page.contains(button),
                "{path} shows {button:?} in read-only mode"
            );
        }
    }
    m.close().await.expect("close");
}

#[tokio::test]
async fn requests_from_another_site_are_refused_and_change_nothing() {
    let served = Served::start(&[]);
    let m = served.manager().await;
    let (s, _) = session_with_lock(&m, "a").await;
    let end = format!("{}/api/v1/sessions/{s}/end?force=true", served.base);
    for (name, value) in [
        ("Origin", "http://evil.example"),
        ("Origin", "null"),
        ("Sec-Fetch-Site", "cross-site"),
    ] {
        let r = client()
            .post(&end)
            .header(name, value)
            .send()
            .await
            .expect("POST");
        let status = r.status().as_u16();
        assert_error(status, &r.text().await.expect("body"), 403, "another site");
    }
    assert_eq!(
        m.session(s).await.expect("session").status,
        SessionStatus::Active
    );
    // A page of another site whose name now points here (DNS rebinding)
    // sends its own name as Host: without a token nothing is served to it.
    let port = served.base.rsplit(':').next().expect("port").to_owned();
    for (method, path) in [
        (reqwest::Method::GET, "/api/v1/sessions".to_owned()),
        (
            reqwest::Method::POST,
            format!("/api/v1/sessions/{s}/end?force=true"),
        ),
    ] {
        let r = client()
            .request(method, format!("{}{path}", served.base))
            .header("Host", format!("evil.example:{port}"))
            .header("Origin", format!("http://evil.example:{port}"))
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        assert_error(status, &r.text().await.expect("body"), 403, "127.0.0.1");
    }
    assert_eq!(
        m.session(s).await.expect("session").status,
        SessionStatus::Active
    );
    // The dashboard's own page may.
    let origin = served.base.clone();
    let r = client()
        .post(&end)
        .header("Origin", origin)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status().as_u16(), 200);
    m.close().await.expect("close");
}

#[tokio::test]
async fn stored_values_are_escaped_and_limits_and_errors_are_one_line() {
    let served = Served::start(&[]);
    let m = served.manager().await;
    let evil = "<script>alert(1)</script>";
    let s = m.start_session().await.expect("start");
    let a = m.register_agent(s, evil).await.expect("agent");
    m.acquire_lock(a, "file", evil).await.expect("lock");
    let base = &served.base;
    for path in ["/locks".to_owned(), format!("/sessions/{s}")] {
        let (_, page) = get(&format!("{base}{path}")).await;
        assert!(!page.contains(evil), "{path} renders the key as markup");
        assert!(
            page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{path} renders it as text"
        );
    }
    let (status, body) = get(&format!("{base}/api/v1/sessions?limit=501")).await;
    assert_error(status, &body, 400, "limit");
    let (status, body) = get(&format!("{base}/api/v1/sessions?status=finished")).await;
    assert_error(status, &body, 400, "status");
    let (status, body) = get(&format!("{base}/api/v1/sessions/not-an-id")).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = get(&format!("{base}/api/v1/sessions/{}", Uuid::new_v4())).await;
    assert_error(status, &body, 404, "not found");
    let huge = serde_json::json!({ "reason": "x".repeat(64 * 1024) });
    let r = client()
        .post(format!("{base}/api/v1/locks/{}/release", Uuid::new_v4()))
        .json(&huge)
        .send()
        .await
        .expect("POST");
    let status = r.status().as_u16();
    assert_error(status, &r.text().await.expect("body"), 413, "");
    // Paging is by cursor: one the store did not give out, or numbers out of
    // range, are refused naming their parameter.
    for (path, field) in [
        ("/api/v1/sessions?cursor=garbage", "cursor"),
        ("/api/v1/locks?cursor=garbage", "cursor"),
        ("/api/v1/audit?cursor=-3", "cursor"),
        ("/api/v1/sessions?limit=18446744073709551616", "limit"),
        ("/api/v1/audit?after=9223372036854775808", "after"),
        ("/api/v1/audit?after=-1", "after"),
        ("/api/v1/sessions?limit=abc", "limit"),
    ] {
        let (status, body) = get(&format!("{base}{path}")).await;
        assert_error(status, &body, 400, field);
    }
    // No other site may frame the pages.
    let r = client().get(format!("{base}/")).send().await.expect("GET");
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    let (status, _) = get(&format!("{base}/no/such/page")).await;
    assert_eq!(status, 404);
    m.close().await.expect("close");
}

#[test]
fn it_refuses_to_listen_beyond_loopback_without_a_token() {
    let out = Command::new(BIN)
        .env_remove("DEMIARCH_DASHBOARD_TOKEN")
        .args([
            "--database-url",
            "sqlite::memory:",
            "serve",
            "--listen",
            "0.0.0.0:0",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--token"), "{stderr}");
}
