//! A session that ends (`completed`) or is `interrupted` releases its held
//! locks and cancels its running agents in the database itself: a trigger on
//! the session's status. No lock outlives its session and no agent keeps
//! running in one, whoever changes the status (the library, recovery, an
//! operator's hand-written UPDATE), and the end needs no statement of its own
//! for either.
//!
//! - Locks are released with reason `session_end` (completed) or `orphaned`
//!   (interrupted), at the session's `completed_at` (else `updated_at`), the
//!   time the library bound for the end.
//! - The trigger tells the end how many rows it changed, for the report and
//!   the audit row: PostgreSQL in the transaction-local settings
//!   `demiarch.locks_released` / `demiarch.agents_cancelled`, MariaDB in the
//!   session variables `@demiarch_locks_released` / `@demiarch_agents_cancelled`.
//!   SQLite has neither; there the library counts the held locks and running
//!   agents itself in the same write transaction (the end in its audit INSERT,
//!   just before the UPDATE; recovery in the `RETURNING` clause of its UPDATE,
//!   computed before AFTER triggers run). One writer at a time, so nothing can
//!   change between the count and the trigger.
use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

const SQLITE_TRIGGER: &str = "\
CREATE TRIGGER global_sessions_release_on_end
AFTER UPDATE OF status ON global_sessions
WHEN NEW.status IN ('completed', 'interrupted') AND NEW.status IS NOT OLD.status
BEGIN
    UPDATE resource_locks
       SET released_at = COALESCE(NEW.completed_at, NEW.updated_at),
           release_reason = CASE NEW.status WHEN 'completed' THEN 'session_end' ELSE 'orphaned' END
     WHERE session_id = NEW.id AND released_at IS NULL;
    UPDATE agent_executions
       SET status = 'cancelled', completed_at = COALESCE(NEW.completed_at, NEW.updated_at)
     WHERE session_id = NEW.id AND status = 'running';
END";

const POSTGRES_FUNCTION: &str = "\
CREATE FUNCTION global_sessions_release_on_end() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ended_at timestamptz := COALESCE(NEW.completed_at, NEW.updated_at);
    locks bigint;
    agents bigint;
BEGIN
    UPDATE resource_locks
       SET released_at = ended_at,
           release_reason = CASE NEW.status WHEN 'completed' THEN 'session_end' ELSE 'orphaned' END
     WHERE session_id = NEW.id AND released_at IS NULL;
    GET DIAGNOSTICS locks = ROW_COUNT;
    UPDATE agent_executions
       SET status = 'cancelled', completed_at = ended_at
     WHERE session_id = NEW.id AND status = 'running';
    GET DIAGNOSTICS agents = ROW_COUNT;
    PERFORM set_config('demiarch.locks_released', locks::text, true),
            set_config('demiarch.agents_cancelled', agents::text, true);
    RETURN NULL;
END $$";

const POSTGRES_TRIGGER: &str = "\
CREATE TRIGGER global_sessions_release_on_end
AFTER UPDATE OF status ON global_sessions
FOR EACH ROW
WHEN (NEW.status IN ('completed', 'interrupted') AND NEW.status IS DISTINCT FROM OLD.status)
EXECUTE FUNCTION global_sessions_release_on_end()";

const MYSQL_TRIGGER: &str = "\
CREATE TRIGGER global_sessions_release_on_end
AFTER UPDATE ON global_sessions
FOR EACH ROW
BEGIN
    IF NEW.status IN ('completed', 'interrupted') AND NOT (NEW.status <=> OLD.status) THEN
        UPDATE resource_locks
           SET released_at = COALESCE(NEW.completed_at, NEW.updated_at),
               release_reason = IF(NEW.status = 'completed', 'session_end', 'orphaned')
         WHERE session_id = NEW.id AND released_at IS NULL;
        SET @demiarch_locks_released = ROW_COUNT();
        UPDATE agent_executions
           SET status = 'cancelled', completed_at = COALESCE(NEW.completed_at, NEW.updated_at)
         WHERE session_id = NEW.id AND status = 'running';
        SET @demiarch_agents_cancelled = ROW_COUNT();
    END IF;
END";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        match manager.get_database_backend() {
            DatabaseBackend::Postgres => {
                db.execute_unprepared(POSTGRES_FUNCTION).await?;
                db.execute_unprepared(POSTGRES_TRIGGER).await?;
            }
            DatabaseBackend::MySql => {
                db.execute_unprepared(MYSQL_TRIGGER).await?;
            }
            _ => {
                db.execute_unprepared(SQLITE_TRIGGER).await?;
            }
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        match manager.get_database_backend() {
            DatabaseBackend::Postgres => {
                db.execute_unprepared(
                    "DROP TRIGGER IF EXISTS global_sessions_release_on_end ON global_sessions",
                )
                .await?;
                db.execute_unprepared("DROP FUNCTION IF EXISTS global_sessions_release_on_end()")
                    .await?;
            }
            _ => {
                db.execute_unprepared("DROP TRIGGER IF EXISTS global_sessions_release_on_end")
                    .await?;
            }
        }
        Ok(())
    }
}
