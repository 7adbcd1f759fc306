//! A store opened read-only (`Config::read_only`, `?mode=ro`) migrates and
//! writes nothing, refuses every write call by name, and the CLI's read
//! commands work on a file nobody can write (a read-only bind mount, where
//! the test may mount one: tests run as root, which file modes do not stop).
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use common::{each_backend, snapshot, test_config, Backend, TestDb};
use demiarch_sessions::{
    AgentOutcome, Config, Error, LockFilter, LockOptions, Operator, RetentionPolicy, SessionFilter,
    SessionManager,
};
use migration::MigratorTrait;
use sea_orm::{ConnectionTrait, Database};
use uuid::Uuid;

/// What a store holds for these tests: an open session whose agent holds a
/// lock, and an ended session.
struct Fixture {
    open: Uuid,
    agent: Uuid,
    lock: Uuid,
    ended: Uuid,
}

async fn populate(manager: &SessionManager) -> Fixture {
    let open = manager.start_session().await.expect("start");
    let agent = manager.register_agent(open, "coder").await.expect("agent");
    let lock = manager
        .acquire_lock(agent, "file", "src/main.rs")
        .await
        .expect("acquire")
        .lock_id;
    let ended = manager.start_session().await.expect("start");
    manager.end_session(ended).await.expect("end");
    Fixture {
        open,
        agent,
        lock,
        ended,
    }
}

fn read_only_config() -> Config {
    Config {
        read_only: true,
        ..test_config()
    }
}

/// Every write call of the manager, with the name it must be refused by.
async fn every_write_is_refused(ro: &SessionManager, f: &Fixture) {
    let operator = Operator {
        via: "test".into(),
        reason: Some("read-only check".into()),
    };
    let policy = RetentionPolicy {
        completed_after: Some(Duration::ZERO),
        ..RetentionPolicy::default()
    };
    let outcomes: Vec<(&str, Result<(), Error>)> = vec![
        ("start_session", ro.start_session().await.map(drop)),
        (
            "register_agent",
            ro.register_agent(f.open, "coder").await.map(drop),
        ),
        (
            "acquire_lock",
            ro.acquire_lock(f.agent, "file", "other").await.map(drop),
        ),
        (
            "acquire_lock_with",
            ro.acquire_lock_with(f.agent, "file", "other", LockOptions::default())
                .await
                .map(drop),
        ),
        (
            "renew_lock",
            ro.renew_lock(f.lock, Duration::from_secs(60)).await,
        ),
        ("sweep_locks", ro.sweep_locks().await.map(drop)),
        (
            "finish_agent",
            ro.finish_agent(f.agent, AgentOutcome::Completed)
                .await
                .map(drop),
        ),
        ("release_lock", ro.release_lock(f.lock).await),
        (
            "release_lock_by",
            ro.release_lock_by(f.lock, &operator).await,
        ),
        ("end_session", ro.end_session(f.open).await.map(drop)),
        (
            "end_session_by",
            ro.end_session_by(f.open, &operator).await.map(drop),
        ),
        ("pause_session", ro.pause_session(f.open).await),
        ("unpause_session", ro.unpause_session(f.open).await),
        (
            "pause_session_by",
            ro.pause_session_by(f.open, &operator).await,
        ),
        (
            "unpause_session_by",
            ro.unpause_session_by(f.open, &operator).await,
        ),
        (
            "recover_stale",
            ro.recover_stale(Duration::from_millis(1)).await.map(drop),
        ),
        (
            "recover_stale_by",
            ro.recover_stale_by(Duration::from_millis(1), &operator)
                .await
                .map(drop),
        ),
        ("resume_session", ro.resume_session(f.ended).await.map(drop)),
        ("prune", ro.prune(&policy).await.map(drop)),
        (
            "prune_with_progress",
            ro.prune_with_progress(&policy, |_| {}).await.map(drop),
        ),
    ];
    for (name, outcome) in outcomes {
        match outcome {
            Err(Error::ReadOnly { operation }) => {
                assert_eq!(operation, name);
                let message = Error::ReadOnly { operation }.to_string();
                assert!(message.starts_with(name), "{message}");
                assert!(message.contains("read-only"), "{message}");
            }
            other => panic!("{name} on a read-only manager: {other:?}"),
        }
    }
}

