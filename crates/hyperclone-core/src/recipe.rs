//! Recipe files: a growth written down, so it can be reviewed, versioned and replayed.
//!
//! A recipe holds the growth options and, as a check, the growth map they gave and the
//! source they were made for. `hyperclone plan --json` prints one under `recipe`;
//! `--recipe FILE` (JSON or YAML) reads it back. Replaying rebuilds the map from the
//! options and refuses when it differs from the recorded one (a recipe made for another
//! model), so a recipe can never silently mean something else.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::growth_map::{DepthMode, GrowthMap};
use crate::kernel::Variant;
use crate::plan::GrowthOptions;
use serde_json::{json, Map, Value};
use std::path::Path;

/// Format version of recipe files.
pub const RECIPE_VERSION: u64 = 1;

/// A parsed recipe.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub options: GrowthOptions,
    /// The growth map recorded with the recipe, if any (checked when replayed).
    pub growth_map: Option<Value>,
    /// The source's config.json sha256 recorded with the recipe, if any.
    pub source_config_sha256: Option<String>,
}

/// The recipe of a planned growth.
pub fn recipe_json(
    model_type: &str,
    config_sha256: &str,
    o: &GrowthOptions,
    map: &GrowthMap,
) -> Value {
    json!({
        "hyperclone_recipe": RECIPE_VERSION,
        "source": {"model_type": model_type, "config_sha256": config_sha256},
        "options": options_json(o, map),
        "growth_map": map.to_json(),
    })
}

/// The options with every size resolved (what the map was built from).
pub fn options_json(o: &GrowthOptions, map: &GrowthMap) -> Value {
    json!({
        "factor": o.factor,
        "intermediate_size": map.dest_len(crate::family::Space::Ffn),
        "num_hidden_layers": map.layers.len(),
        "num_attention_heads": map.heads(),
        "depth_mode": o.depth_mode.name(),
        "keep_tied": o.keep_tied,
        "variant": o.variant.name(),
        "snr_db": o.snr_db,
        "seed": o.seed,
        "dtype": o.dtype.map(|d| d.torch_name()).unwrap_or("keep"),
        "shard_size": o.shard_size,
    })
}

impl Recipe {
    /// Reads a recipe file, JSON or YAML (a `plan --json` output is accepted too: its
    /// `recipe` is used).
    pub fn load(path: &Path) -> Result<Recipe> {
        let bytes = crate::limits::read_bounded(path, crate::limits::MAX_JSON_BYTES)?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| Error::format(path, "a recipe must be UTF-8 text"))?;
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(json_err) => serde_yaml_ng::from_str(text).map_err(|yaml_err| {
                Error::format(
                    path,
                    format!("is neither JSON ({json_err}) nor YAML ({yaml_err})"),
                )
            })?,
        };
        Recipe::from_value(path, value)
    }

    pub fn from_value(path: &Path, value: Value) -> Result<Recipe> {
        let bad = |m: String| Error::format(path, m);
        let Value::Object(mut top) = value else {
            return Err(bad("a recipe must be a mapping".into()));
        };
        if let Some(Value::Object(inner)) = top.remove("recipe") {
            top = inner;
        }
        match top.get("hyperclone_recipe") {
            Some(v) if v.as_u64() == Some(RECIPE_VERSION) => {}
            Some(v) => {
                return Err(bad(format!(
                    "hyperclone_recipe {v}: this hyperclone reads version {RECIPE_VERSION}"
                )))
            }
            None => {
                return Err(bad(
                    "has no `hyperclone_recipe: 1` key; is it a recipe?".into()
                ))
            }
        }
        let Some(Value::Object(opts)) = top.get("options") else {
            return Err(bad("has no `options` mapping".into()));
        };
        let options = parse_options(opts).map_err(|m| bad(format!("options: {m}")))?;
        Ok(Recipe {
            options,
            growth_map: top.get("growth_map").cloned(),
            source_config_sha256: top
                .get("source")
                .and_then(|s| s.get("config_sha256"))
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    /// Refuses a recipe whose recorded map is not what its options give for this source.
    pub fn check_map(&self, path: &Path, map: &GrowthMap) -> Result<()> {
        let Some(recorded) = &self.growth_map else {
            return Ok(());
        };
        let now = map.to_json();
        if let Some(at) = first_difference(recorded, &now, "growth_map") {
            return Err(Error::Options(format!(
                "{}: the recipe's growth map differs from what its options give for this source at `{at}` (a \
                 recipe made for another model?); remove `growth_map` from the file to accept the new map",
                path.display()
            )));
        }
        Ok(())
    }
}

fn parse_options(o: &Map<String, Value>) -> std::result::Result<GrowthOptions, String> {
    const KNOWN: [&str; 11] = [
        "factor",
        "num_attention_heads",
        "intermediate_size",
        "num_hidden_layers",
        "depth_mode",
        "keep_tied",
        "variant",
        "snr_db",
        "seed",
        "dtype",
        "shard_size",
    ];
    if let Some(k) = o.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(format!("unknown key `{k}` (known: {})", KNOWN.join(", ")));
    }
    let uint = |k: &str| -> std::result::Result<Option<u64>, String> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|&x| x > 0)
                .map(Some)
                .ok_or_else(|| format!("`{k}` must be a positive integer, found {v}")),
        }
    };
    let size = |k: &str| -> std::result::Result<Option<usize>, String> {
        uint(k)?
            .map(|x| usize::try_from(x).map_err(|_| format!("`{k}` {x} is too large")))
            .transpose()
    };
    let text = |k: &str| -> std::result::Result<Option<&str>, String> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(format!("`{k}` must be a string, found {v}")),
        }
    };
    let d = GrowthOptions::default();
    let factor = size("factor")?.ok_or("`factor` is required")?;
    let variant = match text("variant")? {
        None => d.variant,
        Some(s) => Variant::parse(s).ok_or_else(|| {
            format!("unknown variant `{s}` (symmetric, noisy, diagonal, noisy-diagonal)")
        })?,
    };
    let depth_mode = match text("depth_mode")? {
        None => d.depth_mode,
        Some(s) => DepthMode::parse(s)
            .ok_or_else(|| format!("unknown depth_mode `{s}` (identity, stack)"))?,
    };
    let dtype = match text("dtype")? {
        None | Some("keep") => None,
        Some(s) => Some(DType::parse(s).ok_or_else(|| format!("unknown dtype `{s}`"))?),
    };
    let snr_db = match o.get("snr_db") {
        None | Some(Value::Null) => d.snr_db,
        Some(v) => v
            .as_f64()
            .ok_or_else(|| format!("`snr_db` must be a number, found {v}"))?,
    };
    let keep_tied = match o.get("keep_tied") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => return Err(format!("`keep_tied` must be true or false, found {v}")),
    };
    let seed = match o.get("seed") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_u64()
            .ok_or_else(|| format!("`seed` must be a non-negative integer, found {v}"))?,
    };
    Ok(GrowthOptions {
        factor,
        ffn_factor: factor,
        intermediate_size: size("intermediate_size")?,
        num_layers: size("num_hidden_layers")?,
        num_heads: size("num_attention_heads")?,
        depth_mode,
        keep_tied,
        variant,
        snr_db,
        seed,
        dtype,
        shard_size: uint("shard_size")?.unwrap_or(d.shard_size),
    })
}

