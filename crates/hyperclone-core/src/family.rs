//! Model families as data: for every tensor name pattern, what lives on each axis.
//!
//! Growth never branches on the family. A family is a list of tensor rules; each rule says
//! which space (hidden, heads x head_dim, ffn, ...) each axis of the tensor belongs to and
//! whether the tensor writes that space (rows of q_proj, norm weights, the embedding's
//! columns) or reads it (columns of q_proj, the head's columns). The generic kernel in
//! `kernel.rs` derives everything else. Adding a family is adding a `Family` value below.

/// The index spaces of a decoder. Source sizes come from config.json, copies from the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Space {
    /// Token ids (rows of the embedding, rows of the head). Never grown.
    Vocab,
    /// The residual stream, `hidden_size`. Grown n times.
    Hidden,
    /// Query heads, `num_attention_heads * head_dim`, heads outermost. Grown n times (head
    /// count grows, head_dim stays).
    Heads,
    /// Key/value heads, `num_key_value_heads * head_dim`. Grown n times, except a single
    /// (MQA) head, which stays single.
    KvHeads,
    /// The MLP's inner width, `intermediate_size`. Grown m times.
    Ffn,
    /// One head's width, for per-head norms (qk-norm). Never grown.
    HeadDim,
    /// Positions of a learned position table (rows). Never grown.
    Positions,
    /// OPT's `word_embed_proj_dim` when it differs from the hidden size. Never grown.
    EmbedProj,
    /// GPT-NeoX's fused QKV rows, laid out (heads, 3, head_dim): per head, so tiling the
    /// whole axis n times gives n*heads heads, head c*H + h a copy of head h.
    QkvPerHead,
}

/// Whether a tensor axis produces values in its space or consumes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Write,
    Read,
}

/// One tensor axis: the space(s) along it, in order, and whether the tensor writes or reads
/// them. More than one space is a fused layout ([q | k | v], [gate | up]), grown segment by
/// segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Axis(pub &'static [Space], pub Role);

/// Where a tensor's parameters are counted in `plan` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Embedding,
    Attention,
    Mlp,
    Norm,
    Head,
}

impl Component {
    pub const ALL: [Component; 5] = [
        Component::Embedding,
        Component::Attention,
        Component::Mlp,
        Component::Norm,
        Component::Head,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Component::Embedding => "embedding",
            Component::Attention => "attention",
            Component::Mlp => "mlp",
            Component::Norm => "norms",
            Component::Head => "head",
        }
    }
}

/// When a tensor must be present in the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    Required,
    /// Required when this boolean config key is true, unexpected otherwise.
    IfConfig(&'static str),
    /// The output head: required when the head is untied; tolerated when tied.
    UntiedHead,
    /// Buffers some old checkpoints carry (rotary inv_freq): accepted, not written.
    Dropped,
}

#[derive(Debug, Clone, Copy)]
pub struct TensorRule {
    /// Full tensor name; `{L}` stands for a layer index `0..num_hidden_layers`.
    pub pattern: &'static str,
    pub axes: &'static [Axis],
    pub component: Component,
    pub presence: Presence,
}

/// Where config.json keeps each size (GPT-2 says `n_embd`, OPT `ffn_dim`, ...).
#[derive(Debug, Clone, Copy)]
pub struct ConfigKeys {
    pub hidden: &'static str,
    pub ffn: &'static str,
    /// When the FFN key is absent or null: `ffn_default_multiple * hidden` (GPT-2: 4).
    pub ffn_default_multiple: Option<usize>,
    pub heads: &'static str,
    /// None: the family has no GQA, kv heads = heads.
    pub kv_heads: Option<&'static str>,
    pub layers: &'static str,
    pub vocab: &'static str,
    pub positions: Option<&'static str>,
}

