//! The core schema: sessions, agent executions, resource locks, the fencing
//! counter and the append-only audit log.
//!
//! Invariants held by the database, not by the library:
//! - at most one *held* lock per (resource_type, resource_key);
//! - at most one `session_end` audit row per session;
//! - a lock's session is its agent's session (composite foreign key);
//! - a completed session has `completed_at` and `context_data`;
//! - a released lock has both `released_at` and `release_reason`;
//! - status columns only take the documented values;
//! - on SQLite, audit rows cannot be updated or deleted (triggers).
use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DatabaseBackend};

use crate::shared::{
    binary_collation, create_audit_guards, create_session_end_index, drop_audit_guards, table_for,
    timestamp_col, UUID_TEXT_LEN,
};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        let collation = binary_collation(manager).await?;
        let table_for = |backend| table_for(backend, collation);
        let ts = |col| timestamp_col(backend, col, false);
        let ts_null = |col| timestamp_col(backend, col, true);
        manager
            .create_table(
                table_for(backend)
                    .table(GlobalSessions::Table)
                    .col(string_len(GlobalSessions::Id, UUID_TEXT_LEN).primary_key())
                    .col(string_len(GlobalSessions::Status, 16).check(
                        Expr::col(GlobalSessions::Status).is_in([
                            "active",
                            "paused",
                            "interrupted",
                            "completed",
                        ]),
                    ))
                    .col(ts(GlobalSessions::StartedAt.into_iden()))
                    .col(ts(GlobalSessions::UpdatedAt.into_iden()))
                    .col(ts_null(GlobalSessions::CompletedAt.into_iden()))
                    .col(json_binary_null(GlobalSessions::ContextData))
                    .check(
                        Expr::col(GlobalSessions::Status)
                            .ne("completed")
                            .or(Expr::col(GlobalSessions::CompletedAt)
                                .is_not_null()
                                .and(Expr::col(GlobalSessions::ContextData).is_not_null())),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                table_for(backend)
                    .table(AgentExecutions::Table)
                    .col(string_len(AgentExecutions::Id, UUID_TEXT_LEN).primary_key())
                    .col(string_len(AgentExecutions::SessionId, UUID_TEXT_LEN))
                    .col(string_len(AgentExecutions::AgentType, 1024))
                    .col(string_len(AgentExecutions::Status, 16).check(
                        Expr::col(AgentExecutions::Status).is_in([
                            "running",
                            "completed",
                            "failed",
                            "cancelled",
                        ]),
                    ))
                    .col(ts(AgentExecutions::StartedAt.into_iden()))
                    .col(ts_null(AgentExecutions::CompletedAt.into_iden()))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_agent_executions_session")
                            .from(AgentExecutions::Table, AgentExecutions::SessionId)
                            .to(GlobalSessions::Table, GlobalSessions::Id)
                            .on_delete(ForeignKeyAction::Restrict)
                            .on_update(ForeignKeyAction::Restrict),
                    )
                    .to_owned(),
            )
            .await?;
        // Target of the composite foreign key from resource_locks, and the
        // index that finds a session's agents.
        manager
            .create_index(
                Index::create()
                    .name("ux_agent_executions_session_id")
                    .table(AgentExecutions::Table)
                    .col(AgentExecutions::SessionId)
                    .col(AgentExecutions::Id)
                    .unique()
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                table_for(backend)
                    .table(ResourceLocks::Table)
                    .col(string_len(ResourceLocks::Id, UUID_TEXT_LEN).primary_key())
                    .col(string_len(ResourceLocks::AgentId, UUID_TEXT_LEN))
                    // Denormalised from the agent so that ending a session releases
                    // its locks through one index range, without a join. The
                    // composite foreign key below keeps it equal to the agent's.
                    .col(string_len(ResourceLocks::SessionId, UUID_TEXT_LEN))
                    .col(string_len(ResourceLocks::ResourceType, 1024))
                    .col(string_len(ResourceLocks::ResourceKey, 1024))
                    .col(big_integer_uniq(ResourceLocks::FencingToken))
                    .col(ts(ResourceLocks::AcquiredAt.into_iden()))
                    .col(ts_null(ResourceLocks::ExpiresAt.into_iden()))
                    .col(ts_null(ResourceLocks::ReleasedAt.into_iden()))
                    .col(string_len_null(ResourceLocks::ReleaseReason, 32))
                    .check(
                        Expr::col(ResourceLocks::ReleasedAt)
                            .is_null()
                            .and(Expr::col(ResourceLocks::ReleaseReason).is_null())
                            .or(Expr::col(ResourceLocks::ReleasedAt)
                                .is_not_null()
                                .and(Expr::col(ResourceLocks::ReleaseReason).is_not_null())),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_resource_locks_agent")
                            .from(
                                ResourceLocks::Table,
                                (ResourceLocks::SessionId, ResourceLocks::AgentId),
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
        manager
            .create_index(
                Index::create()
                    .name("ix_resource_locks_agent")
                    .table(ResourceLocks::Table)
                    .col(ResourceLocks::AgentId)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                table_for(backend)
                    .table(LockFencing::Table)
                    .col(big_integer(LockFencing::Id).primary_key())
                    .col(big_integer(LockFencing::LastToken))
                    .to_owned(),
            )
            .await?;
        manager
            .exec_stmt(
                Query::insert()
                    .into_table(LockFencing::Table)
                    .columns([LockFencing::Id, LockFencing::LastToken])
                    .values_panic([1.into(), 0i64.into()])
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                table_for(backend)
                    .table(AuditLog::Table)
                    .col(string_len(AuditLog::Id, UUID_TEXT_LEN).primary_key())
                    .col(string_len(AuditLog::EventType, 64))
                    .col(ts(AuditLog::EventTime.into_iden()))
                    .col(string_len_null(AuditLog::SessionId, UUID_TEXT_LEN))
                    .col(json_binary(AuditLog::Details))
                    // Restrict, never cascade: deleting a session must not erase
                    // its history.
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_audit_log_session")
                            .from(AuditLog::Table, AuditLog::SessionId)
                            .to(GlobalSessions::Table, GlobalSessions::Id)
                            .on_delete(ForeignKeyAction::Restrict)
                            .on_update(ForeignKeyAction::Restrict),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_audit_log_session")
                    .table(AuditLog::Table)
                    .col(AuditLog::SessionId)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_audit_log_event_time")
                    .table(AuditLog::Table)
                    .col(AuditLog::EventType)
                    .col(AuditLog::EventTime)
                    .to_owned(),
            )
            .await?;

        let db = manager.get_connection();
        match backend {
            DatabaseBackend::MySql => {
                // No partial indexes: a generated column that is non-NULL only
                // while the row qualifies carries the unique index (NULLs never
                // collide). Held locks are keyed by a hash of type and key, since
                // two 1024-character columns exceed InnoDB's index key limit.
                db.execute_unprepared(
                    "ALTER TABLE resource_locks \
                     ADD COLUMN held_lock_key BINARY(32) AS \
                       (IF(released_at IS NULL, UNHEX(SHA2(CONCAT(resource_type, CHAR(0), resource_key), 256)), NULL)) STORED, \
                     ADD UNIQUE INDEX ux_resource_locks_held (held_lock_key), \
                     ADD INDEX ix_resource_locks_session_held (session_id, released_at), \
                     ADD INDEX ix_resource_locks_expiry_held (released_at, expires_at), \
                     ADD INDEX ix_resource_locks_resource (resource_type(191), resource_key(191))",
                )
                .await?;
                db.execute_unprepared(
                    "ALTER TABLE audit_log \
                     ADD COLUMN session_end_key VARCHAR(36) AS \
                       (IF(event_type = 'session_end', session_id, NULL)) STORED, \
                     ADD UNIQUE INDEX ux_audit_log_session_end (session_end_key)",
                )
                .await?;
            }
            _ => create_partial_indexes(manager).await?,
        }
        create_audit_guards(manager).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        drop_audit_guards(manager).await?;
        for table in [
            AuditLog::Table.into_iden(),
            LockFencing::Table.into_iden(),
            ResourceLocks::Table.into_iden(),
            AgentExecutions::Table.into_iden(),
            GlobalSessions::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}

/// Partial indexes (SQLite, PostgreSQL): uniqueness over held locks only, since
/// `UNIQUE(type, key, released_at)` would let NULLs through as distinct.
async fn create_partial_indexes(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    manager
        .create_index(
            Index::create()
                .name("ux_resource_locks_held")
                .table(ResourceLocks::Table)
                .col(ResourceLocks::ResourceType)
                .col(ResourceLocks::ResourceKey)
                .unique()
                .and_where(Expr::col(ResourceLocks::ReleasedAt).is_null())
                .to_owned(),
        )
        .await?;
    // Ending a session walks exactly its held locks.
    manager
        .create_index(
            Index::create()
                .name("ix_resource_locks_session_held")
                .table(ResourceLocks::Table)
                .col(ResourceLocks::SessionId)
                .and_where(Expr::col(ResourceLocks::ReleasedAt).is_null())
                .to_owned(),
        )
        .await?;
    // Expiry sweeps look only at held locks that carry a time to live.
    manager
        .create_index(
            Index::create()
                .name("ix_resource_locks_expiry_held")
                .table(ResourceLocks::Table)
                .col(ResourceLocks::ExpiresAt)
                .and_where(
                    Expr::col(ResourceLocks::ReleasedAt)
                        .is_null()
                        .and(Expr::col(ResourceLocks::ExpiresAt).is_not_null()),
                )
                .to_owned(),
        )
        .await?;
    // The lock-delay check looks up a resource's recent involuntary releases;
    // releases for other reasons never enter this index, so ending a session
    // does not maintain it.
    manager
        .create_index(
            Index::create()
                .name("ix_resource_locks_involuntary")
                .table(ResourceLocks::Table)
                .col(ResourceLocks::ResourceType)
                .col(ResourceLocks::ResourceKey)
                .col(ResourceLocks::ReleasedAt)
                .and_where(Expr::col(ResourceLocks::ReleaseReason).is_in(["expired", "orphaned"]))
                .to_owned(),
        )
        .await?;
    create_session_end_index(manager).await
}

#[derive(DeriveIden)]
enum GlobalSessions {
    Table,
    Id,
    Status,
    StartedAt,
    UpdatedAt,
    CompletedAt,
    ContextData,
}

#[derive(DeriveIden)]
enum AgentExecutions {
    Table,
    Id,
    SessionId,
    AgentType,
    Status,
    StartedAt,
    CompletedAt,
}

#[derive(DeriveIden)]
enum ResourceLocks {
    Table,
    Id,
    AgentId,
    SessionId,
    ResourceType,
    ResourceKey,
    FencingToken,
    AcquiredAt,
    ExpiresAt,
    ReleasedAt,
    ReleaseReason,
}

#[derive(DeriveIden)]
enum LockFencing {
    Table,
    Id,
    LastToken,
}

#[derive(DeriveIden)]
enum AuditLog {
    Table,
    Id,
    EventType,
    EventTime,
    SessionId,
    Details,
}
