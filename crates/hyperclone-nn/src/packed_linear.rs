//! A Linear layer's weight packed once, at load, for inference (forward and generate; no
//! gradients): y = x · Wᵀ for W [out, in] in f32 on x86-64 CPUs with AVX-512F or AVX2+FMA.
//!
//! candle's matmul hands gemm the weight as stored, and gemm copies it into its panel
//! layout on every call: in a 1x128 SmolLM2 forward that repacking was ~19% of the time
//! (perf, AMD EPYC Zen 4, 2 threads), for a layout that never changes. Here the weight is
//! laid out once in gemm's own panel format (MR output rows side by side for each input
//! column) and every call runs gemm's microkernels directly: the activations are read in
//! place (the kernel broadcasts them from the row-major x), so nothing is copied per call.
//!
//! Each output element is one f32 fused multiply-add chain over the input columns in
//! order, so results do not depend on the thread count. They may differ from candle's
//! matmul in the last bits (gemm splits long sums into blocks); training and verification
//! keep candle's path.

use crate::fused::cpu_slice;
use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

/// gemm's microkernel signature (gemm_common::microkernel::MicroKernelFn<f32>).
type MicroKernel = unsafe fn(
    usize,
    usize,
    usize,
    *mut f32,
    *const f32,
    *const f32,
    isize,
    isize,
    isize,
    isize,
    isize,
    f32,
    f32,
    u8,
    bool,
    bool,
    bool,
    *const f32,
);

/// The microkernels of one instruction set: `by_cols[n - 1]` computes an MR x n block of
/// the output (n <= NR output columns = tokens).
struct Kernels {
    mr: usize,
    by_cols: &'static [MicroKernel],
}

/// The best kernels this CPU runs, found once (None: not x86-64, or neither AVX-512F nor
/// AVX2+FMA; callers keep candle's matmul).
fn kernels() -> Option<&'static Kernels> {
    static BEST: std::sync::OnceLock<Option<&'static Kernels>> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| supported().into_iter().next())
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Kernels;
    use gemm_f32::microkernel as uk;
    const AVX512_ROWS: &[[super::MicroKernel; 6]] = &uk::avx512f::f32::UKR;
    const FMA_ROWS: &[[super::MicroKernel; 6]] = &uk::fma::f32::UKR;
    /// 4 vectors of 16 lanes x up to 6 columns.
    pub(super) static AVX512: Kernels = Kernels {
        mr: uk::avx512f::f32::MR_DIV_N * 16,
        by_cols: &AVX512_ROWS[AVX512_ROWS.len() - 1],
    };
    /// 2 vectors of 8 lanes x up to 6 columns.
    pub(super) static FMA: Kernels = Kernels {
        mr: uk::fma::f32::MR_DIV_N * 8,
        by_cols: &FMA_ROWS[FMA_ROWS.len() - 1],
    };
}

/// Every kernel set this CPU runs, best first.
fn supported() -> Vec<&'static Kernels> {
    #[allow(unused_mut)]
    let mut out: Vec<&'static Kernels> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            out.push(&x86::AVX512);
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            out.push(&x86::FMA);
        }
    }
    out
}

/// Whether `w` ([out, in], f32, CPU) can be packed on this machine.
pub(crate) fn packable(w: &Tensor) -> bool {
    kernels().is_some() && w.rank() == 2 && w.dtype() == DType::F32 && w.device().is_cpu()
}

/// A task's activation rows stay in L2 (512 KiB) while its panel passes over them.
const TASK_BYTES: usize = 512 << 10;
/// Tasks per thread to aim for: a projection as narrow as SmolLM2's k/v (3 panels at
/// 128 tokens) still keeps both threads busy to the end.
const TASKS_PER_THREAD: usize = 8;

/// One or more weights [out_i, in] of the same input, each as ceil(out_i / MR) panels of
/// `in` columns of MR consecutive output rows (zero rows pad each weight's last panel, so a
/// panel never mixes two weights). Weights packed together (a layer's q|k|v, gate|up) run
/// as one parallel call: one fork-join instead of several, and a narrow weight's few
/// panels (k, v) share the threads with the wide ones instead of leaving one idle.
pub(crate) struct PackedWeight {
    inp: usize,
    kernels: &'static Kernels,
    parts: Vec<Part>,
    panels: Vec<f32>,
}

/// One weight of a [`PackedWeight`]: its output width and its first panel.
#[derive(Clone, Copy)]
struct Part {
    out: usize,
    first_panel: usize,
}

impl PackedWeight {
    /// Packs `w` ([out, in], any strides); call only when [`packable`].
    pub(crate) fn new(w: &Tensor) -> Result<PackedWeight> {
        Self::new_parts(&[w])
    }

