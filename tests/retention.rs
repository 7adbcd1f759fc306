//! Retention on every backend: which sessions a prune deletes and which it
//! keeps, cleared contexts, `keep_last`, the database guards of compaction,
//! the feed below the compaction horizon, two instances pruning at once, the
//! archive (a full disk, and restoring from it), refused policies and the
//! background prune. Every test reads the rows back.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use common::*;
use demiarch_sessions::{
    ArchiveLine, AuditEvent, AuditFilter, Config, Error, PruneReport, RetentionPolicy,
    SessionManager, WatchOptions,
};
use entity::{
    agent_executions, audit_log, global_sessions, lock_resources, resource_locks, retention,
};
use futures::StreamExt;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use serde_json::json;
use uuid::Uuid;

// ---- helpers local to this file ------------------------------------------------

const DAY: u64 = 24 * 60 * 60;

fn days(n: u64) -> Duration {
    Duration::from_secs(n * DAY)
}

/// Sets a session's `updated_at` (an ended session's age) to `n` days ago.
async fn backdate(db: &TestDb, session: Uuid, n: i64) -> DateTime<Utc> {
    let at = Utc::now().trunc_subsecs(6) - chrono::Duration::days(n);
    let res = global_sessions::Entity::update_many()
        .col_expr(global_sessions::Column::UpdatedAt, Expr::value(at))
        .filter(global_sessions::Column::Id.eq(session.to_string()))
        .exec(db.manager.connection())
        .await
        .expect("backdate updated_at");
    assert_eq!(res.rows_affected, 1, "backdate must hit the session row");
    at
}

/// A session with `agents` agents holding `locks_per_agent` locks each and a
/// saved `plan` window, ended through the library.
async fn ended_session(db: &TestDb, agents: usize, locks_per_agent: usize) -> Uuid {
    let (session, _) = populated_session(db, agents, locks_per_agent).await;
    db.manager
        .contexts()
        .put(
            session,
            "plan",
            json!({ "session": session.to_string(), "step": 3 }),
        )
        .expect("put context");
    db.manager.end_session(session).await.expect("end");
    session
}

async fn session_exists(db: &TestDb, session: Uuid) -> bool {
    global_sessions::Entity::find_by_id(session.to_string())
        .one(db.manager.connection())
        .await
        .expect("query session")
        .is_some()
}

async fn waiter_count(db: &TestDb, session: Uuid) -> usize {
    entity::lock_waiters::Entity::find()
        .filter(entity::lock_waiters::Column::SessionId.eq(session.to_string()))
        .all(db.manager.connection())
        .await
        .expect("query waiters")
        .len()
}

/// Asserts that nothing of `session` is left but its audit rows.
async fn assert_gone(db: &TestDb, session: Uuid, what: &str) {
    let name = db.backend.name();
    assert!(
        !session_exists(db, session).await,
        "{name}: {what}'s session row is still there"
    );
    assert!(
        agent_rows(db, session).await.is_empty(),
        "{name}: {what}'s agents are still there"
    );
    assert!(
        lock_rows(db, session).await.is_empty(),
        "{name}: {what}'s locks are still there"
    );
    assert_eq!(
        waiter_count(db, session).await,
        0,
        "{name}: {what}'s waiter rows are still there"
    );
}

async fn retention_row(db: &TestDb) -> retention::Model {
    retention::Entity::find_by_id(1)
        .one(db.manager.connection())
        .await
        .expect("read retention")
        .expect("the retention row")
}

/// Every audit row, by `seq`.
async fn all_audit(db: &TestDb) -> Vec<audit_log::Model> {
    audit_log::Entity::find()
        .order_by_asc(audit_log::Column::Seq)
        .all(db.manager.connection())
        .await
        .expect("read audit")
}

async fn audit_of_type(db: &TestDb, event: &str) -> Vec<audit_log::Model> {
    audit_log::Entity::find()
        .filter(audit_log::Column::EventType.eq(event))
        .order_by_asc(audit_log::Column::Seq)
        .all(db.manager.connection())
        .await
        .expect("read audit")
}

/// The session ids an audit row's `details.sessions` names.
/// A count in a prune's audit row.
fn counted(row: &audit_log::Model, field: &str) -> u64 {
    row.details[field]
        .as_u64()
        .unwrap_or_else(|| panic!("details.{field} is not a count: {}", row.details))
}

/// The sessions named by the `session` lines of an archive file.
fn archived_sessions(path: &std::path::Path) -> Vec<Uuid> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| match serde_json::from_str::<ArchiveLine>(line) {
            Ok(ArchiveLine::Session { session, .. }) => {
                Some(Uuid::parse_str(&session.id).expect("archived id"))
            }
            Ok(_) => None,
            Err(e) => panic!("an archive line does not parse: {e}: {line}"),
        })
        .collect()
}

/// A report with what varies from run to run (time, dry run) zeroed, to
/// compare a dry run with the prune.
fn counts(report: &PruneReport) -> PruneReport {
    PruneReport {
        elapsed_ms: 0,
        dry_run: false,
        ..report.clone()
    }
}

fn field_of<T>(result: demiarch_sessions::Result<T>) -> &'static str {
    match result {
        Err(Error::InvalidInput { field, .. }) => field,
        Err(other) => panic!("want InvalidInput, got {other:?}"),
        Ok(_) => panic!("want InvalidInput, got Ok"),
    }
}

/// Makes rows old enough for `audit_after: 1 s`: the only kind of sleep here.
async fn age_audit_rows() {
    tokio::time::sleep(Duration::from_millis(1100)).await;
}

fn audit_policy() -> RetentionPolicy {
    RetentionPolicy {
        audit_after: Some(Duration::from_secs(1)),
        ..RetentionPolicy::default()
    }
}

// ---- 1. Only eligible rows go --------------------------------------------------

