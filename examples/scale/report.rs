//! Percentiles, peak memory, and the JSON lines the example prints.
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One timed configuration: the line `--impl`/`--locks`/… print.
/// Field order is the documented order of the JSON keys.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EndLine {
    #[serde(rename = "impl")]
    pub implementation: String,
    pub backend: String,
    pub locks: u64,
    pub context_bytes: usize,
    pub background_sessions: u64,
    pub iters: usize,
    pub median_us: f64,
    pub p99_us: f64,
    pub peak_rss_kb: u64,
}

/// `--concurrency N`: ends of fresh sessions one at a time and from N tasks.
#[derive(Clone, Debug, Serialize)]
pub struct ThroughputLine {
    pub mode: &'static str,
    #[serde(rename = "impl")]
    pub implementation: String,
    pub backend: String,
    pub locks: u64,
    pub context_bytes: usize,
    pub background_sessions: u64,
    pub sessions: usize,
    pub concurrency: usize,
    pub instances: usize,
    pub rounds: usize,
    /// Medians over the rounds.
    pub serial_per_s: f64,
    pub concurrent_per_s: f64,
    pub ratio: f64,
    pub serial_rounds: Vec<f64>,
    pub concurrent_rounds: Vec<f64>,
    pub serial_errors: u64,
    pub concurrent_errors: u64,
    pub first_error: Option<String>,
    pub peak_rss_kb: u64,
}

/// `--acquire`: acquire_lock latency.
#[derive(Clone, Debug, Serialize)]
pub struct AcquireLine {
    pub op: &'static str,
    pub backend: String,
    pub background_sessions: u64,
    pub iters: usize,
    pub median_us: f64,
    pub p99_us: f64,
    /// The one-statement floor on the same pool, interleaved with the library's.
    pub floor_median_us: f64,
    pub floor_p99_us: f64,
    pub ratio_to_floor: f64,
    pub peak_rss_kb: u64,
}

/// Median and 99th percentile (nearest rank) in microseconds, to 0.1 µs.
pub fn summarize(samples: &[Duration]) -> (f64, f64) {
    let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    us.sort_by(f64::total_cmp);
    let n = us.len();
    if n == 0 {
        return (0.0, 0.0);
    }
    let median = if n % 2 == 1 {
        us[n / 2]
    } else {
        (us[n / 2 - 1] + us[n / 2]) / 2.0
    };
    // Nearest rank: the smallest sample with at least 99 % of samples at or below it.
    let rank = (0.99 * n as f64).ceil() as usize;
    let p99 = us[rank.clamp(1, n) - 1];
    (round1(median), round1(p99))
}

pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// The process's peak resident set (VmHWM), in KiB; 0 where /proc is missing.
pub fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

pub fn print_json<T: Serialize>(line: &T) -> Result<(), serde_json::Error> {
    println!("{}", serde_json::to_string(line)?);
    Ok(())
}

/// A case that cannot run on this backend, and why.
#[derive(Debug, Serialize)]
pub struct SkippedLine {
    pub op: &'static str,
    pub backend: &'static str,
    pub case: &'static str,
    pub skipped: &'static str,
}
