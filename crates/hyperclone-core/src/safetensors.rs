//! A strict, memory-mapped safetensors reader and the header writer.
//!
//! We parse the format ourselves (it is 8 bytes of header length, a JSON header, then raw
//! little-endian data) so that every defect is reported with the file and tensor it concerns:
//! truncated files, header lengths or offsets past the end, overlapping tensors, and byte
//! ranges that disagree with dtype x shape. Nothing is copied: tensors are slices of the map.

use crate::dtype::DType;
use crate::error::{Error, Result};
use memmap2::Mmap;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Headers larger than this are refused, as the reference implementation does.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor's entry in a safetensors header; `start` is an absolute file offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub start: usize,
    pub len: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The bytes of a safetensors file: memory-mapped from disk, or held in memory (a state
/// dict handed over by Python).
enum Storage {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Storage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// An open, validated safetensors file.
pub struct SafetensorsFile {
    /// Where it is (for an in-memory file: the name its errors carry).
    pub path: PathBuf,
    map: Storage,
    /// Tensors in data order (ascending offset), so reading them in order is sequential.
    pub tensors: Vec<TensorInfo>,
    pub metadata: BTreeMap<String, String>,
    /// The raw JSON header, hashed into provenance.
    pub header: Vec<u8>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        // A FIFO would block in open() and a device (a symlink to /dev/zero) map endlessly.
        crate::limits::ensure_regular_file(path)?;
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::format(
                path,
                "is not a regular file; refusing to read it",
            ));
        }
        // SAFETY: the map is read-only; a concurrent truncation of the source by another
        // process would be a SIGBUS, the same contract as every mmap-based loader.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (tensors, metadata, header) = parse(path, &map)?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            map: Storage::Mapped(map),
            tensors,
            metadata,
            header,
        })
    }

    /// A safetensors file held in memory, validated exactly as one read from disk; `path`
    /// only names it in errors.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        let (tensors, metadata, header) = parse(path, &bytes)?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            map: Storage::Owned(bytes),
            tensors,
            metadata,
            header,
        })
    }

    /// The raw bytes of one tensor (validated to lie inside the file at open time).
    pub fn data(&self, tensor: &TensorInfo) -> &[u8] {
        &self.map[tensor.start..tensor.start + tensor.len]
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Hints the kernel that a tensor will be read soon (sequential read-ahead).
    pub fn advise_willneed(&self, tensor: &TensorInfo) {
        #[cfg(unix)]
        if let Storage::Mapped(map) = &self.map {
            let _ = map.advise_range(
                memmap2::Advice::WillNeed,
                tensor.start & !4095,
                tensor.len + (tensor.start & 4095),
            );
        }
    }

    /// Tells the kernel that a tensor's pages are no longer needed, keeping the page cache
    /// from filling with source pages on machines with little memory.
    pub fn advise_done(&self, tensor: &TensorInfo) {
        #[cfg(unix)]
        {
            // Only whole pages inside the tensor, so no neighbour is affected.
            let begin = tensor.start.div_ceil(4096) * 4096;
            let end = (tensor.start + tensor.len) & !4095;
            if let (true, Storage::Mapped(map)) = (end > begin, &self.map) {
                // SAFETY: DontNeed on a read-only private file mapping only drops cached
                // pages; later reads fault them back in from the file.
                let _ = unsafe {
                    map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        begin,
                        end - begin,
                    )
                };
            }
        }
    }
}

type Parsed = (Vec<TensorInfo>, BTreeMap<String, String>, Vec<u8>);

