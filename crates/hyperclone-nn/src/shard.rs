//! Row shards: a batch cut into pieces that run forward (and backward) side by side, one
//! per thread. candle's kernels scale poorly across threads on the matrices of small models
//! and short batches (a training step of the study's model ran 1.04x faster on 2 threads
//! than on 1); whole shards on their own threads scale almost linearly (1.9x).

use crate::error::Result;
use rayon::prelude::*;
use std::ops::Range;

/// The row ranges a micro-batch of `batch` rows of `seq` tokens is cut into, each run
/// forward (and backward) on its own thread: shards of at least [`SHARD_TOKENS`] tokens,
/// at most [`MAX_SHARDS`], of equal size (the first ones one row longer where the batch
/// does not divide). The cut depends on the batch's shape alone, never on the thread
/// count, so a run's numbers are the same on every machine.
pub fn shards(batch: usize, seq: usize) -> Vec<Range<usize>> {
    let n = (batch.saturating_mul(seq) / SHARD_TOKENS).clamp(1, batch.clamp(1, MAX_SHARDS));
    let (base, extra) = (batch / n, batch % n);
    let mut start = 0;
    (0..n)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

/// Fewest tokens in a shard: below this, candle's per-op costs outweigh a second thread
/// (measured: 2 shards of 1024 tokens cost nothing on one thread, 8 of 256 cost 17%).
pub const SHARD_TOKENS: usize = 512;
/// Most shards of one micro-batch (threads beyond this share each shard's matmuls).
pub const MAX_SHARDS: usize = 8;

/// `f` over `items` in waves of one item per thread, each result handed to `take` in
/// `items`' order. A wave bounds memory to as many items' results as there are threads,
/// and a caller that sums in `take` gets the same numbers whatever the thread count.
pub fn in_waves<I: Sync, T: Send>(
    items: &[I],
    f: impl Fn(&I) -> Result<T> + Sync + Send,
    mut take: impl FnMut(&I, T) -> Result<()>,
) -> Result<()> {
    for wave in items.chunks(rayon::current_num_threads().max(1)) {
        let results = wave.par_iter().map(&f).collect::<Result<Vec<_>>>()?;
        for (item, r) in wave.iter().zip(results) {
            take(item, r)?;
        }
    }
    Ok(())
}

/// Runs `f` on a thread of rayon's pool (in place when the caller is one of its threads).
/// The kernels of a forward or a training step split their work with rayon; called from
/// outside the pool, each split hands its job over and puts the caller to sleep until it
/// is done: two thread switches for each of the ~300 splits of a SmolLM2 forward.
pub(crate) fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// candle's CPU kernels run element-wise ops on a pool of their own, one op at a time
/// (behind a lock): shards running side by side would queue on it. This turns that pool off
/// unless the user set `CANDLE_NUM_THREADS`; call it before the first candle op, while no
/// other thread exists. (On its own the pool gained nothing measurable: a 1x128 SmolLM2
/// forward took 0.335 s with it and 0.319 s without, 2 threads.)
pub fn prefer_shard_parallelism() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_batch_in_order_with_enough_tokens_each() {
        for batch in 0..40 {
            for seq in [1, 8, 64, 128, 512, 4096] {
                let cut = shards(batch, seq);
                assert!(!cut.is_empty() && cut.len() <= MAX_SHARDS);
                assert_eq!(cut[0].start, 0);
                assert_eq!(cut.last().unwrap().end, batch);
                for w in cut.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len() >= w[1].len() && w[0].len() <= w[1].len() + 1);
                }
                if cut.len() > 1 {
                    assert!(cut
                        .iter()
                        .all(|r| !r.is_empty() && r.len() * seq >= SHARD_TOKENS));
                }
            }
        }
        assert_eq!(shards(16, 128), vec![0..4, 4..8, 8..12, 12..16]);
        assert_eq!(shards(8, 128), vec![0..4, 4..8]);
        assert_eq!(shards(3, 512), vec![0..1, 1..2, 2..3]);
        assert_eq!(
            shards(64, 4096),
            (0..8).map(|i| i * 8..i * 8 + 8).collect::<Vec<_>>()
        );
        assert_eq!(shards(2, 8), vec![0..2]);
    }

    #[test]
    fn waves_keep_the_order_on_any_pool() {
        let items: Vec<usize> = (0..11).collect();
        for threads in [1, 2, 3, 8] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut out = Vec::new();
            pool.install(|| {
                in_waves(
                    &items,
                    |&i| Ok(i * i),
                    |&i, sq| {
                        out.push((i, sq));
                        Ok(())
                    },
                )
            })
            .unwrap();
            assert_eq!(out, items.iter().map(|&i| (i, i * i)).collect::<Vec<_>>());
        }
    }
}
