//! Fused CPU ops with hand-written backwards, for the hot spots a profile of a training
//! step showed: each replaces a chain of candle element-wise ops (one full pass over a
//! large tensor and one fresh allocation per op, forward and backward) with one pass.
//!
//! Every op here has a test comparing its value and gradient with the unfused chain in
//! f64. Devices other than the CPU, and dtypes other than f32/f64, take the unfused path.

use crate::softmax::num_like::Float;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows handed to one rayon task: large enough to amortize the task, small enough to
/// balance a few threads. Per-chunk partial sums are added in chunk order, so results do
/// not depend on the thread count.
const ROWS_PER_TASK: usize = 16;

/// The contiguous slice of a storage that a layout covers.
pub(crate) fn contiguous<'a, T>(x: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&x[a..b]),
        None => candle_core::bail!("{what}: needs a contiguous tensor"),
    }
}

/// A contiguous CPU tensor's data as &[T], read in place (the fused inference kernels).
pub(crate) fn cpu_slice<'a, T: candle_core::WithDType>(
    storage: &'a candle_core::Storage,
    l: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    let candle_core::Storage::Cpu(cpu) = storage else {
        candle_core::bail!("{what}: CPU tensors only");
    };
    contiguous(cpu.as_slice::<T>()?, l, what)
}

/// The float storages of an op, as contiguous slices of one type bound to the given names:
/// `float_args!(what, [(s1, l1, x), (s2, l2, w)], body)` evaluates `body` with x, w as
/// &[f32] or &[f64] and wraps its Vec in the matching storage; the `f32: .., f64: ..` form
/// takes a body per dtype. Used by the ops here and by `softmax`'s.
macro_rules! float_args {
    ($what:expr, [$(($s:expr, $l:expr, $a:ident)),+], f32: $b32:expr, f64: $b64:expr) => {
        match ($($s,)+) {
            ($(candle_core::CpuStorage::F32($a),)+) => {
                $(let $a = $crate::fused::contiguous($a, $l, $what)?;)+
                candle_core::CpuStorage::F32($b32)
            }
            ($(candle_core::CpuStorage::F64($a),)+) => {
                $(let $a = $crate::fused::contiguous($a, $l, $what)?;)+
                candle_core::CpuStorage::F64($b64)
            }
            _ => candle_core::bail!("{}: only f32 or f64, all the same", $what),
        }
    };
    ($what:expr, [$(($s:expr, $l:expr, $a:ident)),+], $body:expr) => {
        $crate::fused::float_args!($what, [$(($s, $l, $a)),+], f32: $body, f64: $body)
    };
}
pub(crate) use float_args;

/// Whether the fused ops can run on `x` (CPU, f32 or f64).
pub fn fusable(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

mod cross_entropy;
mod rms_kernels;
pub use cross_entropy::CrossEntropyRows;

/// Splits a flat two-part result [a | b] into tensors shaped like `sa` and `sb`.
fn split(flat: &Tensor, sa: &Shape, sb: &Shape) -> Result<(Tensor, Tensor)> {
    let (na, nb) = (sa.elem_count(), sb.elem_count());
    Ok((
        flat.narrow(0, 0, na)?.reshape(sa)?,
        flat.narrow(0, na, nb)?.reshape(sb)?,
    ))
}

/// RMSNorm over the last axis: y = x * w / sqrt(mean(x^2) + eps), for x [.., d], w [d].
pub struct RmsNorm {
    pub eps: f64,
}

impl RmsNorm {
    fn forward<T: Float>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let d = w.len();
        let mut out = Vec::with_capacity(x.len());
        out.spare_capacity_mut()[..x.len()]
            .par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK))
            .for_each(|(o, xs)| rms_kernels::forward(o, xs, w, self.eps));
        // SAFETY: the chunks cover x.len() elements and the kernel writes every element of
        // its chunk (as many as its rows of x; x is whole rows of d, the op checked).
        unsafe { out.set_len(x.len()) };
        out
    }

    /// [dx | dw] from x, w and the output gradient g:
    /// dx = r (g w - x r^2 mean(g w x)), dw = sum over rows of g x r.
    fn backward<T: Float>(&self, x: &[T], w: &[T], g: &[T]) -> Vec<T> {
        let d = w.len();
        // Room for dw after dx, so appending it does not move dx.
        let mut dx = Vec::with_capacity(x.len() + d);
        let partial_dw: Vec<Vec<T>> = dx.spare_capacity_mut()[..x.len()]
            .par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK))
            .zip(g.par_chunks(d * ROWS_PER_TASK))
            .map(|((dx, xs), gs)| rms_kernels::backward(dx, xs, gs, w, self.eps))
            .collect();
        // SAFETY: as in forward: every element of every chunk of dx was written.
        unsafe { dx.set_len(x.len()) };
        // In chunk order: the same sum on any number of threads.
        let mut dw = vec![T::zero(); d];
        for p in partial_dw {
            for (a, b) in dw.iter_mut().zip(p) {
                *a = *a + b;
            }
        }
        dx.extend(dw);
        dx
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = l2.shape().dims1()?;
        if l1.dims().last() != Some(&d) {
            candle_core::bail!("rms-norm: weight of {d} for input {:?}", l1.dims());
        }
        let out = float_args!("rms-norm", [(s1, l1, x), (s2, l2, w)], self.forward(x, w));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let flat = x.contiguous()?.apply_op3_no_bwd(
            &w.contiguous()?,
            &grad_res.contiguous()?,
            &RmsNormGrad { eps: self.eps },
        )?;
        let (dx, dw) = split(&flat, x.shape(), w.shape())?;
        Ok((Some(dx), Some(dw)))
    }
}

