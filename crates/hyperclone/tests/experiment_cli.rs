//! `hyperclone experiment --quick` end to end on the toy corpus: the budget-matched pipeline
//! runs (bases, per-arm lr screens, seed 0's ladder, the other seeds' bracketing rungs, the
//! weaker base's row), the headline's speedups agree with the documented interpolation and
//! FLOPs count recomputed here from the runs, reruns reuse finished runs, a deleted run is
//! retrained to the same numbers, slices stop and continue, changed settings are refused.

use hyperclone_testkit::prelude as common;

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

const ARMS: [&str; 3] = ["random-init", "noisy-fresh", "noisy-carried"];

/// --quick's ladder: 24 steps for the random init, rungs at 1/8, 1/4, 1/2 and 1.
const RUNGS: [u64; 4] = [3, 6, 12, 24];
/// Tokens per step: --quick's batch 8 x --seq 12.
const TOKENS_PER_STEP: f64 = 96.0;

fn experiment(dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["--quick", "--seq", "12"];
    args.extend_from_slice(extra);
    experiment_on_toy_corpus(dir, &args)
}

/// A quick study with FLAGS on the toy corpus in a fresh folder, which must succeed: the
/// folder and the run's output.
fn quick_study(flags: &[&str]) -> (tempfile::TempDir, Output) {
    let tmp = tempfile::tempdir().unwrap();
    common::toy_corpus(tmp.path());
    let o = experiment(tmp.path(), flags);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (tmp, o)
}

/// `experiment FLAGS...` on toy_corpus's files, written to exp/.
fn experiment_on_toy_corpus(dir: &Path, flags: &[&str]) -> Output {
    let mut args = vec![
        "experiment",
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
    ];
    args.extend_from_slice(flags);
    common::run(&args, dir)
}

fn report(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("exp/report.json")).unwrap()).unwrap()
}

fn is_png(path: &Path) -> bool {
    let bytes = std::fs::read(path).unwrap_or_default();
    bytes.len() > 10_000 && bytes.starts_with(b"\x89PNG\r\n\x1a\n")
}

/// (tokens, final loss) of the finished rungs of `arm` from `base` on `seed`, ascending.
/// (tokens, final loss) of one seed's complete runs at peak lr `lr`.
fn points(r: &Value, arm: &str, base: Option<u64>, seed: u64, lr: f64) -> Vec<(f64, f64)> {
    let mut p: Vec<(f64, f64)> = r["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| {
            x["arm"] == arm
                && x["base_steps"].as_u64() == base
                && x["seed"] == seed
                && x["lr"].as_f64() == Some(lr)
        })
        .map(|x| {
            (
                x["tokens"].as_f64().unwrap(),
                x["final_val_loss"].as_f64().unwrap(),
            )
        })
        .collect();
    p.sort_by(|a, b| a.0.total_cmp(&b.0));
    p
}

/// The documented formula, recomputed here: training FLOPs per token of a Llama shape
/// from report.json's models section.
fn flops(m: &Value, seq: f64) -> f64 {
    let g = |k: &str| m[k].as_f64().unwrap();
    let (d, f, h, kv, hd, l, v) = (
        g("hidden_size"),
        g("intermediate_size"),
        g("num_attention_heads"),
        g("num_key_value_heads"),
        g("head_dim"),
        g("num_hidden_layers"),
        g("vocab_size"),
    );
    let matmuls = l * (d * h * hd + 2.0 * d * kv * hd + h * hd * d + 3.0 * d * f);
    6.0 * matmuls + 6.0 * d * v + 12.0 * l * seq * h * hd
}

/// The lr a row's ladder ran at, as the report's lr check states it.
fn ladder_lr(r: &Value, arm: &str, base: Option<u64>) -> f64 {
    r["lr_check"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["arm"] == arm && c["base_steps"].as_u64() == base)
        .and_then(|c| c["ladder_lr"].as_f64())
        .unwrap_or_else(|| panic!("no ladder lr for {arm} {base:?}"))
}

