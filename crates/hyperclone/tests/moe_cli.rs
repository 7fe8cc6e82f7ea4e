//! The Mixture-of-Experts families (mixtral, qwen2_moe, qwen3_moe, olmoe) through the CLI:
//! every clone verifies exactly in the Rust decoder (routing, Qwen2-MoE's shared expert and
//! OLMoE's clip_qkv included), and what is not implemented is refused in one line by name.

use hyperclone_testkit::cli::{bin, verify_json};
use hyperclone_testkit::fixtures::family;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Output};

const MOE: [&str; 4] = [
    "mixtral-moe",
    "qwen2-moe-shared",
    "qwen3-moe-qknorm",
    "olmoe-clip",
];

fn hc(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn clone(src: &Path, dst: &Path, extra: &[&str]) {
    let mut args = vec!["clone", src.to_str().unwrap(), dst.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = hc(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `verify --dtype f64`: passed, and the max relative logit difference.
fn verify(small: &Path, big: &Path) -> (bool, f64) {
    let (ok, v) = verify_json(small, big, &["--dtype", "f64"]);
    (ok, v["max_rel_logit_diff"].as_f64().unwrap())
}

fn config(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap()
}

#[test]
fn moe_family_clones_verify_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    for fx in MOE {
        for n in ["2", "3"] {
            for variant in ["symmetric", "noisy", "diagonal", "noisy-diagonal"] {
                let dst = tmp.path().join(format!("{fx}-{n}-{variant}"));
                clone(
                    &family(fx),
                    &dst,
                    &["--factor", n, "--variant", variant, "--dtype", "f64"],
                );
                let (ok, rel) = verify(&family(fx), &dst);
                assert!(ok && rel <= 1e-9, "{fx} x{n} {variant}: {rel:e}");
                let (src, big) = (config(&family(fx)), config(&dst));
                for key in ["num_experts_per_tok", "num_experts", "num_local_experts"] {
                    assert_eq!(src.get(key), big.get(key), "{fx}: {key} is kept");
                }
            }
        }
        // Width x2, an FFN width that is not a multiple (Net2Net on the experts) and depth x2
        // in one clone.
        let ffn_key = if config(&family(fx)).get("moe_intermediate_size").is_some() {
            "moe_intermediate_size"
        } else {
            "intermediate_size"
        };
        let f = config(&family(fx))[ffn_key].as_u64().unwrap();
        let target = (f * 5 / 2).to_string();
        let dst = tmp.path().join(format!("{fx}-grown"));
        clone(
            &family(fx),
            &dst,
            &[
                "--factor",
                "2",
                "--intermediate-size",
                &target,
                "--depth-factor",
                "2",
                "--variant",
                "noisy",
                "--dtype",
                "f64",
            ],
        );
        let (ok, rel) = verify(&family(fx), &dst);
        assert!(ok && rel <= 1e-9, "{fx} x2 ffn {target} depth x2: {rel:e}");
        let big = config(&dst);
        assert_eq!(big[ffn_key].as_u64().unwrap(), f * 5 / 2, "{fx}");
        // The shared expert grows by whole copies: floor(2.5) = 2.
        if let Some(s) = config(&family(fx))["shared_expert_intermediate_size"].as_u64() {
            assert_eq!(big["shared_expert_intermediate_size"], json!(2 * s));
        }
    }
}

/// Edits config.json of a copy of FX and expects COMMAND to fail with one error line that
/// contains EXPECT (a clean run of the untouched copy first, so the refusal is the edit's).
fn refused(tmp: &Path, i: usize, fx: &str, key: &str, value: Value, clone: bool, expect: &str) {
    let dir = tmp.join(format!("{i}-{fx}"));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(family(fx).join(f), dir.join(f)).unwrap();
    }
    let d = dir.to_str().unwrap();
    let out = tmp.join(format!("{i}-out"));
    let run = || {
        if clone {
            hc(&["clone", d, out.to_str().unwrap(), "--factor", "2"])
        } else {
            hc(&["forward", d, "--tokens", "1,2,3"])
        }
    };
    let ok = run();
    assert!(
        ok.status.success(),
        "{fx}: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let _ = std::fs::remove_dir_all(&out);
    let mut cfg = config(&dir);
    cfg[key] = value;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&cfg).unwrap(),
    )
    .unwrap();
    let o = run();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{fx} {key}: must be refused");
    assert!(err.contains(expect), "{fx} {key}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{fx} {key}: one line: {err}");
    assert!(!out.exists(), "{fx} {key}: nothing written");
}

#[test]
fn moe_unimplemented_switches_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // The Rust decoder: Qwen-MoE's sliding attention, bad clip_qkv and norm_topk_prob values.
    let forward: [(&str, &str, Value, &str); 6] = [
        (
            "qwen2-moe-shared",
            "use_sliding_window",
            json!(true),
            "use_sliding_window",
        ),
        (
            "qwen3-moe-qknorm",
            "use_sliding_window",
            json!(true),
            "use_sliding_window",
        ),
        (
            "qwen2-moe-shared",
            "layer_types",
            json!(["sliding_attention", "full_attention"]),
            "layer_types",
        ),
        ("olmoe-clip", "clip_qkv", json!(-1.0), "clip_qkv"),
        ("olmoe-clip", "clip_qkv", json!("big"), "clip_qkv"),
        (
            "qwen3-moe-qknorm",
            "norm_topk_prob",
            json!("yes"),
            "norm_topk_prob",
        ),
    ];
    for (i, (fx, key, value, expect)) in forward.into_iter().enumerate() {
        refused(t, i, fx, key, value, false, expect);
    }
    // Growth: dense layers among the experts have tensors no rule describes.
    let grow: [(&str, &str, Value, &str); 3] = [
        (
            "qwen2-moe-shared",
            "decoder_sparse_step",
            json!(2),
            "decoder_sparse_step",
        ),
        (
            "qwen3-moe-qknorm",
            "mlp_only_layers",
            json!([0]),
            "mlp_only_layers",
        ),
        ("qwen2-moe-shared", "qkv_bias", json!(false), "qkv_bias"),
    ];
    for (i, (fx, key, value, expect)) in grow.into_iter().enumerate() {
        refused(t, 100 + i, fx, key, value, true, expect);
    }
}
