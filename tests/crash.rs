//! Crash safety on a SQLite file: a child process ends sessions in a loop and
//! is SIGKILLed at varied moments, at least 20 times. After each kill the
//! database is opened afresh (SQLite recovers the WAL on open) and every
//! session must be either fully ended or untouched by an end: never half.
//!
//! The child is this test binary itself, run with only `crash_child_loop`
//! selected and `DEMIARCH_CRASH_CHILD_DB` naming the database file.
#![cfg(unix)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use demiarch_sessions::{ContextWindow, SessionManager};
use entity::{agent_executions, audit_log, global_sessions, resource_locks};
use sea_orm::{ConnectionTrait, DbBackend, EntityTrait, Statement};
use serde_json::json;
use uuid::Uuid;

const CHILD_ENV: &str = "DEMIARCH_CRASH_CHILD_DB";
const READY: &str = "CRASH_CHILD_READY";
const KILLS: u64 = 24;
const AGENTS: usize = 2;
const LOCKS_PER_AGENT: usize = 3;

/// A UUID column as stored (its text), parsed.
fn id(text: &str) -> Uuid {
    Uuid::parse_str(text).unwrap_or_else(|e| panic!("stored id {text:?} is not a UUID: {e}"))
}

fn url_of(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

/// The context window the child saves for a session: a few KB, derived from
/// the id so the parent knows exactly what must come back.
fn window_of(session: Uuid) -> serde_json::Value {
    json!({
        "session": session.to_string(),
        "blob": format!("{}{session}", "context ".repeat(400)),
    })
}

// ---- the child --------------------------------------------------------------------

/// Does nothing unless run as the crash child; then loops until killed.
#[tokio::test]
async fn crash_child_loop() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let m = SessionManager::connect(&url_of(Path::new(&path)))
        .await
        .expect("child: connect");
    let mut announced = false;
    for round in 1u64.. {
        let session = m.start_session().await.expect("child: start");
        for a in 0..AGENTS {
            let agent = m
                .register_agent(session, &format!("agent-{a}"))
                .await
                .expect("child: register");
            for l in 0..LOCKS_PER_AGENT {
                m.acquire_lock(agent, "file", &format!("{session}/{a}/{l}"))
                    .await
                    .expect("child: acquire");
            }
        }
        m.contexts()
            .put(session, "w", window_of(session))
            .expect("put window");
        if round % 5 == 0 {
            // Left open on purpose, as a crashed app would leave it.
            continue;
        }
        let report = m.end_session(session).await.expect("child: end");
        assert_eq!(report.locks_released, (AGENTS * LOCKS_PER_AGENT) as u64);
        println!("ENDED {session}");
        if !announced {
            println!("{READY}");
            announced = true;
        }
    }
}

// ---- the parent -------------------------------------------------------------------

/// Runs the child until it has ended a session, lets it run on for `delay`,
/// SIGKILLs it, and returns the sessions it reported ended.
async fn run_and_kill_child(db: &Path, delay: Duration, log: &Path) -> Vec<Uuid> {
    let stderr = std::fs::File::create(log).expect("child stderr file");
    let mut child = Command::new(std::env::current_exe().expect("current exe"))
        .args([
            "--exact",
            "crash_child_loop",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, db)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            match line {
                Ok(line) => {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    });
    let child_log = || std::fs::read_to_string(log).unwrap_or_default();

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                // libtest prints "test crash_child_loop ... " without a newline
                // before the test's own output, so match inside the line.
                let ready = line.contains(READY);
                lines.push(line);
                if ready {
                    break;
                }
            }
            Err(e) => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "child never became ready ({e}; {status:?}); stdout: {lines:?}\nstderr:\n{}",
                    child_log()
                );
            }
        }
    }

    tokio::time::sleep(delay).await;
    child.kill().expect("kill child");
    let status = child.wait().expect("wait for child");
    assert_eq!(
        status.signal(),
        Some(9),
        "the child must die by SIGKILL, not exit by itself ({status:?}); stderr:\n{}",
        child_log()
    );
    reader.join().expect("stdout reader");
    lines.extend(rx.try_iter());
    lines
        .iter()
        .filter_map(|l| l.split_once("ENDED ").map(|(_, id)| id))
        // A line cut short by the kill does not parse and is not counted.
        .filter_map(|id| id.parse().ok())
        .collect()
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum State {
    Ended,
    Untouched,
}

