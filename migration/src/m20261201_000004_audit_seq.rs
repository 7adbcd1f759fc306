//! The audit log's cursor: every row gets `seq`, its primary key, assigned by
//! the database (SQLite `AUTOINCREMENT`, a PostgreSQL identity, MariaDB
//! `AUTO_INCREMENT`); the UUID `id` stays, unique. Existing rows are numbered
//! from 1 in (`event_time`, `id`) order.
//!
//! `audit_head` is one row that every audit append locks (`FOR UPDATE`)
//! just before it inserts, as its transaction's last statements, so the
//! servers hand out `seq` in commit order (see the library's `watch` module).
//!
//! Invariants held by the database:
//! - `seq` is unique and never reused;
//! - `audit_head` has exactly the row `id = 1`;
//! - audit rows cannot be updated or deleted (the triggers, dropped for the
//!   backfill and created again whether it succeeds or not).
use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

use crate::shared::{
    binary_collation, create_audit_guards, create_session_end_index, drop_audit_guards,
    ensure_first_row, table_for, timestamp_col, UUID_TEXT_LEN,
};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    /// In one transaction on SQLite too: the rebuild of `audit_log` happens
    /// whole or not at all, on one connection. (MariaDB commits each DDL
    /// statement anyway.)
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // The backfill rewrites rows the guards refuse to change. They come
        // back whatever happens: MariaDB, which commits each DDL statement,
        // must not be left with an audit log open to UPDATE and DELETE.
        drop_audit_guards(manager).await?;
        let added = add_seq(manager).await;
        let guarded = create_audit_guards(manager).await;
        added?;
        guarded?;
        let backend = manager.get_database_backend();
        let collation = binary_collation(manager).await?;
        manager
            .create_table(
                table_for(backend, collation)
                    .table(AuditHead::Table)
                    .if_not_exists()
                    .col(big_integer(AuditHead::Id).primary_key())
                    .check(Expr::col(AuditHead::Id).eq(1))
                    .to_owned(),
            )
            .await?;
        ensure_first_row(
            manager,
            AuditHead::Table.into_iden(),
            AuditHead::Id.into_iden(),
            Query::insert()
                .into_table(AuditHead::Table)
                .columns([AuditHead::Id])
                .values_panic([1.into()])
                .to_owned(),
        )
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        drop_audit_guards(manager).await?;
        let db = manager.get_connection();
        match manager.get_database_backend() {
            DatabaseBackend::Postgres => {
                // Raw DDL: sea-query has no primary key swaps.
                db.execute_unprepared(
                    "ALTER TABLE audit_log DROP CONSTRAINT audit_log_pkey, \
                     DROP CONSTRAINT ux_audit_log_id, ADD PRIMARY KEY (id), DROP COLUMN seq",
                )
                .await?;
            }
            DatabaseBackend::MySql => {
                // Raw DDL: sea-query has no primary key swaps.
                db.execute_unprepared(
                    "ALTER TABLE audit_log MODIFY seq BIGINT NOT NULL, DROP PRIMARY KEY, \
                     DROP INDEX ux_audit_log_id, ADD PRIMARY KEY (id)",
                )
                .await?;
                db.execute_unprepared("ALTER TABLE audit_log DROP COLUMN seq")
                    .await?;
            }
            _ => rebuild_sqlite(manager, false).await?,
        }
        create_audit_guards(manager).await?;
        manager
            .drop_table(Table::drop().table(AuditHead::Table).to_owned())
            .await
    }
}

