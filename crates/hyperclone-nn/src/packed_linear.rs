//! A Linear layer's weight packed once, at load, for inference (forward and generate; no
//! gradients): y = x · Wᵀ for W [out, in] in f32 on x86-64 CPUs with AVX-512F or AVX2+FMA,
//! and in bf16 on CPUs with AVX512-BF16 (bf16_kernel.rs).
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

use crate::bf16_kernel;
use crate::f32_kernel;
use crate::fused::cpu_slice;
use crate::packed_schedule::{self, Schedule};
use candle_core::{DType, Device, Result, Tensor, WithDType};
use half::bf16;
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

/// Whether `w` ([out, in], CPU) can be packed on this machine: f32 where AVX-512F or
/// AVX2+FMA runs gemm's kernels, bf16 with an even `in` where AVX512-BF16 runs
/// bf16_kernel's.
pub(crate) fn packable(w: &Tensor) -> bool {
    if w.rank() != 2 || !w.device().is_cpu() {
        return false;
    }
    match w.dtype() {
        DType::F32 => kernels().is_some(),
        DType::BF16 => bf16_kernel::kernels().is_some() && w.dim(1).is_ok_and(|k| k % 2 == 0),
        _ => false,
    }
}

thread_local! {
    /// The input widths of f32 weights packed on this thread since [`tune_schedules`] last
    /// ran here.
    static UNTIMED_WIDTHS: std::cell::RefCell<std::collections::BTreeSet<usize>> =
        const { std::cell::RefCell::new(std::collections::BTreeSet::new()) };
}

/// The product timed per candidate schedule: a weight of this many rows (16 panels) over
/// this many tokens (24 chunks of 6), at the width being timed. At SmolLM2's 576 inputs
/// that is 0.17 GFLOP, about 1 ms on 2 Zen 4 cores; the tasks have the shape of a real
/// forward's (one panel over up to ~200 tokens).
const TIMED_ROWS: usize = 1024;
const TIMED_TOKENS: usize = 144;

/// Times the f32 schedules ([`packed_schedule`]) for every input width packed on this
/// thread since the last call and not timed before in this process, so later products of
/// that width run the fastest on this CPU (the same bits whichever). Only with AVX-512F
/// (the other kernels have one schedule) and where `HYPERCLONE_PACKED_SCHEDULE` fixes none.
/// Costs 30 products per width (about 0.1 s for SmolLM2's two widths on 2 Zen 4 cores).
pub(crate) fn tune_schedules() -> Result<()> {
    let widths = UNTIMED_WIDTHS.with(|w| std::mem::take(&mut *w.borrow_mut()));
    if !packed_schedule::timing_wanted() {
        return Ok(());
    }
    let Some(avx512) = kernels().filter(|k| k.mr == f32_kernel::MR) else {
        return Ok(());
    };
    // Values in [-1, 1) on a coarse grid: normal numbers, no denormal slow paths.
    let values = |n: usize, salt: usize| -> Vec<f32> {
        (0..n)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ salt) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    };
    for inp in widths.into_iter().filter(|&inp| inp > 0) {
        let w = Tensor::from_vec(values(TIMED_ROWS * inp, 1), (TIMED_ROWS, inp), &Device::Cpu)?;
        let packed = PackedWeight::with_kernels(&[&w], avx512)?;
        let Panels::F32 { panels, .. } = &packed.panels else {
            continue;
        };
        let x = values(TIMED_TOKENS * inp, 2);
        packed_schedule::tune(inp, |schedule| {
            let start = std::time::Instant::now();
            let ys = packed.run_f32(avx512, panels, &x, TIMED_TOKENS, schedule);
            let seconds = start.elapsed().as_secs_f64();
            std::hint::black_box(ys);
            seconds
        });
    }
    Ok(())
}

/// A task's activation rows stay in L2 (512 KiB) while its panel passes over them.
const TASK_BYTES: usize = 512 << 10;
/// Tasks per thread to aim for: a projection as narrow as SmolLM2's k/v (3 panels at
/// 128 tokens) still keeps both threads busy to the end.
const TASKS_PER_THREAD: usize = 8;

