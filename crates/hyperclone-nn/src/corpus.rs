//! Training corpus: a byte-level BPE trained on text files, the files tokenized once into a
//! cached, memory-mapped u32 token file, and deterministic windows drawn from it.
//!
//! Training windows are addressed by (seed, step, micro-batch, row) through a counter-based
//! hash rather than a stateful RNG, so the batch of step k never depends on earlier steps:
//! a resumed run sees exactly the batches of an uninterrupted one, with no RNG state to save.

use crate::error::{NnError, Result};
use crate::rng::mix64;
use crate::tokenizer_guard::guarded;
use memmap2::Mmap;
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    Tokenizer, TokenizerImpl,
};

/// The end-of-document token that [`train_bpe`] reserves as id 0, so a trainer can look it
/// up (`tokenizer.token_to_id(EOS_TOKEN)`) and pass it to [`tokenize_to_cache`].
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// Bytes of text per encoding job. Chunks let one large file use every core, and bound the
/// memory of the tokenizer's intermediate strings; 256 KiB is large enough that the
/// per-call overhead disappears.
const CHUNK_BYTES: usize = 256 * 1024;

/// Files tokenized together before their tokens are written out: bounds the memory of
/// [`tokenize_to_cache`] on large corpora while still parallelising across small files.
const GROUP_BYTES: u64 = 64 * 1024 * 1024;

/// Bumped whenever the cache file's content would change for the same inputs (format,
/// chunking rule, separator placement), so stale caches are never reused.
const CACHE_FORMAT: &[u8] = b"hyperclone-corpus-v1";

fn io_err(path: &Path, e: std::io::Error) -> NnError {
    hyperclone_core::Error::io(path, e).into()
}

fn tok_err(what: &str, e: tokenizers::Error) -> NnError {
    NnError::Input(format!("{what}: {e}"))
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
    String::from_utf8(bytes)
        .map_err(|e| NnError::Input(format!("{}: not UTF-8 text: {e}", path.display())))
}

/// Splits `text` into pieces of about `target` bytes at places where the GPT-2 split regex of
/// the ByteLevel pre-tokenizer also splits the whole text, so encoding the pieces one by one
/// yields exactly the tokens of encoding the whole. Such a place is right after a `\n` that
/// sits between two printable ASCII characters (`a\nb`): the lone `\n` is its own pre-token
/// either way. Cutting after a run of whitespace would not be safe (`\s+(?!\S)` matches the
/// run differently at the end of a string), hence the non-whitespace neighbours. Text
/// without such places stays one piece, which is still correct, only slower.
fn chunks(text: &str, target: usize) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    while bytes.len() - start > target {
        let from = start + target.max(2);
        let cut = (from..bytes.len()).find(|&i| {
            bytes[i - 1] == b'\n' && bytes[i - 2].is_ascii_graphic() && bytes[i].is_ascii_graphic()
        });
        match cut {
            Some(i) => {
                out.push(&text[start..i]);
                start = i;
            }
            None => break,
        }
    }
    out.push(&text[start..]);
    out
}

/// Longest run of whitespace or of non-whitespace the BPE trainer sees in one piece (bytes).
/// The trainer applies a merge to a word by removing symbols from a vector, which is
/// quadratic in the word's length: 300 KB of text without a space is one 300 KB pre-token
/// and took minutes. Real words are far shorter, so cutting longer runs into pieces of this
/// size changes no merge of ordinary text (only pairs straddling a cut inside a
/// pathological run go uncounted) and bounds the work to linear in the text.
const MAX_RUN_BYTES: usize = 256;

/// `text` cut so that no run of whitespace or non-whitespace is longer than `max` bytes
/// (cuts on char boundaries; text without such runs stays one piece).
fn bounded_runs(text: &str, max: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut run_start) = (0, 0);
    let mut prev_ws: Option<bool> = None;
    for (i, ch) in text.char_indices() {
        let ws = ch.is_whitespace();
        if prev_ws != Some(ws) {
            run_start = i;
        } else if i - run_start >= max {
            out.push(&text[start..i]);
            start = i;
            run_start = i;
        }
        prev_ws = Some(ws);
    }
    out.push(&text[start..]);
    out
}

