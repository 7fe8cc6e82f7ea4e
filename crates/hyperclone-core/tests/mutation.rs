//! A bounded, deterministic mutation harness for the readers a clone trusts: safetensors
//! files (bytes and header fields), config.json (fields) and the shard index. Every case
//! runs open -> plan -> clone in-process and must end in `Ok` or a clean `Err`: never a
//! panic, never a modified SRC, and after an error nothing beside SRC. A few hundred cases
//! run in a few seconds; the seed makes every failure reproducible.
//!
//! `HYPERCLONE_MUTATION_CASES=N` runs more (the default keeps `cargo test` quick).

use hyperclone_core::write::{write_clone, WriteEnv};
use hyperclone_core::{Checkpoint, DType, Error, GrowthOptions, Plan, Variant};
use serde_json::json;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::AtomicBool;

use hyperclone_testkit::files::{listing, snapshot};
use hyperclone_testkit::mutate::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    OpenFormat,
    OpenTensor,
    OpenConfig,
    OpenIo,
    PlanRefused,
    CloneRefused,
    Cloned,
}

fn classify(e: &Error, stage: &str) -> Outcome {
    match (stage, e) {
        ("open", Error::Format { .. }) => Outcome::OpenFormat,
        ("open", Error::Tensor { .. }) => Outcome::OpenTensor,
        ("open", Error::Config { .. }) => Outcome::OpenConfig,
        ("open", _) => Outcome::OpenIo,
        ("plan", _) => Outcome::PlanRefused,
        _ => Outcome::CloneRefused,
    }
}

/// (file, tensor, dtype, shape, absolute byte range) of every tensor: what a reader will read.
type Layout = Vec<(String, String, DType, Vec<usize>, usize, usize)>;

fn layout(ckpt: &Checkpoint) -> Layout {
    let mut v: Layout = ckpt
        .tensors
        .iter()
        .map(|t| {
            let f = &ckpt.files[t.file].path;
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            let i = &t.info;
            (
                name,
                i.name.clone(),
                i.dtype,
                i.shape.clone(),
                i.start,
                i.len,
            )
        })
        .collect();
    v.sort();
    v
}

/// The layout of an unmutated fixture.
fn original_layout(files: &Files) -> Layout {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    layout(&Checkpoint::open(dir.path()).unwrap())
}

fn run_case(root: &Path, factor: usize, expect_layout: Option<&Layout>) -> Outcome {
    let src = root.join("src");
    let dst = root.join("dst");
    let ckpt = match Checkpoint::open(&src) {
        Ok(c) => c,
        Err(e) => return classify(&e, "open"),
    };
    // A byte-level mutation of a weight file that is accepted must not move what is read:
    // the same tensors at the same bytes (the header-length-into-padding misread).
    if let Some(expected) = expect_layout {
        assert_eq!(&layout(&ckpt), expected, "accepted, but reads other bytes");
    }
    let options = GrowthOptions {
        factor,
        ffn_factor: factor,
        variant: Variant::Noisy,
        snr_db: 10.0,
        seed: 1,
        dtype: None,
        shard_size: 4096,
        ..GrowthOptions::default()
    };
    let plan = match Plan::new(&ckpt, &options, &BTreeMap::new()) {
        Ok(p) => p,
        Err(e) => return classify(&e, "plan"),
    };
    let cancel = AtomicBool::new(false);
    let env = WriteEnv::quiet(&cancel);
    match write_clone(&ckpt, &plan, "card", &dst, false, &env) {
        Ok(_) => {
            // What was cloned must open again (no half-valid output).
            Checkpoint::open(&dst).expect("a finished clone opens");
            std::fs::remove_dir_all(&dst).unwrap();
            Outcome::Cloned
        }
        Err(e) => classify(&e, "clone"),
    }
}

