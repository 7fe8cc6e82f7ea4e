//! forward, verify, generate: the Rust decoder on the command line.

use crate::args::{ForwardArgs, GenerateArgs, InputArgs, VerifyArgs};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use hyperclone_core::safetensors::{encode_header, HeaderEntry};
use hyperclone_core::symmetry::mean_row_half_cosine;
use hyperclone_core::Checkpoint;
use hyperclone_nn::generate::{complete, forward_logits, load, tokenizer, Input};
use hyperclone_nn::verify::{
    default_tolerance, rounding_sensitivity, verify_expecting, Expectation, VerifyReport,
};
use hyperclone_nn::Decoder;
use serde_json::json;
use std::path::Path;

pub use hyperclone_nn::generate::parse_dtype;

/// The token flags as the library's input.
fn input_ids(input: &InputArgs, model: &Path, vocab: usize) -> Result<Vec<u32>> {
    let input = Input {
        tokens: input.tokens.clone(),
        text: input.text.clone(),
        random_tokens: input.random_tokens,
    };
    Ok(hyperclone_nn::generate::input_ids(&input, model, vocab)?)
}

pub fn forward(a: ForwardArgs) -> Result<()> {
    let (_, model) = load(&a.model, parse_dtype(&a.dtype))?;
    let ids = input_ids(&a.input, &a.model, model.spec.vocab)?;
    let logits = forward_logits(&model, &ids, a.batch, a.repeat)?;
    let (rows, seconds_per_forward) = (logits.rows, logits.seconds_per_forward);
    let (t, v) = (rows.len(), rows.first().map_or(0, Vec::len));
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
