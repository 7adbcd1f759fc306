//! `--chart OUT.svg --from results.jsonl`: median end latency against the
//! session's lock count, one panel per backend, every implementation timed, drawn
//! from the JSON lines the timing mode printed (log-log axes, so locks = 0 is
//! left to the table).
use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use crate::fixture::BoxResult;
use crate::report::EndLine;

const BACKEND_ORDER: [&str; 4] = ["sqlite-memory", "sqlite-wal", "postgres", "mysql"];

/// Series per backend and implementation: (locks, median µs), sorted by locks.
type Series = BTreeMap<String, BTreeMap<String, Vec<(f64, f64)>>>;

fn read_series(from: &Path, context_bytes: usize, background: u64) -> BoxResult<Series> {
    let text = std::fs::read_to_string(from)
        .map_err(|e| format!("cannot read {}: {e}", from.display()))?;
    let mut series = Series::new();
    for line in text.lines() {
        // Other modes print other shapes of line; only timed ends are drawn.
        let Ok(end) = serde_json::from_str::<EndLine>(line) else {
            continue;
        };
        if end.locks == 0
            || end.context_bytes != context_bytes
            || end.background_sessions != background
        {
            continue;
        }
        let points = series
            .entry(end.backend)
            .or_default()
            .entry(end.implementation)
            .or_default();
        // A later run of the same point replaces an earlier one.
        points.retain(|&(locks, _)| locks != end.locks as f64);
        points.push((end.locks as f64, end.median_us));
    }
    for impls in series.values_mut() {
        for points in impls.values_mut() {
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
    }
    if series.is_empty() {
        return Err(format!(
            "{} has no timed ends with context_bytes {context_bytes} and background {background}",
            from.display()
        )
        .into());
    }
    Ok(series)
}

pub fn draw(out: &Path, from: &Path) -> BoxResult<()> {
    let (context_bytes, background) = (1024, 1000);
    let series = read_series(from, context_bytes, background)?;
    let mut backends: Vec<&String> = series.keys().collect();
    backends.sort_by_key(|b| {
        BACKEND_ORDER
            .iter()
            .position(|o| o == b)
            .unwrap_or(usize::MAX)
    });

    let cols = backends.len().min(2);
    let rows = backends.len().div_ceil(cols);
    let height = 60 + 400 * u32::try_from(rows)?;
    let root = SVGBackend::new(out, (1100, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "end_session latency (median of 50) vs locks held; context {context_bytes} B, {background} background sessions"
        ),
        ("sans-serif", 20),
    )?;
    let panels = root.split_evenly((rows, cols));
    for (panel, backend) in panels.iter().zip(backends) {
        let impls = &series[backend];
        let all = impls.values().flatten();
        let (x_max, y_min, y_max) = all.fold((1.0f64, f64::MAX, 1.0f64), |(x, lo, hi), p| {
            (x.max(p.0), lo.min(p.1), hi.max(p.1))
        });
        let mut chart = ChartBuilder::on(panel)
            .caption(backend, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(
                (1.0f64..x_max * 1.5).log_scale(),
                (y_min.min(y_max) / 1.5..y_max * 1.5).log_scale(),
            )?;
        chart
            .configure_mesh()
            .x_desc("locks held by the ended session")
            .y_desc("median latency (µs)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;
        for (name, points) in impls {
            let color = match name.as_str() {
                "orm" => BLUE,
                "raw-seed" => RED,
                _ => GREEN,
            };
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
