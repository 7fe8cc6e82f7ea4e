//! config.json: the few fields growth reads, and every other key kept verbatim.
//!
//! Both transformers 4.x (`torch_dtype`, top-level `rope_theta`) and 5.x (`dtype`,
//! `rope_parameters`) styles are accepted; rotary settings are never touched, so either
//! style passes through unchanged.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::family::{Family, MoeKeys, Presence, Space};
use crate::limits::{checked_numel, MAX_LAYERS, MAX_TENSOR_ELEMENTS};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub path: PathBuf,
    /// The whole file, key order preserved, so the grown config differs only where it must.
    pub raw: Map<String, Value>,
    pub family: &'static Family,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub num_hidden_layers: usize,
    pub vocab_size: usize,
    /// Rows of a learned position table (max positions + the family's offset), if any.
    pub positions: usize,
    /// OPT's word_embed_proj_dim (= hidden_size elsewhere).
    pub embed_proj_dim: usize,
    pub tie_word_embeddings: bool,
    /// The dtype config.json declares (`dtype` or `torch_dtype`), if any.
    pub declared_dtype: Option<DType>,
    /// Routed experts per Mixture-of-Experts layer (0 for a dense model).
    pub num_experts: usize,
    /// Experts each token is routed to (0 for a dense model).
    pub experts_per_token: usize,
    /// A shared expert's inner width (Qwen2-MoE; 0 without one).
    pub shared_expert_intermediate_size: usize,
}

