//! Streaming the plan to disk: shard by shard, tensor by tensor, in bounded memory.
//!
//! A producer fills an 8 MiB buffer with destination rows (in parallel) while a writer
//! thread writes the previous one, so compute overlaps I/O and only two buffers exist.
//! Everything goes into a temporary folder beside DST that is renamed into place only when
//! complete; any error (or Ctrl-C) removes it, so DST is either the whole clone or absent.

use crate::checkpoint::{Checkpoint, INDEX_FILE};
use crate::error::{Error, Result};
use crate::kernel::{Expansion, ExpansionSpec};
use crate::plan::{Plan, WRITE_CHUNK_BYTES};
use crate::staging::{absolute_lexical, remove_stale_siblings, StagedDir};
use crate::upcycle::{drawn, dropped_units, DropSpec, Fill};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

/// Receives progress in bytes written.
pub trait Progress: Sync {
    fn begin(&self, _total_bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
    /// Something the user should know that is not an error (stale folders removed).
    fn notice(&self, _message: &str) {}
}

pub struct NoProgress;
impl Progress for NoProgress {}

/// Creates output files. Tests substitute one that fails part-way.
pub type CreateFile = dyn Fn(&Path) -> std::io::Result<Box<dyn Write + Send>> + Sync;

pub fn create_plain_file(path: &Path) -> std::io::Result<Box<dyn Write + Send>> {
    Ok(Box::new(fs::File::create(path)?))
}

/// Files besides the weights that a model folder needs: tokenizer, generation settings,
/// chat templates, licences. Weights in other formats and the old card are not copied.
pub fn is_companion_file(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "spiece.model",
        "generation_config.json",
        "chat_template.json",
        "preprocessor_config.json",
        "USE_POLICY.md",
    ];
    EXACT.contains(&name)
        || name.ends_with(".jinja")
        || name.ends_with(".tiktoken")
        || name.starts_with("LICENSE")
        || name.starts_with("NOTICE")
}

/// A last check of the complete staging folder; `Err(reason)` discards it.
pub type CheckStaged<'a> = dyn Fn(&Path) -> std::result::Result<(), String> + Sync + 'a;

/// How a clone reaches the outside world: progress reports, cancellation, file creation.
pub struct WriteEnv<'a> {
    pub progress: &'a dyn Progress,
    /// Set (e.g. by a Ctrl-C handler) to stop at the next chunk and remove partial output.
    pub cancel: &'a AtomicBool,
    pub create: &'a CreateFile,
    /// Runs on the complete staging folder before it is moved into place (`clone
    /// --verify`); an error removes it.
    pub check: Option<&'a CheckStaged<'a>>,
    /// Clone source tensors holding NaN or Inf instead of refusing them.
    pub allow_nonfinite: bool,
}

