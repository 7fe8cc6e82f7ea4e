//! A bf16 microkernel for the packed linear (packed_linear.rs) on x86-64 CPUs with
//! AVX512-BF16: `vdpbf16ps` multiplies pairs of bf16 values and adds both products to f32
//! accumulators, twice the multiply-adds of an f32 FMA per instruction and half the bytes of
//! weight read, which is what bounds generation (each new token reads every weight once).
//!
//! Layout: a panel holds MR = 64 output rows for each pair of input columns, the pair
//! (w[i][2p], w[i][2p+1]) side by side, so one 512-bit load gives 16 rows' pairs. The
//! activations are bf16 rows read in place: the pair (x[t][2p], x[t][2p+1]) is one 32-bit
//! word, broadcast to every lane. Products of two bf16 values are exact in f32; each pair
//! is added to the accumulator in f32 (round to nearest even; the instruction flushes
//! subnormals to zero), so an output element is an f32 sum over the input columns in a
//! fixed order, whatever the thread count, then rounded once to bf16.

/// Output rows per panel.
pub(crate) const MR: usize = 64;
/// Output columns (tokens) per call at most.
pub(crate) const NR: usize = 6;

/// dst[j * dst_cs + i] = bf16(sum_k panel row i, column k * x[j * x_rs + k]) for i < rows
/// (<= MR) and j < n (<= NR); `k_pairs` pairs of input columns. bf16 values as raw u16.
pub(crate) type Kernel = unsafe fn(
    rows: usize,
    k_pairs: usize,
    dst: *mut u16,
    dst_cs: usize,
    panel: *const u16,
    x: *const u16,
    x_rs: usize,
);

/// The kernels by column count (`[n - 1]`), when this CPU runs them.
pub(crate) fn kernels() -> Option<&'static [Kernel; NR]> {
    #[cfg(target_arch = "x86_64")]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let ok = *OK.get_or_init(|| {
            std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512bf16")
        });
        if ok {
            return Some(&x86::BY_COLS);
        }
    }
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Kernel, MR, NR};
    use std::arch::x86_64::*;

    pub(super) static BY_COLS: [Kernel; NR] = [
        kernel::<1>,
        kernel::<2>,
        kernel::<3>,
        kernel::<4>,
        kernel::<5>,
        kernel::<6>,
    ];

    /// See [`Kernel`]; N columns, 4 x N accumulators of 16 lanes.
    ///
    /// # Safety
    /// The CPU has avx512f, avx512bw, avx512vl and avx512bf16; the panel holds k_pairs * 2 *
    /// MR values, each x row j < N holds 2 * k_pairs, and dst row j < N has `rows` writable
    /// values at dst + j * dst_cs.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn kernel<const N: usize>(
        rows: usize,
        k_pairs: usize,
        dst: *mut u16,
        dst_cs: usize,
        panel: *const u16,
        x: *const u16,
        x_rs: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 4]; N];
        for p in 0..k_pairs {
            // Four loads of 16 rows' pairs (32 bf16 values each), unaligned.
            let a = panel.add(p * 2 * MR);
            let a0: __m512bh = std::mem::transmute(_mm512_loadu_si512(a as *const _));
            let a1: __m512bh = std::mem::transmute(_mm512_loadu_si512(a.add(32) as *const _));
            let a2: __m512bh = std::mem::transmute(_mm512_loadu_si512(a.add(64) as *const _));
            let a3: __m512bh = std::mem::transmute(_mm512_loadu_si512(a.add(96) as *const _));
            for (j, acc) in acc.iter_mut().enumerate() {
                let pair = (x.add(j * x_rs + 2 * p) as *const i32).read_unaligned();
                let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                acc[0] = _mm512_dpbf16_ps(acc[0], a0, b);
                acc[1] = _mm512_dpbf16_ps(acc[1], a1, b);
                acc[2] = _mm512_dpbf16_ps(acc[2], a2, b);
                acc[3] = _mm512_dpbf16_ps(acc[3], a3, b);
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            for (r, &v) in acc.iter().enumerate() {
                let lo = r * 16;
                if lo >= rows {
                    break;
                }
                let n = (rows - lo).min(16);
                let mask: __mmask16 = if n == 16 { 0xffff } else { (1u16 << n) - 1 };
                let out: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                _mm256_mask_storeu_epi16(dst.add(j * dst_cs + lo) as *mut i16, mask, out);
            }
        }
    }
}
