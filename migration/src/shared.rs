//! Helpers the migrations share: column and table conventions, the audit
//! log's guards, the one-session-end index, and one-row tables.
//!
//! A migration that has been applied must keep doing what it did, so a
//! change here that alters what an applied migration creates is a bug: a
//! new convention gets a new helper.
use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DatabaseBackend, Statement};

/// UUIDs are kept as their 36-character hyphenated text so an operator can
/// read and query them by hand (SQLite would otherwise store 16-byte BLOBs).
pub(crate) const UUID_TEXT_LEN: u32 = 36;

/// The guards that keep `audit_log` append-only: triggers that only refuse
/// an update or a delete (raw DDL: sea-query cannot create triggers).
pub(crate) async fn create_audit_guards(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let db = manager.get_connection();
    match manager.get_database_backend() {
        DatabaseBackend::MySql => {
            for (name, op) in [("no_update", "UPDATE"), ("no_delete", "DELETE")] {
                db.execute_unprepared(&format!(
                    "CREATE TRIGGER audit_log_{name} BEFORE {op} ON audit_log FOR EACH ROW \
                     SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'audit_log is append-only'"
                ))
                .await?;
            }
        }
        DatabaseBackend::Postgres => {
            db.execute_unprepared(
                "CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'audit_log is append-only'; END $$",
            )
            .await?;
            db.execute_unprepared(
                "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log \
                 FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()",
            )
            .await?;
        }
        _ => {
            for (name, op) in [("no_update", "UPDATE"), ("no_delete", "DELETE")] {
                db.execute_unprepared(&format!(
                    "CREATE TRIGGER audit_log_{name} BEFORE {op} ON audit_log \
                     BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END"
                ))
                .await?;
            }
        }
    }
    Ok(())
}

/// Drops [`create_audit_guards`]' triggers (raw DDL: sea-query cannot drop
/// triggers or functions).
pub(crate) async fn drop_audit_guards(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let db = manager.get_connection();
    match manager.get_database_backend() {
        DatabaseBackend::Postgres => {
            db.execute_unprepared("DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log")
                .await?;
            db.execute_unprepared("DROP FUNCTION IF EXISTS audit_log_append_only()")
                .await?;
        }
        _ => {
            db.execute_unprepared("DROP TRIGGER IF EXISTS audit_log_no_update")
                .await?;
            db.execute_unprepared("DROP TRIGGER IF EXISTS audit_log_no_delete")
                .await?;
        }
    }
    Ok(())
}

/// Inserts `row` into a one-row table unless its row `id = 1` is there
/// already (a migration run again after a failure part-way).
pub(crate) async fn ensure_first_row(
    manager: &SchemaManager<'_>,
    table: DynIden,
    id: DynIden,
    row: InsertStatement,
) -> Result<(), DbErr> {
    let present = manager
        .get_connection()
        .query_one(
            &Query::select()
                .column(id.clone())
                .from(table)
                .and_where(Expr::col(id).eq(1))
                .to_owned(),
        )
        .await?;
    if present.is_none() {
        manager.exec_stmt(row).await?;
    }
    Ok(())
}

/// A `CREATE TABLE` with the backend's table options: on MySQL/MariaDB, a
/// binary collation so keys are matched byte for byte, as on the other backends.
pub(crate) fn table_for(backend: DatabaseBackend, collation: &str) -> TableCreateStatement {
    let mut table = Table::create();
    if backend == DatabaseBackend::MySql {
        table.character_set("utf8mb4").collate(collation);
    }
    table
}

/// A binary, NO PAD collation: `utf8mb4_bin` is PAD SPACE, so `=` would find
/// `"key"` when asked for `"key "`. MariaDB calls the no-pad one
/// `utf8mb4_nopad_bin`; MySQL 8's `utf8mb4_0900_bin` is already no-pad.
pub(crate) async fn binary_collation(manager: &SchemaManager<'_>) -> Result<&'static str, DbErr> {
    if manager.get_database_backend() != DatabaseBackend::MySql {
        return Ok("");
    }
    let version = manager
        .get_connection()
        .query_one_raw(Statement::from_string(
            DatabaseBackend::MySql,
            "SELECT VERSION()",
        ))
        .await?
        .map(|row| row.try_get_by_index::<String>(0))
        .transpose()?
        .unwrap_or_default();
    Ok(if version.contains("MariaDB") {
        "utf8mb4_nopad_bin"
    } else {
        "utf8mb4_0900_bin"
    })
}

/// Timestamps in UTC with microseconds: `timestamptz` on PostgreSQL, RFC 3339
/// text on SQLite, `DATETIME(6)` on MySQL/MariaDB (its `TIMESTAMP` stops in
/// 2038 and would keep whole seconds only).
pub(crate) fn timestamp_col(backend: DatabaseBackend, col: DynIden, nullable: bool) -> ColumnDef {
    let mut def = if backend == DatabaseBackend::MySql {
        ColumnDef::new(col)
            .custom(Alias::new("DATETIME(6)"))
            .to_owned()
    } else if nullable {
        timestamp_with_time_zone_null(col)
    } else {
        timestamp_with_time_zone(col)
    };
    if nullable {
        def.null();
    } else {
        def.not_null();
    }
    def
}

/// One session_end row per session, whatever races (PostgreSQL and SQLite:
/// a partial unique index).
pub(crate) async fn create_session_end_index(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    manager
        .create_index(
            Index::create()
                .name("ux_audit_log_session_end")
                .table(AuditLog::Table)
                .col(AuditLog::SessionId)
                .unique()
                .and_where(Expr::col(AuditLog::EventType).eq("session_end"))
                .to_owned(),
        )
        .await
}

#[derive(DeriveIden)]
enum AuditLog {
    Table,
    EventType,
    SessionId,
}