#[tokio::test]
async fn prune_deletes_only_old_ended_sessions_and_clears_old_contexts() {
    each_backend(
        "prune_deletes_only_old_ended_sessions_and_clears_old_contexts",
        |db| async move {
            let m = &db.manager;
            let name = db.backend.name();
            // A: completed 10 days ago, with agents and (released) locks.
            let a = ended_session(&db, 2, 2).await;
            backdate(&db, a, 10).await;
            // C: interrupted 10 days ago, nothing held.
            let c = m.start_session().await.expect("start C");
            set_session_status(&db, c, "interrupted").await;
            backdate(&db, c, 10).await;
            // B: completed just now.
            let b = ended_session(&db, 1, 1).await;
            // D: active, untouched for 10 days, holding locks.
            let (d, _) = populated_session(&db, 2, 1).await;
            backdate(&db, d, 10).await;
            // E: paused, untouched for 10 days.
            let (e, _) = populated_session(&db, 1, 1).await;
            set_session_status(&db, e, "paused").await;
            backdate(&db, e, 10).await;
            // F: completed 5 days ago with a saved context.
            let f = ended_session(&db, 1, 1).await;
            backdate(&db, f, 5).await;
            assert_eq!(m.session_context(f).await.expect("context of F").len(), 1);

            let policy = RetentionPolicy {
                completed_after: Some(days(7)),
                context_after: Some(days(3)),
                ..RetentionPolicy::default()
            };

            let a_audit = audit_rows(&db, a).await;
            let c_audit = audit_rows(&db, c).await;
            assert!(!a_audit.is_empty() && !c_audit.is_empty());
            let b_rows = rows_of(&db, b).await;
            let d_rows = rows_of(&db, d).await;
            let e_rows = rows_of(&db, e).await;
            let f_rows = rows_of(&db, f).await;
            let before = snapshot(&db).await;

            // The dry run counts and changes nothing.
            let preview = m.prune_dry_run(&policy).await.expect("dry run");
            assert!(preview.dry_run, "{name}: a dry run says so");
            assert_eq!(
                snapshot(&db).await,
                before,
                "{name}: a dry run changed rows"
            );

            let report = m.prune(&policy).await.expect("prune");
            assert!(!report.dry_run);
            let after = snapshot(&db).await;

            // A and C are gone whole; their audit rows stay.
            assert_gone(&db, a, "A").await;
            assert_gone(&db, c, "C").await;
            assert_eq!(audit_rows(&db, a).await, a_audit, "{name}: A's audit rows");
            assert_eq!(audit_rows(&db, c).await, c_audit, "{name}: C's audit rows");

            // B, D and E exactly as they were.
            assert_eq!(rows_of(&db, b).await, b_rows, "{name}: B changed");
            assert_eq!(rows_of(&db, d).await, d_rows, "{name}: D (active) changed");
            assert_eq!(rows_of(&db, e).await, e_rows, "{name}: E (paused) changed");

            // F keeps its row, agents, locks and audit rows; its context is cleared.
            let (f_before, f_agents, f_locks, f_audit) = f_rows;
            let (f_after, f_agents_after, f_locks_after, f_audit_after) = rows_of(&db, f).await;
            assert_eq!(f_agents_after, f_agents);
            assert_eq!(f_locks_after, f_locks);
            assert_eq!(f_audit_after, f_audit);
            assert_eq!(f_after.context_data, None, "{name}: F's context_data");
            let cleared_at = f_after.context_cleared_at.expect("F's context_cleared_at");
            assert_eq!(
                global_sessions::Model {
                    context_data: f_before.context_data.clone(),
                    context_cleared_at: None,
                    ..f_after.clone()
                },
                f_before,
                "{name}: F's other columns changed"
            );
            assert!(m.session_context(f).await.expect("context of F").is_empty());
            let info = m.session(f).await.expect("session F");
            assert_eq!(
                info.context_cleared_at.map(|t| t.timestamp_micros()),
                Some(cleared_at.timestamp_micros())
            );

            // The report counts the rows that disappeared.
            let gone = |b: usize, a: usize| (b - a) as u64;
            assert_eq!(report.sessions_deleted, 2, "{name}: sessions_deleted");
            assert_eq!(
                report.sessions_deleted,
                gone(before.sessions.len(), after.sessions.len())
            );
            assert_eq!(
                report.agents_deleted,
                gone(before.agents.len(), after.agents.len())
            );
            assert_eq!(report.agents_deleted, 2, "{name}: A's two agents");
            assert_eq!(
                report.locks_deleted,
                gone(before.locks.len(), after.locks.len())
            );
            assert_eq!(report.locks_deleted, 4, "{name}: A's four locks");
            assert_eq!(
                report.waiters_deleted,
                gone(before.waiters.len(), after.waiters.len())
            );
            assert_eq!(report.contexts_cleared, 1, "{name}: contexts_cleared");
            assert_eq!(report.audit_deleted, 0);
            assert_eq!(report.compacted_through, None);
            let cleared = before
                .sessions
                .iter()
                .filter(|s| s.context_data.is_some())
                .count()
                - after
                    .sessions
                    .iter()
                    .filter(|s| s.context_data.is_some())
                    .count();
            // A's context went with its row; F's was cleared.
            assert_eq!(cleared, 2);

            // The dry run said the same.
            assert_eq!(
                counts(&preview),
                counts(&report),
                "{name}: dry run vs prune"
            );

            // Audit: one sessions_pruned row with the prune's counts;
            // nothing else was added or removed.
            let pruned = audit_of_type(&db, "sessions_pruned").await;
            assert_eq!(pruned.len(), 1, "{name}: sessions_pruned rows");
            assert_eq!(counted(&pruned[0], "sessions_deleted"), 2);
            assert_eq!(counted(&pruned[0], "contexts_cleared"), 1);
            assert_eq!(counted(&pruned[0], "agents_deleted"), report.agents_deleted);
            assert_eq!(counted(&pruned[0], "locks_deleted"), report.locks_deleted);
            assert_eq!(pruned[0].session_id, None);
            let before_ids: BTreeSet<_> = before.audit.iter().map(|r| r.id.clone()).collect();
            let added: Vec<_> = after
                .audit
                .iter()
                .filter(|r| !before_ids.contains(&r.id))
                .map(|r| r.event_type.as_str())
                .collect();
            assert_eq!(after.audit.len(), before.audit.len() + 1);
            assert_eq!(added, vec!["sessions_pruned"]);

            // A second prune finds nothing more.
            let again = m.prune(&policy).await.expect("second prune");
            assert_eq!(again.sessions_deleted + again.contexts_cleared, 0);
            assert_eq!(again.batches, 0);
        },
    )
    .await;
}

