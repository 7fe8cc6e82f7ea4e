//! Training: cross-entropy loss, a fused AdamW with parameter groups and global-norm
//! clipping, learning-rate schedules (linear warmup, then cosine, warmup-stable-decay or
//! constant), gradient accumulation, and checkpoints that are ordinary Hugging Face folders
//! plus the optimizer state.
//!
//! Everything random is addressed by (seed, step, micro-batch), so a resumed run reproduces
//! the loss curve of an uninterrupted one bit for bit.

use crate::error::{NnError, Result};
use crate::model::{Decoder, Dropout, Param};
use crate::shard::{in_waves, shards};
use candle_core::{DType, Tensor, D};
use hyperclone_core::safetensors::{encode_header, HeaderEntry, SafetensorsFile};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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

/// What to train, how long and how; `hyperclone train`'s flags without the parsing (the
/// field names are the flags').
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Model folder to start from (e.g. a clone).
    pub model: Option<PathBuf>,
    /// Start from a random init of this config.json instead (weights N(0, 0.02), seeded).
    pub init_config: Option<PathBuf>,
    /// Training text: .txt files or folders of them.
    pub data: Vec<PathBuf>,
    /// Validation text; empty: the last `data` file is held out.
    pub val: Vec<PathBuf>,
    /// tokenizer.json; none: the model's.
    pub tokenizer: Option<PathBuf>,
    pub out: PathBuf,
    pub steps: u64,
    pub batch: usize,
    pub seq: usize,
    pub lr: f64,
    pub warmup: u64,
    pub schedule: Schedule,
    /// Where the decay ends; none: 10% of `lr`.
    pub min_lr: Option<f64>,
    /// With `model` a clone: carry AdamW moments from this folder (the base's OUT/last).
    pub optimizer_from: Option<PathBuf>,
    pub weight_decay: f64,
    /// Global-norm clipping threshold (0 = off).
    pub grad_clip: f64,
    pub grad_accum: u64,
    pub dropout: f64,
    pub eval_every: u64,
    /// Validation windows per evaluation; none: max(batch, 8).
    pub eval_windows: Option<usize>,
    /// Where tokenized text is cached; none: OUT/tokens.
    pub token_cache: Option<PathBuf>,
    pub save_every: u64,
    pub seed: u64,
    /// Continue from OUT/last, reproducing the uninterrupted run exactly.
    pub resume: bool,
    /// Start over in an OUT that holds an earlier run (refused otherwise).
    pub force: bool,
    /// Stop after this step with a checkpoint, as if interrupted.
    pub stop_at: Option<u64>,
    /// AdamW's first-moment decay.
    pub adam_beta1: f64,
    /// AdamW's second-moment decay.
    pub adam_beta2: f64,
    /// AdamW's epsilon, added to the root of the second moment.
    pub adam_epsilon: f64,
}

impl Default for TrainOptions {
    /// `hyperclone train`'s defaults (a CLI test checks that its flags' defaults are these).
    fn default() -> TrainOptions {
        TrainOptions {
            model: None,
            init_config: None,
            data: Vec::new(),
            val: Vec::new(),
            tokenizer: None,
            out: PathBuf::new(),
            steps: 200,
            batch: 8,
            seq: 128,
            lr: 1e-3,
            warmup: 20,
            schedule: Schedule::Cosine,
            min_lr: None,
            optimizer_from: None,
            weight_decay: 0.1,
            grad_clip: 1.0,
            grad_accum: 1,
            dropout: 0.0,
            eval_every: 50,
            eval_windows: None,
            token_cache: None,
            save_every: 100,
            seed: 0,
            resume: false,
            force: false,
            stop_at: None,
            adam_beta1: 0.9,
            adam_beta2: 0.95,
            adam_epsilon: 1e-8,
        }
    }
}

