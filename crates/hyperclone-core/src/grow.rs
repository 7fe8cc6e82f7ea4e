//! Clone orchestration shared by the CLI and the Python package: growth options from the
//! user's words, opening and planning a source, cloning to disk, growing in memory, and the
//! JSON summary of a plan. Front ends add only flag parsing, progress and printing.

use crate::checkpoint::{Checkpoint, MemoryTensor};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::family::Component;
use crate::options::{factor_for, GrowthOptions};
use crate::output_guard::Inputs;
use crate::plan::Plan;
use crate::provenance::{model_card, Provenance};
use crate::recipe::{recipe_json, Recipe};
use crate::write::Progress;
use crate::write::{grow_tensors, write_clone, CloneOutcome, GrownTensor, WriteEnv};
use crate::{DType, DepthMode, Variant};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

/// Growth as a user asks for it, in the CLI's terms (flag values as typed): turned into
/// [`GrowthOptions`] against a source's config by [`GrowthRequest::resolve`], with errors
/// that name the flag and say what to give instead.
#[derive(Debug, Clone)]
pub struct GrowthRequest {
    /// `--factor`: a whole number >= 1 (as typed, so "1.5" gets its own explanation).
    pub factor: Option<String>,
    /// `--hidden-size`: the target hidden size instead of a factor.
    pub hidden_size: Option<usize>,
    /// `--ffn-factor` [default: the hidden factor].
    pub ffn_factor: Option<String>,
    /// `--intermediate-size`: the target FFN size, any F >= the source's (Net2Net when
    /// not a whole multiple).
    pub intermediate_size: Option<usize>,
    /// `--depth-factor`: multiply the layer count by K.
    pub depth_factor: Option<String>,
    /// `--num-hidden-layers`: the target layer count instead of a factor.
    pub num_hidden_layers: Option<usize>,
    /// `--depth-mode`: identity or stack.
    pub depth_mode: String,
    /// `--keep-tied`: keep a tied embedding tied.
    pub keep_tied: bool,
    /// `--recipe`: read every option from this recipe file instead (the other fields are
    /// then not used).
    pub recipe: Option<std::path::PathBuf>,
    /// `--num-attention-heads`: the destination head count (default: the source's x factor).
    pub num_attention_heads: Option<usize>,
    pub variant: String,
    pub snr_db: f64,
    pub seed: u64,
    /// `keep` or a dtype name (f32, bf16, f16, f64).
    pub dtype: String,
    /// e.g. 5GB, 500MB, 2GiB, 1048576.
    pub shard_size: String,
}

impl Default for GrowthRequest {
    /// The CLI's defaults (no factor: one must be given).
    fn default() -> Self {
        GrowthRequest {
            factor: None,
            hidden_size: None,
            ffn_factor: None,
            intermediate_size: None,
            depth_factor: None,
            num_hidden_layers: None,
            depth_mode: "identity".into(),
            keep_tied: false,
            recipe: None,
            num_attention_heads: None,
            variant: "symmetric".into(),
            snr_db: 10.0,
            seed: 0,
            dtype: "keep".into(),
            shard_size: "5GB".into(),
        }
    }
}

impl GrowthRequest {
    pub fn resolve(&self, cfg: &ModelConfig) -> Result<GrowthOptions> {
        if let Some(path) = &self.recipe {
            return Recipe::load(path)?.options(path, cfg);
        }
        let factor = match (&self.factor, self.hidden_size) {
            (Some(f), None) => parse_factor("--factor", f)?,
            (None, Some(d)) => factor_for("--hidden-size", cfg.hidden_size, d)?,
            (Some(_), Some(_)) => return Err(opt("give --factor or --hidden-size, not both")),
            (None, None) => return Err(opt("give --factor N or --hidden-size D")),
        };
        let ffn_factor = match (&self.ffn_factor, self.intermediate_size) {
            (Some(m), None) => parse_factor("--ffn-factor", m)?,
            (None, _) => factor,
            (Some(_), Some(_)) => {
                return Err(opt("give --ffn-factor or --intermediate-size, not both"))
            }
        };
        let num_layers =
            match (&self.depth_factor, self.num_hidden_layers) {
                (Some(k), None) => {
                    let k = parse_factor("--depth-factor", k)?;
                    Some(cfg.num_hidden_layers.checked_mul(k).ok_or_else(|| {
                        opt(format!("--depth-factor {k}: the layer count overflows"))
                    })?)
                }
                (None, l) => l,
                (Some(_), Some(_)) => {
                    return Err(opt("give --depth-factor or --num-hidden-layers, not both"))
                }
            };
        let variant = Variant::parse(&self.variant).ok_or_else(|| {
            let names: Vec<&str> = Variant::ALL.iter().map(|v| v.name()).collect();
            opt(format!(
                "unknown --variant `{}` (use one of {})",
                self.variant,
                names.join(", ")
            ))
        })?;
        let dtype = match self.dtype.as_str() {
            "keep" => None,
            other => Some(DType::parse(other).ok_or_else(|| {
                opt(format!(
                    "unknown --dtype {other} (use keep, f32, bf16, f16 or f64)"
                ))
            })?),
        };
        let opts = GrowthOptions {
            factor,
            ffn_factor,
            variant,
            snr_db: self.snr_db,
            seed: self.seed,
            dtype,
            shard_size: parse_size(&self.shard_size)?,
            intermediate_size: self.intermediate_size,
            num_layers,
            depth_mode: DepthMode::parse(&self.depth_mode).ok_or_else(|| {
                opt(format!(
                    "unknown --depth-mode `{}` (use identity or stack)",
                    self.depth_mode
                ))
            })?,
            keep_tied: self.keep_tied,
            num_heads: self.num_attention_heads,
        };
        opts.validate()?;
        Ok(opts)
    }
}

