//! Rows holding values the library cannot read (written by hand or by
//! another program), on every backend: each list read returns the other rows
//! and names the bad one in `Listing::corrupt`; a read of the one row and the
//! audit feed give `Error::CorruptRow`, and the feed goes on after it.
mod common;

use std::time::Duration;

use chrono::Utc;
use common::*;
use demiarch_sessions::{
    AuditEvent, AuditFilter, CorruptRow, Error, LockFilter, ReleaseReason, SessionFilter,
    SessionStatus, WatchOptions,
};
use entity::{agent_executions, audit_log, global_sessions, resource_locks};
use futures::StreamExt;
use sea_orm::entity::prelude::TextUuid;
use sea_orm::sea_query::Expr;
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter};
use serde_json::json;

fn corrupt(table: &'static str, id: &str, column: &'static str, value: &str) -> CorruptRow {
    CorruptRow {
        table,
        id: id.to_owned(),
        column,
        value: value.to_owned(),
    }
}

/// Appends an audit row as another program would; its `seq`.
async fn insert_audit(db: &TestDb, event_type: &str, session_id: Option<String>) -> i64 {
    let row = audit_log::ActiveModel {
        id: Set(uuid::Uuid::new_v4().to_string()),
        event_type: Set(event_type.to_owned()),
        event_time: Set(Utc::now().into()),
        session_id: Set(session_id),
        details: Set(json!({})),
        ..Default::default()
    };
    audit_log::Entity::insert(row)
        .exec(db.manager.connection())
        .await
        .expect("insert audit row")
        .last_insert_id
}

#[tokio::test]
async fn unreadable_audit_rows_are_named_and_the_rest_is_read() {
    each_backend(
        "unreadable_audit_rows_are_named_and_the_rest_is_read",
        |db| async move {
            let m = db.manager.clone();
            let mut feed = Box::pin(m.watch(WatchOptions {
                after: Some(0),
                ..WatchOptions::default()
            }));
            let session = m.start_session().await.expect("start");
            let unknown = insert_audit(&db, "mystery_event", Some(session.to_string())).await;
            let bad_id = insert_audit(&db, "session_start", Some("not-a-uuid".into())).await;
            m.end_session(session).await.expect("end");

            let listed = m
                .audit_events(AuditFilter::default())
                .await
                .expect("the list reads");
            assert_eq!(
                listed
                    .rows
                    .iter()
                    .map(|e| (e.event_type, e.session_id))
                    .collect::<Vec<_>>(),
                vec![
                    (AuditEvent::SessionEnd, Some(session)),
                    (AuditEvent::SessionStart, Some(session)),
                ],
                "newest first, the readable rows"
            );
            assert_eq!(
                listed.corrupt,
                vec![
                    corrupt("audit_log", &bad_id.to_string(), "session_id", "not-a-uuid"),
                    corrupt(
                        "audit_log",
                        &unknown.to_string(),
                        "event_type",
                        "mystery_event"
                    ),
                ]
            );

            // The feed gives each bad row as an error naming it, and goes on.
            let mut items = Vec::new();
            for _ in 0..4 {
                let item = tokio::time::timeout(Duration::from_secs(20), feed.next())
                    .await
                    .expect("an item within 20 s")
                    .expect("the stream goes on");
                items.push(item);
            }
            assert!(matches!(&items[0], Ok(e) if e.event_type == AuditEvent::SessionStart));
            match &items[1] {
                Err(Error::CorruptRow(row)) => assert_eq!(row, &listed.corrupt[1]),
                other => panic!("expected the unknown event type, got {other:?}"),
            }
            match &items[2] {
                Err(Error::CorruptRow(row)) => assert_eq!(row, &listed.corrupt[0]),
                other => panic!("expected the bad session id, got {other:?}"),
            }
            assert!(matches!(&items[3], Ok(e) if e.event_type == AuditEvent::SessionEnd));

            // JSON keeps the stored text.
            let end = serde_json::to_value(&listed.rows[0]).expect("json");
            assert_eq!(end["event_type"], "session_end");
            assert_eq!(end["session_id"], session.to_string());
            let row = serde_json::to_value(&listed.corrupt[1]).expect("json");
            assert_eq!(
                row,
                json!({
                    "table": "audit_log",
                    "id": unknown.to_string(),
                    "column": "event_type",
                    "value": "mystery_event",
                })
            );
        },
    )
    .await;
}