impl TrainOptions {
    /// Linear warmup to `lr`, then the schedule's shape down to `min_lr`.
    pub fn lr_at(&self, step: u64) -> f64 {
        if self.warmup > 0 && step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let floor = self.min_lr.unwrap_or(0.1 * self.lr);
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
        // each (the logits are the largest tensor of a step: 200 MB at vocab 49152). A loss
        // that will be differentiated keeps its softmax for the backward.
        let op = if logits.track_op() {
            crate::fused::CrossEntropyRows::keeping_softmax()
        } else {
            crate::fused::CrossEntropyRows::default()
        };
        let rows = logits.contiguous()?.apply_op2(&targets.contiguous()?, op)?;
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
    /// is summed in a fixed order (per parameter, then over parameters), so the result does
    /// not depend on the thread count; the norm and the element-wise update run on all
    /// cores in vector code (`adamw_kernels`).
    pub fn step<G>(
        &mut self,
        params: &[Param],
        grads: &[Vec<G>],
        cfg: &TrainOptions,
        lr: f64,
    ) -> Result<f64>
    where
        G: Copy + Into<f64> + Send + Sync,
    {
        // Each parameter's sum of squares (8 interleaved partial sums), then their sum in
        // parameter order: the same bits on any thread count.
        let squares: Vec<f64> = grads
            .par_iter()
            .map(|g| crate::adamw_kernels::sum_squares(g))
            .collect();
        let norm = squares.iter().sum::<f64>().sqrt();
        let clip = if cfg.grad_clip > 0.0 && norm > cfg.grad_clip {
            cfg.grad_clip / norm
        } else {
            1.0
        };
        self.t += 1;
        let (b1, b2) = (cfg.adam_beta1, cfg.adam_beta2);
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        const CHUNK: usize = 1 << 14;
        for (i, p) in params.iter().enumerate() {
            let mut w: Vec<f32> = p.var.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
            let decay = if p.decay { cfg.weight_decay } else { 0.0 };
            let (m, v, g) = (&mut self.m[i], &mut self.v[i], &grads[i]);
            let u = crate::adamw_kernels::Update {
                clip,
                b1,
                b2,
                c1,
                c2,
                eps: cfg.adam_epsilon,
                lr,
                decay,
            };
            w.par_chunks_mut(CHUNK)
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(|(((w, m), v), g)| crate::adamw_kernels::update(w, m, v, g, &u));
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

/// The mean per-token loss of `rows` rows (inputs and targets row-major), forward only,
/// the [`shards`] run in parallel and their means weighed by their rows in f64.
pub fn mean_loss(model: &Decoder, inputs: &[u32], targets: &[u32], rows: usize) -> Result<f64> {
    let seq = inputs.len() / rows.max(1);
    let cut = shards(rows, seq);
    let one = |r: &std::ops::Range<usize>| -> Result<f64> {
        let span = r.start * seq..r.end * seq;
        Ok(
            batch_loss(model, &inputs[span.clone()], &targets[span], r.len(), None)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?,
        )
    };
    let mut sum = 0.0;
    in_waves(&cut, one, |r, mean| {
        sum += mean * r.len() as f64;
        Ok(())
    })?;
    Ok(sum / rows.max(1) as f64)
}

/// One forward and backward pass: a shard of a micro-batch.
struct Piece {
    micro: u64,
    rows: std::ops::Range<usize>,
}

/// Runs `k` micro-batches (each from `batch_for(micro)`), averages their gradients and
/// takes one AdamW step at `step`'s learning rate.
///
/// Each micro-batch is cut into [`shards`] that run forward and backward in parallel, one
/// per thread (candle's kernels on these small matrices scale poorly across threads; whole
/// shards scale almost linearly). The step's loss is the token-weighted mean of the
/// shards' losses and its gradient the same mean of their gradients, summed in f64 in a
/// fixed order (micro-batch, then shard), whatever the thread count.
pub fn train_step(
    model: &Decoder,
    params: &[Param],
    opt: &mut AdamW,
    cfg: &TrainOptions,
    step: u64,
    batch: usize,
    mut batch_for: impl FnMut(u64) -> Result<(Vec<u32>, Vec<u32>)>,
) -> Result<StepStats> {
    let k = cfg.grad_accum.max(1);
    let data = (0..k).map(&mut batch_for).collect::<Result<Vec<_>>>()?;
    let seq = data[0].0.len() / batch.max(1);
    let cut = shards(batch, seq);
    train_step_cut(model, params, opt, cfg, step, batch, &cut, data)
}

/// [`train_step`] with the micro-batches given and cut at `cut` (row ranges covering
/// `0..batch` in order). Runs on a thread of rayon's pool ([`crate::shard::on_pool`]).
#[allow(clippy::too_many_arguments)]
pub fn train_step_cut(
    model: &Decoder,
    params: &[Param],
    opt: &mut AdamW,
    cfg: &TrainOptions,
    step: u64,
    batch: usize,
    cut: &[std::ops::Range<usize>],
    data: Vec<(Vec<u32>, Vec<u32>)>,
) -> Result<StepStats> {
    crate::shard::on_pool(|| {
        let k = data.len() as u64;
        let lr = cfg.lr_at(step);
        let seq = data[0].0.len() / batch.max(1);
        let piece_loss = |p: &Piece| -> Result<Tensor> {
            let dropout = Dropout {
                p: cfg.dropout,
                key: crate::rng::mix64(cfg.seed ^ crate::rng::mix64(step * 1024 + p.micro)),
                first_row: p.rows.start as u64,
            };
            let (inputs, targets) = &data[p.micro as usize];
            let cols = p.rows.start * seq..p.rows.end * seq;
            batch_loss(
                model,
                &inputs[cols.clone()],
                &targets[cols],
                p.rows.len(),
                (cfg.dropout > 0.0).then_some(&dropout),
            )
        };
        let pieces: Vec<Piece> = (0..k)
            .flat_map(|micro| {
                cut.iter().map(move |rows| Piece {
                    micro,
                    rows: rows.clone(),
                })
            })
            .collect();
        if pieces.len() == 1 {
            // One piece: the f32 gradients go to the optimizer as they are (converting them to
            // f64 first gives the same numbers and cost 10% of a step in copies).
            let loss = piece_loss(&pieces[0])?;
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
        // A piece's weight is its share of the step's tokens (every row has `seq` tokens).
        let total_rows = (batch * k as usize) as f64;
        // A piece's gradients stay the backward's tensors (f32, contiguous): the weighted sum
        // reads them in place (copying them out first was 1.3% of a study-large step).
        let run = |p: &Piece| -> Result<(f64, Vec<Option<Tensor>>)> {
            let loss = piece_loss(p)?;
            let store = loss.backward()?;
            let grads = params
                .iter()
                .map(|q| {
                    store
                        .get(q.var.as_tensor())
                        .map(|g| g.flatten_all()?.to_dtype(DType::F32)?.contiguous())
                        .transpose()
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok((loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, grads))
        };
        let mut grads: Vec<Vec<f64>> = params
            .iter()
            .map(|p| vec![0.0; p.var.elem_count()])
            .collect();
        let mut loss = 0.0;
        in_waves(&pieces, run, |p, (piece_loss, piece_grads)| {
            let w = p.rows.len() as f64 / total_rows;
            loss += w * piece_loss;
            grads
                .par_iter_mut()
                .zip(piece_grads.par_iter())
                .try_for_each(|(acc, g)| -> candle_core::Result<()> {
                    if let Some(g) = g {
                        let (storage, layout) = g.storage_and_layout();
                        let g = crate::fused::cpu_slice::<f32>(&storage, layout, "gradient")?;
                        crate::adamw_kernels::add_weighted(acc, g, w);
                    }
                    Ok(())
                })?;
            Ok(())
        })?;
        let grad_norm = opt.step(params, &grads, cfg, lr)?;
        Ok(StepStats {
            loss,
            grad_norm,
            lr,
        })
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
