//! Bad input on every backend: nil and unknown ids, bad names, zero TTLs,
//! keys full of SQL and LIKE metacharacters, hand-corrupted saved context and
//! the append-only audit log. Every refusal must leave the database exactly
//! as it was. Plus, on SQLite, connecting to a file that is not a database and
//! to a database migrated by a newer library.
mod common;
use common::id;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use demiarch_sessions::{Error, LockOptions, SessionManager, MAX_NAME_BYTES};
use entity::{agent_executions, audit_log, resource_locks};
use sea_orm::{
    ConnectionTrait, Database, DatabaseConnection, DbBackend, EntityTrait, QueryOrder, Statement,
};
use serde_json::json;
use uuid::Uuid;

// ---- helpers local to this file ------------------------------------------------

/// Every row of every table, the fencing counter included.
async fn everything(db: &TestDb) -> (Snapshot, i64) {
    (snapshot(db).await, fencing_counter(db).await)
}

/// Every session row with each column read as text, so that a hand-corrupted
/// `context_data` cannot break the read, plus the other tables and the counter.
type TextRows = Vec<Vec<Option<String>>>;

async fn everything_as_text(db: &TestDb) -> (TextRows, Snapshot, i64) {
    let text = |col: &str| match db.backend {
        Backend::Postgres => format!("{col}::text"),
        Backend::MySql => format!("CAST({col} AS CHAR)"),
        Backend::SqliteMemory | Backend::SqliteFile => format!("CAST({col} AS TEXT)"),
    };
    let columns = [
        "id",
        "status",
        "started_at",
        "updated_at",
        "completed_at",
        "context_data",
    ];
    let sql = format!(
        "SELECT {} FROM global_sessions ORDER BY id",
        columns.map(text).join(", ")
    );
    let conn = db.manager.connection();
    let sessions = conn
        .query_all_raw(Statement::from_string(conn.get_database_backend(), sql))
        .await
        .expect("read sessions as text")
        .into_iter()
        .map(|row| {
            (0..columns.len())
                .map(|i| {
                    row.try_get_by_index::<Option<String>>(i)
                        .expect("text column")
                })
                .collect()
        })
        .collect();
    // Not `snapshot(db)`: it decodes sessions as models, and a test here
    // stores a context that does not decode. The sessions are compared as
    // text above.
    let c = db.manager.connection();
    let others = Snapshot {
        sessions: Vec::new(),
        agents: agent_executions::Entity::find()
            .order_by_asc(agent_executions::Column::Id)
            .all(c)
            .await
            .expect("agents"),
        locks: resource_locks::Entity::find()
            .order_by_asc(resource_locks::Column::Id)
            .all(c)
            .await
            .expect("locks"),
        audit: audit_log::Entity::find()
            .order_by_asc(audit_log::Column::Id)
            .all(c)
            .await
            .expect("audit"),
        waiters: entity::lock_waiters::Entity::find()
            .order_by_asc(entity::lock_waiters::Column::Ticket)
            .all(c)
            .await
            .expect("lock waiters"),
    };
    (sessions, others, fencing_counter(db).await)
}

/// One call of the public API, with owned arguments so a table can hold it.
#[derive(Clone, Debug)]
enum Call {
    RegisterAgent(Uuid, String),
    AcquireLock(Uuid, String, String),
    AcquireLockWith(Uuid, String, String, Option<Duration>),
    ReleaseLock(Uuid),
    RenewLock(Uuid, Duration),
    EndSession(Uuid),
    SessionContext(Uuid),
    ValidateFence(String, String, i64),
}

impl Call {
    async fn run(&self, m: &SessionManager) -> Result<(), Error> {
        match self {
            Call::RegisterAgent(session, agent_type) => {
                m.register_agent(*session, agent_type).await.map(drop)
            }
            Call::AcquireLock(agent, rtype, key) => {
                m.acquire_lock(*agent, rtype, key).await.map(drop)
            }
            Call::AcquireLockWith(agent, rtype, key, ttl) => m
                .acquire_lock_with(
                    *agent,
                    rtype,
                    key,
                    LockOptions {
                        ttl: *ttl,
                        wait: None,
                    },
                )
                .await
                .map(drop),
            Call::ReleaseLock(lock) => m.release_lock(*lock).await,
            Call::RenewLock(lock, ttl) => m.renew_lock(*lock, *ttl).await,
            Call::EndSession(session) => m.end_session(*session).await.map(drop),
            Call::SessionContext(session) => m.session_context(*session).await.map(drop),
            Call::ValidateFence(rtype, key, token) => {
                m.validate_fence(rtype, key, *token).await.map(drop)
            }
        }
    }
}

