//! The `demiarch-sessions` binary, driven as an operator would: every
//! command in its human and JSON forms, each error path and its exit code,
//! on a temporary SQLite database. Where it matters the rows are read back
//! through the library.
#![cfg(feature = "cli")]

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use assert_cmd::Command;
use chrono::{TimeZone, Utc};
use demiarch_sessions::entity::{global_sessions, lock_waiters, resource_locks};
use demiarch_sessions::{
    AuditFilter, Config, LockFilter, LockOptions, ReleaseReason, SessionManager, SessionStatus,
};
use sea_orm::entity::prelude::TextUuid;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, Database, EntityTrait, PaginatorTrait,
    QueryFilter, SqliteTransactionMode, TransactionOptions, TransactionTrait,
};
use serde_json::Value;
use tempfile::TempDir;
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_demiarch-sessions");

/// A temporary SQLite file the binary and the test share.
struct Db {
    dir: TempDir,
    url: String,
}

impl Db {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        Self { dir, url }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("t.db")
    }

    /// The binary on this database, with a clean environment.
    fn cli(&self) -> Command {
        let mut cmd = bare();
        cmd.arg("--database-url").arg(&self.url);
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cli().args(args).output().expect("run the binary")
    }

    /// Runs successfully and returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_success(&out, args);
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Runs with `--json` successfully and parses stdout.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let text = self.ok(&all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: bad JSON ({e}): {text}"))
    }

    /// A manager on the same file, for setting up and reading back rows. Its
    /// heartbeat is slow so it never races the test's own updates.
    async fn manager(&self) -> SessionManager {
        let config = Config {
            heartbeat_interval: Duration::from_secs(3600),
            ..Config::default()
        };
        SessionManager::connect_with(&self.url, config)
            .await
            .expect("connect")
    }
}

/// The binary without `DATABASE_URL` or `RUST_LOG` from the test's environment,
/// and with backtraces asked for (none may appear).
fn bare() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .env("RUST_BACKTRACE", "1");
    cmd
}

