//! Sanity bounds on sizes that come from input files and flags, and a reader for the small
//! JSON files of a model folder that refuses anything but a bounded regular file.
//!
//! Every size a user controls (config.json fields, safetensors shapes, growth factors) is
//! multiplied with checked arithmetic and held to these bounds, so a hostile file ends in
//! one error line instead of a wrapped product, an allocation abort or a minutes-long loop.

use crate::error::{Error, Result};
use std::io::Read;
use std::path::Path;

/// Elements of one tensor (source or destination): 2^40, 8 TiB of f64. Larger is corrupt.
pub const MAX_TENSOR_ELEMENTS: u64 = 1 << 40;

/// Transformer layers (the deepest released models have a few hundred).
pub const MAX_LAYERS: usize = 1 << 16;

/// config.json, the shard index, trainer_state.json and other small JSON files.
pub const MAX_JSON_BYTES: u64 = 64 << 20;

/// Refuses FIFOs, devices, sockets and folders (following symlinks): reading one would
/// hang or never end.
pub fn ensure_regular_file(path: &Path) -> Result<std::fs::Metadata> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::format(
            path,
            format!(
                "is not a regular file (it is a {}); refusing to read it",
                file_kind(&meta)
            ),
        ));
    }
    Ok(meta)
}

fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() {
            return "FIFO";
        }
        if t.is_char_device() || t.is_block_device() {
            return "device";
        }
        if t.is_socket() {
            return "socket";
        }
    }
    if meta.is_dir() {
        "folder"
    } else {
        "special file"
    }
}

/// The bytes of a regular file of at most `limit` bytes.
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let meta = ensure_regular_file(path)?;
    if meta.len() > limit {
        return Err(Error::format(
            path,
            format!(
                "is {} bytes, over the {limit}-byte limit for this file",
                meta.len()
            ),
        ));
    }
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // A file that grows while read is still cut at the limit.
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(Error::format(
            path,
            format!("is over the {limit}-byte limit for this file"),
        ));
    }
    Ok(bytes)
}

/// A small JSON file (config.json, an index), bounded and parsed.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bytes = read_bounded(path, MAX_JSON_BYTES)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))
}

/// The product of `dims`, or `None` when it overflows or exceeds [`MAX_TENSOR_ELEMENTS`].
pub fn checked_numel(dims: &[usize]) -> Option<u64> {
    dims.iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .filter(|&n| n <= MAX_TENSOR_ELEMENTS)
}