// ---- 2. keep_last --------------------------------------------------------------

#[tokio::test]
async fn keep_last_keeps_the_most_recently_ended_sessions() {
    each_backend(
        "keep_last_keeps_the_most_recently_ended_sessions",
        |db| async move {
            let name = db.backend.name();
            let mut sessions = Vec::new();
            for age in 10..15 {
                let s = ended_session(&db, 1, 1).await;
                backdate(&db, s, age).await;
                sessions.push(s);
            }
            let kept_rows = [
                rows_of(&db, sessions[0]).await,
                rows_of(&db, sessions[1]).await,
            ];
            let policy = RetentionPolicy {
                completed_after: Some(days(1)),
                keep_last: Some(2),
                ..RetentionPolicy::default()
            };
            let preview = db.manager.prune_dry_run(&policy).await.expect("dry run");
            let report = db.manager.prune(&policy).await.expect("prune");
            assert_eq!(report.sessions_deleted, 3, "{name}: sessions_deleted");
            assert_eq!(
                counts(&preview),
                counts(&report),
                "{name}: dry run vs prune"
            );
            // 10 and 11 days ago: the two most recently ended.
            assert_eq!(rows_of(&db, sessions[0]).await, kept_rows[0]);
            assert_eq!(rows_of(&db, sessions[1]).await, kept_rows[1]);
            for (i, s) in sessions.iter().enumerate().skip(2) {
                assert_gone(&db, *s, &format!("the session ended {} days ago", 10 + i)).await;
            }
            let pruned = audit_of_type(&db, "sessions_pruned").await;
            assert_eq!(pruned.len(), 1);
            assert_eq!(counted(&pruned[0], "sessions_deleted"), 3);
            assert_eq!(snapshot(&db).await.sessions.len(), 2);
        },
    )
    .await;
}

// ---- 3. The guards refuse raw SQL ----------------------------------------------

#[tokio::test]
async fn the_database_guards_refuse_raw_sql_against_the_audit_log_and_horizon() {
    each_backend(
        "the_database_guards_refuse_raw_sql_against_the_audit_log_and_horizon",
        |db| async move {
            let m = &db.manager;
            let name = db.backend.name();
            // D stays open: its old rows survive compaction below the horizon.
            let d = m.start_session().await.expect("start D");
            let a = ended_session(&db, 1, 1).await;
            age_audit_rows().await;
            let b = ended_session(&db, 1, 1).await;
            let old_d_row = audit_rows(&db, d).await.remove(0);
            let a_seqs: Vec<i64> = audit_rows(&db, a).await.iter().map(|r| r.seq).collect();

            let report = m.prune(&audit_policy()).await.expect("prune");
            let h = report.compacted_through.expect("a horizon");
            assert!(report.audit_deleted > 0, "{name}: nothing was compacted");
            assert_eq!(retention_row(&db).await.compacted_through, h);
            assert_eq!(h, *a_seqs.iter().max().unwrap(), "{name}: the horizon");
            assert!(
                audit_rows(&db, a).await.is_empty(),
                "{name}: A's rows are gone"
            );
            assert!(old_d_row.seq < h, "{name}: D's row is below the horizon");
            assert_eq!(
                audit_rows(&db, d).await,
                vec![old_d_row.clone()],
                "{name}: an open session's audit rows are kept"
            );
            let above = audit_rows(&db, b).await.remove(0);
            assert!(above.seq > h);

            let refused = |what: &'static str,
                           res: Result<sea_orm::ExecResult, sea_orm::DbErr>,
                           want: &str| {
                match res {
                    Ok(r) => panic!("{name}: {what} was allowed ({} rows)", r.rows_affected()),
                    Err(e) => assert!(
                        e.to_string().contains(want),
                        "{name}: {what} refused for another reason: {e}"
                    ),
                }
            };
            let unchanged = |what: &'static str| {
                let db = &db;
                async move { (snapshot(db).await, retention_row(db).await, what) }
            };

            let before = unchanged("before").await;
            let sql = placeholders(&db, "DELETE FROM audit_log WHERE seq = ?");
            refused(
                "deleting a row above the horizon",
                exec_sql(&db, &sql, vec![above.seq.into()]).await,
                "above the compaction horizon",
            );
            let now = unchanged("after the delete").await;
            assert_eq!(
                (&now.0, &now.1),
                (&before.0, &before.1),
                "{name}: {}",
                now.2
            );

            let sql = placeholders(&db, "UPDATE audit_log SET event_type = 'x' WHERE seq = ?");
            for seq in [old_d_row.seq, above.seq] {
                refused(
                    "updating an audit row",
                    exec_sql(&db, &sql, vec![seq.into()]).await,
                    "append-only",
                );
            }
            let now = unchanged("after the updates").await;
            assert_eq!(
                (&now.0, &now.1),
                (&before.0, &before.1),
                "{name}: {}",
                now.2
            );

            let sql = placeholders(
                &db,
                "UPDATE retention SET compacted_through = ? WHERE id = 1",
            );
            refused(
                "lowering the horizon",
                exec_sql(&db, &sql, vec![(h - 1).into()]).await,
                "never goes down",
            );
            let sql0 = "UPDATE retention SET compacted_through = 0 WHERE id = 1";
            refused(
                "resetting the horizon",
                exec_sql(&db, sql0, vec![]).await,
                "never goes down",
            );
            let now = unchanged("after lowering the horizon").await;
            assert_eq!(
                (&now.0, &now.1),
                (&before.0, &before.1),
                "{name}: {}",
                now.2
            );
            assert_eq!(retention_row(&db).await.compacted_through, h);

            // At or below the horizon a delete is allowed: the guard is the
            // horizon, not a blanket ban.
            let sql = placeholders(&db, "DELETE FROM audit_log WHERE seq = ?");
            let res = exec_sql(&db, &sql, vec![old_d_row.seq.into()])
                .await
                .unwrap_or_else(|e| panic!("{name}: deleting below the horizon: {e}"));
            assert_eq!(res.rows_affected(), 1);
            assert!(audit_rows(&db, d).await.is_empty());
            let after = snapshot(&db).await;
            let expected: Vec<_> = before
                .0
                .audit
                .iter()
                .filter(|r| r.seq != old_d_row.seq)
                .cloned()
                .collect();
            assert_eq!(after.audit, expected, "{name}: only that row went");
        },
    )
    .await;
}

