//! Upcycling through the CLI: a dense llama grown into mixtral with every expert the grown
//! dense MLP (byte for byte) and a zero router, combined with width, FFN and depth growth;
//! `verify` PASS; parameter counts and the upcycle in `plan --json`, the recipe (replayed
//! byte for byte) and the card; Drop-Upcycling's seeded neurons; the one-line refusals.
//! Exactness in transformers is in tests/python/test_upcycle.py.

use hyperclone_testkit::fixtures::family;
use hyperclone_testkit::prelude as common;

use common::*;
use serde_json::Value;

const GROWTH: [&str; 6] = [
    "--factor",
    "2",
    "--num-hidden-layers",
    "3",
    "--intermediate-size",
    "60",
];

const MLP: [(&str, &str); 3] = [("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")];

#[test]
fn every_expert_is_the_grown_dense_mlp_and_verify_passes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    Tiny::default().write(&dir.join("src"));
    let mut dense = vec!["clone", "src", "dense"];
    dense.extend_from_slice(&GROWTH);
    assert!(run(&dense, dir).status.success());
    let mut moe = vec!["clone", "src", "moe", "--experts", "4"];
    moe.extend_from_slice(&GROWTH);
    let out = run(&moe, dir);
    assert!(out.status.success(), "{}", stderr(&out));
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(dir.join("moe/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "mixtral");
    assert_eq!(cfg["architectures"][0], "MixtralForCausalLM");
    assert_eq!(
        (
            cfg["num_local_experts"].as_u64(),
            cfg["num_experts_per_tok"].as_u64()
        ),
        (Some(4), Some(2))
    );
    assert_eq!(cfg["intermediate_size"], 60);
    assert_eq!(cfg["num_hidden_layers"], 3);
    // Layer 1 is the identity block inserted after source layer 0: its experts' w2 are zero.
    for l in 0..3 {
        let (router, shape) = tensor_values(
            &dir.join("moe"),
            &format!("model.layers.{l}.block_sparse_moe.gate.weight"),
        );
        assert_eq!(shape, [4, 32]);
        assert!(router.iter().all(|&x| x == 0.0), "the router is zero");
        for (dense_name, w) in MLP {
            let (want, want_shape) = tensor_values(
                &dir.join("dense"),
                &format!("model.layers.{l}.mlp.{dense_name}.weight"),
            );
            for e in 0..4 {
                let name = format!("model.layers.{l}.block_sparse_moe.experts.{e}.{w}.weight");
                let (got, shape) = tensor_values(&dir.join("moe"), &name);
                assert_eq!(shape, want_shape, "{name}");
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{name} is the dense clone's {dense_name}"
                );
            }
        }
    }
    let out = run(&["verify", "src", "moe", "--dtype", "f64"], dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("PASS"),
        "{text}{}",
        stderr(&out)
    );
    let card = std::fs::read_to_string(dir.join("moe/README.md")).unwrap();
    assert!(
        card.contains("upcycled to mixtral: 4 experts per layer, 2 per token"),
        "{card}"
    );
    assert!(
        card.contains("--experts 4 --experts-per-token 2 --expert-init copy --router-init zero"),
        "{card}"
    );
    assert!(card.contains("parameters: active per token"), "{card}");
}

#[test]
fn plan_counts_total_and_active_parameters_and_the_recipe_replays() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    Tiny::default().write(&dir.join("src"));
    let dense = plan_json(dir, &GROWTH);
    let mut args = vec!["--experts", "8", "--experts-per-token", "2"];
    args.extend_from_slice(&GROWTH);
    let p = plan_json(dir, &args);
    // Every expert has the dense MLP's size; a router has 8 x 32 weights per layer.
    let mlp = dense["params_after"]["mlp"].as_u64().unwrap();
    let routers = 3 * 8 * 32;
    assert_eq!(
        p["params_after"]["mlp"].as_u64().unwrap(),
        8 * mlp + routers
    );
    let total = dense["params_after"]["total"].as_u64().unwrap();
    assert_eq!(
        p["params_after"]["total"].as_u64().unwrap(),
        total + 7 * mlp + routers
    );
    assert_eq!(
        p["params_active_per_token"].as_u64().unwrap(),
        total + mlp + routers
    );
    assert_eq!(
        dense["params_active_per_token"],
        dense["params_after"]["total"]
    );
    let u = &p["growth_map"]["upcycle"];
    assert_eq!(
        (
            u["target"].as_str(),
            u["experts"].as_u64(),
            u["exact"].as_bool()
        ),
        (Some("mixtral"), Some(8), Some(true))
    );
    assert_eq!(p["growth_map"]["preserves_function"], true);
    let o = &p["recipe"]["options"];
    assert_eq!(
        (o["experts"].as_u64(), o["experts_per_token"].as_u64()),
        (Some(8), Some(2))
    );
    assert_eq!(
        (o["expert_init"].as_str(), o["router_init"].as_str()),
        (Some("copy"), Some("zero"))
    );
    assert!(
        dense["recipe"]["options"].get("experts").is_none(),
        "dense recipes are unchanged"
    );
    let changes: Vec<&str> = field_of_each(&p["config_changes"], "key")
        .map(|k| k.as_str().unwrap())
        .collect();
    assert!(
        changes.contains(&"model_type") && changes.contains(&"num_local_experts"),
        "{changes:?}"
    );
    // The write buffers do not grow with the expert count (experts stream from the one dense
    // tensor): only the headers, which list every tensor, do.
    let two = [
        "--factor",
        "2",
        "--experts",
        "2",
        "--num-hidden-layers",
        "3",
        "--intermediate-size",
        "60",
    ];
    let peak = |p: &Value| p["expected_peak_memory_bytes"].as_u64().unwrap();
    let p2 = plan_json(dir, &two);
    assert!(
        peak(&p) - peak(&p2) < 64 << 10,
        "{} vs {}",
        peak(&p),
        peak(&p2)
    );
    std::fs::write(dir.join("r.json"), p["recipe"].to_string()).unwrap();
    let mut flags = vec!["clone", "src", "flags"];
    flags.extend_from_slice(&args);
    assert!(run(&flags, dir).status.success());
    let out = run(&["clone", "src", "replayed", "--recipe", "r.json"], dir);
    assert!(out.status.success(), "{}", stderr(&out));
    let (a, b) = (
        snapshot(&dir.join("flags")),
        snapshot(&dir.join("replayed")),
    );
    for (name, bytes) in &a {
        if name.ends_with(".safetensors") {
            assert_eq!(Some(bytes), b.get(name), "{name}");
        }
    }
}

