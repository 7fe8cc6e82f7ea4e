//! The fused cross-entropy of the trainer's loss: per-row (loss, lse) of logits [N, V]
//! against targets, and its backward (which can reuse the forward's softmax).

use super::{contiguous, ROWS_PER_TASK};
use crate::softmax::num_like::Float;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Neumaier's compensated sum: the rounding of a long sum (a vocabulary's worth of terms)
/// stays at one unit in the last place instead of growing with the length.
fn compensated_sum<T: Float>(xs: impl Iterator<Item = T>) -> T {
    let (mut sum, mut carry) = (T::zero(), T::zero());
    for x in xs {
        let t = sum + x;
        carry = if sum.abs() >= x.abs() {
            carry + ((sum - t) + x)
        } else {
            carry + ((x - t) + sum)
        };
        sum = t;
    }
    sum + carry
}

/// The u32 class indices of a cross-entropy op, as a contiguous slice.
fn targets<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    let CpuStorage::U32(t) = s else {
        candle_core::bail!("cross-entropy: targets must be u32");
    };
    contiguous(t, l, "cross-entropy targets")
}

/// Per-row cross-entropy of logits [N, V] against targets [N] (u32): out [N, 2] holds
/// (lse - x[target], lse) for each row, lse = log sum exp(x). The second column is kept for
/// the backward (the softmax is exp(x - lse)), so no row is reduced twice.
///
/// [`CrossEntropyRows::keeping_softmax`] (the trainer's loss, whose logits track gradients)
/// also keeps each row's softmax, exp(x - max) / sum, from the exponentials the sum is made
/// of: the backward then scales it in place instead of computing every exponential of the
/// logits again (the two passes of exponentials were 8% of a training step). The losses are
/// the same bits either way. Without a kept softmax (a plain instance, or a second backward
/// of the same graph) the backward computes p = exp(x - lse) from the logits.
#[derive(Default)]
pub struct CrossEntropyRows {
    softmax: Option<Mutex<Option<CpuStorage>>>,
}

impl CrossEntropyRows {
    /// An instance whose forward keeps the softmax for its backward: a logits-sized buffer
    /// held from the forward until the backward takes it (or the graph is dropped).
    pub fn keeping_softmax() -> Self {
        CrossEntropyRows {
            softmax: Some(Mutex::new(None)),
        }
    }

    /// One (loss, lse) pair per row of `x` [N, v], from `row(logits, target)`.
    fn rows<T: Float>(
        x: &[T],
        t: &[u32],
        v: usize,
        row: impl Fn(&[T], usize) -> (T, T) + Sync,
    ) -> Vec<T> {
        let mut out = vec![T::zero(); t.len() * 2];
        out.par_chunks_mut(2 * ROWS_PER_TASK)
            .zip(x.par_chunks(v * ROWS_PER_TASK))
            .zip(t.par_chunks(ROWS_PER_TASK))
            .for_each(|((o, xs), ts)| {
                for ((o, xs), &target) in o.chunks_mut(2).zip(xs.chunks(v)).zip(ts) {
                    (o[0], o[1]) = row(xs, target as usize);
                }
            });
        out
    }

    /// As [`Self::rows`], with each row's softmax written by `row(softmax, logits, target)`
    /// into the second result [N, v].
    fn rows_keeping<T: Float>(
        x: &[T],
        t: &[u32],
        v: usize,
        row: impl Fn(&mut [T], &[T], usize) -> (T, T) + Sync,
    ) -> (Vec<T>, Vec<T>) {
        let mut out = vec![T::zero(); t.len() * 2];
        let mut p = vec![T::zero(); x.len()];
        out.par_chunks_mut(2 * ROWS_PER_TASK)
            .zip(p.par_chunks_mut(v * ROWS_PER_TASK))
            .zip(x.par_chunks(v * ROWS_PER_TASK))
            .zip(t.par_chunks(ROWS_PER_TASK))
            .for_each(|(((o, ps), xs), ts)| {
                for (((o, p), xs), &target) in o
                    .chunks_mut(2)
                    .zip(ps.chunks_mut(v))
                    .zip(xs.chunks(v))
                    .zip(ts)
                {
                    (o[0], o[1]) = row(p, xs, target as usize);
                }
            });
        (out, p)
    }