// ---- 4. Watching below the horizon ---------------------------------------------

#[tokio::test]
async fn a_feed_below_the_horizon_reports_the_gap_and_ends() {
    each_backend(
        "a_feed_below_the_horizon_reports_the_gap_and_ends",
        |db| async move {
            let m = &db.manager;
            let name = db.backend.name();
            ended_session(&db, 1, 1).await;
            age_audit_rows().await;
            let report = m.prune(&audit_policy()).await.expect("prune");
            let h = report.compacted_through.expect("a horizon");
            assert!(h > 0);

            let mut feed = Box::pin(m.watch(WatchOptions {
                after: Some(0),
                ..WatchOptions::default()
            }));
            let first = tokio::time::timeout(Duration::from_secs(10), feed.next())
                .await
                .unwrap_or_else(|_| panic!("{name}: no item from the feed"));
            match first {
                Some(Err(Error::Compacted {
                    after,
                    compacted_through,
                })) => {
                    assert_eq!((after, compacted_through), (0, h), "{name}");
                }
                other => panic!("{name}: want Compacted, got {other:?}"),
            }
            let next = tokio::time::timeout(Duration::from_secs(5), feed.next())
                .await
                .unwrap_or_else(|_| panic!("{name}: the feed did not end"));
            assert!(next.is_none(), "{name}: the feed goes on: {next:?}");

            // Just below the horizon too.
            let mut feed = Box::pin(m.watch(WatchOptions {
                after: Some(h - 1),
                ..WatchOptions::default()
            }));
            let first = tokio::time::timeout(Duration::from_secs(10), feed.next())
                .await
                .unwrap_or_else(|_| panic!("{name}: no item from the feed"));
            assert!(
                matches!(first, Some(Err(Error::Compacted { after, compacted_through })) if after == h - 1 && compacted_through == h),
                "{name}: got {first:?}"
            );

            match m
                .audit_events(AuditFilter {
                    after: Some(0),
                    ..AuditFilter::default()
                })
                .await
            {
                Err(Error::Compacted {
                    after,
                    compacted_through,
                }) => assert_eq!((after, compacted_through), (0, h), "{name}"),
                other => panic!("{name}: want Compacted from audit_events, got {other:?}"),
            }

            // From the horizon on, the log is whole: the first row is the
            // audit_compacted row naming the horizon.
            let mut feed = Box::pin(m.watch(WatchOptions {
                after: Some(h),
                ..WatchOptions::default()
            }));
            let first = tokio::time::timeout(Duration::from_secs(10), feed.next())
                .await
                .unwrap_or_else(|_| panic!("{name}: no item from the feed"))
                .expect("the feed goes on")
                .unwrap_or_else(|e| panic!("{name}: the feed after the horizon failed: {e}"));
            assert_eq!(first.event_type, AuditEvent::AuditCompacted, "{name}");
            assert!(first.seq > h);
            assert_eq!(first.details["compacted_through"], json!(h), "{name}");
            assert_eq!(first.details["audit_deleted"], json!(report.audit_deleted));
            let listed = m
                .audit_events(AuditFilter {
                    after: Some(h),
                    ..AuditFilter::default()
                })
                .await
                .expect("audit_events after the horizon").rows;
            assert_eq!(listed, vec![first], "{name}");
        },
    )
    .await;
}

// ---- 5. Two instances pruning at once ------------------------------------------

