//! Security: the SQLite file and its -wal and -shm companions are private to
//! their owner, an existing file's mode is respected, and values shaped like
//! SQL injections go through every call, on every backend, as plain data.
mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use chrono::Utc;
use common::*;
use demiarch_sessions::{ContextWindow, Error, LockOptions, SessionManager};
use entity::{agent_executions, audit_log, resource_locks};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, Statement};
use serde_json::json;
use uuid::Uuid;

// ---- file modes (Unix) ----------------------------------------------------------

#[cfg(unix)]
fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// A path with `-wal` or `-shm` appended.
fn companion(db: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(suffix);
    name.into()
}

/// Ends a populated session, so the -wal file has content, and reads it back.
async fn write_something(m: &SessionManager) -> Uuid {
    let session = m.start_session().await.expect("start");
    let agent = m.register_agent(session, "coder").await.expect("register");
    m.acquire_lock(agent, "file", "src/main.rs")
        .await
        .expect("acquire");
    m.contexts()
        .put(session, "prompt", json!("secret user prompt"))
        .expect("put window");
    m.end_session(session).await.expect("end");
    assert_eq!(
        m.session_context(session).await.expect("saved context")[0].data,
        json!("secret user prompt")
    );
    session
}

#[cfg(unix)]
#[tokio::test]
async fn a_new_database_and_its_wal_and_shm_files_are_owner_only() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, url_suffix) in [("new.db", ""), ("rwc.db", "?mode=rwc")] {
        let path = dir.path().join(name);
        assert!(!path.exists());
        let m = SessionManager::connect(&format!("sqlite://{}{url_suffix}", path.display()))
            .await
            .expect("connect");
        assert_eq!(
            mode_of(&path),
            0o600,
            "{name}: a new database file is readable by its owner only"
        );
        write_something(&m).await;

        let wal = companion(&path, "-wal");
        let shm = companion(&path, "-shm");
        assert!(
            std::fs::metadata(&wal).expect("-wal exists").len() > 0,
            "{name}: the end went through the WAL"
        );
        assert_eq!(mode_of(&wal), 0o600, "{name}: -wal holds the same data");
        assert_eq!(mode_of(&shm), 0o600, "{name}: -shm");
        assert_eq!(mode_of(&path), 0o600, "{name}: still 0600 after writing");
        m.close().await.expect("close");
        assert_eq!(mode_of(&path), 0o600, "{name}: still 0600 after closing");
    }
}

#[cfg(unix)]
#[tokio::test]
async fn an_existing_files_mode_is_left_as_it_was() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("existing.db");
    // An empty file is a valid, empty SQLite database.
    std::fs::File::create(&path).expect("create empty file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod 0640");
    assert_eq!(mode_of(&path), 0o640);

    let m = SessionManager::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("connect to an empty file");
    assert_eq!(mode_of(&path), 0o640, "connecting left the mode alone");
    let session = write_something(&m).await;
    assert_eq!(mode_of(&path), 0o640, "writing left the mode alone");
    for suffix in ["-wal", "-shm"] {
        let side = mode_of(&companion(&path, suffix));
        assert_eq!(
            side & !0o640,
            0,
            "{suffix} is {side:o}: no more open than the database file"
        );
    }
    m.close().await.expect("close");

    // The data is really in that file.
    let again = SessionManager::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("reconnect");
    assert_eq!(
        again.session_context(session).await.expect("context")[0].data,
        json!("secret user prompt")
    );
    assert_eq!(mode_of(&path), 0o640);
    again.close().await.expect("close");
}

// ---- injection through every call ----------------------------------------------

/// Values that would change a statement built by pasting text into SQL.
const NASTY: &[&str] = &[
    "'; DROP TABLE audit_log; --",
    "x' OR '1'='1",
    "\"; DROP TABLE resource_locks; --",
    "'); DELETE FROM global_sessions; --",
    "\\'; DROP TABLE agent_executions; -- ",
    "$$; DROP TABLE lock_fencing; $$",
    "`; DROP TABLE seaql_migrations; #",
    "%' OR resource_key LIKE '%",
    "1; UPDATE resource_locks SET released_at = NULL",
    "' UNION SELECT id, id, id FROM global_sessions --",
    "*/ DROP TABLE audit_log; /*",
];