impl<'a> WriteEnv<'a> {
    /// No progress output, plain files, no check, non-finite weights refused: growing small
    /// models inside other work.
    pub fn quiet(cancel: &'a AtomicBool) -> WriteEnv<'a> {
        WriteEnv {
            progress: &NoProgress,
            cancel,
            create: &create_plain_file,
            check: None,
            allow_nonfinite: false,
        }
    }
}

pub struct CloneOutcome {
    pub files: Vec<String>,
    pub bytes_written: u64,
}

/// Writes the clone described by `plan` to `dst`.
pub fn write_clone(
    ckpt: &Checkpoint,
    plan: &Plan,
    model_card: &str,
    dst: &Path,
    force: bool,
    env: &WriteEnv,
) -> Result<CloneOutcome> {
    let WriteEnv {
        progress,
        cancel,
        create,
        check,
        allow_nonfinite,
    } = *env;
    // A signal that arrived while SRC, the config or a recipe was read (the handler is
    // installed first, so it only set the flag) stops here, before anything is written.
    stop_if_cancelled(cancel)?;
    check_destination(&ckpt.dir, dst, force)?;
    for removed in remove_stale_siblings(dst)? {
        progress.notice(&format!(
            "removed {}, left by an earlier clone into {} that did not finish (process gone)",
            removed.display(),
            dst.display()
        ));
    }
    let staging = StagedDir::create(dst)?;
    let mut files = Vec::new();
    progress.begin(plan.output_bytes());
    let mut bytes_written = write_shards(
        ckpt,
        plan,
        staging.path(),
        progress,
        cancel,
        create,
        allow_nonfinite,
    )?;
    files.extend(plan.shards.iter().map(|s| s.file_name.clone()));
    let mut small = |name: &str, bytes: Vec<u8>| -> Result<()> {
        let path = staging.path().join(name);
        let mut f = create(&path).map_err(|e| Error::io(&path, e))?;
        f.write_all(&bytes)
            .and_then(|_| f.flush())
            .map_err(|e| Error::io(&path, e))?;
        bytes_written += bytes.len() as u64;
        files.push(name.to_string());
        Ok(())
    };
    if plan.is_sharded() {
        small(INDEX_FILE, pretty_json(&plan.index_json()))?;
    }
    small(
        "config.json",
        pretty_json(&serde_json::Value::Object(plan.config.clone())),
    )?;
    small("README.md", model_card.as_bytes().to_vec())?;
    for p in companion_files(&ckpt.dir)? {
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .expect("filtered above")
            .to_string();
        // Streamed, not read into memory: a companion may be large (or a link to a large
        // file); special files were filtered out above (`is_file` follows links).
        crate::limits::ensure_regular_file(&p)?;
        let mut from = fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
        let path = staging.path().join(&name);
        let mut to = create(&path).map_err(|e| Error::io(&path, e))?;
        let n = std::io::copy(&mut from, &mut to)
            .and_then(|n| to.flush().map(|_| n))
            .map_err(|e| Error::io(&path, e))?;
        bytes_written += n;
        files.push(name);
    }
    stop_if_cancelled(cancel)?;
    if let Some(check) = check {
        let checked = check(staging.path());
        // Ctrl-C while verifying (minutes on a large model) stops the clone like any other.
        stop_if_cancelled(cancel)?;
        checked.map_err(Error::Verification)?;
    }
    staging.commit(dst, force)?;
    Ok(CloneOutcome {
        files,
        bytes_written,
    })
}

fn pretty_json(v: &serde_json::Value) -> Vec<u8> {
    let mut s = serde_json::to_vec_pretty(v).expect("JSON value");
    s.push(b'\n');
    s
}

/// `Err(Interrupted)` once `cancel` is set (Ctrl-C): checked between the clone's steps.
fn stop_if_cancelled(cancel: &AtomicBool) -> Result<()> {
    if cancel.load(Ordering::Relaxed) {
        return Err(Error::Interrupted);
    }
    Ok(())
}

/// DST must not exist (unless forced) and must not overlap SRC: `--force` replaces DST,
/// and replacing a folder that holds the source would destroy it.
fn check_destination(src: &Path, dst: &Path, force: bool) -> Result<()> {
    let src_abs = fs::canonicalize(src).map_err(|e| Error::io(src, e))?;
    let dst_abs = absolute_lexical(dst)?;
    if dst_abs.starts_with(&src_abs) || src_abs.starts_with(&dst_abs) {
        return Err(Error::format(
            dst,
            format!(
                "destination overlaps the source folder {}",
                src_abs.display()
            ),
        ));
    }
    if dst.symlink_metadata().is_ok() && !force {
        return Err(Error::NeedsForce {
            path: dst.to_path_buf(),
            role: String::new(),
        });
    }
    if force && dst.symlink_metadata().is_ok_and(|m| m.is_dir()) {
        check_removable(dst)?;
    }
    Ok(())
}

/// `--force` replaces DST all or nothing: before anything is written, every entry of the
/// old DST must be deletable (each folder writable, no immutable or append-only file, no
/// sticky folder holding another user's files), or the clone is refused with DST intact.
fn check_removable(dst: &Path) -> Result<()> {
    let refuse = |what: &Path, why: String| {
        Error::format(
            dst,
            format!(
                "cannot be replaced: {} {why}; nothing was changed",
                what.display()
            ),
        )
    };
    let probe_name = format!(".hyperclone-probe-{}", std::process::id());
    let mut stack = vec![dst.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let probe = dir.join(&probe_name);
        let created = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe);
        let link = dir.join(format!("{probe_name}-link"));
        // Whether this file system has hard links at all (vfat answers EPERM to every link).
        let mut links_work = false;
        let me = match created {
            Ok(f) => {
                let meta = f.metadata();
                drop(f);
                if fs::hard_link(&probe, &link).is_ok() {
                    links_work = true;
                    let _ = fs::remove_file(&link);
                }
                let _ = fs::remove_file(&probe);
                meta.ok()
            }
            Err(e) => return Err(refuse(&dir, format!("cannot be emptied ({e})"))),
        };
        let entries =
            fs::read_dir(&dir).map_err(|e| refuse(&dir, format!("cannot be read ({e})")))?;
        for entry in entries {
            let entry = entry.map_err(|e| refuse(&dir, format!("cannot be read ({e})")))?;
            let path = entry.path();
            let meta = entry
                .metadata()
                .map_err(|e| refuse(&path, format!("cannot be examined ({e})")))?;
            if meta.is_dir() {
                stack.push(path);
                continue;
            }
            #[cfg(unix)]
            {
                use std::os::unix::fs::MetadataExt;
                let Some(me) = &me else { continue };
                let (uid, root) = (me.uid(), me.uid() == 0);
                let dir_meta = fs::symlink_metadata(&dir).map_err(|e| Error::io(&dir, e))?;
                if dir_meta.mode() & 0o1000 != 0
                    && !root
                    && meta.uid() != uid
                    && dir_meta.uid() != uid
                {
                    return Err(refuse(
                        &path,
                        "belongs to another user in a sticky folder".into(),
                    ));
                }
                // link() fails with EPERM on an immutable or append-only file, exactly when
                // unlink() would; only try it where protected_hardlinks cannot interfere.
                if links_work && meta.is_file() && (root || meta.uid() == uid) {
                    match fs::hard_link(&path, &link) {
                        Ok(()) => {
                            let _ = fs::remove_file(&link);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                            return Err(refuse(
                                &path,
                                format!("cannot be deleted (immutable or append-only? {e})"),
                            ))
                        }
                        Err(_) => {} // e.g. a file system without hard links
                    }
                }
            }
        }
    }
    Ok(())
}

