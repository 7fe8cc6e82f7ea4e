//! A Hugging Face model folder: config.json plus one safetensors file or an index and shards,
//! memory-mapped and checked against the family's tensor rules and config.json's sizes.

use crate::config::ModelConfig;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::family::{Presence, TensorRule};
use crate::safetensors::{SafetensorsFile, TensorInfo};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";

/// One weight of the source checkpoint, located and classified.
#[derive(Debug, Clone)]
pub struct SourceTensor {
    pub file: usize,
    pub info: TensorInfo,
    pub rule: &'static TensorRule,
    pub layer: Option<usize>,
}

pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub files: Vec<SafetensorsFile>,
    /// Every tensor that will be grown, in (file, offset) order for sequential reading.
    pub tensors: Vec<SourceTensor>,
    /// Tensors accepted but not carried over (e.g. rotary `inv_freq` buffers).
    pub dropped: Vec<String>,
    /// config.json's bytes when the checkpoint lives in memory (no file to hash).
    config_bytes: Option<Vec<u8>>,
}

/// The folder an in-memory checkpoint's errors name.
pub const IN_MEMORY: &str = "<in-memory state dict>";

/// One tensor of a state dict handed over in memory: little-endian data, row-major.
pub struct MemoryTensor<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::format(
                dir,
                "not a directory (expected a Hugging Face model folder)",
            ));
        }
        let config = ModelConfig::load(&dir.join("config.json"))?;
        let file_names = weight_files(dir, &config)?;
        let mut files = Vec::with_capacity(file_names.len());
        for name in &file_names {
            files.push(SafetensorsFile::open(&dir.join(name))?);
        }
        check_index_agrees(dir, &files, sharded(&file_names))?;
        let (mut tensors, mut dropped) = classify(&config, &files)?;
        check_tied_head(&config, &files, &mut tensors, &mut dropped)?;
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            files,
            tensors,
            dropped,
            config_bytes: None,
        })
    }

    /// A checkpoint from a state dict in memory and its config.json text, checked exactly as
    /// a folder is (family rules, shapes against the config). The tensors are copied once
    /// into one safetensors buffer, so planning and growth run unchanged on it.
    pub fn from_memory(config_json: &str, tensors: &[MemoryTensor]) -> Result<Self> {
        let dir = PathBuf::from(IN_MEMORY);
        let config_path = dir.join("config.json");
        let raw: Value = serde_json::from_str(config_json)
            .map_err(|e| Error::format(&config_path, format!("not valid JSON: {e}")))?;
        let Value::Object(raw) = raw else {
            return Err(Error::format(&config_path, "not a JSON object"));
        };
        let config = ModelConfig::from_map(&config_path, raw)?;
        let file = dir.join(SINGLE_FILE);
        let mut entries = Vec::with_capacity(tensors.len());
        let mut seen = std::collections::HashSet::new();
        for t in tensors {
            if !seen.insert(t.name) {
                return Err(Error::tensor(&file, t.name, "given twice"));
            }
            let expected = crate::limits::checked_numel(&t.shape)
                .and_then(|n| n.checked_mul(t.dtype.size() as u64));
            if expected != Some(t.data.len() as u64) {
                return Err(Error::tensor(
                    &file,
                    t.name,
                    format!(
                        "{} bytes of data for a {} tensor of shape {:?}",
                        t.data.len(),
                        t.dtype.safetensors_name(),
                        t.shape
                    ),
                ));
            }
            entries.push(crate::safetensors::HeaderEntry {
                name: t.name.to_string(),
                dtype: t.dtype,
                shape: t.shape.clone(),
            });
        }
        let mut bytes = crate::safetensors::encode_header(&entries, &BTreeMap::new());
        bytes.reserve(tensors.iter().map(|t| t.data.len()).sum());
        for t in tensors {
            bytes.extend_from_slice(t.data);
        }
        let files = vec![SafetensorsFile::from_bytes(&file, bytes)?];
        let (mut tensors, mut dropped) = classify(&config, &files)?;
        check_tied_head(&config, &files, &mut tensors, &mut dropped)?;
        Ok(Checkpoint {
            dir,
            config,
            files,
            tensors,
            dropped,
            config_bytes: Some(config_json.as_bytes().to_vec()),
        })
    }

    /// Built by [`Checkpoint::from_memory`]: no folder behind it.
    pub fn in_memory(&self) -> bool {
        self.config_bytes.is_some()
    }

    pub fn find(&self, name: &str) -> Option<&SourceTensor> {
        self.tensors.iter().find(|t| t.info.name == name)
    }

    pub fn parameter_count(&self) -> u64 {
        self.tensors.iter().map(|t| t.info.numel() as u64).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.info.len as u64).sum()
    }

    /// Distinct tensor dtypes, for `inspect`.
    pub fn dtypes(&self) -> Vec<DType> {
        let mut d: Vec<DType> = self.tensors.iter().map(|t| t.info.dtype).collect();
        d.sort();
        d.dedup();
        d
    }

    /// sha256 of config.json's bytes.
    pub fn config_sha256(&self) -> Result<String> {
        if let Some(bytes) = &self.config_bytes {
            return Ok(hex(&Sha256::digest(bytes)));
        }
        let bytes = crate::limits::read_bounded(&self.config.path, crate::limits::MAX_JSON_BYTES)?;
        Ok(hex(&Sha256::digest(&bytes)))
    }

    /// sha256 over every weight file's name and raw JSON header, in file-name order: it
    /// identifies the source's tensor layout without reading gigabytes of data.
    pub fn headers_sha256(&self) -> String {
        let mut h = Sha256::new();
        let mut files: Vec<&SafetensorsFile> = self.files.iter().collect();
        files.sort_by(|a, b| a.path.file_name().cmp(&b.path.file_name()));
        for f in files {
            let name = f
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update((f.header.len() as u64).to_le_bytes());
            h.update(&f.header);
        }
        hex(&h.finalize())
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The weight files of a folder, chosen exactly as transformers 5.23 chooses them
/// (`modeling_utils._get_resolved_checkpoint_files`): `model.safetensors` when it is a file
/// (`os.path.isfile`, which follows symlinks), else the index and the shards it names. A
/// folder with both therefore loads the single file everywhere (inspect, plan, clone,
/// forward, verify, train), and the index beside it is not read.
fn weight_files(dir: &Path, config: &ModelConfig) -> Result<Vec<String>> {
    // transformers loads whatever file this key names instead, and drops the key on save;
    // honouring it would also mean rewriting the grown config, so it is refused.
    if let Some(v) = config
        .raw
        .get("transformers_weights")
        .filter(|v| !v.is_null())
    {
        return Err(Error::config(
            &config.path,
            format!(
                "`transformers_weights` ({v}) redirects transformers to another weights file; hyperclone reads \
                 {SINGLE_FILE} or {INDEX_FILE} only: remove the key (save_pretrained drops it too)"
            ),
        ));
    }
    let single = dir.join(SINGLE_FILE);
    let index = dir.join(INDEX_FILE);
    if single.is_file() {
        return Ok(vec![SINGLE_FILE.to_string()]);
    }
    if index.symlink_metadata().is_ok() {
        let map = read_index(&index)?;
        let mut names: Vec<String> = map.into_values().collect();
        names.sort();
        names.dedup();
        for n in &names {
            if dir.join(n).symlink_metadata().is_ok() {
                crate::limits::ensure_regular_file(&dir.join(n))?;
            } else {
                return Err(Error::format(
                    &index,
                    format!("names shard `{n}`, which does not exist"),
                ));
            }
        }
        return Ok(names);
    }
    if single.symlink_metadata().is_ok() {
        // A FIFO or a link to a device is refused by name, not reported as missing.
        crate::limits::ensure_regular_file(&single)?;
        return Ok(vec![SINGLE_FILE.to_string()]);
    }
    let hint = if dir.join("pytorch_model.bin").exists()
        || dir.join("pytorch_model.bin.index.json").exists()
    {
        " (found PyTorch .bin weights: convert them to safetensors first, e.g. `save_pretrained(..., safe_serialization=True)`)"
    } else {
        ""
    };
    Err(Error::format(
        dir,
        format!("has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}"),
    ))
}

/// Whether the folder's weights are the shards of an index (and not a single file).
fn sharded(files: &[String]) -> bool {
    !(files.len() == 1 && files[0] == SINGLE_FILE)
}

/// tensor name -> shard file name, from `model.safetensors.index.json`.
fn read_index(path: &Path) -> Result<BTreeMap<String, String>> {
    let v: Value = crate::limits::read_json(path)?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::format(path, "has no `weight_map` object"))?;
    if map.is_empty() {
        // Every later step indexes the first shard; an index naming none is no checkpoint.
        return Err(Error::format(
            path,
            "`weight_map` is empty: the index names no tensor and no shard",
        ));
    }
    map.iter()
        .map(|(k, v)| match v.as_str() {
            Some(s) if !s.contains('/') && !s.contains('\\') && s != ".." => {
                Ok((k.clone(), s.to_string()))
            }
            _ => Err(Error::format(
                path,
                format!("`weight_map.{k}` is not a file name in this folder"),
            )),
        })
        .collect()
}

