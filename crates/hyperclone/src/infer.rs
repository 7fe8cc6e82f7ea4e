//! forward, verify, generate: the Rust decoder on the command line.

use crate::args::{ForwardArgs, GenerateArgs, InputArgs, VerifyArgs};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use hyperclone_core::safetensors::{encode_header, HeaderEntry};
use hyperclone_core::Checkpoint;
use hyperclone_nn::check::Verification;
use hyperclone_nn::verify::argmax;
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

pub use hyperclone_nn::check::probe_tokens;

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

/// Runs the verification of BIG against SMALL on the probe INPUT chooses (see
/// [`hyperclone_nn::check::run_verify`]); used by `verify` and the demo.
pub fn run_verify(
    small: &Path,
    big: &Path,
    input: &InputArgs,
    dtype: DType,
) -> Result<Verification> {
    let vocab = Checkpoint::open(small)?.config.vocab_size;
    let ids = input_ids(input, small, vocab)?;
    Ok(hyperclone_nn::check::run_verify(
        small,
        big,
        Some(&ids),
        dtype,
    )?)
}

pub fn verify_cmd(a: VerifyArgs) -> Result<bool> {
    let v = run_verify(&a.small, &a.big, &a.input, parse_dtype(&a.dtype))?;
    let (r, symmetry) = (&v.report, v.symmetry);
    if a.json {
        outln!("{}", v.json());
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
        outln!("FAIL: {}", v.failure_reason());
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