#[tokio::test]
async fn two_instances_pruning_at_once_delete_each_session_once() {
    each_backend(
        "two_instances_pruning_at_once_delete_each_session_once",
        |db| async move {
            const N: usize = 120;
            let name = db.backend.name();
            let mut ids = BTreeSet::new();
            for _ in 0..N {
                ids.insert(ended_session(&db, 1, 1).await);
            }
            let at = Utc::now().trunc_subsecs(6) - chrono::Duration::days(10);
            let res = global_sessions::Entity::update_many()
                .col_expr(global_sessions::Column::UpdatedAt, Expr::value(at))
                .filter(global_sessions::Column::Status.eq("completed"))
                .exec(db.manager.connection())
                .await
                .expect("backdate");
            assert_eq!(res.rows_affected, N as u64);

            let peer = db.peer_manager().await;
            let dir = tempfile::tempdir().expect("temp dir");
            let policy = |archive: &str| RetentionPolicy {
                completed_after: Some(days(7)),
                batch: 10,
                archive: Some(dir.path().join(archive)),
                ..RetentionPolicy::default()
            };
            let (first, second) = (policy("one.jsonl"), policy("two.jsonl"));
            let (one, two) = tokio::join!(db.manager.prune(&first), peer.prune(&second));
            let mut deleted = 0;
            let mut agents = 0;
            let mut locks = 0;
            for result in [one, two] {
                match result {
                    Ok(report) => {
                        deleted += report.sessions_deleted;
                        agents += report.agents_deleted;
                        locks += report.locks_deleted;
                    }
                    Err(Error::PruneInProgress { .. }) => {}
                    Err(e) => panic!("{name}: a prune failed: {e}"),
                }
            }
            assert_eq!(deleted, N as u64, "{name}: sessions deleted in all");
            assert_eq!(agents, N as u64, "{name}: agents deleted in all");
            assert_eq!(locks, N as u64, "{name}: locks deleted in all");
            let after = snapshot(&db).await;
            assert!(after.sessions.is_empty(), "{name}: sessions left");
            assert!(after.agents.is_empty(), "{name}: agents left");
            assert!(after.locks.is_empty(), "{name}: locks left");

            // Each session was archived, so deleted, by exactly one prune.
            let mut named: BTreeMap<Uuid, usize> = BTreeMap::new();
            for file in ["one.jsonl", "two.jsonl"] {
                for s in archived_sessions(&dir.path().join(file)) {
                    *named.entry(s).or_default() += 1;
                }
            }
            assert_eq!(
                named.keys().copied().collect::<BTreeSet<_>>(),
                ids,
                "{name}: the archives hold other sessions"
            );
            let twice: Vec<_> = named.iter().filter(|(_, n)| **n != 1).collect();
            assert!(
                twice.is_empty(),
                "{name}: archived more than once: {twice:?}"
            );
            let pruned = audit_of_type(&db, "sessions_pruned").await;
            let recorded: u64 = pruned.iter().map(|r| counted(r, "sessions_deleted")).sum();
            assert_eq!(recorded, N as u64, "{name}: sessions_pruned counts");
            // The lease is free again.
            let row = retention_row(&db).await;
            assert_eq!(
                (row.pruner, row.pruner_until),
                (None, None),
                "{name}: lease"
            );
            if db.backend != Backend::SqliteMemory {
                let _ = peer.close().await;
            }
        },
    )
    .await;
}

/// A lease another prune holds (written by hand) holds a prune off, naming
/// its holder, and a lapsed one is taken over.
#[tokio::test]
async fn a_held_lease_holds_a_prune_off_and_a_lapsed_one_is_taken_over() {
    each_backend(
        "a_held_lease_holds_a_prune_off_and_a_lapsed_one_is_taken_over",
        |db| async move {
            let name = db.backend.name();
            let s = ended_session(&db, 1, 1).await;
            backdate(&db, s, 10).await;
            let policy = RetentionPolicy {
                completed_after: Some(days(7)),
                ..RetentionPolicy::default()
            };
            let other = Uuid::new_v4().to_string();
            let set_lease = |until: DateTime<Utc>| {
                let db = &db;
                let other = other.clone();
                async move {
                    retention::Entity::update_many()
                        .col_expr(retention::Column::Pruner, Expr::value(other))
                        .col_expr(retention::Column::PrunerUntil, Expr::value(until))
                        .filter(retention::Column::Id.eq(1))
                        .exec(db.manager.connection())
                        .await
                        .expect("write the lease");
                }
            };
            set_lease(Utc::now().trunc_subsecs(6) + chrono::Duration::minutes(1)).await;
            let before = snapshot(&db).await;
            let held = retention_row(&db).await;
            match db.manager.prune(&policy).await {
                Err(Error::PruneInProgress { pruner, until }) => {
                    assert_eq!(pruner, other, "{name}: the holder");
                    assert_eq!(
                        until.map(|t| t.timestamp_micros()),
                        held.pruner_until.map(|t| t.timestamp_micros()),
                        "{name}: the lease's end"
                    );
                }
                got => panic!("{name}: want PruneInProgress, got {got:?}"),
            }
            assert_eq!(
                snapshot(&db).await,
                before,
                "{name}: a held-off prune changed rows"
            );
            assert_eq!(retention_row(&db).await, held, "{name}: the lease changed");

            // Lapsed: taken over, and given up at the end.
            set_lease(Utc::now().trunc_subsecs(6) - chrono::Duration::seconds(1)).await;
            let report = db
                .manager
                .prune(&policy)
                .await
                .expect("prune after the lapse");
            assert_eq!(report.sessions_deleted, 1, "{name}");
            assert_gone(&db, s, "the old session").await;
            let row = retention_row(&db).await;
            assert_eq!(
                (row.pruner, row.pruner_until),
                (None, None),
                "{name}: lease"
            );
            assert!(row.last_prune_at.is_some(), "{name}: last_prune_at");
        },
    )
    .await;
}

// ---- 6. A full disk while archiving --------------------------------------------

