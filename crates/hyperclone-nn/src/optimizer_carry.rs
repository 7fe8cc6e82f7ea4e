//! `train --optimizer-from`: start a clone's AdamW from the moments of the model it was grown
//! from, grown with the same tiling as the weights.
//!
//! Why the moments scale by the *write* copies: in a clone every reader of a grown space
//! divides by its copies, so the gradient reaching each copy of an output is 1/r_o of the
//! small model's (r_o = copies of the tensor's write axis; 1 for the head, whose vocab rows
//! are not copied; n for the embedding, whose hidden columns are). For the symmetric clone
//! this is exact, g_D = tile(g_S) / r_o, so the estimates are m_D = tile(m_S) / r_o and
//! v_D = tile(v_S) / r_o^2. (Dividing by the read copies, as the weights are, would be
//! wrong for the head and the embedding.) The step count is carried too, so the bias
//! correction continues where the small run's stopped.
//!
//! The tiling itself is the growth kernel's: the moments, as tensors of the small model's
//! shape, are grown in memory symmetrically (tile / r_i; `grow_in_memory`), and rescaled by r_i / r_o (r_o^2);
//! r_i comes from growing ones (each element becomes 1 / r_i) and r_o * r_i is the element
//! ratio of the two shapes.

use crate::error::Context;
use crate::train::AdamW;
use crate::{Param, Result};
use hyperclone_core::checkpoint::MemoryTensor;
use hyperclone_core::grow::{grow_in_memory, Growth};
use hyperclone_core::safetensors::SafetensorsFile;
use hyperclone_core::{Checkpoint, DType, GrowthSpec};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

/// What [`carry`] did, for the log.
pub struct Carried {
    pub step: u64,
    pub tensors: usize,
    /// Parameters that start from zero moments (no estimate exists: the small model's tied
    /// embedding saw the sum of both gradients, the clone's two tensors see one each).
    pub fresh: Vec<String>,
}