/// The index (when it is what is read) must describe the shards exactly: no tensor
/// missing, none in two shards.
fn check_index_agrees(dir: &Path, files: &[SafetensorsFile], sharded: bool) -> Result<()> {
    let index = dir.join(INDEX_FILE);
    let mut location: HashMap<&str, &Path> = HashMap::new();
    for f in files {
        for t in &f.tensors {
            if let Some(other) = location.insert(&t.name, &f.path) {
                return Err(Error::tensor(
                    &f.path,
                    &t.name,
                    format!("also stored in {}", other.display()),
                ));
            }
        }
    }
    if !sharded {
        return Ok(());
    }
    for (name, shard) in read_index(&index)? {
        match location.get(name.as_str()) {
            Some(p)
                if p.file_name().map(|n| n.to_string_lossy() == shard.as_str()) == Some(true) => {}
            Some(p) => {
                return Err(Error::tensor(
                    &index,
                    &name,
                    format!("the index says {shard}, but it is in {}", p.display()),
                ))
            }
            None => {
                return Err(Error::tensor(
                    dir.join(&shard),
                    &name,
                    "listed in the index but absent from the shard",
                ))
            }
        }
    }
    Ok(())
}

fn classify(
    config: &ModelConfig,
    files: &[SafetensorsFile],
) -> Result<(Vec<SourceTensor>, Vec<String>)> {
    let family = config.family;
    let layers = config.num_hidden_layers;
    let mut tensors = Vec::new();
    let mut dropped = Vec::new();
    for (fi, f) in files.iter().enumerate() {
        for t in &f.tensors {
            let Some((rule, layer, expert)) = family.match_name_at(&t.name) else {
                return Err(Error::tensor(
                    &f.path,
                    &t.name,
                    format!(
                        "unexpected for model_type `{}` (not part of its layout)",
                        family.model_type
                    ),
                ));
            };
            if let Some(l) = layer {
                // `layers.01` is read as layer 1 by a parser but is another key to
                // transformers: beside `layers.1` it made a duplicate and a hole.
                let canonical = crate::family::tensor_name_at(rule.pattern, Some(l), expert);
                if canonical != t.name {
                    return Err(Error::tensor(
                        &f.path,
                        &t.name,
                        format!("layer index is not canonical (leading zero?): the name of layer {l} is `{canonical}`"),
                    ));
                }
                if l >= layers {
                    return Err(Error::tensor(
                        &f.path,
                        &t.name,
                        format!("layer {l} does not exist: config.json has num_hidden_layers = {layers}"),
                    ));
                }
                if let Some(e) = expert.filter(|&e| e >= config.num_experts) {
                    return Err(Error::tensor(
                        &f.path,
                        &t.name,
                        format!(
                            "expert {e} does not exist: config.json has {} experts",
                            config.num_experts
                        ),
                    ));
                }
            }
            let allowed = match rule.presence {
                Presence::Required
                | Presence::Optional
                | Presence::UntiedHead
                | Presence::Dropped => true,
                Presence::IfConfig(_) | Presence::UnlessConfigFalse(_) => {
                    config.switched_on(rule.presence)
                }
            };
            if !allowed {
                let why = match rule.presence {
                    Presence::IfConfig(k) => format!("`{k}` false or absent"),
                    Presence::UnlessConfigFalse(k) => format!("`{k}` false"),
                    _ => unreachable!(),
                };
                return Err(Error::tensor(
                    &f.path,
                    &t.name,
                    format!("unexpected: config.json has {why}"),
                ));
            }
            if rule.presence == Presence::Dropped {
                dropped.push(t.name.clone());
                continue;
            }
            check_shape(config, rule, &f.path, t)?;
            tensors.push(SourceTensor {
                file: fi,
                info: t.clone(),
                rule,
                layer,
            });
        }
    }
    // Every required tensor of every layer must be there.
    let present: HashMap<&str, ()> = tensors.iter().map(|t| (t.info.name.as_str(), ())).collect();
    let where_ = match files {
        [one] => one.path.clone(),
        _ => files
            .first()
            .map(|f| f.path.with_file_name(INDEX_FILE))
            .unwrap_or_default(),
    };
    for (name, rule) in config.required_tensors() {
        if !present.contains_key(name.as_str()) {
            let why = if rule.presence == Presence::UntiedHead {
                "missing (config.json says the head is untied: tie_word_embeddings = false)"
                    .to_string()
            } else {
                format!("missing (required by model_type `{}`)", family.model_type)
            };
            return Err(Error::tensor(&where_, name, why));
        }
    }
    Ok((tensors, dropped))
}

