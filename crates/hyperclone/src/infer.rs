//! forward, verify, generate: the Rust decoder on the command line.

use crate::args::{ForwardArgs, GenerateArgs, InputArgs, VerifyArgs};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use hyperclone_core::safetensors::{encode_header, HeaderEntry};
use hyperclone_core::symmetry::mean_row_half_cosine;
use hyperclone_core::Checkpoint;
use hyperclone_nn::verify::{
    argmax, default_tolerance, rounding_sensitivity, verify_expecting, Expectation, VerifyReport,
};
use hyperclone_nn::Decoder;
use serde_json::json;
use std::path::Path;
use tokenizers::Tokenizer;

pub fn parse_dtype(s: &str) -> DType {
    match s {
        "f64" => DType::F64,
        "bf16" => DType::BF16,
        _ => DType::F32,
    }
}

pub fn tokenizer(model: &Path) -> Result<Tokenizer> {
    let p = model.join("tokenizer.json");
    // A FIFO or device would hang or never end.
    hyperclone_core::limits::ensure_regular_file(&p)?;
    Tokenizer::from_file(&p)
        .map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer: {e}", p.display()))
}

/// A fixed probe: 16 ids spread over the vocabulary (no tokenizer needed).
pub fn probe_tokens(vocab: usize) -> Vec<u32> {
    (0..16u64)
        .map(|i| ((i * 7919 + 13) % vocab as u64) as u32)
        .collect()
}

/// Longest token sequence forward and verify accept (attention is quadratic in it).
const MAX_TOKENS: usize = 1 << 20;

fn input_ids(input: &InputArgs, model: &Path, vocab: usize) -> Result<Vec<u32>> {
    if let Some(t) = &input.tokens {
        let ids: Vec<u32> = t
            .split(',')
            .map(|x| {
                x.trim()
                    .parse::<u32>()
                    .with_context(|| format!("--tokens: `{x}` is not a token id"))
            })
            .collect::<Result<_>>()?;
        if ids.is_empty() {
            bail!("--tokens is empty");
        }
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            bail!("--tokens: id {bad} is outside the model's vocabulary of {vocab}");
        }
        return Ok(ids);
    }
    if let Some(t) = input.random_tokens {
        if t == 0 {
            bail!("--random-tokens 0: give at least one token");
        }
        if t > MAX_TOKENS {
            bail!("--random-tokens {t}: at most {MAX_TOKENS} tokens");
        }
        let mut state = 0x5eed_u64;
        return Ok((0..t)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) % vocab as u64) as u32
            })
            .collect());
    }
    if let Some(text) = &input.text {
        let enc = tokenizer(model)?
            .encode(text.as_str(), false)
            .map_err(|e| anyhow::anyhow!("tokenizing --text: {e}"))?;
        if enc.get_ids().is_empty() {
            bail!("--text gave no tokens");
        }
        return Ok(enc.get_ids().to_vec());
    }
    Ok(probe_tokens(vocab))
}

pub fn load(model: &Path, dtype: DType) -> Result<(Checkpoint, Decoder)> {
    let ckpt = Checkpoint::open(model)?;
    let dec = Decoder::load(&ckpt, dtype, &Device::Cpu)?;
    Ok((ckpt, dec))
}