/// The error a case must fail with.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// `InvalidInput` naming `field`, its reason containing the text.
    Invalid(&'static str, &'static str),
    SessionNotFound(Uuid),
    AgentNotFound(Uuid),
    LockNotFound(Uuid),
}

struct Case {
    name: String,
    call: Call,
    expect: Expect,
}

fn case(name: impl Into<String>, call: Call, expect: Expect) -> Case {
    Case {
        name: name.into(),
        call,
        expect,
    }
}

fn check(case: &Case, result: Result<(), Error>) {
    let name = &case.name;
    match (case.expect, result) {
        (Expect::Invalid(want_field, want_reason), Err(Error::InvalidInput { field, reason })) => {
            assert_eq!(field, want_field, "{name}: field");
            assert!(
                reason.contains(want_reason),
                "{name}: reason {reason:?} does not mention {want_reason:?}"
            );
        }
        (Expect::SessionNotFound(want), Err(Error::SessionNotFound(id))) => {
            assert_eq!(id, want, "{name}: session id")
        }
        (Expect::AgentNotFound(want), Err(Error::AgentNotFound(id))) => {
            assert_eq!(id, want, "{name}: agent id")
        }
        (Expect::LockNotFound(want), Err(Error::LockNotFound(id))) => {
            assert_eq!(id, want, "{name}: lock id")
        }
        (expect, got) => panic!("{name}: expected {expect:?}, got {got:?}"),
    }
}

const NIL_ID: &str = "must not be the nil UUID";
const EMPTY: &str = "must not be empty or only whitespace";
const TOO_LONG: &str = "over the 1024-byte limit";
const NUL: &str = "must not contain a NUL character";
const ZERO: &str = "must be longer than zero";

/// Bad values for a name field, with the reason each must be refused for.
fn bad_names() -> Vec<(&'static str, String, &'static str)> {
    vec![
        ("empty", String::new(), EMPTY),
        ("whitespace-only", "  \t".to_owned(), EMPTY),
        ("newlines-only", "\n\r\n".to_owned(), EMPTY),
        ("1025 bytes", "k".repeat(MAX_NAME_BYTES + 1), TOO_LONG),
        // 513 characters but 1026 bytes: the limit counts bytes.
        ("1026 bytes in 513 chars", "é".repeat(513), TOO_LONG),
        ("NUL inside", "a\0b".to_owned(), NUL),
        ("NUL only", "\0".to_owned(), NUL),
    ]
}

// ---- 1. The table: every refusal names its cause and changes nothing ------------

