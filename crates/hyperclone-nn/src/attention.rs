//! Causal attention for inference on the CPU (forward and generate; no gradients): the
//! scores, the softmax and the product with the values, one block of query rows at a time.
//!
//! The unfused path writes the whole [B, H, T, T] score tensor, scales it, softmaxes it
//! into a second one and multiplies that by the values: at 4x512 tokens of SmolLM2 about
//! 7 GB of memory traffic per forward, and half of both products is spent on masked keys.
//! Here a block of query rows sees only the keys up to its last position, and its scores
//! and probabilities stay in a buffer the size of the block. The scores and probabilities
//! are the unfused path's bit for bit (the same gemm over the head dimension, the same
//! scaling and softmax); the product with the values sums over the keys a block can see
//! rather than over all of them with zeros, so the output may differ in the last bits.
//! Training and verification keep the unfused path (it has a backward; verification's
//! resident and streamed forwards agree bit for bit).

use crate::fused::cpu_slice;
use crate::softmax::{num_like::Float, CausalSoftmax};
use candle_core::{DType, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Query rows per block: 64 rows of scores over 512 keys are 128 KiB in f32, so a block's
/// scores and probabilities stay in L2.
const BLOCK: usize = 64;

/// softmax(q kᵀ · scale, causal) v on the CPU, for f32 or f64; bf16 attends in f32
/// (scores, softmax and the sum over values) and rounds the result to bf16, as torch's bf16
/// attention kernels accumulate in f32.
///
/// q: [B, K, G*T, D] (grouped-query layout: row r of kv head k is query head k*G + r / T at
/// position `offset + r % T`); k, v: [B, K, offset + T, D]. Query position i sees keys
/// j <= i (and i - j < window when set). Returns [B, K, G*T, D], the layout of the unfused
/// `probs.matmul(v)`.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<usize>,
    offset: usize,
) -> Result<Tensor> {
    let (b, nk, rows, d) = q.dims4()?;
    let keys = k.dim(2)?;
    let same = |x: &Tensor| x.dims4().is_ok_and(|s| s == (b, nk, keys, d));
    if !same(k) || !same(v) || keys <= offset || d == 0 {
        candle_core::bail!(
            "causal attention: q {:?}, k {:?}, v {:?} (offset {offset})",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let t = keys - offset;
    if !rows.is_multiple_of(t) {
        candle_core::bail!("causal attention: {rows} query rows are not a multiple of {t}");
    }
    if q.dtype() == DType::BF16 {
        let f32 = |x: &Tensor| x.to_dtype(DType::F32);
        return causal_attention(&f32(q)?, &f32(k)?, &f32(v)?, scale, window, offset)?
            .to_dtype(DType::BF16);
    }
    let shape = Shape::from((b, nk, rows, d));
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let geometry = Geometry {
        kv_heads: b * nk,
        rows,
        keys,
        t,
        d,
        offset,
        window,
        scale,
    };
    match q.dtype() {
        DType::F32 => geometry.attend(&q, &k, &v, shape, CausalSoftmax::row_f32),
        DType::F64 => geometry.attend(&q, &k, &v, shape, CausalSoftmax::row::<f64>),
        other => candle_core::bail!("causal attention: only f32, f64 and bf16, not {other:?}"),
    }
}

/// dst (m x n, row-major) = lhs (m x k) rhs (k x n), each operand given by its
/// (row stride, column stride), on the calling thread.
fn matmul<T: Float + WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    lhs: &[T],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[T],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    debug_assert!(dst.len() >= m * n);
    // SAFETY: gemm reads lhs and rhs and writes dst only at the strides given, which stay
    // inside the slices the callers pass (their lengths cover every strided element).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            <T as Float>::zero(),
            <T as Float>::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// The shapes of one call.
#[derive(Clone, Copy)]
struct Geometry {
    /// B * K: (batch row, kv head) pairs, each with its own keys and values.
    kv_heads: usize,
    /// G * T query rows per kv head.
    rows: usize,
    /// offset + T keys.
    keys: usize,
    t: usize,
    d: usize,
    offset: usize,
    window: Option<usize>,
    scale: f64,
}

impl Geometry {
    /// The kernel on q, k and v's data, as a tensor of `shape`.
    fn attend<T: Float + WithDType>(
        self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        shape: Shape,
        row: impl Fn(&mut [T], &[T]) + Sync,
    ) -> Result<Tensor> {
        let out = {
            let ((qs, ql), (ks, kl), (vs, vl)) = (
                q.storage_and_layout(),
                k.storage_and_layout(),
                v.storage_and_layout(),
            );
            let data = |s, l| cpu_slice::<T>(s, l, "causal attention");
            let (q, k, v) = (data(&qs, ql)?, data(&ks, kl)?, data(&vs, vl)?);
            self.run(q, k, v, row)
        };
        Tensor::from_vec(out, shape, q.device())
    }

    /// Every (kv head, query head in its group) pair's T rows as one task, in parallel.
    fn run<T: Float + WithDType>(
        self,
        q: &[T],
        k: &[T],
        v: &[T],
        row: impl Fn(&mut [T], &[T]) + Sync,
    ) -> Vec<T> {
        let (t, d) = (self.t, self.d);
        let mut out = vec![<T as Float>::zero(); self.kv_heads * self.rows * d];
        out.par_chunks_mut(t * d)
            .zip(q.par_chunks(t * d))
            .enumerate()
            .for_each(|(task, (out, q))| {
                let kv_head = task / (self.rows / t);
                let kv = kv_head * self.keys * d..(kv_head + 1) * self.keys * d;
                self.group_rows(q, &k[kv.clone()], &v[kv], out, &row);
            });
        out
    }

    /// One query head's T rows against its kv head's keys, a block of rows at a time.
    fn group_rows<T: Float + WithDType>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        out: &mut [T],
        row: &impl Fn(&mut [T], &[T]),
    ) {
        let d = self.d;
        let scale = <T as Float>::from_f64(self.scale);
        let mut scores = vec![<T as Float>::zero(); BLOCK * self.keys];
        let mut probs = vec![<T as Float>::zero(); BLOCK * self.keys];
        for q0 in (0..self.t).step_by(BLOCK) {
            let n = BLOCK.min(self.t - q0);
            // The block's last query sees keys 0..seen; earlier rows see fewer.
            let seen = self.offset + q0 + n;
            let (s, p) = (&mut scores[..n * seen], &mut probs[..n * seen]);
            // scores = q_block kᵀ (n x seen), as the unfused matmul computes each element.
            matmul((n, seen, d), s, &q[q0 * d..], (d, 1), k, (1, d));
            for (r, (s, p)) in s
                .chunks_exact_mut(seen)
                .zip(p.chunks_exact_mut(seen))
                .enumerate()
            {
                let i = self.offset + q0 + r;
                let lo = self.window.map_or(0, |w| (i + 1).saturating_sub(w));
                // As `Tensor * f64` scales: v * scale + 0.
                for x in &mut s[lo..=i] {
                    *x = *x * scale + <T as Float>::zero();
                }
                p[..lo].fill(<T as Float>::zero());
                p[i + 1..].fill(<T as Float>::zero());
                row(&mut p[lo..=i], &s[lo..=i]);
            }
            // out_block = probs (n x seen) v[..seen] (seen x d).
            matmul((n, d, seen), &mut out[q0 * d..], p, (seen, 1), v, (d, 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The unfused path, as model.rs runs it for training and verification.
    fn unfused(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        window: Option<usize>,
        offset: usize,
    ) -> Result<Tensor> {
        let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
        scores
            .apply_op1(CausalSoftmax {
                window,
                offset,
                scale: None,
            })?
            .matmul(v)
    }

    #[test]
    fn fused_attention_is_the_unfused_one() -> Result<()> {
        // (batch, kv heads, group, t, offset, d, window): GQA groups, several blocks with a
        // ragged last one, a KV cache offset, a sliding window, one-token decoding.
        let cases = [
            (2, 3, 3, 150, 0, 64, None),
            (1, 2, 1, 64, 0, 16, None),
            (1, 1, 4, 70, 5, 8, Some(20)),
            (2, 1, 2, 1, 9, 32, None),
            (1, 2, 2, 130, 0, 24, Some(50)),
        ];
        for (b, nk, g, t, offset, d, window) in cases {
            let keys = offset + t;
            let scale = 1.0 / (d as f64).sqrt();
            let q = Tensor::randn(0f64, 1.0, (b, nk, g * t, d), &Device::Cpu)?;
            let k = Tensor::randn(0f64, 1.0, (b, nk, keys, d), &Device::Cpu)?;
            let v = Tensor::randn(0f64, 1.0, (b, nk, keys, d), &Device::Cpu)?;
            let want = unfused(&q, &k, &v, scale, window, offset)?;
            let got = causal_attention(&q, &k, &v, scale, window, offset)?;
            let diff = (got - &want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f64>()?;
            assert!(
                diff < 1e-14,
                "f64 {b}x{nk}x{g}x{t}+{offset}: differs by {diff}"
            );
            let (q, k, v) = (
                q.to_dtype(DType::F32)?,
                k.to_dtype(DType::F32)?,
                v.to_dtype(DType::F32)?,
            );
            let want = unfused(&q, &k, &v, scale, window, offset)?;
            let got = causal_attention(&q, &k, &v, scale, window, offset)?;
            let diff = (&got - &want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(
                diff < 1e-5,
                "f32 {b}x{nk}x{g}x{t}+{offset}: differs by {diff}"
            );
            // bf16 attends in f32 and rounds once: the f32 kernel on the bf16 inputs.
            let bf = |x: &Tensor| x.to_dtype(DType::BF16);
            let (qb, kb, vb) = (bf(&q)?, bf(&k)?, bf(&v)?);
            let got: Vec<half::bf16> = causal_attention(&qb, &kb, &vb, scale, window, offset)?
                .flatten_all()?
                .to_vec1()?;
            let f32 = |x: &Tensor| x.to_dtype(DType::F32);
            let want: Vec<half::bf16> =
                causal_attention(&f32(&qb)?, &f32(&kb)?, &f32(&vb)?, scale, window, offset)?
                    .to_dtype(DType::BF16)?
                    .flatten_all()?
                    .to_vec1()?;
            assert_eq!(got, want, "bf16 {b}x{nk}x{g}x{t}+{offset}");
        }
        Ok(())
    }
}
