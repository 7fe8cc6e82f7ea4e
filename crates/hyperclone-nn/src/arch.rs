//! Where each family keeps its tensors and how its blocks are wired: data for the one
//! generic decoder in `model.rs`. Fused and transposed layouts are read through views of
//! the stored tensors, so the forward pass sees the same separate q/k/v and gate/up for
//! every family, and training updates the stored tensors themselves.

use crate::spec::NormKind;

/// How a layer's attention weights are stored.
#[derive(Debug, Clone, Copy)]
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
#[derive(Debug, Clone, Copy)]
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
#[derive(Debug, Clone, Copy)]
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

#[derive(Debug, Clone, Copy)]
pub struct Arch {
    /// Layer tensors are `{layers}.{L}.{name}`.
    pub layers: &'static str,
    pub embed: &'static str,
    /// Learned position table and the row offset of position 0 (OPT: 2).
    pub positions: Option<(&'static str, usize)>,
    /// OPT's optional projections around the layers.
    pub project_in: Option<&'static str>,
    pub project_out: Option<&'static str>,
    /// Final norm (absent for post-LN OPT).
    pub final_norm: &'static str,
    pub head: &'static str,
    pub norm: NormKind,
    pub block: BlockLayout,
    pub attn: AttnLayout,
    pub mlp: MlpLayout,
    /// q_norm/k_norm names under the attention prefix.
    pub qk_norm: Option<(&'static str, &'static str)>,
}

const LLAMA_BLOCK: BlockLayout = BlockLayout::Sequential {
    pre_attn: Some("input_layernorm"),
    post_attn: None,
    pre_mlp: Some("post_attention_layernorm"),
    post_mlp: None,
};
const LLAMA_ATTN: AttnLayout = AttnLayout::Separate {
    prefix: "self_attn",
    q: "q_proj",
    k: "k_proj",
    v: "v_proj",
    o: "o_proj",
};
const LLAMA_MLP: MlpLayout = MlpLayout::Gated {
    prefix: "mlp",
    gate: "gate_proj",
    up: "up_proj",
    down: "down_proj",
};
/// Qwen-MoE's and OLMoE's sparse block under `mlp`.
const QWEN_MOE_MLP: MlpLayout = MlpLayout::Moe {
    prefix: "mlp",
    router: "gate",
    experts: "experts",
    gate: "gate_proj",
    up: "up_proj",
    down: "down_proj",
    shared: None,
};
const LLAMA: Arch = Arch {
    layers: "model.layers",
    embed: "model.embed_tokens",
    positions: None,
    project_in: None,
    project_out: None,
    final_norm: "model.norm",
    head: "lm_head",
    norm: NormKind::Rms,
    block: LLAMA_BLOCK,
    attn: LLAMA_ATTN,
    mlp: LLAMA_MLP,
    qk_norm: None,
};

/// The architecture of a model_type, or None when the Rust decoder does not cover it yet.
pub fn arch(model_type: &str, config: &serde_json::Value) -> Option<Arch> {
    let layer_norm_before = config
        .get("do_layer_norm_before")
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    let remove_final_norm = config
        .get("_remove_final_layer_norm")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    Some(match model_type {
        "llama" | "mistral" | "qwen2" => LLAMA,
        "qwen3" => Arch {
            qk_norm: Some(("q_norm", "k_norm")),
            ..LLAMA
        },
        "gemma" => Arch {
            norm: NormKind::RmsOnePlus,
            ..LLAMA
        },
        "gemma2" => Arch {
            norm: NormKind::RmsOnePlus,
            block: BlockLayout::Sequential {
                pre_attn: Some("input_layernorm"),
                post_attn: Some("post_attention_layernorm"),
                pre_mlp: Some("pre_feedforward_layernorm"),
                post_mlp: Some("post_feedforward_layernorm"),
            },
            ..LLAMA
        },
        "olmo2" => Arch {
            block: BlockLayout::Sequential {
                pre_attn: None,
                post_attn: Some("post_attention_layernorm"),
                pre_mlp: None,
                post_mlp: Some("post_feedforward_layernorm"),
            },
            qk_norm: Some(("q_norm", "k_norm")),
            ..LLAMA
        },
        "phi3" => Arch {
            attn: AttnLayout::Concat {
                prefix: "self_attn",
                qkv: "qkv_proj",
                o: "o_proj",
            },
            mlp: MlpLayout::GatedFused {
                prefix: "mlp",
                gate_up: "gate_up_proj",
                down: "down_proj",
            },
            ..LLAMA
        },
        "stablelm" => Arch {
            norm: NormKind::Layer,
            ..LLAMA
        },
        "starcoder2" => Arch {
            norm: NormKind::Layer,
            mlp: MlpLayout::Plain {
                prefix: "mlp",
                up: "c_fc",
                down: "c_proj",
            },
            ..LLAMA
        },
        "phi" => Arch {
            final_norm: "model.final_layernorm",
            norm: NormKind::Layer,
            block: BlockLayout::Parallel {
                attn_norm: "input_layernorm",
                mlp_norm: "input_layernorm",
            },
            attn: AttnLayout::Separate {
                prefix: "self_attn",
                q: "q_proj",
                k: "k_proj",
                v: "v_proj",
                o: "dense",
            },
            mlp: MlpLayout::Plain {
                prefix: "mlp",
                up: "fc1",
                down: "fc2",
            },
            ..LLAMA
        },
        "gpt2" => Arch {
            layers: "transformer.h",
            embed: "transformer.wte",
            positions: Some(("transformer.wpe", 0)),
            final_norm: "transformer.ln_f",
            norm: NormKind::Layer,
            block: BlockLayout::Sequential {
                pre_attn: Some("ln_1"),
                post_attn: None,
                pre_mlp: Some("ln_2"),
                post_mlp: None,
            },
            attn: AttnLayout::Conv1d {
                prefix: "attn",
                qkv: "c_attn",
                o: "c_proj",
            },
            mlp: MlpLayout::PlainConv1d {
                prefix: "mlp",
                up: "c_fc",
                down: "c_proj",
            },
            ..LLAMA
        },
        "gpt_neox" => {
            let parallel = config
                .get("use_parallel_residual")
                .and_then(|v| v.as_bool())
                .unwrap_or(true);
            Arch {
                layers: "gpt_neox.layers",
                embed: "gpt_neox.embed_in",
                final_norm: "gpt_neox.final_layer_norm",
                head: "embed_out",
                norm: NormKind::Layer,
                block: if parallel {
                    BlockLayout::Parallel {
                        attn_norm: "input_layernorm",
                        mlp_norm: "post_attention_layernorm",
                    }
                } else {
                    LLAMA_BLOCK
                },
                attn: AttnLayout::PerHead {
                    prefix: "attention",
                    qkv: "query_key_value",
                    o: "dense",
                },
                mlp: MlpLayout::Plain {
                    prefix: "mlp",
                    up: "dense_h_to_4h",
                    down: "dense_4h_to_h",
                },
                ..LLAMA
            }
        }
        "opt" => Arch {
            layers: "model.decoder.layers",
            embed: "model.decoder.embed_tokens",
            positions: Some(("model.decoder.embed_positions", 2)),
            project_in: Some("model.decoder.project_in"),
            project_out: Some("model.decoder.project_out"),
            // modeling_opt builds the final LayerNorm only for pre-norm models without
            // `_remove_final_layer_norm`; otherwise stored weights for it are ignored.
            final_norm: if layer_norm_before && !remove_final_norm {
                "model.decoder.final_layer_norm"
            } else {
                ""
            },
            norm: NormKind::Layer,
            block: if layer_norm_before {
                BlockLayout::Sequential {
                    pre_attn: Some("self_attn_layer_norm"),
                    post_attn: None,
                    pre_mlp: Some("final_layer_norm"),
                    post_mlp: None,
                }
            } else {
                BlockLayout::PostNorm {
                    attn_norm: "self_attn_layer_norm",
                    mlp_norm: "final_layer_norm",
                }
            },
            attn: AttnLayout::Separate {
                prefix: "self_attn",
                q: "q_proj",
                k: "k_proj",
                v: "v_proj",
                o: "out_proj",
            },
            mlp: MlpLayout::Plain {
                prefix: "",
                up: "fc1",
                down: "fc2",
            },
            ..LLAMA
        },
        "smollm3" | "granite" => LLAMA,
        "mixtral" => Arch {
            mlp: MlpLayout::Moe {
                prefix: "block_sparse_moe",
                router: "gate",
                experts: "experts",
                gate: "w1",
                up: "w3",
                down: "w2",
                shared: None,
            },
            ..LLAMA
        },
        "qwen2_moe" => Arch {
            mlp: MlpLayout::Moe {
                prefix: "mlp",
                router: "gate",
                experts: "experts",
                gate: "gate_proj",
                up: "up_proj",
                down: "down_proj",
                shared: Some(("shared_expert", "shared_expert_gate")),
            },
            ..LLAMA
        },
        // Per-head q/k norms (Qwen3) or whole-projection ones (OLMoE): the decoder tells them
        // apart by the norm's width.
        "qwen3_moe" | "olmoe" => Arch {
            mlp: QWEN_MOE_MLP,
            qk_norm: Some(("q_norm", "k_norm")),
            ..LLAMA
        },
        "olmo3" => Arch {
            block: BlockLayout::Sequential {
                pre_attn: None,
                post_attn: Some("post_attention_layernorm"),
                pre_mlp: None,
                post_mlp: Some("post_feedforward_layernorm"),
            },
            qk_norm: Some(("q_norm", "k_norm")),
            ..LLAMA
        },
        "gemma3_text" => Arch {
            norm: NormKind::RmsOnePlus,
            block: BlockLayout::Sequential {
                pre_attn: Some("input_layernorm"),
                post_attn: Some("post_attention_layernorm"),
                pre_mlp: Some("pre_feedforward_layernorm"),
                post_mlp: Some("post_feedforward_layernorm"),
            },
            qk_norm: Some(("q_norm", "k_norm")),
            ..LLAMA
        },
        _ => return None,
    })
}
