//! The Mixture-of-Experts families (mixtral, qwen2_moe, qwen3_moe, olmoe) through the CLI:
//! every clone verifies exactly in the Rust decoder (routing, Qwen2-MoE's shared expert and
//! OLMoE's clip_qkv included), and what is not implemented is refused in one line by name.

use hyperclone_testkit::cli::{
    every_variant_verifies_exactly, refused_after_config_edit, wide_ffn_deep_verifies_exactly,
};
use hyperclone_testkit::fixtures::family;
use serde_json::{json, Value};
use std::path::Path;

const MOE: [&str; 4] = [
    "mixtral-moe",
    "qwen2-moe-shared",
    "qwen3-moe-qknorm",
    "olmoe-clip",
];

fn config(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap()
}

#[test]
fn moe_family_clones_verify_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    for fx in MOE {
        let work = tmp.path().join(fx);
        for (dst, _) in every_variant_verifies_exactly(&family(fx), &work, &["--dtype", "f64"]) {
            let (src, big) = (config(&family(fx)), config(&dst));
            for key in ["num_experts_per_tok", "num_experts", "num_local_experts"] {
                assert_eq!(src.get(key), big.get(key), "{fx}: {key} is kept");
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
        let ffn = ["--intermediate-size", &target];
        wide_ffn_deep_verifies_exactly(&family(fx), &dst, &ffn, &["--dtype", "f64"]);
        let big = config(&dst);
        assert_eq!(big[ffn_key].as_u64().unwrap(), f * 5 / 2, "{fx}");
        // The shared expert grows by whole copies: floor(2.5) = 2.
        if let Some(s) = config(&family(fx))["shared_expert_intermediate_size"].as_u64() {
            assert_eq!(big["shared_expert_intermediate_size"], json!(2 * s));
        }
    }
}

/// The fixture FX refuses `forward` (or a x2 `clone`) once config.json's KEY is VALUE.
fn refused(work: &Path, fx: &str, key: &str, value: Value, clone: bool, expect: &str) {
    let args: &[&str] = if clone {
        &["clone", "SRC", "OUT", "--factor", "2"]
    } else {
        &["forward", "SRC", "--tokens", "1,2,3"]
    };
    refused_after_config_edit(&family(fx), work, args, key, value, expect);
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
        refused(&t.join(i.to_string()), fx, key, value, false, expect);
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
        refused(&t.join(format!("grow-{i}")), fx, key, value, true, expect);
    }
}