/// Every read of the manager works, and sees the fixture.
async fn every_read_works(ro: &SessionManager, f: &Fixture) {
    let sessions = ro
        .list_sessions(SessionFilter::default())
        .await
        .expect("list");
    assert_eq!(sessions.rows.len(), 2);
    assert_eq!(ro.session(f.open).await.expect("session").id, f.open);
    let prefix = f.open.simple().to_string();
    assert_eq!(ro.find_session(&prefix[..8]).await.expect("find"), f.open);
    assert_eq!(ro.agents(f.open).await.expect("agents").rows.len(), 1);
    assert_eq!(
        ro.locks(LockFilter::default())
            .await
            .expect("locks")
            .rows
            .len(),
        1
    );
    assert!(ro
        .lock_waiters("file", "src/main.rs")
        .await
        .expect("waiters")
        .is_empty());
    assert!(!ro
        .audit_events(Default::default())
        .await
        .expect("audit")
        .rows
        .is_empty());
    assert!(ro
        .session_context(f.ended)
        .await
        .expect("saved context")
        .is_empty());
    let dry = ro
        .prune_dry_run(&RetentionPolicy {
            completed_after: Some(Duration::ZERO),
            ..RetentionPolicy::default()
        })
        .await
        .expect("dry run");
    assert_eq!(dry.sessions_deleted, 1);
    assert!(dry.dry_run);
}

/// A write past the manager, on its own connection: the database refuses it.
async fn raw_write_fails(ro: &SessionManager) {
    let sql = "UPDATE global_sessions SET status = 'completed'";
    let outcome = ro.connection().execute_unprepared(sql).await;
    assert!(outcome.is_err(), "a raw UPDATE on a read-only connection");
}

#[tokio::test]
async fn every_write_is_refused_by_name_and_changes_no_row() {
    each_backend("read-only writes", |db: TestDb| async move {
        if db.backend == Backend::SqliteMemory {
            // Each in-memory connect is a new, empty database.
            return;
        }
        let fixture = populate(&db.manager).await;
        let before = snapshot(&db).await;
        let ro = SessionManager::connect_with(&db.url, read_only_config())
            .await
            .expect("read-only connect");
        assert!(ro.is_read_only());
        assert!(!db.manager.is_read_only());
        every_read_works(&ro, &fixture).await;
        every_write_is_refused(&ro, &fixture).await;
        raw_write_fails(&ro).await;
        // Shutting a read-only manager down ends nothing and writes nothing.
        let report = ro.shutdown(Duration::from_secs(1)).await.expect("shutdown");
        assert!(report.ended.is_empty() && report.failed.is_empty());
        ro.close().await.expect("close");
        assert_eq!(snapshot(&db).await, before, "{}", db.backend.name());
        if !db.is_sqlite() {
            // The CLI's read commands open a server read-only too.
            let out = cli(&db.url, &["--json", "sessions", "list"]);
            assert_ok(&out);
            let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
            assert_eq!(listed["sessions"].as_array().map(Vec::len), Some(2));
            assert_ok(&cli(&db.url, &["--json", "locks", "list", "--held"]));
            assert_ok(&cli(&db.url, &["--json", "audit", "tail"]));
            assert_eq!(snapshot(&db).await, before, "{}", db.backend.name());
        }
        db.cleanup().await;
    })
    .await;
}

/// A SQLite store closed by its writer, and what the test compares it by.
struct Store {
    dir: tempfile::TempDir,
    fixture: Fixture,
}

impl Store {
    async fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("store.db").display());
        let manager = SessionManager::connect_with(&url, test_config())
            .await
            .expect("connect");
        let fixture = populate(&manager).await;
        manager.close().await.expect("close");
        Self { dir, fixture }
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("store.db")
    }
}