/// transformers' usual names.
pub const HF_KEYS: ConfigKeys = ConfigKeys {
    hidden: "hidden_size",
    ffn: "intermediate_size",
    ffn_default_multiple: None,
    heads: "num_attention_heads",
    kv_heads: Some("num_key_value_heads"),
    layers: "num_hidden_layers",
    vocab: "vocab_size",
    positions: Some("max_position_embeddings"),
};

#[derive(Debug)]
pub struct Family {
    pub model_type: &'static str,
    pub keys: ConfigKeys,
    /// Rows of a learned position table beyond max positions (OPT: 2).
    pub position_offset: usize,
    /// transformers' default for `tie_word_embeddings` when config.json omits it.
    pub tie_default: bool,
    /// The token embedding; a tied head is written from it.
    pub embedding: &'static str,
    /// The output head's tensor name (written untied in every clone).
    pub head: &'static str,
    pub rules: &'static [&'static [TensorRule]],
    /// The model multiplies embeddings by sqrt(hidden_size) (Gemma): the clone stores the
    /// tiled embedding divided by sqrt(n) so the product is unchanged.
    pub embedding_scaled_by_sqrt_hidden: bool,
    /// Shown in the support table.
    pub notes: &'static str,
}

use Component as C;
use Presence as P;
use Role::{Read as R, Write as W};
use Space::*;

const fn rule(
    pattern: &'static str,
    axes: &'static [Axis],
    component: Component,
    presence: Presence,
) -> TensorRule {
    TensorRule {
        pattern,
        axes,
        component,
        presence,
    }
}

const EMBED: &[Axis] = &[Axis(&[Vocab], R), Axis(&[Hidden], W)];
const HEAD: &[Axis] = &[Axis(&[Vocab], W), Axis(&[Hidden], R)];
const NORM: &[Axis] = &[Axis(&[Hidden], W)];
const Q: &[Axis] = &[Axis(&[Heads], W), Axis(&[Hidden], R)];
const KV: &[Axis] = &[Axis(&[KvHeads], W), Axis(&[Hidden], R)];
const O: &[Axis] = &[Axis(&[Hidden], W), Axis(&[Heads], R)];
const Q_BIAS: &[Axis] = &[Axis(&[Heads], W)];
const KV_BIAS: &[Axis] = &[Axis(&[KvHeads], W)];
const UP: &[Axis] = &[Axis(&[Ffn], W), Axis(&[Hidden], R)];
const DOWN: &[Axis] = &[Axis(&[Hidden], W), Axis(&[Ffn], R)];
const FFN_BIAS: &[Axis] = &[Axis(&[Ffn], W)];
const PER_HEAD_NORM: &[Axis] = &[Axis(&[HeadDim], W)];

/// The Llama layout every family here shares: embedding, pre-norm attention and gated MLP,
/// final norm, head.
const LLAMA_CORE: &[TensorRule] = &[
    rule(
        "model.embed_tokens.weight",
        EMBED,
        C::Embedding,
        P::Required,
    ),
    rule(
        "model.layers.{L}.input_layernorm.weight",
        NORM,
        C::Norm,
        P::Required,
    ),
    rule(
        "model.layers.{L}.self_attn.q_proj.weight",
        Q,
        C::Attention,
        P::Required,
    ),
    rule(
        "model.layers.{L}.self_attn.k_proj.weight",
        KV,
        C::Attention,
        P::Required,
    ),
    rule(
        "model.layers.{L}.self_attn.v_proj.weight",
        KV,
        C::Attention,
        P::Required,
    ),
    rule(
        "model.layers.{L}.self_attn.o_proj.weight",
        O,
        C::Attention,
        P::Required,
    ),
    rule(
        "model.layers.{L}.self_attn.rotary_emb.inv_freq",
        &[Axis(&[HeadDim], W)],
        C::Attention,
        P::Dropped,
    ),
    rule(
        "model.layers.{L}.post_attention_layernorm.weight",
        NORM,
        C::Norm,
        P::Required,
    ),
    rule(
        "model.layers.{L}.mlp.gate_proj.weight",
        UP,
        C::Mlp,
        P::Required,
    ),
    rule(
        "model.layers.{L}.mlp.up_proj.weight",
        UP,
        C::Mlp,
        P::Required,
    ),
    rule(
        "model.layers.{L}.mlp.down_proj.weight",
        DOWN,
        C::Mlp,
        P::Required,
    ),
    rule("model.norm.weight", NORM, C::Norm, P::Required),
    rule("lm_head.weight", HEAD, C::Head, P::UntiedHead),
];