enum Msg {
    Begin(PathBuf, Vec<u8>),
    Data(Vec<u8>),
}

fn write_shards(
    ckpt: &Checkpoint,
    plan: &Plan,
    dir: &Path,
    progress: &dyn Progress,
    cancel: &AtomicBool,
    create: &CreateFile,
    allow_nonfinite: bool,
) -> Result<u64> {
    let (to_writer, from_producer) = mpsc::sync_channel::<Msg>(2);
    let (recycle, spare) = mpsc::channel::<Vec<u8>>();
    for _ in 0..2 {
        recycle
            .send(Vec::with_capacity(WRITE_CHUNK_BYTES))
            .expect("receiver alive");
    }
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<u64> {
            let mut current: Option<(PathBuf, Box<dyn Write + Send>)> = None;
            let mut total = 0u64;
            for msg in from_producer {
                match msg {
                    Msg::Begin(path, header) => {
                        if let Some((p, mut f)) = current.take() {
                            f.flush().map_err(|e| Error::io(&p, e))?;
                        }
                        let mut f = create(&path).map_err(|e| Error::io(&path, e))?;
                        f.write_all(&header).map_err(|e| Error::io(&path, e))?;
                        total += header.len() as u64;
                        progress.advance(header.len() as u64);
                        current = Some((path, f));
                    }
                    Msg::Data(buf) => {
                        let (p, f) = current.as_mut().expect("Begin precedes Data");
                        f.write_all(&buf).map_err(|e| Error::io(&*p, e))?;
                        total += buf.len() as u64;
                        progress.advance(buf.len() as u64);
                        let _ = recycle.send(buf);
                    }
                }
            }
            if let Some((p, mut f)) = current.take() {
                f.flush().map_err(|e| Error::io(&p, e))?;
            }
            Ok(total)
        });
        let produced = produce(ckpt, plan, dir, cancel, allow_nonfinite, &to_writer, &spare);
        drop(to_writer);
        let written = writer.join().expect("writer thread does not panic");
        // A writer error explains a producer's failed send, so it comes first.
        let written = written?;
        produced?;
        Ok(written)
    })
}

