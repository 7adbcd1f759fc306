//! In-process counters for the store's own operations, read with
//! [`SessionManager::metrics`](crate::SessionManager::metrics).
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

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
        } else {
            self.sessions_ended.fetch_add(1, Relaxed);
            self.locks_released_by_end
                .fetch_add(locks_released, Relaxed);
        }
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.cleanup_max_us.fetch_max(us, Relaxed);
        let bucket = (64 - us.leading_zeros() as usize).min(BUCKETS - 1);
        self.cleanup_us[bucket].fetch_add(1, Relaxed);
    }

    pub fn record_end_timeout(&self) {
        self.end_timeouts.fetch_add(1, Relaxed);
    }

    pub fn record_end_failure(&self) {
        self.end_failures.fetch_add(1, Relaxed);
    }

    pub fn record_sweep(&self, released: u64) {
        self.sweeps.fetch_add(1, Relaxed);
        self.locks_swept.fetch_add(released, Relaxed);
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
