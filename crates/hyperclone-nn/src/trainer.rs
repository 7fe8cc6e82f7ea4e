//! A training run as `hyperclone train` (and the study) does it: where the weights come
//! from, tokenizing the corpus once, the step loop with its learning-rate schedule,
//! evaluation (validation loss, and symmetry for a clone), metrics.jsonl, and the
//! checkpoint a run writes and resumes from:
//!
//! ```text
//! OUT/last/              an HF folder (config, weights, tokenizer files, the source's
//!                        metadata) plus optimizer.safetensors and trainer_state.json
//!                        ({"step": N}), replaced atomically
//! OUT/metrics.jsonl      one JSON record per step; evaluations add val_loss (+ symmetry)
//! OUT/tokens/            the token cache (unless given elsewhere)
//! ```
//!
//! Progress goes through [`TrainProgress`], so the CLI can draw a bar and a library caller
//! can stay quiet.

use crate::corpus::{batch, eval_windows, text_files, tokenize_to_cache, TokenFile};
use crate::error::Context;
pub use crate::train::TrainOptions;
use crate::train::{mean_loss, save_params, train_step, AdamW, Schedule};
use crate::{Decoder, NnError, Param, Result};
use candle_core::{DType, Device};
use hyperclone_core::family::Space;
use hyperclone_core::growth_map::RecordedGrowth;
use hyperclone_core::kernel::Segment;
use hyperclone_core::output_guard::{refuse_existing, Inputs};
use hyperclone_core::staging;
use hyperclone_core::symmetry::{mean_row_half_cosine_with, uniform_segments};
use hyperclone_core::Checkpoint;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The checkpoint a run writes and `--resume` reads.
pub const LAST: &str = "last";

/// What a run reports while it trains. Every method has a do-nothing default.
pub trait TrainProgress {
    /// The run spans `steps` and starts at `start` (past 0 when resumed).
    fn begin(&self, _steps: u64, _start: u64) {}
    /// Step `done` finished with this training loss and throughput.
    fn step(&self, _done: u64, _loss: f64, _tokens_per_s: f64) {}
    /// The run reached its last step (or `stop_at`).
    fn finish(&self) {}
    /// The run stops with an error (the loss diverged).
    fn abandon(&self) {}
    /// A line worth telling the user (what the optimizer state was carried from).
    fn notice(&self, _message: &str) {}
}

/// A run that reports nothing.
pub struct Quiet;

impl TrainProgress for Quiet {}

/// What one call of [`run`] did.
pub struct RunDone {
    /// Steps trained by this call (not counting resumed ones).
    pub steps: u64,
    pub tokens: u64,
    pub seconds: f64,
}