/// Trains a byte-level BPE tokenizer (tokenizers crate: ByteLevel pre-tokenizer + decoder,
/// BpeTrainer) on text files.
///
/// The vocabulary is [`EOS_TOKEN`] (id 0), all 256 byte symbols, then merges; it has exactly
/// `vocab_size` entries unless the text runs out of pairs seen at least `min_frequency`
/// times, in which case it is smaller (never larger). Seeding all 256 bytes means any text,
/// even bytes unseen in training, encodes without an unknown token, and
/// `add_prefix_space = false` makes decode(encode(text)) return the text exactly.
///
/// Runs of whitespace or non-whitespace longer than [`MAX_RUN_BYTES`] are cut before
/// training (see there): training time stays linear in the text.
pub fn train_bpe(
    files: &[PathBuf],
    vocab_size: usize,
    min_frequency: u64,
) -> Result<tokenizers::Tokenizer> {
    let alphabet = ByteLevel::alphabet();
    let floor = alphabet.len() + 1;
    if vocab_size < floor {
        return Err(NnError::Input(format!(
            "vocab_size {vocab_size} is below {floor} (256 byte symbols + {EOS_TOKEN})"
        )));
    }
    if files.is_empty() {
        return Err(NnError::Input("no files to train a tokenizer on".into()));
    }
    let byte_level = ByteLevel::new(false, false, true);
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(min_frequency)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(EOS_TOKEN, true)])
        .initial_alphabet(alphabet.into_iter().collect())
        .build();
    let mut tk: TokenizerImpl<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerImpl::new(BPE::default());
    tk.with_pre_tokenizer(Some(byte_level))
        .with_decoder(Some(ByteLevelDecoder::default()));

    // Fed as chunks of whole documents rather than line by line (what train_from_files does):
    // the pre-tokens then match what tokenize_to_cache encodes, e.g. "\n\n" runs are seen.
    let texts = files
        .iter()
        .map(|f| read_text(f))
        .collect::<Result<Vec<_>>>()?;
    let pieces: Vec<&str> = texts
        .iter()
        .flat_map(|t| chunks(t, CHUNK_BYTES))
        .flat_map(|c| bounded_runs(c, MAX_RUN_BYTES))
        .collect();
    let label = files[0].display().to_string();
    guarded(Path::new(&label), "training a BPE on it", || {
        tk.train(&mut trainer, pieces.into_iter())
            .map(|_| ())
            .map_err(|e| tok_err("BPE training failed", e))
    })?;
    Ok(Tokenizer::from(tk))
}

/// All text files under each path (a file itself, or a directory walked recursively,
/// *.txt), sorted.
///
/// Sorted and deduplicated so the token stream, and hence the cache key and every batch, is
/// the same whatever order the paths or directory entries come in. An explicitly named file
/// is taken whatever its extension; finding nothing is an error, since an empty corpus is
/// always a mistaken path.
pub fn text_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
            let p = entry.map_err(|e| io_err(dir, e))?.path();
            let meta = std::fs::metadata(&p).map_err(|e| io_err(&p, e))?;
            if meta.is_dir() {
                walk(&p, out)?;
            } else if meta.is_file() && p.extension().is_some_and(|e| e == "txt") {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|e| io_err(p, e))?;
        if meta.is_dir() {
            walk(p, &mut out)?;
        } else {
            out.push(p.clone());
        }
    }
    out.sort();
    out.dedup();
    if out.is_empty() {
        return Err(NnError::Input(format!("no .txt files under {paths:?}")));
    }
    Ok(out)
}

