//! PostgreSQL: the whole end of a session as one function, so that the end is
//! one statement, hence one round trip and its own transaction, instead of
//! `BEGIN`, UPDATE, INSERT and `COMMIT` (four round trips).
//!
//! `demiarch_end_session` does what the library's end does on the other
//! backends, in the same order: the conditional UPDATE that both checks and
//! ends the session (its row lock taken first; the status trigger of
//! migration 000003 releases the session's held locks and cancels its running
//! agents within it), then the `session_end` audit row, whose details get the
//! trigger's two counts. It returns those counts, or no row when the session
//! is unknown or already completed, in which case nothing was written. Any
//! error rolls the whole statement back.
//!
//! Its first act is to bound its own waits: `lock_timeout` becomes
//! `p_lock_timeout_ms` for its transaction, whatever the connection's own
//! setting (the library passes what is left of `Config::cleanup_timeout`), so
//! an end blocked on a row lock gives up on the server and rolls back.
//!
//! SQLite has no stored functions and MariaDB's end is already cheaper than
//! the seed's: this migration changes nothing there.
use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

const POSTGRES_FUNCTION: &str = "\
CREATE FUNCTION demiarch_end_session(
    p_audit_id text,
    p_event_time timestamptz,
    p_session_id text,
    p_details jsonb,
    p_context jsonb,
    p_lock_timeout_ms bigint
) RETURNS TABLE (locks_released bigint, agents_cancelled bigint)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('lock_timeout', greatest(p_lock_timeout_ms, 1) || 'ms', true);
    UPDATE global_sessions
       SET status = 'completed',
           updated_at = p_event_time,
           completed_at = p_event_time,
           context_data = p_context
     WHERE id = p_session_id AND status <> 'completed';
    IF NOT FOUND THEN
        RETURN;
    END IF;
    RETURN QUERY
    INSERT INTO audit_log (id, event_type, event_time, session_id, details)
    VALUES (p_audit_id, 'session_end', p_event_time, p_session_id,
            p_details || jsonb_build_object(
                'locks_released', CAST(current_setting('demiarch.locks_released') AS bigint),
                'agents_cancelled', CAST(current_setting('demiarch.agents_cancelled') AS bigint)))
    RETURNING CAST(details ->> 'locks_released' AS bigint),
              CAST(details ->> 'agents_cancelled' AS bigint);
END $$";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DatabaseBackend::Postgres {
            manager
                .get_connection()
                .execute_unprepared(POSTGRES_FUNCTION)
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DatabaseBackend::Postgres {
            manager
                .get_connection()
                .execute_unprepared(
                    "DROP FUNCTION IF EXISTS \
                     demiarch_end_session(text, timestamptz, text, jsonb, jsonb, bigint)",
                )
                .await?;
        }
        Ok(())
    }
}
