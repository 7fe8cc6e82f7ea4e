//! Every bad input gives one clear line naming the file (and tensor), a non-zero exit, and
//! leaves nothing at DST; SRC is never modified.

mod common;

use common::*;
use hyperclone_core::safetensors::SafetensorsFile;
use hyperclone_core::write::{write_clone, NoProgress, WriteEnv};
use hyperclone_core::{Checkpoint, GrowthOptions, Plan, Variant};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::AtomicBool;

/// Snapshot of every file's bytes under a folder.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    listing(dir)
        .into_iter()
        .map(|f| (f.clone(), std::fs::read(dir.join(&f)).unwrap()))
        .collect()
}

/// Runs `hyperclone clone src dst <extra>` in `root` and checks the failure contract.
fn fails(root: &Path, extra: &[&str], expect: &[&str]) {
    let src = root.join("src");
    let before_src = snapshot(&src);
    let before_root = listing(root);
    let mut args = vec!["clone", "src", "dst"];
    args.extend_from_slice(extra);
    if !extra
        .iter()
        .any(|a| a.starts_with("--factor") || a.starts_with("--hidden-size"))
    {
        args.extend_from_slice(&["--factor", "2"]);
    }
    let out = run(&args, root);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected failure for {args:?}; stderr: {err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one line, got: {err}");
    assert!(err.starts_with("error: "), "{err}");
    for e in expect {
        assert!(err.contains(e), "`{e}` not in: {err}");
    }
    assert_eq!(listing(root), before_root, "nothing left beside SRC");
    assert_eq!(snapshot(&src), before_src, "SRC untouched");
}

fn with_tensors(root: &Path, edit: impl FnOnce(&mut Vec<(String, Vec<usize>)>)) {
    let t = Tiny::default();
    let mut tensors = t.tensors();
    edit(&mut tensors);
    t.write_with(&root.join("src"), &t.config(), &tensors);
}

fn with_config(root: &Path, edit: impl FnOnce(&mut Value)) {
    let t = Tiny::default();
    let mut cfg = t.config();
    edit(&mut cfg);
    t.write_with(&root.join("src"), &cfg, &t.tensors());
}

/// Rewrites the JSON header of src/model.safetensors, keeping the data section.
fn edit_header(root: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = root.join("src/model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut json = serde_json::to_vec(&header).unwrap();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

fn root() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn unknown_model_type_lists_supported_families() {
    let r = root();
    with_config(r.path(), |c| c["model_type"] = json!("mamba"));
    fails(
        r.path(),
        &[],
        &[
            "config.json",
            "mamba",
            "supported: llama, mistral, qwen2, qwen3",
        ],
    );
}

#[test]
fn missing_tensor() {
    let r = root();
    with_tensors(r.path(), |t| {
        t.retain(|(n, _)| n != "model.layers.1.mlp.up_proj.weight")
    });
    fails(
        r.path(),
        &[],
        &[
            "model.safetensors",
            "`model.layers.1.mlp.up_proj.weight`",
            "missing",
        ],
    );
}

#[test]
fn missing_untied_head() {
    let r = root();
    with_tensors(r.path(), |t| t.retain(|(n, _)| n != "lm_head.weight"));
    fails(
        r.path(),
        &[],
        &["`lm_head.weight`", "tie_word_embeddings = false"],
    );
}

#[test]
fn unexpected_tensor() {
    let r = root();
    with_tensors(r.path(), |t| {
        t.push(("model.layers.0.mlp.extra.weight".into(), vec![HIDDEN]))
    });
    fails(
        r.path(),
        &[],
        &[
            "model.safetensors",
            "`model.layers.0.mlp.extra.weight`",
            "unexpected",
        ],
    );
}

#[test]
fn layer_beyond_config() {
    let r = root();
    with_tensors(r.path(), |t| {
        t.push(("model.layers.5.input_layernorm.weight".into(), vec![HIDDEN]))
    });
    fails(
        r.path(),
        &[],
        &[
            "`model.layers.5.input_layernorm.weight`",
            "num_hidden_layers = 2",
        ],
    );
}

#[test]
fn bias_without_config_switch() {
    let r = root();
    with_tensors(r.path(), |t| {
        t.push(("model.layers.0.self_attn.q_proj.bias".into(), vec![HIDDEN]))
    });
    fails(
        r.path(),
        &[],
        &["`model.layers.0.self_attn.q_proj.bias`", "attention_bias"],
    );
}

#[test]
fn shape_contradicting_config() {
    let r = root();
    with_config(r.path(), |c| c["intermediate_size"] = json!(20));
    fails(
        r.path(),
        &[],
        &[
            "model.safetensors",
            "mlp.",
            "[24, 16] contradicts config.json",
            "[20, 16]",
        ],
    );
}

#[test]
fn zero_fractional_and_non_dividing_factors() {
    let r = root();
    Tiny::default().write(&r.path().join("src"));
    fails(r.path(), &["--factor", "0"], &["--factor 0", ">= 1"]);
    fails(
        r.path(),
        &["--factor", "1.5"],
        &["--factor 1.5", "whole number"],
    );
    fails(
        r.path(),
        &["--factor", "2", "--ffn-factor", "0"],
        &["--ffn-factor 0"],
    );
    fails(
        r.path(),
        &["--hidden-size", "40"],
        &["--hidden-size 40", "whole multiple", "16"],
    );
    fails(
        r.path(),
        &["--factor", "2", "--intermediate-size", "50"],
        &["--intermediate-size 50"],
    );
}

#[test]
fn head_dim_change_is_refused() {
    let r = root();
    Tiny::default().write(&r.path().join("src"));
    fails(
        r.path(),
        &["--factor", "2", "--num-attention-heads", "4"],
        &["head_dim", "expected 8 heads"],
    );
}

#[test]
fn truncated_file() {
    let r = root();
    Tiny::default().write(&r.path().join("src"));
    let p = r.path().join("src/model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 4]).unwrap();
    fails(
        r.path(),
        &[],
        &[
            "model.safetensors",
            "`lm_head.weight`",
            "past the end",
            "truncated",
        ],
    );
    std::fs::write(&p, &bytes[..5]).unwrap();
    fails(r.path(), &[], &["model.safetensors", "truncated"]);
}

#[test]
fn header_length_past_the_file() {
    let r = root();
    Tiny::default().write(&r.path().join("src"));
    let p = r.path().join("src/model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let len = bytes.len() as u64;
    bytes[..8].copy_from_slice(&len.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    fails(
        r.path(),
        &[],
        &["model.safetensors", "header length", "past the end"],
    );
}

#[test]
fn offsets_past_the_file() {
    let r = root();
    Tiny::default().write(&r.path().join("src"));
    edit_header(r.path(), |h| {
        h["model.norm.weight"]["data_offsets"] = json!([1_000_000, 1_000_064]);
    });
    fails(r.path(), &[], &["`model.norm.weight`", "past the end"]);
}

#[test]
fn overlapping_tensors() {
    let r = root();
    Tiny::default().write(&r.path().join("src"));
    edit_header(r.path(), |h| {
        let a = h["model.layers.0.input_layernorm.weight"]["data_offsets"].clone();
        h["model.norm.weight"]["data_offsets"] = a;
    });
    fails(r.path(), &[], &["model.safetensors", "overlaps"]);
}

#[test]
fn bytes_disagreeing_with_dtype_and_shape() {
    let r = root();
    Tiny::default().write(&r.path().join("src"));
    edit_header(r.path(), |h| h["model.norm.weight"]["shape"] = json!([15]));
    fails(
        r.path(),
        &[],
        &["`model.norm.weight`", "F32 x [15] needs 60"],
    );
    let r = root();
    Tiny::default().write(&r.path().join("src"));
    edit_header(r.path(), |h| {
        h["model.norm.weight"]["dtype"] = json!("BF16")
    });
    fails(r.path(), &[], &["`model.norm.weight`", "needs 32"]);
}

#[test]
fn index_naming_a_missing_shard() {
    let r = root();
    Tiny {
        shards: 2,
        ..Default::default()
    }
    .write(&r.path().join("src"));
    std::fs::remove_file(r.path().join("src/model-00002-of-00002.safetensors")).unwrap();
    fails(
        r.path(),
        &[],
        &[
            "model.safetensors.index.json",
            "model-00002-of-00002.safetensors",
            "does not exist",
        ],
    );
}

#[test]
fn not_a_model_folder() {
    let r = root();
    std::fs::create_dir(r.path().join("src")).unwrap();
    std::fs::write(r.path().join("src/notes.txt"), b"hi").unwrap();
    fails(r.path(), &[], &["config.json"]);
}

#[test]
fn destination_exists_without_force() {
    let r = root();
    Tiny::default().write(&r.path().join("src"));
    std::fs::create_dir(r.path().join("dst")).unwrap();
    std::fs::write(r.path().join("dst/keep.txt"), b"mine").unwrap();
    let out = run(&["clone", "src", "dst", "--factor", "2"], r.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("already exists (pass --force"),
        "{}",
        stderr(&out)
    );
    assert_eq!(listing(&r.path().join("dst")), ["keep.txt"]);
    assert_eq!(listing(r.path()), ["dst", "src"]);
}

#[test]
fn destination_inside_source_is_refused() {
    let r = root();
    Tiny::default().write(&r.path().join("src"));
    let out = run(&["clone", "src", "src/grown", "--factor", "2"], r.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("overlaps the source"),
        "{}",
        stderr(&out)
    );
    let out = run(
        &["clone", "src", "src", "--factor", "2", "--force"],
        r.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        r.path().join("src/model.safetensors").exists(),
        "--force never deletes SRC"
    );
}

/// A writer that fails with ENOSPC after `budget` bytes, like a disk filling up.
struct FillsUp {
    budget: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Write for FillsUp {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use std::sync::atomic::Ordering::SeqCst;
        let left = self.budget.load(SeqCst);
        if left == 0 {
            return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
        }
        let n = buf.len().min(left);
        self.budget.fetch_sub(n, SeqCst);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn write_failure_part_way_leaves_nothing() {
    let r = root();
    let src = Tiny {
        shards: 2,
        ..Default::default()
    }
    .write(&r.path().join("src"));
    let before = snapshot(&src);
    let ckpt = Checkpoint::open(&src).unwrap();
    let options = GrowthOptions {
        factor: 2,
        ffn_factor: 2,
        variant: Variant::Noisy,
        snr_db: 10.0,
        seed: 0,
        dtype: None,
        shard_size: 20_000,
    };
    let plan = Plan::new(&ckpt, &options, &BTreeMap::new()).unwrap();
    assert!(plan.shards.len() > 1);
    // Fail inside the first shard, at a shard boundary, and in the small files at the end.
    for budget in [
        100,
        plan.shards[0].header.len() + plan.shards[0].data_bytes as usize,
        plan.output_bytes() as usize + 10,
    ] {
        let budget = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(budget));
        let create = move |p: &Path| -> std::io::Result<Box<dyn Write + Send>> {
            std::fs::File::create(p)?; // the file appears on disk, as on a real full disk
            Ok(Box::new(FillsUp {
                budget: budget.clone(),
            }))
        };
        let dst = r.path().join("dst");
        let cancel = AtomicBool::new(false);
        let env = WriteEnv {
            progress: &NoProgress,
            cancel: &cancel,
            create: &create,
            check: None,
        };
        let err = write_clone(&ckpt, &plan, "card", &dst, false, &env)
            .err()
            .expect("the write fails");
        let msg = err.to_string();
        assert!(
            msg.contains("No space left on device") && msg.contains(".hyperclone-partial-"),
            "{msg}"
        );
        assert_eq!(
            listing(r.path()),
            ["src"],
            "temporary folder removed, no DST"
        );
    }
    assert_eq!(snapshot(&src), before);
    let _ = SafetensorsFile::open(&src.join("model-00001-of-00002.safetensors")).unwrap();
}

#[test]
fn failed_verification_keeps_nothing() {
    let r = root();
    let src = Tiny::default().write(&r.path().join("src"));
    let ckpt = Checkpoint::open(&src).unwrap();
    let options = GrowthOptions {
        factor: 2,
        ffn_factor: 2,
        variant: Variant::Symmetric,
        snr_db: 10.0,
        seed: 0,
        dtype: None,
        shard_size: 1 << 30,
    };
    let plan = Plan::new(&ckpt, &options, &BTreeMap::new()).unwrap();
    let cancel = AtomicBool::new(false);
    let seen = std::sync::Mutex::new(None);
    let check = |staged: &Path| -> Result<(), String> {
        *seen.lock().unwrap() = Some(listing(staged));
        Err("logits differ".into())
    };
    let env = WriteEnv {
        progress: &NoProgress,
        cancel: &cancel,
        create: &hyperclone_core::write::create_plain_file,
        check: Some(&check),
    };
    let err = write_clone(&ckpt, &plan, "card", &r.path().join("dst"), false, &env)
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        "verification failed, nothing was written: logits differ"
    );
    assert!(
        seen.lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .contains(&"model.safetensors".to_string()),
        "checked the complete clone"
    );
    assert_eq!(listing(r.path()), ["src"]);
}

#[test]
fn full_disk_on_a_real_tmpfs() {
    // Needs root to mount; CI runs as root. Elsewhere the injected-writer test above covers it.
    let r = root();
    let mnt = r.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=64k",
            "tmpfs",
            mnt.to_str().unwrap(),
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        eprintln!("skipping: cannot mount a tmpfs here (not root?)");
        return;
    }
    let src = Tiny::default().write(&r.path().join("src"));
    let out = run(
        &[
            "clone",
            src.to_str().unwrap(),
            mnt.join("dst").to_str().unwrap(),
            "--factor",
            "3",
        ],
        r.path(),
    );
    let left = listing(&mnt);
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1);
    assert!(left.is_empty(), "left on the full disk: {left:?}");
}
