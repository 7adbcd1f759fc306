//! An agent that works only while it holds its lock: its work runs under
//! `tokio::select!` with `lock_lost`, and stops the moment the lock goes
//! (here its time to live runs out because nothing renews it).
//!
//! ```text
//! cargo run --example guarded_work
//! ```
use std::time::Duration;

use demiarch_sessions::{LockOptions, SessionManager};

#[tokio::main]
async fn main() -> demiarch_sessions::Result<()> {
    let manager = SessionManager::connect("sqlite::memory:").await?;
    let session = manager.start_session().await?;
    let agent = manager.register_agent(session, "coder").await?;
    let options = LockOptions {
        ttl: Some(Duration::from_millis(300)),
        ..LockOptions::default()
    };
    let grant = manager
        .acquire_lock_with(agent, "file", "src/main.rs", options)
        .await?;

    let work = async {
        for step in 1.. {
            // One step of work on src/main.rs, under fencing token
            // grant.fencing_token.
            println!("step {step} with token {}", grant.fencing_token);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        () = work => {}
        lost = manager.lock_lost(grant.lock_id) => {
            let lost = lost?;
            println!("stopped: the lock went ({}) at {}", lost.reason, lost.at);
        }
    }
    manager.end_session(session).await?;
    Ok(())
}