#[test]
fn drop_upcycling_redraws_the_same_seeded_neurons_of_each_expert() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    Tiny::default().write(&dir.join("src"));
    assert!(run(&["clone", "src", "dense", "--factor", "1"], dir)
        .status
        .success());
    let drop = [
        "--factor",
        "1",
        "--experts",
        "4",
        "--expert-init",
        "drop",
        "--drop-ratio",
        "0.25",
        "--router-init",
        "normal",
        "--seed",
        "5",
    ];
    let mut a = vec!["clone", "src", "moe"];
    a.extend_from_slice(&drop);
    let out = run(&a, dir);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut b = vec!["clone", "src", "again"];
    b.extend_from_slice(&drop);
    assert!(run(&b, dir).status.success());
    assert_eq!(
        snapshot(&dir.join("moe"))["model.safetensors"],
        snapshot(&dir.join("again"))["model.safetensors"],
        "seeded"
    );
    let ffn = FFN;
    let mut sets = Vec::new();
    for e in 0..4 {
        // Units (rows of w1 and w3, columns of w2) that differ from the dense MLP.
        let mut per_tensor = Vec::new();
        for (dense_name, w) in MLP {
            let (want, shape) = tensor_values(
                &dir.join("dense"),
                &format!("model.layers.0.mlp.{dense_name}.weight"),
            );
            let (got, _) = tensor_values(
                &dir.join("moe"),
                &format!("model.layers.0.block_sparse_moe.experts.{e}.{w}.weight"),
            );
            let cols = shape[1];
            let changed: Vec<bool> = (0..ffn)
                .map(|u| {
                    (0..if w == "w2" { shape[0] } else { cols }).any(|k| {
                        let i = if w == "w2" {
                            k * cols + u
                        } else {
                            u * cols + k
                        };
                        got[i] != want[i]
                    })
                })
                .collect();
            // A unit is re-drawn whole or kept whole.
            for u in 0..ffn {
                let n = if w == "w2" { shape[0] } else { cols };
                let same = (0..n).filter(|&k| {
                    let i = if w == "w2" {
                        k * cols + u
                    } else {
                        u * cols + k
                    };
                    got[i] == want[i]
                });
                assert!(
                    !changed[u] || same.count() == 0,
                    "{w} unit {u} partly re-drawn"
                );
            }
            per_tensor.push(changed);
        }
        assert!(
            per_tensor.iter().all(|c| *c == per_tensor[0]),
            "gate, up and down drop the same units"
        );
        assert_eq!(
            per_tensor[0].iter().filter(|&&c| c).count(),
            6,
            "round(0.25 x 24) units"
        );
        sets.push(per_tensor[0].clone());
    }
    assert!(sets.windows(2).any(|w| w[0] != w[1]), "experts differ");
    let (router, _) = tensor_values(
        &dir.join("moe"),
        "model.layers.0.block_sparse_moe.gate.weight",
    );
    assert!(
        router.iter().all(|&x| x != 0.0 && x.abs() < 0.2),
        "drawn at std 0.02"
    );
    let out = run(&["verify", "src", "moe", "--dtype", "f64"], dir);
    let e = one_error_line(&out);
    assert!(
        e.contains("do not preserve the function") && e.contains("Drop-Upcycling"),
        "{e}"
    );
    let card = std::fs::read_to_string(dir.join("moe/README.md")).unwrap();
    assert!(card.contains("NOT function-preserving"), "{card}");
    assert!(
        card.contains("--drop-ratio 0.25 --router-init normal --variant symmetric --seed 5"),
        "{card}"
    );
}

