//! What each backend can take in one statement: a sweep of a backlog larger
//! than any `IN` list a backend accepts, and a context near MariaDB's
//! packet limit. Rows are read back to show what was stored.
mod common;

use std::time::Duration;

use chrono::Utc;
use common::{each_backend_with, test_config, Backend};
use demiarch_sessions::{Config, Error, SessionManager, SessionStatus, MAX_SWEEP_BATCH};
use entity::{audit_log, resource_locks};
use sea_orm::ActiveValue::Set;
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use uuid::Uuid;

#[tokio::test]
async fn a_sweep_batch_no_statement_can_carry_is_refused_by_name() {
    let config = Config {
        sweep_batch: MAX_SWEEP_BATCH + 1,
        ..Config::default()
    };
    match SessionManager::connect_with("sqlite::memory:", config).await {
        Err(Error::InvalidInput { field, reason }) => {
            assert_eq!(field, "Config::sweep_batch");
            assert!(reason.contains("10000"), "{reason}");
        }
        other => panic!("expected sweep_batch to be refused, got {other:?}"),
    }
}

/// 70 000 expired locks, more than SQLite (32 766) or the servers (65 535)
/// bind in one statement, swept at the largest batch `Config` takes.
#[tokio::test]
async fn a_backlog_larger_than_any_statement_is_swept_in_full() {
    let config = Config {
        sweep_batch: MAX_SWEEP_BATCH,
        ..test_config()
    };
    each_backend_with(
        "a_backlog_larger_than_any_statement_is_swept_in_full",
        config,
        |db| async move {
            let m = &db.manager;
            let session = m.start_session().await.expect("start");
            let agent = m.register_agent(session, "coder").await.expect("agent");
            let backlog = 70_000u64;
            let past = Utc::now() - chrono::Duration::hours(1);
            let rows: Vec<resource_locks::ActiveModel> = (0..backlog)
                .map(|n| resource_locks::ActiveModel {
                    id: Set(Uuid::new_v4().to_string()),
                    agent_id: Set(agent.to_string()),
                    session_id: Set(session.to_string()),
                    resource_type: Set("file".into()),
                    resource_key: Set(format!("backlog/{n}")),
                    fencing_token: Set(1_000_000 + n as i64),
                    acquired_at: Set(past.into()),
                    expires_at: Set(Some(past.into())),
                    released_at: Set(None),
                    release_reason: Set(None),
                    waited_since: Set(None),
                })
                .collect();
            for chunk in rows.chunks(1_000) {
                resource_locks::Entity::insert_many(chunk.to_vec())
                    .exec_without_returning(m.connection())
                    .await
                    .expect("insert the backlog");
            }
            let report = m.sweep_locks().await.expect("the sweep drains the backlog");
            assert_eq!(report.expired, backlog);
            assert_eq!(report.batches, backlog.div_ceil(MAX_SWEEP_BATCH));
            let held = resource_locks::Entity::find()
                .filter(resource_locks::Column::ReleasedAt.is_null())
                .count(m.connection())
                .await
                .expect("count held");
            assert_eq!(held, 0, "every expired lock is released");
            let expired = resource_locks::Entity::find()
                .filter(resource_locks::Column::ReleaseReason.eq("expired"))
                .count(m.connection())
                .await
                .expect("count expired");
            assert_eq!(expired, backlog);
            let swept_rows = audit_log::Entity::find()
                .filter(audit_log::Column::EventType.eq("locks_swept"))
                .count(m.connection())
                .await
                .expect("count audit");
            assert_eq!(swept_rows, report.batches, "one locks_swept row per batch");
            db.cleanup().await;
        },
    )
    .await;
}

/// A string window whose saved context is `target` bytes: the envelope's
/// size is measured by a first end refused for being over a tiny limit.
async fn window_of(m: &SessionManager, session: Uuid, target: usize) {
    m.contexts()
        .put(session, "big", serde_json::json!(""))
        .expect("window");
    let probe = SessionManager::connect_with(
        "sqlite::memory:",
        Config {
            max_context_bytes: 64,
            ..Config::default()
        },
    )
    .await
    .expect("probe");
    let empty = probe.start_session().await.expect("start");
    probe
        .contexts()
        .put(empty, "big", serde_json::json!(""))
        .expect("window");
    let overhead = match probe.end_session(empty).await {
        Ok(report) => report.context_bytes as usize,
        Err(e) => panic!("measuring the envelope: {e}"),
    };
    let text = "x".repeat(target - overhead);
    m.contexts()
        .put(session, "big", serde_json::json!(text))
        .expect("window");
}

#[tokio::test]
async fn a_context_the_server_cannot_take_is_refused_by_name_and_one_it_can_is_saved() {
    each_backend_with(
        "a_context_the_server_cannot_take_is_refused_by_name_and_one_it_can_is_saved",
        // Sizes, not time, are under test: a loaded machine may take longer
        // than the default 2 s to write 16 MiB.
        Config {
            cleanup_timeout: Duration::from_secs(60),
            ..test_config()
        },
        |db| async move {
            if db.backend != Backend::MySql {
                eprintln!(
                    "{}: no statement size limit under max_context_bytes; MariaDB only",
                    db.backend.name()
                );
                return db.cleanup().await;
            }
            let m = &db.manager;
            let limit = m.config().max_context_bytes;
            let session = m.start_session().await.expect("start");
            // 100 bytes under max_context_bytes, which equals MariaDB's
            // default max_allowed_packet.
            window_of(m, session, limit - 100).await;
            let before = common::snapshot(&db).await;
            let (bytes, server_limit) = match m.end_session(session).await {
                Err(Error::ContextTooLargeForServer {
                    bytes,
                    limit: server_limit,
                    setting,
                    value,
                }) => {
                    assert_eq!(setting, "max_allowed_packet");
                    assert!(value as usize >= server_limit, "{value} < {server_limit}");
                    (bytes, server_limit)
                }
                other => panic!("expected ContextTooLargeForServer, got {other:?}"),
            };
            assert_eq!(bytes, limit - 100);
            assert_eq!(common::snapshot(&db).await, before, "nothing changed");
            assert_eq!(m.contexts().windows(session).len(), 1, "the window is kept");
            // The largest context the server takes is saved whole.
            window_of(m, session, server_limit).await;
            let report = tokio::time::timeout(Duration::from_secs(60), m.end_session(session))
                .await
                .expect("the end returns")
                .expect("a context within the server's limit is saved");
            assert_eq!(report.context_bytes as usize, server_limit);
            let row = common::session_row(&db, session).await;
            assert_eq!(row.status, SessionStatus::Completed.as_str());
            let saved = serde_json::to_vec(&row.context_data.expect("saved")).expect("json");
            assert_eq!(saved.len(), server_limit, "the saved context is whole");
            db.cleanup().await;
        },
    )
    .await;
}
