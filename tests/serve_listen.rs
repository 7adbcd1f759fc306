//! `serve --listen` as an operator types it: a bare port, `localhost:PORT`
//! or `IP:PORT`; a port in use exits with its own code and says so.
#![cfg(feature = "cli")]

use std::io::BufRead;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_demiarch-sessions");

/// `serve --listen listen` on a fresh store; its first stderr line.
fn serve(url: &str, listen: &str) -> (std::process::Child, String) {
    let mut child = Command::new(BIN)
        .env_remove("DATABASE_URL")
        .env_remove("DEMIARCH_DASHBOARD_TOKEN")
        .args(["--database-url", url, "serve", "--listen", listen])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start serve");
    let mut line = String::new();
    std::io::BufReader::new(child.stderr.take().expect("stderr"))
        .read_line(&mut line)
        .expect("serve's first line");
    (child, line)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[tokio::test]
async fn a_bare_port_and_localhost_port_listen_on_loopback() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("l.db").display());
    for form in ["{port}", "localhost:{port}"] {
        let port = free_port();
        let (mut child, line) = serve(&url, &form.replace("{port}", &port.to_string()));
        assert!(
            line.contains(&format!("http://127.0.0.1:{port}/")),
            "{line}"
        );
        let answer = reqwest::get(format!("http://127.0.0.1:{port}/api/v1/sessions"))
            .await
            .expect("GET");
        assert_eq!(answer.status(), 200);
        let page: serde_json::Value = answer.json().await.expect("JSON");
        assert_eq!(page["counts"]["active"], 0);
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[test]
fn a_port_in_use_exits_9_and_says_so() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("u.db").display());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("address").port();
    let out = Command::new(BIN)
        .env_remove("DATABASE_URL")
        .args([
            "--database-url",
            &url,
            "serve",
            "--listen",
            &port.to_string(),
        ])
        .output()
        .expect("run serve");
    assert_eq!(out.status.code(), Some(9), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("127.0.0.1:{port}")) && stderr.contains("in use"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("database"),
        "blames the database: {stderr}"
    );
}

#[test]
fn a_listen_address_that_is_none_of_the_forms_is_refused_by_name() {
    let out = Command::new(BIN)
        .env_remove("DATABASE_URL")
        .args([
            "--database-url",
            "sqlite::memory:",
            "serve",
            "--listen",
            "localhost:http",
        ])
        .output()
        .expect("run serve");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--listen"), "{stderr}");
}
