//! Training: cross-entropy loss, a fused AdamW with parameter groups and global-norm
//! clipping, learning-rate schedules (linear warmup, then cosine, warmup-stable-decay or
//! constant), gradient accumulation, and checkpoints that are ordinary Hugging Face folders
//! plus the optimizer state.
//!
//! Everything random is addressed by (seed, step, micro-batch), so a resumed run reproduces
//! the loss curve of an uninterrupted one bit for bit.

use crate::error::{NnError, Result};
use crate::model::{Decoder, Dropout, Param};
use candle_core::{DType, Tensor, D};
use hyperclone_core::safetensors::{encode_header, HeaderEntry, SafetensorsFile};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

/// The learning-rate shape after the linear warmup.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// Cosine from the peak to `min_lr` at the last step.
    Cosine,
    /// Warmup-stable-decay: the peak until the last `decay_frac` of the steps, then linear
    /// to `min_lr`. The stable phase is where a grown model re-learns without forgetting;
    /// its checkpoints can be branched off and decayed at any budget.
    Wsd { decay_frac: f64 },
    /// The peak to the end.
    Constant,
}

impl Schedule {
    pub fn name(&self) -> &'static str {
        match self {
            Schedule::Cosine => "cosine",
            Schedule::Wsd { .. } => "wsd",
            Schedule::Constant => "constant",
        }
    }
}

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub steps: u64,
    pub lr: f64,
    pub warmup: u64,
    pub schedule: Schedule,
    /// Where the decay ends (cosine and WSD).
    pub min_lr: f64,
    pub weight_decay: f64,
    /// Global-norm clipping threshold (0 = off).
    pub grad_clip: f64,
    pub grad_accum: u64,
    pub dropout: f64,
    pub seed: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl TrainConfig {
    /// Linear warmup to `lr`, then the schedule's shape down to `min_lr`.
    pub fn lr_at(&self, step: u64) -> f64 {
        if self.warmup > 0 && step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let floor = self.min_lr;
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
                let progress = ((step - self.warmup.min(step)) as f64 / span).min(1.0);
                floor + (self.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            Schedule::Wsd { decay_frac } => {
                let decay_steps = ((self.steps as f64 * decay_frac).round() as u64)
                    .min(self.steps.saturating_sub(self.warmup));
                let decay_start = self.steps - decay_steps;
                if step < decay_start || decay_steps == 0 {
                    return self.lr;
                }
                // Linear from the peak at decay_start to min_lr at the last step.
                let progress = ((step - decay_start + 1) as f64 / decay_steps as f64).min(1.0);
                self.lr + (floor - self.lr) * progress
            }
        }
    }
}

/// Mean next-token cross-entropy of logits [N, V] against targets [N].
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if crate::fused::fusable(logits) {
        // One pass over the [N, V] logits forward and one backward, instead of seven of
        // each (the logits are the largest tensor of a step: 200 MB at vocab 49152).
        let rows = logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, crate::fused::CrossEntropyRows)?;
        return Ok(rows.narrow(1, 0, 1)?.mean_all()?);
    }
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?;
    Ok(picked.mean_all()?.neg()?)
}

/// Loss of one batch: inputs and targets are row-major [batch, seq].
pub fn batch_loss(
    model: &Decoder,
    inputs: &[u32],
    targets: &[u32],
    batch: usize,
    dropout: Option<&Dropout>,
) -> Result<Tensor> {
    let seq = inputs.len() / batch;
    let ids = Tensor::from_vec(inputs.to_vec(), (batch, seq), &model.device)?;
    let out = model.forward_with(&ids, dropout)?;
    let logits = out.logits.reshape((batch * seq, model.spec.vocab))?;
    let t = Tensor::from_vec(targets.to_vec(), batch * seq, &model.device)?;
    cross_entropy(&logits, &t)
}

/// AdamW state: first and second moments per parameter, in f32 (as PyTorch keeps them).
pub struct AdamW {
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    /// Optimizer steps taken.
    pub t: u64,
}

pub struct StepStats {
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
}

