//! Model families as data: for every tensor name pattern, what lives on each axis.
//!
//! Growth never branches on the family. A family is a list of tensor rules; each rule says
//! which space (hidden, heads x head_dim, ffn, ...) each axis of the tensor belongs to and
//! whether the tensor writes that space (rows of q_proj, norm weights, the embedding's
//! columns) or reads it (columns of q_proj, the head's columns). The generic kernel in
//! `kernel.rs` derives everything else. The same record carries what the Rust decoder reads
//! (`wiring`: tensor names by role and block wiring; `decoder`: config switches and their
//! defaults, see `wiring.rs`) and what the docs' family tables show (`family_table.rs`).
//! Adding a family is adding a `Family` value below (and its fixtures).

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
    /// Experts of a Mixture-of-Experts layer (rows of the router). Never grown: the expert
    /// count and top-k are kept, every expert grows like an MLP.
    Experts,
    /// A shared expert's inner width (Qwen2-MoE's `shared_expert_intermediate_size`): grown
    /// by whole copies, as many as the experts' FFN axis gets (the floor of its ratio when
    /// `intermediate_size` asks for a width that is not a multiple).
    SharedFfn,
    /// The one output of Qwen2-MoE's `shared_expert_gate` (1 for a family with a shared
    /// expert, 0 otherwise). Never grown.
    SharedGate,
}

impl Space {
    pub const ALL: [Space; 12] = [
        Space::Vocab,
        Space::Hidden,
        Space::Heads,
        Space::KvHeads,
        Space::Ffn,
        Space::HeadDim,
        Space::Positions,
        Space::EmbedProj,
        Space::QkvPerHead,
        Space::Experts,
        Space::SharedFfn,
        Space::SharedGate,
    ];

    /// The name used in plans and recipes.
    pub fn name(self) -> &'static str {
        match self {
            Space::Vocab => "vocab",
            Space::Hidden => "hidden",
            Space::Heads => "heads",
            Space::KvHeads => "kv_heads",
            Space::Ffn => "ffn",
            Space::HeadDim => "head_dim",
            Space::Positions => "positions",
            Space::EmbedProj => "embed_proj",
            Space::QkvPerHead => "qkv_per_head",
            Space::Experts => "experts",
            Space::SharedFfn => "shared_ffn",
            Space::SharedGate => "shared_gate",
        }
    }
}

/// Whether a tied embedding can stay tied through width growth, exactly.
///
/// Keeping the tie means the head is the embedding, so the embedding cannot be a plain tile
/// (the head needs 1/n on its hidden columns). Instead the embedding is written as
/// tile(E)/n and the whole residual stream is carried as tile(h) * s: s = 1/n, or
/// sqrt(n)/n = 1/sqrt(n) where the model multiplies embeddings by sqrt(hidden_size) (Gemma:
/// the multiplier grows by sqrt(n), see [`Family::tied_eps_divisor`]). Every residual writer
/// gets x s. Norms are scale-invariant once their eps is multiplied by s^2, so everything
/// that reads the stream through a norm sees the usual tile, and the head (the embedding
/// again) reads tile(y) against tile(E)/n: exact. Families whose blocks write a norm's output
/// into the stream or read the stream without a norm say so in [`TiedResidual`].
#[derive(Debug, Clone, Copy)]
pub enum TiedGrowth {
    Exact {
        /// The config key of the norms' eps (divided by n^2).
        eps_key: &'static str,
        /// Tensors that feed a norm sharing that eps but reading something other than the
        /// residual (Qwen3's per-head q/k norms read q and k): x 1/n too, so that norm sees
        /// its input scaled like its eps.
        also_scaled: &'static [&'static str],
    },
    /// Why the tie cannot be kept exactly.
    Refused(&'static str),
}

/// What a kept tie (residual carried as tile(h) * s) needs beyond scaling the embedding and
/// the residual writers, for families whose blocks are not plain pre-norm blocks.
#[derive(Debug, Clone, Copy)]
pub struct TiedResidual {
    /// Norms whose output is added to the stream (Gemma-2's and OLMo-2's post-norms): their
    /// output must carry s, so their gain is scaled: `offset + w' = s (offset + w)`. (Their
    /// input, a residual writer's output, gets s like every writer, so the norm sees it
    /// scaled like its eps.)
    pub post_norms: &'static [&'static str],
    /// The norms compute `x_hat * (offset + w)`: 1 for Gemma's, 0 otherwise.
    pub norm_offset: f64,
    /// Tensors that read the stream without a norm (OLMo-2's v_proj, gate_proj, up_proj):
    /// x 1/s, absorbing it, so that their outputs are the plain tile as behind a norm (the
    /// gate's activation is not homogeneous; v and up then reach writers scaled by s).
    pub unnormed_readers: &'static [&'static str],
}

impl TiedResidual {
    /// Pre-norm blocks: every reader goes through a norm, every writer is a projection.
    pub const PRE_NORM: TiedResidual = TiedResidual {
        post_norms: &[],
        norm_offset: 0.0,
        unnormed_readers: &[],
    };
}

/// Head counts a clone may have besides the source's x factor (head_dim is always kept, and
/// the grown config states it).
#[derive(Debug, Clone, Copy)]
pub enum HeadCounts {
    /// Any count >= the source's (whole kv groups): the modeling code reads `head_dim`.
    Any,
    /// Counts that divide the grown hidden size: transformers' config validation demands it
    /// even when `head_dim` is given.
    DividingHidden,
    /// Why no other count can load or stay exact.
    Refused(&'static str),
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
    /// Required unless this boolean config key is false (transformers' default is true:
    /// Qwen2-MoE's `qkv_bias`), unexpected when it is.
    UnlessConfigFalse(&'static str),
    /// Present in some configurations only (OPT's project_in/out, its final norm).
    Optional,
    /// The output head: required when the head is untied; tolerated when tied.
    UntiedHead,
    /// Buffers some old checkpoints carry (rotary inv_freq): accepted, not written.
    Dropped,
}

#[derive(Debug, Clone, Copy)]
pub struct TensorRule {
    /// Full tensor name; `{L}` stands for a layer index `0..num_hidden_layers`, and `{E}`
    /// (after `{L}`) for an expert index `0..num_experts` of a Mixture-of-Experts layer.
    pub pattern: &'static str,
    pub axes: &'static [Axis],
    pub component: Component,
    pub presence: Presence,
}

impl TensorRule {
    fn writes_hidden(&self) -> bool {
        self.axes
            .iter()
            .any(|a| a.0 == [Space::Hidden] && a.1 == Role::Write)
    }

    /// Adds into the residual stream from inside a block (o_proj, down_proj and their
    /// biases): zeroed in an inserted identity block, x 1/n when a tie is kept.
    pub fn writes_residual(&self) -> bool {
        self.pattern.contains("{L}")
            && matches!(self.component, Component::Attention | Component::Mlp)
            && self.writes_hidden()
    }

    /// Starts the residual stream (token and position embeddings, OPT's project_in).
    pub fn starts_residual(&self) -> bool {
        !self.pattern.contains("{L}")
            && self.component == Component::Embedding
            && self.writes_hidden()
    }
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
    /// Keys that equal the hidden size when a feature is off and must then grow with it
    /// (OPT's word_embed_proj_dim: equal means no project_in/out).
    pub hidden_mirrors: &'static [&'static str],
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
    hidden_mirrors: &[],
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
    /// Whether `--keep-tied` is exact for this family, and how.
    pub tied_growth: TiedGrowth,
    /// What a kept tie scales besides the embedding and the residual writers.
    pub tied_residual: TiedResidual,
    /// Which head counts other than the source's x factor the family can load.
    pub head_counts: HeadCounts,
    /// How the family picks sliding-attention layers when config.json has no `layer_types`:
    /// by layer index, in which case layers cannot move to new indices.
    pub layer_sliding: LayerSliding,
    /// Shown in README.md's compact family table (`family_table.rs`).
    pub notes: &'static str,
    /// Config keys other than `layer_types` that hold one entry per layer (SmolLM3's
    /// `no_rope_layers`): depth growth moves each entry with its layer. When such a key is
    /// absent the model derives it from the layer index, so depth growth is refused.
    pub per_layer_keys: &'static [&'static str],
    /// Mixture-of-Experts config keys, for families whose MLP is a routed set of experts.
    pub moe: Option<MoeKeys>,
    /// The transformers class config.json's `architectures` names (the family table).
    pub architecture: &'static str,
    /// Where the Rust decoder finds each tensor by role, and how a block is wired.
    pub wiring: Wiring,
    /// The config switches the family's transformers module reads, and their defaults.
    pub decoder: DecoderSwitches,
    /// The long notes of docs/families.md's table (markdown).
    pub details: &'static str,
}

