//! Whether an output may be written: the one rule every command that writes follows.
//!
//! 1. An output never lands on one of the command's own inputs: not the same path (after
//!    resolving links), not the same file under another name (a hard link: same device and
//!    inode), not inside an input folder (a model folder is read as a whole), and no input
//!    inside an output folder the command replaces.
//! 2. An output never replaces an existing file or folder the command did not create unless
//!    the user says so (`--force`).
//!
//! Outputs are then written through [`crate::staging`], the one atomic replace.

use crate::error::{Error, Result};
use std::collections::HashSet;
use std::fs;
use std::path::{Component, Path, PathBuf};

/// Entries looked at when collecting the files of an input folder (hard-link identities):
/// a model folder has a handful; a pathological tree must not make the check slow.
const MAX_FOLDER_ENTRIES: usize = 100_000;

/// One input of a command.
struct Input {
    /// What the user wrote (for messages).
    given: PathBuf,
    /// Absolute, links resolved.
    resolved: PathBuf,
    /// A folder whose whole content is the input (a model folder).
    folder: bool,
}

/// The inputs of one command, to check its outputs against.
#[derive(Default)]
pub struct Inputs {
    inputs: Vec<Input>,
    /// (device, inode) of every input file, and of every file inside an input folder.
    ids: HashSet<(u64, u64)>,
}

impl Inputs {
    pub fn new() -> Inputs {
        Inputs::default()
    }

    /// Adds a file the command reads, or a folder it reads as a whole (a model folder).
    /// A path that does not exist is skipped: the command fails reading it anyway.
    pub fn add(&mut self, path: &Path) -> &mut Inputs {
        let Ok(resolved) = fs::canonicalize(path) else {
            return self;
        };
        let folder = resolved.is_dir();
        if folder {
            self.add_folder_ids(&resolved);
        } else if let Some(id) = file_id(&resolved) {
            self.ids.insert(id);
        }
        self.inputs.push(Input {
            given: path.to_path_buf(),
            resolved,
            folder,
        });
        self
    }

    /// Adds each of `paths` (see [`Inputs::add`]).
    pub fn add_all<P: AsRef<Path>>(&mut self, paths: &[P]) -> &mut Inputs {
        for p in paths {
            self.add(p.as_ref());
        }
        self
    }

    fn add_folder_ids(&mut self, dir: &Path) {
        let mut stack = vec![dir.to_path_buf()];
        let mut seen = 0usize;
        while let Some(d) = stack.pop() {
            let Ok(entries) = fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                seen += 1;
                if seen > MAX_FOLDER_ENTRIES {
                    return;
                }
                let Ok(meta) = e.metadata() else { continue };
                if meta.is_dir() {
                    stack.push(e.path());
                } else if let Some(id) = file_id(&e.path()) {
                    // Follows links: a link in the folder to a file elsewhere is read too.
                    self.ids.insert(id);
                }
            }
        }
    }

    /// Refuses `out` (a file or folder the command creates or replaces) when it is one of
    /// the inputs, lies inside an input folder, holds an input, or is an input file under
    /// another name (hard link). `flag` names the option in the message (`--out`).
    pub fn check_output(&self, flag: &str, out: &Path) -> Result<()> {
        let target = resolve(out)?;
        let refuse = |input: &Input, how: &str| {
            Err(Error::format(
                out,
                format!(
                    "{flag} {how} the input {}: refusing to write onto the command's own input",
                    input.given.display()
                ),
            ))
        };
        for input in &self.inputs {
            if target == input.resolved {
                return refuse(input, "is");
            }
            if input.folder && target.starts_with(&input.resolved) {
                return refuse(input, "lies inside");
            }
            if input.resolved.starts_with(&target) {
                return refuse(input, "holds");
            }
        }
        if let Some(id) = file_id(&target) {
            if self.ids.contains(&id) {
                return Err(Error::format(
                    out,
                    format!(
                        "{flag} is the same file (a hard link) as one of the command's inputs: refusing to write onto it"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Refuses an existing `out` unless `force`: a command replaces only what the user lets it.
pub fn refuse_existing(flag: &str, out: &Path, force: bool) -> Result<()> {
    if !force && out.symlink_metadata().is_ok() {
        return Err(Error::NeedsForce {
            path: out.to_path_buf(),
            role: format!("{flag}: "),
        });
    }
    Ok(())
}

/// `path` absolute with links resolved as far as it exists; the part that does not exist yet
/// is appended lexically (`.` dropped, `..` popped).
fn resolve(path: &Path) -> Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::io(path, e))?
            .join(path)
    };
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(c) = fs::canonicalize(existing) {
            let mut out = c;
            for part in rest.iter().rev() {
                match part {
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::CurDir => {}
                    other => out.push(other.as_os_str()),
                }
            }
            return Ok(out);
        }
        match (existing.parent(), existing.components().next_back()) {
            (Some(parent), Some(last)) => {
                rest.push(last);
                existing = parent;
            }
            _ => return Ok(abs),
        }
    }
}

/// (device, inode) of the file at `path` (links followed), where there is one.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(path)
            .ok()
            .filter(|m| m.is_file())
            .map(|m| (m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(paths: &[&Path]) -> Inputs {
        let mut i = Inputs::new();
        i.add_all(paths);
        i
    }

    #[test]
    fn outputs_onto_inputs_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let model = d.path().join("model");
        fs::create_dir(&model).unwrap();
        let weights = model.join("model.safetensors");
        fs::write(&weights, b"w").unwrap();
        let data = d.path().join("data.txt");
        fs::write(&data, b"text").unwrap();
        let i = inputs(&[&model, &data]);
        for bad in [
            weights.clone(),
            model.clone(),
            model.join("new.safetensors"),
            model.join("sub/../x"),
            data.clone(),
            d.path().to_path_buf(), // holds both inputs
            d.path().join("model/./model.safetensors"),
        ] {
            let e = i.check_output("--out", &bad).unwrap_err().to_string();
            assert!(e.contains("refusing to write onto"), "{bad:?}: {e}");
        }
        // A hard link to an input elsewhere, and a symlink to one.
        let hard = d.path().join("elsewhere.bin");
        fs::hard_link(&weights, &hard).unwrap();
        assert!(i.check_output("--out", &hard).is_err());
        #[cfg(unix)]
        {
            let soft = d.path().join("link.txt");
            std::os::unix::fs::symlink(&data, &soft).unwrap();
            assert!(i.check_output("--out", &soft).is_err());
        }
        // Beside the inputs is fine.
        assert!(i
            .check_output("--out", &d.path().join("logits.safetensors"))
            .is_ok());
        // A data file's folder is not itself an input: writing beside the data is fine.
        let only_data = inputs(&[&data]);
        assert!(only_data
            .check_output("--out", &d.path().join("tokenizer.json"))
            .is_ok());
    }

    #[test]
    fn existing_outputs_need_force() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out.bin");
        assert!(refuse_existing("--out", &out, false).is_ok());
        std::fs::write(&out, b"one").unwrap();
        assert!(refuse_existing("--out", &out, false).is_err());
        assert!(refuse_existing("--out", &out, true).is_ok());
    }
}
