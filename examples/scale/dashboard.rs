//! `--dashboard`: the dashboard (`demiarch-sessions serve`, spawned from
//! `$DEMIARCH_SESSIONS_BIN`, else `target/release/demiarch-sessions`) on a
//! database with the first `--background` count of sessions (2 agents x 5
//! locks each). One JSON line per case, `--iters` requests each after 3
//! warm-up ones, timed from send to the whole body:
//!
//! - `sessions-page`: `GET /` (the newest 50 sessions, rendered);
//! - `api-sessions`: `GET /api/v1/sessions` (the same 50, as JSON);
//! - `api-sessions-deep`: `GET /api/v1/sessions?cursor=…` of the page half
//!   way down (cursor paging: as cheap as the first);
//! - `sessions-page-deep`: the same page, rendered;
//! - `sessions-page-filtered`: `GET /?status=completed&agent_type=coder`;
//! - `locks-page`, `audit-page`: `GET /locks`, `GET /audit`;
//! - `session-page`: `GET /sessions/{id}` of a background session;
//! - `live-stream`: from `end_session`'s return (in this process) to the
//!   `/events` stream's delivery of its event to this client, over
//!   `--iters / 10` ends.
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use demiarch_sessions::SessionFilter;
use serde::Serialize;

use crate::args::Args;
use crate::fixture::BoxResult;
use crate::open_populated;
use crate::report::{peak_rss_kb, print_json, summarize};

const OP: &str = "dashboard";

#[derive(Debug, Serialize)]
struct Line {
    op: &'static str,
    backend: &'static str,
    case: &'static str,
    sessions: u64,
    iters: usize,
    p50_us: f64,
    p99_us: f64,
    peak_rss_kb: u64,
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(url: &str) -> BoxResult<(Server, String)> {
    let bin = std::env::var("DEMIARCH_SESSIONS_BIN")
        .unwrap_or_else(|_| "target/release/demiarch-sessions".to_owned());
    let mut child = Command::new(&bin)
        .args(["--database-url", url, "serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {bin} (build it: cargo build --release): {e}"))?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let server = Server(child);
    let mut line = String::new();
    BufReader::new(stderr).read_line(&mut line)?;
    let base = line
        .split("on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(|b| b.trim_end_matches('/').to_owned())
        .ok_or_else(|| format!("no address in {line:?}"))?;
    Ok((server, base))
}

pub async fn run(args: &Args) -> BoxResult<()> {
    let sessions = args.background[0];
    let fx = open_populated(args, sessions).await?;
    let outcome = cases(args, &fx.manager, fx.url(), sessions).await;
    fx.close().await?;
    outcome
}

async fn cases(
    args: &Args,
    manager: &demiarch_sessions::SessionManager,
    url: &str,
    sessions: u64,
) -> BoxResult<()> {
    let (_server, base) = serve(url)?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let some = manager
        .list_sessions(SessionFilter {
            limit: Some(1),
            offset: sessions / 3,
            ..SessionFilter::default()
        })
        .await?
        .rows;
    let one = some.first().ok_or("no background session")?.id;
    // The cursor the page before the middle one hands out.
    let middle = manager
        .list_sessions(SessionFilter {
            limit: Some(1),
            offset: sessions / 2,
            ..SessionFilter::default()
        })
        .await?
        .rows;
    let middle = middle.first().ok_or("no background session")?;
    let cursor = format!("{}.{}", middle.started_at.timestamp_micros(), middle.id);
    let line = |case, samples: &[Duration]| {
        let (p50_us, p99_us) = summarize(samples);
        Line {
            op: OP,
            backend: args.backend.name(),
            case,
            sessions,
            iters: samples.len(),
            p50_us,
            p99_us,
            peak_rss_kb: peak_rss_kb(),
        }
    };
    for (case, path) in [
        ("sessions-page", "/".to_owned()),
        ("api-sessions", "/api/v1/sessions".to_owned()),
        (
            "api-sessions-deep",
            format!("/api/v1/sessions?cursor={cursor}"),
        ),
        ("sessions-page-deep", format!("/?cursor={cursor}")),
        (
            "sessions-page-filtered",
            "/?status=completed&agent_type=coder".to_owned(),
        ),
        ("locks-page", "/locks".to_owned()),
        ("audit-page", "/audit".to_owned()),
        ("session-page", format!("/sessions/{one}")),
    ] {
        let mut samples = Vec::with_capacity(args.iters);
        for round in 0..crate::WARMUP + args.iters {
            let started = Instant::now();
            let response = client.get(format!("{base}{path}")).send().await?;
            let status = response.status();
            let body = response.bytes().await?;
            if !status.is_success() {
                return Err(format!("{path}: {status}: {}", String::from_utf8_lossy(&body)).into());
            }
            if round >= crate::WARMUP {
                samples.push(started.elapsed());
            }
        }
        print_json(&line(case, &samples))?;
    }

    let mut events = client.get(format!("{base}/events")).send().await?;
    let mut samples = Vec::new();
    let mut seen = String::new();
    for _ in 0..(args.iters / 10).max(5) {
        let session = manager.start_session().await?;
        manager.end_session(session).await?;
        let returned = Instant::now();
        let id = session.to_string();
        loop {
            let done = seen
                .lines()
                .any(|l| l.contains(&id) && l.contains("\"session_end\""));
            if done {
                break;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), events.chunk())
                .await
                .map_err(|_| "no event within 10 s")??
                .ok_or("the stream ended")?;
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
        samples.push(returned.elapsed());
        seen.clear();
    }
    print_json(&line("live-stream", &samples))?;
    Ok(())
}