    /// Packs weights that read the same input ([out_i, in] each, one `in`); call only
    /// when each is [`packable`]. [`PackedWeight::matmul_parts`] returns one output each.
    pub(crate) fn new_parts(ws: &[&Tensor]) -> Result<PackedWeight> {
        let Some(kernels) = kernels() else {
            candle_core::bail!("packed linear: no AVX-512F or AVX2+FMA on this CPU");
        };
        Self::with_kernels(ws, kernels)
    }

    fn with_kernels(ws: &[&Tensor], kernels: &'static Kernels) -> Result<PackedWeight> {
        let too_large = || candle_core::Error::Msg("packed linear: weight too large".into());
        let mr = kernels.mr;
        let Some(first) = ws.first() else {
            candle_core::bail!("packed linear: no weights to pack");
        };
        let inp = first.dims2()?.1;
        let mut parts = Vec::with_capacity(ws.len());
        let mut total_panels = 0usize;
        for w in ws {
            let (out, w_inp) = w.dims2()?;
            if w_inp != inp {
                candle_core::bail!(
                    "packed linear: weights of {inp} and {w_inp} inputs packed together"
                );
            }
            parts.push(Part {
                out,
                first_panel: total_panels,
            });
            total_panels = total_panels
                .checked_add(out.div_ceil(mr))
                .ok_or_else(too_large)?;
        }
        let panel_len = mr.checked_mul(inp).ok_or_else(too_large)?;
        let len = total_panels.checked_mul(panel_len).ok_or_else(too_large)?;
        let mut panels = vec![0f32; len];
        for (w, part) in ws.iter().zip(&parts) {
            let w = w.contiguous()?;
            let (storage, layout) = w.storage_and_layout();
            let rows = cpu_slice::<f32>(&storage, layout, "packed linear")?;
            let out = part.out;
            let region =
                &mut panels[part.first_panel * panel_len..][..out.div_ceil(mr) * panel_len];
            region
                .par_chunks_mut(panel_len.max(1))
                .enumerate()
                .for_each(|(p, panel)| {
                    for i in 0..mr.min(out - p * mr) {
                        let row = &rows[(p * mr + i) * inp..(p * mr + i + 1) * inp];
                        for (kk, &x) in row.iter().enumerate() {
                            panel[kk * mr + i] = x;
                        }
                    }
                });
        }
        Ok(PackedWeight {
            inp,
            kernels,
            parts,
            panels,
        })
    }

    /// The single weight's output width (the first weight's, for a group).
    fn out(&self) -> usize {
        self.parts[0].out
    }