/// Where config.json keeps a Mixture-of-Experts layer's sizes. The expert count and top-k
/// are never grown (each expert grows like an MLP, the router reads the hidden axis).
#[derive(Debug, Clone, Copy)]
pub struct MoeKeys {
    /// The number of routed experts (`num_local_experts`, `num_experts`): the key
    /// transformers writes, and the other name its `attribute_map` also reads.
    pub experts: &'static str,
    pub experts_alias: Option<&'static str>,
    /// Experts each token is routed to (`num_experts_per_tok`).
    pub per_token: &'static str,
    /// A shared expert's inner width (Qwen2-MoE's `shared_expert_intermediate_size`), if the
    /// family has one.
    pub shared_ffn: Option<&'static str>,
    /// Keys that make some layers dense MLPs instead (Qwen-MoE's `decoder_sparse_step`, only
    /// 1 accepted, and `mlp_only_layers`, only empty): such layers have other tensors, which
    /// the rules do not describe, so the config is refused.
    pub sparse_step: Option<&'static str>,
    pub dense_layers: Option<&'static str>,
}

/// How a family chooses its sliding-attention layers (transformers 5.23), for growth and for
/// the Rust decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerSliding {
    /// No sliding window.
    Never,
    /// Every layer, whenever `sliding_window` is set; `layer_types` is not read (mistral,
    /// phi3, starcoder2).
    Every,
    /// `layer_types` if given, else sliding and global attention alternate by layer index,
    /// even layers sliding (Gemma-2).
    Alternating,
    /// Only with `use_sliding_window`; then `layer_types` if given, else the layers from
    /// `max_window_layers` (default 28) on (Qwen2, Qwen3).
    FromMaxWindowLayers,
    /// `layer_types` if given, else every layer slides except each `period`-th (layer l is
    /// global when (l + 1) % period == 0); `period_key` overrides the period when config.json
    /// has it (Gemma-3's `sliding_window_pattern`, default 6; OLMo-3: 4).
    Periodic {
        period_key: Option<&'static str>,
        period: usize,
    },
    /// Only with `use_sliding_window` and a window; then `layer_types` if given, else the
    /// NoPE layers (SmolLM3: `no_rope_layers[l] == 0`).
    NoRopeLayersIfEnabled,
    /// Every layer, only with `use_sliding_window` (Qwen3-MoE: the configuration drops the
    /// window otherwise; `layer_types` is not read).
    EveryIfEnabled,
    /// Only with `use_sliding_window`; then `layer_types` if given, else the even layers below
    /// `max_window_layers` (default 28) (Qwen2-MoE).
    EvenBelowMaxWindowLayers,
}

use crate::wiring::*;
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

// Axis layouts shared by many tensors.
const EMBED: &[Axis] = &[Axis(&[Vocab], R), Axis(&[Hidden], W)];
const HEAD: &[Axis] = &[Axis(&[Vocab], W), Axis(&[Hidden], R)];
const HEAD_BIAS: &[Axis] = &[Axis(&[Vocab], W)];
const POSITIONS: &[Axis] = &[Axis(&[Positions], R), Axis(&[Hidden], W)];
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
// Fused layouts.
const QKV_CONCAT: &[Axis] = &[Axis(&[Heads, KvHeads, KvHeads], W), Axis(&[Hidden], R)];
const GATE_UP_CONCAT: &[Axis] = &[Axis(&[Ffn, Ffn], W), Axis(&[Hidden], R)];
const QKV_PER_HEAD: &[Axis] = &[Axis(&[QkvPerHead], W), Axis(&[Hidden], R)];
const QKV_PER_HEAD_BIAS: &[Axis] = &[Axis(&[QkvPerHead], W)];
// GPT-2's Conv1D stores weights [in, out]: the read axis comes first.
const CONV_QKV: &[Axis] = &[Axis(&[Hidden], R), Axis(&[Heads, KvHeads, KvHeads], W)];
const CONV_QKV_BIAS: &[Axis] = &[Axis(&[Heads, KvHeads, KvHeads], W)];
const CONV_O: &[Axis] = &[Axis(&[Heads], R), Axis(&[Hidden], W)];
const CONV_UP: &[Axis] = &[Axis(&[Hidden], R), Axis(&[Ffn], W)];
const CONV_DOWN: &[Axis] = &[Axis(&[Ffn], R), Axis(&[Hidden], W)];
// OPT's embedding width (see Space::EmbedProj).
const OPT_EMBED: &[Axis] = &[Axis(&[Vocab], R), Axis(&[EmbedProj], W)];
const OPT_HEAD: &[Axis] = &[Axis(&[Vocab], W), Axis(&[EmbedProj], R)];
const PROJECT_IN: &[Axis] = &[Axis(&[Hidden], W), Axis(&[EmbedProj], R)];
const PROJECT_OUT: &[Axis] = &[Axis(&[EmbedProj], W), Axis(&[Hidden], R)];

/// Pieces of the Llama layout, composed per family below.
#[rustfmt::skip]
const EMBED_TOKENS: &[TensorRule] = &[
    rule("model.embed_tokens.weight", EMBED, C::Embedding, P::Required),
    rule("model.layers.{L}.self_attn.rotary_emb.inv_freq", &[Axis(&[HeadDim], W)], C::Attention, P::Dropped),
];
#[rustfmt::skip]
const INPUT_NORM: &[TensorRule] = &[rule("model.layers.{L}.input_layernorm.weight", NORM, C::Norm, P::Required)];
#[rustfmt::skip]
const INPUT_NORM_BIAS: &[TensorRule] = &[rule("model.layers.{L}.input_layernorm.bias", NORM, C::Norm, P::Required)];
#[rustfmt::skip]
const POST_ATTN_NORM: &[TensorRule] = &[rule("model.layers.{L}.post_attention_layernorm.weight", NORM, C::Norm, P::Required)];
#[rustfmt::skip]
const POST_ATTN_NORM_BIAS: &[TensorRule] = &[rule("model.layers.{L}.post_attention_layernorm.bias", NORM, C::Norm, P::Required)];
#[rustfmt::skip]
const ATTN_QKVO: &[TensorRule] = &[
    rule("model.layers.{L}.self_attn.q_proj.weight", Q, C::Attention, P::Required),
    rule("model.layers.{L}.self_attn.k_proj.weight", KV, C::Attention, P::Required),
    rule("model.layers.{L}.self_attn.v_proj.weight", KV, C::Attention, P::Required),
    rule("model.layers.{L}.self_attn.o_proj.weight", O, C::Attention, P::Required),
];
#[rustfmt::skip]
const MLP_GATED: &[TensorRule] = &[
    rule("model.layers.{L}.mlp.gate_proj.weight", UP, C::Mlp, P::Required),
    rule("model.layers.{L}.mlp.up_proj.weight", UP, C::Mlp, P::Required),
    rule("model.layers.{L}.mlp.down_proj.weight", DOWN, C::Mlp, P::Required),
];
#[rustfmt::skip]
const FINAL_NORM_AND_HEAD: &[TensorRule] = &[
    rule("model.norm.weight", NORM, C::Norm, P::Required),
    rule("lm_head.weight", HEAD, C::Head, P::UntiedHead),
];
/// Llama, Mistral, Qwen: embedding, pre-norm attention and gated MLP, final norm, head.
const LLAMA_CORE: &[&[TensorRule]] = &[
    EMBED_TOKENS,
    INPUT_NORM,
    ATTN_QKVO,
    POST_ATTN_NORM,
    MLP_GATED,
    FINAL_NORM_AND_HEAD,
];

/// The router of a Mixture-of-Experts layer: one row per expert (kept), reading the hidden
/// axis (its columns tile / n like any reader of the residual, so the clone's router logits
/// equal the source's and the same experts are picked with the same weights).
const ROUTER: &[Axis] = &[Axis(&[Experts], W), Axis(&[Hidden], R)];
/// Mixtral's sparse MoE block: every expert a gated MLP (w1 = gate, w3 = up, w2 = down).
#[rustfmt::skip]
const MIXTRAL_MOE: &[TensorRule] = &[
    rule("model.layers.{L}.block_sparse_moe.gate.weight", ROUTER, C::Mlp, P::Required),
    rule("model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight", UP, C::Mlp, P::Required),
    rule("model.layers.{L}.block_sparse_moe.experts.{E}.w3.weight", UP, C::Mlp, P::Required),
    rule("model.layers.{L}.block_sparse_moe.experts.{E}.w2.weight", DOWN, C::Mlp, P::Required),
];
/// Qwen-MoE's and OLMoE's sparse block: `mlp.gate` routes to gated experts under `mlp.experts`.
#[rustfmt::skip]
const QWEN_MOE: &[TensorRule] = &[
    rule("model.layers.{L}.mlp.gate.weight", ROUTER, C::Mlp, P::Required),
    rule("model.layers.{L}.mlp.experts.{E}.gate_proj.weight", UP, C::Mlp, P::Required),
    rule("model.layers.{L}.mlp.experts.{E}.up_proj.weight", UP, C::Mlp, P::Required),
    rule("model.layers.{L}.mlp.experts.{E}.down_proj.weight", DOWN, C::Mlp, P::Required),
];
/// Qwen2-MoE's shared expert, a gated MLP on its own inner width that every token runs,
/// scaled by sigmoid(shared_expert_gate(x)): the gate [1, hidden] reads the hidden axis
/// (columns tile / n, so the clone's gate value equals the source's).
#[rustfmt::skip]
const SHARED_EXPERT: &[TensorRule] = &[
    rule("model.layers.{L}.mlp.shared_expert.gate_proj.weight", &[Axis(&[SharedFfn], W), Axis(&[Hidden], R)], C::Mlp, P::Required),
    rule("model.layers.{L}.mlp.shared_expert.up_proj.weight", &[Axis(&[SharedFfn], W), Axis(&[Hidden], R)], C::Mlp, P::Required),
    rule("model.layers.{L}.mlp.shared_expert.down_proj.weight", &[Axis(&[Hidden], W), Axis(&[SharedFfn], R)], C::Mlp, P::Required),
    rule("model.layers.{L}.mlp.shared_expert_gate.weight", &[Axis(&[SharedGate], W), Axis(&[Hidden], R)], C::Mlp, P::Required),
];