const TABLES: &[&str] = &[
    "agent_executions",
    "audit_log",
    "global_sessions",
    "lock_fencing",
    "resource_locks",
    "seaql_migrations",
];

async fn table_names(db: &TestDb) -> BTreeSet<String> {
    let sql = match db.backend {
        Backend::SqliteMemory | Backend::SqliteFile => {
            "SELECT name FROM sqlite_master WHERE type = 'table'"
        }
        Backend::Postgres => {
            "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = current_schema()"
        }
        Backend::MySql => {
            "SELECT CAST(table_name AS CHAR) FROM information_schema.tables \
             WHERE table_schema = DATABASE()"
        }
    };
    let conn = db.manager.connection();
    conn.query_all_raw(Statement::from_string(conn.get_database_backend(), sql))
        .await
        .expect("list tables")
        .iter()
        .map(|r| r.try_get_by_index::<String>(0).expect("table name"))
        .collect()
}

#[tokio::test]
async fn injection_shaped_values_are_stored_verbatim_and_tables_survive() {
    each_backend(
        "injection_shaped_values_are_stored_verbatim_and_tables_survive",
        |db| async move {
            let m = &db.manager;
            let tables_before = table_names(&db).await;
            for t in TABLES {
                assert!(tables_before.contains(*t), "{t} exists to begin with");
            }

            let session = m.start_session().await.expect("start");
            let (rival_session, rival) = {
                let s = m.start_session().await.expect("start");
                (s, m.register_agent(s, "rival").await.expect("register"))
            };
            let (stale_session, stale) = {
                let s = m.start_session().await.expect("start");
                (s, m.register_agent(s, "stale").await.expect("register"))
            };
            let mut expected_windows = Vec::new();
            let mut swept_keys = BTreeSet::new();
            for (i, nasty) in NASTY.iter().enumerate() {
                let agent = m
                    .register_agent(session, nasty)
                    .await
                    .unwrap_or_else(|e| panic!("register {nasty:?}: {e}"));
                let stored = agent_executions::Entity::find_by_id(agent.to_string())
                    .one(m.connection())
                    .await
                    .expect("query agent")
                    .expect("agent row");
                assert_eq!(stored.agent_type, *nasty, "agent_type verbatim");

                // As type and key of a plain lock.
                let grant = m
                    .acquire_lock(agent, nasty, nasty)
                    .await
                    .unwrap_or_else(|e| panic!("acquire {nasty:?}: {e}"));
                let row = resource_locks::Entity::find_by_id(grant.lock_id.to_string())
                    .one(m.connection())
                    .await
                    .expect("query lock")
                    .expect("lock row");
                assert_eq!(
                    (row.resource_type.as_str(), row.resource_key.as_str()),
                    (*nasty, *nasty)
                );
                assert!(m
                    .validate_fence(nasty, nasty, grant.fencing_token)
                    .await
                    .expect("validate"));
                assert!(!m
                    .validate_fence(nasty, nasty, grant.fencing_token + 1)
                    .await
                    .expect("validate"));
                match m.acquire_lock(rival, nasty, nasty).await {
                    Err(Error::LockHeld {
                        resource_type,
                        resource_key,
                        holder_agent_id,
                        ..
                    }) => {
                        assert_eq!(
                            (resource_type.as_str(), resource_key.as_str()),
                            (*nasty, *nasty)
                        );
                        assert_eq!(holder_agent_id, Some(agent));
                    }
                    other => {
                        panic!("second acquire of {nasty:?}: expected LockHeld, got {other:?}")
                    }
                }

                // As the key of a lock with a ttl, renewed and released.
                let timed = m
                    .acquire_lock_with(
                        agent,
                        "file",
                        nasty,
                        LockOptions {
                            ttl: Some(Duration::from_secs(60)),
                            wait: None,
                        },
                    )
                    .await
                    .unwrap_or_else(|e| panic!("acquire_lock_with {nasty:?}: {e}"));
                m.renew_lock(timed.lock_id, Duration::from_secs(120))
                    .await
                    .expect("renew");
                m.release_lock(timed.lock_id).await.expect("release");
                let row = resource_locks::Entity::find_by_id(timed.lock_id.to_string())
                    .one(m.connection())
                    .await
                    .expect("query lock")
                    .expect("lock row");
                assert_eq!(row.resource_key, *nasty);
                assert_eq!(row.release_reason.as_deref(), Some("released"));
                assert!(row.expires_at.expect("ttl") > Utc::now() + chrono::Duration::seconds(100));

                // As a lock that expires and is swept, so the audit JSON names it.
                m.acquire_lock_with(
                    stale,
                    "stale",
                    nasty,
                    LockOptions {
                        ttl: Some(Duration::from_millis(100)),
                        wait: None,
                    },
                )
                .await
                .unwrap_or_else(|e| panic!("acquire stale {nasty:?}: {e}"));
                swept_keys.insert(nasty.to_string());

                // As the key and content of a context window.
                let data = json!({ "i": i, "text": nasty });
                m.contexts()
                    .put(session, *nasty, data.clone())
                    .expect("put window");
                expected_windows.push(ContextWindow {
                    key: nasty.to_string(),
                    data,
                });
            }

            let report = m.end_session(session).await.expect("end");
            assert_eq!(report.locks_released, NASTY.len() as u64);
            assert_eq!(
                m.session_context(session).await.expect("saved context"),
                expected_windows,
                "window keys and data come back verbatim"
            );

            let expires = lock_rows(&db, stale_session)
                .await
                .iter()
                .filter_map(|l| l.expires_at)
                .max()
                .expect("stale locks");
            let left = (expires.to_utc() - Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO);
            tokio::time::sleep(left + Duration::from_millis(30)).await;
            let swept = m.sweep_locks().await.expect("sweep");
            assert_eq!(swept.expired, NASTY.len() as u64);
            let audit = audit_log::Entity::find()
                .filter(audit_log::Column::EventType.eq("locks_swept"))
                .all(m.connection())
                .await
                .expect("audit");
            assert_eq!(audit.len(), 1);
            let named: BTreeSet<String> = audit[0].details["locks"]
                .as_array()
                .expect("locks")
                .iter()
                .map(|l| l["resource_key"].as_str().expect("resource_key").to_owned())
                .collect();
            assert_eq!(named, swept_keys, "audit details name the keys verbatim");

            // Every table is still there, and nothing was deleted or rewritten.
            let tables_after = table_names(&db).await;
            assert_eq!(
                tables_after, tables_before,
                "no table was dropped or created"
            );
            let agents = agent_rows(&db, session).await;
            let types: BTreeSet<&str> = agents.iter().map(|a| a.agent_type.as_str()).collect();
            assert_eq!(types, NASTY.iter().copied().collect::<BTreeSet<_>>());
            let locks = lock_rows(&db, session).await;
            assert_eq!(locks.len(), 2 * NASTY.len());
            assert_eq!(
                locks
                    .iter()
                    .filter(|l| l.release_reason.as_deref() == Some("session_end"))
                    .count(),
                NASTY.len()
            );
            assert!(locks.iter().all(|l| l.released_at.is_some()));
            assert!(
                lock_rows(&db, rival_session).await.is_empty(),
                "the rival got nothing"
            );
            let started = audit_log::Entity::find()
                .filter(audit_log::Column::EventType.eq("session_start"))
                .all(m.connection())
                .await
                .expect("audit");
            assert_eq!(started.len(), 3, "no audit row was deleted");
            assert_eq!(audit_of(&db, session, "session_end").await.len(), 1);
            assert_eq!(session_row(&db, rival_session).await.status, "active");
        },
    )
    .await;
}
