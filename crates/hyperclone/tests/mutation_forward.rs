//! The decoder's config switches under hostile values: a seeded, bounded set of config.json
//! mutations of a tiny Llama, each run through open -> Decoder::load -> forward in-process.
//! Every case must end in `Ok` or a clean `Err`, never a panic (issue 10: `forward` panicked
//! on configs that `clone` accepted).

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use hyperclone_core::Checkpoint;
use hyperclone_nn::Decoder;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

fn hostile(k: u64) -> Value {
    match k % 20 {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(0.5),
        3 => json!(1e308),
        4 => json!(-1e308),
        5 => json!("x"),
        6 => Value::Null,
        7 => json!(true),
        8 => json!([]),
        9 => json!({}),
        10 => json!(u64::MAX),
        11 => json!(1),
        12 => json!(2),
        13 => json!(0.3),
        14 => json!(1e-30),
        15 => {
            json!({"rope_type": "llama3", "factor": 0, "low_freq_factor": 1, "high_freq_factor": 1, "original_max_position_embeddings": 0})
        }
        16 => json!({"rope_type": "yarn"}),
        17 => json!(["sliding_attention"]),
        18 => json!(3),
        _ => json!(-0.0),
    }
}

#[test]
fn mutated_decoder_configs_never_panic() {
    let keys = [
        "rope_theta",
        "rms_norm_eps",
        "partial_rotary_factor",
        "sliding_window",
        "use_sliding_window",
        "layer_types",
        "rope_scaling",
        "rope_parameters",
        "hidden_act",
        "query_pre_attn_scalar",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "max_position_embeddings",
        "eos_token_id",
    ];
    let mut state = 0x0f0f_u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        state >> 33
    };
    let root = tempfile::tempdir().unwrap();
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    let cases: usize = std::env::var("HYPERCLONE_MUTATION_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(240);
    for case in 0..cases {
        let t = Tiny::default();
        let mut cfg = t.config();
        let mut what = Vec::new();
        for _ in 0..1 + next() % 2 {
            let key = keys[(next() % keys.len() as u64) as usize];
            let mut v = hostile(next());
            if key == "hidden_act" && v.is_number() {
                v = json!(["gelu", "relu", "gelu_pytorch_tanh", "tanh", ""][(next() % 5) as usize]);
            }
            what.push(format!("{key} = {v}"));
            cfg[key] = v;
        }
        let dir = root.path().join(format!("c{case}"));
        t.write_with(&dir, &cfg, &t.tensors());
        let outcome = catch_unwind(AssertUnwindSafe(|| -> &'static str {
            let ckpt = match Checkpoint::open(&dir) {
                Ok(c) => c,
                Err(_) => return "open refused",
            };
            let model = match Decoder::load(&ckpt, DType::F32, &Device::Cpu) {
                Ok(m) => m,
                Err(_) => return "load refused",
            };
            let ids =
                Tensor::from_vec((0..8u32).collect::<Vec<_>>(), (1, 8), &Device::Cpu).unwrap();
            match model.forward(&ids) {
                Ok(_) => "ran",
                Err(_) => "forward refused",
            }
        }))
        .unwrap_or_else(|_| panic!("case {case} panicked: {what:?}"));
        *outcomes.entry(outcome).or_default() += 1;
        std::fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!("{cases} decoder config mutations: {outcomes:?}");
    assert!(outcomes.contains_key("ran"));
}
