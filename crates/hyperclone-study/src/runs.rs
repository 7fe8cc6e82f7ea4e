//! The study folder and the finished runs in it:
//!
//! ```text
//! OUT/experiment.json, corpus.json, tokenizer.json, base-config.json, tokens/
//! OUT/bases/base-N/                                  each small base (N steps)
//! OUT/clones/base-N/VARIANT[-sSEED]/                 its clones (noisy ones per seed)
//! OUT/screen/random-init/lrLR/                       the random init's lr screen
//! OUT/screen/base-N/ARM/lrLR/                        a clone arm's, from base-N
//! OUT/ladder/random-init/steps-B/sSEED/              a complete run of B steps
//! OUT/ladder/base-N/ARM/steps-B/sSEED/               ... of a clone arm from base-N
//! OUT/lrcheck/random-init/lrLR/, lrcheck/base-N/ARM/lrLR/   the full-budget lr check (seed 0)
//! OUT/curves/<the run's path>.csv                    every run's compact curve (committable)
//! ```
//!
//! Every run folder is a `hyperclone train` output (last/ + metrics.jsonl); a run counts
//! once its last evaluation is at its saved step, and a ladder run's final loss is its
//! final_eval.json (evaluate.rs).

use crate::curve::Curve;
use crate::evaluate::{self, FinalEval};
use crate::settings::{Arm, Settings};
use crate::Result;
use hyperclone_core::Variant;
use hyperclone_nn::trainer::read_state;
use hyperclone_nn::Context;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A finished run: its curve, and its final evaluation once made.
#[derive(Clone, Debug)]
pub struct Run {
    pub curve: Curve,
    pub final_eval: Option<FinalEval>,
}

impl Run {
    /// The budget-matched final loss: the final evaluation's (None until it is made).
    pub fn final_loss(&self) -> Option<f64> {
        self.final_eval.map(|e| e.val_loss)
    }
}

/// Which base a run grew from: none for the random init.
pub type BaseKey = Option<u64>;

/// The finished runs, by where they sit in the study (lr keys are `f64::to_bits`).
#[derive(Default)]
pub struct StudyRuns {
    pub bases: BTreeMap<u64, Run>,
    pub screen: BTreeMap<(BaseKey, Arm, u64), Curve>,
    /// (base, arm, steps, seed).
    pub ladder: BTreeMap<(BaseKey, Arm, u64, u64), Run>,
    /// The full-budget learning-rate check: (base, arm, lr bits), seed 0's complete runs of
    /// the full budget at the screened lr's neighbours (the screened lr itself is the ladder's
    /// top rung).
    pub lrcheck: BTreeMap<(BaseKey, Arm, u64), Run>,
}

impl StudyRuns {
    /// (steps, final loss) of one seed's finished and evaluated ladder runs, in step order.
    pub fn points(&self, base: BaseKey, arm: Arm, seed: u64) -> Vec<(u64, f64)> {
        self.ladder
            .iter()
            .filter(|((b, a, _, s), _)| *b == base && *a == arm && *s == seed)
            .filter_map(|((_, _, steps, _), r)| Some((*steps, r.final_loss()?)))
            .collect()
    }

    /// (lr, final loss) at the full budget on seed 0 of `arm` from `base`: the ladder's top
    /// rung at the screened `lr` and the lr check's runs, in lr order.
    pub fn lr_check_results(
        &self,
        s: &Settings,
        base: BaseKey,
        arm: Arm,
        lr: Option<f64>,
    ) -> Vec<(f64, f64)> {
        let mut r: Vec<(f64, f64)> = self
            .lrcheck
            .iter()
            .filter(|((b, a, _), _)| *b == base && *a == arm)
            .filter_map(|((_, _, lr), run)| Some((f64::from_bits(*lr), run.final_loss()?)))
            .collect();
        let top = self.ladder.get(&(base, arm, s.steps, s.seeds[0]));
        if let (Some(lr), Some(loss)) = (lr, top.and_then(Run::final_loss)) {
            r.push((lr, loss));
        }
        r.sort_by(|a, b| a.0.total_cmp(&b.0));
        r
    }

    /// (lr, final loss of its curve) of every finished screen run of `arm` from `base`.
    pub fn screen_results(&self, base: BaseKey, arm: Arm) -> Vec<(f64, f64)> {
        self.screen
            .iter()
            .filter(|((b, a, _), _)| *b == base && *a == arm)
            .map(|((_, _, lr), c)| (f64::from_bits(*lr), c.final_loss()))
            .collect()
    }
}

/// The base a run of `arm` grows from, in the row of base `steps` (the random init has none).
pub fn base_key(arm: Arm, steps: u64) -> BaseKey {
    arm.variant().map(|_| steps)
}

