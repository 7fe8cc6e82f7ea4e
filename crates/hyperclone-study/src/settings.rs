//! The study's arms and its hyperparameters: the options as given (`hyperclone
//! experiment`'s flags), resolved against the preset into [`Settings`], which the runs, the
//! report and OUT/experiment.json all read.
//!
//! The protocol is budget-matched: every point is a complete run with its own schedule
//! (warmup, stable, decay) at one budget of a ladder (fractions of the random init's full
//! budget), so a clone's final loss is compared with the random init's final loss, never
//! with a point inside a longer run's schedule.

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
    /// The default preset, spelled out (scripts say what they run).
    pub paper_regime: bool,
    pub data: Vec<PathBuf>,
    pub val: Vec<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub base_config: Option<PathBuf>,
    pub factor: usize,
    pub snr_db: f64,
    pub dropout: f64,
    pub arms: Option<Vec<String>>,
    pub headline_arm: Option<String>,
    pub base_steps: Option<Vec<u64>>,
    pub base_lr: Option<f64>,
    /// The random init's full budget in steps (the ladder's top rung).
    pub steps: Option<u64>,
    /// The ladder as fractions of `steps`, ascending, the last 1.
    pub ladder: Option<Vec<f64>>,
    pub screen_steps: Option<u64>,
    pub lrs: Option<Vec<f64>>,
    pub seeds: Option<Vec<u64>>,
    pub warmup: Option<u64>,
    pub decay_frac: f64,
    pub min_lr_frac: f64,
    pub batch: Option<usize>,
    pub seq: Option<usize>,
    pub eval_every: Option<u64>,
    pub eval_windows: Option<usize>,
    pub final_eval_windows: Option<usize>,
    /// Stop (at a checkpoint) after this many minutes; rerunning the command continues.
    pub max_minutes: Option<f64>,
    /// Only rewrite the report and plots from the runs that have finished.
    pub report_only: bool,
    /// The durable, committable record (record.rs): every finished run is written into it,
    /// and the runs it holds count as finished in OUT.
    pub record: Option<PathBuf>,
}

/// How the large model starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Start {
    Random,
    /// The paper's symmetric clone without dropout: on exact arithmetic its copies never
    /// diverge (it stays the small model).
    Symmetric,
    SymmetricDropout,
    Noisy,
    Diagonal,
}

/// A clone's AdamW moments: from zero (the paper's protocol) or the base's, grown with the
/// weights' tiling (`hyperclone train --optimizer-from`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Moments {
    Fresh,
    Carried,
}

impl Moments {
    pub fn name(&self) -> &'static str {
        match self {
            Moments::Fresh => "fresh",
            Moments::Carried => "carried",
        }
    }
}

/// One way of starting the large model: how, and (clones) with which AdamW moments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Arm {
    pub start: Start,
    pub moments: Moments,
}

/// Every arm by name; the random init has no base, hence no moments to carry.
const ARMS: [(&str, Start, Moments); 9] = [
    ("random-init", Start::Random, Moments::Fresh),
    ("noisy-fresh", Start::Noisy, Moments::Fresh),
    ("noisy-carried", Start::Noisy, Moments::Carried),
    ("symmetric-fresh", Start::Symmetric, Moments::Fresh),
    ("symmetric-carried", Start::Symmetric, Moments::Carried),
    (
        "symmetric+dropout-fresh",
        Start::SymmetricDropout,
        Moments::Fresh,
    ),
    (
        "symmetric+dropout-carried",
        Start::SymmetricDropout,
        Moments::Carried,
    ),
    ("diagonal-fresh", Start::Diagonal, Moments::Fresh),
    ("diagonal-carried", Start::Diagonal, Moments::Carried),
];

impl Arm {
    pub const RANDOM: Arm = Arm {
        start: Start::Random,
        moments: Moments::Fresh,
    };
    /// The paper's protocol: a noisy clone, AdamW from zero.
    pub const NOISY_FRESH: Arm = Arm {
        start: Start::Noisy,
        moments: Moments::Fresh,
    };
    /// This project's: a noisy clone, AdamW from the base's grown moments.
    pub const NOISY_CARRIED: Arm = Arm {
        start: Start::Noisy,
        moments: Moments::Carried,
    };

