//! The layer-streamed forward (what `verify` and `clone --verify` run) computes bit for bit
//! what the resident decoder computes, for every family, clone shape and working dtype, and
//! a broken layer is still named.

use candle_core::{DType, Device, Tensor};
use hyperclone_core::grow::grow_quietly;
use hyperclone_core::{Checkpoint, GrowthOptions, Variant};
use hyperclone_nn::check::{probe_tokens, run_verify};
use hyperclone_nn::stream::{forward_streamed, forward_streamed_in_chunks};
use hyperclone_nn::verify::{default_tolerance, verify_expecting, Expectation};
use hyperclone_nn::{Decoder, ForwardOutput};
use hyperclone_testkit::files::scale_tensor;
use hyperclone_testkit::fixtures::dirs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// Every committed fixture folder (the tiny Llama-likes and one per other family).
fn fixtures() -> Vec<PathBuf> {
    let mut v = dirs("tiny");
    v.extend(dirs("families"));
    assert!(
        v.len() >= 20,
        "expected the committed fixtures, found {}",
        v.len()
    );
    v
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

fn grow(src: &Path, dst: &Path, layers: Option<usize>) {
    let options = GrowthOptions {
        variant: Variant::Noisy,
        num_layers: layers,
        ..GrowthOptions::default()
    };
    grow_quietly(src, dst, &options).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
}

fn bits(t: &Tensor) -> Vec<u64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
        .into_iter()
        .map(f64::to_bits)
        .collect()
}

/// Panics at the first element whose bits differ (the vectors are too long to print).
fn assert_bits(a: &Tensor, b: &Tensor, what: &str) {
    let (a, b) = (bits(a), bits(b));
    assert_eq!(a.len(), b.len(), "{what}: sizes");
    if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
        panic!(
            "{what}: element {i} differs: {} vs {}",
            f64::from_bits(a[i]),
            f64::from_bits(b[i])
        );
    }
}

fn assert_same(a: &ForwardOutput, b: &ForwardOutput, what: &str) {
    assert_bits(&a.logits, &b.logits, &format!("{what}: logits"));
    assert_bits(&a.final_norm, &b.final_norm, &format!("{what}: final norm"));
    assert_eq!(a.residual.len(), b.residual.len(), "{what}: states");
    for (i, (x, y)) in a.residual.iter().zip(&b.residual).enumerate() {
        assert_bits(x, y, &format!("{what}: residual state {i}"));
    }
}

fn ids(ckpt: &Checkpoint) -> Tensor {
    let ids = probe_tokens(ckpt.config.vocab_size);
    let n = ids.len();
    Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap()
}

/// Resident and streamed forwards of `dir` agree bit for bit in `dtype`.
fn same_forward(dir: &Path, dtype: DType) {
    let ckpt = Checkpoint::open(dir).unwrap();
    let input = ids(&ckpt);
    let resident = Decoder::load(&ckpt, dtype, &Device::Cpu)
        .unwrap()
        .forward(&input)
        .unwrap();
    let streamed = forward_streamed(&ckpt, dtype, &Device::Cpu, None, &input).unwrap();
    assert_same(
        &resident,
        &streamed,
        &format!("{} {dtype:?}", dir.display()),
    );
}

/// The report `run_verify` gives (streamed) is the one the resident decoders give.
fn same_report(small: &Path, big: &Path, dtype: DType) {
    let v = run_verify(small, big, None, dtype).unwrap();
    let (s, b) = (
        Checkpoint::open(small).unwrap(),
        Checkpoint::open(big).unwrap(),
    );
    let coarsest = b
        .dtypes()
        .into_iter()
        .max_by_key(|d| std::cmp::Reverse(d.size()))
        .unwrap();
    let resident = verify_expecting(
        &Decoder::load(&s, dtype, &Device::Cpu).unwrap(),
        &Decoder::load(&b, dtype, &Device::Cpu).unwrap(),
        &probe_tokens(s.config.vocab_size),
        default_tolerance(dtype, coarsest),
        &Expectation::recorded(&b).unwrap(),
    )
    .unwrap();
    assert_eq!(
        format!("{:?}", v.report),
        format!("{resident:?}"),
        "{} -> {} in {dtype:?}",
        small.display(),
        big.display()
    );
    assert!(v.passed(), "{}: {}", big.display(), v.failure_reason());
}

