//! Fused CPU ops with hand-written backwards, for the hot spots a profile of a training
//! step showed: each replaces a chain of candle element-wise ops (one full pass over a
//! large tensor and one fresh allocation per op, forward and backward) with one pass.
//!
//! Every op here has a test comparing its value and gradient with the unfused chain in
//! f64. Devices other than the CPU, and dtypes other than f32/f64, take the unfused path.

use crate::softmax::num_like::Float;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows handed to one rayon task: large enough to amortize the task, small enough to
/// balance a few threads. Per-chunk partial sums are added in chunk order, so results do
/// not depend on the thread count.
const ROWS_PER_TASK: usize = 16;

/// The contiguous slice of a storage that a layout covers.
fn contiguous<'a, T>(x: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&x[a..b]),
        None => candle_core::bail!("{what}: needs a contiguous tensor"),
    }
}

/// Whether the fused ops can run on `x` (CPU, f32 or f64).
pub fn fusable(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Per-row cross-entropy of logits [N, V] against targets [N] (u32): out [N, 2] holds
/// (lse - x[target], lse) for each row, lse = log sum exp(x). The second column is kept for
/// the backward (the softmax is exp(x - lse)), so no row is reduced twice.
pub struct CrossEntropyRows;

impl CrossEntropyRows {
    fn rows<T: Float>(x: &[T], t: &[u32], v: usize) -> Vec<T> {
        let mut out = vec![T::zero(); t.len() * 2];
        out.par_chunks_mut(2 * ROWS_PER_TASK)
            .zip(x.par_chunks(v * ROWS_PER_TASK))
            .zip(t.par_chunks(ROWS_PER_TASK))
            .for_each(|((o, xs), ts)| {
                for ((o, row), &target) in o.chunks_mut(2).zip(xs.chunks(v)).zip(ts) {
                    let max = row.iter().fold(T::neg_infinity(), |m, &x| m.max(x));
                    let sum = row.iter().fold(T::zero(), |s, &x| s + (x - max).exp());
                    let lse = max + sum.ln();
                    o[0] = lse - row[target as usize];
                    o[1] = lse;
                }
            });
        out
    }
}

impl CustomOp2 for CrossEntropyRows {
    fn name(&self) -> &'static str {
        "cross-entropy-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let CpuStorage::U32(t) = s2 else {
            candle_core::bail!("cross-entropy: targets must be u32");
        };
        let t = contiguous(t, l2, "cross-entropy targets")?;
        if t.len() != n {
            candle_core::bail!("cross-entropy: {n} rows of logits, {} targets", t.len());
        }
        if let Some(bad) = t.iter().find(|&&i| i as usize >= v) {
            candle_core::bail!("cross-entropy: target {bad} outside the {v} classes");
        }
        let out = match s1 {
            CpuStorage::F32(x) => CpuStorage::F32(Self::rows(contiguous(x, l1, "logits")?, t, v)),
            CpuStorage::F64(x) => CpuStorage::F64(Self::rows(contiguous(x, l1, "logits")?, t, v)),
            _ => candle_core::bail!("cross-entropy: only f32 and f64 logits"),
        };
        Ok((out, Shape::from((n, 2))))
    }

    /// d loss_i / d x_ij = softmax_ij - [j = target_i]; d lse_i / d x_ij = softmax_ij.
    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Per row: lse, the gradient of the loss column, the gradient of the lse column.
        let coef = Tensor::cat(&[&res.narrow(1, 1, 1)?, grad_res], 1)?.contiguous()?;
        let g = logits
            .contiguous()?
            .apply_op3_no_bwd(&targets.contiguous()?, &coef, &CrossEntropyGrad)?;
        Ok((Some(g), None))
    }
}

/// The backward of [`CrossEntropyRows`]: (logits [N, V], targets [N], coef [N, 3] =
/// (lse, g_loss, g_lse)) -> g_loss * (p - onehot) + g_lse * p, p = exp(x - lse).
struct CrossEntropyGrad;

