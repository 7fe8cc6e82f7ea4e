//! The study's durable record (`record`, e.g. docs/experiment/budget-matched): what a study
//! needs to continue on another machine, small enough to commit. It mirrors OUT:
//!
//! ```text
//! RECORD/experiment.json, corpus.json, tokenizer.json, base-config.json, models.json
//! RECORD/<run's path under OUT>/recorded.json     {"step": its last step, "train_seconds"}
//! RECORD/<run's path under OUT>/final_eval.json   bases and ladder runs
//! RECORD/curves/<run's path under OUT>.csv        its compact curve
//! RECORD/report.md, report.json, *.png
//! ```
//!
//! No weights and no optimizer state. [`save`] writes every finished run of OUT into the
//! record (the study calls it after each run); [`restore`] gives OUT the record's runs it
//! lacks as finished runs without weights (runs.rs reads them as any finished run), and the
//! study retrains a restored base from its seed only when a run grows from it.

use crate::evaluate;
use crate::runs::read_state_at;
use crate::runs::{base_dir, base_keys, curve_file, finished_curve, ladder_folders, numbered};
use crate::runs::{recorded_step, screen_dir, MODELS, RECORDED, RECORDED_CURVE};
use crate::settings::Settings;
use crate::Result;
use hyperclone_nn::Context;
use serde_json::json;
use std::path::{Path, PathBuf};

/// The study's own files a continued study needs (the tokenizer: the same token ids).
const FILES: [&str; 5] = [
    "experiment.json",
    "corpus.json",
    "tokenizer.json",
    "base-config.json",
    MODELS,
];

/// The report as report.rs and plot.rs write it.
const REPORT: [&str; 5] = [
    "report.md",
    "report.json",
    "budget.png",
    "val_loss.png",
    "symmetry.png",
];

/// One run folder of the study's layout under a root (OUT or a record).
struct RunFolder {
    name: String,
    dir: PathBuf,
    /// The step it finishes at.
    steps: u64,
    /// Whether it counts only with its final evaluation (bases and ladder runs).
    evaluated: bool,
}

/// Every run folder under ROOT that the settings know of.
fn run_folders(root: &Path, s: &Settings) -> Vec<RunFolder> {
    let mut runs: Vec<RunFolder> = s
        .base_steps
        .iter()
        .map(|&steps| RunFolder {
            name: format!("base-{steps}"),
            dir: base_dir(root, steps),
            steps,
            evaluated: true,
        })
        .collect();
    for &arm in &s.arms {
        for base in base_keys(s, arm) {
            for (_, dir) in numbered::<f64>(&screen_dir(root, base, arm), "lr") {
                runs.push(RunFolder {
                    name: arm.name().to_string(),
                    dir,
                    steps: s.screen_steps,
                    evaluated: false,
                });
            }
            for (_, steps, _, dir) in ladder_folders(root, s, base, arm) {
                runs.push(RunFolder {
                    name: arm.name().to_string(),
                    dir,
                    steps,
                    evaluated: true,
                });
            }
        }
    }
    runs
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::copy(from, to)
        .map(|_| ())
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))
}

/// Writes every finished run of OUT (and the study's files) into RECORD; returns how many
/// runs the record holds from OUT. A run counts once it has reached its last step (and,
/// for bases and ladder runs, has its final evaluation); one that OUT holds only from a
/// record is written as it was recorded.
pub fn save(out: &Path, record: &Path, s: &Settings) -> Result<usize> {
    std::fs::create_dir_all(record).with_context(|| format!("creating {}", record.display()))?;
    for f in FILES {
        if out.join(f).is_file() {
            copy(&out.join(f), &record.join(f))?;
        }
    }
    let mut n = 0;
    for run in run_folders(out, s) {
        let rel = run.dir.strip_prefix(out).unwrap_or(&run.dir);
        let dst = record.join(rel);
        if run.evaluated
            && evaluate::read(&run.dir, s.final_eval_windows, s.seq, run.steps).is_none()
        {
            continue;
        }
        let (state, curve) = if recorded_step(&run.dir) == Some(run.steps) {
            (
                std::fs::read_to_string(run.dir.join(RECORDED))?,
                run.dir.join(RECORDED_CURVE),
            )
        } else if read_state_at(&run.dir) == Some(run.steps) {
            let Some(c) = finished_curve(&run.name, &run.dir) else {
                continue;
            };
            let csv = curve_file(out, &run.dir);
            if !csv.is_file() {
                crate::curve::write_compact(
                    &run.dir.join("metrics.jsonl"),
                    &csv,
                    (run.steps / 200).max(1),
                )?;
            }
            let state = json!({ "step": run.steps, "train_seconds": c.train_seconds });
            (serde_json::to_string_pretty(&state)?, csv)
        } else {
            continue;
        };
        std::fs::create_dir_all(&dst).with_context(|| format!("creating {}", dst.display()))?;
        std::fs::write(dst.join(RECORDED), state)?;
        let eval = run.dir.join(evaluate::FILE);
        if eval.is_file() {
            copy(&eval, &dst.join(evaluate::FILE))?;
        }
        copy(&curve, &curve_file(record, &dst))?;
        n += 1;
    }
    Ok(n)
}

/// Copies the report (report.md, report.json, the plots) from OUT into RECORD.
pub fn save_report(out: &Path, record: &Path) -> Result<()> {
    for f in REPORT {
        if out.join(f).is_file() {
            copy(&out.join(f), &record.join(f))?;
        }
    }
    Ok(())
}

/// Gives OUT every run RECORD holds that OUT has not finished, as a finished run without
/// weights (recorded.json, final_eval.json, the recorded curve), and the study's files OUT
/// lacks; returns how many runs were restored. A run OUT holds partly keeps its checkpoint
/// (a restored base retrained here resumes from it).
pub fn restore(record: &Path, out: &Path, s: &Settings) -> Result<usize> {
    for f in FILES {
        if record.join(f).is_file() && !out.join(f).exists() {
            copy(&record.join(f), &out.join(f))?;
        }
    }
    let mut n = 0;
    for run in run_folders(record, s) {
        let rel = run.dir.strip_prefix(record).unwrap_or(&run.dir);
        let dst = out.join(rel);
        if recorded_step(&run.dir) != Some(run.steps)
            || recorded_step(&dst).is_some()
            || read_state_at(&dst) == Some(run.steps)
        {
            continue;
        }
        let curve = curve_file(record, &run.dir);
        if !curve.is_file() {
            continue;
        }
        std::fs::create_dir_all(&dst).with_context(|| format!("creating {}", dst.display()))?;
        let eval = run.dir.join(evaluate::FILE);
        if eval.is_file() {
            copy(&eval, &dst.join(evaluate::FILE))?;
        }
        copy(&curve, &dst.join(RECORDED_CURVE))?;
        copy(&curve, &curve_file(out, &dst))?;
        // Last: the state marks the run finished once its files are in place.
        copy(&run.dir.join(RECORDED), &dst.join(RECORDED))?;
        n += 1;
    }
    Ok(n)
}