fn opt(message: impl Into<String>) -> Error {
    Error::Options(message.into())
}

pub fn parse_factor(flag: &str, text: &str) -> Result<usize> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err(opt(format!(
            "{flag} 0: the factor must be a whole number >= 1"
        ))),
        Ok(n) => Ok(n),
        Err(_) => Err(opt(format!(
            "{flag} {text}: the factor must be a whole number >= 1 (HyperCloning grows by whole copies; \
             fractional growth is not supported)"
        ))),
    }
}

/// "5GB" (10^9), "500MB", "2GiB" (2^30), "1048576".
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|e| {
        opt(format!(
            "--shard-size {text}: expected a size like 5GB or 500MiB: {e}"
        ))
    })?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "tb" | "t" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        _ => {
            return Err(opt(format!(
                "--shard-size {text}: unknown unit `{unit}` (use B, KB, MB, GB, KiB, MiB, GiB)"
            )))
        }
    };
    let bytes = (value * mult).round();
    if bytes < 1.0 {
        return Err(opt(format!(
            "--shard-size {text}: must be at least one byte"
        )));
    }
    Ok(bytes as u64)
}

/// Opens SRC and plans its growth; the provenance is what goes into the files. A recipe's
/// recorded growth map must match the plan's; `progress` hears what is worth a note.
pub fn open_and_plan(
    src: &Path,
    request: &GrowthRequest,
    progress: &dyn Progress,
) -> Result<(Checkpoint, Plan, Provenance)> {
    let ckpt = Checkpoint::open(src)?;
    // A recipe is read once (it may be megabytes): its options, then its recorded map.
    let recipe = match &request.recipe {
        Some(path) => Some((path, Recipe::load(path)?)),
        None => None,
    };
    let options = match &recipe {
        Some((path, r)) => r.options(path, &ckpt.config)?,
        None => request.resolve(&ckpt.config)?,
    };
    let (plan, prov) = plan_with(&ckpt, &options)?;
    if let Some((path, recipe)) = &recipe {
        recipe.check_map(path, &plan.map)?;
        if recipe
            .source_config_sha256
            .as_ref()
            .is_some_and(|sha| *sha != prov.config_sha256)
        {
            progress.notice(&format!(
                "{} was made for a source with another config.json; its growth map matches this one",
                path.display()
            ));
        }
    }
    Ok((ckpt, plan, prov))
}

/// Plans the growth of an open checkpoint with resolved options.
pub fn plan_with(ckpt: &Checkpoint, options: &GrowthOptions) -> Result<(Plan, Provenance)> {
    let prov = Provenance::of(ckpt)?;
    let plan = Plan::new(ckpt, options, &prov.metadata(options))?;
    Ok((plan, prov))
}

/// A finished clone.
pub struct Cloned {
    pub ckpt: Checkpoint,
    pub plan: Plan,
    pub outcome: CloneOutcome,
}

/// Grows SRC into DST: plan, model card, streamed write, the staged check in `env` (if
/// any), and the move into place. `force` replaces an existing DST.
pub fn clone_model(
    src: &Path,
    dst: &Path,
    request: &GrowthRequest,
    force: bool,
    env: &WriteEnv,
) -> Result<Cloned> {
    // The recipe is an input too: DST must neither be it nor hold it (`--force` replaces
    // DST, never an input). SRC is checked by write_clone with its own messages.
    if let Some(recipe) = &request.recipe {
        Inputs::new().add(recipe).check_output("DST", dst)?;
    }
    let (ckpt, plan, prov) = open_and_plan(src, request, env.progress)?;
    let card = model_card(&ckpt, &plan, &prov);
    let outcome = write_clone(&ckpt, &plan, &card, dst, force, env)?;
    Ok(Cloned {
        ckpt,
        plan,
        outcome,
    })
}