/// The path of the first place two JSON values differ (numbers compared as f64).
fn first_difference(a: &Value, b: &Value, at: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, va) in x {
                let here = format!("{at}.{k}");
                match y.get(k) {
                    None => return Some(here),
                    Some(vb) => {
                        if let Some(d) = first_difference(va, vb, &here) {
                            return Some(d);
                        }
                    }
                }
            }
            y.keys()
                .find(|k| !x.contains_key(*k))
                .map(|k| format!("{at}.{k}"))
        }
        (Value::Array(x), Value::Array(y)) => {
            if x.len() != y.len() {
                return Some(format!("{at} (length {} vs {})", x.len(), y.len()));
            }
            x.iter()
                .zip(y)
                .enumerate()
                .find_map(|(i, (va, vb))| first_difference(va, vb, &format!("{at}[{i}]")))
        }
        (Value::Number(x), Value::Number(y)) => (x.as_f64() != y.as_f64()).then(|| at.to_string()),
        _ => (a != b).then(|| at.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_round_trip_through_json_and_yaml() {
        let yaml = "hyperclone_recipe: 1\noptions:\n  factor: 2\n  intermediate_size: 120\n  num_hidden_layers: 8\n  \
                    keep_tied: true\n  variant: noisy\n  seed: 7\n";
        let v: Value = serde_yaml_ng::from_str(yaml).unwrap();
        let r = Recipe::from_value(Path::new("r.yaml"), v).unwrap();
        let o = r.options;
        assert_eq!(
            (o.factor, o.intermediate_size, o.num_layers),
            (2, Some(120), Some(8))
        );
        assert!(o.keep_tied && o.variant == Variant::Noisy && o.seed == 7);
        assert!(r.growth_map.is_none());
    }

    #[test]
    fn unknown_keys_and_versions_are_refused() {
        let v = json!({"hyperclone_recipe": 1, "options": {"factor": 2, "facter": 3}});
        let e = Recipe::from_value(Path::new("r.json"), v)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key `facter`"), "{e}");
        let v = json!({"hyperclone_recipe": 2, "options": {"factor": 2}});
        let e = Recipe::from_value(Path::new("r.json"), v)
            .unwrap_err()
            .to_string();
        assert!(e.contains("version 1"), "{e}");
        let v = json!({"options": {"factor": 0}, "hyperclone_recipe": 1});
        let e = Recipe::from_value(Path::new("r.json"), v)
            .unwrap_err()
            .to_string();
        assert!(e.contains("positive integer"), "{e}");
    }

    #[test]
    fn differences_are_located() {
        let a = json!({"spaces": {"ffn": {"dest": 96}}, "layers": [1, 2]});
        let b = json!({"spaces": {"ffn": {"dest": 120}}, "layers": [1, 2]});
        assert_eq!(first_difference(&a, &b, "m").unwrap(), "m.spaces.ffn.dest");
        assert_eq!(first_difference(&a, &a, "m"), None);
        assert!(first_difference(&json!([1]), &json!([1, 2]), "m")
            .unwrap()
            .contains("length"));
        assert_eq!(first_difference(&json!(1.0), &json!(1), "m"), None);
    }
}