/// The distinct base keys `arm` runs under: one per base for a clone arm, one (None) for
/// the random init.
pub fn base_keys(s: &Settings, arm: Arm) -> Vec<BaseKey> {
    let mut keys: Vec<BaseKey> = s.base_steps.iter().map(|&b| base_key(arm, b)).collect();
    keys.dedup();
    keys
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

pub(crate) fn row_dir(out: &Path, what: &str, base: BaseKey, arm: Arm) -> PathBuf {
    match base {
        None => out.join(what).join(arm.name()),
        Some(b) => out.join(what).join(format!("base-{b}")).join(arm.name()),
    }
}

/// The screen runs of `arm` (from `base` for a clone arm) live in lrLR/ under this.
pub fn screen_dir(out: &Path, base: BaseKey, arm: Arm) -> PathBuf {
    row_dir(out, "screen", base, arm)
}

/// The full-budget lr check's runs of `arm` (from `base` for a clone arm) live in lrLR/
/// under this.
pub fn lrcheck_dir(out: &Path, base: BaseKey, arm: Arm) -> PathBuf {
    row_dir(out, "lrcheck", base, arm)
}

pub fn ladder_dir(out: &Path, base: BaseKey, arm: Arm, steps: u64, seed: u64) -> PathBuf {
    row_dir(out, "ladder", base, arm)
        .join(format!("steps-{steps}"))
        .join(format!("s{seed}"))
}

/// Where a run's compact curve is gathered: OUT/curves/ + the run's path under OUT + .csv.
pub fn curve_file(out: &Path, run: &Path) -> PathBuf {
    let rel = run.strip_prefix(out).unwrap_or(run);
    // Appended, not set_extension: lr2.5e-4 would lose its "5e-4".
    let mut name = out.join("curves").join(rel).into_os_string();
    name.push(".csv");
    PathBuf::from(name)
}

/// In a run folder restored from the study's record (record.rs): the run's state, a JSON
/// object with its finished `step` and `train_seconds`; the run has no weights there.
pub const RECORDED: &str = "recorded.json";
/// ... and its compact curve, as recorded.
pub const RECORDED_CURVE: &str = "recorded-curve.csv";

fn recorded_state(run: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(run.join(RECORDED)).ok()?).ok()
}

/// The step of a run's own checkpoint (None: it has none).
pub fn read_state_at(run: &Path) -> Option<u64> {
    read_state(&run.join("last")).ok()
}

/// The step a run restored from the record finished at (None: not from the record).
pub fn recorded_step(run: &Path) -> Option<u64> {
    recorded_state(run)?["step"].as_u64()
}

/// The recorded curve of a run restored from the record.
pub fn recorded_curve(name: &str, run: &Path) -> Option<Curve> {
    let v = recorded_state(run)?;
    let seconds = v["train_seconds"].as_f64().unwrap_or(0.0);
    let curve = Curve::read_compact(name, &run.join(RECORDED_CURVE), seconds).ok()?;
    (curve.evals.last()?.step == v["step"].as_u64()?).then_some(curve)
}

/// A run's curve when the run has finished (its last evaluation is at its saved step); a
/// run restored from the record has finished, and keeps its recorded curve (even once a
/// base is retrained here for its weights).
pub fn finished_curve(name: &str, dir: &Path) -> Option<Curve> {
    if dir.join(RECORDED).exists() {
        return recorded_curve(name, dir);
    }
    let done = read_state(&dir.join("last")).ok()?;
    let curve = Curve::read(name, &dir.join("metrics.jsonl")).ok()?;
    (curve.evals.last()?.step == done).then_some(curve)
}

fn finished_run(name: &str, dir: &Path, s: &Settings) -> Option<Run> {
    let curve = finished_curve(name, dir)?;
    let step = curve.evals.last()?.step;
    Some(Run {
        final_eval: evaluate::read(dir, s.final_eval_windows, s.seq, step),
        curve,
    })
}

/// Numbers after `prefix` in the names of `dir`'s entries (lr1e-3, steps-500, s0).
pub(crate) fn numbered<T: std::str::FromStr>(dir: &Path, prefix: &str) -> Vec<(T, PathBuf)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            let n = path
                .file_name()?
                .to_str()?
                .strip_prefix(prefix)?
                .parse()
                .ok()?;
            Some((n, path))
        })
        .collect()
}

