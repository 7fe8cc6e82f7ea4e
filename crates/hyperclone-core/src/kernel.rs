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

/// How one tensor axis grows: `len` source indices tiled `copies` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AxisGrowth {
    pub len: usize,
    pub copies: usize,
    pub role: Role,
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

/// Noise for one tensor: sigma per (block-row, pair), chosen so that the realised
/// mean-square of the noise in every block is exactly row_signal / 10^(snr_db/10).
#[derive(Debug, Clone)]
struct Noise {
    key: u64,
    pairs: usize,
    sigma: Vec<f64>,
}

/// A planned expansion of one tensor, ready to produce destination rows in any order.
pub struct Expansion<'a> {
    src: &'a [u8],
    src_dtype: DType,
    out_dtype: DType,
    /// Axis 0 (rows) and axis 1 (columns); a 1-D tensor gets a dummy 1-row axis 0.
    axes: [AxisGrowth; 2],
    read_axis: usize,
    pattern: BlockPattern,
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
}

impl<'a> Expansion<'a> {
    /// `axes` has one or two entries with at most one `Read` axis; `src` holds
    /// `prod(len)` elements of `src_dtype`.
    pub fn new(
        src: &'a [u8],
        src_dtype: DType,
        axes: &[AxisGrowth],
        spec: ExpansionSpec,
    ) -> Result<Self, String> {
        let axes: [AxisGrowth; 2] = match *axes {
            [a] => [
                AxisGrowth {
                    len: 1,
                    copies: 1,
                    role: Role::Read,
                },
                a,
            ],
            [a, b] => [a, b],
            _ => return Err(format!("tensors of rank {} are not supported", axes.len())),
        };
        let read_axis = match (axes[0].role, axes[1].role) {
            (Role::Read, Role::Write) => 0,
            (Role::Write, Role::Read) => 1,
            // Two write axes: only legal when neither is a grown read; pick the ungrown one.
            (Role::Write, Role::Write) if axes[0].copies == 1 => 0,
            (Role::Write, Role::Write) if axes[1].copies == 1 => 1,
            _ => return Err("a tensor needs one read and one write axis".into()),
        };
        let numel = axes[0].len * axes[1].len;
        if src.len() != numel * src_dtype.size() {
            return Err(format!(
                "holds {} bytes, expected {}",
                src.len(),
                numel * src_dtype.size()
            ));
        }
        let pattern = BlockPattern {
            write_blocks: axes[1 - read_axis].copies,
            read_blocks: axes[read_axis].copies,
            diagonal: spec.variant.is_diagonal(),
        };
        let mut exp = Expansion {
            src,
            src_dtype,
            out_dtype: spec.out_dtype,
            axes,
            read_axis,
            pattern,
            noise: None,
        };
        if spec.variant.is_noisy() && pattern.read_blocks >= 2 {
            exp.noise = Some(exp.calibrate_noise(spec));
        }
        Ok(exp)
    }

    pub fn dest_shape(&self) -> [usize; 2] {
        [
            self.axes[0].len * self.axes[0].copies,
            self.axes[1].len * self.axes[1].copies,
        ]
    }

    pub fn dest_row_bytes(&self) -> usize {
        self.dest_shape()[1] * self.out_dtype.size()
    }

    fn calibrate_noise(&self, spec: ExpansionSpec) -> Noise {
        let numel = self.axes[0].len * self.axes[1].len;
        let signal = mean_square_of_source(self.src, self.src_dtype);
        let snr = 10f64.powf(spec.snr_db / 10.0);
        let pairs = self.pattern.read_blocks / 2;
        let mut sigma = Vec::with_capacity(self.pattern.write_blocks * pairs);
        for bw in 0..self.pattern.write_blocks {
            let target = signal * self.pattern.row_power(bw) / snr;
            for pair in 0..pairs {
                let key = block_key(spec.noise_key, bw, pair);
                let drawn = mean_square_of_noise(key, numel);
                sigma.push(if drawn > 0.0 {
                    (target / drawn).sqrt()
                } else {
                    0.0
                });
            }
        }
        Noise {
            key: spec.noise_key,
            pairs,
            sigma,
        }
    }

    /// Fills `out` with destination rows starting at `first_row` (`out.len()` must be a
    /// multiple of the destination row size). Rows are computed in parallel.
    pub fn fill_rows(&self, first_row: usize, out: &mut [u8]) {
        let row_bytes = self.dest_row_bytes();
        debug_assert_eq!(out.len() % row_bytes, 0);
        let rows_per_task = (256 * 1024 / row_bytes).max(1);
        out.par_chunks_mut(rows_per_task * row_bytes)
            .enumerate()
            .for_each(|(task, chunk)| {
                let mut src_row = vec![0f64; self.axes[1].len];
                let mut dst_row = vec![0f64; self.dest_shape()[1]];
                for (k, row_out) in chunk.chunks_exact_mut(row_bytes).enumerate() {
                    self.row(
                        first_row + task * rows_per_task + k,
                        &mut src_row,
                        &mut dst_row,
                    );
                    self.out_dtype.encode(&dst_row, row_out);
                }
            });
    }