#[test]
#[ignore = "slow lane: scripts/test-all.sh runs it (cargo test -- --include-ignored)"]
fn streamed_forward_and_report_equal_the_resident_ones_for_every_family() {
    let tmp = tempfile::tempdir().unwrap();
    for src in fixtures() {
        let wide = tmp.path().join(format!("{}-x2", name(&src)));
        grow(&src, &wide, None);
        let layers = Checkpoint::open(&src).unwrap().config.num_hidden_layers;
        // An uneven spread of identity blocks: the recorded layer map is exercised.
        let deep = tmp.path().join(format!("{}-x2-deep", name(&src)));
        let options = GrowthOptions {
            variant: Variant::Noisy,
            num_layers: Some(2 * layers + 1),
            ..GrowthOptions::default()
        };
        let mut dirs = vec![src.clone(), wide.clone()];
        match grow_quietly(&src, &deep, &options) {
            Ok(_) => dirs.push(deep.clone()),
            // Post-LN (OPT without do_layer_norm_before) has no identity block to insert.
            Err(e) => assert!(
                e.to_string().contains("do_layer_norm_before: false"),
                "{}: {e}",
                src.display()
            ),
        }
        for dtype in [DType::F64, DType::F32] {
            for dir in &dirs {
                same_forward(dir, dtype);
            }
            // bf16/f16 clones get a measured tolerance; their perturbed forwards are
            // compared below.
            let coarse = Checkpoint::open(&wide)
                .unwrap()
                .dtypes()
                .iter()
                .any(|d| d.size() == 2);
            if !coarse {
                for big in &dirs[1..] {
                    same_report(&src, big, dtype);
                }
            }
        }
    }
}

#[test]
fn a_perturbed_streamed_forward_equals_the_perturbed_resident_one() {
    // The rounding probe of bf16 clones streams SMALL with every weight rounded.
    let round = |v: &mut [f64]| {
        for x in v.iter_mut() {
            *x = (*x / 3.0) as f32 as f64 * 3.0;
        }
    };
    for src in fixtures() {
        let ckpt = Checkpoint::open(&src).unwrap();
        let input = ids(&ckpt);
        for dtype in [DType::F64, DType::F32] {
            let resident = Decoder::load_perturbed(&ckpt, dtype, &Device::Cpu, &round)
                .unwrap()
                .forward(&input)
                .unwrap();
            let streamed =
                forward_streamed(&ckpt, dtype, &Device::Cpu, Some(&round), &input).unwrap();
            assert_same(
                &resident,
                &streamed,
                &format!("{} {dtype:?}", src.display()),
            );
        }
    }
}

#[test]
fn a_broken_layer_is_named_by_the_streamed_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    // (fixture, depth of the clone, tensor of BIG's layer to break, the state named)
    let cases = [
        (
            "tiny/llama-gqa-untied",
            None,
            "model.layers.1.mlp.down_proj.weight",
            "layer 1",
        ),
        (
            "families/gpt2-mha",
            None,
            "transformer.h.1.attn.c_proj.weight",
            "layer 1",
        ),
        (
            "tiny/llama-gqa-untied",
            Some(4),
            "model.layers.2.self_attn.o_proj.weight",
            "layer 2 (= source layer 1)",
        ),
    ];
    for (fx, depth, tensor, state) in cases {
        let src = root.join(fx);
        let dst = tmp
            .path()
            .join(format!("{}-{}", name(&src), depth.unwrap_or(0)));
        grow(&src, &dst, depth);
        assert!(run_verify(&src, &dst, None, DType::F64).unwrap().passed());
        scale_tensor(&dst, tensor, 1.01);
        for dtype in [DType::F64, DType::F32] {
            let v = run_verify(&src, &dst, None, dtype).unwrap();
            assert!(!v.passed(), "{fx} {tensor}: {:?}", v.report);
            assert_eq!(
                v.report.first_divergence().map(|s| s.name.as_str()),
                Some(state),
                "{fx} {tensor} {dtype:?}: {:?}",
                v.report
            );
        }
    }
}

