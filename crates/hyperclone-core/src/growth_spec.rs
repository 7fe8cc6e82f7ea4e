//! [`GrowthSpec`]: a growth as a user asks for it, one field per option. It is the recipe
//! file's `options` mapping (serde), the CLI's growth flags (`clap::Args`, behind this
//! crate's `clap` feature) and the Python keywords (the bindings turn them into the same
//! mapping), so a new growth option is one field here, with its doc comment as the help.
//!
//! [`GrowthSpec::resolve`] checks it against a source's config and gives the resolved
//! [`GrowthOptions`]. Messages name the option (`factor`, `snr_db`), which is also the
//! recipe key and the Python keyword; the flag is the same name in kebab case.

use crate::config::ModelConfig;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::family::Space;
use crate::growth_map::GrowthMap;
use crate::kernel::Variant;
use crate::options::{factor_for, DepthMode, GrowthOptions};
use crate::upcycle::{ExpertInit, RouterInit, UpcycleOptions};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// The growth options as given. Sizes that have a factor alternative are exclusive with it
/// (`factor` or `hidden_size`, ...); whole-number factors are kept as text so `1.5` gets its
/// own explanation instead of a parser's. Field order is the recipe's key order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct GrowthSpec {
    /// Multiply the hidden size and the number of attention heads by N (head_dim is kept).
    /// Key/value heads grow N times too, except a single MQA head, which stays single.
    #[serde(with = "whole_number", skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "clap",
        arg(long, value_name = "N", conflicts_with = "hidden_size")
    )]
    pub factor: Option<String>,
    /// Alternative to --factor: the target hidden size (a whole multiple of the source's).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "clap", arg(long, value_name = "D"))]
    pub hidden_size: Option<usize>,
    /// Multiply the MLP's intermediate size by M [default: the hidden factor N].
    #[serde(with = "whole_number", skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "clap",
        arg(long, value_name = "M", conflicts_with = "intermediate_size")
    )]
    pub ffn_factor: Option<String>,
    /// Alternative to --ffn-factor: the target intermediate size, any F >= the source's.
    /// A whole multiple tiles as the paper does; otherwise the first F mod f units get one
    /// more copy than the rest (Net2Net) and their readers divide by each unit's count.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "clap", arg(long, value_name = "F"))]
    pub intermediate_size: Option<usize>,
    /// Multiply the number of layers by K (see --depth-mode).
    #[serde(with = "whole_number", skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "clap",
        arg(long, value_name = "K", conflicts_with = "num_hidden_layers")
    )]
    pub depth_factor: Option<String>,
    /// Alternative to --depth-factor: the target number of layers, any L >= the source's.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "clap", arg(long, value_name = "L"))]
    pub num_hidden_layers: Option<usize>,
    /// Target number of attention heads [default: the source's x N]. head_dim is kept; another
    /// count copies whole heads unevenly (the first H' mod H once more, with their kv heads;
    /// a multiple of the GQA group size), for families whose config states head_dim.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "clap", arg(long, value_name = "H"))]
    pub num_attention_heads: Option<usize>,
    /// How layers are added: identity = after source layers (spread evenly), copies of them
    /// whose residual writers (o_proj, down_proj, their biases) are zero, so the model's
    /// function is unchanged (LLaMA Pro); stack = the whole stack repeated (G_stack; not
    /// function-preserving, for experiments).
    #[cfg_attr(feature = "clap", arg(long, value_name = "MODE",
        default_value_t = GrowthSpec::default().depth_mode, value_parser = ["identity", "stack"]))]
    pub depth_mode: String,
    /// Keep a tied embedding tied: the residual stream is carried as tile(h)/n (embedding and
    /// residual writers x 1/n, norm eps / n^2), so logits stay exact and the clone saves
    /// vocab x hidden x n parameters. Refused, with the reason, where it cannot be exact.
    #[cfg_attr(feature = "clap", arg(long))]
    pub keep_tied: bool,
    /// Upcycle into a Mixture of Experts with E experts per layer (llama, mistral -> mixtral;
    /// qwen3 -> qwen3_moe; qwen2 -> qwen2_moe, its shared expert silent):
    /// every expert a copy of the (grown) dense MLP and the router zero, so routing is uniform
    /// and the model computes the dense model's function exactly. Combines with every other
    /// growth; other families are refused with the reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "clap", arg(long, value_name = "E"))]
    pub experts: Option<usize>,
    /// Experts each token is routed to [default: 2]. With a zero router it must be a power
    /// of two (the renormalised weights 1/K are computed in float32 by transformers).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "clap", arg(long, value_name = "K", requires = "experts"))]
    pub experts_per_token: Option<usize>,
    /// How each expert starts: copy = the dense MLP (exact); drop = Drop-Upcycling: a seeded
    /// drop_ratio of each expert's intermediate neurons re-drawn from the dense weights'
    /// mean and std (NOT function-preserving; needs router_init normal) [default: copy].
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "clap", arg(long, value_name = "INIT", requires = "experts",
        value_parser = ["copy", "drop"]))]
    pub expert_init: Option<String>,
    /// Fraction of each expert's intermediate neurons expert_init drop re-draws, in (0, 1]
    /// [default: 0.5, the paper's choice].
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "clap",
        arg(long, value_name = "R", requires = "expert_init")
    )]
    pub drop_ratio: Option<f64>,
    /// How the router starts: zero = uniform routing (exact); normal = seeded draws from
    /// N(0, initializer_range^2), so experts are picked unevenly (NOT function-preserving)
    /// [default: zero].
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "clap", arg(long, value_name = "INIT", requires = "experts",
        value_parser = ["zero", "normal"]))]
    pub router_init: Option<String>,
    /// How weights are tiled: symmetric = W/n in every block (the paper's recommendation);
    /// noisy = symmetric plus noise that cancels over copies (breaks the copies' symmetry);
    /// diagonal = W on the block diagonal, 0 elsewhere; noisy-diagonal = diagonal plus noise.
    #[cfg_attr(feature = "clap", arg(long, value_name = "V",
        default_value_t = GrowthSpec::default().variant,
        value_parser = ["symmetric", "noisy", "diagonal", "noisy-diagonal"]))]
    pub variant: String,
    /// Signal-to-noise ratio of the noisy variants, in dB, realised exactly per block; at
    /// least 0 (below, the noise outweighs the weights and rounding no longer cancels).
    #[cfg_attr(feature = "clap", arg(long, value_name = "DB",
        default_value_t = GrowthSpec::default().snr_db, allow_negative_numbers = true))]
    pub snr_db: f64,
    /// Seed of the noise; the same source, flags and seed give byte-identical output.
    #[cfg_attr(feature = "clap", arg(long, value_name = "S",
        default_value_t = GrowthSpec::default().seed))]
    pub seed: u64,
    /// Output dtype: keep each tensor's source dtype, or convert (arithmetic is f64 either way).
    #[cfg_attr(feature = "clap", arg(long, value_name = "T",
        default_value_t = GrowthSpec::default().dtype,
        value_parser = ["keep", "f32", "bf16", "f16", "f64"]))]
    pub dtype: String,
    /// Largest shard (data bytes), e.g. 5GB, 500MB, 2GiB; one `model.safetensors` when it fits.
    #[serde(with = "whole_number")]
    #[cfg_attr(feature = "clap", arg(long, value_name = "SIZE",
        default_value_t = GrowthSpec::default().shard_size))]
    pub shard_size: String,
}

