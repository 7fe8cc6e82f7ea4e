//! `hyperclone clone | plan | inspect` on synthetic checkpoints: output layout, config,
//! shards, provenance, determinism and the parameter-count formula of HYPERCLONING.md.

use hyperclone_testkit::prelude as common;

use common::*;
use hyperclone_core::{Checkpoint, DType};
use serde_json::Value;
use std::path::Path;

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

#[test]
fn clone_writes_a_complete_loadable_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let src = Tiny::default().write(&tmp.path().join("src"));
    let out = run(
        &["clone", "src", "dst", "--factor", "2", "--json"],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["factor"], 2);
    let dst = tmp.path().join("dst");
    assert_eq!(
        listing(&dst),
        [
            "README.md",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json"
        ]
    );
    assert_eq!(
        listing(tmp.path()),
        ["dst", "src"],
        "no temporary folder left behind"
    );
    let cfg = read_json(&dst.join("config.json"));
    assert_eq!(cfg["hidden_size"], 2 * HIDDEN);
    assert_eq!(cfg["intermediate_size"], 2 * FFN);
    assert_eq!(cfg["num_attention_heads"], 8);
    assert_eq!(cfg["num_key_value_heads"], 4);
    assert_eq!(cfg["tie_word_embeddings"], false);
    assert_eq!(
        cfg["some_unknown_key"],
        read_json(&src.join("config.json"))["some_unknown_key"]
    );
    assert_eq!(cfg["rope_theta"], 10000.0);
    let keys: Vec<&String> = cfg.as_object().unwrap().keys().collect();
    let src_keys: Vec<String> = read_json(&src.join("config.json"))
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(keys, src_keys.iter().collect::<Vec<_>>(), "key order kept");

    let grown = Checkpoint::open(&dst).unwrap();
    let small = Checkpoint::open(&src).unwrap();
    let meta = &grown.files[0].metadata;
    assert_eq!(meta["format"], "pt");
    assert_eq!(meta["hyperclone.variant"], "symmetric");
    assert_eq!(
        meta["hyperclone.source_headers_sha256"],
        small.headers_sha256()
    );
    assert_eq!(meta["hyperclone.source"], "src");
    assert_eq!(
        meta["hyperclone.command"],
        "hyperclone clone SRC DST --factor 2 --intermediate-size 48 --variant symmetric --dtype keep --shard-size 5000000000"
    );
    let card = std::fs::read_to_string(dst.join("README.md")).unwrap();
    assert!(
        card.contains(&small.config_sha256().unwrap())
            && card.contains("hyperclone clone SRC DST --factor 2")
    );
    // The tool is named, not linked to the paper as if the paper were the tool; the paper's
    // link is labelled as the paper.
    assert!(!card.contains("[hyperclone]("), "{card}");
    assert!(
        card.contains("grown with hyperclone ")
            && card.contains(
                "HyperCloning ([Samragh et al., 2024](https://arxiv.org/abs/2409.12903))"
            ),
        "{card}"
    );

    // o_proj: [hidden x2 (write), heads x2 (read)] = 1/2 [[W, W], [W, W]].
    let (w, _) = decoded(&small, "model.layers.1.self_attn.o_proj.weight");
    let (d, shape) = decoded(&grown, "model.layers.1.self_attn.o_proj.weight");
    assert_eq!(shape, [2 * HIDDEN, 2 * HIDDEN]);
    for r in 0..2 * HIDDEN {
        for c in 0..2 * HIDDEN {
            let expect = (w[(r % HIDDEN) * HIDDEN + c % HIDDEN] as f32 / 2.0) as f64;
            assert_eq!(d[r * 2 * HIDDEN + c], expect);
        }
    }
}