    /// (loss, lse) from the row's max and its sum of exponentials.
    fn loss_lse<T: Float>(row: &[T], target: usize, max: T, sum: T) -> (T, T) {
        // The loss as log(sum) - (x_t - max): x_t - max is exact for nearby
        // values, so no rounding at the scale of |max| enters the loss.
        (sum.ln() - (row[target] - max), max + sum.ln())
    }

    fn row<T: Float>(row: &[T], target: usize) -> (T, T) {
        let max = row.iter().fold(T::neg_infinity(), |m, &x| m.max(x));
        let sum = compensated_sum(row.iter().map(|&x| (x - max).exp()));
        Self::loss_lse(row, target, max, sum)
    }

    fn row_keeping<T: Float>(p: &mut [T], row: &[T], target: usize) -> (T, T) {
        let max = row.iter().fold(T::neg_infinity(), |m, &x| m.max(x));
        for (p, &x) in p.iter_mut().zip(row) {
            *p = (x - max).exp();
        }
        let sum = compensated_sum(p.iter().copied());
        for p in p.iter_mut() {
            *p = *p / sum;
        }
        Self::loss_lse(row, target, max, sum)
    }

    /// (loss, lse) in f32 from the row's max and sum (in f64).
    fn loss_lse_f32(row: &[f32], target: usize, max: f32, sum: f64) -> (f32, f32) {
        let log_sum = sum.ln();
        (
            (log_sum - (row[target] - max) as f64) as f32,
            (max as f64 + log_sum) as f32,
        )
    }

    /// f32: vectorized max and exponentials, the sum and its log in f64.
    fn row_f32(row: &[f32], target: usize) -> (f32, f32) {
        let max = crate::vexp::max(row);
        Self::loss_lse_f32(row, target, max, crate::vexp::exp_sum(row, max))
    }

    /// As [`Self::row_f32`] (the same exponentials and sum), keeping e^(x - max) / sum, the
    /// quotient in f64 and rounded once.
    fn row_f32_keeping(p: &mut [f32], row: &[f32], target: usize) -> (f32, f32) {
        let max = crate::vexp::max(row);
        let sum = crate::vexp::exp_store_sum(p, row, max);
        crate::vexp::scale_f64(p, 1.0 / sum);
        Self::loss_lse_f32(row, target, max, sum)
    }