/// A file's bytes (their length and hash) and modification time, the bytes
/// of its -wal file (0 if there is none), and the directory's other entries.
///
/// A read-only open of a WAL store in a writable directory may leave an
/// empty -wal and a -shm index beside it (SQLite needs the index to read
/// safely alongside writers, and a read-only connection may not remove
/// them); it never writes the store or its log.
#[derive(Debug, PartialEq)]
struct FileState {
    bytes: (usize, u64),
    modified: SystemTime,
    wal_bytes: u64,
    entries: Vec<String>,
}

fn state_of(file: &Path) -> FileState {
    use std::hash::{Hash, Hasher};
    let dir = file.parent().expect("a directory");
    let mut entries: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| !name.ends_with("-wal") && !name.ends_with("-shm"))
        .collect();
    entries.sort();
    let bytes = std::fs::read(file).expect("read the store");
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    let mut wal = file.as_os_str().to_owned();
    wal.push("-wal");
    FileState {
        bytes: (bytes.len(), hasher.finish()),
        modified: std::fs::metadata(file)
            .and_then(|m| m.modified())
            .expect("mtime"),
        wal_bytes: std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0),
        entries,
    }
}

#[tokio::test]
async fn a_read_only_open_leaves_the_sqlite_file_as_it_was() {
    let store = Store::new().await;
    let before = state_of(&store.file());
    assert_eq!(before.entries, ["store.db"]);
    assert_eq!(before.wal_bytes, 0, "the writer closed cleanly");
    for (url, config) in [
        (
            format!("sqlite://{}", store.file().display()),
            read_only_config(),
        ),
        (
            format!("sqlite://{}?mode=ro", store.file().display()),
            test_config(),
        ),
    ] {
        let ro = SessionManager::connect_with(&url, config)
            .await
            .expect("read-only connect");
        assert!(ro.is_read_only(), "{url}");
        every_read_works(&ro, &store.fixture).await;
        every_write_is_refused(&ro, &store.fixture).await;
        raw_write_fails(&ro).await;
        assert_eq!(
            ro.write_connection().get_database_backend(),
            ro.connection().get_database_backend()
        );
        ro.close().await.expect("close");
        assert_eq!(state_of(&store.file()), before, "{url}");
    }
}

#[tokio::test]
async fn a_read_only_open_refuses_what_it_cannot_read() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A missing file is not created.
    let missing = dir.path().join("missing.db");
    let url = format!("sqlite://{}", missing.display());
    match SessionManager::connect_with(&url, read_only_config()).await {
        Err(Error::CannotOpen { path, reason }) => {
            assert_eq!(path, missing.display().to_string());
            assert!(reason.contains("read-only"), "{reason}");
        }
        other => panic!("missing file: {other:?}"),
    }
    assert!(!missing.exists());

    // An in-memory database would be empty.
    match SessionManager::connect_with("sqlite::memory:", read_only_config()).await {
        Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "Config::read_only"),
        other => panic!("in-memory: {other:?}"),
    }

    // A read-only manager prunes nothing in the background either.
    let config = Config {
        retention: Some(RetentionPolicy::default()),
        ..read_only_config()
    };
    match config.validate() {
        Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "Config::retention"),
        other => panic!("read_only with retention: {other:?}"),
    }

    // A store behind the latest migration is refused, naming what is missing,
    // and left as it was.
    let old = dir.path().join("old.db");
    let conn = Database::connect(format!("sqlite://{}?mode=rwc", old.display()))
        .await
        .expect("create");
    migration::Migrator::up(&conn, Some(2))
        .await
        .expect("migrate two");
    conn.close().await.expect("close");
    let before = state_of(&old);
    let all: Vec<String> = migration::Migrator::migrations()
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    let url = format!("sqlite://{}", old.display());
    match SessionManager::connect_with(&url, read_only_config()).await {
        Err(e @ Error::NotMigrated { .. }) => {
            let message = e.to_string();
            let Error::NotMigrated { store, missing } = e else {
                unreachable!()
            };
            assert_eq!(store, old.display().to_string());
            assert_eq!(missing, all[2..].to_vec());
            assert!(
                message.contains("not migrated to the latest schema"),
                "{message}"
            );
            assert!(message.contains("open it writable once"), "{message}");
        }
        other => panic!("old schema: {other:?}"),
    }
    assert_eq!(state_of(&old), before);

    // The CLI's read commands say so, exit 5, and point at a write command.
    let out = cli(&url, &["sessions", "list"]);
    let stderr = assert_exit(&out, 5);
    assert!(stderr.contains("not migrated"), "{stderr}");
    assert!(stderr.contains("locks sweep"), "{stderr}");
    assert_eq!(state_of(&old), before);
}