fn parse(path: &Path, bytes: &[u8]) -> Result<Parsed> {
    let file_len = bytes.len() as u64;
    if file_len < 8 {
        return Err(Error::format(
            path,
            format!("truncated safetensors file: {file_len} bytes, shorter than the 8-byte header length"),
        ));
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if header_len > MAX_HEADER_BYTES {
        return Err(Error::format(
            path,
            format!("header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit (corrupt file?)"),
        ));
    }
    if 8 + header_len > file_len {
        return Err(Error::format(
            path,
            format!(
                "header length {header_len} points past the end of the file ({file_len} bytes): truncated or corrupt"
            ),
        ));
    }
    let header = bytes[8..8 + header_len as usize].to_vec();
    // As the reference implementation: UTF-8 JSON that starts with `{` (trailing spaces
    // pad it to alignment; nothing may precede it).
    let text = std::str::from_utf8(&header)
        .map_err(|e| Error::format(path, format!("header is not UTF-8: {e}")))?;
    if !text.starts_with('{') {
        return Err(Error::format(
            path,
            "header does not start with `{` (corrupt header length or file)",
        ));
    }
    let json: Value = serde_json::from_str(text)
        .map_err(|e| Error::format(path, format!("header is not valid JSON: {e}")))?;
    let Value::Object(entries) = json else {
        return Err(Error::format(path, "header is not a JSON object"));
    };
    let data_start = 8 + header_len as usize;
    let data_len = bytes.len() - data_start;
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, entry) in entries {
        if name == "__metadata__" {
            let Value::Object(m) = entry else {
                return Err(Error::format(path, "`__metadata__` is not a JSON object"));
            };
            for (k, v) in m {
                let Value::String(s) = v else {
                    return Err(Error::format(
                        path,
                        format!("`__metadata__.{k}` is not a string"),
                    ));
                };
                metadata.insert(k, s);
            }
            continue;
        }
        tensors.push(parse_entry(path, &name, &entry, data_start, data_len)?);
    }
    tensors.sort_by_key(|t| (t.start, t.len));
    // The data offsets must tile the data section exactly, as the format requires: no
    // overlap, no hole, nothing after the last tensor. A header length moved into the
    // JSON's padding shifts every tensor by a few bytes and is caught here.
    let mut covered = 0usize; // relative to data_start
    let mut previous: Option<&TensorInfo> = None;
    for t in &tensors {
        let (begin, end) = (t.start - data_start, t.start - data_start + t.len);
        if begin < covered {
            let a = previous.expect("covered > 0 only after a tensor");
            return Err(Error::tensor(
                path,
                &t.name,
                format!(
                    "data range overlaps tensor `{}` (bytes {}..{} vs {}..{} of the data section)",
                    a.name,
                    a.start - data_start,
                    a.start - data_start + a.len,
                    begin,
                    end
                ),
            ));
        }
        if begin > covered {
            let after = previous
                .map(|a| format!("after tensor `{}`", a.name))
                .unwrap_or_else(|| "at the start of the data section".to_string());
            return Err(Error::tensor(
                path,
                &t.name,
                format!(
                    "data_offsets start at byte {begin}, leaving a hole of {} bytes {after} \
                     (safetensors offsets must cover the data section exactly: corrupt header?)",
                    begin - covered
                ),
            ));
        }
        covered = end;
        previous = Some(t);
    }
    if covered != data_len {
        return Err(Error::format(
            path,
            format!(
                "{} trailing bytes after the last tensor: the data section is {data_len} bytes but the \
                 header's offsets cover {covered} (corrupt header length or file?)",
                data_len - covered
            ),
        ));
    }
    Ok((tensors, metadata, header))
}

fn parse_entry(
    path: &Path,
    name: &str,
    entry: &Value,
    data_start: usize,
    data_len: usize,
) -> Result<TensorInfo> {
    let bad = |msg: String| Error::tensor(path, name, msg);
    let Value::Object(fields) = entry else {
        return Err(bad("header entry is not a JSON object".into()));
    };
    let dtype_name = fields
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("header entry has no string `dtype`".into()))?;
    let dtype = DType::from_safetensors_name(dtype_name).ok_or_else(|| {
        bad(format!(
            "dtype {dtype_name} is not a floating-point weight type this tool grows (F64, F32, BF16, F16)"
        ))
    })?;
    let shape = usize_list(fields, "shape")
        .ok_or_else(|| bad("`shape` is not a list of non-negative integers".into()))?;
    let offsets = usize_list(fields, "data_offsets")
        .filter(|o| o.len() == 2)
        .ok_or_else(|| bad("`data_offsets` is not a pair of non-negative integers".into()))?;
    let (begin, end) = (offsets[0], offsets[1]);
    if begin > end {
        return Err(bad(format!("data_offsets [{begin}, {end}] are reversed")));
    }
    if end > data_len {
        return Err(bad(format!(
            "data_offsets [{begin}, {end}] point past the end of the data section ({data_len} bytes): truncated or corrupt file"
        )));
    }
    let numel = crate::limits::checked_numel(&shape).ok_or_else(|| {
        bad(format!(
            "shape {shape:?} has more than {} elements (corrupt header?)",
            crate::limits::MAX_TENSOR_ELEMENTS
        ))
    })? as usize;
    let expected = numel
        .checked_mul(dtype.size())
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    if end - begin != expected {
        return Err(bad(format!(
            "holds {} bytes but {dtype_name} x {shape:?} needs {expected}",
            end - begin
        )));
    }
    Ok(TensorInfo {
        name: name.to_string(),
        dtype,
        shape,
        start: data_start + begin,
        len: end - begin,
    })
}

fn usize_list(fields: &Map<String, Value>, key: &str) -> Option<Vec<usize>> {
    fields
        .get(key)?
        .as_array()?
        .iter()
        .map(|v| v.as_u64().and_then(|x| usize::try_from(x).ok()))
        .collect()
}

/// A tensor to be written: its header entry, in the order the data will follow.
#[derive(Debug, Clone)]
pub struct HeaderEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl HeaderEntry {
    pub fn byte_len(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size() as u64
    }
}

/// The header of a small file whose tensors all have one `dtype`, with transformers'
/// `format: pt` metadata plus `extra` entries: the one small safetensors writer's header
/// (checkpoints saved by training, random inits, test files). The data follows in order.
pub fn pt_header<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>,
    dtype: DType,
    extra: &[(&str, String)],
) -> Vec<u8> {
    let entries: Vec<HeaderEntry> = tensors
        .into_iter()
        .map(|(name, shape)| HeaderEntry {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
        })
        .collect();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    for (k, v) in extra {
        meta.insert(k.to_string(), v.clone());
    }
    encode_header(&entries, &meta)
}

