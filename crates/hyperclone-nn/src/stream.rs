//! The forward pass of a checkpoint on disk holding one layer's weights at a time, so that
//! verifying a clone needs memory for one layer, not for two whole models (a 7B -> 14B
//! clone in f64 would otherwise need 170 GB).
//!
//! It computes exactly what [`Decoder::forward`](crate::Decoder::forward) computes: the
//! same [`Frame::layer_forward`] runs every block, on weights decoded the same way
//! ([`decode`]); only where they come from differs. The embedding is read by the rows of
//! the input tokens and the head in chunks of vocabulary rows (each logit is the same dot
//! product either way).

use crate::arch::Arch;
use crate::error::{stop_if_cancelled, NnError, Result};
use crate::model::{
    build_layer, decode, decode_rows, layer_prefix, ForwardOutput, Frame, Linear, Perturb, Weights,
};
use candle_core::{DType, Device, Tensor};
use hyperclone_core::checkpoint::SourceTensor;
use hyperclone_core::Checkpoint;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;

/// Vocabulary rows of the head decoded at once, in elements (32 to 64 MiB in f64, see
/// [`head_chunks`]): enough for the matmul to run at full speed, small next to any layer.
const HEAD_CHUNK_ELEMENTS: usize = 4 << 20;

/// Runs token ids [B, T] through the checkpoint's decoder in the working `dtype`, every
/// weight passed through `perturb` (element by element) first if given.
pub fn forward_streamed(
    ckpt: &Checkpoint,
    dtype: DType,
    device: &Device,
    perturb: Option<&Perturb<'_>>,
    ids: &Tensor,
) -> Result<ForwardOutput> {
    let never = AtomicBool::new(false);
    forward_streamed_in_chunks(
        ckpt,
        dtype,
        device,
        perturb,
        ids,
        HEAD_CHUNK_ELEMENTS,
        &never,
    )
}

/// [`forward_streamed`] that stops with "interrupted" before the next layer once `cancel`
/// is set: a Ctrl-C during `clone --verify` of a large model takes effect within one layer.
pub fn forward_streamed_cancellable(
    ckpt: &Checkpoint,
    dtype: DType,
    device: &Device,
    ids: &Tensor,
    cancel: &AtomicBool,
) -> Result<ForwardOutput> {
    forward_streamed_in_chunks(ckpt, dtype, device, None, ids, HEAD_CHUNK_ELEMENTS, cancel)
}

/// The streamed forward pass itself: [`forward_streamed`] with the head decoded `head_chunk`
/// elements (whole rows, at least one) at a time (tests split a tiny vocabulary into several
/// uneven chunks), stopping before the next layer once `cancel` is set. Runs on a thread of
/// rayon's pool ([`crate::shard::on_pool`]).
pub fn forward_streamed_in_chunks(
    ckpt: &Checkpoint,
    dtype: DType,
    device: &Device,
    perturb: Option<&Perturb<'_>>,
    ids: &Tensor,
    head_chunk: usize,
    cancel: &AtomicBool,
) -> Result<ForwardOutput> {
    crate::shard::on_pool(|| {
        let stop = || stop_if_cancelled(cancel);
        let (arch, frame) = Frame::of(ckpt, dtype, device)?;
        let (b, t) = ids.dims2()?;
        frame.check_ids(ids)?;
        let stored = |name: &str| -> Result<&SourceTensor> {
            ckpt.find(name).ok_or_else(|| {
                NnError::Input(format!("{}: tensor `{name}` missing", ckpt.dir.display()))
            })
        };
        let tokens: Vec<usize> = ids
            .flatten_all()?
            .to_vec1::<u32>()?
            .into_iter()
            .map(|i| i as usize)
            .collect();
        let embed = stored(&format!("{}.weight", arch.embed))?;
        let rows = decode_rows(ckpt, embed, &tokens, dtype, device, perturb)?;
        let position_table = match arch.positions {
            Some((name, offset)) => Some((stored(&format!("{name}.weight"))?, offset)),
            None => None,
        };
        let positions = match position_table {
            Some((table, offset)) => {
                let at: Vec<usize> = frame
                    .position_ids(b, t, offset)?
                    .to_vec1::<u32>()?
                    .into_iter()
                    .map(|p| p as usize)
                    .collect();
                Some(decode_rows(ckpt, table, &at, dtype, device, perturb)?)
            }
            None => None,
        };
        let head = ckpt.find(&format!("{}.weight", arch.head)).unwrap_or(embed);
        // Tables read by rows stay out of the small tensors loaded whole.
        let tables: Vec<&str> = [Some(embed), Some(head), position_table.map(|(t, _)| t)]
            .into_iter()
            .flatten()
            .map(|t| t.info.name.as_str())
            .collect();
        let rest = outside_layers(ckpt, &arch, &tables, dtype, device, perturb)?;
        let mut x = frame.input(rows, rest.projection(arch.project_in).as_ref(), positions)?;
        let ropes = frame.rope_tables(0, t)?;
        let d = x.dim(1)?;
        let mut residual = vec![x.reshape((b, t, d))?];
        for l in 0..frame.spec.layers {
            stop()?;
            // This layer's weights live only for this iteration.
            let w = layer_weights(ckpt, &arch, l, dtype, device, perturb)?;
            let layer = build_layer(&arch, &frame.spec, device, l, &w)?;
            x = frame.layer_forward(l, &layer, x, b, t, ropes.of(&frame.spec, l), None, None)?;
            residual.push(x.reshape((b, t, d))?);
        }
        stop()?;
        let h = frame.head_input(
            &x,
            rest.norm(arch.final_norm).as_ref(),
            rest.projection(arch.project_out).as_ref(),
        )?;
        let bias = rest.opt(&format!("{}.bias", arch.head));
        let logits = chunked_logits(
            ckpt,
            head,
            bias.as_ref(),
            &h,
            head_chunk,
            (dtype, device, perturb),
        )?;
        let logits = frame.softcap(logits)?;
        frame.output(logits, residual, h, b, t)
    })
}

