//! What made a clone: recorded in every shard's `__metadata__` and in the model card, so a
//! grown checkpoint can always be traced to its source and reproduced.
//!
//! The record depends only on the source's content and the growth options, never on the
//! machine: no absolute path, no command line as typed. The CLI and the Python API therefore
//! write byte-identical files for the same source and options.
//!
//! The source is named by [`source_name`]: `ORG/NAME` when the folder is a Hugging Face cache
//! snapshot (`.../models--ORG--NAME/snapshots/REV`), else the folder's own name. config.json's
//! `_name_or_path` is not used: a fine-tune saved by transformers keeps its parent's name
//! there, which would credit the wrong model.

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::family::Component;
use crate::options::GrowthOptions;
use crate::plan::Plan;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The Hub's `base_model_relation` of a clone. Its allowed values are `adapter`, `merge`,
/// `quantized` and `finetune`. A clone is not an adapter (it loads alone), not a merge (one
/// parent) and not a quantization (same or wider dtype, more parameters): it is a full set of
/// weights derived from the base model's and meant to be trained further, which is what the
/// Hub files under `finetune`.
pub const BASE_MODEL_RELATION: &str = "finetune";

#[derive(Debug, Clone)]
pub struct Provenance {
    /// The source's name (see [`source_name`]); never a path.
    pub source: String,
    pub config_sha256: String,
    pub headers_sha256: String,
    /// The YAML front matter of the source's README.md, without its `---` lines.
    pub source_front_matter: Option<String>,
    /// The source's FFN width and layer count, to spell the options out in sizes.
    pub source_intermediate_size: usize,
    pub source_layers: usize,
    pub source_heads: usize,
}

impl Provenance {
    pub fn of(ckpt: &Checkpoint) -> Result<Self> {
        let (source, source_front_matter) = if ckpt.in_memory() {
            ("in-memory state dict".to_string(), None)
        } else {
            (source_name(&ckpt.dir), read_front_matter(&ckpt.dir))
        };
        Ok(Provenance {
            source,
            config_sha256: ckpt.config_sha256()?,
            headers_sha256: ckpt.headers_sha256(),
            source_front_matter,
            source_intermediate_size: ckpt.config.intermediate_size,
            source_layers: ckpt.config.num_hidden_layers,
            source_heads: ckpt.config.num_attention_heads,
        })
    }

    /// The `__metadata__` of every output shard. `format: pt` is what transformers requires
    /// to load a safetensors file.
    pub fn metadata(&self, o: &GrowthOptions) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("format".into(), "pt".into());
        m.insert("hyperclone.version".into(), TOOL_VERSION.into());
        m.insert("hyperclone.source".into(), self.source.clone());
        m.insert(
            "hyperclone.source_config_sha256".into(),
            self.config_sha256.clone(),
        );
        m.insert(
            "hyperclone.source_headers_sha256".into(),
            self.headers_sha256.clone(),
        );
        m.insert("hyperclone.factor".into(), o.factor.to_string());
        // The FFN width; the factor only when it is a whole one (Net2Net widths have none).
        let ffn = o
            .intermediate_size
            .unwrap_or(self.source_intermediate_size.saturating_mul(o.ffn_factor));
        m.insert("hyperclone.intermediate_size".into(), ffn.to_string());
        if self.source_intermediate_size > 0 && ffn.is_multiple_of(self.source_intermediate_size) {
            m.insert(
                "hyperclone.ffn_factor".into(),
                (ffn / self.source_intermediate_size).to_string(),
            );
        }
        m.insert("hyperclone.variant".into(), o.variant.name().into());
        m.insert("hyperclone.snr_db".into(), o.snr_db.to_string());
        m.insert("hyperclone.seed".into(), o.seed.to_string());
        m.insert("hyperclone.command".into(), self.command(o));
        m
    }

    /// [`canonical_command`] for this source.
    pub fn command(&self, o: &GrowthOptions) -> String {
        canonical_command(
            o,
            self.source_intermediate_size,
            self.source_layers,
            self.source_heads,
        )
    }
}

