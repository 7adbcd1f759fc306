//! Watching the store: `SessionManager::watch` delivers audit events in `seq`
//! order, exactly once across resumes, from this and other managers and
//! processes, with filters, through errors, and without holding connections
//! or stalling writers; and the migration numbers existing rows.
mod common;

use std::pin::Pin;
use std::time::Duration;

use common::*;
use demiarch_sessions::{
    AuditEvent, AuditFilter, AuditRecord, Config, Error, SessionManager, WatchOptions,
};
use entity::audit_log;
use futures::{Stream, StreamExt};
use sea_orm::{ConnectionTrait, EntityTrait, QueryOrder, Statement, TransactionTrait};
use uuid::Uuid;

type Feed = Pin<Box<dyn Stream<Item = demiarch_sessions::Result<AuditRecord>> + Send>>;

fn feed(manager: &SessionManager, options: WatchOptions) -> Feed {
    Box::pin(manager.watch(options))
}

fn from_start() -> WatchOptions {
    WatchOptions {
        after: Some(0),
        ..WatchOptions::default()
    }
}

/// The next item, within a generous bound (the stream never ends by itself).
async fn next_item(feed: &mut Feed) -> demiarch_sessions::Result<AuditRecord> {
    tokio::time::timeout(Duration::from_secs(20), feed.next())
        .await
        .expect("an event within 20 s")
        .expect("the stream never ends while the manager is open")
}

async fn next_event(feed: &mut Feed) -> AuditRecord {
    next_item(feed).await.expect("an event, not an error")
}

async fn take(feed: &mut Feed, n: usize) -> Vec<AuditRecord> {
    let mut events = Vec::with_capacity(n);
    for _ in 0..n {
        events.push(next_event(feed).await);
    }
    events
}

/// Nothing arrives for a while.
async fn quiet_for(feed: &mut Feed, ms: u64) {
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(ms), feed.next()).await {
        panic!("expected nothing yet, got {item:?}");
    }
}

/// Every audit row in the database, in seq order.
async fn all_audit(db: &TestDb) -> Vec<audit_log::Model> {
    audit_log::Entity::find()
        .order_by_asc(audit_log::Column::Seq)
        .all(db.manager.connection())
        .await
        .expect("read audit_log")
}

fn seqs(events: &[AuditRecord]) -> Vec<i64> {
    events.iter().map(|e| e.seq).collect()
}

fn assert_increasing(what: &str, seqs: &[i64]) {
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "{what}: seqs not strictly increasing: {seqs:?}"
    );
}

/// The config with a watch poll interval, for feeds woken only by polling.
fn polling_every(ms: u64) -> Config {
    Config {
        watch_poll_interval: Duration::from_millis(ms),
        ..test_config()
    }
}

#[tokio::test]
async fn delivers_every_event_in_seq_order_exactly_once_across_resumes() {
    each_backend(
        "delivers_every_event_in_seq_order_exactly_once_across_resumes",
        |db| async move {
            let peer = db.peer_manager().await;
            let mut watcher = feed(&db.manager, from_start());
            // Ends and starts from two managers at once.
            let mut tasks = Vec::new();
            for i in 0..12 {
                let manager = if i % 2 == 0 {
                    db.manager.clone()
                } else {
                    peer.clone()
                };
                tasks.push(tokio::spawn(async move {
                    let session = manager.start_session().await.expect("start");
                    let agent = manager
                        .register_agent(session, "coder")
                        .await
                        .expect("agent");
                    manager
                        .acquire_lock(agent, "file", &format!("f{i}"))
                        .await
                        .expect("lock");
                    manager.end_session(session).await.expect("end");
                }));
            }
            for task in tasks {
                task.await.expect("writer task");
            }
            let rows = all_audit(&db).await;
            assert_eq!(rows.len(), 24, "a start and an end per session");
            assert_eq!(rows[0].seq, 1, "seq starts at 1");
            let got = take(&mut watcher, rows.len()).await;
            let want: Vec<i64> = rows.iter().map(|r| r.seq).collect();
            assert_eq!(seqs(&got), want, "every committed row, in seq order, once");
            quiet_for(&mut watcher, 300).await;
            for (event, row) in got.iter().zip(&rows) {
                assert_eq!(event.id, id(&row.id));
                assert_eq!(event.event_type.as_str(), row.event_type);
                assert_eq!(event.details, row.details);
            }

            // A consumer that stored the seq of the 10th event resumes after it.
            let mut resumed = feed(
                &db.manager,
                WatchOptions {
                    after: Some(got[9].seq),
                    ..WatchOptions::default()
                },
            );
            let rest = take(&mut resumed, rows.len() - 10).await;
            assert_eq!(
                seqs(&rest),
                want[10..].to_vec(),
                "resume delivers exactly the rest"
            );
            quiet_for(&mut resumed, 200).await;

            // Live events reach both, once.
            let session = peer.start_session().await.expect("start");
            peer.end_session(session).await.expect("end");
            let newest = all_audit(&db).await;
            let live: Vec<i64> = newest[rows.len()..].iter().map(|r| r.seq).collect();
            assert_eq!(seqs(&take(&mut watcher, 2).await), live);
            assert_eq!(seqs(&take(&mut resumed, 2).await), live);
            // audit_events returns the same records.
            let listed = db
                .manager
                .audit_events(AuditFilter {
                    session_id: Some(session),
                    ..AuditFilter::default()
                })
                .await
                .expect("audit_events")
                .rows;
            assert_eq!(seqs(&listed), vec![live[1], live[0]], "newest first");
            drop(peer);
        },
    )
    .await;
}

