//! Schema migrations for `demiarch-sessions`.
//!
//! Run them with the standard SeaORM CLI (`cargo run -p demiarch-sessions-migration -- up`), or let
//! `SessionManager::connect` apply pending ones.
pub use sea_orm_migration::prelude::*;

mod m20261124_000001_core_schema;
mod m20261124_000002_session_ownership;
mod m20261201_000003_lock_waiters;
mod m20261201_000004_audit_seq;
mod m20261201_000005_browse_indexes;
mod m20261207_000006_retention;
mod m20261207_000007_dashboard;
mod m20261207_000008_lock_order;
mod shared;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261124_000001_core_schema::Migration),
            Box::new(m20261124_000002_session_ownership::Migration),
            Box::new(m20261201_000003_lock_waiters::Migration),
            Box::new(m20261201_000004_audit_seq::Migration),
            Box::new(m20261201_000005_browse_indexes::Migration),
            Box::new(m20261207_000006_retention::Migration),
            Box::new(m20261207_000007_dashboard::Migration),
            Box::new(m20261207_000008_lock_order::Migration),
        ]
    }
}
