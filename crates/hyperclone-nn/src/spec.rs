//! The decoder's numeric switches, read from config.json. Which tensors exist and how a
//! block is wired come from `arch.rs`; optional pieces stored as tensors (biases) are
//! switched on by their presence.

use crate::error::{NnError, Result};
use hyperclone_core::Checkpoint;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Silu,
    GeluTanh,
    Gelu,
    Relu,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormKind {
    /// x / rms(x) * w
    Rms,
    /// x / rms(x) * (1 + w) (Gemma)
    RmsOnePlus,
    /// (x - mean) / std * w + b
    Layer,
}

/// Llama-3 style frequency rescaling of the rotary embedding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Rope {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
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
    pub llama3_rope: Option<Llama3Rope>,
    pub activation: Activation,
    /// Per-layer causal window (None = full attention).
    pub sliding_window: Vec<Option<usize>>,
    /// Score scale (head_dim^-0.5, or Gemma-2's query_pre_attn_scalar^-0.5).
    pub attn_scale: f64,
    pub attn_softcap: Option<f64>,
    pub final_softcap: Option<f64>,
    /// Gemma multiplies embeddings by sqrt(hidden_size).
    pub embed_scale: Option<f64>,
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
        let mut llama3_rope = None;
        if let Some(r) = rope {
            let kind = r
                .get("rope_type")
                .or_else(|| r.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            match kind {
                "default" => {}
                "llama3" => {
                    let f = |k: &str| {
                        num(r.get(k)).ok_or_else(|| NnError::Unsupported(format!("{path}: llama3 rope without `{k}`")))
                    };
                    llama3_rope = Some(Llama3Rope {
                        factor: f("factor")?,
                        low_freq_factor: f("low_freq_factor")?,
                        high_freq_factor: f("high_freq_factor")?,
                        original_max_position_embeddings: f("original_max_position_embeddings")?,
                    });
                }
                other => {
                    return Err(NnError::Unsupported(format!(
                        "{path}: rope_type `{other}` is not implemented in the Rust decoder yet (clone works; verify in transformers)"
                    )))
                }
            }
        }
        let rope_theta = num(raw.get("rope_theta"))
            .or_else(|| num(rope.and_then(|r| r.get("rope_theta"))))
            .or_else(|| num(raw.get("rotary_emb_base")))
            .unwrap_or(10_000.0);
        let partial_rotary = num(raw.get("partial_rotary_factor"))
            .or_else(|| num(rope.and_then(|r| r.get("partial_rotary_factor"))))
            .or_else(|| num(raw.get("rotary_pct")))
            .unwrap_or(1.0);
        let act_name = ["hidden_activation", "hidden_act", "activation_function"]
            .iter()
            .find_map(|k| raw.get(*k).and_then(Value::as_str))
            .unwrap_or("silu");
        let activation = match act_name {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            "relu" => Activation::Relu,
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
        let window_everywhere = match c.family.model_type {
            "mistral" | "starcoder2" => true,
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
        let sliding_window: Vec<Option<usize>> = (0..c.num_hidden_layers)
            .map(|l| {
                let sliding = match &layer_types {
                    Some(t) => {
                        t.get(l).is_some_and(|s| s == "sliding_attention")
                            && (window_everywhere || c.family.per_layer_sliding)
                    }
                    None => window_everywhere,
                };
                if sliding {
                    window
                } else {
                    None
                }
            })
            .collect();
        let norm_eps = [
            "rms_norm_eps",
            "layer_norm_eps",
            "layer_norm_epsilon",
            "norm_epsilon",
            "norm_eps",
        ]
        .iter()
        .find_map(|k| num(raw.get(*k)));
        let attn_scale = match num(raw.get("query_pre_attn_scalar")) {
            Some(s) => s.powf(-0.5),
            None => (c.head_dim as f64).powf(-0.5),
        };
        let softcap = |k: &str| num(raw.get(k)).filter(|&v| v > 0.0);
        // Numbers the forward pass divides by, raises to powers or sizes buffers with: refuse
        // values that would panic or silently give NaN instead of computing with them.
        let bad = |what: &str, v: f64| {
            NnError::Unsupported(format!("{path}: `{what}` = {v} is out of range"))
        };
        let positive = |what: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(bad(what, v))
            }
        };
        positive("rope_theta", rope_theta)?;
        if !(partial_rotary > 0.0 && partial_rotary <= 1.0) {
            return Err(bad("partial_rotary_factor", partial_rotary));
        }
        if let Some(eps) = norm_eps {
            if !(eps.is_finite() && eps >= 0.0) {
                return Err(bad("rms_norm_eps", eps));
            }
        }
        if !attn_scale.is_finite() {
            return Err(bad("query_pre_attn_scalar", attn_scale.powi(-2)));
        }
        if let Some(r) = &llama3_rope {
            positive("rope_scaling.factor", r.factor)?;
            positive("rope_scaling.low_freq_factor", r.low_freq_factor)?;
            positive("rope_scaling.high_freq_factor", r.high_freq_factor)?;
            positive(
                "rope_scaling.original_max_position_embeddings",
                r.original_max_position_embeddings,
            )?;
            if r.high_freq_factor == r.low_freq_factor {
                return Err(bad(
                    "rope_scaling.high_freq_factor (= low_freq_factor)",
                    r.high_freq_factor,
                ));
            }
        }
        if let Some(w) = sliding_window.iter().flatten().next() {
            if *w == 0 {
                return Err(bad("sliding_window", 0.0));
            }
        }
        Ok(DecoderSpec {
            vocab: c.vocab_size,
            hidden: c.hidden_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            ffn: c.intermediate_size,
            // Without a config key the modules' own defaults apply: torch.nn.LayerNorm 1e-5
            // (OPT), the RMSNorms 1e-6; `Decoder::load` settles it once it knows the norm.
            norm_eps: norm_eps.unwrap_or(f64::NAN),
            rope_theta,
            partial_rotary,
            llama3_rope,
            activation,
            sliding_window,
            attn_scale,
            attn_softcap: softcap("attn_logit_softcapping"),
            final_softcap: softcap("final_logit_softcapping"),
            embed_scale: c
                .family
                .embedding_scaled_by_sqrt_hidden
                .then(|| (c.hidden_size as f64).sqrt()),
        })
    }

    /// Inverse frequencies of the rotary embedding (rotary_dim / 2 of them), in f64.
    pub fn inv_freq(&self, rot: usize) -> Vec<f64> {
        let half = rot / 2;
        (0..half)
            .map(|i| {
                let inv = 1.0 / self.rope_theta.powf((2 * i) as f64 / rot as f64);
                match self.llama3_rope {
                    None => inv,
                    Some(r) => {
                        let low_wavelen = r.original_max_position_embeddings / r.low_freq_factor;
                        let high_wavelen = r.original_max_position_embeddings / r.high_freq_factor;
                        let wavelen = std::f64::consts::TAU / inv;
                        if wavelen < high_wavelen {
                            inv
                        } else if wavelen > low_wavelen {
                            inv / r.factor
                        } else {
                            let smooth = (r.original_max_position_embeddings / wavelen
                                - r.low_freq_factor)
                                / (r.high_freq_factor - r.low_freq_factor);
                            (1.0 - smooth) * inv / r.factor + smooth * inv
                        }
                    }
                }
            })
            .collect()
    }
}
