//! The Rust decoder against transformers' outputs for every tiny fixture.

use candle_core::{DType, Device, Tensor};
use hyperclone_core::Checkpoint;
use hyperclone_nn::Decoder;
use std::path::PathBuf;

fn fixtures() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/fixtures/tiny exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("golden.safetensors").exists())
        .collect();
    v.sort();
    assert!(
        v.len() >= 10,
        "expected the committed fixtures, found {}",
        v.len()
    );
    v
}

/// The golden file holds I64 ids, which the weight reader refuses by design, so it is read
/// here directly: (raw little-endian bytes, shape) of one tensor.
fn raw(path: &PathBuf, name: &str) -> (Vec<u8>, Vec<usize>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let e = &header[name];
    let off: Vec<usize> = e["data_offsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let shape = e["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    (bytes[8 + n + off[0]..8 + n + off[1]].to_vec(), shape)
}

fn read_f64(path: &PathBuf, name: &str) -> (Vec<f64>, Vec<usize>) {
    let (b, shape) = raw(path, name);
    (
        b.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        shape,
    )
}

fn read_ids(path: &PathBuf) -> Vec<u32> {
    raw(path, "input_ids")
        .0
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect()
}

#[test]
fn logits_and_hidden_states_match_transformers() {
    for dir in fixtures() {
        let ckpt = Checkpoint::open(&dir).unwrap();
        let golden_path = dir.join("golden.safetensors");
        let ids = read_ids(&golden_path);
        let (logits, _) = read_f64(&golden_path, "logits");
        let (hidden, hshape) = read_f64(&golden_path, "hidden_states");
        // These goldens come from stock transformers, whose float64 mode still computes
        // RMSNorm, rotary tables and the attention softmax in float32: they are exact to
        // ~1e-6 relative, hence 1e-5 here (f32: 1e-4). Exact-f64 goldens tighten this.
        for (dtype, tol) in [(DType::F64, 1e-5), (DType::F32, 1e-4)] {
            let model = Decoder::load(&ckpt, dtype, &Device::Cpu).unwrap();
            let input = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
            let out = model.forward(&input).unwrap();
            let got: Vec<f64> = out
                .logits
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let scale = logits.iter().fold(0f64, |m, x| m.max(x.abs()));
            let err = got
                .iter()
                .zip(&logits)
                .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
            println!(
                "{} {dtype:?}: max |logit diff| {err:.3e} (max |logit| {scale:.2})",
                dir.display()
            );
            assert!(
                err <= tol * scale.max(1.0),
                "{}: {dtype:?} logits differ by {err}",
                dir.display()
            );
            let n_states = hshape[0];
            let per = hidden.len() / n_states;
            for i in 0..n_states {
                let mine = if i + 1 == n_states {
                    &out.final_norm
                } else {
                    &out.residual[i]
                };
                let mine: Vec<f64> = mine
                    .to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let e = mine
                    .iter()
                    .zip(&hidden[i * per..(i + 1) * per])
                    .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    e <= tol * 10.0,
                    "{}: hidden state {i} differs by {e}",
                    dir.display()
                );
            }
        }
    }
}