/// Trains as `hyperclone train` does.
pub fn run(a: &TrainOptions, progress: &dyn TrainProgress) -> Result<RunDone> {
    validate(a)?;
    check_outputs(a)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let last = a.out.join(LAST);
    // Where the weights come from: the last checkpoint, a model, or a fresh random init.
    let (source, start_step) = if a.resume {
        let state = read_state(&last)
            .with_context(|| format!("--resume: no usable checkpoint in {}", last.display()))?;
        if state > a.steps {
            bail!(
                "{}: step {state} is past --steps {}: this checkpoint belongs to a longer run (raise --steps)",
                last.join("trainer_state.json").display(),
                a.steps
            );
        }
        (last.clone(), state)
    } else if let Some(m) = &a.model {
        (m.clone(), 0)
    } else if let Some(cfg) = &a.init_config {
        let init = a.out.join("init");
        crate::init::write_random_checkpoint(cfg, &init, 0.02, a.seed)?;
        (init, 0)
    } else {
        bail!("give --model DIR, --init-config CONFIG.json or --resume");
    };
    let tokenizer = a
        .tokenizer
        .clone()
        .or_else(|| Some(source.join("tokenizer.json")).filter(|p| p.exists()))
        .or_else(|| a.model.as_ref().map(|m| m.join("tokenizer.json")))
        .context("no tokenizer.json next to the model: pass --tokenizer")?;
    let (train_files, val_files) = split_files(&a.data, &a.val)?;
    let cache = a
        .token_cache
        .clone()
        .unwrap_or_else(|| a.out.join("tokens"));
    let eos = eos_token(&tokenizer)?;
    let train_tokens = TokenFile::open(&tokenize_to_cache(&tokenizer, &train_files, eos, &cache)?)?;
    let val_tokens = TokenFile::open(&tokenize_to_cache(&tokenizer, &val_files, eos, &cache)?)?;

    let ckpt = Checkpoint::open(&source)?;
    let (model, params) = Decoder::load_trainable(&ckpt, DType::F32, &Device::Cpu)?;
    let growth = clone_growth(&ckpt);
    let mut opt = if a.resume {
        check_optimizer_state(&last.join("optimizer.safetensors"))?;
        let opt = AdamW::load(&params, &last.join("optimizer.safetensors"))?;
        check_optimizer_step(&last, start_step, opt.t)?;
        opt
    } else if let Some(base) = &a.optimizer_from {
        let Some(g) = &growth else {
            bail!(
                "--optimizer-from: {} is not a hyperclone clone (no hyperclone.factor in its metadata)",
                source.display()
            );
        };
        if !g.width_only {
            bail!(
                "--optimizer-from: {} grew beyond whole-factor width (depth, uneven FFN or a kept tie); moments are \
                 only carried for the paper's width growth, so train it with fresh moments",
                source.display()
            );
        }
        let (opt, carried) = crate::optimizer_carry::carry(base, g.n, g.m, &params)?;
        progress.notice(&format!(
            "AdamW moments of {} tensors carried from {} (step {}){}",
            carried.tensors,
            base.display(),
            carried.step,
            if carried.fresh.is_empty() {
                String::new()
            } else {
                format!("; from zero: {}", carried.fresh.join(", "))
            }
        ));
        opt
    } else {
        AdamW::new(&params)
    };
    let metrics_path = a.out.join("metrics.jsonl");
    let mut metrics = open_metrics(&metrics_path, start_step)?;
    let eval_count = a.eval_windows.unwrap_or(a.batch.max(8));
    progress.begin(a.steps, start_step);
    // Validation loss, and symmetry for a clone, added to a metrics record. At step 0 of a
    // clone this is the small model's loss (the function is preserved), the reference for
    // the early-forgetting rise.
    let evaluate = |record: &mut serde_json::Value| -> Result<()> {
        record["val_loss"] = json!(eval_loss(&model, &val_tokens, a.seq, eval_count)?);
        if let Some(g) = &growth {
            record["symmetry"] = json!(symmetry(&ckpt, &params, &g.segments)?);
        }
        Ok(())
    };
    if start_step == 0 {
        let mut record = json!({ "step": 0, "tokens": 0 });
        evaluate(&mut record)?;
        writeln!(metrics, "{record}")?;
    }
    let tokens_per_step = (a.batch * a.seq) as u64 * a.grad_accum.max(1);
    let started = std::time::Instant::now();
    let end = a.stop_at.unwrap_or(a.steps).min(a.steps);
    for step in start_step..end {
        let t0 = std::time::Instant::now();
        let stats = train_step(&model, &params, &mut opt, a, step, a.batch, |micro| {
            batch(&train_tokens, a.seed, step, micro, a.batch, a.seq)
        })?;
        if !stats.loss.is_finite() || !stats.grad_norm.is_finite() {
            progress.abandon();
            let kept = if last.exists() {
                format!("the last good checkpoint is {}", last.display())
            } else {
                "no checkpoint had been saved yet".to_string()
            };
            bail!(
                "step {}: the loss became {} (gradient norm {}); stopped, {kept} (lower --lr or raise --warmup)",
                step + 1,
                stats.loss,
                stats.grad_norm
            );
        }
        let done = step + 1;
        let tps = tokens_per_step as f64 / t0.elapsed().as_secs_f64();
        let mut record = json!({
            "step": done,
            "tokens": done * tokens_per_step,
            "train_loss": stats.loss,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "tokens_per_s": tps,
        });
        if done % a.eval_every.max(1) == 0 || done == a.steps {
            evaluate(&mut record)?;
        }
        writeln!(metrics, "{record}")?;
        metrics.flush()?;
        progress.step(done, stats.loss, tps);
        if done % a.save_every.max(1) == 0 || done == end {
            save_checkpoint(&source, &tokenizer, &a.out, &params, &opt, done)?;
        }
    }
    progress.finish();
    Ok(RunDone {
        steps: end.saturating_sub(start_step),
        tokens: end.saturating_sub(start_step) * tokens_per_step,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// What a run writes (OUT/last and its staging folders, metrics.jsonl, a random init, the
/// token cache) must not land on what it reads, and a fresh run must not replace an earlier
/// run's checkpoint or log: `--resume` continues it, `--force` starts over.
fn check_outputs(a: &TrainOptions) -> Result<()> {
    let mut inputs = Inputs::new();
    for p in [&a.model, &a.init_config, &a.tokenizer, &a.optimizer_from]
        .into_iter()
        .flatten()
    {
        inputs.add(p);
    }
    inputs.add_all(&text_files(&a.data)?);
    if !a.val.is_empty() {
        inputs.add_all(&text_files(&a.val)?);
    }
    let cache = a
        .token_cache
        .clone()
        .unwrap_or_else(|| a.out.join("tokens"));
    let staged_last = staging::staging_paths(&a.out.join(LAST))?;
    for (flag, written) in [
        ("--out", a.out.join(LAST)),
        ("--out", staged_last[0].clone()),
        ("--out", staged_last[1].clone()),
        ("--out", a.out.join("metrics.jsonl")),
        ("--out", a.out.join("init")),
        ("--token-cache", cache),
    ] {
        inputs.check_output(flag, &written)?;
    }
    if !a.resume && !a.force {
        for earlier in [LAST, "metrics.jsonl"] {
            let p = a.out.join(earlier);
            if p.symlink_metadata().is_ok() {
                bail!(
                    "{}: holds an earlier run ({earlier}); pass --resume to continue it or --force to start over",
                    a.out.display()
                );
            }
        }
    }
    Ok(())
}

/// The end-of-text token documents are separated by, when the tokenizer has one.
pub fn eos_token(tokenizer: &Path) -> Result<Option<u32>> {
    hyperclone_core::limits::ensure_regular_file(tokenizer)?; // a FIFO would hang
    crate::tokenizer_guard::guarded(tokenizer, "loading it", || {
        Ok(tokenizers::Tokenizer::from_file(tokenizer)
            .map_err(|e| NnError::Input(format!("{}: {e}", tokenizer.display())))?
            .token_to_id(crate::corpus::EOS_TOKEN))
    })
}

/// AdamW moments must be finite and second moments non-negative: a corrupt state would
/// otherwise turn every update into NaN (or a square root of a negative number).
fn check_optimizer_state(path: &Path) -> Result<()> {
    let f = hyperclone_core::safetensors::SafetensorsFile::open(path)?;
    for t in &f.tensors {
        let data = f.data(t);
        let bad = t.dtype.count_nonfinite(data);
        if bad > 0 {
            bail!(
                "{}: tensor `{}`: {bad} of {} values are NaN or infinite (corrupt optimizer state)",
                path.display(),
                t.name,
                t.numel()
            );
        }
        if t.name.starts_with("v.") {
            let mut v = vec![0f64; t.numel()];
            t.dtype.decode(data, &mut v);
            let negative = v.iter().filter(|&&x| x < 0.0).count();
            if negative > 0 {
                bail!(
                    "{}: tensor `{}`: {negative} negative second moments (corrupt optimizer state)",
                    path.display(),
                    t.name
                );
            }
        }
    }
    Ok(())
}

/// AdamW's own step count must agree with the checkpoint's step: it sets the bias
/// correction, so a mismatch silently changes every later update. trainer_state.json
/// records it (`adamw_step`); older checkpoints only bound it (moments carried from a base
/// start past 0, so it is at least the step).
fn check_optimizer_step(last: &Path, step: u64, adamw_step: u64) -> Result<()> {
    let path = last.join("trainer_state.json");
    let recorded = hyperclone_core::limits::read_json(&path)?
        .get("adamw_step")
        .map(|v| v.as_u64());
    let agrees = match recorded {
        Some(Some(r)) => r == adamw_step,
        Some(None) => bail!("{}: `adamw_step` is not a whole number", path.display()),
        None => adamw_step >= step,
    };
    if !agrees {
        bail!(
            "{}: adamw.step {adamw_step} disagrees with {} (step {step}{}): the optimizer state belongs to another run",
            last.join("optimizer.safetensors").display(),
            path.display(),
            match recorded {
                Some(Some(r)) => format!(", adamw_step {r}"),
                _ => String::new(),
            }
        );
    }
    Ok(())
}

/// Options that would make no sense or loop forever, refused before any work.
fn validate(a: &TrainOptions) -> Result<()> {
    if a.grad_accum == 0 {
        bail!("--grad-accum 0: give at least one micro-batch per step");
    }
    if a.batch == 0 || a.seq == 0 {
        bail!("--batch and --seq must be at least 1");
    }
    // Tokens held at once (a batch, or the validation windows): far past what fits in memory.
    const MAX_TOKENS: usize = 1 << 28;
    let eval = a.eval_windows.unwrap_or(a.batch.max(8));
    for (what, n) in [
        ("--batch x --seq", a.batch),
        ("--eval-windows x --seq", eval),
    ] {
        if n.checked_mul(a.seq).is_none_or(|t| t > MAX_TOKENS) {
            bail!("{what} = {n} x {} tokens: at most {MAX_TOKENS}", a.seq);
        }
    }
    for (flag, v) in [
        ("--lr", a.lr),
        ("--weight-decay", a.weight_decay),
        ("--grad-clip", a.grad_clip),
        ("--dropout", a.dropout),
    ] {
        if !v.is_finite() || v < 0.0 {
            bail!("{flag} {v}: must be a finite number >= 0");
        }
    }
    for (flag, v) in [
        ("--adam-beta1", a.adam_beta1),
        ("--adam-beta2", a.adam_beta2),
    ] {
        if !(0.0..1.0).contains(&v) {
            bail!("{flag} {v}: must be in [0, 1)");
        }
    }
    if !(a.adam_epsilon.is_finite() && a.adam_epsilon > 0.0) {
        bail!(
            "--adam-epsilon {}: must be a finite number > 0",
            a.adam_epsilon
        );
    }
    if a.dropout >= 1.0 {
        bail!("--dropout {}: must be below 1", a.dropout);
    }
    if let Some(min) = a.min_lr {
        if !(min.is_finite() && (0.0..=a.lr).contains(&min)) {
            bail!("--min-lr {min}: must be between 0 and --lr {}", a.lr);
        }
    }
    if let Schedule::Wsd { decay_frac } = a.schedule {
        check_decay_frac(decay_frac)?;
    }
    Ok(())
}

/// The WSD decay fraction is a fraction of the steps.
pub fn check_decay_frac(decay_frac: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&decay_frac) {
        bail!("--decay-frac {decay_frac}: must be between 0 and 1");
    }
    Ok(())
}

/// Training and validation files: `val` when given, else the last data file is held out.
fn split_files(data: &[PathBuf], val: &[PathBuf]) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let mut train = text_files(data)?;
    if train.is_empty() {
        bail!("--data: no .txt files found");
    }
    let val = if val.is_empty() {
        if train.len() < 2 {
            bail!("one data file: pass --val FILE (validation is split by file)");
        }
        vec![train.pop().expect("two or more")]
    } else {
        text_files(val)?
    };
    Ok((train, val))
}

fn eval_loss(model: &Decoder, tokens: &TokenFile, seq: usize, count: usize) -> Result<f64> {
    let (inputs, targets) = eval_windows(tokens, count, seq)?;
    mean_loss(model, &inputs, &targets, inputs.len() / seq)
}

/// How a hyperclone clone grew (from its safetensors metadata).
struct CloneGrowth {
    n: usize,
    m: usize,
    /// Where each space's copies lie: the recorded growth map's, or (clones made before
    /// growth maps were recorded) whole factors (n, m).
    segments: Vec<(Space, Segment)>,
    /// Only whole-factor width growth (what the optimizer carry's rule covers).
    width_only: bool,
}

fn clone_growth(ckpt: &Checkpoint) -> Option<CloneGrowth> {
    let meta = &ckpt.files.first()?.metadata;
    let n: usize = meta.get("hyperclone.factor")?.parse().ok()?;
    if n <= 1 {
        return None;
    }
    // Whole-factor clones record the FFN factor; Net2Net widths have none (the map has it).
    let m: Option<usize> = meta
        .get("hyperclone.ffn_factor")
        .and_then(|v| v.parse().ok());
    Some(match RecordedGrowth::of(ckpt) {
        Some(r) => {
            let same_depth = r
                .layers
                .iter()
                .enumerate()
                .all(|(j, l)| l.source == j && !l.identity);
            let whole = r.spaces.iter().all(|(_, s)| s.extra == 0);
            let m = r
                .spaces
                .iter()
                .find(|(s, _)| *s == Space::Ffn)
                .map_or(m.unwrap_or(n), |(_, s)| s.copies);
            CloneGrowth {
                n,
                m,
                width_only: same_depth && whole && r.residual_scale == 1.0,
                segments: r.spaces,
            }
        }
        None => {
            let m = m?;
            CloneGrowth {
                n,
                m,
                segments: uniform_segments(&ckpt.config, n, m),
                width_only: true,
            }
        }
    })
}

fn symmetry(
    ckpt: &Checkpoint,
    params: &[Param],
    segments: &[(Space, Segment)],
) -> Result<Option<f64>> {
    let tensors = params
        .iter()
        .map(|p| -> Result<(String, Vec<f64>, Vec<usize>)> {
            let v: Vec<f64> = p.var.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
            Ok((p.name.clone(), v, p.var.dims().to_vec()))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(mean_row_half_cosine_with(&ckpt.config, segments, &tensors))
}

/// OUT/last: an HF folder (config, weights, tokenizer files, the source's metadata) plus
/// optimizer.safetensors and trainer_state.json, replaced atomically.
fn save_checkpoint(
    source: &Path,
    tokenizer: &Path,
    out: &Path,
    params: &[Param],
    opt: &AdamW,
    step: u64,
) -> Result<()> {
    let last = out.join(LAST);
    // A killed run's staging folder (same OUT, process gone) is garbage.
    staging::remove_stale_siblings(&last)?;
    let staged = staging::StagedDir::create(&last)?;
    let dir = staged.path();
    for entry in std::fs::read_dir(source)? {
        let p = entry?.path();
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string();
        if p.is_file()
            && (name == "config.json" || hyperclone_core::write::is_companion_file(&name))
        {
            std::fs::copy(&p, dir.join(&name))?;
        }
    }
    // The checkpoint must be usable on its own: bring the tokenizer the run used.
    if !dir.join("tokenizer.json").exists() {
        std::fs::copy(tokenizer, dir.join("tokenizer.json"))?;
    }
    save_params(
        params,
        hyperclone_core::DType::F32,
        &dir.join("model.safetensors"),
    )?;
    opt.save(params, &dir.join("optimizer.safetensors"))?;
    std::fs::write(
        dir.join("trainer_state.json"),
        json!({ "step": step, "adamw_step": opt.t }).to_string(),
    )?;
    staged.commit(&last, true)?;
    Ok(())
}

/// The step a checkpoint folder (OUT/last) was saved at.
pub fn read_state(last: &Path) -> Result<u64> {
    let path = last.join("trainer_state.json");
    let v = hyperclone_core::limits::read_json(&path)?;
    v["step"]
        .as_u64()
        .with_context(|| format!("{}: no integer `step`", path.display()))
}

/// Opens metrics.jsonl for appending, first dropping records past the resumed step so a
/// resumed run's log reads like an uninterrupted one.
fn open_metrics(path: &Path, start_step: u64) -> Result<std::fs::File> {
    let previous = if start_step == 0 {
        String::new() // a fresh run: an earlier attempt's log is stale
    } else {
        std::fs::read_to_string(path).unwrap_or_default()
    };
    let kept: Vec<String> = previous
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= start_step)
        })
        .map(str::to_string)
        .collect();
    let mut f = std::fs::File::create(path)?;
    for l in kept {
        writeln!(f, "{l}")?;
    }
    Ok(f)
}

