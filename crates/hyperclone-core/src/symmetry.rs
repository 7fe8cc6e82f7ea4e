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
        let at = |r: usize, c: usize| w[r * cols + c];
        // Rows run along the write axis; the read axis is cut into copies of len_small.
        let outer = if ra == 1 { rows } else { cols };
        let mut sum = 0.0;
        for o in 0..outer {
            let (mut dot, mut n0, mut n1) = (0.0, 0.0, 0.0);
            for k in 0..len_small {
                let (a, b) = if ra == 1 {
                    (at(o, k), at(o, k + len_small))
                } else {
                    (at(k, o), at(k + len_small, o))
                };
                dot += a * b;
                n0 += a * a;
                n1 += b * b;
            }
            if n0 > 0.0 && n1 > 0.0 {
                sum += dot / (n0.sqrt() * n1.sqrt());
            }
        }
        out.push((t.info.name.clone(), sum / outer as f64));
    }
    out
}

/// Mean over tensors of [`row_half_cosines`]; `None` when nothing was grown.
pub fn mean_row_half_cosine(big: &Checkpoint, small: &ModelConfig) -> Option<f64> {
    let v = row_half_cosines(big, small);
    (!v.is_empty()).then(|| v.iter().map(|(_, c)| c).sum::<f64>() / v.len() as f64)
}
