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
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(keys)
            .zip(x.par_chunks(keys))
            .enumerate()
            .for_each(|(r, (o, xs))| {
                let i = self.offset + r % queries;
                let lo = self.window.map_or(0, |w| (i + 1).saturating_sub(w));
                row(&mut o[lo..=i], &xs[lo..=i]);
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

    /// d softmax: dx = y * (dy - sum(dy * y)); masked entries have y = 0, so dx = 0 there.
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let dot = (grad_res * res)?.sum_keepdim(D::Minus1)?;
        Ok(Some((res * grad_res.broadcast_sub(&dot)?)?))
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
            let fused = x
                .as_tensor()
                .apply_op1(CausalSoftmax { window, offset: 0 })?;
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
            })?;
        assert_eq!(f32_out.to_vec3::<f32>()?[0][2], vec![1.0 / 3.0; 3]);
        // With 3 cached positions, 2 new queries (positions 3 and 4) over 5 keys: the rows
        // of the full 5x5 softmax for those positions.
        let x = Tensor::randn(0f64, 2.0, (1, 2 * t, t), &Device::Cpu)?;
        let full = x.apply_op1(CausalSoftmax {
            window: Some(2),
            offset: 0,
        })?;
        let rows = Tensor::cat(&[x.narrow(1, 3, 2)?, x.narrow(1, 8, 2)?], 1)?;
        let cached = rows.apply_op1(CausalSoftmax {
            window: Some(2),
            offset: 3,
        })?;
        let want = Tensor::cat(&[full.narrow(1, 3, 2)?, full.narrow(1, 8, 2)?], 1)?;
        assert_eq!(cached.to_vec3::<f64>()?, want.to_vec3::<f64>()?);
        Ok(())
    }
}
