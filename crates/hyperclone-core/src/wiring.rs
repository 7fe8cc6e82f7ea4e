//! What the forward pass needs to know about a family, as plain data on its [`Family`]
//! record: where the decoder finds each tensor by role and how a block is wired
//! ([`Wiring`]), and which config switches the family's transformers module reads and with
//! what defaults ([`DecoderSwitches`]). The Rust decoder (`hyperclone-nn`) reads these; it
//! parses the config values itself and never branches on `model_type`.
//!
//! [`Family`]: crate::family::Family

/// The norm a family uses everywhere (blocks, final norm, q/k norms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// x / rms(x) * w
    Rms,
    /// x / rms(x) * (1 + w) (Gemma)
    RmsOnePlus,
    /// (x - mean) / std * w + b
    Layer,
}

impl NormKind {
    /// The name in the family table.
    pub fn name(self) -> &'static str {
        match self {
            NormKind::Rms => "RMSNorm",
            NormKind::RmsOnePlus => "RMSNorm (1+w)",
            NormKind::Layer => "LayerNorm",
        }
    }
}

/// How a layer's attention weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnLayout {
    /// `{q,k,v,o}` names under the layer's attention prefix (Linear, [out, in]).
    Separate {
        prefix: &'static str,
        q: &'static str,
        k: &'static str,
        v: &'static str,
        o: &'static str,
    },
    /// One [q | k | v] Linear (phi3).
    Concat {
        prefix: &'static str,
        qkv: &'static str,
        o: &'static str,
    },
    /// One Linear with rows laid out (heads, 3, head_dim) (GPT-NeoX).
    PerHead {
        prefix: &'static str,
        qkv: &'static str,
        o: &'static str,
    },
    /// GPT-2's Conv1D c_attn ([in, out], columns [q | k | v]) and c_proj.
    Conv1d {
        prefix: &'static str,
        qkv: &'static str,
        o: &'static str,
    },
}

/// How a layer's MLP is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpLayout {
    /// down(act(gate(x)) * up(x)).
    Gated {
        prefix: &'static str,
        gate: &'static str,
        up: &'static str,
        down: &'static str,
    },
    /// gate_up rows [gate | up] (phi3).
    GatedFused {
        prefix: &'static str,
        gate_up: &'static str,
        down: &'static str,
    },
    /// down(act(up(x))).
    Plain {
        prefix: &'static str,
        up: &'static str,
        down: &'static str,
    },
    /// GPT-2's Conv1D c_fc / c_proj.
    PlainConv1d {
        prefix: &'static str,
        up: &'static str,
        down: &'static str,
    },
    /// A Mixture of Experts: `{prefix}.{router}` [experts, hidden] routes each token to the
    /// top-k of the gated experts `{prefix}.{experts}.{e}.{gate,up,down}`; with `shared`
    /// (Qwen2-MoE) = (expert, gate), every token also runs the gated MLP
    /// `{prefix}.{expert}.{gate,up,down}`, scaled by sigmoid(`{prefix}.{gate}`(x)).
    Moe {
        prefix: &'static str,
        router: &'static str,
        experts: &'static str,
        gate: &'static str,
        up: &'static str,
        down: &'static str,
        shared: Option<(&'static str, &'static str)>,
    },
}

/// How the residual stream flows through a layer. Norm names are relative to the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockLayout {
    /// x += post_attn(attn(pre_attn(x))); x += post_mlp(mlp(pre_mlp(x))), each norm optional
    /// (Llama: pre only; Gemma-2: all four; OLMo-2: post only).
    Sequential {
        pre_attn: Option<&'static str>,
        post_attn: Option<&'static str>,
        pre_mlp: Option<&'static str>,
        post_mlp: Option<&'static str>,
    },
    /// x = x + attn(n1(x)) + mlp(n2(x)); n2 = n1 when there is one shared norm (phi).
    Parallel {
        attn_norm: &'static str,
        mlp_norm: &'static str,
    },
    /// x = n1(x + attn(x)); x = n2(x + mlp(x)) (OPT with do_layer_norm_before = false).
    PostNorm {
        attn_norm: &'static str,
        mlp_norm: &'static str,
    },
}

