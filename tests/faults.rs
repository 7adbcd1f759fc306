//! Faults and misuse: whatever the input or the machine does, nothing stored
//! is lost, nothing panics, and no call reports what did not happen. Every
//! test asserts on stored rows, and every call that could hang runs under a
//! timeout, so a hang fails the test.
mod common;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use demiarch_sessions::{
    Config, ContextSource, ContextWindow, Error, LockOptions, SessionManager, MAX_CONTEXT_DEPTH,
};
use serde_json::{json, Value};
use uuid::Uuid;

/// Fails the test instead of hanging it.
async fn within<T>(what: &str, call: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .unwrap_or_else(|_| panic!("{what} hung"))
}

/// `levels` arrays inside each other around a number, built without
/// recursion.
fn nested(levels: usize) -> Value {
    let mut value = json!(1);
    for _ in 0..levels {
        value = Value::Array(vec![value]);
    }
    value
}

/// Takes a deeply nested value apart without recursion (the test's own drop
/// would otherwise overflow the stack).
fn forget_deep(value: Value) {
    let mut pending = vec![value];
    while let Some(value) = pending.pop() {
        if let Value::Array(items) = value {
            pending.extend(items);
        }
    }
}

/// A context source that hands out fixed windows, as an app's own would.
#[derive(Default)]
struct FixedWindows(Mutex<Vec<ContextWindow>>);

impl ContextSource for FixedWindows {
    fn windows(&self, _: Uuid) -> Vec<ContextWindow> {
        self.0.lock().expect("windows").clone()
    }

    fn clear(&self, _: Uuid) {
        self.0.lock().expect("windows").clear();
    }
}

/// A second manager on the same database (another instance), whose live
/// windows come from `source`.
fn manager_with_source(db: &TestDb, source: Arc<FixedWindows>) -> SessionManager {
    SessionManager::new(db.manager.connection().clone(), test_config())
        .expect("manager")
        .with_context_source(source)
}

// ---- 1, 2: a context the library saves can always be read back ------------------

#[tokio::test]
async fn windows_that_could_not_be_read_back_are_refused_by_key_and_change_nothing() {
    each_backend(
        "windows_that_could_not_be_read_back_are_refused_by_key_and_change_nothing",
        |db| async move {
            let (session, _) = populated_session(&db, 1, 2).await;
            // The registry refuses them as they come in, naming the window;
            // a million levels are taken apart without overflowing the stack.
            for (key, data) in [
                ("too-deep", nested(MAX_CONTEXT_DEPTH + 1)),
                ("very-deep", nested(1_000_000)),
                ("nul", json!({"text": "a\u{0}b"})),
                ("nul-in-name", json!({"a\u{0}": 1})),
            ] {
                match db.manager.contexts().put(session, key, data) {
                    Err(Error::ContextRefused {
                        session_id,
                        key: refused,
                        reason,
                    }) => {
                        assert_eq!((session_id, refused.as_str()), (session, key));
                        assert!(!reason.is_empty());
                    }
                    other => panic!("{key}: expected ContextRefused, got {other:?}"),
                }
            }
            assert!(db.manager.contexts().windows(session).is_empty());

            // An app's own source hands the end such a window: the end refuses
            // it before its transaction, changes nothing and keeps the windows.
            let source = Arc::new(FixedWindows::default());
            let instance = manager_with_source(&db, source.clone());
            for (key, data) in [
                ("too-deep", nested(MAX_CONTEXT_DEPTH + 1)),
                ("nul", json!(["fine", "not\u{0}fine"])),
            ] {
                *source.0.lock().expect("windows") = vec![
                    ContextWindow {
                        key: "plan".into(),
                        data: json!({"step": 1}),
                    },
                    ContextWindow {
                        key: key.into(),
                        data,
                    },
                ];
                let before = snapshot(&db).await;
                match within("end", instance.end_session(session)).await {
                    Err(Error::ContextRefused { key: refused, .. }) => assert_eq!(refused, key),
                    other => panic!("{key}: expected ContextRefused, got {other:?}"),
                }
                assert_eq!(snapshot(&db).await, before, "{key}: nothing changed");
                assert_eq!(source.0.lock().expect("windows").len(), 2, "{key}: kept");
            }

            // At the limit it is saved and read back as it was, on every backend.
            let deepest = nested(MAX_CONTEXT_DEPTH);
            *source.0.lock().expect("windows") = vec![ContextWindow {
                key: "deepest".into(),
                data: deepest.clone(),
            }];
            let report = within("end", instance.end_session(session))
                .await
                .expect("end at the depth limit");
            assert_eq!(report.context_windows, 1);
            assert_eq!(session_row(&db, session).await.status, "completed");
            let saved = within("read back", db.manager.session_context(session))
                .await
                .expect("read back");
            assert_eq!(saved[0].data, deepest);
        },
    )
    .await;
    // Proves the helper itself is stack-safe for the sizes used above.
    forget_deep(nested(1_000_000));
}