impl Default for GrowthSpec {
    /// Every default in one place (the CLI shows these as its flags' defaults). No size:
    /// one must be given.
    fn default() -> Self {
        GrowthSpec {
            factor: None,
            hidden_size: None,
            ffn_factor: None,
            intermediate_size: None,
            depth_factor: None,
            num_hidden_layers: None,
            num_attention_heads: None,
            depth_mode: DepthMode::Identity.name().into(),
            keep_tied: false,
            experts: None,
            experts_per_token: None,
            expert_init: None,
            drop_ratio: None,
            router_init: None,
            variant: Variant::Symmetric.name().into(),
            snr_db: 10.0,
            seed: 0,
            dtype: "keep".into(),
            shard_size: "5GB".into(),
        }
    }
}

impl GrowthSpec {
    /// A spec of a factor alone, every other option at its default.
    pub fn factor(n: usize) -> GrowthSpec {
        GrowthSpec {
            factor: Some(n.to_string()),
            ..GrowthSpec::default()
        }
    }

    /// The spec a recipe's `options` mapping (or the Python keywords) holds. A `null` value
    /// means the default. serde names an unknown key but not the key whose value has the
    /// wrong type, so on an error each key is tried alone to say which one it is.
    pub fn from_map(options: &Map<String, Value>) -> std::result::Result<GrowthSpec, String> {
        let given: Map<String, Value> = options
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        serde_json::from_value(Value::Object(given.clone())).map_err(|whole| {
            let whole = whole.to_string();
            if whole.starts_with("unknown field") {
                return whole;
            }
            given
                .iter()
                .find_map(|(k, v)| {
                    let one = Value::Object(Map::from_iter([(k.clone(), v.clone())]));
                    serde_json::from_value::<GrowthSpec>(one)
                        .err()
                        .map(|e| format!("`{k}`: {e}"))
                })
                .unwrap_or(whole)
        })
    }

