//! Loading a model for inference, the token ids it reads, its logits, and text generation:
//! what `hyperclone forward` and `hyperclone generate` (and the demo) compute.

use crate::error::Context;
use crate::shard::{in_waves, shards};
use crate::tokenizer_guard::guarded;
use crate::verify::argmax;
use crate::{Decoder, NnError, Result};
use candle_core::{DType, Device, Tensor};
use hyperclone_core::Checkpoint;
use std::path::Path;
use tokenizers::Tokenizer;

/// The working precision named on the command line ("f64", "bf16"; anything else f32).
pub fn parse_dtype(s: &str) -> DType {
    match s {
        "f64" => DType::F64,
        "bf16" => DType::BF16,
        _ => DType::F32,
    }
}

/// MODEL/tokenizer.json.
pub fn tokenizer(model: &Path) -> Result<Tokenizer> {
    let p = model.join("tokenizer.json");
    // A FIFO or device would hang or never end.
    hyperclone_core::limits::ensure_regular_file(&p)?;
    guarded(&p, "loading it", || {
        Tokenizer::from_file(&p)
            .map_err(|e| NnError::Input(format!("{}: cannot load tokenizer: {e}", p.display())))
    })
}

/// A fixed probe: 16 ids spread over the vocabulary (no tokenizer needed).
pub fn probe_tokens(vocab: usize) -> Vec<u32> {
    (0..16u64)
        .map(|i| ((i * 7919 + 13) % vocab as u64) as u32)
        .collect()
}

/// Longest token sequence forward and verify accept (attention is quadratic in it).
pub const MAX_TOKENS: usize = 1 << 20;

/// Which tokens to feed a model (`--tokens`, `--random-tokens`, `--text`; none: the probe).
#[derive(Clone, Debug, Default)]
pub struct Input {
    /// Comma-separated token ids.
    pub tokens: Option<String>,
    /// Text, tokenized with the model's tokenizer.json.
    pub text: Option<String>,
    /// This many seeded pseudo-random ids.
    pub random_tokens: Option<usize>,
}

/// The ids `input` names, checked against the model's vocabulary; text is tokenized with
/// MODEL/tokenizer.json.
pub fn input_ids(input: &Input, model: &Path, vocab: usize) -> Result<Vec<u32>> {
    if let Some(t) = &input.tokens {
        let ids: Vec<u32> = t
            .split(',')
            .map(|x| {
                x.trim()
                    .parse::<u32>()
                    .with_context(|| format!("--tokens: `{x}` is not a token id"))
            })
            .collect::<Result<_>>()?;
        if ids.is_empty() {
            bail!("--tokens is empty");
        }
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            bail!("--tokens: id {bad} is outside the model's vocabulary of {vocab}");
        }
        return Ok(ids);
    }
    if let Some(t) = input.random_tokens {
        if t == 0 {
            bail!("--random-tokens 0: give at least one token");
        }
        if t > MAX_TOKENS {
            bail!("--random-tokens {t}: at most {MAX_TOKENS} tokens");
        }
        let mut state = 0x5eed_u64;
        return Ok((0..t)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) % vocab as u64) as u32
            })
            .collect());
    }
    if let Some(text) = &input.text {
        let tok = tokenizer(model)?;
        let enc = guarded(&model.join("tokenizer.json"), "encoding --text", || {
            tok.encode(text.as_str(), false)
                .map_err(|e| NnError::Input(format!("tokenizing --text: {e}")))
        })?;
        if enc.get_ids().is_empty() {
            bail!("--text gave no tokens");
        }
        return Ok(enc.get_ids().to_vec());
    }
    Ok(probe_tokens(vocab))
}

/// Opens MODEL and loads its decoder on the CPU in `dtype`, laid out for fast forwards
/// ([`Decoder::load_for_inference`]).
pub fn load(model: &Path, dtype: DType) -> Result<(Checkpoint, Decoder)> {
    let ckpt = Checkpoint::open(model)?;
    let dec = Decoder::load_for_inference(&ckpt, dtype, &Device::Cpu)?;
    Ok((ckpt, dec))
}

/// The first sequence's logits of a forward pass over `batch` copies of `ids`.
pub struct Logits {
    /// [tokens][vocab], in f32.
    pub rows: Vec<Vec<f32>>,
    /// Mean seconds of `repeat` further forwards (none when `repeat` is 0).
    pub seconds_per_forward: Option<f64>,
}

