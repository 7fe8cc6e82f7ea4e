//! Generation with a KV cache computes what a full forward over the whole sequence does:
//! the same greedy tokens, and logits equal to summation order, for every family fixture
//! (rotary and learned positions, partial rotary, q/k norms, sliding windows, softcaps,
//! parallel and post-norm blocks).

use candle_core::{DType, Device, Tensor};
use hyperclone_core::Checkpoint;
use hyperclone_nn::verify::argmax;
use hyperclone_nn::Decoder;
use std::path::PathBuf;

fn families() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/families");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("config.json").exists())
        .collect();
    v.sort();
    assert!(
        v.len() >= 10,
        "expected the family fixtures, found {}",
        v.len()
    );
    v
}

fn last_logits_full(model: &Decoder, ids: &[u32]) -> Vec<f64> {
    let input = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
    let logits = model.forward(&input).unwrap().logits.squeeze(0).unwrap();
    let last = logits.get(ids.len() - 1).unwrap();
    last.to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}

/// Greedy tokens both ways, and the largest logit difference between them.
fn greedy_both_ways(model: &Decoder, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<u32>, f64) {
    let (mut full, mut cached) = (prompt.to_vec(), prompt.to_vec());
    let mut cache = model.new_cache();
    let mut worst = 0f64;
    for _ in 0..steps {
        let a = last_logits_full(model, &full);
        let fresh = &cached[cache.len()..];
        let input = Tensor::from_vec(fresh.to_vec(), (1, fresh.len()), &Device::Cpu).unwrap();
        let b: Vec<f64> = model
            .forward_next(&input, &mut cache)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (x, y) in a.iter().zip(&b) {
            worst = worst.max((x - y).abs() / (1.0 + x.abs()));
        }
        full.push(argmax(&a) as u32);
        cached.push(argmax(&b) as u32);
        assert_eq!(cache.len(), cached.len() - 1);
    }
    (full, cached, worst)
}

#[test]
fn cached_generation_equals_full_recompute_on_every_family() {
    for dir in families() {
        let ckpt = Checkpoint::open(&dir).unwrap();
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let model = Decoder::load(&ckpt, dtype, &Device::Cpu).unwrap();
            let vocab = model.spec.vocab as u32;
            let prompt: Vec<u32> = (0..5u32).map(|i| (i * 7 + 3) % vocab).collect();
            let (full, cached, worst) = greedy_both_ways(&model, &prompt, 12);
            assert_eq!(full, cached, "{}: {dtype:?} tokens differ", dir.display());
            assert!(
                worst < tol,
                "{}: {dtype:?} logits differ by {worst}",
                dir.display()
            );
        }
    }
}