#[tokio::test]
async fn after_none_starts_after_the_newest_event_when_first_polled() {
    each_backend(
        "after_none_starts_after_the_newest_event_when_first_polled",
        |db| async move {
            let m = &db.manager;
            let before = m.start_session().await.expect("start");
            // Created, not yet polled: what commits now is still "before".
            let mut watcher = feed(m, WatchOptions::default());
            let unseen = m.start_session().await.expect("start");
            let first = tokio::time::timeout(Duration::from_millis(300), watcher.next()).await;
            assert!(
                first.is_err(),
                "nothing committed after the first poll yet: {first:?}"
            );
            let after = m.start_session().await.expect("start");
            let event = next_event(&mut watcher).await;
            assert_eq!(event.session_id, Some(after));
            assert_eq!(event.event_type, AuditEvent::SessionStart);
            let rows = all_audit(&db).await;
            assert_eq!(rows.len(), 3);
            assert_eq!(
                event.seq, rows[2].seq,
                "{before} and {unseen} were not delivered"
            );
        },
    )
    .await;
}

#[tokio::test]
async fn filters_by_session_and_event_types() {
    each_backend("filters_by_session_and_event_types", |db| async move {
        let m = &db.manager;
        let mut ends = feed(
            m,
            WatchOptions {
                after: Some(0),
                event_types: vec!["session_end".into(), "session_interrupted".into()],
                ..WatchOptions::default()
            },
        );
        let a = m.start_session().await.expect("start a");
        let b = m.start_session().await.expect("start b");
        let mut by_session = feed(
            m,
            WatchOptions {
                after: Some(0),
                session_id: Some(b),
                ..WatchOptions::default()
            },
        );
        m.end_session(a).await.expect("end a");
        m.end_session(b).await.expect("end b");
        let got = take(&mut ends, 2).await;
        assert_eq!(
            got.iter()
                .map(|e| e.event_type.as_str())
                .collect::<Vec<_>>(),
            ["session_end", "session_end"]
        );
        assert_eq!(got[0].session_id, Some(a));
        assert_eq!(got[1].session_id, Some(b));
        let got = take(&mut by_session, 2).await;
        assert_eq!(
            got.iter()
                .map(|e| e.event_type.as_str())
                .collect::<Vec<_>>(),
            ["session_start", "session_end"]
        );
        assert!(got.iter().all(|e| e.session_id == Some(b)));
        quiet_for(&mut ends, 200).await;
        quiet_for(&mut by_session, 100).await;
    })
    .await;
}

