//! Upcycling: a dense source grown into its Mixture-of-Experts sibling (sparse upcycling,
//! Komatsuzaki et al. 2022), in the same clone as any width, FFN or depth growth.
//!
//! Every expert of every MoE layer is the (grown) dense MLP, and the router is zero: its
//! softmax is uniform, the top-k weights renormalised over k identical experts sum to 1,
//! so the block computes the dense MLP exactly. The renormalised weights are 1/k, which
//! transformers' routers compute in float32: exact to the bit only when k is a power of two,
//! so that is what an exact upcycle requires.
//!
//! Symmetry breaking, the point of upcycling, is optional and labelled not
//! function-preserving: `expert_init: drop` (Drop-Upcycling, Nakamura et al., ICLR 2025)
//! re-draws a seeded random fraction of each expert's intermediate neurons from the dense
//! weights' statistics, and `router_init: normal` draws the router from N(0,
//! initializer_range^2), seeded (with copied experts its unequal weights still sum to 1, but
//! only to float32 rounding, ~1e-7; it matters with dropped experts and in training).
//!
//! Targets are table entries ([`TARGETS`]): a dense family, its MoE sibling, where the dense
//! MLP's tensors go, and the config keys the sibling needs to compute the same function.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::family::{Family, MoeKeys};
use crate::rng::{mix64, normal, uniform};
use serde_json::{json, Map, Value};

/// Most experts a layer may have (a bound on untrusted sizes; the largest MoE models have a
/// few hundred).
pub const MAX_EXPERTS: usize = 4096;

/// Most experts over all layers (experts x layers): each is three planned tensors with their
/// header entries, so this bounds the plan's memory (DeepSeek-V3: 256 x 61 = 15,616).
pub const MAX_EXPERTS_IN_MODEL: usize = 1 << 16;

/// A dense family's exact Mixture-of-Experts sibling.
#[derive(Debug)]
pub struct UpcycleTarget {
    /// The dense source's model_type.
    pub source: &'static str,
    /// The MoE family written (a [`Family`] with `moe` keys).
    pub target: &'static str,
    pub architecture: &'static str,
    /// Dense MLP tensor -> the same tensor in expert `{E}`.
    pub experts: &'static [(&'static str, &'static str)],
    /// The router (one row per expert, reading the hidden axis); written zero or drawn.
    pub router: &'static str,
    /// Config keys the dense family has and the sibling does not, each with the only
    /// value(s) it can carry over as (absent is fine too) and why another is refused.
    pub dense_only: &'static [DenseOnly],
    /// Function-relevant keys whose default differs between the two families (or that the
    /// sibling needs stated): written with the dense family's default when the source omits
    /// them. `rope_theta` is handled separately (it may live in `rope_parameters`).
    pub dense_defaults: &'static [(&'static str, DefaultValue)],
    /// rope_theta the dense family assumes when config.json has none.
    pub dense_rope_theta: f64,
    /// Keys the sibling must have for the upcycle to be exact, with their values.
    pub fixed: &'static [(&'static str, DefaultValue)],
    /// The sibling's key for the experts' inner width, when it is not the dense FFN key.
    pub expert_ffn_key: Option<&'static str>,
    /// A shared expert (Qwen2-MoE): dense MLP tensor -> shared expert tensor and how it
    /// starts. Its output is zero (down_proj zero), so the routed experts carry the function.
    pub shared: &'static [(&'static str, &'static str, SharedInit)],
    /// The shared expert's gate ([1, hidden], written zero: sigmoid(0) = 1/2 times zero).
    pub shared_gate: Option<&'static str>,
    /// The config key of the shared expert's inner width (the grown dense FFN width).
    pub shared_ffn_key: Option<&'static str>,
}

/// A config key of the dense family that the sibling lacks: dropped from the MoE config
/// when `accepts` its value (off, or a value the dense model does not read), refused with
/// `why` otherwise.
#[derive(Debug)]
pub struct DenseOnly {
    pub key: &'static str,
    pub accepts: fn(&Value) -> bool,
    pub why: &'static str,
}

