//! Times, durations and ids as people read them, the same in the CLI and
//! the dashboard.
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// `2026-11-24 04:38:23 UTC`.
pub fn time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// `3m ago`, `in 2h`, `just now`: the largest unit only.
pub fn ago(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let (delta, future) = match at <= now {
        true => (now - at, false),
        false => (at - now, true),
    };
    let secs = delta.to_std().map(|d| d.as_secs()).unwrap_or(0);
    if secs == 0 {
        return "just now".to_owned();
    }
    let rough = coarse(Duration::from_secs(secs), 1);
    match future {
        true => format!("in {rough}"),
        false => format!("{rough} ago"),
    }
}

/// A duration in at most its two largest units, to the millisecond (to the
/// microsecond below one): `4ms`, `1s 250ms`, `3m 12s`, `250us`.
pub fn span(duration: Duration) -> String {
    let duration = match duration >= Duration::from_millis(1) {
        true => Duration::from_millis(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)),
        false => Duration::from_micros(u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)),
    };
    coarse(duration, 2)
}

/// `span` of a signed count of milliseconds (negative counts as zero).
pub fn millis(ms: i64) -> String {
    span(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

/// A duration in its largest unit: `3m`, `2h`, `0s`.
pub fn rough(duration: Duration) -> String {
    match duration.as_secs() {
        0 => "0s".to_owned(),
        secs => coarse(Duration::from_secs(secs), 1),
    }
}

fn coarse(duration: Duration, units: usize) -> String {
    let full = humantime::format_duration(duration).to_string();
    let parts: Vec<&str> = full.split(' ').take(units).collect();
    parts.join(" ")
}

/// The first 8 hex digits of an id, enough to name it (the CLI and the
/// dashboard take such a prefix).
pub fn short(id: Uuid) -> String {
    let mut text = id.simple().to_string();
    text.truncate(8);
    text
}