#[tokio::test]
async fn bad_ids_names_and_ttls_are_refused_and_change_nothing() {
    each_backend(
        "bad_ids_names_and_ttls_are_refused_and_change_nothing",
        |db| async move {
            let m = &db.manager;
            let (session, agents) = populated_session(&db, 1, 1).await;
            let agent = agents[0];
            let held = m
                .acquire_lock(agent, "file", "held")
                .await
                .expect("acquire");
            let ttl = Some(Duration::from_secs(60));
            let long = Duration::from_secs(60);

            let mut cases = Vec::new();
            // Nil and unknown ids, for every call that takes one.
            let nil = Uuid::nil();
            cases.push(case(
                "register_agent nil session",
                Call::RegisterAgent(nil, "coder".into()),
                Expect::Invalid("session_id", NIL_ID),
            ));
            let u = Uuid::new_v4();
            cases.push(case(
                "register_agent unknown session",
                Call::RegisterAgent(u, "coder".into()),
                Expect::SessionNotFound(u),
            ));
            cases.push(case(
                "register_agent with an agent id as session",
                Call::RegisterAgent(agent, "coder".into()),
                Expect::SessionNotFound(agent),
            ));
            cases.push(case(
                "acquire_lock nil agent",
                Call::AcquireLock(nil, "file".into(), "k".into()),
                Expect::Invalid("agent_id", NIL_ID),
            ));
            let u = Uuid::new_v4();
            cases.push(case(
                "acquire_lock unknown agent",
                Call::AcquireLock(u, "file".into(), "k".into()),
                Expect::AgentNotFound(u),
            ));
            cases.push(case(
                "acquire_lock with a session id as agent",
                Call::AcquireLock(session, "file".into(), "k".into()),
                Expect::AgentNotFound(session),
            ));
            cases.push(case(
                "acquire_lock_with nil agent",
                Call::AcquireLockWith(nil, "file".into(), "k".into(), ttl),
                Expect::Invalid("agent_id", NIL_ID),
            ));
            let u = Uuid::new_v4();
            cases.push(case(
                "acquire_lock_with unknown agent",
                Call::AcquireLockWith(u, "file".into(), "k".into(), ttl),
                Expect::AgentNotFound(u),
            ));
            cases.push(case(
                "release_lock nil",
                Call::ReleaseLock(nil),
                Expect::Invalid("lock_id", NIL_ID),
            ));
            let u = Uuid::new_v4();
            cases.push(case(
                "release_lock unknown",
                Call::ReleaseLock(u),
                Expect::LockNotFound(u),
            ));
            cases.push(case(
                "release_lock with an agent id",
                Call::ReleaseLock(agent),
                Expect::LockNotFound(agent),
            ));
            cases.push(case(
                "renew_lock nil",
                Call::RenewLock(nil, long),
                Expect::Invalid("lock_id", NIL_ID),
            ));
            let u = Uuid::new_v4();
            cases.push(case(
                "renew_lock unknown",
                Call::RenewLock(u, long),
                Expect::LockNotFound(u),
            ));
            cases.push(case(
                "end_session nil",
                Call::EndSession(nil),
                Expect::Invalid("session_id", NIL_ID),
            ));
            let u = Uuid::new_v4();
            cases.push(case(
                "end_session unknown",
                Call::EndSession(u),
                Expect::SessionNotFound(u),
            ));
            cases.push(case(
                "end_session with a lock id",
                Call::EndSession(held.lock_id),
                Expect::SessionNotFound(held.lock_id),
            ));
            cases.push(case(
                "session_context nil",
                Call::SessionContext(nil),
                Expect::Invalid("session_id", NIL_ID),
            ));
            let u = Uuid::new_v4();
            cases.push(case(
                "session_context unknown",
                Call::SessionContext(u),
                Expect::SessionNotFound(u),
            ));

            // Bad names, in every position that takes one.
            for (what, bad, reason) in bad_names() {
                cases.push(case(
                    format!("register_agent agent_type {what}"),
                    Call::RegisterAgent(session, bad.clone()),
                    Expect::Invalid("agent_type", reason),
                ));
                cases.push(case(
                    format!("acquire_lock resource_type {what}"),
                    Call::AcquireLock(agent, bad.clone(), "k".into()),
                    Expect::Invalid("resource_type", reason),
                ));
                cases.push(case(
                    format!("acquire_lock resource_key {what}"),
                    Call::AcquireLock(agent, "file".into(), bad.clone()),
                    Expect::Invalid("resource_key", reason),
                ));
                cases.push(case(
                    format!("acquire_lock_with resource_type {what}"),
                    Call::AcquireLockWith(agent, bad.clone(), "k".into(), ttl),
                    Expect::Invalid("resource_type", reason),
                ));
                cases.push(case(
                    format!("acquire_lock_with resource_key {what}"),
                    Call::AcquireLockWith(agent, "file".into(), bad.clone(), ttl),
                    Expect::Invalid("resource_key", reason),
                ));
                cases.push(case(
                    format!("validate_fence resource_type {what}"),
                    Call::ValidateFence(bad.clone(), "held".into(), held.fencing_token),
                    Expect::Invalid("resource_type", reason),
                ));
                cases.push(case(
                    format!("validate_fence resource_key {what}"),
                    Call::ValidateFence("file".into(), bad.clone(), held.fencing_token),
                    Expect::Invalid("resource_key", reason),
                ));
            }

            // Zero TTLs.
            cases.push(case(
                "acquire_lock_with zero ttl",
                Call::AcquireLockWith(agent, "file".into(), "k".into(), Some(Duration::ZERO)),
                Expect::Invalid("ttl", ZERO),
            ));
            cases.push(case(
                "acquire_lock_with zero ttl on a held resource",
                Call::AcquireLockWith(agent, "file".into(), "held".into(), Some(Duration::ZERO)),
                Expect::Invalid("ttl", ZERO),
            ));
            cases.push(case(
                "renew_lock zero ttl",
                Call::RenewLock(held.lock_id, Duration::ZERO),
                Expect::Invalid("ttl", ZERO),
            ));

            // The id is checked before the other arguments.
            cases.push(case(
                "acquire_lock nil agent and empty names",
                Call::AcquireLock(nil, String::new(), String::new()),
                Expect::Invalid("agent_id", NIL_ID),
            ));
            cases.push(case(
                "register_agent nil session and empty type",
                Call::RegisterAgent(nil, String::new()),
                Expect::Invalid("session_id", NIL_ID),
            ));
            cases.push(case(
                "renew_lock nil id and zero ttl",
                Call::RenewLock(nil, Duration::ZERO),
                Expect::Invalid("lock_id", NIL_ID),
            ));

            let before = everything(&db).await;
            for c in &cases {
                let result = c.call.run(m).await;
                check(c, result);
                assert_eq!(
                    everything(&db).await,
                    before,
                    "{}: {} changed the database",
                    db.backend.name(),
                    c.name
                );
            }
            eprintln!("{}: {} refusal cases", db.backend.name(), cases.len());

            // The refusals did not disturb the live rows.
            assert_eq!(session_row(&db, session).await.status, "active");
            let locks = lock_rows(&db, session).await;
            assert_eq!(locks.len(), 2);
            assert!(locks.iter().all(|l| l.released_at.is_none()));
            assert!(m
                .validate_fence("file", "held", held.fencing_token)
                .await
                .expect("validate"));
        },
    )
    .await;
}