#[tokio::test]
async fn a_full_disk_while_archiving_deletes_nothing() {
    each_backend(
        "a_full_disk_while_archiving_deletes_nothing",
        |db| async move {
            let name = db.backend.name();
            let full = std::path::Path::new("/dev/full");
            if !full.exists() {
                eprintln!("a_full_disk_while_archiving_deletes_nothing: SKIPPED: no /dev/full");
                return;
            }
            let s = ended_session(&db, 2, 1).await;
            backdate(&db, s, 10).await;
            let other = ended_session(&db, 1, 1).await;
            backdate(&db, other, 5).await;
            let before = snapshot(&db).await;
            let horizon = retention_row(&db).await.compacted_through;
            for policy in [
                RetentionPolicy {
                    completed_after: Some(Duration::ZERO),
                    archive: Some(full.to_owned()),
                    ..RetentionPolicy::default()
                },
                RetentionPolicy {
                    context_after: Some(Duration::ZERO),
                    archive: Some(full.to_owned()),
                    ..RetentionPolicy::default()
                },
                RetentionPolicy {
                    audit_after: Some(Duration::ZERO),
                    archive: Some(full.to_owned()),
                    ..RetentionPolicy::default()
                },
            ] {
                match db.manager.prune(&policy).await {
                    Err(Error::Archive { path, reason }) => {
                        assert!(path.contains("/dev/full"), "{name}: path {path:?}");
                        assert!(!reason.is_empty());
                    }
                    other => panic!("{name}: want Error::Archive for {policy:?}, got {other:?}"),
                }
                assert_eq!(
                    snapshot(&db).await,
                    before,
                    "{name}: {policy:?} changed rows"
                );
                let row = retention_row(&db).await;
                assert_eq!(row.compacted_through, horizon);
                assert_eq!(
                    (row.pruner, row.pruner_until),
                    (None, None),
                    "{name}: lease kept"
                );
            }
            // A prune without the archive then works.
            let report = db
                .manager
                .prune(&RetentionPolicy {
                    completed_after: Some(days(7)),
                    ..RetentionPolicy::default()
                })
                .await
                .expect("prune without archive");
            assert_eq!(report.sessions_deleted, 1);
            assert_gone(&db, s, "the old session").await;
        },
    )
    .await;
}

// ---- 7. Restoring from the archive ---------------------------------------------

#[tokio::test]
async fn the_archive_holds_what_was_deleted_and_restores_it() {
    each_backend(
        "the_archive_holds_what_was_deleted_and_restores_it",
        |db| async move {
            let name = db.backend.name();
            let conn = db.manager.connection();
            let mut old = Vec::new();
            for age in [8, 9, 10] {
                let s = ended_session(&db, 2, 2).await;
                backdate(&db, s, age).await;
                old.push(s);
            }
            // Mid-age: its context is cleared, its row kept.
            let mid = ended_session(&db, 1, 1).await;
            backdate(&db, mid, 5).await;
            let mid_context = session_row(&db, mid).await.context_data.expect("saved");

            let mut sessions = Vec::new();
            let mut agents = Vec::new();
            let mut locks = Vec::new();
            for s in &old {
                sessions.push(session_row(&db, *s).await);
                agents.extend(agent_rows(&db, *s).await);
                locks.extend(lock_rows(&db, *s).await);
            }
            sessions.sort_by(|a, b| a.id.cmp(&b.id));
            agents.sort_by(|a, b| a.id.cmp(&b.id));
            locks.sort_by(|a, b| a.id.cmp(&b.id));
            assert_eq!((agents.len(), locks.len()), (6, 12));
            age_audit_rows().await;
            let audit_before = all_audit(&db).await;

            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("archive.jsonl");
            let policy = RetentionPolicy {
                completed_after: Some(days(7)),
                context_after: Some(days(3)),
                audit_after: Some(Duration::from_secs(1)),
                batch: 2,
                archive: Some(path.clone()),
                ..RetentionPolicy::default()
            };
            let preview = db.manager.prune_dry_run(&policy).await.expect("dry run");
            assert_eq!(
                all_audit(&db).await,
                audit_before,
                "{name}: the dry run wrote"
            );
            assert!(!path.exists(), "{name}: the dry run wrote an archive");
            let report = db.manager.prune(&policy).await.expect("prune");
            assert_eq!(
                counts(&preview),
                counts(&report),
                "{name}: dry run vs prune"
            );
            assert_eq!(report.sessions_deleted, 3, "{name}");
            assert_eq!(report.contexts_cleared, 1, "{name}");
            assert_eq!(report.audit_deleted, audit_before.len() as u64, "{name}");
            for s in &old {
                assert_gone(&db, *s, "an archived session").await;
            }
            let left = all_audit(&db).await;
            assert!(
                left.iter()
                    .all(|r| r.seq > audit_before.last().unwrap().seq),
                "{name}: old audit rows left"
            );

            let text = std::fs::read_to_string(&path).expect("read the archive");
            let mut got_sessions = Vec::new();
            let mut got_agents = Vec::new();
            let mut got_locks = Vec::new();
            let mut got_contexts = Vec::new();
            let mut got_audit = Vec::new();
            for line in text.lines() {
                let line: ArchiveLine = serde_json::from_str(line).unwrap_or_else(|e| {
                    panic!("{name}: an archive line does not parse: {e}: {line}")
                });
                match line {
                    ArchiveLine::Session {
                        session,
                        agents,
                        locks,
                        waiters,
                    } => {
                        assert!(waiters.is_empty());
                        got_sessions.push(session);
                        got_agents.extend(agents);
                        got_locks.extend(locks);
                    }
                    ArchiveLine::Context {
                        session_id,
                        cleared_at,
                        context_data,
                    } => got_contexts.push((session_id, cleared_at, context_data)),
                    ArchiveLine::Audit { row } => got_audit.push(row),
                }
            }
            got_sessions.sort_by(|a, b| a.id.cmp(&b.id));
            got_agents.sort_by(|a, b| a.id.cmp(&b.id));
            got_locks.sort_by(|a, b| a.id.cmp(&b.id));
            got_audit.sort_by_key(|r| r.seq);
            assert_eq!(got_sessions, sessions, "{name}: archived sessions");
            assert_eq!(got_agents, agents, "{name}: archived agents");
            assert_eq!(got_locks, locks, "{name}: archived locks");
            assert_eq!(got_audit, audit_before, "{name}: archived audit rows");
            assert_eq!(got_contexts.len(), 1, "{name}: context lines");
            let (ctx_session, cleared_at, ctx_data) = got_contexts.remove(0);
            assert_eq!(ctx_session, mid);
            assert_eq!(ctx_data, mid_context, "{name}: the archived context");
            let mid_row = session_row(&db, mid).await;
            assert_eq!(mid_row.context_data, None);
            assert_eq!(
                mid_row.context_cleared_at.map(|t| t.timestamp_micros()),
                Some(cleared_at.timestamp_micros()),
                "{name}: cleared_at in the archive and the row"
            );

            // Put the sessions back: rows first, then agents, then locks.
            for s in got_sessions {
                global_sessions::Entity::insert(global_sessions::ActiveModel::from(s))
                    .exec_without_returning(conn)
                    .await
                    .unwrap_or_else(|e| panic!("{name}: restore a session: {e}"));
            }
            for a in got_agents {
                agent_executions::Entity::insert(agent_executions::ActiveModel::from(a))
                    .exec_without_returning(conn)
                    .await
                    .unwrap_or_else(|e| panic!("{name}: restore an agent: {e}"));
            }
            for l in got_locks {
                resource_locks::Entity::insert(resource_locks::ActiveModel::from(l))
                    .exec_without_returning(conn)
                    .await
                    .unwrap_or_else(|e| panic!("{name}: restore a lock: {e}"));
            }
            let mut restored_sessions = Vec::new();
            let mut restored_agents = Vec::new();
            let mut restored_locks = Vec::new();
            for s in &old {
                restored_sessions.push(session_row(&db, *s).await);
                restored_agents.extend(agent_rows(&db, *s).await);
                restored_locks.extend(lock_rows(&db, *s).await);
            }
            restored_sessions.sort_by(|a, b| a.id.cmp(&b.id));
            restored_agents.sort_by(|a, b| a.id.cmp(&b.id));
            restored_locks.sort_by(|a, b| a.id.cmp(&b.id));
            assert_eq!(restored_sessions, sessions, "{name}: restored sessions");
            assert_eq!(restored_agents, agents, "{name}: restored agents");
            assert_eq!(restored_locks, locks, "{name}: restored locks");
            // And the library reads them as before.
            for s in &old {
                let windows = db.manager.session_context(*s).await.expect("context");
                assert_eq!(windows.len(), 1, "{name}: restored context");
                assert_eq!(windows[0].data["session"], json!(s.to_string()));
                assert_eq!(db.manager.agents(*s).await.expect("agents").rows.len(), 2);
            }
        },
    )
    .await;
}

