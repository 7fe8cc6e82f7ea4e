//! exp over f32 rows, vectorized: the cross-entropy of a 49152-token vocabulary takes two
//! exponentials per logit per step, and libm's scalar `expf` was 9% of a training step;
//! SwiGLU's sigmoid takes one per hidden unit per token (libm's, with the loop around it,
//! was ~4% of a SmolLM2 forward).
//!
//! The sigmoid is evaluated in f64 (a degree-10 polynomial, relative error ~1e-13) and
//! rounded to f32 once, so it is the correctly rounded sigmoid but for rare near-ties:
//! more exact than libm's f32 path (expf, then a sum and a division, each rounded), which a
//! 2-ulp f32 exp here would not be (SmolLM2's f32 logits moved 8% further from the f64
//! ones in a trial with exp_poly).
//!
//! One polynomial (Cephes' expf: 2^n e^r, |r| <= ln2/2, degree-7 minimax; within 2 units
//! in the last place of f32), compiled three times and chosen at run time: AVX-512,
//! AVX2+FMA, and plain x86-64 / other targets. No instruction set is assumed at build time.

/// e^x, NaN kept; below -87 the result is e^-87 ~ 1.6e-38 instead of a smaller subnormal
/// (far below any sum's rounding), above 88 it is e^88 ~ 1.65e38 instead of overflowing.
#[inline(always)]
fn exp_poly(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer in any vector width.
    const ROUND: f32 = 12_582_912.0;
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    // ln 2 split in two so that n * ln2 is exact to f32 precision.
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let r2 = r * r;
    let p = (((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5)
        * r2
        + r
        + 1.0;
    // n as an integer from t's bits (t lies in [2^23, 2^24), where the unit in the last
    // place is 1), not `n as i32`: Rust's saturating float-to-int cast compiles to scalar
    // code and kept the whole loop from being vectorized.
    let n_int = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    p * f32::from_bits((n_int.wrapping_add(127) << 23) as u32)
}

/// e^x in f64 for |x| <= 700 (clamped beyond; NaN kept): 2^n e^r with |r| <= ln2/2, r
/// from a Cody-Waite split of ln 2, e^r by Taylor to degree 10 (truncation < 3e-13
/// relative). No float-to-int conversion instruction: n comes out of the rounding
/// constant's bits, so every vector width compiles it.
#[inline(always)]
fn exp_f64(x: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    // 1.5 * 2^52: adding it rounds to an integer, held in the low bits of the sum.
    const ROUND: f64 = 6_755_399_441_055_744.0;
    // fdlibm's split: LN2_HI has 32 significant bits, so n * LN2_HI is exact for |n| < 2^20.
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    let x = if x < -700.0 { -700.0 } else { x };
    let x = if x > 700.0 { 700.0 } else { x };
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 3_628_800.0;
    for c in [
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    let n_int = t.to_bits().wrapping_sub(ROUND.to_bits()) as i64;
    p * f64::from_bits(((n_int + 1023) << 52) as u64)
}

/// sigmoid(g) = 1 / (1 + e^-g), in f64, rounded once to f32.
#[inline(always)]
fn sigmoid_f32(g: f32) -> f32 {
    (1.0 / (1.0 + exp_f64(-(g as f64)))) as f32
}

macro_rules! kernels {
    ($mod:ident, $($feature:literal),*) => {
        mod $mod {
            use super::{exp_poly, sigmoid_f32};

            /// sum_j e^(x_j - max), accumulated in f64.
            $(#[target_feature(enable = $feature)])*
            pub unsafe fn exp_sum(x: &[f32], max: f32) -> f64 {
                let mut acc = [0f64; 16];
                let mut chunks = x.chunks_exact(16);
                for c in &mut chunks {
                    for k in 0..16 {
                        acc[k] += exp_poly(c[k] - max) as f64;
                    }
                }
                let mut tail = 0f64;
                for &v in chunks.remainder() {
                    tail += exp_poly(v - max) as f64;
                }
                acc.iter().sum::<f64>() + tail
            }

            /// out_j = e^(x_j - shift); returns sum_j out_j, accumulated in f64.
            $(#[target_feature(enable = $feature)])*
            pub unsafe fn exp_store_sum(out: &mut [f32], x: &[f32], shift: f32) -> f64 {
                let mut acc = [0f64; 16];
                let n = x.len().min(out.len());
                let whole = n - n % 16;
                for (o, c) in out[..whole].chunks_exact_mut(16).zip(x[..whole].chunks_exact(16)) {
                    for k in 0..16 {
                        o[k] = exp_poly(c[k] - shift);
                        acc[k] += o[k] as f64;
                    }
                }
                let mut tail = 0f64;
                for (o, &v) in out[whole..n].iter_mut().zip(&x[whole..n]) {
                    *o = exp_poly(v - shift);
                    tail += *o as f64;
                }
                acc.iter().sum::<f64>() + tail
            }

            /// out_j = g e^(x_j - shift).
            $(#[target_feature(enable = $feature)])*
            pub unsafe fn scaled_exp(out: &mut [f32], x: &[f32], shift: f32, g: f32) {
                for (o, &v) in out.iter_mut().zip(x) {
                    *o = g * exp_poly(v - shift);
                }
            }

            /// out_j = out_j s, the product in f64 and rounded once.
            $(#[target_feature(enable = $feature)])*
            pub unsafe fn scale_f64(out: &mut [f32], s: f64) {
                for o in out.iter_mut() {
                    *o = (*o as f64 * s) as f32;
                }
            }

            /// out_j = g out_j.
            $(#[target_feature(enable = $feature)])*
            pub unsafe fn scale(out: &mut [f32], g: f32) {
                for o in out.iter_mut() {
                    *o *= g;
                }
            }

            /// out_j = g_j sigmoid(g_j) u_j with sigmoid(g) = 1 / (1 + e^-g): SwiGLU's product.
            $(#[target_feature(enable = $feature)])*
            pub unsafe fn silu_mul(out: &mut [f32], g: &[f32], u: &[f32]) {
                for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                    *o = g * sigmoid_f32(g) * u;
                }
            }

            /// out_j = sigmoid(g_j) = 1 / (1 + e^-g_j).
            $(#[target_feature(enable = $feature)])*
            pub unsafe fn sigmoid(out: &mut [f32], g: &[f32]) {
                for (o, &g) in out.iter_mut().zip(g) {
                    *o = sigmoid_f32(g);
                }
            }

            /// The largest value (NaN-free input assumed; a NaN row gives a NaN loss anyway).
            $(#[target_feature(enable = $feature)])*
            pub unsafe fn max(x: &[f32]) -> f32 {
                let mut acc = [f32::NEG_INFINITY; 16];
                let mut chunks = x.chunks_exact(16);
                for c in &mut chunks {
                    for k in 0..16 {
                        acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
                    }
                }
                let mut m = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                for a in acc {
                    m = m.max(a);
                }
                m
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
kernels!(avx512, "avx512f");
#[cfg(target_arch = "x86_64")]
kernels!(avx2, "avx2", "fma");
kernels!(plain,);

/// The widest instruction set this CPU runs, for the run-time dispatch of vectorized loops.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Level {
    Avx512,
    Avx2,
    Plain,
}

pub(crate) fn level() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| {
            if std::is_x86_feature_detected!("avx512f") {
                Level::Avx512
            } else if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
            {
                Level::Avx2
            } else {
                Level::Plain
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    Level::Plain
}

/// Calls `$f` from the caller's `avx512`, `avx2` or `plain` module (one body compiled per
/// instruction set, as `kernels!` here and in `adamw_kernels` make them), as this CPU runs.
macro_rules! dispatch {
    ($f:ident($($arg:expr),*)) => {
        // SAFETY: each branch runs only where `level` detected its instruction set.
        unsafe {
            match $crate::vexp::level() {
                #[cfg(target_arch = "x86_64")]
                $crate::vexp::Level::Avx512 => avx512::$f($($arg),*),
                #[cfg(target_arch = "x86_64")]
                $crate::vexp::Level::Avx2 => avx2::$f($($arg),*),
                _ => plain::$f($($arg),*),
            }
        }
    };
}
pub(crate) use dispatch;

/// sum_j e^(x_j - max) in f64.
pub fn exp_sum(x: &[f32], max: f32) -> f64 {
    dispatch!(exp_sum(x, max))
}

/// out_j = e^(x_j - shift), returning their sum in f64.
pub fn exp_store_sum(out: &mut [f32], x: &[f32], shift: f32) -> f64 {
    dispatch!(exp_store_sum(out, x, shift))
}

/// out_j = g e^(x_j - shift).
pub fn scaled_exp(out: &mut [f32], x: &[f32], shift: f32, g: f32) {
    dispatch!(scaled_exp(out, x, shift, g))
}

/// out_j = out_j s, computed in f64 and rounded once (a softmax's normalization).
pub fn scale_f64(out: &mut [f32], s: f64) {
    dispatch!(scale_f64(out, s))
}

/// out_j = g out_j.
pub fn scale(out: &mut [f32], g: f32) {
    dispatch!(scale(out, g))
}

/// out_j = g_j sigmoid(g_j) u_j (SwiGLU), over the shortest of the three.
pub fn silu_mul(out: &mut [f32], g: &[f32], u: &[f32]) {
    dispatch!(silu_mul(out, g, u))
}

/// out_j = sigmoid(g_j), over the shorter of the two.
pub fn sigmoid(out: &mut [f32], g: &[f32]) {
    dispatch!(sigmoid(out, g))
}

/// max_j x_j.
pub fn max(x: &[f32]) -> f32 {
    dispatch!(max(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulps_of_libm_on_every_path() {
        // Softmax arguments (<= 0) and positive ones up to 88.
        let xs: Vec<f32> = (0..400_000)
            .map(|i| -87.0 + i as f32 * 175.0 / 400_000.0)
            .collect();
        for x in xs.iter().copied().chain([0.0, -1e-8, -0.5, -0.346_573_6]) {
            let (got, want) = (exp_poly(x), x.exp());
            let ulps = (got.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(ulps <= 2, "exp({x}) = {got}, libm {want}");
        }
        assert!(exp_poly(f32::NAN).is_nan());
        // The dispatched kernels agree with the scalar polynomial (and each other) exactly
        // on the exponentials; sums to f64 rounding.
        let row: Vec<f32> = (0..1003)
            .map(|i| ((i * 37) % 101) as f32 * 0.13 - 6.0)
            .collect();
        let m = max(&row);
        assert_eq!(m, row.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        let want: f64 = row.iter().map(|&v| exp_poly(v - m) as f64).sum();
        assert!((exp_sum(&row, m) - want).abs() < 1e-12 * want);
        let mut out = vec![0f32; row.len()];
        scaled_exp(&mut out, &row, m, 0.5);
        for (o, &v) in out.iter().zip(&row) {
            assert_eq!(*o, 0.5 * exp_poly(v - m));
        }
        let s = exp_store_sum(&mut out, &row, m);
        assert!((s - want).abs() < 1e-12 * want);
        for (o, &v) in out.iter().zip(&row) {
            assert_eq!(*o, exp_poly(v - m));
        }
        // SAFETY: the plain kernels need no instruction set.
        let plain_sum = unsafe { plain::exp_sum(&row, m) };
        assert!((plain_sum - want).abs() < 1e-12 * want);
    }

    /// The dispatched sigmoid and SwiGLU kernels are the scalar formula bit for bit, and
    /// the sigmoid is within one unit in the last place of the exact one rounded to f32
    /// (libm's f64 exp as the reference), nearer than libm's f32 path on average.
    #[test]
    fn sigmoid_is_the_rounded_exact_one() {
        let g: Vec<f32> = (0..200_011)
            .map(|i| (i as f32 - 100_000.0) * 0.00123)
            .chain([0.0, -0.0, 90.0, -90.0, 1e-30, 700.5, -800.0])
            .collect();
        let u: Vec<f32> = (0..g.len())
            .map(|i| ((i * 7919) % 13) as f32 * 0.25 - 1.5)
            .collect();
        let mut s = vec![0f32; g.len()];
        sigmoid(&mut s, &g);
        let mut y = vec![0f32; g.len()];
        silu_mul(&mut y, &g, &u);
        let (mut ours, mut libm) = (0f64, 0f64);
        for k in 0..g.len() {
            assert_eq!(
                s[k].to_bits(),
                sigmoid_f32(g[k]).to_bits(),
                "sigmoid({})",
                g[k]
            );
            assert_eq!(y[k].to_bits(), (g[k] * sigmoid_f32(g[k]) * u[k]).to_bits());
            let exact = 1.0 / (1.0 + (-(g[k] as f64)).exp());
            let rounded = exact as f32;
            let ulps = (s[k].to_bits() as i64 - rounded.to_bits() as i64).abs();
            assert!(ulps <= 1, "sigmoid({}) = {}, exact {exact}", g[k], s[k]);
            let f32_path = 1.0 / (1.0 + (-g[k]).exp());
            ours += (s[k] as f64 - exact).abs();
            libm += (f32_path as f64 - exact).abs();
        }
        assert!(ours < libm, "mean error {ours} vs libm's f32 path {libm}");
        assert!(exp_f64(f64::NAN).is_nan());
        for x in [-700.0, -100.0, -1.0, -1e-9, 0.0, 0.3, 1.0, 50.0, 700.0] {
            let rel = (exp_f64(x) - x.exp()).abs() / x.exp();
            assert!(rel < 1e-12, "exp_f64({x}): relative error {rel}");
        }
    }
}