fn assert_success(out: &Output, args: &[&str]) {
    assert!(
        out.status.success(),
        "{args:?} failed with {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{args:?} wrote to stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A failure: the exit code, nothing on stdout, and exactly one `error:`
/// line on stderr that contains `needle` and no panic or backtrace.
fn assert_error(out: &Output, code: i32, needle: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE", "stack"] {
        assert!(!stderr.contains(bad), "{bad:?} in {stderr}");
    }
    assert!(
        out.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

fn short(id: Uuid) -> String {
    id.to_string()[..8].to_owned()
}

/// The rows under `key` of a page document (`sessions`, `locks`, `events`).
fn page_rows<'a>(doc: &'a Value, key: &str) -> &'a [Value] {
    doc[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key:?} array in {doc}"))
}

fn id_of(value: &Value) -> Uuid {
    value
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
        .unwrap_or_else(|| panic!("not a UUID: {value}"))
}

/// Runs `demo --json` and returns the session id and the report.
fn demo(db: &Db) -> (Uuid, Value) {
    let out = db.json(&["demo"]);
    (id_of(&out["session_id"]), out["report"].clone())
}

/// Makes a session look abandoned: owned by a process that no longer
/// heartbeats (a random owner, so the test manager's heartbeat leaves it).
async fn make_stale(manager: &SessionManager, session: Uuid) {
    let long_ago = Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap();
    global_sessions::Entity::update_many()
        .col_expr(
            global_sessions::Column::LastHeartbeatAt,
            Expr::value(long_ago),
        )
        .col_expr(
            global_sessions::Column::OwnerInstance,
            Expr::value(Uuid::new_v4().to_string()),
        )
        .filter(global_sessions::Column::Id.eq(TextUuid(session)))
        .exec(manager.connection())
        .await
        .expect("age the heartbeat");
}

/// An active session with one agent holding one lock.
async fn session_with_lock(manager: &SessionManager, key: &str) -> (Uuid, Uuid) {
    let session = manager.start_session().await.expect("start");
    let agent = manager
        .register_agent(session, "coder")
        .await
        .expect("agent");
    let grant = manager
        .acquire_lock(agent, "file", key)
        .await
        .expect("lock");
    (session, grant.lock_id)
}

async fn status_of(manager: &SessionManager, session: Uuid) -> SessionStatus {
    manager.session(session).await.expect("session").status
}

/// The rows left in `lock_waiters`, live or abandoned.
async fn waiter_rows(manager: &SessionManager) -> u64 {
    lock_waiters::Entity::find()
        .count(manager.connection())
        .await
        .expect("count lock_waiters")
}

/// Waits until `n` agents are queued for the resource.
async fn until_queued(manager: &SessionManager, resource_type: &str, key: &str, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let queue = manager
            .lock_waiters(resource_type, key)
            .await
            .expect("lock_waiters");
        if queue.len() == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} waiters never queued for {resource_type}/{key}: {queue:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// --- help and usage ---------------------------------------------------------

#[test]
fn help_documents_commands_and_exit_codes() {
    let out = bare().arg("--help").output().expect("run");
    assert_success(&out, &["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "demo",
        "sessions",
        "locks",
        "recover",
        "audit",
        "--database-url",
        "--json",
        "Exit codes",
        "3  not found",
        "4  timeout",
        "5  database unreachable",
    ] {
        assert!(help.contains(needle), "{needle:?} missing from --help");
    }
    let out = bare().arg("--version").output().expect("run");
    assert_success(&out, &["--version"]);
}

#[test]
fn no_subcommand_prints_help_and_exits_2() {
    let out = bare().output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage"));
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    let db = Db::new();
    let cases: [(&[&str], &str); 7] = [
        (&["sessions", "list", "--status", "finished"], "--status"),
        (&["sessions", "list", "--limit", "0"], "at least 1"),
        (&["audit", "tail", "-n", "many"], "not a whole number"),
        (&["recover", "--stale-after", "soon"], "--stale-after"),
        (&["recover", "--stale-after", "0s"], "longer than zero"),
        (
            &["--cleanup-timeout", "fast", "locks", "sweep"],
            "--cleanup-timeout",
        ),
        (&["frobnicate"], "frobnicate"),
    ];
    for (args, needle) in cases {
        assert_error(&db.run(args), 2, needle);
    }
    // Nothing was connected to for a usage error.
    assert!(!db.path().exists());
}

// --- database selection -----------------------------------------------------

#[test]
fn default_database_is_created_in_the_current_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = bare()
        .current_dir(dir.path())
        .args(["sessions", "list"])
        .output()
        .expect("run");
    assert_success(&out, &["sessions", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("No sessions"));
    let file = dir.path().join("demiarch-sessions.db");
    assert!(file.exists(), "default database not created");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn database_url_comes_from_the_environment_and_the_flag_wins() {
    let dir = tempfile::tempdir().expect("temp dir");
    let from_env = dir.path().join("env.db");
    let from_flag = dir.path().join("flag.db");
    let out = bare()
        .env("DATABASE_URL", format!("sqlite://{}", from_env.display()))
        .args(["--json", "demo"])
        .output()
        .expect("run");
    assert_success(&out, &["demo"]);
    assert!(from_env.exists());

    // A plain path is a SQLite file, and --database-url beats DATABASE_URL.
    let out = bare()
        .env("DATABASE_URL", format!("sqlite://{}", from_env.display()))
        .arg("--database-url")
        .arg(&from_flag)
        .args(["--json", "sessions", "list"])
        .output()
        .expect("run");
    assert_success(&out, &["sessions", "list"]);
    assert!(from_flag.exists());
    let listed: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        page_rows(&listed, "sessions").is_empty(),
        "the flag's database is new"
    );
    assert_eq!(listed["counts"]["completed"], 0, "{listed}");
}

// --- demo -------------------------------------------------------------------

#[test]
fn demo_human_output_walks_through_a_session() {
    let db = Db::new();
    let text = db.ok(&["demo"]);
    for needle in [
        "Started session",
        "Registered agents coder",
        "fencing token 1",
        "was refused",
        "willing to wait up to 5s: it is queued at position 1, next in line",
        "the lock was handed to reviewer with fencing token",
        "Put context windows plan and notes",
        "3 locks released, 2 agents cancelled, 2 context windows",
        "released just now (session_end)",
        "released just now (released)",
        "sessions show",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    // A table, drawn by the table crate; after the end nobody waits, so it
    // has no waiters column.
    assert!(text.contains("┆ RESOURCE"), "{text}");
    assert!(!text.contains("WAITERS"), "{text}");
}

#[tokio::test]
async fn demo_json_reports_the_end_and_the_store_agrees() {
    let db = Db::new();
    let out = db.json(&["demo"]);
    let (session, report) = (id_of(&out["session_id"]), out["report"].clone());
    assert!(report["locks_released"].as_u64().unwrap() > 0);
    assert_eq!(report["locks_released"], 3);
    assert_eq!(report["agents_cancelled"], 2);
    assert_eq!(report["context_windows"], 2);
    assert_eq!(report["already_ended"], false);

    let listed = db.json(&["sessions", "list"]);
    let row = page_rows(&listed, "sessions")
        .iter()
        .find(|s| id_of(&s["id"]) == session)
        .expect("demo session listed");
    assert_eq!(row["status"], "completed");

    // The reviewer waited for the coder's lock and was handed it.
    let reviewer = out["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent_type"] == "reviewer")
        .map(|a| id_of(&a["id"]))
        .expect("reviewer listed");
    let handed = &out["handed_over"];
    assert_eq!(handed["to_agent_type"], "reviewer");
    assert_eq!(id_of(&handed["waiter"]["agent_id"]), reviewer);
    assert_eq!(id_of(&handed["waiter"]["session_id"]), session);
    assert_eq!(handed["waiter"]["position"], 1);
    let from = handed["from"]["fencing_token"].as_i64().unwrap();
    let to = handed["to"]["fencing_token"].as_i64().unwrap();
    assert!(to > from, "hand-over token {to} not above {from}");

    let manager = db.manager().await;
    assert_eq!(status_of(&manager, session).await, SessionStatus::Completed);
    let locks = manager
        .locks(LockFilter {
            session_id: Some(session),
            ..LockFilter::default()
        })
        .await
        .unwrap()
        .rows;
    assert_eq!(locks.len(), 4);
    let stored = |grant: &Value| {
        let id = id_of(&grant["lock_id"]);
        let l = locks.iter().find(|l| l.id == id).expect("lock stored");
        (l.agent_id, l.fencing_token, l.release_reason)
    };
    assert_eq!(stored(&handed["from"]).2, Some(ReleaseReason::Released));
    assert_eq!(
        stored(&handed["to"]),
        (reviewer, to, Some(ReleaseReason::SessionEnd))
    );
    assert_eq!(
        locks
            .iter()
            .filter(|l| l.release_reason == Some(ReleaseReason::SessionEnd))
            .count(),
        3
    );
    assert_eq!(waiter_rows(&manager).await, 0, "the queue is left empty");
    let ends = manager
        .audit_events(AuditFilter {
            session_id: Some(session),
            event_type: Some("session_end".into()),
            ..AuditFilter::default()
        })
        .await
        .unwrap()
        .rows;
    assert_eq!(ends.len(), 1);
    let saved = manager.session_context(session).await.unwrap();
    let keys: Vec<&str> = saved.iter().map(|w| w.key.as_str()).collect();
    assert_eq!(keys, ["plan", "notes"]);
    // Nothing of the demo stays open.
    assert!(manager
        .locks(LockFilter {
            held_only: true,
            ..LockFilter::default()
        })
        .await
        .unwrap()
        .rows
        .is_empty());
}

// --- sessions list / show ---------------------------------------------------

#[tokio::test]
async fn sessions_list_shows_filters_and_limits() {
    let db = Db::new();
    assert!(db.ok(&["sessions", "list"]).contains("No sessions"));
    let empty = db.json(&["sessions", "list"]);
    assert!(page_rows(&empty, "sessions").is_empty(), "{empty}");
    assert_eq!(empty["counts"]["active"], 0);
    assert_eq!(empty["next_cursor"], Value::Null);

    let (done, _) = demo(&db);
    let manager = db.manager().await;
    let open = manager.start_session().await.unwrap();

    let text = db.ok(&["sessions", "list"]);
    assert!(text.contains(&done.to_string()) && text.contains(&open.to_string()));
    assert!(text.contains("completed") && text.contains("active"));
    assert!(text.contains(" UTC (just now)"), "{text}");

    let active = db.json(&["sessions", "list", "--status", "active"]);
    let ids: Vec<Uuid> = page_rows(&active, "sessions")
        .iter()
        .map(|s| id_of(&s["id"]))
        .collect();
    assert_eq!(ids, [open]);
    // The counts are of the whole store, whatever the filter.
    assert_eq!(active["counts"]["active"], 1, "{active}");
    assert_eq!(active["counts"]["completed"], 1, "{active}");
    assert_eq!(active["sessions"][0]["status"], "active");

    let newest = db.json(&["sessions", "list", "--limit", "1"]);
    assert_eq!(page_rows(&newest, "sessions").len(), 1);
    assert_eq!(id_of(&newest["sessions"][0]["id"]), open, "newest first");
    assert!(newest["next_cursor"].is_string(), "{newest}");
    assert!(db
        .ok(&["sessions", "list", "--limit", "1"])
        .contains("--limit shows more"));
    assert!(db
        .ok(&["sessions", "list", "--status", "interrupted"])
        .contains("No interrupted sessions"));
}

#[test]
fn sessions_show_by_full_id_and_by_prefix() {
    let db = Db::new();
    let (session, report) = demo(&db);

    let text = db.ok(&["sessions", "show", &short(session)]);
    for needle in [
        session.to_string().as_str(),
        "completed",
        "Agents (2)",
        "coder",
        "reviewer",
        "cancelled",
        "Locks (4)",
        "session_end",
        "saved, 2 windows (plan, notes)",
        "Audit trail (2)",
        "session_start",
        "locks_released=3",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }

    for id in [
        session.to_string(),
        short(session),
        session.to_string().to_uppercase(),
    ] {
        let shown = db.json(&["sessions", "show", &id]);
        assert_eq!(id_of(&shown["session"]["id"]), session);
        assert_eq!(shown["session"]["status"], "completed");
        assert_eq!(shown["agents"].as_array().unwrap().len(), 2);
        let locks = shown["locks"].as_array().unwrap();
        assert_eq!(locks.len(), 4);
        assert!(locks.iter().all(|l| l["held"] == false));
        assert!(locks.iter().all(|l| l["waiters"] == Value::Array(vec![])));
        assert!(locks.iter().all(|l| l["agent_type"].is_string()));
        assert_eq!(shown["context"]["saved"], true);
        assert_eq!(shown["context"]["windows"], 2);
        assert_eq!(
            shown["context"]["keys"],
            serde_json::json!(["plan", "notes"])
        );
        assert_eq!(shown["context"]["bytes"], report["context_bytes"]);
        let events: Vec<&str> = shown["audit"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event_type"].as_str().unwrap())
            .collect();
        assert_eq!(events, ["session_start", "session_end"], "oldest first");
    }
}

#[tokio::test]
async fn sessions_show_of_an_open_session_says_where_its_context_is() {
    let db = Db::new();
    let manager = db.manager().await;
    let (session, _) = session_with_lock(&manager, "src/open.rs").await;
    let text = db.ok(&["sessions", "show", &short(session)]);
    assert!(text.contains("active"), "{text}");
    assert!(text.contains("not saved yet"), "{text}");
    assert!(text.contains("owner alive"), "{text}");
    assert!(text.contains("held"), "{text}");
    let shown = db.json(&["sessions", "show", &short(session)]);
    assert_eq!(shown["context"]["saved"], false);
    assert_eq!(shown["locks"][0]["held"], true);
}

#[tokio::test]
async fn sessions_show_reports_unreadable_context_without_failing() {
    let db = Db::new();
    let (session, _) = demo(&db);
    let manager = db.manager().await;
    global_sessions::Entity::update_many()
        .col_expr(
            global_sessions::Column::ContextData,
            Expr::value(serde_json::json!({"version": 99, "windows": []})),
        )
        .filter(global_sessions::Column::Id.eq(TextUuid(session)))
        .exec(manager.connection())
        .await
        .unwrap();
    let text = db.ok(&["sessions", "show", &short(session)]);
    assert!(text.contains("unreadable"), "{text}");
    assert!(
        text.contains("Agents (2)"),
        "the rest is still shown:\n{text}"
    );
    let shown = db.json(&["sessions", "show", &short(session)]);
    assert!(shown["context"]["error"]
        .as_str()
        .unwrap()
        .contains("version 99"));
}

#[tokio::test]
async fn id_errors_name_the_id_and_exit_2_or_3() {
    let db = Db::new();
    let manager = db.manager().await;
    // Two sessions sharing an 8-digit prefix.
    let now = Utc::now();
    for id in [
        "abcdef01-0000-4000-8000-000000000001",
        "abcdef01-0000-4000-8000-000000000002",
    ] {
        let row = global_sessions::ActiveModel {
            id: Set(id.to_owned()),
            status: Set("active".into()),
            started_at: Set(now.into()),
            updated_at: Set(now.into()),
            completed_at: Set(None),
            context_data: Set(None),
            owner_instance: Set(None),
            last_heartbeat_at: Set(None),
            context_cleared_at: Set(None),
        };
        global_sessions::Entity::insert(row)
            .exec_without_returning(manager.connection())
            .await
            .unwrap();
    }
    for command in [
        &["sessions", "show"][..],
        &["sessions", "end"],
        &["locks", "list", "--session"],
        &["audit", "tail", "--session"],
    ] {
        let with = |id: &str| {
            let mut args = command.to_vec();
            args.push(id);
            db.run(&args)
        };
        assert_error(&with("abcdef01"), 2, "more than one session");
        assert_error(&with("abc"), 2, "\"abc\"");
        assert_error(&with("not-an-id!"), 2, "not-an-id!");
        // No v4 UUID has version digit 0, so this prefix matches nothing.
        assert_error(&with("00000000-0000-0"), 3, "00000000-0000-0");
        let unknown = Uuid::new_v4().to_string();
        assert_error(&with(&unknown), 3, &unknown);
        // --json changes nothing about errors.
        let mut args = vec!["--json"];
        args.extend_from_slice(command);
        args.push(&unknown);
        assert_error(&db.run(&args), 3, &unknown);
    }
    // The longer prefix is unique.
    let shown = db.json(&["sessions", "show", "abcdef01-0000-4000-8000-000000000002"]);
    assert_eq!(shown["session"]["status"], "active");
}

// --- sessions end -----------------------------------------------------------

#[tokio::test]
async fn sessions_end_refuses_a_live_owner_unless_forced() {
    let db = Db::new();
    let manager = db.manager().await;
    let (session, lock) = session_with_lock(&manager, "src/live.rs").await;

    let stderr = assert_error(&db.run(&["sessions", "end", &short(session)]), 6, "--force");
    assert!(stderr.contains(&session.to_string()));
    assert_eq!(status_of(&manager, session).await, SessionStatus::Active);

    let report = db.json(&["sessions", "end", &short(session), "--force"]);
    assert_eq!(id_of(&report["session_id"]), session);
    assert_eq!(report["locks_released"], 1);
    assert_eq!(report["agents_cancelled"], 1);
    assert_eq!(report["already_ended"], false);

    assert_eq!(status_of(&manager, session).await, SessionStatus::Completed);
    let row = resource_locks::Entity::find_by_id(lock.to_string())
        .one(manager.connection())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.release_reason.as_deref(), Some("session_end"));

    // Again: harmless, says so, writes nothing.
    let text = db.ok(&["sessions", "end", &session.to_string()]);
    assert!(text.contains("already ended"), "{text}");
    let again = db.json(&["sessions", "end", &short(session)]);
    assert_eq!(again["already_ended"], true);
    let ends = manager
        .audit_events(AuditFilter {
            session_id: Some(session),
            event_type: Some("session_end".into()),
            ..AuditFilter::default()
        })
        .await
        .unwrap()
        .rows;
    assert_eq!(ends.len(), 1);
}

#[tokio::test]
async fn sessions_end_of_an_abandoned_session_needs_no_force() {
    let db = Db::new();
    let manager = db.manager().await;
    let (session, _) = session_with_lock(&manager, "src/abandoned.rs").await;
    make_stale(&manager, session).await;
    let text = db.ok(&["sessions", "end", &short(session)]);
    assert!(text.contains(&format!("Ended session {session}")), "{text}");
    assert!(text.contains("Locks released    1"), "{text}");
    assert!(text.contains("Agents cancelled  1"), "{text}");
    assert_eq!(status_of(&manager, session).await, SessionStatus::Completed);
}

// --- locks ------------------------------------------------------------------

#[tokio::test]
async fn locks_list_held_and_sweep() {
    let db = Db::new();
    assert!(db.ok(&["locks", "list"]).contains("No locks"));
    let none = db.json(&["locks", "list", "--held"]);
    assert!(page_rows(&none, "locks").is_empty(), "{none}");
    assert_eq!(none["held_total"], 0);
    let (done, _) = demo(&db);

    let manager = db.manager().await;
    let (open, kept) = session_with_lock(&manager, "src/kept.rs").await;
    let agent = manager.register_agent(open, "tester").await.unwrap();
    let ttl = LockOptions {
        ttl: Some(Duration::from_millis(50)),
        wait: None,
    };
    let expiring = manager
        .acquire_lock_with(agent, "file", "src/expiring.rs", ttl.clone())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;

    let all = db.json(&["locks", "list"]);
    assert_eq!(page_rows(&all, "locks").len(), 6);
    assert!(page_rows(&all, "locks")
        .iter()
        .all(|l| l["waiters"] == Value::Array(vec![])));
    assert_eq!(all["held_total"], 2, "{all}");
    let held = db.json(&["locks", "list", "--held"]);
    let held_ids: Vec<Uuid> = page_rows(&held, "locks")
        .iter()
        .map(|l| id_of(&l["id"]))
        .collect();
    assert_eq!(held_ids, [expiring.lock_id, kept], "newest grant first");
    let newest = &held["locks"][0];
    assert_eq!(newest["agent_type"], "tester");
    assert_eq!(newest["held"], true);
    assert!(newest["expires_at"].is_string());
    // Past its ttl but not yet swept: still held, in the expired state.
    assert_eq!(newest["state"], "expired", "{newest}");
    assert!(newest["ttl_remaining_ms"].as_i64().unwrap() < 0, "{newest}");
    assert_eq!(held["locks"][1]["state"], "held");
    assert_eq!(held["locks"][1]["ttl_remaining_ms"], Value::Null);

    let text = db.ok(&["locks", "list", "--held"]);
    assert!(text.contains("file/src/expiring.rs"), "{text}");
    assert!(text.contains("sweep releases it"), "{text}");
    assert!(text.contains("tester"), "{text}");
    assert!(text.contains("┆ WAITERS"), "{text}");
    let of_demo = db.json(&["locks", "list", "--session", &short(done)]);
    assert_eq!(page_rows(&of_demo, "locks").len(), 4);
    assert!(page_rows(&of_demo, "locks")
        .iter()
        .all(|l| l["state"] == "released" && l["held"] == false));
    let two = db.json(&["locks", "list", "--limit", "2"]);
    assert_eq!(page_rows(&two, "locks").len(), 2);
    assert!(two["next_cursor"].is_string(), "{two}");

    let text = db.ok(&["locks", "sweep"]);
    assert!(
        text.contains("Released 1 lock: 1 expired, 0 orphaned"),
        "{text}"
    );
    let row = resource_locks::Entity::find_by_id(expiring.lock_id.to_string())
        .one(manager.connection())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.release_reason.as_deref(), Some("expired"));
    assert!(db.ok(&["locks", "sweep"]).contains("Nothing to sweep"));

    // A second expired lock, swept with --json.
    manager
        .acquire_lock_with(agent, "file", "src/expiring-too.rs", ttl)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let report = db.json(&["locks", "sweep"]);
    assert_eq!(report["expired"], 1);
    assert_eq!(report["orphaned"], 0);
    assert_eq!(report["batches"], 1);
    let held = db.json(&["locks", "list", "--held"]);
    assert_eq!(page_rows(&held, "locks").len(), 1, "only the kept lock");
    assert_eq!(id_of(&held["locks"][0]["id"]), kept);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_waiters_and_locks_list_show_a_waiting_agent() {
    let db = Db::new();
    let manager = db.manager().await;
    let session = manager.start_session().await.unwrap();
    let coder = manager.register_agent(session, "coder").await.unwrap();
    let reviewer = manager.register_agent(session, "reviewer").await.unwrap();
    let held = manager.acquire_lock(coder, "file", "x").await.unwrap();
    let waiting = tokio::spawn({
        let manager = manager.clone();
        async move {
            let options = LockOptions {
                wait: Some(Duration::from_secs(30)),
                ..LockOptions::default()
            };
            manager
                .acquire_lock_with(reviewer, "file", "x", options)
                .await
        }
    });
    until_queued(&manager, "file", "x", 1).await;

    let doc = db.json(&["locks", "waiters", "file", "x"]);
    assert_eq!(id_of(&doc["holder"]["agent_id"]), coder, "{doc}");
    assert_eq!(doc["holder"]["fencing_token"], held.fencing_token, "{doc}");
    assert_eq!(doc["holder"]["agent_type"], "coder", "{doc}");
    let queue = doc["waiters"].as_array().expect("the waiters");
    assert_eq!(queue.len(), 1, "{queue:?}");
    assert_eq!(queue[0]["agent_type"], "reviewer");
    assert_eq!(id_of(&queue[0]["agent_id"]), reviewer);
    assert_eq!(id_of(&queue[0]["session_id"]), session);
    assert_eq!(queue[0]["position"], 1);
    assert!(queue[0]["since"].is_string());

    let text = db.ok(&["locks", "waiters", "file", "x"]);
    let heading = format!(
        "1 agent waits for file/x (held by coder {}, fencing token {}), next in line first.",
        short(coder),
        held.fencing_token
    );
    assert!(text.starts_with(&heading), "{text}");
    assert!(text.contains("┆ WAITING SINCE"), "{text}");
    for needle in [
        short(reviewer),
        "reviewer".to_owned(),
        short(session),
        "(just now)".to_owned(),
    ] {
        assert!(text.contains(&needle), "{needle:?} missing from:\n{text}");
    }

    let locks = db.json(&["locks", "list"]);
    let locks = page_rows(&locks, "locks");
    assert_eq!(locks.len(), 1);
    assert_eq!(id_of(&locks[0]["id"]), held.lock_id);
    let waiters = locks[0]["waiters"].as_array().expect("waiters array");
    assert_eq!(waiters.len(), 1);
    assert_eq!(id_of(&waiters[0]["agent_id"]), reviewer);
    assert_eq!(id_of(&waiters[0]["session_id"]), session);
    assert_eq!(waiters[0]["position"], 1);
    assert_eq!(waiters[0]["agent_type"], "reviewer");
    let text = db.ok(&["locks", "list", "--held"]);
    let cell = format!("1 (next: reviewer {})", short(reviewer));
    assert!(text.contains(&cell), "{cell:?} missing from:\n{text}");
    let shown = db.json(&["sessions", "show", &short(session)]);
    assert_eq!(
        id_of(&shown["locks"][0]["waiters"][0]["agent_id"]),
        reviewer
    );
    assert!(db
        .ok(&["sessions", "show", &short(session)])
        .contains(&cell));
    assert_eq!(waiter_rows(&manager).await, 1);

    // The coder lets go: the reviewer is handed the lock and leaves the queue.
    manager.release_lock(held.lock_id).await.unwrap();
    let grant = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiter was handed the lock")
        .expect("the waiting task")
        .expect("the grant");
    assert!(grant.fencing_token > held.fencing_token);
    assert_eq!(waiter_rows(&manager).await, 0);
    let text = db.ok(&["locks", "waiters", "file", "x"]);
    assert_eq!(
        text,
        format!(
            "Nobody waits for file/x (held by reviewer {}, fencing token {}).\n",
            short(reviewer),
            grant.fencing_token
        )
    );
    let locks = db.json(&["locks", "list", "--held"]);
    assert_eq!(id_of(&locks["locks"][0]["id"]), grant.lock_id);
    assert_eq!(locks["locks"][0]["waiters"], Value::Array(vec![]));
}

#[test]
fn locks_waiters_of_a_free_resource_says_nobody_waits() {
    let db = Db::new();
    assert_eq!(
        db.ok(&["locks", "waiters", "file", "x"]),
        "Nobody waits for file/x (not held).\n"
    );
    let doc = db.json(&["locks", "waiters", "file", "x"]);
    assert_eq!(doc["holder"], Value::Null, "{doc}");
    assert_eq!(doc["waiters"], Value::Array(vec![]), "{doc}");
    assert_error(
        &db.run(&["locks", "waiters", " ", "x"]),
        2,
        "invalid resource_type",
    );
    assert_error(
        &db.run(&["--json", "locks", "waiters", "file", ""]),
        2,
        "invalid resource_key",
    );
    assert_error(&db.run(&["locks", "waiters", "file"]), 2, "KEY");
}

// --- recover ----------------------------------------------------------------

#[tokio::test]
async fn recover_interrupts_only_stale_sessions() {
    let db = Db::new();
    let manager = db.manager().await;
    let (alive, _) = session_with_lock(&manager, "src/alive.rs").await;
    let (first, _) = session_with_lock(&manager, "src/first.rs").await;
    make_stale(&manager, first).await;

    let text = db.ok(&["recover", "--stale-after", "1m"]);
    assert!(
        text.contains(
            "Interrupted 1 session silent for over 1m: 1 lock released, 1 agent cancelled"
        ),
        "{text}"
    );
    assert!(text.contains(&first.to_string()), "{text}");
    assert!(db
        .ok(&["recover", "--stale-after", "1m"])
        .contains("No stale sessions"));

    let (second, _) = session_with_lock(&manager, "src/second.rs").await;
    make_stale(&manager, second).await;
    let report = db.json(&["recover", "--stale-after", "1m"]);
    assert_eq!(report["interrupted"], serde_json::json!([second]));
    assert_eq!(report["locks_released"], 1);
    assert_eq!(report["agents_cancelled"], 1);

    for (session, status) in [
        (first, SessionStatus::Interrupted),
        (second, SessionStatus::Interrupted),
        (alive, SessionStatus::Active),
    ] {
        assert_eq!(status_of(&manager, session).await, status);
    }
    let shown = db.json(&["sessions", "show", &short(second)]);
    assert_eq!(shown["session"]["status"], "interrupted");
    assert_eq!(shown["locks"][0]["release_reason"], "orphaned");
    let text = db.ok(&["sessions", "show", &short(second)]);
    assert!(text.contains("interrupted"), "{text}");
    assert!(text.contains("session_interrupted"), "{text}");
    assert!(text.contains("none saved"), "{text}");

    // The default threshold (5m) also finds a session silent since 2020.
    let (third, _) = session_with_lock(&manager, "src/third.rs").await;
    make_stale(&manager, third).await;
    let report = db.json(&["recover"]);
    assert_eq!(report["interrupted"], serde_json::json!([third]));
}

// --- audit tail -------------------------------------------------------------

#[test]
fn audit_tail_filters_and_orders_newest_first_in_json_oldest_first_in_text() {
    let db = Db::new();
    assert!(db.ok(&["audit", "tail"]).contains("No audit events"));
    let empty = db.json(&["audit", "tail"]);
    assert!(page_rows(&empty, "events").is_empty(), "{empty}");
    assert_eq!(empty["newest_seq"], 0, "{empty}");
    let (first, _) = demo(&db);
    let (second, _) = demo(&db);

    // The JSON page lists the newest first.
    let all = db.json(&["audit", "tail"]);
    let events: Vec<(&str, Uuid)> = page_rows(&all, "events")
        .iter()
        .map(|e| (e["event_type"].as_str().unwrap(), id_of(&e["session_id"])))
        .collect();
    assert_eq!(
        events,
        [
            ("session_end", second),
            ("session_start", second),
            ("session_end", first),
            ("session_start", first),
        ]
    );
    let seqs: Vec<i64> = page_rows(&all, "events")
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] > w[1]), "{seqs:?}");
    assert_eq!(all["newest_seq"], seqs[0]);
    assert_eq!(all["next_cursor"], Value::Null, "one page holds all");

    let last = db.json(&["audit", "tail", "-n", "1"]);
    assert_eq!(page_rows(&last, "events").len(), 1);
    assert_eq!(last["events"][0]["event_type"], "session_end");
    assert_eq!(id_of(&last["events"][0]["session_id"]), second);
    let three = db.json(&["audit", "tail", "--lines", "3"]);
    assert_eq!(page_rows(&three, "events").len(), 3);
    assert!(three["next_cursor"].is_string(), "{three}");

    let ends = db.json(&["audit", "tail", "--event", "session_end"]);
    assert_eq!(page_rows(&ends, "events").len(), 2);
    assert!(page_rows(&ends, "events")
        .iter()
        .all(|e| e["event_type"] == "session_end"));
    assert_eq!(id_of(&ends["events"][0]["session_id"]), second);
    assert_eq!(ends["events"][0]["details"]["locks_released"], 3);

    let mine = db.json(&["audit", "tail", "--session", &short(first)]);
    assert_eq!(page_rows(&mine, "events").len(), 2);
    assert!(page_rows(&mine, "events")
        .iter()
        .all(|e| id_of(&e["session_id"]) == first));
    let both = db.json(&[
        "audit",
        "tail",
        "--session",
        &short(first),
        "--event",
        "session_start",
    ]);
    assert_eq!(page_rows(&both, "events").len(), 1);

    // The table reads as a log: oldest first.
    let text = db.ok(&["audit", "tail", "-n", "2"]);
    let start_at = text.find("session_start");
    let end_at = text.find("session_end");
    assert!(
        start_at.is_some() && end_at.is_some() && start_at < end_at,
        "{text}"
    );
    assert!(text.contains(&short(second)), "{text}");
    assert!(text.contains("locks_released=3"), "{text}");
    let typo = db.run(&["audit", "tail", "--event", "session-end"]);
    assert_error(&typo, 2, "--event");
    assert!(
        String::from_utf8_lossy(&typo.stderr).contains("one of session_start"),
        "names the known events"
    );
    assert_error(&db.run(&["audit", "tail", "--event", " "]), 2, "--event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_tail_shows_deadlock_refusals() {
    let db = Db::new();
    let manager = db.manager().await;
    let session = manager.start_session().await.expect("start");
    let coder = manager.register_agent(session, "coder").await.expect("a");
    let reviewer = manager
        .register_agent(session, "reviewer")
        .await
        .expect("b");
    manager
        .acquire_lock(coder, "file", "a.rs")
        .await
        .expect("a");
    manager
        .acquire_lock(reviewer, "file", "b.rs")
        .await
        .expect("b");
    let wait = LockOptions {
        wait: Some(Duration::from_secs(30)),
        ..LockOptions::default()
    };
    let (m, w) = (manager.clone(), wait.clone());
    let waiting =
        tokio::spawn(async move { m.acquire_lock_with(reviewer, "file", "a.rs", w).await });
    while manager
        .lock_waiters("file", "a.rs")
        .await
        .expect("waiters")
        .is_empty()
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let refused = manager.acquire_lock_with(coder, "file", "b.rs", wait).await;
    assert!(
        matches!(refused, Err(demiarch_sessions::Error::Deadlock { .. })),
        "{refused:?}"
    );
    waiting.abort();

    let page = db.json(&["audit", "tail", "--event", "lock_deadlock"]);
    let rows = page["events"].as_array().expect("the events");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(id_of(&rows[0]["session_id"]), session);
    let cycle = &rows[0]["details"]["cycle"];
    assert_eq!(id_of(&cycle[0]["agent_id"]), coder);
    assert_eq!(cycle[0]["waits_for"]["resource_key"], "b.rs");
    assert_eq!(id_of(&cycle[1]["agent_id"]), reviewer);
    assert_eq!(cycle[1]["waits_for"]["resource_key"], "a.rs");
    let text = db.ok(&["audit", "tail", "--event", "lock_deadlock"]);
    assert!(text.contains("lock_deadlock"), "{text}");
    assert!(text.contains(&short(session)), "{text}");
}

// --- timeouts and unreachable databases ---------------------------------------

#[tokio::test]
async fn a_busy_database_exits_4_and_changes_nothing() {
    let db = Db::new();
    let manager = db.manager().await;
    let (session, _) = session_with_lock(&manager, "src/busy.rs").await;

    // Another writer holds SQLite's write lock for the whole command.
    let blocker = Database::connect(&db.url).await.unwrap();
    let txn = blocker
        .begin_with_options(TransactionOptions {
            isolation_level: None,
            access_mode: None,
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
        })
        .await
        .unwrap();

    let out = db.run(&[
        "--cleanup-timeout",
        "300ms",
        "--busy-timeout",
        "100ms",
        "sessions",
        "end",
        &short(session),
        "--force",
    ]);
    let stderr = assert_error(&out, 4, "timed out");
    assert!(stderr.contains(&session.to_string()), "{stderr}");
    assert!(stderr.contains("nothing was changed"), "{stderr}");

    let out = db.run(&["--busy-timeout", "100ms", "locks", "sweep"]);
    assert_error(&out, 4, "timed out");

    txn.rollback().await.unwrap();
    blocker.close().await.unwrap();
    assert_eq!(status_of(&manager, session).await, SessionStatus::Active);
    assert_eq!(
        manager
            .locks(LockFilter {
                session_id: Some(session),
                held_only: true,
                ..LockFilter::default()
            })
            .await
            .unwrap()
            .rows
            .len(),
        1
    );
    // Once the writer is gone the same command succeeds.
    let report = db.json(&["sessions", "end", &short(session), "--force"]);
    assert_eq!(report["locks_released"], 1);
}

#[test]
fn a_file_that_is_not_a_database_exits_5_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    let content = "these are my notes, not a database\n".repeat(50);
    std::fs::write(&path, &content).unwrap();
    for args in [
        &["sessions", "list"][..],
        &["demo"],
        &["--json", "locks", "sweep"],
    ] {
        let out = bare()
            .arg("--database-url")
            .arg(&path)
            .args(args)
            .output()
            .unwrap();
        assert_error(&out, 5, "not a SQLite database");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    }
    assert_eq!(std::fs::read_to_string(&path).unwrap(), content);
}

