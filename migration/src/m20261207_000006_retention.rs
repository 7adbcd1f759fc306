//! Retention: what lets the library prune ended sessions, clear old saved
//! contexts and compact the audit log.
//!
//! - `retention`, one row (`id = 1`): the audit log's compaction horizon
//!   `compacted_through` (every audit row at or below that `seq` may be
//!   gone), the lease of the prune under way (`pruner`, its id, and
//!   `pruner_until`), so that one prune works at a time across every
//!   instance of a store, and when the last prune finished;
//! - `global_sessions.context_cleared_at`: when a prune cleared the saved
//!   context (`context_data` is then NULL); a completed session has its
//!   context or says when it was cleared;
//! - `audit_log` loses its foreign key to `global_sessions`: an audit row
//!   outlives the session it describes. The one-`session_end`-per-session
//!   unique index stays;
//! - an index on (status, updated_at) finds the sessions that ended before
//!   a time (an ended session's `updated_at` is when it ended).
//!
//! Invariants held by the database (guards that only refuse):
//! - no audit row is ever updated;
//! - no audit row above `compacted_through` is deleted;
//! - `compacted_through` never goes down.
use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DatabaseBackend, Statement};

use crate::shared::{
    binary_collation, create_audit_guards, drop_audit_guards, ensure_first_row, table_for,
    timestamp_col, UUID_TEXT_LEN,
};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// The completed-session check before and after: a completed session keeps
/// its context, or says when a prune cleared it.
const CHECK_BEFORE: &str =
    "\"status\" <> 'completed' OR (\"completed_at\" IS NOT NULL AND \"context_data\" IS NOT NULL)";
const CHECK_AFTER: &str = "\"status\" <> 'completed' OR (\"completed_at\" IS NOT NULL AND (\"context_data\" IS NOT NULL OR \"context_cleared_at\" IS NOT NULL))";

/// The foreign key clause SQLite keeps in `audit_log`'s definition.
const SQLITE_AUDIT_FK: &str = ", FOREIGN KEY (\"session_id\") REFERENCES \"global_sessions\" (\"id\") ON DELETE RESTRICT ON UPDATE RESTRICT";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    /// In one transaction on SQLite too: its definitions are rewritten whole
    /// or not at all. (MariaDB commits each DDL statement anyway.)
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        let collation = binary_collation(manager).await?;
        manager
            .create_table(
                table_for(backend, collation)
                    .table(Retention::Table)
                    .if_not_exists()
                    .col(big_integer(Retention::Id).primary_key())
                    .col(big_integer(Retention::CompactedThrough).default(0))
                    .col(string_len_null(Retention::Pruner, UUID_TEXT_LEN))
                    .col(timestamp_col(
                        backend,
                        Retention::PrunerUntil.into_iden(),
                        true,
                    ))
                    .col(timestamp_col(
                        backend,
                        Retention::LastPruneAt.into_iden(),
                        true,
                    ))
                    .check(Expr::col(Retention::Id).eq(1))
                    .check(Expr::col(Retention::CompactedThrough).gte(0))
                    .to_owned(),
            )
            .await?;
        ensure_first_row(
            manager,
            Retention::Table.into_iden(),
            Retention::Id.into_iden(),
            Query::insert()
                .into_table(Retention::Table)
                .columns([Retention::Id, Retention::CompactedThrough])
                .values_panic([1.into(), 0i64.into()])
                .to_owned(),
        )
        .await?;
        if !manager
            .has_column("global_sessions", "context_cleared_at")
            .await?
        {
            manager
                .alter_table(
                    Table::alter()
                        .table(GlobalSessions::Table)
                        .add_column(timestamp_col(
                            backend,
                            GlobalSessions::ContextClearedAt.into_iden(),
                            true,
                        ))
                        .to_owned(),
                )
                .await?;
        }
        // Each step can run again after a failure part-way (MariaDB commits
        // each DDL statement).
        if !completed_check_allows_clearing(manager).await? {
            replace_completed_check(manager, CHECK_BEFORE, CHECK_AFTER).await?;
        }
        if audit_session_fk_exists(manager).await? {
            drop_audit_session_fk(manager).await?;
        }
        drop_audit_guards(manager).await?;
        drop_retention_guards(manager).await?;
        create_retention_guards(manager).await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_global_sessions_status_updated")
                    .table(GlobalSessions::Table)
                    .if_not_exists()
                    .col(GlobalSessions::Status)
                    .col(GlobalSessions::UpdatedAt)
                    .to_owned(),
            )
            .await
    }

    /// Refused by the database while a pruned session's audit rows remain
    /// (the foreign key comes back) or a cleared context does (the check).
    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // Refused before any change: MariaDB would keep the DDL done up to
        // a refusal.
        refuse_down_while_pruned(manager).await?;
        manager
            .drop_index(
                Index::drop()
                    .name("ix_global_sessions_status_updated")
                    .table(GlobalSessions::Table)
                    .to_owned(),
            )
            .await?;
        drop_retention_guards(manager).await?;
        create_audit_guards(manager).await?;
        restore_audit_session_fk(manager).await?;
        replace_completed_check(manager, CHECK_AFTER, CHECK_BEFORE).await?;
        manager
            .alter_table(
                Table::alter()
                    .table(GlobalSessions::Table)
                    .drop_column(GlobalSessions::ContextClearedAt)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_table(Table::drop().table(Retention::Table).to_owned())
            .await
    }
}