// ---- 3: live windows of a session ended elsewhere -------------------------------

#[tokio::test]
async fn windows_of_a_session_ended_by_another_instance_are_dropped_and_reported() {
    each_backend(
        "windows_of_a_session_ended_by_another_instance_are_dropped_and_reported",
        |db| async move {
            let (session, _) = populated_session(&db, 1, 1).await;
            db.manager
                .contexts()
                .put(session, "plan", json!({"step": 4}))
                .expect("put window");
            db.manager
                .contexts()
                .put(session, "notes", json!(["a"]))
                .expect("put window");
            // Another instance (the operator CLI, say) ends it first, with
            // none of this instance's windows.
            let other = SessionManager::new(db.manager.connection().clone(), test_config())
                .expect("manager");
            let first = within("end elsewhere", other.end_session(session))
                .await
                .expect("end elsewhere");
            assert_eq!(first.context_windows, 0);
            let rows = rows_of(&db, session).await;

            let report = within("end", db.manager.end_session(session))
                .await
                .expect("end");
            assert!(report.already_ended);
            assert_eq!(report.context_windows, 0);
            assert_eq!(report.context_windows_discarded, 2);
            assert!(db.manager.contexts().windows(session).is_empty(), "no leak");
            assert_eq!(rows_of(&db, session).await, rows, "nothing written");
        },
    )
    .await;
}

// ---- 4: shutdown reports what the rows say --------------------------------------

#[tokio::test]
async fn shutdown_reports_exactly_the_ends_that_committed() {
    each_backend(
        "shutdown_reports_exactly_the_ends_that_committed",
        |db| async move {
            for deadline in [
                Duration::ZERO,
                Duration::from_nanos(1),
                Duration::from_micros(300),
                Duration::from_millis(2),
                Duration::MAX,
            ] {
                let manager = db.peer_manager().await;
                let manager = if db.backend == Backend::SqliteMemory {
                    SessionManager::new(manager.connection().clone(), test_config())
                        .expect("manager")
                } else {
                    manager
                };
                let mut sessions = Vec::new();
                for _ in 0..4 {
                    let s = manager
                        .start_session()
                        .await
                        .unwrap_or_else(|e| panic!("start, after deadline {deadline:?}: {e}"));
                    let a = manager.register_agent(s, "coder").await.expect("agent");
                    manager
                        .acquire_lock(a, "file", &format!("{s}/f"))
                        .await
                        .expect("lock");
                    manager
                        .contexts()
                        .put(s, "plan", json!({"s": s}))
                        .expect("put window");
                    sessions.push(s);
                }
                let report = within("shutdown", manager.shutdown(deadline))
                    .await
                    .expect("shutdown");
                assert!(report.failed.is_empty(), "{deadline:?}: {report:?}");
                assert_eq!(
                    report.ended.len() + report.timed_out.len(),
                    sessions.len(),
                    "{deadline:?}: every session is accounted for: {report:?}"
                );
                // Give a commit that the report missed time to land: none may.
                tokio::time::sleep(Duration::from_millis(50)).await;
                for s in &sessions {
                    let row = session_row(&db, *s).await;
                    let ends = audit_of(&db, *s, "session_end").await;
                    if report.ended.contains(s) {
                        assert_eq!(row.status, "completed", "{deadline:?}");
                        assert_eq!(ends.len(), 1);
                        assert!(manager.contexts().windows(*s).is_empty(), "no leak");
                    } else {
                        assert_eq!(
                            row.status, "active",
                            "{deadline:?}: timed out means not ended"
                        );
                        assert!(ends.is_empty());
                        assert_eq!(manager.contexts().windows(*s).len(), 1, "windows kept");
                        assert!(lock_rows(&db, *s)
                            .await
                            .iter()
                            .all(|l| l.released_at.is_none()));
                    }
                }
                if deadline == Duration::MAX {
                    assert_eq!(
                        report.ended.len(),
                        sessions.len(),
                        "an unbounded shutdown ends all"
                    );
                }
                if db.backend != Backend::SqliteMemory {
                    // (On sqlite-memory it shares the test's only connection.)
                    within("close", manager.close()).await.expect("close");
                }
            }
        },
    )
    .await;
}

