//! Ending a session with cleanup: story 6.5, top to bottom in the order it lists.
//!
//! 1. Serialize the session's context windows (before any transaction opens,
//!    so the write lock is never held while user data is serialized).
//! 2. In one transaction, bounded by `Config::cleanup_timeout`:
//!    a. mark the session `completed` with `completed_at` and `context_data`
//!    — one conditional UPDATE that both checks and changes it; in that same
//!    statement the status trigger (migration 000003) releases every held
//!    lock of the session (reason `session_end`) and cancels its running
//!    agents;
//!    b. append the `session_end` audit row with what was released.
//! 3. Commit, then drop the session's live windows from the registry.
//!
//! Per backend:
//! - SQLite: `BEGIN IMMEDIATE`; one call carrying b's INSERT (which counts
//!   what is about to be released, and inserts nothing when the session is
//!   already completed) then a's UPDATE, as one text; `COMMIT`. One writer at
//!   a time, so the order does not matter to what is counted.
//! - PostgreSQL: a then b inside one function, `demiarch_end_session`
//!   (migration 000004), called as one statement in its own transaction.
//! - MariaDB: `BEGIN`; a; a read of the trigger's counts; b; `COMMIT`.
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sea_orm::entity::prelude::TextUuid;
use sea_orm::sea_query::{Expr, Func, Query, QueryStatementBuilder};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DatabaseBackend, DatabaseTransaction, EntityTrait,
    QueryFilter, QuerySelect, QueryTrait, Statement, UpdateMany,
};
use serde::Serialize;
use tracing::{field, info_span, warn, Instrument};
use uuid::Uuid;

use entity::{agent_executions, audit_log, global_sessions, resource_locks};

use crate::audit::{self, AuditEvent};
use crate::context::SavedContext;
use crate::status::{AgentStatus, SessionStatus};
use crate::{db, validate, Error, Result, SessionManager};

/// What `end_session` did.
#[derive(Clone, Debug, Serialize)]
pub struct EndSessionReport {
    pub session_id: Uuid,
    /// When the session was ended (the first end's time if `already_ended`).
    pub completed_at: DateTime<Utc>,
    /// The session was already completed: nothing was written.
    pub already_ended: bool,
    pub locks_released: u64,
    pub agents_cancelled: u64,
    pub context_windows: u64,
    pub context_bytes: u64,
    /// Wall time of the whole call, commit included.
    pub cleanup_ms: u64,
}

/// What the transaction changed; the report adds the timing.
struct Cleanup {
    completed_at: DateTime<Utc>,
    already_ended: bool,
    locks_released: u64,
    agents_cancelled: u64,
}

pub(crate) async fn end_session(
    manager: &SessionManager,
    session_id: Uuid,
) -> Result<EndSessionReport> {
    let span = info_span!(
        "end_session",
        %session_id,
        locks_released = field::Empty,
        cleanup_ms = field::Empty,
        already_ended = field::Empty,
    );
    async move {
        let started = Instant::now();
        validate::id("session_id", session_id)?;
        let budget = manager.config().cleanup_timeout;

        // AC4: serialized before the transaction begins.
        let context = SavedContext::capture(
            &manager.context_source().windows(session_id),
            manager.config().max_context_bytes,
        )?;
        let (context_windows, context_bytes) = (context.windows, context.bytes);
        let now = db::now();

        // AC6: everything up to the commit is bounded. The commit itself is not
        // cancelled midway: a cancelled COMMIT would leave the caller unsure
        // whether the session ended. A dropped transaction rolls back.
        // PostgreSQL's end is one statement, bounded as `postgres_end` says.
        let cleanup = match manager.store().get_database_backend() {
            #[cfg(feature = "postgres")]
            DatabaseBackend::Postgres => {
                postgres_end(manager.store(), session_id, now, context, started, budget).await?
            }
            _ => {
                let work = async {
                    let txn = db::begin_write(manager.store()).await?;
                    let cleanup = cleanup_in(&txn, session_id, now, context, started).await?;
                    Ok::<_, Error>((txn, cleanup))
                };
                let (txn, cleanup) =
                    bounded(tokio::time::timeout(budget, work).await, started, budget)?;
                txn.commit().await?;
                cleanup
            }
        };
        if !cleanup.already_ended {
            manager.context_source().clear(session_id);
        }

        let elapsed = started.elapsed();
        manager.metrics_recorder().record_end(
            cleanup.already_ended,
            cleanup.locks_released,
            elapsed,
        );
        let report = EndSessionReport {
            session_id,
            completed_at: cleanup.completed_at,
            already_ended: cleanup.already_ended,
            locks_released: cleanup.locks_released,
            agents_cancelled: cleanup.agents_cancelled,
            context_windows: if cleanup.already_ended {
                0
            } else {
                context_windows
            },
            context_bytes: if cleanup.already_ended {
                0
            } else {
                context_bytes
            },
            cleanup_ms: millis(elapsed),
        };
        let span = tracing::Span::current();
        span.record("locks_released", report.locks_released);
        span.record("cleanup_ms", report.cleanup_ms);
        span.record("already_ended", report.already_ended);
        if elapsed > budget {
            warn!(
                cleanup_ms = report.cleanup_ms,
                budget_ms = millis(budget),
                "session cleanup exceeded its budget"
            );
        }
        Ok(report)
    }
    .instrument(span)
    .await
}