/// The options as the one `hyperclone clone` command that reproduces them, every choice
/// spelled out and every size resolved against the source (its FFN width and layer count):
/// SRC is the source named in `hyperclone.source`, DST any folder. `--ffn-factor 2` and
/// `--intermediate-size` of twice the source's give the same files, so the same command.
/// Depth, tying and noise flags appear only where they change something.
pub fn canonical_command(
    o: &GrowthOptions,
    source_ffn: usize,
    source_layers: usize,
    source_heads: usize,
) -> String {
    let ffn = o
        .intermediate_size
        .unwrap_or(source_ffn.saturating_mul(o.ffn_factor));
    let mut s = format!(
        "hyperclone clone SRC DST --factor {} --intermediate-size {ffn}",
        o.factor
    );
    if let Some(h) = o
        .num_heads
        .filter(|&h| Some(h) != source_heads.checked_mul(o.factor))
    {
        let _ = write!(s, " --num-attention-heads {h}");
    }
    let layers = o.num_layers.unwrap_or(source_layers);
    if layers != source_layers {
        let _ = write!(
            s,
            " --num-hidden-layers {layers} --depth-mode {}",
            o.depth_mode.name()
        );
    }
    if o.keep_tied {
        s.push_str(" --keep-tied");
    }
    if let Some(u) = &o.upcycle {
        let _ = write!(
            s,
            " --experts {} --experts-per-token {} --expert-init {}",
            u.experts,
            u.per_token,
            u.expert_init.name()
        );
        if let crate::upcycle::ExpertInit::Drop { ratio } = u.expert_init {
            let _ = write!(s, " --drop-ratio {ratio}");
        }
        let _ = write!(s, " --router-init {}", u.router_init.name());
    }
    let _ = write!(s, " --variant {}", o.variant.name());
    // The seed also draws the upcycle's dropped neurons and router.
    let seeded = o.upcycle.is_some_and(|u| {
        u.expert_init != crate::upcycle::ExpertInit::Copy
            || u.router_init != crate::upcycle::RouterInit::Zero
    });
    if o.variant.is_noisy() {
        let _ = write!(s, " --snr-db {} --seed {}", o.snr_db, o.seed);
    } else if seeded {
        let _ = write!(s, " --seed {}", o.seed);
    }
    let dtype = match o.dtype {
        None => "keep",
        Some(crate::DType::F64) => "f64",
        Some(crate::DType::F32) => "f32",
        Some(crate::DType::BF16) => "bf16",
        Some(crate::DType::F16) => "f16",
    };
    let _ = write!(s, " --dtype {dtype} --shard-size {}", o.shard_size);
    s
}

/// The source's name: `ORG/NAME` for a Hugging Face cache snapshot
/// (`.../models--ORG--NAME/snapshots/REV`), else the folder's own name (after resolving
/// `.` and links), else `model`.
pub fn source_name(dir: &Path) -> String {
    let abs = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let parts: Vec<String> = abs
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.len() >= 3 && parts[parts.len() - 2] == "snapshots" {
        if let Some(repo) = parts[parts.len() - 3].strip_prefix("models--") {
            let id = repo.replacen("--", "/", 1);
            if !id.is_empty() {
                return id;
            }
        }
    }
    abs.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "model".to_string())
}

/// The front matter of DIR/README.md (between a first line `---` and the next `---`), if the
/// file is a small regular file that has one.
fn read_front_matter(dir: &Path) -> Option<String> {
    let path = dir.join("README.md");
    let bytes = crate::limits::read_bounded(&path, crate::limits::MAX_JSON_BYTES).ok()?;
    front_matter(&String::from_utf8_lossy(&bytes))
}

fn front_matter(readme: &str) -> Option<String> {
    let text = readme.strip_prefix('\u{feff}').unwrap_or(readme);
    let mut lines = text.lines();
    if lines.next()?.trim_end() != "---" {
        return None;
    }
    let mut body = String::new();
    for line in lines {
        if line.trim_end() == "---" {
            return Some(body);
        }
        body.push_str(line);
        body.push('\n');
    }
    None
}

/// Top-level keys of the source's card the clone does not inherit: its own base model and
/// relation (replaced by the source itself) and its evaluation results (not the clone's).
const NOT_INHERITED: &[&str] = &["base_model", "base_model_relation", "model-index"];