/// AdamW state for `params` (the clone's) from `base`'s optimizer.safetensors.
pub fn carry(
    base: &Path,
    factor: usize,
    ffn_factor: usize,
    params: &[Param],
) -> Result<(AdamW, Carried)> {
    let state = base.join("optimizer.safetensors");
    let opt_file = SafetensorsFile::open(&state)
        .with_context(|| format!("--optimizer-from {}: no optimizer state", base.display()))?;
    let step: u64 = opt_file
        .metadata
        .get("adamw.step")
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{}: no adamw.step in the metadata", state.display()))?;
    let small = Checkpoint::open(base)?;
    let tied = small.config.tie_word_embeddings;

    let config_text = std::fs::read_to_string(base.join("config.json"))
        .with_context(|| format!("{}: reading config.json", base.display()))?;
    let spec = GrowthSpec {
        ffn_factor: Some(ffn_factor.to_string()),
        ..GrowthSpec::factor(factor)
    };
    // Each tensor of the small model's shape (ones, or the m / v moments), grown in memory
    // by the symmetric kernel in f64: the clone's own tiling.
    let grow = |prefix: &str| -> Result<BTreeMap<String, Vec<f64>>> {
        let mut data: Vec<Vec<u8>> = Vec::with_capacity(small.tensors.len());
        for t in &small.tensors {
            let values: Vec<f64> = if prefix.is_empty() {
                vec![1.0; t.info.numel()]
            } else {
                let name = format!("{prefix}{}", t.info.name);
                let info = opt_file
                    .get(&name)
                    .with_context(|| format!("{}: `{name}` missing", state.display()))?;
                if info.numel() != t.info.numel() {
                    bail!(
                        "{}: `{name}` has {} values, `{}` in {} has {}",
                        state.display(),
                        info.numel(),
                        t.info.name,
                        base.display(),
                        t.info.numel()
                    );
                }
                let mut v = vec![0f64; info.numel()];
                info.dtype.decode(opt_file.data(info), &mut v);
                v
            };
            data.push(values.iter().flat_map(|x| x.to_le_bytes()).collect());
        }
        let tensors: Vec<MemoryTensor> = small
            .tensors
            .iter()
            .zip(&data)
            .map(|(t, d)| MemoryTensor {
                name: &t.info.name,
                dtype: DType::F64,
                shape: t.info.shape.clone(),
                data: d,
            })
            .collect();
        let grown = grow_in_memory(
            &config_text,
            &tensors,
            &Growth::Spec(spec.clone()),
            false,
            &AtomicBool::new(false),
        )?;
        Ok(grown
            .tensors
            .into_iter()
            .map(|t| {
                let mut v = vec![0f64; t.data.len() / t.dtype.size()];
                t.dtype.decode(&t.data, &mut v);
                (t.name, v)
            })
            .collect())
    };
    let inv_read = grow("")?;
    let m_grown = grow("m.")?;
    let v_grown = grow("v.")?;
    let small_numel: BTreeMap<&str, usize> = small
        .tensors
        .iter()
        .map(|t| (t.info.name.as_str(), t.info.numel()))
        .collect();

    let mut opt = AdamW::new(params);
    opt.t = step;
    let mut carried = Carried {
        step,
        tensors: 0,
        fresh: Vec::new(),
    };
    let tied_names = ["model.embed_tokens.weight", "lm_head.weight"];
    for (i, p) in params.iter().enumerate() {
        let (Some(m), Some(v), Some(ones)) = (
            m_grown.get(&p.name),
            v_grown.get(&p.name),
            inv_read.get(&p.name),
        ) else {
            bail!(
                "--optimizer-from {}: the clone's `{}` has no counterpart in the grown moments \
                 (was the clone grown from this model?)",
                base.display(),
                p.name
            );
        };
        if m.len() != p.var.elem_count() {
            bail!(
                "--optimizer-from {}: `{}` grows to {} values, the clone has {} (was the clone \
                 grown from this model with factor {factor}?)",
                base.display(),
                p.name,
                m.len(),
                p.var.elem_count()
            );
        }
        if tied && tied_names.contains(&p.name.as_str()) {
            carried.fresh.push(p.name.clone());
            continue;
        }
        // The tied head is grown from the embedding: count it against that tensor.
        let src_numel = small_numel
            .get(p.name.as_str())
            .or_else(|| small_numel.get("model.embed_tokens.weight"))
            .copied()
            .context("source tensor")?;
        let ratio = m.len() as f64 / src_numel as f64; // r_o * r_i
        for k in 0..m.len() {
            let r_i = 1.0 / ones[k];
            let r_o = ratio / r_i;
            opt.m[i][k] = (m[k] * r_i / r_o) as f32;
            opt.v[i][k] = (v[k] * r_i / (r_o * r_o)) as f32;
        }
        carried.tensors += 1;
    }
    Ok((opt, carried))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::batch_loss;
    use crate::Decoder;
    use candle_core::{DType, Device};
    use hyperclone_core::grow::grow_quietly;
    use hyperclone_core::{GrowthOptions, Variant};
    use serde_json::json;
    use std::path::PathBuf;

    /// A tiny Llama (GQA, 2 layers) with random weights of std 0.3, as the invariants ask.
    fn small(dir: &Path, tied: bool) {
        let cfg = json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 40,
            "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": tied, "torch_dtype": "float32"
        });
        let cfg_path = dir.join("small-config.json");
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        crate::init::write_random_checkpoint(&cfg_path, &dir.join("small"), 0.3, 5).unwrap();
    }

    /// Gradients of every parameter on a fixed batch, in parameter order.
    fn gradients(dir: &Path) -> (Vec<Param>, Vec<Vec<f32>>) {
        let ckpt = Checkpoint::open(dir).unwrap();
        let (model, params) = Decoder::load_trainable(&ckpt, DType::F32, &Device::Cpu).unwrap();
        let inputs: Vec<u32> = (0..16).map(|i| (i * 7 + 3) % 40).collect();
        let targets: Vec<u32> = (0..16).map(|i| (i * 11 + 1) % 40).collect();
        let loss = batch_loss(&model, &inputs, &targets, 2, None).unwrap();
        let store = loss.backward().unwrap();
        let grads = params
            .iter()
            .map(|p| {
                store
                    .get(p.var.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect();
        (params, grads)
    }

    /// Writes `base/optimizer.safetensors` with m = g and v = g^2 of the small model.
    fn state_from_gradients(base: &Path) {
        let (params, g) = gradients(base);
        let mut opt = AdamW::new(&params);
        opt.t = 17;
        for (i, gi) in g.iter().enumerate() {
            opt.m[i] = gi.clone();
            opt.v[i] = gi.iter().map(|x| x * x).collect();
        }
        opt.save(&params, &base.join("optimizer.safetensors"))
            .unwrap();
    }

    /// The small model at DIR/small with the moments of its gradient, and its x2 symmetric
    /// clone (FFN x3) at DIR/clone: (base, clone).
    fn base_and_clone(dir: &Path, tied: bool) -> (PathBuf, PathBuf) {
        small(dir, tied);
        let (base, clone) = (dir.join("small"), dir.join("clone"));
        state_from_gradients(&base);
        let options = GrowthOptions {
            factor: 2,
            ffn_factor: 3,
            variant: Variant::Symmetric,
            snr_db: 10.0,
            seed: 0,
            dtype: None,
            shard_size: u64::MAX,
            ..GrowthOptions::default()
        };
        grow_quietly(&base, &clone, &options).unwrap();
        (base, clone)
    }

    /// The carried moments of the small model's gradient are the clone's own gradient on the
    /// same batch (exact for the symmetric clone): m_D = g_D, v_D = g_D^2 for every tensor.
    /// (Scaling by the read copies instead, as the weights are, fails here: the embedding's
    /// moment comes out 2x the clone's gradient.)
    #[test]
    fn carried_moments_are_the_clones_gradient_moments() {
        let tmp = tempfile::tempdir().unwrap();
        let (base, clone) = base_and_clone(tmp.path(), false);

        let (params, g_clone) = gradients(&clone);
        let (opt, carried) = carry(&base, 2, 3, &params).unwrap();
        assert_eq!(carried.step, 17);
        assert!(carried.fresh.is_empty());
        assert_eq!(carried.tensors, params.len());
        for (i, p) in params.iter().enumerate() {
            let scale = g_clone[i]
                .iter()
                .fold(0f32, |a, x| a.max(x.abs()))
                .max(1e-30);
            for (k, g) in g_clone[i].iter().enumerate() {
                // f32 forward/backward in two different shapes: rounding ~1e-6 of the scale.
                assert!(
                    (opt.m[i][k] - g).abs() <= 2e-5 * scale,
                    "{}[{k}]: m {} vs gradient {g}",
                    p.name,
                    opt.m[i][k]
                );
                assert!(
                    (opt.v[i][k] - g * g).abs() <= 4e-5 * scale * scale,
                    "{}[{k}]: v {} vs g^2 {}",
                    p.name,
                    opt.v[i][k],
                    g * g
                );
            }
        }
    }

    /// A tied base has one moment for two gradients: the clone's embedding and head start
    /// from zero, the rest is carried.
    #[test]
    fn tied_embedding_moments_start_from_zero() {
        let tmp = tempfile::tempdir().unwrap();
        let (base, clone) = base_and_clone(tmp.path(), true);
        let ckpt = Checkpoint::open(&clone).unwrap();
        let (_, params) = Decoder::load_trainable(&ckpt, DType::F32, &Device::Cpu).unwrap();
        let (opt, carried) = carry(&base, 2, 3, &params).unwrap();
        assert_eq!(
            carried.fresh,
            ["model.embed_tokens.weight", "lm_head.weight"]
        );
        for (i, p) in params.iter().enumerate() {
            let zero = opt.m[i].iter().all(|x| *x == 0.0);
            assert_eq!(zero, carried.fresh.contains(&p.name), "{}", p.name);
        }
        // A clone grown with another factor is refused with the tensor named.
        let err = carry(&base, 3, 3, &params).err().unwrap().to_string();
        assert!(err.contains("grows to"), "{err}");
    }
}
