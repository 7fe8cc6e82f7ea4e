//! `hyperclone demo` runs offline from any folder, verifies its clone and shows that both
//! models continue the verse with the same words.

#[test]
fn demo_grows_verifies_and_both_models_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hyperclone"))
        .arg("demo")
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("-> PASS"), "{text}");
    let line = |label: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no {label} line: {text}"))
            .split_once(':')
            .unwrap()
            .1
            .to_string()
    };
    assert_eq!(line("small:"), line("grown:"));
    assert!(
        line("small:").len() > "ROMEO. / But soft, what light".len() + 10,
        "it generated something: {text}"
    );
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "the demo leaves nothing behind"
    );
}