/// The statements of the end, inside the caller's transaction.
async fn cleanup_in(
    txn: &DatabaseTransaction,
    session_id: Uuid,
    now: DateTime<Utc>,
    context: SavedContext,
    started: Instant,
) -> Result<Cleanup> {
    // AC1, AC2, AC4: one conditional update both checks and ends the session.
    // On MariaDB it is the first statement, so it takes the session row's
    // exclusive lock (what `SELECT … FOR UPDATE` would) before anything else
    // is touched: acquires and registrations, which read the row `FOR SHARE`,
    // wait for this end to commit and then see `completed` (PostgreSQL's
    // function does the same). On SQLite the transaction holds the write lock
    // from `BEGIN IMMEDIATE`.
    // AC3: the same statement releases every held lock of the session and
    // cancels its running agents: the status trigger (migration 000003) does
    // both as the row changes to `completed`.
    let backend = txn.get_database_backend();
    let values = EndValues {
        id: TextUuid(session_id),
        now,
        context: context.text,
    };
    let (windows, bytes) = (context.windows, context.bytes);
    let details = |closed: Option<&Closed>| {
        let details = end_details(session_id, started, windows, bytes, closed);
        audit::Row::new(AuditEvent::SessionEnd, Some(session_id), details, now)
    };
    let closed = match backend {
        DatabaseBackend::Sqlite => {
            // One call to SQLite's worker thread instead of two: the audit
            // INSERT (which counts what is about to be released and inserts
            // nothing when the session is already completed), then the
            // UPDATE, sent as one text (a hop to the worker and back costs
            // more than either statement on an in-memory database). Under
            // `BEGIN IMMEDIATE` nothing can change between the two, so the
            // counts are exactly what the trigger releases and cancels.
            let statement = sqlite_end_statement(details(None), values)?;
            // Run to completion: an error in the UPDATE or its trigger must
            // surface here, not be lost after the INSERT's row. Both
            // statements return a row when the session ends, neither when it
            // had already ended; anything else is refused (and rolled back)
            // rather than leaving an audit row for a session still active.
            let rows = txn.query_all_raw(statement).await?;
            match rows.as_slice() {
                [] => return already_ended(txn, session_id).await,
                [counts, _updated] => Closed::from_row(counts)?,
                _ => {
                    return Err(Error::CorruptRow(format!(
                        "ending session {session_id}: its audit insert and its update \
                         disagree ({} rows returned, 0 or 2 expected)",
                        rows.len()
                    )))
                }
            }
        }
        _ => {
            let Some(closed) = close_session_with(txn, cached_update(backend, values)).await?
            else {
                return already_ended(txn, session_id).await;
            };
            let row = details(Some(&closed));
            let insert = match END_AUDIT.get(backend) {
                Some(sql) => Statement::from_sql_and_values(backend, sql, row.into_values()),
                None => END_AUDIT.remember(backend, row.insert(backend)),
            };
            txn.execute_raw(insert).await?;
            closed
        }
    };

    Ok(Cleanup {
        completed_at: now,
        already_ended: false,
        locks_released: closed.locks_released,
        agents_cancelled: closed.agents_cancelled,
    })
}

/// The keys of the `session_end` audit details that carry what the end
/// released and cancelled.
const LOCKS_RELEASED: &str = "locks_released";
const AGENTS_CANCELLED: &str = "agents_cancelled";

