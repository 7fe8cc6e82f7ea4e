//! The one growth kernel: expand a source tensor along its axis spaces.
//!
//! Every axis is tiled: destination index `j` of an axis with source length `s` reads source
//! index `j % s` and belongs to copy (block) `j / s`. A tensor has at most one *read* axis
//! (it consumes a grown space: divide by the copies there) and one *write* axis. The block
//! `(bw, br)` of the destination is `scale(bw, br) * W` plus, for the noisy variants, a
//! noise matrix that is added to block `2j` and subtracted from block `2j + 1` of the same
//! block-row, so it cancels on equal input copies (HYPERCLONING.md, "Variants").
//!
//! Noise is drawn from a counter-based generator (SplitMix64 + Box-Muller), addressed by
//! (seed, tensor, block-row, pair, source element): any block can be produced in any order
//! by any thread, and the same inputs give the same bytes.

use crate::dtype::DType;
use crate::family::Role;
use rayon::prelude::*;

/// The paper's four initialisations (section 3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    Symmetric,
    Noisy,
    Diagonal,
    NoisyDiagonal,
}

impl Variant {
    pub const ALL: [Variant; 4] = [
        Variant::Symmetric,
        Variant::Noisy,
        Variant::Diagonal,
        Variant::NoisyDiagonal,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Symmetric => "symmetric",
            Variant::Noisy => "noisy",
            Variant::Diagonal => "diagonal",
            Variant::NoisyDiagonal => "noisy-diagonal",
        }
    }

    pub fn parse(s: &str) -> Option<Variant> {
        Variant::ALL.into_iter().find(|v| v.name() == s)
    }

    pub fn is_noisy(self) -> bool {
        matches!(self, Variant::Noisy | Variant::NoisyDiagonal)
    }

    pub fn is_diagonal(self) -> bool {
        matches!(self, Variant::Diagonal | Variant::NoisyDiagonal)
    }
}

/// One piece of an axis: `len` consecutive source indices, tiled `copies` times in place,
/// then the first `extra` of them once more (Net2Net's uneven growth: F = copies * len +
/// extra, unit `u` has multiplicity `copies + (u < extra)`). `extra < len`; 0 for the
/// paper's whole-multiple growth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub len: usize,
    pub copies: usize,
    pub extra: usize,
}

impl Segment {
    pub fn tiled(len: usize, copies: usize) -> Self {
        Segment {
            len,
            copies,
            extra: 0,
        }
    }

    /// Copies of source unit `u` in the destination.
    pub fn multiplicity(&self, u: usize) -> usize {
        self.copies + usize::from(u < self.extra)
    }

    pub fn dest_len(&self) -> usize {
        self.len * self.copies + self.extra
    }

    /// The most copies any unit has.
    pub fn max_blocks(&self) -> usize {
        self.copies + usize::from(self.extra > 0)
    }
}

/// How one tensor axis grows. Usually one space tiled `copies` times; a fused axis (GPT-2's
/// [q | k | v] columns, phi3's [gate | up] rows) is several segments, each tiled where it
/// stands: [q | k | v] -> [q q | k k | v v], never a tile of the whole fused axis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AxisGrowth {
    pub segments: Vec<Segment>,
    pub role: Role,
}

impl AxisGrowth {
    pub fn tiled(len: usize, copies: usize, role: Role) -> Self {
        AxisGrowth {
            segments: vec![Segment::tiled(len, copies)],
            role,
        }
    }

    pub fn src_len(&self) -> usize {
        self.segments.iter().map(|s| s.len).sum()
    }

    pub fn dest_len(&self) -> usize {
        self.segments.iter().map(Segment::dest_len).sum()
    }

    /// The destination axis as pieces in order: each piece is (part of) one copy of one
    /// segment whose units all have the same multiplicity. Whole-multiple growth gives one
    /// piece per copy; uneven growth cuts each copy at `extra` and appends the extra copy.
    fn pieces(&self) -> Vec<Piece> {
        let mut out = Vec::new();
        let (mut src, mut dest) = (0, 0);
        for (seg, s) in self.segments.iter().enumerate() {
            let mut push = |offset: usize, len: usize, copy: usize, blocks: usize| {
                if len > 0 {
                    out.push(Piece {
                        seg,
                        src: src + offset,
                        dest,
                        len,
                        copy,
                        blocks,
                    });
                    dest += len;
                }
            };
            for copy in 0..s.copies {
                push(0, s.extra, copy, s.copies + 1);
                push(s.extra, s.len - s.extra, copy, s.copies);
            }
            push(0, s.extra, s.copies, s.copies + 1);
            src += s.len;
        }
        out
    }
}

/// Consecutive units of one copy of one segment inside a destination axis.
#[derive(Debug, Clone, Copy)]
struct Piece {
    seg: usize,
    src: usize,
    dest: usize,
    len: usize,
    /// Which copy of its units this piece is (the block index along the axis).
    copy: usize,
    /// How many copies its units have (the block count along the axis for these units).
    blocks: usize,
}

/// Which blocks of a block-row carry the weight, and with what scale.
///
/// Symmetric: every block, scaled 1/r_r. Diagonal: with g = min(r_w, r_r), block (bw, br)
/// is on iff bw = br (mod g), scaled by 1/(on blocks in the row) — the paper's [[W,0],[0,W]]
/// for r_w = r_r, and still function-preserving when the FFN factor differs from the hidden
/// one or when a single MQA kv head reads n hidden copies (then it is symmetric).
#[derive(Debug, Clone, Copy)]
pub struct BlockPattern {
    pub write_blocks: usize,
    pub read_blocks: usize,
    pub diagonal: bool,
}

impl BlockPattern {
    fn on(&self, bw: usize, br: usize) -> bool {
        if !self.diagonal {
            return true;
        }
        let g = self.write_blocks.min(self.read_blocks);
        bw % g == br % g
    }

    pub fn scale(&self, bw: usize, br: usize) -> f64 {
        if !self.on(bw, br) {
            return 0.0;
        }
        let on = (0..self.read_blocks).filter(|&b| self.on(bw, b)).count();
        1.0 / on as f64
    }

    /// Mean over the block-row of scale^2: the row's signal power relative to mean(W^2).
    fn row_power(&self, bw: usize) -> f64 {
        (0..self.read_blocks)
            .map(|b| self.scale(bw, b).powi(2))
            .sum::<f64>()
            / self.read_blocks as f64
    }
}

/// Noise for one tensor: sigma per (write segment, block-row, pair), chosen so that the
/// realised mean-square of the noise in every block is exactly row_signal / 10^(snr_db/10).
#[derive(Debug, Clone)]
struct Noise {
    key: u64,
    pairs: usize,
    /// [write segment][block-row * pairs + pair]
    sigma: Vec<Vec<f64>>,
    /// The unit draws of every block, kept from calibration when they fit
    /// [`NOISE_CACHE_BYTES`]: [block-row * pairs + pair][flat source index] (the write
    /// segment is implied by the index). Without them the rows draw again.
    draws: Option<Vec<Vec<f64>>>,
}

/// The most memory one tensor's cached noise draws may take. Calibration has to see every
/// draw of a block before the first element can be written (sigma depends on all of them),
/// so without a cache each draw is computed twice; with it, once. At x2 (two blocks of 8
/// bytes per source element) 64 MiB holds a matrix of up to 4M elements: every matrix of
/// SmolLM2-135M/360M; larger ones (a 1B model's 2048 x 8192 MLP) fall back to drawing twice,
/// which costs time, not memory: peak RssAnon stays bounded whatever the model.
pub const NOISE_CACHE_BYTES: usize = 64 << 20;

/// The tensor's axes as (rows, columns), a 1-D tensor getting a dummy 1-row axis 0, and
/// which of them is the read axis.
fn two_axes(axes: &[AxisGrowth]) -> Result<([AxisGrowth; 2], usize), String> {
    let axes: [AxisGrowth; 2] = match axes {
        [a] => [AxisGrowth::tiled(1, 1, Role::Read), a.clone()],
        [a, b] => [a.clone(), b.clone()],
        _ => return Err(format!("tensors of rank {} are not supported", axes.len())),
    };
    let grown = |a: &AxisGrowth| a.segments.iter().any(|s| s.copies > 1);
    let read_axis = match (axes[0].role, axes[1].role) {
        (Role::Read, Role::Write) => 0,
        (Role::Write, Role::Read) => 1,
        // Two write axes: only legal when one of them is not grown; it plays the reader.
        (Role::Write, Role::Write) if !grown(&axes[0]) => 0,
        (Role::Write, Role::Write) if !grown(&axes[1]) => 1,
        _ => return Err("a tensor needs one read and one write axis".into()),
    };
    if axes[read_axis].segments.len() != 1 {
        return Err("a fused read axis is not supported".into());
    }
    Ok((axes, read_axis))
}

