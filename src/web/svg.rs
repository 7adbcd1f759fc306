//! Charts drawn on the server: plain SVG, no script.
use maud::{html, Markup};

use crate::views::Series;

const WIDTH: u32 = 360;
const HEIGHT: u32 = 64;

/// A bar per minute of `series`, scaled to its busiest minute, each bar
/// titled with its minute and count.
pub(crate) fn bars(id: &str, label: &str, series: &Series) -> Markup {
    let peak = series.per_minute.iter().copied().max().unwrap_or(0).max(1);
    let n = u32::try_from(series.per_minute.len()).unwrap_or(1).max(1);
    let step = WIDTH / n;
    let total: u64 = series.per_minute.iter().sum();
    html! {
        figure .chart {
            figcaption { (label) ": " strong { (total) } " in the last hour, at most " (peak) " a minute" }
            svg id=(id) xmlns="http://www.w3.org/2000/svg" width=(WIDTH) height=(HEIGHT)
                viewBox={ "0 0 " (WIDTH) " " (HEIGHT) } role="img" aria-label=(label) {
                rect x="0" y="0" width=(WIDTH) height=(HEIGHT) fill="#f9fafb" {}
                @for (i, count) in series.per_minute.iter().enumerate() {
                    @let i = u32::try_from(i).unwrap_or(0);
                    @let h = u32::try_from(count * u64::from(HEIGHT - 4) / peak).unwrap_or(HEIGHT);
                    @let minute = series.since + chrono::Duration::minutes(i64::from(i));
                    rect .bar x=(i * step) y=(HEIGHT - h) width=(step.saturating_sub(1).max(1)) height=(h) fill="#2563eb" {
                        title { (minute.format("%H:%M UTC")) ": " (count) }
                    }
                }
            }
        }
    }
}
