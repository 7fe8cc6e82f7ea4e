//! Causal softmax as one fused CPU op (with a backward), replacing mask-add + max + sub +
//! exp + sum + div: six passes over the [B, H, T, T] scores become one read and one write,
//! and masked entries are never exponentiated. At 4x512 tokens this traffic, not the
//! matmuls, was what separated us from PyTorch's fused attention.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Softmax over the last axis of scores [.., g*T, offset + T] (row r is query position
/// i = offset + r % T; the first `offset` keys are cached positions), where query i sees
/// keys j <= i (and i - j < window when a sliding window is set). Masked entries come out 0.
pub struct CausalSoftmax {
    pub window: Option<usize>,
    /// Positions before the first query (0 without a KV cache).
    pub offset: usize,
    /// Scores scaled first, `x * scale + 0` in their dtype, as `Tensor * f64` (candle's
    /// affine) computes them: softmax(q kᵀ · scale) without a pass that writes the scaled
    /// scores, and a backward that scales its result in the same pass.
    pub scale: Option<f64>,
}

impl CausalSoftmax {
    /// Softmax rows of scores with `keys` columns: `row(out, seen)` fills the part of a row
    /// its query sees; the masked rest stays 0.
    fn rows<T: num_like::Float>(
        &self,
        x: &[T],
        keys: usize,
        row: impl Fn(&mut [T], &[T]) + Sync,
    ) -> Vec<T> {
        let queries = keys - self.offset;
        let scale = self.scale.map(|s| (T::from_f64(s), T::zero()));
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(keys)
            .zip(x.par_chunks(keys))
            .enumerate()
            .for_each_init(Vec::new, |scaled, (r, (o, xs))| {
                let i = self.offset + r % queries;
                let lo = self.window.map_or(0, |w| (i + 1).saturating_sub(w));
                match scale {
                    Some((mul, add)) => {
                        scaled.clear();
                        scaled.extend(xs[lo..=i].iter().map(|&v| v * mul + add));
                        row(&mut o[lo..=i], scaled);
                    }
                    None => row(&mut o[lo..=i], &xs[lo..=i]),
                }
            });
        out
    }

    pub(crate) fn row<T: num_like::Float>(o: &mut [T], seen: &[T]) {
        let max = seen.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
        let mut sum = T::zero();
        for (d, &v) in o.iter_mut().zip(seen) {
            let e = (v - max).exp();
            *d = e;
            sum = sum + e;
        }
        let inv = T::one() / sum;
        for d in o {
            *d = *d * inv;
        }
    }

    /// f32 rows with the vectorized exponential (the softmax of a 4x512 SmolLM2 forward
    /// takes 140M of them), the sum in f64.
    pub(crate) fn row_f32(o: &mut [f32], seen: &[f32]) {
        let max = crate::vexp::max(seen);
        let inv = (1.0 / crate::vexp::exp_store_sum(o, seen, max)) as f32;
        for d in o {
            *d *= inv;
        }
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.dims();
        let t = *dims.last().unwrap_or(&0);
        // Rows may stack several query heads that share keys ([.., g*T, offset + T], GQA).
        if dims.len() < 2
            || t <= self.offset
            || !dims[dims.len() - 2].is_multiple_of(t - self.offset)
        {
            candle_core::bail!(
                "causal-softmax needs [.., g*T, {} + T] scores, got {dims:?}",
                self.offset
            );
        }
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("causal-softmax needs contiguous scores");
        };
        let out = match storage {
            CpuStorage::F32(x) => CpuStorage::F32(self.rows(&x[a..b], t, Self::row_f32)),
            CpuStorage::F64(x) => CpuStorage::F64(self.rows(&x[a..b], t, Self::row)),
            _ => candle_core::bail!("causal-softmax: only f32 and f64 scores"),
        };
        Ok((out, layout.shape().clone()))
    }

    /// d softmax: dx = y * (dy - sum(dy * y)) (then * scale + 0, the affine's backward);
    /// masked entries have y = 0, so dx = 0 there. The row sums are candle's (its summation
    /// order, hence its bits); the rest is one pass instead of three (four when scaled).
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        let dot = (&g * res)?.sum_keepdim(D::Minus1)?;
        let grad = res.apply_op3_no_bwd(&g, &dot, &SoftmaxGrad { scale: self.scale })?;
        Ok(Some(grad))
    }
}

