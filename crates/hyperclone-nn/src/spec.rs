//! The decoder's switches, read from config.json and from which tensors the checkpoint has.
//!
//! One generic decoder covers every family; a family only sets switches here. Optional
//! pieces that show up as tensors (biases, per-head q/k norms) are switched on by their
//! presence, so a new family with the Llama layout needs no code at all.

use crate::error::{NnError, Result};
use hyperclone_core::Checkpoint;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Silu,
    GeluTanh,
    Gelu,
}

#[derive(Debug, Clone)]
pub struct DecoderSpec {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub norm_eps: f64,
    pub rope_theta: f64,
    /// Fraction of head_dim that is rotated (1.0 = full rotary).
    pub partial_rotary: f64,
    pub activation: Activation,
    /// Per-layer causal window (None = full attention).
    pub sliding_window: Vec<Option<usize>>,
}

impl DecoderSpec {
    pub fn from_checkpoint(ckpt: &Checkpoint) -> Result<Self> {
        let c = &ckpt.config;
        let raw = &c.raw;
        let path = c.path.display().to_string();
        let num = |v: Option<&Value>| v.and_then(Value::as_f64);
        let rope = raw
            .get("rope_parameters")
            .or_else(|| raw.get("rope_scaling"))
            .filter(|v| !v.is_null());
        if let Some(r) = rope {
            let kind = r
                .get("rope_type")
                .or_else(|| r.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            if kind != "default" {
                return Err(NnError::Unsupported(format!(
                    "{path}: rope_type `{kind}` is not implemented in the Rust decoder yet (clone works; verify in transformers)"
                )));
            }
        }
        let rope_theta = num(raw.get("rope_theta"))
            .or_else(|| num(rope.and_then(|r| r.get("rope_theta"))))
            .unwrap_or(10_000.0);
        let act_name = raw
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        let activation = match act_name {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            other => {
                return Err(NnError::Unsupported(format!(
                    "{path}: hidden_act `{other}`"
                )))
            }
        };
        let window = raw
            .get("sliding_window")
            .and_then(Value::as_u64)
            .map(|w| w as usize);
        let uses_window = match c.family.model_type {
            "mistral" => true,
            _ => raw
                .get("use_sliding_window")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        };
        let layer_types: Option<Vec<String>> =
            raw.get("layer_types").and_then(Value::as_array).map(|a| {
                a.iter()
                    .map(|v| v.as_str().unwrap_or("").to_string())
                    .collect()
            });
        let sliding_window = (0..c.num_hidden_layers)
            .map(|l| {
                let sliding = match &layer_types {
                    Some(t) => t.get(l).map(|s| s == "sliding_attention").unwrap_or(false),
                    None => uses_window,
                };
                if sliding && uses_window {
                    window
                } else {
                    None
                }
            })
            .collect();
        Ok(DecoderSpec {
            vocab: c.vocab_size,
            hidden: c.hidden_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            ffn: c.intermediate_size,
            norm_eps: num(raw.get("rms_norm_eps")).unwrap_or(1e-6),
            rope_theta,
            partial_rotary: num(raw.get("partial_rotary_factor")).unwrap_or(1.0),
            activation,
            sliding_window,
        })
    }
}