    pub fn name(&self) -> &'static str {
        ARMS.iter()
            .find(|(_, s, m)| *s == self.start && *m == self.moments)
            .map_or("random-init", |(n, _, _)| n)
    }

    pub fn parse(name: &str) -> Result<Arm> {
        match ARMS.iter().find(|(n, _, _)| *n == name.trim()) {
            Some((_, start, moments)) => Ok(Arm {
                start: *start,
                moments: *moments,
            }),
            None => bail!(
                "--arms: unknown arm `{name}` (choose from {})",
                ARMS.iter().map(|a| a.0).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    pub fn role(&self) -> RunRole {
        match self.start {
            Start::Random => RunRole::Random,
            _ => RunRole::Clone,
        }
    }

    pub fn variant(&self) -> Option<Variant> {
        match self.start {
            Start::Random => None,
            Start::Symmetric | Start::SymmetricDropout => Some(Variant::Symmetric),
            Start::Noisy => Some(Variant::Noisy),
            Start::Diagonal => Some(Variant::Diagonal),
        }
    }

    /// The growth variant's name as the headline reports it ("noisy", "symmetric+dropout").
    pub fn variant_name(&self) -> &'static str {
        match self.start {
            Start::Random => "random-init",
            Start::Symmetric => "symmetric",
            Start::SymmetricDropout => "symmetric+dropout",
            Start::Noisy => "noisy",
            Start::Diagonal => "diagonal",
        }
    }

    pub fn dropout(&self, p: f64) -> f64 {
        match self.start {
            Start::SymmetricDropout => p,
            _ => 0.0,
        }
    }

    pub fn carries_moments(&self) -> bool {
        self.role() == RunRole::Clone && self.moments == Moments::Carried
    }
}

/// Hyperparameters after presets and flags are resolved; written to OUT/experiment.json.
#[derive(Clone, Debug)]
pub struct Settings {
    pub preset: &'static str,
    pub factor: usize,
    pub snr_db: f64,
    pub dropout: f64,
    /// Steps of each base, ascending; the last (strongest) is the headline's, the others
    /// are second rows.
    pub base_steps: Vec<u64>,
    pub base_lr: f64,
    /// The random init's full budget, in steps: the ladder's top rung.
    pub steps: u64,
    /// The budget ladder as fractions of `steps`, ascending, the last 1.
    pub ladder: Vec<f64>,
    /// Steps of each learning-rate screen run: a complete schedule of the final runs' shape,
    /// at least the shortest rung's length.
    pub screen_steps: u64,
    pub lrs: Vec<f64>,
    /// How many times the grid may grow by 2x past an edge where the best lr sits.
    pub lr_extensions: u32,
    pub seeds: Vec<u64>,
    /// The random init first, then the clone arms.
    pub arms: Vec<Arm>,
    /// The clone arm the headline reports, fixed before any run (the paper's protocol by
    /// default): never chosen after seeing the results.
    pub headline_arm: Arm,
    pub warmup: u64,
    pub decay_frac: f64,
    pub min_lr_frac: f64,
    pub batch: usize,
    pub seq: usize,
    pub eval_every: u64,
    pub eval_windows: usize,
    /// Validation windows of the final evaluation of every run (x seq tokens).
    pub final_eval_windows: usize,
    pub vocab_size: usize,
}

/// The paper-regime condition: the random init at its full budget ends at least this many
/// nats below the base, on every seed (else the base alone already beats the large run and
/// the question "how much sooner does a clone get there" is not the paper's).
pub const REGIME_MARGIN_NATS: f64 = 0.05;

/// A data budget may read the training split at most this many times.
pub const MAX_CORPUS_PASSES: f64 = 2.0;

/// The final evaluation must cover at least this many held-out tokens.
pub const MIN_FINAL_EVAL_TOKENS: usize = 65_536;

impl Settings {
    pub fn resolve(a: &ExperimentOptions) -> Result<Settings> {
        let (preset, q) = match (a.quick, a.paper_regime) {
            (true, true) => bail!("--quick and --paper-regime: choose one"),
            (true, false) => ("quick", true),
            (false, _) => ("paper-regime", false),
        };
        let mut arms = match &a.arms {
            Some(list) => list
                .iter()
                .map(|n| Arm::parse(n))
                .collect::<Result<Vec<_>>>()?,
            None => vec![Arm::RANDOM, Arm::NOISY_FRESH, Arm::NOISY_CARRIED],
        };
        arms.dedup();
        let headline_arm = match &a.headline_arm {
            Some(n) => Arm::parse(n)?,
            None => Arm::NOISY_FRESH,
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
                    vec![750, 2250]
                }
            }),
            base_lr: a.base_lr.unwrap_or(3e-3),
            steps: a.steps.unwrap_or(if q { 24 } else { 4000 }),
            ladder: a
                .ladder
                .clone()
                .unwrap_or_else(|| vec![0.125, 0.25, 0.5, 1.0]),
            screen_steps: 0,
            lrs: a.lrs.clone().unwrap_or_else(|| {
                if q {
                    vec![1e-3, 3e-3]
                } else {
                    vec![5e-4, 1e-3, 2e-3, 4e-3]
                }
            }),
            lr_extensions: if q { 0 } else { 3 },
            seeds: a
                .seeds
                .clone()
                .unwrap_or_else(|| if q { vec![0, 1] } else { vec![0, 1, 2] }),
            arms,
            headline_arm,
            warmup: a.warmup.unwrap_or(if q { 1 } else { 50 }),
            decay_frac: a.decay_frac,
            min_lr_frac: a.min_lr_frac,
            batch: a.batch.unwrap_or(if q { 8 } else { 16 }),
            seq: a.seq.unwrap_or(if q { 32 } else { 128 }),
            eval_every: a.eval_every.unwrap_or(if q { 2 } else { 50 }),
            eval_windows: a.eval_windows.unwrap_or(if q { 16 } else { 64 }),
            final_eval_windows: a.final_eval_windows.unwrap_or(if q { 64 } else { 512 }),
            vocab_size: 4096,
        };
        let s = s.check(a.screen_steps)?;
        Ok(s)
    }

    /// Refuses settings the protocol cannot measure with; fills in the screen's length.
    fn check(mut self, screen_steps: Option<u64>) -> Result<Settings> {
        let mut sorted = self.base_steps.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted != self.base_steps || sorted.first() == Some(&0) || sorted.is_empty() {
            bail!("--base-steps: give distinct positive step counts in ascending order, e.g. 750,2250");
        }
        if self.lrs.is_empty() || self.lrs.iter().any(|l| !(l.is_finite() && *l > 0.0)) {
            bail!("--lrs: give positive learning rates, e.g. 5e-4,1e-3,2e-3");
        }
        if self.seeds.is_empty() {
            bail!("--seeds: give at least one seed");
        }
        let mut seeds = self.seeds.clone();
        seeds.sort_unstable();
        seeds.dedup();
        if seeds.len() != self.seeds.len() {
            bail!("--seeds: give distinct seeds");
        }
        if self.arms.first() != Some(&Arm::RANDOM)
            || self.arms[1..].iter().any(|a| a.role() != RunRole::Clone)
        {
            bail!("--arms: start with random-init (every speedup is measured against it), then the clone arms");
        }
        if !self.arms.contains(&self.headline_arm) || self.headline_arm.role() != RunRole::Clone {
            bail!(
                "--headline-arm {}: must be one of the clone arms in --arms",
                self.headline_arm.name()
            );
        }
        if !(0.0..=1.0).contains(&self.decay_frac) || !(0.0..=1.0).contains(&self.min_lr_frac) {
            bail!("--decay-frac and --min-lr-frac must be between 0 and 1");
        }
        if self.steps == 0 {
            bail!("--steps: give the random init's budget in steps (at least 1)");
        }
        let fractions_ok = !self.ladder.is_empty()
            && self.ladder.iter().all(|f| f.is_finite() && *f > 0.0)
            && self.ladder.windows(2).all(|w| w[0] < w[1])
            && self.ladder.last() == Some(&1.0);
        if !fractions_ok {
            bail!(
                "--ladder: give ascending fractions of --steps ending at 1, e.g. 0.125,0.25,0.5,1"
            );
        }
        let rungs = self.ladder_steps();
        if rungs.windows(2).any(|w| w[0] >= w[1]) || rungs[0] <= self.warmup {
            bail!(
                "--ladder {:?} of --steps {} gives rungs of {rungs:?} steps: they must be distinct and longer than --warmup {} (every rung is a complete schedule)",
                self.ladder,
                self.steps,
                self.warmup
            );
        }
        self.screen_steps = screen_steps.unwrap_or(rungs[0]);
        if self.screen_steps < rungs[0] || self.screen_steps > self.steps {
            bail!(
                "--screen-steps {}: must be between the shortest rung ({} steps) and --steps {}",
                self.screen_steps,
                rungs[0],
                self.steps
            );
        }
        if self.final_eval_windows == 0 || self.eval_windows == 0 {
            bail!("--eval-windows and --final-eval-windows must be at least 1");
        }
        Ok(self)
    }

    /// The ladder's rungs in steps: round(fraction x steps).
    pub fn ladder_steps(&self) -> Vec<u64> {
        self.ladder
            .iter()
            .map(|f| (f * self.steps as f64).round() as u64)
            .collect()
    }

    pub fn tokens_per_step(&self) -> u64 {
        (self.batch * self.seq) as u64
    }

    /// The random init's full budget in tokens.
    pub fn budget_tokens(&self) -> u64 {
        self.steps * self.tokens_per_step()
    }

    pub fn largest_base(&self) -> u64 {
        *self.base_steps.last().expect("checked non-empty")
    }

    pub fn clone_arms(&self) -> Vec<Arm> {
        let mut arms = vec![self.headline_arm];
        arms.extend(
            self.arms
                .iter()
                .copied()
                .filter(|a| a.role() == RunRole::Clone && *a != self.headline_arm),
        );
        arms
    }

    /// How many times the longest single run (the random init's budget or the strongest
    /// base) reads the training split.
    pub fn corpus_passes(&self, train_tokens: usize) -> f64 {
        let longest = self
            .budget_tokens()
            .max(self.largest_base() * self.tokens_per_step());
        longest as f64 / train_tokens.max(1) as f64
    }

    /// Refuses a budget that reads the training split more than twice (repeated data
    /// changes what a longer budget buys); --quick's toy corpora only get a warning.
    pub fn check_corpus(&self, train_tokens: usize) -> Result<Option<String>> {
        let passes = self.corpus_passes(train_tokens);
        if passes <= MAX_CORPUS_PASSES {
            return Ok(None);
        }
        let what = format!(
            "the longest run ({} tokens) reads the {train_tokens}-token training split {passes:.1} times (at most {MAX_CORPUS_PASSES})",
            self.budget_tokens()
                .max(self.largest_base() * self.tokens_per_step())
        );
        if self.preset == "quick" {
            return Ok(Some(format!(
                "warning: {what}; fine for a pipeline check only"
            )));
        }
        bail!("{what}: give more --data or lower --steps / --base-steps")
    }

    pub fn to_json(&self) -> Value {
        json!({
            "protocol": "budget-matched",
            "preset": self.preset,
            "factor": self.factor,
            "snr_db": self.snr_db,
            "dropout_of_dropout_arms": self.dropout,
            "base_steps": self.base_steps,
            "base_lr": self.base_lr,
            "random_budget_steps": self.steps,
            "ladder_fractions": self.ladder,
            "ladder_steps": self.ladder_steps(),
            "screen_steps": self.screen_steps,
            "lrs": self.lrs,
            "lr_screen_extensions_at_edges": self.lr_extensions,
            "lr_screen_per_arm_and_base": true,
            "seeds": self.seeds,
            "arms": self.arms.iter().map(Arm::name).collect::<Vec<_>>(),
            "headline_arm": self.headline_arm.name(),
            "warmup": self.warmup,
            "schedule": "wsd",
            "decay_frac": self.decay_frac,
            "min_lr_frac": self.min_lr_frac,
            "batch": self.batch,
            "seq": self.seq,
            "eval_every": self.eval_every,
            "eval_windows": self.eval_windows,
            "final_eval_windows": self.final_eval_windows,
            "weight_decay": 0.1,
            "grad_clip": 1.0,
            "base_data_seed": BASE_SEED,
        })
    }
}

