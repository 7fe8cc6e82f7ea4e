//! Causal attention for inference on the CPU (forward and generate; no gradients): the
//! scores, the softmax and the product with the values, one block of query rows at a time.
//!
//! The unfused path writes the whole [B, H, T, T] score tensor, scales it, softmaxes it
//! into a second one and multiplies that by the values: at 4x512 tokens of SmolLM2 about
//! 7 GB of memory traffic per forward, and half of both products is spent on masked keys.
//! Here a block of query rows sees only the keys up to its last position, and its scores
//! and probabilities stay in a buffer the size of the block. The scores and probabilities
//! are the unfused path's bit for bit (the same multiply-add chains over the head dimension
//! as its gemm, on keys packed once per kv head; the same scaling and softmax); the product
//! with the values sums over the keys a block can see rather than over all of them with
//! zeros, so the output may differ in the last bits.
//! Training and verification keep the unfused path (it has a backward; verification's
//! resident and streamed forwards agree bit for bit).

use crate::f32_kernel;
use crate::fused::cpu_slice;
use crate::packed_linear;
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
        DType::F32 => match PackedKeys::for_call(&geometry) {
            Some(packed) => geometry.attend(&q, &k, &v, shape, CausalSoftmax::row_f32, packed),
            None => geometry.attend(&q, &k, &v, shape, CausalSoftmax::row_f32, Gemm),
        },
        DType::F64 => geometry.attend(&q, &k, &v, shape, CausalSoftmax::row::<f64>, Gemm),
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

/// How a block's scores, q_block kᵀ, are computed: each element the same multiply-add
/// chain over the head dimension as candle's (gemm's) matmul in the unfused path.
trait BlockScores<T>: Sync {
    /// What the products need of one kv head's keys, made once for all its query rows.
    type Keys: Send + Sync;

    /// `k`: the kv head's `keys` x d keys, row-major.
    fn keys(&self, k: &[T], keys: usize, d: usize) -> Self::Keys;

    /// s (n x seen, row-major) = q (n x d, row-major) times the first `seen` keys' kᵀ.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        prepared: &Self::Keys,
        k: &[T],
        q: &[T],
        d: usize,
        s: &mut [T],
        n: usize,
        seen: usize,
    );
}

/// gemm on the keys as they lie (it packs the ones a block sees, for every block).
struct Gemm;

impl<T: Float + WithDType> BlockScores<T> for Gemm {
    type Keys = ();

    fn keys(&self, _: &[T], _: usize, _: usize) {}

    fn block(&self, _: &(), k: &[T], q: &[T], d: usize, s: &mut [T], n: usize, seen: usize) {
        matmul((n, seen, d), s, q, (d, 1), k, (1, d));
    }
}

