//! Growth beyond the paper through the CLI: the growth map in `plan --json`, recipes
//! (round trip, YAML, refusals), and the one-line errors for growths that cannot be exact.
//! Exactness against transformers is in tests/python/test_growth.py.

use hyperclone_testkit::prelude as common;

use common::*;
use serde_json::Value;

#[test]
fn plan_json_prints_the_growth_map() {
    let tmp = tempfile::tempdir().unwrap();
    Tiny {
        tied: true,
        ..Tiny::default()
    }
    .write(&tmp.path().join("src"));
    let p = plan_json(
        tmp.path(),
        &[
            "--factor",
            "2",
            "--num-hidden-layers",
            "3",
            "--intermediate-size",
            "100",
            "--keep-tied",
        ],
    );
    let m = &p["growth_map"];
    assert_eq!(m["spaces"]["hidden"]["copies"], 2);
    let ffn = &m["spaces"]["ffn"];
    let f = ffn["source"].as_u64().unwrap();
    assert_eq!(ffn["dest"], 100);
    assert_eq!(ffn["copies"].as_u64().unwrap(), 100 / f);
    assert_eq!(ffn["extra"].as_u64().unwrap(), 100 % f);
    let layers = m["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    assert_eq!(m["keep_tied"], true);
    assert_eq!(m["residual_scale"], 0.5);
    assert_eq!(p["recipe"]["options"]["num_hidden_layers"], 3);
    assert_eq!(p["params_after"]["head"], 0, "the head stays the embedding");
}

#[test]
fn recipes_replay_and_refuse_what_does_not_match() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    Tiny::default().write(&dir.join("src"));
    let args = [
        "--factor",
        "2",
        "--depth-factor",
        "2",
        "--variant",
        "noisy",
        "--seed",
        "3",
    ];
    let p = plan_json(dir, &args);
    std::fs::write(dir.join("r.json"), p["recipe"].to_string()).unwrap();
    // The whole plan output is accepted too (its `recipe` is used).
    std::fs::write(dir.join("plan.json"), p.to_string()).unwrap();
    let yaml = "hyperclone_recipe: 1\noptions:\n  factor: 2\n  num_hidden_layers: 4\n  variant: noisy\n  seed: 3\n";
    std::fs::write(dir.join("r.yaml"), yaml).unwrap();
    let mut a = vec!["clone", "src", "flags"];
    a.extend_from_slice(&args);
    assert!(run(&a, dir).status.success());
    for (recipe, dst) in [("r.json", "j"), ("plan.json", "p"), ("r.yaml", "y")] {
        let out = run(&["clone", "src", dst, "--recipe", recipe], dir);
        assert!(out.status.success(), "{recipe}: {}", stderr(&out));
        // The provenance records the options, not the command line: byte-identical files.
        for file in listing(&dir.join("flags")) {
            let read = |d: &str| std::fs::read(dir.join(d).join(&file)).unwrap();
            assert!(read("flags") == read(dst), "{recipe}: {file} differs");
        }
    }
    // A recipe whose recorded map is not what its options give for this source.
    let mut wrong = p["recipe"].clone();
    wrong["growth_map"]["layers"][1]["identity"] = Value::Bool(false);
    std::fs::write(dir.join("wrong.json"), wrong.to_string()).unwrap();
    let e = one_error_line(&run(&["clone", "src", "w", "--recipe", "wrong.json"], dir));
    assert!(e.contains("growth_map.layers[1].identity"), "{e}");
    assert!(!dir.join("w").exists());
    // Flags and a recipe together: the recipe is the whole growth.
    let out = run(
        &["clone", "src", "w", "--recipe", "r.json", "--seed", "4"],
        dir,
    );
    assert_eq!(out.status.code(), Some(2), "clap refuses the combination");
    // Garbage, unknown keys, versions.
    for (text, want) in [
        ("{\"options\": {\"factor\": 2}}", "hyperclone_recipe"),
        (
            "hyperclone_recipe: 1\noptions: {factor: 2, layers: 8}\n",
            "unknown field `layers`",
        ),
        ("hyperclone_recipe: 9\noptions: {factor: 2}\n", "version 1"),
        (
            "hyperclone_recipe: 1\noptions: {factor: 2, depth_mode: deep}\n",
            "unknown depth_mode `deep`",
        ),
        ("{{{{", "neither JSON"),
    ] {
        std::fs::write(dir.join("bad"), text).unwrap();
        let e = one_error_line(&run(&["plan", "src", "--recipe", "bad"], dir));
        assert!(e.contains(want), "{text}: {e}");
    }
}

#[test]
fn growths_that_cannot_be_exact_are_refused_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    Tiny::default().write(&dir.join("src"));
    for (args, want) in [
        (vec!["--factor", "2", "--keep-tied"], "no tie to keep"),
        (
            vec!["--factor", "2", "--intermediate-size", "3"],
            "smaller than the source's",
        ),
        (
            vec!["--factor", "2", "--num-hidden-layers", "1"],
            "fewer than the source's",
        ),
        (
            vec!["--factor", "2", "--num-hidden-layers", "70000"],
            "at most 65536 layers",
        ),
        (
            vec!["--factor", "2", "--depth-factor", "0"],
            "depth_factor 0",
        ),
        (
            vec!["--factor", "2", "--depth-factor", "18446744073709551615"],
            "overflows",
        ),
    ] {
        let mut a = vec!["clone", "src", "dst"];
        a.extend_from_slice(&args);
        let e = one_error_line(&run(&a, dir));
        assert!(e.contains(want), "{args:?}: {e}");
        assert!(!dir.join("dst").exists());
    }
}

#[test]
fn stack_depth_is_not_verified_as_if_it_were_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let stack = [
        "--factor",
        "2",
        "--depth-factor",
        "2",
        "--depth-mode",
        "stack",
    ];
    tiny_cloned(&Tiny::default(), dir, &stack);
    let e = one_error_line(&run(&["verify", "src", "dst"], dir));
    assert!(e.contains("does not preserve the function"), "{e}");
}