    /// The spec of a planned growth with every size resolved (what the map was built
    /// from): a recipe's `options`, which replays to the same map.
    pub fn of_growth(o: &GrowthOptions, map: &GrowthMap) -> GrowthSpec {
        GrowthSpec {
            factor: Some(o.factor.to_string()),
            hidden_size: None,
            ffn_factor: None,
            intermediate_size: Some(map.dest_len(Space::Ffn)),
            depth_factor: None,
            num_hidden_layers: Some(map.layers.len()),
            num_attention_heads: Some(map.heads()),
            depth_mode: o.depth_mode.name().into(),
            keep_tied: o.keep_tied,
            experts: map.upcycle.as_ref().map(|u| u.experts),
            experts_per_token: map.upcycle.as_ref().map(|u| u.per_token),
            expert_init: map.upcycle.as_ref().map(|u| u.expert_init.name().into()),
            drop_ratio: map.upcycle.as_ref().and_then(|u| match u.expert_init {
                ExpertInit::Drop { ratio } => Some(ratio),
                ExpertInit::Copy => None,
            }),
            router_init: map.upcycle.as_ref().map(|u| u.router_init.name().into()),
            variant: o.variant.name().into(),
            snr_db: o.snr_db,
            seed: o.seed,
            dtype: o.dtype.map(|d| d.torch_name()).unwrap_or("keep").into(),
            shard_size: o.shard_size.to_string(),
        }
    }

    /// The resolved options for `cfg`'s source: sizes turned into factors and counts, names
    /// parsed. Ranges (snr_db, shard bytes) are checked once, by the plan
    /// ([`GrowthOptions::validate`]); what the map cannot do, by the map.
    pub fn resolve(&self, cfg: &ModelConfig) -> Result<GrowthOptions> {
        let factor = match (&self.factor, self.hidden_size) {
            (Some(f), None) => parse_factor("factor", f)?,
            (None, Some(d)) => factor_for("hidden_size", cfg.hidden_size, d)?,
            (Some(_), Some(_)) => return Err(opt("give factor or hidden_size, not both")),
            // Upcycling alone keeps the width.
            (None, None) if self.experts.is_some() => 1,
            (None, None) => return Err(opt("give a size: factor N or hidden_size D")),
        };
        let ffn_factor = match (&self.ffn_factor, self.intermediate_size) {
            (Some(m), None) => parse_factor("ffn_factor", m)?,
            (None, _) => factor,
            (Some(_), Some(_)) => {
                return Err(opt("give ffn_factor or intermediate_size, not both"))
            }
        };
        let num_layers =
            match (&self.depth_factor, self.num_hidden_layers) {
                (Some(k), None) => {
                    let k = parse_factor("depth_factor", k)?;
                    Some(cfg.num_hidden_layers.checked_mul(k).ok_or_else(|| {
                        opt(format!("depth_factor {k}: the layer count overflows"))
                    })?)
                }
                (None, l) => l,
                (Some(_), Some(_)) => {
                    return Err(opt("give depth_factor or num_hidden_layers, not both"))
                }
            };
        let variant = Variant::parse(&self.variant).ok_or_else(|| {
            let names: Vec<&str> = Variant::ALL.iter().map(|v| v.name()).collect();
            opt(format!(
                "unknown variant `{}` (use one of {})",
                self.variant,
                names.join(", ")
            ))
        })?;
        let dtype = match self.dtype.as_str() {
            "keep" => None,
            other => Some(DType::parse(other).ok_or_else(|| {
                opt(format!(
                    "unknown dtype {other} (use keep, f32, bf16, f16 or f64)"
                ))
            })?),
        };
        let depth_mode = DepthMode::parse(&self.depth_mode).ok_or_else(|| {
            opt(format!(
                "unknown depth_mode `{}` (use identity or stack)",
                self.depth_mode
            ))
        })?;
        let upcycle = self.upcycle_options()?;
        Ok(GrowthOptions {
            factor,
            ffn_factor,
            variant,
            snr_db: self.snr_db,
            seed: self.seed,
            dtype,
            shard_size: parse_size(&self.shard_size)?,
            intermediate_size: self.intermediate_size,
            num_layers,
            depth_mode,
            keep_tied: self.keep_tied,
            num_heads: self.num_attention_heads,
            upcycle,
        })
    }