fn produce(
    ckpt: &Checkpoint,
    plan: &Plan,
    dir: &Path,
    cancel: &AtomicBool,
    allow_nonfinite: bool,
    to_writer: &mpsc::SyncSender<Msg>,
    spare: &mpsc::Receiver<Vec<u8>>,
) -> Result<()> {
    // A closed channel means the writer failed; it reports why.
    let writer_gone = || Error::format(dir, "writer stopped");
    for shard in &plan.shards {
        let path = dir.join(&shard.file_name);
        to_writer
            .send(Msg::Begin(path.clone(), shard.header.clone()))
            .map_err(|_| writer_gone())?;
        for &ti in &shard.tensors {
            expand_tensor(
                ckpt,
                plan,
                &plan.tensors[ti],
                cancel,
                allow_nonfinite,
                &mut || spare.recv().map_err(|_| writer_gone()),
                &mut |buf| to_writer.send(Msg::Data(buf)).map_err(|_| writer_gone()),
            )?;
        }
    }
    Ok(())
}

/// A tensor not read from the source (an upcycled router): zeros, or N(0, std^2) drawn at
/// (key, flat index), so any chunking gives the same bytes.
fn drawn_tensor(
    t: &crate::plan::DestTensor,
    cancel: &AtomicBool,
    buffer: &mut dyn FnMut() -> Result<Vec<u8>>,
    emit: &mut dyn FnMut(Vec<u8>) -> Result<()>,
) -> Result<()> {
    let cols = t.shape.last().copied().unwrap_or(1).max(1);
    let rows = t.numel() as usize / cols;
    let row_bytes = cols * t.dtype.size();
    let mut values = vec![0f64; cols];
    row_chunks(rows, row_bytes, cancel, |row, n| {
        let mut buf = buffer()?;
        buf.resize(n * row_bytes, 0);
        for (k, out) in buf.chunks_exact_mut(row_bytes).enumerate() {
            let first = ((row + k) * cols) as u64;
            for (c, v) in values.iter_mut().enumerate() {
                *v = match t.fill {
                    Fill::Normal { std, key } => drawn(key, first + c as u64, 0.0, std),
                    _ => 0.0,
                };
            }
            t.dtype.encode(&values, out);
        }
        emit(buf)
    })
}

/// Walks `rows` rows of `row_bytes` bytes in chunks of whole rows (at most
/// [`WRITE_CHUNK_BYTES`], at least one row), calling `each(first_row, rows_in_chunk)` in row
/// order; a cancel stops it before the next chunk. Every pass over a grown tensor (writing
/// it, drawing it, Drop-Upcycling's moments) goes through here, so they chunk alike.
fn row_chunks(
    rows: usize,
    row_bytes: usize,
    cancel: &AtomicBool,
    mut each: impl FnMut(usize, usize) -> Result<()>,
) -> Result<()> {
    let rows_per_chunk = (WRITE_CHUNK_BYTES / row_bytes.max(1)).max(1);
    let mut row = 0;
    while row < rows {
        stop_if_cancelled(cancel)?;
        let n = rows_per_chunk.min(rows - row);
        each(row, n)?;
        row += n;
    }
    Ok(())
}