/// Everything stored, grouped by session.
#[derive(Default)]
struct Store {
    sessions: Vec<global_sessions::Model>,
    agents: BTreeMap<Uuid, Vec<agent_executions::Model>>,
    locks: BTreeMap<Uuid, Vec<resource_locks::Model>>,
    audit: BTreeMap<Uuid, Vec<audit_log::Model>>,
}

async fn load(m: &SessionManager) -> Store {
    let c = m.connection();
    let mut store = Store {
        sessions: global_sessions::Entity::find()
            .all(c)
            .await
            .expect("sessions"),
        ..Default::default()
    };
    for a in agent_executions::Entity::find()
        .all(c)
        .await
        .expect("agents")
    {
        store.agents.entry(id(&a.session_id)).or_default().push(a);
    }
    for l in resource_locks::Entity::find().all(c).await.expect("locks") {
        store.locks.entry(id(&l.session_id)).or_default().push(l);
    }
    for r in audit_log::Entity::find().all(c).await.expect("audit") {
        let session = r
            .session_id
            .as_deref()
            .map(|s| s.parse::<Uuid>().expect("audit session_id is a uuid"));
        match session {
            Some(s) => store.audit.entry(s).or_default().push(r),
            None => panic!("unexpected audit row without a session: {r:?}"),
        }
    }
    store
}

/// Either fully ended or untouched by an end; anything else is an error.
async fn classify(
    m: &SessionManager,
    store: &Store,
    session: &global_sessions::Model,
) -> Result<State, String> {
    let session_id = id(&session.id);
    let id = session_id;
    let agents = store.agents.get(&id).map_or(&[][..], Vec::as_slice);
    let locks = store.locks.get(&id).map_or(&[][..], Vec::as_slice);
    let audit = store.audit.get(&id).map_or(&[][..], Vec::as_slice);
    let of = |event: &str| audit.iter().filter(|r| r.event_type == event).count();
    if of("session_start") != 1 {
        return Err(format!("{} session_start rows", of("session_start")));
    }
    let ends: Vec<_> = audit
        .iter()
        .filter(|r| r.event_type == "session_end")
        .collect();

    if session.status == "completed" {
        let at = session
            .completed_at
            .ok_or("completed without completed_at")?;
        if session.context_data.is_none() {
            return Err("completed without context_data".into());
        }
        let saved = m
            .session_context(id)
            .await
            .map_err(|e| format!("saved context does not decode: {e}"))?;
        let want = vec![ContextWindow {
            key: "w".into(),
            data: window_of(id),
        }];
        if saved != want {
            return Err(format!("saved context is {saved:?}"));
        }
        if session.updated_at != at {
            return Err("updated_at is not completed_at".into());
        }
        if agents.len() != AGENTS
            || agents
                .iter()
                .any(|a| a.status != "cancelled" || a.completed_at != Some(at))
        {
            return Err(format!("agents not all cancelled at the end: {agents:?}"));
        }
        if locks.len() != AGENTS * LOCKS_PER_AGENT
            || locks.iter().any(|l| {
                l.released_at != Some(at) || l.release_reason.as_deref() != Some("session_end")
            })
        {
            return Err(format!("locks not all released by the end: {locks:?}"));
        }
        if ends.len() != 1 {
            return Err(format!("{} session_end rows", ends.len()));
        }
        let details = &ends[0].details;
        if ends[0].event_time != at
            || details["locks_released"] != json!(AGENTS * LOCKS_PER_AGENT)
            || details["agents_cancelled"] != json!(AGENTS)
            || details["context_windows"] != json!(1)
        {
            return Err(format!("session_end row disagrees: {:?}", ends[0]));
        }
        Ok(State::Ended)
    } else {
        if session.completed_at.is_some() || session.context_data.is_some() {
            return Err(format!("open session carries end data: {session:?}"));
        }
        if !ends.is_empty() {
            return Err("open session has a session_end row".into());
        }
        if agents.len() > AGENTS || agents.iter().any(|a| a.status == "cancelled") {
            return Err(format!("open session has cancelled agents: {agents:?}"));
        }
        if locks.len() > AGENTS * LOCKS_PER_AGENT
            || locks
                .iter()
                .any(|l| l.release_reason.as_deref() == Some("session_end"))
        {
            return Err(format!(
                "open session has locks released by an end: {locks:?}"
            ));
        }
        let saved = m
            .session_context(id)
            .await
            .map_err(|e| format!("session_context of an open session: {e}"))?;
        if !saved.is_empty() {
            return Err(format!("a fresh manager has live windows: {saved:?}"));
        }
        Ok(State::Untouched)
    }
}

