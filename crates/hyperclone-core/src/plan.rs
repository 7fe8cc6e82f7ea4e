//! The growth plan: every destination tensor, shard and header, computed from the source
//! headers and config.json alone, before any weight is read.

use crate::checkpoint::{Checkpoint, SINGLE_FILE};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::family::Role;
use crate::family::{tensor_name_at, Component, Space, TensorRule};
use crate::growth_map::{GrowthMap, GROWTH_MAP_KEY};
use crate::kernel::{name_key, AxisGrowth, Segment};
use crate::options::GrowthOptions;
use crate::safetensors::{encode_header, HeaderEntry};
use crate::upcycle::{units_key, DropSpec, ExpertInit, Fill, RouterInit, SharedInit, Upcycle};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Bytes of destination data produced per write (one buffer; rows are never split).
pub const WRITE_CHUNK_BYTES: usize = 8 << 20;

#[derive(Debug, Clone)]
pub struct DestTensor {
    pub name: String,
    /// Index into `Checkpoint::tensors`.
    pub source: usize,
    pub dtype: DType,
    pub axes: Vec<AxisGrowth>,
    pub shape: Vec<usize>,
    pub component: Component,
    pub noise_key: u64,
    /// A constant factor on the whole tensor (1 except Gemma-style scaled embeddings).
    pub scale: f64,
    /// A constant added after the scale (0 except a kept tie's Gemma-2 post-norm gains).
    pub shift: f64,
    /// How the values are made: grown from the source, or (upcycling) partly re-drawn or
    /// not read from it at all.
    pub fill: Fill,
    /// One expert's tensor of an upcycled MoE layer (counted k/E in the active parameters).
    pub expert: bool,
}

impl DestTensor {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64
    }
    pub fn bytes(&self) -> u64 {
        self.numel() * self.dtype.size() as u64
    }
}

#[derive(Debug, Clone)]
pub struct Shard {
    pub file_name: String,
    /// Indices into `Plan::tensors`, in data order.
    pub tensors: Vec<usize>,
    /// The complete header, length prefix included.
    pub header: Vec<u8>,
    pub data_bytes: u64,
}

/// One config.json field the clone changes.
#[derive(Debug, Clone)]
pub struct ConfigChange {
    pub key: String,
    pub before: Value,
    pub after: Value,
}

pub struct Plan {
    pub options: GrowthOptions,
    pub map: GrowthMap,
    pub config: Map<String, Value>,
    pub changes: Vec<ConfigChange>,
    pub tensors: Vec<DestTensor>,
    pub shards: Vec<Shard>,
    pub params_before: BTreeMap<Component, u64>,
    pub params_after: BTreeMap<Component, u64>,
}