// ---- 5: a manager after shutdown and close --------------------------------------

#[tokio::test]
async fn a_shut_down_manager_takes_no_new_work_and_a_closed_one_refuses_every_call() {
    each_backend(
        "a_shut_down_manager_takes_no_new_work_and_a_closed_one_refuses_every_call",
        |db| async move {
            let manager = SessionManager::new(db.manager.connection().clone(), test_config())
                .expect("manager");
            let (other_session, other_agents) = populated_session(&db, 1, 0).await;
            within("shutdown", manager.shutdown(Duration::from_secs(5)))
                .await
                .expect("shutdown");
            let before = snapshot(&db).await;
            assert!(matches!(
                within("start", manager.start_session()).await,
                Err(Error::ManagerShutDown)
            ));
            assert!(matches!(
                within("register", manager.register_agent(other_session, "x")).await,
                Err(Error::ManagerShutDown)
            ));
            assert!(matches!(
                within(
                    "acquire",
                    manager.acquire_lock(other_agents[0], "file", "k")
                )
                .await,
                Err(Error::ManagerShutDown)
            ));
            assert_eq!(snapshot(&db).await, before, "refused calls wrote nothing");
            // Reading and ending still work after a shutdown.
            assert!(within("list", manager.list_sessions(Default::default()))
                .await
                .is_ok());
            within("end", manager.end_session(other_session))
                .await
                .expect("end after shutdown");
            assert_eq!(session_row(&db, other_session).await.status, "completed");

            if db.backend == Backend::SqliteMemory {
                eprintln!(
                    "closed-manager checks: skipped on sqlite-memory (closing a second manager \
                     would close the test's only connection); run on every other backend"
                );
                return;
            }
            let closing = db.peer_manager().await;
            let (s, agents) = populated_session(&db, 1, 1).await;
            closing.close().await.expect("close");
            let before = snapshot(&db).await;
            let lock = lock_rows(&db, s).await[0].id.clone();
            let lock = id(&lock);
            macro_rules! closed {
                ($what:expr, $call:expr) => {
                    match within($what, $call).await {
                        Err(Error::ManagerClosed) => {}
                        other => panic!("{} after close: {other:?}", $what),
                    }
                };
            }
            closed!("start", closing.start_session());
            closed!("register", closing.register_agent(s, "x"));
            closed!("acquire", closing.acquire_lock(agents[0], "file", "k2"));
            closed!("renew", closing.renew_lock(lock, Duration::from_secs(1)));
            closed!("release", closing.release_lock(lock));
            closed!("end", closing.end_session(s));
            closed!("sweep", closing.sweep_locks());
            closed!("recover", closing.recover_stale(Duration::from_secs(60)));
            closed!("context", closing.session_context(s));
            closed!("list", closing.list_sessions(Default::default()));
            closed!("shutdown", closing.shutdown(Duration::from_secs(1)));
            assert_eq!(
                snapshot(&db).await,
                before,
                "a closed manager writes nothing"
            );
        },
    )
    .await;
}

// ---- 6: every duration and Config value, honoured or refused by name -------------

const EXTREMES: [Duration; 5] = [
    Duration::ZERO,
    Duration::from_nanos(1),
    Duration::from_secs(3 * 365 * 24 * 3600),
    Duration::from_secs(400 * 365 * 24 * 3600),
    Duration::MAX,
];