#[test]
fn what_cannot_be_upcycled_exactly_is_refused_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    Tiny::default().write(&dir.join("src"));
    let cases: &[(&[&str], &str)] = &[
        (
            &["--experts", "4", "--experts-per-token", "3"],
            "power of two",
        ),
        (
            &["--experts", "2", "--experts-per-token", "4"],
            "experts_per_token 4",
        ),
        (&["--experts", "0"], "experts 0"),
        (&["--experts", "5000"], "experts 5000"),
        (
            &["--experts", "4096", "--depth-factor", "20"],
            "163840 experts in 40 layers",
        ),
        (
            &["--experts", "4", "--expert-init", "drop"],
            "router_init normal",
        ),
        (
            &[
                "--experts",
                "4",
                "--expert-init",
                "drop",
                "--drop-ratio",
                "1.5",
                "--router-init",
                "normal",
            ],
            "drop_ratio 1.5",
        ),
        (&["--experts", "4", "--drop-ratio", "0.5"], "expert-init"),
        (&["--experts-per-token", "2"], "--experts"),
    ];
    for (flags, want) in cases {
        let mut a = vec!["--factor", "2"];
        a.extend_from_slice(flags);
        let out = clone_src_dst(dir, &a);
        let e = if out.status.code() == Some(2) {
            stderr(&out) // clap's usage error names the missing flag
        } else {
            one_error_line(&out)
        };
        assert!(e.contains(want), "{flags:?}: {e}");
        assert!(!dir.join("dst").exists());
    }
    // Switches Mixtral cannot express (mlp_bias, attention_bias) are refused by the unit
    // tests of core's upcycle.rs: a tiny folder with them would need their bias tensors.
    // Families without an exact sibling, and MoE sources.
    for (fixture, want) in [
        ("gemma-mqa", "cannot upcycle gemma"),
        ("mixtral-moe", "already a Mixture of Experts"),
    ] {
        let src = family(fixture);
        let out = run(
            &[
                "plan",
                src.to_str().unwrap(),
                "--factor",
                "2",
                "--experts",
                "4",
            ],
            dir,
        );
        let e = one_error_line(&out);
        assert!(e.contains(want), "{e}");
    }
}

#[test]
fn qwen_sources_become_their_moe_siblings_with_a_silent_shared_expert() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for (fixture, target, shared) in [
        ("qwen3-gqa", "qwen3_moe", false),
        ("qwen2-gqa", "qwen2_moe", true),
    ] {
        let src = hyperclone_testkit::fixtures::tiny(fixture);
        let src = src.to_str().unwrap();
        let (moe, dense) = (
            dir.join(format!("{fixture}-moe")),
            dir.join(format!("{fixture}-dense")),
        );
        let out = run(
            &[
                "clone",
                src,
                moe.to_str().unwrap(),
                "--factor",
                "2",
                "--experts",
                "4",
            ],
            dir,
        );
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(run(
            &["clone", src, dense.to_str().unwrap(), "--factor", "2"],
            dir
        )
        .status
        .success());
        let cfg: Value =
            serde_json::from_slice(&std::fs::read(moe.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["model_type"], target);
        // Without it the k weights 1/E would sum to k/E.
        assert_eq!(cfg["norm_topk_prob"], true);
        assert_eq!(cfg["moe_intermediate_size"], cfg["intermediate_size"]);
        for l in 0..2 {
            let (router, _) = tensor_values(&moe, &format!("model.layers.{l}.mlp.gate.weight"));
            assert!(router.iter().all(|&x| x == 0.0));
            for p in ["gate_proj", "up_proj", "down_proj"] {
                let (want, _) = tensor_values(&dense, &format!("model.layers.{l}.mlp.{p}.weight"));
                for e in 0..4 {
                    let (got, _) = tensor_values(
                        &moe,
                        &format!("model.layers.{l}.mlp.experts.{e}.{p}.weight"),
                    );
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{fixture} expert {e} {p}"
                    );
                }
                if shared {
                    let (got, _) = tensor_values(
                        &moe,
                        &format!("model.layers.{l}.mlp.shared_expert.{p}.weight"),
                    );
                    if p == "down_proj" {
                        assert!(
                            got.iter().all(|&x| x == 0.0),
                            "the shared expert adds nothing"
                        );
                    } else {
                        assert_eq!(got, want, "the shared expert starts from the dense {p}");
                    }
                }
            }
            if shared {
                let (gate, shape) = tensor_values(
                    &moe,
                    &format!("model.layers.{l}.mlp.shared_expert_gate.weight"),
                );
                assert_eq!(shape[0], 1);
                assert!(gate.iter().all(|&x| x == 0.0));
            }
        }
        let out = run(
            &["verify", src, moe.to_str().unwrap(), "--dtype", "f64"],
            dir,
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("PASS"),
            "{fixture}: {text}{}",
            stderr(&out)
        );
    }
}