impl ModelConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let value = crate::limits::read_json(path)?;
        let Value::Object(raw) = value else {
            return Err(Error::format(path, "not a JSON object"));
        };
        Self::from_map(path, raw)
    }

    /// The one place a config is validated: every size a positive integer (never a float,
    /// string or negative number read as 0), every product of sizes checked, and every
    /// tensor the config implies within [`MAX_TENSOR_ELEMENTS`] elements.
    pub fn from_map(path: &Path, raw: Map<String, Value>) -> Result<Self> {
        let cfg = Self::parse(path, raw)?;
        cfg.validate_sizes()?;
        cfg.validate_layer_types()?;
        Ok(cfg)
    }

    /// `layer_types`, when given, as transformers' `validate_layer_type` demands (every
    /// family's config runs it): a list of one entry per layer. Of the names transformers
    /// knows, only the two our decoders and the grown config can express are accepted, so
    /// depth growth never writes an entry it cannot place (it once wrote `null`s).
    fn validate_layer_types(&self) -> Result<()> {
        const KNOWN: [&str; 2] = ["full_attention", "sliding_attention"];
        let types = match self.raw.get("layer_types") {
            None | Some(Value::Null) => return Ok(()),
            Some(Value::Array(a)) => a,
            Some(v) => {
                return Err(Error::config(
                    &self.path,
                    format!("`layer_types` must be a list with one entry per layer, found {v}"),
                ))
            }
        };
        if types.len() != self.num_hidden_layers {
            return Err(Error::config(
                &self.path,
                format!(
                    "`layer_types` has {} entries but `{}` is {}: transformers requires one per layer",
                    types.len(),
                    self.family.keys.layers,
                    self.num_hidden_layers
                ),
            ));
        }
        if let Some((i, v)) = types
            .iter()
            .enumerate()
            .find(|(_, v)| !v.as_str().is_some_and(|s| KNOWN.contains(&s)))
        {
            return Err(Error::config(
                &self.path,
                format!(
                    "`layer_types[{i}]` is {v}: supported layer types are {}",
                    KNOWN.join(" and ")
                ),
            ));
        }
        Ok(())
    }

    fn parse(path: &Path, raw: Map<String, Value>) -> Result<Self> {
        let err = |m: String| Error::config(path, m);
        let model_type = raw
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                err("has no `model_type`; is this a Hugging Face causal-LM config?".into())
            })?;
        let family = Family::lookup(model_type).ok_or_else(|| {
            err(format!(
                "model_type `{model_type}` is not supported; supported: {}",
                Family::supported_names().join(", ")
            ))
        })?;
        let req = |key: &str| -> Result<usize> {
            match raw.get(key) {
                Some(v) => v
                    .as_u64()
                    .filter(|&x| x > 0 && x <= MAX_TENSOR_ELEMENTS)
                    .map(|x| x as usize)
                    .ok_or_else(|| {
                        err(format!(
                            "`{key}` must be a positive integer of at most {MAX_TENSOR_ELEMENTS}, found {v}"
                        ))
                    }),
                None => Err(err(format!("`{key}` is missing"))),
            }
        };
        let keys = family.keys;
        let hidden_size = req(keys.hidden)?;
        let num_attention_heads = req(keys.heads)?;
        let num_key_value_heads = match keys.kv_heads.and_then(|k| raw.get(k).map(|v| (k, v))) {
            None | Some((_, Value::Null)) => num_attention_heads,
            Some((k, _)) => req(k)?,
        };
        let intermediate_size = match (raw.get(keys.ffn), keys.ffn_default_multiple) {
            (None | Some(Value::Null), Some(m)) => m
                .checked_mul(hidden_size)
                .ok_or_else(|| err(format!("`{}` overflows", keys.hidden)))?,
            _ => req(keys.ffn)?,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(err(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            )));
        }
        let head_dim = match raw.get("head_dim") {
            None | Some(Value::Null) => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(err(format!(
                        "hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads} and no `head_dim` is given"
                    )));
                }
                hidden_size / num_attention_heads
            }
            Some(_) => req("head_dim")?,
        };
        let tie_word_embeddings = match raw.get("tie_word_embeddings") {
            None | Some(Value::Null) => family.tie_default,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(err(format!(
                    "`tie_word_embeddings` must be true or false, found {v}"
                )))
            }
        };
        // The switches that say which tensors exist: a string or a number there was read
        // as "off" and then made the checkpoint's biases "unexpected".
        let switches = family.all_rules().filter_map(|r| match r.presence {
            Presence::IfConfig(k) | Presence::UnlessConfigFalse(k) => Some(k),
            _ => None,
        });
        for key in ["attention_bias", "mlp_bias"].into_iter().chain(switches) {
            if let Some(v) = raw.get(key).filter(|v| !v.is_null() && !v.is_boolean()) {
                return Err(err(format!("`{key}` must be true or false, found {v}")));
            }
        }
        let (num_experts, experts_per_token, shared_expert_intermediate_size) = match family.moe {
            None => (0, 0, 0),
            Some(moe) => {
                let alias = moe.experts_alias.filter(|a| raw.contains_key(*a));
                let (key, e) = match (raw.contains_key(moe.experts), alias) {
                    (false, Some(a)) => (a, req(a)?),
                    (true, Some(a)) if req(a)? != req(moe.experts)? => {
                        return Err(err(format!(
                            "`{}` = {} and `{a}` = {} disagree (transformers reads both as the expert count)",
                            moe.experts,
                            req(moe.experts)?,
                            req(a)?
                        )))
                    }
                    _ => (moe.experts, req(moe.experts)?),
                };
                let k = req(moe.per_token)?;
                if k > e {
                    return Err(err(format!(
                        "`{}` = {k} is more than the `{key}` = {e} experts",
                        moe.per_token
                    )));
                }
                every_layer_sparse(&raw, moe).map_err(err)?;
                (e, k, moe.shared_ffn.map(req).transpose()?.unwrap_or(0))
            }
        };
        let declared_dtype = ["dtype", "torch_dtype"]
            .iter()
            .find_map(|k| raw.get(*k).and_then(Value::as_str))
            .and_then(DType::parse);
        Ok(ModelConfig {
            path: path.to_path_buf(),
            family,
            hidden_size,
            intermediate_size,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            num_hidden_layers: req(keys.layers)?,
            vocab_size: req(keys.vocab)?,
            positions: match keys.positions {
                Some(k) if raw.get(k).is_some_and(|v| !v.is_null()) => req(k)?
                    .checked_add(family.position_offset)
                    .ok_or_else(|| err(format!("`{k}` overflows")))?,
                _ => 0,
            },
            embed_proj_dim: match raw.get("word_embed_proj_dim") {
                None | Some(Value::Null) => hidden_size,
                Some(_) => req("word_embed_proj_dim")?,
            },
            tie_word_embeddings,
            declared_dtype,
            num_experts,
            experts_per_token,
            shared_expert_intermediate_size,
            raw,
        })
    }

    /// Checked products of every size: the layer count is bounded, every index space and
    /// every tensor the family's rules imply must stay within the element bound.
    fn validate_sizes(&self) -> Result<()> {
        let err = |m: String| Error::config(&self.path, m);
        let keys = self.family.keys;
        if self.num_hidden_layers > MAX_LAYERS {
            return Err(err(format!(
                "`{}` = {} is over the {MAX_LAYERS}-layer limit (corrupt config?)",
                keys.layers, self.num_hidden_layers
            )));
        }
        let too_big = |what: String| {
            err(format!(
                "{what} overflows the {MAX_TENSOR_ELEMENTS}-element limit of a tensor (corrupt config?)"
            ))
        };
        let heads = self
            .num_attention_heads
            .checked_mul(self.head_dim)
            .filter(|&x| x as u64 <= MAX_TENSOR_ELEMENTS)
            .ok_or_else(|| {
                too_big(format!(
                    "{} ({}) x head_dim ({})",
                    keys.heads, self.num_attention_heads, self.head_dim
                ))
            })?;
        heads
            .checked_mul(3)
            .filter(|&x| x as u64 <= MAX_TENSOR_ELEMENTS)
            .ok_or_else(|| too_big(format!("3 x {} x head_dim", keys.heads)))?;
        self.num_key_value_heads
            .checked_mul(self.head_dim)
            .filter(|&x| x as u64 <= MAX_TENSOR_ELEMENTS)
            .ok_or_else(|| too_big("num_key_value_heads x head_dim".to_string()))?;
        // Every space is now bounded; axes sum a few of them and shapes multiply two or
        // three, so check each rule's shape with checked arithmetic.
        for rule in self.family.all_rules() {
            let mut dims = Vec::with_capacity(rule.axes.len());
            for a in rule.axes {
                let len =
                    a.0.iter()
                        .try_fold(0usize, |acc, &s| acc.checked_add(self.space_len(s)))
                        .ok_or_else(|| too_big(format!("an axis of `{}`", rule.pattern)))?;
                dims.push(len);
            }
            if checked_numel(&dims).is_none() {
                return Err(too_big(format!(
                    "tensor `{}` of shape {dims:?}",
                    rule.pattern
                )));
            }
        }
        Ok(())
    }

    /// Source size of an index space.
    pub fn space_len(&self, space: Space) -> usize {
        match space {
            Space::Vocab => self.vocab_size,
            Space::Hidden => self.hidden_size,
            Space::Heads => self.num_attention_heads * self.head_dim,
            Space::KvHeads => self.num_key_value_heads * self.head_dim,
            Space::Ffn => self.intermediate_size,
            Space::HeadDim => self.head_dim,
            Space::Positions => self.positions,
            Space::EmbedProj => self.embed_proj_dim,
            Space::QkvPerHead => 3 * self.num_attention_heads * self.head_dim,
            Space::Experts => self.num_experts,
            Space::SharedFfn => self.shared_expert_intermediate_size,
            Space::SharedGate => usize::from(self.shared_expert_intermediate_size > 0),
        }
    }

    /// Source size of a (possibly fused) axis: the sum of its spaces.
    pub fn axis_len(&self, spaces: &[Space]) -> usize {
        spaces.iter().map(|&s| self.space_len(s)).sum()
    }

    /// Every tensor name this config requires, with its rule: required rules (and switched-on
    /// or untied-head ones) expanded over the layers. Used to check a checkpoint and to
    /// build a random one.
    pub fn required_tensors(&self) -> Vec<(String, &'static crate::family::TensorRule)> {
        use crate::family::{tensor_name, tensor_name_at, Presence};
        let mut out = Vec::new();
        for rule in self.family.all_rules() {
            let required = match rule.presence {
                Presence::Required => true,
                Presence::IfConfig(_) | Presence::UnlessConfigFalse(_) => {
                    self.switched_on(rule.presence)
                }
                Presence::UntiedHead => !self.tie_word_embeddings,
                Presence::Dropped | Presence::Optional => false,
            };
            if !required {
                continue;
            }
            if rule.pattern.contains("{E}") {
                for l in 0..self.num_hidden_layers {
                    out.extend(
                        (0..self.num_experts)
                            .map(|e| (tensor_name_at(rule.pattern, Some(l), Some(e)), rule)),
                    );
                }
            } else if rule.pattern.contains("{L}") {
                out.extend(
                    (0..self.num_hidden_layers).map(|l| (tensor_name(rule.pattern, Some(l)), rule)),
                );
            } else {
                out.push((tensor_name(rule.pattern, None), rule));
            }
        }
        out
    }

    /// A boolean switch of config.json (`attention_bias`, `mlp_bias`), false when absent.
    pub fn flag(&self, key: &str) -> bool {
        self.raw.get(key).and_then(Value::as_bool).unwrap_or(false)
    }

    /// Whether a switched tensor ([`Presence::IfConfig`], [`Presence::UnlessConfigFalse`])
    /// exists under this config; true for the unswitched ones.
    pub fn switched_on(&self, presence: crate::family::Presence) -> bool {
        use crate::family::Presence;
        match presence {
            Presence::IfConfig(key) => self.flag(key),
            Presence::UnlessConfigFalse(key) => {
                self.raw.get(key).and_then(Value::as_bool) != Some(false)
            }
            _ => true,
        }
    }

    /// The model's sizes as a JSON object (keys as in config.json), for reports that
    /// describe a model (`inspect --json`, the study's report).
    pub fn sizes_json(&self) -> Map<String, Value> {
        let v = serde_json::json!({
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": self.num_hidden_layers,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
        });
        match v {
            Value::Object(mut m) => {
                if self.num_experts > 0 {
                    m.insert("num_experts".into(), self.num_experts.into());
                    m.insert("num_experts_per_tok".into(), self.experts_per_token.into());
                }
                if self.shared_expert_intermediate_size > 0 {
                    m.insert(
                        "shared_expert_intermediate_size".into(),
                        self.shared_expert_intermediate_size.into(),
                    );
                }
                m
            }
            _ => unreachable!("a json! object literal"),
        }
    }
}

