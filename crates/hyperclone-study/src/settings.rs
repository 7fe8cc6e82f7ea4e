//! The study's arms and its hyperparameters: the options as given (`hyperclone
//! experiment`'s flags), resolved against the preset into [`Settings`], which the runs, the
//! report and OUT/experiment.json all read.

use crate::curve::RunRole;
use crate::Result;
use hyperclone_core::Variant;
use serde_json::{json, Value};
use std::path::PathBuf;

/// `hyperclone experiment`'s options, before presets are applied; `None` takes the preset's
/// value (the field names are the flags').
#[derive(Clone, Debug, Default)]
pub struct ExperimentOptions {
    pub out: PathBuf,
    pub quick: bool,
    pub full: bool,
    pub data: Vec<PathBuf>,
    pub val: Vec<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub base_config: Option<PathBuf>,
    pub factor: usize,
    pub snr_db: f64,
    pub dropout: f64,
    pub arms: Option<Vec<String>>,
    pub base_steps: Option<Vec<u64>>,
    pub base_lr: Option<f64>,
    pub steps: Option<u64>,
    pub screen_steps: Option<u64>,
    pub lrs: Option<Vec<f64>>,
    pub seeds: Option<Vec<u64>>,
    pub warmup: Option<u64>,
    pub decay_frac: f64,
    pub min_lr_frac: f64,
    pub fresh_optimizer: bool,
    pub batch: Option<usize>,
    pub seq: Option<usize>,
    pub eval_every: Option<u64>,
    pub eval_windows: Option<usize>,
    /// Only rewrite the report and plots from the runs that have finished.
    pub report_only: bool,
}

/// One way of starting the large model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arm {
    Random,
    /// The paper's symmetric clone without dropout: on exact arithmetic its copies never
    /// diverge (it stays the small model).
    Symmetric,
    SymmetricDropout(f64),
    Noisy,
    Diagonal,
}

impl Arm {
    pub fn all(dropout: f64) -> Vec<Arm> {
        vec![
            Arm::Random,
            Arm::Symmetric,
            Arm::SymmetricDropout(dropout),
            Arm::Noisy,
            Arm::Diagonal,
        ]
    }

    pub fn name(&self) -> &'static str {
        match self {
            Arm::Random => "random-init",
            Arm::Symmetric => "symmetric",
            Arm::SymmetricDropout(_) => "symmetric+dropout",
            Arm::Noisy => "noisy",
            Arm::Diagonal => "diagonal",
        }
    }

    pub fn parse(name: &str, dropout: f64) -> Result<Arm> {
        match Arm::all(dropout).into_iter().find(|a| a.name() == name.trim()) {
            Some(a) => Ok(a),
            None => bail!(
                "--arms: unknown arm `{name}` (choose from random-init, symmetric, symmetric+dropout, noisy, diagonal)"
            ),
        }
    }

    pub fn role(&self) -> RunRole {
        match self {
            Arm::Random => RunRole::Random,
            _ => RunRole::Clone,
        }
    }

    pub fn variant(&self) -> Option<Variant> {
        match self {
            Arm::Random => None,
            Arm::Symmetric | Arm::SymmetricDropout(_) => Some(Variant::Symmetric),
            Arm::Noisy => Some(Variant::Noisy),
            Arm::Diagonal => Some(Variant::Diagonal),
        }
    }

    pub fn dropout(&self) -> f64 {
        match self {
            Arm::SymmetricDropout(p) => *p,
            _ => 0.0,
        }
    }
}

/// Hyperparameters after presets and flags are resolved; written to OUT/experiment.json.
#[derive(Clone, Debug)]
pub struct Settings {
    pub preset: &'static str,
    pub factor: usize,
    pub snr_db: f64,
    pub dropout: f64,
    /// Steps of each base, ascending; the last is the base of the screen and final runs.
    pub base_steps: Vec<u64>,
    pub base_lr: f64,
    pub steps: u64,
    pub screen_steps: u64,
    pub lrs: Vec<f64>,
    /// How many times the grid may grow by 2x past an edge where the best lr sits.
    pub lr_extensions: u32,
    pub seeds: Vec<u64>,
    pub arms: Vec<Arm>,
    pub warmup: u64,
    pub decay_frac: f64,
    pub min_lr_frac: f64,
    pub carry_optimizer: bool,
    pub batch: usize,
    pub seq: usize,
    pub eval_every: u64,
    pub eval_windows: usize,
    pub vocab_size: usize,
}