/// Bytes of one f64 per source element for each (block-row, pair) of the widest write
/// segment: what caching a tensor's noise draws takes.
fn draws_bytes(axes: &[AxisGrowth; 2], read_axis: usize) -> Option<usize> {
    let write_blocks = axes[1 - read_axis]
        .segments
        .iter()
        .map(Segment::max_blocks)
        .max()?;
    let pairs = axes[read_axis].segments[0].max_blocks() / 2;
    let numel = axes[0].src_len().checked_mul(axes[1].src_len())?;
    (write_blocks * pairs).checked_mul(numel)?.checked_mul(8)
}

/// Memory an [`Expansion`] of a tensor with these axes holds for its cached noise draws
/// (0 without noise, or when they exceed [`NOISE_CACHE_BYTES`] and are drawn twice).
pub fn noise_cache_bytes(axes: &[AxisGrowth], variant: Variant) -> usize {
    match two_axes(axes) {
        Ok((axes, read_axis)) if variant.is_noisy() => draws_bytes(&axes, read_axis)
            .filter(|&b| b <= NOISE_CACHE_BYTES)
            .unwrap_or(0),
        _ => 0,
    }
}

/// A planned expansion of one tensor, ready to produce destination rows in any order.
pub struct Expansion<'a> {
    src: &'a [u8],
    src_dtype: DType,
    out_dtype: DType,
    /// Axis 0 (rows) and axis 1 (columns); a 1-D tensor gets a dummy 1-row axis 0.
    axes: [AxisGrowth; 2],
    read_axis: usize,
    row_pieces: Vec<Piece>,
    col_pieces: Vec<Piece>,
    diagonal: bool,
    scale: f64,
    shift: f64,
    noise: Option<Noise>,
}

/// Parameters of an expansion that do not depend on the data.
#[derive(Debug, Clone, Copy)]
pub struct ExpansionSpec {
    pub variant: Variant,
    pub snr_db: f64,
    /// Seed of the run mixed with the tensor's name: independent noise per tensor.
    pub noise_key: u64,
    pub out_dtype: DType,
    /// A constant factor on the whole tensor (Gemma's embedding: 1/sqrt(n), since the model
    /// multiplies embeddings by sqrt(hidden_size), which grows by sqrt(n)).
    pub scale: f64,
    /// A constant added to every element after the scale (a kept tie's Gemma-2 post-norm
    /// gains, `s w + (s - 1)`); only for tensors whose read axis is not grown, where every
    /// element is a copy of one source element.
    pub shift: f64,
}

impl<'a> Expansion<'a> {
    /// `axes` has one or two entries with at most one `Read` axis (not fused); `src` holds
    /// `prod(src_len)` elements of `src_dtype`.
    pub fn new(
        src: &'a [u8],
        src_dtype: DType,
        axes: &[AxisGrowth],
        spec: ExpansionSpec,
    ) -> Result<Self, String> {
        Self::with_cache_limit(src, src_dtype, axes, spec, NOISE_CACHE_BYTES)
    }

    /// [`Expansion::new`] with another limit on the cached noise draws (tests use 0 to
    /// check that drawing twice gives the same bytes as drawing once).
    fn with_cache_limit(
        src: &'a [u8],
        src_dtype: DType,
        axes: &[AxisGrowth],
        spec: ExpansionSpec,
        cache_limit: usize,
    ) -> Result<Self, String> {
        let (axes, read_axis) = two_axes(axes)?;
        if spec.shift != 0.0 && axes[read_axis].dest_len() != axes[read_axis].src_len() {
            return Err(
                "a constant shift applies only to tensors whose read axis is not grown".into(),
            );
        }
        let numel = axes[0].src_len() * axes[1].src_len();
        if src.len() != numel * src_dtype.size() {
            return Err(format!(
                "holds {} bytes, expected {}",
                src.len(),
                numel * src_dtype.size()
            ));
        }
        let mut exp = Expansion {
            src,
            src_dtype,
            out_dtype: spec.out_dtype,
            row_pieces: axes[0].pieces(),
            col_pieces: axes[1].pieces(),
            axes,
            read_axis,
            diagonal: spec.variant.is_diagonal(),
            scale: spec.scale,
            shift: spec.shift,
            noise: None,
        };
        if spec.variant.is_noisy() && exp.read_blocks() >= 2 {
            exp.noise = Some(exp.calibrate_noise(spec, cache_limit));
        }
        Ok(exp)
    }

    pub fn dest_shape(&self) -> [usize; 2] {
        [self.axes[0].dest_len(), self.axes[1].dest_len()]
    }

    pub fn dest_row_bytes(&self) -> usize {
        self.dest_shape()[1] * self.out_dtype.size()
    }

    /// The read axis's one segment.
    fn read_segment(&self) -> Segment {
        self.axes[self.read_axis].segments[0]
    }

    /// The most copies any read unit has (noise needs at least two).
    fn read_blocks(&self) -> usize {
        self.read_segment().max_blocks()
    }

    /// The block pattern used to calibrate noise for block-row `bw` of a write segment and
    /// noise pair `pair`: the multiplicities of the units those blocks mostly hold (exact
    /// for whole-multiple growth; for uneven growth the extra copies share a class).
    fn calibration_pattern(&self, write_segment: usize, bw: usize, pair: usize) -> BlockPattern {
        let w = self.axes[1 - self.read_axis].segments[write_segment];
        let r = self.read_segment();
        BlockPattern {
            write_blocks: if bw < w.copies {
                w.copies
            } else {
                w.copies + 1
            },
            read_blocks: if 2 * pair + 1 < r.copies {
                r.copies
            } else {
                r.copies + 1
            },
            diagonal: self.diagonal,
        }
    }

    /// Source element ranges (flat indices) making up one write segment's block.
    fn segment_ranges(&self, write_segment: usize) -> Vec<std::ops::Range<usize>> {
        let cols = self.axes[1].src_len();
        let rows = self.axes[0].src_len();
        let w = 1 - self.read_axis;
        let offset: usize = self.axes[w].segments[..write_segment]
            .iter()
            .map(|s| s.len)
            .sum();
        let len = self.axes[w].segments[write_segment].len;
        if w == 0 {
            std::iter::once(offset * cols..(offset + len) * cols).collect()
        } else {
            (0..rows)
                .map(|r| r * cols + offset..r * cols + offset + len)
                .collect()
        }
    }

    fn calibrate_noise(&self, spec: ExpansionSpec, cache_limit: usize) -> Noise {
        let snr = 10f64.powf(spec.snr_db / 10.0);
        let pairs = self.read_blocks() / 2;
        let w = 1 - self.read_axis;
        let numel = self.axes[0].src_len() * self.axes[1].src_len();
        let max_write_blocks = self.axes[w]
            .segments
            .iter()
            .map(Segment::max_blocks)
            .max()
            .unwrap_or(0);
        let mut draws = match draws_bytes(&self.axes, self.read_axis) {
            Some(b) if b <= cache_limit => Some(vec![vec![0f64; numel]; max_write_blocks * pairs]),
            _ => None,
        };
        let sigma = (0..self.axes[w].segments.len())
            .map(|ws| {
                let ranges = self.segment_ranges(ws);
                let signal = mean_square_of_source(self.src, self.src_dtype, &ranges)
                    * self.scale
                    * self.scale;
                let write_blocks = self.axes[w].segments[ws].max_blocks();
                let mut sig = Vec::with_capacity(write_blocks * pairs);
                for bw in 0..write_blocks {
                    for pair in 0..pairs {
                        let pattern = self.calibration_pattern(ws, bw, pair);
                        let target = signal * pattern.row_power(bw) / snr;
                        let cache = draws.as_mut().map(|d| d[bw * pairs + pair].as_mut_slice());
                        let drawn = mean_square_of_noise(
                            block_key(spec.noise_key, ws, bw, pair),
                            &ranges,
                            cache,
                        );
                        sig.push(if drawn > 0.0 {
                            (target / drawn).sqrt()
                        } else {
                            0.0
                        });
                    }
                }
                sig
            })
            .collect();
        Noise {
            key: spec.noise_key,
            pairs,
            sigma,
            draws,
        }
    }

