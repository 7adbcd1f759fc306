//! The `lock_deadlock` audit row of a refused wait.
//!
//! A wait that would close a waits-for cycle is refused in the transaction
//! that found the cycle, which rolls back: no lock or queue row changes.
//! The refusal is then recorded in a short transaction of its own, which
//! writes only the audit row. Should that write fail, the refusal stands
//! and the failure is logged: the caller gets `Error::Deadlock` either way.
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::entity::prelude::TextUuid;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect};
use serde::Serialize;
use uuid::Uuid;

use entity::agent_executions;

use super::queue::Link;
use crate::audit::{self, AuditEvent};
use crate::{db, Result};

/// One agent of the cycle as the audit row names it.
#[derive(Serialize)]
struct Member<'a> {
    agent_id: Uuid,
    /// `None` if the agent row could not be read.
    agent_type: Option<String>,
    session_id: Option<String>,
    /// The resource it waits for (the refused agent: asked to wait for).
    waits_for: Waited<'a>,
}

/// A resource of the cycle and the lock on it that the next agent holds.
#[derive(Serialize)]
struct Waited<'a> {
    resource_type: &'a str,
    resource_key: &'a str,
    lock_id: &'a str,
    fencing_token: i64,
    held_by: &'a str,
}

/// Writes the `lock_deadlock` row of `agent_id`'s refused wait (its session
/// `session_id`), naming the cycle `links`, in a transaction of its own;
/// whether it was written. A failure is logged, not returned.
pub(crate) async fn record(
    store: &db::Store,
    agent_id: Uuid,
    session_id: Uuid,
    links: &[Link],
    at: DateTime<Utc>,
) -> bool {
    match append(store, agent_id, session_id, links, at).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(
                error = %e,
                %agent_id,
                "a wait was refused as a deadlock, but its lock_deadlock audit row could not be \
                 written"
            );
            false
        }
    }
}

async fn append(
    store: &db::Store,
    agent_id: Uuid,
    session_id: Uuid,
    links: &[Link],
    at: DateTime<Utc>,
) -> Result<()> {
    let txn = db::begin_write(store).await?;
    let agents = agents_of(&*txn, links).await?;
    let cycle: Vec<Member<'_>> = links
        .iter()
        .map(|link| {
            let (agent_type, session_id) = match agents.get(&link.agent_id.to_string()) {
                Some((agent_type, session_id)) => {
                    (Some(agent_type.clone()), Some(session_id.clone()))
                }
                None => (None, None),
            };
            Member {
                agent_id: link.agent_id,
                agent_type,
                session_id,
                waits_for: Waited {
                    resource_type: &link.resource.0,
                    resource_key: &link.resource.1,
                    lock_id: &link.held.id,
                    fencing_token: link.held.fencing_token,
                    held_by: &link.held.agent_id,
                },
            }
        })
        .collect();
    let details = serde_json::json!({
        "agent_id": agent_id,
        "agents": links.iter().map(|link| link.agent_id).collect::<Vec<_>>(),
        "cycle": cycle,
    });
    audit::append(
        &*txn,
        AuditEvent::LockDeadlock,
        Some(session_id),
        details,
        at,
    )
    .await?;
    txn.commit().await?;
    Ok(())
}

/// The type and session of each agent of the cycle, by id as stored.
async fn agents_of(
    conn: &impl ConnectionTrait,
    links: &[Link],
) -> Result<HashMap<String, (String, String)>> {
    let mut found = HashMap::with_capacity(links.len());
    for chunk in links.chunks(super::IDS_PER_STATEMENT) {
        let rows: Vec<(String, String, String)> = agent_executions::Entity::find()
            .select_only()
            .column(agent_executions::Column::Id)
            .column(agent_executions::Column::AgentType)
            .column(agent_executions::Column::SessionId)
            .filter(agent_executions::Column::Id.is_in(chunk.iter().map(|l| TextUuid(l.agent_id))))
            .into_tuple()
            .all(conn)
            .await?;
        found.extend(
            rows.into_iter()
                .map(|(id, agent_type, session)| (id, (agent_type, session))),
        );
    }
    Ok(found)
}