/// AC5: the details of the `session_end` audit row. Its cleanup_ms is the time
/// up to when its INSERT is sent (on PostgreSQL, up to the call of the
/// function, so the function's own waits are not in it); the report's adds
/// the rest, commit included.
fn end_details(
    session_id: Uuid,
    started: Instant,
    context_windows: u64,
    context_bytes: u64,
    closed: Option<&Closed>,
) -> serde_json::Value {
    let mut details = serde_json::json!({
        "session_id": session_id,
        "cleanup_ms": millis(started.elapsed()),
        "context_windows": context_windows,
        "context_bytes": context_bytes,
    });
    if let Some(closed) = closed {
        details[LOCKS_RELEASED] = closed.locks_released.into();
        details[AGENTS_CANCELLED] = closed.agents_cancelled.into();
    }
    details
}

/// What a bounded step of the end came to. Our budget running out, and the
/// server (or SQLite's busy handler) giving up on a lock first, both mean the
/// step was rolled back: [`Error::Timeout`].
fn bounded<T>(
    outcome: std::result::Result<Result<T>, tokio::time::error::Elapsed>,
    started: Instant,
    budget: Duration,
) -> Result<T> {
    match outcome {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(Error::Database(e))) if db::is_lock_timeout(&e) => {
            let elapsed_ms = millis(started.elapsed());
            warn!(elapsed_ms, error = %e, "session cleanup was blocked and rolled back");
            Err(Error::Timeout { elapsed_ms })
        }
        Ok(Err(e)) => Err(e),
        Err(_) => {
            let elapsed_ms = millis(started.elapsed());
            warn!(
                elapsed_ms,
                budget_ms = millis(budget),
                "session cleanup timed out and was rolled back"
            );
            Err(Error::Timeout { elapsed_ms })
        }
    }
}

/// The end on PostgreSQL: one statement, `demiarch_end_session` (migration
/// 000004), which runs the conditional UPDATE (the status trigger releasing
/// and cancelling within it) and the audit INSERT in the statement's own
/// transaction. One round trip where `BEGIN`, UPDATE, INSERT, `COMMIT` took
/// four.
///
/// AC6 on this path: waiting for a pooled connection is bounded by the
/// budget on the client (nothing is written yet). The statement, once sent,
/// is not cancelled, for the reason the other backends' COMMIT is not: a
/// cancelled statement could still commit on the server. The server bounds it
/// instead: the function first sets its transaction's `lock_timeout` to what
/// is left of the budget (whatever the connection's own setting, so a
/// connection handed to `SessionManager::new` is bounded too), and a lock
/// wait beyond it rolls the whole statement back, reported as
/// [`Error::Timeout`]. That bound is per lock wait: an end that meets several
/// stuck writers in turn can take longer (an I/O or network stall is not
/// bounded at all, as for a COMMIT).
#[cfg(feature = "postgres")]
async fn postgres_end(
    store: &db::Store,
    session_id: Uuid,
    now: DateTime<Utc>,
    context: SavedContext,
    started: Instant,
    budget: Duration,
) -> Result<Cleanup> {
    use sea_orm::{sqlx, ConnAcquireErr, DatabaseConnectionType, DbErr, RuntimeErr};
    let DatabaseConnectionType::SqlxPostgresPoolConnection(_) = &store.inner else {
        return Err(Error::Database(DbErr::Conn(RuntimeErr::Internal(
            "end_session on PostgreSQL needs a connection backed by a sqlx pool".into(),
        ))));
    };
    let pool = store.get_postgres_connection_pool();
    // Mapped as SeaORM maps its own acquire errors.
    let acquire = async {
        pool.acquire().await.map_err(|e| {
            Error::Database(match e {
                sqlx::Error::PoolTimedOut => DbErr::ConnectionAcquire(ConnAcquireErr::Timeout),
                sqlx::Error::PoolClosed => {
                    DbErr::ConnectionAcquire(ConnAcquireErr::ConnectionClosed)
                }
                e => DbErr::Conn(RuntimeErr::SqlxError(e.into())),
            })
        })
    };
    let mut conn = bounded(tokio::time::timeout(budget, acquire).await, started, budget)?;
    let details = end_details(session_id, started, context.windows, context.bytes, None);
    let wait_ms = millis(budget.saturating_sub(started.elapsed())).max(1);
    let counted: Option<(i64, i64)> = bounded(
        Ok(sqlx::query_as(POSTGRES_END)
            .bind(Uuid::new_v4().to_string())
            .bind(now)
            .bind(session_id.to_string())
            .bind(details.to_string())
            .bind(context.text)
            .bind(i64::try_from(wait_ms).unwrap_or(i64::MAX))
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| Error::Database(DbErr::Query(RuntimeErr::SqlxError(e.into()))))),
        started,
        budget,
    )?;
    drop(conn);
    let Some((locks, agents)) = counted else {
        return already_ended(&**store, session_id).await;
    };
    let closed = Closed::from_counts(locks, agents)?;
    Ok(Cleanup {
        completed_at: now,
        already_ended: false,
        locks_released: closed.locks_released,
        agents_cancelled: closed.agents_cancelled,
    })
}

