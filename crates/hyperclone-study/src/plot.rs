//! PNG plots of an experiment (plotters, bitmap backend). The font is compiled in (DejaVu
//! Sans via the `dejavu` crate), so plots render the same on machines without fonts.

use crate::curve::{Curve, EvalPoint, RunRole};
use crate::report::Report;
use crate::settings::Arm;
use crate::Result;
use hyperclone_nn::NnError;
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
        RunRole::Clone => PALETTE[i % PALETTE.len()],
    }
}

fn err<E: std::fmt::Display>(e: E) -> NnError {
    NnError::Input(format!("plotting: {e}"))
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

/// (tokens in millions, mean, min, max) per evaluation.
type Band = Vec<(f64, f64, f64, f64)>;

/// Mean and (min, max) over seeds at each evaluation of an arm's final runs: (tokens in
/// millions, mean, min, max). Seeds share the evaluation steps.
fn seed_band(report: &Report, arm: &str, value: impl Fn(&EvalPoint) -> Option<f64>) -> Band {
    let curves: Vec<&Curve> = report
        .settings
        .seeds
        .iter()
        .filter_map(|&seed| report.runs.finals.get(&(arm, seed)))
        .collect();
    let Some(first) = curves.first() else {
        return Vec::new();
    };
    (0..first.evals.len())
        .filter_map(|i| {
            let vals: Vec<f64> = curves
                .iter()
                .filter_map(|c| c.evals.get(i).and_then(&value))
                .collect();
            if vals.len() != curves.len() {
                return None;
            }
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            let lo = vals.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            Some((first.evals[i].tokens / 1e6, mean, lo, hi))
        })
        .collect()
}

/// Draws an arm's mean line and its seed band (min to max, translucent).
fn draw_band(
    chart: &mut Chart,
    band: &[(f64, f64, f64, f64)],
    c: RGBColor,
    label: String,
    (y0, y1): (f64, f64),
) -> Result<()> {
    let clamp = |y: f64| y.clamp(y0, y1);
    let mut polygon: Vec<(f64, f64)> = band.iter().map(|p| (p.0, clamp(p.3))).collect();
    polygon.extend(band.iter().rev().map(|p| (p.0, clamp(p.2))));
    chart
        .draw_series(std::iter::once(Polygon::new(polygon, c.mix(0.18).filled())))
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            band.iter().map(|p| (p.0, clamp(p.1))),
            c.stroke_width(3),
        ))
        .map_err(err)?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
    Ok(())
}