async fn pragma_rows(m: &SessionManager, pragma: &str) -> Vec<String> {
    m.connection()
        .query_all_raw(Statement::from_string(
            DbBackend::Sqlite,
            format!("PRAGMA {pragma}"),
        ))
        .await
        .unwrap_or_else(|e| panic!("PRAGMA {pragma}: {e}"))
        .iter()
        .map(|r| format!("{r:?}"))
        .collect()
}

#[tokio::test]
async fn killed_children_leave_every_session_fully_ended_or_untouched() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("crash.db");
    let url = url_of(&db);
    // The schema exists before the first child starts.
    SessionManager::connect(&url)
        .await
        .expect("create")
        .connection()
        .clone()
        .close()
        .await
        .expect("close");

    let mut ended_before: BTreeSet<Uuid> = BTreeSet::new();
    let mut reported_total = 0;
    let mut last = (0, 0);
    for round in 0..KILLS {
        let delay = Duration::from_millis(5 + (round * 37) % 146);
        let log = dir.path().join(format!("child-{round}.stderr"));
        let reported = run_and_kill_child(&db, delay, &log).await;
        assert!(
            !reported.is_empty(),
            "round {round}: the child ended nothing"
        );
        reported_total += reported.len();

        // A fresh manager: opening recovers the WAL the killed child left.
        let m = SessionManager::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("round {round}: reopen after the kill: {e}"));
        let integrity = m
            .connection()
            .query_one_raw(Statement::from_string(
                DbBackend::Sqlite,
                "PRAGMA integrity_check",
            ))
            .await
            .expect("integrity_check")
            .expect("integrity_check row")
            .try_get_by_index::<String>(0)
            .expect("integrity_check text");
        assert_eq!(integrity, "ok", "round {round}");
        assert!(
            pragma_rows(&m, "foreign_key_check").await.is_empty(),
            "round {round}: foreign keys broken"
        );

        let store = load(&m).await;
        let mut ended = BTreeSet::new();
        let mut untouched = 0;
        let mut half = Vec::new();
        for session in &store.sessions {
            match classify(&m, &store, session).await {
                Ok(State::Ended) => {
                    ended.insert(id(&session.id));
                }
                Ok(State::Untouched) => untouched += 1,
                Err(why) => half.push(format!("{}: {why}", id(&session.id))),
            }
        }
        assert!(
            half.is_empty(),
            "round {round} (killed {delay:?} after the first end): sessions neither ended \
             nor untouched:\n{}",
            half.join("\n")
        );
        for id in &reported {
            assert!(
                ended.contains(id),
                "round {round}: the child saw {id} end, but it is not ended"
            );
        }
        assert!(
            ended.is_superset(&ended_before),
            "round {round}: a session ended in an earlier round is no longer ended"
        );
        eprintln!(
            "crash round {round:2}: killed {:3} ms after the first end; {:3} sessions: \
             {:3} ended (+{}), {:2} untouched; child reported {} ends",
            delay.as_millis(),
            store.sessions.len(),
            ended.len(),
            ended.len() - ended_before.len(),
            untouched,
            reported.len()
        );
        ended_before = ended;
        last = (ended_before.len(), untouched);
        m.close().await.expect("close");
    }

    eprintln!(
        "crash totals: {KILLS} kills, {} sessions fully ended, {} untouched, 0 half-ended; \
         the children reported {reported_total} ends",
        last.0, last.1
    );
    assert!(last.0 as u64 >= KILLS, "at least one end per round");
    assert!(last.1 > 0, "some sessions were left open");
    assert!(
        last.0 >= reported_total,
        "every end a child saw is stored (a kill between commit and print adds more)"
    );
}