    /// The gradient g_loss (p - onehot) + g_lse p from the kept softmax `p` [N, v], scaled
    /// in place.
    fn grad_from_softmax<T: Float>(
        p: &mut [T],
        t: &[u32],
        coef: &[T],
        v: usize,
        scale: impl Fn(&mut [T], T) + Sync,
    ) {
        p.par_chunks_mut(v * ROWS_PER_TASK)
            .zip(t.par_chunks(ROWS_PER_TASK))
            .zip(coef.par_chunks(2 * ROWS_PER_TASK))
            .for_each(|((ps, ts), cs)| {
                for ((p, &target), c) in ps.chunks_mut(v).zip(ts).zip(cs.chunks(2)) {
                    scale(p, c[0] + c[1]);
                    p[target as usize] = p[target as usize] - c[0];
                }
            });
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
        let t = targets(s2, l2)?;
        if t.len() != n {
            candle_core::bail!("cross-entropy: {n} rows of logits, {} targets", t.len());
        }
        if let Some(bad) = t.iter().find(|&&i| i as usize >= v) {
            candle_core::bail!("cross-entropy: target {bad} outside the {v} classes");
        }
        let out = match &self.softmax {
            None => float_args!("cross-entropy logits", [(s1, l1, x)],
                f32: Self::rows(x, t, v, Self::row_f32),
                f64: Self::rows(x, t, v, Self::row)),
            Some(kept) => {
                let (out, p) = match s1 {
                    CpuStorage::F32(x) => {
                        let x = contiguous(x, l1, "cross-entropy logits")?;
                        let (out, p) = Self::rows_keeping(x, t, v, Self::row_f32_keeping);
                        (CpuStorage::F32(out), CpuStorage::F32(p))
                    }
                    CpuStorage::F64(x) => {
                        let x = contiguous(x, l1, "cross-entropy logits")?;
                        let (out, p) = Self::rows_keeping(x, t, v, Self::row_keeping);
                        (CpuStorage::F64(out), CpuStorage::F64(p))
                    }
                    _ => candle_core::bail!("cross-entropy logits: only f32 or f64"),
                };
                if let Ok(mut slot) = kept.lock() {
                    *slot = Some(p);
                }
                out
            }
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
        let kept =
            (self.softmax.as_ref()).and_then(|m| m.lock().ok().and_then(|mut slot| slot.take()));
        if let Some(p) = kept {
            let v = logits.dim(1)?;
            let t = targets.to_vec1::<u32>()?;
            let g = match p {
                CpuStorage::F32(mut p) => {
                    let coef = grad_res.flatten_all()?.to_vec1::<f32>()?;
                    Self::grad_from_softmax(&mut p, &t, &coef, v, crate::vexp::scale);
                    Tensor::from_vec(p, logits.shape(), logits.device())?
                }
                CpuStorage::F64(mut p) => {
                    let coef = grad_res.flatten_all()?.to_vec1::<f64>()?;
                    Self::grad_from_softmax(&mut p, &t, &coef, v, |p, g| {
                        p.iter_mut().for_each(|p| *p *= g)
                    });
                    Tensor::from_vec(p, logits.shape(), logits.device())?
                }
                _ => candle_core::bail!("cross-entropy: kept softmax is f32 or f64"),
            };
            return Ok((Some(g), None));
        }
        // Per row: lse, the gradient of the loss column, the gradient of the lse column.
        let coef = Tensor::cat(&[&res.narrow(1, 1, 1)?, grad_res], 1)?.contiguous()?;
        let g = logits.contiguous()?.apply_op3_no_bwd(
            &targets.contiguous()?,
            &coef,
            &CrossEntropyGrad,
        )?;
        Ok((Some(g), None))
    }
}

/// The backward of [`CrossEntropyRows`]: (logits [N, V], targets [N], coef [N, 3] =
/// (lse, g_loss, g_lse)) -> g_loss * (p - onehot) + g_lse * p, p = exp(x - lse).
struct CrossEntropyGrad;

impl CrossEntropyGrad {
    /// The gradient rows of `x` [N, v], each from `row(out, logits, target, coef)`.
    fn rows<T: Float>(
        x: &[T],
        t: &[u32],
        coef: &[T],
        v: usize,
        row: impl Fn(&mut [T], &[T], usize, &[T]) + Sync,
    ) -> Vec<T> {
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(v * ROWS_PER_TASK)
            .zip(x.par_chunks(v * ROWS_PER_TASK))
            .zip(t.par_chunks(ROWS_PER_TASK))
            .zip(coef.par_chunks(3 * ROWS_PER_TASK))
            .for_each(|(((o, xs), ts), cs)| {
                for (((o, xs), &target), c) in
                    o.chunks_mut(v).zip(xs.chunks(v)).zip(ts).zip(cs.chunks(3))
                {
                    row(o, xs, target as usize, c);
                }
            });
        out
    }

    fn row<T: Float>(o: &mut [T], row: &[T], target: usize, c: &[T]) {
        let (lse, g_loss, g_lse) = (c[0], c[1], c[2]);
        let g = g_loss + g_lse;
        for (d, &x) in o.iter_mut().zip(row) {
            *d = g * (x - lse).exp();
        }
        o[target] = o[target] - g_loss;
    }

    fn row_f32(o: &mut [f32], row: &[f32], target: usize, c: &[f32]) {
        crate::vexp::scaled_exp(o, row, c[0], c[1] + c[2]);
        o[target] -= c[1];
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
        let t = targets(s2, l2)?;
        let out = float_args!("cross-entropy grad", [(s1, l1, x), (s3, l3, c)],
            f32: Self::rows(x, t, c, v, Self::row_f32),
            f64: Self::rows(x, t, c, v, Self::row));
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs_diff, weighted_grad};
    use candle_core::{DType, Device, Var, D};

    /// The unfused cross-entropy the trainer used before (per-row losses).
    fn reference_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let max = logits.max_keepdim(D::Minus1)?.detach();
        let shifted = logits.broadcast_sub(&max)?;
        let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        let logp = shifted.broadcast_sub(&lse)?;
        logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
    }