/// Llama's optional biases (`attention_bias`, `mlp_bias` in config.json).
const LLAMA_BIASES: &[TensorRule] = &[
    rule(
        "model.layers.{L}.self_attn.q_proj.bias",
        Q_BIAS,
        C::Attention,
        P::IfConfig("attention_bias"),
    ),
    rule(
        "model.layers.{L}.self_attn.k_proj.bias",
        KV_BIAS,
        C::Attention,
        P::IfConfig("attention_bias"),
    ),
    rule(
        "model.layers.{L}.self_attn.v_proj.bias",
        KV_BIAS,
        C::Attention,
        P::IfConfig("attention_bias"),
    ),
    rule(
        "model.layers.{L}.self_attn.o_proj.bias",
        NORM,
        C::Attention,
        P::IfConfig("attention_bias"),
    ),
    rule(
        "model.layers.{L}.mlp.gate_proj.bias",
        FFN_BIAS,
        C::Mlp,
        P::IfConfig("mlp_bias"),
    ),
    rule(
        "model.layers.{L}.mlp.up_proj.bias",
        FFN_BIAS,
        C::Mlp,
        P::IfConfig("mlp_bias"),
    ),
    rule(
        "model.layers.{L}.mlp.down_proj.bias",
        NORM,
        C::Mlp,
        P::IfConfig("mlp_bias"),
    ),
];

/// Qwen2 always has q/k/v biases and no o bias.
const QKV_BIASES: &[TensorRule] = &[
    rule(
        "model.layers.{L}.self_attn.q_proj.bias",
        Q_BIAS,
        C::Attention,
        P::Required,
    ),
    rule(
        "model.layers.{L}.self_attn.k_proj.bias",
        KV_BIAS,
        C::Attention,
        P::Required,
    ),
    rule(
        "model.layers.{L}.self_attn.v_proj.bias",
        KV_BIAS,
        C::Attention,
        P::Required,
    ),
];

/// Qwen3's q/k RMSNorm over one head (weights shared by all heads, so never grown).
const QK_NORM_PER_HEAD: &[TensorRule] = &[
    rule(
        "model.layers.{L}.self_attn.q_norm.weight",
        PER_HEAD_NORM,
        C::Norm,
        P::Required,
    ),
    rule(
        "model.layers.{L}.self_attn.k_norm.weight",
        PER_HEAD_NORM,
        C::Norm,
        P::Required,
    ),
];

/// Qwen3 keeps Llama's `attention_bias` switch for q/k/v/o.
const QWEN3_BIASES: &[TensorRule] = &[
    rule(
        "model.layers.{L}.self_attn.q_proj.bias",
        Q_BIAS,
        C::Attention,
        P::IfConfig("attention_bias"),
    ),
    rule(
        "model.layers.{L}.self_attn.k_proj.bias",
        KV_BIAS,
        C::Attention,
        P::IfConfig("attention_bias"),
    ),
    rule(
        "model.layers.{L}.self_attn.v_proj.bias",
        KV_BIAS,
        C::Attention,
        P::IfConfig("attention_bias"),
    ),
    rule(
        "model.layers.{L}.self_attn.o_proj.bias",
        NORM,
        C::Attention,
        P::IfConfig("attention_bias"),
    ),
];