/// The clone's front matter: the source's top-level keys in their order (license, language,
/// datasets, ...), with `tags` extended by `hyperclone` and `hypercloning`, `library_name`
/// defaulting to transformers, and `base_model` / `base_model_relation` naming the source.
/// The source's front matter is read and written by serde_yaml_ng: values are kept, their
/// spelling is the serializer's (flow lists become block lists, comments go). A source
/// front matter that is not a YAML mapping is not inherited.
pub fn card_front_matter(prov: &Provenance) -> String {
    use serde_yaml_ng::{Mapping, Value as Y};
    let source: Mapping = prov
        .source_front_matter
        .as_deref()
        .and_then(|text| serde_yaml_ng::from_str::<Y>(text).ok())
        .and_then(|v| match v {
            Y::Mapping(m) => Some(m),
            _ => None,
        })
        .unwrap_or_default();
    let key = |k: &str| Y::String(k.to_string());
    let mut card = Mapping::new();
    if !source.contains_key(key("library_name")) {
        card.insert(key("library_name"), key("transformers"));
    }
    let mut has_tags = false;
    for (k, v) in source {
        if k.as_str().is_some_and(|k| NOT_INHERITED.contains(&k)) {
            continue;
        }
        let v = if k.as_str() == Some("tags") {
            has_tags = true;
            with_our_tags(v)
        } else {
            v
        };
        card.insert(k, v);
    }
    if !has_tags {
        card.insert(key("tags"), with_our_tags(Y::Null));
    }
    card.insert(key("base_model"), key(&prov.source));
    card.insert(key("base_model_relation"), key(BASE_MODEL_RELATION));
    let body =
        serde_yaml_ng::to_string(&Y::Mapping(card)).expect("a mapping of YAML values serializes");
    format!("---\n{body}---\n")
}

/// The source's `tags` (a list, one tag, or none) as a list ending with ours.
fn with_our_tags(tags: serde_yaml_ng::Value) -> serde_yaml_ng::Value {
    use serde_yaml_ng::Value as Y;
    let mut list = match tags {
        Y::Sequence(s) => s,
        Y::Null => Vec::new(),
        one => vec![one],
    };
    for t in ["hyperclone", "hypercloning"] {
        if !list.iter().any(|x| x.as_str() == Some(t)) {
            list.push(Y::String(t.to_string()));
        }
    }
    Y::Sequence(list)
}