// ---- The CLI on a file nobody can write.

fn cli(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_demiarch-sessions"))
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .arg("--database-url")
        .arg(url)
        .args(args)
        .output()
        .expect("run the CLI")
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_exit(out: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    stderr
}

/// A read-only bind mount of a directory, unmounted on drop; `None` where
/// this process may not mount.
struct ReadOnlyMount {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl ReadOnlyMount {
    fn of(source: &Path) -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let path = dir.path().join("ro");
        std::fs::create_dir(&path).ok()?;
        let run = |args: &[&str]| {
            Command::new("mount")
                .args(args)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        let (src, dst) = (source.to_str()?.to_owned(), path.to_str()?.to_owned());
        if !run(&["--bind", &src, &dst]) {
            return None;
        }
        let mount = Self { path, _dir: dir };
        run(&["-o", "remount,bind,ro", &dst]).then_some(mount)
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

#[tokio::test]
async fn cli_reads_work_on_a_read_only_file_and_writes_are_refused_by_name() {
    let store = Store::new().await;
    let before = state_of(&store.file());
    let mount = ReadOnlyMount::of(store.dir.path());
    let file = match &mount {
        Some(mount) => {
            let file = mount.path.join("store.db");
            // Even root cannot write there.
            let write = std::fs::OpenOptions::new().append(true).open(&file);
            assert!(write.is_err(), "the mount is read-only");
            file
        }
        None => {
            eprintln!("cannot mount read-only here: reading the file where it is");
            store.file()
        }
    };
    let url = format!("sqlite://{}", file.display());
    let f = &store.fixture;
    let open = f.open.to_string();
    let listed = cli(&url, &["--json", "sessions", "list"]);
    assert_ok(&listed);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("json");
    assert_eq!(listed["sessions"].as_array().map(Vec::len), Some(2));
    for args in [
        &["sessions", "list"][..],
        &["sessions", "show", &open[..8]],
        &["--json", "sessions", "show", &open],
        &["locks", "list", "--held"],
        &["--json", "locks", "waiters", "file", "src/main.rs"],
        &["audit", "tail", "-n", "5"],
        &["--json", "prune", "--dry-run", "--completed-after", "0s"],
    ] {
        assert_ok(&cli(&url, args));
    }

    // Every write command, on the store opened read-only, is refused by
    // the name of the call it makes.
    let ro_url = format!("{url}?mode=ro");
    let lock = f.lock.to_string();
    let agent = f.agent.to_string();
    for (args, operation) in [
        (&["locks", "sweep"][..], "sweep_locks"),
        (&["sessions", "end", &open, "--force"], "end_session"),
        (&["sessions", "pause", &open], "pause_session"),
        (&["recover", "--stale-after", "10m"], "recover_stale"),
        (
            &["locks", "release", &lock, "--reason", "stuck"],
            "release_lock_by",
        ),
        (&["agents", "finish", &agent], "finish_agent"),
        (&["prune", "--completed-after", "0s"], "prune_with_progress"),
        (&["demo"], "start_session"),
    ] {
        let stderr = assert_exit(&cli(&ro_url, args), 2);
        assert!(
            stderr.contains(&format!("{operation} refused")) && stderr.contains("read-only"),
            "{args:?}: {stderr}"
        );
    }
    if mount.is_some() {
        // Nothing could be created beside it either.
        let names: Vec<_> = std::fs::read_dir(store.dir.path())
            .expect("read dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["store.db"]);
    }
    drop(mount);
    assert_eq!(state_of(&store.file()), before);
}
