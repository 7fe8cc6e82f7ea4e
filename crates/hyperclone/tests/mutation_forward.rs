//! The decoder's config switches under hostile values: a seeded, bounded set of config.json
//! mutations of a tiny Llama, each run through open -> Decoder::load -> forward in-process.
//! Every case must end in `Ok` or a clean `Err`, never a panic (issue 10: `forward` panicked
//! on configs that `clone` accepted).

use hyperclone_testkit::mutate::case_count;
use hyperclone_testkit::prelude as common;

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
        // Issue 18: switches transformers resolves per family and per layer index.
        "max_window_layers",
        "scale_attn_weights",
        "scale_attn_by_inverse_layer_idx",
        "reorder_and_upcast_attn",
        "use_bidirectional_attention",
        "hidden_activation",
        "activation_function",
        "use_parallel_residual",
        "qk_layernorm",
        "do_layer_norm_before",
        "_remove_final_layer_norm",
    ];
    // Mutated from the tiny Llama and from one committed fixture of each family whose
    // switches differ (their goldens pin the unmutated function).
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let bases: Vec<Option<std::path::PathBuf>> = vec![
        None,
        Some(fixtures.join("families/gpt2-mha")),
        Some(fixtures.join("families/gemma2-gqa")),
        Some(fixtures.join("families/opt-proj")),
        Some(fixtures.join("families/stablelm-gqa")),
        Some(fixtures.join("windows/qwen2-window-by-index")),
        Some(fixtures.join("windows/gpt2-layer-scale")),
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
    let cases = case_count("HYPERCLONE_MUTATION_CASES", 240);
    for case in 0..cases {
        let t = Tiny::default();
        let base = &bases[case % bases.len()];
        let mut cfg = match base {
            Some(b) => {
                serde_json::from_slice(&std::fs::read(b.join("config.json")).unwrap()).unwrap()
            }
            None => t.config(),
        };
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
        match base {
            Some(b) => {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::copy(b.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
                std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
            }
            None => {
                t.write_with(&dir, &cfg, &t.tensors());
            }
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| -> &'static str {
            let ckpt = match Checkpoint::open(&dir) {
                Ok(c) => c,
                Err(_) => return "open refused",
            };
            let model = match Decoder::load(&ckpt, DType::F32, &Device::Cpu) {
                Ok(m) => m,
                Err(_) => return "load refused",
            };
            // Longer than the fixtures' windows (4), so sliding layers differ from full ones.
            let ids =
                Tensor::from_vec((0..12u32).collect::<Vec<_>>(), (1, 12), &Device::Cpu).unwrap();
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

/// tokenizer.json files mutated in the fields the tokenizers library panics on (normalizer
/// patterns, BPE prefixes and suffixes, merges, added tokens), run through loading and
/// encoding as forward --text and generate do: `Ok` or a clean `Err`, never a panic.
#[test]
fn mutated_tokenizers_never_panic() {
    use hyperclone_nn::generate::{input_ids, Input};
    let assets =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/shakespeare-tiny");
    let base: Value =
        serde_json::from_slice(&std::fs::read(assets.join("tokenizer.json")).unwrap()).unwrap();
    let strings = ["", "##", "</w>", "\\", "(", "a", "\u{0}", "ĠĠĠĠĠĠĠĠ", "é"];
    let mut state = 0x7e57_u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    for case in 0..60 {
        let mut tok = base.clone();
        let pick = next() % 6;
        let s1 = strings[(case * 7 + pick) % strings.len()];
        let s2 = strings[next() % strings.len()];
        let id = next() % 5000;
        match pick {
            0 => {
                tok["normalizer"] =
                    json!({"type": "Replace", "pattern": {"String": s1}, "content": s2})
            }
            1 => {
                tok["normalizer"] =
                    json!({"type": "Replace", "pattern": {"Regex": s1}, "content": s2})
            }
            2 => tok["model"]["continuing_subword_prefix"] = json!(s1),
            3 => tok["model"]["end_of_word_suffix"] = json!(s1),
            4 => tok["model"]["merges"] = json!([format!("{s1} {s2}")]),
            _ => {
                tok["added_tokens"] = json!([{"id": id, "content": s1, "single_word": false,
                "lstrip": true, "rstrip": true, "normalized": true, "special": false}])
            }
        }
        std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
        let input = Input {
            text: Some(["ROMEO. But soft", "", "  ", "ééé##</w>"][case % 4].to_string()),
            ..Input::default()
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| match input_ids(&input, &dir, 5000) {
            Ok(_) => "encoded",
            Err(_) => "refused",
        }))
        .unwrap_or_else(|_| panic!("case {case} panicked: {tok}"));
        *outcomes.entry(outcome).or_default() += 1;
    }
    eprintln!("60 tokenizer mutations: {outcomes:?}");
    assert!(outcomes.contains_key("encoded") && outcomes.contains_key("refused"));
}