/// The call of `demiarch_end_session`: audit id, time, session id, the audit
/// details without the counts, the saved context, the lock wait allowed (ms).
#[cfg(feature = "postgres")]
const POSTGRES_END: &str = "SELECT locks_released, agents_cancelled \
     FROM demiarch_end_session($1, $2, $3, CAST($4 AS jsonb), CAST($5 AS jsonb), $6)";

/// SQLite's end as one text: the `session_end` audit INSERT, then the
/// session's UPDATE (`RETURNING 1`, so that the caller sees it matched). The
/// text is built once (see [`SQLITE_END`]); every end binds
/// [`sqlite_end_values`] to it.
fn sqlite_end_statement(row: audit::Row, values: EndValues) -> Result<Statement> {
    let backend = DatabaseBackend::Sqlite;
    Ok(match SQLITE_END.get(backend) {
        Some(sql) => Statement::from_sql_and_values(backend, sql, sqlite_end_values(row, values)),
        None => SQLITE_END.remember(backend, build_sqlite_end(row, values)?),
    })
}

/// [`sqlite_end_statement`] built by sea-query. The INSERT is
///
/// ```sql
/// INSERT INTO audit_log (id, event_type, event_time, session_id, details)
/// SELECT ?, ?, ?, ?, json_set(?, '$.locks_released', (SELECT COUNT(*) …),
///                               '$.agents_cancelled', (SELECT COUNT(*) …))
/// WHERE EXISTS (SELECT 1 FROM global_sessions WHERE id = ? AND status <> ?)
/// RETURNING json_extract(details, '$.locks_released'), json_extract(details, '$.agents_cancelled')
/// ```
///
/// The details get the session's held locks and running agents
/// ([`pending_counts`]), counted before the UPDATE's trigger releases and
/// cancels them, and nothing is inserted when the session is unknown or
/// already completed (the UPDATE then matches nothing either).
fn build_sqlite_end(row: audit::Row, values: EndValues) -> Result<Statement> {
    let backend = DatabaseBackend::Sqlite;
    let session_id = values.id;
    let path = |key: &str| Expr::cust(format!("'$.{key}'"));
    let [locks, agents] = pending_counts(session_id);
    let (columns, exprs): (Vec<_>, Vec<Expr>) = row
        .into_columns()
        .into_iter()
        .map(|(column, value)| {
            let expr = if matches!(column, audit_log::Column::Details) {
                Func::cust("json_set")
                    .args([
                        Expr::val(value),
                        path(LOCKS_RELEASED),
                        locks.clone(),
                        path(AGENTS_CANCELLED),
                        agents.clone(),
                    ])
                    .into()
            } else {
                Expr::val(value)
            };
            (column, expr)
        })
        .unzip();
    let open = Query::select()
        .expr(Expr::cust("1"))
        .from(global_sessions::Entity)
        .cond_where(
            Condition::all()
                .add(global_sessions::Column::Id.eq(session_id))
                .add(global_sessions::Column::Status.ne(SessionStatus::Completed.as_str())),
        )
        .to_owned();
    let returned = |key| {
        Func::cust("json_extract")
            .arg(Expr::col(audit_log::Column::Details))
            .arg(path(key))
    };
    let insert = Query::insert()
        .into_table(audit_log::Entity)
        .columns(columns)
        .select_from(
            Query::select()
                .exprs(exprs)
                .and_where(Expr::exists(open))
                .to_owned(),
        )
        .map_err(|e| {
            Error::Database(sea_orm::DbErr::Custom(format!(
                "session_end audit insert: {e}"
            )))
        })?
        .returning(Query::returning().exprs([returned(LOCKS_RELEASED), returned(AGENTS_CANCELLED)]))
        .to_owned();
    let insert = backend.build(&insert);
    let update = values.build_update(backend);
    let mut binds = insert.values.map(|v| v.0).unwrap_or_default();
    binds.extend(update.values.map(|v| v.0).unwrap_or_default());
    Ok(Statement::from_sql_and_values(
        backend,
        format!("{};\n{} RETURNING 1", insert.sql, update.sql),
        binds,
    ))
}