    fn row(&self, row: usize, src_row: &mut [f64], dst_row: &mut [f64]) {
        let [a0, a1] = self.axes;
        let (b0, sr) = (row / a0.len, row % a0.len);
        let elem = self.src_dtype.size();
        let start = sr * a1.len * elem;
        self.src_dtype
            .decode(&self.src[start..start + a1.len * elem], src_row);
        for (b1, block) in dst_row.chunks_exact_mut(a1.len).enumerate() {
            let (bw, br) = if self.read_axis == 1 {
                (b0, b1)
            } else {
                (b1, b0)
            };
            let scale = self.pattern.scale(bw, br);
            for (d, s) in block.iter_mut().zip(src_row.iter()) {
                *d = s * scale;
            }
            let Some(noise) = &self.noise else { continue };
            let pair = br / 2;
            if pair >= noise.pairs {
                continue; // the odd last block of an odd copy count stays noise-free
            }
            let sigma = noise.sigma[bw * noise.pairs + pair];
            let signed = if br % 2 == 0 { sigma } else { -sigma };
            let key = block_key(noise.key, bw, pair);
            let base = (sr * a1.len) as u64;
            for (k, d) in block.iter_mut().enumerate() {
                *d += signed * gaussian(key, base + k as u64);
            }
        }
    }
}

/// mean(W^2) of a source tensor, summed in fixed-size chunks so the result does not depend
/// on thread scheduling (byte-identical output).
fn mean_square_of_source(src: &[u8], dtype: DType) -> f64 {
    const CHUNK: usize = 1 << 16;
    let n = src.len() / dtype.size();
    if n == 0 {
        return 0.0;
    }
    let partial: Vec<f64> = src
        .par_chunks(CHUNK * dtype.size())
        .map(|bytes| {
            let mut buf = vec![0f64; bytes.len() / dtype.size()];
            dtype.decode(bytes, &mut buf);
            buf.iter().map(|x| x * x).sum::<f64>()
        })
        .collect();
    partial.iter().sum::<f64>() / n as f64
}

fn mean_square_of_noise(key: u64, n: usize) -> f64 {
    const CHUNK: u64 = 1 << 16;
    if n == 0 {
        return 0.0;
    }
    let n = n as u64;
    let partial: Vec<f64> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            (c * CHUNK..((c + 1) * CHUNK).min(n))
                .map(|i| gaussian(key, i).powi(2))
                .sum::<f64>()
        })
        .collect();
    partial.iter().sum::<f64>() / n as f64
}

/// SplitMix64's finaliser: a bijective, well-mixed hash of a 64-bit counter.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A stable 64-bit key for a string (FNV-1a then mixed), used to give each tensor its
/// own noise stream independent of the order tensors are processed in.
pub fn name_key(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h ^ mix64(seed))
}

fn block_key(key: u64, bw: usize, pair: usize) -> u64 {
    mix64(key ^ mix64(((bw as u64) << 32) ^ pair as u64 ^ 0x9e37_79b9_7f4a_7c15))
}

/// A standard normal draw addressed by (key, index).
fn gaussian(key: u64, index: u64) -> f64 {
    const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
    let a = mix64(key.wrapping_add(index.wrapping_mul(2).wrapping_add(1).wrapping_mul(GOLDEN)));
    let b = mix64(key.wrapping_add(index.wrapping_mul(2).wrapping_add(2).wrapping_mul(GOLDEN)));
    // u1 in (0, 1] so ln(u1) is finite; u2 in [0, 1).
    let u1 = ((a >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64);
    let u2 = (b >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
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
        let spec = ExpansionSpec {
            variant,
            snr_db,
            noise_key: 7,
            out_dtype: dtype,
        };
        let e = Expansion::new(&src, dtype, axes, spec).unwrap();
        let shape = e.dest_shape();
        let mut out = vec![0u8; shape[0] * e.dest_row_bytes()];
        e.fill_rows(0, &mut out);
        (decode(&out, dtype), shape)
    }

    fn ax(len: usize, copies: usize, role: Role) -> AxisGrowth {
        AxisGrowth { len, copies, role }
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
        let spec = ExpansionSpec {
            variant: Variant::Noisy,
            snr_db: 10.0,
            noise_key: 3,
            out_dtype: DType::BF16,
        };
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