    /// Fills `out` with destination rows starting at `first_row` (`out.len()` must be a
    /// multiple of the destination row size). Rows are computed in parallel.
    pub fn fill_rows(&self, first_row: usize, out: &mut [u8]) {
        let row_bytes = self.dest_row_bytes();
        debug_assert_eq!(out.len() % row_bytes, 0);
        let rows_per_task = (256 * 1024 / row_bytes).max(1);
        let cols = self.axes[1].src_len();
        let pairs = self.noise.as_ref().map_or(0, |n| n.pairs);
        out.par_chunks_mut(rows_per_task * row_bytes)
            .enumerate()
            .for_each(|(task, chunk)| {
                let mut scratch = RowScratch {
                    src: vec![0f64; cols],
                    dst: vec![0f64; self.dest_shape()[1]],
                    pair_draws: vec![0f64; pairs * cols],
                    draws: vec![0f64; cols],
                };
                for (k, row_out) in chunk.chunks_exact_mut(row_bytes).enumerate() {
                    self.row(first_row + task * rows_per_task + k, &mut scratch);
                    self.out_dtype.encode(&scratch.dst, row_out);
                }
            });
    }

    fn row(&self, row: usize, buf: &mut RowScratch) {
        let p0 = *self
            .row_pieces
            .iter()
            .find(|p| row >= p.dest && row < p.dest + p.len)
            .expect("row inside the destination");
        let sr = p0.src + (row - p0.dest);
        let cols = self.axes[1].src_len();
        let elem = self.src_dtype.size();
        self.src_dtype.decode(
            &self.src[sr * cols * elem..(sr + 1) * cols * elem],
            &mut buf.src,
        );
        for p1 in &self.col_pieces {
            let (pw, pr) = if self.read_axis == 1 {
                (&p0, p1)
            } else {
                (p1, &p0)
            };
            let (ws, bw, br) = (pw.seg, pw.copy, pr.copy);
            let pattern = BlockPattern {
                write_blocks: pw.blocks,
                read_blocks: pr.blocks,
                diagonal: self.diagonal,
            };
            let scale = pattern.scale(bw, br) * self.scale;
            let block = &mut buf.dst[p1.dest..p1.dest + p1.len];
            let source = &buf.src[p1.src..p1.src + p1.len];
            let pair = br / 2;
            let noise = match &self.noise {
                // The odd last copy of an odd multiplicity stays noise-free.
                Some(noise) if pair < pr.blocks / 2 => noise,
                _ => {
                    for (d, s) in block.iter_mut().zip(source) {
                        *d = s * scale;
                    }
                    // Only when set: adding 0.0 would turn -0.0 into +0.0.
                    if self.shift != 0.0 {
                        for d in block.iter_mut() {
                            *d += self.shift;
                        }
                    }
                    continue;
                }
            };
            let sigma = noise.sigma[ws][bw * noise.pairs + pair];
            let signed = if br % 2 == 0 { sigma } else { -sigma };
            let base = sr * cols + p1.src;
            let z: &[f64] = if let Some(draws) = &noise.draws {
                &draws[bw * noise.pairs + pair][base..base + p1.len]
            } else if self.read_axis == 1 {
                // Both blocks of a pair read the same draws, and they lie in this row:
                // the even copy's piece comes first (pieces are in copy order) and covers
                // the same source columns, so the odd one reuses its draws.
                let z = &mut buf.pair_draws[pair * cols + p1.src..pair * cols + p1.src + p1.len];
                if br % 2 == 0 {
                    gaussians(block_key(noise.key, ws, bw, pair), base as u64, z);
                }
                z
            } else {
                let z = &mut buf.draws[..p1.len];
                gaussians(block_key(noise.key, ws, bw, pair), base as u64, z);
                z
            };
            // The same two roundings as `s * scale` then `+= signed * z`: Rust never fuses
            // them into an FMA, so these bytes match the scalar kernel's.
            for ((d, s), z) in block.iter_mut().zip(source).zip(z) {
                *d = s * scale + signed * z;
            }
        }
    }
}

/// Per-task buffers of [`Expansion::fill_rows`].
struct RowScratch {
    /// The source row as f64.
    src: Vec<f64>,
    /// The destination row as f64.
    dst: Vec<f64>,
    /// [pair][source column]: the draws of the even copy of each pair, reused by the odd one.
    pair_draws: Vec<f64>,
    /// One piece's draws when the read axis is the rows (no reuse within a row).
    draws: Vec<f64>,
}

/// mean(W^2) over some flat element ranges of a source tensor, summed per range in a fixed
/// order so the result does not depend on thread scheduling (byte-identical output).
fn mean_square_of_source(src: &[u8], dtype: DType, ranges: &[std::ops::Range<usize>]) -> f64 {
    let n: usize = ranges.iter().map(|r| r.len()).sum();
    if n == 0 {
        return 0.0;
    }
    let e = dtype.size();
    let partial: Vec<f64> = split(ranges)
        .into_par_iter()
        .map(|r| {
            let mut buf = vec![0f64; r.len()];
            dtype.decode(&src[r.start * e..r.end * e], &mut buf);
            buf.iter().map(|x| x * x).sum::<f64>()
        })
        .collect();
    partial.iter().sum::<f64>() / n as f64
}

/// mean(z^2) of the noise draws addressed by the given element ranges; with `cache` (one
/// slot per flat source index) the draws are also stored there. Summed per 64 Ki chunk in
/// index order, then over chunks in order: the same result on any number of threads.
fn mean_square_of_noise(
    key: u64,
    ranges: &[std::ops::Range<usize>],
    cache: Option<&mut [f64]>,
) -> f64 {
    let n: usize = ranges.iter().map(|r| r.len()).sum();
    if n == 0 {
        return 0.0;
    }
    let chunks = split(ranges);
    let sum_squares = |z: &[f64]| z.iter().map(|z| z * z).sum::<f64>();
    let partial: Vec<f64> = match cache {
        Some(cache) => chunks
            .par_iter()
            .zip(carve(cache, &chunks))
            .map(|(r, z)| {
                gaussians(key, r.start as u64, z);
                sum_squares(z)
            })
            .collect(),
        None => chunks
            .par_iter()
            .map(|r| {
                let mut z = [0f64; DRAW_BATCH];
                // One running sum over the whole chunk, in index order, as `sum()` does
                // (it starts from -0.0): batching the draws must not regroup the additions.
                let mut acc = -0.0;
                for start in r.clone().step_by(DRAW_BATCH) {
                    let z = &mut z[..(r.end - start).min(DRAW_BATCH)];
                    gaussians(key, start as u64, z);
                    acc = z.iter().fold(acc, |a, z| a + z * z);
                }
                acc
            })
            .collect(),
    };
    partial.iter().sum::<f64>() / n as f64
}

/// The disjoint sub-slices of `buf` at the given ascending, non-overlapping ranges.
fn carve<'s>(mut buf: &'s mut [f64], ranges: &[std::ops::Range<usize>]) -> Vec<&'s mut [f64]> {
    let mut out = Vec::with_capacity(ranges.len());
    let mut pos = 0;
    for r in ranges {
        let rest = std::mem::take(&mut buf);
        let (piece, rest) = rest[r.start - pos..].split_at_mut(r.len());
        out.push(piece);
        buf = rest;
        pos = r.end;
    }
    out
}

/// Ranges cut into pieces of at most 64 Ki elements: the unit of parallel work whose partial
/// sums are then added in order.
fn split(ranges: &[std::ops::Range<usize>]) -> Vec<std::ops::Range<usize>> {
    const CHUNK: usize = 1 << 16;
    let mut out = Vec::new();
    for r in ranges {
        let mut s = r.start;
        while s < r.end {
            out.push(s..(s + CHUNK).min(r.end));
            s += CHUNK;
        }
    }
    out
}

use crate::rng::mix64;

/// A stable 64-bit key for a string (FNV-1a then mixed), used to give each tensor its
/// own noise stream independent of the order tensors are processed in.
pub fn name_key(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h ^ mix64(seed))
}

fn block_key(key: u64, write_segment: usize, bw: usize, pair: usize) -> u64 {
    let block = ((write_segment as u64) << 48) ^ ((bw as u64) << 32) ^ pair as u64;
    mix64(key ^ mix64(block ^ 0x9e37_79b9_7f4a_7c15))
}

/// Draws per batch where callers need a scratch buffer of draws: big enough for the
/// vector loops, small enough for the stack and L1.
const DRAW_BATCH: usize = 1024;

/// `out[k] = gaussian(key, start + k)`, bit for bit, faster: one loop of integer hashing
/// and plain IEEE arithmetic (no libm, no branches) that the compiler vectorizes; lane for
/// lane the vector ops round exactly like the scalar ones, so batching changes no bit.
fn gaussians(key: u64, start: u64, out: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512dq") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { gaussians_avx512(key, start, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { gaussians_avx2(key, start, out) };
    }
    gaussians_portable(key, start, out)
}

/// [`gaussians`] compiled for AVX-512 (8 lanes of 64-bit multiply, shifts and i64 -> f64),
/// chosen at run time so the binary still runs on any x86-64. No FMA is enabled or used:
/// Rust never contracts a*b+c, and every path rounds each operation separately.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn gaussians_avx512(key: u64, start: u64, out: &mut [f64]) {
    gaussians_body(key, start, out)
}

