//! RMSNorm's loops over a task's rows, compiled for AVX-512, AVX2 and plain x86-64 and
//! chosen at run time as in `vexp` (this crate's plain code is built for baseline x86-64:
//! two f64 or four f32 lanes). Every path runs the unfused chain's operations in its order
//! (Rust never fuses a multiply and an add), so every path gives the same bits. Each row's
//! sum of squares and its backward dot product are one sequential chain over the columns,
//! as the unfused chain sums them; [`LANES`] rows run side by side so those chains overlap
//! instead of waiting on each add.

use crate::softmax::num_like::Float;
use crate::vexp::dispatch;
use std::mem::MaybeUninit;

/// Rows whose sequential sums run side by side.
const LANES: usize = 8;

/// 1 / sqrt(mean(x^2) + eps) from a row's sum of squares, in the row's dtype as the
/// unfused chain computes it.
#[inline(always)]
fn inv_rms_of<T: Float>(sum_squares: T, d: usize, eps: f64) -> T {
    T::one() / (sum_squares / T::from_f64(d as f64) + T::from_f64(eps)).sqrt()
}

macro_rules! kernels {
    ($mod:ident, $($feature:literal),*) => {
        mod $mod {
            use super::{inv_rms_of, Float, LANES};
            use std::mem::MaybeUninit;

            /// 1 / sqrt(mean(x^2) + eps) of each row of `rows` (d columns each).
            $(#[target_feature(enable = $feature)])*
            pub unsafe fn inv_rms_rows<T: Float>(rows: &[T], d: usize, eps: f64) -> Vec<T> {
                let mut out = Vec::with_capacity(rows.len() / d.max(1));
                let mut groups = rows.chunks_exact((d * LANES).max(1));
                for group in &mut groups {
                    let mut ss = [T::zero(); LANES];
                    for k in 0..d {
                        for (l, s) in ss.iter_mut().enumerate() {
                            let x = group[l * d + k];
                            *s = *s + x * x;
                        }
                    }
                    out.extend(ss.iter().map(|&s| inv_rms_of(s, d, eps)));
                }
                for row in groups.remainder().chunks_exact(d.max(1)) {
                    let ss = row.iter().fold(T::zero(), |s, &x| s + x * x);
                    out.push(inv_rms_of(ss, d, eps));
                }
                out
            }

            /// y = x r w for each row of xs into o (every element of o written).
            $(#[target_feature(enable = $feature)])*
            pub unsafe fn forward<T: Float>(o: &mut [MaybeUninit<T>], xs: &[T], w: &[T], eps: f64) {
                let d = w.len();
                let rs = inv_rms_rows(xs, d, eps);
                for ((o, row), &r) in o.chunks_mut(d).zip(xs.chunks(d)).zip(&rs) {
                    for ((o, &x), &w) in o.iter_mut().zip(row).zip(w) {
                        o.write(x * r * w);
                    }
                }
            }

            /// dx of each row into dx (every element written); returns these rows' dw
            /// (each column's sum over the rows in order).
            $(#[target_feature(enable = $feature)])*
            pub unsafe fn backward<T: Float>(
                dx: &mut [MaybeUninit<T>],
                xs: &[T],
                gs: &[T],
                w: &[T],
                eps: f64,
            ) -> Vec<T> {
                let d = w.len();
                let rs = inv_rms_rows(xs, d, eps);
                let rows = rs.len();
                // Each row's dot over the columns in order, LANES rows side by side.
                let mut dots = vec![T::zero(); rows];
                for g0 in (0..rows).step_by(LANES) {
                    let lanes = g0..rows.min(g0 + LANES);
                    for k in 0..d {
                        for l in lanes.clone() {
                            dots[l] = dots[l] + gs[l * d + k] * w[k] * xs[l * d + k];
                        }
                    }
                }
                let mut dw = vec![T::zero(); d];
                for (((dx, row), g), (&r, &dot)) in dx
                    .chunks_mut(d)
                    .zip(xs.chunks(d))
                    .zip(gs.chunks(d))
                    .zip(rs.iter().zip(&dots))
                {
                    let c = r * r * dot / T::from_f64(d as f64);
                    for k in 0..d {
                        dw[k] = dw[k] + g[k] * row[k] * r;
                        dx[k].write(r * (g[k] * w[k] - row[k] * c));
                    }
                }
                dw
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
kernels!(avx512, "avx512f");
#[cfg(target_arch = "x86_64")]
kernels!(avx2, "avx2", "fma");
kernels!(plain,);

/// RMSNorm of a task's rows (d = w.len() columns each) into o, writing all of o (as many
/// elements as xs).
pub(super) fn forward<T: Float>(o: &mut [MaybeUninit<T>], xs: &[T], w: &[T], eps: f64) {
    dispatch!(forward(o, xs, w, eps))
}

/// RMSNorm's input gradient of a task's rows into dx (writing all of it, as many elements
/// as xs), and their share of dw.
pub(super) fn backward<T: Float>(
    dx: &mut [MaybeUninit<T>],
    xs: &[T],
    gs: &[T],
    w: &[T],
    eps: f64,
) -> Vec<T> {
    dispatch!(backward(dx, xs, gs, w, eps))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every instruction-set path gives the plain one's bits (which the RMSNorm tests hold
    /// to the unfused chain), on row counts that leave partial groups of LANES.
    #[test]
    fn every_path_gives_the_same_bits() {
        for (rows, d) in [(16usize, 128usize), (13, 77), (3, 576)] {
            let n = rows * d;
            let v = |salt: usize| -> Vec<f32> {
                (0..n)
                    .map(|i| ((i * 7919 + salt) % 1000) as f32 / 500.0 - 1.0)
                    .collect()
            };
            let (x, g) = (v(1), v(2));
            let w: Vec<f32> = (0..d).map(|i| 1.0 + (i % 7) as f32 * 0.1).collect();
            let buf = || vec![MaybeUninit::<f32>::uninit(); n];
            // SAFETY: forward and backward write every element of their n-element output.
            let done = |v: Vec<MaybeUninit<f32>>| -> Vec<f32> {
                v.into_iter().map(|x| unsafe { x.assume_init() }).collect()
            };
            let (mut want, mut want_dx) = (buf(), buf());
            // SAFETY: the plain path needs no CPU feature.
            let want_dw = unsafe {
                plain::forward(&mut want, &x, &w, 1e-5);
                plain::backward(&mut want_dx, &x, &g, &w, 1e-5)
            };
            let (mut got, mut got_dx) = (buf(), buf());
            forward(&mut got, &x, &w, 1e-5);
            let got_dw = backward(&mut got_dx, &x, &g, &w, 1e-5);
            let (want, want_dx, got, got_dx) = (done(want), done(want_dx), done(got), done(got_dx));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "forward {rows}x{d}");
            assert_eq!(bits(&got_dx), bits(&want_dx), "dx {rows}x{d}");
            assert_eq!(bits(&got_dw), bits(&want_dw), "dw {rows}x{d}");
        }
    }
}