#[test]
fn a_missing_directory_exits_5() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no/such/dir/t.db");
    let out = bare()
        .arg("--database-url")
        .arg(format!("sqlite://{}", path.display()))
        .args(["sessions", "list"])
        .output()
        .unwrap();
    assert_error(&out, 5, "cannot open the database");
    assert!(!path.exists());
}

#[tokio::test]
async fn a_schema_from_a_newer_version_exits_5() {
    let db = Db::new();
    db.ok(&["sessions", "list"]);
    let conn = Database::connect(&db.url).await.unwrap();
    conn.execute_unprepared(
        "INSERT INTO seaql_migrations (version, applied_at) \
         VALUES ('m29990101_000000_from_the_future', 0)",
    )
    .await
    .unwrap();
    conn.close().await.unwrap();
    assert_error(
        &db.run(&["sessions", "list"]),
        5,
        "m29990101_000000_from_the_future",
    );
}

#[cfg(not(feature = "postgres"))]
#[test]
fn a_backend_not_compiled_in_is_invalid_input() {
    let out = bare()
        .args([
            "--database-url",
            "postgres://u:secret@127.0.0.1:1/x",
            "sessions",
            "list",
        ])
        .output()
        .unwrap();
    let stderr = assert_error(&out, 2, "--features postgres");
    assert!(!stderr.contains("secret"), "password leaked: {stderr}");
}