/// One or more weights [out_i, in] of the same input, each as ceil(out_i / MR) panels of
/// MR consecutive output rows (zero rows pad each weight's last panel, so a panel never
/// mixes two weights). Weights packed together (a layer's q|k|v, gate|up) run as one
/// parallel call: one fork-join instead of several, and a narrow weight's few panels (k,
/// v) share the threads with the wide ones instead of leaving one idle.
pub(crate) struct PackedWeight {
    inp: usize,
    parts: Vec<Part>,
    panels: Panels,
}

/// The panels in their kernel's element type and layout.
enum Panels {
    /// gemm's layout: for each input column, MR rows side by side.
    F32 {
        kernels: &'static Kernels,
        panels: Vec<f32>,
    },
    /// bf16_kernel's layout: for each pair of input columns, MR rows' pairs side by side.
    Bf16 {
        kernels: &'static [bf16_kernel::Kernel; bf16_kernel::NR],
        panels: Vec<bf16>,
    },
}

impl Panels {
    fn mr(&self) -> usize {
        match self {
            Panels::F32 { kernels, .. } => kernels.mr,
            Panels::Bf16 { .. } => bf16_kernel::MR,
        }
    }
}

/// Where element (row i of a panel, input column kk) sits in the panel.
pub(crate) fn f32_slot(mr: usize) -> impl Fn(usize, usize) -> usize + Sync {
    move |i, kk| kk * mr + i
}

/// bf16_kernel's layout: pair kk / 2, row i, then kk's place in its pair.
fn bf16_slot(mr: usize) -> impl Fn(usize, usize) -> usize + Sync {
    move |i, kk| (kk & !1) * mr + 2 * i + (kk & 1)
}

/// One weight of a [`PackedWeight`]: its output width and its first panel.
#[derive(Clone, Copy)]
struct Part {
    out: usize,
    first_panel: usize,
}

/// One block of outputs a kernel call computes: `rows` output rows of weight `part` from
/// `row0`, in global panel `panel`, for tokens t0..t0 + cols.
#[derive(Clone, Copy)]
struct Block {
    part: usize,
    row0: usize,
    rows: usize,
    panel: usize,
    t0: usize,
    cols: usize,
}

impl PackedWeight {
    /// Packs `w` ([out, in], any strides); call only when [`packable`].
    pub(crate) fn new(w: &Tensor) -> Result<PackedWeight> {
        Self::new_parts(&[w])
    }

    /// Packs weights that read the same input ([out_i, in] each, one `in`, one dtype); call
    /// only when each is [`packable`]. [`PackedWeight::matmul_parts`] returns one output each.
    pub(crate) fn new_parts(ws: &[&Tensor]) -> Result<PackedWeight> {
        match ws.first().map(|w| w.dtype()) {
            Some(DType::BF16) => {
                let Some(kernels) = bf16_kernel::kernels() else {
                    candle_core::bail!("packed linear: no AVX512-BF16 on this CPU");
                };
                let (inp, parts, panels) = pack::<bf16, _>(ws, bf16_kernel::MR, bf16_slot)?;
                if inp % 2 != 0 {
                    candle_core::bail!("packed linear: bf16 weights of an odd width {inp}");
                }
                Ok(PackedWeight {
                    inp,
                    parts,
                    panels: Panels::Bf16 { kernels, panels },
                })
            }
            _ => {
                let Some(kernels) = kernels() else {
                    candle_core::bail!("packed linear: no AVX-512F or AVX2+FMA on this CPU");
                };
                let packed = Self::with_kernels(ws, kernels)?;
                UNTIMED_WIDTHS.with(|w| w.borrow_mut().insert(packed.inp));
                Ok(packed)
            }
        }
    }

