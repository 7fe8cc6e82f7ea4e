//! Human and JSON renderings of plans, inspections and clone summaries.

use crate::args::CloneArgs;
use hyperclone_core::family::Space;
use hyperclone_core::family::{Component, Family, FAMILIES};
use hyperclone_core::grow::{by_component, clone_json, plan_json, threads, Cloned};
use hyperclone_core::{Checkpoint, Plan};
use serde_json::{json, Value};
use std::collections::BTreeMap;

fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", units[u])
    }
}

fn human_params(p: u64) -> String {
    match p {
        p if p >= 1_000_000_000 => format!("{:.2}B", p as f64 / 1e9),
        p if p >= 1_000_000 => format!("{:.2}M", p as f64 / 1e6),
        p if p >= 1_000 => format!("{:.1}K", p as f64 / 1e3),
        p => p.to_string(),
    }
}

/// "FFN x2, 30 -> 60 layers (identity), tied" : what grows besides the hidden width.
fn growth_summary(ckpt: &Checkpoint, plan: &Plan) -> String {
    let m = &plan.map;
    let ffn = m.segment(Space::Ffn);
    let mut parts = vec![if ffn.extra == 0 {
        format!("FFN x{}", ffn.copies)
    } else {
        format!("FFN {} -> {} (Net2Net)", ffn.len, ffn.dest_len())
    }];
    let heads = m.heads();
    if !m.heads_follow_factor() {
        parts.push(format!(
            "{} -> {heads} heads",
            ckpt.config.num_attention_heads
        ));
    }
    if m.layers.len() != ckpt.config.num_hidden_layers {
        parts.push(format!(
            "{} -> {} layers ({}{})",
            ckpt.config.num_hidden_layers,
            m.layers.len(),
            m.depth_mode.name(),
            if m.preserves_function() {
                ""
            } else {
                ", not function-preserving"
            }
        ));
    }
    if m.keep_tied {
        parts.push(if m.tied_eps_divisor == m.factor.saturating_mul(m.factor) {
            "embedding kept tied, residual carried as tile/n".into()
        } else {
            "embedding kept tied, residual carried as tile/sqrt(n)".into()
        });
    }
    parts.join(", ")
}

pub fn plan(ckpt: &Checkpoint, plan: &Plan, as_json: bool) {
    if as_json {
        outln!("{}", plan_json(ckpt, plan));
        return;
    }
    let o = &plan.options;
    outln!(
        "Plan: {} `{}` x{} ({}), variant {}{}",
        ckpt.config.family.model_type,
        ckpt.dir.display(),
        o.factor,
        growth_summary(ckpt, plan),
        o.variant.name(),
        if o.variant.is_noisy() {
            format!(" at {} dB, seed {}", o.snr_db, o.seed)
        } else {
            String::new()
        }
    );
    outln!("\nconfig.json changes:");
    for c in &plan.changes {
        outln!("  {:<22} {} -> {}", c.key, c.before, c.after);
    }
    outln!("\nparameters:            before ->      after");
    for c in Component::ALL {
        let b = plan.params_before.get(&c).copied().unwrap_or(0);
        let a = plan.params_after.get(&c).copied().unwrap_or(0);
        outln!(
            "  {:<18} {:>10} -> {:>10}",
            c.name(),
            human_params(b),
            human_params(a)
        );
    }
    let (b, a): (u64, u64) = (
        plan.params_before.values().sum(),
        plan.params_after.values().sum(),
    );
    outln!(
        "  {:<18} {:>10} -> {:>10}",
        "total",
        human_params(b),
        human_params(a)
    );
    if let Some(u) = &plan.map.upcycle {
        outln!(
            "  {:<18} {:>10} -> {:>10}   ({} of {} experts per token)",
            "active per token",
            human_params(b),
            human_params(plan.active_params()),
            u.per_token,
            u.experts
        );
        let exact = match u.not_exact_because() {
            None => "exact (every expert the dense MLP, zero router)".to_string(),
            Some(why) => format!("NOT function-preserving: {why}"),
        };
        outln!("\nupcycled to {}: {exact}", u.target);
    }
    // Every file the clone writes, counted as `clone` counts them (not only the shards).
    let files = match hyperclone_core::write::output_file_names(ckpt, plan) {
        Ok(f) => {
            let copied = f.len() - plan.shards.len() - 2 - usize::from(plan.is_sharded());
            format!(
                "{} file(s): {} safetensors{}, config.json, README.md{}",
                f.len(),
                plan.shards.len(),
                if plan.is_sharded() { " + index" } else { "" },
                if copied > 0 {
                    format!(", {copied} copied from the source (tokenizer, ...)")
                } else {
                    String::new()
                }
            )
        }
        Err(_) => format!("{} safetensors file(s)", plan.shards.len()),
    };
    outln!(
        "\noutput: {} in {files}; expected peak memory {} (source pages are memory-mapped, not counted)",
        human_bytes(plan.output_bytes()),
        human_bytes(plan.peak_memory_bytes(threads()))
    );
}