impl AdamW {
    pub fn new(params: &[Param]) -> Self {
        AdamW {
            m: params
                .iter()
                .map(|p| vec![0.0; p.var.elem_count()])
                .collect(),
            v: params
                .iter()
                .map(|p| vec![0.0; p.var.elem_count()])
                .collect(),
            t: 0,
        }
    }

    /// One optimizer step from accumulated gradients (already averaged over micro-batches):
    /// global-norm clipping, bias-corrected moments, decoupled weight decay on `decay`
    /// parameters only, all in one pass per parameter.
    ///
    /// Arithmetic is f64 per element, rounded once to the parameter's f32 storage. The norm
    /// is one sequential sum, so the result does not depend on the thread count; the
    /// element-wise update runs on all cores.
    pub fn step<G>(
        &mut self,
        params: &[Param],
        grads: &[Vec<G>],
        cfg: &TrainConfig,
        lr: f64,
    ) -> Result<f64>
    where
        G: Copy + Into<f64> + Send + Sync,
    {
        let norm = grads
            .iter()
            .flatten()
            .map(|&g| {
                let g: f64 = g.into();
                g * g
            })
            .sum::<f64>()
            .sqrt();
        let clip = if cfg.grad_clip > 0.0 && norm > cfg.grad_clip {
            cfg.grad_clip / norm
        } else {
            1.0
        };
        self.t += 1;
        let (b1, b2) = (cfg.beta1, cfg.beta2);
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        const CHUNK: usize = 1 << 14;
        for (i, p) in params.iter().enumerate() {
            let mut w: Vec<f32> = p.var.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
            let decay = if p.decay { cfg.weight_decay } else { 0.0 };
            let (m, v, g) = (&mut self.m[i], &mut self.v[i], &grads[i]);
            w.par_chunks_mut(CHUNK)
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(|(((w, m), v), g)| {
                    for k in 0..w.len() {
                        let gk = g[k].into() * clip;
                        let mk = b1 * m[k] as f64 + (1.0 - b1) * gk;
                        let vk = b2 * v[k] as f64 + (1.0 - b2) * gk * gk;
                        m[k] = mk as f32;
                        v[k] = vk as f32;
                        let update = (mk / c1) / ((vk / c2).sqrt() + cfg.eps);
                        let wk = w[k] as f64;
                        w[k] = (wk - lr * (update + decay * wk)) as f32;
                    }
                });
            let t = Tensor::from_vec(w, p.var.shape(), p.var.device())?.to_dtype(p.var.dtype())?;
            p.var.set(&t)?;
        }
        Ok(norm)
    }

