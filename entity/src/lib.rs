//! `SeaORM` entities for the `demiarch-sessions` schema, one file per table.
//!
//! These files follow `sea-orm-cli generate entity` output for the migrated
//! schema and carry no behaviour: the root crate owns it. The schema-drift
//! test (`tests/schema_drift.rs`) checks they agree with the migrations.
pub mod prelude;

pub mod agent_executions;
pub mod audit_log;
pub mod global_sessions;
pub mod lock_fencing;
pub mod resource_locks;
