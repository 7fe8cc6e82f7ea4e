//! An f32 microkernel for the packed linear (packed_linear.rs) and the inference attention's
//! scores (attention.rs, on keys packed once per kv head) on x86-64 CPUs with AVX-512F,
//! on gemm's panel layout (MR = 64 output rows side by side for each input column), that can
//! continue a sum: with `accumulate` it starts from the partial sums already in dst instead
//! of zero. Each output element is the same fused multiply-add chain over the input columns
//! in order as gemm's own kernel computes (a test holds the two bit for bit), so splitting
//! the input columns into blocks changes no bit: the panel's block can then stay in L1 while
//! the tokens pass over it, instead of the whole panel (64 rows x k) streaming from L2 for
//! every 6 tokens.

/// Output rows per panel (gemm's AVX-512 f32 layout).
pub(crate) const MR: usize = 64;
/// Output columns (tokens) per call at most.
pub(crate) const NR: usize = 6;

/// dst[j * dst_cs + i] (+)= sum_k panel[k * MR + i] * x[j * x_rs + k] for i < rows (<= MR),
/// j < n (<= NR), k < `k`: from zero, or with `accumulate` continuing the chain from the
/// value in dst.
pub(crate) type Kernel = unsafe fn(
    rows: usize,
    k: usize,
    dst: *mut f32,
    dst_cs: usize,
    panel: *const f32,
    x: *const f32,
    x_rs: usize,
    accumulate: bool,
);

/// The kernels, by column count (`[n - 1]`).
pub(crate) struct Kernels {
    /// A whole panel (MR rows) by up to NR columns.
    pub by_cols: [Kernel; NR],
    /// Half a panel (32 rows; the panel's column stride MR kept) by up to 2 NR columns.
    pub half_by_cols: [Kernel; 2 * NR],
}

/// The kernels, when this CPU runs them (AVX-512F).
pub(crate) fn kernels() -> Option<&'static Kernels> {
    #[cfg(target_arch = "x86_64")]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *OK.get_or_init(|| std::is_x86_feature_detected!("avx512f")) {
            return Some(&x86::KERNELS);
        }
    }
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Kernels, MR};
    use std::arch::x86_64::*;

    pub(super) static KERNELS: Kernels = Kernels {
        by_cols: [
            kernel::<4, 1>,
            kernel::<4, 2>,
            kernel::<4, 3>,
            kernel::<4, 4>,
            kernel::<4, 5>,
            kernel::<4, 6>,
        ],
        half_by_cols: [
            kernel::<2, 1>,
            kernel::<2, 2>,
            kernel::<2, 3>,
            kernel::<2, 4>,
            kernel::<2, 5>,
            kernel::<2, 6>,
            kernel::<2, 7>,
            kernel::<2, 8>,
            kernel::<2, 9>,
            kernel::<2, 10>,
            kernel::<2, 11>,
            kernel::<2, 12>,
        ],
    };

    fn mask(rows: usize, r: usize) -> __mmask16 {
        let n = rows.saturating_sub(r * 16).min(16);
        if n == 16 {
            0xffff
        } else {
            (1u16 << n) - 1
        }
    }

    /// See [`Kernel`]; R vectors of 16 rows (of a panel whose columns are MR apart) by N
    /// columns: R x N accumulators.
    ///
    /// # Safety
    /// The CPU has avx512f; the panel holds (k - 1) * MR + 16 R values, each x row j < N
    /// holds k values, and dst row j < N has `rows` readable and writable values at dst + j *
    /// dst_cs.
    #[allow(clippy::too_many_arguments)] // a microkernel's flat signature, as gemm's
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel<const R: usize, const N: usize>(
        rows: usize,
        k: usize,
        dst: *mut f32,
        dst_cs: usize,
        panel: *const f32,
        x: *const f32,
        x_rs: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); R]; N];
        if accumulate {
            for (j, acc) in acc.iter_mut().enumerate() {
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_maskz_loadu_ps(mask(rows, r), dst.add(j * dst_cs + r * 16));
                }
            }
        }
        for kk in 0..k {
            let p = panel.add(kk * MR);
            let mut a = [_mm512_setzero_ps(); R];
            for (r, a) in a.iter_mut().enumerate() {
                *a = _mm512_loadu_ps(p.add(r * 16));
            }
            for (j, acc) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*x.add(j * x_rs + kk));
                for r in 0..R {
                    acc[r] = _mm512_fmadd_ps(a[r], b, acc[r]);
                }
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            for (r, &v) in acc.iter().enumerate() {
                if r * 16 >= rows {
                    break;
                }
                _mm512_mask_storeu_ps(dst.add(j * dst_cs + r * 16), mask(rows, r), v);
            }
        }
    }
}
