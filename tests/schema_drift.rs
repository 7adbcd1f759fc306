//! Schema drift: on every backend, the entity definitions and the tables the
//! migrations create agree on table names, column names and nullability.
mod common;

use std::collections::BTreeMap;

use common::{each_backend, populated_session, Backend, TestDb};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, IdenStatic, Iterable, Statement};

/// Columns a backend adds for its own indexes, which no entity maps.
const BACKEND_HELPER_COLUMNS: &[(&str, &str)] = &[
    ("resource_locks", "held_lock_key"), // MySQL: unique key over held locks
    ("audit_log", "session_end_key"),    // MySQL: one session_end per session
];

/// column name -> nullable, as the database reports it.
async fn table_columns(db: &TestDb, table: &str) -> BTreeMap<String, bool> {
    let conn = db.manager.connection();
    let backend = conn.get_database_backend();
    let sql = match db.backend {
        Backend::SqliteMemory | Backend::SqliteFile => {
            "SELECT name AS column_name, CASE WHEN \"notnull\" = 1 OR pk > 0 THEN 'NO' ELSE 'YES' END AS is_nullable \
             FROM pragma_table_info(?)"
        }
        Backend::Postgres => {
            "SELECT column_name::text AS column_name, is_nullable::text AS is_nullable \
             FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1"
        }
        Backend::MySql => {
            "SELECT CAST(column_name AS CHAR) AS column_name, CAST(is_nullable AS CHAR) AS is_nullable \
             FROM information_schema.columns WHERE table_schema = DATABASE() AND table_name = ?"
        }
    };
    let rows = conn
        .query_all_raw(Statement::from_sql_and_values(backend, sql, [table.into()]))
        .await
        .expect("read columns");
    rows.into_iter()
        .map(|r| {
            let name: String = r.try_get("", "column_name").expect("column_name");
            let nullable: String = r.try_get("", "is_nullable").expect("is_nullable");
            (name, nullable == "YES")
        })
        .filter(|(name, _)| !BACKEND_HELPER_COLUMNS.contains(&(table, name.as_str())))
        .collect()
}

async fn assert_entity_matches<E: EntityTrait>(db: &TestDb, entity: E) {
    let table = entity.table_name();
    let expected: BTreeMap<String, bool> = E::Column::iter()
        .map(|c| (c.as_str().to_owned(), c.def().is_null()))
        .collect();
    let actual = table_columns(db, table).await;
    assert_eq!(
        actual,
        expected,
        "{}: table {table} differs from its entity (column -> nullable)",
        db.backend.name()
    );
}

#[tokio::test]
async fn entities_match_migrated_tables() {
    each_backend("entities_match_migrated_tables", |db| async move {
        assert_entity_matches(&db, entity::global_sessions::Entity).await;
        assert_entity_matches(&db, entity::agent_executions::Entity).await;
        assert_entity_matches(&db, entity::resource_locks::Entity).await;
        assert_entity_matches(&db, entity::lock_fencing::Entity).await;
        assert_entity_matches(&db, entity::audit_log::Entity).await;
        assert_entity_matches(&db, entity::audit_head::Entity).await;
        assert_entity_matches(&db, entity::lock_waiters::Entity).await;
        assert_entity_matches(&db, entity::retention::Entity).await;
    })
    .await;
}

/// The migrations roll all the way down and back up on every backend, leaving
/// a working store (what `cargo run -p migration -- fresh` relies on).
#[tokio::test]
async fn migrations_roll_down_and_up_again() {
    use demiarch_sessions::Migrator;
    use sea_orm_migration::MigratorTrait;
    each_backend("migrations_roll_down_and_up_again", |db| async move {
        let conn = db.manager.connection();
        Migrator::down(conn, None).await.expect("down");
        let leftover = table_columns(&db, "resource_locks").await;
        assert!(
            leftover.is_empty(),
            "{}: resource_locks survived down",
            db.backend.name()
        );
        Migrator::up(conn, None).await.expect("up again");
        assert_entity_matches(&db, entity::resource_locks::Entity).await;
        let (session, _) = populated_session(&db, 1, 2).await;
        let report = db
            .manager
            .end_session(session)
            .await
            .expect("end after fresh");
        assert_eq!(report.locks_released, 2);
    })
    .await;
}