/// Every tensor of layer `l`, in the working dtype.
fn layer_weights<'a>(
    ckpt: &'a Checkpoint,
    arch: &Arch,
    l: usize,
    dtype: DType,
    device: &Device,
    perturb: Option<&Perturb<'_>>,
) -> Result<Weights<'a>> {
    let prefix = format!("{}.", layer_prefix(arch, l));
    weights_where(ckpt, arch, dtype, device, perturb, |name| {
        name.starts_with(&prefix)
    })
}

/// The tensors outside the layers (final norm, OPT's projections, the head's bias) but for
/// the `tables` read by rows.
fn outside_layers<'a>(
    ckpt: &'a Checkpoint,
    arch: &Arch,
    tables: &[&str],
    dtype: DType,
    device: &Device,
    perturb: Option<&Perturb<'_>>,
) -> Result<Weights<'a>> {
    let layers = format!("{}.", arch.layers);
    weights_where(ckpt, arch, dtype, device, perturb, |name| {
        !name.starts_with(&layers) && !tables.contains(&name)
    })
}

fn weights_where<'a>(
    ckpt: &'a Checkpoint,
    arch: &Arch,
    dtype: DType,
    device: &Device,
    perturb: Option<&Perturb<'_>>,
    wanted: impl Fn(&str) -> bool,
) -> Result<Weights<'a>> {
    let mut map = HashMap::new();
    for t in ckpt.tensors.iter().filter(|t| wanted(&t.info.name)) {
        map.insert(
            t.info.name.clone(),
            decode(ckpt, t, dtype, device, perturb)?,
        );
    }
    Ok(Weights {
        map,
        dir: &ckpt.dir,
        norm: arch.norm,
        // A streamed layer runs once on a few positions: transposing its weights would
        // cost more than the matmuls gain (verify f64 SmolLM2 x2: 2.9 s -> 7.8 s, peak
        // 0.41 -> 0.52 GB).
        gemm_layout: false,
    })
}