/// Grows `src` into `dst` with resolved options, without progress output (small models,
/// inside other commands). Returns the source and the plan it followed.
pub fn grow_quietly(src: &Path, dst: &Path, options: &GrowthOptions) -> Result<(Checkpoint, Plan)> {
    let ckpt = Checkpoint::open(src)?;
    let (plan, prov) = plan_with(&ckpt, options)?;
    let cancel = AtomicBool::new(false);
    let env = WriteEnv::quiet(&cancel);
    write_clone(
        &ckpt,
        &plan,
        &model_card(&ckpt, &plan, &prov),
        dst,
        false,
        &env,
    )?;
    Ok((ckpt, plan))
}

/// A state dict grown in memory and its grown config.json.
pub struct GrownInMemory {
    pub tensors: Vec<GrownTensor>,
    pub config: Map<String, Value>,
}

/// Grows a state dict held in memory (with its config.json text) exactly as [`clone_model`]
/// grows a folder: the tensors and config equal the files a clone writes for the same
/// options. Source tensors are copied once into one buffer; the grown ones are held whole.
pub fn grow_in_memory(
    config_json: &str,
    tensors: &[MemoryTensor],
    request: &GrowthRequest,
    allow_nonfinite: bool,
    cancel: &AtomicBool,
) -> Result<GrownInMemory> {
    let ckpt = Checkpoint::from_memory(config_json, tensors)?;
    let options = request.resolve(&ckpt.config)?;
    let (plan, _) = plan_with(&ckpt, &options)?;
    let tensors = grow_tensors(&ckpt, &plan, cancel, allow_nonfinite)?;
    Ok(GrownInMemory {
        tensors,
        config: plan.config,
    })
}

/// Parameter counts by component, with their total.
pub fn by_component(counts: &BTreeMap<Component, u64>) -> Value {
    let mut m = Map::new();
    for c in Component::ALL {
        m.insert(c.name().into(), counts.get(&c).copied().unwrap_or(0).into());
    }
    m.insert("total".into(), counts.values().sum::<u64>().into());
    Value::Object(m)
}

/// Worker threads a clone uses (rayon's rule: RAYON_NUM_THREADS, else all cores).
pub fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

/// The JSON object of `hyperclone plan --json` (and the start of `clone --json`'s).
pub fn plan_json(ckpt: &Checkpoint, plan: &Plan) -> Value {
    let o = &plan.options;
    json!({
        "source": ckpt.dir.display().to_string(),
        "model_type": ckpt.config.family.model_type,
        "factor": o.factor,
        "ffn_factor": o.ffn_factor,
        "variant": o.variant.name(),
        "snr_db": o.snr_db,
        "seed": o.seed,
        "dtype": o.dtype.map(|d| d.torch_name()).unwrap_or("keep"),
        "config_changes": plan.changes.iter().map(|c| json!({"key": c.key, "before": c.before, "after": c.after})).collect::<Vec<_>>(),
        "params_before": by_component(&plan.params_before),
        "params_after": by_component(&plan.params_after),
        "output_bytes": plan.output_bytes(),
        "shards": plan.shards.iter().map(|s| json!({"file": s.file_name, "tensors": s.tensors.len(), "bytes": s.header.len() as u64 + s.data_bytes})).collect::<Vec<_>>(),
        "expected_peak_memory_bytes": plan.peak_memory_bytes(threads()),
        "growth_map": plan.map.to_json(),
        "recipe": recipe_json(
            ckpt.config.family.model_type,
            &ckpt.config_sha256().unwrap_or_default(),
            o,
            &plan.map,
        ),
    })
}

/// The JSON object of `hyperclone clone --json`: the plan's, plus where and what was written.
pub fn clone_json(
    cloned: &Cloned,
    dst: &Path,
    seconds: f64,
    verification: Option<&Value>,
) -> Value {
    let out = &cloned.outcome;
    let mut v = plan_json(&cloned.ckpt, &cloned.plan);
    let m = v.as_object_mut().expect("object");
    m.insert("destination".into(), dst.display().to_string().into());
    m.insert("files".into(), json!(out.files));
    m.insert("bytes_written".into(), out.bytes_written.into());
    m.insert("seconds".into(), seconds.into());
    m.insert(
        "gb_per_s".into(),
        (out.bytes_written as f64 / seconds.max(1e-9) / 1e9).into(),
    );
    m.insert(
        "verification".into(),
        verification.cloned().unwrap_or(Value::Null),
    );
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("1.5MB").unwrap(), 1_500_000);
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn factors() {
        assert_eq!(parse_factor("--factor", "3").unwrap(), 3);
        assert!(parse_factor("--factor", "0")
            .unwrap_err()
            .to_string()
            .contains(">= 1"));
        assert!(parse_factor("--factor", "1.5")
            .unwrap_err()
            .to_string()
            .contains("whole number"));
    }
}