#[tokio::test]
async fn bad_options_are_refused_by_name_and_end_the_stream() {
    each_backend(
        "bad_options_are_refused_by_name_and_end_the_stream",
        |db| async move {
            let (session, _) = populated_session(&db, 1, 1).await;
            let before = snapshot(&db).await;
            for (options, field) in [
                (
                    WatchOptions {
                        after: Some(-1),
                        ..WatchOptions::default()
                    },
                    "after",
                ),
                (
                    WatchOptions {
                        after: Some(i64::MIN),
                        ..WatchOptions::default()
                    },
                    "after",
                ),
                (
                    WatchOptions {
                        session_id: Some(Uuid::nil()),
                        ..WatchOptions::default()
                    },
                    "session_id",
                ),
                (
                    WatchOptions {
                        event_types: vec!["session_ended".into()],
                        ..WatchOptions::default()
                    },
                    "event_types",
                ),
                (
                    WatchOptions {
                        event_types: vec![String::new()],
                        ..WatchOptions::default()
                    },
                    "event_types",
                ),
                (
                    WatchOptions {
                        event_types: vec!["x".repeat(1 << 20)],
                        ..WatchOptions::default()
                    },
                    "event_types",
                ),
            ] {
                let mut watcher = feed(&db.manager, options.clone());
                match next_item(&mut watcher).await {
                    Err(Error::InvalidInput { field: f, reason }) => {
                        assert_eq!(f, field, "{options:?}: {reason}");
                        // The known types, and at most 64 characters of the
                        // refused one: never the whole of a long input.
                        let known: usize = demiarch_sessions::AuditEvent::ALL
                            .iter()
                            .map(|e| e.as_str().len() + 2)
                            .sum();
                        assert!(
                            reason.len() < known + 160,
                            "the reason stays one short line: {reason}"
                        );
                    }
                    other => panic!("{options:?}: expected InvalidInput({field}), got {other:?}"),
                }
                assert!(
                    watcher.next().await.is_none(),
                    "{options:?}: the stream ends after refusing"
                );
            }
            // A huge `after` is valid: nothing is after it, yet.
            let mut far = feed(
                &db.manager,
                WatchOptions {
                    after: Some(i64::MAX),
                    ..WatchOptions::default()
                },
            );
            quiet_for(&mut far, 200).await;
            assert_eq!(snapshot(&db).await, before, "watching changed nothing");
            db.manager.end_session(session).await.expect("end");
        },
    )
    .await;
}

/// A transaction that took an earlier seq and is slow to commit holds back
/// every later append, so the watcher never delivers past it and a resume
/// never skips it.
#[tokio::test]
async fn a_slow_transaction_holding_an_earlier_seq_is_never_skipped() {
    each_backend_with("a_slow_transaction_holding_an_earlier_seq_is_never_skipped", polling_every(20), |db| async move {
        if db.backend == Backend::SqliteMemory {
                eprintln!("a_slow_transaction_holding_an_earlier_seq_is_never_skipped: SKIPPED on sqlite-memory: a second connection would be a second database");
                return;
            }
            let m = db.manager.clone();
        let sessions: Vec<Uuid> = {
            let mut v = Vec::new();
            for _ in 0..4 {
                v.push(m.start_session().await.expect("start"));
            }
            v
        };
        let start_seq = all_audit(&db).await.last().expect("rows").seq;
        let mut watcher = feed(&m, WatchOptions { after: Some(start_seq), ..WatchOptions::default() });
        // The slow one: appends exactly as the library does (lock audit_head,
        // insert) on its own connection, then waits before committing.
        let other = db.second_connection().await;
        let slow = begin_writer(&db, &other).await;
        let head = placeholders(&db, "SELECT id FROM audit_head WHERE id = ?");
        let lock = if db.is_sqlite() { head } else { format!("{head} FOR UPDATE") };
        slow.query_one_raw(Statement::from_sql_and_values(slow.get_database_backend(), lock, [1i64.into()]))
            .await
            .expect("lock audit_head")
            .expect("the audit_head row");
        let slow_id = Uuid::new_v4();
        let insert = placeholders(&db, "INSERT INTO audit_log (id, event_type, event_time, session_id, details) VALUES (?, 'locks_swept', ?, NULL, ?)");
        slow.execute_raw(Statement::from_sql_and_values(
            slow.get_database_backend(),
            insert,
            [slow_id.to_string().into(), chrono::Utc::now().into(), serde_json::json!({"locks": []}).into()],
        ))
        .await
        .expect("slow insert");
        // Later ends run meanwhile.
        let mut ends = Vec::new();
        for &s in &sessions {
            let m = m.clone();
            ends.push(tokio::spawn(async move { m.end_session(s).await }));
        }
        quiet_for(&mut watcher, 400).await;
        assert!(audit_of(&db, sessions[0], "session_end").await.is_empty() || db.is_sqlite(),
            "no later end committed while the earlier seq was in flight");
        slow.commit().await.expect("commit the slow one");
        for end in ends {
            end.await.expect("end task").expect("end");
        }
        let rows: Vec<_> = all_audit(&db).await.into_iter().filter(|r| r.seq > start_seq).collect();
        assert_eq!(rows.len(), 5);
        assert_eq!(id(&rows[0].id), slow_id, "the slow transaction's seq is the lowest");
        let got = take(&mut watcher, 5).await;
        assert_eq!(got[0].id, slow_id, "delivered first, not skipped");
        assert_eq!(seqs(&got), rows.iter().map(|r| r.seq).collect::<Vec<_>>());
        assert_increasing("watcher", &seqs(&got));
        let mut resumed = feed(&m, WatchOptions { after: Some(start_seq), ..WatchOptions::default() });
        assert_eq!(seqs(&take(&mut resumed, 5).await), seqs(&got), "a resume sees the same");
        other.close().await.expect("close");
    })
    .await;
}