/// A boolean config key and transformers' default for it when config.json omits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flag {
    pub key: &'static str,
    pub default: bool,
}

/// Where the decoder finds a family's tensors (names without `.weight` / `.bias`) and how its
/// blocks are wired. The token embedding and the head are the family's `embedding` and
/// `head`, and a learned position table's row offset is its `position_offset`.
#[derive(Debug, Clone, Copy)]
pub struct Wiring {
    /// Layer tensors are `{layers}.{L}.{name}`.
    pub layers: &'static str,
    /// Learned position table (GPT-2, OPT).
    pub positions: Option<&'static str>,
    /// OPT's optional projections around the layers.
    pub project_in: Option<&'static str>,
    pub project_out: Option<&'static str>,
    pub final_norm: &'static str,
    /// The final norm exists only while each of these flags reads its `default` (OPT:
    /// post-LN models and `_remove_final_layer_norm` have none; stored weights are ignored).
    pub final_norm_unless: &'static [Flag],
    pub norm: NormKind,
    pub block: BlockLayout,
    /// A flag that, set against its default, swaps in another block (GPT-NeoX's
    /// `use_parallel_residual: false`, OPT's `do_layer_norm_before: false`).
    pub block_switch: Option<(Flag, BlockLayout)>,
    pub attn: AttnLayout,
    pub mlp: MlpLayout,
    /// q_norm/k_norm names under the attention prefix. Per-head (Qwen3, Gemma-3) or over the
    /// whole projection (OLMo-2, OLMoE): the decoder tells them apart by the norm's width.
    pub qk_norm: Option<(&'static str, &'static str)>,
}

pub const LLAMA_BLOCK: BlockLayout = BlockLayout::Sequential {
    pre_attn: Some("input_layernorm"),
    post_attn: None,
    pre_mlp: Some("post_attention_layernorm"),
    post_mlp: None,
};
/// Gemma-2's and Gemma-3's norms before and after both sublayers.
pub const SANDWICH_BLOCK: BlockLayout = BlockLayout::Sequential {
    pre_attn: Some("input_layernorm"),
    post_attn: Some("post_attention_layernorm"),
    pre_mlp: Some("pre_feedforward_layernorm"),
    post_mlp: Some("post_feedforward_layernorm"),
};
/// OLMo-2's and OLMo-3's norms after the sublayers only.
pub const POST_NORM_BLOCK: BlockLayout = BlockLayout::Sequential {
    pre_attn: None,
    post_attn: Some("post_attention_layernorm"),
    pre_mlp: None,
    post_mlp: Some("post_feedforward_layernorm"),
};
pub const LLAMA_ATTN: AttnLayout = AttnLayout::Separate {
    prefix: "self_attn",
    q: "q_proj",
    k: "k_proj",
    v: "v_proj",
    o: "o_proj",
};
pub const LLAMA_MLP: MlpLayout = MlpLayout::Gated {
    prefix: "mlp",
    gate: "gate_proj",
    up: "up_proj",
    down: "down_proj",
};
/// Qwen-MoE's and OLMoE's sparse block under `mlp`, with Qwen2-MoE's shared expert and its
/// gate where `shared` names them.
pub const fn qwen_moe_mlp(shared: Option<(&'static str, &'static str)>) -> MlpLayout {
    MlpLayout::Moe {
        prefix: "mlp",
        router: "gate",
        experts: "experts",
        gate: "gate_proj",
        up: "up_proj",
        down: "down_proj",
        shared,
    }
}
/// The Qwen-MoE sparse block without a shared expert (Qwen3-MoE, OLMoE).
pub const QWEN_MOE_MLP: MlpLayout = qwen_moe_mlp(None);
pub const QK_NORM: Option<(&str, &str)> = Some(("q_norm", "k_norm"));