/// Refuses to roll back while a prune's work would break the old schema:
/// audit rows of deleted sessions (the foreign key), cleared contexts (the
/// check).
async fn refuse_down_while_pruned(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let db = manager.get_connection();
    let orphans = db
        .query_one(
            &Query::select()
                .expr(Expr::col((AuditLog::Table, AuditLog::SessionId)).count())
                .from(AuditLog::Table)
                .left_join(
                    GlobalSessions::Table,
                    Expr::col((GlobalSessions::Table, GlobalSessions::Id))
                        .equals((AuditLog::Table, AuditLog::SessionId)),
                )
                .and_where(Expr::col((AuditLog::Table, AuditLog::SessionId)).is_not_null())
                .and_where(Expr::col((GlobalSessions::Table, GlobalSessions::Id)).is_null())
                .to_owned(),
        )
        .await?
        .map(|row| row.try_get_by_index::<i64>(0))
        .transpose()?
        .unwrap_or(0);
    let cleared = db
        .query_one(
            &Query::select()
                .expr(Expr::col(GlobalSessions::ContextClearedAt).count())
                .from(GlobalSessions::Table)
                .and_where(Expr::col(GlobalSessions::ContextClearedAt).is_not_null())
                .to_owned(),
        )
        .await?
        .map(|row| row.try_get_by_index::<i64>(0))
        .transpose()?
        .unwrap_or(0);
    if orphans > 0 || cleared > 0 {
        return Err(DbErr::Migration(format!(
            "cannot roll back retention: {orphans} audit rows name pruned sessions and \
             {cleared} sessions had their context cleared"
        )));
    }
    Ok(())
}

/// Whether the completed-session check already allows a cleared context.
async fn completed_check_allows_clearing(manager: &SchemaManager<'_>) -> Result<bool, DbErr> {
    let sql = match manager.get_database_backend() {
        DatabaseBackend::Postgres => {
            "SELECT count(*) AS n FROM pg_constraint \
             WHERE conrelid = 'global_sessions'::regclass AND contype = 'c' \
             AND pg_get_constraintdef(oid) LIKE '%context_cleared_at%'"
        }
        DatabaseBackend::MySql => {
            "SELECT count(*) AS n FROM information_schema.CHECK_CONSTRAINTS \
             WHERE CONSTRAINT_SCHEMA = DATABASE() AND TABLE_NAME = 'global_sessions' \
             AND CHECK_CLAUSE LIKE '%context_cleared_at%'"
        }
        _ => {
            "SELECT count(*) AS n FROM sqlite_schema \
             WHERE type = 'table' AND name = 'global_sessions' \
             AND sql LIKE '%context_cleared_at\" IS NOT NULL%'"
        }
    };
    count(manager, sql).await.map(|n| n > 0)
}