/// A transaction on the other connection that writes like the library:
/// `BEGIN IMMEDIATE` on SQLite.
async fn begin_writer(
    db: &TestDb,
    conn: &sea_orm::DatabaseConnection,
) -> sea_orm::DatabaseTransaction {
    use sea_orm::{SqliteTransactionMode, TransactionOptions};
    if db.is_sqlite() {
        conn.begin_with_options(TransactionOptions {
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
            ..Default::default()
        })
        .await
        .expect("BEGIN IMMEDIATE")
    } else {
        conn.begin().await.expect("BEGIN")
    }
}

/// An end blocked on its session's row lock holds nothing the other
/// sessions' ends or their delivery need.
#[tokio::test]
async fn an_end_blocked_on_one_session_stalls_no_other() {
    each_backend("an_end_blocked_on_one_session_stalls_no_other", |db| async move {
        if db.is_sqlite() {
            eprintln!("an_end_blocked_on_one_session_stalls_no_other: SKIPPED on {}: SQLite has no row locks; one writer at a time is its model", db.backend.name());
            return;
        }
        let m = db.manager.clone();
        let blocked = m.start_session().await.expect("start");
        let free = m.start_session().await.expect("start");
        let mut watcher = feed(&m, WatchOptions { event_types: vec!["session_end".into()], ..WatchOptions::default() });
        quiet_for(&mut watcher, 100).await;
        let (blocker, txn) = block_session(&db, blocked).await;
        let stuck = {
            let m = m.clone();
            tokio::spawn(async move { m.end_session(blocked).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!stuck.is_finished(), "the end waits for the session's row");
        tokio::time::timeout(Duration::from_secs(5), m.end_session(free))
            .await
            .expect("another session's end is not stalled")
            .expect("end");
        let event = next_event(&mut watcher).await;
        assert_eq!(event.session_id, Some(free), "and it is delivered meanwhile");
        txn.rollback().await.expect("let go");
        blocker.close().await.expect("close");
        stuck.await.expect("task").expect("the blocked end finishes");
        let event = next_event(&mut watcher).await;
        assert_eq!(event.session_id, Some(blocked));
        assert!(event.seq > 0);
    })
    .await;
}

/// Events from another process (the operator CLI) and another instance's
/// recovery reach the watcher: by `NOTIFY` on PostgreSQL (the poll is ten
/// minutes there), by polling elsewhere.
#[cfg(feature = "cli")]
#[tokio::test]
async fn events_from_other_processes_and_instances_arrive() {
    for backend in Backend::ALL {
        if let Err(why) = backend.availability() {
            eprintln!(
                "events_from_other_processes_and_instances_arrive: SKIPPED on {}: {why}",
                backend.name()
            );
            continue;
        }
        if backend == Backend::SqliteMemory {
            eprintln!("events_from_other_processes_and_instances_arrive: SKIPPED on sqlite-memory: no other process can open it");
            continue;
        }
        let poll = if backend == Backend::Postgres {
            600_000
        } else {
            50
        };
        let db = TestDb::with_config(backend, polling_every(poll)).await;
        let m = db.manager.clone();
        let mut watcher = feed(
            &m,
            WatchOptions {
                event_types: vec!["session_end".into(), "session_interrupted".into()],
                ..WatchOptions::default()
            },
        );
        quiet_for(&mut watcher, 100).await;
        // The operator CLI ends a session, in its own process.
        let (session, _) = populated_session(&db, 1, 2).await;
        let out = tokio::task::spawn_blocking({
            let url = db.url.clone();
            move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_demiarch-sessions"))
                    .args([
                        "--database-url",
                        &url,
                        "sessions",
                        "end",
                        &session.to_string(),
                        "--force",
                    ])
                    .env_clear()
                    .output()
                    .expect("run the CLI")
            }
        })
        .await
        .expect("cli task");
        assert!(
            out.status.success(),
            "{}: cli failed: {}",
            backend.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        let event = next_event(&mut watcher).await;
        assert_eq!(
            (event.event_type, event.session_id),
            (AuditEvent::SessionEnd, Some(session))
        );
        assert_eq!(event.details["locks_released"], 2);

        // Another instance recovers a session this one stopped heartbeating.
        let (stale, _) = populated_session(&db, 1, 1).await;
        tokio::time::sleep(Duration::from_millis(60)).await;
        let other = SessionManager::connect_with(&db.url, polling_every(poll))
            .await
            .expect("other instance");
        let report = other
            .recover_stale(Duration::from_millis(50))
            .await
            .expect("recover");
        assert_eq!(report.interrupted, vec![stale]);
        let event = next_event(&mut watcher).await;
        assert_eq!(
            (event.event_type, event.session_id),
            (AuditEvent::SessionInterrupted, Some(stale))
        );
        let rows = all_audit(&db).await;
        assert_eq!(event.seq, rows.last().expect("rows").seq);
        other.close().await.expect("close");
        drop(watcher);
        db.cleanup().await;
        eprintln!(
            "events_from_other_processes_and_instances_arrive: passed on {}",
            backend.name()
        );
    }
}

/// A slow consumer reads page by page; dropping a feed mid-stream frees it;
/// idle feeds hold no connection, so more feeds than the pool has
/// connections do not starve the manager.
#[tokio::test]
async fn feeds_page_and_hold_no_connection_while_idle() {
    let config = Config {
        watch_page_size: 7,
        max_connections: 2,
        connect_timeout: Duration::from_secs(3),
        ..test_config()
    };
    each_backend_with(
        "feeds_page_and_hold_no_connection_while_idle",
        config,
        |db| async move {
            let m = db.manager.clone();
            for _ in 0..30 {
                m.start_session().await.expect("start");
            }
            let mut slow = feed(&m, from_start());
            let first = take(&mut slow, 10).await;
            assert_eq!(seqs(&first), (1..=10).collect::<Vec<_>>());
            drop(slow);

            let mut feeds: Vec<Feed> = (0..12).map(|_| feed(&m, WatchOptions::default())).collect();
            for f in &mut feeds {
                quiet_for(f, 5).await;
            }
            // Twelve idle feeds, two connections: the manager still works.
            let (session, _) =
                tokio::time::timeout(Duration::from_secs(10), populated_session(&db, 2, 3))
                    .await
                    .expect("the manager is not starved");
            m.end_session(session).await.expect("end");
            for f in &mut feeds {
                let got = take(f, 2).await;
                assert_eq!(got[1].event_type, AuditEvent::SessionEnd);
            }
            let backlog = take(&mut feed(&m, from_start()), 32).await;
            assert_eq!(
                seqs(&backlog),
                all_audit(&db)
                    .await
                    .iter()
                    .map(|r| r.seq)
                    .collect::<Vec<_>>(),
                "paged in order, 7 at a time"
            );
            drop(feeds);
            // Nothing of the feeds is left holding the pool: closing returns.
            tokio::time::timeout(Duration::from_secs(10), db.manager.close())
                .await
                .expect("close does not wait for a dropped feed")
                .expect("close");
        },
    )
    .await;
}

/// A failing read comes through as an `Err`, and the feed goes on from its
/// last seq once the database is back, skipping nothing; a closed manager
/// ends it.
#[tokio::test]
async fn errors_come_through_and_the_feed_goes_on() {
    each_backend_with(
        "errors_come_through_and_the_feed_goes_on",
        polling_every(20),
        |db| async move {
            let m = db.manager.clone();
            let a = m.start_session().await.expect("start");
            let mut watcher = feed(&m, from_start());
            assert_eq!(next_event(&mut watcher).await.session_id, Some(a));
            // The table goes away under the feed (as if the database failed).
            let conn = db.manager.connection();
            let rename = |from: &str, to: &str| format!("ALTER TABLE {from} RENAME TO {to}");
            conn.execute_unprepared(&rename("audit_log", "audit_log_away"))
                .await
                .expect("rename away");
            match next_item(&mut watcher).await {
                Err(e) => assert!(matches!(e, Error::Database(_)), "a database error: {e}"),
                Ok(event) => panic!("expected an error, got {event:?}"),
            }
            conn.execute_unprepared(&rename("audit_log_away", "audit_log"))
                .await
                .expect("rename back");
            let b = m.start_session().await.expect("start");
            // Errors may repeat until the rename is seen; then b, and nothing skipped.
            let event = loop {
                match next_item(&mut watcher).await {
                    Ok(event) => break event,
                    Err(Error::Database(_)) => continue,
                    Err(e) => panic!("unexpected error {e}"),
                }
            };
            assert_eq!(event.session_id, Some(b));
            assert_eq!(event.seq, 2);
            db.manager.close().await.expect("close");
            assert!(matches!(
                next_item(&mut watcher).await,
                Err(Error::ManagerClosed)
            ));
            assert!(
                watcher.next().await.is_none(),
                "a closed manager's feed ends"
            );
        },
    )
    .await;
}

/// Existing rows get seq 1.. in (event_time, id) order, and appends go on
/// after them; rolling the migration back and up again keeps every row.
#[tokio::test]
async fn the_migration_numbers_existing_rows_in_time_order() {
    use demiarch_sessions::Migrator;
    use sea_orm_migration::MigratorTrait;
    each_backend("the_migration_numbers_existing_rows_in_time_order", |db| async move {
        let conn = db.manager.connection();
        // Back to before audit_seq (and the migrations that follow it).
        let after_seq = Migrator::migrations()
            .iter()
            .skip_while(|m| m.name() != "m20261201_000004_audit_seq")
            .count();
        Migrator::down(conn, Some(u32::try_from(after_seq).expect("a few"))).await.expect("down");
        let status = Migrator::get_pending_migrations(conn).await.expect("pending");
        assert_eq!(
            status.first().map(|m| m.name().to_owned()).as_deref(),
            Some("m20261201_000004_audit_seq")
        );
        assert_eq!(status.len(), after_seq);
        let base = chrono::DurationRound::duration_trunc(chrono::Utc::now(), chrono::Duration::seconds(1)).expect("whole seconds");
        let t = |s: i64| base - chrono::Duration::seconds(s);
        // Inserted out of time order; two share a time and sort by id.
        let rows = [
            ("00000000-0000-4000-8000-000000000003", t(10)),
            ("00000000-0000-4000-8000-000000000001", t(30)),
            ("00000000-0000-4000-8000-000000000004", t(20)),
            ("00000000-0000-4000-8000-000000000002", t(20)),
        ];
        for (id, at) in rows {
            let sql = placeholders(&db, "INSERT INTO audit_log (id, event_type, event_time, session_id, details) VALUES (?, 'locks_swept', ?, NULL, ?)");
            exec_sql(&db, &sql, vec![id.into(), at.into(), serde_json::json!({"locks": []}).into()]).await.expect("insert old row");
        }
        Migrator::up(conn, None).await.expect("up again");
        let got: Vec<(i64, String)> = all_audit(&db).await.into_iter().map(|r| (r.seq, r.id)).collect();
        let want: Vec<(i64, String)> = [1, 2, 4, 3].iter().zip(1..).map(|(n, seq)| (seq, format!("00000000-0000-4000-8000-00000000000{n}"))).collect();
        assert_eq!(got, want);
        let s = db.manager.start_session().await.expect("start after the migration");
        let last = all_audit(&db).await.pop().expect("row");
        assert_eq!((last.seq, last.session_id), (5, Some(s.to_string())));
        // Still append-only: nothing is below the compaction horizon.
        let err = exec_sql(&db, "DELETE FROM audit_log", vec![]).await.expect_err("refused");
        assert!(err.to_string().contains("compaction horizon"), "{err}");
    })
    .await;
}

/// PostgreSQL: every connection of the database is killed (the pool's and
/// the `LISTEN` one). The feed goes on from its last seq and `NOTIFY`
/// wake-ups resume (the poll is ten minutes, so nothing else could wake it).
#[tokio::test]
async fn a_feed_survives_its_connections_being_killed() {
    each_backend_with(
        "a_feed_survives_its_connections_being_killed",
        polling_every(600_000),
        |db| async move {
            if db.backend != Backend::Postgres {
                eprintln!(
                    "a_feed_survives_its_connections_being_killed: SKIPPED on {}: it kills PostgreSQL backends",
                    db.backend.name()
                );
                return;
            }
            let peer = db.peer_manager().await;
            let mut watcher = feed(&db.manager, WatchOptions::default());
            quiet_for(&mut watcher, 300).await;
            let first = peer.start_session().await.expect("start");
            assert_eq!(next_event(&mut watcher).await.session_id, Some(first));
            let killer = db.second_connection().await;
            let killed = killer
                .query_all_raw(Statement::from_string(
                    killer.get_database_backend(),
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                ))
                .await
                .expect("terminate the other backends");
            assert!(killed.len() >= 3, "the pools' and the listener's connections: {}", killed.len());
            // The listener reconnects after a second.
            tokio::time::sleep(Duration::from_millis(2500)).await;
            let mut written = Vec::new();
            for _ in 0..3 {
                written.push(peer.start_session().await.expect("start after the kill"));
            }
            let mut got = Vec::new();
            while got.len() < written.len() {
                match next_item(&mut watcher).await {
                    Ok(event) => got.push(event),
                    // A read on a killed connection may fail once.
                    Err(Error::Database(_)) => continue,
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            let ids: Vec<_> = got.iter().map(|e| e.session_id).collect();
            assert_eq!(ids, written.iter().map(|s| Some(*s)).collect::<Vec<_>>());
            assert_increasing("after the kill", &seqs(&got));
            killer.close().await.expect("close");
            peer.close().await.expect("close");
        },
    )
    .await;
}

/// Sparse matches across pages: a filtered feed with a page of 2 finds every
/// `session_end` among many other events, in order, and an acquire that
/// releases an expired holder wakes feeds with its `locks_swept` row (the
/// poll is ten minutes).
#[tokio::test]
async fn filtered_feeds_find_sparse_matches_and_every_write_wakes_them() {
    let config = Config {
        watch_page_size: 2,
        ..polling_every(600_000)
    };
    each_backend_with(
        "filtered_feeds_find_sparse_matches_and_every_write_wakes_them",
        config,
        |db| async move {
            let m = db.manager.clone();
            let mut ends = feed(
                &m,
                WatchOptions {
                    after: Some(0),
                    event_types: vec!["session_end".into()],
                    ..WatchOptions::default()
                },
            );
            let mut ended = Vec::new();
            for i in 0..9 {
                let s = m.start_session().await.expect("start");
                if i % 3 == 2 {
                    m.end_session(s).await.expect("end");
                    ended.push(Some(s));
                }
            }
            let got = take(&mut ends, 3).await;
            assert_eq!(got.iter().map(|e| e.session_id).collect::<Vec<_>>(), ended);
            assert_increasing("sparse ends", &seqs(&got));
            quiet_for(&mut ends, 200).await;

            let mut swept = feed(
                &m,
                WatchOptions {
                    event_types: vec!["locks_swept".into()],
                    ..WatchOptions::default()
                },
            );
            quiet_for(&mut swept, 100).await;
            let session = m.start_session().await.expect("start");
            let a = m.register_agent(session, "a").await.expect("agent");
            let b = m.register_agent(session, "b").await.expect("agent");
            let brief = demiarch_sessions::LockOptions {
                ttl: Some(Duration::from_millis(1)),
                ..Default::default()
            };
            m.acquire_lock_with(a, "file", "x", brief)
                .await
                .expect("brief");
            tokio::time::sleep(Duration::from_millis(20)).await;
            m.acquire_lock(b, "file", "x")
                .await
                .expect("granted over the expired holder");
            let event = next_event(&mut swept).await;
            assert_eq!(event.event_type, AuditEvent::LocksSwept);
            assert_eq!(event.details["expired"], 1);
        },
    )
    .await;
}
