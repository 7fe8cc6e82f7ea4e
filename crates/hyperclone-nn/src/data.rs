//! Training data: text files tokenized once into a cached, memory-mapped u32 token file,
//! and deterministic windows drawn from it.
//!
//! Windows are addressed by (seed, step, micro-batch, row) through a counter-based hash, so
//! the batch of step k never depends on earlier steps: a resumed run sees exactly the
//! batches of an uninterrupted one.

use crate::error::{NnError, Result};
use crate::rng::mix64;
use memmap2::Mmap;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// All .txt files under each path (the path itself when it is a file), sorted.
pub fn text_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let meta = std::fs::metadata(p).map_err(|e| hyperclone_core::Error::io(p, e))?;
        if meta.is_file() {
            out.push(p.to_path_buf());
        } else {
            for entry in std::fs::read_dir(p).map_err(|e| hyperclone_core::Error::io(p, e))? {
                let q = entry.map_err(|e| hyperclone_core::Error::io(p, e))?.path();
                if q.is_dir() {
                    walk(&q, out)?;
                } else if q.extension().is_some_and(|e| e == "txt") {
                    out.push(q);
                }
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        walk(p, &mut out)?;
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Tokenizes `files` with `tokenizer_json` into `cache_dir/<sha256>.u32` (little-endian
/// u32 ids, `eos` between files when given), keyed by the tokenizer's and the files' bytes,
/// and reuses an existing one. Written under a temporary name, renamed when complete.
pub fn tokenize_to_cache(
    tokenizer_json: &Path,
    files: &[PathBuf],
    eos: Option<u32>,
    cache_dir: &Path,
) -> Result<PathBuf> {
    let tok_bytes =
        std::fs::read(tokenizer_json).map_err(|e| hyperclone_core::Error::io(tokenizer_json, e))?;
    let mut h = Sha256::new();
    h.update(&tok_bytes);
    h.update(format!("{eos:?}"));
    let mut texts = Vec::with_capacity(files.len());
    for f in files {
        let text = std::fs::read(f).map_err(|e| hyperclone_core::Error::io(f, e))?;
        h.update(
            f.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        h.update((text.len() as u64).to_le_bytes());
        h.update(&text);
        texts.push(text);
    }
    let name = hyperclone_core::checkpoint::hex(&h.finalize());
    std::fs::create_dir_all(cache_dir).map_err(|e| hyperclone_core::Error::io(cache_dir, e))?;
    let path = cache_dir.join(format!("{name}.u32"));
    if path.exists() {
        return Ok(path);
    }
    let tokenizer = tokenizers::Tokenizer::from_bytes(&tok_bytes)
        .map_err(|e| NnError::Input(format!("{}: {e}", tokenizer_json.display())))?;
    let mut ids: Vec<u32> = Vec::new();
    for (f, text) in files.iter().zip(texts) {
        let text = String::from_utf8_lossy(&text);
        let enc = tokenizer
            .encode(text.as_ref(), false)
            .map_err(|e| NnError::Input(format!("tokenizing {}: {e}", f.display())))?;
        ids.extend_from_slice(enc.get_ids());
        ids.extend(eos);
    }
    let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    let tmp = cache_dir.join(format!(".{name}.partial"));
    std::fs::write(&tmp, bytes).map_err(|e| hyperclone_core::Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| hyperclone_core::Error::io(&path, e))?;
    Ok(path)
}

/// A memory-mapped token file.
pub struct TokenFile {
    map: Mmap,
    path: PathBuf,
}

impl TokenFile {
    pub fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| hyperclone_core::Error::io(path, e))?;
        // SAFETY: read-only map of a file we wrote and never modify in place.
        let map = unsafe { Mmap::map(&f) }.map_err(|e| hyperclone_core::Error::io(path, e))?;
        if map.len() % 4 != 0 {
            return Err(NnError::Input(format!(
                "{}: not a u32 token file",
                path.display()
            )));
        }
        Ok(TokenFile {
            map,
            path: path.to_path_buf(),
        })
    }

    pub fn len(&self) -> usize {
        self.map.len() / 4
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens [start, start + len).
    pub fn window(&self, start: usize, len: usize) -> Vec<u32> {
        self.map[start * 4..(start + len) * 4]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    fn check(&self, seq: usize) -> Result<()> {
        if self.len() < seq + 1 {
            return Err(NnError::Input(format!(
                "{}: {} tokens, fewer than one window of {} (--seq + 1)",
                self.path.display(),
                self.len(),
                seq + 1
            )));
        }
        Ok(())
    }
}

/// `batch` random windows of seq + 1 tokens for (seed, step, micro): (inputs, targets),
/// each row-major [batch, seq], targets = inputs shifted by one.
pub fn batch(
    tokens: &TokenFile,
    seed: u64,
    step: u64,
    micro: u64,
    batch: usize,
    seq: usize,
) -> Result<(Vec<u32>, Vec<u32>)> {
    tokens.check(seq)?;
    let starts = (tokens.len() - seq) as u64;
    let key = mix64(seed ^ mix64(step.wrapping_mul(0x1000_0000_01b3) ^ micro));
    let mut inputs = Vec::with_capacity(batch * seq);
    let mut targets = Vec::with_capacity(batch * seq);
    for row in 0..batch as u64 {
        let start = (mix64(key ^ mix64(row + 1)) % starts) as usize;
        let w = tokens.window(start, seq + 1);
        inputs.extend_from_slice(&w[..seq]);
        targets.extend_from_slice(&w[1..]);
    }
    Ok((inputs, targets))
}

/// `count` fixed windows spread evenly over the file (non-overlapping when it is long
/// enough): the same validation set at every evaluation.
pub fn eval_windows(tokens: &TokenFile, count: usize, seq: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    tokens.check(seq)?;
    let span = tokens.len() - seq - 1;
    let count = count.max(1);
    let mut inputs = Vec::with_capacity(count * seq);
    let mut targets = Vec::with_capacity(count * seq);
    for i in 0..count {
        let start = if count == 1 {
            0
        } else {
            span * i / (count - 1)
        };
        let w = tokens.window(start, seq + 1);
        inputs.extend_from_slice(&w[..seq]);
        targets.extend_from_slice(&w[1..]);
    }
    Ok((inputs, targets))
}