impl Plan {
    pub fn new(
        ckpt: &Checkpoint,
        options: &GrowthOptions,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Plan> {
        options.validate()?;
        let cfg = &ckpt.config;
        let family = cfg.family;
        let map = GrowthMap::new(cfg, options)?;
        let mut tensors = Vec::with_capacity(ckpt.tensors.len() + 1);
        let mut params_before = BTreeMap::new();
        for (i, t) in ckpt.tensors.iter().enumerate() {
            *params_before.entry(t.rule.component).or_insert(0) += t.info.numel() as u64;
            let rule = t.rule;
            match t.layer {
                None => tensors.push(dest_tensor(
                    ckpt,
                    options,
                    &map,
                    i,
                    &t.info.name,
                    rule,
                    rule.component,
                    None,
                )?),
                // An upcycled MLP tensor: once per expert of every layer grown from it.
                Some(l) if upcycled(&map, rule).is_some() => {
                    let (u, pattern, first) = upcycled(&map, rule).expect("matched");
                    for (j, _) in map.layers.iter().enumerate().filter(|(_, d)| d.source == l) {
                        let target = u.target();
                        if first {
                            let fill = match u.router_init {
                                RouterInit::Zero => Fill::Zeros,
                                RouterInit::Normal => Fill::Normal {
                                    std: u.router_std,
                                    key: 0, // set from the name
                                },
                            };
                            tensors.push(unread(
                                ckpt,
                                options,
                                &map,
                                i,
                                target.router,
                                j,
                                u.experts,
                                fill,
                            ));
                            if let Some(gate) = target.shared_gate {
                                tensors.push(unread(
                                    ckpt,
                                    options,
                                    &map,
                                    i,
                                    gate,
                                    j,
                                    1,
                                    Fill::Zeros,
                                ));
                            }
                        }
                        // The dense tensor grown under another name (a shared expert's, an
                        // expert's) in destination layer j.
                        let grown = |name: &str| {
                            dest_tensor(ckpt, options, &map, i, name, rule, rule.component, Some(j))
                        };
                        if let Some((_, pattern, init)) =
                            target.shared.iter().find(|s| s.0 == rule.pattern)
                        {
                            let mut t = grown(&tensor_name_at(pattern, Some(j), None))?;
                            if *init == SharedInit::Zero {
                                t.fill = Fill::Zeros;
                            }
                            tensors.push(t);
                        }
                        for e in 0..u.experts {
                            let mut t = grown(&tensor_name_at(pattern, Some(j), Some(e)))?;
                            t.expert = true;
                            if let ExpertInit::Drop { ratio } = u.expert_init {
                                let ffn_axis = rule
                                    .axes
                                    .iter()
                                    .position(|a| a.0 == [Space::Ffn])
                                    .expect("an expert's MLP tensor has an FFN axis");
                                t.fill = Fill::Dropped(DropSpec {
                                    units_key: units_key(options.seed, j, e),
                                    ratio,
                                    ffn_axis,
                                    values_key: t.noise_key,
                                });
                            }
                            tensors.push(t);
                        }
                    }
                }
                // Every destination layer grown from this source layer, in order.
                Some(l) => {
                    // The expert index (Mixture-of-Experts layers) is kept.
                    let expert = family.match_name_at(&t.info.name).and_then(|m| m.2);
                    for (j, _) in map.layers.iter().enumerate().filter(|(_, d)| d.source == l) {
                        let name = tensor_name_at(rule.pattern, Some(j), expert);
                        tensors.push(dest_tensor(
                            ckpt,
                            options,
                            &map,
                            i,
                            &name,
                            rule,
                            rule.component,
                            Some(j),
                        )?);
                    }
                }
            }
        }
        // A tied head becomes its own tensor (unless the tie is kept): the embedding wants
        // no division, the head wants 1/n on its hidden columns, and a plain
        // from_pretrained must see both.
        if ckpt.find(family.head).is_none() && !map.keep_tied {
            let emb = ckpt
                .tensors
                .iter()
                .position(|t| t.info.name == family.embedding)
                .ok_or_else(|| Error::tensor(&ckpt.dir, family.embedding, "missing"))?;
            let head_rule = family
                .all_rules()
                .find(|r| r.pattern == family.head)
                .expect("every family has a head rule");
            tensors.push(dest_tensor(
                ckpt,
                options,
                &map,
                emb,
                family.head,
                head_rule,
                Component::Head,
                None,
            )?);
        }
        let mut params_after = BTreeMap::new();
        let mut total_bytes = 0u64;
        for t in &tensors {
            *params_after.entry(t.component).or_insert(0) += t.numel();
            total_bytes = total_bytes.checked_add(t.bytes()).ok_or_else(|| {
                Error::Options(format!(
                    "factor {}: the clone's size overflows 64 bits",
                    map.factor
                ))
            })?;
        }
        let (config, changes) = grown_config(ckpt, options, &map)?;
        // Verification reads what each layer and space became from the clone itself.
        let mut metadata = metadata.clone();
        metadata.insert(GROWTH_MAP_KEY.into(), map.to_json().to_string());
        let shards = assign_shards(&tensors, options.shard_size, &metadata);
        Ok(Plan {
            options: options.clone(),
            map,
            config,
            changes,
            tensors,
            shards,
            params_before,
            params_after,
        })
    }

    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(DestTensor::bytes).sum()
    }

