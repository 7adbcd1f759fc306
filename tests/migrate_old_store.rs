//! An old store, migrated only part of the way and filled with the rows of
//! its time, is brought up to date by `SessionManager::connect` (on
//! in-memory SQLite, `Migrator::up` on its one connection): every row is
//! kept, the schema is exactly a freshly migrated store's, and the store
//! works (its open session ends, releasing its locks and waiters).
mod common;

use chrono::{DateTime, DurationRound, Utc};
use common::*;
use demiarch_sessions::{Migrator, SessionManager};
use entity::{
    agent_executions, audit_log, global_sessions, lock_fencing, lock_waiters, resource_locks,
    retention,
};
use sea_orm::{ConnectionTrait, DatabaseConnection, EntityTrait, QueryOrder, Statement, Value};
use sea_orm_migration::MigratorTrait;
use serde_json::json;
use uuid::Uuid;

/// How many migrations the old stores had applied: the first alone, up to
/// the lock queue, and all but the last.
const STAGES: [u32; 3] = [1, 3, 5];

/// An audit row of an old store: id, event, session, details, time.
type AuditRow = (
    Uuid,
    &'static str,
    Option<Uuid>,
    serde_json::Value,
    DateTime<Utc>,
);

/// The rows an old store holds.
struct Old {
    t0: DateTime<Utc>,
    t1: DateTime<Utc>,
    t2: DateTime<Utc>,
    /// Open, with a running agent holding `src/a.rs`, a finished one that
    /// released `src/b.rs` and (from the lock queue on) a running one
    /// waiting for `src/a.rs`.
    open: Uuid,
    /// Completed, its agent cancelled and its lock released by the end.
    ended: Uuid,
    holder: Uuid,
    finished: Uuid,
    waiter: Uuid,
    cancelled: Uuid,
    held: Uuid,
    released: Uuid,
    ended_lock: Uuid,
    queued: Uuid,
    /// Audit rows in time order.
    audit: Vec<AuditRow>,
    context: serde_json::Value,
}

impl Old {
    fn new() -> Self {
        let base = Utc::now()
            .duration_trunc(chrono::Duration::seconds(1))
            .expect("whole seconds")
            - chrono::Duration::hours(1);
        let at = |s: i64| base + chrono::Duration::seconds(s);
        let (t0, t1, t2) = (at(0), at(10), at(20));
        let (open, ended) = (Uuid::new_v4(), Uuid::new_v4());
        let context = json!({"version": 1, "windows": [{"name": "plan", "data": {"step": 3}}]});
        let audit = vec![
            (Uuid::new_v4(), "session_start", Some(open), json!({}), t0),
            (
                Uuid::new_v4(),
                "session_start",
                Some(ended),
                json!({}),
                at(1),
            ),
            (
                Uuid::new_v4(),
                "locks_swept",
                None,
                json!({"expired": 0, "orphaned": 0, "locks": []}),
                t1,
            ),
            (
                Uuid::new_v4(),
                "session_end",
                Some(ended),
                json!({"session_id": ended, "locks_released": 1, "agents_cancelled": 1}),
                t2,
            ),
        ];
        Self {
            t0,
            t1,
            t2,
            open,
            ended,
            holder: Uuid::new_v4(),
            finished: Uuid::new_v4(),
            waiter: Uuid::new_v4(),
            cancelled: Uuid::new_v4(),
            held: Uuid::new_v4(),
            released: Uuid::new_v4(),
            ended_lock: Uuid::new_v4(),
            queued: Uuid::new_v4(),
            audit,
            context,
        }
    }