    /// f32 weights packed for one of gemm's kernel sets.
    fn with_kernels(ws: &[&Tensor], kernels: &'static Kernels) -> Result<PackedWeight> {
        let (inp, parts, panels) = pack::<f32, _>(ws, kernels.mr, f32_slot)?;
        Ok(PackedWeight {
            inp,
            parts,
            panels: Panels::F32 { kernels, panels },
        })
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
        let mr = self.panels.mr();
        match &self.panels {
            Panels::F32 { panels, .. } => self.gather(ids, panels, f32_slot(mr)),
            Panels::Bf16 { panels, .. } => self.gather(ids, panels, bf16_slot(mr)),
        }
    }

    fn gather<T: WithDType>(
        &self,
        ids: &[u32],
        panels: &[T],
        slot: impl Fn(usize, usize) -> usize,
    ) -> Result<Tensor> {
        let (inp, mr, out) = (self.inp, self.panels.mr(), self.parts[0].out);
        let mut rows: Vec<T> = Vec::with_capacity(ids.len() * inp);
        for &id in ids {
            let r = id as usize;
            if r >= out {
                candle_core::bail!("packed linear: row {r} of {out}");
            }
            let panel = &panels[(r / mr) * mr * inp..(r / mr + 1) * mr * inp];
            rows.extend((0..inp).map(|kk| panel[slot(r % mr, kk)]));
        }
        Tensor::from_vec(rows, (ids.len(), inp), &Device::Cpu)
    }

    /// x [.., in] -> x · Wᵀ [.., out], for a single packed weight (x in its dtype).
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

    /// x [.., in] -> x · W_iᵀ [.., out_i] for each packed weight, in packing order; each
    /// output's bits are those of the weight packed alone.
    pub(crate) fn matmul_parts(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let dtype = match self.panels {
            Panels::F32 { .. } => DType::F32,
            Panels::Bf16 { .. } => DType::BF16,
        };
        let dims = x.dims().to_vec();
        let (&inp, lead) = dims
            .split_last()
            .ok_or_else(|| candle_core::Error::Msg("packed linear: a scalar input".into()))?;
        if inp != self.inp || x.dtype() != dtype {
            let outs: Vec<usize> = self.parts.iter().map(|p| p.out).collect();
            candle_core::bail!(
                "packed linear: input {:?} {:?} for weights of {} inputs (outputs {outs:?}, {dtype:?})",
                dims,
                x.dtype(),
                self.inp
            );
        }
        let tokens: usize = lead.iter().product();
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let shape = |part: &Part| {
            let mut shape = lead.to_vec();
            shape.push(part.out);
            shape
        };
        match &self.panels {
            Panels::F32 { kernels, panels } => {
                let x = cpu_slice::<f32>(&storage, layout, "packed linear")?;
                let schedule = packed_schedule::for_width(self.inp)?;
                let ys = self.run_f32(kernels, panels, x, tokens, schedule);
                ys.into_iter()
                    .zip(&self.parts)
                    .map(|(y, part)| Tensor::from_vec(y, shape(part), &Device::Cpu))
                    .collect()
            }
            Panels::Bf16 { kernels, panels } => {
                let x = cpu_slice::<bf16>(&storage, layout, "packed linear")?;
                let ys = self.run_bf16(kernels, panels, x, tokens);
                ys.into_iter()
                    .zip(&self.parts)
                    .map(|(y, part)| Tensor::from_vec(y, shape(part), &Device::Cpu))
                    .collect()
            }
        }
    }

    /// Calls `block` for every (panel, chunk of at most `nr` tokens) of the outputs, in
    /// parallel tasks of one panel over a group of chunks; every (token, output row) of
    /// every weight lies in exactly one block.
    fn for_each_block(&self, tokens: usize, nr: usize, block: impl Fn(Block) + Sync) {
        self.for_each_task(tokens, nr, |task| {
            for t0 in (task.t0..task.t0 + task.cols).step_by(nr) {
                block(Block {
                    t0,
                    cols: nr.min(task.t0 + task.cols - t0),
                    ..task
                });
            }
        });
    }

