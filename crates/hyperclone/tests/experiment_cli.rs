//! `hyperclone experiment --quick` end to end on the toy corpus: the study's pipeline runs
//! (bases, lr screen, seeds, the smaller base), the report is complete, symmetry behaves as
//! the math says (kept exactly without dropout, broken by dropout), reruns reuse finished
//! runs, a deleted run is retrained to the same numbers, and changed settings are refused.

mod common;

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

const ARMS: [&str; 5] = [
    "random-init",
    "symmetric",
    "symmetric+dropout",
    "noisy",
    "diagonal",
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

/// The final run of `arm` with `seed` in report.json's curves.
fn curve<'a>(r: &'a Value, arm: &str, seed: u64) -> &'a Value {
    r["curves"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["arm"] == arm && c["seed"] == seed)
        .map(|c| &c["curve"])
        .unwrap_or_else(|| panic!("no curve {arm} s{seed}"))
}

fn paired(r: &Value, arm: usize, seed: usize) -> &Value {
    &r["arms"][arm]["paired_with_random_init"][seed]
}

#[test]
fn quick_experiment_writes_a_complete_report_and_reruns_reuse_it() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    common::toy_corpus(d);
    let o = experiment(d, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let r = report(d);
    let arms = r["arms"].as_array().unwrap();
    let names: Vec<&str> = arms.iter().map(|a| a["arm"].as_str().unwrap()).collect();
    assert_eq!(names, ARMS);
    for arm in arms {
        let finals = arm["final_val_loss"].as_array().unwrap();
        assert_eq!(finals.len(), 2, "two seeds: {arm}");
        for f in finals {
            let loss = f["loss"].as_f64().unwrap();
            assert!(loss.is_finite() && loss > 0.0, "{arm}");
        }
        // Every arm's learning rate was chosen from the screen.
        let lr = arm["lr"].as_f64().unwrap();
        assert!(lr == 1e-3 || lr == 3e-3, "{arm}");
    }
    assert_eq!(r["screen"].as_array().unwrap().len(), 10, "5 arms x 2 lrs");
    assert_eq!(r["models"]["large"]["hidden_size"], 64);
    assert_eq!(r["models"]["small"]["hidden_size"], 32);
    assert_eq!(r["bases"].as_array().unwrap().len(), 2);
    // The headline names one clone arm with one speedup per seed.
    let h = &r["headline"];
    assert!(ARMS[1..].contains(&h["variant"].as_str().unwrap()), "{h}");
    assert_eq!(h["seeds"], serde_json::json!([0, 1]));
    assert_eq!(h["speedups"].as_array().unwrap().len(), 2);
    assert_eq!(h["speedups_charging_base"].as_array().unwrap().len(), 2);
    assert_eq!(h["large_budget_tokens"], 30.0 * 8.0 * 12.0);
    // From the largest base whose clones have to learn to reach the random init.
    let base_steps = h["base_steps"].as_u64().unwrap();
    assert!(base_steps == 15 || base_steps == 40, "{h}");
    assert_eq!(h["base_tokens"], base_steps as f64 * 8.0 * 12.0);
    assert!(h["clones_start_below_target"].is_boolean());
    assert!(h["corpus_train_tokens"].as_f64().unwrap() > 0.0);
    // Every large run starts with the step-0 evaluation; a clone starts at the base's function.
    let base_final = r["bases"][1]["curve"]["final_val_loss"].as_f64().unwrap();
    let sym_start = curve(&r, "symmetric", 0)["evals"][0]["val_loss"]
        .as_f64()
        .unwrap();
    assert!(
        (sym_start - base_final).abs() < 1e-4 * base_final,
        "a symmetric clone starts at the base's loss: {sym_start} vs {base_final}"
    );
    // Without dropout a symmetric clone's copies stay identical; dropout breaks them.
    for seed in 0..2 {
        let sym = paired(&r, 1, seed)["final_symmetry"].as_f64().unwrap();
        let dropped = paired(&r, 2, seed)["final_symmetry"].as_f64().unwrap();
        assert!(sym > 0.999_999, "symmetric without dropout: {sym}");
        assert!(dropped < 0.9999, "symmetric with dropout: {dropped}");
    }
    // Each seed is paired with the random init of the same seed.
    for seed in 0..2 {
        let target = paired(&r, 3, seed)["target_val_loss"].as_f64().unwrap();
        let random_final = curve(&r, "random-init", seed as u64)["final_val_loss"]
            .as_f64()
            .unwrap();
        assert_eq!(target, random_final);
    }
    // Two bases: the best clone arm was trained from the smaller one as well.
    let budget = r["speedup_vs_base_budget"].as_array().unwrap();
    assert_eq!(budget.len(), 2);
    assert_eq!(budget[0]["base_steps"], 15);
    assert_eq!(
        budget[0]["runs"].as_array().unwrap().len(),
        1,
        "one seed by default"
    );

    let md = std::fs::read_to_string(d.join("exp/report.md")).unwrap();
    for needle in ARMS.iter().copied().chain([
        "| arm | lr | final val loss",
        "## Learning-rate screen",
        "## Speedup vs base budget",
        "## Findings",
        "val_loss.png",
        "speedup.png",
        "symmetry.png",
    ]) {
        assert!(md.contains(needle), "report.md lacks {needle:?}:\n{md}");
    }
    for png in ["val_loss.png", "symmetry.png", "speedup.png"] {
        assert!(is_png(&d.join("exp").join(png)), "{png}");
    }

    // The same command again: every run is reused, the report is the same.
    let o = experiment(d, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    // 2 bases + 10 screen runs + 10 final runs, and from the smaller base the chosen arm's
    // own 2-lr screen and its run.
    assert_eq!(out.matches("finished earlier, reused").count(), 25, "{out}");
    assert_eq!(report(d), r);

    // A run that is lost is retrained, to the same numbers (batches and dropout are seeded).
    std::fs::remove_dir_all(d.join("exp/runs/symmetric+dropout/s0")).unwrap();
    let o = experiment(d, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let again = report(d);
    assert_eq!(again["arms"][2], r["arms"][2]);

    // --report-only rewrites the report from the metrics without training; a missing run is
    // reported as pending, not an error.
    std::fs::remove_file(d.join("exp/report.md")).unwrap();
    std::fs::remove_dir_all(d.join("exp/runs/diagonal/s1")).unwrap();
    let o = experiment(d, &["--report-only"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let partial = report(d);
    assert_eq!(
        partial["arms"][4]["final_val_loss"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert!(d.join("exp/report.md").exists());

    // Other settings in the same folder would mix two experiments: refused, nothing touched.
    let o = experiment(d, &["--steps", "31"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("other settings") && err.contains("steps"),
        "{err}"
    );
    assert_eq!(report(d)["arms"], partial["arms"]);
}

#[test]
fn without_a_corpus_it_says_how_to_get_one() {
    let tmp = tempfile::tempdir().unwrap();
    // --quick uses Shakespeare; the study's default corpus is the larger prose corpus.
    for (preset, script) in [
        (Some("--quick"), "scripts/fetch_shakespeare.sh"),
        (None, "scripts/fetch_corpus.sh"),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_hyperclone"))
            .args(["experiment", "--out", "exp"])
            .args(preset)
            .env("HOME", tmp.path())
            .current_dir(tmp.path())
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(script), "{err}");
        assert!(
            !tmp.path().join("exp").exists(),
            "nothing created before the corpus is found"
        );
    }
}
