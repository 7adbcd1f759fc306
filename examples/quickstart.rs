//! Opens (or creates) ./demiarch-sessions.db, runs one session through its
//! life and ends it, then prints the end report and the audit row as JSON.
//!
//! ```text
//! cargo run --example quickstart
//! ```
use demiarch_sessions::entity::audit_log;
use demiarch_sessions::SessionManager;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "sqlite://demiarch-sessions.db".to_owned());
    let manager = SessionManager::connect(&url).await?;

    let session = manager.start_session().await?;
    let coder = manager.register_agent(session, "coder").await?;
    let reviewer = manager.register_agent(session, "reviewer").await?;
    manager.acquire_lock(coder, "file", "src/main.rs").await?;
    manager.acquire_lock(coder, "file", "src/lib.rs").await?;
    manager
        .acquire_lock(reviewer, "branch", "feature/session-end")
        .await?;
    manager.contexts().put(
        session,
        "plan",
        json!({"goal": "end sessions cleanly", "step": 3}),
    )?;
    manager
        .contexts()
        .put(session, "notes", json!(["locks released", "context saved"]))?;

    let report = manager.end_session(session).await?;
    println!("{}", serde_json::to_string_pretty(&report)?);

    let audit = audit_log::Entity::find()
        .filter(audit_log::Column::SessionId.eq(session.to_string()))
        .filter(audit_log::Column::EventType.eq("session_end"))
        .one(manager.connection())
        .await?
        .ok_or("the session_end audit row is missing")?;
    let audit = json!({
        "id": audit.id,
        "event_type": audit.event_type,
        "event_time": audit.event_time,
        "session_id": audit.session_id,
        "details": audit.details,
    });
    println!("{}", serde_json::to_string_pretty(&audit)?);
    Ok(())
}