/// Llama's optional biases (`attention_bias`, `mlp_bias` in config.json).
#[rustfmt::skip]
const LLAMA_BIASES: &[TensorRule] = &[
    rule("model.layers.{L}.self_attn.q_proj.bias", Q_BIAS, C::Attention, P::IfConfig("attention_bias")),
    rule("model.layers.{L}.self_attn.k_proj.bias", KV_BIAS, C::Attention, P::IfConfig("attention_bias")),
    rule("model.layers.{L}.self_attn.v_proj.bias", KV_BIAS, C::Attention, P::IfConfig("attention_bias")),
    rule("model.layers.{L}.self_attn.o_proj.bias", NORM, C::Attention, P::IfConfig("attention_bias")),
    rule("model.layers.{L}.mlp.gate_proj.bias", FFN_BIAS, C::Mlp, P::IfConfig("mlp_bias")),
    rule("model.layers.{L}.mlp.up_proj.bias", FFN_BIAS, C::Mlp, P::IfConfig("mlp_bias")),
    rule("model.layers.{L}.mlp.down_proj.bias", NORM, C::Mlp, P::IfConfig("mlp_bias")),
];

/// q/k/v biases, always present (Qwen2) or behind a config switch (StableLM).
#[rustfmt::skip]
const QKV_BIASES: &[TensorRule] = &[
    rule("model.layers.{L}.self_attn.q_proj.bias", Q_BIAS, C::Attention, P::Required),
    rule("model.layers.{L}.self_attn.k_proj.bias", KV_BIAS, C::Attention, P::Required),
    rule("model.layers.{L}.self_attn.v_proj.bias", KV_BIAS, C::Attention, P::Required),
];
/// Qwen2-MoE's q/k/v biases: on unless `qkv_bias` is false (o_proj has none).
#[rustfmt::skip]
const QWEN2_MOE_QKV_BIASES: &[TensorRule] = &[
    rule("model.layers.{L}.self_attn.q_proj.bias", Q_BIAS, C::Attention, P::UnlessConfigFalse("qkv_bias")),
    rule("model.layers.{L}.self_attn.k_proj.bias", KV_BIAS, C::Attention, P::UnlessConfigFalse("qkv_bias")),
    rule("model.layers.{L}.self_attn.v_proj.bias", KV_BIAS, C::Attention, P::UnlessConfigFalse("qkv_bias")),
];
#[rustfmt::skip]
const STABLELM_QKV_BIASES: &[TensorRule] = &[
    rule("model.layers.{L}.self_attn.q_proj.bias", Q_BIAS, C::Attention, P::IfConfig("use_qkv_bias")),
    rule("model.layers.{L}.self_attn.k_proj.bias", KV_BIAS, C::Attention, P::IfConfig("use_qkv_bias")),
    rule("model.layers.{L}.self_attn.v_proj.bias", KV_BIAS, C::Attention, P::IfConfig("use_qkv_bias")),
];

/// Qwen3's q/k RMSNorm over one head (weights shared by all heads, so never grown).
#[rustfmt::skip]
const QK_NORM_PER_HEAD: &[TensorRule] = &[
    rule("model.layers.{L}.self_attn.q_norm.weight", PER_HEAD_NORM, C::Norm, P::Required),
    rule("model.layers.{L}.self_attn.k_norm.weight", PER_HEAD_NORM, C::Norm, P::Required),
];
/// OLMo-2's q/k RMSNorm over the whole projection: tiled like the heads.
#[rustfmt::skip]
const QK_NORM_WHOLE: &[TensorRule] = &[
    rule("model.layers.{L}.self_attn.q_norm.weight", Q_BIAS, C::Norm, P::Required),
    rule("model.layers.{L}.self_attn.k_norm.weight", KV_BIAS, C::Norm, P::Required),
];

/// Qwen3 keeps Llama's `attention_bias` switch for q/k/v/o.
#[rustfmt::skip]
const QWEN3_BIASES: &[TensorRule] = &[
    rule("model.layers.{L}.self_attn.q_proj.bias", Q_BIAS, C::Attention, P::IfConfig("attention_bias")),
    rule("model.layers.{L}.self_attn.k_proj.bias", KV_BIAS, C::Attention, P::IfConfig("attention_bias")),
    rule("model.layers.{L}.self_attn.v_proj.bias", KV_BIAS, C::Attention, P::IfConfig("attention_bias")),
    rule("model.layers.{L}.self_attn.o_proj.bias", NORM, C::Attention, P::IfConfig("attention_bias")),
];

/// Gemma-2 / OLMo-2 norms around the MLP.
#[rustfmt::skip]
const PRE_FFN_NORM: &[TensorRule] = &[rule("model.layers.{L}.pre_feedforward_layernorm.weight", NORM, C::Norm, P::Required)];
#[rustfmt::skip]
const POST_FFN_NORM: &[TensorRule] = &[rule("model.layers.{L}.post_feedforward_layernorm.weight", NORM, C::Norm, P::Required)];

#[rustfmt::skip]
const PHI3: &[TensorRule] = &[
    rule("model.layers.{L}.self_attn.qkv_proj.weight", QKV_CONCAT, C::Attention, P::Required),
    rule("model.layers.{L}.self_attn.o_proj.weight", O, C::Attention, P::Required),
    rule("model.layers.{L}.mlp.gate_up_proj.weight", GATE_UP_CONCAT, C::Mlp, P::Required),
    rule("model.layers.{L}.mlp.down_proj.weight", DOWN, C::Mlp, P::Required),
];

#[rustfmt::skip]
const LAYERNORM_FINAL_BIAS: &[TensorRule] = &[rule("model.norm.bias", NORM, C::Norm, P::Required)];

#[rustfmt::skip]
const STARCODER2: &[TensorRule] = &[
    rule("model.layers.{L}.self_attn.q_proj.bias", Q_BIAS, C::Attention, P::IfConfig("use_bias")),
    rule("model.layers.{L}.self_attn.k_proj.bias", KV_BIAS, C::Attention, P::IfConfig("use_bias")),
    rule("model.layers.{L}.self_attn.v_proj.bias", KV_BIAS, C::Attention, P::IfConfig("use_bias")),
    rule("model.layers.{L}.self_attn.o_proj.bias", NORM, C::Attention, P::IfConfig("use_bias")),
    rule("model.layers.{L}.mlp.c_fc.weight", UP, C::Mlp, P::Required),
    rule("model.layers.{L}.mlp.c_fc.bias", FFN_BIAS, C::Mlp, P::IfConfig("use_bias")),
    rule("model.layers.{L}.mlp.c_proj.weight", DOWN, C::Mlp, P::Required),
    rule("model.layers.{L}.mlp.c_proj.bias", NORM, C::Mlp, P::IfConfig("use_bias")),
];

#[rustfmt::skip]
const PHI: &[TensorRule] = &[
    rule("model.embed_tokens.weight", EMBED, C::Embedding, P::Required),
    rule("model.layers.{L}.input_layernorm.weight", NORM, C::Norm, P::Required),
    rule("model.layers.{L}.input_layernorm.bias", NORM, C::Norm, P::Required),
    rule("model.layers.{L}.self_attn.q_proj.weight", Q, C::Attention, P::Required),
    rule("model.layers.{L}.self_attn.q_proj.bias", Q_BIAS, C::Attention, P::Required),
    rule("model.layers.{L}.self_attn.k_proj.weight", KV, C::Attention, P::Required),
    rule("model.layers.{L}.self_attn.k_proj.bias", KV_BIAS, C::Attention, P::Required),
    rule("model.layers.{L}.self_attn.v_proj.weight", KV, C::Attention, P::Required),
    rule("model.layers.{L}.self_attn.v_proj.bias", KV_BIAS, C::Attention, P::Required),
    rule("model.layers.{L}.self_attn.dense.weight", O, C::Attention, P::Required),
    rule("model.layers.{L}.self_attn.dense.bias", NORM, C::Attention, P::Required),
    rule("model.layers.{L}.mlp.fc1.weight", UP, C::Mlp, P::Required),
    rule("model.layers.{L}.mlp.fc1.bias", FFN_BIAS, C::Mlp, P::Required),
    rule("model.layers.{L}.mlp.fc2.weight", DOWN, C::Mlp, P::Required),
    rule("model.layers.{L}.mlp.fc2.bias", NORM, C::Mlp, P::Required),
    rule("model.final_layernorm.weight", NORM, C::Norm, P::Required),
    rule("model.final_layernorm.bias", NORM, C::Norm, P::Required),
    rule("lm_head.weight", HEAD, C::Head, P::UntiedHead),
    rule("lm_head.bias", HEAD_BIAS, C::Head, P::Optional),
];