/// A config that ties the head (`tie_word_embeddings: true`) beside a stored head that
/// differs from the embedding has no single meaning: transformers 5.x keeps the stored head
/// untied (`PreTrainedModel.tie_weights`: "both are present in the checkpoints with
/// different values, so we will NOT tie them", checked for all 14 families), 4.x overwrote
/// it with the embedding. Growing either would compute another function than some
/// transformers computes for SRC, so it is refused. An equal stored head (a converted .bin
/// keeps both) ties in every version: it is the tie, so it is set aside like a buffer and
/// the checkpoint reads as one without it (the clone, the decoder and `--keep-tied` then
/// treat it exactly as transformers' tied parameter). Equality is torch.equal's: values,
/// NaN never equal, across dtypes.
fn check_tied_head(
    config: &ModelConfig,
    files: &[SafetensorsFile],
    tensors: &mut Vec<SourceTensor>,
    dropped: &mut Vec<String>,
) -> Result<()> {
    let family = config.family;
    if !config.tie_word_embeddings {
        return Ok(());
    }
    let position = |name: &str| tensors.iter().position(|t| t.info.name == name);
    let (Some(h), Some(e)) = (position(family.head), position(family.embedding)) else {
        return Ok(());
    };
    let head = &tensors[h];
    if same_values(files, head, &tensors[e]) {
        dropped.push(tensors.remove(h).info.name);
        return Ok(());
    }
    Err(Error::tensor(
        &files[head.file].path,
        family.head,
        format!(
            "differs from `{}` although config.json has tie_word_embeddings = true (transformers 5 then uses \
             this head untied, transformers 4 the embedding): set tie_word_embeddings to false to keep this \
             head, or remove it to tie",
            family.embedding
        ),
    ))
}