pub static FAMILIES: &[Family] = &[
    Family {
        model_type: "llama",
        keys: HF_KEYS,
        position_offset: 0,
        tie_default: false,
        embedding: "model.embed_tokens.weight",
        head: "lm_head.weight",
        rules: &[LLAMA_CORE, LLAMA_BIASES],
        embedding_scaled_by_sqrt_hidden: false,
        notes: "MHA, GQA, MQA; tied or untied head; attention_bias / mlp_bias",
    },
    Family {
        model_type: "mistral",
        keys: HF_KEYS,
        position_offset: 0,
        tie_default: false,
        embedding: "model.embed_tokens.weight",
        head: "lm_head.weight",
        rules: &[LLAMA_CORE],
        embedding_scaled_by_sqrt_hidden: false,
        notes: "GQA; sliding_window kept",
    },
    Family {
        model_type: "qwen2",
        keys: HF_KEYS,
        position_offset: 0,
        tie_default: false,
        embedding: "model.embed_tokens.weight",
        head: "lm_head.weight",
        rules: &[LLAMA_CORE, QKV_BIASES],
        embedding_scaled_by_sqrt_hidden: false,
        notes: "q/k/v biases tiled per head",
    },
    Family {
        model_type: "qwen3",
        keys: HF_KEYS,
        position_offset: 0,
        tie_default: false,
        embedding: "model.embed_tokens.weight",
        head: "lm_head.weight",
        rules: &[LLAMA_CORE, QK_NORM_PER_HEAD, QWEN3_BIASES],
        embedding_scaled_by_sqrt_hidden: false,
        notes: "per-head q_norm/k_norm kept; explicit head_dim",
    },
];

impl Family {
    pub fn lookup(model_type: &str) -> Option<&'static Family> {
        FAMILIES.iter().find(|f| f.model_type == model_type)
    }

    pub fn supported_names() -> Vec<&'static str> {
        FAMILIES.iter().map(|f| f.model_type).collect()
    }

    pub fn all_rules(&self) -> impl Iterator<Item = &'static TensorRule> + '_ {
        self.rules.iter().flat_map(|group| group.iter())
    }

    /// Finds the rule a tensor name follows, and its layer index where the rule has `{L}`.
    pub fn match_name(&self, name: &str) -> Option<(&'static TensorRule, Option<usize>)> {
        self.all_rules()
            .find_map(|r| match_pattern(r.pattern, name).map(|layer| (r, layer)))
    }
}

/// `Some(None)` for an exact match, `Some(Some(i))` when `{L}` matched the integer `i`.
fn match_pattern(pattern: &str, name: &str) -> Option<Option<usize>> {
    match pattern.split_once("{L}") {
        None => (pattern == name).then_some(None),
        Some((prefix, suffix)) => {
            let digits = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            digits.parse().ok().map(Some)
        }
    }
}

/// Expands a pattern for one layer.
pub fn tensor_name(pattern: &str, layer: Option<usize>) -> String {
    match layer {
        Some(l) => pattern.replace("{L}", &l.to_string()),
        None => pattern.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_layers() {
        let f = Family::lookup("qwen2").unwrap();
        let (r, l) = f
            .match_name("model.layers.17.self_attn.k_proj.bias")
            .unwrap();
        assert_eq!((r.axes, l), (KV_BIAS, Some(17)));
        assert!(f
            .match_name("model.layers.x.self_attn.k_proj.bias")
            .is_none());
        assert!(f
            .match_name("model.layers.1.self_attn.k_proj.weightx")
            .is_none());
        assert_eq!(f.match_name("lm_head.weight").unwrap().1, None);
    }

    #[test]
    fn every_rule_has_at_most_one_grown_read_and_write_axis() {
        for f in FAMILIES {
            for r in f.all_rules() {
                assert!(r.axes.len() <= 2, "{}", r.pattern);
                assert!(
                    r.axes.iter().filter(|a| a.1 == Role::Read).count() <= 1,
                    "{}",
                    r.pattern
                );
            }
        }
    }
}