#[rustfmt::skip]
const GPT2: &[TensorRule] = &[
    rule("transformer.wte.weight", EMBED, C::Embedding, P::Required),
    rule("transformer.wpe.weight", POSITIONS, C::Embedding, P::Required),
    rule("transformer.h.{L}.ln_1.weight", NORM, C::Norm, P::Required),
    rule("transformer.h.{L}.ln_1.bias", NORM, C::Norm, P::Required),
    rule("transformer.h.{L}.attn.c_attn.weight", CONV_QKV, C::Attention, P::Required),
    rule("transformer.h.{L}.attn.c_attn.bias", CONV_QKV_BIAS, C::Attention, P::Required),
    rule("transformer.h.{L}.attn.c_proj.weight", CONV_O, C::Attention, P::Required),
    rule("transformer.h.{L}.attn.c_proj.bias", NORM, C::Attention, P::Required),
    rule("transformer.h.{L}.attn.bias", &[Axis(&[Positions], R)], C::Attention, P::Dropped),
    rule("transformer.h.{L}.attn.masked_bias", &[], C::Attention, P::Dropped),
    rule("transformer.h.{L}.ln_2.weight", NORM, C::Norm, P::Required),
    rule("transformer.h.{L}.ln_2.bias", NORM, C::Norm, P::Required),
    rule("transformer.h.{L}.mlp.c_fc.weight", CONV_UP, C::Mlp, P::Required),
    rule("transformer.h.{L}.mlp.c_fc.bias", FFN_BIAS, C::Mlp, P::Required),
    rule("transformer.h.{L}.mlp.c_proj.weight", CONV_DOWN, C::Mlp, P::Required),
    rule("transformer.h.{L}.mlp.c_proj.bias", NORM, C::Mlp, P::Required),
    rule("transformer.ln_f.weight", NORM, C::Norm, P::Required),
    rule("transformer.ln_f.bias", NORM, C::Norm, P::Required),
    rule("lm_head.weight", HEAD, C::Head, P::UntiedHead),
];

#[rustfmt::skip]
const GPT_NEOX: &[TensorRule] = &[
    rule("gpt_neox.embed_in.weight", EMBED, C::Embedding, P::Required),
    rule("gpt_neox.layers.{L}.input_layernorm.weight", NORM, C::Norm, P::Required),
    rule("gpt_neox.layers.{L}.input_layernorm.bias", NORM, C::Norm, P::Required),
    rule("gpt_neox.layers.{L}.post_attention_layernorm.weight", NORM, C::Norm, P::Required),
    rule("gpt_neox.layers.{L}.post_attention_layernorm.bias", NORM, C::Norm, P::Required),
    rule("gpt_neox.layers.{L}.attention.query_key_value.weight", QKV_PER_HEAD, C::Attention, P::Required),
    rule("gpt_neox.layers.{L}.attention.query_key_value.bias", QKV_PER_HEAD_BIAS, C::Attention, P::Required),
    rule("gpt_neox.layers.{L}.attention.dense.weight", O, C::Attention, P::Required),
    rule("gpt_neox.layers.{L}.attention.dense.bias", NORM, C::Attention, P::Required),
    rule("gpt_neox.layers.{L}.attention.bias", &[], C::Attention, P::Dropped),
    rule("gpt_neox.layers.{L}.attention.masked_bias", &[], C::Attention, P::Dropped),
    rule("gpt_neox.layers.{L}.attention.rotary_emb.inv_freq", &[], C::Attention, P::Dropped),
    rule("gpt_neox.layers.{L}.mlp.dense_h_to_4h.weight", UP, C::Mlp, P::Required),
    rule("gpt_neox.layers.{L}.mlp.dense_h_to_4h.bias", FFN_BIAS, C::Mlp, P::Required),
    rule("gpt_neox.layers.{L}.mlp.dense_4h_to_h.weight", DOWN, C::Mlp, P::Required),
    rule("gpt_neox.layers.{L}.mlp.dense_4h_to_h.bias", NORM, C::Mlp, P::Required),
    rule("gpt_neox.final_layer_norm.weight", NORM, C::Norm, P::Required),
    rule("gpt_neox.final_layer_norm.bias", NORM, C::Norm, P::Required),
    rule("embed_out.weight", HEAD, C::Head, P::UntiedHead),
];

#[rustfmt::skip]
const OPT: &[TensorRule] = &[
    rule("model.decoder.embed_tokens.weight", OPT_EMBED, C::Embedding, P::Required),
    rule("model.decoder.embed_positions.weight", POSITIONS, C::Embedding, P::Required),
    rule("model.decoder.project_in.weight", PROJECT_IN, C::Embedding, P::Optional),
    rule("model.decoder.project_out.weight", PROJECT_OUT, C::Head, P::Optional),
    rule("model.decoder.layers.{L}.self_attn.q_proj.weight", Q, C::Attention, P::Required),
    rule("model.decoder.layers.{L}.self_attn.q_proj.bias", Q_BIAS, C::Attention, P::Required),
    rule("model.decoder.layers.{L}.self_attn.k_proj.weight", KV, C::Attention, P::Required),
    rule("model.decoder.layers.{L}.self_attn.k_proj.bias", KV_BIAS, C::Attention, P::Required),
    rule("model.decoder.layers.{L}.self_attn.v_proj.weight", KV, C::Attention, P::Required),
    rule("model.decoder.layers.{L}.self_attn.v_proj.bias", KV_BIAS, C::Attention, P::Required),
    rule("model.decoder.layers.{L}.self_attn.out_proj.weight", O, C::Attention, P::Required),
    rule("model.decoder.layers.{L}.self_attn.out_proj.bias", NORM, C::Attention, P::Required),
    rule("model.decoder.layers.{L}.self_attn_layer_norm.weight", NORM, C::Norm, P::Required),
    rule("model.decoder.layers.{L}.self_attn_layer_norm.bias", NORM, C::Norm, P::Required),
    rule("model.decoder.layers.{L}.fc1.weight", UP, C::Mlp, P::Required),
    rule("model.decoder.layers.{L}.fc1.bias", FFN_BIAS, C::Mlp, P::Required),
    rule("model.decoder.layers.{L}.fc2.weight", DOWN, C::Mlp, P::Required),
    rule("model.decoder.layers.{L}.fc2.bias", NORM, C::Mlp, P::Required),
    rule("model.decoder.layers.{L}.final_layer_norm.weight", NORM, C::Norm, P::Required),
    rule("model.decoder.layers.{L}.final_layer_norm.bias", NORM, C::Norm, P::Required),
    rule("model.decoder.final_layer_norm.weight", NORM, C::Norm, P::Optional),
    rule("model.decoder.final_layer_norm.bias", NORM, C::Norm, P::Optional),
    rule("lm_head.weight", OPT_HEAD, C::Head, P::UntiedHead),
];

const fn family(
    model_type: &'static str,
    tie_default: bool,
    rules: &'static [&'static [TensorRule]],
    notes: &'static str,
) -> Family {
    Family {
        model_type,
        keys: HF_KEYS,
        position_offset: 0,
        tie_default,
        embedding: "model.embed_tokens.weight",
        head: "lm_head.weight",
        rules,
        embedding_scaled_by_sqrt_hidden: false,
        tied_growth: TiedGrowth::Exact {
            eps_key: "rms_norm_eps",
            also_scaled: &[],
        },
        tied_residual: TiedResidual::PRE_NORM,
        head_counts: HeadCounts::Any,
        layer_sliding: LayerSliding::Never,
        notes,
        per_layer_keys: &[],
        moe: None,
        architecture: "",
        wiring: LLAMA_WIRING,
        decoder: DecoderSwitches::BASE,
        details: "",
    }
}

/// OPT's `do_layer_norm_before` (default true): false makes the blocks post-LN and drops the
/// final norm.
const OPT_PRE_NORM: Flag = Flag {
    key: "do_layer_norm_before",
    default: true,
};

const HEAD_DIM_DERIVED: HeadCounts = HeadCounts::Refused(
    "transformers derives its head_dim as hidden_size / num_attention_heads, so the head count is fixed by the width",
);

/// Gemma-2's and OLMo-2's norms whose output is added to the residual stream.
const POST_NORMS: &[&str] = &[
    "model.layers.{L}.post_attention_layernorm.weight",
    "model.layers.{L}.post_feedforward_layernorm.weight",
];
const LAYERNORM_TIE: TiedGrowth = TiedGrowth::Exact {
    eps_key: "layer_norm_eps",
    also_scaled: &[],
};