fn is_false(v: &Value) -> bool {
    v.is_null() || *v == Value::Bool(false)
}
fn any_value(_: &Value) -> bool {
    true
}
fn all_full_attention(v: &Value) -> bool {
    v.is_null()
        || v.as_array()
            .is_some_and(|a| a.iter().all(|t| t == "full_attention"))
}

/// What a shared expert (always run, no routing) starts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedInit {
    /// A copy of the grown dense tensor (gate and up: a trained start).
    Copy,
    /// Zero (down: the shared expert adds nothing, so the function is kept).
    Zero,
}

/// A constant JSON value (statics cannot hold `serde_json::Value`).
#[derive(Debug, Clone, Copy)]
pub enum DefaultValue {
    Bool(bool),
    Num(f64),
    Int(u64),
    Str(&'static str),
    Null,
    EmptyList,
}

impl DefaultValue {
    pub fn json(self) -> Value {
        match self {
            DefaultValue::Bool(b) => Value::Bool(b),
            DefaultValue::Num(x) => json!(x),
            DefaultValue::Int(i) => json!(i),
            DefaultValue::Str(s) => json!(s),
            DefaultValue::Null => Value::Null,
            DefaultValue::EmptyList => json!([]),
        }
    }
}

/// The dense MLP's tensors that every sibling's experts copy (Llama's names, which Mistral and
/// the Qwens share).
const DENSE_GATE: &str = "model.layers.{L}.mlp.gate_proj.weight";
const DENSE_UP: &str = "model.layers.{L}.mlp.up_proj.weight";
const DENSE_DOWN: &str = "model.layers.{L}.mlp.down_proj.weight";

const LLAMA_MLP_TO_MIXTRAL: &[(&str, &str)] = &[
    (
        DENSE_GATE,
        "model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight",
    ),
    (
        DENSE_UP,
        "model.layers.{L}.block_sparse_moe.experts.{E}.w3.weight",
    ),
    (
        DENSE_DOWN,
        "model.layers.{L}.block_sparse_moe.experts.{E}.w2.weight",
    ),
];
const MIXTRAL_ROUTER: &str = "model.layers.{L}.block_sparse_moe.gate.weight";
/// Mixtral's router noise is applied only in training; stated 0 so a fine-tune of the
/// upcycled model starts from the same function unless the user turns it on.
const MIXTRAL_FIXED: &[(&str, DefaultValue)] = &[
    ("router_jitter_noise", DefaultValue::Num(0.0)),
    ("output_router_logits", DefaultValue::Bool(false)),
];

const QWEN_MLP_TO_EXPERTS: &[(&str, &str)] = &[
    (
        DENSE_GATE,
        "model.layers.{L}.mlp.experts.{E}.gate_proj.weight",
    ),
    (DENSE_UP, "model.layers.{L}.mlp.experts.{E}.up_proj.weight"),
    (
        DENSE_DOWN,
        "model.layers.{L}.mlp.experts.{E}.down_proj.weight",
    ),
];
const QWEN_ROUTER: &str = "model.layers.{L}.mlp.gate.weight";
/// Qwen-MoE renormalises the top-k weights only with `norm_topk_prob` (default false: the k
/// weights 1/E would sum to k/E); every layer sparse.
const QWEN_MOE_FIXED: &[(&str, DefaultValue)] = &[
    ("norm_topk_prob", DefaultValue::Bool(true)),
    ("decoder_sparse_step", DefaultValue::Int(1)),
    ("mlp_only_layers", DefaultValue::EmptyList),
    ("output_router_logits", DefaultValue::Bool(false)),
];
/// Qwen2's q/k/v biases are always there; Qwen2-MoE's behind `qkv_bias` (default true).
const QWEN2_MOE_FIXED: &[(&str, DefaultValue)] = &[
    ("norm_topk_prob", DefaultValue::Bool(true)),
    ("decoder_sparse_step", DefaultValue::Int(1)),
    ("mlp_only_layers", DefaultValue::EmptyList),
    ("output_router_logits", DefaultValue::Bool(false)),
    ("qkv_bias", DefaultValue::Bool(true)),
];

/// Llama -> Mixtral; Mistral's record differs only in the keys it refuses and states.
const LLAMA_TO_MIXTRAL: UpcycleTarget = UpcycleTarget {
    source: "llama",
    target: "mixtral",
    architecture: "MixtralForCausalLM",
    experts: LLAMA_MLP_TO_MIXTRAL,
    router: MIXTRAL_ROUTER,
    dense_only: &[
        DenseOnly {
            key: "attention_bias",
            accepts: is_false,
            why: "Mixtral's attention projections have no biases",
        },
        DenseOnly {
            key: "mlp_bias",
            accepts: is_false,
            why: "Mixtral's experts have no biases",
        },
        // transformers 5 no longer reads it: the dense model is the same whatever it says.
        DenseOnly {
            key: "pretraining_tp",
            accepts: any_value,
            why: "",
        },
    ],
    dense_defaults: &[
        ("rms_norm_eps", DefaultValue::Num(1e-6)),
        ("hidden_act", DefaultValue::Str("silu")),
        ("sliding_window", DefaultValue::Null),
        ("tie_word_embeddings", DefaultValue::Bool(false)),
    ],
    dense_rope_theta: 10_000.0,
    fixed: MIXTRAL_FIXED,
    expert_ffn_key: None,
    shared: &[],
    shared_gate: None,
    shared_ffn_key: None,
};

/// Qwen3 -> Qwen3-MoE; Qwen2 -> Qwen2-MoE differs in the keys it refuses, the fixed
/// switches and the shared expert.
const QWEN3_TO_QWEN3_MOE: UpcycleTarget = UpcycleTarget {
    source: "qwen3",
    target: "qwen3_moe",
    architecture: "Qwen3MoeForCausalLM",
    experts: QWEN_MLP_TO_EXPERTS,
    router: QWEN_ROUTER,
    dense_only: &[
        DenseOnly {
            key: "use_sliding_window",
            accepts: is_false,
            why: "Qwen3-MoE has no `layer_types` or `max_window_layers`, so it would slide on other layers than \
                  the dense model",
        },
        DenseOnly {
            key: "layer_types",
            accepts: all_full_attention,
            why: "Qwen3-MoE has no per-layer attention types",
        },
        // Read only with use_sliding_window (refused above).
        DenseOnly {
            key: "max_window_layers",
            accepts: any_value,
            why: "",
        },
    ],
    dense_defaults: &[
        ("rms_norm_eps", DefaultValue::Num(1e-6)),
        ("hidden_act", DefaultValue::Str("silu")),
        ("tie_word_embeddings", DefaultValue::Bool(false)),
    ],
    dense_rope_theta: 10_000.0,
    fixed: QWEN_MOE_FIXED,
    expert_ffn_key: Some("moe_intermediate_size"),
    shared: &[],
    shared_gate: None,
    shared_ffn_key: None,
};

/// Every dense family with an exact MoE sibling.
pub static TARGETS: &[UpcycleTarget] = &[
    LLAMA_TO_MIXTRAL,
    UpcycleTarget {
        source: "mistral",
        dense_only: &[],
        dense_defaults: &[
            ("rms_norm_eps", DefaultValue::Num(1e-6)),
            ("hidden_act", DefaultValue::Str("silu")),
            ("sliding_window", DefaultValue::Int(4096)),
            ("tie_word_embeddings", DefaultValue::Bool(false)),
        ],
        ..LLAMA_TO_MIXTRAL
    },
    QWEN3_TO_QWEN3_MOE,
    UpcycleTarget {
        source: "qwen2",
        target: "qwen2_moe",
        architecture: "Qwen2MoeForCausalLM",
        // Qwen2-MoE has every Qwen2 key (sliding window, max_window_layers, layer_types).
        dense_only: &[],
        fixed: QWEN2_MOE_FIXED,
        shared: &[
            (
                DENSE_GATE,
                "model.layers.{L}.mlp.shared_expert.gate_proj.weight",
                SharedInit::Copy,
            ),
            (
                DENSE_UP,
                "model.layers.{L}.mlp.shared_expert.up_proj.weight",
                SharedInit::Copy,
            ),
            (
                DENSE_DOWN,
                "model.layers.{L}.mlp.shared_expert.down_proj.weight",
                SharedInit::Zero,
            ),
        ],
        shared_gate: Some("model.layers.{L}.mlp.shared_expert_gate.weight"),
        shared_ffn_key: Some("shared_expert_intermediate_size"),
        ..QWEN3_TO_QWEN3_MOE
    },
];

impl UpcycleTarget {
    /// The sibling of a dense family, or why there is none.
    pub fn of(cfg: &ModelConfig) -> Result<&'static UpcycleTarget> {
        let model_type = cfg.family.model_type;
        if let Some(t) = TARGETS.iter().find(|t| t.source == model_type) {
            return Ok(t);
        }
        let why = if cfg.family.moe.is_some() {
            "it is already a Mixture of Experts (its experts grow like any MLP: clone without `experts`)".to_string()
        } else {
            let sources: Vec<String> = TARGETS
                .iter()
                .map(|t| format!("{} -> {}", t.source, t.target))
                .collect();
            format!(
                "it has no Mixture-of-Experts sibling in transformers that computes its block exactly (upcycling \
                 needs one with the same attention, norms and expert MLP; supported: {})",
                sources.join(", ")
            )
        };
        Err(Error::Options(format!(
            "experts: cannot upcycle {model_type}: {why}"
        )))
    }