// ---- 8. Bad policies -----------------------------------------------------------

#[tokio::test]
async fn bad_policies_are_refused_by_field_and_change_nothing() {
    each_backend(
        "bad_policies_are_refused_by_field_and_change_nothing",
        |db| async move {
            let name = db.backend.name();
            let s = ended_session(&db, 1, 1).await;
            backdate(&db, s, 10).await;
            let before = snapshot(&db).await;
            let retention_before = retention_row(&db).await;
            let missing = tempfile::tempdir().expect("temp dir");
            let bad = [
                (
                    "batch",
                    RetentionPolicy {
                        completed_after: Some(Duration::ZERO),
                        batch: 0,
                        ..RetentionPolicy::default()
                    },
                ),
                (
                    "batch",
                    RetentionPolicy {
                        completed_after: Some(Duration::ZERO),
                        batch: demiarch_sessions::MAX_PRUNE_BATCH + 1,
                        ..RetentionPolicy::default()
                    },
                ),
                (
                    "completed_after",
                    RetentionPolicy {
                        completed_after: Some(Duration::MAX),
                        ..RetentionPolicy::default()
                    },
                ),
                (
                    "context_after",
                    RetentionPolicy {
                        completed_after: Some(Duration::ZERO),
                        context_after: Some(Duration::MAX),
                        ..RetentionPolicy::default()
                    },
                ),
                (
                    "audit_after",
                    RetentionPolicy {
                        completed_after: Some(Duration::ZERO),
                        audit_after: Some(Duration::MAX),
                        ..RetentionPolicy::default()
                    },
                ),
                (
                    "keep_last",
                    RetentionPolicy {
                        completed_after: Some(Duration::ZERO),
                        keep_last: Some(u64::MAX),
                        ..RetentionPolicy::default()
                    },
                ),
                (
                    "archive",
                    RetentionPolicy {
                        completed_after: Some(Duration::ZERO),
                        archive: Some(missing.path().join("no-such-dir").join("a.jsonl")),
                        ..RetentionPolicy::default()
                    },
                ),
                (
                    "archive",
                    RetentionPolicy {
                        completed_after: Some(Duration::ZERO),
                        archive: Some(missing.path().to_owned()),
                        ..RetentionPolicy::default()
                    },
                ),
            ];
            for (field, policy) in &bad {
                assert_eq!(
                    field_of(db.manager.prune(policy).await),
                    *field,
                    "{name}: prune {policy:?}"
                );
                assert_eq!(
                    field_of(db.manager.prune_dry_run(policy).await),
                    *field,
                    "{name}: dry run {policy:?}"
                );
                assert_eq!(field_of(policy.validate()), *field);
                assert_eq!(
                    snapshot(&db).await,
                    before,
                    "{name}: {policy:?} changed rows"
                );
                assert_eq!(
                    retention_row(&db).await,
                    retention_before,
                    "{name}: {policy:?}"
                );
                let config = Config {
                    retention: Some(policy.clone()),
                    ..test_config()
                };
                // Within a Config, the field is named as the Config's.
                let in_config = format!("Config::retention.{field}");
                assert_eq!(field_of(config.validate()), in_config);
                let connected = SessionManager::connect_with("sqlite::memory:", config).await;
                assert_eq!(field_of(connected), in_config, "connect_with {policy:?}");
            }
            assert!(session_exists(&db, s).await);
        },
    )
    .await;
}

// ---- 9. The background prune ---------------------------------------------------

