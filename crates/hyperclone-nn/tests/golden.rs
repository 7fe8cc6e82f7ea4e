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

fn read_ids(path: &PathBuf, name: &str) -> Vec<u32> {
    raw(path, name)
        .0
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()))
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// golden64.safetensors: transformers patched to compute RMSNorm, rotary tables and the
/// softmax in float64 too (tests/fixtures/exact_goldens.py), for T = 1, 7 and 23 tokens.
/// Our f64 decoder must agree to rounding: 1e-9 of the logit scale; f32 to 1e-4.
#[test]
fn logits_and_states_match_exact_f64_transformers_for_several_lengths() {
    for dir in fixtures() {
        let ckpt = Checkpoint::open(&dir).unwrap();
        let golden = dir.join("golden64.safetensors");
        for (dtype, tol) in [(DType::F64, 1e-9), (DType::F32, 1e-4)] {
            let model = Decoder::load(&ckpt, dtype, &Device::Cpu).unwrap();
            for t in [1, 7, 23] {
                let ids = read_ids(&golden, &format!("input_ids_T{t}"));
                let (logits, _) = read_f64(&golden, &format!("logits_T{t}"));
                let (hidden, hshape) = read_f64(&golden, &format!("hidden_states_T{t}"));
                let input = Tensor::from_vec(ids.clone(), (1, t), &Device::Cpu).unwrap();
                let out = model.forward(&input).unwrap();
                let scale = logits.iter().fold(1f64, |m, x| m.max(x.abs()));
                let err = max_abs_diff(&flat(&out.logits), &logits);
                println!(
                    "{} T={t} {dtype:?}: max |logit diff| {err:.3e} ({:.3e} of scale)",
                    dir.display(),
                    err / scale
                );
                assert!(
                    err <= tol * scale,
                    "{}: T={t} {dtype:?} logits differ by {err}",
                    dir.display()
                );
                let per = hidden.len() / hshape[0];
                for i in 0..hshape[0] {
                    let mine = if i + 1 == hshape[0] {
                        &out.final_norm
                    } else {
                        &out.residual[i]
                    };
                    let want = &hidden[i * per..(i + 1) * per];
                    let s = want.iter().fold(1f64, |m, x| m.max(x.abs()));
                    let e = max_abs_diff(&flat(mine), want);
                    assert!(
                        e <= tol * s,
                        "{}: T={t} {dtype:?} hidden state {i} differs by {e}",
                        dir.display()
                    );
                }
            }
        }
    }
}

#[test]
fn logits_and_hidden_states_match_stock_transformers() {
    for dir in fixtures() {
        let ckpt = Checkpoint::open(&dir).unwrap();
        let golden_path = dir.join("golden.safetensors");
        let ids = read_ids(&golden_path, "input_ids");
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

/// Every other family (tests/fixtures/families, goldens from transformers patched to
/// exact float64 by make_family_fixtures.py): same bounds.
#[test]
fn other_families_match_exact_f64_transformers() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/families");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/fixtures/families exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("golden64.safetensors").exists())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 12,
        "expected the committed family fixtures, found {}",
        dirs.len()
    );
    for dir in dirs {
        let ckpt = Checkpoint::open(&dir).unwrap();
        let golden = dir.join("golden64.safetensors");
        let header_has = |name: &str| {
            let bytes = std::fs::read(&golden).unwrap();
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            serde_json::from_slice::<serde_json::Value>(&bytes[8..8 + n])
                .unwrap()
                .get(name)
                .is_some()
        };
        for (dtype, tol) in [(DType::F64, 1e-9), (DType::F32, 1e-4)] {
            let model = Decoder::load(&ckpt, dtype, &Device::Cpu)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            for t in [1, 7, 23] {
                let ids = read_ids(&golden, &format!("input_ids_T{t}"));
                let (logits, _) = read_f64(&golden, &format!("logits_T{t}"));
                let (hidden, hshape) = read_f64(&golden, &format!("hidden_states_T{t}"));
                let out = model
                    .forward(&Tensor::from_vec(ids, (1, t), &Device::Cpu).unwrap())
                    .unwrap();
                let scale = logits.iter().fold(1f64, |m, x| m.max(x.abs()));
                let err = max_abs_diff(&flat(&out.logits), &logits);
                println!(
                    "{} T={t} {dtype:?}: max |logit diff| {:.3e} of scale",
                    dir.display(),
                    err / scale
                );
                assert!(
                    err <= tol * scale,
                    "{}: T={t} {dtype:?} logits differ by {err}",
                    dir.display()
                );
                // OPT with project_out stores its 16-wide last state separately.
                let separate_last = header_has(&format!("hidden_states_last_T{t}"));
                let mut states: Vec<(Vec<f64>, Vec<f64>)> = Vec::new();
                let per = hidden.len() / hshape[0];
                for i in 0..hshape[0] {
                    let mine = if i + 1 == hshape[0] && !separate_last {
                        &out.final_norm
                    } else {
                        &out.residual[i]
                    };
                    states.push((flat(mine), hidden[i * per..(i + 1) * per].to_vec()));
                }
                if separate_last {
                    states.push((
                        flat(&out.final_norm),
                        read_f64(&golden, &format!("hidden_states_last_T{t}")).0,
                    ));
                    states.push((
                        flat(out.residual.last().unwrap()),
                        read_f64(&golden, &format!("pre_project_out_T{t}")).0,
                    ));
                }
                for (i, (mine, want)) in states.iter().enumerate() {
                    let s = want.iter().fold(1f64, |m, x| m.max(x.abs()));
                    let e = max_abs_diff(mine, want);
                    assert!(
                        e <= tol * s,
                        "{}: T={t} {dtype:?} hidden state {i} differs by {e}",
                        dir.display()
                    );
                }
            }
        }
    }
}