/// Runs `model` on `batch` copies of `ids` and returns the first copy's logits, timing
/// `repeat` more forwards when asked.
pub fn forward_logits(model: &Decoder, ids: &[u32], batch: usize, repeat: usize) -> Result<Logits> {
    if batch == 0 || batch > MAX_TOKENS / ids.len() {
        bail!("--batch {batch}: must be at least 1 and hold at most {MAX_TOKENS} tokens in all");
    }
    let all: Vec<u32> = ids
        .iter()
        .copied()
        .cycle()
        .take(ids.len() * batch)
        .collect();
    let input = Tensor::from_vec(all, (batch, ids.len()), &Device::Cpu)?;
    // Only the first row's logits are kept: the shards are not joined.
    let first = |parts: Vec<Tensor>| -> Result<Tensor> {
        match parts.first() {
            Some(part) => Ok(part.get(0)?.to_dtype(DType::F32)?),
            None => bail!("a forward of {batch} rows gave no logits"),
        }
    };
    let logits = first(sharded_logit_parts(model, &input)?)?;
    let mut seconds_per_forward = None;
    if repeat > 0 {
        let start = std::time::Instant::now();
        for _ in 0..repeat {
            sharded_logit_parts(model, &input)?;
        }
        seconds_per_forward = Some(start.elapsed().as_secs_f64() / repeat as f64);
    }
    Ok(Logits {
        rows: logits.to_vec2()?,
        seconds_per_forward,
    })
}

/// The logits of every row of `input` ([batch, positions]): the rows' [`shards`] run
/// forward side by side, one per thread (rows are independent, so each row's logits are
/// those of the whole batch's forward).
pub fn sharded_logits(model: &Decoder, input: &Tensor) -> Result<Tensor> {
    let parts = sharded_logit_parts(model, input)?;
    match <[Tensor; 1]>::try_from(parts) {
        Ok([whole]) => Ok(whole),
        Err(parts) => Ok(Tensor::cat(&parts, 0)?),
    }
}

/// As [`sharded_logits`], each shard's logits as its own tensor ([rows, positions, vocab]
/// each, in row order): joining them copies every logit into fresh memory (400 MB for a
/// 4x512 SmolLM2 forward, whose time it took from 3.17-3.20 to 3.65-3.83 s on 2 Zen 4
/// cores), which a caller reading a few rows does not need.
pub fn sharded_logit_parts(model: &Decoder, input: &Tensor) -> Result<Vec<Tensor>> {
    let (batch, positions) = input.dims2()?;
    let cut = shards(batch, positions);
    if cut.len() == 1 {
        return Ok(vec![model.forward(input)?.logits]);
    }
    let mut parts = Vec::with_capacity(cut.len());
    in_waves(
        &cut,
        |r| Ok(model.forward(&input.narrow(0, r.start, r.len())?)?.logits),
        |_, logits| {
            parts.push(logits);
            Ok(())
        },
    )?;
    Ok(parts)
}

/// Continues `prompt` for at most `max_tokens` (greedy at temperature 0, else seeded
/// sampling), calling `emit` with each newly decoded piece; returns the continuation.
#[allow(clippy::too_many_arguments)]
pub fn complete(
    ckpt: &Checkpoint,
    model: &Decoder,
    tok: &Tokenizer,
    prompt: &str,
    max_tokens: usize,
    temperature: f64,
    seed: u64,
    mut emit: impl FnMut(&str),
) -> Result<String> {
    // The tokenizer is MODEL/tokenizer.json (see [`tokenizer`]): named if it fails.
    let tok_file = ckpt.dir.join("tokenizer.json");
    let mut ids = guarded(&tok_file, "encoding the prompt", || {
        tok.encode(prompt, false)
            .map_err(|e| NnError::Input(format!("tokenizing the prompt: {e}")))
    })?
    .get_ids()
    .to_vec();
    if ids.is_empty() {
        bail!("the prompt gave no tokens");
    }
    let eos = eos_ids(ckpt);
    let prompt_len = ids.len();
    let mut rng = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut printed = String::new();
    // A KV cache: the prompt runs once, then each token costs one position.
    let mut cache = model.new_cache();
    for _ in 0..max_tokens {
        let fresh = &ids[cache.len()..];
        let input = Tensor::from_vec(fresh.to_vec(), (1, fresh.len()), &Device::Cpu)?;
        let logits = model.forward_next(&input, &mut cache)?.squeeze(0)?;
        let last: Vec<f64> = logits.to_dtype(DType::F64)?.to_vec1()?;
        let next = if temperature <= 0.0 {
            argmax(&last)
        } else {
            sample(&last, temperature, &mut rng)
        } as u32;
        if eos.contains(&next) {
            break;
        }
        ids.push(next);
        let text = guarded(&tok_file, "decoding", || {
            tok.decode(&ids[prompt_len..], true)
                .map_err(|e| NnError::Input(format!("decoding: {e}")))
        })?;
        if let Some(new) = text.strip_prefix(printed.as_str()) {
            emit(new);
        }
        printed = text;
    }
    Ok(printed)
}