#[tokio::test]
async fn every_config_duration_is_honoured_or_refused_by_name() {
    type Set = fn(&mut Config, Duration);
    let fields: [(&str, Set); 5] = [
        ("cleanup_timeout", |c, d| c.cleanup_timeout = d),
        ("busy_timeout", |c, d| c.busy_timeout = d),
        ("connect_timeout", |c, d| c.connect_timeout = d),
        ("heartbeat_interval", |c, d| c.heartbeat_interval = d),
        ("lock_delay", |c, d| c.lock_delay = d),
    ];
    for (field, set) in fields {
        for value in EXTREMES {
            let mut config = test_config();
            set(&mut config, value);
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("s.db");
            let url = format!("sqlite://{}", path.display());
            match within("connect", SessionManager::connect_with(&url, config)).await {
                Ok(manager) => {
                    // Honoured: the manager works with it.
                    let s = within("start", manager.start_session())
                        .await
                        .expect("start");
                    let a = within("agent", manager.register_agent(s, "a"))
                        .await
                        .expect("agent");
                    within("acquire", manager.acquire_lock(a, "f", "k"))
                        .await
                        .expect("acquire");
                    let end = within("end", manager.end_session(s)).await.expect("end");
                    assert_eq!(end.locks_released, 1, "{field} = {value:?}");
                    within("close", manager.close()).await.expect("close");
                }
                Err(Error::InvalidInput { field: named, .. }) => {
                    assert_eq!(named, format!("Config::{field}"), "{field} = {value:?}");
                    assert!(
                        !path.exists(),
                        "{field} = {value:?}: refused before any file"
                    );
                }
                Err(other) => panic!("{field} = {value:?}: {other:?}"),
            }
        }
    }
    for (field, config) in [
        (
            "sweep_batch",
            Config {
                sweep_batch: 0,
                ..test_config()
            },
        ),
        (
            "sweep_batch",
            Config {
                sweep_batch: u64::MAX,
                ..test_config()
            },
        ),
        (
            "max_connections",
            Config {
                max_connections: 0,
                ..test_config()
            },
        ),
        (
            "max_connections",
            Config {
                max_connections: u32::MAX,
                ..test_config()
            },
        ),
        (
            "max_context_bytes",
            Config {
                max_context_bytes: 0,
                ..test_config()
            },
        ),
        (
            "max_context_bytes",
            Config {
                max_context_bytes: usize::MAX,
                ..test_config()
            },
        ),
    ] {
        match SessionManager::connect_with("sqlite::memory:", config).await {
            Err(Error::InvalidInput { field: named, .. }) => {
                assert_eq!(named, format!("Config::{field}"))
            }
            other => panic!("{field}: expected InvalidInput, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn every_duration_argument_is_honoured_or_refused_by_name() {
    each_backend(
        "every_duration_argument_is_honoured_or_refused_by_name",
        |db| async move {
            let m = &db.manager;
            let (session, agents) = populated_session(&db, 1, 0).await;
            for (n, ttl) in EXTREMES.into_iter().enumerate() {
                let before = snapshot(&db).await;
                let key = format!("ttl-{n}");
                let options = LockOptions {
                    ttl: Some(ttl),
                    wait: None,
                };
                match within(
                    "acquire",
                    m.acquire_lock_with(agents[0], "file", &key, options),
                )
                .await
                {
                    Ok(grant) => {
                        let row = lock_rows(&db, session)
                            .await
                            .into_iter()
                            .find(|l| id(&l.id) == grant.lock_id)
                            .expect("lock row");
                        assert!(row.expires_at.is_some(), "{ttl:?}");
                        match within("renew", m.renew_lock(grant.lock_id, ttl)).await {
                            Ok(()) | Err(Error::LockNotHeld { .. }) => {}
                            other => panic!("renew {ttl:?}: {other:?}"),
                        }
                        m.release_lock(grant.lock_id).await.expect("release");
                    }
                    Err(Error::InvalidInput { field, .. }) => {
                        assert_eq!(field, "ttl", "{ttl:?}");
                        assert_eq!(snapshot(&db).await, before, "{ttl:?}: nothing changed");
                    }
                    other => panic!("acquire with ttl {ttl:?}: {other:?}"),
                }
            }
            // A refused renewal names its field too and changes nothing.
            let grant = m
                .acquire_lock(agents[0], "file", "renewed")
                .await
                .expect("acquire");
            for ttl in [Duration::ZERO, Duration::MAX] {
                let before = snapshot(&db).await;
                match within("renew", m.renew_lock(grant.lock_id, ttl)).await {
                    Err(Error::InvalidInput { field: "ttl", .. }) => {}
                    other => panic!("renew {ttl:?}: {other:?}"),
                }
                assert_eq!(snapshot(&db).await, before);
            }
            for stale_after in EXTREMES {
                let other = SessionManager::new(db.manager.connection().clone(), test_config())
                    .expect("manager");
                match within("recover", other.recover_stale(stale_after)).await {
                    Ok(_) => {}
                    Err(Error::InvalidInput {
                        field: "stale_after",
                        ..
                    }) => {}
                    other => panic!("recover_stale({stale_after:?}): {other:?}"),
                }
            }
        },
    )
    .await;
}

// ---- 7: the database file deleted or replaced under a running manager ------------

/// A manager on `url` and a session of it whose one agent holds three locks.
async fn session_holding_three_locks(url: &str) -> (SessionManager, Uuid) {
    let m = SessionManager::connect_with(url, test_config())
        .await
        .expect("connect");
    let s = m.start_session().await.expect("start");
    let a = m.register_agent(s, "coder").await.expect("agent");
    for k in 0..3 {
        m.acquire_lock(a, "file", &format!("k{k}"))
            .await
            .expect("lock");
    }
    (m, s)
}

#[tokio::test]
async fn a_deleted_or_replaced_database_file_is_refused_not_acknowledged() {
    for replace in [false, true] {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sessions.db");
        let url = format!("sqlite://{}", path.display());
        let (m, s) = session_holding_three_locks(&url).await;
        m.contexts().put(s, "plan", json!(1)).expect("put window");
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        if replace {
            std::fs::write(&path, b"").expect("a new file at the path");
        }
        match within("end", m.end_session(s)).await {
            Err(Error::DatabaseMoved { path: named }) => {
                assert!(named.ends_with("sessions.db"), "{named}")
            }
            other => panic!("replace={replace}: expected DatabaseMoved, got {other:?}"),
        }
        assert_eq!(m.contexts().windows(s).len(), 1, "windows kept");
        assert!(matches!(
            within("start", m.start_session()).await,
            Err(Error::DatabaseMoved { .. })
        ));
        let _ = m.close().await;
    }
}

// ---- A full disk (SQLite on a small tmpfs) ----------------------------------------

/// Whether this process runs as root (mounting a tmpfs needs it).
fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A tmpfs mounted for one test, unmounted when dropped (panics included).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(Self { dir })
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Fills the file system holding `path` until it has no space left.
fn fill(path: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let filler = path.join("filler");
    let mut file = std::fs::File::create(&filler).expect("filler");
    let chunk = vec![0u8; 16 * 1024];
    while file
        .write_all(&chunk)
        .and_then(|()| file.sync_all())
        .is_ok()
    {}
    filler
}

#[tokio::test]
async fn a_full_disk_fails_an_end_cleanly_and_the_same_manager_ends_it_once_space_is_freed() {
    if !is_root() {
        eprintln!("disk-full test: SKIPPED (mounting a tmpfs needs root)");
        return;
    }
    let tmpfs = match Tmpfs::mount("4m") {
        Ok(tmpfs) => tmpfs,
        Err(why) => {
            eprintln!("disk-full test: SKIPPED (cannot mount a tmpfs: {why})");
            return;
        }
    };
    let url = format!("sqlite://{}", tmpfs.path().join("sessions.db").display());
    let (m, s) = session_holding_three_locks(&url).await;
    // A context larger than anything written so far, so the end must grow
    // the WAL, on a disk with no room left.
    let big = json!("x".repeat(512 * 1024));
    m.contexts().put(s, "big", big.clone()).expect("put window");
    let filler = fill(tmpfs.path());

    let failed = within("end on a full disk", m.end_session(s)).await;
    assert!(
        failed.is_err(),
        "an end on a full disk must fail: {failed:?}"
    );
    let row = m.session(s).await.expect("read session");
    assert_eq!(row.status.as_str(), "active", "nothing half-written");
    let locks = m
        .locks(demiarch_sessions::LockFilter {
            session_id: Some(s),
            ..Default::default()
        })
        .await
        .expect("locks")
        .rows;
    assert!(locks.iter().all(|l| l.released_at.is_none()));
    let ends = m
        .audit_events(demiarch_sessions::AuditFilter {
            session_id: Some(s),
            event_type: Some("session_end".into()),
            ..Default::default()
        })
        .await
        .expect("audit")
        .rows;
    assert!(ends.is_empty());
    assert_eq!(m.contexts().windows(s).len(), 1, "windows kept");

    std::fs::remove_file(&filler).expect("free space");
    let report = within("end once space is freed", m.end_session(s))
        .await
        .expect("end once space is freed");
    assert_eq!(report.locks_released, 3);
    assert_eq!(m.session_context(s).await.expect("saved")[0].data, big);
    let _ = m.close().await;
    eprintln!("disk-full test: ran on a 4 MiB tmpfs");
}

// ---- A PostgreSQL crash and restart mid-burst -------------------------------------

/// A private PostgreSQL cluster for one test, on a free port, run as the
/// `postgres` user; stopped (immediately) when dropped. Never the shared
/// server on 5432.
struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    port: u16,
}

impl PrivatePostgres {
    fn start() -> Result<Self, String> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .map_err(|e| format!("no /usr/lib/postgresql: {e}"))?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .find(|bin| bin.join("pg_ctl").exists())
            .ok_or("no pg_ctl under /usr/lib/postgresql")?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        run(
            "chown",
            &["-R", "postgres", &dir.path().display().to_string()],
        )?;
        let port = free_port()?;
        let pg = Self { dir, bin, port };
        pg.as_postgres(
            "initdb",
            &["-D", &pg.data(), "-A", "trust", "-U", "postgres"],
        )?;
        pg.ctl_start()?;
        Ok(pg)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn as_postgres(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let tool = self.bin.join(tool).display().to_string();
        let mut all = vec!["-u", "postgres", "--", tool.as_str()];
        all.extend_from_slice(args);
        run("runuser", &all)
    }

    fn ctl_start(&self) -> Result<(), String> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log").display().to_string();
        self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                &log,
                "-w",
                "start",
            ],
        )
    }

    fn crash(&self) -> Result<(), String> {
        self.as_postgres(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        )
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.crash();
    }
}

