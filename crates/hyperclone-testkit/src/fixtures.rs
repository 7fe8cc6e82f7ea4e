//! The committed fixtures under `tests/fixtures` (made by the Python scripts beside them).

use std::path::PathBuf;

/// `tests/fixtures` of the workspace.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// `tests/fixtures/tiny/NAME`: the Llama-like fixtures of make_fixtures.py.
pub fn tiny(name: &str) -> PathBuf {
    root().join("tiny").join(name)
}

/// `tests/fixtures/families/NAME`: one fixture per non-Llama family (make_family_fixtures.py).
pub fn family(name: &str) -> PathBuf {
    root().join("families").join(name)
}

/// Every family fixture (name, model_type), from families/MANIFEST.json, in its order: a
/// test over "every family" covers a new one as soon as its fixture is committed.
pub fn families() -> Vec<(String, String)> {
    let path = root().join("families/MANIFEST.json");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let list = manifest["fixtures"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no `fixtures` list", path.display()))
        .iter()
        .map(|f| {
            let field = |k: &str| {
                f[k].as_str()
                    .unwrap_or_else(|| panic!("{}: a fixture without `{k}`", path.display()))
            };
            (field("name").to_string(), field("model_type").to_string())
        })
        .collect::<Vec<_>>();
    assert!(!list.is_empty(), "{}: no fixtures", path.display());
    list
}

/// The fixture folders (those with a config.json) under `tests/fixtures/SUB`, sorted.
pub fn dirs(sub: &str) -> Vec<PathBuf> {
    let dir = root().join(sub);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("config.json").exists())
        .collect();
    v.sort();
    v
}