// ---- 2. Names at the limit, and names that look like SQL ----------------------

#[tokio::test]
async fn names_of_exactly_1024_bytes_are_accepted_verbatim() {
    each_backend(
        "names_of_exactly_1024_bytes_are_accepted_verbatim",
        |db| async move {
            let m = &db.manager;
            let session = m.start_session().await.expect("start");
            for (what, name) in [
                ("ascii", "t".repeat(MAX_NAME_BYTES)),
                ("two-byte chars", "é".repeat(MAX_NAME_BYTES / 2)),
                ("four-byte chars", "🔒".repeat(MAX_NAME_BYTES / 4)),
            ] {
                assert_eq!(name.len(), MAX_NAME_BYTES);
                let agent = m
                    .register_agent(session, &name)
                    .await
                    .unwrap_or_else(|e| panic!("{what}: 1024-byte agent_type refused: {e}"));
                let grant = m
                    .acquire_lock(agent, &name, &name)
                    .await
                    .unwrap_or_else(|e| panic!("{what}: 1024-byte type and key refused: {e}"));
                let ttl = m
                    .acquire_lock_with(
                        agent,
                        "file",
                        &name,
                        LockOptions {
                            ttl: Some(Duration::from_secs(60)),
                            wait: None,
                        },
                    )
                    .await
                    .unwrap_or_else(|e| panic!("{what}: 1024-byte key with ttl refused: {e}"));

                let agent_row = agent_executions::Entity::find_by_id(agent.to_string())
                    .one(m.connection())
                    .await
                    .expect("query agent")
                    .expect("agent row");
                assert_eq!(agent_row.agent_type.as_bytes(), name.as_bytes(), "{what}");
                for id in [grant.lock_id, ttl.lock_id] {
                    let row = resource_locks::Entity::find_by_id(id.to_string())
                        .one(m.connection())
                        .await
                        .expect("query lock")
                        .expect("lock row");
                    assert_eq!(row.resource_key.as_bytes(), name.as_bytes(), "{what}");
                    assert!(row.released_at.is_none());
                }
                assert!(m
                    .validate_fence(&name, &name, grant.fencing_token)
                    .await
                    .expect("validate"));
            }
            assert_eq!(agent_rows(&db, session).await.len(), 3);
            assert_eq!(lock_rows(&db, session).await.len(), 6);
        },
    )
    .await;
}

