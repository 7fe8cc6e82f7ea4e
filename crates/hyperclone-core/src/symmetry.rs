//! The paper's symmetry metric: how alike the copies inside a grown weight matrix still are.
//!
//! For every tensor that reads a grown space, each row (along the write axis) is cut into
//! its input-copy blocks and the cosine between block 0 and block 1 is averaged over rows:
//! 1 for a symmetric clone, ~(S-N)/(S+N) with noise (0.818 at 10 dB), 0 for a diagonal one.
//! Training without dropout or noise keeps it at exactly 1 (HYPERCLONING.md).

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::family::{Role, Space};
use crate::growth_map::RecordedGrowth;
use crate::kernel::Segment;

/// (tensor name, mean row-half cosine) for every tensor of `big` whose read axis holds at
/// least two whole copies, located by `big`'s recorded growth map (older clones: by
/// comparing its sizes with `small`'s).
pub fn row_half_cosines(big: &Checkpoint, small: &ModelConfig) -> Vec<(String, f64)> {
    row_half_cosines_in_chunks(big, small, COSINE_CHUNK_ELEMENTS)
}

/// [`row_half_cosines`] decoding about `chunk_elements` values at a time (whole rows, at
/// least one); tests split tiny tensors into many chunks.
fn row_half_cosines_in_chunks(
    big: &Checkpoint,
    small: &ModelConfig,
    chunk_elements: usize,
) -> Vec<(String, f64)> {
    let segments = match RecordedGrowth::of(big) {
        Some(r) => r.spaces,
        None => Space::ALL
            .iter()
            .map(|&s| {
                let (len, big_len) = (small.space_len(s), big.config.space_len(s));
                let copies = big_len.checked_div(len).unwrap_or(1);
                (s, Segment::tiled(len, copies))
            })
            .collect(),
    };
    let mut out = Vec::new();
    for t in &big.tensors {
        let Some((read_axis, block)) = grown_read_axis(t.rule, &t.info.shape, &segments) else {
            continue;
        };
        let f = &big.files[t.file];
        let (rows, cols) = (t.info.shape[0], t.info.shape[1]);
        let bytes = f.data(&t.info);
        let mut acc = Cosines::default();
        // Rows read their copies along axis 1: decode a bounded run of rows at a time, so a
        // 152k x 5120 head costs a few MiB here, not 6 GB of f64 (same sums, same order).
        // Along axis 0 a row's copies are far apart: decode the tensor whole.
        let step = if read_axis == 1 {
            (chunk_elements / cols.max(1)).max(1)
        } else {
            rows.max(1)
        };
        let row_bytes = cols * t.info.dtype.size();
        let mut w = Vec::new();
        for start in (0..rows).step_by(step) {
            let n = step.min(rows - start);
            w.resize(n * cols, 0f64);
            t.info
                .dtype
                .decode(&bytes[start * row_bytes..(start + n) * row_bytes], &mut w);
            acc.add(&w, n, cols, read_axis, block);
        }
        // Release the pages read: verify must not end up holding BIG's whole file.
        f.advise_done(&t.info);
        if let Some(c) = acc.mean() {
            out.push((t.info.name.clone(), c));
        }
    }
    out
}

/// Elements of a tensor decoded at once by [`row_half_cosines`] (32 MiB of f64).
const COSINE_CHUNK_ELEMENTS: usize = 4 << 20;

/// The read axis and the copy length of a tensor whose read axis is grown into two or more
/// whole copies; `None` otherwise.
fn grown_read_axis(
    rule: &crate::family::TensorRule,
    shape: &[usize],
    segments: &[(Space, Segment)],
) -> Option<(usize, usize)> {
    let ra = rule.axes.iter().position(|a| a.1 == Role::Read)?;
    if shape.len() != 2 || rule.axes[ra].0.len() != 1 {
        return None;
    }
    let space = rule.axes[ra].0[0];
    let seg = segments.iter().find(|(s, _)| *s == space)?.1;
    if seg.copies < 2 || seg.dest_len() != shape[ra] {
        return None;
    }
    Some((ra, seg.len))
}

/// Running sum of row cosines and the count of rows that have one (see [`row_half_cosine`]).
#[derive(Default)]
struct Cosines {
    sum: f64,
    counted: usize,
}

impl Cosines {
    fn add(&mut self, w: &[f64], rows: usize, cols: usize, read_axis: usize, block: usize) {
        let at = |r: usize, c: usize| w[r * cols + c];
        let outer = if read_axis == 1 { rows } else { cols };
        for o in 0..outer {
            let (mut dot, mut n0, mut n1) = (0.0, 0.0, 0.0);
            for k in 0..block {
                let (a, b) = if read_axis == 1 {
                    (at(o, k), at(o, k + block))
                } else {
                    (at(k, o), at(k + block, o))
                };
                dot += a * b;
                n0 += a * a;
                n1 += b * b;
            }
            if n0 > 0.0 || n1 > 0.0 {
                self.counted += 1;
            }
            if n0 > 0.0 && n1 > 0.0 {
                self.sum += dot / (n0.sqrt() * n1.sqrt());
            }
        }
    }

    fn mean(&self) -> Option<f64> {
        (self.counted > 0).then(|| self.sum / self.counted as f64)
    }
}