/// Serialises a safetensors header (length prefix included, padded with spaces to a
/// multiple of 8 so the data section is aligned). Data of `entries` follows in order.
pub fn encode_header(entries: &[HeaderEntry], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut obj = Map::new();
    if !metadata.is_empty() {
        let m: Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        obj.insert("__metadata__".into(), Value::Object(m));
    }
    let mut offset = 0u64;
    for e in entries {
        let end = offset + e.byte_len();
        obj.insert(
            e.name.clone(),
            serde_json::json!({
                "dtype": e.dtype.safetensors_name(),
                "shape": e.shape,
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&Value::Object(obj)).expect("JSON of strings and numbers");
    while !(8 + json.len()).is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    fn file_with(header: &str, data_len: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data_len));
        v
    }

    fn open_err(bytes: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "m.safetensors", bytes);
        match SafetensorsFile::open(&p) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn round_trip_header() {
        let entries = vec![
            HeaderEntry {
                name: "a".into(),
                dtype: DType::F32,
                shape: vec![2, 3],
            },
            HeaderEntry {
                name: "b".into(),
                dtype: DType::BF16,
                shape: vec![5],
            },
        ];
        let mut meta = BTreeMap::new();
        meta.insert("format".into(), "pt".into());
        let mut bytes = encode_header(&entries, &meta);
        assert_eq!(bytes.len() % 8, 0);
        bytes.extend(std::iter::repeat_n(7u8, 24 + 10));
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "m.safetensors", &bytes);
        let f = SafetensorsFile::open(&p).unwrap();
        assert_eq!(f.metadata["format"], "pt");
        assert_eq!(f.tensors.len(), 2);
        assert_eq!(f.tensors[0].name, "a");
        assert_eq!(f.data(&f.tensors[1]).len(), 10);
    }

    #[test]
    fn rejects_truncated_and_corrupt_files() {
        assert!(open_err(&[1, 2, 3]).contains("truncated"));
        let mut huge = file_with("{}", 0);
        huge[..8].copy_from_slice(&1000u64.to_le_bytes());
        assert!(open_err(&huge).contains("points past the end"));
        let past = file_with(
            r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            8,
        );
        let msg = open_err(&past);
        assert!(msg.contains("`w`") && msg.contains("past the end"), "{msg}");
        let wrong = file_with(
            r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}}"#,
            16,
        );
        assert!(open_err(&wrong).contains("needs 12"));
        let overlap = file_with(
            r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"v":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
            16,
        );
        assert!(open_err(&overlap).contains("overlaps"));
        let int = file_with(
            r#"{"w":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#,
            8,
        );
        assert!(open_err(&int).contains("I64"));
        assert!(open_err(&file_with("{not json", 0)).contains("not valid JSON"));
    }

    #[test]
    fn offsets_must_cover_the_data_exactly() {
        let hole = file_with(
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"v":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}}"#,
            16,
        );
        let msg = open_err(&hole);
        assert!(
            msg.contains("`v`") && msg.contains("hole of 4 bytes"),
            "{msg}"
        );
        let late = file_with(
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12,
        );
        assert!(open_err(&late).contains("at the start"));
        let trailing = file_with(
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            9,
        );
        let msg = open_err(&trailing);
        assert!(msg.contains("1 trailing bytes"), "{msg}");
        // Zero-sized tensors take no bytes and are fine anywhere.
        let empty = file_with(
            r#"{"e":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            8,
        );
        let dir = tempfile::tempdir().unwrap();
        assert!(SafetensorsFile::open(&write(dir.path(), "m.safetensors", &empty)).is_ok());
    }

    #[test]
    fn header_length_moved_into_the_padding_is_refused() {
        let entries = vec![HeaderEntry {
            name: "w".into(),
            dtype: DType::F32,
            shape: vec![3],
        }];
        // A metadata value of the length that leaves at least 4 spaces of padding.
        let mut bytes = (0..8)
            .map(|k| {
                let meta = BTreeMap::from([("k".to_string(), "x".repeat(k))]);
                encode_header(&entries, &meta)
            })
            .find(|b| b.ends_with(b"    "))
            .expect("some length pads with 4 spaces");
        bytes.extend_from_slice(&[0u8; 12]);
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        bytes[..8].copy_from_slice(&(n - 4).to_le_bytes());
        let msg = open_err(&bytes);
        assert!(msg.contains("4 trailing bytes"), "{msg}");
        let mut spaced = file_with(
            r#" {"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            4,
        );
        spaced[8] = b' ';
        assert!(open_err(&spaced).contains("does not start with"));
        let big = file_with(
            r#"{"w":{"dtype":"F32","shape":[1099511627776,2],"data_offsets":[0,4]}}"#,
            4,
        );
        assert!(open_err(&big).contains("more than 1099511627776 elements"));
    }

    #[test]
    fn special_files_are_refused() {
        let msg = match SafetensorsFile::open(Path::new("/dev/zero")) {
            Ok(_) => panic!("opened /dev/zero"),
            Err(e) => e.to_string(),
        };
        assert!(msg.contains("not a regular file"), "{msg}");
    }
}
