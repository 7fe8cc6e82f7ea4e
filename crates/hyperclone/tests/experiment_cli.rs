//! `hyperclone experiment --quick` end to end on the toy corpus: the pipeline runs, the
//! report is complete, symmetry behaves as HYPERCLONING.md says (kept exactly without
//! dropout, broken by dropout), reruns reuse finished runs, a deleted run is retrained to
//! the same numbers, and changed settings are refused.

mod common;

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

const RUNS: [&str; 5] = [
    "symmetric",
    "symmetric+dropout0.1",
    "noisy",
    "diagonal",
    "random-init",
];

fn experiment(dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "experiment",
        "--quick",
        "--out",
        "exp",
        "--tokenizer",
        "tokenizer.json",
        "--base-config",
        "config.json",
        "--data",
        "data/a.txt",
        "--val",
        "data/b.txt",
        "--seq",
        "12",
    ];
    args.extend_from_slice(extra);
    common::run(&args, dir)
}

fn report(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("exp/report.json")).unwrap()).unwrap()
}

fn is_png(path: &Path) -> bool {
    let bytes = std::fs::read(path).unwrap_or_default();
    bytes.len() > 10_000 && bytes.starts_with(b"\x89PNG\r\n\x1a\n")
}

#[test]
fn quick_experiment_writes_a_complete_report_and_reruns_reuse_it() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    common::toy_corpus(d);
    let o = experiment(d, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let r = report(d);
    let runs = r["runs"].as_array().unwrap();
    let names: Vec<&str> = runs.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, RUNS);
    for run in runs {
        let loss = run["final_val_loss"].as_f64().unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{run}");
        assert!(run["train_seconds"].as_f64().unwrap() > 0.0, "{run}");
    }
    assert!(r["target_val_loss"].as_f64().unwrap().is_finite());
    assert_eq!(r["models"]["large"]["hidden_size"], 64);
    assert_eq!(r["models"]["small"]["hidden_size"], 32);
    // Every curve starts with the step-0 evaluation; a clone starts at the base's function.
    let curves = r["curves"].as_array().unwrap();
    assert_eq!(curves.len(), 6);
    let base_final = r["base"]["final_val_loss"].as_f64().unwrap();
    let sym_start = curves[1]["evals"][0]["val_loss"].as_f64().unwrap();
    assert!(
        (sym_start - base_final).abs() < 1e-4 * base_final,
        "a symmetric clone starts at the base's loss: {sym_start} vs {base_final}"
    );
    // Without dropout a symmetric clone's copies stay identical; dropout breaks them.
    let sym = runs[0]["final_symmetry"].as_f64().unwrap();
    let dropped = runs[1]["final_symmetry"].as_f64().unwrap();
    assert!(sym > 0.999_999, "symmetric without dropout: {sym}");
    assert!(dropped < 0.9999, "symmetric with dropout: {dropped}");
    assert!(
        runs[4]["final_symmetry"].is_null(),
        "random init has no symmetry"
    );

    let md = std::fs::read_to_string(d.join("exp/report.md")).unwrap();
    for needle in RUNS.iter().copied().chain([
        "| run | final val loss",
        "## Findings",
        "val_loss.png",
        "symmetry.png",
    ]) {
        assert!(md.contains(needle), "report.md lacks {needle:?}:\n{md}");
    }
    assert!(is_png(&d.join("exp/val_loss.png")));
    assert!(is_png(&d.join("exp/symmetry.png")));

    // The same command again: every run is reused, the report is the same.
    let o = experiment(d, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.matches("finished earlier, reused").count(), 6, "{out}");
    assert_eq!(report(d), r);

    // A run that is lost is retrained, to the same numbers (batches and dropout are seeded).
    std::fs::remove_dir_all(d.join("exp/runs/symmetric+dropout0.1")).unwrap();
    let o = experiment(d, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let again = report(d);
    for key in ["final_val_loss", "final_symmetry", "tokens_to_target"] {
        assert_eq!(again["runs"][1][key], r["runs"][1][key], "{key}");
    }

    // --report-only rewrites the report from the metrics without training.
    std::fs::remove_file(d.join("exp/report.md")).unwrap();
    let o = experiment(d, &["--report-only"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(d.join("exp/report.md").exists());

    // Other settings in the same folder would mix two experiments: refused, nothing touched.
    let o = experiment(d, &["--steps", "31"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("other settings") && err.contains("steps"),
        "{err}"
    );
    assert_eq!(report(d)["runs"], again["runs"]);
}

#[test]
fn without_a_corpus_it_says_how_to_get_one() {
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_hyperclone"))
        .args(["experiment", "--quick", "--out", "exp"])
        .env("HOME", tmp.path())
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("scripts/fetch_shakespeare.sh"), "{err}");
}
