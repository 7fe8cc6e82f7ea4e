//! Batched forwards run as row shards side by side: each row's logits are the whole
//! batch's, on any thread count.

use candle_core::{DType, Device, Tensor};
use hyperclone_core::Checkpoint;
use hyperclone_nn::generate::sharded_logits;
use hyperclone_nn::shard::shards;
use hyperclone_nn::Decoder;
use hyperclone_testkit::fixtures;

#[test]
fn sharded_logits_are_the_whole_batch_logits() {
    let ckpt = Checkpoint::open(&fixtures::tiny("llama-gqa-untied")).unwrap();
    let model = Decoder::load(&ckpt, DType::F32, &Device::Cpu).unwrap();
    let (batch, positions) = (4, 256);
    assert_eq!(
        shards(batch, positions).len(),
        2,
        "the test must cut the batch"
    );
    let ids: Vec<u32> = (0..batch * positions)
        .map(|i| ((i * 37 + i / 7) % 96) as u32)
        .collect();
    let input = Tensor::from_vec(ids, (batch, positions), &Device::Cpu).unwrap();
    let whole = model.forward(&input).unwrap().logits;
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let sharded = pool.install(|| sharded_logits(&model, &input)).unwrap();
        assert_eq!(sharded.dims(), whole.dims());
        let (a, b): (Vec<f32>, Vec<f32>) = (
            whole.flatten_all().unwrap().to_vec1().unwrap(),
            sharded.flatten_all().unwrap().to_vec1().unwrap(),
        );
        // f32: a row's arithmetic does not depend on the other rows beyond the matmuls'
        // blocking; 1e-5 relative to the logit scale.
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            diff <= 1e-5 * scale,
            "{threads} threads: max diff {diff} (scale {scale})"
        );
        eprintln!("{threads} threads: max |diff| {diff:e} of scale {scale}");
    }
}
