//! Helpers of the crate's unit tests that compare a fused op with its decomposed reference.

use candle_core::{Result, Tensor};

/// The largest absolute difference between two tensors of the same shape, as f64.
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .and_then(|d| {
            d.abs()?
                .flatten_all()?
                .max(0)?
                .to_dtype(candle_core::DType::F64)
        })
        .and_then(|m| m.to_scalar::<f64>())
        .unwrap()
}

/// The gradient of sum(y * w) with respect to `x` (a weighted sum reaches every output).
pub(crate) fn weighted_grad(y: &Tensor, w: &Tensor, x: &Tensor) -> Result<Tensor> {
    Ok((y * w)?.sum_all()?.backward()?.get(x).unwrap().clone())
}
