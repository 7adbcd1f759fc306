//! A prune under stress: the CLI's prune SIGKILLed mid-way, and ends racing
//! a prune. Every session must stay whole or be gone whole, every session
//! gone must be in the archive, and an end must never wait for more than
//! one batch.
#![cfg(unix)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use common::{each_backend, each_backend_with, exec_sql, test_config, Backend, TestDb};
use demiarch_sessions::entity::{agent_executions, global_sessions, resource_locks};
use demiarch_sessions::{ArchiveLine, Config, Error, RetentionPolicy};
use sea_orm::{ActiveValue::Set, EntityTrait, QuerySelect};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_demiarch-sessions");
const AGENTS: usize = 2;
const LOCKS_PER_AGENT: usize = 2;

/// `n` sessions ended ten days ago, as an end leaves them (completed, saved
/// context, agents cancelled, locks released), written in bulk.
async fn ended_sessions(db: &TestDb, n: usize, first_token: i64) -> Vec<Uuid> {
    let at = Utc::now() - chrono::Duration::days(10);
    let conn = db.manager.connection();
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
    let mut token = first_token;
    for chunk in ids.chunks(200) {
        let sessions = chunk.iter().map(|id| global_sessions::ActiveModel {
            id: Set(id.to_string()),
            status: Set("completed".into()),
            started_at: Set(at.into()),
            updated_at: Set(at.into()),
            completed_at: Set(Some(at.into())),
            context_data: Set(Some(serde_json::json!({"version": 1, "windows": [
                {"key": "plan", "data": format!("context of {id}")}
            ]}))),
            owner_instance: Set(None),
            last_heartbeat_at: Set(None),
            context_cleared_at: Set(None),
        });
        global_sessions::Entity::insert_many(sessions)
            .exec_without_returning(conn)
            .await
            .expect("insert sessions");
        let mut agents = Vec::new();
        let mut locks = Vec::new();
        for session in chunk {
            for a in 0..AGENTS {
                let agent = Uuid::new_v4();
                agents.push(agent_executions::ActiveModel {
                    id: Set(agent.to_string()),
                    session_id: Set(session.to_string()),
                    agent_type: Set(format!("agent-{a}")),
                    status: Set("cancelled".into()),
                    started_at: Set(at.into()),
                    completed_at: Set(Some(at.into())),
                });
                for l in 0..LOCKS_PER_AGENT {
                    token += 1;
                    locks.push(resource_locks::ActiveModel {
                        id: Set(Uuid::new_v4().to_string()),
                        agent_id: Set(agent.to_string()),
                        session_id: Set(session.to_string()),
                        resource_type: Set("file".into()),
                        resource_key: Set(format!("{session}/{a}/{l}")),
                        fencing_token: Set(token),
                        acquired_at: Set(at.into()),
                        expires_at: Set(None),
                        released_at: Set(Some(at.into())),
                        release_reason: Set(Some("session_end".into())),
                        waited_since: Set(None),
                    });
                }
            }
        }
        agent_executions::Entity::insert_many(agents)
            .exec_without_returning(conn)
            .await
            .expect("insert agents");
        resource_locks::Entity::insert_many(locks)
            .exec_without_returning(conn)
            .await
            .expect("insert locks");
    }
    ids
}

/// Rows per session id in a table's `column`.
async fn counts<E: EntityTrait>(db: &TestDb, column: E::Column) -> HashMap<String, usize> {
    let ids: Vec<String> = E::find()
        .select_only()
        .column(column)
        .into_tuple()
        .all(db.manager.connection())
        .await
        .expect("read ids");
    let mut counts = HashMap::new();
    for id in ids {
        *counts.entry(id).or_default() += 1;
    }
    counts
}

/// The sessions named by the archive's `session` lines.
fn archived(path: &Path) -> BTreeSet<Uuid> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| serde_json::from_str::<ArchiveLine>(line).expect("an archive line parses"))
        .filter_map(|line| match line {
            ArchiveLine::Session {
                session,
                agents,
                locks,
                ..
            } => {
                assert_eq!(agents.len(), AGENTS, "an archived session has its agents");
                assert_eq!(locks.len(), AGENTS * LOCKS_PER_AGENT, "and its locks");
                Some(Uuid::parse_str(&session.id).expect("uuid"))
            }
            _ => None,
        })
        .collect()
}

/// Every session whole (its row, agents and locks) or gone whole; returns
/// the ones gone.
async fn whole_or_gone(db: &TestDb, ids: &[Uuid], when: &str) -> BTreeSet<Uuid> {
    let sessions = counts::<global_sessions::Entity>(db, global_sessions::Column::Id).await;
    let agents = counts::<agent_executions::Entity>(db, agent_executions::Column::SessionId).await;
    let locks = counts::<resource_locks::Entity>(db, resource_locks::Column::SessionId).await;
    let mut gone = BTreeSet::new();
    for id in ids {
        let key = id.to_string();
        let rows = (
            sessions.get(&key).copied().unwrap_or(0),
            agents.get(&key).copied().unwrap_or(0),
            locks.get(&key).copied().unwrap_or(0),
        );
        match rows {
            (1, AGENTS, n) if n == AGENTS * LOCKS_PER_AGENT => {}
            (0, 0, 0) => {
                gone.insert(*id);
            }
            other => panic!(
                "{} {when}: session {id} is half there: (session, agents, locks) = {other:?}",
                db.backend.name()
            ),
        }
    }
    gone
}