/// Cache key: the format tag, the tokenizer, `eos` and each file's name and bytes, every
/// field length-prefixed so no two inputs hash alike. Names rather than full paths, so the
/// same corpus in another folder reuses the cache; the bytes, so an edited file does not.
fn cache_key(tokenizer_bytes: &[u8], files: &[PathBuf], eos: Option<u32>) -> Result<String> {
    fn field(h: &mut Sha256, bytes: &[u8]) {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    let mut h = Sha256::new();
    field(&mut h, CACHE_FORMAT);
    field(&mut h, tokenizer_bytes);
    match eos {
        Some(id) => field(&mut h, &id.to_le_bytes()),
        None => field(&mut h, b""),
    }
    h.update((files.len() as u64).to_le_bytes());
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let name = f
            .file_name()
            .map(|n| n.as_encoded_bytes())
            .unwrap_or_default();
        field(&mut h, name);
        let mut file = File::open(f).map_err(|e| io_err(f, e))?;
        let len = file.metadata().map_err(|e| io_err(f, e))?.len();
        h.update(len.to_le_bytes());
        loop {
            let n = file.read(&mut buf).map_err(|e| io_err(f, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Tokenizes the files with `tokenizer_json` into a flat little-endian u32 token file in
/// `cache_dir`, named by the sha256 of (tokenizer.json bytes, each file's name and bytes);
/// reuses it when present (write to a temp name, rename when complete). An end-of-document id
/// `eos` (if Some) separates files.
///
/// `eos` is part of the key too, since it changes the content. The rename makes a cache
/// file either complete or absent, so a crash never leaves a truncated one to be reused.
pub fn tokenize_to_cache(
    tokenizer_json: &Path,
    files: &[PathBuf],
    eos: Option<u32>,
    cache_dir: &Path,
) -> Result<PathBuf> {
    if files.is_empty() {
        return Err(NnError::Input("no files to tokenize".into()));
    }
    let tok_bytes = std::fs::read(tokenizer_json).map_err(|e| io_err(tokenizer_json, e))?;
    let key = cache_key(&tok_bytes, files, eos)?;
    let out = cache_dir.join(format!("{key}.u32"));
    if out.is_file() {
        return Ok(out);
    }

    let mut tokenizer = guarded(tokenizer_json, "loading it", || {
        Tokenizer::from_bytes(&tok_bytes)
            .map_err(|e| tok_err(&tokenizer_json.display().to_string(), e))
    })?;
    // A padded or truncated encoding would silently drop or invent tokens.
    tokenizer
        .with_truncation(None)
        .map_err(|e| tok_err("disabling truncation", e))?;
    tokenizer.with_padding(None);
    let vocab = tokenizer.get_vocab_size(true);
    if let Some(id) = eos {
        if id as usize >= vocab {
            return Err(NnError::Input(format!(
                "eos id {id} is outside the tokenizer's vocabulary of {vocab}"
            )));
        }
    }

    std::fs::create_dir_all(cache_dir).map_err(|e| io_err(cache_dir, e))?;
    hyperclone_core::staging::write_file_with(&out, |w| -> Result<()> {
        let mut first = true;
        let mut i = 0;
        while i < files.len() {
            // A group of files read and encoded in parallel, then written in order.
            let mut j = i;
            let mut bytes = 0u64;
            while j < files.len() && (j == i || bytes < GROUP_BYTES) {
                bytes += std::fs::metadata(&files[j]).map(|m| m.len()).unwrap_or(0);
                j += 1;
            }
            // Encoding panics inside the library (on rayon workers) come back here as
            // one error naming the tokenizer.
            let encoded: Vec<Vec<u32>> = guarded(tokenizer_json, "encoding the corpus", || {
                files[i..j]
                    .par_iter()
                    .map(|f| {
                        let text = read_text(f)?;
                        let parts = chunks(&text, CHUNK_BYTES)
                            .into_par_iter()
                            .map(|c| {
                                tokenizer
                                    .encode_fast(c, false)
                                    .map(|e| e.get_ids().to_vec())
                                    .map_err(|e| tok_err(&f.display().to_string(), e))
                            })
                            .collect::<Result<Vec<_>>>()?;
                        Ok(parts.concat())
                    })
                    .collect::<Result<_>>()
            })?;
            for ids in encoded {
                if let (Some(id), false) = (eos, first) {
                    w.write_all(&id.to_le_bytes())
                        .map_err(|e| io_err(&out, e))?;
                }
                first = false;
                let mut buf = Vec::with_capacity(ids.len() * 4);
                for id in ids {
                    buf.extend_from_slice(&id.to_le_bytes());
                }
                w.write_all(&buf).map_err(|e| io_err(&out, e))?;
            }
            i = j;
        }
        Ok(())
    })?;
    Ok(out)
}

/// A memory-mapped token file.
///
/// Mapped rather than read so that a corpus larger than RAM costs nothing up front and
/// several processes share one copy. The cache files are written once and renamed into
/// place, never modified, which is what makes the mapping safe to hold.
pub struct TokenFile {
    map: Option<Mmap>,
    len: usize,
}

impl TokenFile {
    /// Opens a file of little-endian u32 tokens, as written by [`tokenize_to_cache`].
    pub fn open(path: &Path) -> Result<Self> {
        if cfg!(target_endian = "big") {
            return Err(NnError::Unsupported(
                "token files are little-endian; this machine is big-endian".into(),
            ));
        }
        let file = File::open(path).map_err(|e| io_err(path, e))?;
        let bytes = file.metadata().map_err(|e| io_err(path, e))?.len();
        if bytes % 4 != 0 {
            return Err(NnError::Input(format!(
                "{}: {bytes} bytes is not a whole number of u32 tokens",
                path.display()
            )));
        }
        if bytes == 0 {
            return Ok(Self { map: None, len: 0 });
        }
        // SAFETY: token files are never modified after being renamed into place (see above).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| io_err(path, e))?;
        // Page-aligned in practice; checked because tokens() reinterprets the bytes.
        if map.as_ptr().align_offset(std::mem::align_of::<u32>()) != 0 {
            return Err(NnError::Unsupported(format!(
                "{}: mapping is not 4-byte aligned",
                path.display()
            )));
        }
        Ok(Self {
            map: Some(map),
            len: bytes as usize / 4,
        })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// All tokens, without copying.
    pub fn tokens(&self) -> &[u32] {
        match &self.map {
            // SAFETY: the mapping is 4-byte aligned, holds exactly `len` u32s (checked in
            // open), lives as long as `self`, and the machine is little-endian, so the bytes
            // are the u32 values as written.
            Some(m) => unsafe { std::slice::from_raw_parts(m.as_ptr().cast::<u32>(), self.len) },
            None => &[],
        }
    }

    /// `len` tokens from `start`, copied; panics when out of range, like slicing.
    pub fn window(&self, start: usize, len: usize) -> Vec<u32> {
        self.tokens()[start..start + len].to_vec()
    }
}

fn check_window(tokens: &TokenFile, seq: usize) -> Result<()> {
    if seq == 0 {
        return Err(NnError::Input("sequence length must be at least 1".into()));
    }
    if tokens.len() < seq + 1 {
        return Err(NnError::Input(format!(
            "token file has {} tokens, fewer than one window of seq + 1 = {}",
            tokens.len(),
            seq + 1
        )));
    }
    Ok(())
}

/// Appends one window starting at `start` as (inputs, targets shifted by one).
fn push_window(t: &[u32], start: usize, seq: usize, x: &mut Vec<u32>, y: &mut Vec<u32>) {
    x.extend_from_slice(&t[start..start + seq]);
    y.extend_from_slice(&t[start + 1..start + seq + 1]);
}

/// Deterministic random training windows: for (seed, step, micro) returns `batch` windows of
/// `seq + 1` consecutive tokens (inputs = first seq, targets = last seq), start offsets drawn
/// with a counter-based hash of (seed, step, micro, row) — so step k's batch never depends on
/// earlier steps (resume is trivially reproducible).
///
/// Returns row-major [batch, seq] inputs and targets. Every start in `0..=len - seq - 1` is
/// equally likely (up to 2^-64), so windows may overlap and the final tokens are reachable.
pub fn batch(
    tokens: &TokenFile,
    seed: u64,
    step: u64,
    micro: u64,
    batch: usize,
    seq: usize,
) -> Result<(Vec<u32>, Vec<u32>)> {
    check_window(tokens, seq)?;
    if batch == 0 {
        return Err(NnError::Input("batch size must be at least 1".into()));
    }
    let t = tokens.tokens();
    let starts = (t.len() - seq) as u128;
    // Nested hashing (not XOR of the fields) so that no two (seed, step, micro, row) tuples
    // are trivially related; each mix64 is a bijection of its 64-bit input.
    let base = mix64(mix64(mix64(seed ^ 0x6a09_e667_f3bc_c908) ^ step) ^ micro);
    let mut x = Vec::with_capacity(batch * seq);
    let mut y = Vec::with_capacity(batch * seq);
    for row in 0..batch as u64 {
        let h = mix64(base ^ mix64(row.wrapping_add(0x9e37_79b9_7f4a_7c15)));
        // Multiply-shift maps the hash onto [0, starts) without modulo's skew to low offsets.
        let start = ((h as u128 * starts) >> 64) as usize;
        push_window(t, start, seq, &mut x, &mut y);
    }
    Ok((x, y))
}

/// Fixed evaluation windows: the first `count` non-overlapping windows of seq + 1 tokens
/// spread evenly over the file.
///
/// The first window starts at token 0 and (for count > 1) the last ends at the file's end,
/// so the loss covers the whole file rather than its opening. If the file holds fewer than
/// `count` non-overlapping windows, all that fit are returned: a small validation split then
/// still gives a loss, and the output's length (windows × seq) says how many there are.
pub fn eval_windows(tokens: &TokenFile, count: usize, seq: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    check_window(tokens, seq)?;
    if count == 0 {
        return Err(NnError::Input(
            "eval window count must be at least 1".into(),
        ));
    }
    let t = tokens.tokens();
    let w = seq + 1;
    let k = count.min(t.len() / w);
    let span = (t.len() - w) as u128;
    let mut x = Vec::with_capacity(k * seq);
    let mut y = Vec::with_capacity(k * seq);
    for i in 0..k {
        // floor(i * span / (k - 1)): consecutive starts differ by at least floor(span / (k-1))
        // >= w because k <= len / w, hence no overlap.
        let start = if k == 1 {
            0
        } else {
            (i as u128 * span / (k as u128 - 1)) as usize
        };
        push_window(t, start, seq, &mut x, &mut y);
    }
    Ok((x, y))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_text_and_cut_only_between_printable_neighbours() {
        let text = "ab\ncd\n\n  ef\n gh\nij\r\nkl\nmn";
        let parts = chunks(text, 1);
        assert_eq!(parts.concat(), text);
        assert!(parts.len() > 2);
        for p in &parts[1..] {
            assert!(p.as_bytes()[0].is_ascii_graphic(), "{parts:?}");
        }
        assert_eq!(chunks("   \n   ", 1), vec!["   \n   "]);
        assert_eq!(chunks("", 4), vec![""]);
    }

    #[test]
    fn bounded_runs_cut_only_long_runs_on_char_boundaries() {
        // Ordinary text (every run shorter than the bound) is one piece: training unchanged.
        let prose = "Enter KING, with attendants.\n  Thou art\tso fair;  \n\n";
        assert_eq!(bounded_runs(prose, MAX_RUN_BYTES), vec![prose]);
        let long = format!("x {} y{}z", "é".repeat(300), " ".repeat(700));
        let parts = bounded_runs(&long, 256);
        assert_eq!(parts.concat(), long);
        assert!(parts.len() >= 5, "{}", parts.len());
        for p in &parts {
            let mut run = 0usize;
            let mut prev = None;
            for ch in p.chars() {
                run = if prev == Some(ch.is_whitespace()) {
                    run + ch.len_utf8()
                } else {
                    ch.len_utf8()
                };
                prev = Some(ch.is_whitespace());
                assert!(run <= 256, "a run of {run} bytes survived");
            }
        }
        assert_eq!(bounded_runs("", 4), vec![""]);
    }

    /// The property tokenize_to_cache relies on: encoding chunk by chunk gives the tokens of
    /// encoding the whole text, across every kind of whitespace run next to a cut.
    #[test]
    fn chunked_encoding_equals_whole_encoding() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::new();
        for i in 0..400 {
            text.push_str(match i % 7 {
                0 => "Enter KING, with attendants.\n",
                1 => "  Thou art\tso  fair, my lord;  \n\n",
                2 => "What's this? 'Tis naïve — 日本 —\r\n",
                3 => "a\nb\n c \n\n\nD\n",
                4 => "\n   \n\t\n",
                5 => "Exeunt.\nI'll ne'er see 42 of them\n",
                _ => "O!\nO!  \n",
            });
        }
        let f = dir.path().join("t.txt");
        std::fs::write(&f, &text).unwrap();
        let tk = train_bpe(&[f], 400, 1).unwrap();
        let whole = tk.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        for target in [1, 7, 64, 1000] {
            let parts = chunks(&text, target);
            assert!(parts.len() > 1);
            let ids: Vec<u32> = parts
                .iter()
                .flat_map(|c| tk.encode(*c, false).unwrap().get_ids().to_vec())
                .collect();
            assert_eq!(ids, whole, "chunk target {target}");
        }
    }
}