/// Adds `seq` to `audit_log`, numbered in (event_time, id) order, as its
/// primary key, the database assigning it from then on.
async fn add_seq(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let backend = manager.get_database_backend();
    let db = manager.get_connection();
    match backend {
        DatabaseBackend::Postgres => {
            // Raw DDL and DML: sea-query has no identity columns, primary
            // key swaps or UPDATE … FROM a window function.
            for sql in [
                "ALTER TABLE audit_log ADD COLUMN seq BIGINT",
                "UPDATE audit_log SET seq = o.n FROM \
                 (SELECT id, row_number() OVER (ORDER BY event_time, id) AS n FROM audit_log) o \
                 WHERE audit_log.id = o.id",
                "ALTER TABLE audit_log ALTER COLUMN seq SET NOT NULL",
                "ALTER TABLE audit_log ALTER COLUMN seq ADD GENERATED ALWAYS AS IDENTITY",
                "SELECT setval(pg_get_serial_sequence('audit_log', 'seq'), \
                 (SELECT COALESCE(MAX(seq), 0) + 1 FROM audit_log), false)",
                "ALTER TABLE audit_log DROP CONSTRAINT audit_log_pkey, \
                 ADD PRIMARY KEY (seq), ADD CONSTRAINT ux_audit_log_id UNIQUE (id)",
            ] {
                db.execute_unprepared(sql).await?;
            }
        }
        DatabaseBackend::MySql => {
            // Raw DDL and DML: sea-query has no primary key swaps or
            // UPDATE … JOIN a window function. AUTO_INCREMENT goes on
            // after the highest backfilled seq. Each step can be run
            // again after a failure (MariaDB commits each DDL statement).
            for sql in [
                "ALTER TABLE audit_log ADD COLUMN IF NOT EXISTS seq BIGINT NULL FIRST",
                "UPDATE audit_log a JOIN \
                 (SELECT id, ROW_NUMBER() OVER (ORDER BY event_time, id) AS n FROM audit_log) o \
                 ON a.id = o.id SET a.seq = o.n",
                "ALTER TABLE audit_log DROP PRIMARY KEY, \
                 MODIFY seq BIGINT NOT NULL AUTO_INCREMENT, ADD PRIMARY KEY (seq), \
                 ADD UNIQUE INDEX IF NOT EXISTS ux_audit_log_id (id)",
            ] {
                db.execute_unprepared(sql).await?;
            }
        }
        _ => {
            // SQLite cannot change a primary key: the table is rebuilt,
            // its rows copied in (event_time, id) order.
            rebuild_sqlite(manager, true).await?;
        }
    }
    Ok(())
}

/// Rebuilds SQLite's `audit_log` with (`with_seq`) or without the `seq`
/// primary key, keeping its rows, foreign key and indexes.
async fn rebuild_sqlite(manager: &SchemaManager<'_>, with_seq: bool) -> Result<(), DbErr> {
    let backend = manager.get_database_backend();
    let ts = timestamp_col(backend, AuditLog::EventTime.into_iden(), false);
    let mut table = table_for(backend, "");
    table.table(AuditLogRebuilt::Table);
    if with_seq {
        table
            .col(big_pk_auto(AuditLog::Seq))
            .col(string_len_uniq(AuditLog::Id, UUID_TEXT_LEN));
    } else {
        table.col(string_len(AuditLog::Id, UUID_TEXT_LEN).primary_key());
    }
    table
        .col(string_len(AuditLog::EventType, 64))
        .col(ts)
        .col(string_len_null(AuditLog::SessionId, UUID_TEXT_LEN))
        .col(json_binary(AuditLog::Details))
        // Restrict, never cascade: deleting a session must not erase its history.
        .foreign_key(
            ForeignKey::create()
                .name("fk_audit_log_session")
                .from(AuditLogRebuilt::Table, AuditLog::SessionId)
                .to(GlobalSessions::Table, GlobalSessions::Id)
                .on_delete(ForeignKeyAction::Restrict)
                .on_update(ForeignKeyAction::Restrict),
        );
    manager.create_table(table.to_owned()).await?;
    let columns = [
        AuditLog::Id,
        AuditLog::EventType,
        AuditLog::EventTime,
        AuditLog::SessionId,
        AuditLog::Details,
    ];
    let mut copy = Query::insert();
    copy.into_table(AuditLogRebuilt::Table)
        .columns(columns)
        .select_from(
            Query::select()
                .columns(columns)
                .from(AuditLog::Table)
                .order_by(AuditLog::EventTime, Order::Asc)
                .order_by(AuditLog::Id, Order::Asc)
                .to_owned(),
        )
        .map_err(|e| DbErr::Migration(e.to_string()))?;
    manager.exec_stmt(copy.to_owned()).await?;
    manager
        .drop_table(Table::drop().table(AuditLog::Table).to_owned())
        .await?;
    manager
        .rename_table(
            Table::rename()
                .table(AuditLogRebuilt::Table, AuditLog::Table)
                .to_owned(),
        )
        .await?;
    for (name, columns) in [
        ("ix_audit_log_session", vec![AuditLog::SessionId]),
        (
            "ix_audit_log_event_time",
            vec![AuditLog::EventType, AuditLog::EventTime],
        ),
    ] {
        let mut index = Index::create();
        index.name(name).table(AuditLog::Table);
        for column in columns {
            index.col(column);
        }
        manager.create_index(index.to_owned()).await?;
    }
    create_session_end_index(manager).await
}

#[derive(DeriveIden)]
enum AuditHead {
    Table,
    Id,
}

#[derive(Clone, Copy, DeriveIden)]
enum AuditLog {
    Table,
    Seq,
    Id,
    EventType,
    EventTime,
    SessionId,
    Details,
}

#[derive(DeriveIden)]
enum AuditLogRebuilt {
    Table,
}

#[derive(DeriveIden)]
enum GlobalSessions {
    Table,
    Id,
}