/// Whether two tensors hold equal values (shape and element by element), as torch.equal.
fn same_values(files: &[SafetensorsFile], a: &SourceTensor, b: &SourceTensor) -> bool {
    if a.info.shape != b.info.shape {
        return false;
    }
    let (da, db) = (files[a.file].data(&a.info), files[b.file].data(&b.info));
    const CHUNK: usize = 1 << 16;
    let (mut va, mut vb) = (vec![0f64; CHUNK], vec![0f64; CHUNK]);
    let (sa, sb) = (a.info.dtype.size(), b.info.dtype.size());
    let n = a.info.numel();
    let mut i = 0;
    while i < n {
        let m = CHUNK.min(n - i);
        a.info.dtype.decode(&da[i * sa..(i + m) * sa], &mut va[..m]);
        b.info.dtype.decode(&db[i * sb..(i + m) * sb], &mut vb[..m]);
        if va[..m].iter().zip(&vb[..m]).any(|(x, y)| x != y) {
            return false;
        }
        i += m;
    }
    true
}

fn check_shape(config: &ModelConfig, rule: &TensorRule, path: &Path, t: &TensorInfo) -> Result<()> {
    let expected: Vec<usize> = rule.axes.iter().map(|a| config.axis_len(a.0)).collect();
    if t.shape != expected {
        let spaces: Vec<String> = rule
            .axes
            .iter()
            .map(|a| {
                a.0.iter()
                    .map(|s| format!("{s:?}"))
                    .collect::<Vec<_>>()
                    .join("+")
            })
            .collect();
        return Err(Error::tensor(
            path,
            &t.name,
            format!(
                "shape {:?} contradicts config.json, which implies {:?} ({})",
                t.shape,
                expected,
                spaces.join(" x ")
            ),
        ));
    }
    Ok(())
}