/// Validation loss vs tokens, mean over seeds with the seed band: the whole runs (left) and
/// a zoom on where they finish (right), with the largest base's final loss dashed.
pub fn val_loss(report: &Report, path: &Path) -> Result<()> {
    fonts();
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (left, right) = root.split_horizontally(SIZE.0 / 2);
    let bands: Vec<(&Arm, Band)> = report
        .arms
        .iter()
        .map(|a| {
            (
                &a.arm,
                seed_band(report, a.arm.name(), |e| Some(e.val_loss)),
            )
        })
        .filter(|(_, b)| !b.is_empty())
        .collect();
    let max_tokens = bands
        .iter()
        .flat_map(|(_, b)| b.last().map(|p| p.0))
        .fold(0.1, f64::max);
    let lo = bands
        .iter()
        .flat_map(|(_, b)| b.iter().map(|p| p.2))
        .fold(f64::INFINITY, f64::min);
    let hi = bands
        .iter()
        .flat_map(|(_, b)| b.iter().map(|p| p.3))
        .fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let base = report
        .runs
        .bases
        .get(&report.settings.largest_base())
        .map(Curve::final_loss);
    let top = base.unwrap_or(hi).max(lo);
    let zoom_hi = top + 0.35 * (top - lo).abs().max(0.05);
    for (area, (y0, y1), title, legend) in [
        (
            &left,
            (lo - 0.05, hi + 0.05),
            "validation loss (mean over seeds, band: min-max)",
            true,
        ),
        (
            &right,
            (lo - 0.02, zoom_hi),
            "validation loss (zoom)",
            false,
        ),
    ] {
        let mut chart = frame(area, title, max_tokens, (y0, y1), "loss (nats/token)")?;
        if let Some(base) = base {
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
        }
        for (i, (arm, band)) in bands.iter().enumerate() {
            let c = colour(i, arm.role());
            let last = band.last().map_or(f64::NAN, |p| p.1);
            draw_band(
                &mut chart,
                band,
                c,
                format!("{} ({last:.3})", arm.name()),
                (y0, y1),
            )?;
        }
        if legend {
            draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Symmetry (mean row-half cosine of the grown matrices) vs tokens, for the clone arms.
pub fn symmetry(report: &Report, path: &Path) -> Result<()> {
    fonts();
    let root = BitMapBackend::new(path, (SIZE.0 / 2 + 100, SIZE.1)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let bands: Vec<(usize, &Arm, Band)> = report
        .arms
        .iter()
        .enumerate()
        .filter(|(_, a)| a.arm.role() == RunRole::Clone)
        .map(|(i, a)| (i, &a.arm, seed_band(report, a.arm.name(), |e| e.symmetry)))
        .filter(|(_, _, b)| !b.is_empty())
        .collect();
    let max_tokens = bands
        .iter()
        .flat_map(|(_, _, b)| b.last().map(|p| p.0))
        .fold(0.1, f64::max);
    let lo = bands
        .iter()
        .flat_map(|(_, _, b)| b.iter().map(|p| p.2))
        .fold(1.0, f64::min);
    let y0 = (lo - 0.05 * (1.0 - lo).max(0.01)).max(-1.0);
    let y1 = 1.0 + 0.02 * (1.0 - y0);
    let mut chart = frame(
        &root,
        "symmetry of the grown weights",
        max_tokens,
        (y0, y1),
        "mean row-half cosine",
    )?;
    for (i, arm, band) in &bands {
        let last = band.last().map_or(f64::NAN, |p| p.1);
        draw_band(
            &mut chart,
            band,
            colour(*i, arm.role()),
            format!("{} ({last:.4})", arm.name()),
            (y0, y1),
        )?;
    }
    draw_legend(&mut chart, SeriesLabelPosition::LowerLeft)?;
    root.present().map_err(err)?;
    Ok(())
}

/// (loss level, speedup) points.
type Levels = Vec<(f64, f64)>;

/// Speedup (random-init tokens / clone tokens to reach a loss) at each loss level between
/// the random init's final loss and the base's, mean over seeds; 1x and 2x dashed.
pub fn speedup(report: &Report, path: &Path) -> Result<()> {
    fonts();
    let root = BitMapBackend::new(path, (SIZE.0 / 2 + 100, SIZE.1)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    // Every clone arm from the largest base, and the best arm from each smaller base.
    let top = report.settings.largest_base();
    let mut curves: Vec<(usize, String, Levels)> = report
        .arms
        .iter()
        .enumerate()
        .filter(|(_, a)| a.arm.role() == RunRole::Clone)
        .map(|(i, a)| {
            (
                i,
                format!("{} (base-{top})", a.arm.name()),
                report.speedup_curve(top, a.arm),
            )
        })
        .collect();
    for (j, row) in report
        .budget
        .iter()
        .enumerate()
        .filter(|(_, r)| r.steps != top)
    {
        curves.push((
            5 + j,
            format!("{} (base-{})", row.arm.name(), row.steps),
            report.speedup_curve(row.steps, row.arm),
        ));
    }
    curves.retain(|(_, _, c)| !c.is_empty());
    let xs = || curves.iter().flat_map(|(_, _, c)| c.iter().map(|p| p.0));
    let (x0, x1) = (
        xs().fold(f64::INFINITY, f64::min),
        xs().fold(f64::NEG_INFINITY, f64::max),
    );
    let (x0, x1) = if x0.is_finite() && x1 > x0 {
        (x0, x1)
    } else {
        (0.0, 1.0)
    };
    let y1 = curves
        .iter()
        .flat_map(|(_, _, c)| c.iter().map(|p| p.1))
        .filter(|y| y.is_finite())
        .fold(2.5, f64::max)
        .min(50.0);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "speedup over random init, by loss level",
            ("sans-serif", 24),
        )
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, 0.0..y1 * 1.05)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("validation loss reached (lower = later in training)")
        .y_desc("tokens(random init) / tokens(clone)")
        .label_style(("sans-serif", 16))
        .draw()
        .map_err(err)?;
    for level in [1.0, 2.0] {
        chart
            .draw_series(DashedLineSeries::new(
                [(x0, level), (x1, level)],
                8,
                6,
                BLACK.stroke_width(1),
            ))
            .map_err(err)?;
    }
    for (i, label, c) in &curves {
        let col = colour(*i, RunRole::Clone);
        chart
            .draw_series(LineSeries::new(
                c.iter().map(|p| (p.0, p.1.min(y1))),
                col.stroke_width(3),
            ))
            .map_err(err)?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(3)));
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    root.present().map_err(err)?;
    Ok(())
}