/// Keys that would break a query built by string concatenation, or match more
/// than themselves under LIKE, case folding, trailing-space padding or
/// Unicode normalization.
const VERBATIM_KEYS: &[&str] = &[
    "'; DROP TABLE audit_log; --",
    "x' OR '1'='1",
    "%",
    "_",
    "\\",
    "\\'",
    "\"",
    "`",
    "$1",
    "Ünïcødé 🔒",
    "Key",
    "key",
    "KEY",
    "key ",
    " key",
    "a%",
    "a_c",
    "abc",
    "a\\%",
    "caf\u{e9}",
    "cafe\u{301}",
    "line\nbreak",
    "tab\tkey",
];

#[tokio::test]
async fn metacharacter_and_unicode_keys_are_stored_and_matched_verbatim() {
    each_backend(
        "metacharacter_and_unicode_keys_are_stored_and_matched_verbatim",
        |db| async move {
            let m = &db.manager;
            let s1 = m.start_session().await.expect("start");
            let holder = m.register_agent(s1, "holder").await.expect("register");
            let s2 = m.start_session().await.expect("start");
            let rival = m.register_agent(s2, "rival").await.expect("register");

            // "abc" first, so a key matched as a LIKE pattern would collide with it.
            let mut grants = BTreeMap::new();
            let mut order: Vec<&str> = vec!["abc"];
            order.extend(VERBATIM_KEYS.iter().copied().filter(|k| *k != "abc"));
            for key in &order {
                let grant = m
                    .acquire_lock(holder, "file", key)
                    .await
                    .unwrap_or_else(|e| {
                        panic!("{}: acquiring {key:?} failed: {e:?}", db.backend.name())
                    });
                grants.insert(*key, grant);
            }

            // Every mismatch is collected, so one run names all of them.
            let mut problems = Vec::new();
            for key in VERBATIM_KEYS {
                let grant = grants[key];
                let row = resource_locks::Entity::find_by_id(grant.lock_id.to_string())
                    .one(m.connection())
                    .await
                    .expect("query lock")
                    .expect("lock row");
                if row.resource_key.as_bytes() != key.as_bytes() || row.resource_type != "file" {
                    problems.push(format!(
                        "{key:?} stored as {:?}/{:?}",
                        row.resource_type, row.resource_key
                    ));
                }
                assert_eq!(row.fencing_token, grant.fencing_token);

                // The identical key is held: refused, naming its own holder.
                let before = all_locks(&db).await;
                match m.acquire_lock(rival, "file", key).await {
                    Err(Error::LockHeld {
                        resource_type,
                        resource_key,
                        holder_agent_id,
                        fencing_token,
                    }) => {
                        assert_eq!(resource_type, "file");
                        assert_eq!(resource_key.as_bytes(), key.as_bytes());
                        if (holder_agent_id, fencing_token)
                            != (Some(holder), Some(grant.fencing_token))
                        {
                            problems.push(format!(
                                "LockHeld for {key:?} names token {fencing_token:?}, \
                                 not its holder's {}",
                                grant.fencing_token
                            ));
                        }
                    }
                    other => problems.push(format!(
                        "second acquire of {key:?}: expected LockHeld, got {other:?}"
                    )),
                }
                assert_eq!(all_locks(&db).await, before, "refusal wrote no lock row");

                // Fencing matches the key exactly too.
                if !m
                    .validate_fence("file", key, grant.fencing_token)
                    .await
                    .expect("validate")
                {
                    problems.push(format!("{key:?}'s own token does not validate"));
                }
                for other in VERBATIM_KEYS.iter().filter(|o| *o != key) {
                    if m.validate_fence("file", other, grant.fencing_token)
                        .await
                        .expect("validate")
                    {
                        problems.push(format!("{key:?}'s token validates for {other:?}"));
                    }
                }
            }
            assert!(
                problems.is_empty(),
                "{}: keys are not matched byte for byte:\n  {}",
                db.backend.name(),
                problems.join("\n  ")
            );

            // Every key is its own held row: nothing collided with anything.
            let held: Vec<_> = lock_rows(&db, s1)
                .await
                .into_iter()
                .filter(|l| l.released_at.is_none())
                .collect();
            assert_eq!(held.len(), VERBATIM_KEYS.len());
            assert!(lock_rows(&db, s2).await.is_empty(), "the rival got nothing");

            // Releasing "key" frees exactly "key", not "Key", "KEY", "key " or " key".
            m.release_lock(grants["key"].lock_id)
                .await
                .expect("release");
            let again = m
                .acquire_lock(rival, "file", "key")
                .await
                .expect("key is free");
            for other in ["Key", "KEY", "key ", " key"] {
                assert!(
                    matches!(
                        m.acquire_lock(rival, "file", other).await,
                        Err(Error::LockHeld { .. })
                    ),
                    "{}: {other:?} must still be held",
                    db.backend.name()
                );
            }
            let rival_locks = lock_rows(&db, s2).await;
            assert_eq!(rival_locks.len(), 1);
            assert_eq!(id(&rival_locks[0].id), again.lock_id);
            assert_eq!(rival_locks[0].resource_key, "key");
        },
    )
    .await;
}

