//! The decoder's numeric switches, read from config.json. Which keys a family reads and
//! their defaults are constants of its record (`Family::decoder`, in core), never a branch on
//! `model_type` here; which tensors exist and how a block is wired come from `arch.rs`;
//! optional pieces stored as tensors (biases) are switched on by their presence.

use crate::error::{NnError, Result};
use hyperclone_core::family::{Family, LayerSliding};
use hyperclone_core::wiring::DecoderSwitches;
use hyperclone_core::Checkpoint;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Silu,
    GeluTanh,
    Gelu,
    Relu,
}

pub use hyperclone_core::wiring::NormKind;

/// Llama-3 style frequency rescaling of the rotary embedding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Rope {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// Which rotary table a layer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerRope {
    /// `rope_theta` (and its scaling): every layer of most families, the full-attention
    /// layers of Gemma-3 and OLMo-3.
    Global,
    /// The sliding layers' own rope (Gemma-3's local base frequency, OLMo-3's sliding
    /// `rope_parameters`): default rope at `DecoderSpec::local_rope_theta`.
    Local,
    /// No rotary embedding (SmolLM3's NoPE layers).
    None,
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
    /// Per-layer score scale: head_dim^-0.5, Gemma-2's query_pre_attn_scalar^-0.5, or
    /// GPT-2's with `scale_attn_weights` / `scale_attn_by_inverse_layer_idx`.
    pub attn_scale: Vec<f64>,
    pub attn_softcap: Option<f64>,
    pub final_softcap: Option<f64>,
    /// Gemma multiplies embeddings by sqrt(hidden_size); Granite by `embedding_multiplier`.
    pub embed_scale: Option<f64>,
    /// The rotary table of each layer.
    pub layer_rope: Vec<LayerRope>,
    /// rope_theta of the [`LayerRope::Local`] table.
    pub local_rope_theta: f64,
    /// Linear rope scaling of the global table: inverse frequencies divided by it.
    pub linear_rope_factor: Option<f64>,
    /// Granite's `residual_multiplier`: attention and MLP outputs scaled before they are added.
    pub residual_multiplier: Option<f64>,
    /// Granite's `logits_scaling`: the logits are divided by it.
    pub logits_divisor: Option<f64>,
    /// A Mixture-of-Experts MLP's routing (None for a dense MLP).
    pub moe: Option<MoeSpec>,
    /// OLMoE's `clip_qkv`: q and k (after their norms) and v clamped to [-c, c].
    pub clip_qkv: Option<f64>,
}

/// How a Mixture-of-Experts layer routes a token, as transformers 5.23's TopKRouter does:
/// p = softmax(router logits) over all experts, the `top_k` largest (torch.topk), their
/// weights renormalised to sum 1 where `norm_topk_prob` (always for Mixtral). With a shared
/// expert (Qwen2-MoE) every token also gets sigmoid(shared_expert_gate(x)) * shared_expert(x).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoeSpec {
    pub experts: usize,
    pub top_k: usize,
    pub norm_topk_prob: bool,
    /// The shared expert's inner width (0: none).
    pub shared_ffn: usize,
}

fn refuse_unimplemented(
    family: &Family,
    raw: &serde_json::Map<String, Value>,
    path: &str,
) -> Result<()> {
    let rules = &family.decoder;
    let flag = |k: &str| raw.get(k).and_then(Value::as_bool);
    for (key, what) in rules.refused_when_false {
        if flag(key) == Some(false) {
            return Err(NnError::Unsupported(format!(
                "{path}: `{key}: false` ({what}) is not implemented in the Rust decoder"
            )));
        }
    }
    for (key, what) in rules.refused_when_true {
        if flag(key) == Some(true) {
            return Err(NnError::Unsupported(format!(
                "{path}: `{key}: true` ({what}) is not implemented in the Rust decoder (clone works; verify in transformers)"
            )));
        }
    }
    let sliding_listed = raw
        .get("layer_types")
        .and_then(Value::as_array)
        .is_some_and(|t| t.iter().any(|v| v.as_str() == Some("sliding_attention")));
    if rules.refuse_sliding_layer_types && sliding_listed {
        return Err(NnError::Unsupported(format!(
            "{path}: `layer_types` lists sliding_attention layers (sliding-window attention), which the Rust decoder \
             does not implement for {}",
            family.model_type
        )));
    }
    Ok(())
}