impl Settings {
    pub fn resolve(a: &ExperimentOptions) -> Result<Settings> {
        let (preset, q, full) = match (a.quick, a.full) {
            (true, true) => bail!("--quick and --full: choose one"),
            (true, false) => ("quick", true, false),
            (false, true) => ("full", false, true),
            (false, false) => ("default", false, false),
        };
        let arms = match &a.arms {
            Some(list) => list
                .iter()
                .map(|n| Arm::parse(n, a.dropout))
                .collect::<Result<Vec<_>>>()?,
            None if q || full => Arm::all(a.dropout),
            None => vec![Arm::Random, Arm::Noisy, Arm::SymmetricDropout(a.dropout)],
        };
        let s = Settings {
            preset,
            factor: a.factor,
            snr_db: a.snr_db,
            dropout: a.dropout,
            base_steps: a.base_steps.clone().unwrap_or_else(|| {
                if q {
                    vec![15, 40]
                } else {
                    vec![250, 750, 2250]
                }
            }),
            base_lr: a.base_lr.unwrap_or(3e-3),
            steps: a.steps.unwrap_or(if q { 30 } else { 1000 }),
            screen_steps: a.screen_steps.unwrap_or(if q { 10 } else { 200 }),
            lrs: a.lrs.clone().unwrap_or_else(|| {
                if q {
                    vec![1e-3, 3e-3]
                } else {
                    vec![5e-4, 1e-3, 2e-3, 4e-3]
                }
            }),
            lr_extensions: if q { 0 } else { 2 },
            seeds: a
                .seeds
                .clone()
                .unwrap_or_else(|| if q { vec![0, 1] } else { vec![0, 1, 2] }),
            arms,
            warmup: a.warmup.unwrap_or(if q { 3 } else { 50 }),
            decay_frac: a.decay_frac,
            min_lr_frac: a.min_lr_frac,
            carry_optimizer: !a.fresh_optimizer,
            batch: a.batch.unwrap_or(if q { 8 } else { 16 }),
            seq: a.seq.unwrap_or(if q { 64 } else { 128 }),
            eval_every: a.eval_every.unwrap_or(if q { 5 } else { 25 }),
            eval_windows: a.eval_windows.unwrap_or(if q { 16 } else { 64 }),
            vocab_size: 4096,
        };
        let mut sorted = s.base_steps.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted != s.base_steps || sorted.first() == Some(&0) || sorted.is_empty() {
            bail!("--base-steps: give distinct positive step counts in ascending order, e.g. 250,750,2250");
        }
        if s.lrs.is_empty() || s.lrs.iter().any(|l| !(l.is_finite() && *l > 0.0)) {
            bail!("--lrs: give positive learning rates, e.g. 5e-4,1e-3,2e-3");
        }
        if s.seeds.is_empty() {
            bail!("--seeds: give at least one seed");
        }
        if s.arms.is_empty() {
            bail!("--arms: give at least one arm");
        }
        if s.screen_steps == 0 || s.screen_steps > s.steps || s.steps == 0 {
            bail!(
                "--screen-steps {} must be between 1 and --steps {}",
                s.screen_steps,
                s.steps
            );
        }
        if !(0.0..=1.0).contains(&s.decay_frac) || !(0.0..=1.0).contains(&s.min_lr_frac) {
            bail!("--decay-frac and --min-lr-frac must be between 0 and 1");
        }
        Ok(s)
    }

    pub fn tokens_per_step(&self) -> u64 {
        (self.batch * self.seq) as u64
    }

    pub fn largest_base(&self) -> u64 {
        *self.base_steps.last().expect("checked non-empty")
    }

    pub fn to_json(&self) -> Value {
        json!({
            "preset": self.preset,
            "factor": self.factor,
            "snr_db": self.snr_db,
            "dropout_of_dropout_arm": self.dropout,
            "base_steps": self.base_steps,
            "base_lr": self.base_lr,
            "steps": self.steps,
            "screen_steps": self.screen_steps,
            "lrs": self.lrs,
            "lr_screen_extensions_at_edges": self.lr_extensions,
            "lr_screen_per_base": true,
            "seeds": self.seeds,
            "arms": self.arms.iter().map(Arm::name).collect::<Vec<_>>(),
            "warmup": self.warmup,
            "schedule": "wsd",
            "decay_frac": self.decay_frac,
            "min_lr_frac": self.min_lr_frac,
            "clones_carry_base_optimizer_state": self.carry_optimizer,
            "batch": self.batch,
            "seq": self.seq,
            "eval_every": self.eval_every,
            "eval_windows": self.eval_windows,
            "weight_decay": 0.1,
            "grad_clip": 1.0,
            "base_data_seed": BASE_SEED,
        })
    }
}

/// The bases' batches and init come from their own seed, so no large run (seeds 0, 1, ...)
/// replays the windows its base was trained on.
pub const BASE_SEED: u64 = 1000;