/// Mean cosine, over the rows of a [rows, cols] matrix, between the first two copies of
/// length `block` along the read axis `read_axis` (0 or 1). Rows where one copy is all zero
/// (the off-diagonal blocks of a diagonal clone) count as 0; rows where both are (an
/// inserted identity block's zeroed writers) are not counted, and a matrix of only such
/// rows has no cosine.
pub fn row_half_cosine(
    w: &[f64],
    rows: usize,
    cols: usize,
    read_axis: usize,
    block: usize,
) -> Option<f64> {
    let mut acc = Cosines::default();
    acc.add(w, rows, cols, read_axis, block);
    acc.mean()
}

/// Mean over tensors of [`row_half_cosines`]; `None` when nothing was grown.
pub fn mean_row_half_cosine(big: &Checkpoint, small: &ModelConfig) -> Option<f64> {
    let v = row_half_cosines(big, small);
    (!v.is_empty()).then(|| v.iter().map(|(_, c)| c).sum::<f64>() / v.len() as f64)
}

/// The segments of a clone grown by whole factors (n, m), from the clone's own config: for
/// checkpoints that record no growth map.
pub fn uniform_segments(big: &ModelConfig, n: usize, m: usize) -> Vec<(Space, Segment)> {
    // The rule the plan grew by; on the clone's config its MQA head and OPT projection
    // tests give the same answers as on the source's.
    let grown = crate::GrowthOptions {
        factor: n,
        ffn_factor: m,
        ..crate::GrowthOptions::default()
    };
    Space::ALL
        .iter()
        .map(|&space| {
            let copies = grown.copies(space, big);
            (
                space,
                Segment::tiled(big.space_len(space) / copies.max(1), copies),
            )
        })
        .collect()
}

/// Mean row-half cosine over the named matrices of a clone whose spaces grew as `segments`
/// (a recorded growth map's, or [`uniform_segments`]), from values in memory (training):
/// `tensors` are (name, row-major values, shape).
pub fn mean_row_half_cosine_with(
    big: &ModelConfig,
    segments: &[(Space, Segment)],
    tensors: &[(String, Vec<f64>, Vec<usize>)],
) -> Option<f64> {
    let cos: Vec<f64> = tensors
        .iter()
        .filter_map(|(name, w, shape)| {
            let (rule, _) = big.family.match_name(name)?;
            let (read_axis, block) = grown_read_axis(rule, shape, segments)?;
            row_half_cosine(w, shape[0], shape[1], read_axis, block)
        })
        .collect();
    (!cos.is_empty()).then(|| cos.iter().sum::<f64>() / cos.len() as f64)
}

/// [`mean_row_half_cosine_with`] for a clone grown by whole factors (n, m).
pub fn mean_row_half_cosine_of(
    big: &ModelConfig,
    n: usize,
    m: usize,
    tensors: &[(String, Vec<f64>, Vec<usize>)],
) -> Option<f64> {
    mean_row_half_cosine_with(big, &uniform_segments(big, n, m), tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_read_in_chunks_give_the_whole_tensors_cosines_bit_for_bit() {
        let fixtures =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny");
        let dir = tempfile::tempdir().unwrap();
        for (name, variant) in [
            ("llama-gqa-tied", crate::Variant::Noisy),
            ("llama-gqa-untied", crate::Variant::NoisyDiagonal),
        ] {
            let src = fixtures.join(name);
            let dst = dir.path().join(name);
            let options = crate::GrowthOptions {
                variant,
                ..crate::GrowthOptions::default()
            };
            crate::grow::grow_quietly(&src, &dst, &options).unwrap();
            let small = Checkpoint::open(&src).unwrap();
            let big = Checkpoint::open(&dst).unwrap();
            let whole = row_half_cosines_in_chunks(&big, &small.config, usize::MAX);
            assert!(whole.len() > 4, "{name}: grown tensors found: {whole:?}");
            for chunk in [1, 7, 100, 1000] {
                let chunked = row_half_cosines_in_chunks(&big, &small.config, chunk);
                assert_eq!(whole.len(), chunked.len());
                for ((n, a), (m, b)) in whole.iter().zip(&chunked) {
                    assert_eq!(n, m);
                    assert_eq!(a.to_bits(), b.to_bits(), "{name} {n}, chunk {chunk}");
                }
            }
        }
    }

    #[test]
    fn zero_rows_are_not_counted_and_one_sided_rows_are_zero() {
        // Rows of [copy 0 | copy 1] along the columns (read axis 1), block 2.
        let same = [1.0, 2.0, 1.0, 2.0];
        let diagonal = [1.0, 2.0, 0.0, 0.0];
        let zero = [0.0; 4];
        let w: Vec<f64> = [same, diagonal, zero].concat();
        let c = row_half_cosine(&w, 3, 4, 1, 2).unwrap();
        assert!((c - 0.5).abs() < 1e-15, "{c}");
        assert_eq!(row_half_cosine(&zero, 1, 4, 1, 2), None);
        // Read axis 0: the copies are stacked rows.
        let w = [1.0, 3.0, 2.0, 6.0];
        let c = row_half_cosine(&w, 2, 2, 0, 1).unwrap();
        assert!((c - 1.0).abs() < 1e-15, "{c}");
    }
}
