//! Folder listings and snapshots, for "input unchanged" and "nothing left behind" checks.

use std::collections::BTreeMap;
use std::path::Path;

/// Entries of a folder, sorted, for "nothing left behind" checks.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Every entry of a folder (not recursive) with its bytes, for "input unchanged" checks.
/// Special files (FIFOs, links to devices) are recorded by kind, never read.
pub fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    listing(dir)
        .into_iter()
        .map(|f| {
            let p = dir.join(&f);
            let bytes = match std::fs::symlink_metadata(&p).unwrap() {
                m if m.is_file() => std::fs::read(&p).unwrap(),
                m if m.file_type().is_symlink() => {
                    format!("-> {}", std::fs::read_link(&p).unwrap().display()).into_bytes()
                }
                m => format!("{:?}", m.file_type()).into_bytes(),
            };
            (f, bytes)
        })
        .collect()
}

/// One tensor of an open checkpoint decoded to f64, with its shape.
pub fn decoded(ckpt: &hyperclone_core::Checkpoint, name: &str) -> (Vec<f64>, Vec<usize>) {
    let t = ckpt
        .find(name)
        .unwrap_or_else(|| panic!("{}: no {name}", ckpt.dir.display()));
    let mut v = vec![0.0; t.info.numel()];
    t.info
        .dtype
        .decode(ckpt.files[t.file].data(&t.info), &mut v);
    (v, t.info.shape.clone())
}

/// [`decoded`] from a checkpoint folder.
pub fn tensor_values(dir: &Path, name: &str) -> (Vec<f64>, Vec<usize>) {
    decoded(&hyperclone_core::Checkpoint::open(dir).unwrap(), name)
}

/// Rewrites one tensor of a checkpoint folder in place (decoded to f64, edited, encoded back
/// in its own dtype): how tests plant a known bug in a correct clone.
pub fn edit_tensor(dir: &Path, name: &str, edit: impl FnOnce(&mut Vec<f64>, &[usize])) {
    let ckpt = hyperclone_core::Checkpoint::open(dir).unwrap();
    let (mut v, shape) = decoded(&ckpt, name);
    let t = ckpt.find(name).unwrap().clone();
    let path = ckpt.files[t.file].path.clone();
    drop(ckpt);
    edit(&mut v, &shape);
    let mut bytes = std::fs::read(&path).unwrap();
    t.info
        .dtype
        .encode(&v, &mut bytes[t.info.start..t.info.start + t.info.len]);
    std::fs::write(&path, bytes).unwrap();
}

/// [`edit_tensor`] scaling every value by `factor`.
pub fn scale_tensor(dir: &Path, name: &str, factor: f64) {
    edit_tensor(dir, name, |v, _| v.iter_mut().for_each(|x| *x *= factor));
}