/// y * (g - dot) per row (then * scale + 0), for y, g [.., keys] and dot [.., 1]: the
/// unfused chain's operations on each element in its order, so its bits.
struct SoftmaxGrad {
    scale: Option<f64>,
}

impl SoftmaxGrad {
    fn rows<T: num_like::Float>(&self, y: &[T], g: &[T], dot: &[T]) -> Vec<T> {
        let keys = y.len() / dot.len().max(1);
        let scale = self.scale.map(|s| (T::from_f64(s), T::zero()));
        let mut out = Vec::with_capacity(y.len());
        out.spare_capacity_mut()[..y.len()]
            .par_chunks_mut(keys.max(1))
            .zip(y.par_chunks(keys.max(1)).zip(g.par_chunks(keys.max(1))))
            .zip(dot.par_iter())
            .for_each(|((o, (y, g)), &d)| {
                for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                    let dx = y * (g - d);
                    o.write(match scale {
                        Some((mul, add)) => dx * mul + add,
                        None => dx,
                    });
                }
            });
        // SAFETY: cpu_fwd checked y and g of one shape with one dot per row of `keys`, so
        // the chunks above cover y.len() elements and each was written.
        unsafe { out.set_len(y.len()) };
        out
    }
}

impl candle_core::CustomOp3 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "causal-softmax-grad"
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
        let keys = *l1.dims().last().unwrap_or(&0);
        let rows = l1.shape().elem_count() / keys.max(1);
        if l2.dims() != l1.dims() || l3.shape().elem_count() != rows || keys == 0 {
            candle_core::bail!(
                "causal-softmax-grad: y {:?}, g {:?}, dot {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let out = crate::fused::float_args!(
            "causal-softmax-grad",
            [(s1, l1, y), (s2, l2, g), (s3, l3, dot)],
            self.rows(y, g, dot)
        );
        Ok((out, l1.shape().clone()))
    }
}

/// The float operations the fused ops need, for f32 and f64.
pub(crate) mod num_like {
    pub trait Float:
        Copy
        + Send
        + Sync
        + std::ops::Sub<Output = Self>
        + std::ops::Add<Output = Self>
        + std::ops::Mul<Output = Self>
        + std::ops::Div<Output = Self>
        + PartialOrd
    {
        fn zero() -> Self;
        fn one() -> Self;
        fn neg_infinity() -> Self;
        fn max(self, o: Self) -> Self;
        fn exp(self) -> Self;
        fn ln(self) -> Self;
        fn abs(self) -> Self;
        fn sqrt(self) -> Self;
        fn from_f64(x: f64) -> Self;
    }
    macro_rules! float {
        ($t:ty) => {
            impl Float for $t {
                fn zero() -> Self {
                    0.0
                }
                fn one() -> Self {
                    1.0
                }
                fn neg_infinity() -> Self {
                    <$t>::NEG_INFINITY
                }
                fn max(self, o: Self) -> Self {
                    <$t>::max(self, o)
                }
                fn exp(self) -> Self {
                    <$t>::exp(self)
                }
                fn ln(self) -> Self {
                    <$t>::ln(self)
                }
                fn abs(self) -> Self {
                    <$t>::abs(self)
                }
                fn sqrt(self) -> Self {
                    <$t>::sqrt(self)
                }
                fn from_f64(x: f64) -> Self {
                    x as $t
                }
            }
        };
    }
    float!(f32);
    float!(f64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs_diff, weighted_grad};
    use candle_core::{DType, Device, Var};

    /// The decomposed reference: mask, then softmax from plain ops.
    fn reference(x: &Tensor, t: usize, window: Option<usize>) -> Result<Tensor> {
        let rows = x.dim(D::Minus2)?;
        let m: Vec<f64> = (0..rows * t)
            .map(|k| {
                let (i, j) = ((k / t) % t, k % t);
                if j <= i && window.is_none_or(|w| i - j < w) {
                    0.0
                } else {
                    f64::NEG_INFINITY
                }
            })
            .collect();
        let x = x.broadcast_add(&Tensor::from_vec(m, (rows, t), x.device())?)?;
        let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    }

