//! The study folder and the finished runs in it:
//!
//! ```text
//! OUT/experiment.json, corpus.json, tokenizer.json, base-config.json, tokens/
//! OUT/bases/base-N/                                  each small base (N steps)
//! OUT/clones/base-N/VARIANT[-sSEED]/                 its clones (noisy ones per seed)
//! OUT/screen/random-init/lrLR/                       the random init's lr screen
//! OUT/screen/base-N/ARM/lrLR/                        a clone arm's, from base-N
//! OUT/ladder/random-init/lrLR/steps-B/sSEED/         a complete run of B steps at peak lr LR
//! OUT/ladder/base-N/ARM/lrLR/steps-B/sSEED/          ... of a clone arm from base-N
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
    /// Complete runs: (base, arm, lr bits, steps, seed). The full-budget lr check's runs are
    /// the full-budget rungs of seed 0 at several lrs.
    pub ladder: BTreeMap<(BaseKey, Arm, u64, u64, u64), Run>,
}

impl StudyRuns {
    /// (steps, final loss) of one seed's finished and evaluated runs at `lr`, in step order.
    pub fn points(&self, base: BaseKey, arm: Arm, lr: f64, seed: u64) -> Vec<(u64, f64)> {
        self.ladder
            .iter()
            .filter(|((b, a, l, _, s), _)| {
                *b == base && *a == arm && *l == lr.to_bits() && *s == seed
            })
            .filter_map(|((_, _, _, steps, _), r)| Some((*steps, r.final_loss()?)))
            .collect()
    }

    /// The complete run of `steps` steps at `lr` on `seed`.
    pub fn run(&self, base: BaseKey, arm: Arm, lr: f64, steps: u64, seed: u64) -> Option<&Run> {
        self.ladder.get(&(base, arm, lr.to_bits(), steps, seed))
    }

    /// (lr, final loss) of the full-budget runs of `arm` from `base` on seed 0 (the
    /// screened lr's and the lr check's), in lr order.
    pub fn lr_check_results(&self, s: &Settings, base: BaseKey, arm: Arm) -> Vec<(f64, f64)> {
        // BTreeMap order is by lr bits, which for positive lrs is lr order.
        self.ladder
            .iter()
            .filter(|((b, a, _, steps, seed), _)| {
                *b == base && *a == arm && *steps == s.steps && *seed == s.seeds[0]
            })
            .filter_map(|((_, _, lr, _, _), run)| Some((f64::from_bits(*lr), run.final_loss()?)))
            .collect()
    }

    /// The lr the row's screen picked (None until it has run).
    pub fn screened_lr(&self, base: BaseKey, arm: Arm) -> Option<f64> {
        crate::report::best_of(&self.screen_results(base, arm)).map(|b| b.0)
    }