/// The bases' batches and init come from their own seed, so no large run (seeds 0, 1, ...)
/// replays the windows its base was trained on.
pub const BASE_SEED: u64 = 1000;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The paper-regime options as the CLI fills them (tests of other modules use them too).
    pub(crate) fn options() -> ExperimentOptions {
        ExperimentOptions {
            factor: 2,
            snr_db: 10.0,
            dropout: 0.1,
            decay_frac: 0.2,
            min_lr_frac: 0.1,
            ..ExperimentOptions::default()
        }
    }

    #[test]
    fn the_paper_regime_defaults() {
        let s = Settings::resolve(&options()).unwrap();
        assert_eq!(s.ladder_steps(), vec![500, 1000, 2000, 4000]);
        assert_eq!(s.screen_steps, 500, "the shortest rung's length");
        assert_eq!(s.budget_tokens(), 4000 * 2048);
        assert_eq!(s.largest_base() * s.tokens_per_step(), 4_608_000);
        assert_eq!(s.final_eval_windows * s.seq, MIN_FINAL_EVAL_TOKENS);
        let names: Vec<&str> = s.arms.iter().map(Arm::name).collect();
        assert_eq!(names, ["random-init", "noisy-fresh", "noisy-carried"]);
        assert_eq!(s.headline_arm, Arm::NOISY_FRESH);
    }

    #[test]
    fn arm_names_round_trip() {
        for (name, _, _) in ARMS {
            assert_eq!(Arm::parse(name).unwrap().name(), name);
        }
        assert!(Arm::parse("noisy").is_err(), "moments must be named");
    }

    #[test]
    fn refused_settings() {
        let bad = |f: &dyn Fn(&mut ExperimentOptions)| {
            let mut o = options();
            f(&mut o);
            Settings::resolve(&o).unwrap_err().to_string()
        };
        assert!(bad(&|o| o.ladder = Some(vec![0.5, 0.25, 1.0])).contains("--ladder"));
        assert!(bad(&|o| o.ladder = Some(vec![0.25, 0.5])).contains("--ladder"));
        // Rungs no longer than the warmup are not complete schedules.
        assert!(bad(&|o| o.steps = Some(300)).contains("longer than --warmup"));
        assert!(bad(&|o| o.screen_steps = Some(100)).contains("shortest rung"));
        assert!(bad(&|o| o.arms = Some(vec!["noisy-fresh".into()])).contains("random-init"));
        assert!(bad(&|o| o.headline_arm = Some("diagonal-fresh".into())).contains("--headline-arm"));
        assert!(bad(&|o| o.seeds = Some(vec![1, 1])).contains("distinct"));
    }

    #[test]
    fn the_corpus_is_read_at_most_twice() {
        let s = Settings::resolve(&options()).unwrap();
        // 8.19M tokens of budget: 14.4M training tokens is 0.57 passes, 4M is 2.05.
        assert_eq!(s.check_corpus(14_413_513).unwrap(), None);
        assert!(
            s.check_corpus(4_096_000).unwrap().is_none(),
            "exactly 2 passes"
        );
        let err = s.check_corpus(4_000_000).unwrap_err().to_string();
        assert!(err.contains("2.0 times"), "{err}");
        let q = Settings::resolve(&ExperimentOptions {
            quick: true,
            ..options()
        })
        .unwrap();
        assert!(q.check_corpus(100).unwrap().unwrap().starts_with("warning"));
    }
}