    /// Calls `task` for every parallel task: one panel over a group of tokens (a whole
    /// number of `nr`-token chunks but for the last), as a [`Block`] of `cols` tokens.
    fn for_each_task(&self, tokens: usize, nr: usize, task: impl Fn(Block) + Sync) {
        let mr = self.panels.mr();
        // Panel index -> (its weight, its first output row there).
        let panel_rows: Vec<(usize, usize)> = self
            .parts
            .iter()
            .enumerate()
            .flat_map(|(i, p)| (0..p.out.div_ceil(mr)).map(move |j| (i, j * mr)))
            .collect();
        let panels = panel_rows.len();
        if tokens == 0 || panels == 0 {
            return;
        }
        // Each task is one panel over a group of NR-token chunks: groups small enough
        // for every thread to get several tasks, and whose rows fit TASK_BYTES.
        let chunks = tokens.div_ceil(nr);
        let fit_l2 = (TASK_BYTES / (4 * nr * self.inp.max(1))).max(1);
        let per_panel = (TASKS_PER_THREAD * rayon::current_num_threads()).div_ceil(panels);
        let group = chunks.div_ceil(per_panel).clamp(1, fit_l2) * nr;
        let token_groups = tokens.div_ceil(group);
        // Task order: consecutive tasks share a token group (its rows stay cached).
        (0..token_groups * panels).into_par_iter().for_each(|t| {
            let (tg, panel) = (t / panels, t % panels);
            let (part, row0) = panel_rows[panel];
            let t0 = tg * group;
            task(Block {
                part,
                row0,
                rows: mr.min(self.parts[part].out - row0),
                panel,
                t0,
                cols: group.min(tokens - t0),
            });
        });
    }

    /// Output buffers of tokens x out_i elements each, not zero-filled: the kernels write
    /// every element of every block, and [`Self::for_each_block`] covers each element once.
    fn outputs<T>(&self, tokens: usize) -> (Vec<Vec<T>>, Vec<SendPtr<T>>) {
        let mut ys: Vec<Vec<T>> = self
            .parts
            .iter()
            .map(|p| Vec::with_capacity(tokens * p.out))
            .collect();
        let ptrs = ys.iter_mut().map(|y| SendPtr(y.as_mut_ptr())).collect();
        (ys, ptrs)
    }

    /// Marks the buffers written, after every block ran.
    fn written<T>(&self, mut ys: Vec<Vec<T>>, tokens: usize) -> Vec<Vec<T>> {
        for (y, part) in ys.iter_mut().zip(&self.parts) {
            // SAFETY: for_each_block ran a kernel on every (token, row) of this output
            // (or there are none: tokens or out 0), and each kernel wrote its whole block.
            unsafe { y.set_len(tokens * part.out) };
        }
        ys
    }

