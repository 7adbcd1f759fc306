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
    until_text(&client, "#sessions", &session.to_string()).await;

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
