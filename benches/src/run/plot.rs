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

/// One panel: title, axes over the run, events shaded; series are drawn by the caller.
fn panel<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    title: String,
    duration: f64,
    ymax: f64,
    events: &[super::events::EventRecord],
) -> Result<Chart<'a, DB>> {
    let err = |e: &dyn std::fmt::Display| anyhow!("plotting: {e}");
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..duration, 0f64..ymax)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("s")
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
    }
    Ok(chart)
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
    for (i, r) in results.iter().enumerate() {
        let tl = &r.summary.timeline;
        let tps_max = tl.iter().map(|p| p.txns as f64 * 10.0).fold(1.0, f64::max) * 1.1;
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

        let lat_max = tl.iter().map(|p| p.max).fold(1.0, f64::max) * 1.1;
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