#[test]
fn tied_head_is_untied_with_one_over_n_columns() {
    let tmp = tempfile::tempdir().unwrap();
    let src = Tiny {
        tied: true,
        kv_heads: 1,
        ..Default::default()
    }
    .write(&tmp.path().join("src"));
    let out = run(&["clone", "src", "dst", "--factor", "3"], tmp.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let small = Checkpoint::open(&src).unwrap();
    let grown = Checkpoint::open(&tmp.path().join("dst")).unwrap();
    let (e, _) = decoded(&small, "model.embed_tokens.weight");
    let (ge, _) = decoded(&grown, "model.embed_tokens.weight");
    let (gh, shape) = decoded(&grown, "lm_head.weight");
    assert_eq!(shape, [VOCAB, 3 * HIDDEN]);
    for v in 0..VOCAB {
        for c in 0..3 * HIDDEN {
            let src = e[v * HIDDEN + c % HIDDEN];
            assert_eq!(ge[v * 3 * HIDDEN + c], src, "embedding: tiled, not divided");
            assert_eq!(
                gh[v * 3 * HIDDEN + c],
                (src as f32 / 3.0) as f64,
                "head: tiled / 3"
            );
        }
    }
    // MQA: the single kv head stays single; k_proj only reads 3 hidden copies.
    let cfg = read_json(&tmp.path().join("dst/config.json"));
    assert_eq!(cfg["num_key_value_heads"], 1);
    assert_eq!(
        decoded(&grown, "model.layers.0.self_attn.k_proj.weight").1,
        [HIDDEN / 4, 3 * HIDDEN]
    );
}

#[test]
fn sharded_in_sharded_out_with_index() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = Tiny {
        shards: 3,
        dtype: DType::BF16,
        ..Default::default()
    };
    let flags = ["--factor", "2", "--shard-size", "8KB", "--dtype", "f32"];
    tiny_cloned(&tiny, tmp.path(), &flags);
    let dst = tmp.path().join("dst");
    let index = read_json(&dst.join("model.safetensors.index.json"));
    let grown = Checkpoint::open(&dst).unwrap();
    assert!(grown.files.len() > 2, "8KB shards of a ~60KB model");
    let last = format!(
        "model-{:05}-of-{:05}.safetensors",
        grown.files.len(),
        grown.files.len()
    );
    assert!(dst.join(last).exists());
    assert_eq!(
        index["metadata"]["total_size"].as_u64().unwrap(),
        grown.bytes()
    );
    assert_eq!(grown.dtypes(), [DType::F32]);
    assert_eq!(
        read_json(&dst.join("config.json"))["torch_dtype"],
        "float32"
    );
}

#[test]
fn same_source_flags_and_seed_give_identical_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    for run_dir in ["a", "b"] {
        let d = tmp.path().join(run_dir);
        let flags = ["--factor", "2", "--variant", "noisy", "--seed", "7"];
        tiny_cloned(&Tiny::default(), &d, &flags);
    }
    let files = listing(&tmp.path().join("a/dst"));
    assert_eq!(files, listing(&tmp.path().join("b/dst")));
    for f in &files {
        let a = std::fs::read(tmp.path().join("a/dst").join(f)).unwrap();
        let b = std::fs::read(tmp.path().join("b/dst").join(f)).unwrap();
        assert!(a == b, "{f} differs between identical runs");
    }
    // A different seed gives different noise.
    let d = tmp.path().join("a");
    let out = run(
        &[
            "clone",
            "src",
            "dst2",
            "--factor",
            "2",
            "--variant",
            "noisy",
            "--seed",
            "8",
        ],
        &d,
    );
    assert!(out.status.success());
    let a = std::fs::read(d.join("dst/model.safetensors")).unwrap();
    let b = std::fs::read(d.join("dst2/model.safetensors")).unwrap();
    assert_ne!(a, b);
}

/// The output depends on the source's content and the options only: the same source under
/// another path (absolute, `./`, another working folder) and the same options spelled
/// differently give the same bytes, and no file holds a path of this machine.
#[test]
fn output_holds_no_local_path_and_does_not_depend_on_how_the_source_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let src = Tiny::default().write(&tmp.path().join("work/my-model"));
    let abs = src.display().to_string();
    let a = run(&["clone", &abs, "a", "--factor", "2"], tmp.path());
    assert!(a.status.success(), "{}", stderr(&a));
    let b = run(
        &[
            "clone",
            "./my-model/",
            "../b",
            "--factor=2",
            "--ffn-factor",
            "2",
            "--shard-size",
            "5000000000",
        ],
        &tmp.path().join("work"),
    );
    assert!(b.status.success(), "{}", stderr(&b));
    let files = listing(&tmp.path().join("a"));
    assert_eq!(files, listing(&tmp.path().join("b")));
    let root = tmp.path().canonicalize().unwrap().display().to_string();
    for f in &files {
        let x = std::fs::read(tmp.path().join("a").join(f)).unwrap();
        let y = std::fs::read(tmp.path().join("b").join(f)).unwrap();
        assert!(
            x == y,
            "{f} depends on how the source or the options were written"
        );
        let text = String::from_utf8_lossy(&x);
        assert!(
            !text.contains(&root) && !text.contains(tmp.path().to_str().unwrap()),
            "{f} holds a local path"
        );
    }
    let meta = &Checkpoint::open(&tmp.path().join("a")).unwrap().files[0].metadata;
    assert_eq!(meta["hyperclone.source"], "my-model");
}