/// The activation's name as the family's transformers module reads it (a config may carry
/// several keys; only one is used).
fn activation_name<'a>(
    rules: &DecoderSwitches,
    raw: &'a serde_json::Map<String, Value>,
) -> &'a str {
    let name = raw
        .get(rules.activation_key)
        .and_then(Value::as_str)
        .unwrap_or(rules.default_activation);
    if rules.legacy_gelu_is_tanh && name == "gelu" {
        return "gelu_pytorch_tanh";
    }
    name
}

/// Which layers slide, and over how many positions, as transformers 5.23 decides it (see
/// [`LayerSliding`]).
fn sliding_windows(
    family: &Family,
    raw: &serde_json::Map<String, Value>,
    layers: usize,
) -> Vec<Option<usize>> {
    let rules = &family.decoder;
    let sliding = family.layer_sliding;
    // An absent key takes the configuration class's default; an explicit null is no window.
    let window = match raw.get("sliding_window") {
        Some(v) => v.as_u64().map(|w| w as usize),
        None => rules.default_window,
    };
    let layer_types: Option<Vec<bool>> =
        raw.get("layer_types").and_then(Value::as_array).map(|a| {
            a.iter()
                .map(|v| v.as_str() == Some("sliding_attention"))
                .collect()
        });
    let listed = |l: usize| layer_types.as_ref().map(|t| t.get(l) == Some(&true));
    let period = |key: Option<&str>, default: usize| {
        key.and_then(|k| raw.get(k))
            .and_then(Value::as_u64)
            .map_or(default, |p| p as usize)
    };
    let ropes = no_rope_layers(rules, raw, layers);
    let slides = |l: usize| -> bool {
        match sliding {
            LayerSliding::Never => false,
            LayerSliding::Every => true,
            LayerSliding::FromMaxWindowLayers => {
                let on = raw.get("use_sliding_window").and_then(Value::as_bool) == Some(true);
                let from = raw
                    .get("max_window_layers")
                    .and_then(Value::as_u64)
                    .unwrap_or(28);
                on && listed(l).unwrap_or(l as u64 >= from)
            }
            LayerSliding::Alternating => listed(l).unwrap_or(l.is_multiple_of(2)),
            // A zero period is refused by the caller (transformers divides by it).
            LayerSliding::Periodic {
                period_key,
                period: p,
            } => listed(l).unwrap_or_else(|| {
                let p = period(period_key, p);
                p == 0 || !(l + 1).is_multiple_of(p)
            }),
            LayerSliding::EveryIfEnabled => {
                raw.get("use_sliding_window").and_then(Value::as_bool) == Some(true)
            }
            LayerSliding::EvenBelowMaxWindowLayers => {
                let on = raw.get("use_sliding_window").and_then(Value::as_bool) == Some(true);
                let below = raw
                    .get("max_window_layers")
                    .and_then(Value::as_u64)
                    .unwrap_or(28);
                on && listed(l).unwrap_or(l.is_multiple_of(2) && (l as u64) < below)
            }
            LayerSliding::NoRopeLayersIfEnabled => {
                let on = raw.get("use_sliding_window").and_then(Value::as_bool) == Some(true);
                on && window.is_some() && listed(l).unwrap_or(ropes.get(l).is_some_and(|r| !r))
            }
        }
    };
    (0..layers)
        .map(|l| if slides(l) { window } else { None })
        .collect()
}

/// Whether each layer has a rotary embedding (SmolLM3's `no_rope_layers`, 0 = NoPE; by
/// default every `no_rope_layer_interval`-th layer); every layer for other families. A list
/// entry that is not 0 or 1, or a list shorter than the model, reads as None (refused).
fn no_rope_layers(
    rules: &DecoderSwitches,
    raw: &serde_json::Map<String, Value>,
    layers: usize,
) -> Vec<bool> {
    if !rules.no_rope_layers {
        return vec![true; layers];
    }
    match raw.get("no_rope_layers").filter(|v| !v.is_null()) {
        Some(v) => {
            let list = v.as_array().map(Vec::as_slice).unwrap_or(&[]);
            list.iter()
                .take(layers)
                .map_while(|e| match e.as_u64() {
                    Some(0) => Some(false),
                    Some(1) => Some(true),
                    _ => None,
                })
                .collect()
        }
        None => {
            let every = raw
                .get("no_rope_layer_interval")
                .and_then(Value::as_u64)
                .unwrap_or(4) as usize;
            (0..layers)
                .map(|l| every == 0 || !(l + 1).is_multiple_of(every))
                .collect()
        }
    }
}