/// Every finished run (missing ones are simply absent: the report says pending). Ladder
/// rungs and seeds outside the settings are ignored.
pub fn read_runs(out: &Path, s: &Settings) -> Result<StudyRuns> {
    let mut runs = StudyRuns::default();
    for &steps in &s.base_steps {
        if let Some(r) = finished_run(&format!("base-{steps}"), &base_dir(out, steps), s) {
            runs.bases.insert(steps, r);
        }
    }
    let rungs = s.ladder_steps();
    for &arm in &s.arms {
        for base in base_keys(s, arm) {
            for (lr, path) in numbered::<f64>(&screen_dir(out, base, arm), "lr") {
                if let Some(c) = finished_curve(arm.name(), &path) {
                    runs.screen.insert((base, arm, lr.to_bits()), c);
                }
            }
            for (lr, path) in numbered::<f64>(&lrcheck_dir(out, base, arm), "lr") {
                if let Some(r) = finished_run(arm.name(), &path, s) {
                    if r.curve.evals.last().map(|e| e.step) == Some(s.steps) {
                        runs.lrcheck.insert((base, arm, lr.to_bits()), r);
                    }
                }
            }
            let row = row_dir(out, "ladder", base, arm);
            for (steps, dir) in numbered::<u64>(&row, "steps-") {
                if !rungs.contains(&steps) {
                    continue;
                }
                for (seed, path) in numbered::<u64>(&dir, "s") {
                    if !s.seeds.contains(&seed) {
                        continue;
                    }
                    if let Some(r) = finished_run(arm.name(), &path, s) {
                        runs.ladder.insert((base, arm, steps, seed), r);
                    }
                }
            }
        }
    }
    Ok(runs)
}

/// OUT/models.json: the two shapes' configs and sizes (see [`models`]).
pub const MODELS: &str = "models.json";

pub fn read_corpus(out: &Path) -> Value {
    std::fs::read_to_string(out.join("corpus.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

/// The two shapes, their parameter counts and configs, for the report (null until the
/// strongest base has been grown).
pub fn models(
    out: &Path,
    s: &Settings,
) -> Result<
    Option<(
        hyperclone_core::config::ModelConfig,
        hyperclone_core::config::ModelConfig,
        Value,
    )>,
> {
    let top = s.largest_base();
    let base = base_dir(out, top).join("last");
    let large = clone_dir(out, top, Variant::Symmetric, 0);
    let kept = out.join(MODELS);
    if !base.join("config.json").exists() || !large.join("config.json").exists() {
        // A study continued from its record: the shapes as recorded.
        let Ok(text) = std::fs::read_to_string(&kept) else {
            return Ok(None);
        };
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", kept.display()))?;
        let config = |k: &str| -> Result<hyperclone_core::config::ModelConfig> {
            let Some(map) = v[k].as_object() else {
                bail!("{}: no `{k}` config", kept.display());
            };
            Ok(hyperclone_core::config::ModelConfig::from_map(
                &kept,
                map.clone(),
            )?)
        };
        return Ok(Some((
            config("small")?,
            config("large")?,
            v["sizes"].clone(),
        )));
    }
    let describe = |dir: &Path| -> Result<(hyperclone_core::config::ModelConfig, Value)> {
        let ckpt = hyperclone_core::Checkpoint::open(dir)?;
        let c = &ckpt.config;
        let params: usize = ckpt.tensors.iter().map(|t| t.info.numel()).sum();
        let mut v = c.sizes_json();
        v.insert("parameters".into(), json!(params));
        let v = Value::Object(v);
        Ok((ckpt.config.clone(), v))
    };
    let (sc, sv) = describe(&base)?;
    let (lc, lv) = describe(&large)?;
    // Kept for the record (record.rs), so a study continued elsewhere reports the shapes
    // before (or without) regrowing them.
    let raw = |dir: &Path| -> Result<Value> {
        let path = dir.join("config.json");
        Ok(serde_json::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("{} is not JSON", path.display()))?)
    };
    let keep = json!({
        "small": raw(&base)?, "large": raw(&large)?,
        "sizes": { "small": sv.clone(), "large": lv.clone() },
    });
    std::fs::write(&kept, serde_json::to_string_pretty(&keep)?)?;
    Ok(Some((sc, lc, json!({ "small": sv, "large": lv }))))
}

/// (lr, final loss of its curve) of every finished screen run of `arm` from `base`, read
/// from disk (whatever grid it came from: the folder name holds the lr), in lr order.
pub fn read_screen(out: &Path, base: BaseKey, arm: Arm) -> Vec<(f64, f64)> {
    let mut r: Vec<(f64, f64)> = numbered::<f64>(&screen_dir(out, base, arm), "lr")
        .into_iter()
        .filter_map(|(lr, path)| Some((lr, finished_curve(arm.name(), &path)?.final_loss())))
        .collect();
    r.sort_by(|a, b| a.0.total_cmp(&b.0));
    r
}