impl CrossEntropyGrad {
    fn rows<T: Float>(x: &[T], t: &[u32], coef: &[T], v: usize) -> Vec<T> {
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(v * ROWS_PER_TASK)
            .zip(x.par_chunks(v * ROWS_PER_TASK))
            .zip(t.par_chunks(ROWS_PER_TASK))
            .zip(coef.par_chunks(3 * ROWS_PER_TASK))
            .for_each(|(((o, xs), ts), cs)| {
                for (((o, row), &target), c) in
                    o.chunks_mut(v).zip(xs.chunks(v)).zip(ts).zip(cs.chunks(3))
                {
                    let (lse, g_loss, g_lse) = (c[0], c[1], c[2]);
                    let g = g_loss + g_lse;
                    for (d, &x) in o.iter_mut().zip(row) {
                        *d = g * (x - lse).exp();
                    }
                    o[target as usize] = o[target as usize] - g_loss;
                }
            });
        out
    }
}

impl CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, v) = l1.shape().dims2()?;
        let CpuStorage::U32(t) = s2 else {
            candle_core::bail!("cross-entropy: targets must be u32");
        };
        let t = contiguous(t, l2, "targets")?;
        let out = match (s1, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(c)) => CpuStorage::F32(Self::rows(
                contiguous(x, l1, "logits")?,
                t,
                contiguous(c, l3, "coef")?,
                v,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(c)) => CpuStorage::F64(Self::rows(
                contiguous(x, l1, "logits")?,
                t,
                contiguous(c, l3, "coef")?,
                v,
            )),
            _ => candle_core::bail!("cross-entropy grad: mismatched dtypes"),
        };
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// The unfused cross-entropy the trainer used before (per-row losses).
    fn reference_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let max = logits.max_keepdim(D::Minus1)?.detach();
        let shifted = logits.broadcast_sub(&max)?;
        let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        let logp = shifted.broadcast_sub(&lse)?;
        logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
    }

    #[test]
    fn cross_entropy_matches_the_unfused_chain_in_value_and_gradient() -> Result<()> {
        let dev = Device::Cpu;
        // 37 rows: not a multiple of ROWS_PER_TASK.
        let (n, v) = (37, 11);
        let x = Var::from_tensor(&(Tensor::randn(0f64, 3.0, (n, v), &dev)? + 50.0)?)?;
        let t: Vec<u32> = (0..n as u32).map(|i| (i * 7) % v as u32).collect();
        let t = Tensor::from_vec(t, n, &dev)?;
        let w = Tensor::randn(0f64, 1.0, n, &dev)?;
        let fused = x.as_tensor().apply_op2(&t, CrossEntropyRows)?;
        let plain = reference_rows(x.as_tensor(), &t)?;
        let loss = fused.narrow(1, 0, 1)?.squeeze(1)?;
        assert!(max_abs(&loss, &plain) < 1e-13);
        // A weighted sum of both columns exercises both gradient coefficients.
        let lse = fused.narrow(1, 1, 1)?.squeeze(1)?;
        let g1 = ((loss * &w)?.sum_all()? + lse.sum_all()?)?
            .backward()?
            .get(x.as_tensor())
            .unwrap()
            .clone();
        let plain_lse = x.as_tensor().exp()?.sum_keepdim(D::Minus1)?.log()?.squeeze(1)?;
        let g2 = ((plain * &w)?.sum_all()? + plain_lse.sum_all()?)?
            .backward()?
            .get(x.as_tensor())
            .unwrap()
            .clone();
        assert!(max_abs(&g1, &g2) < 1e-13, "{}", max_abs(&g1, &g2));
        // f32 agrees with f64 to f32 rounding.
        let f32_loss = x
            .as_tensor()
            .to_dtype(DType::F32)?
            .apply_op2(&t, CrossEntropyRows)?
            .to_dtype(DType::F64)?
            .narrow(1, 0, 1)?
            .squeeze(1)?;
        let rel = max_abs(&f32_loss, &reference_rows(x.as_tensor(), &t)?);
        assert!(rel < 1e-4, "{rel}");
        Ok(())
    }

    #[test]
    fn cross_entropy_refuses_targets_outside_the_vocabulary() -> Result<()> {
        let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;
        let t = Tensor::from_vec(vec![0u32, 3], 2, &Device::Cpu)?;
        let e = x.apply_op2(&t, CrossEntropyRows).unwrap_err().to_string();
        assert!(e.contains("target 3 outside the 3 classes"), "{e}");
        Ok(())
    }
}