/// A random model whose head is worth splitting: 1000 vocabulary rows, and a width over
/// 512 so that gemm blocks the depth of each dot product.
fn wide_vocab_model(dir: &Path) -> Checkpoint {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let text = std::fs::read_to_string(root.join("tiny/llama-gqa-untied/config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (k, v) in [
        ("vocab_size", 1000),
        ("hidden_size", 576),
        ("head_dim", 144),
        ("intermediate_size", 64),
        ("num_hidden_layers", 1),
    ] {
        cfg[k] = v.into();
    }
    std::fs::create_dir_all(dir).unwrap();
    let config = dir.join("given.json");
    std::fs::write(&config, cfg.to_string()).unwrap();
    let out = dir.join("model");
    hyperclone_nn::init::write_random_checkpoint(&config, &out, 0.5, 7).unwrap();
    Checkpoint::open(&out).unwrap()
}

#[test]
fn a_head_read_in_chunks_gives_the_resident_logits_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = wide_vocab_model(tmp.path());
    let (vocab, width) = (ckpt.config.vocab_size, ckpt.config.hidden_size);
    let mut split = 0;
    for dtype in [DType::F64, DType::F32] {
        let resident = Decoder::load(&ckpt, dtype, &Device::Cpu).unwrap();
        // Every gemm regime of the tokens: a vector, the horizontal and the small kernels'
        // sizes, and beyond 64.
        for tokens in [1, 2, 3, 16, 40, 70] {
            let ids: Vec<u32> = (0..tokens as u64)
                .map(|i| ((i * 7919 + 13) % vocab as u64) as u32)
                .collect();
            let input = Tensor::from_vec(ids, (1, tokens), &Device::Cpu).unwrap();
            let whole = resident.forward(&input).unwrap();
            for rows in [1, 7, 65, 100, 333, vocab] {
                let chunks = hyperclone_nn::stream::head_chunks(tokens, vocab, rows);
                split += usize::from(chunks.len() > 1);
                let streamed = forward_streamed_in_chunks(
                    &ckpt,
                    dtype,
                    &Device::Cpu,
                    None,
                    &input,
                    rows * width,
                    &AtomicBool::new(false),
                )
                .unwrap();
                assert_same(
                    &whole,
                    &streamed,
                    &format!("{dtype:?}, {tokens} tokens, chunks {chunks:?}"),
                );
            }
        }
    }
    assert!(split > 20, "the head was split only {split} times");
}

#[test]
fn head_chunks_cover_the_vocabulary_in_order_and_never_run_small() {
    for tokens in [1, 2, 3, 16, 300] {
        for vocab in [1, 64, 129, 130, 1000, 49152, 151_936] {
            for rows in [1, 65, 7281, 200_000] {
                let chunks = hyperclone_nn::stream::head_chunks(tokens, vocab, rows);
                let mut next = 0;
                for &(start, len) in &chunks {
                    assert_eq!(start, next);
                    next += len;
                }
                assert_eq!(next, vocab, "{tokens} {vocab} {rows}: {chunks:?}");
                if chunks.len() > 1 {
                    let least = hyperclone_nn::stream::min_chunk_rows(tokens);
                    assert!(tokens >= 2);
                    assert!(chunks.iter().all(|c| c.1 >= least.max(rows.min(vocab / 2))));
                }
            }
        }
    }
}

/// A cancel flag set before (or while) a model streams stops it before its next layer: a
/// Ctrl-C during `clone --verify` of a large model is honoured within one layer.
#[test]
fn a_set_cancel_flag_stops_the_stream_before_the_next_layer() {
    let dir = &fixtures()[0];
    let ckpt = Checkpoint::open(dir).unwrap();
    let input = ids(&ckpt);
    let cancel = std::sync::atomic::AtomicBool::new(true);
    let err = hyperclone_nn::stream::forward_streamed_cancellable(
        &ckpt,
        DType::F64,
        &Device::Cpu,
        &input,
        &cancel,
    )
    .err()
    .expect("interrupted");
    assert!(err.to_string().contains("interrupted"), "{err}");
    cancel.store(false, std::sync::atomic::Ordering::Relaxed);
    let whole = hyperclone_nn::stream::forward_streamed_cancellable(
        &ckpt,
        DType::F64,
        &Device::Cpu,
        &input,
        &cancel,
    )
    .unwrap();
    let streamed = forward_streamed(&ckpt, DType::F64, &Device::Cpu, None, &input).unwrap();
    assert_same(&whole, &streamed, "cancellable, never cancelled");
}
