//! The one atomic replace, used by every command that writes.
//!
//! Whatever is written (a clone folder, a training checkpoint `OUT/last`, a token cache,
//! a tokenizer, logits, a recipe) is first written beside its target under a temporary
//! name, synced to disk, and renamed over the target only when complete: a reader sees the
//! old target or the whole new one, never a half-written one, and a failure (or Ctrl-C)
//! leaves the target as it was.
//!
//! - [`write_file`] / [`write_file_with`]: one file, through `.NAME.hyperclone-tmp-PID`.
//!   An existing file (or a link) at the target is replaced, never written through, so a
//!   hard link to the old file keeps its old bytes.
//! - [`StagedDir`]: a folder, through `.NAME.hyperclone-partial-PID`; an existing target
//!   (when the caller allows replacing it) is moved aside to `.NAME.hyperclone-replaced-PID`
//!   and put back if the new folder cannot be moved in, then deleted.
//!
//! Syncing: each file is synced before its rename, a staged folder's files and the folder
//! itself before the folder's rename, and the parent folder after it (on Unix), so that
//! after a power cut the target is the old or the new one, not an empty file.

use crate::error::{Error, Result};
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` all or nothing (see the module documentation).
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file_with(path, |w| w.write_all(bytes).map_err(|e| Error::io(path, e)))
}

/// Streams a file to `path` all or nothing: `fill` writes into a buffered temporary file
/// beside `path`, which is synced and renamed over `path` when `fill` succeeds, and removed
/// when it fails (its error is returned).
pub fn write_file_with<E: From<Error>>(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<fs::File>) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let tmp = temp_sibling(path, "tmp")?;
    // Our own name: left by an earlier process with this PID (PIDs are reused).
    if tmp.symlink_metadata().is_ok() {
        remove_entry(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| Error::io(path, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let written = fill(&mut w).and_then(|()| {
        let f = w
            .into_inner()
            .map_err(|e| Error::io(path, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(path, e))?;
        drop(f);
        fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        Ok(())
    });
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    sync_parent(path);
    Ok(())
}

/// A temporary folder beside a target folder, removed on drop unless committed.
pub struct StagedDir {
    path: PathBuf,
    committed: bool,
}

impl StagedDir {
    /// Creates `.DST.hyperclone-partial-PID` beside `dst` (an entry of that name, left by an
    /// earlier process with this PID, is removed first).
    pub fn create(dst: &Path) -> Result<StagedDir> {
        let path = sibling(dst, "partial")?;
        if path.symlink_metadata().is_ok() {
            remove_entry(&path).map_err(|e| Error::io(&path, e))?;
        }
        fs::create_dir(&path).map_err(|e| Error::io(&path, e))?;
        Ok(StagedDir {
            path,
            committed: false,
        })
    }

    /// The folder to write into.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the complete folder to `dst`. An existing `dst` is replaced only when
    /// `replace` (the caller has checked the user allows it); if the move fails it is put
    /// back. Replacing fails, with the new folder in place, only when the old one cannot be
    /// fully deleted afterwards; the message says where its remains are.
    pub fn commit(mut self, dst: &Path, replace: bool) -> Result<()> {
        sync_tree(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let old = if replace && dst.symlink_metadata().is_ok() {
            let old = sibling(dst, "replaced")?;
            fs::rename(dst, &old).map_err(|e| Error::io(dst, e))?;
            Some(old)
        } else {
            None
        };
        if let Err(e) = fs::rename(&self.path, dst) {
            if let Some(old) = &old {
                let _ = fs::rename(old, dst); // put the previous DST back
            }
            return Err(Error::io(dst, e));
        }
        self.committed = true;
        sync_parent(dst);
        if let Some(old) = old {
            remove_entry(&old).map_err(|e| {
                Error::format(
                    dst,
                    format!(
                        "now holds the new output, but the previous {} (moved to {}) could not be fully deleted ({e}); \
                         what is left of it is there: remove it yourself",
                        dst.display(),
                        old.display()
                    ),
                )
            })?;
        }
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// The temporary entries a [`StagedDir`] for `dst` uses (the staging folder and the place
/// a replaced `dst` is moved to), as `dst` is written (its folder need not exist yet):
/// commands check them against their inputs too.
pub fn staging_paths(dst: &Path) -> Result<[PathBuf; 2]> {
    Ok([
        temp_sibling(dst, "partial")?,
        temp_sibling(dst, "replaced")?,
    ])
}

/// Removes `.DST.hyperclone-partial-PID` entries left beside DST by processes that no
/// longer exist (killed by SIGKILL, a crash or a power cut); returns what it removed.
/// Only names we create qualify (PID written as `process::id()` prints it: no sign, no
/// leading zero), whatever the entry has become (a folder, or a file, FIFO or symlink put
/// there since: each blocked every later write with "Not a directory"); a symlink is
/// removed itself, never followed. Entries of live processes, and `-replaced-` folders (a
/// previous DST), are never touched.
pub fn remove_stale_siblings(dst: &Path) -> Result<Vec<PathBuf>> {
    let abs = absolute_lexical(dst)?;
    let (Some(parent), Some(name)) = (abs.parent(), abs.file_name()) else {
        return Ok(Vec::new());
    };
    let prefix = format!(".{}.hyperclone-partial-", name.to_string_lossy());
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(parent) else {
        return Ok(removed);
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = file_name
            .strip_prefix(&prefix)
            .and_then(|p| p.parse::<u32>().ok().filter(|pid| pid.to_string() == p))
        else {
            continue;
        };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let path = entry.path();
        remove_entry(&path).map_err(|e| Error::io(&path, e))?;
        removed.push(path);
    }
    Ok(removed)
}

/// Removes a folder with its contents, or any other entry (file, FIFO, socket, symlink)
/// by itself; symlinks are never followed (neither at `path` nor inside a folder).
pub(crate) fn remove_entry(path: &Path) -> std::io::Result<()> {
    if fs::symlink_metadata(path)?.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

/// Whether a process exists; `true` where this cannot be told (nothing is removed then).
fn process_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return true;
    }
    proc.join(pid.to_string()).exists()
}

/// An absolute path with its parent resolved through symlinks (DST itself need not exist).
pub(crate) fn absolute_lexical(p: &Path) -> Result<PathBuf> {
    let name = p
        .file_name()
        .ok_or_else(|| Error::format(p, "destination needs a folder name"))?;
    let parent = match p.parent() {
        Some(q) if !q.as_os_str().is_empty() => q.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let parent = fs::canonicalize(&parent).map_err(|e| Error::io(&parent, e))?;
    Ok(parent.join(name))
}

/// `.NAME.hyperclone-WHAT-PID` beside `dst` (parent resolved).
fn sibling(dst: &Path, what: &str) -> Result<PathBuf> {
    let abs = absolute_lexical(dst)?;
    let name = abs
        .file_name()
        .expect("has a name")
        .to_string_lossy()
        .into_owned();
    Ok(abs.with_file_name(format!(".{name}.hyperclone-{what}-{}", std::process::id())))
}

/// `.NAME.hyperclone-WHAT-PID` beside a file, without resolving its parent (the file's own
/// folder is where it is renamed, whatever links lead there).
fn temp_sibling(path: &Path, what: &str) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::format(path, "needs a file name"))?;
    Ok(path.with_file_name(format!(
        ".{}.hyperclone-{what}-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// Syncs every regular file under `dir`, then `dir` and its subfolders (Unix; elsewhere
/// files only).
fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            sync_tree(&entry.path())?;
        } else if kind.is_file() {
            fs::File::open(entry.path())?.sync_all()?;
        }
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        fs::File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Syncs the folder holding `path`, so a rename into it survives a power cut. Best effort:
/// the rename has happened; some file systems refuse to sync a folder.
fn sync_parent(path: &Path) {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let _ = sync_dir(parent);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_replace_links_and_leave_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out.bin");
        write_file(&out, b"one").unwrap();
        let other = d.path().join("other.bin");
        fs::hard_link(&out, &other).unwrap();
        write_file(&out, b"two").unwrap();
        assert_eq!(fs::read(&out).unwrap(), b"two");
        assert_eq!(
            fs::read(&other).unwrap(),
            b"one",
            "the other name keeps its bytes"
        );
        // A failing writer leaves the target as it was and no temporary.
        let failed: Result<()> = write_file_with(&out, |w| {
            w.write_all(b"half").unwrap();
            Err(Error::format(&out, "stopped"))
        });
        assert!(failed.unwrap_err().to_string().contains("stopped"));
        assert_eq!(fs::read(&out).unwrap(), b"two");
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            2,
            "no temporary left"
        );
    }

    #[test]
    fn folders_are_replaced_only_when_allowed_and_dropped_stagings_vanish() {
        let d = tempfile::tempdir().unwrap();
        let dst = d.path().join("dst");
        let s = StagedDir::create(&dst).unwrap();
        fs::write(s.path().join("a"), b"1").unwrap();
        s.commit(&dst, false).unwrap();
        assert_eq!(fs::read(dst.join("a")).unwrap(), b"1");

        // Without `replace`, an existing DST stays and the staging folder goes.
        let s = StagedDir::create(&dst).unwrap();
        fs::write(s.path().join("a"), b"2").unwrap();
        assert!(s.commit(&dst, false).is_err());
        assert_eq!(fs::read(dst.join("a")).unwrap(), b"1");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);

        let s = StagedDir::create(&dst).unwrap();
        fs::write(s.path().join("b"), b"3").unwrap();
        s.commit(&dst, true).unwrap();
        assert!(!dst.join("a").exists());
        assert_eq!(fs::read(dst.join("b")).unwrap(), b"3");

        // Dropped before commit (an error, Ctrl-C): nothing but DST is left.
        let s = StagedDir::create(&dst).unwrap();
        fs::write(s.path().join("c"), b"4").unwrap();
        drop(s);
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("dst")]);
    }
}
