//! What the dashboard reads at any store size:
//! - `resource_locks.waited_since`: when the holder joined the resource's
//!   queue, for a lock granted after a wait (NULL for one taken at once);
//!   the lock-wait chart counts these;
//! - sessions newest first, by status or not, paged by cursor:
//!   (started_at, id) and (status, started_at, id);
//! - sessions with an agent of a type: agent_executions (agent_type);
//! - locks waited for in the last hour: resource_locks (waited_since).
use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

use crate::shared::timestamp_col;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// (name, table, columns).
const INDEXES: [(&str, &str, &[&str]); 4] = [
    (
        "ix_global_sessions_started_id",
        "global_sessions",
        &["started_at", "id"],
    ),
    (
        "ix_global_sessions_status_started",
        "global_sessions",
        &["status", "started_at", "id"],
    ),
    (
        "ix_agent_executions_type",
        "agent_executions",
        &["agent_type"],
    ),
    (
        "ix_resource_locks_waited",
        "resource_locks",
        &["waited_since"],
    ),
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        // Each step can run again after a failure part-way (MariaDB commits
        // each DDL statement).
        if !manager.has_column("resource_locks", "waited_since").await? {
            manager
                .alter_table(
                    Table::alter()
                        .table(ResourceLocks::Table)
                        .add_column(timestamp_col(
                            backend,
                            ResourceLocks::WaitedSince.into_iden(),
                            true,
                        ))
                        .to_owned(),
                )
                .await?;
        }
        for (name, table, columns) in INDEXES {
            if manager.has_index(table, name).await? {
                continue;
            }
            let mut index = Index::create();
            index.name(name).table(Alias::new(table));
            for column in columns {
                match (backend, *column) {
                    // InnoDB keys are at most 3072 bytes: agent_type is
                    // VARCHAR(1024) of 4-byte characters, so its first 255.
                    (DatabaseBackend::MySql, "agent_type") => {
                        index.col((Alias::new(*column), 255));
                    }
                    _ => {
                        index.col(Alias::new(*column));
                    }
                }
            }
            manager.create_index(index.to_owned()).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for (name, table, _) in INDEXES.iter().rev() {
            manager
                .drop_index(
                    Index::drop()
                        .name(*name)
                        .table(Alias::new(*table))
                        .to_owned(),
                )
                .await?;
        }
        manager
            .alter_table(
                Table::alter()
                    .table(ResourceLocks::Table)
                    .drop_column(ResourceLocks::WaitedSince)
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum ResourceLocks {
    Table,
    WaitedSince,
}
