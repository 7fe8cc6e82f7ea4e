//! Random initialisation from a config.json: the same tensors a checkpoint of that family
//! has (from the family rules), seeded, written as an ordinary Hugging Face folder.

use crate::arch::arch;
use crate::error::{NnError, Result};
use crate::spec::NormKind;
use hyperclone_core::config::ModelConfig;
use hyperclone_core::family::Component;
use hyperclone_core::safetensors::pt_header;
use hyperclone_core::DType;
use std::path::Path;

/// Writes `out/config.json` and `out/model.safetensors` (f32): matrices N(0, std), norm
/// weights at their identity (1, or 0 for Gemma's 1+w form), biases 0.
pub fn write_random_checkpoint(config_path: &Path, out: &Path, std: f64, seed: u64) -> Result<()> {
    let cfg = ModelConfig::load(config_path)?;
    let family = cfg.family;
    let norm_identity = match arch(family, &serde_json::Value::Object(cfg.raw.clone())).norm {
        NormKind::RmsOnePlus => 0.0,
        _ => 1.0,
    };
    let tensors: Vec<(String, Vec<usize>, Component)> = cfg
        .required_tensors()
        .into_iter()
        .map(|(name, rule)| {
            (
                name,
                rule.axes.iter().map(|a| cfg.axis_len(a.0)).collect(),
                rule.component,
            )
        })
        .collect();
    if tensors.is_empty() {
        return Err(NnError::Input(format!(
            "{}: no tensors for model_type {}",
            config_path.display(),
            family.model_type
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| hyperclone_core::Error::io(out, e))?;
    let mut bytes = pt_header(
        tensors.iter().map(|(n, s, _)| (n.as_str(), s.as_slice())),
        DType::F32,
        &[("hyperclone.init", format!("normal std {std}, seed {seed}"))],
    );
    for (name, shape, component) in &tensors {
        let n: usize = shape.iter().product();
        let key = hyperclone_core::kernel::name_key(seed, name);
        let values: Vec<f64> = if shape.len() >= 2 {
            (0..n as u64)
                .map(|i| crate::rng::normal(key, i) * std)
                .collect()
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else if *component == Component::Norm {
            vec![norm_identity; n]
        } else {
            vec![0.0; n]
        };
        let mut b = vec![0u8; n * 4];
        DType::F32.encode(&values, &mut b);
        bytes.extend_from_slice(&b);
    }
    let model = out.join("model.safetensors");
    std::fs::write(&model, bytes).map_err(|e| hyperclone_core::Error::io(&model, e))?;
    let mut raw = cfg.raw.clone();
    raw.insert("tie_word_embeddings".into(), cfg.tie_word_embeddings.into());
    let text = serde_json::to_vec_pretty(&serde_json::Value::Object(raw)).expect("JSON");
    let path = out.join("config.json");
    std::fs::write(&path, text).map_err(|e| hyperclone_core::Error::io(&path, e))?;
    Ok(())
}