/// What [`build_sqlite_end`] binds, in its order, without building anything:
/// the audit row's values, the session id and statuses of the counts and of
/// the `EXISTS`, then the UPDATE's values.
fn sqlite_end_values(row: audit::Row, values: EndValues) -> Vec<sea_orm::Value> {
    let mut binds = row.into_values();
    binds.extend([
        values.id.into(),
        values.id.into(),
        AgentStatus::Running.as_str().into(),
        values.id.into(),
        SessionStatus::Completed.as_str().into(),
    ]);
    binds.extend(values.into_update_values());
    binds
}

/// The end's UPDATE on MariaDB, its SQL built once.
fn cached_update(backend: DatabaseBackend, values: EndValues) -> Statement {
    match END_UPDATE.get(backend) {
        Some(sql) => Statement::from_sql_and_values(backend, sql, values.into_update_values()),
        None => END_UPDATE.remember(backend, values.build_update(backend)),
    }
}

/// What the status trigger released as a session row was closed.
pub(crate) struct Closed {
    pub locks_released: u64,
    pub agents_cancelled: u64,
}

impl Closed {
    /// From a row whose first two columns are the two counts.
    fn from_row(row: &sea_orm::QueryResult) -> Result<Self> {
        Self::from_counts(row.try_get_by_index(0)?, row.try_get_by_index(1)?)
    }

    /// From the two counts as the database returns them.
    fn from_counts(locks: i64, agents: i64) -> Result<Self> {
        let count = |n: i64| {
            u64::try_from(n).map_err(|_| Error::CorruptRow(format!("negative row count {n}")))
        };
        Ok(Self {
            locks_released: count(locks)?,
            agents_cancelled: count(agents)?,
        })
    }
}

/// Runs `update`, an UPDATE of one session row to `completed` or
/// `interrupted`. The status trigger of migration 000003 releases the
/// session's held locks and cancels its running agents within that statement.
/// Returns how many, or `None` when the update matched no row.
///
/// How the counts come back depends on the backend: on SQLite the UPDATE
/// itself counts the held locks and running agents in its `RETURNING` clause
/// (computed as the row changes, before the trigger runs; SQLite has one
/// writer at a time, so the trigger changes exactly those rows); on
/// PostgreSQL and MariaDB the trigger leaves its row counts in a
/// transaction-local setting / session variable, read right after. (On the
/// servers `RETURNING` would count from the statement's snapshot, which can
/// predate a lock committed while the UPDATE waited for the session row.)
pub(crate) async fn close_session(
    txn: &DatabaseTransaction,
    update: UpdateMany<global_sessions::Entity>,
    session_id: TextUuid,
) -> Result<Option<Closed>> {
    let backend = txn.get_database_backend();
    let mut update = update.into_query();
    if backend == DatabaseBackend::Sqlite {
        update.returning(counts_returning(session_id));
    }
    close_session_with(txn, backend.build(&update)).await
}

/// [`close_session`] with the UPDATE already built (on SQLite, with
/// [`counts_returning`]).
async fn close_session_with(
    txn: &DatabaseTransaction,
    update: Statement,
) -> Result<Option<Closed>> {
    let backend = txn.get_database_backend();
    let row = if backend == DatabaseBackend::Sqlite {
        // Run to completion (a trigger error must surface here, not be lost
        // in a statement reset after the first row).
        match txn.query_all_raw(update).await?.into_iter().next() {
            Some(row) => row,
            None => return Ok(None),
        }
    } else {
        if txn.execute_raw(update).await?.rows_affected() == 0 {
            return Ok(None);
        }
        let read = if backend == DatabaseBackend::Postgres {
            "SELECT CAST(current_setting('demiarch.locks_released') AS BIGINT), \
                    CAST(current_setting('demiarch.agents_cancelled') AS BIGINT)"
        } else {
            "SELECT CAST(@demiarch_locks_released AS SIGNED), \
                    CAST(@demiarch_agents_cancelled AS SIGNED)"
        };
        txn.query_one_raw(Statement::from_string(backend, read))
            .await?
            .ok_or_else(|| Error::CorruptRow("the session-end trigger left no counts".into()))?
    };
    Closed::from_row(&row).map(Some)
}