    /// Writes the rows with raw SQL, in the columns every stage has.
    async fn write(&self, db: &TestDb, stage: u32) {
        let sql = |db: &TestDb, text: &str| placeholders(db, text);
        let none = || Value::String(None);
        let no_time = || Value::ChronoDateTimeUtc(None);
        let insert_session = sql(
            db,
            "INSERT INTO global_sessions (id, status, started_at, updated_at, completed_at, \
             context_data) VALUES (?, ?, ?, ?, ?, ?)",
        );
        for values in [
            vec![
                self.open.to_string().into(),
                "active".into(),
                self.t0.into(),
                self.t0.into(),
                no_time(),
                Value::Json(None),
            ],
            vec![
                self.ended.to_string().into(),
                "completed".into(),
                self.t0.into(),
                self.t2.into(),
                self.t2.into(),
                self.context.clone().into(),
            ],
        ] {
            exec_sql(db, &insert_session, values)
                .await
                .expect("session");
        }
        let insert_agent = sql(
            db,
            "INSERT INTO agent_executions (id, session_id, agent_type, status, started_at, \
             completed_at) VALUES (?, ?, ?, ?, ?, ?)",
        );
        let agents = [
            (self.holder, self.open, "coder", "running", None),
            (
                self.finished,
                self.open,
                "reviewer",
                "completed",
                Some(self.t1),
            ),
            (self.waiter, self.open, "tester", "running", None),
            (
                self.cancelled,
                self.ended,
                "coder",
                "cancelled",
                Some(self.t2),
            ),
        ];
        for (id, session, kind, status, done) in agents {
            let values = vec![
                id.to_string().into(),
                session.to_string().into(),
                kind.into(),
                status.into(),
                self.t0.into(),
                done.into(),
            ];
            exec_sql(db, &insert_agent, values).await.expect("agent");
        }
        let insert_lock = sql(
            db,
            "INSERT INTO resource_locks (id, agent_id, session_id, resource_type, resource_key, \
             fencing_token, acquired_at, expires_at, released_at, release_reason) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        );
        let locks = [
            (
                self.held,
                self.holder,
                self.open,
                "src/a.rs",
                1i64,
                None,
                None,
            ),
            (
                self.released,
                self.finished,
                self.open,
                "src/b.rs",
                2,
                Some(self.t1),
                Some("released"),
            ),
            (
                self.ended_lock,
                self.cancelled,
                self.ended,
                "src/c.rs",
                3,
                Some(self.t2),
                Some("session_end"),
            ),
        ];
        for (id, agent, session, key, token, released_at, reason) in locks {
            let values = vec![
                id.to_string().into(),
                agent.to_string().into(),
                session.to_string().into(),
                "file".into(),
                key.into(),
                token.into(),
                self.t0.into(),
                no_time(),
                released_at.into(),
                reason.map_or_else(none, Value::from),
            ];
            exec_sql(db, &insert_lock, values).await.expect("lock");
        }
        if stage >= 3 {
            let insert_waiter = sql(
                db,
                "INSERT INTO lock_waiters (id, ticket, agent_id, session_id, resource_type, \
                 resource_key, since, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            );
            let values = vec![
                self.queued.to_string().into(),
                4i64.into(),
                self.waiter.to_string().into(),
                self.open.to_string().into(),
                "file".into(),
                "src/a.rs".into(),
                self.t1.into(),
                (Utc::now() + chrono::Duration::days(1)).into(),
            ];
            exec_sql(db, &insert_waiter, values).await.expect("waiter");
        }
        let counter = sql(db, "UPDATE lock_fencing SET last_token = ? WHERE id = 1");
        exec_sql(db, &counter, vec![4i64.into()])
            .await
            .expect("counter");
        let insert_audit = sql(
            db,
            "INSERT INTO audit_log (id, event_type, event_time, session_id, details) \
             VALUES (?, ?, ?, ?, ?)",
        );
        for (id, event, session, details, at) in &self.audit {
            let values = vec![
                id.to_string().into(),
                (*event).into(),
                (*at).into(),
                session.map(|s| s.to_string()).into(),
                details.clone().into(),
            ];
            exec_sql(db, &insert_audit, values)
                .await
                .expect("audit row");
        }
    }

    /// Every row written is there, as written; the columns added since hold
    /// their defaults.
    async fn assert_kept(&self, conn: &DatabaseConnection, stage: u32, what: &str) {
        let sessions = global_sessions::Entity::find()
            .all(conn)
            .await
            .expect("sessions");
        assert_eq!(sessions.len(), 2, "{what}");
        for s in &sessions {
            let (status, updated, completed, context) = if s.id == self.open.to_string() {
                ("active", self.t0, None, None)
            } else {
                assert_eq!(s.id, self.ended.to_string(), "{what}");
                (
                    "completed",
                    self.t2,
                    Some(self.t2),
                    Some(self.context.clone()),
                )
            };
            assert_eq!(s.status, status, "{what}");
            assert_eq!(s.started_at.to_utc(), self.t0, "{what}");
            assert_eq!(s.updated_at.to_utc(), updated, "{what}");
            assert_eq!(s.completed_at.map(|t| t.to_utc()), completed, "{what}");
            assert_eq!(s.context_data, context, "{what}");
            assert_eq!(
                (&s.owner_instance, s.last_heartbeat_at, s.context_cleared_at),
                (&None, None, None),
                "{what}"
            );
        }

        let agents = agent_executions::Entity::find()
            .order_by_asc(agent_executions::Column::Id)
            .all(conn)
            .await
            .expect("agents");
        let mut want = vec![
            (self.holder, self.open, "coder", "running", None),
            (
                self.finished,
                self.open,
                "reviewer",
                "completed",
                Some(self.t1),
            ),
            (self.waiter, self.open, "tester", "running", None),
            (
                self.cancelled,
                self.ended,
                "coder",
                "cancelled",
                Some(self.t2),
            ),
        ];
        want.sort_by_key(|a| a.0.to_string());
        let got: Vec<_> = agents
            .iter()
            .map(|a| {
                (
                    id(&a.id),
                    id(&a.session_id),
                    a.agent_type.as_str(),
                    a.status.as_str(),
                    a.completed_at.map(|t| t.to_utc()),
                )
            })
            .collect();
        assert_eq!(got, want, "{what}");
        assert!(agents.iter().all(|a| a.started_at.to_utc() == self.t0));

        let locks = resource_locks::Entity::find()
            .order_by_asc(resource_locks::Column::FencingToken)
            .all(conn)
            .await
            .expect("locks");
        let got: Vec<_> = locks
            .iter()
            .map(|l| {
                (
                    id(&l.id),
                    id(&l.agent_id),
                    id(&l.session_id),
                    l.resource_type.as_str(),
                    l.resource_key.as_str(),
                    l.fencing_token,
                    l.acquired_at.to_utc(),
                    l.expires_at,
                    l.released_at.map(|t| t.to_utc()),
                    l.release_reason.as_deref(),
                )
            })
            .collect();
        let t0 = self.t0;
        assert_eq!(
            got,
            [
                (
                    self.held,
                    self.holder,
                    self.open,
                    "file",
                    "src/a.rs",
                    1,
                    t0,
                    None,
                    None,
                    None
                ),
                (
                    self.released,
                    self.finished,
                    self.open,
                    "file",
                    "src/b.rs",
                    2,
                    t0,
                    None,
                    Some(self.t1),
                    Some("released")
                ),
                (
                    self.ended_lock,
                    self.cancelled,
                    self.ended,
                    "file",
                    "src/c.rs",
                    3,
                    t0,
                    None,
                    Some(self.t2),
                    Some("session_end")
                ),
            ],
            "{what}"
        );

        let waiters = lock_waiters::Entity::find()
            .all(conn)
            .await
            .expect("waiters");
        if stage >= 3 {
            assert_eq!(waiters.len(), 1, "{what}");
            let w = &waiters[0];
            assert_eq!(
                (id(&w.id), w.ticket, id(&w.agent_id), id(&w.session_id)),
                (self.queued, 4, self.waiter, self.open),
                "{what}"
            );
            assert_eq!(
                (w.resource_key.as_str(), w.since.to_utc()),
                ("src/a.rs", self.t1)
            );
        } else {
            assert!(waiters.is_empty(), "{what}");
        }

        let counter = lock_fencing::Entity::find_by_id(1)
            .one(conn)
            .await
            .expect("counter")
            .expect("counter row");
        assert_eq!(counter.last_token, 4, "{what}");

        let audit = audit_log::Entity::find()
            .order_by_asc(audit_log::Column::Seq)
            .all(conn)
            .await
            .expect("audit");
        let got: Vec<_> = audit
            .iter()
            .map(|r| {
                (
                    r.seq,
                    id(&r.id),
                    r.event_type.as_str(),
                    r.session_id.as_deref().map(id),
                    r.details.clone(),
                    r.event_time.to_utc(),
                )
            })
            .collect();
        let want: Vec<_> = self
            .audit
            .iter()
            .zip(1..)
            .map(|((row, event, session, details, at), seq)| {
                (seq, *row, *event, *session, details.clone(), *at)
            })
            .collect();
        assert_eq!(got, want, "{what}: kept, numbered in time order");

        let horizon = retention::Entity::find_by_id(1)
            .one(conn)
            .await
            .expect("retention")
            .expect("retention row");
        assert_eq!(horizon.compacted_through, 0, "{what}");
    }
}

/// One row of a schema listing, every column as text.
type Listed = Vec<Option<String>>;

/// What the database says its schema is, minus what holds rows rather
/// than shape (sequence positions, `AUTO_INCREMENT` counters), and the
/// migrations it applied.
async fn schema(conn: &DatabaseConnection, on: Backend) -> Vec<(&'static str, Listed)> {
    let backend = conn.get_database_backend();
    let queries: &[(&str, &str)] = match on {
        Backend::SqliteMemory | Backend::SqliteFile => &[(
            "sqlite_master",
            "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name",
        )],
        Backend::Postgres => &[
            (
                "columns",
                "SELECT table_name::text, column_name::text, data_type::text, \
                 is_nullable::text, column_default::text, character_maximum_length::text, \
                 is_identity::text, identity_generation::text, ordinal_position::text \
                 FROM information_schema.columns WHERE table_schema = current_schema() \
                 ORDER BY table_name, ordinal_position",
            ),
            (
                "indexes",
                "SELECT tablename::text, indexname::text, indexdef::text FROM pg_indexes \
                 WHERE schemaname = current_schema() ORDER BY 1, 2",
            ),
            (
                "constraints",
                "SELECT conrelid::regclass::text, conname::text, pg_get_constraintdef(oid) \
                 FROM pg_constraint WHERE connamespace = current_schema()::regnamespace \
                 ORDER BY 1, 2",
            ),
            (
                "triggers",
                "SELECT tgrelid::regclass::text, tgname::text, pg_get_triggerdef(oid) \
                 FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1, 2",
            ),
            (
                "functions",
                "SELECT proname::text, pg_get_functiondef(oid) FROM pg_proc \
                 WHERE pronamespace = current_schema()::regnamespace ORDER BY 1",
            ),
        ],
        Backend::MySql => &[
            (
                "tables",
                "SELECT CAST(table_name AS CHAR), CAST(engine AS CHAR), \
                 CAST(table_collation AS CHAR) FROM information_schema.tables \
                 WHERE table_schema = DATABASE() ORDER BY 1",
            ),
            (
                "columns",
                "SELECT CAST(table_name AS CHAR), CAST(column_name AS CHAR), \
                 CAST(column_type AS CHAR), CAST(is_nullable AS CHAR), \
                 CAST(column_default AS CHAR), CAST(extra AS CHAR), \
                 CAST(generation_expression AS CHAR), CAST(collation_name AS CHAR), \
                 CAST(ordinal_position AS CHAR) FROM information_schema.columns \
                 WHERE table_schema = DATABASE() ORDER BY table_name, ordinal_position",
            ),
            (
                "indexes",
                "SELECT CAST(table_name AS CHAR), CAST(index_name AS CHAR), \
                 CAST(non_unique AS CHAR), CAST(seq_in_index AS CHAR), \
                 CAST(column_name AS CHAR), CAST(sub_part AS CHAR) \
                 FROM information_schema.statistics WHERE table_schema = DATABASE() \
                 ORDER BY table_name, index_name, seq_in_index",
            ),
            (
                "checks",
                "SELECT CAST(constraint_name AS CHAR), CAST(check_clause AS CHAR) \
                 FROM information_schema.check_constraints \
                 WHERE constraint_schema = DATABASE() ORDER BY 1, 2",
            ),
            (
                "foreign keys",
                "SELECT CAST(table_name AS CHAR), CAST(constraint_name AS CHAR), \
                 CAST(column_name AS CHAR), CAST(referenced_table_name AS CHAR), \
                 CAST(referenced_column_name AS CHAR), CAST(ordinal_position AS CHAR) \
                 FROM information_schema.key_column_usage WHERE table_schema = DATABASE() \
                 AND referenced_table_name IS NOT NULL ORDER BY 1, 2, 6",
            ),
            (
                "triggers",
                "SELECT CAST(trigger_name AS CHAR), CAST(event_manipulation AS CHAR), \
                 CAST(event_object_table AS CHAR), CAST(action_timing AS CHAR), \
                 CAST(action_statement AS CHAR) FROM information_schema.triggers \
                 WHERE trigger_schema = DATABASE() ORDER BY 1",
            ),
        ],
    };
    let mut listed = Vec::new();
    let mut all = queries.to_vec();
    all.push((
        "migrations",
        "SELECT version FROM seaql_migrations ORDER BY version",
    ));
    for (what, sql) in all {
        let rows = conn
            .query_all_raw(Statement::from_string(backend, sql))
            .await
            .unwrap_or_else(|e| panic!("list {what}: {e}"));
        // As many columns as the query selects.
        let selected = sql[..sql.find(" FROM ").expect("FROM")]
            .matches(',')
            .count()
            + 1;
        for row in rows {
            let columns: Listed = (0..selected)
                .map(|i| {
                    row.try_get_by_index::<Option<String>>(i)
                        .unwrap_or_else(|e| panic!("{what}: column {i} as text: {e}"))
                })
                .collect();
            listed.push((what, columns));
        }
    }
    listed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_store_is_migrated_with_its_rows_kept_and_works() {
    for stage in STAGES {
        let test = format!("old store of {stage} migrations");
        each_backend(&test, |db| async move {
            let what = format!("{}, {stage} migrations", db.backend.name());
            let conn = db.manager.connection();
            // The store as a build of that time left it: the harness hands
            // out a migrated database, so it is emptied first.
            Migrator::down(conn, None).await.expect("down");
            Migrator::up(conn, Some(stage))
                .await
                .expect("up to the old stage");
            let pending = Migrator::get_pending_migrations(conn)
                .await
                .expect("pending");
            assert_eq!(
                pending.len(),
                Migrator::migrations().len() - stage as usize,
                "{what}"
            );
            let old = Old::new();
            old.write(&db, stage).await;

            // Connecting applies the rest.
            let manager = match db.backend {
                Backend::SqliteMemory => {
                    Migrator::up(conn, None).await.expect("up");
                    db.manager.clone()
                }
                _ => SessionManager::connect_with(&db.url, test_config())
                    .await
                    .unwrap_or_else(|e| panic!("{what}: connect: {e}")),
            };
            let conn = manager.connection();
            assert!(
                Migrator::get_pending_migrations(conn)
                    .await
                    .expect("pending")
                    .is_empty(),
                "{what}"
            );
            old.assert_kept(conn, stage, &what).await;

            let fresh = TestDb::new(db.backend).await;
            let got = schema(conn, db.backend).await;
            let want = schema(fresh.manager.connection(), db.backend).await;
            assert!(!want.is_empty(), "{what}: nothing listed");
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g, w, "{what}: the schema differs from a fresh store's");
            }
            assert_eq!(
                got.len(),
                want.len(),
                "{what}: the schema differs in length"
            );
            fresh.cleanup().await;

            // It works: the open session ends, releasing its lock and its
            // waiter, and the counter goes on from where it was.
            let report = manager.end_session(old.open).await.expect("end");
            assert_eq!(
                (report.already_ended, report.locks_released),
                (false, 1),
                "{what}"
            );
            assert_eq!(report.agents_cancelled, 2, "{what}: the running agents");
            let locks = resource_locks::Entity::find()
                .all(conn)
                .await
                .expect("locks");
            assert!(locks.iter().all(|l| l.released_at.is_some()), "{what}");
            let held = locks
                .iter()
                .find(|l| l.id == old.held.to_string())
                .expect("the held lock");
            assert_eq!(held.release_reason.as_deref(), Some("session_end"));
            assert!(lock_waiters::Entity::find()
                .all(conn)
                .await
                .expect("waiters")
                .is_empty());
            let ends = audit_log::Entity::find()
                .order_by_asc(audit_log::Column::Seq)
                .all(conn)
                .await
                .expect("audit");
            let last = ends.last().expect("rows");
            assert_eq!(
                (last.seq, last.event_type.as_str(), last.session_id.clone()),
                (5, "session_end", Some(old.open.to_string())),
                "{what}"
            );
            let session = manager.start_session().await.expect("start");
            let agent = manager
                .register_agent(session, "coder")
                .await
                .expect("agent");
            let grant = manager
                .acquire_lock(agent, "file", "src/a.rs")
                .await
                .expect("the released resource");
            assert_eq!(grant.fencing_token, 5, "{what}: the counter went on");
            if db.backend != Backend::SqliteMemory {
                manager.close().await.expect("close");
            }
            db.cleanup().await;
        })
        .await;
    }
}
