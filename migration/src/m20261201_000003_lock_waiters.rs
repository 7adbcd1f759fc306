//! The lock queue: agents waiting for a held resource, in arrival order.
//!
//! Invariants held by the database:
//! - an agent waits for at most one resource at a time (unique `agent_id`);
//! - arrival order is total: `ticket` is unique, drawn from the fencing
//!   counter in the transaction that queues the waiter;
//! - a waiter's session is its agent's session (composite foreign key);
//! - a waiter's deadline is not before its arrival.
use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

use crate::shared::{binary_collation, table_for, timestamp_col, UUID_TEXT_LEN};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        let collation = binary_collation(manager).await?;
        let ts = |col: LockWaiters| timestamp_col(backend, col.into_iden(), false);
        manager
            .create_table(
                table_for(backend, collation)
                    .table(LockWaiters::Table)
                    .col(string_len(LockWaiters::Id, UUID_TEXT_LEN).primary_key())
                    .col(big_integer_uniq(LockWaiters::Ticket))
                    .col(string_len_uniq(LockWaiters::AgentId, UUID_TEXT_LEN))
                    .col(string_len(LockWaiters::SessionId, UUID_TEXT_LEN))
                    .col(string_len(LockWaiters::ResourceType, 1024))
                    .col(string_len(LockWaiters::ResourceKey, 1024))
                    .col(ts(LockWaiters::Since))
                    .col(ts(LockWaiters::ExpiresAt))
                    .check(Expr::col(LockWaiters::ExpiresAt).gte(Expr::col(LockWaiters::Since)))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_lock_waiters_agent")
                            .from(
                                LockWaiters::Table,
                                (LockWaiters::SessionId, LockWaiters::AgentId),
                            )
                            .to(
                                AgentExecutions::Table,
                                (AgentExecutions::SessionId, AgentExecutions::Id),
                            )
                            .on_delete(ForeignKeyAction::Restrict)
                            .on_update(ForeignKeyAction::Restrict),
                    )
                    .to_owned(),
            )
            .await?;
        // A resource's queue, head first; InnoDB indexes at most 3072 bytes,
        // so MariaDB indexes a prefix of each name.
        let mut queue = Index::create();
        queue
            .name("ix_lock_waiters_queue")
            .table(LockWaiters::Table);
        if backend == DatabaseBackend::MySql {
            queue
                .col((LockWaiters::ResourceType, 191))
                .col((LockWaiters::ResourceKey, 191));
        } else {
            queue
                .col(LockWaiters::ResourceType)
                .col(LockWaiters::ResourceKey);
        }
        manager
            .create_index(queue.col(LockWaiters::Ticket).to_owned())
            .await?;
        // Ending or recovering a session removes its waiters.
        manager
            .create_index(
                Index::create()
                    .name("ix_lock_waiters_session")
                    .table(LockWaiters::Table)
                    .col(LockWaiters::SessionId)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(LockWaiters::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum LockWaiters {
    Table,
    Id,
    Ticket,
    AgentId,
    SessionId,
    ResourceType,
    ResourceKey,
    Since,
    ExpiresAt,
}

#[derive(DeriveIden)]
enum AgentExecutions {
    Table,
    Id,
    SessionId,
}