/// A loopback port nobody listens on right now.
fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| e.to_string())
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs ends and acquires on `url` from four tasks, crashes the server
/// mid-burst and restarts it, then checks that every end that returned `Ok`
/// is there, that no session is half-ended, and that the same manager serves
/// again within a few seconds.
async fn crash_mid_burst(
    name: &str,
    url: &str,
    crash: impl FnOnce() -> Result<(), String>,
    restart: impl FnOnce() -> Result<(), String>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let config = Config {
        cleanup_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(500),
        ..test_config()
    };
    let m = SessionManager::connect_with(url, config)
        .await
        .expect("connect to the private server");
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..4 {
        let (m, stop, acknowledged) = (m.clone(), stop.clone(), acknowledged.clone());
        workers.spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let Ok(s) = m.start_session().await else {
                    continue;
                };
                let Ok(a) = m.register_agent(s, "coder").await else {
                    continue;
                };
                for k in 0..3 {
                    let _ = m.acquire_lock(a, "file", &format!("{w}/{n}/{k}")).await;
                }
                if let Ok(report) = m.end_session(s).await {
                    acknowledged
                        .lock()
                        .expect("acks")
                        .push((s, report.locks_released));
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    crash().expect("crash the server");
    tokio::time::sleep(Duration::from_millis(500)).await;
    restart().expect("restart the server");
    stop.store(true, Ordering::SeqCst);
    while workers.join_next().await.is_some() {}

    // The same manager serves again within a few seconds, no app restart.
    let back = tokio::time::Instant::now();
    let s = loop {
        match m.start_session().await {
            Ok(s) => break s,
            Err(e) if back.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the manager did not serve again within 10 s: {e}"),
        }
    };
    let served_after = back.elapsed();
    m.end_session(s).await.expect("end after the restart");

    let acknowledged = acknowledged.lock().expect("acks").clone();
    assert!(
        !acknowledged.is_empty(),
        "the burst ended some sessions before the crash"
    );
    for (s, locks) in &acknowledged {
        let row = m.session(*s).await.expect("acknowledged session");
        assert_eq!(
            row.status.as_str(),
            "completed",
            "acknowledged end of {s} survived"
        );
        let held = m
            .locks(demiarch_sessions::LockFilter {
                session_id: Some(*s),
                held_only: true,
                ..Default::default()
            })
            .await
            .expect("locks")
            .rows;
        assert!(held.is_empty(), "{s}: its {locks} locks stay released");
    }
    // No session is half-ended: completed ones have their audit row and no
    // held lock; open ones have neither.
    let all = m
        .list_sessions(demiarch_sessions::SessionFilter {
            limit: Some(100_000),
            ..Default::default()
        })
        .await
        .expect("sessions")
        .rows;
    let mut half = Vec::new();
    for session in &all {
        let ends = m
            .audit_events(demiarch_sessions::AuditFilter {
                session_id: Some(session.id),
                event_type: Some("session_end".into()),
                ..Default::default()
            })
            .await
            .expect("audit")
            .rows
            .len();
        let completed = session.status.as_str() == "completed";
        if completed != (ends == 1) {
            half.push(session.id);
        }
    }
    assert!(half.is_empty(), "half-ended sessions: {half:?}");
    let _ = m.close().await;
    eprintln!(
        "{name} crash test: {} acknowledged ends before the crash, all kept; \
         {} sessions checked, none half-ended; served again {served_after:?} after the restart",
        acknowledged.len(),
        all.len()
    );
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_crash_mid_burst_loses_no_acknowledged_end_and_the_manager_serves_again() {
    if !is_root() {
        eprintln!("postgres crash test: SKIPPED (running a private server needs root)");
        return;
    }
    let pg = match PrivatePostgres::start() {
        Ok(pg) => pg,
        Err(why) => {
            eprintln!("postgres crash test: SKIPPED (no private PostgreSQL: {why})");
            return;
        }
    };
    crash_mid_burst("postgres", &pg.url(), || pg.crash(), || pg.ctl_start()).await;
}

// ---- A network partition between an instance and PostgreSQL -----------------------

/// A TCP proxy on loopback in front of a server. While cut, it forwards
/// nothing in either direction (bytes wait, as in a partition: no reset);
/// healed, it forwards again.
struct Proxy {
    addr: std::net::SocketAddr,
    cut: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: String) -> Self {
        use std::sync::atomic::AtomicBool;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy listener");
        let addr = listener.local_addr().expect("proxy address");
        let cut = Arc::new(AtomicBool::new(false));
        let flag = cut.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(client_read, server_write, flag.clone()));
                tokio::spawn(pump(server_read, client_write, flag.clone()));
            }
        });
        Self { addr, cut, task }
    }

    fn partition(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cut: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while cut.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while cut.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A snapshot without `last_heartbeat_at`: a heartbeat the proxy had
/// already passed on when the partition began may still commit.
fn without_heartbeats(mut snapshot: Snapshot) -> Snapshot {
    for session in &mut snapshot.sessions {
        session.last_heartbeat_at = None;
    }
    snapshot
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_instance_times_out_is_recovered_by_another_and_resumes_after_healing() {
    if let Err(why) = Backend::Postgres.availability() {
        eprintln!("partition test: SKIPPED ({why})");
        return;
    }
    let db = TestDb::new(Backend::Postgres).await;
    // postgres://user@host:port/db: the proxy stands in for host:port.
    let (head, rest) = db.url.split_once('@').expect("user@ in the URL");
    let (upstream, database) = rest.split_once('/').expect("/database in the URL");
    let proxy = Proxy::start(upstream.to_owned()).await;
    let proxied = format!("{head}@{}/{database}", proxy.addr);
    let budget = Duration::from_millis(400);
    let config = Config {
        cleanup_timeout: budget,
        connect_timeout: budget,
        heartbeat_interval: Duration::from_millis(100),
        ..test_config()
    };
    let a = SessionManager::connect_with(&proxied, config)
        .await
        .expect("connect through the proxy");
    let s = a.start_session().await.expect("start");
    let agent = a.register_agent(s, "coder").await.expect("agent");
    let grant = a
        .acquire_lock(agent, "file", "partitioned")
        .await
        .expect("lock");
    let before = without_heartbeats(snapshot(&db).await);

    proxy.partition(true);
    let mut timeouts = 0;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        match within("end during the partition", a.end_session(s)).await {
            Err(e) if e.is_timeout() => timeouts += 1,
            other => panic!("expected a timeout during the partition, got {other:?}"),
        }
        assert!(
            t.elapsed() < budget + Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    }
    assert_eq!(
        without_heartbeats(snapshot(&db).await),
        before,
        "nothing changed during the partition"
    );

    // Partitioned longer than stale_after: another instance recovers it, and
    // the partitioned holder's fencing token stops passing.
    let stale_after = Duration::from_millis(600);
    tokio::time::sleep(stale_after + Duration::from_millis(200)).await;
    let recovered = within("recover", db.manager.recover_stale(stale_after))
        .await
        .expect("recover");
    assert_eq!(recovered.interrupted, vec![s]);
    assert!(!db
        .manager
        .validate_fence("file", "partitioned", grant.fencing_token)
        .await
        .expect("fence"));
    assert_eq!(session_row(&db, s).await.status, "interrupted");

    proxy.partition(false);
    // After healing, the same manager ends it (it was interrupted, not
    // ended), and a retry is idempotent.
    let healed = std::time::Instant::now();
    let report = loop {
        match within("end after healing", a.end_session(s)).await {
            Ok(report) => break report,
            Err(e) if e.is_timeout() && healed.elapsed() < Duration::from_secs(10) => continue,
            Err(e) => panic!("end after healing: {e}"),
        }
    };
    assert!(!report.already_ended);
    assert_eq!(report.locks_released, 0, "recovery had released the lock");
    assert!(
        within("retry", a.end_session(s))
            .await
            .expect("retry")
            .already_ended
    );
    assert_eq!(audit_of(&db, s, "session_end").await.len(), 1);

    // Heartbeats resume for the instance's open sessions.
    let s2 = a.start_session().await.expect("start after healing");
    let first = session_row(&db, s2)
        .await
        .last_heartbeat_at
        .expect("heartbeat");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let later = session_row(&db, s2)
        .await
        .last_heartbeat_at
        .expect("heartbeat");
    assert!(later > first, "heartbeats resumed: {first} -> {later}");
    let _ = a.close().await;
    db.cleanup().await;
    eprintln!("partition test: {timeouts} ends timed out within {budget:?} during the partition");
}

// ---- A MariaDB crash and restart mid-burst ----------------------------------------

/// A private MariaDB server for one test, on a free port, killed with
/// SIGKILL when dropped. Never the shared server on 3306.
struct PrivateMariaDb {
    dir: tempfile::TempDir,
    port: u16,
    server: Mutex<Option<std::process::Child>>,
}

impl PrivateMariaDb {
    fn start() -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let data = dir.path().join("data").display().to_string();
        run(
            "mariadb-install-db",
            &[
                "--no-defaults",
                &format!("--datadir={data}"),
                "--user=root",
                "--skip-test-db",
                "--auth-root-authentication-method=normal",
            ],
        )?;
        let port = free_port()?;
        let db = Self {
            dir,
            port,
            server: Mutex::new(None),
        };
        db.spawn()?;
        Ok(db)
    }

    /// Starts `mariadbd` and waits until it accepts connections.
    fn spawn(&self) -> Result<(), String> {
        let path = |name: &str| self.dir.path().join(name).display().to_string();
        let child = std::process::Command::new("mariadbd")
            .args([
                "--no-defaults",
                &format!("--datadir={}", path("data")),
                &format!("--port={}", self.port),
                &format!("--socket={}", path("sock")),
                "--bind-address=127.0.0.1",
                "--user=root",
                "--skip-grant-tables",
                "--innodb-flush-log-at-trx-commit=1",
                &format!("--log-error={}", path("log")),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("mariadbd: {e}"))?;
        *self.server.lock().map_err(|e| e.to_string())? = Some(child);
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if started.elapsed() > Duration::from_secs(30) {
                return Err("mariadbd did not listen within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// SIGKILL, as a crash.
    fn crash(&self) -> Result<(), String> {
        let mut server = self.server.lock().map_err(|e| e.to_string())?;
        if let Some(mut child) = server.take() {
            child.kill().map_err(|e| e.to_string())?;
            child.wait().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn url(&self, database: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for PrivateMariaDb {
    fn drop(&mut self) {
        let _ = self.crash();
    }
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mariadb_crash_mid_burst_loses_no_acknowledged_end_and_the_manager_serves_again() {
    use sea_orm::ConnectionTrait;
    if !is_root() {
        eprintln!("mariadb crash test: SKIPPED (running a private server needs root)");
        return;
    }
    let db = match PrivateMariaDb::start() {
        Ok(db) => db,
        Err(why) => {
            eprintln!("mariadb crash test: SKIPPED (no private MariaDB: {why})");
            return;
        }
    };
    let admin = sea_orm::Database::connect(db.url("mysql"))
        .await
        .expect("connect to the private server");
    admin
        .execute_unprepared("CREATE DATABASE crash")
        .await
        .expect("create the test database");
    admin.close().await.expect("close");
    crash_mid_burst("mariadb", &db.url("crash"), || db.crash(), || db.spawn()).await;
}