    /// y_i [tokens, out_i] (row-major) for x [tokens, in] (row-major), f32, by `schedule`
    /// on AVX-512 panels (gemm's kernels otherwise).
    fn run_f32(
        &self,
        kernels: &Kernels,
        panels: &[f32],
        x: &[f32],
        tokens: usize,
        schedule: Schedule,
    ) -> Vec<Vec<f32>> {
        let (inp, mr) = (self.inp, kernels.mr);
        let (ys, y_ptrs) = self.outputs::<f32>(tokens);
        if let (Schedule::Own { half, kc }, Some(own)) = (schedule, f32_kernel::kernels()) {
            if mr == f32_kernel::MR {
                let (nr, kernels, halves) = match half {
                    false => (f32_kernel::NR, &own.by_cols[..], &[(0, f32_kernel::MR)][..]),
                    true => (
                        2 * f32_kernel::NR,
                        &own.half_by_cols[..],
                        &[(0, 32), (32, 32)][..],
                    ),
                };
                let kc = kc.unwrap_or(inp).max(1);
                self.for_each_task(tokens, nr, |task| {
                    let out = self.parts[task.part].out;
                    let panel = &panels[task.panel * mr * inp..(task.panel + 1) * mr * inp];
                    for &(r0, height) in halves.iter().filter(|(r0, _)| *r0 < task.rows) {
                        let rows = height.min(task.rows - r0);
                        // Each block of input columns passes over every chunk of the task's
                        // tokens while its slice of the panel is cached, continuing the sums.
                        for k0 in (0..inp).step_by(kc) {
                            for t0 in (task.t0..task.t0 + task.cols).step_by(nr) {
                                let cols = nr.min(task.t0 + task.cols - t0);
                                // SAFETY: the kernel reads rows r0.. of the panel's columns
                                // k0..k0+kn and x rows t0..t0+cols at columns k0.., all in
                                // bounds, and reads then writes y_part[t0..t0+cols][row0 + r0
                                // ..+rows] (accumulating only after the first block wrote
                                // it): this task's, which no other writes. avx512f checked.
                                unsafe {
                                    (kernels[cols - 1])(
                                        rows,
                                        kc.min(inp - k0),
                                        y_ptrs[task.part].get().add(t0 * out + task.row0 + r0),
                                        out,
                                        panel.as_ptr().add(k0 * mr + r0),
                                        x.as_ptr().add(t0 * inp + k0),
                                        inp,
                                        k0 > 0,
                                    );
                                }
                            }
                        }
                    }
                });
                return self.written(ys, tokens);
            }
        }
        self.for_each_block(tokens, kernels.by_cols.len(), |b| {
            let out = self.parts[b.part].out;
            let panel = &panels[b.panel * mr * inp..(b.panel + 1) * mr * inp];
            // SAFETY: the kernel reads the panel (mr x inp, column stride mr) and x rows
            // t0..t0+cols (column stride inp), all in bounds, and writes
            // y_part[t0..t0+cols][row0..row0+rows] inside its capacity (tokens x out),
            // overwriting without reading (alpha_status 0): this block, which no other
            // writes. The kernels are from supported(): this CPU runs them.
            unsafe {
                (kernels.by_cols[b.cols - 1])(
                    b.rows,
                    b.cols,
                    inp,
                    y_ptrs[b.part].get().add(b.t0 * out + b.row0),
                    panel.as_ptr(),
                    x.as_ptr().add(b.t0 * inp),
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
        });
        self.written(ys, tokens)
    }

    /// As [`Self::run_f32`] in bf16 (f32 sums, each output rounded once).
    fn run_bf16(
        &self,
        kernels: &[bf16_kernel::Kernel; bf16_kernel::NR],
        panels: &[bf16],
        x: &[bf16],
        tokens: usize,
    ) -> Vec<Vec<bf16>> {
        let (inp, mr) = (self.inp, bf16_kernel::MR);
        let (ys, y_ptrs) = self.outputs::<bf16>(tokens);
        self.for_each_block(tokens, bf16_kernel::NR, |b| {
            let out = self.parts[b.part].out;
            let panel = &panels[b.panel * mr * inp..(b.panel + 1) * mr * inp];
            // SAFETY: as in run_f32: the panel holds inp / 2 pairs of mr rows, x rows
            // t0..t0+cols hold inp values each, the block lies inside y_part's capacity and
            // no other block writes it; bf16 is a u16; kernels() checked the CPU.
            unsafe {
                (kernels[b.cols - 1])(
                    b.rows,
                    inp / 2,
                    y_ptrs[b.part].get().add(b.t0 * out + b.row0) as *mut u16,
                    out,
                    panel.as_ptr() as *const u16,
                    x.as_ptr().add(b.t0 * inp) as *const u16,
                    inp,
                );
            }
        });
        self.written(ys, tokens)
    }
}

/// Packs `ws` ([out_i, in] each, one `in`) into panels of `mr` rows, element (row i of a
/// panel, input column kk) at `slot(mr)(i, kk)`; returns (in, the parts, the panels).
fn pack<T: WithDType, S: Fn(usize, usize) -> usize + Sync>(
    ws: &[&Tensor],
    mr: usize,
    slot: impl Fn(usize) -> S,
) -> Result<(usize, Vec<Part>, Vec<T>)> {
    let too_large = || candle_core::Error::Msg("packed linear: weight too large".into());
    let Some(first) = ws.first() else {
        candle_core::bail!("packed linear: no weights to pack");
    };
    let inp = first.dims2()?.1;
    let mut parts = Vec::with_capacity(ws.len());
    let mut total_panels = 0usize;
    for w in ws {
        let (out, w_inp) = w.dims2()?;
        if w_inp != inp || w.dtype() != first.dtype() {
            candle_core::bail!(
                "packed linear: weights [{out}, {w_inp}] {:?} and [_, {inp}] {:?} packed together",
                w.dtype(),
                first.dtype()
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
    let mut panels = vec![T::zero(); len];
    let slot = slot(mr);
    for (w, part) in ws.iter().zip(&parts) {
        let w = w.contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        let rows = cpu_slice::<T>(&storage, layout, "packed linear")?;
        let out = part.out;
        let region = &mut panels[part.first_panel * panel_len..][..out.div_ceil(mr) * panel_len];
        pack_rows(rows, (out, inp), mr, &slot, region);
    }
    Ok((inp, parts, panels))
}

/// Lays `rows` ([out, inp], row-major) into `region`'s out.div_ceil(mr) panels of mr * inp
/// elements, element (row i of a panel, column kk) at `slot(i, kk)`; the slots of rows past
/// `out` in the last panel keep what `region` holds. Also lays out the inference
/// attention's keys.
pub(crate) fn pack_rows<T: Copy + Send + Sync>(
    rows: &[T],
    (out, inp): (usize, usize),
    mr: usize,
    slot: &(impl Fn(usize, usize) -> usize + Sync),
    region: &mut [T],
) {
    region
        .par_chunks_mut((mr * inp).max(1))
        .enumerate()
        .for_each(|(p, panel)| {
            for i in 0..mr.min(out - p * mr) {
                let row = &rows[(p * mr + i) * inp..(p * mr + i + 1) * inp];
                for (kk, &x) in row.iter().enumerate() {
                    panel[slot(i, kk)] = x;
                }
            }
        });
}

/// An output buffer's pointer, shared by tasks that write disjoint blocks of it.
struct SendPtr<T>(*mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
// SAFETY: tasks write disjoint elements (see `for_each_block`).
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// n values uniform in [-1, 1), seeded by `salt`.
    fn uniform_values(n: usize, salt: u64) -> Vec<f64> {
        (0..n)
            .map(|i| hyperclone_core::rng::uniform(salt, i as u64) * 2.0 - 1.0)
            .collect()
    }

    /// y (tokens x out) against the exact product of x (tokens x inp) and wᵀ (w: out x inp),
    /// all given as f64: within the f32 dot-product error bound gamma_k * sum |x_i w_i|,
    /// gamma_k = k u / (1 - k u), u = 2^-24 (Higham 3.1), widened by one final rounding
    /// of unit roundoff `out_u` (0 for an f32 output).
    fn assert_within_dot_bound(
        (x, w, y): (&[f64], &[f64], &[f64]),
        (tokens, inp, out): (usize, usize, usize),
        out_u: f64,
        what: &str,
    ) {
        let u = 2f64.powi(-24);
        let gamma = inp as f64 * u / (1.0 - inp as f64 * u);
        for t in 0..tokens {
            for o in 0..out {
                let terms = (0..inp).map(|i| x[t * inp + i] * w[o * inp + i]);
                let exact: f64 = terms.clone().sum();
                let sum_bound = gamma * terms.map(f64::abs).sum::<f64>();
                let bound = sum_bound + out_u * (exact.abs() + sum_bound);
                let got = y[t * out + o];
                assert!(
                    (got - exact).abs() <= bound,
                    "{what} {tokens}x{inp}x{out} [{t},{o}]: {got} vs {exact} (bound {bound})"
                );
            }
        }
    }

    /// f32, every kernel set, over shapes that leave partial panels and token blocks.
    #[test]
    fn matches_exact_product_within_the_f32_bound() {
        if supported().is_empty() {
            eprintln!("no AVX-512F or AVX2+FMA: packed linear unused on this CPU");
        }
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
                let f32s = |v: Vec<f64>| -> Vec<f32> { v.into_iter().map(|a| a as f32).collect() };
                let xs = f32s(uniform_values(tokens * inp, 1));
                let ws = f32s(uniform_values(out * inp, 2));
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
                let f64s = |v: &[f32]| -> Vec<f64> { v.iter().map(|&a| a as f64).collect() };
                assert_within_dot_bound(
                    (&f64s(&xs), &f64s(&ws), &f64s(&y)),
                    (tokens, inp, out),
                    0.0,
                    &format!("f32 mr {}", kernels.mr),
                );
            }
        }
    }

    /// bf16 (where this CPU has AVX512-BF16): against the exact product of the
    /// bf16-rounded inputs, within the f32 bound of its sum plus the output's one rounding
    /// to bf16 (unit roundoff 2^-8: 8 significant bits), over shapes with partial panels
    /// and token blocks.
    #[test]
    fn bf16_matches_exact_product_within_its_bound() {
        if bf16_kernel::kernels().is_none() {
            eprintln!("no AVX512-BF16: bf16 weights keep candle's matmul on this CPU");
            return;
        }
        for &(tokens, inp, out) in &[
            (1, 2, 1),
            (5, 4, 7),
            (7, 64, 65),
            (13, 130, 200),
            (128, 576, 192),
            (300, 40, 129),
            (2, 1536, 64),
        ] {
            let bf16s = |v: Vec<f64>| -> Vec<bf16> { v.into_iter().map(bf16::from_f64).collect() };
            let xs = bf16s(uniform_values(tokens * inp, 3));
            let ws = bf16s(uniform_values(out * inp, 4));
            let x = Tensor::from_vec(xs.clone(), (tokens, inp), &Device::Cpu).unwrap();
            let w = Tensor::from_vec(ws.clone(), (out, inp), &Device::Cpu).unwrap();
            let p = PackedWeight::new(&w).unwrap();
            assert!(matches!(p.panels, Panels::Bf16 { .. }));
            let y: Vec<bf16> = p
                .matmul(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let f64s = |v: &[bf16]| -> Vec<f64> { v.iter().map(|a| a.to_f64()).collect() };
            assert_within_dot_bound(
                (&f64s(&xs), &f64s(&ws), &f64s(&y)),
                (tokens, inp, out),
                2f64.powi(-8),
                "bf16",
            );
        }
        // Odd widths and mixed dtypes are refused.
        let odd = Tensor::zeros((4, 3), DType::BF16, &Device::Cpu).unwrap();
        assert!(!packable(&odd) && PackedWeight::new(&odd).is_err());
        let w32 = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
        let w16 = Tensor::zeros((4, 4), DType::BF16, &Device::Cpu).unwrap();
        assert!(PackedWeight::new_parts(&[&w16, &w32]).is_err());
        let p = PackedWeight::new(&w16).unwrap();
        assert!(p
            .matmul(&Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap())
            .is_err());
    }

    /// bf16 groups give each weight's own bits, rows are exact, threads change nothing.
    #[test]
    fn bf16_groups_rows_and_threads() {
        if bf16_kernel::kernels().is_none() {
            return;
        }
        let r = |shape: (usize, usize)| {
            Tensor::rand(-1f32, 1f32, shape, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        let x = r((23, 40));
        let ws: Vec<Tensor> = [70, 3, 130, 64].iter().map(|&o| r((o, 40))).collect();
        let refs: Vec<&Tensor> = ws.iter().collect();
        let group = PackedWeight::new_parts(&refs).unwrap();
        let bits = |t: &Tensor| -> Vec<u16> {
            let v: Vec<bf16> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.iter().map(|f| f.to_bits()).collect()
        };
        for (w, y) in ws.iter().zip(group.matmul_parts(&x).unwrap()) {
            assert_eq!(
                bits(&y),
                bits(&PackedWeight::new(w).unwrap().matmul(&x).unwrap())
            );
        }
        let p = PackedWeight::new(&ws[2]).unwrap();
        let ids = [0u32, 129, 64, 5, 5, 127];
        let got: Vec<Vec<bf16>> = p.rows(&ids).unwrap().to_vec2().unwrap();
        let all: Vec<Vec<bf16>> = ws[2].to_vec2().unwrap();
        for (g, &id) in got.iter().zip(&ids) {
            assert_eq!(g, &all[id as usize]);
        }
        let on = |threads: usize| -> Vec<u16> {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| bits(&p.matmul(&x).unwrap()))
        };
        assert_eq!(on(1), on(3));
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

    /// Every schedule gives gemm's kernel's bits: weights with partial panels (and a
    /// partial half panel), an odd number of input columns, token counts that leave partial
    /// chunks of 6 and 12, and column blocks that do not divide the inputs.
    #[test]
    fn every_schedule_gives_gemms_bits() {
        let Some(avx512) = supported().into_iter().find(|k| k.mr == f32_kernel::MR) else {
            return;
        };
        let inp = 77;
        let ws: Vec<Tensor> = [150, 20, 64]
            .iter()
            .map(|&out| Tensor::rand(-1f32, 1f32, (out, inp), &Device::Cpu).unwrap())
            .collect();
        let refs: Vec<&Tensor> = ws.iter().collect();
        let packed = PackedWeight::with_kernels(&refs, avx512).unwrap();
        let Panels::F32 { panels, .. } = &packed.panels else {
            unreachable!("f32 weights")
        };
        let bits = |ys: Vec<Vec<f32>>| -> Vec<Vec<u32>> {
            ys.iter()
                .map(|y| y.iter().map(|f| f.to_bits()).collect())
                .collect()
        };
        for tokens in [1, 5, 13, 130] {
            let x: Vec<f32> = uniform_values(tokens * inp, tokens as u64)
                .iter()
                .map(|&v| v as f32)
                .collect();
            let want = bits(packed.run_f32(avx512, panels, &x, tokens, Schedule::Gemm));
            for s in [
                "own",
                "kblock:16",
                "kblock:77",
                "kblock:200",
                "half",
                "half:10",
            ] {
                let packed_schedule::Request::Fixed(schedule) =
                    packed_schedule::Request::parse(s).unwrap()
                else {
                    unreachable!("{s} names a schedule")
                };
                let got = bits(packed.run_f32(avx512, panels, &x, tokens, schedule));
                assert!(got == want, "{s}, {tokens} tokens");
            }
        }
    }

    /// A width packed through `new` is timed once by `tune_schedules` (AVX-512F, `auto`),
    /// every candidate gets a time, and products of that width still give gemm's bits.
    #[test]
    fn packed_widths_are_timed_once() {
        if !packed_schedule::timing_wanted() {
            return;
        }
        let inp = 333; // a width no other test packs through `new`
        let w = Tensor::rand(-1f32, 1f32, (70, inp), &Device::Cpu).unwrap();
        let x = Tensor::rand(-1f32, 1f32, (13, inp), &Device::Cpu).unwrap();
        let p = PackedWeight::new(&w).unwrap();
        let product_bits = || -> Vec<u32> {
            let y = p.matmul(&x).unwrap().flatten_all().unwrap();
            y.to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|f| f.to_bits())
                .collect()
        };
        let before = product_bits();
        tune_schedules().unwrap();
        let t = packed_schedule::tunings()
            .into_iter()
            .find(|t| t.inputs == inp)
            .expect("the packed width was timed");
        assert_eq!(t.seconds.len(), packed_schedule::CANDIDATES.len());
        assert!(
            t.seconds.iter().all(|(_, s)| s.is_finite() && *s > 0.0),
            "{t:?}"
        );
        assert!(UNTIMED_WIDTHS.with(|w| w.borrow().is_empty()));
        assert_eq!(before, product_bits());
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
