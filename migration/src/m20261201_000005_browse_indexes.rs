//! Indexes for reading the store the way the dashboard and the change feed
//! do, at any size:
//! - a session's locks, newest grant first (`locks --session`, a session's
//!   page): (session_id, fencing_token);
//! - a filtered feed's or `audit tail --event`'s rows of some types in `seq`
//!   order: (event_type, seq).
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name("ix_resource_locks_session_token")
                    .table(ResourceLocks::Table)
                    .if_not_exists()
                    .col(ResourceLocks::SessionId)
                    .col(ResourceLocks::FencingToken)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_audit_log_type_seq")
                    .table(AuditLog::Table)
                    .if_not_exists()
                    .col(AuditLog::EventType)
                    .col(AuditLog::Seq)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("ix_audit_log_type_seq")
                    .table(AuditLog::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_index(
                Index::drop()
                    .name("ix_resource_locks_session_token")
                    .table(ResourceLocks::Table)
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum ResourceLocks {
    Table,
    SessionId,
    FencingToken,
}

#[derive(DeriveIden)]
enum AuditLog {
    Table,
    EventType,
    Seq,
}
