//! The binary under the library harness's mutations (hyperclone-core/tests/mutate): each
//! mutated folder goes through `inspect`, `plan`, `clone` and `forward`. Every run must exit
//! 0, or 1 with exactly one `error:` line; never a panic (101), an abort (134) or a hang;
//! SRC unchanged and nothing left beside it after a failed clone.

use hyperclone_testkit::prelude as common;

use common::{listing, run, snapshot};
use hyperclone_testkit::mutate::*;
use std::collections::BTreeMap;

#[test]
#[ignore = "slow lane: scripts/test-all.sh runs it (cargo test -- --include-ignored)"]
fn mutated_folders_through_the_binary() {
    let cases = case_count("HYPERCLONE_MUTATION_CLI_CASES", 45);
    let mut rng = Rng(0xc11_5eed);
    let root = tempfile::tempdir().unwrap();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let commands: [&[&str]; 4] = [
        &["inspect", "src"],
        &["plan", "src", "--factor", "2"],
        &["clone", "src", "dst", "--factor", "2"],
        &["forward", "src", "--tokens", "1,2,3"],
    ];
    for case in 0..cases {
        let (files, what) = mutate(&mut rng, case);
        let src = write_case(root.path(), case, &files);
        let dir = src.parent().unwrap().to_path_buf();
        let before = snapshot(&src);
        for args in commands {
            let out = run(args, &dir);
            let err = String::from_utf8_lossy(&out.stderr);
            let code = out.status.code();
            match code {
                Some(0) => {}
                Some(1) => {
                    assert_eq!(
                        err.trim_end().lines().count(),
                        1,
                        "case {case} ({what}), {args:?}: one line, got: {err}"
                    );
                    assert!(err.starts_with("error: "), "case {case}: {err}");
                }
                _ => panic!("case {case} ({what}), {args:?}: exit {code:?}: {err}"),
            }
            assert_eq!(snapshot(&src), before, "case {case} ({what}): SRC modified");
            if args[0] == "clone" && code == Some(1) {
                assert_eq!(listing(&dir), ["src"], "case {case} ({what}): left files");
            }
            *outcomes
                .entry(format!("{} exit {}", args[0], code.unwrap_or(-1)))
                .or_default() += 1;
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!("{cases} mutated folders x 4 commands: {outcomes:?}");
}

/// The round-two classes (issue 18) through every command that opens a folder: they agree,
/// since one opener decides (all refuse with the same line, or all succeed), and none
/// panics.
#[test]
fn round_two_folders_end_alike_in_every_command() {
    let cases = case_count("HYPERCLONE_MUTATION_CLI_CASES", 25);
    let mut rng = Rng(0x18_c11);
    let root = tempfile::tempdir().unwrap();
    let commands: [&[&str]; 5] = [
        &["inspect", "src"],
        &["plan", "src", "--factor", "2"],
        &["clone", "src", "dst", "--factor", "2", "--verify"],
        &["forward", "src", "--tokens", "1,2,3"],
        &["verify", "src", "src"],
    ];
    for case in 0..cases {
        let (files, what, expect) = mutate_round_two(&mut rng, case);
        let src = write_case(root.path(), case, &files);
        let dir = src.parent().unwrap().to_path_buf();
        let before = snapshot(&src);
        let mut errors = Vec::new();
        for args in commands {
            let out = run(args, &dir);
            let err = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
            match (expect, out.status.code()) {
                (Expect::Refused(needle), Some(1)) => {
                    assert_eq!(
                        err.lines().count(),
                        1,
                        "case {case} ({what}), {args:?}: {err}"
                    );
                    assert!(
                        err.contains(needle),
                        "case {case} ({what}), {args:?}: {err}"
                    );
                    errors.push(err);
                }
                (Expect::Accepted | Expect::ReadsSingleFile, Some(0)) => {}
                (_, code) => panic!("case {case} ({what}), {args:?}: exit {code:?}: {err}"),
            }
            assert_eq!(snapshot(&src), before, "case {case} ({what}): SRC modified");
        }
        errors.dedup();
        assert!(
            errors.len() <= 1,
            "case {case} ({what}): commands disagree: {errors:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