struct RmsNormGrad {
    eps: f64,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
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
        let d = l2.shape().dims1()?;
        // The backward writes dx uninitialised: x and g must be whole rows of the same shape.
        if l1.dims().last() != Some(&d) || l3.dims() != l1.dims() {
            candle_core::bail!(
                "rms-norm grad: x {:?}, w {:?}, g {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let norm = RmsNorm { eps: self.eps };
        let n = l1.shape().elem_count() + l2.shape().elem_count();
        let out = float_args!(
            "rms-norm grad",
            [(s1, l1, x), (s2, l2, w), (s3, l3, g)],
            norm.backward(x, w, g)
        );
        Ok((out, Shape::from(n)))
    }
}

/// SwiGLU's product: silu(gate) * up, element-wise (silu(g) = g / (1 + exp(-g))).
pub struct SiluMul;

fn sigmoid<T: Float>(g: T) -> T {
    T::one() / (T::one() + (T::zero() - g).exp())
}

/// The sigmoid of each element of a chunk, f64 through libm's exp.
fn sigmoid_rows_f64(out: &mut [f64], g: &[f64]) {
    for (o, &g) in out.iter_mut().zip(g) {
        *o = sigmoid(g);
    }
}

/// silu(g) * u over a chunk, f64 through libm's exp.
fn silu_mul_rows_f64(out: &mut [f64], g: &[f64], u: &[f64]) {
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *o = g * sigmoid(g) * u;
    }
}

// f32 takes its exponentials from vexp (vectorized; within 2 ulps of libm's), f64 from libm
// (the exact paths keep their exp).
impl SiluMul {
    fn forward<T: Float>(g: &[T], u: &[T], rows: impl Fn(&mut [T], &[T], &[T]) + Sync) -> Vec<T> {
        const CHUNK: usize = 1 << 14;
        let mut out = vec![T::zero(); g.len()];
        out.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(u.par_chunks(CHUNK))
            .for_each(|((o, g), u)| rows(o, g, u));
        out
    }

    /// A bf16 model's SwiGLU (inference): each element computed in f32 from the bf16
    /// inputs and rounded once (transformers rounds silu(g) and the product: twice).
    fn forward_bf16(g: &[half::bf16], u: &[half::bf16]) -> Vec<half::bf16> {
        const CHUNK: usize = 1 << 12;
        let mut out = vec![half::bf16::ZERO; g.len()];
        out.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(u.par_chunks(CHUNK))
            .for_each(|((o, g), u)| {
                let g32: Vec<f32> = g.iter().map(|v| v.to_f32()).collect();
                let u32: Vec<f32> = u.iter().map(|v| v.to_f32()).collect();
                let mut y = vec![0f32; g.len()];
                crate::vexp::silu_mul(&mut y, &g32, &u32);
                for (o, y) in o.iter_mut().zip(y) {
                    *o = half::bf16::from_f32(y);
                }
            });
        out
    }