/// Whether `audit_log` still has its foreign key to `global_sessions`.
async fn audit_session_fk_exists(manager: &SchemaManager<'_>) -> Result<bool, DbErr> {
    let sql = match manager.get_database_backend() {
        DatabaseBackend::Postgres => {
            "SELECT count(*) AS n FROM pg_constraint \
             WHERE conrelid = 'audit_log'::regclass AND conname = 'fk_audit_log_session'"
        }
        DatabaseBackend::MySql => {
            "SELECT count(*) AS n FROM information_schema.TABLE_CONSTRAINTS \
             WHERE CONSTRAINT_SCHEMA = DATABASE() AND TABLE_NAME = 'audit_log' \
             AND CONSTRAINT_NAME = 'fk_audit_log_session'"
        }
        _ => "SELECT count(*) AS n FROM pragma_foreign_key_list('audit_log')",
    };
    count(manager, sql).await.map(|n| n > 0)
}

/// The `n` of a `SELECT count(*) AS n` (catalog queries: raw SQL, as
/// sea-query has no catalog tables).
async fn count(manager: &SchemaManager<'_>, sql: &str) -> Result<i64, DbErr> {
    let backend = manager.get_database_backend();
    let row = manager
        .get_connection()
        .query_one_raw(Statement::from_string(backend, sql))
        .await?;
    match row {
        Some(row) => row.try_get("", "n"),
        None => Ok(0),
    }
}

/// Swaps the completed-session check of `global_sessions` for another.
async fn replace_completed_check(
    manager: &SchemaManager<'_>,
    from: &str,
    to: &str,
) -> Result<(), DbErr> {
    let db = manager.get_connection();
    match manager.get_database_backend() {
        DatabaseBackend::Postgres => {
            // Raw DDL: sea-query cannot drop or add a check constraint.
            let name = existing_check(
                manager,
                "SELECT conname::text AS name FROM pg_constraint \
                 WHERE conrelid = 'global_sessions'::regclass AND contype = 'c' \
                 AND pg_get_constraintdef(oid) LIKE '%completed_at%'",
            )
            .await?;
            db.execute_unprepared(&format!(
                "ALTER TABLE global_sessions DROP CONSTRAINT \"{name}\", \
                 ADD CONSTRAINT ck_global_sessions_completed CHECK ({to})"
            ))
            .await?;
        }
        DatabaseBackend::MySql => {
            // Raw DDL: sea-query cannot drop or add a check constraint.
            let name = existing_check(
                manager,
                "SELECT CAST(CONSTRAINT_NAME AS CHAR) AS name \
                 FROM information_schema.CHECK_CONSTRAINTS \
                 WHERE CONSTRAINT_SCHEMA = DATABASE() AND TABLE_NAME = 'global_sessions' \
                 AND CHECK_CLAUSE LIKE '%completed_at%'",
            )
            .await?;
            let to = to.replace('"', "`");
            db.execute_unprepared(&format!(
                "ALTER TABLE global_sessions DROP CONSTRAINT `{name}`, \
                 ADD CONSTRAINT ck_global_sessions_completed CHECK ({to})"
            ))
            .await?;
        }
        _ => {
            rewrite_sqlite_table(manager, "global_sessions", from, to).await?;
        }
    }
    Ok(())
}

/// The name of the one constraint `sql` finds.
async fn existing_check(manager: &SchemaManager<'_>, sql: &str) -> Result<String, DbErr> {
    let backend = manager.get_database_backend();
    let row = manager
        .get_connection()
        .query_one_raw(Statement::from_string(backend, sql))
        .await?
        .ok_or_else(|| {
            DbErr::Migration("global_sessions has no check on completed_at to replace".into())
        })?;
    row.try_get("", "name")
}

async fn drop_audit_session_fk(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    match manager.get_database_backend() {
        DatabaseBackend::Sqlite => {
            rewrite_sqlite_table(manager, "audit_log", SQLITE_AUDIT_FK, "").await
        }
        _ => {
            manager
                .drop_foreign_key(
                    ForeignKey::drop()
                        .name("fk_audit_log_session")
                        .table(AuditLog::Table)
                        .to_owned(),
                )
                .await
        }
    }
}