/// What [`train_tokenizer`] made.
pub struct TokenizerDone {
    pub vocab_size: usize,
    pub files: usize,
    pub seconds: f64,
}

/// `hyperclone tokenizer`: a byte-level BPE trained on the .txt files of `data`, saved to
/// `out` (tokenizer.json).
pub fn train_tokenizer(
    data: &[PathBuf],
    vocab_size: usize,
    min_frequency: u64,
    out: &Path,
    force: bool,
) -> Result<TokenizerDone> {
    // Token ids are u32 and the trainer allocates per id: far past any real vocabulary.
    const MAX_VOCAB: usize = 1 << 24;
    if vocab_size > MAX_VOCAB {
        bail!("--vocab-size {vocab_size}: at most {MAX_VOCAB} tokens");
    }
    let files = text_files(data)?;
    if files.is_empty() {
        bail!("--data: no .txt files found");
    }
    // Checked before the (long) training: not onto a data file, not over a file unasked.
    Inputs::new().add_all(&files).check_output("--out", out)?;
    refuse_existing("--out", out, force)?;
    let started = std::time::Instant::now();
    let tok = crate::corpus::train_bpe(&files, vocab_size, min_frequency)?;
    let json = tok
        .to_string(true)
        .map_err(|e| NnError::Input(format!("writing {}: {e}", out.display())))?;
    staging::write_file(out, json.as_bytes())?;
    Ok(TokenizerDone {
        vocab_size: tok.get_vocab_size(true),
        files: files.len(),
        seconds: started.elapsed().as_secs_f64(),
    })
}
