//! The store's own counters, kept in process for
//! [`SessionManager::metrics`](crate::SessionManager::metrics) and reported
//! through the [`metrics`](https://docs.rs/metrics) facade, so that an app
//! that installs a recorder (`metrics-exporter-prometheus`, …) exports them.
//! Without a recorder the facade calls do nothing. The names are listed on
//! [`MetricsSnapshot`].
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

use crate::locks::SweepReport;

pub(crate) const ENDS: &str = "demiarch_sessions_ends_total";
pub(crate) const END_DURATION: &str = "demiarch_sessions_end_duration_seconds";
pub(crate) const END_BUDGET: &str = "demiarch_sessions_end_budget_seconds";
pub(crate) const LOCKS_RELEASED_BY_END: &str = "demiarch_sessions_locks_released_by_end_total";
pub(crate) const LOCKS_SWEPT: &str = "demiarch_sessions_locks_swept_total";
pub(crate) const SESSIONS_RECOVERED: &str = "demiarch_sessions_sessions_recovered_total";
pub(crate) const LOCK_WAITS: &str = "demiarch_sessions_lock_waits_total";
pub(crate) const LOCK_WAIT_DURATION: &str = "demiarch_sessions_lock_wait_duration_seconds";
pub(crate) const LOCK_HANDOFFS: &str = "demiarch_sessions_lock_handoffs_total";
pub(crate) const ACTIVE_SESSIONS: &str = "demiarch_sessions_active_sessions";
pub(crate) const HELD_LOCKS: &str = "demiarch_sessions_held_locks";
pub(crate) const WATCH_LAG: &str = "demiarch_sessions_watch_lag_seconds";
pub(crate) const PRUNED: &str = "demiarch_sessions_pruned_total";
pub(crate) const PRUNE_DURATION: &str = "demiarch_sessions_prune_duration_seconds";
pub(crate) const LAST_PRUNE: &str = "demiarch_sessions_last_prune_timestamp_seconds";

/// Power-of-two buckets of cleanup duration in microseconds: bucket `i` holds
/// durations below `2^(i+1)` µs (the last one, everything longer).
const BUCKETS: usize = 32;

#[derive(Debug, Default)]
pub(crate) struct Metrics {
    sessions_ended: AtomicU64,
    ends_already_ended: AtomicU64,
    end_timeouts: AtomicU64,
    end_failures: AtomicU64,
    locks_released_by_end: AtomicU64,
    sweeps: AtomicU64,
    locks_swept: AtomicU64,
    cleanup_max_us: AtomicU64,
    cleanup_us: [AtomicU64; BUCKETS],
}

impl Metrics {
    pub fn record_end(&self, already_ended: bool, locks_released: u64, took: Duration) {
        if already_ended {
            self.ends_already_ended.fetch_add(1, Relaxed);
            metrics::counter!(ENDS, "outcome" => "already_ended").increment(1);
        } else {
            self.sessions_ended.fetch_add(1, Relaxed);
            self.locks_released_by_end
                .fetch_add(locks_released, Relaxed);
            metrics::counter!(ENDS, "outcome" => "ended").increment(1);
            metrics::counter!(LOCKS_RELEASED_BY_END).increment(locks_released);
        }
        metrics::histogram!(END_DURATION).record(took.as_secs_f64());
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.cleanup_max_us.fetch_max(us, Relaxed);
        let bucket = (64 - us.leading_zeros() as usize).min(BUCKETS - 1);
        self.cleanup_us[bucket].fetch_add(1, Relaxed);
    }

    pub fn record_end_timeout(&self) {
        self.end_timeouts.fetch_add(1, Relaxed);
        metrics::counter!(ENDS, "outcome" => "timeout").increment(1);
    }

    pub fn record_end_failure(&self) {
        self.end_failures.fetch_add(1, Relaxed);
        metrics::counter!(ENDS, "outcome" => "failed").increment(1);
    }

    pub fn record_sweep(&self, report: &SweepReport) {
        self.sweeps.fetch_add(1, Relaxed);
        self.locks_swept
            .fetch_add(report.expired + report.orphaned, Relaxed);
        metrics::counter!(LOCKS_SWEPT, "reason" => "expired").increment(report.expired);
        metrics::counter!(LOCKS_SWEPT, "reason" => "orphaned").increment(report.orphaned);
    }

    pub fn record_recovery(&self, sessions: usize) {
        metrics::counter!(SESSIONS_RECOVERED).increment(sessions as u64);
    }

    /// A waiting acquire's outcome and how long it took.
    pub fn record_lock_wait<T>(&self, outcome: &crate::Result<T>, took: Duration) {
        let outcome = match outcome {
            Ok(_) => "granted",
            Err(crate::Error::LockWaitTimeout { .. }) => "timeout",
            Err(crate::Error::Deadlock { .. }) => "deadlock",
            Err(_) => "failed",
        };
        metrics::counter!(LOCK_WAITS, "outcome" => outcome).increment(1);
        metrics::histogram!(LOCK_WAIT_DURATION, "outcome" => outcome).record(took.as_secs_f64());
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let counts: Vec<u64> = self.cleanup_us.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        let percentile = |p: f64| -> f64 {
            if total == 0 {
                return 0.0;
            }
            let rank = ((total as f64) * p).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return (1u64 << (i + 1).min(63)) as f64 / 1000.0;
                }
            }
            0.0
        };
        MetricsSnapshot {
            sessions_ended: self.sessions_ended.load(Relaxed),
            ends_already_ended: self.ends_already_ended.load(Relaxed),
            end_timeouts: self.end_timeouts.load(Relaxed),
            end_failures: self.end_failures.load(Relaxed),
            locks_released_by_end: self.locks_released_by_end.load(Relaxed),
            sweeps: self.sweeps.load(Relaxed),
            locks_swept: self.locks_swept.load(Relaxed),
            cleanup_p50_ms: percentile(0.50),
            cleanup_p99_ms: percentile(0.99),
            cleanup_max_ms: self.cleanup_max_us.load(Relaxed) as f64 / 1000.0,
        }
    }
}

