//! Recipe files: a growth written down, so it can be reviewed, versioned and replayed.
//!
//! A recipe holds the growth options and, as a check, the growth map they gave and the
//! source they were made for. `hyperclone plan --json` prints one under `recipe`;
//! `--recipe FILE` (JSON or YAML) reads it back. Replaying rebuilds the map from the
//! options and refuses when it differs from the recorded one (a recipe made for another
//! model), so a recipe can never silently mean something else.

use crate::error::{Error, Result};
use crate::growth_map::GrowthMap;
use crate::growth_spec::GrowthSpec;
use crate::options::GrowthOptions;
use serde_json::{json, Value};
use std::path::Path;

/// Format version of recipe files.
pub const RECIPE_VERSION: u64 = 1;

/// A parsed recipe.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// The options: the very struct the flags and the Python keywords fill, resolved and
    /// validated by the same code ([`crate::grow::plan_growth`]), so a recipe accepts and
    /// refuses exactly what the command line does.
    pub spec: GrowthSpec,
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
        // Every size resolved (what the map was built from).
        "options": GrowthSpec::of_growth(o, map),
        "growth_map": map.to_json(),
    })
}

impl Recipe {
    /// Reads a recipe file, JSON or YAML (a `plan --json` output is accepted too: its
    /// `recipe` is used).
    pub fn load(path: &Path) -> Result<Recipe> {
        let bytes = crate::limits::read_bounded(path, crate::limits::MAX_JSON_BYTES)?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| Error::format(path, "a recipe must be UTF-8 text"))?;
        // Before either parser: both recurse, and YAML takes quadratic time in the depth.
        crate::limits::check_nesting(text).map_err(|m| Error::format(path, m))?;
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(json_err) => yaml_value(text).map_err(|yaml_err| {
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
        let spec = GrowthSpec::from_map(opts).map_err(|m| bad(format!("options: {m}")))?;
        Ok(Recipe {
            spec,
            growth_map: top.remove("growth_map"),
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

/// YAML as a JSON value. A YAML float may be `.inf`, `-.inf` or `.nan` (or overflow to
/// one, `1e400`), which JSON cannot hold: converted directly they became `null`, i.e. "use
/// the default" (`snr_db: .inf` cloned at 10 dB). Such a number is refused, by its path.
fn yaml_value(text: &str) -> std::result::Result<Value, String> {
    let y: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
    if let Some(at) = non_finite(&y, "") {
        return Err(format!(
            "`{at}` is not a finite number (.inf and .nan are refused, as snr_db inf is)"
        ));
    }
    serde_json::to_value(&y).map_err(|e| e.to_string())
}

/// The path of the first non-finite number in a YAML tree.
fn non_finite(v: &serde_yaml_ng::Value, at: &str) -> Option<String> {
    use serde_yaml_ng::Value as Y;
    match v {
        Y::Number(n) => n
            .as_f64()
            .filter(|x| !x.is_finite())
            .map(|_| at.trim_start_matches('.').to_string()),
        Y::Sequence(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, x)| non_finite(x, &format!("{at}[{i}]"))),
        Y::Mapping(m) => m.iter().find_map(|(k, x)| {
            let key = match k {
                Y::String(s) => s.clone(),
                other => serde_yaml_ng::to_string(other)
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
            };
            non_finite(k, &format!("{at}.{key}")).or_else(|| non_finite(x, &format!("{at}.{key}")))
        }),
        Y::Tagged(t) => non_finite(&t.value, at),
        Y::Null | Y::Bool(_) | Y::String(_) => None,
    }
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
        let v = yaml_value(yaml).unwrap();
        let r = Recipe::from_value(Path::new("r.yaml"), v).unwrap();
        let o = &r.spec;
        assert_eq!(
            (
                o.factor.as_deref(),
                o.intermediate_size,
                o.num_hidden_layers
            ),
            (Some("2"), Some(120), Some(8))
        );
        assert!(o.keep_tied && o.variant == "noisy" && o.seed == 7);
        assert!(r.growth_map.is_none());
    }

    #[test]
    fn recipe_spec_recipe_round_trip() {
        // A recipe's options are a GrowthSpec and write back as the same mapping.
        let yaml = "hyperclone_recipe: 1\noptions:\n  factor: 3\n  intermediate_size: 97\n  \
                    num_hidden_layers: 5\n  num_attention_heads: 12\n  depth_mode: stack\n  keep_tied: true\n  \
                    variant: noisy-diagonal\n  snr_db: 12.5\n  seed: 9\n  dtype: bf16\n  shard_size: 1000000\n";
        let v = yaml_value(yaml).unwrap();
        let r = Recipe::from_value(Path::new("r.yaml"), v.clone()).unwrap();
        let back = serde_json::to_value(&r.spec).unwrap();
        assert_eq!(back, v["options"]);
        let again = Recipe::from_value(
            Path::new("r.json"),
            json!({"hyperclone_recipe": 1, "options": back}),
        )
        .unwrap();
        assert_eq!(again.spec, r.spec);
    }

    #[test]
    fn unknown_keys_and_versions_are_refused() {
        let v = json!({"hyperclone_recipe": 1, "options": {"factor": 2, "facter": 3}});
        let e = Recipe::from_value(Path::new("r.json"), v)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `facter`"), "{e}");
        let v = json!({"hyperclone_recipe": 2, "options": {"factor": 2}});
        let e = Recipe::from_value(Path::new("r.json"), v)
            .unwrap_err()
            .to_string();
        assert!(e.contains("version 1"), "{e}");
        let v = json!({"options": {"factor": 2, "seed": -1}, "hyperclone_recipe": 1});
        let e = Recipe::from_value(Path::new("r.json"), v)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("options: `seed`: invalid value: integer `-1`"),
            "{e}"
        );
    }

    #[test]
    fn non_finite_yaml_numbers_are_refused_by_path() {
        for (text, at) in [
            (
                "hyperclone_recipe: 1\noptions: {factor: 2, snr_db: .inf}\n",
                "options.snr_db",
            ),
            (
                "hyperclone_recipe: 1\noptions: {factor: 2, snr_db: -.INF}\n",
                "options.snr_db",
            ),
            (
                "hyperclone_recipe: 1\noptions: {factor: 2, seed: .nan}\n",
                "options.seed",
            ),
            (
                "hyperclone_recipe: 1\noptions: {factor: 2, shard_size: +.inf}\n",
                "options.shard_size",
            ),
            (
                "{\"hyperclone_recipe\": 1, \"options\": {\"factor\": .Inf}}",
                "options.factor",
            ),
            ("a: [1, .NaN]\n", "a[1]"),
        ] {
            let e = yaml_value(text).unwrap_err();
            assert!(e.contains(&format!("`{at}`")), "{text}: {e}");
        }
        assert!(yaml_value("a: 1.5e3\n").is_ok());
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