// ---- 3. Corrupt saved context --------------------------------------------------

#[tokio::test]
async fn corrupt_saved_context_is_reported_not_panicked_on() {
    each_backend(
        "corrupt_saved_context_is_reported_not_panicked_on",
        |db| async move {
            let mut values = vec![
                r#"{"version":1,"windows":"nope"}"#,
                r#"{"version":99,"windows":[]}"#,
                r#"{"version":1}"#,
                r#"{"windows":[]}"#,
                r#"{"version":1,"windows":[{"key":7,"data":null}]}"#,
                r#"{"version":-1,"windows":[]}"#,
                r#"[]"#,
                r#""a string""#,
                r#"42"#,
            ];
            // jsonb and MariaDB's JSON refuse text that is not JSON.
            if db.is_sqlite() {
                values.extend(["not json at all", "{\"version\":1,", ""]);
            }
            let sql = placeholders(
                &db,
                if db.backend == Backend::Postgres {
                    "UPDATE global_sessions SET context_data = CAST(CAST(? AS TEXT) AS jsonb) \
                     WHERE id = ?"
                } else {
                    "UPDATE global_sessions SET context_data = ? WHERE id = ?"
                },
            );
            for value in values {
                let (session, _) = populated_session(&db, 1, 1).await;
                db.manager
                    .contexts()
                    .put(session, "k", json!({"x": 1}))
                    .expect("put window");
                db.manager.end_session(session).await.expect("end");
                let res = exec_sql(&db, &sql, vec![value.into(), session.to_string().into()])
                    .await
                    .unwrap_or_else(|e| panic!("write {value:?}: {e}"));
                assert_eq!(res.rows_affected(), 1);
                let before = everything_as_text(&db).await;

                match db.manager.session_context(session).await {
                    Err(Error::CorruptContext { session_id, reason }) => {
                        assert_eq!(session_id, session, "{value:?}: session id");
                        assert!(!reason.is_empty(), "{value:?}: a reason is given");
                    }
                    other => panic!(
                        "{}: context_data {value:?}: expected CorruptContext, got {other:?}",
                        db.backend.name()
                    ),
                }
                assert_eq!(
                    everything_as_text(&db).await,
                    before,
                    "reading corrupt context changed nothing"
                );
                // Ending again still reports the first end and writes nothing.
                let again = db.manager.end_session(session).await.expect("end again");
                assert!(again.already_ended);
                assert_eq!(everything_as_text(&db).await, before);
            }
        },
    )
    .await;
}

// ---- 4. The audit log is append-only --------------------------------------------

