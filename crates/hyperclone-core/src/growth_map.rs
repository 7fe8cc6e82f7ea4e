//! The growth map: what every destination index and layer is made of.
//!
//! One function ([`GrowthMap::new`]) turns (config, options) into the map; the plan, the
//! kernel's axis segments, the grown config, verification's expectations and the recipe
//! file all read it, so the growth rule is written down once.
//!
//! - Each index space maps destination index `j` to a source unit: `j % len` for the first
//!   `copies * len` indices (the paper's tiles), then `j - copies * len` for the `extra`
//!   trailing ones (Net2Net's uneven growth). Unit `u` has multiplicity
//!   `copies + (u < extra)`; readers of the space divide by it.
//! - Each destination layer names its source layer and whether it is an inserted identity
//!   block (a copy of its neighbour whose residual writers are zero: LLaMA Pro).
//! - With a kept tie the residual stream is carried as tile(h) * s, s = 1/n (1/sqrt(n) for
//!   Gemma) (see [`crate::family::TiedGrowth`]).

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::family::{HeadCounts, LayerSliding, Space, TensorRule, TiedGrowth};
use crate::kernel::Segment;
use crate::limits::MAX_LAYERS;
use crate::options::GrowthOptions;
use crate::upcycle::Upcycle;
// DepthMode lives with the options it is one of; re-exported here, where it used to be.
pub use crate::options::DepthMode;
use serde_json::{json, Map, Value};

/// The `__metadata__` key under which every clone records its growth map (JSON).
pub const GROWTH_MAP_KEY: &str = "hyperclone.growth_map";

/// What a clone's recorded growth map says about its function, read back by `verify`.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedGrowth {
    /// Every index space the map names, with its segment.
    pub spaces: Vec<(Space, Segment)>,
    pub layers: Vec<LayerSource>,
    /// The clone's residual stream is tile(h) * residual_scale.
    pub residual_scale: f64,
    pub preserves_function: bool,
    /// Why an upcycled clone does not compute the source's function (Drop-Upcycling, a
    /// drawn router), when it does not.
    pub upcycle_not_exact: Option<String>,
}