/// The end-of-sequence ids of config.json and generation_config.json.
pub fn eos_ids(ckpt: &Checkpoint) -> Vec<u32> {
    let mut v = Vec::new();
    let mut add = |x: Option<&serde_json::Value>| match x {
        Some(serde_json::Value::Number(n)) => v.extend(n.as_u64().map(|n| n as u32)),
        Some(serde_json::Value::Array(a)) => {
            v.extend(a.iter().filter_map(|n| n.as_u64()).map(|n| n as u32))
        }
        _ => {}
    };
    add(ckpt.config.raw.get("eos_token_id"));
    // Bounded and regular-file only (a FIFO would hang); an unreadable file adds nothing.
    if let Ok(g) = hyperclone_core::limits::read_json(&ckpt.dir.join("generation_config.json")) {
        add(g.get("eos_token_id"));
    }
    v
}

/// Samples an index from softmax(logits / temperature) with a seeded LCG.
pub fn sample(logits: &[f64], temperature: f64, state: &mut u64) -> usize {
    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = logits
        .iter()
        .map(|x| ((x - m) / temperature).exp())
        .collect();
    let total: f64 = w.iter().sum();
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut u = (*state >> 11) as f64 / (1u64 << 53) as f64 * total;
    for (i, x) in w.iter().enumerate() {
        if u < *x {
            return i;
        }
        u -= x;
    }
    w.len() - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(input: Input) -> Result<Vec<u32>> {
        input_ids(&input, Path::new("no-model"), 50)
    }

    #[test]
    fn token_flags_are_checked_against_the_vocabulary() {
        let tokens = |t: &str| Input {
            tokens: Some(t.into()),
            ..Input::default()
        };
        assert_eq!(ids(tokens("1, 2,3")).unwrap(), [1, 2, 3]);
        let e = ids(tokens("1,x")).unwrap_err();
        // The context names the flag; the parse error follows in the chain.
        assert_eq!(e.to_string(), "--tokens: `x` is not a token id");
        assert!(std::error::Error::source(&e).is_some());
        let e = ids(tokens("50")).unwrap_err().to_string();
        assert!(e.contains("outside the model's vocabulary of 50"), "{e}");
        // No flag: the fixed probe, no tokenizer needed.
        assert_eq!(ids(Input::default()).unwrap(), probe_tokens(50));
        let random = Input {
            random_tokens: Some(8),
            ..Input::default()
        };
        let r = ids(random.clone()).unwrap();
        assert_eq!(r, ids(random).unwrap(), "seeded");
        assert!(r.len() == 8 && r.iter().all(|&i| i < 50));
    }

    #[test]
    fn sampling_is_seeded_and_follows_the_temperature() {
        let logits = [0.0, 5.0, 0.0];
        let (mut a, mut b) = (7u64, 7u64);
        let xs: Vec<usize> = (0..32).map(|_| sample(&logits, 1.0, &mut a)).collect();
        let ys: Vec<usize> = (0..32).map(|_| sample(&logits, 1.0, &mut b)).collect();
        assert_eq!(xs, ys);
        // Near zero temperature the largest logit always wins.
        let mut s = 1u64;
        assert!((0..32).all(|_| sample(&logits, 1e-3, &mut s) == 1));
    }
}