/// Refuses Qwen-MoE configs with dense MLP layers among the sparse ones (`decoder_sparse_step`
/// other than 1, a non-empty `mlp_only_layers`): those layers hold tensors the family's rules
/// do not describe, and the decoder has no dense layer in a Mixture of Experts.
fn every_layer_sparse(raw: &Map<String, Value>, moe: MoeKeys) -> std::result::Result<(), String> {
    if let Some((key, v)) = moe
        .sparse_step
        .and_then(|k| raw.get(k).map(|v| (k, v)))
        .filter(|(_, v)| !v.is_null() && v.as_u64() != Some(1))
    {
        return Err(format!(
            "`{key}` = {v}: only 1 (every layer a Mixture of Experts) is supported; other values make some layers \
             dense MLPs"
        ));
    }
    if let Some((key, v)) = moe
        .dense_layers
        .and_then(|k| raw.get(k).map(|v| (k, v)))
        .filter(|(_, v)| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(format!(
            "`{key}` = {v}: dense MLP layers inside a Mixture-of-Experts model are not supported (only an empty \
             list is)"
        ));
    }
    Ok(())
}

/// Config builders for the crate's unit tests: a config.json given as JSON, read as from disk.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use serde_json::json;

    /// Reads `v` (a JSON object) as config.json.
    pub(crate) fn cfg(v: Value) -> Result<ModelConfig> {
        let Value::Object(m) = v else { unreachable!() };
        ModelConfig::from_map(Path::new("config.json"), m)
    }

    /// A tiny Llama: 4 heads of 8 in 2 kv groups, FFN 48, 2 layers, vocabulary 96.
    pub(crate) fn llama() -> Value {
        json!({"model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
               "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
               "vocab_size": 96, "torch_dtype": "bfloat16", "rope_theta": 10000.0})
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{cfg, llama};
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_4x_and_5x_styles() {
        let c = cfg(llama()).unwrap();
        assert_eq!((c.head_dim, c.num_key_value_heads), (8, 2));
        assert_eq!(c.declared_dtype, Some(DType::BF16));
        assert!(!c.tie_word_embeddings, "llama defaults to an untied head");
        let mut v = llama();
        v.as_object_mut().unwrap().remove("torch_dtype");
        v["dtype"] = json!("float32");
        v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 1e6});
        assert_eq!(cfg(v).unwrap().declared_dtype, Some(DType::F32));
    }

    #[test]
    fn unknown_family_lists_supported() {
        let mut v = llama();
        v["model_type"] = json!("mamba");
        let msg = cfg(v).unwrap_err().to_string();
        assert!(
            msg.contains("mamba") && msg.contains("llama") && msg.contains("qwen3"),
            "{msg}"
        );
    }

    #[test]
    fn rejects_inconsistent_heads() {
        let mut v = llama();
        v["num_key_value_heads"] = json!(3);
        assert!(cfg(v).unwrap_err().to_string().contains("not a multiple"));
        let mut v = llama();
        v["hidden_size"] = json!(30);
        assert!(cfg(v).unwrap_err().to_string().contains("head_dim"));
    }

    fn qwen2_moe() -> Value {
        json!({"model_type": "qwen2_moe", "hidden_size": 32, "intermediate_size": 48,
               "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24,
               "num_experts": 4, "num_experts_per_tok": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 96})
    }

    #[test]
    fn qwen_moe_sizes_and_refusals() {
        let c = cfg(qwen2_moe()).unwrap();
        // The experts' width is moe_intermediate_size; intermediate_size (dense layers) is not read.
        assert_eq!(c.intermediate_size, 16);
        assert_eq!((c.num_experts, c.experts_per_token), (4, 2));
        assert_eq!(c.space_len(Space::SharedFfn), 24);
        assert_eq!(c.space_len(Space::SharedGate), 1);
        // qkv_bias defaults to true: the biases are expected unless it is false.
        let biases = |c: &ModelConfig| {
            c.required_tensors()
                .iter()
                .filter(|(n, _)| n.ends_with("q_proj.bias"))
                .count()
        };
        assert_eq!(biases(&c), 2);
        let mut v = qwen2_moe();
        v["qkv_bias"] = json!(false);
        assert_eq!(biases(&cfg(v).unwrap()), 0);
        for (key, value, expect) in [
            ("decoder_sparse_step", json!(2), "decoder_sparse_step"),
            ("mlp_only_layers", json!([1]), "mlp_only_layers"),
            ("qkv_bias", json!("yes"), "qkv_bias"),
            (
                "shared_expert_intermediate_size",
                json!(0),
                "shared_expert_intermediate_size",
            ),
        ] {
            let mut v = qwen2_moe();
            v[key] = value;
            let msg = cfg(v).unwrap_err().to_string();
            assert!(msg.contains(expect), "{key}: {msg}");
        }
        for (key, value) in [
            ("decoder_sparse_step", json!(1)),
            ("mlp_only_layers", json!([])),
        ] {
            let mut v = qwen2_moe();
            v[key] = value;
            assert!(cfg(v).is_ok(), "{key}");
        }
        // Qwen3-MoE saves num_local_experts; released configs say num_experts.
        let mut v = qwen2_moe();
        v["model_type"] = json!("qwen3_moe");
        assert_eq!(cfg(v.clone()).unwrap().num_experts, 4);
        v.as_object_mut().unwrap().remove("num_experts");
        v["num_local_experts"] = json!(6);
        let c = cfg(v.clone()).unwrap();
        assert_eq!((c.num_experts, c.space_len(Space::SharedFfn)), (6, 0));
        v["num_experts"] = json!(8);
        assert!(cfg(v).unwrap_err().to_string().contains("disagree"));
    }
}
