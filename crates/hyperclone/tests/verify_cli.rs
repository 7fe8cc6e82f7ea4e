//! `hyperclone verify` passes every correct clone and catches the bugs that matter,
//! including ones an argmax check misses.

use hyperclone_testkit::cli::{
    bin, every_variant_verifies_exactly, one_error_line, refused_after_config_edit, verify_exact,
    verify_json, wide_ffn_deep_verifies_exactly,
};
use hyperclone_testkit::files::{edit_tensor, tensor_values};
use hyperclone_testkit::fixtures::{families, family, tiny as fixture};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn hc(args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn clone(src: &Path, dst: &Path, n: usize, variant: &str, dtype: &str) {
    let o = hc(&[
        "clone",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
        "--factor",
        &n.to_string(),
        "--variant",
        variant,
        "--dtype",
        dtype,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn verify(small: &Path, big: &Path) -> (bool, Value) {
    verify_json(small, big, &[])
}

#[test]
#[ignore = "slow lane: scripts/test-all.sh runs it (cargo test -- --include-ignored)"]
fn every_correct_clone_passes() {
    let tmp = tempfile::tempdir().unwrap();
    for fx in [
        "llama-mha-tied",
        "llama-gqa-untied",
        "llama-mqa-untied",
        "qwen2-gqa",
        "qwen3-gqa",
        "mistral-gqa",
    ] {
        // f64 storage: the clone is exact, so verify holds it to 1e-9.
        for (_, v) in every_variant_verifies_exactly(&fixture(fx), &tmp.path().join(fx), &[]) {
            assert_eq!(v["tolerance"].as_f64().unwrap(), 1e-9, "{fx}: {v}");
        }
    }
    // Stored in the source's f32, n = 3 rounds W/3: still within the f32 storage bound.
    let dst = tmp.path().join("f32-x3");
    clone(&fixture("llama-gqa-untied"), &dst, 3, "noisy", "keep");
    let (ok, v) = verify(&fixture("llama-gqa-untied"), &dst);
    assert!(ok, "{v}");
}

#[test]
fn head_scaled_by_an_extra_one_over_n_fails_on_the_std_ratio() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("big");
    clone(&fixture("llama-gqa-tied"), &dst, 2, "symmetric", "f64");
    edit_tensor(&dst, "lm_head.weight", |w, _| {
        w.iter_mut().for_each(|x| *x /= 2.0)
    });
    let (ok, v) = verify(&fixture("llama-gqa-tied"), &dst);
    assert!(!ok);
    assert_eq!(
        v["top1_agreement"].as_f64().unwrap(),
        1.0,
        "argmax cannot see this bug"
    );
    assert!((v["std_ratio"].as_f64().unwrap() - 0.5).abs() < 1e-9, "{v}");
    assert_eq!(
        v["first_divergence"],
        Value::Null,
        "states are fine; only the head is off"
    );
}

#[test]
fn an_exact_clone_of_a_model_with_constant_logits_passes() {
    // A zero head: every logit is 0 in both models, std 0 / 0. The same scale, not NaN.
    let tmp = tempfile::tempdir().unwrap();
    let small = tmp.path().join("small");
    std::fs::create_dir(&small).unwrap();
    for f in std::fs::read_dir(fixture("llama-gqa-untied")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, small.join(f.file_name().unwrap())).unwrap();
    }
    edit_tensor(&small, "lm_head.weight", |w, _| {
        w.iter_mut().for_each(|x| *x = 0.0)
    });
    let big = tmp.path().join("big");
    clone(&small, &big, 2, "symmetric", "f64");
    let (ok, v) = verify(&small, &big);
    assert!(ok, "{v}");
    assert_eq!(v["std_ratio"].as_f64(), Some(1.0), "{v}");
    // A clone whose head is not zero against that source still fails.
    edit_tensor(&big, "lm_head.weight", |w, _| {
        w.iter_mut().for_each(|x| *x = 0.5)
    });
    let (ok, v) = verify(&small, &big);
    assert!(!ok, "{v}");
}

/// A x2 f64 clone of SRC at DST passes verify untouched; once `plant` has planted a bug in
/// it, verify fails with the first divergence at `layer`.
fn planted_bug_fails_at(src: &Path, dst: &Path, variant: &str, layer: &str, plant: impl FnOnce()) {
    clone(src, dst, 2, variant, "f64");
    assert!(
        verify(src, dst).0,
        "{}: the untouched clone passes",
        dst.display()
    );
    plant();
    let (ok, v) = verify(src, dst);
    assert!(!ok, "{}: the planted bug must fail: {v}", dst.display());
    assert_eq!(v["first_divergence"], layer, "{}: {v}", dst.display());
}

#[test]
fn swapped_heads_in_q_proj_fail_at_that_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("big");
    let swap_heads = || {
        edit_tensor(
            &dst,
            "model.layers.1.self_attn.q_proj.weight",
            |w, shape| {
                let (cols, hd) = (shape[1], 8);
                // Swap query heads 0 and 1 (rows 0..8 and 8..16).
                for r in 0..hd {
                    for c in 0..cols {
                        w.swap(r * cols + c, (r + hd) * cols + c);
                    }
                }
            },
        )
    };
    let src = fixture("llama-mha-untied");
    planted_bug_fails_at(&src, &dst, "symmetric", "layer 1", swap_heads);
}

#[test]
fn a_tensor_from_another_layer_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("big");
    let copy_layer_0 = || {
        let (donor, _) = tensor_values(&dst, "model.layers.0.mlp.down_proj.weight");
        edit_tensor(&dst, "model.layers.1.mlp.down_proj.weight", |w, _| {
            w.copy_from_slice(&donor)
        })
    };
    planted_bug_fails_at(
        &fixture("qwen2-gqa"),
        &dst,
        "noisy",
        "layer 1",
        copy_layer_0,
    );
}

