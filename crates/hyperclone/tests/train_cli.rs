//! `hyperclone train` end to end on a word-level toy tokenizer: the loss goes down, a run
//! stopped and resumed reproduces the uninterrupted one exactly, the checkpoint is a
//! loadable model folder, and a diverging run stops with a clear message.

use hyperclone_core::Checkpoint;
use serde_json::Value;
use std::path::Path;

use hyperclone_testkit::prelude as common;

/// The toy corpus, tokenizer and config (common::toy_corpus).
fn setup(dir: &Path) {
    common::toy_corpus(dir);
}

/// Runs `hyperclone train` with the test's defaults; `extra` flags replace same-named ones.
fn train(dir: &Path, out: &str, extra: &[&str]) -> std::process::Output {
    let defaults = [
        ("--tokenizer", "tokenizer.json"),
        ("--data", "data"),
        ("--out", out),
        ("--steps", "24"),
        ("--batch", "4"),
        ("--seq", "12"),
        ("--lr", "1e-2"),
        ("--warmup", "4"),
        ("--eval-every", "6"),
        ("--save-every", "6"),
        ("--dropout", "0.1"),
    ];
    let mut args = vec!["train"];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    common::run(&args, dir)
}

/// metrics.jsonl records without the wall-clock field (tokens_per_s).
fn metrics(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("tokens_per_s");
            v
        })
        .collect()
}

#[test]
fn trains_resumes_exactly_and_writes_a_loadable_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    let o = train(d, "straight", &["--init-config", "config.json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let straight = metrics(&d.join("straight/metrics.jsonl"));
    // One record per step, after the starting point's evaluation (step 0, no training loss).
    assert_eq!(straight.len(), 25);
    assert_eq!(straight[0]["step"], 0);
    assert!(straight[0]["train_loss"].is_null() && straight[0]["val_loss"].as_f64().is_some());
    let first = straight[1]["train_loss"].as_f64().unwrap();
    let last = straight[24]["train_loss"].as_f64().unwrap();
    assert!(last < first * 0.5, "loss {first} -> {last}");
    assert!(
        straight[24]["val_loss"].as_f64().is_some() && straight[6]["val_loss"].as_f64().is_some()
    );
    assert!(
        straight[5]["val_loss"].is_null(),
        "evaluates every 6 steps only"
    );
    // Validation is the held-out last file (b.txt); the checkpoint is a complete model folder.
    let ckpt = Checkpoint::open(&d.join("straight/last")).unwrap();
    assert_eq!(ckpt.config.hidden_size, 32);
    assert!(d.join("straight/last/tokenizer.json").exists());

    // Interrupted at step 9 (not a save point), then resumed: identical log and weights.
    let o = train(
        d,
        "resumed",
        &["--init-config", "config.json", "--stop-at", "9"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(metrics(&d.join("resumed/metrics.jsonl")).len(), 10);
    let o = train(d, "resumed", &["--resume"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(metrics(&d.join("resumed/metrics.jsonl")), straight);
    let a = std::fs::read(d.join("straight/last/model.safetensors")).unwrap();
    let b = std::fs::read(d.join("resumed/last/model.safetensors")).unwrap();
    assert!(a == b, "weights differ after resume");
}

#[test]
fn a_diverging_run_stops_and_keeps_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    // A random init at learning rate LR with nothing to tame it (no clipping, no warmup).
    let unclipped = |out: &str, lr: &str, extra: &[&str]| {
        let mut flags = vec!["--init-config", "config.json", "--lr", lr];
        flags.extend(["--grad-clip", "0", "--warmup", "0"]);
        flags.extend_from_slice(extra);
        train(d, out, &flags)
    };
    let o = unclipped("boom", "1e30", &[]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("the loss became") && err.contains("--lr"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // With a checkpoint saved every step, the last finite one survives the failure.
    let o = unclipped("kept", "3e3", &["--save-every", "1"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("the last good checkpoint is"), "{err}");
    Checkpoint::open(&d.join("kept/last")).expect("the kept checkpoint loads");
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("kept/last/trainer_state.json")).unwrap(),
    )
    .unwrap();
    let failed_at = metrics(&d.join("kept/metrics.jsonl")).len() as u64; // step 0 + steps 1..=k; the failing step k + 1 writes no record
    assert_eq!(
        state["step"].as_u64().unwrap() + 1,
        failed_at,
        "checkpoint of the step before the failure"
    );
}

/// The AdamW settings are options, checked before anything is written, and a changed one
/// changes the run (the flag reaches the optimizer).
#[test]
fn adam_settings_are_checked_and_used() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    for (flag, arg) in [
        ("--adam-beta1", "--adam-beta1=1"),
        ("--adam-beta2", "--adam-beta2=-0.1"),
        ("--adam-epsilon", "--adam-epsilon=0"),
        ("--adam-epsilon", "--adam-epsilon=nan"),
    ] {
        let o = train(d, "bad", &["--init-config", "config.json", arg]);
        let line = common::one_error_line(&o);
        assert!(line.contains(flag), "{line}");
        assert!(!d.join("bad").exists(), "{arg}: nothing written");
    }
    let losses = |out: &str, extra: &[&str]| -> Vec<Value> {
        let mut args = vec!["--init-config", "config.json", "--steps", "6"];
        args.extend_from_slice(extra);
        let o = train(d, out, &args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        metrics(&d.join(out).join("metrics.jsonl"))
    };
    let default = losses("default", &[]);
    assert_eq!(default, losses("same", &["--adam-beta2", "0.95"]));
    assert_ne!(default, losses("other", &["--adam-beta2", "0.999"]));
}