    /// Rows `ids` of W as a [ids.len(), in] tensor: a tied head's weight is the token
    /// embedding, so the lookup can read it here instead of from a second copy.
    pub(crate) fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        if self.parts.len() != 1 {
            candle_core::bail!(
                "packed linear: rows of a group of {} weights",
                self.parts.len()
            );
        }
        let (inp, mr, out) = (self.inp, self.kernels.mr, self.out());
        let mut rows: Vec<f32> = Vec::with_capacity(ids.len() * inp);
        for &id in ids {
            let r = id as usize;
            if r >= out {
                candle_core::bail!("packed linear: row {r} of {out}");
            }
            let panel = &self.panels[(r / mr) * mr * inp..(r / mr + 1) * mr * inp];
            rows.extend(panel.iter().skip(r % mr).step_by(mr));
        }
        Tensor::from_vec(rows, (ids.len(), inp), &Device::Cpu)
    }

    /// x [.., in] (f32) -> x · Wᵀ [.., out], for a single packed weight.
    pub(crate) fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        if self.parts.len() != 1 {
            candle_core::bail!(
                "packed linear: matmul of a group of {} weights",
                self.parts.len()
            );
        }
        let mut ys = self.matmul_parts(x)?;
        Ok(ys.remove(0))
    }

    /// x [.., in] (f32) -> x · W_iᵀ [.., out_i] for each packed weight, in packing order;
    /// each output's bits are those of the weight packed alone.
    pub(crate) fn matmul_parts(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let dims = x.dims().to_vec();
        let (&inp, lead) = dims
            .split_last()
            .ok_or_else(|| candle_core::Error::Msg("packed linear: a scalar input".into()))?;
        if inp != self.inp || x.dtype() != DType::F32 {
            let outs: Vec<usize> = self.parts.iter().map(|p| p.out).collect();
            candle_core::bail!(
                "packed linear: input {:?} {:?} for weights of {} inputs (outputs {outs:?}, f32)",
                dims,
                x.dtype(),
                self.inp
            );
        }
        let tokens: usize = lead.iter().product();
        let x = x.contiguous()?;
        let ys = {
            let (storage, layout) = x.storage_and_layout();
            self.run(cpu_slice(&storage, layout, "packed linear")?, tokens)
        };
        ys.into_iter()
            .zip(&self.parts)
            .map(|(y, part)| {
                let mut shape = lead.to_vec();
                shape.push(part.out);
                Tensor::from_vec(y, shape, &Device::Cpu)
            })
            .collect()
    }

    /// y_i [tokens, out_i] (row-major) for x [tokens, in] (row-major).
    fn run(&self, x: &[f32], tokens: usize) -> Vec<Vec<f32>> {
        let (inp, kernels) = (self.inp, self.kernels);
        let mr = kernels.mr;
        // Not zero-filled: the kernel writes every element (alpha_status 0 below: dst is
        // overwritten, never read), and each element belongs to exactly one task.
        let mut ys: Vec<Vec<f32>> = self
            .parts
            .iter()
            .map(|p| Vec::with_capacity(tokens * p.out))
            .collect();
        // Panel index -> (its weight, its first output row there).
        let panel_rows: Vec<(usize, usize)> = self
            .parts
            .iter()
            .enumerate()
            .flat_map(|(i, p)| (0..p.out.div_ceil(mr)).map(move |j| (i, j * mr)))
            .collect();
        let panels = panel_rows.len();
        if tokens > 0 && panels > 0 {
            let nr = kernels.by_cols.len();
            // Each task is one panel over a group of NR-token chunks: groups small enough
            // for every thread to get several tasks, and whose rows fit TASK_BYTES.
            let chunks = tokens.div_ceil(nr);
            let fit_l2 = (TASK_BYTES / (4 * nr * inp.max(1))).max(1);
            let per_panel = (TASKS_PER_THREAD * rayon::current_num_threads()).div_ceil(panels);
            let group = chunks.div_ceil(per_panel).clamp(1, fit_l2) * nr;
            let token_groups = tokens.div_ceil(group);
            let y_ptrs: Vec<SendPtr> = ys.iter_mut().map(|y| SendPtr(y.as_mut_ptr())).collect();
            // Task order: consecutive tasks share a token group (its rows stay cached).
            (0..token_groups * panels).into_par_iter().for_each(|task| {
                let (tg, p) = (task / panels, task % panels);
                let (part, row0) = panel_rows[p];
                let out = self.parts[part].out;
                let t_end = ((tg + 1) * group).min(tokens);
                let rows = mr.min(out - row0);
                let panel = &self.panels[p * mr * inp..(p + 1) * mr * inp];
                for t0 in (tg * group..t_end).step_by(nr) {
                    let cols = nr.min(t_end - t0);
                    // SAFETY: the kernel reads the panel (mr x inp, column stride mr)
                    // and x rows t0..t0+cols (column stride inp), all in bounds, and
                    // writes y_part[t0..t0+cols][row0..row0+rows], inside its capacity
                    // (tokens x out): this task's block, which no other task writes. The
                    // kernels are from supported(): this CPU runs them.
                    unsafe {
                        (kernels.by_cols[cols - 1])(
                            rows,
                            cols,
                            inp,
                            y_ptrs[part].get().add(t0 * out + row0),
                            panel.as_ptr(),
                            x.as_ptr().add(t0 * inp),
                            out as isize,
                            1,
                            mr as isize,
                            1,
                            inp as isize,
                            0.0,
                            1.0,
                            0,
                            false,
                            false,
                            false,
                            panel.as_ptr(),
                        );
                    }
                }
            });
        }
        for (y, part) in ys.iter_mut().zip(&self.parts) {
            // SAFETY: the tasks above wrote every one of the tokens x out elements (every
            // (token, row) lies in one task's block), or there are none (tokens or out 0).
            unsafe { y.set_len(tokens * part.out) };
        }
        ys
    }
}