fn older_than_a_day(batch: u32) -> RetentionPolicy {
    RetentionPolicy {
        completed_after: Some(Duration::from_secs(24 * 60 * 60)),
        batch,
        ..RetentionPolicy::default()
    }
}

/// The CLI's prune is SIGKILLed at varied moments after its first batch
/// was archived; after each kill every session is whole or gone, the gone
/// ones are all in the archive, and the dead prune's lease still holds off
/// another prune until it expires.
#[tokio::test]
async fn a_killed_prune_leaves_every_session_whole_and_archived() {
    each_backend(
        "a_killed_prune_leaves_every_session_whole_and_archived",
        |db| async move {
            if db.backend == Backend::SqliteMemory {
                eprintln!(
                    "a_killed_prune_leaves_every_session_whole_and_archived: SKIPPED on \
                     sqlite-memory: another process cannot open it"
                );
                return;
            }
            let ids = ended_sessions(&db, 1_500, 1_000_000).await;
            let dir = tempfile::tempdir().expect("temp dir");
            let archive = dir.path().join("archive.jsonl");
            let archive_arg = archive.display().to_string();
            let mut gone = BTreeSet::new();
            for round in 0..4u64 {
                let before = std::fs::metadata(&archive).map(|m| m.len()).unwrap_or(0);
                let mut child = Command::new(BIN)
                    .args([
                        "--database-url",
                        &db.url,
                        "prune",
                        "--completed-after",
                        "1d",
                    ])
                    .args(["--batch", "20", "--archive", &archive_arg])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn the CLI");
                // Until it has archived a batch (then it is deleting), or ended.
                let deadline = Instant::now() + Duration::from_secs(60);
                while std::fs::metadata(&archive).map(|m| m.len()).unwrap_or(0) <= before {
                    if child.try_wait().expect("try_wait").is_some() || Instant::now() > deadline {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                tokio::time::sleep(Duration::from_millis(round * 15)).await;
                let finished = child.try_wait().expect("try_wait").is_some();
                child.kill().expect("SIGKILL the prune");
                child.wait().expect("reap the prune");
                let now_gone = whole_or_gone(&db, &ids, &format!("after kill {round}")).await;
                assert!(now_gone.is_superset(&gone), "nothing comes back");
                assert!(
                    now_gone.is_subset(&archived(&archive)),
                    "{}: every session gone is in the archive",
                    db.backend.name()
                );
                assert!(
                    now_gone.len() < ids.len(),
                    "{}: round {round} killed a prune that had finished; make more sessions",
                    db.backend.name()
                );
                gone = now_gone;
                if !finished {
                    // The dead prune's lease holds off the next one until it
                    // expires (a minute); here it is expired by hand.
                    match db.manager.prune(&older_than_a_day(20)).await {
                        Err(Error::PruneInProgress { .. }) => {}
                        other => panic!("a dead prune's lease still holds: {other:?}"),
                    }
                }
                exec_sql(
                    &db,
                    "UPDATE retention SET pruner = NULL, pruner_until = NULL",
                    vec![],
                )
                .await
                .expect("expire the lease");
                eprintln!(
                    "{}: kill {round}: {} of {} sessions gone, all archived",
                    db.backend.name(),
                    gone.len(),
                    ids.len()
                );
            }
            let report = db
                .manager
                .prune(&older_than_a_day(500))
                .await
                .expect("a prune after the kills finishes the job");
            assert_eq!(report.sessions_deleted as usize, ids.len() - gone.len());
            assert!(whole_or_gone(&db, &ids, "at the end").await.len() == ids.len());
        },
    )
    .await;
}

/// Ends racing a long prune all succeed within their budget: a prune takes
/// the write lock (SQLite) or row locks (servers) for one batch at a time,
/// never for the whole prune, which outlasts the budget several times.
#[tokio::test]
async fn ends_racing_a_prune_wait_at_most_one_batch() {
    let config = Config {
        cleanup_timeout: Duration::from_millis(200),
        ..test_config()
    };
    each_backend_with(
        "ends_racing_a_prune_wait_at_most_one_batch",
        config,
        |db| async move {
            let ids = ended_sessions(&db, 5_000, 2_000_000).await;
            let mut open = Vec::new();
            for _ in 0..40 {
                open.push(common::populated_session(&db, 1, 2).await.0);
            }
            let pruner = db.manager.clone();
            let started = Instant::now();
            let prune = tokio::spawn(async move { pruner.prune(&older_than_a_day(50)).await });
            let mut during = 0;
            for session in &open {
                let report = db.manager.end_session(*session).await.unwrap_or_else(|e| {
                    panic!("{}: an end racing a prune failed: {e}", db.backend.name())
                });
                assert_eq!(report.locks_released, 2);
                if !prune.is_finished() {
                    during += 1;
                }
            }
            let report = prune.await.expect("join").expect("prune");
            let took = started.elapsed();
            assert_eq!(report.sessions_deleted as usize, ids.len());
            assert!(whole_or_gone(&db, &ids, "after the prune").await.len() == ids.len());
            for session in &open {
                let row = common::session_row(&db, *session).await;
                assert_eq!(row.status, "completed", "the racing end committed");
                assert!(common::lock_rows(&db, *session)
                    .await
                    .iter()
                    .all(|l| l.released_at.is_some()));
            }
            eprintln!(
                "{}: {during} of {} ends ran during a prune of {} sessions in {} batches \
                 ({took:?}); none timed out",
                db.backend.name(),
                open.len(),
                ids.len(),
                report.batches
            );
            assert!(during > 0, "no end overlapped the prune");
        },
    )
    .await;
}