/// h [N, d'] times the head [vocab, d'] (plus its bias), a chunk of vocabulary rows at a
/// time (see [`head_chunks`]): [N, vocab].
fn chunked_logits(
    ckpt: &Checkpoint,
    head: &SourceTensor,
    bias: Option<&Tensor>,
    h: &Tensor,
    chunk_elements: usize,
    (dtype, device, perturb): (DType, &Device, Option<&Perturb<'_>>),
) -> Result<Tensor> {
    let vocab = head.info.shape.first().copied().unwrap_or(0);
    let width = head.info.shape.get(1).copied().unwrap_or(1).max(1);
    let tokens = h.dim(0)?;
    let mut parts = Vec::new();
    for (start, len) in head_chunks(tokens, vocab, chunk_elements / width) {
        let rows: Vec<usize> = (start..start + len).collect();
        let w = decode_rows(ckpt, head, &rows, dtype, device, perturb)?;
        let b = bias.map(|b| b.narrow(0, start, len)).transpose()?;
        parts.push(Linear::new(w, b).forward(h)?);
    }
    Ok(Tensor::cat(&parts, 1)?)
}

/// Splits `vocab` head rows into (start, len) chunks of about `rows` rows, such that every
/// logit is summed in the same order as in the whole head's product.
///
/// The `gemm` crate picks its algorithm, and with it the order of a dot product's sum, by
/// the product's shape (m = tokens, n = head rows): n or m of 1 is a matrix-vector kernel,
/// m*n <= 256 a horizontal kernel, m and n both <= 64 a fixed depth blocking; larger
/// shapes block the depth by the depth alone. Chunks of at least [`min_chunk_rows`] rows
/// (and at least 2 tokens) stay in that last regime, as the whole head is then too, so
/// their logits are bit for bit the whole product's (tests/stream.rs checks it). Otherwise
/// the head is read whole.
pub fn head_chunks(tokens: usize, vocab: usize, rows: usize) -> Vec<(usize, usize)> {
    let least = min_chunk_rows(tokens);
    if tokens < 2 || vocab < 2 * least {
        return vec![(0, vocab)];
    }
    // Never fewer rows than `least`: the remainder is spread over the chunks, not left
    // as a small last one.
    let count = (vocab / rows.max(least)).max(1);
    let (base, extra) = (vocab / count, vocab % count);
    let mut out = Vec::with_capacity(count);
    let mut start = 0;
    for i in 0..count {
        let len = base + usize::from(i < extra);
        out.push((start, len));
        start += len;
    }
    out
}

/// The fewest head rows a chunk may have for `tokens` tokens (see [`head_chunks`]).
pub fn min_chunk_rows(tokens: usize) -> usize {
    65usize.max(256 / tokens.max(1) + 1)
}

/// Bytes [`forward_streamed`] needs at its peak for `tokens` tokens, besides the mapped
/// file: the largest layer in the working dtype plus one tensor's f64 staging copy, a head
/// chunk, and the activations (residual states, one layer's intermediates and attention
/// scores, the logits).
pub fn streamed_bytes(ckpt: &Checkpoint, dtype: DType, tokens: usize) -> u64 {
    // Saturating: the sizes come from the checkpoint's config and the caller's tokens.
    let c = &ckpt.config;
    let size = dtype.size_in_bytes() as u64;
    let mut per_layer = vec![0u64; c.num_hidden_layers];
    let mut largest = 0u64;
    for t in &ckpt.tensors {
        let n = t.info.numel() as u64;
        if let Some(l) = t.layer.and_then(|l| per_layer.get_mut(l)) {
            *l = l.saturating_add(n);
            largest = largest.max(n);
        }
    }
    let layer = per_layer.into_iter().max().unwrap_or(0);
    let weights = layer
        .saturating_mul(size)
        .saturating_add(largest.saturating_mul(8));
    // A chunk holds up to twice the budget's rows; a single token reads the head whole.
    let (vocab, hidden) = (c.vocab_size as u64, c.hidden_size as u64);
    let head_rows = if tokens < 2 {
        vocab
    } else {
        2 * (HEAD_CHUNK_ELEMENTS / c.hidden_size.max(1)).max(min_chunk_rows(tokens)) as u64
    };
    let head = head_rows
        .min(vocab)
        .saturating_mul(hidden)
        .saturating_mul(8 + size);
    let t = tokens as u64;
    let per_token = (c.num_hidden_layers as u64 + 1)
        .saturating_mul(hidden)
        .saturating_add((c.intermediate_size as u64).saturating_mul(8))
        .saturating_add((c.num_attention_heads as u64).saturating_mul(t))
        .saturating_add(vocab.saturating_mul(2));
    weights
        .saturating_add(head)
        .saturating_add(t.saturating_mul(per_token).saturating_mul(size))
}