    pub fn family(&self) -> &'static Family {
        Family::lookup(self.target).expect("every upcycle target is a family")
    }

    pub fn moe_keys(&self) -> MoeKeys {
        self.family()
            .moe
            .expect("an upcycle target is a MoE family")
    }

    /// The expert pattern a dense tensor pattern becomes, if it is part of the MLP.
    pub fn expert_pattern(&self, dense: &str) -> Option<&'static str> {
        self.experts
            .iter()
            .find(|(d, _)| *d == dense)
            .map(|(_, e)| *e)
    }

    /// Refuses a dense config that uses a switch the sibling cannot express.
    fn check_config(&self, cfg: &ModelConfig) -> Result<()> {
        for d in self.dense_only {
            match cfg.raw.get(d.key) {
                Some(v) if !(d.accepts)(v) => {
                    return Err(Error::Options(format!(
                        "experts: cannot upcycle this {} into {}: `{}` is {v}, and {}",
                        self.source, self.target, d.key, d.why
                    )))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The MoE sibling's config.json from the grown dense one: model_type and architecture
    /// changed, expert count and top-k added, dense-only keys dropped, every key whose
    /// default differs stated with the dense value. Returns (key, before, after) of each
    /// change, in order.
    pub fn moe_config(
        &self,
        out: &mut Map<String, Value>,
        upcycle: &Upcycle,
        expert_ffn: usize,
    ) -> Vec<(String, Value, Value)> {
        let mut changes = Vec::new();
        let mut set = |out: &mut Map<String, Value>, key: &str, value: Option<Value>| {
            let before = out.get(key).cloned().unwrap_or(Value::Null);
            let after = value.clone().unwrap_or(Value::Null);
            if before != after || (value.is_none() && out.contains_key(key)) {
                changes.push((key.to_string(), before, after));
            }
            match value {
                Some(v) => out.insert(key.to_string(), v),
                None => out.remove(key),
            };
        };
        set(out, "model_type", Some(json!(self.target)));
        set(out, "architectures", Some(json!([self.architecture])));
        for d in self.dense_only {
            set(out, d.key, None);
        }
        for (key, default) in self.dense_defaults {
            if !out.contains_key(*key) {
                set(out, key, Some(default.json()));
            }
        }
        // The theta: in `rope_parameters` (transformers 5), flat (4.x), or the default.
        let in_params = out
            .get("rope_parameters")
            .and_then(Value::as_object)
            .is_some_and(|p| p.contains_key("rope_theta"));
        if !in_params && !out.contains_key("rope_theta") {
            match out.get("rope_parameters").and_then(Value::as_object) {
                Some(p) => {
                    let mut p = p.clone();
                    p.insert("rope_theta".into(), json!(self.dense_rope_theta));
                    set(out, "rope_parameters", Some(Value::Object(p)));
                }
                None => set(out, "rope_theta", Some(json!(self.dense_rope_theta))),
            }
        }
        let keys = self.moe_keys();
        set(out, keys.experts, Some(json!(upcycle.experts)));
        set(out, keys.per_token, Some(json!(upcycle.per_token)));
        for k in [self.expert_ffn_key, self.shared_ffn_key]
            .into_iter()
            .flatten()
        {
            set(out, k, Some(json!(expert_ffn)));
        }
        for (key, value) in self.fixed {
            set(out, key, Some(value.json()));
        }
        changes
    }
}

/// How each expert starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExpertInit {
    /// A copy of the dense MLP (exact).
    Copy,
    /// Drop-Upcycling: a seeded fraction `ratio` of each expert's intermediate neurons
    /// re-drawn from N(mean, std^2) of the grown dense weight (not exact).
    Drop { ratio: f64 },
}

/// How the router starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterInit {
    /// Zero: uniform routing, exact with copies.
    Zero,
    /// Seeded N(0, initializer_range^2): experts are picked unevenly (not exact).
    Normal,
}

impl ExpertInit {
    pub fn name(self) -> &'static str {
        match self {
            ExpertInit::Copy => "copy",
            ExpertInit::Drop { .. } => "drop",
        }
    }
}

