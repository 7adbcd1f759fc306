//! Session ownership for crash recovery: which manager instance owns a
//! session, and when that instance last said it was alive.
use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        let heartbeat = if backend == DatabaseBackend::MySql {
            ColumnDef::new(GlobalSessions::LastHeartbeatAt)
                .custom(Alias::new("DATETIME(6)"))
                .null()
                .to_owned()
        } else {
            ColumnDef::new(GlobalSessions::LastHeartbeatAt)
                .timestamp_with_time_zone()
                .null()
                .to_owned()
        };
        // SQLite adds one column per ALTER TABLE.
        manager
            .alter_table(
                Table::alter()
                    .table(GlobalSessions::Table)
                    .add_column(
                        ColumnDef::new(GlobalSessions::OwnerInstance)
                            .string_len(36)
                            .null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(GlobalSessions::Table)
                    .add_column(heartbeat)
                    .to_owned(),
            )
            .await?;
        // Recovery looks for open sessions with an old heartbeat; listing goes
        // newest first, optionally by status.
        manager
            .create_index(
                Index::create()
                    .name("ix_global_sessions_status_heartbeat")
                    .table(GlobalSessions::Table)
                    .col(GlobalSessions::Status)
                    .col(GlobalSessions::LastHeartbeatAt)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_global_sessions_owner")
                    .table(GlobalSessions::Table)
                    .col(GlobalSessions::OwnerInstance)
                    .col(GlobalSessions::Status)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_global_sessions_started")
                    .table(GlobalSessions::Table)
                    .col(GlobalSessions::StartedAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for index in [
            "ix_global_sessions_started",
            "ix_global_sessions_owner",
            "ix_global_sessions_status_heartbeat",
        ] {
            manager
                .drop_index(
                    Index::drop()
                        .name(index)
                        .table(GlobalSessions::Table)
                        .to_owned(),
                )
                .await?;
        }
        for column in [
            GlobalSessions::LastHeartbeatAt,
            GlobalSessions::OwnerInstance,
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(GlobalSessions::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
enum GlobalSessions {
    Table,
    OwnerInstance,
    LastHeartbeatAt,
    StartedAt,
    Status,
}