    /// Saves moments and step count as `optimizer.safetensors` (moments keyed m./v. + name).
    pub fn save(&self, params: &[Param], path: &Path) -> Result<()> {
        let mut entries = Vec::new();
        let mut data = Vec::new();
        for (i, p) in params.iter().enumerate() {
            for (prefix, moment) in [("m.", &self.m[i]), ("v.", &self.v[i])] {
                entries.push(HeaderEntry {
                    name: format!("{prefix}{}", p.name),
                    dtype: hyperclone_core::DType::F32,
                    shape: p.var.dims().to_vec(),
                });
                for x in moment {
                    data.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        meta.insert("adamw.step".to_string(), self.t.to_string());
        let mut bytes = encode_header(&entries, &meta);
        bytes.extend_from_slice(&data);
        Ok(hyperclone_core::staging::write_file(path, &bytes)?)
    }

    pub fn load(params: &[Param], path: &Path) -> Result<Self> {
        let f = SafetensorsFile::open(path)?;
        let t = f
            .metadata
            .get("adamw.step")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                NnError::Input(format!("{}: no adamw.step in the metadata", path.display()))
            })?;
        // The bias correction raises beta to the power t as an i32.
        if t > i32::MAX as u64 {
            return Err(NnError::Input(format!(
                "{}: adamw.step {t} is out of range (at most {})",
                path.display(),
                i32::MAX
            )));
        }
        let read = |name: String, shape: &[usize]| -> Result<Vec<f32>> {
            let info = f
                .get(&name)
                .ok_or_else(|| NnError::Input(format!("{}: `{name}` missing", path.display())))?;
            // The shape, not only the count: a transposed moment would pair every weight
            // with another weight's history.
            if info.shape != shape {
                return Err(NnError::Input(format!(
                    "{}: `{name}` has shape {:?}, the model's tensor {shape:?}",
                    path.display(),
                    info.shape
                )));
            }
            let n = info.numel();
            let mut v = vec![0f64; n];
            info.dtype.decode(f.data(info), &mut v);
            Ok(v.into_iter().map(|x| x as f32).collect())
        };
        let mut opt = AdamW {
            m: Vec::new(),
            v: Vec::new(),
            t,
        };
        for p in params {
            opt.m.push(read(format!("m.{}", p.name), p.var.dims())?);
            opt.v.push(read(format!("v.{}", p.name), p.var.dims())?);
        }
        Ok(opt)
    }
}

/// Runs `micro` micro-batches (each from `batch_for(micro)`), averages their gradients and
/// takes one AdamW step at `step`'s learning rate.
pub fn train_step(
    model: &Decoder,
    params: &[Param],
    opt: &mut AdamW,
    cfg: &TrainConfig,
    step: u64,
    batch: usize,
    mut batch_for: impl FnMut(u64) -> Result<(Vec<u32>, Vec<u32>)>,
) -> Result<StepStats> {
    let k = cfg.grad_accum.max(1);
    let micro_loss = |micro: u64, inputs: &[u32], targets: &[u32]| -> Result<Tensor> {
        let dropout = Dropout {
            p: cfg.dropout,
            key: crate::rng::mix64(cfg.seed ^ crate::rng::mix64(step * 1024 + micro)),
        };
        let loss = batch_loss(
            model,
            inputs,
            targets,
            batch,
            (cfg.dropout > 0.0).then_some(&dropout),
        )?;
        Ok(loss)
    };
    let lr = cfg.lr_at(step);
    if k == 1 {
        // One micro-batch: the f32 gradients go to the optimizer as they are (converting
        // them to f64 first gives the same numbers and cost 10% of a step in copies).
        let (inputs, targets) = batch_for(0)?;
        let loss = micro_loss(0, &inputs, &targets)?;
        let store = loss.backward()?;
        let grads = params
            .iter()
            .map(|p| match store.get(p.var.as_tensor()) {
                Some(g) => Ok(g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?),
                None => Ok(vec![0.0f32; p.var.elem_count()]),
            })
            .collect::<Result<Vec<_>>>()?;
        let grad_norm = opt.step(params, &grads, cfg, lr)?;
        return Ok(StepStats {
            loss: loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            grad_norm,
            lr,
        });
    }
    // Several micro-batches: their gradients are summed in f64.
    let mut grads: Vec<Vec<f64>> = params
        .iter()
        .map(|p| vec![0.0; p.var.elem_count()])
        .collect();
    let mut loss_sum = 0.0;
    for micro in 0..k {
        let (inputs, targets) = batch_for(micro)?;
        let loss = micro_loss(micro, &inputs, &targets)?;
        loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let store = (loss / k as f64)?.backward()?;
        for (g, p) in grads.iter_mut().zip(params) {
            if let Some(grad) = store.get(p.var.as_tensor()) {
                let v: Vec<f64> = grad.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
                for (a, b) in g.iter_mut().zip(v) {
                    *a += b;
                }
            }
        }
    }
    let grad_norm = opt.step(params, &grads, cfg, lr)?;
    Ok(StepStats {
        loss: loss_sum / k as f64,
        grad_norm,
        lr,
    })
}

/// Writes the parameters as a safetensors file (in `dtype`), names as in the checkpoint.
pub fn save_params(params: &[Param], dtype: hyperclone_core::DType, path: &Path) -> Result<()> {
    let mut bytes = hyperclone_core::safetensors::pt_header(
        params.iter().map(|p| (p.name.as_str(), p.var.dims())),
        dtype,
        &[],
    );
    for p in params {
        let v: Vec<f64> = p.var.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
        let mut b = vec![0u8; v.len() * dtype.size()];
        dtype.encode(&v, &mut b);
        bytes.extend_from_slice(&b);
    }
    Ok(hyperclone_core::staging::write_file(path, &bytes)?)
}
