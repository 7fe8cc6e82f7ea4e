//! The study folder and the finished runs in it:
//!
//! ```text
//! OUT/experiment.json, corpus.json, tokenizer.json, base-config.json, tokens/
//! OUT/bases/base-N/                       each small base (N steps)
//! OUT/clones/base-N/VARIANT[-sSEED]/      its clones (noisy ones per seed)
//! OUT/screen/ARM/lrLR/                    the lr screen from the largest base
//! OUT/screen/base-N/ARM/lrLR/             ... and from a smaller base
//! OUT/runs/ARM/sSEED/                     the final runs from the largest base
//! OUT/budget/base-N/ARM/sSEED/            the chosen clone arm from a smaller base
//! ```
//!
//! Every run folder is a `hyperclone train` output (last/ + metrics.jsonl); a run counts
//! once its last evaluation is at its saved step.

use crate::curve::Curve;
use crate::settings::{Arm, Settings};
use crate::Result;
use hyperclone_core::Variant;
use hyperclone_nn::trainer::read_state;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The finished runs, by where they sit in the study (lr keys are `f64::to_bits`).
#[derive(Default)]
pub struct StudyRuns {
    pub bases: BTreeMap<u64, Curve>,
    pub screen: BTreeMap<(&'static str, u64), Curve>,
    pub finals: BTreeMap<(&'static str, u64), Curve>,
    pub budget: BTreeMap<(u64, &'static str, u64), Curve>,
    /// Final screen losses from the smaller bases: (base steps, arm, lr bits) -> loss.
    pub budget_screen: BTreeMap<(u64, &'static str, u64), f64>,
}

/// The small base trained for `steps` steps.
pub fn base_dir(out: &Path, steps: u64) -> PathBuf {
    out.join("bases").join(format!("base-{steps}"))
}

/// A clone of that base; noisy clones differ per seed, the others are shared by every seed.
pub fn clone_dir(out: &Path, base_steps: u64, variant: Variant, seed: u64) -> PathBuf {
    let name = if variant.is_noisy() {
        format!("{}-s{seed}", variant.name())
    } else {
        variant.name().to_string()
    };
    out.join("clones")
        .join(format!("base-{base_steps}"))
        .join(name)
}

/// Screen runs from the largest base live in screen/ARM/, from a smaller one in
/// screen/base-N/ARM/.
pub fn screen_arm_dir(out: &Path, base_steps: u64, top: u64, arm: Arm) -> PathBuf {
    if base_steps == top {
        out.join("screen").join(arm.name())
    } else {
        out.join("screen")
            .join(format!("base-{base_steps}"))
            .join(arm.name())
    }
}

pub fn final_dir(out: &Path, arm: Arm, seed: u64) -> PathBuf {
    out.join("runs").join(arm.name()).join(format!("s{seed}"))
}

pub fn budget_dir(out: &Path, base_steps: u64, arm: Arm, seed: u64) -> PathBuf {
    out.join("budget")
        .join(format!("base-{base_steps}"))
        .join(arm.name())
        .join(format!("s{seed}"))
}

/// (lr, curve) of every finished screen run of `arm` from that base, whatever grid it came
/// from (the folder name holds the lr), in lr order; none when nothing was screened yet.
fn screened_curves(out: &Path, base_steps: u64, top: u64, arm: Arm) -> Vec<(f64, Curve)> {
    let dir = screen_arm_dir(out, base_steps, top, arm);
    let mut results: Vec<(f64, Curve)> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let path = entry.path();
            let lr = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("lr"))
                .and_then(|n| n.parse::<f64>().ok())?;
            Some((lr, finished_curve(arm.name(), &path)?))
        })
        .collect();
    results.sort_by(|a, b| a.0.total_cmp(&b.0));
    results
}

/// (lr, final validation loss) of every finished screen run of `arm` from that base.
pub fn read_screen(out: &Path, base_steps: u64, top: u64, arm: Arm) -> Result<Vec<(f64, f64)>> {
    Ok(screened_curves(out, base_steps, top, arm)
        .into_iter()
        .map(|(lr, c)| (lr, c.final_loss()))
        .collect())
}

/// A run's curve when the run has finished (its last evaluation is at its saved step).
pub fn finished_curve(name: &str, dir: &Path) -> Option<Curve> {
    let done = read_state(&dir.join("last")).ok()?;
    let curve = Curve::read(name, &dir.join("metrics.jsonl")).ok()?;
    (curve.evals.last()?.step == done).then_some(curve)
}

/// Every finished run's curve (missing ones are simply absent: the report says pending).
pub fn read_runs(out: &Path, s: &Settings) -> Result<StudyRuns> {
    let read = |name: String, dir: PathBuf| finished_curve(&name, &dir);
    let mut runs = StudyRuns::default();
    for &steps in &s.base_steps {
        if let Some(c) = read(format!("base-{steps}"), base_dir(out, steps)) {
            runs.bases.insert(steps, c);
        }
    }
    let top = s.largest_base();
    for &arm in &s.arms {
        for &steps in &s.base_steps[..s.base_steps.len() - 1] {
            for (lr, loss) in read_screen(out, steps, top, arm).unwrap_or_default() {
                runs.budget_screen
                    .insert((steps, arm.name(), lr.to_bits()), loss);
            }
        }
        for (lr, c) in screened_curves(out, top, top, arm) {
            runs.screen.insert((arm.name(), lr.to_bits()), c);
        }
        for &seed in &s.seeds {
            if let Some(c) = read(arm.name().into(), final_dir(out, arm, seed)) {
                runs.finals.insert((arm.name(), seed), c);
            }
            for &steps in &s.base_steps {
                if let Some(c) = read(arm.name().into(), budget_dir(out, steps, arm, seed)) {
                    runs.budget.insert((steps, arm.name(), seed), c);
                }
            }
        }
    }
    Ok(runs)
}

pub fn read_corpus(out: &Path) -> Value {
    std::fs::read_to_string(out.join("corpus.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

/// The two shapes and their parameter counts, for the report.
pub fn models_json(out: &Path, s: &Settings) -> Result<Value> {
    let describe = |dir: PathBuf| -> Result<Value> {
        let ckpt = hyperclone_core::Checkpoint::open(&dir)?;
        let c = &ckpt.config;
        let params: usize = ckpt.tensors.iter().map(|t| t.info.numel()).sum();
        Ok(json!({
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "num_hidden_layers": c.num_hidden_layers,
            "vocab_size": c.vocab_size,
            "parameters": params,
        }))
    };
    let top = s.largest_base();
    let base = base_dir(out, top).join("last");
    let large = clone_dir(out, top, Variant::Symmetric, 0);
    if !base.exists() || !large.exists() {
        return Ok(Value::Null);
    }
    Ok(json!({ "small": describe(base)?, "large": describe(large)? }))
}