/// [`gaussians`] compiled for AVX2 (4 lanes), for x86-64 CPUs without AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gaussians_avx2(key: u64, start: u64, out: &mut [f64]) {
    gaussians_body(key, start, out)
}

fn gaussians_portable(key: u64, start: u64, out: &mut [f64]) {
    gaussians_body(key, start, out)
}

#[inline(always)]
fn gaussians_body(key: u64, start: u64, out: &mut [f64]) {
    for (k, o) in out.iter_mut().enumerate() {
        *o = gaussian(key, start.wrapping_add(k as u64));
    }
}

/// A standard normal draw addressed by (key, index): the definition of the noise. Box-Muller
/// on two hashed counters, with our own `ln` and `cos` ([`ln_unit`], [`cos_turns`]) so the
/// bytes are the same on every machine and libc and the batch loop vectorizes.
///
/// Until this change the draws called the platform's libm `ln`/`cos`, so the noise bytes
/// depended on the libc; replacing them was a one-time, documented change of the noise
/// (draws moved by about an ulp; same distribution, same SNR calibration; see docs/clone-output.md).
#[inline(always)]
fn gaussian(key: u64, index: u64) -> f64 {
    const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
    let a = mix64(key.wrapping_add(index.wrapping_mul(2).wrapping_add(1).wrapping_mul(GOLDEN)));
    let b = mix64(key.wrapping_add(index.wrapping_mul(2).wrapping_add(2).wrapping_mul(GOLDEN)));
    // u1 in (0, 1] so ln(u1) is finite; the angle is b's top 53 bits as a fraction of a turn.
    let u1 = ((a >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64);
    (-2.0 * ln_unit(u1)).sqrt() * cos_turns(b >> 11)
}

/// ln(x) for x in [2^-53, 1] (any positive normal x works), fdlibm's method and minimax
/// coefficients (e_log.c, error < 1 ulp there) with its table-free reduction done on the bits:
/// x = 2^k * (1 + f), 1 + f in [sqrt(1/2), sqrt(2)), ln(1 + f) = 2 atanh(f / (2 + f)).
/// Only +, -, *, / and integer bit operations, each rounded once, in a fixed order, and no
/// branch: every compiler and CPU gives the same bits, scalar or vectorized.
#[inline(always)]
fn ln_unit(x: f64) -> f64 {
    const LG1: f64 = f64::from_bits(0x3FE5_5555_5555_5593); // 6.666666666666735130e-01
    const LG2: f64 = f64::from_bits(0x3FD9_9999_9997_FA04); // 3.999999999940941908e-01
    const LG3: f64 = f64::from_bits(0x3FD2_4924_9422_9359); // 2.857142874366239149e-01
    const LG4: f64 = f64::from_bits(0x3FCC_71C5_1D8E_78AF); // 2.222219843214978396e-01
    const LG5: f64 = f64::from_bits(0x3FC7_4664_96CB_03DE); // 1.818357216161805012e-01
    const LG6: f64 = f64::from_bits(0x3FC3_9A09_D078_C69F); // 1.531383769920937332e-01
    const LG7: f64 = f64::from_bits(0x3FC2_F112_DF3E_5244); // 1.479819860511658591e-01

    // ln 2 split so that k * LN2_HI is exact for |k| < 2^11.
    const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76);
    // The bits of sqrt(1/2): subtracting them puts k in the exponent field, rounded so
    // the remaining mantissa lands in [sqrt(1/2), sqrt(2)).
    const OFF: u64 = 0x3FE6_A09E_667F_3BCD;
    let ix = x.to_bits();
    let tmp = ix.wrapping_sub(OFF);
    let k = (tmp as i64) >> 52;
    let m = f64::from_bits(ix.wrapping_sub(tmp & 0xFFF0_0000_0000_0000));
    let f = m - 1.0; // exact (Sterbenz)
    let s = f / (2.0 + f);
    let z = s * s;
    let w = z * z;
    let t1 = w * (LG2 + w * (LG4 + w * LG6));
    let t2 = z * (LG1 + w * (LG3 + w * (LG5 + w * LG7)));
    let r = t2 + t1;
    let hfsq = 0.5 * f * f;
    let dk = k as f64;
    dk * LN2_HI - ((hfsq - (s * (hfsq + r) + dk * LN2_LO)) - f)
}