async fn restore_audit_session_fk(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    match manager.get_database_backend() {
        DatabaseBackend::Sqlite => {
            // The clause goes back after the last column definition.
            let with_fk = format!("\"details\" jsonb_text NOT NULL{SQLITE_AUDIT_FK}");
            rewrite_sqlite_table(
                manager,
                "audit_log",
                "\"details\" jsonb_text NOT NULL",
                &with_fk,
            )
            .await?;
            // SQLite checks a foreign key it was given this way only on later
            // writes: refuse here what the other backends refuse.
            let orphans = manager
                .get_connection()
                .query_all_raw(Statement::from_string(
                    DatabaseBackend::Sqlite,
                    "PRAGMA foreign_key_check(audit_log)",
                ))
                .await?;
            if !orphans.is_empty() {
                return Err(DbErr::Migration(format!(
                    "{} audit rows name pruned sessions; the foreign key cannot come back",
                    orphans.len()
                )));
            }
            Ok(())
        }
        _ => {
            manager
                .create_foreign_key(
                    ForeignKey::create()
                        .name("fk_audit_log_session")
                        .from(AuditLog::Table, AuditLog::SessionId)
                        .to(GlobalSessions::Table, GlobalSessions::Id)
                        .on_delete(ForeignKeyAction::Restrict)
                        .on_update(ForeignKeyAction::Restrict)
                        .to_owned(),
                )
                .await
        }
    }
}

/// Rewrites a SQLite table's definition in place, replacing `from` by `to`
/// in its `CREATE TABLE` text: SQLite's documented way to drop a foreign key
/// or loosen a check without copying the table (raw SQL: sea-query has no
/// such DDL, and a copy of `global_sessions` would break the foreign keys
/// that point at it). Only changes every existing row satisfies are made
/// this way; a text that is not found fails the migration.
async fn rewrite_sqlite_table(
    manager: &SchemaManager<'_>,
    table: &str,
    from: &str,
    to: &str,
) -> Result<(), DbErr> {
    let db = manager.get_connection();
    let sql: String = db
        .query_one_raw(Statement::from_sql_and_values(
            DatabaseBackend::Sqlite,
            "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = ?",
            [table.into()],
        ))
        .await?
        .ok_or_else(|| DbErr::Migration(format!("no table {table}")))?
        .try_get("", "sql")?;
    if !sql.contains(from) {
        return Err(DbErr::Migration(format!(
            "the definition of {table} does not contain {from:?}: {sql}"
        )));
    }
    let rewritten = sql.replacen(from, to, 1);
    let version: i64 = db
        .query_one_raw(Statement::from_string(
            DatabaseBackend::Sqlite,
            "PRAGMA schema_version",
        ))
        .await?
        .ok_or_else(|| DbErr::Migration("no schema_version".into()))?
        .try_get_by_index(0)?;
    db.execute_unprepared("PRAGMA writable_schema = ON").await?;
    let updated = db
        .execute_raw(Statement::from_sql_and_values(
            DatabaseBackend::Sqlite,
            "UPDATE sqlite_schema SET sql = ? WHERE type = 'table' AND name = ?",
            [rewritten.into(), table.into()],
        ))
        .await;
    // Every connection rereads the schema once the version moves.
    let bumped = db
        .execute_unprepared(&format!("PRAGMA schema_version = {}", version + 1))
        .await;
    db.execute_unprepared("PRAGMA writable_schema = OFF")
        .await?;
    updated?;
    bumped?;
    let check = db
        .query_one_raw(Statement::from_string(
            DatabaseBackend::Sqlite,
            format!("PRAGMA integrity_check({table})"),
        ))
        .await?
        .map(|row| row.try_get_by_index::<String>(0))
        .transpose()?;
    match check.as_deref() {
        Some("ok") => Ok(()),
        other => Err(DbErr::Migration(format!(
            "rewriting {table} left the database failing its integrity check: {other:?}"
        ))),
    }
}