/// The headline's speedups recomputed from the runs at both arms' ladder lrs: the first
/// rung at or below the seed's target, interpolated in log-budget with the rung before;
/// bounds at the ladder's ends.
fn check_headline_against_runs(r: &Value) {
    let h = &r["headline"];
    let (random_lr, clone_lr) = (
        ladder_lr(r, "random-init", None),
        ladder_lr(r, "noisy-fresh", Some(40)),
    );
    assert_eq!(h["lr"].as_f64(), Some(clone_lr));
    let big_r = h["random_budget_tokens"].as_f64().unwrap();
    let base_tokens = h["base_tokens"].as_f64().unwrap();
    let (fs, fl) = (
        h["flops_per_token"]["small"].as_f64().unwrap(),
        h["flops_per_token"]["large"].as_f64().unwrap(),
    );
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs();
    let seeds = h["seeds"].as_array().unwrap();
    assert!(!seeds.is_empty(), "{h}");
    for (i, seed) in seeds.iter().enumerate() {
        let seed = seed.as_u64().unwrap();
        let target = points(r, "random-init", None, seed, random_lr)
            .last()
            .map(|p| p.1)
            .unwrap();
        let pts = points(r, "noisy-fresh", Some(40), seed, clone_lr);
        let first = pts.iter().position(|p| p.1 <= target);
        let (speedup, charged) = (&h["speedups"][i], &h["speedups_charging_base"][i]);
        let charge = |b: f64| big_r * fl / (b * fl + base_tokens * fs);
        match first {
            Some(0) => {
                assert_eq!(h["crossings"][i], "below the smallest budget");
                assert!(close(
                    speedup["at_least"].as_f64().unwrap(),
                    big_r / pts[0].0
                ));
                assert!(close(
                    charged["at_least"].as_f64().unwrap(),
                    charge(pts[0].0)
                ));
            }
            None => {
                assert_eq!(h["crossings"][i], "not reached within the ladder");
                let last = pts.last().unwrap().0;
                assert!(close(speedup["below"].as_f64().unwrap(), big_r / last));
                assert_eq!(h["clone_budget_tokens"][i]["above"], last);
            }
            Some(k) => {
                assert_eq!(h["crossings"][i], "interpolated");
                let (lo, hi) = (pts[k - 1], pts[k]);
                let t = (lo.1 - target) / (lo.1 - hi.1);
                let b = (lo.0.ln() + t * (hi.0.ln() - lo.0.ln())).exp();
                assert!(lo.0 < b && b <= hi.0);
                assert!(close(h["clone_budget_tokens"][i].as_f64().unwrap(), b));
                assert!(close(speedup.as_f64().unwrap(), big_r / b));
                assert!(close(charged.as_f64().unwrap(), charge(b)));
            }
        }
    }
}