    /// The lr the row's ladder and seeds run at: the best at the full budget once the lr
    /// check has finished (see [`lr_check_done`]); None before.
    pub fn ladder_lr(&self, s: &Settings, base: BaseKey, arm: Arm) -> Option<f64> {
        let screened = self.screened_lr(base, arm)?;
        let results = self.lr_check_results(s, base, arm);
        lr_check_done(s, screened, &results)
            .then(|| crate::report::best_of(&results).map(|b| b.0))
            .flatten()
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

/// The lr check has finished when the screened lr and its half and double have run at the
/// full budget, and the best is inside them or the check has extended `lr_extensions`
/// times past an edge (the screen's rule).
pub fn lr_check_done(s: &Settings, screened: f64, results: &[(f64, f64)]) -> bool {
    let has = |lr: f64| results.iter().any(|r| r.0 == lr);
    if !(has(screened) && has(screened / 2.0) && has(screened * 2.0)) {
        return false;
    }
    results.len() - 3 >= s.lr_extensions as usize
        || crate::report::edge_extension(results).is_none()
}

pub fn ladder_dir(out: &Path, base: BaseKey, arm: Arm, lr: f64, steps: u64, seed: u64) -> PathBuf {
    row_dir(out, "ladder", base, arm)
        .join(format!("lr{lr:e}"))
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

/// (lr, steps, seed, folder) of every complete-run folder of one row whose rung and seed
/// the settings know.
pub(crate) fn ladder_folders(
    root: &Path,
    s: &Settings,
    base: BaseKey,
    arm: Arm,
) -> Vec<(f64, u64, u64, PathBuf)> {
    let rungs = s.ladder_steps();
    let mut found = Vec::new();
    for (lr, lr_dir) in numbered::<f64>(&row_dir(root, "ladder", base, arm), "lr") {
        for (steps, rung) in numbered::<u64>(&lr_dir, "steps-") {
            if !rungs.contains(&steps) {
                continue;
            }
            for (seed, path) in numbered::<u64>(&rung, "s") {
                if s.seeds.contains(&seed) {
                    found.push((lr, steps, seed, path));
                }
            }
        }
    }
    found
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
    for &arm in &s.arms {
        for base in base_keys(s, arm) {
            for (lr, path) in numbered::<f64>(&screen_dir(out, base, arm), "lr") {
                if let Some(c) = finished_curve(arm.name(), &path) {
                    runs.screen.insert((base, arm, lr.to_bits()), c);
                }
            }
            for (lr, steps, seed, path) in ladder_folders(out, s, base, arm) {
                if let Some(r) = finished_run(arm.name(), &path, s) {
                    runs.ladder
                        .insert((base, arm, lr.to_bits(), steps, seed), r);
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

/// Moves a study folder (OUT or a record) written before complete runs were tagged with
/// their lr into today's layout, so no finished run is lost: `ladder/ROW/steps-B/` (runs at
/// the screened lr) becomes `ladder/ROW/lrLR/steps-B/`, and the full-budget lr check's
/// `lrcheck/ROW/lrLR/` (seed 0) becomes `ladder/ROW/lrLR/steps-R/sSEED0/`; their curves
/// under curves/ move alike. Returns how many folders moved; refuses to overwrite.
pub fn migrate_layout(root: &Path, s: &Settings) -> Result<usize> {
    let mut moved = 0;
    let mut mv = |from: PathBuf, to: PathBuf| -> Result<()> {
        if !from.exists() {
            return Ok(());
        }
        if to.exists() {
            bail!(
                "{}: an older layout's run and {} both exist; move one away by hand",
                from.display(),
                to.display()
            );
        }
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::rename(&from, &to)
            .with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
        moved += 1;
        Ok(())
    };
    let curves = root.join("curves");
    let with_csv = |p: &Path| {
        let mut name = p.as_os_str().to_owned();
        name.push(".csv");
        PathBuf::from(name)
    };
    for &arm in &s.arms {
        for base in base_keys(s, arm) {
            let row = row_dir(root, "ladder", base, arm);
            let rel_row = row.strip_prefix(root).unwrap_or(&row).to_path_buf();
            let old_rungs = numbered::<u64>(&row, "steps-");
            if !old_rungs.is_empty() {
                // In a record the screen's curves live under curves/, not in the run folders.
                let screened: Vec<(f64, f64)> = numbered::<f64>(&screen_dir(root, base, arm), "lr")
                    .into_iter()
                    .filter_map(|(lr, dir)| {
                        let curve = finished_curve(arm.name(), &dir).or_else(|| {
                            Curve::read_compact(arm.name(), &curve_file(root, &dir), 0.0).ok()
                        })?;
                        Some((lr, curve.final_loss()))
                    })
                    .collect();
                let Some((lr, _)) = crate::report::best_of(&screened) else {
                    bail!(
                        "{}: runs of the older layout without the screen that chose their lr; move them away by hand",
                        row.display()
                    );
                };
                let tag = format!("lr{lr:e}");
                for (steps, dir) in old_rungs {
                    let name = format!("steps-{steps}");
                    mv(dir, row.join(&tag).join(&name))?;
                    mv(
                        curves.join(&rel_row).join(&name),
                        curves.join(&rel_row).join(&tag).join(&name),
                    )?;
                }
            }
            let check = row_dir(root, "lrcheck", base, arm);
            let rel_check = check.strip_prefix(root).unwrap_or(&check).to_path_buf();
            for (lr, dir) in numbered::<f64>(&check, "lr") {
                let to = row
                    .join(format!("lr{lr:e}"))
                    .join(format!("steps-{}", s.steps))
                    .join(format!("s{}", s.seeds[0]));
                let to_rel = to.strip_prefix(root).unwrap_or(&to).to_path_buf();
                mv(dir, to.clone())?;
                mv(
                    with_csv(&curves.join(&rel_check).join(format!("lr{lr:e}"))),
                    with_csv(&curves.join(to_rel)),
                )?;
            }
        }
    }
    for old in [root.join("lrcheck"), curves.join("lrcheck")] {
        // Only empty folders are left; remove_dir refuses anything else, which is kept.
        remove_empty_dirs(&old);
    }
    Ok(moved)
}

fn remove_empty_dirs(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                remove_empty_dirs(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// A record of the layout before lr-tagged runs (as the study wrote it until
    /// 2026-12): its ladder at the screened lr and its lr check move, files and curves,
    /// and nothing else is touched; a second call moves nothing.
    #[test]
    fn the_older_layout_moves_without_losing_a_run() {
        let s = Settings::resolve(&crate::settings::tests::options()).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let header = "step,tokens,lr,train_loss,val_loss,symmetry\n";
        // The random init screened 4e-3 best (the lower loss), 2e-3 worse.
        for (lr, loss) in [("4e-3", 5.0), ("2e-3", 5.2)] {
            write(
                &root.join(format!("screen/random-init/lr{lr}/{RECORDED}")),
                "{\"step\": 500}",
            );
            write(
                &root.join(format!("curves/screen/random-init/lr{lr}.csv")),
                &format!("{header}0,0,0,,10.4,\n500,1024000,0.0004,5.0,{loss},\n"),
            );
        }
        write(
            &root.join("ladder/random-init/steps-500/s0/final_eval.json"),
            "{}",
        );
        write(
            &root.join("curves/ladder/random-init/steps-500/s0.csv"),
            header,
        );
        write(
            &root.join("lrcheck/random-init/lr1e-3/final_eval.json"),
            "{}",
        );
        write(&root.join("curves/lrcheck/random-init/lr1e-3.csv"), header);

        assert_eq!(migrate_layout(root, &s).unwrap(), 4);
        for moved in [
            "ladder/random-init/lr4e-3/steps-500/s0/final_eval.json",
            "curves/ladder/random-init/lr4e-3/steps-500/s0.csv",
            "ladder/random-init/lr1e-3/steps-4000/s0/final_eval.json",
            "curves/ladder/random-init/lr1e-3/steps-4000/s0.csv",
            "screen/random-init/lr4e-3/recorded.json",
        ] {
            assert!(root.join(moved).is_file(), "{moved}");
        }
        assert!(!root.join("lrcheck").exists() && !root.join("curves/lrcheck").exists());
        assert!(!root.join("ladder/random-init/steps-500").exists());
        assert_eq!(migrate_layout(root, &s).unwrap(), 0);

        // A run in both layouts is never overwritten.
        write(
            &root.join("lrcheck/random-init/lr1e-3/final_eval.json"),
            "{}",
        );
        let err = migrate_layout(root, &s).unwrap_err().to_string();
        assert!(err.contains("both exist"), "{err}");
    }
}