    /// The upcycling options, parsed; their ranges are checked against the source by the
    /// map ([`crate::upcycle::Upcycle::new`]).
    fn upcycle_options(&self) -> Result<Option<UpcycleOptions>> {
        let Some(experts) = self.experts else {
            let given = [
                ("experts_per_token", self.experts_per_token.is_some()),
                ("expert_init", self.expert_init.is_some()),
                ("drop_ratio", self.drop_ratio.is_some()),
                ("router_init", self.router_init.is_some()),
            ];
            return match given.iter().find(|g| g.1) {
                Some((key, _)) => Err(opt(format!(
                    "{key} applies to upcycling only: give experts E too"
                ))),
                None => Ok(None),
            };
        };
        let expert_init = match (
            self.expert_init.as_deref().unwrap_or("copy"),
            self.drop_ratio,
        ) {
            ("copy", None) => ExpertInit::Copy,
            ("copy", Some(_)) => return Err(opt("drop_ratio applies to expert_init drop only")),
            ("drop", ratio) => ExpertInit::Drop {
                ratio: ratio.unwrap_or(0.5),
            },
            (other, _) => {
                return Err(opt(format!(
                    "unknown expert_init `{other}` (use copy or drop)"
                )))
            }
        };
        let router = self.router_init.as_deref().unwrap_or("zero");
        let router_init = RouterInit::parse(router).ok_or_else(|| {
            opt(format!(
                "unknown router_init `{router}` (use zero or normal)"
            ))
        })?;
        Ok(Some(UpcycleOptions {
            experts,
            per_token: self.experts_per_token.unwrap_or(2),
            expert_init,
            router_init,
        }))
    }
}

fn opt(message: impl Into<String>) -> Error {
    Error::Options(message.into())
}

/// A growth factor as typed: a whole number >= 1, or an error naming `option`.
pub fn parse_factor(option: &str, text: &str) -> Result<usize> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err(opt(format!(
            "{option} 0: the factor must be a whole number >= 1"
        ))),
        Ok(n) => Ok(n),
        Err(_) => Err(opt(format!(
            "{option} {text}: the factor must be a whole number >= 1 (HyperCloning grows by whole copies; \
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
            "shard_size {text}: expected a size like 5GB or 500MiB: {e}"
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
                "shard_size {text}: unknown unit `{unit}` (use B, KB, MB, GB, KiB, MiB, GiB)"
            )))
        }
    };
    let bytes = (value * mult).round();
    if bytes < 1.0 {
        return Err(opt(format!("shard_size {text}: must be at least one byte")));
    }
    Ok(bytes as u64)
}

/// A whole-number option kept as text (a factor, a shard size): read from a number or a
/// string (`shard_size: 5GB`), as the flag would read it; written as a number when it is
/// one, so a recipe says `factor: 2`.
mod whole_number {
    use super::*;
    use serde::de::Error as _;

    pub trait Text: Sized {
        fn from_text(t: Option<String>) -> Option<Self>;
        fn text(&self) -> Option<&str>;
    }
    impl Text for String {
        fn from_text(t: Option<String>) -> Option<Self> {
            t
        }
        fn text(&self) -> Option<&str> {
            Some(self)
        }
    }
    impl Text for Option<String> {
        fn from_text(t: Option<String>) -> Option<Self> {
            Some(t)
        }
        fn text(&self) -> Option<&str> {
            self.as_deref()
        }
    }

    pub fn serialize<T: Text, S: Serializer>(v: &T, s: S) -> std::result::Result<S::Ok, S::Error> {
        match v.text() {
            None => s.serialize_none(),
            Some(t) => match t.parse::<u64>() {
                Ok(n) if n.to_string() == t => s.serialize_u64(n),
                _ => s.serialize_str(t),
            },
        }
    }

