//! `hyperclone demo`: the whole idea in half a minute, offline. The bundled model (a small
//! Llama trained on Shakespeare by `hyperclone train`, assets/shakespeare-tiny) is grown,
//! verified, and both models continue the same verse.

use crate::args::{DemoArgs, InputArgs};
use crate::infer;
use anyhow::{Context, Result};
use hyperclone_core::grow::grow_quietly;
use hyperclone_core::{GrowthOptions, Variant};
use hyperclone_nn::generate::{complete, load, parse_dtype, tokenizer};
use std::path::Path;
use std::time::Instant;

/// The bundled model, compiled in so the demo runs from any folder without a network.
const FILES: [(&str, &[u8]); 3] = [
    (
        "config.json",
        include_bytes!("../../../assets/shakespeare-tiny/config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../../../assets/shakespeare-tiny/model.safetensors"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../../../assets/shakespeare-tiny/tokenizer.json"),
    ),
];

pub fn demo(a: DemoArgs) -> Result<()> {
    // A new folder of a fresh name, removed on drop: the demo deletes only what it created
    // (a fixed name with the PID could be another process's folder).
    let scratch = tempfile::Builder::new()
        .prefix("hyperclone-demo-")
        .tempdir()
        .context("creating the demo's scratch folder")?;
    let small = scratch.path().join("shakespeare-tiny");
    std::fs::create_dir_all(&small).with_context(|| format!("creating {}", small.display()))?;
    for (name, bytes) in FILES {
        std::fs::write(small.join(name), bytes)?;
    }
    let big = scratch
        .path()
        .join(format!("shakespeare-tiny-x{}", a.factor));

    let started = Instant::now();
    let options = GrowthOptions {
        factor: a.factor,
        ffn_factor: a.factor,
        variant: Variant::Symmetric,
        snr_db: 10.0,
        seed: 0,
        dtype: None,
        shard_size: 5_000_000_000,
        ..GrowthOptions::default()
    };
    let (ckpt, plan) = grow_quietly(&small, &big, &options)?;
    let cloned = started.elapsed().as_secs_f64();
    let before: u64 = plan.params_before.values().sum();
    let after: u64 = plan.params_after.values().sum();
    outln!(
        "1. grew the bundled Shakespeare model x{}: {} -> {} parameters, hidden {} -> {}, heads {} -> {} ({:.2} s)",
        a.factor,
        before,
        after,
        ckpt.config.hidden_size,
        ckpt.config.hidden_size * a.factor,
        ckpt.config.num_attention_heads,
        ckpt.config.num_attention_heads * a.factor,
        cloned
    );

    let probe = InputArgs {
        tokens: None,
        text: Some(a.prompt.clone()),
        random_tokens: None,
    };
    let checked = infer::run_verify(&small, &big, &probe, parse_dtype("f64"))?;
    let (report, symmetry) = (checked.report, checked.symmetry);
    outln!(
        "2. verified in f64 on the prompt: max |logit diff| {:.2e} ({:.2e} of the scale), logit std ratio {:.12}, \
         every residual state the {}-fold tile; symmetry {:.4} -> {}",
        report.max_abs_logit_diff,
        report.max_rel_logit_diff,
        report.std_ratio,
        report.factor,
        symmetry.unwrap_or(f64::NAN),
        if report.passed() { "PASS" } else { "FAIL" }
    );

    outln!("3. greedy continuation of {:?}:", a.prompt);
    for (label, dir) in [("small", &small), ("grown", &big)] {
        let text = continue_prompt(dir, &a.prompt, a.max_tokens)?;
        outln!(
            "   {label:>5}: {}",
            one_line(&format!("{}{}", a.prompt, text))
        );
    }
    outln!("   (the same words: the grown model computes the small one's function; train it to make it better)");
    if !report.passed() {
        anyhow::bail!("the demo clone did not verify");
    }
    Ok(())
}

fn continue_prompt(dir: &Path, prompt: &str, max_tokens: usize) -> Result<String> {
    let (ckpt, model) = load(dir, parse_dtype("f32"))?;
    let tok = tokenizer(dir)?;
    Ok(complete(
        &ckpt,
        &model,
        &tok,
        prompt,
        max_tokens,
        0.0,
        0,
        |_| {},
    )?)
}

fn one_line(s: &str) -> String {
    s.replace('\n', " / ")
}