/// SQLite's `RETURNING` for a session UPDATE that ends it: the
/// [`pending_counts`], counted as the row changes, before the status trigger
/// releases and cancels exactly those.
fn counts_returning(session_id: TextUuid) -> sea_orm::sea_query::ReturningClause {
    Query::returning().exprs(pending_counts(session_id))
}

/// What the status trigger releases and cancels when the session's row
/// changes to `completed` or `interrupted`: the number of its held locks and
/// of its running agents, as two `COUNT(*)` subqueries. Counted in the same
/// SQLite write transaction just before the trigger runs (one writer at a
/// time), they are exactly the rows it changes.
fn pending_counts(session_id: TextUuid) -> [Expr; 2] {
    [
        count_where(
            resource_locks::Entity,
            Condition::all()
                .add(resource_locks::Column::SessionId.eq(session_id))
                .add(resource_locks::Column::ReleasedAt.is_null()),
        ),
        count_where(
            agent_executions::Entity,
            Condition::all()
                .add(agent_executions::Column::SessionId.eq(session_id))
                .add(agent_executions::Column::Status.eq(AgentStatus::Running.as_str())),
        ),
    ]
}

/// The SQL text of the end's UPDATE and audit INSERT (SQLite, MariaDB), built
/// by sea-query once per backend and process; every end binds its own values
/// to it (and sqlx reuses the prepared statement). Building them afresh cost
/// more than a round trip to in-memory SQLite.
/// `end_statements_bind_what_the_builder_binds` checks the values are the
/// builder's, in its order, on both backends.
static END_UPDATE: db::SqlCache = db::SqlCache::new();
static END_AUDIT: db::SqlCache = db::SqlCache::new();
/// SQLite's whole end: the audit INSERT, then the UPDATE, one text
/// ([`build_sqlite_end`]).
static SQLITE_END: db::SqlCache = db::SqlCache::new();

/// What one end binds to its UPDATE.
struct EndValues {
    id: TextUuid,
    now: DateTime<Utc>,
    context: String,
}

impl EndValues {
    /// The conditional UPDATE that both checks and ends the session, built by
    /// sea-query.
    fn build_update(self, backend: DatabaseBackend) -> Statement {
        let update = global_sessions::Entity::update_many()
            .col_expr(
                global_sessions::Column::Status,
                Expr::value(SessionStatus::Completed.as_str()),
            )
            .col_expr(global_sessions::Column::UpdatedAt, Expr::value(self.now))
            .col_expr(global_sessions::Column::CompletedAt, Expr::value(self.now))
            // The text the context was serialized to once, bound as is
            // (SQLite's JSON is text, MariaDB's JSON column is text; PostgreSQL
            // ends through `demiarch_end_session`), rather than a
            // `serde_json::Value` the driver would serialize again: a
            // megabyte context takes one pass.
            .col_expr(
                global_sessions::Column::ContextData,
                Expr::value(self.context),
            )
            .filter(global_sessions::Column::Id.eq(self.id))
            .filter(global_sessions::Column::Status.ne(SessionStatus::Completed.as_str()))
            .into_query();
        backend.build(&update)
    }

    /// The values [`build_update`](Self::build_update) binds, in its order
    /// (the same on every backend).
    fn into_update_values(self) -> Vec<sea_orm::Value> {
        vec![
            SessionStatus::Completed.as_str().into(),
            self.now.into(),
            self.now.into(),
            self.context.into(),
            self.id.into(),
            SessionStatus::Completed.as_str().into(),
        ]
    }
}

/// `(SELECT COUNT(*) FROM table WHERE condition)`.
fn count_where<E: EntityTrait>(table: E, condition: Condition) -> Expr {
    Query::select()
        .expr(Expr::cust("COUNT(*)"))
        .from(table)
        .cond_where(condition)
        .to_owned()
        .into_sub_query_statement()
        .into()
}