pub fn forward(a: ForwardArgs) -> Result<()> {
    let (_, model) = load(&a.model, parse_dtype(&a.dtype))?;
    let ids = input_ids(&a.input, &a.model, model.spec.vocab)?;
    if a.batch == 0 || a.batch > MAX_TOKENS / ids.len() {
        bail!(
            "--batch {}: must be at least 1 and hold at most {MAX_TOKENS} tokens in all",
            a.batch
        );
    }
    let batch: Vec<u32> = ids
        .iter()
        .copied()
        .cycle()
        .take(ids.len() * a.batch)
        .collect();
    let input = Tensor::from_vec(batch, (a.batch, ids.len()), &Device::Cpu)?;
    let logits = model.forward(&input)?.logits.get(0)?.to_dtype(DType::F32)?;
    let mut seconds_per_forward = None;
    if a.repeat > 0 {
        let start = std::time::Instant::now();
        for _ in 0..a.repeat {
            model.forward(&input)?;
        }
        seconds_per_forward = Some(start.elapsed().as_secs_f64() / a.repeat as f64);
    }
    let (t, v) = logits.dims2()?;
    let rows: Vec<Vec<f32>> = logits.to_vec2()?;
    if let Some(out) = &a.out {
        let entry = HeaderEntry {
            name: "logits".into(),
            dtype: hyperclone_core::DType::F32,
            shape: vec![t, v],
        };
        let mut meta = std::collections::BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let mut bytes = encode_header(&[entry], &meta);
        for x in rows.iter().flatten() {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        std::fs::write(out, bytes).with_context(|| format!("writing {}", out.display()))?;
    }
    let last: Vec<f64> = rows[t - 1].iter().map(|&x| x as f64).collect();
    let mut order: Vec<usize> = (0..v).collect();
    order.sort_by(|&i, &j| last[j].total_cmp(&last[i]));
    let tok = tokenizer(&a.model).ok();
    let top5: Vec<serde_json::Value> = order[..5.min(v)]
        .iter()
        .map(|&i| {
            let text = tok.as_ref().and_then(|t| t.decode(&[i as u32], false).ok());
            json!({"id": i, "logit": last[i], "text": text})
        })
        .collect();
    let tokens_per_second = seconds_per_forward.map(|s| (a.batch * t) as f64 / s);
    if a.json {
        let summary = json!({
            "shape": [t, v],
            "batch": a.batch,
            "tokens": ids,
            "last_top5": top5,
            "out": a.out.map(|p| p.display().to_string()),
            "seconds_per_forward": seconds_per_forward,
            "tokens_per_second": tokens_per_second,
        });
        outln!("{summary}");
        return Ok(());
    }
    if let (Some(s), Some(tps)) = (seconds_per_forward, tokens_per_second) {
        outln!(
            "{s:.4} s per forward of {}x{t} tokens ({tps:.0} tokens/s)",
            a.batch
        );
    }
    outln!(
        "logits [{t}, {v}] for {} tokens; last position's top 5:",
        ids.len()
    );
    for (e, &i) in top5.iter().zip(&order) {
        // From the logits themselves: JSON has no NaN (it would read back as null).
        let logit = last[i];
        outln!(
            "  {:>8}  {logit:>10.4}  {}",
            e["id"],
            e["text"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// Verification holds both models in memory in the working dtype; refuse up front, with the
/// numbers, rather than be killed by the OOM killer half-way (a 7B clone in f64 is 56 GB).
fn ensure_memory_for(models: &[&Checkpoint], dtype: DType) -> Result<()> {
    let (need, available) = memory_for(models, dtype);
    if let Some(avail) = available {
        if need > avail {
            bail!(
                "verifying needs about {:.1} GiB in {:?} but {:.1} GiB is available (use `hyperclone verify --dtype f32`, \
                 or a bigger machine)",
                need as f64 / (1u64 << 30) as f64,
                dtype,
                avail as f64 / (1u64 << 30) as f64
            );
        }
    }
    Ok(())
}

/// (bytes verification needs, bytes available if known).
fn memory_for(models: &[&Checkpoint], dtype: DType) -> (u64, Option<u64>) {
    let params: u64 = models.iter().map(|c| c.parameter_count()).sum();
    // Weights once in the working dtype plus one f64 staging copy of a model while loading;
    // the activations of a probe are small in comparison.
    let need = params * dtype.size_in_bytes() as u64 + params * 8 / models.len().max(1) as u64;
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    (need, available)
}

/// The precision `clone --verify` can afford: f64 (exact to 1e-9) when both models fit in
/// memory that way, else f32 (1e-4 of the logit scale).
pub fn affordable_dtype(small: &Path, big: &Path) -> Result<DType> {
    let (s, b) = (Checkpoint::open(small)?, Checkpoint::open(big)?);
    Ok(match memory_for(&[&s, &b], DType::F64) {
        (need, Some(avail)) if need > avail => DType::F32,
        _ => DType::F64,
    })
}

/// Runs the verification of BIG against SMALL; used by `verify` and `clone --verify`.
pub fn run_verify(
    small: &Path,
    big: &Path,
    input: &InputArgs,
    dtype: DType,
) -> Result<(VerifyReport, Option<f64>)> {
    let small_ckpt = Checkpoint::open(small)?;
    let big_ckpt = Checkpoint::open(big)?;
    ensure_memory_for(&[&small_ckpt, &big_ckpt], dtype)?;
    let small_model = Decoder::load(&small_ckpt, dtype, &Device::Cpu)?;
    let big_model = Decoder::load(&big_ckpt, dtype, &Device::Cpu)?;
    let ids = input_ids(input, small, small_model.spec.vocab)?;
    let expect = Expectation::recorded(&big_ckpt)?;
    // The coarsest dtype BIG stores weights in bounds how exact it can be (see
    // default_tolerance); SMALL's own rounding is shared by both models.
    let coarsest = big_ckpt
        .dtypes()
        .into_iter()
        .max_by_key(|d| std::cmp::Reverse(d.size()))
        .unwrap_or(hyperclone_core::DType::F64);
    // In bf16/f16 the storage rounding dominates, and how much it moves the logits depends
    // on the model (depth, norms, scale): measure it on SMALL instead of assuming it.
    let report = match coarsest {
        hyperclone_core::DType::BF16 | hyperclone_core::DType::F16 => {
            let s = rounding_sensitivity(&small_ckpt, &small_model, coarsest, dtype, &ids)?;
            verify_expecting(&small_model, &big_model, &ids, 0.0, &expect)?
                .with_measured_tolerance(dtype, s)
        }
        _ => verify_expecting(
            &small_model,
            &big_model,
            &ids,
            default_tolerance(dtype, coarsest),
            &expect,
        )?,
    };
    let symmetry = mean_row_half_cosine(&big_ckpt, &small_ckpt.config);
    Ok((report, symmetry))
}

pub fn report_json(r: &VerifyReport, symmetry: Option<f64>) -> serde_json::Value {
    json!({
        "passed": r.passed(),
        "factor": r.factor,
        "tokens": r.tokens,
        "tolerance": r.tolerance,
        "std_tolerance": r.std_tolerance,
        "max_abs_logit_diff": r.max_abs_logit_diff,
        "max_rel_logit_diff": r.max_rel_logit_diff,
        "std_ratio": r.std_ratio,
        "top1_agreement": r.top1_agreement,
        "kl_small_big": r.kl_small_big,
        "first_divergence": r.first_divergence().map(|s| s.name.clone()),
        "states": r.states.iter().map(|s| json!({"state": s.name, "max_abs": s.max_abs, "relative": s.relative})).collect::<Vec<_>>(),
        "mean_row_half_cosine": symmetry,
    })
}

/// One line saying why a clone does not verify.
pub fn failure_reason(r: &VerifyReport) -> String {
    if let Some(s) = r.first_divergence() {
        return format!(
            "residual stream first diverges at {} (max deviation {:.3e}, {:.3e} of its scale; tolerance {:.0e})",
            s.name, s.max_abs, s.relative, r.tolerance
        );
    }
    format!(
        "logits differ by {:.3e} ({:.3e} of their scale; tolerance {:.0e}) and std ratio is {:.9} (tolerance {:.0e})",
        r.max_abs_logit_diff, r.max_rel_logit_diff, r.tolerance, r.std_ratio, r.std_tolerance
    )
}

pub fn verify_cmd(a: VerifyArgs) -> Result<bool> {
    let (r, symmetry) = run_verify(&a.small, &a.big, &a.input, parse_dtype(&a.dtype))?;
    if a.json {
        outln!("{}", report_json(&r, symmetry));
        return Ok(r.passed());
    }
    outln!(
        "verify {} (x{}) against {} on {} tokens, {}:",
        a.big.display(),
        r.factor,
        a.small.display(),
        r.tokens,
        a.dtype
    );
    outln!(
        "  max |logit diff|     {:.3e} ({:.3e} of the logit scale)",
        r.max_abs_logit_diff,
        r.max_rel_logit_diff
    );
    outln!("  logit std ratio      {:.12}", r.std_ratio);
    outln!("  top-1 agreement      {:.1}%", r.top1_agreement * 100.0);
    outln!("  KL(small || big)     {:.3e}", r.kl_small_big);
    for s in &r.states {
        outln!(
            "  {:<20} max deviation from the {}-fold tile {:.3e}",
            s.name,
            r.factor,
            s.max_abs
        );
    }
    if let Some(c) = symmetry {
        outln!("  mean row-half cosine {c:.4} (1 = symmetric copies)");
    }
    if r.passed() {
        outln!(
            "PASS: the clone computes the source's function (tolerance {:.0e})",
            r.tolerance
        );
    } else {
        outln!("FAIL: {}", failure_reason(&r));
    }
    Ok(r.passed())
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    if !a.temperature.is_finite() || a.temperature < 0.0 {
        bail!(
            "--temperature {}: must be a finite number >= 0 (0 = greedy)",
            a.temperature
        );
    }
    let (ckpt, model) = load(&a.model, parse_dtype(&a.dtype))?;
    if let Some(max) = ckpt
        .config
        .raw
        .get("max_position_embeddings")
        .and_then(serde_json::Value::as_u64)
    {
        if a.max_tokens as u64 > max {
            eprintln!(
                "warning: --max-tokens {} is past the model's max_position_embeddings {max}: \
                 positions beyond it were never trained",
                a.max_tokens
            );
        }
    }
    let tok = tokenizer(&a.model)?;
    out!("{}", a.prompt);
    complete(
        &ckpt,
        &model,
        &tok,
        &a.prompt,
        a.max_tokens,
        a.temperature,
        a.seed,
        |new| {
            out!("{new}");
        },
    )?;
    outln!();
    Ok(())
}

/// Continues `prompt` for at most `max_tokens` (greedy at temperature 0, else seeded
/// sampling), calling `emit` with each newly decoded piece; returns the continuation.
#[allow(clippy::too_many_arguments)]
pub fn complete(
    ckpt: &Checkpoint,
    model: &Decoder,
    tok: &Tokenizer,
    prompt: &str,
    max_tokens: usize,
    temperature: f64,
    seed: u64,
    mut emit: impl FnMut(&str),
) -> Result<String> {
    let mut ids = tok
        .encode(prompt, false)
        .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?
        .get_ids()
        .to_vec();
    if ids.is_empty() {
        bail!("the prompt gave no tokens");
    }
    let eos = eos_ids(ckpt);
    let prompt_len = ids.len();
    let mut rng = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut printed = String::new();
    for _ in 0..max_tokens {
        // No KV cache: the whole sequence is recomputed each step (fine for verification-size
        // models; generation speed is not this command's job).
        let input = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu)?;
        let logits = model.forward(&input)?.logits.squeeze(0)?;
        let last: Vec<f64> = logits.get(ids.len() - 1)?.to_dtype(DType::F64)?.to_vec1()?;
        let next = if temperature <= 0.0 {
            argmax(&last)
        } else {
            sample(&last, temperature, &mut rng)
        } as u32;
        if eos.contains(&next) {
            break;
        }
        ids.push(next);
        let text = tok
            .decode(&ids[prompt_len..], true)
            .map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
        if let Some(new) = text.strip_prefix(printed.as_str()) {
            emit(new);
        }
        printed = text;
    }
    Ok(printed)
}

fn eos_ids(ckpt: &Checkpoint) -> Vec<u32> {
    let mut v = Vec::new();
    let mut add = |x: Option<&serde_json::Value>| match x {
        Some(serde_json::Value::Number(n)) => v.extend(n.as_u64().map(|n| n as u32)),
        Some(serde_json::Value::Array(a)) => {
            v.extend(a.iter().filter_map(|n| n.as_u64()).map(|n| n as u32))
        }
        _ => {}
    };
    add(ckpt.config.raw.get("eos_token_id"));
    // Bounded and regular-file only (a FIFO would hang); an unreadable file adds nothing.
    if let Ok(g) = hyperclone_core::limits::read_json(&ckpt.dir.join("generation_config.json")) {
        add(g.get("eos_token_id"));
    }
    v
}

fn sample(logits: &[f64], temperature: f64, state: &mut u64) -> usize {
    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = logits
        .iter()
        .map(|x| ((x - m) / temperature).exp())
        .collect();
    let total: f64 = w.iter().sum();
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut u = (*state >> 11) as f64 / (1u64 << 53) as f64 * total;
    for (i, x) in w.iter().enumerate() {
        if u < *x {
            return i;
        }
        u -= x;
    }
    w.len() - 1
}