    /// [d gate | d up]: d gate = dy u s (1 + g (1 - s)), d up = dy g s, s = sigmoid(g)
    /// (computed by `sigmoid_rows`).
    fn backward<T: Float>(
        g: &[T],
        u: &[T],
        dy: &[T],
        sigmoid_rows: impl Fn(&mut [T], &[T]) + Sync,
    ) -> Vec<T> {
        const CHUNK: usize = 1 << 14;
        let n = g.len();
        let mut out = vec![T::zero(); 2 * n];
        let (dg, du) = out.split_at_mut(n);
        dg.par_chunks_mut(CHUNK)
            .zip(du.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .zip(u.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
            .for_each(|(((dg, du), g), (u, dy))| {
                sigmoid_rows(dg, g);
                for k in 0..g.len() {
                    let s = dg[k];
                    dg[k] = dy[k] * u[k] * s * (T::one() + g[k] * (T::one() - s));
                    du[k] = dy[k] * g[k] * s;
                }
            });
        out
    }
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("silu-mul: shapes {:?} and {:?}", l1.dims(), l2.dims());
        }
        // bf16 for inference only: its backward (SiluMulGrad) takes f32 or f64.
        if let (CpuStorage::BF16(g), CpuStorage::BF16(u)) = (s1, s2) {
            let (g, u) = (
                contiguous(g, l1, "silu-mul")?,
                contiguous(u, l2, "silu-mul")?,
            );
            return Ok((
                CpuStorage::BF16(Self::forward_bf16(g, u)),
                l1.shape().clone(),
            ));
        }
        let out = float_args!(
            "silu-mul",
            [(s1, l1, g), (s2, l2, u)],
            f32: Self::forward(g, u, crate::vexp::silu_mul),
            f64: Self::forward(g, u, silu_mul_rows_f64)
        );
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let flat = g.contiguous()?.apply_op3_no_bwd(
            &u.contiguous()?,
            &grad_res.contiguous()?,
            &SiluMulGrad,
        )?;
        let (dg, du) = split(&flat, g.shape(), u.shape())?;
        Ok((Some(dg), Some(du)))
    }
}

struct SiluMulGrad;

impl CustomOp3 for SiluMulGrad {
    fn name(&self) -> &'static str {
        "silu-mul-grad"
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
        let n = l1.shape().elem_count();
        let out = float_args!(
            "silu-mul grad",
            [(s1, l1, g), (s2, l2, u), (s3, l3, dy)],
            f32: SiluMul::backward(g, u, dy, crate::vexp::sigmoid),
            f64: SiluMul::backward(g, u, dy, sigmoid_rows_f64)
        );
        Ok((out, Shape::from(2 * n)))
    }
}

/// Rotary embedding (transformers' rotate_half convention) on the first `rot` dims of x
/// [.., T, hd] with cos/sin tables [T, rot]; the other hd - rot dims pass through. Row r of
/// x is position r % T. Its backward is the same rotation with sin negated (the inverse
/// rotation), so it is this op again.
pub struct Rope;