#[cfg(feature = "postgres")]
#[test]
fn an_unreachable_server_exits_5_without_its_password() {
    // Port 1 refuses at once on loopback, so this does not wait for a timeout.
    let out = bare()
        .args([
            "--connect-timeout",
            "5s",
            "--database-url",
            "postgres://u:secret@127.0.0.1:1/x",
            "sessions",
            "list",
        ])
        .output()
        .unwrap();
    let stderr = assert_error(&out, 5, "postgres://u:***@127.0.0.1:1/x");
    assert!(!stderr.contains("secret"), "password leaked: {stderr}");
}

// --- following the audit log ---------------------------------------------------

/// `audit tail --follow` as a child process, its stdout read line by line.
struct Follower {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Follower {
    fn start(db: &Db, args: &[&str]) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(BIN)
            .env_remove("DATABASE_URL")
            .env_remove("RUST_LOG")
            .arg("--database-url")
            .arg(&db.url)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start audit tail --follow");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self { child, lines }
    }

    fn next_line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(20))
            .expect("a line from audit tail --follow within 20 s")
    }

    fn next_json(&self) -> Value {
        let line = self.next_line();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"))
    }

    fn nothing_for(&self, ms: u64) {
        if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(ms)) {
            panic!("unexpected line: {line}");
        }
    }

    /// SIGTERM ends it with exit 0 and nothing on stderr.
    fn stop(self) {
        let pid = self.child.id().to_string();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(killed.success());
        let out = self.child.wait_with_output().expect("wait");
        assert_eq!(
            out.status.code(),
            Some(0),
            "stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test]
async fn audit_tail_follow_prints_events_as_they_commit_and_resumes_after_a_seq() {
    let db = Db::new();
    let (first, _) = demo(&db);
    // Text: a header, the newest events, then new ones as other processes commit.
    let text = Follower::start(&db, &["audit", "tail", "-n", "1", "--follow"]);
    assert_eq!(text.next_line(), "SEQ\tTIME\tEVENT\tSESSION\tDETAILS");
    let newest = text.next_line();
    assert!(
        newest.starts_with("2\t") && newest.contains("session_end"),
        "{newest}"
    );
    assert!(newest.contains(&short(first)), "{newest}");
    let json = Follower::start(
        &db,
        &[
            "--json",
            "audit",
            "tail",
            "--follow",
            "--event",
            "session_end",
        ],
    );
    assert_eq!(json.next_json()["seq"], 2, "the newest end first");

    let manager = db.manager().await;
    let (session, _) = session_with_lock(&manager, "src/lib.rs").await;
    manager.end_session(session).await.expect("end");
    let rows = manager
        .audit_events(AuditFilter {
            session_id: Some(session),
            ..AuditFilter::default()
        })
        .await
        .expect("audit")
        .rows;
    let (end_seq, start_seq) = (rows[0].seq, rows[1].seq);
    let line = text.next_line();
    assert!(
        line.starts_with(&format!("{start_seq}\t")) && line.contains("session_start"),
        "{line}"
    );
    let line = text.next_line();
    assert!(
        line.starts_with(&format!("{end_seq}\t")) && line.contains("locks_released=1"),
        "{line}"
    );
    let event = json.next_json();
    assert_eq!(
        (event["seq"].as_i64(), event["event_type"].as_str()),
        (Some(end_seq), Some("session_end"))
    );
    assert_eq!(id_of(&event["session_id"]), session);
    assert_eq!(event["details"]["locks_released"], 1);
    json.nothing_for(300);
    text.stop();
    json.stop();

    // --after: every event after the cursor, once, then new ones.
    let resumed = Follower::start(
        &db,
        &["--json", "audit", "tail", "--follow", "--after", "1"],
    );
    let seqs: Vec<i64> = (0..3)
        .map(|_| resumed.next_json()["seq"].as_i64().expect("seq"))
        .collect();
    assert_eq!(seqs, vec![2, start_seq, end_seq]);
    resumed.nothing_for(300);
    resumed.stop();
    manager.close().await.expect("close");

    // Without --follow, --after keeps the newest N after it.
    let after = db.json(&["audit", "tail", "--after", "2", "-n", "1"]);
    assert_eq!(page_rows(&after, "events").len(), 1, "{after}");
    assert_eq!(after["events"][0]["seq"], end_seq);
    assert_eq!(after["newest_seq"], end_seq);
    let table = db.ok(&["audit", "tail", "--after", "1"]);
    assert!(table.contains("SEQ"), "{table}");
    let show = db.ok(&["sessions", "show", &short(session)]);
    assert!(
        show.contains("SEQ") && show.contains(&format!(" {end_seq} ")),
        "{show}"
    );
    assert_error(&db.run(&["audit", "tail", "--after=-1"]), 2, "--after");
}

// --- agents and pruning -------------------------------------------------------

#[tokio::test]
async fn agents_finish_releases_the_agents_locks_and_says_so() {
    let db = Db::new();
    let manager = db.manager().await;
    let session = manager.start_session().await.expect("start");
    let done = manager
        .register_agent(session, "coder")
        .await
        .expect("agent");
    let broken = manager
        .register_agent(session, "tester")
        .await
        .expect("agent");
    manager
        .acquire_lock(done, "file", "a.rs")
        .await
        .expect("lock");
    manager
        .acquire_lock(done, "file", "b.rs")
        .await
        .expect("lock");

    let text = db.ok(&["agents", "finish", &done.to_string()]);
    assert!(text.contains("completed: released 2 locks"), "{text}");
    let again = db.ok(&["agents", "finish", &done.to_string()]);
    assert!(
        again.contains("had already finished (completed)"),
        "{again}"
    );
    let report = db.json(&[
        "agents",
        "finish",
        &broken.to_string(),
        "--failed",
        "flaky test",
    ]);
    assert_eq!(report["status"], "failed");
    assert_eq!(report["already_finished"], false);

    let agents = manager.agents(session).await.expect("agents").rows;
    let status = |id| agents.iter().find(|a| a.id == id).map(|a| a.status);
    assert_eq!(
        status(done),
        Some(demiarch_sessions::AgentStatus::Completed)
    );
    assert_eq!(status(broken), Some(demiarch_sessions::AgentStatus::Failed));
    let held = manager
        .locks(LockFilter {
            session_id: Some(session),
            held_only: true,
            ..LockFilter::default()
        })
        .await
        .expect("locks")
        .rows;
    assert!(held.is_empty(), "{held:?}");
    assert_error(
        &db.run(&["agents", "finish", &Uuid::new_v4().to_string()]),
        3,
        "not found",
    );
    assert_error(
        &db.run(&["agents", "finish", &broken.to_string(), "--failed", " "]),
        2,
        "reason",
    );
}

#[test]
fn prune_deletes_ended_sessions_and_a_feed_from_before_exits_7() {
    let db = Db::new();
    demo(&db);
    demo(&db);
    let dry = db.json(&[
        "prune",
        "--completed-after",
        "0s",
        "--audit-after",
        "0s",
        "--dry-run",
    ]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["sessions_deleted"], 2);
    let archive = db.path().with_extension("jsonl");
    let report = db.json(&[
        "prune",
        "--completed-after",
        "0s",
        "--audit-after",
        "0s",
        "--archive",
        &archive.display().to_string(),
    ]);
    assert_eq!(report["sessions_deleted"], dry["sessions_deleted"]);
    assert_eq!(report["audit_deleted"], dry["audit_deleted"]);
    let lines = std::fs::read_to_string(&archive).expect("archive");
    assert_eq!(
        lines
            .lines()
            .filter(|l| l.starts_with("{\"kind\":\"session\""))
            .count(),
        2
    );
    let listed = db.json(&["sessions", "list"]);
    assert!(page_rows(&listed, "sessions").is_empty(), "{listed}");
    assert_eq!(listed["counts"]["completed"], 0, "{listed}");
    let out = db.run(&["audit", "tail", "--follow", "--after", "1"]);
    let stderr = assert_error(&out, 7, "compacted away");
    assert!(stderr.contains("--after"), "{stderr}");
    assert_error(&db.run(&["prune"]), 2, "nothing to prune");
}

/// A --limit (or -n) over the views' page size (500) is read as several
/// pages and printed as one document.
#[tokio::test]
async fn limits_over_a_page_are_read_as_several_pages() {
    let db = Db::new();
    let manager = db.manager().await;
    let session = manager.start_session().await.unwrap();
    let agent = manager.register_agent(session, "coder").await.unwrap();
    for n in 0..520 {
        manager
            .acquire_lock(agent, "file", &format!("f{n}.rs"))
            .await
            .unwrap();
    }
    for _ in 0..519 {
        manager.start_session().await.unwrap();
    }
    let seqs_of = |doc: &Value| -> Vec<i64> {
        page_rows(doc, "events")
            .iter()
            .map(|e| e["seq"].as_i64().unwrap())
            .collect()
    };
    let audit = db.json(&["audit", "tail", "-n", "700"]);
    let seqs = seqs_of(&audit);
    assert_eq!(seqs.len(), 520, "one session_start each");
    assert_eq!(audit["next_cursor"], Value::Null);
    assert!(
        seqs.windows(2).all(|w| w[0] > w[1]),
        "newest first, no repeats"
    );
    assert_eq!(seqs[0], audit["newest_seq"].as_i64().unwrap());
    let audit = db.json(&["audit", "tail", "-n", "510"]);
    assert_eq!(seqs_of(&audit), seqs[..510]);
    assert!(audit["next_cursor"].is_string());

    let sessions = db.json(&["sessions", "list", "--limit", "1000"]);
    let ids: Vec<Uuid> = page_rows(&sessions, "sessions")
        .iter()
        .map(|s| id_of(&s["id"]))
        .collect();
    assert_eq!(ids.len(), 520);
    assert_eq!(
        ids.iter().collect::<std::collections::BTreeSet<_>>().len(),
        520
    );
    assert_eq!(ids[519], session, "the oldest last");
    assert_eq!(sessions["next_cursor"], Value::Null);
    let sessions = db.json(&["sessions", "list", "--limit", "501"]);
    assert_eq!(page_rows(&sessions, "sessions").len(), 501);
    assert!(sessions["next_cursor"].is_string());

    let locks = db.json(&["locks", "list", "--held", "--limit", "520"]);
    let keys: Vec<&str> = page_rows(&locks, "locks")
        .iter()
        .map(|l| l["resource_key"].as_str().unwrap())
        .collect();
    let want: Vec<String> = (0..520).rev().map(|n| format!("f{n}.rs")).collect();
    assert_eq!(keys, want, "newest grant first, each once");
    assert_eq!(locks["held_total"], 520);
    assert_eq!(locks["next_cursor"], Value::Null);
    assert!(db
        .ok(&["locks", "list", "--limit", "505"])
        .contains("(the newest 505 shown; --limit shows more)"));
}

#[tokio::test]
async fn sessions_pause_and_unpause_keep_the_locks() {
    let db = Db::new();
    let manager = db.manager().await;
    let (session, lock) = session_with_lock(&manager, "src/paused.rs").await;
    let text = db.ok(&["sessions", "pause", &short(session)]);
    assert!(text.contains("is paused"), "{text}");
    let again = db.ok(&["sessions", "pause", &short(session)]);
    assert!(
        again.contains("was already paused; nothing was changed"),
        "{again}"
    );
    assert_eq!(status_of(&manager, session).await, SessionStatus::Paused);
    let held = manager
        .locks(LockFilter {
            session_id: Some(session),
            held_only: true,
            ..LockFilter::default()
        })
        .await
        .expect("locks")
        .rows;
    assert_eq!(held.iter().map(|l| l.id).collect::<Vec<_>>(), vec![lock]);
    let info = db.json(&["sessions", "unpause", &short(session)]);
    assert_eq!(info["status"], "active");
    assert_eq!(status_of(&manager, session).await, SessionStatus::Active);
    manager.end_session(session).await.expect("end");
    assert_error(
        &db.run(&["sessions", "pause", &short(session)]),
        6,
        "completed",
    );
}

#[tokio::test]
async fn locks_release_by_a_listed_prefix_records_the_reason() {
    let db = Db::new();
    let manager = db.manager().await;
    let (session, lock) = session_with_lock(&manager, "src/stuck.rs").await;
    let listed = db.ok(&["locks", "list", "--held"]);
    assert!(
        listed.contains("LOCK") && listed.contains(&short(lock)),
        "{listed}"
    );
    let text = db.ok(&[
        "locks",
        "release",
        &short(lock),
        "--reason",
        "stuck for an hour",
    ]);
    assert!(text.contains("Released lock"), "{text}");
    let again = db.ok(&["locks", "release", &lock.to_string(), "--reason", "again"]);
    assert!(again.contains("already released"), "{again}");
    let released = manager
        .locks(LockFilter {
            lock_id: Some(lock),
            ..LockFilter::default()
        })
        .await
        .expect("lock")
        .rows;
    assert!(released[0].released_at.is_some());
    let rows = manager
        .audit_events(AuditFilter {
            session_id: Some(session),
            event_type: Some("lock_released".into()),
            ..AuditFilter::default()
        })
        .await
        .expect("audit")
        .rows;
    assert_eq!(rows.len(), 1, "one release, one row");
    assert_eq!(rows[0].details["operator"]["reason"], "stuck for an hour");
    assert_eq!(rows[0].details["operator"]["via"], "cli");
    assert_error(
        &db.run(&["locks", "release", "ffffffff", "--reason", "x"]),
        3,
        "no lock id",
    );
    assert_error(
        &db.run(&["locks", "release", "abc", "--reason", "x"]),
        2,
        "lock id",
    );
}