/// The output buffer's pointer, shared by tasks that write disjoint blocks of it.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint elements (see `run`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the exact product (f64) within the f32 dot-product error bound
    /// |err| <= gamma_k * sum |x_i w_i|, gamma_k = k u / (1 - k u), u = 2^-24 (Higham 3.1),
    /// over shapes that leave partial panels and partial token blocks.
    #[test]
    fn matches_exact_product_within_the_f32_bound() {
        if supported().is_empty() {
            eprintln!("no AVX-512F or AVX2+FMA: packed linear unused on this CPU");
        }
        let u = 2f64.powi(-24);
        for kernels in supported() {
            for &(tokens, inp, out) in &[
                (1, 1, 1),
                (5, 3, 7),
                (7, 64, 65),
                (13, 130, 200),
                (128, 576, 192),
                (300, 40, 129),
                (2, 1536, 64),
            ] {
                let val = |i: usize, salt: usize| {
                    let h = hyperclone_core::rng::uniform(salt as u64, i as u64);
                    (h * 2.0 - 1.0) as f32
                };
                let xs: Vec<f32> = (0..tokens * inp).map(|i| val(i, 1)).collect();
                let ws: Vec<f32> = (0..out * inp).map(|i| val(i, 2)).collect();
                let x = Tensor::from_vec(xs.clone(), (tokens, inp), &Device::Cpu).unwrap();
                let w = Tensor::from_vec(ws.clone(), (out, inp), &Device::Cpu).unwrap();
                let y: Vec<f32> = PackedWeight::with_kernels(&[&w], kernels)
                    .unwrap()
                    .matmul(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let gamma = inp as f64 * u / (1.0 - inp as f64 * u);
                for t in 0..tokens {
                    for o in 0..out {
                        let terms =
                            (0..inp).map(|i| xs[t * inp + i] as f64 * ws[o * inp + i] as f64);
                        let exact: f64 = terms.clone().sum();
                        let bound: f64 = gamma * terms.map(f64::abs).sum::<f64>();
                        let got = y[t * out + o] as f64;
                        assert!(
                        (got - exact).abs() <= bound,
                        "mr {}: {tokens}x{inp}x{out} [{t},{o}]: {got} vs {exact} (bound {bound})",
                        kernels.mr
                    );
                    }
                }
            }
        }
    }

    /// rows() returns the weight's rows exactly, for every kernel set.
    #[test]
    fn rows_are_the_weight_rows() {
        let w = Tensor::rand(-1f32, 1f32, (130, 7), &Device::Cpu).unwrap();
        for kernels in supported() {
            let p = PackedWeight::with_kernels(&[&w], kernels).unwrap();
            let ids = [0u32, 129, 64, 5, 5, 127];
            let got: Vec<Vec<f32>> = p.rows(&ids).unwrap().to_vec2().unwrap();
            let all: Vec<Vec<f32>> = w.to_vec2().unwrap();
            for (g, &id) in got.iter().zip(&ids) {
                assert_eq!(g, &all[id as usize]);
            }
            assert!(p.rows(&[130]).is_err());
        }
    }

    /// Weights packed as one group give each weight's bits packed alone, for every kernel
    /// set, with widths that leave partial panels (so padding rows sit between weights).
    #[test]
    fn a_group_gives_each_weights_own_bits() {
        let x = Tensor::rand(-1f32, 1f32, (23, 40), &Device::Cpu).unwrap();
        let ws: Vec<Tensor> = [70, 3, 130, 64]
            .iter()
            .map(|&out| Tensor::rand(-1f32, 1f32, (out, 40), &Device::Cpu).unwrap())
            .collect();
        let bits = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.iter().map(|f| f.to_bits()).collect()
        };
        for kernels in supported() {
            let refs: Vec<&Tensor> = ws.iter().collect();
            let group = PackedWeight::with_kernels(&refs, kernels).unwrap();
            let ys = group.matmul_parts(&x).unwrap();
            assert_eq!(ys.len(), ws.len());
            for (w, y) in ws.iter().zip(&ys) {
                let alone = PackedWeight::with_kernels(&[w], kernels).unwrap();
                assert_eq!(y.dims(), &[23, w.dim(0).unwrap()]);
                assert_eq!(
                    bits(y),
                    bits(&alone.matmul(&x).unwrap()),
                    "mr {}",
                    kernels.mr
                );
            }
            // A group has no single product or row lookup; mismatched inputs are refused.
            assert!(group.matmul(&x).is_err());
            assert!(group.rows(&[0]).is_err());
            let other = Tensor::rand(-1f32, 1f32, (5, 41), &Device::Cpu).unwrap();
            assert!(PackedWeight::with_kernels(&[&ws[0], &other], kernels).is_err());
        }
    }

    /// The same input gives the same bits on 1 and 3 threads (each element is one chain).
    #[test]
    fn bits_do_not_depend_on_threads() {
        if kernels().is_none() {
            return;
        }
        let w = Tensor::rand(-1f32, 1f32, (300, 200), &Device::Cpu).unwrap();
        let x = Tensor::rand(-1f32, 1f32, (77, 200), &Device::Cpu).unwrap();
        let p = PackedWeight::new(&w).unwrap();
        let on = |threads: usize| -> Vec<f32> {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                p.matmul(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
        };
        assert_eq!(on(1), on(3));
    }
}