/// Llama's layout, the default of a family record.
pub const LLAMA_WIRING: Wiring = Wiring {
    layers: "model.layers",
    positions: None,
    project_in: None,
    project_out: None,
    final_norm: "model.norm",
    final_norm_unless: &[],
    norm: NormKind::Rms,
    block: LLAMA_BLOCK,
    block_switch: None,
    attn: LLAMA_ATTN,
    mlp: LLAMA_MLP,
    qk_norm: None,
};

/// How a family's transformers 5.23 modules read the config switches that change the
/// function, beyond the sizes growth reads: constants of the family, read by the decoder's
/// generic code (which parses the values).
#[derive(Debug, Clone, Copy)]
pub struct DecoderSwitches {
    /// The config key the activation is read from, and its default.
    pub activation_key: &'static str,
    pub default_activation: &'static str,
    /// configuration_gemma.py turns the official releases' `gelu` into the tanh form.
    pub legacy_gelu_is_tanh: bool,
    /// The configuration class's `sliding_window` when the key is absent (which layers slide
    /// is the record's `layer_sliding`).
    pub default_window: Option<usize>,
    /// Boolean switches the Rust decoder does not implement: (key, what it does) refused
    /// when true.
    pub refused_when_true: &'static [(&'static str, &'static str)],
    /// Switches refused when false (modeling_opt then applies LayerNorms without weights,
    /// which the decoder, reading a norm from its stored weight, would skip).
    pub refused_when_false: &'static [(&'static str, &'static str)],
    /// Soft-caps on scores and logits with their configuration defaults (Gemma-2).
    pub softcap_defaults: Option<(f64, f64)>,
    /// Scores scaled by query_pre_attn_scalar^-0.5, with its configuration default, instead
    /// of head_dim^-0.5 (Gemma-2).
    pub query_pre_attn_scalar: Option<f64>,
    /// modeling_gpt2's `scale_attn_weights` / `scale_attn_by_inverse_layer_idx`.
    pub gpt2_scaling: bool,
    /// rope_theta when config.json has none (the configuration class's `default_theta`).
    pub default_theta: f64,
    /// One rope per layer type (`rope_parameters` keyed by `full_attention` and
    /// `sliding_attention`; Gemma-3, OLMo-3): the legacy flat key of the sliding layers' theta
    /// and its default.
    pub local_rope: Option<(Option<&'static str>, f64)>,
    /// Soft-cap keys read although they default to none (Gemma-3).
    pub reads_softcaps: bool,
    /// Granite: `attention_multiplier` is the score scale, `embedding_multiplier`,
    /// `residual_multiplier` and `logits_scaling` scale the embedding, the sublayer outputs
    /// and (dividing) the logits.
    pub granite_multipliers: bool,
    /// SmolLM3: `no_rope_layers` (default: every `no_rope_layer_interval`-th layer, 4, is NoPE).
    pub no_rope_layers: bool,
    /// `layer_types` entries `sliding_attention` are refused (Qwen2-MoE, whose sliding
    /// attention the decoder does not implement; transformers then builds a zero window).
    pub refuse_sliding_layer_types: bool,
    /// OLMoE: `clip_qkv` clamps q, k (after their norms) and v to [-clip_qkv, clip_qkv].
    pub clip_qkv: bool,
    /// Mixtral always renormalises the top-k routing weights; the others read
    /// `norm_topk_prob` (default false in qwen2_moe, qwen3_moe and olmoe).
    pub always_norm_topk: bool,
}

impl DecoderSwitches {
    /// Llama's switches, the default of a family record.
    pub const BASE: DecoderSwitches = DecoderSwitches {
        activation_key: "hidden_act",
        default_activation: "silu",
        legacy_gelu_is_tanh: false,
        default_window: None,
        refused_when_true: &[],
        refused_when_false: &[],
        softcap_defaults: None,
        query_pre_attn_scalar: None,
        gpt2_scaling: false,
        default_theta: 10_000.0,
        local_rope: None,
        reads_softcaps: false,
        granite_multipliers: false,
        no_rope_layers: false,
        refuse_sliding_layer_types: false,
        clip_qkv: false,
        always_norm_topk: false,
    };
}

/// Qwen-MoE's sliding attention (every layer for Qwen3-MoE, even layers below
/// max_window_layers for Qwen2-MoE) is not implemented.
pub const QWEN_MOE_SLIDING: &[(&str, &str)] = &[("use_sliding_window", "sliding-window attention")];
/// Attention over the whole sequence, not causal.
pub const BIDIRECTIONAL: &[(&str, &str)] =
    &[("use_bidirectional_attention", "non-causal attention")];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::family::FAMILIES;

