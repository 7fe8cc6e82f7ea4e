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

/// Writes `tiny` at CWD/src and clones it into CWD/dst with FLAGS ([`clone_src_dst`]), which
/// must succeed; returns CWD/src.
pub fn tiny_cloned(tiny: &crate::tiny::Tiny, cwd: &Path, flags: &[&str]) -> PathBuf {
    let src = tiny.write(&cwd.join("src"));
    let out = clone_src_dst(cwd, flags);
    assert!(out.status.success(), "{flags:?}: {}", stderr(&out));
    src
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

/// `hyperclone verify SMALL BIG EXTRA... --json` must pass with the logits equal to 1e-9
/// relative (an exact clone stored in f64); returns the report. `what` names the case.
pub fn verify_exact(small: &Path, big: &Path, extra: &[&str], what: &str) -> serde_json::Value {
    let (ok, v) = verify_json(small, big, extra);
    let rel = v["max_rel_logit_diff"].as_f64().unwrap();
    assert!(ok && rel <= 1e-9, "{what}: {rel:e}: {v}");
    v
}

/// Copies the fixture folder `fixture` (config.json, model.safetensors) to WORK/src and runs
/// `args` (`SRC` standing for that copy, `OUT` for WORK/out): first untouched, which must
/// succeed, so the refusal is the edit's; then with config.json's `key` set to `value`, which
/// must fail with one error line containing `expect` and leave nothing at OUT.
pub fn refused_after_config_edit(
    fixture: &Path,
    work: &Path,
    args: &[&str],
    key: &str,
    value: serde_json::Value,
    expect: &str,
) {
    let (src, out) = (work.join("src"), work.join("out"));
    std::fs::create_dir_all(&src).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), src.join(f)).unwrap();
    }
    let (src_arg, out_arg) = (src.to_str().unwrap(), out.to_str().unwrap());
    let args: Vec<&str> = args
        .iter()
        .map(|&a| match a {
            "SRC" => src_arg,
            "OUT" => out_arg,
            a => a,
        })
        .collect();
    let ok = run(&args, work);
    assert!(ok.status.success(), "{args:?}: {}", stderr(&ok));
    let _ = std::fs::remove_dir_all(&out);
    let path = src.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    cfg[key] = value;
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    let err = one_error_line(&run(&args, work));
    assert!(err.contains(expect), "{key}: `{expect}` not in: {err}");
    assert!(!out.exists(), "{key}: nothing written");
}

/// `hyperclone clone SRC DST FLAGS...`, which must succeed.
pub fn clone_ok(src: &Path, dst: &Path, flags: &[&str]) {
    let mut args = vec!["clone", src.to_str().unwrap(), dst.to_str().unwrap()];
    args.extend_from_slice(flags);
    let o = run(&args, dst.parent().unwrap());
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
}

/// SRC cloned x2 and x3 in each of the paper's four variants, stored in f64, into WORK
/// (WORK/{n}-{variant}); each must verify exactly (`verify_extra` passed on). Returns each
/// clone's folder with its verify report.
pub fn every_variant_verifies_exactly(
    src: &Path,
    work: &Path,
    verify_extra: &[&str],
) -> Vec<(PathBuf, serde_json::Value)> {
    std::fs::create_dir_all(work).unwrap();
    let mut out = Vec::new();
    for n in ["2", "3"] {
        for variant in ["symmetric", "noisy", "diagonal", "noisy-diagonal"] {
            let dst = work.join(format!("{n}-{variant}"));
            clone_ok(
                src,
                &dst,
                &["--factor", n, "--variant", variant, "--dtype", "f64"],
            );
            let what = format!("{} x{n} {variant}", src.display());
            let report = verify_exact(src, &dst, verify_extra, &what);
            out.push((dst, report));
        }
    }
    out
}

/// Width x2, the FFN by `ffn_flags` and depth x2 in one noisy f64 clone of SRC at DST, which
/// must verify exactly (`verify_extra` passed on): per-layer lists and uneven FFN copies
/// follow each source layer to its new index.
pub fn wide_ffn_deep_verifies_exactly(
    src: &Path,
    dst: &Path,
    ffn_flags: &[&str],
    verify_extra: &[&str],
) {
    let mut flags = vec!["--factor", "2", "--depth-factor", "2"];
    flags.extend_from_slice(ffn_flags);
    flags.extend_from_slice(&["--variant", "noisy", "--dtype", "f64"]);
    clone_ok(src, dst, &flags);
    let what = format!("{} x2 depth x2 {ffn_flags:?}", src.display());
    verify_exact(src, dst, verify_extra, &what);
}

/// The `key` field of each entry of `list`, a JSON list in one of the binary's reports.
pub fn field_of_each<'a>(
    list: &'a serde_json::Value,
    key: &'a str,
) -> impl Iterator<Item = &'a serde_json::Value> + 'a {
    let entries = list
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"));
    entries.iter().map(move |x| &x[key])
}