/// cos(2 pi j / 2^53) for j < 2^53: the angle is a fraction of a turn, so the reduction to
/// the nearest quarter turn is exact integer arithmetic, leaving |theta| <= pi/4 (one
/// rounding, theta = r * 2 pi / 2^53); then fdlibm's minimax sin/cos kernels (k_sin.c,
/// k_cos.c, error < 1 ulp on [-pi/4, pi/4]) and a branch-free choice by quadrant. Only
/// +, -, * and integer ops, each rounded once in a fixed order: the same bits everywhere.
#[inline(always)]
fn cos_turns(j: u64) -> f64 {
    const S1: f64 = f64::from_bits(0xBFC5_5555_5555_5549); // -1.66666666666666324348e-01
    const S2: f64 = f64::from_bits(0x3F81_1111_1110_F8A6); // 8.33333333332248946124e-03
    const S3: f64 = f64::from_bits(0xBF2A_01A0_19C1_61D5); // -1.98412698298579493134e-04
    const S4: f64 = f64::from_bits(0x3EC7_1DE3_57B1_FE7D); // 2.75573137070700676789e-06
    const S5: f64 = f64::from_bits(0xBE5A_E5E6_8A2B_9CEB); // -2.50507602534068634195e-08
    const S6: f64 = f64::from_bits(0x3DE5_D93A_5ACF_D57C); // 1.58969099521155010221e-10
    const C1: f64 = f64::from_bits(0x3FA5_5555_5555_554C); // 4.16666666666666019037e-02
    const C2: f64 = f64::from_bits(0xBF56_C16C_16C1_5177); // -1.38888888888741095749e-03
    const C3: f64 = f64::from_bits(0x3EFA_01A0_19CB_1590); // 2.48015872894767294178e-05
    const C4: f64 = f64::from_bits(0xBE92_7E4F_809C_52AD); // -2.75573143513906633035e-07
    const C5: f64 = f64::from_bits(0x3E21_EE9E_BDB4_B1C4); // 2.08757232129817482790e-09
    const C6: f64 = f64::from_bits(0xBDA8_FAE9_BE88_38D4); // -1.13596475577881948265e-11
                                                           // A quarter turn is 2^51 units of 2^-53 turn.
    const QUARTER: u32 = 51;

    // Nearest quarter q in 0..=4 and the exact remainder r in [-2^50, 2^50).
    let q = (j + (1 << (QUARTER - 1))) >> QUARTER;
    let r = j.wrapping_sub(q << QUARTER) as i64;
    let x = r as f64 * (std::f64::consts::TAU / (1u64 << 53) as f64);
    let z = x * x;
    let w = z * z;
    // sin x = x + x^3 (S1 + z S2 + ... + z^5 S6)   (musl __sin with y = 0)
    let rs = S2 + z * (S3 + z * S4) + z * w * (S5 + z * S6);
    let sin = x + z * x * (S1 + z * rs);
    // cos x = 1 - z/2 + z^2 (C1 + ... + z^5 C6), with 1 - z/2 compensated (musl __cos, y = 0)
    let rc = z * (C1 + z * (C2 + z * C3)) + w * w * (C4 + z * (C5 + z * C6));
    let hz = 0.5 * z;
    let one_minus = 1.0 - hz;
    let cos = one_minus + (((1.0 - one_minus) - hz) + z * rc);
    // cos(q pi/2 + x) = cos x, -sin x, -cos x, sin x for q = 0, 1, 2, 3 (4 is 0 again).
    let v = if q & 1 == 1 { sin } else { cos };
    let negate = ((q + 1) & 2) << 62;
    f64::from_bits(v.to_bits() ^ negate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(values: &[f64], dtype: DType) -> Vec<u8> {
        let mut b = vec![0u8; values.len() * dtype.size()];
        dtype.encode(values, &mut b);
        b
    }

    fn decode(bytes: &[u8], dtype: DType) -> Vec<f64> {
        let mut v = vec![0.0; bytes.len() / dtype.size()];
        dtype.decode(bytes, &mut v);
        v
    }

    /// An expansion spec with no extra scale or shift.
    pub(super) fn unscaled(
        variant: Variant,
        snr_db: f64,
        noise_key: u64,
        out_dtype: DType,
    ) -> ExpansionSpec {
        ExpansionSpec {
            variant,
            snr_db,
            noise_key,
            out_dtype,
            scale: 1.0,
            shift: 0.0,
        }
    }

    /// A deterministic "weight" matrix with std around 0.5.
    fn weights(n: usize) -> Vec<f64> {
        (0..n).map(|i| gaussian(12345, i as u64) * 0.5).collect()
    }

    fn expand(
        w: &[f64],
        dtype: DType,
        axes: &[AxisGrowth],
        variant: Variant,
        snr_db: f64,
    ) -> (Vec<f64>, [usize; 2]) {
        let src = encode(w, dtype);
        let spec = unscaled(variant, snr_db, 7, dtype);
        let e = Expansion::new(&src, dtype, axes, spec).unwrap();
        let shape = e.dest_shape();
        let mut out = vec![0u8; shape[0] * e.dest_row_bytes()];
        e.fill_rows(0, &mut out);
        (decode(&out, dtype), shape)
    }

    fn ax(len: usize, copies: usize, role: Role) -> AxisGrowth {
        AxisGrowth::tiled(len, copies, role)
    }

    /// Block (bw, br) of a [rows x cols] destination whose write axis is rows.
    fn block(d: &[f64], cols: usize, (o, i): (usize, usize), (bo, bi): (usize, usize)) -> Vec<f64> {
        let mut v = Vec::new();
        for r in 0..o {
            for c in 0..i {
                v.push(d[(bo * o + r) * cols + bi * i + c]);
            }
        }
        v
    }

    #[test]
    fn symmetric_blocks_are_w_over_read_copies() {
        let (o, i) = (6, 5);
        let w = weights(o * i);
        for (ro, ri) in [(2, 2), (3, 3), (3, 2), (1, 4), (4, 1)] {
            let (d, shape) = expand(
                &w,
                DType::F64,
                &[ax(o, ro, Role::Write), ax(i, ri, Role::Read)],
                Variant::Symmetric,
                0.0,
            );
            assert_eq!(shape, [o * ro, i * ri]);
            for bo in 0..ro {
                for bi in 0..ri {
                    let b = block(&d, i * ri, (o, i), (bo, bi));
                    for (x, y) in b.iter().zip(&w) {
                        assert!(
                            (x - y / ri as f64).abs() <= 1e-15,
                            "({ro},{ri}) block ({bo},{bi})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn write_only_tensors_are_plain_tiles() {
        let w = weights(7);
        let (d, shape) = expand(
            &w,
            DType::F32,
            &[ax(7, 3, Role::Write)],
            Variant::NoisyDiagonal,
            10.0,
        );
        assert_eq!(shape, [1, 21]);
        let w32: Vec<f64> = w.iter().map(|x| *x as f32 as f64).collect();
        assert_eq!(
            d,
            [w32.clone(), w32.clone(), w32].concat(),
            "norms and biases: tile, no noise"
        );
        // The embedding: vocab read (never grown), hidden written: tiled columns, no scale.
        let w = weights(12);
        let (d, _) = expand(
            &w,
            DType::F64,
            &[ax(4, 1, Role::Read), ax(3, 2, Role::Write)],
            Variant::Noisy,
            10.0,
        );
        for r in 0..4 {
            assert_eq!(d[r * 6..r * 6 + 3], w[r * 3..r * 3 + 3]);
            assert_eq!(d[r * 6 + 3..r * 6 + 6], w[r * 3..r * 3 + 3]);
        }
    }

    #[test]
    fn diagonal_rows_sum_to_w() {
        let (o, i) = (4, 3);
        let w = weights(o * i);
        for (ro, ri) in [(2, 2), (3, 3), (3, 2), (2, 3), (1, 2), (4, 2)] {
            let (d, _) = expand(
                &w,
                DType::F64,
                &[ax(o, ro, Role::Write), ax(i, ri, Role::Read)],
                Variant::Diagonal,
                0.0,
            );
            for bo in 0..ro {
                let mut sum = vec![0.0; o * i];
                for bi in 0..ri {
                    for (s, x) in sum.iter_mut().zip(block(&d, i * ri, (o, i), (bo, bi))) {
                        *s += x;
                    }
                }
                // Equal input copies see sum_b block_b = W: function preserved.
                for (s, x) in sum.iter().zip(&w) {
                    assert!((s - x).abs() < 1e-15);
                }
            }
            if ro == ri {
                let off = block(&d, i * ri, (o, i), (0, 1));
                assert!(off.iter().all(|x| *x == 0.0), "[[W,0],[0,W]]");
            }
        }
    }

    #[test]
    fn noise_cancels_and_has_the_exact_snr() {
        let (o, i) = (16, 24);
        let w = weights(o * i);
        let signal = w.iter().map(|x| x * x).sum::<f64>() / w.len() as f64;
        for variant in [Variant::Noisy, Variant::NoisyDiagonal] {
            for (ro, ri) in [(2, 2), (3, 3), (1, 2), (2, 4)] {
                let pattern = BlockPattern {
                    write_blocks: ro,
                    read_blocks: ri,
                    diagonal: variant.is_diagonal(),
                };
                let (d, _) = expand(
                    &w,
                    DType::F64,
                    &[ax(o, ro, Role::Write), ax(i, ri, Role::Read)],
                    variant,
                    10.0,
                );
                for bo in 0..ro {
                    let mut sum = vec![0.0; o * i];
                    for bi in 0..ri {
                        let b = block(&d, i * ri, (o, i), (bo, bi));
                        let scale = pattern.scale(bo, bi);
                        let noise: Vec<f64> =
                            b.iter().zip(&w).map(|(x, y)| x - y * scale).collect();
                        let ms = noise.iter().map(|e| e * e).sum::<f64>() / noise.len() as f64;
                        if ri % 2 == 1 && bi == ri - 1 {
                            assert_eq!(ms, 0.0, "odd last block is noise-free");
                        } else {
                            let snr_db = 10.0 * (signal * pattern.row_power(bo) / ms).log10();
                            assert!(
                                (snr_db - 10.0).abs() < 1e-3,
                                "{variant:?} ({ro},{ri}) block ({bo},{bi}): {snr_db} dB"
                            );
                        }
                        for (s, x) in sum.iter_mut().zip(b) {
                            *s += x;
                        }
                    }
                    for (s, x) in sum.iter().zip(&w) {
                        assert!((s - x).abs() < 1e-14, "noise pairs cancel");
                    }
                }
            }
        }
    }

    #[test]
    fn noisy_symmetric_row_halves_have_the_papers_cosine() {
        // At 10 dB and n = 2, cos(W/2 + e, W/2 - e) = (S - N) / (S + N) = 9/11 = 0.818.
        let (o, i) = (64, 64);
        let w = weights(o * i);
        let (d, _) = expand(
            &w,
            DType::F64,
            &[ax(o, 2, Role::Write), ax(i, 2, Role::Read)],
            Variant::Noisy,
            10.0,
        );
        let mut cos_sum = 0.0;
        for r in 0..2 * o {
            let row = &d[r * 2 * i..(r + 1) * 2 * i];
            let (a, b) = row.split_at(i);
            let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
            let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
            cos_sum += dot / (na * nb);
        }
        let mean = cos_sum / (2 * o) as f64;
        assert!(
            (mean - 9.0 / 11.0).abs() < 0.02,
            "mean row-half cosine {mean}"
        );
    }

    #[test]
    fn same_inputs_same_bytes_and_rows_in_any_order() {
        let w = weights(40 * 8);
        let src = encode(&w, DType::BF16);
        let spec = unscaled(Variant::Noisy, 10.0, 3, DType::BF16);
        let axes = [ax(40, 2, Role::Write), ax(8, 2, Role::Read)];
        let e = Expansion::new(&src, DType::BF16, &axes, spec).unwrap();
        let rb = e.dest_row_bytes();
        let mut whole = vec![0u8; 80 * rb];
        e.fill_rows(0, &mut whole);
        let mut pieces = vec![0u8; 80 * rb];
        for r in (0..80).rev() {
            e.fill_rows(r, &mut pieces[r * rb..(r + 1) * rb]);
        }
        assert_eq!(whole, pieces);
    }

    #[test]
    fn fused_axes_grow_segment_by_segment() {
        // phi3-style rows [q (4) | k (2) | v (2)] with q, k, v copies (2, 2, 1) (as for a
        // single MQA kv head), reading a hidden axis of 3 grown x2: [q q | k k | v].
        let w = weights(8 * 3);
        let fused = AxisGrowth {
            segments: vec![
                Segment::tiled(4, 2),
                Segment::tiled(2, 2),
                Segment::tiled(2, 1),
            ],
            role: Role::Write,
        };
        for variant in Variant::ALL {
            let (d, shape) = expand(
                &w,
                DType::F64,
                &[fused.clone(), ax(3, 2, Role::Read)],
                variant,
                10.0,
            );
            assert_eq!(shape, [14, 6]);
            let src_row = [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 4, 5, 6, 7];
            for (r, &sr) in src_row.iter().enumerate() {
                // Every destination row sums over its two input copies to the source row.
                for c in 0..3 {
                    let sum = d[r * 6 + c] + d[r * 6 + 3 + c];
                    assert!((sum - w[sr * 3 + c]).abs() < 1e-14, "{variant:?} row {r}");
                }
            }
        }
        // GPT-2 Conv1D: [in = hidden (read, axis 0), out = [q | k | v] (write, axis 1)].
        let w = weights(3 * 6);
        let cols = AxisGrowth {
            segments: vec![Segment::tiled(2, 2); 3],
            role: Role::Write,
        };
        let (d, shape) = expand(
            &w,
            DType::F64,
            &[ax(3, 2, Role::Read), cols],
            Variant::Symmetric,
            0.0,
        );
        assert_eq!(shape, [6, 12]);
        let src_col = [0, 1, 0, 1, 2, 3, 2, 3, 4, 5, 4, 5];
        for r in 0..6 {
            for (c, &sc) in src_col.iter().enumerate() {
                assert_eq!(d[r * 12 + c], w[(r % 3) * 6 + sc] / 2.0);
            }
        }
    }

    #[test]
    fn noise_on_a_fused_axis_has_the_exact_snr_per_segment() {
        let w: Vec<f64> = weights(6 * 4)
            .iter()
            .enumerate()
            .map(|(i, x)| if i < 16 { x * 3.0 } else { *x })
            .collect();
        let fused = AxisGrowth {
            segments: vec![Segment::tiled(4, 2), Segment::tiled(2, 2)],
            role: Role::Write,
        };
        let (d, _) = expand(
            &w,
            DType::F64,
            &[fused, ax(4, 2, Role::Read)],
            Variant::Noisy,
            10.0,
        );
        // Segment rows: [0..4) copies at dest rows 0..8, [4..6) at 8..12.
        for (seg_rows, dest_start, src_start) in [(4, 0, 0), (2, 8, 4)] {
            let src = &w[src_start * 4..(src_start + seg_rows) * 4];
            let signal = src.iter().map(|x| x * x).sum::<f64>() / src.len() as f64 / 4.0;
            for bw in 0..2 {
                let mut ms = 0.0;
                for r in 0..seg_rows {
                    let dr = dest_start + bw * seg_rows + r;
                    for c in 0..4 {
                        let e = d[dr * 8 + c] - src[r * 4 + c] / 2.0;
                        ms += e * e;
                    }
                }
                let snr = 10.0 * (signal / (ms / (seg_rows * 4) as f64)).log10();
                assert!(
                    (snr - 10.0).abs() < 1e-3,
                    "segment at {src_start}, block-row {bw}: {snr} dB"
                );
            }
        }
    }

    #[test]
    fn extra_scale_multiplies_the_whole_tensor() {
        let w = weights(4 * 3);
        let src = encode(&w, DType::F64);
        let spec = ExpansionSpec {
            scale: 0.5,
            ..unscaled(Variant::Symmetric, 10.0, 1, DType::F64)
        };
        let e = Expansion::new(
            &src,
            DType::F64,
            &[ax(4, 1, Role::Read), ax(3, 4, Role::Write)],
            spec,
        )
        .unwrap();
        let mut out = vec![0u8; 4 * e.dest_row_bytes()];
        e.fill_rows(0, &mut out);
        let d = decode(&out, DType::F64);
        for r in 0..4 {
            for c in 0..12 {
                assert_eq!(d[r * 12 + c], w[r * 3 + c % 3] * 0.5);
            }
        }
    }

    #[test]
    fn shift_is_added_after_the_scale_and_only_where_reads_are_not_grown() {
        // A norm gain (one write axis): offset + w' = s (offset + w) with offset 1.
        let w = weights(3);
        let src = encode(&w, DType::F64);
        let s = 0.5f64.sqrt();
        let spec = ExpansionSpec {
            scale: s,
            shift: s - 1.0,
            ..unscaled(Variant::Noisy, 10.0, 1, DType::F64)
        };
        let e = Expansion::new(&src, DType::F64, &[ax(3, 2, Role::Write)], spec).unwrap();
        let mut out = vec![0u8; e.dest_row_bytes()];
        e.fill_rows(0, &mut out);
        let d = decode(&out, DType::F64);
        for (j, x) in d.iter().enumerate() {
            let want = s * (1.0 + w[j % 3]);
            assert!(((1.0 + x) - want).abs() <= 4.0 * f64::EPSILON, "{j}: {x}");
        }
        // A grown read axis would add the shift to blocks that must sum to W: refused.
        let err = Expansion::new(
            &encode(&weights(4 * 3), DType::F64),
            DType::F64,
            &[ax(4, 2, Role::Read), ax(3, 2, Role::Write)],
            spec,
        )
        .err()
        .unwrap();
        assert!(err.contains("read axis is not grown"), "{err}");
    }

    /// Destination index -> source unit along a grown segment.
    fn unit_of(seg: Segment, j: usize) -> usize {
        if j < seg.len * seg.copies {
            j % seg.len
        } else {
            j - seg.len * seg.copies
        }
    }

    #[test]
    fn uneven_axes_preserve_the_function_in_every_variant() {
        // Net2Net: every destination row, fed the unevenly copied input, equals its source
        // row: summed over the copies of each source unit, the weights give W back.
        let cases = [
            // (rows, cols, write axis is rows, uneven segment on rows / on cols)
            (
                Segment {
                    len: 5,
                    copies: 2,
                    extra: 3,
                },
                Segment::tiled(4, 2),
            ),
            (
                Segment::tiled(4, 2),
                Segment {
                    len: 5,
                    copies: 2,
                    extra: 2,
                },
            ),
            (
                Segment::tiled(4, 3),
                Segment {
                    len: 6,
                    copies: 1,
                    extra: 3,
                },
            ),
            (
                Segment {
                    len: 6,
                    copies: 1,
                    extra: 5,
                },
                Segment::tiled(3, 1),
            ),
        ];
        for (rows, cols) in cases {
            for read_axis in [0, 1] {
                let w = weights(rows.len * cols.len);
                let (ra, ca) = if read_axis == 1 {
                    (Role::Write, Role::Read)
                } else {
                    (Role::Read, Role::Write)
                };
                let axes = [
                    AxisGrowth {
                        segments: vec![rows],
                        role: ra,
                    },
                    AxisGrowth {
                        segments: vec![cols],
                        role: ca,
                    },
                ];
                for variant in Variant::ALL {
                    let (d, shape) = expand(&w, DType::F64, &axes, variant, 10.0);
                    assert_eq!(shape, [rows.dest_len(), cols.dest_len()]);
                    let (wseg, rseg) = if read_axis == 1 {
                        (rows, cols)
                    } else {
                        (cols, rows)
                    };
                    for dw in 0..wseg.dest_len() {
                        let sw = unit_of(wseg, dw);
                        let mut sum = vec![0.0; rseg.len];
                        for dr in 0..rseg.dest_len() {
                            let x = if read_axis == 1 {
                                d[dw * shape[1] + dr]
                            } else {
                                d[dr * shape[1] + dw]
                            };
                            sum[unit_of(rseg, dr)] += x;
                        }
                        for (u, s) in sum.iter().enumerate() {
                            let want = if read_axis == 1 {
                                w[sw * cols.len + u]
                            } else {
                                w[u * cols.len + sw]
                            };
                            assert!(
                                (s - want).abs() < 1e-14,
                                "{variant:?} read axis {read_axis} {rows:?} x {cols:?}: row {dw} unit {u}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn uneven_symmetric_weights_are_w_over_multiplicity() {
        let seg = Segment {
            len: 4,
            copies: 2,
            extra: 1,
        };
        let w = weights(3 * 4);
        let axes = [
            AxisGrowth::tiled(3, 1, Role::Write),
            AxisGrowth {
                segments: vec![seg],
                role: Role::Read,
            },
        ];
        let (d, _) = expand(&w, DType::F64, &axes, Variant::Symmetric, 0.0);
        for r in 0..3 {
            for j in 0..9 {
                let u = unit_of(seg, j);
                let want = w[r * 4 + u] / seg.multiplicity(u) as f64;
                assert!((d[r * 9 + j] - want).abs() <= 1e-16, "row {r} col {j}");
            }
        }
    }

    #[test]
    fn batched_draws_are_the_scalar_draws_bit_for_bit() {
        // Starts near u64::MAX check the counter's wrap-around; lengths cross batch edges.
        for (key, start) in [
            (0, 0),
            (7, 12345),
            (u64::MAX, u64::MAX - 300),
            (99, 1 << 40),
        ] {
            for len in [0, 1, 7, DRAW_BATCH - 1, DRAW_BATCH, 3 * DRAW_BATCH + 5] {
                let want: Vec<u64> = (0..len)
                    .map(|k| gaussian(key, start.wrapping_add(k as u64)).to_bits())
                    .collect();
                let mut got = vec![0.0; len];
                gaussians(key, start, &mut got);
                assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want);
                gaussians_portable(key, start, &mut got);
                assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want);
            }
        }
    }

    #[test]
    fn noise_cache_is_bounded_and_counted() {
        let mlp = [ax(1536, 2, Role::Write), ax(576, 2, Role::Read)];
        // Two block-rows x one pair x 884,736 source elements x 8 bytes.
        assert_eq!(noise_cache_bytes(&mlp, Variant::Noisy), 2 * 1536 * 576 * 8);
        assert_eq!(
            noise_cache_bytes(&mlp, Variant::NoisyDiagonal),
            2 * 1536 * 576 * 8
        );
        assert_eq!(noise_cache_bytes(&mlp, Variant::Symmetric), 0);
        // x4: four block-rows x two pairs.
        let x4 = [ax(10, 4, Role::Write), ax(6, 4, Role::Read)];
        assert_eq!(noise_cache_bytes(&x4, Variant::Noisy), 4 * 2 * 60 * 8);
        // An embedding reads the vocabulary, never grown: no noise, nothing kept.
        let emb = [ax(49152, 1, Role::Read), ax(576, 2, Role::Write)];
        assert_eq!(noise_cache_bytes(&emb, Variant::Noisy), 0);
        // A 7B MLP matrix at x2 (720 MB of draws) is drawn twice instead of kept.
        let big = [ax(11008, 2, Role::Write), ax(4096, 2, Role::Read)];
        assert_eq!(noise_cache_bytes(&big, Variant::Noisy), 0);
        let spec = unscaled(Variant::Noisy, 10.0, 1, DType::BF16);
        let small = encode(&weights(24), DType::BF16);
        let e = Expansion::new(
            &small,
            DType::BF16,
            &[ax(4, 2, Role::Write), ax(6, 2, Role::Read)],
            spec,
        )
        .unwrap();
        assert!(e.noise.unwrap().draws.is_some());
    }

    /// Our ln against std's (glibc's, correctly rounded in practice) at 2^21 points: every
    /// exponent of the draws' range, hashed mantissas, and the reduction's edges.
    #[test]
    fn ln_unit_matches_std_to_an_ulp() {
        let mut xs: Vec<f64> = (0..2_000_000u64)
            .map(|i| ((mix64(i) >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64))
            .collect();
        for e in 0..=53 {
            let p = (0.5f64).powi(e);
            for m in [
                1.0,
                std::f64::consts::FRAC_1_SQRT_2,
                std::f64::consts::SQRT_2 * 0.5,
            ] {
                for d in -3i64..=3 {
                    let x = f64::from_bits((m * p).to_bits().wrapping_add(d as u64));
                    if x > 0.0 && x <= 1.0 {
                        xs.push(x);
                    }
                }
            }
            // Hashed mantissas within this binade.
            xs.extend(
                (0..1000u64)
                    .map(|i| p * (0.5 + (mix64(i ^ e as u64) >> 12) as f64 * 2f64.powi(-53))),
            );
        }
        let mut worst = 0f64;
        for &x in &xs {
            let (got, want) = (ln_unit(x), x.ln());
            if want == 0.0 {
                assert_eq!(got, 0.0, "ln(1)");
                continue;
            }
            worst = worst.max(((got - want) / want).abs());
        }
        eprintln!(
            "ln_unit: max relative error vs std {worst:.3e} over {} points",
            xs.len()
        );
        // Ours is within 1 ulp (fdlibm's bound) and the reference within 1 ulp on any libm:
        // 2 ulps, 2^-51 relative at most. Measured on glibc: 2.2e-16 (one ulp at most).
        assert!(
            worst <= 2.0 * f64::EPSILON,
            "ln_unit max relative error {worst:e}"
        );
    }

    /// Our cos of a fraction of a turn against std's: absolute error against
    /// cos(2 pi j / 2^53) at 2^21 hashed angles and the quadrant edges, and relative error
    /// against std's sin/cos of the same reduced angle (where std's own cos(2 pi u) would lose
    /// relative accuracy near its zeros, ours keeps it).
    #[test]
    fn cos_turns_matches_std() {
        let mut js: Vec<u64> = (0..2_000_000u64).map(|i| mix64(i) >> 11).collect();
        for q in 0..=4u64 {
            for edge in [
                q << 51,
                (q << 51) + (1 << 50),
                (q << 51).wrapping_sub(1 << 50),
            ] {
                for d in 0..5u64 {
                    for j in [edge.wrapping_add(d), edge.wrapping_sub(d)] {
                        if j < 1 << 53 {
                            js.push(j);
                        }
                    }
                }
            }
        }
        let (mut abs, mut rel) = (0f64, 0f64);
        for &j in &js {
            let got = cos_turns(j);
            let u = j as f64 * (1.0 / (1u64 << 53) as f64);
            abs = abs.max((got - (std::f64::consts::TAU * u).cos()).abs());
            // The same reduction done here, then std on the reduced angle.
            let q = (j + (1 << 50)) >> 51;
            let x = (j.wrapping_sub(q << 51) as i64) as f64
                * (std::f64::consts::TAU / (1u64 << 53) as f64);
            let want = match q % 4 {
                0 => x.cos(),
                1 => -x.sin(),
                2 => -x.cos(),
                _ => x.sin(),
            };
            if want != 0.0 {
                rel = rel.max(((got - want) / want).abs());
            } else {
                assert_eq!(got, 0.0);
            }
        }
        eprintln!(
            "cos_turns: max abs error vs std cos(2 pi u) {abs:.3e}, max relative error vs std \
             on the reduced angle {rel:.3e}, over {} points",
            js.len()
        );
        // std's argument 2 pi u is itself rounded by up to half an ulp of 2 pi (2^-51,
        // 4.4e-16 near the end of the turn), plus an ulp of each result: 4 eps bounds it.
        assert!(abs <= 4.0 * f64::EPSILON, "cos_turns max abs error {abs:e}");
        // Same 1 + 1 ulp argument as for ln; measured on glibc: 2.2e-16.
        assert!(
            rel <= 2.0 * f64::EPSILON,
            "cos_turns max relative error {rel:e}"
        );
    }

    /// The noise is the same on every x86-64 level: AVX-512, AVX2 and baseline SSE2 paths.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_instruction_set_path_gives_the_same_draws() {
        let n = 3 * DRAW_BATCH + 5;
        let want: Vec<u64> = (0..n).map(|k| gaussian(5, k as u64).to_bits()).collect();
        let mut got = vec![0.0; n];
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512dq") {
            unsafe { gaussians_avx512(5, 0, &mut got) };
            assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want);
        }
        if std::is_x86_feature_detected!("avx2") {
            unsafe { gaussians_avx2(5, 0, &mut got) };
            assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want);
        }
        gaussians_portable(5, 0, &mut got);
        assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want);
    }

    /// A few draws pinned as bits: the definition is pure IEEE arithmetic, so these hold on
    /// every machine; a 1-ulp change anywhere in ln_unit or cos_turns shows up here.
    #[test]
    fn draws_are_pinned_bit_for_bit() {
        let got: Vec<u64> = [(0, 0), (1, 1), (99, 12345), (u64::MAX, u64::MAX)]
            .iter()
            .map(|&(k, i)| gaussian(k, i).to_bits())
            .collect();
        assert_eq!(got, PINNED_DRAWS, "{got:#018x?}");
    }

    const PINNED_DRAWS: [u64; 4] = [
        0xbfdc_f9fb_99cf_ab8f,
        0xbfcd_2c77_886b_0fa8,
        0xbff0_7be1_732c_cae9,
        0xbfc2_83a9_6506_e731,
    ];

    #[test]
    fn gaussian_is_standard_normal() {
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|i| gaussian(99, i)).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.01,
            "mean {mean} var {var}"
        );
    }
}

/// The exact bytes of the noisy variants, pinned: the noise is part of a clone's identity
/// ("the same source, flags and seed give byte-identical output"), so any speed-up of the
/// kernel must reproduce these digests. They were computed by the scalar kernel of commit
/// 37355dd, then changed once, deliberately, when the draws stopped calling libm's ln/cos
/// (see [`gaussian`]): the f64 digests changed, the f32/bf16 ones did not (the draws moved
/// by at most an ulp or two, which rounding to f32/bf16 hides in these cases). The f64 cases
/// and `draws_are_pinned_bit_for_bit` catch a 1-ulp change. A deliberate change of the noise
/// has to update them and say so in the README.
#[cfg(test)]
mod pinned_bytes {
    use super::*;

    /// FNV-1a 64 of a byte string: enough to detect any changed byte, no dependency.
    fn fnv(bytes: &[u8]) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }

    fn digest(
        rows: AxisGrowth,
        cols: AxisGrowth,
        variant: Variant,
        out_dtype: DType,
        noise_key: u64,
    ) -> u64 {
        let n = rows.src_len() * cols.src_len();
        let w: Vec<f64> = (0..n)
            .map(|i| gaussian(4242, i as u64) * 0.02 + if i % 7 == 0 { 0.01 } else { 0.0 })
            .collect();
        let mut src = vec![0u8; n * DType::F32.size()];
        DType::F32.encode(&w, &mut src);
        let spec = super::tests::unscaled(variant, 10.0, noise_key, out_dtype);
        let axes = [rows, cols];
        let digests = [0, usize::MAX].map(|cache_limit| {
            let e =
                Expansion::with_cache_limit(&src, DType::F32, &axes, spec, cache_limit).unwrap();
            assert_eq!(e.noise.as_ref().unwrap().draws.is_some(), cache_limit > 0);
            let mut out = vec![0u8; e.dest_shape()[0] * e.dest_row_bytes()];
            e.fill_rows(0, &mut out);
            fnv(&out)
        });
        assert_eq!(digests[0], digests[1], "cached and recomputed draws agree");
        digests[0]
    }

    fn cases() -> Vec<(&'static str, u64)> {
        use Role::{Read, Write};
        let t = AxisGrowth::tiled;
        let uneven = |len, copies, extra, role| AxisGrowth {
            segments: vec![Segment { len, copies, extra }],
            role,
        };
        let fused = AxisGrowth {
            segments: vec![
                Segment::tiled(24, 2),
                Segment::tiled(8, 2),
                Segment::tiled(8, 1),
            ],
            role: Write,
        };
        let mut out = Vec::new();
        for (vn, variant) in [
            ("noisy", Variant::Noisy),
            ("noisy-diag", Variant::NoisyDiagonal),
        ] {
            for (dn, dtype) in [
                ("f32", DType::F32),
                ("bf16", DType::BF16),
                ("f64", DType::F64),
            ] {
                let label = |what: &str| -> &'static str {
                    Box::leak(format!("{vn} {dn} {what}").into_boxed_str())
                };
                out.push((
                    label("rows-write x2"),
                    digest(t(48, 2, Write), t(40, 2, Read), variant, dtype, 11),
                ));
                out.push((
                    label("cols-write x3"),
                    digest(t(30, 3, Read), t(20, 3, Write), variant, dtype, 12),
                ));
                out.push((
                    label("x4"),
                    digest(t(12, 4, Write), t(10, 4, Read), variant, dtype, 13),
                ));
                out.push((
                    label("uneven read"),
                    digest(t(9, 2, Write), uneven(10, 2, 3, Read), variant, dtype, 14),
                ));
                out.push((
                    label("uneven write"),
                    digest(uneven(7, 1, 4, Write), t(6, 3, Read), variant, dtype, 15),
                ));
                out.push((
                    label("fused rows"),
                    digest(fused.clone(), t(16, 2, Read), variant, dtype, 16),
                ));
                out.push((
                    label("ffn x3 of hidden x2"),
                    digest(t(14, 3, Write), t(12, 2, Read), variant, dtype, 17),
                ));
            }
            // Larger than one 64 Ki-element calibration chunk, several 256 KiB row tasks.
            out.push((
                Box::leak(format!("{vn} f32 big").into_boxed_str()),
                digest(t(300, 2, Write), t(256, 2, Read), variant, DType::F32, 18),
            ));
        }
        out
    }

    const PINNED: &[(&str, u64)] = &[
        ("noisy f32 rows-write x2", 0xa8560bcbfcd695ee),
        ("noisy f32 cols-write x3", 0xff975e7fc5bbe8ff),
        ("noisy f32 x4", 0xaa838e231eb383b3),
        ("noisy f32 uneven read", 0xd1f17503ac7e27eb),
        ("noisy f32 uneven write", 0xcd833eef5ed9224a),
        ("noisy f32 fused rows", 0x03cdfd101bc7c3be),
        ("noisy f32 ffn x3 of hidden x2", 0x2c5e2681083ec3c9),
        ("noisy bf16 rows-write x2", 0x8f8dbe52a9fa333b),
        ("noisy bf16 cols-write x3", 0x5b3e178246613878),
        ("noisy bf16 x4", 0x4c69ae3063021b3a),
        ("noisy bf16 uneven read", 0xc6cd751cc968891b),
        ("noisy bf16 uneven write", 0x77cbe2eae2678822),
        ("noisy bf16 fused rows", 0xab7c56b1ea59b8d0),
        ("noisy bf16 ffn x3 of hidden x2", 0xd81c21510fd82088),
        ("noisy f64 rows-write x2", 0x4673c45e7060bb30),
        ("noisy f64 cols-write x3", 0x411034a5d147784e),
        ("noisy f64 x4", 0x5b07d4060cc03893),
        ("noisy f64 uneven read", 0x3828210b3ad8b5e4),
        ("noisy f64 uneven write", 0xc0f07f832fca0d83),
        ("noisy f64 fused rows", 0x5302e23ac88a041d),
        ("noisy f64 ffn x3 of hidden x2", 0xc8e949057fd357d9),
        ("noisy f32 big", 0x71a06736fd86886a),
        ("noisy-diag f32 rows-write x2", 0xece99d4cf512b4bc),
        ("noisy-diag f32 cols-write x3", 0x76db8abe9e9d6744),
        ("noisy-diag f32 x4", 0x3ef30d374240c52e),
        ("noisy-diag f32 uneven read", 0xeb54f9d99525cf36),
        ("noisy-diag f32 uneven write", 0x157424bb9d74979e),
        ("noisy-diag f32 fused rows", 0x7c05c9c54c219964),
        ("noisy-diag f32 ffn x3 of hidden x2", 0x2f967a035eb31242),
        ("noisy-diag bf16 rows-write x2", 0x9f66b01426858bd7),
        ("noisy-diag bf16 cols-write x3", 0x93ae5ad070b05e1e),
        ("noisy-diag bf16 x4", 0x7ae9dece2faaa5a6),
        ("noisy-diag bf16 uneven read", 0xbddd7ee56930f1d7),
        ("noisy-diag bf16 uneven write", 0x584e35bd5f87730c),
        ("noisy-diag bf16 fused rows", 0x363fa257719420ee),
        ("noisy-diag bf16 ffn x3 of hidden x2", 0xa9eec34f3a89567b),
        ("noisy-diag f64 rows-write x2", 0xe5ebe96ece253a3c),
        ("noisy-diag f64 cols-write x3", 0x12a4e590b5642cb3),
        ("noisy-diag f64 x4", 0x29e14d101cd29501),
        ("noisy-diag f64 uneven read", 0x3175b54faf73f0b5),
        ("noisy-diag f64 uneven write", 0xd338a5ae2f0fab65),
        ("noisy-diag f64 fused rows", 0x1f52a80eccda5b60),
        ("noisy-diag f64 ffn x3 of hidden x2", 0x139b992ea390ae60),
        ("noisy-diag f32 big", 0x7121e3d8a8a8b3dc),
    ];

    #[test]
    fn noisy_bytes_match_the_pinned_digests() {
        let got = cases();
        let table: String = got
            .iter()
            .map(|(l, d)| format!("    (\"{l}\", 0x{d:016x}),\n"))
            .collect();
        assert_eq!(got.len(), PINNED.len(), "digest table:\n{table}");
        for ((l, d), (pl, pd)) in got.iter().zip(PINNED) {
            assert_eq!((l, d), (pl, pd), "digest table:\n{table}");
        }
    }
}

/// A micro-benchmark, not a test: `cargo test --release -p hyperclone-core --lib draw_bench
/// -- --ignored --nocapture`; DRAWS=batched or DRAWS=scalar runs one side only, so that
/// `perf stat -e task-clock` on the test binary gives its CPU time on a busy machine.
#[cfg(test)]
mod draw_bench {
    fn best(f: &mut dyn FnMut()) -> f64 {
        (0..5)
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    }

    #[test]
    #[ignore]
    fn draw_speed() {
        let n = 1 << 20;
        let mut out = vec![0.0; n];
        let which = std::env::var("DRAWS").unwrap_or_default();
        let dt = if which != "scalar" {
            best(&mut || super::gaussians(7, 0, &mut out))
        } else {
            0.0
        };
        let ds = if which != "batched" {
            best(&mut || {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = super::gaussian(7, i as u64);
                }
            })
        } else {
            0.0
        };
        eprintln!(
            "batched {:.1} ns/draw, scalar {:.1} ns/draw",
            dt / n as f64 * 1e9,
            ds / n as f64 * 1e9,
        );
    }
}