/// The README.md model card of a clone.
pub fn model_card(ckpt: &Checkpoint, plan: &Plan, prov: &Provenance) -> String {
    let o = &plan.options;
    let cfg = &ckpt.config;
    let mut s = card_front_matter(prov);
    let _ = writeln!(s, "\n# HyperCloned from `{}`\n", prov.source);
    let map = &plan.map;
    // The stream's divisor with a kept tie: n, or sqrt(n) (Gemma), see Family::tied_eps_divisor.
    let divisor = if map.tied_eps_divisor == o.factor.saturating_mul(o.factor) {
        o.factor.to_string()
    } else {
        format!("sqrt({})", map.tied_eps_divisor)
    };
    let stream = if map.keep_tied {
        format!(
            "{} stacked copies of the source's, divided by {divisor}",
            o.factor
        )
    } else {
        format!("{} stacked copies of the source's", o.factor)
    };
    let _ = writeln!(
        s,
        // The project has no public address, so it is named without a link; the link is
        // the method's paper, labelled as such.
        "This checkpoint was grown with hyperclone {TOOL_VERSION}, an implementation of HyperCloning \
         ([Samragh et al., 2024](https://arxiv.org/abs/2409.12903)): every weight of the \
         source `{}` model was tiled so that this wider model {} (each hidden vector is {stream}). Continue \
         pre-training from here.\n",
        cfg.family.model_type,
        if map.preserves_function() {
            "computes the same function"
        } else if map.upcycle.as_ref().is_some_and(|u| u.not_exact_because().is_some()) {
            "starts from the source's weights (its upcycled experts or router do not preserve the function)"
        } else {
            "starts from the source's weights (its repeated layers do not preserve the function)"
        }
    );
    let _ = writeln!(s, "| | source | clone |\n|---|---|---|");
    for c in &plan.changes {
        let _ = writeln!(s, "| `{}` | {} | {} |", c.key, c.before, c.after);
    }
    for comp in Component::ALL {
        let b = plan.params_before.get(&comp).copied().unwrap_or(0);
        let a = plan.params_after.get(&comp).copied().unwrap_or(0);
        let _ = writeln!(s, "| parameters: {} | {b} | {a} |", comp.name());
    }
    let before: u64 = plan.params_before.values().sum();
    let after: u64 = plan.params_after.values().sum();
    if map.upcycle.is_some() {
        let _ = writeln!(s, "| parameters: total | {before} | {after} |");
        let _ = writeln!(
            s,
            "| parameters: active per token | {before} | {} |\n",
            plan.active_params()
        );
    } else {
        let _ = writeln!(s, "| parameters: total | {before} | {after} |\n");
    }
    let _ = writeln!(s, "## Recipe\n");
    let _ = writeln!(s, "- source: `{}`", prov.source);
    let heads = map.heads();
    let whole_heads = map.heads_follow_factor();
    let _ = writeln!(
        s,
        "- factor (hidden{}): {}",
        if whole_heads { ", heads" } else { "" },
        o.factor
    );
    let ffn = map.segment(crate::family::Space::Ffn);
    if ffn.extra == 0 {
        let _ = writeln!(s, "- FFN factor: {}", ffn.copies);
    } else {
        let _ = writeln!(
            s,
            "- FFN: {} -> {} units (Net2Net: the first {} units have {} copies, the rest {}; readers divide by each \
             unit's count)",
            ffn.len,
            ffn.dest_len(),
            ffn.extra,
            ffn.copies + 1,
            ffn.copies
        );
    }
    if !whole_heads {
        let _ = writeln!(
            s,
            "- attention heads: {} -> {heads} (head_dim {} kept; whole heads copied, the first {} once more, with \
             the kv heads of their groups)",
            cfg.num_attention_heads,
            cfg.head_dim,
            heads % cfg.num_attention_heads
        );
    }
    if map.grows_depth() {
        let _ = writeln!(
            s,
            "- layers: {} -> {} ({})",
            cfg.num_hidden_layers,
            map.layers.len(),
            match map.depth_mode {
                crate::growth_map::DepthMode::Identity =>
                    "LLaMA Pro identity blocks, each a copy of the layer before it with its residual writers zeroed",
                crate::growth_map::DepthMode::Stack =>
                    "the whole stack repeated (G_stack); not function-preserving",
            }
        );
    }
    if let Some(u) = &map.upcycle {
        let _ = writeln!(s, "- upcycled to {}: {}", u.target, upcycle_line(u));
    }
    if map.keep_tied {
        let _ = writeln!(
            s,
            "- tied embedding kept: the residual stream is carried as tile(h)/{divisor}, norm eps divided by {}",
            map.tied_eps_divisor
        );
    }
    let _ = writeln!(s, "- variant: {}", o.variant.name());
    if o.variant.is_noisy() {
        let _ = writeln!(s, "- noise: {} dB SNR per block, seed {}", o.snr_db, o.seed);
    }
    let _ = writeln!(s, "- source config.json sha256: `{}`", prov.config_sha256);
    let _ = writeln!(
        s,
        "- source tensor headers sha256: `{}`",
        prov.headers_sha256
    );
    let _ = writeln!(s, "- command: `{}`\n", prov.command(o));
    let _ = writeln!(
        s,
        "The same source and options reproduce these files byte for byte (from the command line or \
         `hyperclone.clone` in Python). The recipe is also stored in the `__metadata__` of every \
         safetensors file (keys `hyperclone.*`)."
    );
    s
}