#[tokio::test]
async fn audit_log_refuses_update_and_delete() {
    each_backend("audit_log_refuses_update_and_delete", |db| async move {
        let (session, _) = populated_session(&db, 2, 2).await;
        db.manager.end_session(session).await.expect("end");
        let before = everything(&db).await;
        assert_eq!(before.0.audit.len(), 2, "session_start and session_end");

        let id = before.0.audit[0].id.clone();
        let statements = [
            ("UPDATE audit_log SET event_type = 'x'", vec![]),
            ("DELETE FROM audit_log", vec![]),
            (
                "UPDATE audit_log SET details = details WHERE id = ?",
                vec![id.clone().into()],
            ),
            ("DELETE FROM audit_log WHERE id = ?", vec![id.into()]),
            (
                "DELETE FROM audit_log WHERE event_type = 'session_end'",
                vec![],
            ),
        ];
        for (sql, values) in statements {
            let sql = placeholders(&db, sql);
            match exec_sql(&db, &sql, values).await {
                Err(e) => assert!(
                    e.to_string().contains("append-only")
                        || e.to_string().contains("above the compaction horizon"),
                    "{}: {sql}: refused for another reason: {e}",
                    db.backend.name()
                ),
                Ok(res) => panic!(
                    "{}: {sql} succeeded ({} rows)",
                    db.backend.name(),
                    res.rows_affected()
                ),
            }
            assert_eq!(everything(&db).await, before, "{sql} changed nothing");
        }
    })
    .await;
}

// ---- 5. Connecting to what is not ours (SQLite) ---------------------------------

fn file_url(path: &std::path::Path) -> String {
    format!("sqlite://{}", path.display())
}

#[tokio::test]
async fn connecting_to_a_text_file_is_not_a_database_and_leaves_it_alone() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, text) in [
        (
            "notadb.txt",
            "These are my notes, not a database.\n".repeat(40),
        ),
        ("short.txt", "hello\n".to_owned()),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, &text).expect("write text file");

        match SessionManager::connect(&file_url(&path)).await {
            Err(Error::NotADatabase { path: named }) => {
                assert_eq!(named, path.display().to_string(), "names the file")
            }
            other => panic!("{name}: expected NotADatabase, got {other:?}"),
        }
        assert_eq!(
            std::fs::read(&path).expect("read back"),
            text.as_bytes(),
            "{name}: the file's bytes are unchanged"
        );
        for suffix in ["-wal", "-journal"] {
            let side = dir.path().join(format!("{name}{suffix}"));
            let len = std::fs::metadata(&side).map(|m| m.len()).unwrap_or(0);
            assert_eq!(len, 0, "{name}: {suffix} file left with content");
        }
    }
}

/// Tables and indexes (with their SQL) and every table's row count.
async fn describe(conn: &DatabaseConnection) -> Vec<(String, String, Option<String>, i64)> {
    let rows = conn
        .query_all_raw(Statement::from_string(
            DbBackend::Sqlite,
            "SELECT type, name, sql FROM sqlite_master ORDER BY type, name",
        ))
        .await
        .expect("read sqlite_master");
    let mut out = Vec::new();
    for row in rows {
        let kind: String = row.try_get_by_index(0).expect("type");
        let name: String = row.try_get_by_index(1).expect("name");
        let sql: Option<String> = row.try_get_by_index(2).expect("sql");
        let count = if kind == "table" {
            conn.query_one_raw(Statement::from_string(
                DbBackend::Sqlite,
                format!("SELECT COUNT(*) FROM \"{name}\""),
            ))
            .await
            .expect("count")
            .expect("count row")
            .try_get_by_index::<i64>(0)
            .expect("count value")
        } else {
            -1
        };
        out.push((kind, name, sql, count));
    }
    out
}

async fn migration_rows(conn: &DatabaseConnection) -> Vec<(String, i64)> {
    conn.query_all_raw(Statement::from_string(
        DbBackend::Sqlite,
        "SELECT version, applied_at FROM seaql_migrations ORDER BY version",
    ))
    .await
    .expect("read seaql_migrations")
    .into_iter()
    .map(|r| {
        (
            r.try_get_by_index(0).expect("version"),
            r.try_get_by_index(1).expect("applied_at"),
        )
    })
    .collect()
}