/// The guards of compaction, which only refuse: audit rows are never
/// updated, and deleted only at or below the horizon; the horizon never
/// goes down (raw DDL: sea-query cannot create triggers).
async fn create_retention_guards(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let db = manager.get_connection();
    let statements: Vec<&str> = match manager.get_database_backend() {
        DatabaseBackend::Postgres => vec![
            "CREATE FUNCTION audit_log_guard() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
               IF TG_OP = 'UPDATE' THEN RAISE EXCEPTION 'audit_log is append-only'; END IF; \
               IF OLD.seq > COALESCE((SELECT compacted_through FROM retention WHERE id = 1), 0) THEN \
                 RAISE EXCEPTION 'audit row % is above the compaction horizon', OLD.seq; \
               END IF; \
               RETURN OLD; END $$",
            "CREATE TRIGGER audit_log_guard BEFORE UPDATE OR DELETE ON audit_log \
             FOR EACH ROW EXECUTE FUNCTION audit_log_guard()",
            "CREATE FUNCTION retention_horizon_guard() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
               IF TG_OP = 'DELETE' THEN RAISE EXCEPTION 'the retention row stays'; END IF; \
               IF NEW.compacted_through < OLD.compacted_through THEN \
                 RAISE EXCEPTION 'the compaction horizon never goes down'; \
               END IF; \
               RETURN NEW; END $$",
            "CREATE TRIGGER retention_horizon_guard BEFORE UPDATE OR DELETE ON retention \
             FOR EACH ROW EXECUTE FUNCTION retention_horizon_guard()",
        ],
        DatabaseBackend::MySql => vec![
            "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log FOR EACH ROW \
             SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'audit_log is append-only'",
            "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log FOR EACH ROW \
             IF OLD.seq > COALESCE((SELECT compacted_through FROM retention WHERE id = 1), 0) THEN \
               SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'audit row is above the compaction horizon'; \
             END IF",
            "CREATE TRIGGER retention_horizon_guard BEFORE UPDATE ON retention FOR EACH ROW \
             IF NEW.compacted_through < OLD.compacted_through THEN \
               SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'the compaction horizon never goes down'; \
             END IF",
            "CREATE TRIGGER retention_row_stays BEFORE DELETE ON retention FOR EACH ROW \
             SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'the retention row stays'",
        ],
        _ => vec![
            "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log \
             BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
            "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log \
             WHEN OLD.seq > COALESCE((SELECT compacted_through FROM retention WHERE id = 1), 0) \
             BEGIN SELECT RAISE(ABORT, 'audit row is above the compaction horizon'); END",
            "CREATE TRIGGER retention_horizon_guard BEFORE UPDATE ON retention \
             WHEN NEW.compacted_through < OLD.compacted_through \
             BEGIN SELECT RAISE(ABORT, 'the compaction horizon never goes down'); END",
            "CREATE TRIGGER retention_row_stays BEFORE DELETE ON retention \
             BEGIN SELECT RAISE(ABORT, 'the retention row stays'); END",
        ],
    };
    for sql in statements {
        db.execute_unprepared(sql).await?;
    }
    Ok(())
}

/// Drops [`create_retention_guards`]' triggers (raw DDL, as they were made).
async fn drop_retention_guards(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let db = manager.get_connection();
    let statements: &[&str] = match manager.get_database_backend() {
        DatabaseBackend::Postgres => &[
            "DROP TRIGGER IF EXISTS audit_log_guard ON audit_log",
            "DROP FUNCTION IF EXISTS audit_log_guard()",
            "DROP TRIGGER IF EXISTS retention_horizon_guard ON retention",
            "DROP FUNCTION IF EXISTS retention_horizon_guard()",
        ],
        _ => &[
            "DROP TRIGGER IF EXISTS audit_log_no_update",
            "DROP TRIGGER IF EXISTS audit_log_no_delete",
            "DROP TRIGGER IF EXISTS retention_horizon_guard",
            "DROP TRIGGER IF EXISTS retention_row_stays",
        ],
    };
    for sql in statements {
        db.execute_unprepared(sql).await?;
    }
    Ok(())
}

#[derive(DeriveIden)]
enum Retention {
    Table,
    Id,
    CompactedThrough,
    Pruner,
    PrunerUntil,
    LastPruneAt,
}

#[derive(Clone, Copy, DeriveIden)]
enum GlobalSessions {
    Table,
    Id,
    Status,
    UpdatedAt,
    ContextClearedAt,
}

#[derive(Clone, Copy, DeriveIden)]
enum AuditLog {
    Table,
    SessionId,
}
