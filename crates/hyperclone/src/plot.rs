//! PNG plots of an experiment (plotters, bitmap backend). The font is compiled in (DejaVu
//! Sans via the `dejavu` crate), so plots render the same on machines without fonts.

use crate::experiment_report::{Curve, Report, RunRole};
use anyhow::{anyhow, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::path::Path;
use std::sync::Once;

const SIZE: (u32, u32) = (1400, 600);

fn fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Cannot fail: the bytes are a valid TrueType font compiled into the binary.
        let _ = register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

fn colour(i: usize, role: RunRole) -> RGBColor {
    const PALETTE: [RGBColor; 5] = [
        RGBColor(31, 119, 180),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
    ];
    match role {
        RunRole::Random => RGBColor(214, 39, 40),
        RunRole::Base => RGBColor(90, 90, 90),
        RunRole::Clone => PALETTE[i % PALETTE.len()],
    }
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e}")
}

type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Axes over tokens (millions, x) and `y`, with caption, grid and labels.
fn frame<'a, 'b>(
    area: &DrawingArea<BitMapBackend<'b>, Shift>,
    title: &str,
    max_tokens: f64,
    (y0, y1): (f64, f64),
    y_desc: &str,
) -> Result<Chart<'a, 'b>> {
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..max_tokens, y0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("tokens trained after growth (millions)")
        .y_desc(y_desc)
        .label_style(("sans-serif", 16))
        .draw()
        .map_err(err)?;
    Ok(chart)
}

fn draw_legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, position: SeriesLabelPosition) -> Result<()> {
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(position)
        .draw()
        .map_err(err)
}

/// Validation loss vs tokens: the whole runs (left) and a zoom on where they finish (right),
/// with the small base's final loss as a dashed line.
pub fn val_loss(report: &Report, path: &Path) -> Result<()> {
    fonts();
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (left, right) = root.split_horizontally(SIZE.0 / 2);
    let max_tokens = report.runs.iter().map(Curve::tokens).fold(1.0, f64::max) / 1e6;
    let all = || {
        report
            .runs
            .iter()
            .flat_map(|r| r.evals.iter().map(|e| e.val_loss))
    };
    let lo = all().fold(f64::INFINITY, f64::min);
    let hi = all().fold(f64::NEG_INFINITY, f64::max);
    let base = report.base.final_loss();
    // The zoom spans the clones' starting point (the base loss) down to the best final loss.
    let zoom_hi = base.max(lo) + 0.35 * (base - lo).abs().max(0.05);
    for (area, (y0, y1), title, legend) in [
        (&left, (lo - 0.05, hi + 0.05), "validation loss", true),
        (
            &right,
            (lo - 0.02, zoom_hi),
            "validation loss (zoom)",
            false,
        ),
    ] {
        let mut chart = frame(area, title, max_tokens, (y0, y1), "loss (nats/token)")?;
        chart
            .draw_series(DashedLineSeries::new(
                [(0.0, base), (max_tokens, base)],
                8,
                6,
                BLACK.stroke_width(2),
            ))
            .map_err(err)?
            .label(format!("small base, final ({base:.3})"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
        for (i, run) in report.runs.iter().enumerate() {
            let c = colour(i, run.role);
            let points: Vec<(f64, f64)> = run
                .evals
                .iter()
                .map(|e| (e.tokens / 1e6, e.val_loss.clamp(y0, y1)))
                .collect();
            chart
                .draw_series(LineSeries::new(points, c.stroke_width(3)))
                .map_err(err)?
                .label(format!("{} ({:.3})", run.name, run.final_loss()))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3))
                });
        }
        if legend {
            draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Symmetry (mean row-half cosine of the grown matrices) vs tokens, for the clones.
pub fn symmetry(report: &Report, path: &Path) -> Result<()> {
    fonts();
    let root = BitMapBackend::new(path, (SIZE.0 / 2 + 100, SIZE.1)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let clones: Vec<(usize, &Curve)> = report
        .runs
        .iter()
        .enumerate()
        .filter(|(_, r)| r.role == RunRole::Clone)
        .collect();
    let max_tokens = report.runs.iter().map(Curve::tokens).fold(1.0, f64::max) / 1e6;
    let lo = clones
        .iter()
        .flat_map(|(_, r)| r.evals.iter().filter_map(|e| e.symmetry))
        .fold(1.0, f64::min);
    let y0 = (lo - 0.05 * (1.0 - lo).max(0.01)).max(-1.0);
    let mut chart = frame(
        &root,
        "symmetry of the grown weights",
        max_tokens,
        (y0, 1.0 + 0.02 * (1.0 - y0)),
        "mean row-half cosine",
    )?;
    for (i, run) in clones {
        let c = colour(i, run.role);
        let points: Vec<(f64, f64)> = run
            .evals
            .iter()
            .filter_map(|e| e.symmetry.map(|s| (e.tokens / 1e6, s)))
            .collect();
        let last = points.last().map_or(f64::NAN, |p| p.1);
        chart
            .draw_series(LineSeries::new(points, c.stroke_width(3)))
            .map_err(err)?
            .label(format!("{} ({last:.4})", run.name))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
    }
    draw_legend(&mut chart, SeriesLabelPosition::LowerLeft)?;
    root.present().map_err(err)?;
    Ok(())
}