#[test]
#[ignore = "slow lane: scripts/test-all.sh runs it (cargo test -- --include-ignored)"]
fn quick_experiment_writes_a_complete_report_and_reruns_reuse_it() {
    let (tmp, o) = quick_study(&[]);
    let d = tmp.path();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("warning: the longest run"),
        "the toy corpus is read many times: {stdout}"
    );

    let r = report(d);
    let h = &r["headline"];
    assert_eq!(h["protocol"], "budget-matched");
    assert_eq!(
        h["arm"], "noisy-fresh",
        "the paper's protocol, fixed before any run"
    );
    assert_eq!(h["variant"], "noisy");
    assert_eq!(h["moments"], "fresh");
    assert_eq!(h["base_steps"], 40);
    assert_eq!(h["base_tokens"], 40.0 * TOKENS_PER_STEP);
    assert!(h["base_val_loss"].as_f64().unwrap().is_finite());
    assert_eq!(h["random_budget_tokens"], 24.0 * TOKENS_PER_STEP);
    let finals: Vec<f64> = common::field_of_each(&h["random_final_losses"], "loss")
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(
        finals.len(),
        2,
        "the random init at its full budget on both seeds"
    );
    let mean = finals.iter().sum::<f64>() / 2.0;
    assert!((h["random_final_loss"].as_f64().unwrap() - mean).abs() < 1e-12);
    let n = h["seeds"].as_array().unwrap().len();
    for key in [
        "clone_budget_tokens",
        "speedups",
        "speedups_charging_base",
        "crossings",
    ] {
        assert_eq!(h[key].as_array().unwrap().len(), n, "{key}: {h}");
    }
    assert!(h["corpus_train_tokens"].as_f64().unwrap() > 0.0);
    assert!(h["paper_regime"]["met"].is_boolean(), "{h}");
    assert_eq!(h["complete"], true);
    // The toy validation split is short: fewer than 65,536 tokens, and the report says so.
    assert_eq!(h["final_eval_tokens_at_least_65536"], false);
    check_headline_against_runs(&r);
    // FLOPs per token by the documented formula (input embedding: none).
    let seq = 12.0;
    assert_eq!(
        h["flops_per_token"]["small"],
        flops(&r["models"]["small"], seq)
    );
    assert_eq!(
        h["flops_per_token"]["large"],
        flops(&r["models"]["large"], seq)
    );
    assert_eq!(r["flops_per_token"]["large"]["input_embedding"], 0.0);

    // Rows: both clone arms from the strongest base, then the headline arm from the weaker.
    let rows: Vec<(String, u64)> = r["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["arm"].as_str().unwrap().to_string(),
                x["base_steps"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("noisy-fresh".into(), 40),
            ("noisy-carried".into(), 40),
            ("noisy-fresh".into(), 15)
        ]
    );
    // Phase 1: seed 0 runs every rung of every row; phase 2: seed 1 runs the random init's
    // full budget and, per clone row, a contiguous run of rungs that brackets its crossing.
    let rung_tokens: Vec<f64> = RUNGS.iter().map(|&s| s as f64 * TOKENS_PER_STEP).collect();
    for (arm, base) in [
        ("random-init", None),
        ("noisy-fresh", Some(40)),
        ("noisy-carried", Some(40)),
        ("noisy-fresh", Some(15)),
    ] {
        let lr = ladder_lr(&r, arm, base);
        let p0: Vec<f64> = points(&r, arm, base, 0, lr).iter().map(|p| p.0).collect();
        assert_eq!(p0, rung_tokens, "{arm} {base:?} seed 0");
        let p1 = points(&r, arm, base, 1, lr);
        if arm == "random-init" {
            assert_eq!(p1.iter().map(|p| p.0).collect::<Vec<_>>(), [rung_tokens[3]]);
        } else {
            assert!(!p1.is_empty() && p1.len() <= 4, "{arm} {base:?}: {p1:?}");
        }
    }
    for run in r["runs"].as_array().unwrap() {
        assert!(run["final_eval_tokens"].as_u64().unwrap() > 0, "{run}");
    }
    // Every arm screened its own lr on the same grid, from each base it grows from.
    assert_eq!(
        r["screen"].as_array().unwrap().len(),
        2 * 4,
        "4 screens x 2 lrs"
    );
    // The full-budget lr check, every row alike: seed 0 at the screened lr, half and twice
    // it (and on past an edge); the ladder runs at the best of them.
    let checks = r["lr_check"].as_array().unwrap();
    let checked: Vec<(&str, Option<u64>)> = checks
        .iter()
        .map(|c| (c["arm"].as_str().unwrap(), c["base_steps"].as_u64()))
        .collect();
    assert_eq!(
        checked,
        [
            ("random-init", None),
            ("noisy-fresh", Some(40)),
            ("noisy-carried", Some(40)),
            ("noisy-fresh", Some(15))
        ]
    );
    for c in checks {
        let lr = c["screened_lr"].as_f64().unwrap();
        let lrs: Vec<f64> = common::field_of_each(&c["runs"], "lr")
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert!(
            lrs.len() >= 3
                && lrs.contains(&lr)
                && lrs.contains(&(lr / 2.0))
                && lrs.contains(&(lr * 2.0)),
            "{c}"
        );
        let best = c["best_lr"].as_f64().unwrap();
        assert!(lrs.contains(&best));
        assert_eq!(c["ladder_lr"].as_f64(), Some(best), "{c}");
        assert!(c["screened_minus_best"].as_f64().unwrap() >= 0.0, "{c}");
        // Each check run is the full-budget rung of seed 0 at its lr.
        for x in c["runs"].as_array().unwrap() {
            let l = x["lr"].as_f64().unwrap();
            let base = c["base_steps"].as_u64();
            let p = points(&r, c["arm"].as_str().unwrap(), base, 0, l);
            assert_eq!(p.last().map(|p| p.1), x["final_val_loss"].as_f64(), "{c}");
        }
    }
    // Every run's compact curve is gathered under curves/.
    let csvs = walk(&d.join("exp/curves"));
    let runs = 2 + 8 + r["runs"].as_array().unwrap().len();
    assert_eq!(csvs.len(), runs, "{csvs:?}");
    for f in &csvs {
        assert!(std::fs::read_to_string(f)
            .unwrap()
            .starts_with("step,tokens,lr,train_loss,val_loss,symmetry\n"));
    }

    let md = std::fs::read_to_string(d.join("exp/report.md")).unwrap();
    for needle in ARMS.iter().copied().chain([
        "## Final loss against budget",
        "## Speedup per seed",
        "## How the numbers are computed",
        "interpolated linearly in log-budget",
        "## Learning-rate screens",
        "## Learning rate at the full budget",
        "## Secondary view",
        "## Checks",
        "budget.png",
        "val_loss.png",
    ]) {
        assert!(md.contains(needle), "report.md lacks {needle:?}:\n{md}");
    }
    for png in ["budget.png", "val_loss.png", "symmetry.png"] {
        assert!(is_png(&d.join("exp").join(png)), "{png}");
    }

    // The same command again: every run is reused, the report is the same.
    let o = experiment(d, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    // (A check run that is also the ladder's top rung is reported under both names.)
    assert!(
        !out.contains(" steps in "),
        "nothing is trained again: {out}"
    );
    assert!(
        out.matches("finished earlier, reused").count() >= runs,
        "{out}"
    );
    assert_eq!(report(d), r);

    // A run that is lost is retrained, to the same numbers (batches and noise are seeded).
    let lr = ladder_lr(&r, "noisy-fresh", Some(40));
    std::fs::remove_dir_all(d.join(format!(
        "exp/ladder/base-40/noisy-fresh/lr{lr:e}/steps-24/s0"
    )))
    .unwrap();
    let o = experiment(d, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(report(d)["headline"], r["headline"]);

    // --report-only rewrites the report without training; a missing run is pending.
    std::fs::remove_file(d.join("exp/report.md")).unwrap();
    let lr = ladder_lr(&r, "random-init", None);
    std::fs::remove_dir_all(d.join(format!("exp/ladder/random-init/lr{lr:e}/steps-24/s1")))
        .unwrap();
    let o = experiment(d, &["--report-only"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let partial = report(d);
    assert_eq!(
        partial["headline"]["random_final_losses"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        partial["headline"]["paper_regime"]["met"],
        Value::Null,
        "pending, not guessed"
    );
    assert_eq!(
        partial["complete"], false,
        "a run is missing since the last report"
    );
    assert!(d.join("exp/report.md").exists());

    // Other settings in the same folder would mix two experiments: refused, nothing touched.
    let o = experiment(d, &["--steps", "32"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("other settings") && err.contains("random_budget_steps"),
        "{err}"
    );
    assert_eq!(report(d)["runs"], partial["runs"]);
}

/// A slice that is out of time stops after its first chunk (a quarter of the first base),
/// still reports (incomplete); the same command then continues, interrupted run included,
/// to exactly the numbers of an uninterrupted study.
#[test]
#[ignore = "slow lane: scripts/test-all.sh runs it (cargo test -- --include-ignored)"]
fn a_slice_stops_and_the_same_command_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let (sliced, whole) = (tmp.path().join("sliced"), tmp.path().join("whole"));
    for d in [&sliced, &whole] {
        std::fs::create_dir_all(d).unwrap();
        common::toy_corpus(d);
    }
    let o = experiment(&sliced, &["--max-minutes", "0.000001"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("rerun the same command to continue"), "{out}");
    let r = report(&sliced);
    assert_eq!(r["complete"], false);
    assert!(r["runs"].as_array().unwrap().is_empty());
    assert!(
        r["bases"].as_array().unwrap().is_empty(),
        "base-40 is a quarter done"
    );
    let o = experiment(&sliced, &["--max-minutes", "0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--max-minutes"));

    let o = experiment(&sliced, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("base-40: resuming at step 10"));
    let o = experiment(&whole, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (a, b) = (report(&sliced), report(&whole));
    assert_eq!(a["complete"], true);
    assert_eq!(a["runs"], b["runs"]);
    assert_eq!(a["headline"], b["headline"]);
}

/// The paper-regime preset refuses a budget that reads the training split more than twice,
/// before any run, and leaves no experiment.json behind (the corrected command must work).
#[test]
fn a_budget_that_repeats_the_corpus_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    common::toy_corpus(d);
    let o = experiment_on_toy_corpus(d, &["--paper-regime"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("times (at most 2)") && err.lines().count() == 1,
        "{err}"
    );
    assert!(!d.join("exp/experiment.json").exists());
    assert!(!d.join("exp/bases").exists(), "nothing trained");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            files.extend(walk(&p));
        } else {
            files.push(p);
        }
    }
    files
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

/// The record (`--record`) holds what a study needs to continue on another machine: a fresh
/// --out with the same record reuses every recorded run, trains nothing, and reports the
/// same numbers; the record holds no weights.
#[test]
#[ignore = "slow lane: scripts/test-all.sh runs it (cargo test -- --include-ignored)"]
fn a_study_continues_from_its_record_in_a_fresh_folder() {
    let (tmp, _) = quick_study(&["--record", "rec"]);
    let d = tmp.path();
    let first = report(d);
    let recorded = walk(&d.join("rec"));
    for name in [
        "experiment.json",
        "tokenizer.json",
        "report.json",
        "report.md",
    ] {
        assert!(d.join("rec").join(name).is_file(), "rec/{name}");
    }
    assert!(
        recorded
            .iter()
            .all(|f| f.extension().is_none_or(|e| e != "safetensors")),
        "no weights in the record: {recorded:?}"
    );
    let evals = recorded
        .iter()
        .filter(|f| f.ends_with("final_eval.json"))
        .count();
    let ladder = first["runs"].as_array().unwrap().len();
    assert!(
        evals >= 2 + ladder,
        "bases, ladder and lr check runs: {evals}"
    );

    // A new machine: the out folder is gone, the record remains.
    std::fs::rename(d.join("exp"), d.join("exp-first")).unwrap();
    let o = experiment(d, &["--record", "rec"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        !out.contains(" steps in "),
        "nothing is trained again: {out}"
    );
    assert!(out.contains("finished in the record, reused"), "{out}");
    let again = report(d);
    for key in ["headline", "runs", "screen", "lr_check", "bases"] {
        assert_eq!(again[key], first[key], "{key}");
    }
}
