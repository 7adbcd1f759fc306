//! The app's "session ended" hook: a change feed of `session_end` and
//! `session_interrupted` events that prints what each one released, and
//! keeps its cursor in a file so a restart resumes where it stopped, without
//! missing or repeating an event.
//!
//! ```text
//! cargo run --example watch                          # a demo on watch-demo.db
//! cargo run --example watch -- sqlite://sessions.db --follow
//! ```
//!
//! With no `--follow` it makes its own events on the database first (a
//! session ended by this manager, and one that another instance stopped
//! heartbeating, interrupted by `recover_stale`), prints them, and exits.
//! With `--follow` it only watches, until Ctrl-C: end sessions from another
//! terminal with `demiarch-sessions sessions end ID` and watch them arrive.
use std::error::Error;
use std::path::PathBuf;
use std::time::Duration;

use demiarch_sessions::{AuditEvent, AuditFilter, AuditRecord, SessionManager, WatchOptions};
use futures::StreamExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .filter(|a| a != "--follow")
        .unwrap_or_else(|| "sqlite://watch-demo.db".to_owned());
    let follow = std::env::args().any(|a| a == "--follow");
    let manager = SessionManager::connect(&url).await?;

    // The cursor: the seq of the last event this hook handled.
    let cursor_file = cursor_path(&url);
    let after = match std::fs::read_to_string(&cursor_file) {
        Ok(text) => text.trim().parse::<i64>()?,
        // First run: from the events that commit from now on.
        Err(_) => {
            let newest = manager
                .audit_events(AuditFilter {
                    limit: Some(1),
                    ..AuditFilter::default()
                })
                .await?
                .rows;
            newest.first().map_or(0, |e| e.seq)
        }
    };
    println!("watching {url} after seq {after}");
    let mut ended = Box::pin(manager.watch(WatchOptions {
        after: Some(after),
        event_types: vec!["session_end".into(), "session_interrupted".into()],
        ..WatchOptions::default()
    }));

    let expected = if follow {
        usize::MAX
    } else {
        make_events(&manager, &url).await?
    };
    let mut seen = 0;
    while seen < expected {
        let next = tokio::select! {
            next = ended.next() => next,
            _ = tokio::signal::ctrl_c() => break,
        };
        match next {
            Some(Ok(event)) => {
                on_session_ended(&event);
                // Stored after handling: a crash in between repeats this one
                // event on restart, never skips it.
                std::fs::write(&cursor_file, event.seq.to_string())?;
                seen += 1;
            }
            // The feed retries by itself from its last seq.
            Some(Err(e)) => eprintln!("watch: {e}; retrying"),
            None => break,
        }
    }
    manager.close().await?;
    Ok(())
}

/// What the app would do: refresh its views, notify the user…
fn on_session_ended(event: &AuditRecord) {
    let d = &event.details;
    let session = event
        .session_id
        .map_or_else(|| "?".to_owned(), |id| id.to_string());
    match event.event_type {
        AuditEvent::SessionEnd => println!(
            "seq {}: session {session} ended: released {} locks, cancelled {} agents, \
             saved {} context windows ({} bytes) in {} ms",
            event.seq,
            d["locks_released"],
            d["agents_cancelled"],
            d["context_windows"],
            d["context_bytes"],
            d["cleanup_ms"],
        ),
        _ => println!(
            "seq {}: session {session} interrupted (its owner stopped heartbeating): \
             released {} locks, cancelled {} agents",
            event.seq, d["locks_released"], d["agents_cancelled"],
        ),
    }
}

/// A session ended here, and one of another instance that stops
/// heartbeating, recovered by this one; returns how many events follow.
async fn make_events(manager: &SessionManager, url: &str) -> Result<usize, Box<dyn Error>> {
    let session = manager.start_session().await?;
    let coder = manager.register_agent(session, "coder").await?;
    manager.acquire_lock(coder, "file", "src/main.rs").await?;
    manager.acquire_lock(coder, "file", "src/lib.rs").await?;
    manager.end_session(session).await?;
    if url.contains(":memory:") {
        return Ok(1);
    }
    let other = SessionManager::connect(url).await?;
    let crashed = other.start_session().await?;
    let reviewer = other.register_agent(crashed, "reviewer").await?;
    other.acquire_lock(reviewer, "file", "README.md").await?;
    // The other instance goes away without ending its session.
    other.close().await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    manager.recover_stale(Duration::from_millis(100)).await?;
    Ok(2)
}

/// `watch-demo.db` keeps its cursor in `watch-demo.db.cursor`.
fn cursor_path(url: &str) -> PathBuf {
    let file = url
        .strip_prefix("sqlite://")
        .map(|p| p.split('?').next().unwrap_or(p))
        .filter(|p| !p.contains(":memory:"))
        .unwrap_or("watch");
    PathBuf::from(format!("{file}.cursor"))
}