/// The rotary table of each layer: NoPE layers, the sliding layers' own rope where the
/// family has one per layer type (by `layer_types`, or the family's index rule when absent).
fn layer_ropes(
    family: &Family,
    raw: &serde_json::Map<String, Value>,
    layers: usize,
) -> Vec<LayerRope> {
    let rules = &family.decoder;
    let ropes = no_rope_layers(rules, raw, layers);
    // The layer *type*, whatever the window: a sliding layer keeps its rope with a null window.
    let mut typed = raw.clone();
    typed.insert("sliding_window".into(), Value::from(1u64));
    let types = sliding_windows(family, &typed, layers);
    (0..layers)
        .map(|l| {
            if !ropes.get(l).copied().unwrap_or(false) {
                LayerRope::None
            } else if rules.local_rope.is_some() && types[l].is_some() {
                LayerRope::Local
            } else {
                LayerRope::Global
            }
        })
        .collect()
}

/// Each layer's attention score scale (modeling_gpt2's `scaling`; query_pre_attn_scalar
/// for Gemma-2; head_dim^-0.5 elsewhere).
fn attention_scales(
    rules: &DecoderSwitches,
    raw: &serde_json::Map<String, Value>,
    head_dim: usize,
    layers: usize,
) -> Vec<f64> {
    let flag = |k: &str, default: bool| raw.get(k).and_then(Value::as_bool).unwrap_or(default);
    // A null query_pre_attn_scalar leaves NaN, refused by the caller.
    let base = match (
        rules.query_pre_attn_scalar,
        raw.get("query_pre_attn_scalar"),
    ) {
        (Some(default), None) => default.powf(-0.5),
        (Some(_), Some(v)) => v.as_f64().map_or(f64::NAN, |s| s.powf(-0.5)),
        (None, _) if rules.granite_multipliers => match raw.get("attention_multiplier") {
            None => 1.0,
            Some(v) => v.as_f64().unwrap_or(f64::NAN),
        },
        (None, _) => (head_dim as f64).powf(-0.5),
    };
    (0..layers)
        .map(|l| {
            if !rules.gpt2_scaling {
                return base;
            }
            // reorder_and_upcast_attn only changes the precision torch computes in.
            let mut s = if flag("scale_attn_weights", true) {
                base
            } else {
                1.0
            };
            if flag("scale_attn_by_inverse_layer_idx", false) {
                s /= (l + 1) as f64;
            }
            s
        })
        .collect()
}