#[tokio::test]
async fn the_background_prune_deletes_an_ended_session() {
    let config = Config {
        retention: Some(RetentionPolicy {
            completed_after: Some(Duration::ZERO),
            ..RetentionPolicy::default()
        }),
        prune_interval: Duration::from_millis(200),
        ..test_config()
    };
    each_backend_with(
        "the_background_prune_deletes_an_ended_session",
        config,
        |db| async move {
            let name = db.backend.name();
            let (open, _) = populated_session(&db, 1, 1).await;
            let (s, _) = populated_session(&db, 2, 1).await;
            db.manager.end_session(s).await.expect("end");
            let open_rows = rows_of(&db, open).await;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            while session_exists(&db, s).await {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{name}: the background prune did not delete the session in 15 s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_gone(&db, s, "the ended session").await;
            // Its row comes with the prune's last transaction, just after.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            let recorded = loop {
                let pruned = audit_of_type(&db, "sessions_pruned").await;
                let recorded: u64 = pruned.iter().map(|r| counted(r, "sessions_deleted")).sum();
                if recorded > 0 || tokio::time::Instant::now() > deadline {
                    break recorded;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            assert_eq!(recorded, 1, "{name}: sessions_pruned counts");
            // The open session is untouched by every round.
            assert_eq!(rows_of(&db, open).await, open_rows, "{name}: open session");
            let _ = db.manager.close().await;
        },
    )
    .await;
}

// ---- 10. Resuming from a cleared context ---------------------------------------

#[tokio::test]
async fn resuming_a_session_whose_context_was_cleared_starts_empty() {
    each_backend(
        "resuming_a_session_whose_context_was_cleared_starts_empty",
        |db| async move {
            let m = &db.manager;
            let name = db.backend.name();
            let f = ended_session(&db, 1, 1).await;
            backdate(&db, f, 5).await;
            let report = m
                .prune(&RetentionPolicy {
                    context_after: Some(days(3)),
                    ..RetentionPolicy::default()
                })
                .await
                .expect("prune");
            assert_eq!(report.contexts_cleared, 1, "{name}");
            assert!(session_row(&db, f).await.context_data.is_none());

            let resumed = m.resume_session(f).await.expect("resume a cleared session");
            assert!(m.contexts().windows(resumed).is_empty(), "{name}: registry");
            let row = session_row(&db, resumed).await;
            assert_eq!(row.status, "active");
            let audit = audit_of(&db, resumed, "session_resumed").await;
            assert_eq!(audit.len(), 1, "{name}: session_resumed rows");
            assert_eq!(audit[0].details["resumed_from"], json!(f.to_string()));
            assert_eq!(audit[0].details["context_windows"], json!(0));
            // The resumed session ends with its (empty) context saved.
            m.end_session(resumed)
                .await
                .expect("end the resumed session");
            assert!(m
                .session_context(resumed)
                .await
                .expect("context")
                .is_empty());
            assert!(session_row(&db, resumed).await.context_data.is_some());
        },
    )
    .await;
}

// ---- turn rows of resources nobody asks for ------------------------------------

/// Sets every `lock_resources` row's `touched_at` to `n` days ago but those
/// of `keep`.
async fn backdate_resources(db: &TestDb, n: i64, keep: &str) {
    let at = Utc::now().trunc_subsecs(6) - chrono::Duration::days(n);
    lock_resources::Entity::update_many()
        .col_expr(lock_resources::Column::TouchedAt, Expr::value(at))
        .filter(lock_resources::Column::ResourceKey.ne(keep))
        .exec(db.manager.connection())
        .await
        .expect("backdate touched_at");
}

async fn resource_keys(db: &TestDb) -> BTreeSet<String> {
    lock_resources::Entity::find()
        .all(db.manager.connection())
        .await
        .expect("lock_resources")
        .into_iter()
        .map(|r| r.resource_key)
        .collect()
}

#[tokio::test]
async fn prune_forgets_the_turn_rows_of_idle_resources_and_tokens_still_grow() {
    each_backend(
        "prune_forgets_the_turn_rows_of_idle_resources_and_tokens_still_grow",
        |db| async move {
            if db.is_sqlite() {
                eprintln!(
                    "prune_forgets_the_turn_rows_of_idle_resources_and_tokens_still_grow: \
                     skipped on {}: SQLite takes turns by its write lock and writes no turn rows",
                    db.backend.name()
                );
                return;
            }
            let m = &db.manager;
            let session = m.start_session().await.expect("start");
            let agent = m.register_agent(session, "a").await.expect("agent");
            let idle = m.acquire_lock(agent, "file", "idle").await.expect("idle");
            m.release_lock(idle.lock_id).await.expect("release idle");
            let held = m.acquire_lock(agent, "file", "held").await.expect("held");
            let fresh = m.acquire_lock(agent, "file", "fresh").await.expect("fresh");
            m.release_lock(fresh.lock_id).await.expect("release fresh");
            assert_eq!(
                resource_keys(&db).await,
                ["fresh", "held", "idle"].map(String::from).into()
            );
            // "idle" and "held" last asked for 10 days ago, "fresh" now.
            backdate_resources(&db, 10, "fresh").await;
            let policy = RetentionPolicy {
                completed_after: Some(days(7)),
                ..RetentionPolicy::default()
            };
            m.prune(&policy).await.expect("prune");
            assert_eq!(
                resource_keys(&db).await,
                ["fresh", "held"].map(String::from).into(),
                "only the idle resource's row goes: one is held, one was asked for lately"
            );
            let again = m
                .acquire_lock(agent, "file", "idle")
                .await
                .expect("idle again");
            assert!(again.fencing_token > idle.fencing_token);
            assert!(again.fencing_token > held.fencing_token);
            assert!(
                resource_keys(&db).await.contains("idle"),
                "asked for again, it has a row"
            );
        },
    )
    .await;
}