#[test]
fn clone_verify_keeps_a_correct_clone() {
    // (A failing check removing everything is tested in bad_input.rs.)
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("ok");
    let o = hc(&[
        "clone",
        fixture("qwen3-mqa-tied").to_str().unwrap(),
        dst.to_str().unwrap(),
        "--factor",
        "2",
        "--verify",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(dst.join("model.safetensors").exists());
}

#[test]
#[ignore = "slow lane: scripts/test-all.sh runs it (cargo test -- --include-ignored)"]
fn every_family_clone_verifies_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    for (fx, _) in families() {
        every_variant_verifies_exactly(&family(&fx), &tmp.path().join(&fx), &[]);
    }
}

/// Replaces a fused tensor of a x2 symmetric clone by the naive flat tile of the source's
/// (tiling the whole fused axis as one block, the mistake HYPERCLONING.md warns about).
fn flat_tile_fused(src: &Path, dst: &Path, name: &str) {
    let (w, shape) = tensor_values(src, name);
    let (rows, cols) = (shape[0], shape[1]);
    edit_tensor(dst, name, |d, shape| {
        assert_eq!(shape, [2 * rows, 2 * cols]);
        for r in 0..2 * rows {
            for c in 0..2 * cols {
                // The read axis (the other one) is divided by its 2 copies.
                d[r * 2 * cols + c] = w[(r % rows) * cols + c % cols] / 2.0;
            }
        }
    });
}

#[test]
fn a_fused_layout_tiled_as_one_block_fails() {
    let tmp = tempfile::tempdir().unwrap();
    for (fx, name) in [
        ("phi3-gqa", "model.layers.0.self_attn.qkv_proj.weight"),
        ("phi3-gqa", "model.layers.0.mlp.gate_up_proj.weight"),
        ("gpt2-mha", "transformer.h.0.attn.c_attn.weight"),
    ] {
        let dst = tmp.path().join(format!("{fx}-{}", name.replace('.', "-")));
        let flat_tile = || flat_tile_fused(&family(fx), &dst, name);
        planted_bug_fails_at(&family(fx), &dst, "symmetric", "layer 0", flat_tile);
    }
}

/// The dense families of 2026 (issue 19): every variant, n = 2 and 3, stored in f64, then an
/// FFN factor != n with depth growth in one clone; the Rust decoder must find them exact.
const DENSE_2026: [&str; 5] = [
    "smollm3-nope",
    "granite-gqa",
    "olmo3-sliding",
    "gemma3-text",
    "gemma3-linear-rope",
];

#[test]
fn dense_2026_family_clones_verify_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    for fx in DENSE_2026 {
        every_variant_verifies_exactly(&family(fx), &tmp.path().join(fx), &[]);
        // Width, FFN and depth at once: per-layer lists (layer_types, no_rope_layers) follow
        // each source layer to its new index.
        let dst = tmp.path().join(format!("{fx}-grown"));
        wide_ffn_deep_verifies_exactly(&family(fx), &dst, &["--ffn-factor", "3"], &[]);
    }
}