/// Mean and standard deviation of a grown tensor as stored (the statistics Drop-Upcycling
/// re-draws from), summed in row order so the result is the same on any thread count.
fn grown_moments(exp: &Expansion, dtype: crate::DType, cancel: &AtomicBool) -> Result<(f64, f64)> {
    let [rows, cols] = exp.dest_shape();
    let row_bytes = exp.dest_row_bytes();
    let mut buf = Vec::new();
    let mut values = vec![0f64; cols];
    let (mut sum, mut sum_sq) = (0f64, 0f64);
    row_chunks(rows, row_bytes, cancel, |row, n| {
        buf.resize(n * row_bytes, 0);
        exp.fill_rows(row, &mut buf);
        for r in buf.chunks_exact(row_bytes) {
            dtype.decode(r, &mut values);
            for v in &values {
                sum += v;
                sum_sq += v * v;
            }
        }
        Ok(())
    })?;
    let count = (rows * cols).max(1) as f64;
    let mean = sum / count;
    Ok((mean, (sum_sq / count - mean * mean).max(0.0).sqrt()))
}

/// Re-draws the dropped units' entries of the rows starting at `first_row` (rows of gate
/// and up, columns of down): N(mean, std^2) at (the tensor's key, flat index). Every other
/// entry keeps its bytes (decoding and encoding a stored value is exact).
fn redraw_units(
    buf: &mut [u8],
    t: &crate::plan::DestTensor,
    first_row: usize,
    d: &DropSpec,
    units: &[bool],
    mean: f64,
    std: f64,
) {
    let cols = t.shape.last().copied().unwrap_or(1).max(1);
    let row_bytes = cols * t.dtype.size();
    let mut values = vec![0f64; cols];
    for (k, out) in buf.chunks_exact_mut(row_bytes).enumerate() {
        let row = first_row + k;
        let whole_row = d.ffn_axis == 0 && units[row];
        if d.ffn_axis == 0 && !whole_row {
            continue;
        }
        t.dtype.decode(out, &mut values);
        for (c, v) in values.iter_mut().enumerate() {
            if whole_row || (d.ffn_axis == 1 && units[c]) {
                *v = drawn(d.values_key, (row * cols + c) as u64, mean, std);
            }
        }
        t.dtype.encode(&values, out);
    }
}

/// One grown tensor held in memory.
pub struct GrownTensor {
    pub name: String,
    pub dtype: crate::DType,
    pub shape: Vec<usize>,
    /// Little-endian, row-major.
    pub data: Vec<u8>,
}

/// The source's companion files (tokenizer, generation config, ...) a clone copies, sorted.
fn companion_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut companions: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(is_companion_file)
        })
        .collect();
    companions.sort();
    Ok(companions)
}

/// Every file a clone of `plan` writes, in [`write_clone`]'s order: the shards, the index
/// when sharded, config.json, README.md, then the source's companion files (what `plan`
/// announces and `clone` then reports).
pub fn output_file_names(ckpt: &Checkpoint, plan: &Plan) -> Result<Vec<String>> {
    let mut files: Vec<String> = plan.shards.iter().map(|s| s.file_name.clone()).collect();
    if plan.is_sharded() {
        files.push(INDEX_FILE.to_string());
    }
    files.extend(["config.json".to_string(), "README.md".to_string()]);
    for p in companion_files(&ckpt.dir)? {
        if let Some(name) = p.file_name().and_then(|n| n.to_str()) {
            files.push(name.to_string());
        }
    }
    Ok(files)
}

/// Grows every tensor of `plan` into memory instead of files (the same kernel, the same
/// checks, the same bytes as the files [`write_clone`] writes).
pub fn grow_tensors(
    ckpt: &Checkpoint,
    plan: &Plan,
    cancel: &AtomicBool,
    allow_nonfinite: bool,
) -> Result<Vec<GrownTensor>> {
    let mut out = Vec::with_capacity(plan.tensors.len());
    for t in &plan.tensors {
        let mut data = Vec::with_capacity(t.bytes() as usize);
        expand_tensor(
            ckpt,
            plan,
            t,
            cancel,
            allow_nonfinite,
            &mut || Ok(Vec::new()),
            &mut |buf| {
                data.extend_from_slice(&buf);
                Ok(())
            },
        )?;
        out.push(GrownTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            data,
        });
    }
    Ok(out)
}

