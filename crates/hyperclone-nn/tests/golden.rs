//! The Rust decoder against transformers' outputs for every tiny fixture.

use candle_core::{DType, Device, Tensor};
use hyperclone_core::Checkpoint;
use hyperclone_nn::Decoder;
use hyperclone_testkit::fixtures::dirs;
use std::path::{Path, PathBuf};

/// The committed fixture folders under tests/fixtures/SUB that hold GOLDEN.
fn fixture_dirs(sub: &str, golden: &str, at_least: usize) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = dirs(sub)
        .into_iter()
        .filter(|p| p.join(golden).exists())
        .collect();
    v.sort();
    assert!(
        v.len() >= at_least,
        "expected the committed fixtures in {sub}, found {}",
        v.len()
    );
    v
}

/// The golden file holds I64 ids, which the weight reader refuses by design, so it is read
/// here directly: (raw little-endian bytes, shape) of one tensor.
fn raw(path: &Path, name: &str) -> (Vec<u8>, Vec<usize>) {
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

fn read_f64(path: &Path, name: &str) -> (Vec<f64>, Vec<usize>) {
    let (b, shape) = raw(path, name);
    (
        b.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        shape,
    )
}

fn read_ids(path: &Path, name: &str) -> Vec<u32> {
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

/// golden64.safetensors: transformers patched to compute norms, rotary tables, softmax and
/// soft-capping in float64 too (tests/fixtures/exact_goldens.py and make_family_fixtures.py),
/// for T = 1, 7 and 23 tokens. Our f64 decoder must agree to rounding: 1e-9 of the logit
/// scale, and every hidden state likewise; f32 to 1e-4. The same bounds hold for the decoder
/// loaded for inference (`forward` and `generate`: weights packed for gemm's microkernels in
/// f32, the fused causal attention in both), whose sums run in another order.
fn check_exact_goldens(dir: &Path) {
    let ckpt = Checkpoint::open(dir).unwrap();
    let golden = dir.join("golden64.safetensors");
    let bytes = std::fs::read(&golden).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    for (dtype, tol, inference) in [
        (DType::F64, 1e-9, false),
        (DType::F32, 1e-4, false),
        (DType::F64, 1e-9, true),
        (DType::F32, 1e-4, true),
    ] {
        let model = if inference {
            Decoder::load_for_inference(&ckpt, dtype, &Device::Cpu)
        } else {
            Decoder::load(&ckpt, dtype, &Device::Cpu)
        }
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let dtype = format!("{dtype:?}{}", if inference { " (inference)" } else { "" });
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
                "{} T={t} {dtype}: max |logit diff| {:.3e} of scale",
                dir.display(),
                err / scale
            );
            assert!(
                err <= tol * scale,
                "{}: T={t} {dtype} logits differ by {err}",
                dir.display()
            );
            // OPT with project_out stores its narrower last state separately.
            let separate_last = header.get(format!("hidden_states_last_T{t}")).is_some();
            let per = hidden.len() / hshape[0];
            let mut states: Vec<(Vec<f64>, Vec<f64>)> = (0..hshape[0])
                .map(|i| {
                    let mine = if i + 1 == hshape[0] && !separate_last {
                        &out.final_norm
                    } else {
                        &out.residual[i]
                    };
                    (flat(mine), hidden[i * per..(i + 1) * per].to_vec())
                })
                .collect();
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
                    "{}: T={t} {dtype} hidden state {i} differs by {e}",
                    dir.display()
                );
            }
        }
    }
}

#[test]
fn llama_family_fixtures_match_exact_f64_transformers() {
    for dir in fixture_dirs("tiny", "golden64.safetensors", 10) {
        check_exact_goldens(&dir);
    }
}

#[test]
fn other_families_match_exact_f64_transformers() {
    for dir in fixture_dirs("families", "golden64.safetensors", 12) {
        check_exact_goldens(&dir);
    }
}

/// Layouts transformers derives from the layer index when config.json does not list them
/// (qwen2's max_window_layers, gemma2's alternation) and GPT-2's per-layer attention scale:
/// tests/fixtures/make_window_fixtures.py.
#[test]
fn index_derived_windows_and_scales_match_exact_f64_transformers() {
    for dir in fixture_dirs("windows", "golden64.safetensors", 3) {
        check_exact_goldens(&dir);
    }
}
