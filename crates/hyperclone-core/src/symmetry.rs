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
        let f = &big.files[t.file];
        let values = || {
            let mut w = vec![0f64; t.info.numel()];
            t.info.dtype.decode(f.data(&t.info), &mut w);
            // Release the pages read: verify must not end up holding BIG's whole file.
            f.advise_done(&t.info);
            w
        };
        if let Some(c) = tensor_cosine(t.rule, &t.info.shape, &segments, values) {
            out.push((t.info.name.clone(), c));
        }
    }
    out
}

/// The mean row-half cosine of one tensor, `None` when its read axis is not grown into two
/// or more whole copies (or every row is zero: an identity block's residual writers).
fn tensor_cosine(
    rule: &crate::family::TensorRule,
    shape: &[usize],
    segments: &[(Space, Segment)],
    values: impl FnOnce() -> Vec<f64>,
) -> Option<f64> {
    let ra = rule.axes.iter().position(|a| a.1 == Role::Read)?;
    if shape.len() != 2 || rule.axes[ra].0.len() != 1 {
        return None;
    }
    let space = rule.axes[ra].0[0];
    let seg = segments.iter().find(|(s, _)| *s == space)?.1;
    if seg.copies < 2 || seg.dest_len() != shape[ra] {
        return None;
    }
    row_half_cosine(&values(), shape[0], shape[1], ra, seg.len)
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
    let at = |r: usize, c: usize| w[r * cols + c];
    let outer = if read_axis == 1 { rows } else { cols };
    let (mut sum, mut counted) = (0.0, 0usize);
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
            counted += 1;
        }
        if n0 > 0.0 && n1 > 0.0 {
            sum += dot / (n0.sqrt() * n1.sqrt());
        }
    }
    (counted > 0).then(|| sum / counted as f64)
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
            tensor_cosine(rule, shape, segments, || w.clone())
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