impl RouterInit {
    pub fn name(self) -> &'static str {
        match self {
            RouterInit::Zero => "zero",
            RouterInit::Normal => "normal",
        }
    }
    pub fn parse(s: &str) -> Option<RouterInit> {
        [RouterInit::Zero, RouterInit::Normal]
            .into_iter()
            .find(|r| r.name() == s)
    }
}

/// The upcycling part of the resolved options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpcycleOptions {
    pub experts: usize,
    pub per_token: usize,
    pub expert_init: ExpertInit,
    pub router_init: RouterInit,
}

/// A planned upcycle: the target and the options, checked against the source.
#[derive(Debug, Clone, PartialEq)]
pub struct Upcycle {
    pub target: &'static str,
    pub experts: usize,
    pub per_token: usize,
    pub expert_init: ExpertInit,
    pub router_init: RouterInit,
    /// The router's std when drawn (the config's `initializer_range`, default 0.02).
    pub router_std: f64,
}

impl Upcycle {
    pub fn new(cfg: &ModelConfig, o: &UpcycleOptions) -> Result<Upcycle> {
        let opt = |m: String| Err(Error::Options(m));
        let target = UpcycleTarget::of(cfg)?;
        target.check_config(cfg)?;
        let (e, k) = (o.experts, o.per_token);
        if e == 0 || e > MAX_EXPERTS {
            return opt(format!(
                "experts {e}: give between 1 and {MAX_EXPERTS} experts"
            ));
        }
        if k == 0 || k > e {
            return opt(format!(
                "experts_per_token {k}: each token is routed to between 1 and experts ({e}) experts"
            ));
        }
        if o.router_init == RouterInit::Zero && !k.is_power_of_two() {
            return opt(format!(
                "experts_per_token {k}: with a zero router each of the {k} experts gets weight 1/{k}, which \
                 transformers' router computes in float32, so the weights sum to 1 exactly only when \
                 experts_per_token is a power of two (1, 2, 4, 8, ...); pick one, or router_init normal (not exact)"
            ));
        }
        if let ExpertInit::Drop { ratio } = o.expert_init {
            if !(ratio > 0.0 && ratio <= 1.0) {
                return opt(format!(
                    "drop_ratio {ratio}: the fraction of each expert's neurons re-drawn must be in (0, 1]"
                ));
            }
            if o.router_init == RouterInit::Zero && k < e {
                return opt(
                    "expert_init drop with router_init zero: a zero router ties every expert, so which experts run \
                     would be the framework's tie-breaking, not a learned choice; use router_init normal"
                        .into(),
                );
            }
        }
        let router_std = match cfg.raw.get("initializer_range") {
            None | Some(Value::Null) => 0.02,
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x >= 0.0 => x,
                _ => {
                    return opt(format!(
                        "router_init normal: `initializer_range` must be a non-negative number, found {v}"
                    ))
                }
            },
        };
        Ok(Upcycle {
            target: target.target,
            experts: e,
            per_token: k,
            expert_init: o.expert_init,
            router_init: o.router_init,
            router_std,
        })
    }

    pub fn target(&self) -> &'static UpcycleTarget {
        TARGETS
            .iter()
            .find(|t| t.target == self.target)
            .expect("planned from the table")
    }

    /// Why the upcycled model does not compute the dense model's function, if it does not.
    pub fn not_exact_because(&self) -> Option<String> {
        let mut why = Vec::new();
        if let ExpertInit::Drop { ratio } = self.expert_init {
            why.push(format!(
                "expert_init drop re-drew {ratio} of each expert's neurons (Drop-Upcycling)"
            ));
        }
        if self.router_init == RouterInit::Normal {
            // With copied experts the weights still sum to 1, but unequal weights are
            // renormalised in float32 by transformers' router: kept to ~1e-7, not exactly.
            why.push(
                "router_init normal weights the experts unequally (renormalised in float32, so even copied \
                 experts sum to the dense output only to ~1e-7)"
                    .to_string(),
            );
        }
        (!why.is_empty()).then(|| why.join("; "))
    }

    /// The upcycle as recorded in the growth map (`plan --json`, recipes, verify).
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "target": self.target,
            "experts": self.experts,
            "experts_per_token": self.per_token,
            "expert_init": self.expert_init.name(),
            "router_init": self.router_init.name(),
            "exact": self.not_exact_because().is_none(),
        });
        if let ExpertInit::Drop { ratio } = self.expert_init {
            v["drop_ratio"] = json!(ratio);
        }
        if let Some(why) = self.not_exact_because() {
            v["not_exact_because"] = json!(why);
        }
        v
    }
}