/// Counts since the manager was created (shared by its clones).
///
/// The same events go to the [`metrics`](https://docs.rs/metrics) facade,
/// under Prometheus names, for an app that installs a recorder:
///
/// | name | kind | labels | what |
/// |---|---|---|---|
/// | `demiarch_sessions_ends_total` | counter | `outcome`: `ended`, `already_ended`, `timeout`, `failed` | `end_session` calls |
/// | `demiarch_sessions_end_duration_seconds` | histogram | | an end's time, call to commit (ended and already ended) |
/// | `demiarch_sessions_end_budget_seconds` | gauge | | `Config::cleanup_timeout`, to compare the histogram with |
/// | `demiarch_sessions_locks_released_by_end_total` | counter | | locks the ends released |
/// | `demiarch_sessions_locks_swept_total` | counter | `reason`: `expired`, `orphaned` | locks `sweep_locks` released |
/// | `demiarch_sessions_sessions_recovered_total` | counter | | sessions `recover_stale` interrupted |
/// | `demiarch_sessions_lock_waits_total` | counter | `outcome`: `granted`, `timeout`, `deadlock`, `failed` | acquires with `LockOptions::wait` |
/// | `demiarch_sessions_lock_wait_duration_seconds` | histogram | `outcome` | how long those acquires took |
/// | `demiarch_sessions_lock_handoffs_total` | counter | | grants to an agent that was queued |
/// | `demiarch_sessions_active_sessions` | gauge | | open sessions in the store (`active` or `paused`), when last counted |
/// | `demiarch_sessions_held_locks` | gauge | | held locks in the store, when last counted |
/// | `demiarch_sessions_watch_lag_seconds` | histogram | | from an audit event's `event_time` to its delivery by a `watch` feed |
/// | `demiarch_sessions_pruned_total` | counter | `kind`: `sessions`, `contexts`, `agents`, `locks`, `waiters`, `audit` | rows a prune deleted (contexts: cleared) |
/// | `demiarch_sessions_prune_duration_seconds` | histogram | | a prune's time |
/// | `demiarch_sessions_last_prune_timestamp_seconds` | gauge | | when this process's last prune finished (Unix time) |
///
/// The two store gauges are counted by
/// [`SessionManager::record_store_gauges`](crate::SessionManager::record_store_gauges),
/// which an exporter calls before each scrape.
///
/// Cleanup percentiles are upper bounds of power-of-two buckets (a p99 of
/// 2.048 ms means 99 % of ends took less than that); the maximum is exact.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MetricsSnapshot {
    /// Sessions this manager ended.
    pub sessions_ended: u64,
    /// `end_session` calls that found the session already ended.
    pub ends_already_ended: u64,
    /// `end_session` calls that returned `Error::Timeout`.
    pub end_timeouts: u64,
    /// `end_session` calls that failed otherwise.
    pub end_failures: u64,
    /// Locks released by those ends.
    pub locks_released_by_end: u64,
    /// `sweep_locks` calls.
    pub sweeps: u64,
    /// Locks those sweeps released.
    pub locks_swept: u64,
    pub cleanup_p50_ms: f64,
    pub cleanup_p99_ms: f64,
    pub cleanup_max_ms: f64,
}

/// A grant to an agent that was queued for the resource.
pub(crate) fn record_handoff() {
    metrics::counter!(LOCK_HANDOFFS).increment(1);
}

/// A feed delivered an event written at `event_time`.
pub(crate) fn record_watch_lag(event_time: chrono::DateTime<chrono::Utc>) {
    let lag = (chrono::Utc::now() - event_time)
        .to_std()
        .unwrap_or_default();
    metrics::histogram!(WATCH_LAG).record(lag.as_secs_f64());
}

/// The store's open sessions and held locks, as last counted.
pub(crate) fn record_store_gauges(active_sessions: u64, held_locks: u64, budget: Duration) {
    metrics::gauge!(ACTIVE_SESSIONS).set(active_sessions as f64);
    metrics::gauge!(HELD_LOCKS).set(held_locks as f64);
    metrics::gauge!(END_BUDGET).set(budget.as_secs_f64());
}

/// A prune that finished: rows by kind, its time, and when.
pub(crate) fn record_prune(report: &crate::PruneReport) {
    for (kind, rows) in [
        ("sessions", report.sessions_deleted),
        ("contexts", report.contexts_cleared),
        ("agents", report.agents_deleted),
        ("locks", report.locks_deleted),
        ("waiters", report.waiters_deleted),
        ("audit", report.audit_deleted),
    ] {
        metrics::counter!(PRUNED, "kind" => kind).increment(rows);
    }
    metrics::histogram!(PRUNE_DURATION).record(report.elapsed_ms as f64 / 1000.0);
    let now = chrono::Utc::now();
    let seconds = now.timestamp() as f64 + f64::from(now.timestamp_subsec_micros()) / 1e6;
    metrics::gauge!(LAST_PRUNE).set(seconds);
}
