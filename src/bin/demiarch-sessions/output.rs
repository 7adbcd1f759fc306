//! Rendering: tables, times and durations for people, JSON for scripts, and
//! the progress spinner.
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::time::Duration;

use chrono::{DateTime, Utc};
use comfy_table::{presets, Table};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::Value;

pub use demiarch_sessions::views::human::{ago, short, span, time};

use crate::exit::{Failure, INTERNAL};

/// A table with a header row, in the style every list uses.
pub fn table<I: IntoIterator<Item = &'static str>>(header: I) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::UTF8_FULL_CONDENSED)
        .set_header(header);
    table
}

/// Aligned `name  value` lines without borders.
pub fn fields<I: IntoIterator<Item = (&'static str, String)>>(rows: I) -> String {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING);
    for (name, value) in rows {
        table.add_row(vec![name.to_owned(), value]);
    }
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    table.trim_fmt()
}

/// A table as text, without trailing spaces.
pub fn render(table: &Table) -> String {
    table.trim_fmt()
}

/// Pretty JSON and a newline.
pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<String, Failure> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| Failure::new(INTERNAL, format!("cannot render JSON: {e}")))?;
    text.push('\n');
    Ok(text)
}

/// `2026-11-24 04:38:23 UTC (3m ago)`.
pub fn time_ago(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    format!("{} ({})", time(at), ago(at, now))
}

/// The time between two instants, as `span` prints it.
pub fn between(from: DateTime<Utc>, to: DateTime<Utc>) -> String {
    span((to - from).to_std().unwrap_or_default())
}

/// `span` of a count of milliseconds.
pub fn millis(ms: u64) -> String {
    span(Duration::from_millis(ms))
}

/// An audit row's details as `key=value` pairs; `session_id` is left out (it
/// has its own column) and long lists are counted rather than spelled out.
pub fn details(details: &Value) -> String {
    let Value::Object(map) = details else {
        return compact(details);
    };
    let mut out = String::new();
    for (key, value) in map {
        if key == "session_id" {
            continue;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        let value = match value {
            Value::String(s) => s.clone(),
            Value::Array(items) if items.iter().any(|i| i.is_object() || i.is_array()) => {
                format!("[{}]", count(items.len() as u64, "item"))
            }
            other => compact(other),
        };
        let _ = write!(out, "{key}={value}");
    }
    if out.is_empty() {
        out.push('-');
    }
    out
}

fn compact(value: &Value) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| value.to_string())
}

/// `n thing` or `n things`.
pub fn count(n: u64, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

/// A spinner on stderr while long work runs, only when stderr is a terminal.
/// Cleared when dropped.
pub struct Spinner(ProgressBar);

impl Spinner {
    pub fn start(message: &'static str) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self(ProgressBar::hidden());
        }
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
            bar.set_style(style);
        }
        bar.set_message(message);
        bar.enable_steady_tick(Duration::from_millis(100));
        Self(bar)
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        // 2026-11-24 04:41:35 UTC and 3m 12s before.
        let now = DateTime::from_timestamp(1_795_495_295, 0).unwrap_or_default();
        let then = DateTime::from_timestamp(1_795_495_103, 0).unwrap_or_default();
        assert_eq!(time_ago(then, now), "2026-11-24 04:38:23 UTC (3m ago)");
        assert_eq!(ago(now, then), "in 3m");
        assert_eq!(ago(now, now), "just now");
        assert_eq!(span(Duration::from_micros(4_321)), "4ms");
        assert_eq!(span(Duration::from_micros(250)), "250us");
        assert_eq!(span(Duration::from_millis(1_250)), "1s 250ms");
        assert_eq!(span(Duration::from_secs(192)), "3m 12s");
        assert_eq!(millis(0), "0s");
    }

    #[test]
    fn audit_details() {
        let value =
            serde_json::json!({"session_id": "x", "locks_released": 3, "locks": [{"a": 1}]});
        assert_eq!(details(&value), "locks=[1 item] locks_released=3");
    }
}