#[tokio::test]
async fn a_database_from_a_newer_library_is_refused_and_left_unchanged() {
    const FUTURE: &str = "m29990101_000001_from_the_future";
    let dir = tempfile::tempdir().expect("temp dir");
    let url = file_url(&dir.path().join("future.db"));

    let m = SessionManager::connect(&url).await.expect("create");
    let (session, agent) = {
        let s = m.start_session().await.expect("start");
        let a = m.register_agent(s, "coder").await.expect("register");
        m.acquire_lock(a, "file", "x").await.expect("acquire");
        (s, a)
    };
    m.close().await.expect("close");

    let raw = Database::connect(&url).await.expect("raw connect");
    raw.execute_raw(Statement::from_sql_and_values(
        DbBackend::Sqlite,
        "INSERT INTO seaql_migrations (version, applied_at) VALUES (?, ?)",
        [FUTURE.into(), 32_503_680_000_i64.into()],
    ))
    .await
    .expect("insert the future migration");
    let before = describe(&raw).await;
    let migrations_before = migration_rows(&raw).await;
    assert!(migrations_before.iter().any(|(v, _)| v == FUTURE));
    assert!(before
        .iter()
        .any(|(_, n, _, c)| n == "global_sessions" && *c == 1));

    match SessionManager::connect(&url).await {
        Err(Error::SchemaTooNew { unknown }) => {
            assert_eq!(
                unknown,
                vec![FUTURE.to_owned()],
                "names the unknown migration"
            )
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }

    assert_eq!(
        describe(&raw).await,
        before,
        "schema and row counts unchanged"
    );
    assert_eq!(migration_rows(&raw).await, migrations_before);
    let status = raw
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Sqlite,
            "SELECT s.status, a.status FROM global_sessions s \
             JOIN agent_executions a ON a.session_id = s.id WHERE s.id = ? AND a.id = ?",
            [session.to_string().into(), agent.to_string().into()],
        ))
        .await
        .expect("query")
        .expect("row");
    assert_eq!(
        (
            status
                .try_get_by_index::<String>(0)
                .expect("session status"),
            status.try_get_by_index::<String>(1).expect("agent status"),
        ),
        ("active".to_owned(), "running".to_owned())
    );
    raw.close().await.expect("close raw");
}

// ---- Config errors name the field; the CLI names the flag ---------------------

#[tokio::test]
async fn config_errors_name_the_config_field() {
    use demiarch_sessions::{Config, RetentionPolicy};
    let cases = [
        (
            Config {
                cleanup_timeout: Duration::from_nanos(1),
                ..Config::default()
            },
            "Config::cleanup_timeout",
        ),
        (
            Config {
                busy_timeout: Duration::from_secs(2 * 24 * 60 * 60),
                ..Config::default()
            },
            "Config::busy_timeout",
        ),
        (
            Config {
                watch_page_size: 0,
                ..Config::default()
            },
            "Config::watch_page_size",
        ),
        (
            Config {
                retention: Some(RetentionPolicy {
                    batch: 0,
                    ..RetentionPolicy::default()
                }),
                ..Config::default()
            },
            "Config::retention.batch",
        ),
    ];
    for (config, want) in cases {
        for outcome in [
            config.validate().map(drop),
            SessionManager::connect_with("sqlite::memory:", config.clone())
                .await
                .map(drop),
        ] {
            match outcome {
                Err(e @ Error::InvalidInput { .. }) => {
                    let message = e.to_string();
                    assert!(
                        message.starts_with(&format!("invalid {want}: ")),
                        "{message}"
                    );
                    assert!(!message.contains("URL"), "{message}");
                }
                other => panic!("{want}: {other:?}"),
            }
        }
    }
}

#[test]
fn cli_errors_name_the_flag() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    for (args, flag) in [
        (
            &["--cleanup-timeout", "1ns", "sessions", "list"][..],
            "--cleanup-timeout",
        ),
        (
            &["--busy-timeout", "2days", "locks", "sweep"],
            "--busy-timeout",
        ),
        (&["recover", "--stale-after", "11years"], "--stale-after"),
        (&["prune", "--audit-after", "11years"], "--audit-after"),
        (
            &["prune", "--completed-after", "1d", "--batch", "0"],
            "--batch",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_demiarch-sessions"))
            .env_remove("DATABASE_URL")
            .arg("--database-url")
            .arg(&url)
            .args(args)
            .output()
            .expect("run the CLI");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        let line = stderr.lines().last().unwrap_or_default();
        assert!(
            line.starts_with(&format!("error: invalid {flag}: ")),
            "{args:?}: {stderr}"
        );
        assert!(!line.contains("URL"), "{args:?}: {stderr}");
    }
}
