//! The `hyperclone` binary under test, and its failure contract.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `hyperclone` binary of the build that runs the tests. Cargo builds a package's
/// binaries before its integration tests and sets `CARGO_BIN_EXE_hyperclone` only while
/// compiling them, so this finds it beside the test executable (target/<profile>/deps/..),
/// as assert_cmd does; `HYPERCLONE_BIN` overrides it.
pub fn bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HYPERCLONE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test executable lives in target/<profile>/deps");
    let p = profile_dir.join(format!("hyperclone{}", std::env::consts::EXE_SUFFIX));
    assert!(
        p.is_file(),
        "{} not built (run the tests with cargo test, which builds it first)",
        p.display()
    );
    p
}

pub fn run(args: &[&str], cwd: &Path) -> Output {
    Command::new(bin())
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("hyperclone runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The failure contract: exit 1 and exactly one `error: ` line on stderr; returns that line.
pub fn one_error_line(out: &Output) -> String {
    let e = stderr(out);
    let lines: Vec<&str> = e.trim_end().lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {e}");
    assert!(lines[0].starts_with("error: "), "{e}");
    assert_eq!(out.status.code(), Some(1), "{e}");
    lines[0].to_string()
}

/// `hyperclone clone src dst FLAGS...` in `cwd` (the layout the tiny-folder tests use).
pub fn clone_src_dst(cwd: &Path, flags: &[&str]) -> Output {
    let mut args = vec!["clone", "src", "dst"];
    args.extend_from_slice(flags);
    run(&args, cwd)
}

/// `hyperclone plan src ARGS... --json` in `cwd`: the plan's JSON (the command must succeed).
pub fn plan_json(cwd: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["plan", "src"];
    a.extend_from_slice(args);
    a.push("--json");
    let out = run(&a, cwd);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `hyperclone verify SMALL BIG EXTRA... --json`: (passed, the report), with the exit status
/// checked against the report's verdict.
pub fn verify_json(small: &Path, big: &Path, extra: &[&str]) -> (bool, serde_json::Value) {
    let mut a = vec!["verify", small.to_str().unwrap(), big.to_str().unwrap()];
    a.extend_from_slice(extra);
    a.push("--json");
    let o = Command::new(bin())
        .args(&a)
        .output()
        .expect("hyperclone runs");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|_| panic!("no JSON; stderr: {}", stderr(&o)));
    assert_eq!(Some(o.status.success()), v["passed"].as_bool(), "{v}");
    (o.status.success(), v)
}
