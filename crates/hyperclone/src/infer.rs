//! forward, verify, generate: the Rust decoder on the command line.

use crate::args::{ForwardArgs, GenerateArgs, InputArgs, VerifyArgs};
use anyhow::{bail, Result};
use hyperclone_core::output_guard::{refuse_existing, Inputs};
use hyperclone_core::safetensors::{encode_header, HeaderEntry};
use hyperclone_core::staging;
use hyperclone_core::Checkpoint;
use hyperclone_nn::check::Verification;
use hyperclone_nn::generate::{complete, forward_logits, load, tokenizer, Input};
use hyperclone_nn::tokenizer_guard::guarded;
use hyperclone_nn::DType;
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
    if let Some(out) = &a.out {
        // Before any work: the logits must not land on the model (its weights, its folder)
        // nor replace a file the user did not say may go.
        Inputs::new().add(&a.model).check_output("--out", out)?;
        refuse_existing("--out", out, a.force)?;
    }
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
        staging::write_file(out, &bytes)?;
    }
    let last: Vec<f64> = rows[t - 1].iter().map(|&x| x as f64).collect();
    let mut order: Vec<usize> = (0..v).collect();
    order.sort_by(|&i, &j| last[j].total_cmp(&last[i]));
    let tok = tokenizer(&a.model).ok();
    let top5: Vec<serde_json::Value> = order[..5.min(v)]
        .iter()
        .map(|&i| {
            let text = tok.as_ref().and_then(|t| {
                let file = a.model.join("tokenizer.json");
                guarded(&file, "decoding", || Ok(t.decode(&[i as u32], false).ok())).ok()?
            });
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
            // Which packed f32 schedule the load timed fastest, per input width (speed
            // only; empty where none was timed): see packed_schedule.rs.
            "packed_schedules": packed_schedules(),
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

/// The packed-schedule timings of this process, for `--json`.
fn packed_schedules() -> Vec<serde_json::Value> {
    hyperclone_nn::packed_schedule::tunings()
        .into_iter()
        .map(|t| {
            let map = |v: Vec<(String, f64)>| -> serde_json::Map<String, serde_json::Value> {
                v.into_iter().map(|(s, x)| (s, json!(x))).collect()
            };
            json!({
                "inputs": t.inputs,
                "chosen": t.chosen,
                "best_seconds": map(t.seconds),
                "median_ratio_to_gemm": map(t.ratios),
            })
        })
        .collect()
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