    #[test]
    fn forward_and_gradient_match_the_decomposed_softmax() -> Result<()> {
        let t = 5;
        for window in [None, Some(2)] {
            // [B=2, K=1, g*T = 2*5, T] scores, as grouped-query attention produces them.
            let x = Var::from_tensor(&Tensor::randn(0f64, 2.0, (2, 1, 2 * t, t), &Device::Cpu)?)?;
            let w = Tensor::randn(0f64, 1.0, (2, 1, 2 * t, t), &Device::Cpu)?;
            let fused = x.as_tensor().apply_op1(CausalSoftmax {
                window,
                offset: 0,
                scale: None,
            })?;
            let plain = reference(x.as_tensor(), t, window)?;
            let diff = max_abs_diff(&fused, &plain);
            assert!(diff < 1e-15, "forward differs by {diff}");
            let g_fused = weighted_grad(&fused, &w, x.as_tensor())?;
            let g_plain = weighted_grad(&plain, &w, x.as_tensor())?;
            let gdiff = max_abs_diff(&g_fused, &g_plain);
            assert!(gdiff < 1e-14, "gradient differs by {gdiff}");
        }
        // f32 (vectorized exponentials) agrees with f64 to f32 rounding.
        let x = Tensor::randn(0f64, 3.0, (2, 1, 2 * t, t), &Device::Cpu)?;
        let op = || CausalSoftmax {
            window: Some(3),
            offset: 0,
            scale: None,
        };
        let want = x.apply_op1(op())?;
        let got = x
            .to_dtype(DType::F32)?
            .apply_op1(op())?
            .to_dtype(DType::F64)?;
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-6, "f32 softmax differs by {d}");
        let f32_out =
            Tensor::ones((1, 3, 3), DType::F32, &Device::Cpu)?.apply_op1(CausalSoftmax {
                window: None,
                offset: 0,
                scale: None,
            })?;
        assert_eq!(f32_out.to_vec3::<f32>()?[0][2], vec![1.0 / 3.0; 3]);
        // With 3 cached positions, 2 new queries (positions 3 and 4) over 5 keys: the rows
        // of the full 5x5 softmax for those positions.
        let x = Tensor::randn(0f64, 2.0, (1, 2 * t, t), &Device::Cpu)?;
        let full = x.apply_op1(CausalSoftmax {
            window: Some(2),
            offset: 0,
            scale: None,
        })?;
        let rows = Tensor::cat(&[x.narrow(1, 3, 2)?, x.narrow(1, 8, 2)?], 1)?;
        let cached = rows.apply_op1(CausalSoftmax {
            window: Some(2),
            offset: 3,
            scale: None,
        })?;
        let want = Tensor::cat(&[full.narrow(1, 3, 2)?, full.narrow(1, 8, 2)?], 1)?;
        assert_eq!(cached.to_vec3::<f64>()?, want.to_vec3::<f64>()?);
        Ok(())
    }

    /// The scaled op is `Tensor * scale` then the softmax, bit for bit, in value and in
    /// gradient (the gradient against the unfused backward written out: the softmax's
    /// y * (g - sum(g * y)), then the affine's * scale + 0), f32 and f64.
    #[test]
    fn scaled_softmax_is_the_scaled_scores_softmax_bit_for_bit() -> Result<()> {
        let (t, scale) = (7, 0.125f64.sqrt());
        for dtype in [DType::F32, DType::F64] {
            for window in [None, Some(3)] {
                let x =
                    Tensor::randn(0f64, 2.0, (2, 2, 2 * t, t), &Device::Cpu)?.to_dtype(dtype)?;
                let w =
                    Tensor::randn(0f64, 1.0, (2, 2, 2 * t, t), &Device::Cpu)?.to_dtype(dtype)?;
                let x = Var::from_tensor(&x)?;
                let op = |scale| CausalSoftmax {
                    window,
                    offset: 0,
                    scale,
                };
                let fused = x.as_tensor().apply_op1(op(Some(scale)))?;
                let plain = (x.as_tensor() * scale)?.apply_op1(op(None))?;
                let bits = |t: &Tensor| -> Result<Vec<u64>> {
                    let v = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                    Ok(v.iter().map(|x| x.to_bits()).collect())
                };
                assert_eq!(bits(&fused)?, bits(&plain)?, "{dtype:?} {window:?} forward");
                let grads = (&fused * &w)?.sum_all()?.backward()?;
                let got = grads.get(x.as_tensor()).expect("a gradient");
                let dot = (&w * &fused)?.sum_keepdim(D::Minus1)?;
                let want = ((&fused * w.broadcast_sub(&dot)?)? * scale)?;
                assert_eq!(bits(got)?, bits(&want)?, "{dtype:?} {window:?} gradient");
            }
        }
        Ok(())
    }
}