/// The model card's line on an upcycle: what the experts and router are, and whether the
/// function is kept.
fn upcycle_line(u: &crate::upcycle::Upcycle) -> String {
    use crate::upcycle::{ExpertInit, RouterInit};
    let experts = match u.expert_init {
        ExpertInit::Copy => "each a copy of the dense MLP".to_string(),
        ExpertInit::Drop { ratio } => format!(
            "each the dense MLP with a seeded {ratio} of its intermediate neurons re-drawn from the weights' \
             mean and std (Drop-Upcycling)"
        ),
    };
    let router = match u.router_init {
        RouterInit::Zero => "a zero router (uniform routing)",
        RouterInit::Normal => "a router drawn from N(0, initializer_range^2)",
    };
    let exact = match u.not_exact_because() {
        None => "the top-k weights renormalised over identical experts sum to 1, so the dense function is kept \
                 exactly"
            .to_string(),
        Some(why) => format!("NOT function-preserving: {why}"),
    };
    format!(
        "{} experts per layer, {} per token, {experts}, with {router}; {exact}",
        u.experts, u.per_token
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prov(front: Option<&str>, source: &str) -> Provenance {
        Provenance {
            source: source.into(),
            config_sha256: "c".into(),
            headers_sha256: "h".into(),
            source_front_matter: front.map(String::from),
            source_intermediate_size: 48,
            source_layers: 2,
            source_heads: 4,
        }
    }

    #[test]
    fn front_matter_is_found_only_at_the_top() {
        assert_eq!(
            front_matter("---\nlicense: mit\n---\n# x\n").as_deref(),
            Some("license: mit\n")
        );
        assert_eq!(front_matter("# x\n---\nlicense: mit\n---\n"), None);
        assert_eq!(front_matter("---\nlicense: mit\n"), None, "unclosed");
    }

    #[test]
    fn card_keeps_source_keys_and_names_the_base_model() {
        let src = "license: apache-2.0\nlanguage:\n- en\n- fr\ntags:\n- text-generation\n- hyperclone\n\
                   base_model: someone/its-parent\nbase_model_relation: quantized\nmodel-index:\n- name: x\n  results: []\n\
                   datasets: [a, b]\n";
        let fm = card_front_matter(&prov(Some(src), "HuggingFaceTB/SmolLM2-135M"));
        assert_eq!(
            fm,
            "---\nlibrary_name: transformers\nlicense: apache-2.0\nlanguage:\n- en\n- fr\ntags:\n- text-generation\n\
             - hyperclone\n- hypercloning\ndatasets:\n- a\n- b\nbase_model: HuggingFaceTB/SmolLM2-135M\n\
             base_model_relation: finetune\n---\n"
        );
    }

    #[test]
    fn card_without_source_card_and_odd_names() {
        let fm = card_front_matter(&prov(None, "my model: v2"));
        assert_eq!(
            fm,
            "---\nlibrary_name: transformers\ntags:\n- hyperclone\n- hypercloning\n\
             base_model: 'my model: v2'\nbase_model_relation: finetune\n---\n"
        );
        // Whatever the name, the card parses back to it.
        for name in ["my model: v2", "- x", "'q'", "a\nb", "yes", "1e3"] {
            let fm = card_front_matter(&prov(None, name));
            let body = fm
                .strip_prefix("---\n")
                .unwrap()
                .strip_suffix("---\n")
                .unwrap();
            let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(body).unwrap();
            assert_eq!(v["base_model"].as_str(), Some(name), "{fm}");
        }
        let fm = card_front_matter(&prov(
            Some("library_name: mlx\ntags: [\"a\", hyperclone]\n"),
            "x",
        ));
        assert_eq!(
            fm,
            "---\nlibrary_name: mlx\ntags:\n- a\n- hyperclone\n- hypercloning\nbase_model: x\n\
             base_model_relation: finetune\n---\n"
        );
        // One tag as a scalar becomes a list; a front matter that is not a mapping is not
        // inherited.
        let fm = card_front_matter(&prov(Some("tags: chat\n"), "x"));
        assert!(
            fm.contains("tags:\n- chat\n- hyperclone\n- hypercloning\n"),
            "{fm}"
        );
        let fm = card_front_matter(&prov(Some("- just\n- a list\n"), "x"));
        assert_eq!(fm, card_front_matter(&prov(None, "x")));
    }

    #[test]
    fn source_names_never_hold_a_path() {
        let tmp = std::env::temp_dir().join(format!("hc-prov-{}", std::process::id()));
        let snap = tmp.join("hub/models--Org--Name-1B/snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        assert_eq!(source_name(&snap), "Org/Name-1B");
        assert_eq!(source_name(&tmp.join("hub")), "hub");
        assert_eq!(source_name(&snap.join("..").join("abc123")), "Org/Name-1B");
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn canonical_command_spells_out_every_option() {
        let mut o = GrowthOptions {
            factor: 2,
            ffn_factor: 3,
            seed: 7,
            ..GrowthOptions::default()
        };
        assert_eq!(
            canonical_command(&o, 48, 2, 4),
            "hyperclone clone SRC DST --factor 2 --intermediate-size 144 --variant symmetric --dtype keep --shard-size 5000000000"
        );
        o.variant = crate::Variant::Noisy;
        o.dtype = Some(crate::DType::BF16);
        o.intermediate_size = Some(100);
        o.num_layers = Some(4);
        o.keep_tied = true;
        assert_eq!(
            canonical_command(&o, 48, 2, 4),
            "hyperclone clone SRC DST --factor 2 --intermediate-size 100 --num-hidden-layers 4 --depth-mode identity \
             --keep-tied --variant noisy --snr-db 10 --seed 7 --dtype bf16 --shard-size 5000000000"
        );
        o.num_layers = Some(2);
        assert!(!canonical_command(&o, 48, 2, 4).contains("layers"));
    }
}
