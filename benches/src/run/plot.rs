//! The run's timeline as SVG and PNG: per target, throughput (errors marked in red) and
//! p99 / max latency per 100 ms, with events shaded.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::TargetResult;

fn size(results: &[TargetResult]) -> (u32, u32) {
    (1200, 360 * results.len().max(1) as u32)
}

/// Registers the bundled DejaVu Sans font for the plots' text (once per process), so
/// plotting needs no system fonts.
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!("the bundled plot font could not be loaded"))
    }
}

/// Writes the SVG plot.
pub fn svg(path: &Path, results: &[TargetResult], duration: f64) -> Result<()> {
    ensure_font()?;
    let root = SVGBackend::new(path, size(results)).into_drawing_area();
    draw(root, path, results, duration)
}

/// Writes the PNG plot.
pub fn png(path: &Path, results: &[TargetResult], duration: f64) -> Result<()> {
    ensure_font()?;
    let root = BitMapBackend::new(path, size(results)).into_drawing_area();
    draw(root, path, results, duration)
}

type Chart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// The name of an event's shaded band, and its steps when the event printed a
/// switchover's report (`lameduck 78 ms, revoke 7 ms, …`).
fn band_label(e: &super::events::EventRecord) -> (String, Option<String>) {
    let report = serde_json::from_str::<serde_json::Value>(e.output.trim()).ok();
    let steps = report
        .as_ref()
        .and_then(|r| r["steps"].as_array())
        .map(|steps| {
            steps
                .iter()
                .map(|st| {
                    format!(
                        "{} {:.0} ms",
                        st["step"].as_str().unwrap_or("?"),
                        st["ms"].as_f64().unwrap_or(0.0)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        });
    let name = if e.command.contains("/switchover") || steps.is_some() {
        "switchover"
    } else if e.command.contains("failover") || e.command.contains("crash") {
        "failover"
    } else {
        "event"
    };
    (name.to_string(), steps)
}

/// One panel: title, axes over the run, events shaded and named; series are drawn by
/// the caller.
fn panel<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    title: String,
    duration: f64,
    ymax: f64,
    events: &[super::events::EventRecord],
) -> Result<Chart<'a, DB>> {
    let err = |e: &dyn std::fmt::Display| anyhow!("plotting: {e}");
    // Room on the right and below, so the last tick and the axis name are not cut off.
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(8)
        .margin_right(24)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..duration, 0f64..ymax)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds into the run")
        .draw()
        .map_err(|e| err(&e))?;
    let shade = RGBColor(255, 170, 0).mix(0.25);
    for e in events {
        let end = e.ended.max(e.started + 0.1);
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(e.started, 0.0), (end, ymax)],
                shade.filled(),
            )))
            .map_err(|e| err(&e))?;
        let (name, steps) = band_label(e);
        let label = format!("{name} ({:.0} ms)", (e.ended - e.started) * 1000.0);
        let dark = RGBColor(150, 80, 0);
        chart
            .draw_series(std::iter::once(Text::new(
                label,
                (e.started, ymax * 0.97),
                ("sans-serif", 13).into_font().color(&dark),
            )))
            .map_err(|e| err(&e))?;
        if let Some(steps) = steps {
            // Three steps a line, so the text stays inside the panel.
            let parts: Vec<&str> = steps.split(", ").collect();
            for (line, chunk) in parts.chunks(3).enumerate() {
                chart
                    .draw_series(std::iter::once(Text::new(
                        chunk.join(", "),
                        (e.started, ymax * (0.88 - 0.09 * line as f64)),
                        ("sans-serif", 11).into_font().color(&dark),
                    )))
                    .map_err(|e| err(&e))?;
            }
        }
    }
    Ok(chart)
}

/// The timeline's complete 100 ms buckets: the last one, cut short by the end of the
/// run, would read as a collapse.
fn complete(tl: &[super::stats::Point], duration: f64) -> &[super::stats::Point] {
    let n = tl
        .iter()
        .take_while(|p| p.t + 0.1 <= duration + 1e-6)
        .count();
    &tl[..n]
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    path: &Path,
    results: &[TargetResult],
    duration: f64,
) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("plotting {}: {e}", path.display());
    let n = results.len().max(1);
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let rows = root.split_evenly((n * 2, 1));
    // One scale for every target's throughput, and one for every target's latency, so
    // the panels of a run compare at a glance.
    let timelines: Vec<&[super::stats::Point]> = results
        .iter()
        .map(|r| complete(&r.summary.timeline, duration))
        .collect();
    let tps_max = timelines
        .iter()
        .flat_map(|tl| tl.iter())
        .map(|p| p.txns as f64 * 10.0)
        .fold(1.0, f64::max)
        * 1.15;
    let lat_max = timelines
        .iter()
        .flat_map(|tl| tl.iter())
        .map(|p| p.max)
        .fold(1.0, f64::max)
        * 1.15;
    for (i, r) in results.iter().enumerate() {
        let tl = timelines[i];
        let title = format!("{}: transactions/s per 100 ms (errors in red)", r.name);
        let mut chart = panel(&rows[2 * i], title, duration, tps_max, &r.events)?;
        chart
            .draw_series(LineSeries::new(
                tl.iter().map(|p| (p.t, p.txns as f64 * 10.0)),
                &BLUE,
            ))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(
                tl.iter()
                    .filter(|p| p.errors > 0)
                    .map(|p| Circle::new((p.t, p.errors as f64 * 10.0), 3, RED.filled())),
            )
            .map_err(|e| err(&e))?;

        let title = format!("{}: latency ms per 100 ms (p99 blue, max grey)", r.name);
        let mut chart = panel(&rows[2 * i + 1], title, duration, lat_max, &r.events)?;
        chart
            .draw_series(LineSeries::new(
                tl.iter().map(|p| (p.t, p.max)),
                &RGBColor(150, 150, 150),
            ))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(tl.iter().map(|p| (p.t, p.p99)), &BLUE))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::events::EventRecord;

    #[test]
    fn bands_are_named_and_partial_buckets_left_out() {
        let e = EventRecord {
            command: "POST http://127.0.0.1:1/v1/shards/main/switchover".into(),
            started: 1.0,
            ended: 1.5,
            exit_code: Some(0),
            output: r#"{"steps":[{"step":"lameduck","ms":78.2},{"step":"revoke","ms":7.0}]}"#
                .into(),
        };
        let (name, steps) = band_label(&e);
        assert_eq!(name, "switchover");
        assert_eq!(steps.as_deref(), Some("lameduck 78 ms, revoke 7 ms"));
        let p = |t: f64| super::super::stats::Point {
            t,
            ..Default::default()
        };
        let tl = vec![p(0.0), p(0.1), p(0.9), p(1.0)];
        assert_eq!(complete(&tl, 1.05).len(), 3);
    }
}