const fn concat<const N: usize>(a: &'static [&'static [TensorRule]]) -> [&'static [TensorRule]; N] {
    let mut out: [&'static [TensorRule]; N] = [&[]; N];
    let mut i = 0;
    while i < a.len() {
        out[i] = a[i];
        i += 1;
    }
    out
}

const LLAMA_RULES: [&[TensorRule]; 7] = concat(&[
    EMBED_TOKENS,
    INPUT_NORM,
    ATTN_QKVO,
    POST_ATTN_NORM,
    MLP_GATED,
    FINAL_NORM_AND_HEAD,
    LLAMA_BIASES,
]);
const QWEN2_RULES: [&[TensorRule]; 7] = concat(&[
    EMBED_TOKENS,
    INPUT_NORM,
    ATTN_QKVO,
    POST_ATTN_NORM,
    MLP_GATED,
    FINAL_NORM_AND_HEAD,
    QKV_BIASES,
]);
const QWEN3_RULES: [&[TensorRule]; 8] = concat(&[
    EMBED_TOKENS,
    INPUT_NORM,
    ATTN_QKVO,
    POST_ATTN_NORM,
    MLP_GATED,
    FINAL_NORM_AND_HEAD,
    QK_NORM_PER_HEAD,
    QWEN3_BIASES,
]);
const GEMMA2_RULES: [&[TensorRule]; 8] = concat(&[
    EMBED_TOKENS,
    INPUT_NORM,
    ATTN_QKVO,
    POST_ATTN_NORM,
    PRE_FFN_NORM,
    POST_FFN_NORM,
    MLP_GATED,
    FINAL_NORM_AND_HEAD,
]);
const OLMO2_RULES: [&[TensorRule]; 7] = concat(&[
    EMBED_TOKENS,
    ATTN_QKVO,
    QK_NORM_WHOLE,
    POST_ATTN_NORM,
    MLP_GATED,
    POST_FFN_NORM,
    FINAL_NORM_AND_HEAD,
]);
const PHI3_RULES: [&[TensorRule]; 5] = concat(&[
    EMBED_TOKENS,
    INPUT_NORM,
    PHI3,
    POST_ATTN_NORM,
    FINAL_NORM_AND_HEAD,
]);
const STABLELM_RULES: [&[TensorRule]; 10] = concat(&[
    EMBED_TOKENS,
    INPUT_NORM,
    INPUT_NORM_BIAS,
    ATTN_QKVO,
    STABLELM_QKV_BIASES,
    POST_ATTN_NORM,
    POST_ATTN_NORM_BIAS,
    MLP_GATED,
    FINAL_NORM_AND_HEAD,
    LAYERNORM_FINAL_BIAS,
]);
const GEMMA3_RULES: [&[TensorRule]; 9] = concat(&[
    EMBED_TOKENS,
    INPUT_NORM,
    ATTN_QKVO,
    POST_ATTN_NORM,
    PRE_FFN_NORM,
    POST_FFN_NORM,
    MLP_GATED,
    FINAL_NORM_AND_HEAD,
    QK_NORM_PER_HEAD,
]);
const MIXTRAL_RULES: [&[TensorRule]; 6] = concat(&[
    EMBED_TOKENS,
    INPUT_NORM,
    ATTN_QKVO,
    POST_ATTN_NORM,
    MIXTRAL_MOE,
    FINAL_NORM_AND_HEAD,
]);
const QWEN2_MOE_RULES: [&[TensorRule]; 8] = concat(&[
    EMBED_TOKENS,
    INPUT_NORM,
    ATTN_QKVO,
    QWEN2_MOE_QKV_BIASES,
    POST_ATTN_NORM,
    QWEN_MOE,
    SHARED_EXPERT,
    FINAL_NORM_AND_HEAD,
]);
/// Qwen3-MoE: Qwen3's attention (per-head q/k norms, `attention_bias`) with the sparse block.
const QWEN3_MOE_RULES: [&[TensorRule]; 8] = concat(&[
    EMBED_TOKENS,
    INPUT_NORM,
    ATTN_QKVO,
    QK_NORM_PER_HEAD,
    QWEN3_BIASES,
    POST_ATTN_NORM,
    QWEN_MOE,
    FINAL_NORM_AND_HEAD,
]);
/// OLMoE: pre-norm blocks (unlike OLMo-2) with q/k norms over the whole projection.
const OLMOE_RULES: [&[TensorRule]; 8] = concat(&[
    EMBED_TOKENS,
    INPUT_NORM,
    ATTN_QKVO,
    QK_NORM_WHOLE,
    QWEN3_BIASES,
    POST_ATTN_NORM,
    QWEN_MOE,
    FINAL_NORM_AND_HEAD,
]);
const STARCODER2_RULES: [&[TensorRule]; 9] = concat(&[
    EMBED_TOKENS,
    INPUT_NORM,
    INPUT_NORM_BIAS,
    ATTN_QKVO,
    POST_ATTN_NORM,
    POST_ATTN_NORM_BIAS,
    STARCODER2,
    FINAL_NORM_AND_HEAD,
    LAYERNORM_FINAL_BIAS,
]);

pub static FAMILIES: &[Family] = &[
    Family {
        head_counts: HeadCounts::DividingHidden,
        architecture: "LlamaForCausalLM",
        details: "MHA, GQA, MQA; tied or untied; `attention_bias`/`mlp_bias`; explicit head_dim; rope scaling (llama3, yarn, ...) kept",
        ..family("llama", false, &LLAMA_RULES, "MHA, GQA, MQA; tied or untied head; attention_bias / mlp_bias")
    },
    Family {
        layer_sliding: LayerSliding::Every,
        architecture: "MistralForCausalLM",
        decoder: DecoderSwitches { default_window: Some(4096), ..DecoderSwitches::BASE },
        details: "GQA; `sliding_window` kept",
        ..family("mistral", false, LLAMA_CORE, "GQA; sliding_window kept")
    },
    Family {
        layer_sliding: LayerSliding::FromMaxWindowLayers,
        architecture: "Qwen2ForCausalLM",
        decoder: DecoderSwitches { default_window: Some(4096), ..DecoderSwitches::BASE },
        details: "q/k/v biases tiled per head",
        ..family("qwen2", false, &QWEN2_RULES, "q/k/v biases tiled per head")
    },
    Family {
        layer_sliding: LayerSliding::FromMaxWindowLayers,
        tied_growth: TiedGrowth::Exact {
            eps_key: "rms_norm_eps",
            also_scaled: &[
                "model.layers.{L}.self_attn.q_proj.weight",
                "model.layers.{L}.self_attn.q_proj.bias",
                "model.layers.{L}.self_attn.k_proj.weight",
                "model.layers.{L}.self_attn.k_proj.bias",
            ],
        },
        architecture: "Qwen3ForCausalLM",
        wiring: Wiring { qk_norm: QK_NORM, ..LLAMA_WIRING },
        decoder: DecoderSwitches { default_window: Some(4096), ..DecoderSwitches::BASE },
        details: "per-head `q_norm`/`k_norm` kept; explicit `head_dim`",
        ..family("qwen3", false, &QWEN3_RULES, "per-head q_norm/k_norm kept; explicit head_dim")
    },
    Family {
        embedding_scaled_by_sqrt_hidden: true,
        architecture: "GemmaForCausalLM",
        wiring: Wiring { norm: NormKind::RmsOnePlus, ..LLAMA_WIRING },
        decoder: DecoderSwitches {
            default_activation: "gelu_pytorch_tanh",
            legacy_gelu_is_tanh: true,
            refused_when_true: BIDIRECTIONAL,
            ..DecoderSwitches::BASE
        },
        details: "embedding stored as tile/sqrt(n) (the model multiplies it by sqrt(hidden)); (1+w) norms tiled",
        ..family("gemma", true, LLAMA_CORE, "embedding stored as tile/sqrt(n) (the model scales it by sqrt(hidden)); (1+w) norms tiled")
    },
    Family {
        embedding_scaled_by_sqrt_hidden: true,
        tied_residual: TiedResidual {
            post_norms: POST_NORMS,
            norm_offset: 1.0,
            unnormed_readers: &[],
        },
        head_counts: HeadCounts::DividingHidden,
        layer_sliding: LayerSliding::Alternating,
        architecture: "Gemma2ForCausalLM",
        wiring: Wiring { norm: NormKind::RmsOnePlus, block: SANDWICH_BLOCK, ..LLAMA_WIRING },
        decoder: DecoderSwitches {
            activation_key: "hidden_activation",
            default_activation: "gelu_pytorch_tanh",
            default_window: Some(4096),
            refused_when_true: BIDIRECTIONAL,
            softcap_defaults: Some((50.0, 30.0)),
            query_pre_attn_scalar: Some(256.0),
            ..DecoderSwitches::BASE
        },
        details: "pre/post norms; soft-capping, `query_pre_attn_scalar`, sliding window, `layer_types` kept",
        ..family("gemma2", true, &GEMMA2_RULES, "pre/post norms; soft-capping, query_pre_attn_scalar, sliding window kept")
    },
    Family {
        // Attention and MLP read the stream without a norm. q and k pass through
        // q_norm/k_norm, whose eps is scaled alike, so they keep s; v, gate and up absorb
        // 1/s, so that (like every pre-norm reader) they give the plain tile and o_proj and
        // down_proj, scaled by s as writers, feed the post-norms at s.
        tied_residual: TiedResidual {
            post_norms: POST_NORMS,
            norm_offset: 0.0,
            unnormed_readers: &[
                "model.layers.{L}.self_attn.v_proj.weight",
                "model.layers.{L}.mlp.gate_proj.weight",
                "model.layers.{L}.mlp.up_proj.weight",
            ],
        },
        head_counts: HeadCounts::Refused(
            "its q/k norms normalise over all heads at once, so copying some heads more often than others changes \
             their statistics",
        ),
        architecture: "Olmo2ForCausalLM",
        wiring: Wiring { block: POST_NORM_BLOCK, qk_norm: QK_NORM, ..LLAMA_WIRING },
        details: "post-norms; q/k norms over the whole projection, tiled like the heads",
        ..family("olmo2", false, &OLMO2_RULES, "post-norms; q/k norms over the whole projection tiled like the heads")
    },
    Family {
        layer_sliding: LayerSliding::Every,
        architecture: "Phi3ForCausalLM",
        wiring: Wiring {
            attn: AttnLayout::Concat { prefix: "self_attn", qkv: "qkv_proj", o: "o_proj" },
            mlp: MlpLayout::GatedFused { prefix: "mlp", gate_up: "gate_up_proj", down: "down_proj" },
            ..LLAMA_WIRING
        },
        details: "fused `qkv_proj` = [q | k | v] and `gate_up_proj` = [gate | up], grown segment by segment",
        ..family("phi3", false, &PHI3_RULES, "fused qkv_proj and gate_up_proj grown segment by segment")
    },
    Family {
        tied_growth: LAYERNORM_TIE,
        head_counts: HEAD_DIM_DERIVED,
        architecture: "StableLmForCausalLM",
        wiring: Wiring { norm: NormKind::Layer, ..LLAMA_WIRING },
        decoder: DecoderSwitches {
            refused_when_true: &[
                ("use_parallel_residual", "the parallel residual block"),
                ("qk_layernorm", "per-head q/k LayerNorms"),
            ],
            ..DecoderSwitches::BASE
        },
        details: "LayerNorm; partial rotary; optional qkv bias",
        ..family("stablelm", false, &STABLELM_RULES, "LayerNorm; partial rotary; optional qkv bias")
    },
    Family {
        layer_sliding: LayerSliding::Every,
        tied_growth: TiedGrowth::Exact {
            eps_key: "norm_epsilon",
            also_scaled: &[],
        },
        architecture: "Starcoder2ForCausalLM",
        wiring: Wiring { norm: NormKind::Layer, mlp: MlpLayout::Plain { prefix: "mlp", up: "c_fc", down: "c_proj" }, ..LLAMA_WIRING },
        decoder: DecoderSwitches { default_activation: "gelu_pytorch_tanh", ..DecoderSwitches::BASE },
        details: "LayerNorm; biases; plain MLP",
        ..family("starcoder2", true, &STARCODER2_RULES, "LayerNorm; biases; plain MLP")
    },
    Family {
        tied_growth: LAYERNORM_TIE,
        architecture: "PhiForCausalLM",
        wiring: Wiring {
            final_norm: "model.final_layernorm",
            norm: NormKind::Layer,
            block: BlockLayout::Parallel { attn_norm: "input_layernorm", mlp_norm: "input_layernorm" },
            attn: AttnLayout::Separate { prefix: "self_attn", q: "q_proj", k: "k_proj", v: "v_proj", o: "dense" },
            mlp: MlpLayout::Plain { prefix: "mlp", up: "fc1", down: "fc2" },
            ..LLAMA_WIRING
        },
        decoder: DecoderSwitches {
            default_activation: "gelu_new",
            refused_when_true: &[("qk_layernorm", "q/k LayerNorms")],
            ..DecoderSwitches::BASE
        },
        details: "parallel block; partial rotary; dense and head biases",
        ..family("phi", false, &[PHI], "parallel block; partial rotary; dense biases; head bias")
    },
    Family {
        keys: ConfigKeys {
            hidden: "n_embd",
            ffn: "n_inner",
            ffn_default_multiple: Some(4),
            heads: "n_head",
            kv_heads: None,
            layers: "n_layer",
            vocab: "vocab_size",
            positions: Some("n_positions"),
            hidden_mirrors: &[],
        },
        embedding: "transformer.wte.weight",
        tied_growth: TiedGrowth::Exact {
            eps_key: "layer_norm_epsilon",
            also_scaled: &[],
        },
        head_counts: HEAD_DIM_DERIVED,
        architecture: "GPT2LMHeadModel",
        wiring: Wiring {
            layers: "transformer.h",
            positions: Some("transformer.wpe"),
            final_norm: "transformer.ln_f",
            norm: NormKind::Layer,
            block: BlockLayout::Sequential { pre_attn: Some("ln_1"), post_attn: None, pre_mlp: Some("ln_2"), post_mlp: None },
            attn: AttnLayout::Conv1d { prefix: "attn", qkv: "c_attn", o: "c_proj" },
            mlp: MlpLayout::PlainConv1d { prefix: "mlp", up: "c_fc", down: "c_proj" },
            ..LLAMA_WIRING
        },
        decoder: DecoderSwitches {
            activation_key: "activation_function",
            default_activation: "gelu_new",
            gpt2_scaling: true,
            ..DecoderSwitches::BASE
        },
        details: "Conv1D `[in, out]` weights; fused `c_attn` columns [q | k | v]; learned positions",
        ..family("gpt2", true, &[GPT2], "Conv1D [in, out] weights; fused c_attn [q | k | v]; learned positions")
    },
    Family {
        keys: ConfigKeys { kv_heads: None, ..HF_KEYS },
        embedding: "gpt_neox.embed_in.weight",
        head: "embed_out.weight",
        tied_growth: LAYERNORM_TIE,
        head_counts: HEAD_DIM_DERIVED,
        architecture: "GPTNeoXForCausalLM",
        wiring: Wiring {
            layers: "gpt_neox.layers",
            final_norm: "gpt_neox.final_layer_norm",
            norm: NormKind::Layer,
            block: BlockLayout::Parallel { attn_norm: "input_layernorm", mlp_norm: "post_attention_layernorm" },
            block_switch: Some((Flag { key: "use_parallel_residual", default: true }, LLAMA_BLOCK)),
            attn: AttnLayout::PerHead { prefix: "attention", qkv: "query_key_value", o: "dense" },
            mlp: MlpLayout::Plain { prefix: "mlp", up: "dense_h_to_4h", down: "dense_4h_to_h" },
            ..LLAMA_WIRING
        },
        decoder: DecoderSwitches { default_activation: "gelu", ..DecoderSwitches::BASE },
        details: "fused QKV laid out per head (a plain tile keeps heads whole); parallel residual",
        ..family("gpt_neox", false, &[GPT_NEOX], "fused QKV laid out per head; parallel residual; partial rotary")
    },
    Family {
        keys: ConfigKeys { ffn: "ffn_dim", kv_heads: None, hidden_mirrors: &["word_embed_proj_dim"], ..HF_KEYS },
        position_offset: 2,
        embedding: "model.decoder.embed_tokens.weight",
        tied_growth: TiedGrowth::Refused(
            "its LayerNorm eps is fixed in the modeling code (1e-5), not read from config.json, so it cannot be \
             divided by n^2 to keep the norms scale-invariant",
        ),
        head_counts: HEAD_DIM_DERIVED,
        architecture: "OPTForCausalLM",
        wiring: Wiring {
            layers: "model.decoder.layers",
            positions: Some("model.decoder.embed_positions"),
            project_in: Some("model.decoder.project_in"),
            project_out: Some("model.decoder.project_out"),
            // modeling_opt builds the final LayerNorm only for pre-norm models without
            // `_remove_final_layer_norm`; otherwise stored weights for it are ignored.
            final_norm: "model.decoder.final_layer_norm",
            final_norm_unless: &[OPT_PRE_NORM, Flag { key: "_remove_final_layer_norm", default: false }],
            norm: NormKind::Layer,
            block: BlockLayout::Sequential {
                pre_attn: Some("self_attn_layer_norm"),
                post_attn: None,
                pre_mlp: Some("final_layer_norm"),
                post_mlp: None,
            },
            block_switch: Some((
                OPT_PRE_NORM,
                BlockLayout::PostNorm { attn_norm: "self_attn_layer_norm", mlp_norm: "final_layer_norm" },
            )),
            attn: AttnLayout::Separate { prefix: "self_attn", q: "q_proj", k: "k_proj", v: "v_proj", o: "out_proj" },
            mlp: MlpLayout::Plain { prefix: "", up: "fc1", down: "fc2" },
            ..LLAMA_WIRING
        },
        decoder: DecoderSwitches {
            activation_key: "activation_function",
            default_activation: "relu",
            refused_when_false: &[("layer_norm_elementwise_affine", "LayerNorms without weights")],
            ..DecoderSwitches::BASE
        },
        details: "learned positions (offset 2); pre- and post-LayerNorm; `project_in/out` stay ungrown when `word_embed_proj_dim` != hidden (no 1/n logit bug)",
        ..family("opt", true, &[OPT], "learned positions (offset 2); project_in/out kept ungrown when word_embed_proj_dim != hidden")
    },
    Family {
        head_counts: HeadCounts::DividingHidden,
        layer_sliding: LayerSliding::NoRopeLayersIfEnabled,
        per_layer_keys: &["no_rope_layers"],
        architecture: "SmolLM3ForCausalLM",
        decoder: DecoderSwitches { default_theta: 2_000_000.0, no_rope_layers: true, ..DecoderSwitches::BASE },
        details: "Llama layout; NoPE layers (`no_rope_layers`, 0 = no rotary) and `layer_types` follow each layer through depth growth (depth growth refused while `no_rope_layers` is implicit); optional sliding window (`use_sliding_window`)",
        ..family("smollm3", true, &LLAMA_RULES, "NoPE layers (no_rope_layers) kept layer by layer; optional sliding window")
    },
    Family {
        head_counts: HeadCounts::DividingHidden,
        architecture: "GraniteForCausalLM",
        decoder: DecoderSwitches { granite_multipliers: true, ..DecoderSwitches::BASE },
        details: "Llama layout; `embedding_multiplier`, `residual_multiplier`, `attention_multiplier` (the score scale, replacing hd^-0.5; head_dim is kept) and `logits_scaling` (logits divided) are scalars that no width changes, so they are kept as they are",
        ..family("granite", false, &LLAMA_RULES, "embedding/residual/attention multipliers and logits_scaling kept (none depends on the width)")
    },
    Family {
        tied_growth: TiedGrowth::Refused(
            "attention and MLP read the residual stream directly, without a norm, so a residual carried as tile(h)/n \
             would reach them scaled",
        ),
        head_counts: HeadCounts::Refused(
            "its q/k norms normalise over all heads at once, so copying some heads more often than others changes \
             their statistics",
        ),
        layer_sliding: LayerSliding::Periodic { period_key: None, period: 4 },
        architecture: "Olmo3ForCausalLM",
        wiring: Wiring { block: POST_NORM_BLOCK, qk_norm: QK_NORM, ..LLAMA_WIRING },
        decoder: DecoderSwitches {
            // configuration_olmo3 pops a legacy flat `rope_theta` for the full layers only;
            // the sliding ones then get the class default.
            default_window: Some(4096),
            default_theta: 500_000.0,
            local_rope: Some((None, 500_000.0)),
            ..DecoderSwitches::BASE
        },
        details: "OLMo-2 layout (post-norms, whole-projection q/k norms); sliding/full `layer_types` (default: every 4th layer full), one rope per layer type (`rope_parameters.{sliding,full}_attention`)",
        ..family("olmo3", false, &OLMO2_RULES, "OLMo-2 layout; sliding/full layer_types, one rope per layer type")
    },
    Family {
        embedding_scaled_by_sqrt_hidden: true,
        // Gemma-2's kept tie (s = 1/sqrt(n), post-norm gains shifted), plus the per-head q/k
        // norms: they share rms_norm_eps (divided by n) but read q and k, which come from
        // normed input at the plain tile, so q_proj/k_proj carry s as Qwen3's do.
        tied_growth: TiedGrowth::Exact {
            eps_key: "rms_norm_eps",
            also_scaled: &[
                "model.layers.{L}.self_attn.q_proj.weight",
                "model.layers.{L}.self_attn.q_proj.bias",
                "model.layers.{L}.self_attn.k_proj.weight",
                "model.layers.{L}.self_attn.k_proj.bias",
            ],
        },
        tied_residual: TiedResidual {
            post_norms: POST_NORMS,
            norm_offset: 1.0,
            unnormed_readers: &[],
        },
        head_counts: HeadCounts::DividingHidden,
        layer_sliding: LayerSliding::Periodic { period_key: Some("sliding_window_pattern"), period: 6 },
        architecture: "Gemma3ForCausalLM",
        wiring: Wiring { norm: NormKind::RmsOnePlus, block: SANDWICH_BLOCK, qk_norm: QK_NORM, ..LLAMA_WIRING },
        decoder: DecoderSwitches {
            activation_key: "hidden_activation",
            default_activation: "gelu_pytorch_tanh",
            default_window: Some(4096),
            refused_when_true: BIDIRECTIONAL,
            query_pre_attn_scalar: Some(256.0),
            default_theta: 1_000_000.0,
            local_rope: Some((Some("rope_local_base_freq"), 10_000.0)),
            reads_softcaps: true,
            ..DecoderSwitches::BASE
        },
        details: "Gemma-2 layout (pre/post norms, (1+w) norms, sqrt(hidden) embedding scale, `query_pre_attn_scalar`, optional soft-caps) plus per-head (1+w) `q_norm`/`k_norm` (kept, never grown); sliding layers use their own rope (`rope_local_base_freq` / `rope_parameters.sliding_attention`), full ones the global rope, linear scaling included (Gemma 3 from 4B); `use_bidirectional_attention` clones but the Rust decoder refuses it",
        ..family("gemma3_text", true, &GEMMA3_RULES, "Gemma-2 layout plus per-head (1+w) q/k norms; local and global rope per layer type")
    },
    Family {
        layer_sliding: LayerSliding::Every,
        moe: Some(MoeKeys {
            experts: "num_local_experts",
            experts_alias: Some("num_experts"),
            per_token: "num_experts_per_tok",
            shared_ffn: None,
            sparse_step: None,
            dense_layers: None,
        }),
        architecture: "MixtralForCausalLM",
        wiring: Wiring {
            mlp: MlpLayout::Moe {
                prefix: "block_sparse_moe",
                router: "gate",
                experts: "experts",
                gate: "w1",
                up: "w3",
                down: "w2",
                shared: None,
            },
            ..LLAMA_WIRING
        },
        decoder: DecoderSwitches { default_theta: 1_000_000.0, always_norm_topk: true, ..DecoderSwitches::BASE },
        details: "Mixture of Experts (`num_local_experts`, `num_experts_per_tok` kept): every expert `block_sparse_moe.experts.N.{w1,w3,w2}` grows like a gated MLP (w1/w3 rows and w2 columns on the FFN axis, hidden axes tiled), the router `block_sparse_moe.gate` [experts, hidden] keeps its rows and reads the hidden axis (columns tile / n), so the clone's router logits equal the source's and the same top-k experts are picked with the same weights (up to rounding of the logits: only an exact tie between two experts' probabilities could pick differently); sliding window on every layer. The Rust decoder routes as transformers 5.23 does (softmax over all experts, top-k, renormalised; the other MoE families renormalise only with `norm_topk_prob`). `train` refuses every MoE family in one line (no load-balancing loss). Also the upcycling target of llama and mistral (`clone --experts E`, docs/growth.md)",
        ..family("mixtral", false, &MIXTRAL_RULES, "Mixture of Experts: every expert grown like the MLP, the router's hidden columns tiled / n; expert count and top-k kept")
    },
    Family {
        keys: MOE_KEYS,
        layer_sliding: LayerSliding::EvenBelowMaxWindowLayers,
        moe: Some(MoeKeys {
            shared_ffn: Some("shared_expert_intermediate_size"),
            ..QWEN_MOE_KEYS
        }),
        architecture: "Qwen2MoeForCausalLM",
        wiring: Wiring {
            mlp: crate::wiring::qwen_moe_mlp(Some(("shared_expert", "shared_expert_gate"))),
            ..LLAMA_WIRING
        },
        decoder: DecoderSwitches {
            refused_when_true: QWEN_MOE_SLIDING,
            refuse_sliding_layer_types: true,
            ..DecoderSwitches::BASE
        },
        details: "Mixtral's growth on `mlp.gate` (router) and `mlp.experts.N.{gate,up,down}_proj` (width `moe_intermediate_size`), plus a shared expert `mlp.shared_expert.{gate,up,down}_proj` on its own width `shared_expert_intermediate_size`, grown like an MLP by whole copies: x m, or floor(F / f) copies when `--intermediate-size F` is not a multiple (exact either way, see [growth.md](growth.md)), and its gate `mlp.shared_expert_gate` [1, hidden] (columns tiled / n, so sigmoid(gate) is unchanged); q/k/v biases unless `qkv_bias: false`; `num_experts`, `num_experts_per_tok`, `norm_topk_prob` (default false) kept. `intermediate_size` (the width of dense `mlp_only_layers`) is not read and kept. Refused: `decoder_sparse_step` != 1 and a non-empty `mlp_only_layers` (dense layers among the experts); the Rust decoder refuses `use_sliding_window: true` and sliding `layer_types`. Upcycling target of qwen2 (`clone --experts E`: shared expert written silent, docs/growth.md)",
        ..family("qwen2_moe", false, &QWEN2_MOE_RULES, "Mixture of Experts plus a shared expert (grown like an MLP on its own width) and its sigmoid gate (hidden columns tiled / n); q/k/v biases (qkv_bias)")
    },
    Family {
        keys: MOE_KEYS,
        layer_sliding: LayerSliding::EveryIfEnabled,
        tied_growth: QK_NORMED_TIE,
        // Qwen3MoeConfig saves `num_local_experts` (its attribute_map reads `num_experts`, as
        // the released configs say).
        moe: Some(MoeKeys {
            experts: "num_local_experts",
            experts_alias: Some("num_experts"),
            ..QWEN_MOE_KEYS
        }),
        architecture: "Qwen3MoeForCausalLM",
        wiring: Wiring { mlp: QWEN_MOE_MLP, qk_norm: QK_NORM, ..LLAMA_WIRING },
        decoder: DecoderSwitches { refused_when_true: QWEN_MOE_SLIDING, ..DecoderSwitches::BASE },
        details: "Qwen3's attention (per-head `q_norm`/`k_norm` kept, `attention_bias`) with the Qwen-MoE sparse block (no shared expert); `norm_topk_prob` read (default false; the released models set true); the expert count is read from `num_local_experts` (what transformers saves) or `num_experts` (released configs). `--keep-tied` scales q_proj/k_proj like Qwen3's. Refused as qwen2_moe: dense layers; `use_sliding_window: true` in the Rust decoder. Upcycling target of qwen3 (`clone --experts E`, docs/growth.md)",
        ..family("qwen3_moe", false, &QWEN3_MOE_RULES, "Mixture of Experts with Qwen3's per-head q_norm/k_norm (kept); norm_topk_prob read")
    },
    Family {
        tied_growth: QK_NORMED_TIE,
        head_counts: HeadCounts::Refused(
            "its q/k norms normalise over all heads at once (and are sized hidden_size), so the head count is fixed \
             by the width",
        ),
        moe: Some(MoeKeys {
            experts: "num_experts",
            experts_alias: Some("num_local_experts"),
            per_token: "num_experts_per_tok",
            shared_ffn: None,
            sparse_step: None,
            dense_layers: None,
        }),
        architecture: "OlmoeForCausalLM",
        wiring: Wiring { mlp: QWEN_MOE_MLP, qk_norm: QK_NORM, ..LLAMA_WIRING },
        decoder: DecoderSwitches { clip_qkv: true, ..DecoderSwitches::BASE },
        details: "Pre-norm blocks with OLMo-2's q/k norms over the whole projection (tiled like the heads; other head counts refused, the norms are sized by hidden_size), the Qwen-MoE sparse block (experts `intermediate_size` wide), `norm_topk_prob` (default false) and `clip_qkv` kept: q and k after their norms and v are clamped to [-clip_qkv, clip_qkv], and a clone's q, k, v are copies of the source's, so the clamp stays exact (the Rust decoder implements it; checked by the fixture, where clip 1.5 moves the logits)",
        ..family("olmoe", false, &OLMOE_RULES, "Mixture of Experts with q/k norms over the whole projection (tiled like the heads) and clip_qkv kept")
    },
];

/// Qwen-MoE's sizes: the experts' inner width is `moe_intermediate_size` (`intermediate_size`
/// is the width of dense `mlp_only_layers`, which are refused, so it is left as it is).
const MOE_KEYS: ConfigKeys = ConfigKeys {
    ffn: "moe_intermediate_size",
    ..HF_KEYS
};
const QWEN_MOE_KEYS: MoeKeys = MoeKeys {
    experts: "num_experts",
    experts_alias: None,
    per_token: "num_experts_per_tok",
    shared_ffn: None,
    sparse_step: Some("decoder_sparse_step"),
    dense_layers: Some("mlp_only_layers"),
};
/// A kept tie where q and k pass through norms that share `rms_norm_eps` but read the
/// projections (Qwen3's per-head, OLMoE's whole-projection q/k norms): q_proj/k_proj carry s
/// so those norms see their input scaled like their eps.
const QK_NORMED_TIE: TiedGrowth = TiedGrowth::Exact {
    eps_key: "rms_norm_eps",
    also_scaled: &[
        "model.layers.{L}.self_attn.q_proj.weight",
        "model.layers.{L}.self_attn.q_proj.bias",
        "model.layers.{L}.self_attn.k_proj.weight",
        "model.layers.{L}.self_attn.k_proj.bias",
    ],
};

impl Family {
    pub fn lookup(model_type: &str) -> Option<&'static Family> {
        FAMILIES.iter().find(|f| f.model_type == model_type)
    }

    pub fn supported_names() -> Vec<&'static str> {
        FAMILIES.iter().map(|f| f.model_type).collect()
    }

    /// With a kept tie at width factor n, the residual stream is tile(h) * s with s =
    /// 1/sqrt(q), and the norms' eps is divided by q. The head is the embedding, so the
    /// embedding must be tile(E)/n for the logits (tile(y) . tile(E)/n = y . E); the stream
    /// starts as embedding x multiplier, and a sqrt(hidden_size) multiplier grows by sqrt(n):
    /// s = 1/n (q = n^2) plainly, s = sqrt(n)/n = 1/sqrt(n) (q = n) for Gemma. q is an
    /// integer so that eps / q and 1/sqrt(q) (= 1/n exactly for a square) round once.
    pub fn tied_eps_divisor(&self, n: usize) -> usize {
        if self.embedding_scaled_by_sqrt_hidden {
            n
        } else {
            n.saturating_mul(n)
        }
    }

    pub fn all_rules(&self) -> impl Iterator<Item = &'static TensorRule> + '_ {
        self.rules.iter().flat_map(|group| group.iter())
    }

    /// Finds the rule a tensor name follows, with its layer (`{L}`) and expert (`{E}`) indices.
    pub fn match_name_at(
        &self,
        name: &str,
    ) -> Option<(&'static TensorRule, Option<usize>, Option<usize>)> {
        self.all_rules()
            .find_map(|r| match_indices(r.pattern, name).map(|(layer, expert)| (r, layer, expert)))
    }

    /// Finds the rule a tensor name follows, and its layer index where the rule has `{L}`.
    pub fn match_name(&self, name: &str) -> Option<(&'static TensorRule, Option<usize>)> {
        self.all_rules()
            .find_map(|r| match_pattern(r.pattern, name).map(|layer| (r, layer)))
    }
}

