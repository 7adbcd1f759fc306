//! `serve` under a flood of idle, unauthenticated connections: an operator's
//! authenticated request is still answered at once, and the idle
//! connections are closed (made room for, or timed out) within the header
//! timeout. The server runs under a 1 024 open-files limit, as it commonly
//! would, and the flood is larger than that.
#![cfg(feature = "cli")]
mod common;

use std::process::Child;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "a-token-of-32-characters-at-least";

struct Served {
    child: Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `serve --token` with `args`, under `ulimit -n 1024`, once it listens.
fn serve(args: &[&str]) -> Served {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("d.db").display());
    let args: Vec<&str> = ["--token", TOKEN]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    let (child, base) = common::serve_limited(&url, &args, Some(1024));
    Served {
        child,
        address: base.trim_start_matches("http://").to_owned(),
        _dir: dir,
    }
}

/// Opens `n` connections that each send half a request and then nothing.
async fn idle_connections(address: &str, n: usize) -> Vec<TcpStream> {
    let mut idle = Vec::with_capacity(n);
    for _ in 0..n {
        let mut stream = TcpStream::connect(address).await.expect("connect");
        stream
            .write_all(b"GET /api/v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            .await
            .expect("half a request");
        idle.push(stream);
    }
    idle
}

/// An authenticated API request; its status and how long it took.
async fn authenticated(address: &str) -> (u16, Duration) {
    let started = Instant::now();
    let response = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
        .get(format!("http://{address}/api/v1/sessions"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("the authenticated request is answered");
    (response.status().as_u16(), started.elapsed())
}

/// Whether the server has closed this connection (end of file or reset),
/// waiting at most `within`.
async fn closed(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A 408 or similar before the close: keep reading.
            Ok(Ok(_)) => continue,
        }
    }
}

/// This process's soft open-files limit, which the flood must stay under.
fn own_file_limit() -> usize {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|soft| soft.parse().ok())
        .unwrap_or(1_024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_past_the_file_limit_do_not_lock_an_operator_out() {
    let served = serve(&[]);
    let flood = 1_100.min(own_file_limit().saturating_sub(200));
    let mut idle = idle_connections(&served.address, flood).await;
    let (status, took) = authenticated(&served.address).await;
    eprintln!("defaults, {flood} idle connections: the authenticated request took {took:?}");
    assert_eq!(status, 200, "the authenticated request is served");
    assert!(
        took < Duration::from_secs(2),
        "the authenticated request waited {took:?} behind idle connections"
    );
    // The default header timeout is 10 s: every idle connection is closed
    // by then (most much sooner, to make room).
    let started = Instant::now();
    for stream in &mut idle {
        let left = Duration::from_secs(12).saturating_sub(started.elapsed());
        assert!(
            closed(stream, left).await,
            "an idle connection outlived the header timeout"
        );
    }
    eprintln!(
        "all {flood} idle connections closed within {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_timeout_and_connection_cap_are_configurable() {
    let served = serve(&["--header-timeout", "1s", "--max-connections", "16"]);
    let mut idle = idle_connections(&served.address, 8).await;
    // Under the cap nothing is made room for: the idle ones are closed by
    // the header timeout, not before.
    let started = Instant::now();
    assert!(
        !closed(&mut idle[0], Duration::from_millis(300)).await,
        "closed before its timeout"
    );
    for stream in &mut idle {
        let left = Duration::from_secs(3).saturating_sub(started.elapsed());
        assert!(
            closed(stream, left).await,
            "an idle connection outlived a 1 s header timeout"
        );
    }
    let waited = started.elapsed();
    eprintln!("8 idle connections closed by a 1 s header timeout after {waited:?}");
    assert!(
        waited >= Duration::from_millis(700),
        "closed after {waited:?}, before the timeout"
    );
    // A kept-alive connection that goes idle after its response is closed too.
    let mut kept = TcpStream::connect(&served.address).await.expect("connect");
    let request = format!(
        "GET /api/v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    );
    kept.write_all(request.as_bytes()).await.expect("request");
    assert!(
        closed(&mut kept, Duration::from_secs(3)).await,
        "a kept-alive idle connection stayed open"
    );
    // Connections kept alive after a complete (refused) request are idle
    // too: at the cap they make room as well.
    let mut kept_alive = Vec::new();
    for _ in 0..16 {
        let mut stream = TcpStream::connect(&served.address).await.expect("connect");
        stream
            .write_all(b"GET /api/v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .expect("an unauthenticated request");
        let mut answer = [0u8; 12];
        stream.read_exact(&mut answer).await.expect("its answer");
        assert_eq!(&answer, b"HTTP/1.1 401", "refused without the token");
        kept_alive.push(stream);
    }
    let (status, took) = authenticated(&served.address).await;
    assert_eq!(status, 200, "kept-alive idle connections made room");
    assert!(took < Duration::from_secs(2), "waited {took:?}");
    drop(kept_alive);
    // Over the cap, the oldest idle connection makes room, and a request
    // is answered.
    let mut idle = idle_connections(&served.address, 40).await;
    let (status, took) = authenticated(&served.address).await;
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(2), "waited {took:?}");
    assert!(
        closed(&mut idle[0], Duration::from_millis(500)).await,
        "the oldest idle connection was not closed to make room"
    );
}
