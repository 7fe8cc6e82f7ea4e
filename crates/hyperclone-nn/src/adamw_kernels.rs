//! The optimizer step's element-wise loops (the AdamW update, the row shards' weighted
//! gradient sums, the sum of squares of the gradient norm), compiled for AVX-512, AVX2 and
//! plain x86-64 and chosen at run time as in `vexp`. This crate's plain code is built for
//! baseline x86-64, so these loops ran two f64 lanes at a time (SSE2's `divpd %xmm`): 6% of a
//! vocab-49152 step for the update and 3% for the sums. The update and the weighted sums
//! are the same IEEE operations in the same order on every path (Rust never fuses a
//! multiply and an add), so they give the same bits as before and on every CPU.

use crate::vexp::dispatch;

/// The scalars of one AdamW update (see `train::AdamW::step`).
#[derive(Clone, Copy)]
pub(crate) struct Update {
    pub clip: f64,
    pub b1: f64,
    pub b2: f64,
    /// 1 - b1^t and 1 - b2^t: the bias corrections.
    pub c1: f64,
    pub c2: f64,
    pub eps: f64,
    pub lr: f64,
    pub decay: f64,
}

macro_rules! kernels {
    ($mod:ident, $($feature:literal),*) => {
        mod $mod {
            use super::Update;

            /// One AdamW update of w, m, v from g, in f64, each result rounded once to f32.
            $(#[target_feature(enable = $feature)])*
            pub unsafe fn update<G: Copy + Into<f64>>(
                w: &mut [f32],
                m: &mut [f32],
                v: &mut [f32],
                g: &[G],
                u: &Update,
            ) {
                for (((w, m), v), &g) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                    let gk = g.into() * u.clip;
                    let mk = u.b1 * *m as f64 + (1.0 - u.b1) * gk;
                    let vk = u.b2 * *v as f64 + (1.0 - u.b2) * gk * gk;
                    *m = mk as f32;
                    *v = vk as f32;
                    let update = (mk / u.c1) / ((vk / u.c2).sqrt() + u.eps);
                    let wk = *w as f64;
                    *w = (wk - u.lr * (update + u.decay * wk)) as f32;
                }
            }

            /// acc_k += weight * g_k.
            $(#[target_feature(enable = $feature)])*
            pub unsafe fn add_weighted(acc: &mut [f64], g: &[f32], weight: f64) {
                for (a, &b) in acc.iter_mut().zip(g) {
                    *a += weight * b as f64;
                }
            }

            /// sum_k g_k^2 in f64, over 8 interleaved partial sums added in a fixed order.
            $(#[target_feature(enable = $feature)])*
            pub unsafe fn sum_squares<G: Copy + Into<f64>>(g: &[G]) -> f64 {
                let mut acc = [0f64; 8];
                let mut chunks = g.chunks_exact(8);
                for c in &mut chunks {
                    for k in 0..8 {
                        let x: f64 = c[k].into();
                        acc[k] += x * x;
                    }
                }
                let mut tail = 0f64;
                for &x in chunks.remainder() {
                    let x: f64 = x.into();
                    tail += x * x;
                }
                ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
kernels!(avx512, "avx512f");
#[cfg(target_arch = "x86_64")]
kernels!(avx2, "avx2", "fma");
kernels!(plain,);

/// One AdamW update over the shortest of the four slices.
pub(crate) fn update<G: Copy + Into<f64>>(
    w: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[G],
    u: &Update,
) {
    dispatch!(update(w, m, v, g, u))
}

/// acc_k += weight * g_k, over the shorter of the two.
pub(crate) fn add_weighted(acc: &mut [f64], g: &[f32], weight: f64) {
    dispatch!(add_weighted(acc, g, weight))
}

/// sum_k g_k^2 in f64: the same bits on every path and thread count.
pub(crate) fn sum_squares<G: Copy + Into<f64>>(g: &[G]) -> f64 {
    dispatch!(sum_squares(g))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every compiled path gives the plain path's bits (which are the scalar formula's).
    #[test]
    fn every_path_gives_the_same_bits() {
        let n = 1003;
        let vals = |salt: u64, scale: f64| -> Vec<f32> {
            (0..n)
                .map(|i| ((hyperclone_core::rng::uniform(salt, i) * 2.0 - 1.0) * scale) as f32)
                .collect()
        };
        let (w0, m0, g) = (vals(1, 0.1), vals(2, 1e-3), vals(3, 1e-2));
        let v0: Vec<f32> = vals(4, 1e-3).iter().map(|x| x * x).collect();
        let u = Update {
            clip: 0.7,
            b1: 0.9,
            b2: 0.95,
            c1: 0.19,
            c2: 0.0975,
            eps: 1e-8,
            lr: 3e-4,
            decay: 0.1,
        };
        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        type Step<'a> = &'a dyn Fn(&mut [f32], &mut [f32], &mut [f32]);
        let run = |f: Step| {
            let (mut w, mut m, mut v) = (w0.clone(), m0.clone(), v0.clone());
            f(&mut w, &mut m, &mut v);
            (bits(&w), bits(&m), bits(&v))
        };
        // SAFETY: the plain kernels need no instruction set.
        let want = run(&|w, m, v| unsafe { plain::update(w, m, v, &g, &u) });
        assert_eq!(run(&|w, m, v| update(w, m, v, &g, &u)), want);
        // The scalar formula of AdamW::step, written out once more.
        let (mut w, mut m, mut v) = (w0.clone(), m0.clone(), v0.clone());
        for k in 0..n as usize {
            let gk = g[k] as f64 * u.clip;
            let mk = u.b1 * m[k] as f64 + (1.0 - u.b1) * gk;
            let vk = u.b2 * v[k] as f64 + (1.0 - u.b2) * gk * gk;
            (m[k], v[k]) = (mk as f32, vk as f32);
            let step = (mk / u.c1) / ((vk / u.c2).sqrt() + u.eps);
            w[k] = (w[k] as f64 - u.lr * (step + u.decay * w[k] as f64)) as f32;
        }
        assert_eq!((bits(&w), bits(&m), bits(&v)), want);

        let acc0: Vec<f64> = g.iter().map(|&x| x as f64 * 3.0).collect();
        let (mut a, mut b) = (acc0.clone(), acc0.clone());
        add_weighted(&mut a, &g, 0.37);
        // SAFETY: as above.
        unsafe { plain::add_weighted(&mut b, &g, 0.37) };
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert!(a
            .iter()
            .zip(&acc0)
            .zip(&g)
            .all(|((x, a0), &gk)| x.to_bits() == (a0 + 0.37 * gk as f64).to_bits()));

        // SAFETY: as above.
        let plain_sq = unsafe { plain::sum_squares(&g) };
        assert_eq!(sum_squares(&g).to_bits(), plain_sq.to_bits());
        let exact: f64 = g.iter().map(|&x| (x as f64) * (x as f64)).sum();
        assert!((plain_sq - exact).abs() <= 1e-14 * exact);
    }
}