/// `Some(None)` for an exact match, `Some(Some(i))` when `{L}` matched the integer `i`.
fn match_pattern(pattern: &str, name: &str) -> Option<Option<usize>> {
    match_indices(pattern, name).map(|(layer, _)| layer)
}

/// The layer (`{L}`) and expert (`{E}`) indices a name fills into a pattern, if it follows it.
pub fn match_indices(pattern: &str, name: &str) -> Option<(Option<usize>, Option<usize>)> {
    let index = |digits: &str| -> Option<usize> {
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    };
    let Some((prefix, rest)) = pattern.split_once("{L}") else {
        return (pattern == name).then_some((None, None));
    };
    let tail = name.strip_prefix(prefix)?;
    match rest.split_once("{E}") {
        None => Some((Some(index(tail.strip_suffix(rest)?)?), None)),
        Some((mid, suffix)) => {
            let tail = tail.strip_suffix(suffix)?;
            // The layer index is digits up to `mid`, which starts with a non-digit ('.').
            let end = tail.find(|c: char| !c.is_ascii_digit())?;
            let (l, after) = tail.split_at(end);
            let e = after.strip_prefix(mid)?;
            Some((Some(index(l)?), Some(index(e)?)))
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

/// Expands a pattern for one layer and, in a Mixture-of-Experts layer, one expert.
pub fn tensor_name_at(pattern: &str, layer: Option<usize>, expert: Option<usize>) -> String {
    let name = tensor_name(pattern, layer);
    match expert {
        Some(e) => name.replace("{E}", &e.to_string()),
        None => name,
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
    fn expert_patterns_match_layer_and_expert() {
        let f = Family::lookup("mixtral").unwrap();
        let (r, l, e) = f
            .match_name_at("model.layers.12.block_sparse_moe.experts.7.w2.weight")
            .unwrap();
        assert_eq!((r.axes, l, e), (DOWN, Some(12), Some(7)));
        assert_eq!(
            tensor_name_at(r.pattern, Some(3), Some(7)),
            "model.layers.3.block_sparse_moe.experts.7.w2.weight"
        );
        let (r, l, e) = f
            .match_name_at("model.layers.0.block_sparse_moe.gate.weight")
            .unwrap();
        assert_eq!((r.axes, l, e), (ROUTER, Some(0), None));
        for bad in [
            "model.layers.0.block_sparse_moe.experts.x.w1.weight",
            "model.layers.0.block_sparse_moe.experts..w1.weight",
            "model.layers.0.block_sparse_moe.experts.1.w4.weight",
            "model.layers.a.block_sparse_moe.experts.1.w1.weight",
        ] {
            assert!(f.match_name_at(bad).is_none(), "{bad}");
        }
        // A leading zero parses, so the checkpoint reader compares with the canonical name.
        let (r, l, e) = f
            .match_name_at("model.layers.0.block_sparse_moe.experts.01.w1.weight")
            .unwrap();
        assert_ne!(
            tensor_name_at(r.pattern, l, e),
            "model.layers.0.block_sparse_moe.experts.01.w1.weight"
        );
    }

    #[test]
    fn qwen_moe_patterns_keep_router_experts_and_shared_expert_apart() {
        let f = Family::lookup("qwen2_moe").unwrap();
        let axes = |name: &str| f.match_name_at(name).map(|(r, l, e)| (r.axes, l, e));
        assert_eq!(
            axes("model.layers.1.mlp.gate.weight"),
            Some((ROUTER, Some(1), None))
        );
        assert_eq!(
            axes("model.layers.1.mlp.experts.3.gate_proj.weight"),
            Some((UP, Some(1), Some(3)))
        );
        let (r, _, e) = f
            .match_name_at("model.layers.0.mlp.shared_expert.down_proj.weight")
            .unwrap();
        assert_eq!((r.axes[1], e), (Axis(&[SharedFfn], R), None));
        let (r, _, _) = f
            .match_name_at("model.layers.0.mlp.shared_expert_gate.weight")
            .unwrap();
        assert_eq!(r.axes[0], Axis(&[SharedGate], W));
        // Qwen3-MoE and OLMoE have no shared expert.
        for t in ["qwen3_moe", "olmoe"] {
            let f = Family::lookup(t).unwrap();
            assert!(f
                .match_name("model.layers.0.mlp.shared_expert_gate.weight")
                .is_none());
        }
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