    /// Total bytes of the weight files (headers included).
    pub fn output_bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.header.len() as u64 + s.data_bytes)
            .sum()
    }

    /// Memory the clone allocates: the write buffer, per-thread row buffers and the headers.
    /// Source pages are memory-mapped and reclaimable, so they are not counted.
    pub fn peak_memory_bytes(&self, threads: usize) -> u64 {
        let widest_rows = self
            .tensors
            .iter()
            .map(|t| {
                let cols = t.shape.last().copied().unwrap_or(1);
                let src_cols = t.axes.last().map(AxisGrowth::src_len).unwrap_or(1);
                ((cols + src_cols) * 8) as u64
            })
            .max()
            .unwrap_or(0);
        let headers: u64 = self.shards.iter().map(|s| s.header.len() as u64).sum();
        // The noisy variants keep one tensor's noise draws while it is written.
        let noise = self
            .tensors
            .iter()
            .map(|t| crate::kernel::noise_cache_bytes(&t.axes, self.options.variant) as u64)
            .max()
            .unwrap_or(0);
        // Two chunk buffers: one being filled while the other is written.
        2 * WRITE_CHUNK_BYTES as u64 + threads as u64 * widest_rows + headers + noise
    }

    /// Parameters a token runs through: all of them, except that an upcycled MoE layer runs
    /// k of its E experts (every expert has the same size).
    pub fn active_params(&self) -> u64 {
        let (experts, rest): (Vec<&DestTensor>, Vec<&DestTensor>) =
            self.tensors.iter().partition(|t| t.expert);
        let expert_total: u64 = experts.iter().map(|t| t.numel()).sum();
        let rest_total: u64 = rest.iter().map(|t| t.numel()).sum();
        match &self.map.upcycle {
            Some(u) => rest_total + expert_total / u.experts as u64 * u.per_token as u64,
            None => rest_total + expert_total,
        }
    }

    pub fn is_sharded(&self) -> bool {
        self.shards.len() > 1
    }

    /// `model.safetensors.index.json` for a sharded output.
    pub fn index_json(&self) -> Value {
        let mut weight_map = Map::new();
        for s in &self.shards {
            for &t in &s.tensors {
                weight_map.insert(
                    self.tensors[t].name.clone(),
                    Value::String(s.file_name.clone()),
                );
            }
        }
        serde_json::json!({
            "metadata": { "total_size": self.data_bytes() },
            "weight_map": weight_map,
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn dest_tensor(
    ckpt: &Checkpoint,
    options: &GrowthOptions,
    map: &GrowthMap,
    source: usize,
    name: &str,
    rule: &TensorRule,
    component: Component,
    dest_layer: Option<usize>,
) -> Result<DestTensor> {
    let cfg = &ckpt.config;
    let axes: Vec<AxisGrowth> = rule
        .axes
        .iter()
        .map(|a| AxisGrowth {
            segments: a.0.iter().map(|&space| map.segment(space)).collect(),
            role: a.1,
        })
        .collect();
    // Sizes come from config.json and the flags: multiply them checked, and hold every
    // destination tensor to the element bound (a huge --factor is refused here, before
    // anything is allocated).
    let too_big = || {
        let ffn = match options.intermediate_size {
            Some(f) => format!("FFN {f}"),
            None => format!("FFN x{}", options.ffn_factor),
        };
        Error::Options(format!(
            "factor {} ({ffn}): tensor `{name}` would have more than {} elements",
            map.factor,
            crate::limits::MAX_TENSOR_ELEMENTS
        ))
    };
    let shape: Vec<usize> = axes
        .iter()
        .map(|a| {
            a.segments.iter().try_fold(0usize, |acc, s| {
                s.len
                    .checked_mul(s.copies)
                    .and_then(|x| x.checked_add(s.extra))
                    .and_then(|x| acc.checked_add(x))
            })
        })
        .collect::<Option<_>>()
        .ok_or_else(too_big)?;
    crate::limits::checked_numel(&shape).ok_or_else(too_big)?;
    let sqrt_hidden = if name == cfg.family.embedding && cfg.family.embedding_scaled_by_sqrt_hidden
    {
        1.0 / (map.factor as f64).sqrt()
    } else {
        1.0
    };
    let scale = sqrt_hidden * map.tensor_scale(cfg, rule, dest_layer);
    let src = &ckpt.tensors[source].info;
    Ok(DestTensor {
        name: name.to_string(),
        source,
        dtype: options.dtype.unwrap_or(src.dtype),
        axes,
        shape,
        component,
        noise_key: name_key(options.seed, name),
        scale,
        shift: map.tensor_shift(cfg, rule),
        fill: Fill::Grown,
        expert: false,
    })
}

/// The upcycle, the expert pattern and whether it is the first of the MLP's tensors (the
/// layer's router is written before it) when `rule` is a dense MLP tensor being upcycled.
fn upcycled<'m>(
    map: &'m GrowthMap,
    rule: &TensorRule,
) -> Option<(&'m Upcycle, &'static str, bool)> {
    let u = map.upcycle.as_ref()?;
    let target = u.target();
    let pattern = target.expert_pattern(rule.pattern)?;
    Some((u, pattern, target.experts[0].0 == rule.pattern))
}

/// A tensor of destination layer `j` that is not read from the source (an upcycle's router,
/// `rows` = experts, or a shared expert's gate, 1 row) over the grown hidden axis: zero (exact)
/// or drawn. `source` is the dense gate, whose dtype it takes.
#[allow(clippy::too_many_arguments)]
fn unread(
    ckpt: &Checkpoint,
    options: &GrowthOptions,
    map: &GrowthMap,
    source: usize,
    pattern: &str,
    j: usize,
    rows: usize,
    fill: Fill,
) -> DestTensor {
    let name = tensor_name_at(pattern, Some(j), None);
    let hidden = map.segment(Space::Hidden);
    let noise_key = name_key(options.seed, &name);
    DestTensor {
        shape: vec![rows, hidden.dest_len()],
        axes: vec![
            AxisGrowth {
                segments: vec![Segment::tiled(rows, 1)],
                role: Role::Write,
            },
            AxisGrowth {
                segments: vec![hidden],
                role: Role::Read,
            },
        ],
        dtype: options.dtype.unwrap_or(ckpt.tensors[source].info.dtype),
        source,
        name,
        component: Component::Mlp,
        noise_key,
        scale: 1.0,
        shift: 0.0,
        // Drawn at the tensor's own key.
        fill: match fill {
            Fill::Normal { std, .. } => Fill::Normal {
                std,
                key: noise_key,
            },
            other => other,
        },
        expert: false,
    }
}

/// The destination config.json: only the grown fields change, every other key is kept in
/// its place.
fn grown_config(
    ckpt: &Checkpoint,
    options: &GrowthOptions,
    map: &GrowthMap,
) -> Result<(Map<String, Value>, Vec<ConfigChange>)> {
    let cfg = &ckpt.config;
    let mut out = cfg.raw.clone();
    let mut changes = Vec::new();
    let mut set = |key: &str, value: Value| {
        let before = out.get(key).cloned().unwrap_or(Value::Null);
        if before != value {
            changes.push(ConfigChange {
                key: key.to_string(),
                before,
                after: value.clone(),
            });
            out.insert(key.to_string(), value);
        }
    };
    let n = map.factor;
    let keys = cfg.family.keys;
    set(keys.hidden, (cfg.hidden_size * n).into());
    set(keys.ffn, map.dest_len(Space::Ffn).into());
    if let Some(key) = cfg.family.moe.and_then(|m| m.shared_ffn) {
        set(key, map.dest_len(Space::SharedFfn).into());
    }
    if map.layers.len() != cfg.num_hidden_layers {
        set(keys.layers, map.layers.len().into());
        // Per-layer lists follow each layer to its new index.
        if let Some(Value::Array(types)) = cfg.raw.get("layer_types") {
            let grown = map
                .layers
                .iter()
                .map(|l| types.get(l.source).cloned().unwrap_or(Value::Null))
                .collect();
            set("layer_types", Value::Array(grown));
        }
        for key in cfg.family.per_layer_keys {
            if let Some(Value::Array(list)) = cfg.raw.get(*key) {
                let grown = map
                    .layers
                    .iter()
                    .map(|l| list.get(l.source).cloned().unwrap_or(Value::Null))
                    .collect();
                set(key, Value::Array(grown));
            }
        }
    }
    let heads = map.heads();
    set(keys.heads, heads.into());
    // head_dim is kept: write it where hidden / heads no longer gives it.
    // (An MoE sibling may default it otherwise: stated whenever upcycling.)
    if heads * cfg.head_dim != cfg.hidden_size * n || map.upcycle.is_some() {
        set("head_dim", cfg.head_dim.into());
    }
    for key in keys.hidden_mirrors {
        if cfg.raw.get(*key).and_then(Value::as_u64) == Some(cfg.hidden_size as u64) {
            set(key, (cfg.hidden_size * n).into());
        }
    }
    let kv = map.dest_len(Space::KvHeads) / cfg.head_dim;
    // An absent key means "as many as the query heads"; write it when that stops holding
    // (a single-head model's one kv head stays single).
    if let Some(kv_key) = keys.kv_heads {
        // (An MoE sibling's default may differ: Mixtral's is 8.)
        if cfg.raw.get(kv_key).is_some_and(|v| !v.is_null()) || kv != heads || map.upcycle.is_some()
        {
            set(kv_key, kv.into());
        }
    }
    if map.keep_tied {
        // The residual is carried as tile(h) * s: norms stay exact when eps scales by s^2
        // (divided by n^2, or by n for Gemma).
        let crate::family::TiedGrowth::Exact { eps_key, .. } = cfg.family.tied_growth else {
            unreachable!("GrowthMap::new refuses families where a tie cannot be kept");
        };
        let q = map.tied_eps_divisor;
        let eps = cfg.raw.get(eps_key).and_then(Value::as_f64).ok_or_else(|| {
            Error::Options(format!(
                "keep_tied: config.json has no numeric `{eps_key}`, and the norms' eps must be divided by {q}"
            ))
        })?;
        set(eps_key, (eps / q as f64).into());
    } else {
        // Otherwise the clone stores the head as its own tensor (a tied head would need a
        // 1/n scale that a plain from_pretrained cannot express).
        set("tie_word_embeddings", Value::Bool(false));
    }
    if let Some(d) = options.dtype {
        let key = if cfg.raw.contains_key("dtype") {
            "dtype"
        } else {
            "torch_dtype"
        };
        set(key, d.torch_name().into());
    }
    if let Some(u) = &map.upcycle {
        let moe = u.target().moe_config(&mut out, u, map.dest_len(Space::Ffn));
        for (key, before, after) in moe {
            // A key the growth already changed keeps its original `before`.
            match changes.iter_mut().find(|c| c.key == key) {
                Some(c) => c.after = after,
                None => changes.push(ConfigChange { key, before, after }),
            }
        }
    }
    Ok((out, changes))
}

fn assign_shards(
    tensors: &[DestTensor],
    max_bytes: u64,
    metadata: &BTreeMap<String, String>,
) -> Vec<Shard> {
    let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
    let mut current = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let b = t.bytes();
        if current > 0 && current + b > max_bytes {
            groups.push(Vec::new());
            current = 0;
        }
        groups.last_mut().expect("non-empty").push(i);
        current += b;
    }
    let count = groups.len();
    groups
        .into_iter()
        .enumerate()
        .map(|(k, ids)| {
            let entries: Vec<HeaderEntry> = ids
                .iter()
                .map(|&i| HeaderEntry {
                    name: tensors[i].name.clone(),
                    dtype: tensors[i].dtype,
                    shape: tensors[i].shape.clone(),
                })
                .collect();
            let data_bytes = entries.iter().map(HeaderEntry::byte_len).sum();
            let file_name = if count == 1 {
                SINGLE_FILE.to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", k + 1, count)
            };
            Shard {
                header: encode_header(&entries, metadata),
                file_name,
                tensors: ids,
                data_bytes,
            }
        })
        .collect()
}
