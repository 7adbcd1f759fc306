//! Lock order per resource instead of store-wide:
//! - `lock_resources`: one row per resource ever asked for, keyed by a
//!   name-based UUID of (type, key). Every transaction that grants or queues
//!   on a resource first writes its row (`touched_at`), which serializes
//!   those transactions per resource on every instance; different resources
//!   do not wait for each other.
//! - PostgreSQL: `lock_fencing_seq`, the sequence fencing tokens and queue
//!   tickets are drawn from, started after the counter row's last token. A
//!   sequence hands out increasing values without a row lock held to commit;
//!   two grants of one resource draw in the order their resource row lets
//!   them, so a resource's tokens still only grow. SQLite (one writer at a
//!   time) and MariaDB/MySQL keep drawing from the `lock_fencing` row.
use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

use crate::shared::{binary_collation, table_for, timestamp_col, UUID_TEXT_LEN};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// sea-query has no `CREATE SEQUENCE`; created once, from the counter's
/// last token, so a run again after a failure part-way keeps what it drew.
const CREATE_SEQUENCE: &str = "DO $$ BEGIN
    IF to_regclass('lock_fencing_seq') IS NULL THEN
        CREATE SEQUENCE lock_fencing_seq AS BIGINT MINVALUE 1;
        PERFORM setval('lock_fencing_seq',
            COALESCE((SELECT last_token FROM lock_fencing WHERE id = 1), 0) + 1, false);
    END IF;
END $$";

/// Hands what the sequence drew back to the counter row, then drops it.
const DROP_SEQUENCE: &str = "DO $$ BEGIN
    IF to_regclass('lock_fencing_seq') IS NOT NULL THEN
        UPDATE lock_fencing SET last_token = GREATEST(last_token,
            (SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END
             FROM lock_fencing_seq))
        WHERE id = 1;
        DROP SEQUENCE lock_fencing_seq;
    END IF;
END $$";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        let collation = binary_collation(manager).await?;
        if !manager.has_table("lock_resources").await? {
            manager
                .create_table(
                    table_for(backend, collation)
                        .table(LockResources::Table)
                        .col(string_len(LockResources::Id, UUID_TEXT_LEN).primary_key())
                        .col(string_len(LockResources::ResourceType, 1024))
                        .col(string_len(LockResources::ResourceKey, 1024))
                        .col(timestamp_col(
                            backend,
                            LockResources::TouchedAt.into_iden(),
                            false,
                        ))
                        .to_owned(),
                )
                .await?;
        }
        if backend == DatabaseBackend::Postgres {
            manager
                .get_connection()
                .execute_unprepared(CREATE_SEQUENCE)
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DatabaseBackend::Postgres {
            manager
                .get_connection()
                .execute_unprepared(DROP_SEQUENCE)
                .await?;
        }
        manager
            .drop_table(Table::drop().table(LockResources::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum LockResources {
    Table,
    Id,
    ResourceType,
    ResourceKey,
    TouchedAt,
}