impl DecoderSpec {
    pub fn from_checkpoint(ckpt: &Checkpoint) -> Result<Self> {
        let c = &ckpt.config;
        let raw = &c.raw;
        let path = c.path.display().to_string();
        let num = |v: Option<&Value>| v.and_then(Value::as_f64);
        let family = c.family;
        let rules = &family.decoder;
        // One rope per layer type: the full-attention layers' is the global one read below.
        let per_type = raw
            .get("rope_parameters")
            .filter(|v| v.get("full_attention").is_some() || v.get("sliding_attention").is_some());
        let rope = match per_type {
            Some(p) => p.get("full_attention").or_else(|| raw.get("rope_scaling")),
            None => raw
                .get("rope_parameters")
                .or_else(|| raw.get("rope_scaling")),
        }
        .filter(|v| !v.is_null());
        let mut llama3_rope = None;
        let mut linear_rope_factor = None;
        if let Some(r) = rope {
            let kind = r
                .get("rope_type")
                .or_else(|| r.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            match kind {
                "default" => {}
                // modeling_rope_utils' linear scaling: every inverse frequency / factor
                // (Gemma-3's global layers from 4B up).
                "linear" => {
                    linear_rope_factor = Some(num(r.get("factor")).ok_or_else(|| {
                        NnError::Unsupported(format!("{path}: linear rope without `factor`"))
                    })?);
                }
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
            .unwrap_or(rules.default_theta);
        let local = per_type
            .and_then(|p| p.get("sliding_attention"))
            .filter(|v| !v.is_null());
        if let Some(kind) = local
            .and_then(|r| r.get("rope_type"))
            .and_then(Value::as_str)
            .filter(|k| *k != "default")
        {
            return Err(NnError::Unsupported(format!(
                "{path}: rope_type `{kind}` of the sliding layers is not implemented in the Rust decoder yet (clone works; verify in transformers)"
            )));
        }
        let local_rope_theta = match rules.local_rope {
            Some((legacy, default)) => num(local.and_then(|r| r.get("rope_theta")))
                .or_else(|| num(legacy.and_then(|k| raw.get(k))))
                .unwrap_or(default),
            None => rope_theta,
        };
        let partial_rotary = num(raw.get("partial_rotary_factor"))
            .or_else(|| num(rope.and_then(|r| r.get("partial_rotary_factor"))))
            .or_else(|| num(raw.get("rotary_pct")))
            .unwrap_or(1.0);
        refuse_unimplemented(family, raw, &path)?;
        let act_name = activation_name(rules, raw);
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
        let sliding_window = sliding_windows(family, raw, c.num_hidden_layers);
        let norm_eps = [
            "rms_norm_eps",
            "layer_norm_eps",
            "layer_norm_epsilon",
            "norm_epsilon",
            "norm_eps",
        ]
        .iter()
        .find_map(|k| num(raw.get(*k)));
        let attn_scale = attention_scales(rules, raw, c.head_dim, c.num_hidden_layers);
        // Soft-caps only where the family has them: its configuration default when the key
        // is absent, none when it is null.
        let softcap_defaults = rules.softcap_defaults;
        let softcap = |k: &str, default: Option<f64>| match (default, raw.get(k)) {
            (Some(d), None) => Some(d),
            (Some(_), Some(v)) => v.as_f64().filter(|&v| v > 0.0),
            (None, Some(v)) if rules.reads_softcaps => v.as_f64().filter(|&v| v > 0.0),
            (None, _) => None,
        };
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
        if let Some(f) = linear_rope_factor {
            positive("rope_scaling.factor", f)?;
        }
        positive("rope_local_base_freq", local_rope_theta)?;
        let layer_rope = layer_ropes(family, raw, c.num_hidden_layers);
        if no_rope_layers(rules, raw, c.num_hidden_layers).len() != c.num_hidden_layers {
            return Err(NnError::Unsupported(format!(
                "{path}: `no_rope_layers` must list 0 or 1 for each of the {} layers",
                c.num_hidden_layers
            )));
        }
        for k in ["sliding_window_pattern", "no_rope_layer_interval"] {
            if raw.get(k).and_then(Value::as_u64) == Some(0) {
                return Err(bad(k, 0.0));
            }
        }
        // Granite's multipliers (defaults 1): finite, and a logits divisor that is not zero.
        let multiplier = |k: &str| -> Result<Option<f64>> {
            if !rules.granite_multipliers {
                return Ok(None);
            }
            match raw.get(k) {
                None => Ok(Some(1.0)),
                Some(v) => match v.as_f64() {
                    Some(x) if x.is_finite() => Ok(Some(x)),
                    _ => Err(NnError::Unsupported(format!(
                        "{path}: `{k}` = {v} is out of range"
                    ))),
                },
            }
        };
        let embedding_multiplier = multiplier("embedding_multiplier")?;
        let residual_multiplier = multiplier("residual_multiplier")?;
        let logits_divisor = multiplier("logits_scaling")?;
        if logits_divisor == Some(0.0) {
            return Err(bad("logits_scaling", 0.0));
        }
        if !(partial_rotary > 0.0 && partial_rotary <= 1.0) {
            return Err(bad("partial_rotary_factor", partial_rotary));
        }
        if let Some(eps) = norm_eps {
            if !(eps.is_finite() && eps >= 0.0) {
                return Err(bad("rms_norm_eps", eps));
            }
        }
        if let Some(a) = attn_scale.iter().find(|a| !a.is_finite()) {
            if rules.granite_multipliers {
                return Err(bad("attention_multiplier", *a));
            }
            return Err(bad("query_pre_attn_scalar", a.powi(-2)));
        }
        // transformers divides by a soft-cap: zero or a negative one is not a model.
        if rules.softcap_defaults.is_some() || rules.reads_softcaps {
            for k in ["attn_logit_softcapping", "final_logit_softcapping"] {
                if let Some(v) = raw.get(k).and_then(Value::as_f64) {
                    positive(k, v)?;
                }
            }
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
        let moe = match c.num_experts {
            0 => None,
            experts => Some(MoeSpec {
                experts,
                top_k: c.experts_per_token,
                norm_topk_prob: rules.always_norm_topk
                    || match raw.get("norm_topk_prob") {
                        None | Some(Value::Null) => false,
                        Some(Value::Bool(b)) => *b,
                        Some(v) => {
                            return Err(NnError::Unsupported(format!(
                                "{path}: `norm_topk_prob` must be true or false, found {v}"
                            )))
                        }
                    },
                shared_ffn: c.shared_expert_intermediate_size,
            }),
        };
        // transformers clamps with min = -c, max = c: a negative c (min > max) or a NaN is
        // no clip range; zero would zero every q, k and v.
        let clip_qkv = match raw.get("clip_qkv").filter(|_| rules.clip_qkv) {
            None | Some(Value::Null) => None,
            Some(v) => {
                let c = v.as_f64().unwrap_or(f64::NAN);
                positive("clip_qkv", c)?;
                Some(c)
            }
        };
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
            attn_softcap: softcap(
                "attn_logit_softcapping",
                softcap_defaults.map(|(scores, _)| scores),
            ),
            final_softcap: softcap(
                "final_logit_softcapping",
                softcap_defaults.map(|(_, logits)| logits),
            ),
            embed_scale: c
                .family
                .embedding_scaled_by_sqrt_hidden
                .then(|| (c.hidden_size as f64).sqrt())
                .or(embedding_multiplier),
            layer_rope,
            local_rope_theta,
            linear_rope_factor,
            residual_multiplier,
            logits_divisor,
            moe,
            clip_qkv,
        })
    }

    /// Inverse frequencies of the [`LayerRope::Local`] table: default rope at its theta.
    pub fn local_inv_freq(&self, rot: usize) -> Vec<f64> {
        (0..rot / 2)
            .map(|i| 1.0 / self.local_rope_theta.powf((2 * i) as f64 / rot as f64))
            .collect()
    }

    /// Inverse frequencies of the rotary embedding (rotary_dim / 2 of them), in f64.
    pub fn inv_freq(&self, rot: usize) -> Vec<f64> {
        let half = rot / 2;
        (0..half)
            .map(|i| {
                let inv = 1.0 / self.rope_theta.powf((2 * i) as f64 / rot as f64);
                let inv = match self.linear_rope_factor {
                    Some(f) => inv / f,
                    None => inv,
                };
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fam(model_type: &str) -> &'static Family {
        Family::lookup(model_type).unwrap()
    }

    fn map(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    /// transformers 5.23's per-family rules (configuration_*.py / modeling_*.py).
    #[test]
    fn sliding_layers_follow_each_family() {
        let w = Some(4);
        let qwen =
            map(json!({"use_sliding_window": true, "sliding_window": 4, "max_window_layers": 1}));
        assert_eq!(sliding_windows(fam("qwen2"), &qwen, 3), vec![None, w, w]);
        assert_eq!(sliding_windows(fam("qwen3"), &qwen, 3), vec![None, w, w]);
        // max_window_layers defaults to 28; without use_sliding_window nothing slides, even
        // with layer_types saying so (the config drops the window).
        let qwen = map(json!({"use_sliding_window": true, "sliding_window": 4}));
        assert_eq!(sliding_windows(fam("qwen2"), &qwen, 30)[27..], [None, w, w]);
        let off = map(json!({"sliding_window": 4, "layer_types": ["sliding_attention"]}));
        assert_eq!(sliding_windows(fam("qwen2"), &off, 1), vec![None]);
        let gemma2 = map(json!({"sliding_window": 4}));
        assert_eq!(sliding_windows(fam("gemma2"), &gemma2, 3), vec![w, None, w]);
        let listed = map(
            json!({"sliding_window": 4, "layer_types": ["full_attention", "sliding_attention"]}),
        );
        assert_eq!(sliding_windows(fam("gemma2"), &listed, 2), vec![None, w]);
        // Every layer, layer_types not read; null is no window; absent is the class default.
        for t in ["mistral", "starcoder2", "phi3"] {
            assert_eq!(sliding_windows(fam(t), &listed, 2), vec![w, w], "{t}");
            assert_eq!(
                sliding_windows(fam(t), &map(json!({"sliding_window": null})), 2),
                vec![None, None]
            );
        }
        assert_eq!(
            sliding_windows(fam("mistral"), &map(json!({})), 1),
            vec![Some(4096)]
        );
        assert_eq!(sliding_windows(fam("llama"), &qwen, 2), vec![None, None]);
    }

    #[test]
    fn attention_scales_and_activations_follow_each_family() {
        let gpt2 =
            map(json!({"scale_attn_weights": false, "scale_attn_by_inverse_layer_idx": true}));
        assert_eq!(
            attention_scales(&fam("gpt2").decoder, &gpt2, 16, 3),
            vec![1.0, 0.5, 1.0 / 3.0]
        );
        let both = map(json!({"scale_attn_by_inverse_layer_idx": true}));
        assert_eq!(
            attention_scales(&fam("gpt2").decoder, &both, 16, 2),
            vec![0.25, 0.125]
        );
        // Only Gemma-2 reads query_pre_attn_scalar (default 256).
        let q = map(json!({"query_pre_attn_scalar": 64}));
        assert_eq!(
            attention_scales(&fam("gemma2").decoder, &q, 16, 1),
            vec![0.125]
        );
        assert_eq!(
            attention_scales(&fam("llama").decoder, &q, 16, 1),
            vec![0.25]
        );
        assert_eq!(
            attention_scales(&fam("gemma2").decoder, &map(json!({})), 16, 1),
            vec![1.0 / 16.0]
        );
        let acts = map(
            json!({"hidden_act": "gelu", "hidden_activation": "relu", "activation_function": "silu"}),
        );
        assert_eq!(
            activation_name(&fam("gemma").decoder, &acts),
            "gelu_pytorch_tanh"
        );
        assert_eq!(activation_name(&fam("gemma2").decoder, &acts), "relu");
        assert_eq!(activation_name(&fam("gpt2").decoder, &acts), "silu");
        assert_eq!(activation_name(&fam("llama").decoder, &acts), "gelu");
        assert_eq!(
            activation_name(&fam("opt").decoder, &map(json!({}))),
            "relu"
        );
    }

    #[test]
    fn unimplemented_switches_are_refused_by_name() {
        for (t, key) in [
            ("gemma", "use_bidirectional_attention"),
            ("gemma2", "use_bidirectional_attention"),
            ("stablelm", "use_parallel_residual"),
            ("stablelm", "qk_layernorm"),
            ("phi", "qk_layernorm"),
        ] {
            let e = refuse_unimplemented(fam(t), &map(json!({key: true})), "c.json").unwrap_err();
            assert!(e.to_string().contains(key), "{e}");
            assert!(refuse_unimplemented(fam(t), &map(json!({key: false})), "c.json").is_ok());
        }
        let opt = map(json!({"layer_norm_elementwise_affine": false}));
        assert!(refuse_unimplemented(fam("opt"), &opt, "c.json").is_err());
    }

    /// transformers 5.23's rules for the 2026 dense families: which layers slide and which
    /// rope each layer uses, with and without the explicit lists.
    #[test]
    fn dense_2026_layouts_follow_each_family() {
        let (w, g, loc, no) = (
            Some(4),
            LayerRope::Global,
            LayerRope::Local,
            LayerRope::None,
        );
        // Gemma-3: every sliding_window_pattern-th layer (default 6) is global.
        let gemma3 = map(json!({"sliding_window": 4, "sliding_window_pattern": 2}));
        assert_eq!(
            sliding_windows(fam("gemma3_text"), &gemma3, 3),
            vec![w, None, w]
        );
        assert_eq!(
            layer_ropes(fam("gemma3_text"), &gemma3, 3),
            vec![loc, g, loc]
        );
        let six = sliding_windows(fam("gemma3_text"), &map(json!({"sliding_window": 4})), 7);
        assert_eq!(six, vec![w, w, w, w, w, None, w]);
        // A null window still leaves the sliding layers their own rope.
        let nulled = map(
            json!({"sliding_window": null, "layer_types": ["full_attention", "sliding_attention"]}),
        );
        assert_eq!(
            sliding_windows(fam("gemma3_text"), &nulled, 2),
            vec![None, None]
        );
        assert_eq!(layer_ropes(fam("gemma3_text"), &nulled, 2), vec![g, loc]);
        // OLMo-3: every 4th layer global; layer_types wins when given.
        let olmo3 = map(json!({"sliding_window": 4}));
        assert_eq!(
            sliding_windows(fam("olmo3"), &olmo3, 4),
            vec![w, w, w, None]
        );
        assert_eq!(layer_ropes(fam("olmo3"), &olmo3, 4), vec![loc, loc, loc, g]);
        // OLMo-2 has one rope and no window.
        assert_eq!(layer_ropes(fam("olmo2"), &olmo3, 2), vec![g, g]);
        // SmolLM3: no_rope_layers (default every 4th layer NoPE); NoPE layers slide only with
        // use_sliding_window and a window.
        let smol = map(
            json!({"no_rope_layer_interval": 2, "use_sliding_window": true, "sliding_window": 4}),
        );
        assert_eq!(layer_ropes(fam("smollm3"), &smol, 3), vec![g, no, g]);
        assert_eq!(
            sliding_windows(fam("smollm3"), &smol, 3),
            vec![None, w, None]
        );
        let listed = map(
            json!({"no_rope_layers": [0, 1], "use_sliding_window": false, "sliding_window": 4}),
        );
        assert_eq!(layer_ropes(fam("smollm3"), &listed, 2), vec![no, g]);
        assert_eq!(
            sliding_windows(fam("smollm3"), &listed, 2),
            vec![None, None]
        );
        assert_eq!(
            layer_ropes(fam("smollm3"), &map(json!({})), 5),
            vec![g, g, g, no, g]
        );
        // Entries other than 0 and 1 end the list (refused by the caller).
        assert_eq!(
            no_rope_layers(
                &fam("smollm3").decoder,
                &map(json!({"no_rope_layers": [1, 2]})),
                2
            ),
            vec![true]
        );
        // Granite: attention_multiplier (default 1) replaces head_dim^-0.5.
        let granite = map(json!({"attention_multiplier": 0.0625}));
        assert_eq!(
            attention_scales(&fam("granite").decoder, &granite, 16, 2),
            vec![0.0625, 0.0625]
        );
        assert_eq!(
            attention_scales(&fam("granite").decoder, &map(json!({})), 16, 1),
            vec![1.0]
        );
        // Gemma-3 reads query_pre_attn_scalar (default 256) and refuses bidirectional attention.
        assert_eq!(
            attention_scales(&fam("gemma3_text").decoder, &map(json!({})), 16, 1),
            vec![1.0 / 16.0]
        );
        let bi = map(json!({"use_bidirectional_attention": true}));
        assert!(refuse_unimplemented(fam("gemma3_text"), &bi, "c.json").is_err());
        assert_eq!(
            activation_name(
                &fam("gemma3_text").decoder,
                &map(json!({"hidden_act": "relu"}))
            ),
            "gelu_pytorch_tanh"
        );
    }

    /// Qwen-MoE's sliding layers (transformers 5.23), though the decoder refuses them: every
    /// layer for Qwen3-MoE, even layers below max_window_layers for Qwen2-MoE, only with
    /// use_sliding_window.
    #[test]
    fn qwen_moe_sliding_layers_are_computed_and_refused() {
        let w = Some(4);
        let on =
            map(json!({"use_sliding_window": true, "sliding_window": 4, "max_window_layers": 3}));
        assert_eq!(sliding_windows(fam("qwen3_moe"), &on, 3), vec![w, w, w]);
        assert_eq!(
            sliding_windows(fam("qwen2_moe"), &on, 4),
            vec![w, None, w, None]
        );
        let off = map(json!({"sliding_window": 4}));
        assert_eq!(sliding_windows(fam("qwen3_moe"), &off, 2), vec![None, None]);
        assert_eq!(sliding_windows(fam("qwen2_moe"), &off, 2), vec![None, None]);
        for t in ["qwen2_moe", "qwen3_moe"] {
            let e = refuse_unimplemented(fam(t), &on, "c.json").unwrap_err();
            assert!(e.to_string().contains("use_sliding_window"), "{e}");
        }
        let listed = map(json!({"layer_types": ["full_attention", "sliding_attention"]}));
        let e = refuse_unimplemented(fam("qwen2_moe"), &listed, "c.json").unwrap_err();
        assert!(e.to_string().contains("layer_types"), "{e}");
        // Qwen3-MoE does not read layer_types.
        assert!(refuse_unimplemented(fam("qwen3_moe"), &listed, "c.json").is_ok());
    }
}
