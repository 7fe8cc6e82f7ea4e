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

/// Mean and (min, max) over seeds at each evaluation of a row's full-budget runs: (tokens
/// in millions, mean, min, max). Seeds share the evaluation steps.
fn seed_band(curves: &[&Curve], value: impl Fn(&EvalPoint) -> Option<f64>) -> Band {
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
            let (mean, lo, hi) = stats(&vals);
            Some((first.evals[i].tokens / 1e6, mean, lo, hi))
        })
        .collect()
}

/// (largest token count, lowest band floor, highest band top) over seed bands; the token
/// count at least 0.1 so an empty plot still has an axis.
fn extent<'a>(bands: impl Iterator<Item = &'a Band> + Clone) -> (f64, f64, f64) {
    let max_tokens = bands
        .clone()
        .flat_map(|b| b.last().map(|p| p.0))
        .fold(0.1, f64::max);
    let lo = bands
        .clone()
        .flat_map(|b| b.iter().map(|p| p.2))
        .fold(f64::INFINITY, f64::min);
    let hi = bands
        .flat_map(|b| b.iter().map(|p| p.3))
        .fold(f64::NEG_INFINITY, f64::max);
    (max_tokens, lo, hi)
}

fn stats(vals: &[f64]) -> (f64, f64, f64) {
    let mean = vals.iter().sum::<f64>() / vals.len() as f64;
    let lo = vals.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    (mean, lo, hi)
}