    pub fn deserialize<'de, T: Text, D: Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<T, D::Error> {
        let text = match Value::deserialize(d)? {
            Value::Null => None,
            Value::String(s) => Some(s),
            Value::Number(n) => Some(n.to_string()),
            other => return Err(D::Error::custom(format!("must be a number, found {other}"))),
        };
        T::from_text(text).ok_or_else(|| D::Error::custom("must be a number, found null"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: Value) -> std::result::Result<GrowthSpec, String> {
        GrowthSpec::from_map(v.as_object().unwrap())
    }

    #[test]
    fn missing_keys_take_the_defaults() {
        assert_eq!(spec(json!({})).unwrap(), GrowthSpec::default());
        let s = spec(json!({"factor": 3, "seed": null})).unwrap();
        assert_eq!(s, GrowthSpec::factor(3));
        assert_eq!(s.depth_mode, "identity");
        assert_eq!(s.variant, "symmetric");
        assert_eq!((s.snr_db, s.seed), (10.0, 0));
        assert_eq!((s.dtype.as_str(), s.shard_size.as_str()), ("keep", "5GB"));
        assert!(!s.keep_tied);
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_by_name() {
        let e = spec(json!({"factor": 2, "facter": 3})).unwrap_err();
        assert!(e.contains("unknown field `facter`"), "{e}");
        assert!(e.contains("`factor`") && e.contains("`shard_size`"), "{e}");
        for (v, key) in [
            (json!({"factor": 2, "seed": -1}), "`seed`"),
            (json!({"factor": 2, "seed": 1.5}), "`seed`"),
            (json!({"snr_db": "10"}), "`snr_db`"),
            (json!({"keep_tied": 1}), "`keep_tied`"),
            (json!({"factor": [2]}), "`factor`: must be a number"),
            (json!({"intermediate_size": -3}), "`intermediate_size`"),
        ] {
            let e = spec(v.clone()).unwrap_err();
            assert!(e.starts_with(key), "{v}: {e}");
        }
    }

    #[test]
    fn numbers_and_text_read_as_the_flags_do() {
        let s = spec(json!({"factor": "1.5", "shard_size": "2KB", "depth_factor": 2})).unwrap();
        assert_eq!(s.factor.as_deref(), Some("1.5"));
        assert_eq!(s.depth_factor.as_deref(), Some("2"));
        assert_eq!(parse_size(&s.shard_size).unwrap(), 2000);
        let s = spec(json!({"factor": 1.5, "shard_size": 1000})).unwrap();
        assert_eq!(
            (s.factor.as_deref(), s.shard_size.as_str()),
            (Some("1.5"), "1000")
        );
    }

    #[test]
    fn a_spec_round_trips_through_its_recipe_form() {
        let s = GrowthSpec {
            factor: Some("2".into()),
            intermediate_size: Some(120),
            num_hidden_layers: Some(8),
            num_attention_heads: Some(6),
            depth_mode: "stack".into(),
            keep_tied: true,
            variant: "noisy".into(),
            snr_db: 12.5,
            seed: 7,
            dtype: "bf16".into(),
            shard_size: "5000000000".into(),
            ..GrowthSpec::default()
        };
        let v = serde_json::to_value(&s).unwrap();
        // The recipe's form: whole numbers as numbers, absent alternatives left out, in
        // the field order.
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "factor",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "depth_mode",
                "keep_tied",
                "variant",
                "snr_db",
                "seed",
                "dtype",
                "shard_size"
            ]
        );
        assert_eq!(v["factor"], json!(2));
        assert_eq!(v["shard_size"], json!(5_000_000_000u64));
        assert_eq!(spec(v).unwrap(), s);
        // A size with a unit stays text.
        let t = GrowthSpec {
            shard_size: "2GiB".into(),
            ..GrowthSpec::factor(3)
        };
        assert_eq!(
            serde_json::to_value(&t).unwrap()["shard_size"],
            json!("2GiB")
        );
    }

    #[test]
    fn resolve_names_the_option() {
        assert!(parse_factor("factor", "3").unwrap() == 3);
        let e = parse_factor("factor", "0").unwrap_err().to_string();
        assert!(e.starts_with("factor 0:"), "{e}");
        let e = parse_factor("depth_factor", "1.5").unwrap_err().to_string();
        assert!(
            e.starts_with("depth_factor 1.5:") && e.contains("fractional"),
            "{e}"
        );
        let e = parse_size("0").unwrap_err().to_string();
        assert!(e.starts_with("shard_size 0:"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("1.5MB").unwrap(), 1_500_000);
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("0").is_err());
    }
}