    /// A named constructor of the fused op.
    type Kind = (&'static str, fn() -> CrossEntropyRows);

    /// The fused op with and without a kept softmax: both instances.
    fn both_kinds() -> [Kind; 2] {
        [
            ("recomputing", CrossEntropyRows::default),
            ("keeping", CrossEntropyRows::keeping_softmax),
        ]
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
        for (kind, op) in both_kinds() {
            let fused = x.as_tensor().apply_op2(&t, op())?;
            let plain = reference_rows(x.as_tensor(), &t)?;
            let loss = fused.narrow(1, 0, 1)?.squeeze(1)?;
            assert!(max_abs_diff(&loss, &plain) < 1e-13, "{kind}");
            // A weighted sum of both columns exercises both gradient coefficients.
            let lse = fused.narrow(1, 1, 1)?.squeeze(1)?;
            let total = ((loss * &w)?.sum_all()? + lse.sum_all()?)?;
            let g1 = total.backward()?.get(x.as_tensor()).unwrap().clone();
            let plain_lse = x
                .as_tensor()
                .exp()?
                .sum_keepdim(D::Minus1)?
                .log()?
                .squeeze(1)?;
            let g2 = ((plain * &w)?.sum_all()? + plain_lse.sum_all()?)?
                .backward()?
                .get(x.as_tensor())
                .unwrap()
                .clone();
            let err = max_abs_diff(&g1, &g2);
            assert!(err < 1e-13, "{kind}: {err}");
            // A second backward of the same graph (the kept softmax is spent) recomputes.
            let again = total.backward()?.get(x.as_tensor()).unwrap().clone();
            assert!(max_abs_diff(&again, &g2) < 1e-13, "{kind}, second backward");
            // f32 agrees with f64 to f32 rounding.
            let x32 = Var::from_tensor(&x.as_tensor().to_dtype(DType::F32)?)?;
            let l32 = x32.as_tensor().apply_op2(&t, op())?;
            let f32_loss = l32.narrow(1, 0, 1)?.squeeze(1)?;
            let rel = max_abs_diff(
                &f32_loss.to_dtype(DType::F64)?,
                &reference_rows(x.as_tensor(), &t)?,
            );
            assert!(rel < 1e-4, "{kind}: {rel}");
            // The f32 path (vectorized exponentials) has the f64 gradient to f32 rounding.
            let g32 = weighted_grad(&f32_loss, &w.to_dtype(DType::F32)?, x32.as_tensor())?
                .to_dtype(DType::F64)?;
            let plain = reference_rows(x.as_tensor(), &t)?;
            let g64 = weighted_grad(&plain, &w, x.as_tensor())?;
            let err = max_abs_diff(&g32, &g64);
            assert!(err < 1e-5, "{kind}: {err}");
        }
        Ok(())
    }

    /// Keeping the softmax changes no loss bit, f32 or f64.
    #[test]
    fn keeping_the_softmax_gives_the_same_losses() -> Result<()> {
        let dev = Device::Cpu;
        // 4100 columns: whole 16-lane chunks and a tail.
        let (n, v) = (19, 4100);
        let x = (Tensor::randn(0f64, 4.0, (n, v), &dev)? - 7.0)?;
        let t: Vec<u32> = (0..n as u32).map(|i| (i * 977) % v as u32).collect();
        let t = Tensor::from_vec(t, n, &dev)?;
        for x in [x.clone(), x.to_dtype(DType::F32)?] {
            let a = x.apply_op2(&t, CrossEntropyRows::default())?;
            let b = x.apply_op2(&t, CrossEntropyRows::keeping_softmax())?;
            let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
            let (a, b) = (
                a.flatten_all()?.to_vec1::<f64>()?,
                b.flatten_all()?.to_vec1::<f64>()?,
            );
            assert!(a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        Ok(())
    }

    #[test]
    fn cross_entropy_refuses_targets_outside_the_vocabulary() -> Result<()> {
        let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;
        let t = Tensor::from_vec(vec![0u32, 3], 2, &Device::Cpu)?;
        let e = x
            .apply_op2(&t, CrossEntropyRows::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("target 3 outside the 3 classes"), "{e}");
        Ok(())
    }
}