pub fn inspect(ckpt: &Checkpoint, as_json: bool) {
    let c = &ckpt.config;
    let mut counts = BTreeMap::new();
    for t in &ckpt.tensors {
        *counts.entry(t.rule.component).or_insert(0u64) += t.info.numel() as u64;
    }
    let shards: Vec<Value> = ckpt
        .files
        .iter()
        .map(|f| {
            let bytes = std::fs::metadata(&f.path).map(|m| m.len()).unwrap_or(0);
            json!({"file": f.path.file_name().map(|n| n.to_string_lossy().into_owned()), "tensors": f.tensors.len(), "bytes": bytes})
        })
        .collect();
    let dtypes: Vec<&str> = ckpt.dtypes().iter().map(|d| d.torch_name()).collect();
    let mut v = serde_json::Map::new();
    v.insert("path".into(), json!(ckpt.dir.display().to_string()));
    v.insert("model_type".into(), json!(c.family.model_type));
    v.extend(c.sizes_json());
    let rest = json!({
        "attention": attention_kind(c.num_attention_heads, c.num_key_value_heads),
        "parameters": by_component(&counts),
        "dtypes": dtypes,
        "shards": shards,
        "dropped_tensors": ckpt.dropped,
        "supported_families": FAMILIES.iter().map(|f| f.model_type).collect::<Vec<_>>(),
    });
    v.extend(rest.as_object().cloned().unwrap_or_default());
    let v = Value::Object(v);
    if as_json {
        outln!("{v}");
        return;
    }
    outln!("{}  ({})", ckpt.dir.display(), c.family.model_type);
    outln!(
        "  hidden {}  intermediate {}  layers {}  vocab {}",
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.vocab_size
    );
    outln!(
        "  heads {} / kv heads {} ({}), head_dim {}, head {}",
        c.num_attention_heads,
        c.num_key_value_heads,
        attention_kind(c.num_attention_heads, c.num_key_value_heads),
        c.head_dim,
        if c.tie_word_embeddings {
            "tied"
        } else {
            "untied"
        }
    );
    out!("  parameters {}:", human_params(counts.values().sum()));
    for comp in Component::ALL {
        out!(
            " {} {}",
            comp.name(),
            human_params(counts.get(&comp).copied().unwrap_or(0))
        );
    }
    outln!();
    outln!("  dtypes {}", dtypes.join(", "));
    for f in &ckpt.files {
        let bytes = std::fs::metadata(&f.path).map(|m| m.len()).unwrap_or(0);
        outln!(
            "  {} ({} tensors, {})",
            f.path.display(),
            f.tensors.len(),
            human_bytes(bytes)
        );
    }
    outln!(
        "  supported families: {}",
        Family::supported_names().join(", ")
    );
}

fn attention_kind(heads: usize, kv: usize) -> &'static str {
    match kv {
        1 if heads > 1 => "MQA",
        k if k == heads => "MHA",
        _ => "GQA",
    }
}

pub fn clone_summary(
    cloned: &Cloned,
    a: &CloneArgs,
    seconds: f64,
    verification: Option<&Value>,
    as_json: bool,
) {
    let (plan, out) = (&cloned.plan, &cloned.outcome);
    let params: u64 = plan.params_after.values().sum();
    let gbps = out.bytes_written as f64 / seconds.max(1e-9) / 1e9;
    if as_json {
        outln!("{}", clone_json(cloned, &a.dst, seconds, verification));
        return;
    }
    let before: u64 = plan.params_before.values().sum();
    outln!(
        "cloned {} -> {}: {} -> {} parameters, {} in {:.2} s ({:.2} GB/s), {} file(s)",
        a.src.display(),
        a.dst.display(),
        human_params(before),
        human_params(params),
        human_bytes(out.bytes_written),
        seconds,
        gbps,
        out.files.len()
    );
    if let Some(v) = verification {
        outln!(
            "verified ({}-token probe, tolerance {:.0e}): max |logit diff| {:.2e} ({:.2e} of the scale), logit std ratio {:.9}, \
             every residual state the {}-fold tile of the source's",
            v["tokens"], v["tolerance"].as_f64().unwrap_or(f64::NAN), v["max_abs_logit_diff"].as_f64().unwrap_or(f64::NAN),
            v["max_rel_logit_diff"].as_f64().unwrap_or(f64::NAN), v["std_ratio"].as_f64().unwrap_or(f64::NAN), v["factor"]
        );
    }
}