/// How a destination tensor's values are made.
#[derive(Debug, Clone, PartialEq)]
pub enum Fill {
    /// The source tensor, grown by the kernel.
    Grown,
    /// The grown source with some FFN units re-drawn (Drop-Upcycling).
    Dropped(DropSpec),
    /// Not read from the source: all zeros (an exact router).
    Zeros,
    /// Not read from the source: N(0, std^2) drawn at (key, flat index) (a drawn router).
    Normal { std: f64, key: u64 },
}

/// Which FFN units of one expert are re-drawn, and from what.
#[derive(Debug, Clone, PartialEq)]
pub struct DropSpec {
    /// The units' key: the same for an expert's gate, up and down (a neuron is dropped
    /// whole), different for every expert and layer.
    pub units_key: u64,
    pub ratio: f64,
    /// The tensor axis along the FFN units (0: rows of gate/up, 1: columns of down).
    pub ffn_axis: usize,
    /// The draws' key (the tensor's own).
    pub values_key: u64,
}

/// The key of expert `e`'s dropped units in destination layer `layer`.
pub fn units_key(seed: u64, layer: usize, expert: usize) -> u64 {
    mix64(mix64(seed ^ 0xd809_d1ca_7e5e_ed01) ^ mix64((layer as u64) << 32 | expert as u64))
}