impl Rope {
    fn forward<T: Float>(x: &[T], cos: &[T], sin: &[T], t: usize, hd: usize) -> Vec<T> {
        let rot = cos.len() / t;
        let half = rot / 2;
        let mut out = x.to_vec();
        out.par_chunks_mut(hd * t)
            .zip(x.par_chunks(hd * t))
            .for_each(|(o, xs)| {
                for (p, (o, row)) in o.chunks_mut(hd).zip(xs.chunks(hd)).enumerate() {
                    let (c, s) = (&cos[p * rot..(p + 1) * rot], &sin[p * rot..(p + 1) * rot]);
                    for k in 0..half {
                        // [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]
                        o[k] = row[k] * c[k] + (T::zero() - row[k + half]) * s[k];
                        o[k + half] = row[k + half] * c[k + half] + row[k] * s[k + half];
                    }
                }
            });
        out
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope"
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
        let dims = l1.dims();
        let (t, rot) = l2.shape().dims2()?;
        let hd = *dims.last().unwrap_or(&0);
        if dims.len() < 2
            || dims[dims.len() - 2] != t
            || l3.dims() != l2.dims()
            || rot > hd
            || rot % 2 != 0
        {
            candle_core::bail!("rope: x {dims:?} with tables {:?}", l2.dims());
        }
        let out = float_args!(
            "rope",
            [(s1, l1, x), (s2, l2, c), (s3, l3, s)],
            Self::forward(x, c, s, t, hd)
        );
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = grad_res
            .contiguous()?
            .apply_op3_no_bwd(cos, &sin.neg()?, &Rope)?;
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;
    use candle_core::{Device, Var, D};

    /// Value and gradients of `fused` against `plain` for random inputs, in f64.
    fn check_grads(
        shapes: &[&[usize]],
        fused: impl Fn(&[Tensor]) -> Result<Tensor>,
        plain: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<()> {
        let dev = Device::Cpu;
        let vars: Vec<Var> = shapes
            .iter()
            .map(|s| Var::from_tensor(&Tensor::randn(0f64, 1.0, s.to_vec(), &dev)?))
            .collect::<Result<_>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (a, b) = (fused(&ts)?, plain(&ts)?);
        assert!(
            max_abs_diff(&a, &b) < 1e-14,
            "value differs by {}",
            max_abs_diff(&a, &b)
        );
        let w = Tensor::randn(0f64, 1.0, a.shape(), &dev)?;
        let ga = (a * &w)?.sum_all()?.backward()?;
        let gb = (b * &w)?.sum_all()?.backward()?;
        for t in &ts {
            let (x, y) = (ga.get(t).unwrap(), gb.get(t).unwrap());
            assert!(
                max_abs_diff(x, y) < 1e-13,
                "gradient differs by {}",
                max_abs_diff(x, y)
            );
        }
        Ok(())
    }

    #[test]
    fn rms_norm_matches_the_unfused_chain_in_value_and_gradient() -> Result<()> {
        // 37 rows (not a multiple of ROWS_PER_TASK), d = 6.
        check_grads(
            &[&[37, 6], &[6]],
            |t| t[0].apply_op2(&t[1], RmsNorm { eps: 1e-5 }),
            |t| {
                let ms = t[0].sqr()?.mean_keepdim(D::Minus1)?;
                t[0].broadcast_div(&(ms + 1e-5)?.sqrt()?)?
                    .broadcast_mul(&t[1])
            },
        )
    }

    #[test]
    fn silu_mul_matches_the_unfused_chain_in_value_and_gradient() -> Result<()> {
        check_grads(
            &[&[5, 9], &[5, 9]],
            |t| t[0].apply_op2(&t[1], SiluMul),
            |t| (&t[0] * candle_nn::ops::sigmoid(&t[0])?)? * &t[1],
        )
    }

    /// bf16 SwiGLU (inference) is the f32 computation on the bf16 inputs, rounded once,
    /// and within one bf16 rounding (2^-8 relative) of the exact f64 value.
    #[test]
    fn silu_mul_in_bf16_rounds_once() -> Result<()> {
        let n = 10_007; // several chunks and a ragged last one
        let g = Tensor::randn(0f32, 3.0, n, &Device::Cpu)?.to_dtype(DType::BF16)?;
        let u = Tensor::randn(0f32, 1.0, n, &Device::Cpu)?.to_dtype(DType::BF16)?;
        let got: Vec<half::bf16> = g.apply_op2(&u, SiluMul)?.to_vec1()?;
        let (g32, u32): (Vec<f32>, Vec<f32>) = (
            g.to_dtype(DType::F32)?.to_vec1()?,
            u.to_dtype(DType::F32)?.to_vec1()?,
        );
        let mut want = vec![0f32; n];
        crate::vexp::silu_mul(&mut want, &g32, &u32);
        for k in 0..n {
            assert_eq!(got[k], half::bf16::from_f32(want[k]), "element {k}");
            let (gk, uk) = (g32[k] as f64, u32[k] as f64);
            let exact = gk / (1.0 + (-gk).exp()) * uk;
            let err = (got[k].to_f64() - exact).abs();
            assert!(
                err <= 2f64.powi(-8) * exact.abs() * 1.001 + 1e-30,
                "{k}: {} vs {exact}",
                got[k]
            );
        }
        Ok(())
    }

    #[test]
    fn rope_matches_the_unfused_rotation_in_value_and_gradient() -> Result<()> {
        // x [B=2, H=3, T=4, hd=6] with rot = 4 (partial) and rot = 6 (full).
        for rot in [4, 6] {
            let dev = Device::Cpu;
            let angle = Tensor::randn(0f64, 1.0, (4, rot / 2), &dev)?;
            let angle = Tensor::cat(&[&angle, &angle], 1)?;
            let (cos, sin) = (angle.cos()?, angle.sin()?);
            check_grads(
                &[&[2, 3, 4, 6]],
                |t| t[0].apply_op3(&cos, &sin, Rope),
                |t| {
                    let x = &t[0];
                    let xr = x.narrow(D::Minus1, 0, rot)?;
                    let half = rot / 2;
                    let x1 = xr.narrow(D::Minus1, 0, half)?;
                    let x2 = xr.narrow(D::Minus1, half, half)?;
                    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
                    let y = (xr.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?;
                    if rot == 6 {
                        Ok(y)
                    } else {
                        Tensor::cat(&[&y, &x.narrow(D::Minus1, rot, 6 - rot)?], D::Minus1)
                    }
                },
            )?;
        }
        Ok(())
    }
}