/// The conditional update touched nothing: the session is unknown or was
/// already completed. Only then is the row read.
async fn already_ended(db: &impl ConnectionTrait, session_id: Uuid) -> Result<Cleanup> {
    match status_of(db, session_id).await? {
        None => Err(Error::SessionNotFound(session_id)),
        Some((_, Some(completed_at))) => Ok(Cleanup {
            completed_at,
            already_ended: true,
            locks_released: 0,
            agents_cancelled: 0,
        }),
        Some((status, None)) => Err(Error::CorruptRow(format!(
            "session {session_id} is {status} yet was not updated by its end"
        ))),
    }
}

/// A session's status and `completed_at`, or `None` when there is no such
/// session.
pub(crate) async fn status_of(
    db: &impl ConnectionTrait,
    session_id: Uuid,
) -> Result<Option<(String, Option<DateTime<Utc>>)>> {
    Ok(global_sessions::Entity::find()
        .select_only()
        .column(global_sessions::Column::Status)
        .column(global_sessions::Column::CompletedAt)
        .filter(global_sessions::Column::Id.eq(TextUuid(session_id)))
        .into_tuple()
        .one(db)
        .await?)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The backends whose end binds to SQL built by sea-query (PostgreSQL
    /// calls `demiarch_end_session`).
    const BACKENDS: [DatabaseBackend; 2] = [DatabaseBackend::Sqlite, DatabaseBackend::MySql];

    fn values() -> EndValues {
        EndValues {
            id: TextUuid(Uuid::new_v4()),
            now: db::now(),
            context: r#"{"version":1,"windows":[]}"#.to_owned(),
        }
    }

    /// SQLite's end binds one value per placeholder, whether its text was
    /// just built or taken from the cache (sqlx would bind NULL to a
    /// placeholder left without a value).
    #[test]
    fn sqlite_end_binds_a_value_per_placeholder() {
        for _ in 0..2 {
            let row = audit::Row::new(
                AuditEvent::SessionEnd,
                Some(Uuid::new_v4()),
                serde_json::json!({}),
                db::now(),
            );
            let statement = sqlite_end_statement(row, values()).expect("built");
            let bound = statement.values.map(|v| v.0.len()).unwrap_or(0);
            assert_eq!(
                statement.sql.matches('?').count(),
                bound,
                "{}",
                statement.sql
            );
            assert!(
                bound > 10,
                "the audit row, the counts and the update all bind"
            );
        }
    }

    /// SQLite's cached end text is only right if [`sqlite_end_values`] binds
    /// exactly what [`build_sqlite_end`] binds, in its order.
    #[test]
    fn sqlite_end_values_are_the_builders() {
        let row = audit::Row::new(
            AuditEvent::SessionEnd,
            Some(Uuid::new_v4()),
            serde_json::json!({"cleanup_ms": 1}),
            db::now(),
        );
        let v = values();
        let same = EndValues {
            id: v.id,
            now: v.now,
            context: v.context.clone(),
        };
        let built = build_sqlite_end(row.clone(), v).expect("built");
        assert_eq!(
            built.values.map(|v| v.0),
            Some(sqlite_end_values(row, same)),
            "{}",
            built.sql
        );
        for counted in [
            "json_set(?, '$.locks_released', (SELECT COUNT(*) FROM \"resource_locks\"",
            "'$.agents_cancelled', (SELECT COUNT(*) FROM \"agent_executions\"",
            "WHERE EXISTS(SELECT 1 FROM \"global_sessions\"",
            "RETURNING json_extract(\"details\", '$.locks_released')",
        ] {
            assert!(built.sql.contains(counted), "{counted} in {}", built.sql);
        }
    }

    /// The cached SQL is only right if each end binds exactly what the
    /// builder would have bound, in the same order.
    #[test]
    fn end_statements_bind_what_the_builder_binds() {
        for backend in BACKENDS {
            let v = values();
            let same = EndValues {
                id: v.id,
                now: v.now,
                context: v.context.clone(),
            };
            let built = v.build_update(backend);
            let bound = same.into_update_values();
            assert_eq!(built.values.map(|v| v.0), Some(bound), "{backend:?} UPDATE");

            let row = || {
                audit::Row::new(
                    AuditEvent::SessionEnd,
                    Some(Uuid::new_v4()),
                    serde_json::json!({"locks_released": 3}),
                    db::now(),
                )
            };
            let row = row();
            let copy = row.clone();
            assert_eq!(
                row.insert(backend).values.map(|v| v.0),
                Some(copy.into_values()),
                "{backend:?} audit INSERT"
            );
        }
    }
}
