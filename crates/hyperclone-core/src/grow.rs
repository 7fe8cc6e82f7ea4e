//! Clone orchestration shared by the CLI and the Python package: a [`Growth`] (a
//! [`GrowthSpec`] or a recipe file) into a plan, opening and planning a source, cloning to disk, growing in memory, and the
//! JSON summary of a plan. Front ends add only flag parsing, progress and printing.

use crate::checkpoint::{Checkpoint, MemoryTensor};
use crate::error::{Error, Result};
use crate::family::Component;
use crate::growth_spec::GrowthSpec;
use crate::options::GrowthOptions;
use crate::output_guard::Inputs;
use crate::plan::Plan;
use crate::provenance::{model_card, Provenance};
use crate::recipe::{recipe_json, Recipe};
use crate::write::Progress;
use crate::write::{grow_tensors, write_clone, CloneOutcome, GrownTensor, WriteEnv};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// A growth: the options themselves, or a recipe file holding them (the whole growth; the
/// file is read once, by [`plan_growth`]).
#[derive(Debug, Clone)]
pub enum Growth {
    Spec(GrowthSpec),
    Recipe(PathBuf),
}

impl From<GrowthSpec> for Growth {
    fn from(spec: GrowthSpec) -> Growth {
        Growth::Spec(spec)
    }
}

/// Opens SRC and plans its growth; the provenance is what goes into the files.
pub fn open_and_plan(
    src: &Path,
    growth: &Growth,
    progress: &dyn Progress,
) -> Result<(Checkpoint, Plan, Provenance)> {
    let ckpt = Checkpoint::open(src)?;
    let (plan, prov) = plan_growth(&ckpt, growth, progress)?;
    Ok((ckpt, plan, prov))
}

/// The one way from a growth to a plan: resolve the spec (a recipe's read once, its errors
/// naming the file), plan (which validates the options), and hold a recipe's recorded
/// growth map to the plan's. `progress` hears what is worth a note.
pub fn plan_growth(
    ckpt: &Checkpoint,
    growth: &Growth,
    progress: &dyn Progress,
) -> Result<(Plan, Provenance)> {
    let path = match growth {
        Growth::Spec(spec) => return plan_with(ckpt, &spec.resolve(&ckpt.config)?),
        Growth::Recipe(path) => path,
    };
    let recipe = Recipe::load(path)?;
    let in_recipe = |e: Error| match e {
        Error::Options(m) => Error::Options(format!(
            "{}: {m} (a recipe's options are checked as the flags are)",
            path.display()
        )),
        other => other,
    };
    let options = recipe.spec.resolve(&ckpt.config).map_err(in_recipe)?;
    let (plan, prov) = plan_with(ckpt, &options).map_err(in_recipe)?;
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
    Ok((plan, prov))
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
    growth: &Growth,
    force: bool,
    env: &WriteEnv,
) -> Result<Cloned> {
    // The recipe is an input too: DST must neither be it nor hold it (`force` replaces
    // DST, never an input). SRC is checked by write_clone with its own messages.
    if let Growth::Recipe(recipe) = growth {
        Inputs::new().add(recipe).check_output("DST", dst)?;
    }
    let (ckpt, plan, prov) = open_and_plan(src, growth, env.progress)?;
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
    growth: &Growth,
    allow_nonfinite: bool,
    cancel: &AtomicBool,
) -> Result<GrownInMemory> {
    let ckpt = Checkpoint::from_memory(config_json, tensors)?;
    let (plan, _) = plan_growth(&ckpt, growth, &crate::write::NoProgress)?;
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
        // Parameters a token runs through (an upcycled MoE layer runs k of its E experts).
        "params_active_per_token": plan.active_params(),
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