impl RecordedGrowth {
    /// Parses the JSON of [`GrowthMap::to_json`]; `None` when it is not one.
    pub fn parse(text: &str) -> Option<RecordedGrowth> {
        let v: Value = serde_json::from_str(text).ok()?;
        let layers = v
            .get("layers")?
            .as_array()?
            .iter()
            .map(|l| {
                Some(LayerSource {
                    source: usize::try_from(l.get("source")?.as_u64()?).ok()?,
                    identity: l.get("identity")?.as_bool()?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let map = v.get("spaces")?.as_object()?;
        let spaces = Space::ALL
            .iter()
            .filter_map(|&space| {
                let s = map.get(space.name())?;
                let get = |k: &str| s.get(k)?.as_u64().and_then(|x| usize::try_from(x).ok());
                let seg = Segment {
                    len: get("source")?,
                    copies: get("copies")?,
                    extra: get("extra")?,
                };
                Some((space, seg))
            })
            .collect();
        Some(RecordedGrowth {
            spaces,
            layers,
            residual_scale: v.get("residual_scale")?.as_f64()?,
            preserves_function: v.get("preserves_function")?.as_bool()?,
            upcycle_not_exact: v
                .get("upcycle")
                .and_then(|u| u.get("not_exact_because"))
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    /// The growth map a checkpoint records in its safetensors metadata, if any.
    pub fn of(ckpt: &crate::Checkpoint) -> Option<RecordedGrowth> {
        RecordedGrowth::parse(RecordedGrowth::text(ckpt)?)
    }

    /// The recorded growth map's JSON text, if the checkpoint has one.
    pub fn text(ckpt: &crate::Checkpoint) -> Option<&str> {
        ckpt.files
            .iter()
            .find_map(|f| f.metadata.get(GROWTH_MAP_KEY))
            .map(String::as_str)
    }

    /// For each destination layer, the source layer whose output its output equals.
    pub fn layer_of(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.source).collect()
    }
}

/// One destination layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSource {
    /// The source layer its weights are grown from.
    pub source: usize,
    /// An inserted identity block: residual writers are zero, so the layer adds nothing.
    pub identity: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GrowthMap {
    /// Hidden width multiplier n (also the head count's).
    pub factor: usize,
    /// Every index space, in [`Space::ALL`] order.
    pub spaces: Vec<(Space, Segment)>,
    pub layers: Vec<LayerSource>,
    pub depth_mode: DepthMode,
    /// The clone keeps the source's tied embedding tied.
    pub keep_tied: bool,
    /// With a kept tie: the norms' eps is divided by this, and the stream is carried at
    /// 1/sqrt(it) ([`crate::family::Family::tied_eps_divisor`]); 1 otherwise.
    pub tied_eps_divisor: usize,
    /// The dense source becomes its Mixture-of-Experts sibling: every MLP tensor is
    /// written once per expert, and each layer gains a router.
    pub upcycle: Option<Upcycle>,
}

impl GrowthMap {
    pub fn new(cfg: &ModelConfig, o: &GrowthOptions) -> Result<GrowthMap> {
        let opt = |m: String| Error::Options(m);
        let spaces = Space::ALL
            .iter()
            .map(|&space| Ok((space, space_segment(cfg, o, space)?)))
            .collect::<Result<Vec<_>>>()?;
        let layers = layer_map(cfg, o)?;
        if o.keep_tied {
            if !cfg.tie_word_embeddings {
                return Err(opt(
                    "keep_tied: the source's head is not tied to its embedding (tie_word_embeddings is false), so \
                     there is no tie to keep; drop the flag"
                        .into(),
                ));
            }
            if let TiedGrowth::Refused(why) = cfg.family.tied_growth {
                return Err(opt(format!(
                    "keep_tied is not exact for {}: {why}; clone without it (the head is then written untied)",
                    cfg.family.model_type
                )));
            }
            if cfg.embed_proj_dim != cfg.hidden_size {
                return Err(opt(
                    "keep_tied: the embedding lives behind project_in/out (word_embed_proj_dim != hidden_size)"
                        .into(),
                ));
            }
        }
        let keep_tied = o.keep_tied && o.factor > 1;
        let upcycle = o
            .upcycle
            .as_ref()
            .map(|u| Upcycle::new(cfg, u))
            .transpose()?;
        if let Some(u) = &upcycle {
            use crate::upcycle::MAX_EXPERTS_IN_MODEL;
            if u.experts.saturating_mul(layers.len()) > MAX_EXPERTS_IN_MODEL {
                return Err(opt(format!(
                    "experts {}: {} experts in {} layers is more than the {MAX_EXPERTS_IN_MODEL} this tool plans",
                    u.experts,
                    u.experts.saturating_mul(layers.len()),
                    layers.len()
                )));
            }
        }
        Ok(GrowthMap {
            factor: o.factor,
            spaces,
            layers,
            depth_mode: o.depth_mode,
            keep_tied,
            tied_eps_divisor: if keep_tied {
                cfg.family.tied_eps_divisor(o.factor)
            } else {
                1
            },
            upcycle,
        })
    }

    pub fn segment(&self, space: Space) -> Segment {
        self.spaces
            .iter()
            .find(|(s, _)| *s == space)
            .map(|(_, seg)| *seg)
            .expect("every space is mapped")
    }

    /// Destination size of a space.
    pub fn dest_len(&self, space: Space) -> usize {
        self.segment(space).dest_len()
    }

    /// Destination query-head count (head_dim is never grown).
    pub fn heads(&self) -> usize {
        self.dest_len(Space::Heads) / self.dest_len(Space::HeadDim).max(1)
    }

    /// Whether the heads grew by the width factor, as in the paper.
    pub fn heads_follow_factor(&self) -> bool {
        let s = self.segment(Space::Heads);
        s.extra == 0 && s.copies == self.factor
    }

    pub fn grows_depth(&self) -> bool {
        self.layers
            .iter()
            .enumerate()
            .any(|(j, l)| l.source != j || l.identity)
    }

    /// Whether the clone computes the source's function (false for `--depth-mode stack`
    /// that actually adds layers, and for an upcycle with Drop-Upcycling or a drawn router).
    pub fn preserves_function(&self) -> bool {
        (self.depth_mode == DepthMode::Identity || !self.grows_depth())
            && self
                .upcycle
                .as_ref()
                .is_none_or(|u| u.not_exact_because().is_none())
    }

    /// The residual stream of the clone is `tile(h) * residual_scale()`: 1, or with a kept
    /// tie 1/n (1/sqrt(n) for Gemma).
    pub fn residual_scale(&self) -> f64 {
        if self.keep_tied {
            // sqrt of a perfect square is exact: 1/n to the bit where the divisor is n^2.
            1.0 / (self.tied_eps_divisor as f64).sqrt()
        } else {
            1.0
        }
    }

    /// For each source layer, the destination layer whose output equals its output (the
    /// last destination layer grown from it: identity blocks after it change nothing).
    /// Only meaningful when [`Self::preserves_function`].
    pub fn matching_layers(&self) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        for (j, l) in self.layers.iter().enumerate() {
            match out.last_mut() {
                Some(last) if last.0 == l.source => last.1 = j,
                _ => out.push((l.source, j)),
            }
        }
        out
    }

    /// The constant factor on a tensor beyond the kernel's tiling: 0 for the residual writers
    /// of an identity block; with a kept tie, s = [`Self::residual_scale`] for residual
    /// sources and writers (post-norms included) and 1/s for un-normed readers.
    pub fn tensor_scale(
        &self,
        cfg: &ModelConfig,
        rule: &TensorRule,
        dest_layer: Option<usize>,
    ) -> f64 {
        if let Some(j) = dest_layer {
            if self.layers[j].identity && rule.writes_residual() {
                return 0.0;
            }
        }
        if !self.keep_tied {
            return 1.0;
        }
        let also = match cfg.family.tied_growth {
            TiedGrowth::Exact { also_scaled, .. } => also_scaled.contains(&rule.pattern),
            TiedGrowth::Refused(_) => false,
        };
        let tied = &cfg.family.tied_residual;
        if tied.unnormed_readers.contains(&rule.pattern) {
            1.0 / self.residual_scale()
        } else if rule.writes_residual()
            || rule.starts_residual()
            || also
            || tied.post_norms.contains(&rule.pattern)
        {
            self.residual_scale()
        } else {
            1.0
        }
    }

    /// The constant added to every element after [`Self::tensor_scale`]: a kept tie scales
    /// a post-norm's `offset + w` by s, so its stored gain becomes `s w + (s - 1) offset`.
    pub fn tensor_shift(&self, cfg: &ModelConfig, rule: &TensorRule) -> f64 {
        let tied = &cfg.family.tied_residual;
        if self.keep_tied && tied.norm_offset != 0.0 && tied.post_norms.contains(&rule.pattern) {
            (self.residual_scale() - 1.0) * tied.norm_offset
        } else {
            0.0
        }
    }

    /// The map as JSON (the `growth_map` of `plan --json` and of recipes).
    pub fn to_json(&self) -> Value {
        let mut spaces = Map::new();
        for (space, seg) in &self.spaces {
            spaces.insert(
                space.name().into(),
                json!({"source": seg.len, "dest": seg.dest_len(), "copies": seg.copies, "extra": seg.extra}),
            );
        }
        let mut v = json!({
            "factor": self.factor,
            "spaces": spaces,
            "layers": self.layers.iter().enumerate().map(|(j, l)| json!({
                "dest": j, "source": l.source, "identity": l.identity
            })).collect::<Vec<_>>(),
            "depth_mode": self.depth_mode.name(),
            "keep_tied": self.keep_tied,
            "residual_scale": self.residual_scale(),
            "preserves_function": self.preserves_function(),
        });
        if let Some(u) = &self.upcycle {
            v["upcycle"] = u.to_json();
        }
        v
    }
}

fn space_segment(cfg: &ModelConfig, o: &GrowthOptions, space: Space) -> Result<Segment> {
    let len = cfg.space_len(space);
    if let (Some((heads, kv)), Space::Heads | Space::KvHeads | Space::QkvPerHead) =
        (uneven_heads(cfg, o)?, space)
    {
        // Whole heads are the units: the first (H' mod H) heads get one more copy, and
        // with them the kv heads of their groups (K' = H' / group).
        let (units, target, per_unit) = match space {
            Space::KvHeads => (cfg.num_key_value_heads, kv, cfg.head_dim),
            Space::QkvPerHead => (cfg.num_attention_heads, heads, 3 * cfg.head_dim),
            _ => (cfg.num_attention_heads, heads, cfg.head_dim),
        };
        return Ok(Segment {
            len,
            copies: target / units,
            extra: (target % units) * per_unit,
        });
    }
    if space == Space::SharedFfn {
        // Whole copies only: as many as the experts' FFN axis has (its floor with an uneven
        // intermediate_size), so the shared expert stays an exact tile.
        let ffn = space_segment(cfg, o, Space::Ffn)?;
        return Ok(Segment::tiled(len, ffn.copies));
    }
    if space != Space::Ffn {
        return Ok(Segment::tiled(len, o.copies(space, cfg)));
    }
    let target = match o.intermediate_size {
        Some(f) => f,
        None => len.checked_mul(o.ffn_factor).ok_or_else(|| {
            Error::Options(format!(
                "factor {} (FFN x{}): the FFN would have more than {} elements",
                o.factor,
                o.ffn_factor,
                crate::limits::MAX_TENSOR_ELEMENTS
            ))
        })?,
    };
    if target < len {
        return Err(Error::Options(format!(
            "intermediate_size {target} is smaller than the source's {len}: growth never removes FFN units"
        )));
    }
    Ok(Segment {
        len,
        copies: target / len,
        extra: target % len,
    })
}

/// (H', K') when `--num-attention-heads` asks for other than the source's x factor; the
/// checks that keep attention exact.
fn uneven_heads(cfg: &ModelConfig, o: &GrowthOptions) -> Result<Option<(usize, usize)>> {
    let (h, k) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let Some(target) = o.num_heads.filter(|&t| Some(t) != h.checked_mul(o.factor)) else {
        return Ok(None);
    };
    let opt = |m: String| Err(Error::Options(m));
    if target < h {
        return opt(format!(
            "num_attention_heads {target} is fewer than the source's {h}: growth never removes heads"
        ));
    }
    let hidden = cfg.hidden_size.saturating_mul(o.factor);
    match cfg.family.head_counts {
        HeadCounts::Any => {}
        HeadCounts::DividingHidden if hidden.is_multiple_of(target) => {}
        HeadCounts::DividingHidden => {
            return opt(format!(
                "num_attention_heads {target}: {} configs must have a head count that divides hidden_size \
                 ({hidden}; transformers validates it even with head_dim given)",
                cfg.family.model_type
            ))
        }
        HeadCounts::Refused(why) => {
            return opt(format!(
                "num_attention_heads {target}: {} can only grow heads with the hidden size ({} for x{}): {why}",
                cfg.family.model_type,
                h * o.factor,
                o.factor
            ))
        }
    }
    // Query heads of a group share a kv head; copies must keep whole groups together.
    let group = h / k;
    let kv = if k == 1 {
        1 // one shared (MQA) kv head serves any number of query heads
    } else if !target.is_multiple_of(group) {
        return opt(format!(
            "num_attention_heads {target}: {group} query heads share each kv head, so the count must be a \
             multiple of {group}"
        ));
    } else {
        target / group
    };
    crate::limits::checked_numel(&[target, cfg.head_dim, cfg.hidden_size, o.factor]).ok_or_else(
        || {
            Error::Options(format!(
                "num_attention_heads {target}: q_proj would be too large"
            ))
        },
    )?;
    Ok(Some((target, kv)))
}

fn layer_map(cfg: &ModelConfig, o: &GrowthOptions) -> Result<Vec<LayerSource>> {
    let l = cfg.num_hidden_layers;
    let target = o.num_layers.unwrap_or(l);
    if target < l {
        return Err(Error::Options(format!(
            "num_hidden_layers {target} is fewer than the source's {l}: growth never removes layers"
        )));
    }
    if target > MAX_LAYERS {
        return Err(Error::Options(format!(
            "num_hidden_layers {target}: at most {MAX_LAYERS} layers are supported"
        )));
    }
    if target > l {
        depth_is_expressible(cfg)?;
        let post_ln = cfg.raw.get("do_layer_norm_before").and_then(Value::as_bool) == Some(false);
        if post_ln && o.depth_mode == DepthMode::Identity {
            return Err(Error::Options(
                "depth growth: this model normalises the residual after every block (do_layer_norm_before: false), \
                 so an inserted block with zeroed writers still applies its LayerNorm and is not the identity; \
                 use depth_mode stack (not function-preserving) or grow only the width"
                    .into(),
            ));
        }
    }
    Ok(match o.depth_mode {
        DepthMode::Stack => (0..target)
            .map(|j| LayerSource {
                source: j % l,
                identity: false,
            })
            .collect(),
        DepthMode::Identity => {
            let added = target - l;
            let mut out = Vec::with_capacity(target);
            for i in 0..l {
                out.push(LayerSource {
                    source: i,
                    identity: false,
                });
                // Evenly spread: after source layer i, the identity blocks that bring the
                // running total to floor((i + 1) * added / l).
                let copies = (i + 1) * added / l - i * added / l;
                out.extend((0..copies).map(|_| LayerSource {
                    source: i,
                    identity: true,
                }));
            }
            out
        }
    })
}

/// Layer-indexed behaviour that config.json states only implicitly cannot follow a layer
/// to its new index; refuse instead of changing which layers slide.
fn depth_is_expressible(cfg: &ModelConfig) -> Result<()> {
    // GPT-2 divides layer l's attention scores by l + 1: a source layer moved to another
    // index computes something else, whatever the config lists.
    if cfg.flag("scale_attn_by_inverse_layer_idx") {
        return Err(Error::Options(
            "depth growth: scale_attn_by_inverse_layer_idx scales each layer's attention by its index, so a source \
             layer moved to a new index changes the function; grow only the width"
                .into(),
        ));
    }
    if let Some(key) = cfg
        .family
        .per_layer_keys
        .iter()
        .find(|k| !cfg.raw.get(**k).is_some_and(Value::is_array))
    {
        return Err(Error::Options(format!(
            "depth growth: config.json has no `{key}`, which the model then derives from the layer index; add the \
             list to the source config to make the layout explicit"
        )));
    }
    if cfg.raw.get("layer_types").is_some_and(Value::is_array) {
        return Ok(()); // rewritten layer by layer in the grown config
    }
    let why = match cfg.family.layer_sliding {
        LayerSliding::Alternating => Some(
            "the model alternates sliding and global attention by layer index and config.json has no `layer_types`",
        ),
        // max_window_layers defaults to 28 when absent: still chosen by index.
        LayerSliding::FromMaxWindowLayers | LayerSliding::EvenBelowMaxWindowLayers
            if cfg.flag("use_sliding_window")
                && !cfg.raw.get("sliding_window").is_some_and(Value::is_null) =>
        {
            Some("sliding attention is chosen by layer index (max_window_layers) and config.json has no `layer_types`")
        }
        LayerSliding::Periodic { .. } => Some(
            "the model makes every few layers global by layer index and config.json has no `layer_types`",
        ),
        LayerSliding::NoRopeLayersIfEnabled
            if cfg.flag("use_sliding_window")
                && !cfg.raw.get("sliding_window").is_some_and(Value::is_null) =>
        {
            Some("sliding attention follows the NoPE layers' indices and config.json has no `layer_types`")
        }
        _ => None,
    };
    match why {
        Some(why) => Err(Error::Options(format!(
            "depth growth: {why}; add a `layer_types` list to the source config to make the layout explicit"
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: Value) -> ModelConfig {
        let mut v = json!({"model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4,
            "vocab_size": 96, "tie_word_embeddings": true, "rms_norm_eps": 1e-6});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        crate::config::test_support::cfg(v).unwrap()
    }

    /// The default x2 symmetric growth (the shard size plays no part in a map).
    fn options() -> GrowthOptions {
        GrowthOptions::default()
    }

    /// A space's segment as (len, copies, extra).
    fn seg(m: &GrowthMap, space: Space) -> (usize, usize, usize) {
        let s = m.segment(space);
        (s.len, s.copies, s.extra)
    }

    /// The map of `c` under the default growth with `edit` applied to its options.
    fn grown(c: &ModelConfig, edit: impl FnOnce(&mut GrowthOptions)) -> Result<GrowthMap> {
        let mut o = options();
        edit(&mut o);
        GrowthMap::new(c, &o)
    }

    #[test]
    fn identity_blocks_are_spread_evenly_after_their_source() {
        let c = cfg(json!({}));
        let m = grown(&c, |o| o.num_layers = Some(6)).unwrap();
        let got: Vec<(usize, bool)> = m.layers.iter().map(|l| (l.source, l.identity)).collect();
        assert_eq!(
            got,
            [
                (0, false),
                (1, false),
                (1, true),
                (2, false),
                (3, false),
                (3, true)
            ]
        );
        assert_eq!(m.matching_layers(), [(0, 0), (1, 2), (2, 3), (3, 5)]);
        let m = grown(&c, |o| o.num_layers = Some(8)).unwrap();
        assert!(m.layers.chunks(2).enumerate().all(|(i, p)| p[0]
            == LayerSource {
                source: i,
                identity: false
            }
            && p[1]
                == LayerSource {
                    source: i,
                    identity: true
                }));
        let m = grown(&c, |o| {
            o.num_layers = Some(6);
            o.depth_mode = DepthMode::Stack;
        })
        .unwrap();
        assert_eq!(
            m.layers.iter().map(|l| l.source).collect::<Vec<_>>(),
            [0, 1, 2, 3, 0, 1]
        );
        assert!(!m.preserves_function());
    }

    #[test]
    fn uneven_ffn_is_copies_plus_extra() {
        let c = cfg(json!({}));
        let m = grown(&c, |o| o.intermediate_size = Some(120)).unwrap();
        assert_eq!(seg(&m, Space::Ffn), (48, 2, 24));
        assert_eq!(m.dest_len(Space::Ffn), 120);
        let err = grown(&c, |o| o.intermediate_size = Some(40)).unwrap_err();
        assert!(
            err.to_string().contains("smaller than the source's 48"),
            "{err}"
        );
    }

    #[test]
    fn keep_tied_needs_a_tie_and_a_family_where_it_is_exact() {
        let m = grown(&cfg(json!({})), |o| o.keep_tied = true).unwrap();
        assert_eq!(m.residual_scale(), 0.5);
        let err = grown(&cfg(json!({"tie_word_embeddings": false})), |o| {
            o.keep_tied = true
        })
        .unwrap_err();
        assert!(err.to_string().contains("no tie to keep"), "{err}");
        let opt = cfg(json!({"model_type": "opt", "ffn_dim": 48}));
        let err = grown(&opt, |o| o.keep_tied = true).unwrap_err();
        assert!(err.to_string().contains("eps is fixed"), "{err}");
    }

    #[test]
    fn a_kept_tie_carries_gemma_at_one_over_sqrt_n() {
        // The embedding (the head) must be tile(E)/n for the logits; the model multiplies it
        // by sqrt(n hidden), so the stream starts at sqrt(n)/n = 1/sqrt(n), and eps / n.
        for n in [2usize, 3] {
            for model_type in ["gemma", "gemma2"] {
                let c = cfg(json!({"model_type": model_type, "head_dim": 8}));
                let m = grown(&c, |o| {
                    o.factor = n;
                    o.keep_tied = true;
                })
                .unwrap();
                assert_eq!(m.tied_eps_divisor, n);
                let s = m.residual_scale();
                assert!((s * s * n as f64 - 1.0).abs() < 1e-15, "{s}");
                let rule = |p: &str| c.family.all_rules().find(|r| r.pattern == p).unwrap();
                let o = rule("model.layers.{L}.self_attn.o_proj.weight");
                assert_eq!(m.tensor_scale(&c, o, Some(0)), s);
                let post = rule("model.layers.{L}.post_attention_layernorm.weight");
                let q = rule("model.layers.{L}.self_attn.q_proj.weight");
                assert_eq!(m.tensor_scale(&c, q, Some(0)), 1.0);
                if model_type == "gemma2" {
                    // Its post-norm writes the stream: offset + w' = s (1 + w).
                    assert_eq!(m.tensor_scale(&c, post, Some(0)), s);
                    assert_eq!(m.tensor_shift(&c, post), s - 1.0);
                } else {
                    // Gemma's post_attention_layernorm is the MLP's pre-norm.
                    assert_eq!(m.tensor_scale(&c, post, Some(0)), 1.0);
                    assert_eq!(m.tensor_shift(&c, post), 0.0);
                }
            }
        }
    }

    #[test]
    fn a_kept_tie_in_olmo2_scales_post_norms_and_absorbs_into_the_gate() {
        let c = cfg(json!({"model_type": "olmo2"}));
        let m = grown(&c, |o| {
            o.factor = 3;
            o.keep_tied = true;
        })
        .unwrap();
        assert_eq!(m.residual_scale(), 1.0 / 3.0);
        let rule = |p: &str| c.family.all_rules().find(|r| r.pattern == p).unwrap();
        let scale = |p: &str| m.tensor_scale(&c, rule(p), Some(0));
        assert_eq!(scale("model.layers.{L}.mlp.gate_proj.weight"), 3.0);
        assert_eq!(scale("model.layers.{L}.mlp.up_proj.weight"), 3.0);
        assert_eq!(scale("model.layers.{L}.self_attn.v_proj.weight"), 3.0);
        assert_eq!(scale("model.layers.{L}.mlp.down_proj.weight"), 1.0 / 3.0);
        assert_eq!(
            scale("model.layers.{L}.post_feedforward_layernorm.weight"),
            1.0 / 3.0
        );
        assert_eq!(scale("model.layers.{L}.self_attn.q_proj.weight"), 1.0);
        let post = rule("model.layers.{L}.post_feedforward_layernorm.weight");
        assert_eq!(m.tensor_shift(&c, post), 0.0);
    }

    #[test]
    fn other_head_counts_copy_whole_heads_and_keep_kv_groups() {
        // 4 heads of 8 in 2 kv groups, qwen2 (any count): 6 heads = heads 0, 1 once more,
        // with kv head 0 (their group) once more.
        let c = cfg(json!({"model_type": "qwen2"}));
        let m = grown(&c, |o| o.num_heads = Some(6)).unwrap();
        assert_eq!(seg(&m, Space::Heads), (32, 1, 16));
        assert_eq!(seg(&m, Space::KvHeads), (16, 1, 8));
        let e = grown(&c, |o| o.num_heads = Some(5)).unwrap_err();
        assert!(e.to_string().contains("multiple of 2"), "{e}");
        let e = grown(&c, |o| o.num_heads = Some(2)).unwrap_err();
        assert!(e.to_string().contains("never removes heads"), "{e}");
        // llama: the count must divide the grown hidden size (64).
        let e = grown(&cfg(json!({})), |o| o.num_heads = Some(6)).unwrap_err();
        assert!(e.to_string().contains("divides hidden_size"), "{e}");
        let m = grown(&cfg(json!({})), |o| o.num_heads = Some(16)).unwrap();
        assert_eq!(seg(&m, Space::Heads), (32, 4, 0));
        // The factor's own count is the paper's growth.
        let m = grown(&c, |o| o.num_heads = Some(8)).unwrap();
        assert_eq!(m.segment(Space::Heads), Segment::tiled(32, 2));
    }

    #[test]
    fn depth_refuses_implicit_layer_layouts() {
        let deeper = GrowthOptions {
            num_layers: Some(8),
            ..options()
        };
        // With or without max_window_layers (transformers' default is 28).
        for extra in [
            json!({"model_type": "qwen2", "use_sliding_window": true, "max_window_layers": 2, "sliding_window": 16}),
            json!({"model_type": "qwen3", "head_dim": 8, "use_sliding_window": true}),
        ] {
            let err = GrowthMap::new(&cfg(extra), &deeper).unwrap_err();
            assert!(err.to_string().contains("layer_types"), "{err}");
        }
        // Llama never slides, whatever the config says; a window switched off is no layout.
        for extra in [
            json!({"use_sliding_window": true, "max_window_layers": 2, "sliding_window": 16}),
            json!({"model_type": "qwen2", "use_sliding_window": true, "sliding_window": null}),
        ] {
            assert!(GrowthMap::new(&cfg(extra), &deeper).is_ok());
        }
        // GPT-2's attention scaled by the inverse layer index cannot move a layer.
        let err = GrowthMap::new(
            &cfg(json!({"scale_attn_by_inverse_layer_idx": true})),
            &deeper,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("scale_attn_by_inverse_layer_idx"),
            "{err}"
        );
        let c = cfg(
            json!({"model_type": "qwen2", "use_sliding_window": true, "max_window_layers": 2, "sliding_window": 16,
            "layer_types": ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]}),
        );
        assert!(grown(&c, |o| o.num_layers = Some(8)).is_ok());
        let err = grown(&cfg(json!({})), |o| o.num_layers = Some(3)).unwrap_err();
        assert!(
            err.to_string().contains("fewer than the source's 4"),
            "{err}"
        );
    }

    /// Qwen2-MoE's shared expert grows by whole copies: the experts' FFN factor, or its
    /// floor when intermediate_size is not a multiple.
    #[test]
    fn shared_expert_grows_by_whole_copies() {
        let c = cfg(
            json!({"model_type": "qwen2_moe", "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 24, "num_experts": 4, "num_experts_per_tok": 2}),
        );
        let map = |o: GrowthOptions| GrowthMap::new(&c, &o).unwrap();
        let m = map(GrowthOptions {
            ffn_factor: 3,
            ..options()
        });
        assert_eq!(m.segment(Space::SharedFfn), Segment::tiled(24, 3));
        assert_eq!(m.dest_len(Space::Ffn), 48);
        let m = map(GrowthOptions {
            intermediate_size: Some(40),
            ..options()
        });
        assert_eq!(m.dest_len(Space::Ffn), 40);
        assert_eq!(m.segment(Space::SharedFfn), Segment::tiled(24, 2));
        assert_eq!(m.segment(Space::SharedGate), Segment::tiled(1, 1));
        assert_eq!(m.segment(Space::Experts), Segment::tiled(4, 1));
    }
}