    fn join(parts: &[&str]) -> String {
        let parts: Vec<&str> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
        parts.join(".")
    }

    /// Every weight the decoder reads for layer 0 (expert 0), by the record's wiring.
    fn decoder_weights(w: &Wiring) -> Vec<String> {
        let layer = |parts: &[&str]| format!("{}.0.{}.weight", w.layers, join(parts));
        let mut out = vec![];
        let mut blocks = vec![w.block];
        blocks.extend(w.block_switch.map(|(_, b)| b));
        for b in blocks {
            let norms: Vec<&str> = match b {
                BlockLayout::Sequential {
                    pre_attn,
                    post_attn,
                    pre_mlp,
                    post_mlp,
                } => [pre_attn, post_attn, pre_mlp, post_mlp]
                    .into_iter()
                    .flatten()
                    .collect(),
                BlockLayout::Parallel {
                    attn_norm,
                    mlp_norm,
                }
                | BlockLayout::PostNorm {
                    attn_norm,
                    mlp_norm,
                } => vec![attn_norm, mlp_norm],
            };
            out.extend(norms.into_iter().map(|n| layer(&[n])));
        }
        let (prefix, names): (&str, Vec<&str>) = match w.attn {
            AttnLayout::Separate { prefix, q, k, v, o } => (prefix, vec![q, k, v, o]),
            AttnLayout::Concat { prefix, qkv, o }
            | AttnLayout::PerHead { prefix, qkv, o }
            | AttnLayout::Conv1d { prefix, qkv, o } => (prefix, vec![qkv, o]),
        };
        out.extend(names.iter().map(|n| layer(&[prefix, n])));
        if let Some((q, k)) = w.qk_norm {
            out.extend([layer(&[prefix, q]), layer(&[prefix, k])]);
        }
        match w.mlp {
            MlpLayout::Gated {
                prefix,
                gate,
                up,
                down,
            } => out.extend([gate, up, down].map(|n| layer(&[prefix, n]))),
            MlpLayout::GatedFused {
                prefix,
                gate_up,
                down,
            } => out.extend([gate_up, down].map(|n| layer(&[prefix, n]))),
            MlpLayout::Plain { prefix, up, down } | MlpLayout::PlainConv1d { prefix, up, down } => {
                out.extend([up, down].map(|n| layer(&[prefix, n])))
            }
            MlpLayout::Moe {
                prefix,
                router,
                experts,
                gate,
                up,
                down,
                shared,
            } => {
                out.push(layer(&[prefix, router]));
                out.extend([gate, up, down].map(|n| layer(&[prefix, experts, "0", n])));
                if let Some((expert, expert_gate)) = shared {
                    out.extend([gate, up, down].map(|n| layer(&[prefix, expert, n])));
                    out.push(layer(&[prefix, expert_gate]));
                }
            }
        }
        let top = [Some(w.final_norm), w.positions, w.project_in, w.project_out];
        out.extend(top.into_iter().flatten().map(|n| format!("{n}.weight")));
        out
    }

    /// The decoder's names and growth's tensor rules describe the same checkpoints: every
    /// weight the wiring names is one the family's rules grow.
    #[test]
    fn wiring_names_follow_the_growth_rules() {
        for f in FAMILIES {
            let names = decoder_weights(&f.wiring);
            assert!(names.len() >= 7, "{}", f.model_type);
            for name in names
                .iter()
                .map(String::as_str)
                .chain([f.embedding, f.head])
            {
                assert!(
                    f.match_name_at(name).is_some(),
                    "{}: the decoder reads {name}, which no tensor rule describes",
                    f.model_type
                );
            }
        }
    }
}