/// (label, role, full-budget curves over seeds) of the random init and every row.
fn full_budget_curves(report: &Report) -> Vec<(String, RunRole, Vec<&Curve>)> {
    let s = &report.settings;
    let curves = |base: Option<u64>, arm: Arm| -> Vec<&Curve> {
        let lr = report.ladder_lr(base, arm);
        s.seeds
            .iter()
            .filter_map(|&seed| report.runs.run(base, arm, lr?, s.steps, seed))
            .map(|r| &r.curve)
            .collect()
    };
    let mut all = vec![(
        "random-init".to_string(),
        RunRole::Random,
        curves(None, Arm::RANDOM),
    )];
    for row in &report.rows {
        all.push((
            row.label(),
            RunRole::Clone,
            curves(Some(row.base_steps), row.arm),
        ));
    }
    all.retain(|c| !c.2.is_empty());
    all
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
    let bands: Vec<(String, RunRole, Band)> = full_budget_curves(report)
        .into_iter()
        .map(|(label, role, curves)| (label, role, seed_band(&curves, |e| Some(e.val_loss))))
        .filter(|(_, _, b)| !b.is_empty())
        .collect();
    let (max_tokens, lo, hi) = extent(bands.iter().map(|(_, _, b)| b));
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let base = report
        .runs
        .bases
        .get(&report.settings.largest_base())
        .map(|r| r.curve.final_loss());
    let top = base.unwrap_or(hi).max(lo);
    let zoom_hi = top + 0.35 * (top - lo).abs().max(0.05);
    for (area, (y0, y1), title, legend) in [
        (
            &left,
            (lo - 0.05, hi + 0.05),
            "secondary view: within the full-budget runs (band: seeds' min-max)",
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
        for (i, (label, role, band)) in bands.iter().enumerate() {
            let c = colour(i, *role);
            let last = band.last().map_or(f64::NAN, |p| p.1);
            draw_band(
                &mut chart,
                band,
                c,
                format!("{label} ({last:.3})"),
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
    let bands: Vec<(usize, String, Band)> = full_budget_curves(report)
        .into_iter()
        .enumerate()
        .filter(|(_, c)| c.1 == RunRole::Clone)
        .map(|(i, (label, _, curves))| (i, label, seed_band(&curves, |e| e.symmetry)))
        .filter(|(_, _, b)| !b.is_empty())
        .collect();
    let (max_tokens, lo, _) = extent(bands.iter().map(|(_, _, b)| b));
    let lo = lo.min(1.0);
    let y0 = (lo - 0.05 * (1.0 - lo).max(0.01)).max(-1.0);
    let y1 = 1.0 + 0.02 * (1.0 - y0);
    let mut chart = frame(
        &root,
        "symmetry of the grown weights (full-budget runs)",
        max_tokens,
        (y0, y1),
        "mean row-half cosine",
    )?;
    for (i, label, band) in &bands {
        let last = band.last().map_or(f64::NAN, |p| p.1);
        draw_band(
            &mut chart,
            band,
            colour(*i, RunRole::Clone),
            format!("{label} ({last:.4})"),
            (y0, y1),
        )?;
    }
    draw_legend(&mut chart, SeriesLabelPosition::LowerLeft)?;
    root.present().map_err(err)?;
    Ok(())
}

/// One row's final losses over the ladder: (budget tokens, mean, min, max, every seed's).
type Ladder = Vec<(f64, f64, f64, f64, Vec<f64>)>;

fn ladder_of(report: &Report, base: Option<u64>, arm: Arm) -> Ladder {
    let s = &report.settings;
    let lr = report.ladder_lr(base, arm);
    s.ladder_steps()
        .into_iter()
        .filter_map(|steps| {
            let vals: Vec<f64> = s
                .seeds
                .iter()
                .filter_map(|&seed| report.runs.run(base, arm, lr?, steps, seed)?.final_loss())
                .collect();
            if vals.is_empty() {
                return None;
            }
            let (mean, lo, hi) = stats(&vals);
            Some(((steps * s.tokens_per_step()) as f64, mean, lo, hi, vals))
        })
        .collect()
}

/// Final loss against budget (log scale), one line per arm: the mean over the seeds that
/// ran each rung, their min-max band, every seed as a dot; the random init's mean final
/// loss at its full budget (the target) and each base's final loss dashed.
pub fn budget(report: &Report, path: &Path) -> Result<()> {
    fonts();
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut lines: Vec<(String, RGBColor, Ladder)> = vec![(
        "random-init".into(),
        colour(0, RunRole::Random),
        ladder_of(report, None, Arm::RANDOM),
    )];
    for (i, row) in report.rows.iter().enumerate() {
        lines.push((
            row.label(),
            // i + 1: the same colour as the row in val_loss.png, where the random init is first.
            colour(i + 1, RunRole::Clone),
            ladder_of(report, Some(row.base_steps), row.arm),
        ));
    }
    lines.retain(|l| !l.2.is_empty());
    let xs = || lines.iter().flat_map(|l| l.2.iter().map(|p| p.0));
    let ys = || {
        lines
            .iter()
            .flat_map(|l| l.2.iter().flat_map(|p| p.4.iter().copied()))
    };
    let (x0, x1) = (xs().fold(f64::INFINITY, f64::min), xs().fold(0.0, f64::max));
    let (x0, x1) = if x0.is_finite() && x1 > x0 {
        (x0 / 1.3, x1 * 1.3)
    } else {
        (1.0, 10.0)
    };
    let mut refs: Vec<(String, f64)> = Vec::new();
    let randoms: Vec<f64> = report.random_finals().iter().map(|r| r.1).collect();
    if !randoms.is_empty() {
        refs.push((
            "target: random init's final loss at its full budget".into(),
            randoms.iter().sum::<f64>() / randoms.len() as f64,
        ));
    }
    for &b in &report.settings.base_steps {
        if let Some(l) = report.runs.bases.get(&b).and_then(|r| r.final_loss()) {
            refs.push((format!("base-{b}, final"), l));
        }
    }
    let y_lo = ys()
        .chain(refs.iter().map(|r| r.1))
        .fold(f64::INFINITY, f64::min);
    let y_hi = ys()
        .chain(refs.iter().map(|r| r.1))
        .fold(f64::NEG_INFINITY, f64::max);
    let (y0, y1) = if y_lo.is_finite() {
        let pad = 0.05 * (y_hi - y_lo).max(0.02);
        (y_lo - pad, y_hi + pad)
    } else {
        (0.0, 1.0)
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "final validation loss against budget: complete runs (band: seeds' min-max)",
            ("sans-serif", 24),
        )
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d((x0..x1).log_scale(), y0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("training tokens of the run (log scale)")
        .y_desc("final validation loss (nats/token)")
        .x_label_formatter(&|x| format!("{:.2}M", x / 1e6))
        .label_style(("sans-serif", 16))
        .draw()
        .map_err(err)?;
    for (i, (label, y)) in refs.iter().enumerate() {
        let c = if i == 0 { RGBColor(214, 39, 40) } else { BLACK };
        chart
            .draw_series(DashedLineSeries::new(
                [(x0, *y), (x1, *y)],
                8,
                6,
                c.stroke_width(2),
            ))
            .map_err(err)?
            .label(format!("{label} ({y:.3})"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
    }
    for (label, c, ladder) in &lines {
        let c = *c;
        if ladder.len() > 1 {
            let mut polygon: Vec<(f64, f64)> = ladder.iter().map(|p| (p.0, p.3)).collect();
            polygon.extend(ladder.iter().rev().map(|p| (p.0, p.2)));
            chart
                .draw_series(std::iter::once(Polygon::new(polygon, c.mix(0.18).filled())))
                .map_err(err)?;
        }
        chart
            .draw_series(LineSeries::new(
                ladder.iter().map(|p| (p.0, p.1)),
                c.stroke_width(3),
            ))
            .map_err(err)?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
        chart
            .draw_series(ladder.iter().flat_map(|p| {
                p.4.iter()
                    .map(move |v| Circle::new((p.0, *v), 4, c.filled()))
            }))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