/// Tokenizer settings, special tokens and chat templates travel with the clone, byte for
/// byte; the source's card does not (the clone gets its own, which keeps its metadata).
#[test]
fn companion_files_are_copied_and_the_card_keeps_the_source_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let src = Tiny::default().write(&tmp.path().join("src"));
    let companions = [
        (
            "tokenizer_config.json",
            "{\"chat_template\": \"{{ messages }}\"}",
        ),
        ("special_tokens_map.json", "{\"eos_token\": \"</s>\"}"),
        (
            "chat_template.jinja",
            "{% for m in messages %}{{ m.content }}{% endfor %}",
        ),
        ("chat_template.json", "{\"chat_template\": \"x\"}"),
        ("LICENSE", "Apache License 2.0"),
    ];
    for (name, text) in companions {
        std::fs::write(src.join(name), text).unwrap();
    }
    std::fs::write(
        src.join("README.md"),
        "---\nlicense: apache-2.0\nlanguage:\n- en\ntags:\n- text-generation\nbase_model: other/parent\n---\n# Source card\n",
    )
    .unwrap();
    std::fs::write(src.join("pytorch_model.bin"), b"not copied").unwrap();
    let out = run(&["clone", "src", "dst", "--factor", "2"], tmp.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let dst = tmp.path().join("dst");
    for (name, text) in companions {
        assert_eq!(
            std::fs::read_to_string(dst.join(name)).unwrap(),
            text,
            "{name}"
        );
    }
    assert!(!dst.join("pytorch_model.bin").exists());
    let card = std::fs::read_to_string(dst.join("README.md")).unwrap();
    assert!(
        card.starts_with(
            "---\nlibrary_name: transformers\nlicense: apache-2.0\nlanguage:\n- en\ntags:\n- text-generation\n\
             - hyperclone\n- hypercloning\nbase_model: src\nbase_model_relation: finetune\n---\n"
        ),
        "{card}"
    );
    assert!(!card.contains("# Source card") && !card.contains("other/parent"));
}

#[test]
fn plan_counts_parameters_by_the_formula_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    for (heads, kv, n, m) in [(4, 4, 2, 2), (4, 2, 3, 2), (4, 1, 2, 3)] {
        let dir = tmp.path().join(format!("src-{heads}-{kv}-{n}-{m}"));
        Tiny {
            heads,
            kv_heads: kv,
            tied: true,
            ..Default::default()
        }
        .write(&dir);
        let before = listing(tmp.path());
        let out = run(
            &[
                "plan",
                dir.to_str().unwrap(),
                "--factor",
                &n.to_string(),
                "--ffn-factor",
                &m.to_string(),
                "--json",
            ],
            tmp.path(),
        );
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(before, listing(tmp.path()));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let (d, f, hd, l) = (
            HIDDEN as u64,
            FFN as u64,
            (HIDDEN / heads) as u64,
            LAYERS as u64,
        );
        let (h, k, n, m, vocab) = (heads as u64, kv as u64, n as u64, m as u64, VOCAB as u64);
        let kv_copies = if k == 1 { 1 } else { n };
        let after = &v["params_after"];
        assert_eq!(after["embedding"], vocab * n * d);
        assert_eq!(after["head"], vocab * n * d);
        assert_eq!(
            after["attention"],
            l * (n * n * 2 * h * hd * d + n * kv_copies * 2 * k * hd * d)
        );
        assert_eq!(after["mlp"], l * n * m * 3 * d * f);
        assert_eq!(after["norms"], n * (2 * d * l + d));
        assert_eq!(
            v["params_before"]["head"], 0,
            "tied head counted once, with the embedding"
        );
    }
}

#[test]
fn inspect_reports_dimensions() {
    let tmp = tempfile::tempdir().unwrap();
    let src = Tiny {
        kv_heads: 1,
        ..Default::default()
    }
    .write(&tmp.path().join("src"));
    let out = run(&["inspect", src.to_str().unwrap(), "--json"], tmp.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["attention"], "MQA");
    assert_eq!(v["head_dim"], 4);
    assert_eq!(v["dtypes"], serde_json::json!(["float32"]));
    assert!(v["supported_families"].as_array().unwrap().len() >= 4);
    let text = run(&["inspect", src.to_str().unwrap()], tmp.path());
    assert!(String::from_utf8_lossy(&text.stdout).contains("heads 4 / kv heads 1 (MQA)"));
}

