//! The dashboard in a real browser: headless Chromium driven through
//! chromedriver (WebDriver), on `demiarch-sessions serve` over a temporary
//! SQLite file. Four flows: the sessions page, a click into one session,
//! End Session confirmed and seen completed with its locks released, and a
//! session ended by another process appearing in the live stream.
//!
//! Where `chromium` or `chromedriver` is missing (Debian's `chromium` and
//! `chromium-driver`; `.ci/run` installs them) the test says so in a line
//! and passes. With `DASHBOARD_SCREENSHOT=path.png` it also saves the
//! session page as a screenshot.
#![cfg(feature = "cli")]
mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use demiarch_sessions::{SessionManager, SessionStatus};
use fantoccini::{Client, ClientBuilder, Locator};
use uuid::Uuid;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn browser() -> (Killed, Client) {
    let port = free_port();
    let driver = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let driver = Killed(driver);
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match ClientBuilder::new(connector.clone())
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(client) => return (driver, client),
            Err(e) if tokio::time::Instant::now() < give_up => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("chromedriver did not start a browser: {e}"),
        }
    }
}

/// Waits, a bounded while, until the page's text of `css` contains `want`.
async fn until_text(client: &Client, css: &str, want: &str) -> String {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(element) = client.find(Locator::Css(css)).await {
            if let Ok(text) = element.text().await {
                if text.contains(want) {
                    return text;
                }
            }
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "{css} never showed {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_dashboard_in_a_real_browser() {
    for tool in [CHROMIUM, CHROMEDRIVER] {
        if !Path::new(tool).exists() {
            eprintln!(
                "the_dashboard_in_a_real_browser: SKIPPED: {tool} is missing (apt-get install chromium chromium-driver)"
            );
            return;
        }
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("b.db").display());
    let m = SessionManager::connect_with(&url, common::test_config())
        .await
        .expect("connect");
    let session = m.start_session().await.expect("start");
    let coder = m.register_agent(session, "coder").await.expect("agent");
    m.acquire_lock(coder, "file", "src/main.rs")
        .await
        .expect("lock");
    m.acquire_lock(coder, "file", "src/lib.rs")
        .await
        .expect("lock");
    m.contexts()
        .put(
            session,
            "plan",
            serde_json::json!({"step": 3, "todo": ["review"]}),
        )
        .expect("context");
    let (server, base) = common::serve(&url, &[]);
    let _server = Killed(server);
    let (_driver, client) = browser().await;

    // 1. The sessions page lists the session.
    client.goto(&format!("{base}/")).await.expect("open /");
    until_text(&client, "#sessions", &session.simple().to_string()[..8]).await;

    // 2. A click opens it: its agents and held locks.
    client
        .find(Locator::Css(&format!("a[href='/sessions/{session}']")))
        .await
        .expect("the session's link")
        .click()
        .await
        .expect("click");
    until_text(&client, "h1", &session.to_string()).await;
    until_text(&client, "#agents", "coder").await;
    until_text(&client, ".locks", "src/main.rs").await;
    if let Ok(path) = std::env::var("DASHBOARD_SCREENSHOT") {
        let png = client.screenshot().await.expect("screenshot");
        std::fs::write(&path, png).expect("write the screenshot");
    }

    // 3. End Session, confirmed: completed, its locks released, in the page
    // and in the database. Its owner (this test) still heartbeats: forced.
    client
        .find(Locator::Id("force"))
        .await
        .expect("force")
        .click()
        .await
        .expect("tick");
    client
        .find(Locator::Id("end"))
        .await
        .expect("End Session")
        .click()
        .await
        .expect("click");
    client.accept_alert().await.expect("confirm");
    until_text(&client, "#status", "completed").await;
    let locks = until_text(&client, ".locks", "released (session_end)").await;
    assert!(!locks.contains("held"), "{locks}");
    assert_eq!(
        m.session(session).await.expect("session").status,
        SessionStatus::Completed
    );

    // 4. The live stream shows an end made by another process (this one).
    client
        .goto(&format!("{base}/audit"))
        .await
        .expect("open /audit");
    until_text(&client, "#live", "session_end").await;
    let other: Uuid = m.start_session().await.expect("start");
    m.end_session(other).await.expect("end");
    // A row of its own: this end, not its start or the first session's end.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut found = false;
        for row in client
            .find_all(Locator::Css("#live tr"))
            .await
            .expect("rows")
        {
            let text = row.text().await.unwrap_or_default();
            found |= text.contains(&other.to_string()) && text.contains("session_end");
        }
        if found {
            break;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "the end of {other} never appeared live"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    client.close().await.expect("close the browser");
    m.close().await.expect("close");
}

#[allow(dead_code)]
#[path = "../examples/mounted_dashboard.rs"]
mod mounted;

/// Saves a screenshot into `DASHBOARD_SCREENSHOTS` (a directory), if set.
async fn screenshot(client: &Client, name: &str) {
    if let Ok(dir) = std::env::var("DASHBOARD_SCREENSHOTS") {
        let png = client.screenshot().await.expect("screenshot");
        std::fs::write(Path::new(&dir).join(name), png).expect("write the screenshot");
    }
}

/// The POST status a page's own script gets for `path` (under the mount point).
async fn post_from_page(client: &Client, path: &str) -> u64 {
    let script = "const done = arguments[arguments.length - 1];
        fetch(document.body.dataset.base + arguments[0], {method: 'POST', headers: {'Content-Type': 'application/json'}, body: '{}'})
          .then(r => done(r.status)).catch(() => done(0));";
    client
        .execute_async(script, vec![serde_json::json!(path)])
        .await
        .expect("script")
        .as_u64()
        .expect("a status")
}

/// Clicks `css`, finding it again if a live redraw replaced it between the
/// finding and the click.
async fn click(client: &Client, css: &str) {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let clicked = match client.find(Locator::Css(css)).await {
            Ok(element) => element.click().await.map(|_| ()),
            Err(e) => Err(e),
        };
        match clicked {
            Ok(()) => return,
            Err(e) if tokio::time::Instant::now() >= give_up => panic!("click {css}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// examples/mounted_dashboard.rs: the dashboard at /ops/sessions behind the
/// app's own login. A viewer sees every page and no action (and a POST of
/// its own is refused); an admin pauses, unpauses, finishes an agent,
/// force-releases a lock, ends a session, recovers and dry-runs a prune,
/// and watches an end made elsewhere arrive live. Every step is checked in
/// the database too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mounted_dashboard_under_a_prefix_in_a_real_browser() {
    use std::sync::Arc;
    for tool in [CHROMIUM, CHROMEDRIVER] {
        if !Path::new(tool).exists() {
            eprintln!(
                "the_mounted_dashboard_under_a_prefix_in_a_real_browser: SKIPPED: {tool} is missing (apt-get install chromium chromium-driver)"
            );
            return;
        }
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("m.db").display());
    let m = SessionManager::connect_with(&url, common::test_config())
        .await
        .expect("connect");
    let session = m.start_session().await.expect("start");
    let coder = m.register_agent(session, "coder").await.expect("agent");
    let reviewer = m.register_agent(session, "reviewer").await.expect("agent");
    let main_rs = m
        .acquire_lock(coder, "file", "src/main.rs")
        .await
        .expect("lock");
    m.acquire_lock(reviewer, "file", "src/lib.rs")
        .await
        .expect("lock");
    for _ in 0..3 {
        let s = m.start_session().await.expect("start");
        m.end_session(s).await.expect("end");
    }
    let port = free_port();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("listen");
    let app = mounted::app(Arc::new(m.clone()));
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let base = format!("http://127.0.0.1:{port}");
    let (_driver, client) = browser().await;

    // A viewer: every page, no action.
    client
        .goto(&format!("{base}/login?user=viewer"))
        .await
        .expect("login");
    until_text(&client, "#sessions", &session.simple().to_string()[..8]).await;
    assert!(
        client.find(Locator::Id("recover")).await.is_err(),
        "a viewer sees Recover"
    );
    click(
        &client,
        &format!("a[href='/ops/sessions/sessions/{session}']"),
    )
    .await;
    until_text(&client, "h1", &session.to_string()).await;
    assert!(
        client.find(Locator::Id("end")).await.is_err(),
        "a viewer sees End"
    );
    assert_eq!(
        post_from_page(&client, &format!("/api/v1/sessions/{session}/pause")).await,
        403
    );
    assert_eq!(
        m.session(session).await.expect("row").status,
        SessionStatus::Active
    );
    client
        .goto(&format!("{base}/ops/sessions/locks"))
        .await
        .expect("locks");
    until_text(&client, ".locks", "src/main.rs").await;
    assert!(client.find(Locator::Css("button.release")).await.is_err());

    // An admin.
    client
        .goto(&format!("{base}/login?user=admin"))
        .await
        .expect("login");
    until_text(&client, "#counts", "active").await;
    screenshot(&client, "dashboard-sessions.png").await;
    client
        .goto(&format!("{base}/ops/sessions/sessions/{session}"))
        .await
        .expect("session page");
    until_text(&client, "#agents", "reviewer").await;
    screenshot(&client, "dashboard-session.png").await;

    // Pause, then unpause.
    click(&client, "#pause").await;
    client.accept_alert().await.expect("confirm");
    until_text(&client, "#status", "paused").await;
    assert_eq!(
        m.session(session).await.expect("row").status,
        SessionStatus::Paused
    );
    click(&client, "#unpause").await;
    client.accept_alert().await.expect("confirm");
    until_text(&client, "#status", "active").await;
    assert_eq!(
        m.session(session).await.expect("row").status,
        SessionStatus::Active
    );

    // Finish the reviewer: its lock goes with it.
    click(&client, &format!("#agent-{reviewer} button.finish")).await;
    client.accept_alert().await.expect("confirm");
    until_text(&client, &format!("#agent-{reviewer} .outcome"), "completed").await;
    let agents = m.agents(session).await.expect("agents");
    let row = agents
        .rows
        .iter()
        .find(|a| a.id == reviewer)
        .expect("reviewer");
    assert_eq!(row.status, demiarch_sessions::AgentStatus::Completed);

    // Force-release the coder's lock, with a reason.
    client
        .goto(&format!("{base}/ops/sessions/locks"))
        .await
        .expect("locks");
    until_text(&client, ".locks", "src/main.rs").await;
    // Headless Chromium's WebDriver cannot type into a prompt(): the reason
    // is answered by the page's own prompt, replaced for this click.
    client
        .execute("window.prompt = () => 'stuck in the browser test';", vec![])
        .await
        .expect("answer the prompt");
    click(
        &client,
        &format!("tr[data-id='{}'] button.release", main_rs.lock_id),
    )
    .await;
    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let locks = m
            .locks(demiarch_sessions::LockFilter {
                lock_id: Some(main_rs.lock_id),
                ..Default::default()
            })
            .await
            .expect("locks");
        if locks.rows[0].released_at.is_some() {
            break;
        }
        if tokio::time::Instant::now() >= give_up {
            let message = match client.find(Locator::Id("message")).await {
                Ok(m) => m.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            panic!("the release never landed: {message:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    screenshot(&client, "dashboard-locks.png").await;

    // The audit page, live: an end made here by the test arrives.
    client
        .goto(&format!("{base}/ops/sessions/audit"))
        .await
        .expect("audit");
    until_text(&client, "#live", "lock_released").await;
    let other = m.start_session().await.expect("start");
    m.end_session(other).await.expect("end");
    until_text(&client, "#live", &other.to_string()).await;
    screenshot(&client, "dashboard-audit.png").await;

    // End the session, forced (this test's manager heartbeats for it).
    client
        .goto(&format!("{base}/ops/sessions/sessions/{session}"))
        .await
        .expect("session page");
    click(&client, "#force").await;
    click(&client, "#end").await;
    client.accept_alert().await.expect("confirm");
    until_text(&client, "#status", "completed").await;
    assert_eq!(
        m.session(session).await.expect("row").status,
        SessionStatus::Completed
    );

    // Recover (nothing is stale) and a dry-run prune, from the sessions page.
    client
        .goto(&format!("{base}/ops/sessions"))
        .await
        .expect("sessions");
    until_text(&client, "#counts", "completed").await;
    click(&client, "#recover").await;
    client.accept_alert().await.expect("confirm");
    until_text(&client, "#message", "Interrupted 0 sessions").await;
    let before = m
        .list_sessions(Default::default())
        .await
        .expect("list")
        .rows
        .len();
    click(&client, "details.act summary").await;
    client
        .find(Locator::Css("#prune input[name='completed_after']"))
        .await
        .expect("field")
        .send_keys("1s")
        .await
        .expect("type");
    click(&client, "#prune button").await;
    until_text(&client, "#message", "Would delete").await;
    assert_eq!(
        m.list_sessions(Default::default())
            .await
            .expect("list")
            .rows
            .len(),
        before
    );

    client.close().await.expect("close the browser");
    server.abort();
    m.close().await.expect("close");
}