/// Which of `len` units are re-drawn: exactly round(ratio * len) of them, the ones with the
/// smallest uniform draws at (key, unit) (ties broken by index), so the set is the same for
/// every tensor that shares the key.
pub fn dropped_units(key: u64, len: usize, ratio: f64) -> Vec<bool> {
    let count = ((ratio * len as f64).round() as usize).min(len);
    let mut order: Vec<(f64, usize)> = (0..len).map(|u| (uniform(key, u as u64), u)).collect();
    order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut dropped = vec![false; len];
    for &(_, u) in &order[..count] {
        dropped[u] = true;
    }
    dropped
}

/// One drawn value of a re-drawn unit or a drawn router: N(mean, std^2) at (key, index).
pub fn drawn(key: u64, index: u64, mean: f64, std: f64) -> f64 {
    mean + std * normal(key, index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{cfg, llama};

    fn opts(e: usize, k: usize) -> UpcycleOptions {
        UpcycleOptions {
            experts: e,
            per_token: k,
            expert_init: ExpertInit::Copy,
            router_init: RouterInit::Zero,
        }
    }

    #[test]
    fn targets_are_families_and_map_the_whole_mlp() {
        for t in TARGETS {
            let src = Family::lookup(t.source).unwrap();
            let dst = t.family();
            assert!(src.moe.is_none() && dst.moe.is_some(), "{}", t.source);
            for (dense, expert) in t.experts {
                let d = src.all_rules().find(|r| r.pattern == *dense).unwrap();
                let e = dst.all_rules().find(|r| r.pattern == *expert).unwrap();
                assert_eq!(d.axes, e.axes, "{dense} -> {expert}");
            }
            assert!(dst.all_rules().any(|r| r.pattern == t.router));
            // A shared expert has the MLP's layout on its own width.
            for (dense, shared, _) in t.shared {
                let d = src.all_rules().find(|r| r.pattern == *dense).unwrap();
                let e = dst.all_rules().find(|r| r.pattern == *shared).unwrap();
                let on_shared = |a: &crate::family::Axis| {
                    a.0.iter()
                        .map(|&s| {
                            if s == crate::family::Space::Ffn {
                                crate::family::Space::SharedFfn
                            } else {
                                s
                            }
                        })
                        .collect::<Vec<_>>()
                };
                assert_eq!(
                    d.axes.iter().map(on_shared).collect::<Vec<_>>(),
                    e.axes.iter().map(|a| a.0.to_vec()).collect::<Vec<_>>(),
                    "{dense} -> {shared}"
                );
            }
            if let Some(g) = t.shared_gate {
                assert!(dst.all_rules().any(|r| r.pattern == g));
            }
            // Every rule of the sibling is written: the dense family's other tensors, the
            // experts, the router and the shared expert.
            for r in dst.all_rules() {
                let from_dense = src.all_rules().any(|d| d.pattern == r.pattern);
                let upcycled = t.experts.iter().any(|e| e.1 == r.pattern)
                    || t.shared.iter().any(|e| e.1 == r.pattern)
                    || r.pattern == t.router
                    || Some(r.pattern) == t.shared_gate;
                assert!(
                    from_dense || upcycled,
                    "{} -> {}: nothing writes {}",
                    t.source,
                    t.target,
                    r.pattern
                );
            }
        }
    }

    #[test]
    fn qwen3_layouts_the_sibling_cannot_express_are_refused() {
        let mut v = llama();
        v["model_type"] = json!("qwen3");
        v["head_dim"] = json!(8);
        assert!(Upcycle::new(&cfg(v.clone()).unwrap(), &opts(4, 2)).is_ok());
        v["layer_types"] = json!(["full_attention", "full_attention"]);
        assert!(Upcycle::new(&cfg(v.clone()).unwrap(), &opts(4, 2)).is_ok());
        v["layer_types"] = json!(["sliding_attention", "full_attention"]);
        let err = Upcycle::new(&cfg(v.clone()).unwrap(), &opts(4, 2))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`layer_types`") && err.contains("qwen3_moe"),
            "{err}"
        );
        v["layer_types"] = json!(null);
        v["use_sliding_window"] = json!(true);
        let err = Upcycle::new(&cfg(v).unwrap(), &opts(4, 2))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`use_sliding_window` is true"), "{err}");
    }

    #[test]
    fn exact_options_and_refusals() {
        let c = cfg(llama()).unwrap();
        let u = Upcycle::new(&c, &opts(4, 2)).unwrap();
        assert!(u.not_exact_because().is_none());
        assert_eq!(u.to_json()["exact"], true);
        for (e, k, want) in [
            (0, 1, "experts 0"),
            (4, 5, "experts_per_token 5"),
            (4, 0, "experts_per_token 0"),
            (6, 3, "power of two"),
        ] {
            let err = Upcycle::new(&c, &opts(e, k)).unwrap_err().to_string();
            assert!(err.contains(want), "{e} {k}: {err}");
        }
        // A drawn router makes any top-k legal, and says why the clone is not exact.
        let u = Upcycle::new(
            &c,
            &UpcycleOptions {
                router_init: RouterInit::Normal,
                ..opts(6, 3)
            },
        )
        .unwrap();
        assert!(u
            .not_exact_because()
            .unwrap()
            .contains("router_init normal"));
        let drop = UpcycleOptions {
            expert_init: ExpertInit::Drop { ratio: 0.5 },
            ..opts(4, 2)
        };
        let err = Upcycle::new(&c, &drop).unwrap_err().to_string();
        assert!(err.contains("tie"), "{err}");
        for ratio in [0.0, 1.5, f64::NAN] {
            let o = UpcycleOptions {
                expert_init: ExpertInit::Drop { ratio },
                router_init: RouterInit::Normal,
                ..opts(4, 2)
            };
            let err = Upcycle::new(&c, &o).unwrap_err().to_string();
            assert!(err.starts_with("drop_ratio"), "{err}");
        }
    }

    #[test]
    fn dense_switches_and_families_without_a_sibling_are_refused() {
        let mut v = llama();
        v["mlp_bias"] = json!(true);
        let err = Upcycle::new(&cfg(v).unwrap(), &opts(4, 2))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`mlp_bias`") && err.contains("no biases"),
            "{err}"
        );
        let mut v = llama();
        v["attention_bias"] = json!(false);
        v["pretraining_tp"] = json!(2);
        assert!(Upcycle::new(&cfg(v).unwrap(), &opts(4, 2)).is_ok());
        let mut v = llama();
        v["model_type"] = json!("gemma");
        let err = Upcycle::new(&cfg(v).unwrap(), &opts(4, 2))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot upcycle gemma") && err.contains("llama -> mixtral"),
            "{err}"
        );
    }

    #[test]
    fn the_config_states_the_dense_defaults() {
        // A source that leaves rope_theta to Llama's default (10000).
        let mut v = llama();
        v.as_object_mut().unwrap().remove("rope_theta");
        let c = cfg(v).unwrap();
        let u = Upcycle::new(&c, &opts(8, 2)).unwrap();
        let mut out = c.raw.clone();
        out.insert("mlp_bias".into(), json!(false));
        let changes = u.target().moe_config(&mut out, &u, 48);
        assert_eq!(out["model_type"], "mixtral");
        assert_eq!(out["architectures"], json!(["MixtralForCausalLM"]));
        assert_eq!(
            (
                out["num_local_experts"].clone(),
                out["num_experts_per_tok"].clone()
            ),
            (json!(8), json!(2))
        );
        // Mixtral's defaults differ: 1e-5 and theta 1e6.
        assert_eq!(out["rms_norm_eps"], json!(1e-6));
        assert_eq!(out["rope_theta"], json!(10_000.0));
        assert!(!out.contains_key("mlp_bias"));
        assert!(changes.iter().any(|(k, _, _)| k == "mlp_bias"));
        // A theta inside rope_parameters is kept; a rope_parameters without one gets it.
        let mut out = c.raw.clone();
        out.insert(
            "rope_parameters".into(),
            json!({"rope_type": "default", "rope_theta": 5e5}),
        );
        u.target().moe_config(&mut out, &u, 48);
        assert_eq!(out["rope_parameters"]["rope_theta"], json!(5e5));
        assert!(!out.contains_key("rope_theta"));
        let mut out = c.raw.clone();
        out.insert("rope_parameters".into(), json!({"rope_type": "default"}));
        u.target().moe_config(&mut out, &u, 48);
        assert_eq!(out["rope_parameters"]["rope_theta"], json!(10_000.0));
    }

    #[test]
    fn dropped_units_are_an_exact_seeded_fraction() {
        let a = dropped_units(units_key(0, 1, 2), 100, 0.5);
        assert_eq!(a.iter().filter(|&&d| d).count(), 50);
        assert_eq!(a, dropped_units(units_key(0, 1, 2), 100, 0.5));
        assert_ne!(a, dropped_units(units_key(0, 1, 3), 100, 0.5));
        assert_ne!(a, dropped_units(units_key(1, 1, 2), 100, 0.5));
        assert!(dropped_units(7, 10, 1.0).iter().all(|&d| d));
        assert_eq!(dropped_units(7, 3, 0.1).iter().filter(|&&d| d).count(), 0);
    }
}
