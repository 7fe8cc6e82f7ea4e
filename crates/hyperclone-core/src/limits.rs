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

/// Deepest nesting a recipe (or any small JSON/YAML file we parse as a tree) may have; our
/// own recipes nest about 6 deep.
pub const MAX_NESTING: usize = 64;

/// Most items (values, entries, lines) a recipe may have. The largest real one, `plan
/// --json` of a growth to [`MAX_LAYERS`] layers, has about 600k; a 40 MB list of 20M
/// numbers took 90 s and 8 GB to parse as YAML (4 MB of JSON: 7 s, 0.5 GB).
pub const MAX_ITEMS: usize = 1 << 20;

/// Refuses text nested deeper than [`MAX_NESTING`], in one linear pass, before any parser
/// sees it: the YAML parser takes quadratic time in the depth (100k levels took minutes and
/// ignored Ctrl-C). The count is an upper bound on the real depth, never below it: every
/// `[`/`{` opens a level wherever it stands (inside a quoted string too), and in block
/// context each deeper indentation and each `- `/`? ` that opens a compact nested entry on
/// one line is a level. It may over-count text with dozens of unclosed brackets inside a
/// string; a recipe has none.
///
/// It also counts items (every `,`, `[`, `{` and line) and refuses more than [`MAX_ITEMS`]:
/// parsers allocate per item, so that bounds their time and memory too.
pub fn check_nesting(text: &str) -> std::result::Result<(), String> {
    let too_deep = |line: usize| {
        Err(format!(
            "nests more than {MAX_NESTING} levels deep (line {line}); a recipe nests a few levels"
        ))
    };
    let items = text
        .bytes()
        .filter(|b| matches!(b, b',' | b'[' | b'{' | b'\n'))
        .count();
    if items > MAX_ITEMS {
        return Err(format!(
            "has {items} items (values, entries, lines), over the limit of {MAX_ITEMS}; a recipe has a few \
             per layer"
        ));
    }
    let mut flow = 0usize; // open [ and { not yet closed
    let mut indents: Vec<usize> = Vec::new(); // block context: the open indentation levels
    for (i, line) in text.lines().enumerate() {
        let content = line.trim_start_matches(' ');
        let indent = line.len() - content.len();
        if flow == 0 && !content.is_empty() && !content.starts_with('#') {
            while indents.last().is_some_and(|&top| top >= indent) {
                indents.pop();
            }
            indents.push(indent);
            // `- - - x` and `? ? x` open one nested collection per indicator.
            let mut rest = content;
            let mut compact = 0;
            while let Some(r) = ["- ", "? ", "-\t", "?\t"]
                .iter()
                .find_map(|p| rest.strip_prefix(p))
            {
                compact += 1;
                rest = r.trim_start_matches([' ', '\t']);
            }
            if indents.len() + compact > MAX_NESTING {
                return too_deep(i + 1);
            }
        }
        for b in content.bytes() {
            match b {
                b'[' | b'{' => {
                    flow += 1;
                    if indents.len() + flow > MAX_NESTING {
                        return too_deep(i + 1);
                    }
                }
                b']' | b'}' => flow = flow.saturating_sub(1),
                _ => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_is_bounded_in_every_syntax() {
        let ok = "hyperclone_recipe: 1\noptions:\n  factor: 2\n  seed: [1, {a: [2]}]\n";
        assert!(check_nesting(ok).is_ok());
        let deep = |open: &str, close: &str, n: usize| open.repeat(n) + &close.repeat(n);
        assert!(check_nesting(&deep("[", "]", MAX_NESTING - 1)).is_ok());
        assert!(check_nesting(&deep("[", "]", 100_000)).is_err());
        assert!(check_nesting(&deep("{\"a\":", "}", 100)).is_err());
        let block: String = (0..100).map(|d| format!("{}k:\n", " ".repeat(d))).collect();
        assert!(check_nesting(&block).is_err());
        let dashes = format!("{}x\n", "- ".repeat(100));
        assert!(check_nesting(&dashes).is_err());
        // Sibling keys at one indentation are one level, however many.
        let wide: String = (0..10_000).map(|i| format!("k{i}: 1\n")).collect();
        assert!(check_nesting(&wide).is_ok());
        // Flat but huge: bounded by the item count.
        assert!(check_nesting(&format!("[{}1]", "1,".repeat(MAX_ITEMS))).is_err());
        assert!(check_nesting(&"k: 1\n".repeat(MAX_ITEMS + 1)).is_err());
    }
}
