//! A manager's life around its sessions: the heartbeat that tells other
//! instances it is alive, graceful shutdown, and waiting for a stop signal.
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::FutureExt;
use sea_orm::entity::prelude::TextUuid;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tracing::warn;
use uuid::Uuid;

use entity::global_sessions;

use crate::status::SessionStatus;
use crate::{db, Error, Result, SessionManager};

/// A background task that runs a job every interval: the heartbeat that
/// refreshes `last_heartbeat_at`, and the pruner. Started on demand;
/// stopped by `shutdown` or `close`, or when every clone of the manager is
/// gone (the task holds only a weak reference to its handle). Nothing runs
/// in `Drop`.
#[derive(Debug, Default)]
pub(crate) struct Periodic {
    state: Mutex<PeriodicState>,
}

#[derive(Debug, Default)]
struct PeriodicState {
    task: Option<(JoinHandle<()>, watch::Sender<bool>)>,
    stopped: bool,
}

impl Periodic {
    /// Starts running `job` every `every` (the first at once when
    /// `at_once`, else an interval from now), unless it runs already or was
    /// stopped; a failed run is logged as `what` and retried at the next
    /// tick.
    /// `job` is given the stop signal, which turns true once `stop` is
    /// called, so that a long job can end early.
    pub fn ensure_started<F, Fut>(
        self: &Arc<Self>,
        every: Duration,
        at_once: bool,
        what: &'static str,
        job: F,
    ) where
        F: Fn(watch::Receiver<bool>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<()>> + Send,
    {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.stopped || state.task.is_some() || every.is_zero() {
            return;
        }
        // Outside a runtime (a manager built with `new` in sync code) there is
        // nothing to run it on: sessions then never look alive to others,
        // and nothing is pruned in the background.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (stop, mut stopping) = watch::channel(false);
        let alive = Arc::downgrade(self);
        let task = runtime.spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            if !at_once {
                ticker.tick().await;
            }
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = stopping.changed() => break,
                }
                if alive.upgrade().is_none() {
                    break;
                }
                // A failed or panicking run is retried at the next tick.
                match std::panic::AssertUnwindSafe(job(stopping.clone()))
                    .catch_unwind()
                    .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!(error = %e, "{what} failed; will retry"),
                    Err(_) => warn!("{what} panicked; will retry"),
                }
            }
        });
        state.task = Some((task, stop));
    }

    /// Stops the task after its current run, if any. Idempotent.
    pub async fn stop(&self) {
        let task = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.stopped = true;
            state.task.take()
        };
        if let Some((task, stop)) = task {
            let _ = stop.send(true);
            let _ = task.await;
        }
    }
}

/// Marks this instance's open sessions alive. On SQLite it takes its turn at
/// the write gate like every other writer of the manager, rather than waiting
/// in SQLite's busy handler for a gap between gated writers.
pub(crate) async fn beat(db: &db::Store, owner: Uuid) -> Result<u64> {
    let _gate = db::write_gate(db).await?;
    Ok(global_sessions::Entity::update_many()
        .col_expr(
            global_sessions::Column::LastHeartbeatAt,
            Expr::value(db::now()),
        )
        .filter(global_sessions::Column::OwnerInstance.eq(owner.to_string()))
        .filter(global_sessions::Column::Status.is_in(SessionStatus::open_names()))
        .exec(db.writer())
        .await?
        .rows_affected)
}

/// What `shutdown` did with the open sessions this instance owned.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ShutdownReport {
    /// Ended cleanly now (including an end the deadline dropped after it was
    /// sent, whose row then reads `completed`).
    pub ended: Vec<Uuid>,
    /// Found already ended (by another call or instance).
    pub already_ended: Vec<Uuid>,
    /// Not ended within the deadline: still open, not half-ended; another
    /// instance's `recover_stale` will interrupt them.
    pub timed_out: Vec<Uuid>,
    /// Ending failed for another reason: still open.
    pub failed: Vec<ShutdownFailure>,
}

/// One session `shutdown` could not end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ShutdownFailure {
    pub session_id: Uuid,
    pub error: String,
}

pub(crate) async fn shutdown(
    manager: &SessionManager,
    deadline: Duration,
) -> Result<ShutdownReport> {
    manager.heartbeat().stop().await;
    manager.pruner().stop().await;
    let open: Vec<TextUuid> = global_sessions::Entity::find()
        .select_only()
        .column(global_sessions::Column::Id)
        .filter(global_sessions::Column::OwnerInstance.eq(manager.instance_id().to_string()))
        .filter(global_sessions::Column::Status.is_in(SessionStatus::open_names()))
        .into_tuple()
        .all(manager.connection())
        .await?;
    // Each end is bounded by the deadline up to its commit (its own timer,
    // `db::backstop`), and its commit runs to completion, so the report says
    // what the rows say. Only a commit still running `cleanup_timeout` after
    // that is given up on, and then the row is read.
    let cleanup = manager.config().cleanup_timeout;
    let budget = deadline.min(cleanup);
    let give_up = crate::db::backstop(budget).saturating_add(cleanup);
    let mut ends = JoinSet::new();
    for id in open {
        let manager = manager.clone();
        ends.spawn(async move {
            let end = manager.end_session_within(id.0, budget);
            (id.0, tokio::time::timeout(give_up, end).await)
        });
    }
    let mut report = ShutdownReport::default();
    while let Some(joined) = ends.join_next().await {
        let Ok((session_id, outcome)) = joined else {
            continue;
        };
        match outcome {
            Ok(Ok(end)) if end.already_ended => report.already_ended.push(session_id),
            Ok(Ok(_)) => report.ended.push(session_id),
            Ok(Err(Error::Timeout { .. })) => report.timed_out.push(session_id),
            // Its commit did not return in time: the row says whether it
            // landed; if it does not yet, the outcome is unknown, not a
            // timeout (a timed-out end is one that rolled back).
            Err(_) => {
                if crate::session::completed_at(manager.connection(), session_id)
                    .await
                    .is_some()
                {
                    manager.context_source().clear(session_id);
                    report.ended.push(session_id);
                } else {
                    report.failed.push(ShutdownFailure {
                        session_id,
                        error: format!(
                            "its end did not return within {give_up:?}; whether it \
                             committed is unknown until the session's row says so"
                        ),
                    });
                }
            }
            Ok(Err(e)) => report.failed.push(ShutdownFailure {
                session_id,
                error: e.to_string(),
            }),
        }
    }
    for list in [
        &mut report.ended,
        &mut report.already_ended,
        &mut report.timed_out,
    ] {
        list.sort();
    }
    Ok(report)
}

/// Resolves on Ctrl-C, or on SIGTERM on Unix.
pub(crate) async fn shutdown_signal() -> Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    Ok(())
}