/// Produces destination tensor `t` in chunks of whole rows (at most [`WRITE_CHUNK_BYTES`]):
/// `buffer` supplies a buffer to fill, `emit` takes each filled one.
fn expand_tensor(
    ckpt: &Checkpoint,
    plan: &Plan,
    t: &crate::plan::DestTensor,
    cancel: &AtomicBool,
    allow_nonfinite: bool,
    buffer: &mut dyn FnMut() -> Result<Vec<u8>>,
    emit: &mut dyn FnMut(Vec<u8>) -> Result<()>,
) -> Result<()> {
    if let Fill::Zeros | Fill::Normal { .. } = t.fill {
        return drawn_tensor(t, cancel, buffer, emit);
    }
    let src = &ckpt.tensors[t.source];
    let file = &ckpt.files[src.file];
    file.advise_willneed(&src.info);
    let data = file.data(&src.info);
    if !allow_nonfinite {
        let bad = src.info.dtype.count_nonfinite(data);
        if bad > 0 {
            return Err(Error::NonFinite {
                path: file.path.to_path_buf(),
                tensor: src.info.name.clone(),
                message: format!(
                    "{bad} of {} values are NaN or infinite; refusing to clone them",
                    src.info.numel()
                ),
            });
        }
    }
    let spec = ExpansionSpec {
        variant: plan.options.variant,
        snr_db: plan.options.snr_db,
        noise_key: t.noise_key,
        out_dtype: t.dtype,
        scale: t.scale,
        shift: t.shift,
    };
    let exp = Expansion::new(data, src.info.dtype, &t.axes, spec)
        .map_err(|m| Error::tensor(&file.path, &src.info.name, m))?;
    // Drop-Upcycling: the units re-drawn, and the grown tensor's mean and std they are
    // drawn from (a first pass over the grown rows; nothing is kept but two sums).
    let dropped = match &t.fill {
        Fill::Dropped(d) => {
            let units = dropped_units(d.units_key, t.shape[d.ffn_axis], d.ratio);
            let (mean, std) = grown_moments(&exp, t.dtype, cancel)?;
            Some((d, units, mean, std))
        }
        _ => None,
    };
    // Finite sources stay finite under W/n in the same or a wider dtype; a narrower
    // dtype (f32 -> f16 past 65504) or noise can overflow, so check those outputs.
    let check_output = !allow_nonfinite
        && (plan.options.variant.is_noisy()
            || dropped.is_some()
            || t.dtype.size() < src.info.dtype.size()
            || (t.dtype == crate::DType::F16 && src.info.dtype != crate::DType::F16));
    let rows = exp.dest_shape()[0];
    let row_bytes = exp.dest_row_bytes();
    row_chunks(rows, row_bytes, cancel, |row, n| {
        let mut buf = buffer()?;
        buf.resize(n * row_bytes, 0);
        exp.fill_rows(row, &mut buf);
        if let Some((d, units, mean, std)) = &dropped {
            redraw_units(&mut buf, t, row, d, units, *mean, *std);
        }
        if check_output {
            let bad = t.dtype.count_nonfinite(&buf);
            if bad > 0 {
                return Err(Error::tensor(
                    &file.path,
                    &src.info.name,
                    format!(
                        "growing it into {} `{}` gives {bad} NaN or infinite values \
                         (out of range of the output dtype, or snr_db too low)",
                        t.dtype.safetensors_name(),
                        t.name
                    ),
                ));
            }
        }
        emit(buf)
    })?;
    file.advise_done(&src.info);
    Ok(())
}