#[test]
#[ignore = "slow lane: scripts/test-all.sh runs it (cargo test -- --include-ignored)"]
fn mutated_inputs_never_panic_modify_src_or_leave_files() {
    let cases = case_count("HYPERCLONE_MUTATION_CASES", 720);
    let mut rng = Rng(0x5eed_1234);
    let mut outcomes: BTreeMap<Outcome, usize> = BTreeMap::new();
    let root = tempfile::tempdir().unwrap();
    let factors = [2usize, 3, 1, 1 << 20, 576_460_752_303_423_488, usize::MAX];
    let single_layout = original_layout(&single());
    let sharded_layout = original_layout(&sharded());
    for case in 0..cases {
        let (files, what) = mutate(&mut rng, case);
        let src = write_case(root.path(), case, &files);
        let dir = src.parent().unwrap().to_path_buf();
        // Mostly factor 2; sometimes a hostile factor on top of the mutation.
        let factor = if rng.below(6) == 0 {
            *rng.pick(&factors)
        } else {
            2
        };
        let before = snapshot(&src);
        // Kinds 0-2 (mutate) edit a weight file's bytes: length prefix, header, size.
        let expect = (case % 9 <= 2).then(|| {
            if files.contains_key("model.safetensors.index.json") {
                &sharded_layout
            } else {
                &single_layout
            }
        });
        let outcome = catch_unwind(AssertUnwindSafe(|| run_case(&dir, factor, expect)))
            .unwrap_or_else(|_| panic!("case {case} panicked: {what} (factor {factor})"));
        assert_eq!(snapshot(&src), before, "case {case} modified SRC: {what}");
        assert_eq!(listing(&dir), ["src"], "case {case} left files: {what}");
        *outcomes.entry(outcome).or_default() += 1;
        std::fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!("{cases} mutation cases: {outcomes:?}");
    assert_eq!(outcomes.values().sum::<usize>(), cases);
    // The harness must exercise both ends: refusals of every reader, and clean clones.
    for o in [
        Outcome::OpenFormat,
        Outcome::OpenTensor,
        Outcome::OpenConfig,
        Outcome::Cloned,
    ] {
        assert!(
            outcomes.contains_key(&o),
            "no case ended in {o:?}: {outcomes:?}"
        );
    }
}

/// The classes of the second campaign (issue 18), seeded: each case ends as transformers'
/// rules say (refused naming the cause, or read from the file transformers reads), never
/// in a panic, a modified SRC or files beside it.
#[test]
#[ignore = "slow lane: scripts/test-all.sh runs it (cargo test -- --include-ignored)"]
fn round_two_classes_end_as_transformers_rules_say() {
    let cases = case_count("HYPERCLONE_MUTATION_CASES", 200);
    let mut rng = Rng(0x18_2026);
    let root = tempfile::tempdir().unwrap();
    let single_layout = original_layout(&single());
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for case in 0..cases {
        let (files, what, expect) = mutate_round_two(&mut rng, case);
        let src = write_case(root.path(), case, &files);
        let dir = src.parent().unwrap().to_path_buf();
        let before = snapshot(&src);
        let opened = catch_unwind(AssertUnwindSafe(|| Checkpoint::open(&src)))
            .unwrap_or_else(|_| panic!("case {case} panicked opening: {what}"));
        match (expect, opened) {
            (Expect::Refused(needle), Err(e)) => {
                let msg = e.to_string();
                assert!(msg.contains(needle), "case {case} ({what}): {msg}");
                assert_eq!(msg.lines().count(), 1, "case {case}: {msg}");
            }
            (Expect::Refused(_), Ok(_)) => panic!("case {case} accepted: {what}"),
            (Expect::ReadsSingleFile, Ok(ckpt)) => {
                assert_eq!(
                    layout(&ckpt),
                    single_layout,
                    "case {case} ({what}) read the shards"
                );
            }
            (Expect::Accepted, Ok(_)) => {}
            (_, Err(e)) => panic!("case {case} refused ({what}): {e}"),
        }
        // Every accepted case also plans and clones cleanly (grown output opens again).
        if !matches!(expect, Expect::Refused(_)) {
            let outcome = catch_unwind(AssertUnwindSafe(|| run_case(&dir, 2, None)))
                .unwrap_or_else(|_| panic!("case {case} panicked: {what}"));
            assert_eq!(outcome, Outcome::Cloned, "case {case}: {what}");
        }
        assert_eq!(snapshot(&src), before, "case {case} modified SRC: {what}");
        assert_eq!(listing(&dir), ["src"], "case {case} left files: {what}");
        *seen.entry(format!("{expect:?}")).or_default() += 1;
        std::fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!("{cases} round-two cases: {seen:?}");
    // Five classes, two ways each for the tie (refused, accepted): six outcomes.
    assert!(
        cases < 10 || seen.len() == 6,
        "every expectation exercised: {seen:?}"
    );
}

/// A recipe accepts and refuses exactly what the flags do: the same hostile value, given
/// as a flag and as a recipe option (JSON and YAML spellings), ends alike.
#[test]
fn recipe_options_end_exactly_as_the_flags_do() {
    use hyperclone_core::{GrowthOptions, GrowthSpec};
    let root = tempfile::tempdir().unwrap();
    let cfg_path = root.path().join("config.json");
    std::fs::write(&cfg_path, serde_json::to_vec(&config()).unwrap()).unwrap();
    let cfg = hyperclone_core::config::ModelConfig::load(&cfg_path).unwrap();
    let recipe = root.path().join("r.yaml");
    // Resolved and validated, as planning does (the ranges are the plan's to check).
    let resolved = |s: &GrowthSpec| -> hyperclone_core::Result<GrowthOptions> {
        let o = s.resolve(&cfg)?;
        o.validate()?;
        Ok(o)
    };
    // The same, from a recipe whose `options:` block is OPTIONS (YAML, one key a line).
    let by_recipe = |options: &str| {
        let text = format!(
            "hyperclone_recipe: 1\noptions:\n  {}\n",
            options.replace('\n', "\n  ")
        );
        std::fs::write(&recipe, text).unwrap();
        hyperclone_core::recipe::Recipe::load(&recipe).and_then(|r| resolved(&r.spec))
    };
    // The recipe's YAML and the flags' spec both refuse, or both give the same FIELD.
    let agree = |yaml: &str, spec: &GrowthSpec, field: fn(&GrowthOptions) -> String| {
        let (r, f) = (
            by_recipe(yaml).map(|o| field(&o)),
            resolved(spec).map(|o| field(&o)),
        );
        assert_eq!(
            r.as_ref().ok(),
            f.as_ref().ok(),
            "{yaml}: recipe {r:?}, flag {f:?}"
        );
    };
    // (YAML spelling, the flag's value); None: clap refuses the text before any rule.
    let snrs: [(&str, Option<f64>); 14] = [
        ("10", Some(10.0)),
        ("0", Some(0.0)),
        ("-0.0", Some(-0.0)),
        ("20.5", Some(20.5)),
        ("-1e-9", Some(-1e-9)),
        ("-10", Some(-10.0)),
        ("-20", Some(-20.0)),
        ("-1000", Some(-1000.0)),
        (".inf", Some(f64::INFINITY)),
        ("-.inf", Some(f64::NEG_INFINITY)),
        (".nan", Some(f64::NAN)),
        ("+.Inf", Some(f64::INFINITY)),
        ("1e308", Some(1e308)),
        ("-1.7976931348623157e308", Some(f64::MIN)),
    ];
    for (text, flag) in snrs {
        let spec = GrowthSpec {
            factor: Some("2".into()),
            variant: "noisy".into(),
            snr_db: flag.unwrap(),
            ..GrowthSpec::default()
        };
        let yaml = format!("factor: 2\nvariant: noisy\nsnr_db: {text}");
        agree(&yaml, &spec, |o| format!("{:?}", o.snr_db));
    }
    // The flag's text is the YAML spelling unquoted.
    for text in [
        "5GB",
        "2KiB",
        "1",
        "0",
        "0.4",
        "1.5",
        "\"5 parsecs\"",
        "-1",
        "\"\"",
    ] {
        let spec = GrowthSpec {
            factor: Some("2".into()),
            shard_size: text.trim_matches('"').into(),
            ..GrowthSpec::default()
        };
        let yaml = format!("factor: 2\nshard_size: {text}");
        agree(&yaml, &spec, |o| format!("{:?}", o.shard_size));
    }
    for text in ["2", "0", "1.5", "3", "\"2\""] {
        let spec = GrowthSpec {
            factor: Some(text.trim_matches('"').into()),
            ..GrowthSpec::default()
        };
        agree(&format!("factor: {text}"), &spec, |o| {
            format!("{:?}", o.factor)
        });
    }
}

/// The header-length-into-padding attack of issue 10, and holes/trailing bytes, at the
/// library level: each is refused, naming the file.
#[test]
fn shifted_header_length_and_uncovered_bytes_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let src = root.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(
        src.join("config.json"),
        serde_json::to_vec(&config()).unwrap(),
    )
    .unwrap();
    let good = safetensors_bytes(&tensors());
    let n = u64::from_le_bytes(good[..8].try_into().unwrap());
    let mut cases: Vec<(Vec<u8>, &str)> = Vec::new();
    // Shift the length back over every byte of the JSON's space padding (the JSON stays
    // valid; the first tensor would be read from the padding).
    let pad = good[8..8 + n as usize]
        .iter()
        .rev()
        .take_while(|&&c| c == b' ')
        .count() as u64;
    assert!(pad > 0, "the fixture's header is padded");
    for d in 1..=pad {
        let mut b = good.clone();
        b[..8].copy_from_slice(&(n - d).to_le_bytes());
        cases.push((b, "trailing bytes"));
    }
    let mut b = good.clone();
    b.extend_from_slice(&[0; 4]);
    cases.push((b, "4 trailing bytes"));
    let hole = with_header(&good, |h| {
        let mut ends = Vec::new();
        for (k, v) in h.iter() {
            if k != "__metadata__" {
                ends.push((v["data_offsets"][0].as_u64().unwrap(), k.clone()));
            }
        }
        ends.sort();
        // Move the last tensor 4 bytes later (into 4 appended bytes).
        let (start, name) = ends.last().unwrap().clone();
        let len = h[&name]["data_offsets"][1].as_u64().unwrap() - start;
        h[&name]["data_offsets"] = json!([start + 4, start + 4 + len]);
    });
    let mut hole = hole;
    hole.extend_from_slice(&[0; 4]);
    cases.push((hole, "hole of 4 bytes"));
    for (bytes, expect) in cases {
        std::fs::write(src.join("model.safetensors"), &bytes).unwrap();
        let msg = match Checkpoint::open(&src) {
            Ok(_) => panic!("accepted a file needing `{expect}`"),
            Err(e) => e.to_string(),
        };
        assert!(
            msg.contains("model.safetensors") && msg.contains(expect),
            "{msg}"
        );
    }
}