/// f32 with AVX-512F: each kv head's keys laid out once in gemm's panel layout (64 keys side
/// by side per head-dimension column), and every block's scores run f32_kernel on them,
/// 64 keys by up to 6 query rows at a time. gemm packed the keys a block sees for every
/// block and every query head of the group again (1.4% of a 4x512 SmolLM2 forward).
#[derive(Clone, Copy)]
struct PackedKeys(&'static f32_kernel::Kernels);

impl PackedKeys {
    /// Head dimensions up to this are one gemm pass over the head dimension (no split of
    /// the sum into blocks), where f32_kernel's chain is gemm's bit for bit (a test).
    const MAX_HEAD_DIM: usize = 256;

    /// Whether gemm computes an n x seen block of scores with its microkernels, whose
    /// chains f32_kernel's repeat: it takes other routes for small products (dot products
    /// when n * seen <= 256, a matrix-vector product for one query row or one key, rank
    /// updates for d <= 2; gemm-common 0.19's gemm_basic_generic), each summing in another
    /// order. Those blocks stay gemm's, so every score keeps its bits.
    fn gemm_runs_its_kernels(n: usize, seen: usize, d: usize) -> bool {
        n * seen > 256 && n > 1 && seen > 1 && d > 2
    }

    fn for_head_dim(d: usize) -> Option<PackedKeys> {
        f32_kernel::kernels()
            .filter(|_| d <= Self::MAX_HEAD_DIM)
            .map(PackedKeys)
    }

    /// The packed keys for a call where some block runs gemm's kernels; none where every
    /// block takes another route (a decoding step's single query row), which would pack
    /// the keys for nothing.
    fn for_call(g: &Geometry) -> Option<PackedKeys> {
        let kernels_somewhere = (0..g.t).step_by(BLOCK).any(|q0| {
            let n = BLOCK.min(g.t - q0);
            Self::gemm_runs_its_kernels(n, g.offset + q0 + n, g.d)
        });
        Self::for_head_dim(g.d).filter(|_| kernels_somewhere)
    }
}

impl BlockScores<f32> for PackedKeys {
    type Keys = Vec<f32>;

    fn keys(&self, k: &[f32], keys: usize, d: usize) -> Vec<f32> {
        const MR: usize = f32_kernel::MR;
        // Zeros past the last key: the kernel reads whole panels but writes `rows` keys.
        let mut panels = vec![0f32; keys.div_ceil(MR) * MR * d];
        packed_linear::pack_rows(k, (keys, d), MR, &packed_linear::f32_slot(MR), &mut panels);
        panels
    }

    fn block(
        &self,
        panels: &Vec<f32>,
        k: &[f32],
        q: &[f32],
        d: usize,
        s: &mut [f32],
        n: usize,
        seen: usize,
    ) {
        const MR: usize = f32_kernel::MR;
        const NR: usize = f32_kernel::NR;
        if !Self::gemm_runs_its_kernels(n, seen, d) {
            return Gemm.block(&(), k, q, d, s, n, seen);
        }
        assert!(
            s.len() >= n * seen && q.len() >= n * d && panels.len() >= seen.div_ceil(MR) * MR * d
        );
        for key0 in (0..seen).step_by(MR) {
            let panel = &panels[key0 * d..][..MR * d];
            for t0 in (0..n).step_by(NR) {
                let cols = NR.min(n - t0);
                // SAFETY: the kernel reads the panel (MR x d, column stride MR) and q rows
                // t0..t0+cols (stride d), and writes s[t0..t0+cols][key0..key0+rows] (row
                // stride seen), all inside the slices (asserted above). avx512f: kernels().
                unsafe {
                    (self.0.by_cols[cols - 1])(
                        MR.min(seen - key0),
                        d,
                        s.as_mut_ptr().add(t0 * seen + key0),
                        seen,
                        panel.as_ptr(),
                        q.as_ptr().add(t0 * d),
                        d,
                        false,
                    );
                }
            }
        }
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
        scores: impl BlockScores<T>,
    ) -> Result<Tensor> {
        let out = {
            let ((qs, ql), (ks, kl), (vs, vl)) = (
                q.storage_and_layout(),
                k.storage_and_layout(),
                v.storage_and_layout(),
            );
            let data = |s, l| cpu_slice::<T>(s, l, "causal attention");
            let (q, k, v) = (data(&qs, ql)?, data(&ks, kl)?, data(&vs, vl)?);
            self.run(q, k, v, row, &scores)
        };
        Tensor::from_vec(out, shape, q.device())
    }

    /// Every (kv head, query head in its group) pair's T rows as one task, in parallel.
    fn run<T: Float + WithDType, S: BlockScores<T>>(
        self,
        q: &[T],
        k: &[T],
        v: &[T],
        row: impl Fn(&mut [T], &[T]) + Sync,
        scores: &S,
    ) -> Vec<T> {
        let (t, d) = (self.t, self.d);
        let kv_len = self.keys * d;
        let prepared: Vec<S::Keys> = k
            .par_chunks(kv_len)
            .map(|k| scores.keys(k, self.keys, d))
            .collect();
        let mut out = vec![<T as Float>::zero(); self.kv_heads * self.rows * d];
        out.par_chunks_mut(t * d)
            .zip(q.par_chunks(t * d))
            .enumerate()
            .for_each(|(task, (out, q))| {
                let kv_head = task / (self.rows / t);
                let kv = kv_head * kv_len..(kv_head + 1) * kv_len;
                let keys = (&prepared[kv_head], &k[kv.clone()]);
                self.group_rows(q, keys, &v[kv], out, &row, scores);
            });
        out
    }

    /// One query head's T rows against its kv head's keys, a block of rows at a time.
    fn group_rows<T: Float + WithDType, S: BlockScores<T>>(
        &self,
        q: &[T],
        (prepared, k): (&S::Keys, &[T]),
        v: &[T],
        out: &mut [T],
        row: &impl Fn(&mut [T], &[T]),
        scorer: &S,
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
            scorer.block(prepared, k, &q[q0 * d..], d, s, n, seen);
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
    fn packed_keys_give_gemms_scores_bit_for_bit() -> Result<()> {
        let Some(packed) = PackedKeys::for_head_dim(1) else {
            return Ok(()); // no AVX-512F here: the packed path is never taken
        };
        let values = |n: usize| -> Result<Vec<f32>> {
            Tensor::randn(0f32, 1.0, n, &Device::Cpu)?.to_vec1::<f32>()
        };
        // (query rows, keys held, keys seen): gemm's other routes (one row, one key, n x seen
        // <= 256) and their edges, partial panels, token tails, fewer keys seen than held.
        const CASES: [(usize, usize, usize); 16] = [
            (1, 1, 1),
            (1, 70, 70),
            (1, 600, 513),
            (2, 1, 1),
            (3, 5, 5),
            (6, 1, 1),
            (4, 64, 64),
            (4, 65, 65),
            (16, 16, 16),
            (17, 16, 16),
            (2, 129, 129),
            (5, 70, 70),
            (64, 64, 64),
            (64, 200, 130),
            (13, 129, 128),
            (64, 600, 512),
        ];
        for d in [
            1,
            2,
            3,
            7,
            32,
            64,
            80,
            96,
            128,
            200,
            PackedKeys::MAX_HEAD_DIM,
        ] {
            // (query rows, keys, keys seen): partial panels, token tails, fewer seen than held.
            for (n, keys, seen) in CASES {
                let (q, k) = (values(n * d)?, values(keys * d)?);
                let mut want = vec![0f32; n * seen];
                let mut got = vec![f32::NAN; n * seen];
                Gemm.block(&(), &k, &q, d, &mut want, n, seen);
                packed.block(&packed.keys(&k, keys, d), &k, &q, d, &mut got, n, seen);
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "d {d}, {n} rows, {seen} of {keys} keys"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn decoding_steps_do_not_pack_keys() {
        let g = |t, offset| Geometry {
            kv_heads: 3,
            rows: 3 * t,
            keys: offset + t,
            t,
            d: 64,
            offset,
            window: None,
            scale: 0.125,
        };
        // One query row per head: every block is gemm's matrix-vector route.
        assert!(PackedKeys::for_call(&g(1, 500)).is_none());
        // A prompt's 128 rows: two blocks of 64 x 64+ run gemm's kernels.
        let avx512 = f32_kernel::kernels().is_some();
        assert_eq!(PackedKeys::for_call(&g(128, 0)).is_some(), avx512);
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
