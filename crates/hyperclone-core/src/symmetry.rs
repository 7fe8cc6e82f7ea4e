//! The paper's symmetry metric: how alike the copies inside a grown weight matrix still are.
//!
//! For every tensor that reads a grown space, each row (along the write axis) is cut into
//! its input-copy blocks and the cosine between block 0 and block 1 is averaged over rows:
//! 1 for a symmetric clone, ~(S-N)/(S+N) with noise (0.818 at 10 dB), 0 for a diagonal one.
//! Training without dropout or noise keeps it at exactly 1 (HYPERCLONING.md).

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::family::Role;

/// (tensor name, mean row-half cosine) for every tensor of `big` whose read axis is grown
/// relative to `small`.
pub fn row_half_cosines(big: &Checkpoint, small: &ModelConfig) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for t in &big.tensors {
        let axes = t.rule.axes;
        let Some(ra) = axes.iter().position(|a| a.1 == Role::Read) else {
            continue;
        };
        if axes.len() != 2 {
            continue;
        }
        let spaces = axes[ra].0;
        let (len_big, len_small) = (big.config.axis_len(spaces), small.axis_len(spaces));
        if len_small == 0 || len_big < 2 * len_small {
            continue;
        }
        let f = &big.files[t.file];
        let mut w = vec![0f64; t.info.numel()];
        t.info.dtype.decode(f.data(&t.info), &mut w);
        let (rows, cols) = (t.info.shape[0], t.info.shape[1]);
        out.push((
            t.info.name.clone(),
            row_half_cosine(&w, rows, cols, ra, len_small),
        ));
    }
    out
}

/// Mean cosine, over the rows of a [rows, cols] matrix, between the first two copies of
/// length `block` along the read axis `read_axis` (0 or 1). Rows where either copy is all
/// zero (the off-diagonal blocks of a diagonal clone) count as 0.
pub fn row_half_cosine(w: &[f64], rows: usize, cols: usize, read_axis: usize, block: usize) -> f64 {
    let at = |r: usize, c: usize| w[r * cols + c];
    let outer = if read_axis == 1 { rows } else { cols };
    let mut sum = 0.0;
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
        if n0 > 0.0 && n1 > 0.0 {
            sum += dot / (n0.sqrt() * n1.sqrt());
        }
    }
    sum / outer.max(1) as f64
}

/// Mean over tensors of [`row_half_cosines`]; `None` when nothing was grown.
pub fn mean_row_half_cosine(big: &Checkpoint, small: &ModelConfig) -> Option<f64> {
    let v = row_half_cosines(big, small);
    (!v.is_empty()).then(|| v.iter().map(|(_, c)| c).sum::<f64>() / v.len() as f64)
}

/// Copies of a space inside a clone grown by (n, m), read from the clone's own config: the
/// same rule `GrowthOptions::copies` applies when growing.
pub fn copies_in_clone(
    space: crate::family::Space,
    big: &ModelConfig,
    n: usize,
    m: usize,
) -> usize {
    use crate::family::Space::*;
    match space {
        Vocab | HeadDim | Positions => 1,
        Hidden | Heads | QkvPerHead => n,
        KvHeads if big.num_key_value_heads == 1 => 1,
        KvHeads => n,
        Ffn => m,
        EmbedProj if big.embed_proj_dim == big.hidden_size => n,
        EmbedProj => 1,
    }
}

/// Mean row-half cosine over the named matrices of a clone grown by (n, m), from values
/// in memory (training): `tensors` are (name, row-major values, shape).
pub fn mean_row_half_cosine_of(
    big: &ModelConfig,
    n: usize,
    m: usize,
    tensors: &[(String, Vec<f64>, Vec<usize>)],
) -> Option<f64> {
    let mut cos = Vec::new();
    for (name, w, shape) in tensors {
        let Some((rule, _)) = big.family.match_name(name) else {
            continue;
        };
        let Some(ra) = rule.axes.iter().position(|a| a.1 == Role::Read) else {
            continue;
        };
        if shape.len() != 2 || rule.axes[ra].0.len() != 1 {
            continue;
        }
        let copies = copies_in_clone(rule.axes[ra].0[0], big, n, m);
        if copies < 2 {
            continue;
        }
        cos.push(row_half_cosine(
            w,
            shape[0],
            shape[1],
            ra,
            shape[ra] / copies,
        ));
    }
    (!cos.is_empty()).then(|| cos.iter().sum::<f64>() / cos.len() as f64)
}