#[test]
fn force_replaces_an_existing_destination() {
    let tmp = tempfile::tempdir().unwrap();
    Tiny::default().write(&tmp.path().join("src"));
    std::fs::create_dir(tmp.path().join("dst")).unwrap();
    std::fs::write(tmp.path().join("dst/old.txt"), b"old").unwrap();
    let out = run(
        &["clone", "src", "dst", "--factor", "2", "--force"],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!tmp.path().join("dst/old.txt").exists());
    assert!(tmp.path().join("dst/model.safetensors").exists());
    assert_eq!(listing(tmp.path()), ["dst", "src"]);
}

/// core::grow::grow_in_memory (what Python's `hyperclone.grow` calls) gives the tensors and
/// config.json the CLI writes, and checks a state dict as strictly as a folder.
#[test]
fn growing_in_memory_equals_the_clone_on_disk() {
    use hyperclone_core::checkpoint::MemoryTensor;
    use hyperclone_core::grow::grow_in_memory;
    use hyperclone_core::GrowthSpec;
    let tmp = tempfile::tempdir().unwrap();
    let tied = Tiny {
        tied: true,
        ..Default::default()
    };
    let flags = ["--factor", "2", "--variant", "noisy", "--seed", "4"];
    let src = tiny_cloned(&tied, tmp.path(), &flags);
    let small = Checkpoint::open(&src).unwrap();
    let tensors: Vec<MemoryTensor> = small
        .tensors
        .iter()
        .map(|t| MemoryTensor {
            name: &t.info.name,
            dtype: t.info.dtype,
            shape: t.info.shape.clone(),
            data: small.files[t.file].data(&t.info),
        })
        .collect();
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();
    let request = GrowthSpec {
        factor: Some("2".into()),
        variant: "noisy".into(),
        seed: 4,
        ..Default::default()
    }
    .into();
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let grown = grow_in_memory(&config, &tensors, &request, false, &cancel).unwrap();
    let disk = Checkpoint::open(&tmp.path().join("dst")).unwrap();
    assert_eq!(grown.tensors.len(), disk.tensors.len());
    for t in &grown.tensors {
        let d = disk.find(&t.name).unwrap();
        assert_eq!(
            (t.dtype, &t.shape),
            (d.info.dtype, &d.info.shape),
            "{}",
            t.name
        );
        assert!(
            t.data == disk.files[d.file].data(&d.info),
            "{} differs from the file",
            t.name
        );
    }
    assert_eq!(
        Value::Object(grown.config),
        read_json(&tmp.path().join("dst/config.json"))
    );

    // A state dict is checked as a folder is: sizes against the data, names against the
    // family's rules.
    let mut short = tensors;
    short[0].data = &short[0].data[1..];
    let e = grow_in_memory(&config, &short, &request, false, &cancel)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("bytes of data for a"), "{e}");
    short[0].data = &[];
    short[0].shape = vec![0];
    short[0].name = "model.layers.9.mlp.up_proj.weight";
    let e = grow_in_memory(&config, &short, &request, false, &cancel)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("layer 9 does not exist"), "{e}");
}

/// `plan` announces the file count that `clone` then reports, and both count every file
/// written (shards, index, config.json, README.md, the copied tokenizer files), not only
/// the shards.
#[test]
fn plan_and_clone_count_the_same_files() {
    let tmp = tempfile::tempdir().unwrap();
    Tiny::default().write(&tmp.path().join("src"));
    let count = |text: &str, marker: &str| -> usize {
        let at = text
            .find(marker)
            .unwrap_or_else(|| panic!("no `{marker}` in {text}"));
        let before = text[..at].trim_end();
        before[before.rfind(' ').unwrap() + 1..].parse().unwrap()
    };
    for (i, shard) in ["5GB", "8KB"].into_iter().enumerate() {
        let args = ["--factor", "2", "--dtype", "f32", "--shard-size", shard];
        let plan = run(&[&["plan", "src"][..], &args].concat(), tmp.path());
        assert!(plan.status.success(), "{}", stderr(&plan));
        let planned = count(&String::from_utf8_lossy(&plan.stdout), " file(s):");
        let dst = format!("dst{i}");
        let clone = run(&[&["clone", "src", &dst][..], &args].concat(), tmp.path());
        assert!(clone.status.success(), "{}", stderr(&clone));
        let written = listing(&tmp.path().join(&dst)).len();
        assert_eq!(
            count(&String::from_utf8_lossy(&clone.stdout), " file(s)"),
            written
        );
        assert_eq!(
            planned,
            written,
            "{}",
            String::from_utf8_lossy(&plan.stdout)
        );
        // shards + config.json + README.md + generation_config.json + tokenizer.json (+ index)
        assert!(written >= 5 + i, "{written}");
    }
}