/// Layouts the 2026 dense families derive from the layer index when config.json does not
/// list them (tests/fixtures/make_window_fixtures.py): width growth keeps them exactly; depth
/// growth would move layers to indices with another layout, so it is refused, naming the key.
#[test]
fn dense_2026_index_derived_layouts_grow_wide_and_refuse_depth() {
    let tmp = tempfile::tempdir().unwrap();
    for (fx, key) in [
        ("gemma3-window-by-index", "`layer_types`"),
        ("olmo3-window-by-index", "`layer_types`"),
        ("smollm3-nope-by-index", "`no_rope_layers`"),
    ] {
        let src = hyperclone_testkit::fixtures::root()
            .join("windows")
            .join(fx);
        let dst = tmp.path().join(fx);
        clone(&src, &dst, 2, "noisy", "f64");
        verify_exact(&src, &dst, &[], fx);
        let deep = tmp.path().join(format!("{fx}-deep"));
        let o = hc(&[
            "clone",
            src.to_str().unwrap(),
            deep.to_str().unwrap(),
            "--factor",
            "2",
            "--depth-factor",
            "2",
        ]);
        let err = one_error_line(&o);
        assert!(
            err.contains(key),
            "{fx}: depth growth must be refused: {err}"
        );
        assert!(!deep.exists(), "{fx}: nothing written");
    }
}

/// Switches of the 2026 dense families the Rust decoder does not implement, or values that
/// are not a model: `forward` refuses each in one error line naming the key (a clean forward
/// of the untouched fixture first, so the refusal is the edit's).
#[test]
fn dense_2026_unimplemented_switches_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, Value, &str); 9] = [
        (
            "gemma3-text",
            "use_bidirectional_attention",
            serde_json::json!(true),
            "use_bidirectional_attention",
        ),
        (
            "gemma3-text",
            "rope_parameters",
            serde_json::json!({"sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                   "full_attention": {"rope_type": "default", "rope_theta": 1e6}}),
            "rope_type `linear`",
        ),
        (
            "gemma3-text",
            "final_logit_softcapping",
            serde_json::json!(0.0),
            "final_logit_softcapping",
        ),
        (
            "smollm3-nope",
            "no_rope_layers",
            serde_json::json!([1]),
            "no_rope_layers",
        ),
        (
            "smollm3-nope",
            "no_rope_layers",
            serde_json::json!([1, 2]),
            "no_rope_layers",
        ),
        (
            "granite-gqa",
            "logits_scaling",
            serde_json::json!(0.0),
            "logits_scaling",
        ),
        (
            "granite-gqa",
            "attention_multiplier",
            serde_json::json!("x"),
            "attention_multiplier",
        ),
        (
            "granite-gqa",
            "residual_multiplier",
            Value::Null,
            "residual_multiplier",
        ),
        (
            "granite-gqa",
            "embedding_multiplier",
            serde_json::json!([1.0]),
            "embedding_multiplier",
        ),
    ];
    for (i, (fx, key, value, expect)) in cases.into_iter().enumerate() {
        let work = tmp.path().join(format!("{i}-{fx}"));
        let forward = ["forward", "SRC", "--tokens", "1,2,3"];
        refused_after_config_edit(&family(fx), &work, &forward, key, value, expect);
    }
}