#[tokio::test]
async fn unreadable_locks_agents_and_sessions_are_named() {
    each_backend(
        "unreadable_locks_agents_and_sessions_are_named",
        |db| async move {
            let m = db.manager.clone();
            let session = m.start_session().await.expect("start");
            let agent = m.register_agent(session, "coder").await.expect("agent");
            let kept = m.acquire_lock(agent, "file", "a").await.expect("lock a");
            let edited = m.acquire_lock(agent, "file", "b").await.expect("lock b");
            m.release_lock(kept.lock_id).await.expect("release a");
            m.release_lock(edited.lock_id).await.expect("release b");
            resource_locks::Entity::update_many()
                .col_expr(
                    resource_locks::Column::ReleaseReason,
                    Expr::value("gave_up"),
                )
                .filter(resource_locks::Column::Id.eq(TextUuid(edited.lock_id)))
                .exec(db.manager.connection())
                .await
                .expect("edit the reason");

            let locks = m
                .locks(LockFilter {
                    session_id: Some(session),
                    ..LockFilter::default()
                })
                .await
                .expect("the list reads");
            assert_eq!(locks.rows.len(), 1);
            assert_eq!(locks.rows[0].id, kept.lock_id);
            assert_eq!(locks.rows[0].release_reason, Some(ReleaseReason::Released));
            assert_eq!(
                locks.corrupt,
                vec![corrupt(
                    "resource_locks",
                    &edited.lock_id.to_string(),
                    "release_reason",
                    "gave_up"
                )]
            );
            let json = serde_json::to_value(&locks.rows[0]).expect("json");
            assert_eq!(json["release_reason"], "released");

            // An agent and a session whose ids are not UUIDs.
            let now = Utc::now();
            agent_executions::Entity::insert(agent_executions::ActiveModel {
                id: Set("agent-by-hand".into()),
                session_id: Set(session.to_string()),
                agent_type: Set("scripted".into()),
                status: Set("running".into()),
                started_at: Set(now.into()),
                completed_at: Set(None),
            })
            .exec_without_returning(db.manager.connection())
            .await
            .expect("insert agent");
            let agents = m.agents(session).await.expect("the list reads");
            assert_eq!(
                agents.rows.iter().map(|a| a.id).collect::<Vec<_>>(),
                vec![agent]
            );
            assert_eq!(
                agents.corrupt,
                vec![corrupt(
                    "agent_executions",
                    "agent-by-hand",
                    "id",
                    "agent-by-hand"
                )]
            );

            global_sessions::Entity::insert(global_sessions::ActiveModel {
                id: Set("session-by-hand".into()),
                status: Set("active".into()),
                started_at: Set(now.into()),
                updated_at: Set(now.into()),
                ..Default::default()
            })
            .exec_without_returning(db.manager.connection())
            .await
            .expect("insert session");
            let sessions = m
                .list_sessions(SessionFilter::default())
                .await
                .expect("the list reads");
            assert_eq!(
                sessions
                    .rows
                    .iter()
                    .map(|s| (s.id, s.status))
                    .collect::<Vec<_>>(),
                vec![(session, SessionStatus::Active)]
            );
            assert_eq!(
                sessions.corrupt,
                vec![corrupt(
                    "global_sessions",
                    "session-by-hand",
                    "id",
                    "session-by-hand"
                )]
            );
            assert_eq!(m.session(session).await.expect("one session").id, session);
        },
    )
    .await;
}
