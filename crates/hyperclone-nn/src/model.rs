//! The generic decoder: one forward pass for every supported family, wired by `arch.rs`
//! (where tensors live, how a block is connected) and `spec.rs` (numeric switches).
//!
//! Written with plain differentiable candle ops (no fused kernels without a backward), so
//! the same code serves verification in f64 and training in f32.

use crate::arch::{arch, Arch, AttnLayout, BlockLayout, MlpLayout};
use crate::error::{NnError, Result};
use crate::packed_linear::{packable, PackedWeight};
use crate::softmax::CausalSoftmax;
use crate::spec::{Activation, DecoderSpec, LayerRope, NormKind};
use candle_core::{DType, Device, Tensor, Var, D};
use hyperclone_core::checkpoint::SourceTensor;
use hyperclone_core::Checkpoint;
use std::collections::HashMap;

/// A projection whose weight is always a view of the loaded tensor (a narrow or a
/// transpose shares its storage), never a copy made at load time: training updates the
/// loaded tensors in place, and every view sees the update. Rows that no view can express
/// (NeoX's per-head q|k|v interleave) are gathered at each forward instead.
pub(crate) struct Linear {
    /// [out, in] (possibly a strided view).
    w: Tensor,
    b: Option<Tensor>,
    /// Rows of `w` (and `b`) to use, gathered at forward time.
    select: Option<Tensor>,
    /// Inference only: the weight in the packed kernel's layout (packed_linear.rs); `w`
    /// is then an empty placeholder, so the weights are held once.
    packed: Option<PackedWeight>,
    /// Inference only: the weight is packed with others of the same input (q|k|v,
    /// gate|up; see [`Linear::pack_group`]) and runs through [`forward_packed_group`];
    /// `w` is an empty placeholder.
    in_group: bool,
}

impl Linear {
    pub(crate) fn new(w: Tensor, b: Option<Tensor>) -> Linear {
        Linear {
            w,
            b,
            select: None,
            packed: None,
            in_group: false,
        }
    }

    /// Whether the weight can be packed: a plain f32 weight this CPU's kernel takes,
    /// not already packed, no rows selected at forward time.
    fn packable(&self) -> bool {
        self.packed.is_none() && !self.in_group && self.select.is_none() && packable(&self.w)
    }

    /// For inference: packs the weight once for the packed kernel where this CPU and the
    /// weight allow it ([`packable`]: f32 with AVX-512F or AVX2+FMA, bf16 with
    /// AVX512-BF16); otherwise keeps it.
    fn pack_for_inference(&mut self) -> Result<()> {
        if self.packable() {
            self.packed = Some(PackedWeight::new(&self.w)?);
            self.w = Tensor::zeros(0, self.w.dtype(), self.w.device())?;
        }
        Ok(())
    }

    /// For inference: packs Linears that read the same input as one weight, so they run
    /// as one parallel call (bit for bit what each would give packed alone). None, with
    /// nothing changed, unless every one can be packed; each is then packed on its own.
    fn pack_group(linears: &mut [&mut Linear]) -> Result<Option<PackedWeight>> {
        if linears.len() < 2 || !linears.iter().all(|l| l.packable()) {
            return Ok(None);
        }
        let ws: Vec<&Tensor> = linears.iter().map(|l| &l.w).collect();
        let packed = PackedWeight::new_parts(&ws)?;
        for l in linears.iter_mut() {
            l.w = Tensor::zeros(0, l.w.dtype(), l.w.device())?;
            l.in_group = true;
        }
        Ok(Some(packed))
    }

    /// x: [N, in] -> [N, out]
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.in_group {
            return Err(NnError::Input(
                "a Linear packed in a group runs through its group".into(),
            ));
        }
        let (y, b) = match (&self.packed, &self.select) {
            (Some(p), _) => (p.matmul(x)?, self.b.clone()),
            (None, Some(idx)) => (
                x.matmul(&self.w.index_select(idx, 0)?.t()?)?,
                self.b
                    .as_ref()
                    .map(|b| b.index_select(idx, 0))
                    .transpose()?,
            ),
            (None, None) => (x.matmul(&self.w.t()?)?, self.b.clone()),
        };
        with_bias(y, b.as_ref())
    }

    /// y + the bias, for a product x·Wᵀ made by this Linear's packed group (a grouped
    /// Linear has no selected rows: its bias is the whole one).
    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        with_bias(y, self.b.as_ref())
    }

    /// Rows [start, start + len) of a fused Linear (a view); before packing only.
    fn rows(&self, start: usize, len: usize) -> Result<Linear> {
        if self.packed.is_some() {
            return Err(NnError::Input("rows of a packed Linear".into()));
        }
        Ok(Linear::new(
            self.w.narrow(0, start, len)?,
            self.b
                .as_ref()
                .map(|b| b.narrow(0, start, len))
                .transpose()?,
        ))
    }
}

pub(crate) struct Norm {
    w: Tensor,
    b: Option<Tensor>,
    kind: NormKind,
}

impl Norm {
    fn forward(&self, x: &Tensor, eps: f64) -> Result<Tensor> {
        if x.dtype() == DType::BF16 && x.device().is_cpu() {
            // As transformers does: a bf16 row is normalized in f32 and the result rounded
            // to bf16. In bf16 throughout (the mean square summed in bf16), SmolLM2's bf16
            // logits were 16x further from the f64 ones than transformers' bf16 logits.
            let f32 = |t: &Tensor| t.to_dtype(DType::F32);
            let norm = Norm {
                w: f32(&self.w)?,
                b: self.b.as_ref().map(f32).transpose()?,
                kind: self.kind,
            };
            return Ok(norm.forward(&f32(x)?, eps)?.to_dtype(DType::BF16)?);
        }
        match self.kind {
            NormKind::Rms => rms_norm(x, &self.w, eps),
            NormKind::RmsOnePlus => rms_norm(x, &(self.w.affine(1.0, 1.0))?, eps),
            NormKind::Layer => {
                let mean = x.mean_keepdim(D::Minus1)?;
                let centred = x.broadcast_sub(&mean)?;
                let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
                let y = centred
                    .broadcast_div(&(var + eps)?.sqrt()?)?
                    .broadcast_mul(&self.w)?;
                Ok(match &self.b {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                })
            }
        }
    }
}

// One per layer: the size difference between variants costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
enum Mlp {
    Gated {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
    Plain {
        up: Linear,
        down: Linear,
    },
    /// A Mixture of Experts ([`crate::spec::MoeSpec`] says how it routes).
    Moe {
        router: Linear,
        /// (gate, up, down) of each expert.
        experts: Vec<(Linear, Linear, Linear)>,
        /// Qwen2-MoE's shared expert (gate, up, down) and its gate [1, hidden].
        shared: Option<((Linear, Linear, Linear), Linear)>,
    },
}

pub(crate) struct Layer {
    pre_attn: Option<Norm>,
    post_attn: Option<Norm>,
    pre_mlp: Option<Norm>,
    post_mlp: Option<Norm>,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    mlp: Mlp,
    /// Inference only: q|k|v packed as one weight (see [`Linear::pack_group`]).
    qkv: Option<PackedWeight>,
    /// Inference only: a gated MLP's gate|up packed as one weight.
    gate_up: Option<PackedWeight>,
}

/// y + b broadcast over the rows (y itself without a bias).
fn with_bias(y: Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// Linears of one input, through their packed group when [`Linear::pack_group`] made one
/// (one parallel call), else one at a time.
fn forward_packed_group<const N: usize>(
    linears: [&Linear; N],
    group: Option<&PackedWeight>,
    x: &Tensor,
) -> Result<[Tensor; N]> {
    let ys: Vec<Tensor> = match group {
        Some(packed) => packed
            .matmul_parts(x)?
            .into_iter()
            .zip(linears)
            .map(|(y, l)| l.add_bias(y))
            .collect::<Result<_>>()?,
        None => linears
            .into_iter()
            .map(|l| l.forward(x))
            .collect::<Result<_>>()?,
    };
    ys.try_into()
        .map_err(|ys: Vec<Tensor>| NnError::Input(format!("{} outputs for {N} Linears", ys.len())))
}

impl Layer {
    /// Packs every projection for the inference kernel (see [`Linear::pack_for_inference`]):
    /// q|k|v as one group and a gated MLP's gate|up as another (each reads one input).
    /// A Mixture of Experts' router stays as it is: its logits pick experts, and the
    /// packed kernel's last-bit differences could flip a near-tie.
    fn pack_for_inference(&mut self) -> Result<()> {
        self.qkv = Linear::pack_group(&mut [&mut self.q, &mut self.k, &mut self.v])?;
        if let Mlp::Gated { gate, up, .. } = &mut self.mlp {
            self.gate_up = Linear::pack_group(&mut [gate, up])?;
        }
        let mut linears = vec![&mut self.q, &mut self.k, &mut self.v, &mut self.o];
        match &mut self.mlp {
            Mlp::Gated { gate, up, down } => linears.extend([gate, up, down]),
            Mlp::Plain { up, down } => linears.extend([up, down]),
            Mlp::Moe {
                experts, shared, ..
            } => {
                for (g, u, d) in experts.iter_mut() {
                    linears.extend([g, u, d]);
                }
                if let Some(((g, u, d), _)) = shared {
                    linears.extend([g, u, d]);
                }
            }
        }
        linears.into_iter().try_for_each(Linear::pack_for_inference)
    }
}

/// What a forward pass needs besides the weights: the numeric switches, the working
/// precision and device, and how a block is wired. The resident [`Decoder`] and the
/// layer-streamed forward (`stream.rs`) both run every block through
/// [`Frame::layer_forward`], so there is one implementation of a block.
pub struct Frame {
    pub spec: DecoderSpec,
    pub dtype: DType,
    pub device: Device,
    block: BlockLayout,
    /// Learned position embeddings (GPT-2, OPT) instead of rotary ones.
    learned_positions: bool,
    /// A decoder loaded for inference (no gradients; forward and generate), never for
    /// training or verification: attention through the fused kernel (attention.rs) and a
    /// bf16 model's SwiGLU through the fused op (whose backward takes f32/f64 only).
    inference: bool,
}

/// A decoder with every weight resident in the working dtype (training, generation).
pub struct Decoder {
    frame: Frame,
    /// The token embedding [vocab, d]; None when a tied head is packed for inference and
    /// the lookup reads its rows from the packed panels.
    embed: Option<Tensor>,
    positions: Option<(Tensor, usize)>,
    project_in: Option<Linear>,
    project_out: Option<Linear>,
    layers: Vec<Layer>,
    norm: Option<Norm>,
    head: Linear,
}

/// `decoder.spec`, `decoder.dtype`, `decoder.device` and the block functions read through
/// the frame.
impl std::ops::Deref for Decoder {
    type Target = Frame;
    fn deref(&self) -> &Frame {
        &self.frame
    }
}

/// Logits and the residual stream, for verification.
pub struct ForwardOutput {
    /// [B, T, vocab]
    pub logits: Tensor,
    /// The residual stream after the embedding and after every layer: L + 1 tensors [B, T, d].
    pub residual: Vec<Tensor>,
    /// What the head reads (after the final norm, and OPT's project_out): [B, T, d'].
    pub final_norm: Tensor,
}

fn join(a: &str, b: &str) -> String {
    if b.is_empty() {
        a.to_string()
    } else if a.is_empty() {
        b.to_string()
    } else {
        format!("{a}.{b}")
    }
}

/// A trainable weight: a candle variable shared with the decoder that reads it.
pub struct Param {
    pub name: String,
    pub var: Var,
    /// AdamW's weight decay applies to matrices and embeddings, not to norms and biases.
    pub decay: bool,
}

/// Deterministic (inverted) dropout: the mask of each site is a pure function of
/// (key, site, element), so a resumed run draws exactly the masks of an uninterrupted one.
/// Elements are numbered in the whole micro-batch: a shard of it (`first_row` its first
/// row) draws the same masks as the unsharded batch.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub p: f64,
    pub key: u64,
    pub first_row: u64,
}

impl Dropout {
    /// `x` holds `rows` rows of the shard (whatever its shape: [rows, t, h] or [rows * t, h]).
    fn apply(&self, x: &Tensor, site: u64, rows: usize) -> Result<Tensor> {
        if self.p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 / (1.0 - self.p);
        let n = x.elem_count();
        let key = crate::rng::mix64(self.key ^ crate::rng::mix64(site.wrapping_add(0x5151)));
        let per_row = (n / rows.max(1)) as u64;
        let first = self.first_row * per_row;
        let mask: Vec<f64> = (first..first + n as u64)
            .map(|i| {
                if crate::rng::uniform(key, i) < self.p {
                    0.0
                } else {
                    keep
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok((x * mask)?)
    }
}

/// Keys and values of every position run so far, per layer (after rotary and q/k norms), so
/// that generation runs one new position per token instead of the whole prefix.
pub struct KvCache {
    /// [B, kv_heads, positions, head_dim] keys and values of each layer.
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Edits a weight's values (decoded to f64) before the decoder takes them. It must act
/// element by element: the layer-streamed forward passes it a tensor's rows in pieces.
pub type Perturb<'a> = dyn Fn(&mut [f64]) + Sync + 'a;

/// The family's layout and the numeric switches of a checkpoint, with the norm epsilon
/// settled (its default depends on the norm kind).
pub(crate) fn resolve(ckpt: &Checkpoint) -> Result<(Arch, DecoderSpec)> {
    let arch = arch(
        ckpt.config.family,
        &serde_json::Value::Object(ckpt.config.raw.clone()),
    );
    let mut spec = DecoderSpec::from_checkpoint(ckpt)?;
    if spec.norm_eps.is_nan() {
        spec.norm_eps = if arch.norm == NormKind::Layer {
            1e-5
        } else {
            1e-6
        };
    }
    Ok((arch, spec))
}

/// A whole stored tensor in the working dtype: decoded to f64, passed through `perturb`,
/// converted. The file pages read are released afterwards (they stay in the page cache):
/// a mapped checkpoint never becomes resident in the process as a whole.
pub(crate) fn decode(
    ckpt: &Checkpoint,
    t: &SourceTensor,
    dtype: DType,
    device: &Device,
    perturb: Option<&Perturb<'_>>,
) -> Result<Tensor> {
    let f = &ckpt.files[t.file];
    let shape = t.info.shape.clone();
    let tensor = match perturb {
        Some(perturb) => {
            let mut v = vec![0f64; t.info.numel()];
            t.info.dtype.decode(f.data(&t.info), &mut v);
            perturb(&mut v);
            Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?
        }
        None => decode_as(f.data(&t.info), t.info.dtype, shape, dtype, device)?,
    };
    f.advise_done(&t.info);
    Ok(tensor)
}

/// Stored bytes decoded into `dtype` a chunk at a time through a small f64 buffer: the
/// values of decoding to f64 and casting (candle's own casts), without an f64 copy of the
/// whole tensor held beside the result (for an x2 SmolLM2 clone's embedding, 453 MB).
fn decode_as(
    bytes: &[u8],
    stored: hyperclone_core::dtype::DType,
    shape: Vec<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    fn cast<T>(
        bytes: &[u8],
        stored: hyperclone_core::dtype::DType,
        f: impl Fn(f64) -> T,
    ) -> Vec<T> {
        const CHUNK: usize = 1 << 14;
        let size = stored.size();
        let mut buf = vec![0f64; CHUNK.min(bytes.len() / size)];
        let mut out = Vec::with_capacity(bytes.len() / size);
        for c in bytes.chunks(CHUNK * size) {
            let b = &mut buf[..c.len() / size];
            stored.decode(c, b);
            out.extend(b.iter().map(|&v| f(v)));
        }
        out
    }
    Ok(match dtype {
        DType::F64 => Tensor::from_vec(cast(bytes, stored, |v| v), shape, device)?,
        DType::F32 => Tensor::from_vec(cast(bytes, stored, |v| v as f32), shape, device)?,
        DType::BF16 => Tensor::from_vec(cast(bytes, stored, half::bf16::from_f64), shape, device)?,
        DType::F16 => Tensor::from_vec(cast(bytes, stored, half::f16::from_f64), shape, device)?,
        _ => Tensor::from_vec(cast(bytes, stored, |v| v), shape, device)?.to_dtype(dtype)?,
    })
}

/// Rows of a stored matrix [rows, cols], in the order given (repeats allowed), as a tensor
/// [rows.len(), cols] in the working dtype: the same values [`decode`] gives for those rows.
pub(crate) fn decode_rows(
    ckpt: &Checkpoint,
    t: &SourceTensor,
    rows: &[usize],
    dtype: DType,
    device: &Device,
    perturb: Option<&Perturb<'_>>,
) -> Result<Tensor> {
    let &[height, cols] = t.info.shape.as_slice() else {
        return Err(NnError::Input(format!(
            "{}: `{}` has shape {:?}, not a matrix",
            ckpt.dir.display(),
            t.info.name,
            t.info.shape
        )));
    };
    let f = &ckpt.files[t.file];
    let data = f.data(&t.info);
    let row_bytes = cols * t.info.dtype.size();
    let mut v = vec![0f64; rows.len() * cols];
    for (out, &r) in v.chunks_mut(cols.max(1)).zip(rows) {
        if r >= height {
            return Err(NnError::Input(format!(
                "{}: row {r} of `{}` does not exist (it has {height})",
                ckpt.dir.display(),
                t.info.name
            )));
        }
        t.info
            .dtype
            .decode(&data[r * row_bytes..(r + 1) * row_bytes], out);
    }
    f.advise_done(&t.info);
    if let Some(perturb) = perturb {
        perturb(&mut v);
    }
    Ok(Tensor::from_vec(v, (rows.len(), cols), device)?.to_dtype(dtype)?)
}

/// Named weights in the working dtype, as the builders below look them up: all of a
/// checkpoint's (the resident decoder) or one layer's (the streamed forward).
pub(crate) struct Weights<'a> {
    pub map: HashMap<String, Tensor>,
    pub dir: &'a std::path::Path,
    pub norm: NormKind,
    /// Store each Linear's [out, in] weight as a view of its contiguous transpose, so the
    /// matmul `x @ w.t()` reads a row-major right-hand side (gemm's fast case: a down
    /// projection 1536 -> 576 over 128 tokens took 1.90 ms strided, 1.01 ms so, 2 threads).
    /// Not for trainable weights (the optimizer updates the tensors as stored), nor where
    /// logits must equal the streamed forward's bit for bit (see `load_for_inference`).
    pub gemm_layout: bool,
}

impl Weights<'_> {
    fn take(&self, name: &str) -> Result<Tensor> {
        self.map.get(name).cloned().ok_or_else(|| {
            NnError::Input(format!("{}: tensor `{name}` missing", self.dir.display()))
        })
    }

    pub(crate) fn opt(&self, name: &str) -> Option<Tensor> {
        self.map.get(name).cloned()
    }

    fn lin(&self, p: &str) -> Result<Linear> {
        let w = self.gemm_ready(self.take(&format!("{p}.weight"))?)?;
        Ok(Linear::new(w, self.opt(&format!("{p}.bias"))))
    }

    /// See `gemm_layout`.
    fn gemm_ready(&self, w: Tensor) -> Result<Tensor> {
        // A weight the packed kernel takes is packed from the stored layout later.
        Ok(if self.gemm_layout && w.rank() == 2 && !packable(&w) {
            w.t()?.contiguous()?.t()?
        } else {
            w
        })
    }

    /// Rows `rows` of the Linear `p`: gathered once here for inference, at each forward
    /// for training (so the gradient reaches the stored tensor).
    fn lin_rows(&self, p: &str, rows: Vec<u32>, device: &Device) -> Result<Linear> {
        let n = rows.len();
        let idx = Tensor::from_vec(rows, n, device)?;
        if self.gemm_layout {
            let w = self.take(&format!("{p}.weight"))?.index_select(&idx, 0)?;
            let b = self
                .opt(&format!("{p}.bias"))
                .map(|b| b.index_select(&idx, 0))
                .transpose()?;
            return Ok(Linear::new(self.gemm_ready(w)?, b));
        }
        let mut l = self.lin(p)?;
        l.select = Some(idx);
        Ok(l)
    }

    /// GPT-2's Conv1D keeps [in, out]: a transposed view (the matmul reads it as stored).
    fn conv(&self, p: &str) -> Result<Linear> {
        Ok(Linear::new(
            self.take(&format!("{p}.weight"))?.t()?,
            self.opt(&format!("{p}.bias")),
        ))
    }

    pub(crate) fn norm(&self, name: &str) -> Option<Norm> {
        self.opt(&format!("{name}.weight")).map(|w| Norm {
            w,
            b: self.opt(&format!("{name}.bias")),
            kind: self.norm,
        })
    }

    /// OPT's optional projections around the layers.
    pub(crate) fn projection(&self, name: Option<&str>) -> Option<Linear> {
        name.and_then(|n| {
            self.opt(&format!("{n}.weight"))
                .map(|w| Linear::new(w, None))
        })
    }
}

/// The name prefix of layer `l`'s tensors.
pub(crate) fn layer_prefix(arch: &Arch, l: usize) -> String {
    format!("{}.{l}", arch.layers)
}

/// Layer `l` of the decoder, from weights holding (at least) that layer's tensors.
pub(crate) fn build_layer(
    arch: &Arch,
    spec: &DecoderSpec,
    device: &Device,
    l: usize,
    w: &Weights<'_>,
) -> Result<Layer> {
    let lin = |p: &str| w.lin(p);
    let conv = |p: &str| w.conv(p);
    let norm = |name: &str| w.norm(name);
    let (nh, nk, hd) = (spec.heads, spec.kv_heads, spec.head_dim);
    let p = layer_prefix(arch, l);
    let (q, k, v, o, attn_prefix) = match arch.attn {
        AttnLayout::Separate { prefix, q, k, v, o } => {
            let a = join(&p, prefix);
            (
                lin(&join(&a, q))?,
                lin(&join(&a, k))?,
                lin(&join(&a, v))?,
                lin(&join(&a, o))?,
                a,
            )
        }
        AttnLayout::Concat { prefix, qkv, o } | AttnLayout::Conv1d { prefix, qkv, o } => {
            let a = join(&p, prefix);
            let is_conv = matches!(arch.attn, AttnLayout::Conv1d { .. });
            let fused = if is_conv {
                conv(&join(&a, qkv))?
            } else {
                lin(&join(&a, qkv))?
            };
            let out = if is_conv {
                conv(&join(&a, o))?
            } else {
                lin(&join(&a, o))?
            };
            (
                fused.rows(0, nh * hd)?,
                fused.rows(nh * hd, nk * hd)?,
                fused.rows((nh + nk) * hd, nk * hd)?,
                out,
                a,
            )
        }
        AttnLayout::PerHead { prefix, qkv, o } => {
            // Rows (heads, 3, head_dim): gather q, k, v rows head by head.
            let a = join(&p, prefix);
            let pick = |s: usize| -> Result<Linear> {
                let rows: Vec<u32> = (0..nh)
                    .flat_map(|h| (0..hd).map(move |d| ((h * 3 + s) * hd + d) as u32))
                    .collect();
                w.lin_rows(&join(&a, qkv), rows, device)
            };
            (pick(0)?, pick(1)?, pick(2)?, lin(&join(&a, o))?, a)
        }
    };
    let mlp = match arch.mlp {
        MlpLayout::Gated {
            prefix,
            gate,
            up,
            down,
        } => {
            let m = join(&p, prefix);
            Mlp::Gated {
                gate: lin(&join(&m, gate))?,
                up: lin(&join(&m, up))?,
                down: lin(&join(&m, down))?,
            }
        }
        MlpLayout::GatedFused {
            prefix,
            gate_up,
            down,
        } => {
            let m = join(&p, prefix);
            let fused = lin(&join(&m, gate_up))?;
            Mlp::Gated {
                gate: fused.rows(0, spec.ffn)?,
                up: fused.rows(spec.ffn, spec.ffn)?,
                down: lin(&join(&m, down))?,
            }
        }
        MlpLayout::Plain { prefix, up, down } => {
            let m = join(&p, prefix);
            Mlp::Plain {
                up: lin(&join(&m, up))?,
                down: lin(&join(&m, down))?,
            }
        }
        MlpLayout::PlainConv1d { prefix, up, down } => {
            let m = join(&p, prefix);
            Mlp::Plain {
                up: conv(&join(&m, up))?,
                down: conv(&join(&m, down))?,
            }
        }
        MlpLayout::Moe {
            prefix,
            router,
            experts,
            gate,
            up,
            down,
            shared,
        } => {
            let m = join(&p, prefix);
            let n = spec.moe.map_or(0, |moe| moe.experts);
            let gated = |x: &str| -> Result<(Linear, Linear, Linear)> {
                Ok((
                    lin(&join(x, gate))?,
                    lin(&join(x, up))?,
                    lin(&join(x, down))?,
                ))
            };
            Mlp::Moe {
                shared: match shared {
                    Some((expert, g)) => Some((gated(&join(&m, expert))?, lin(&join(&m, g))?)),
                    None => None,
                },
                router: lin(&join(&m, router))?,
                experts: (0..n)
                    .map(|e| {
                        let x = join(&m, &format!("{experts}.{e}"));
                        Ok((
                            lin(&join(&x, gate))?,
                            lin(&join(&x, up))?,
                            lin(&join(&x, down))?,
                        ))
                    })
                    .collect::<Result<Vec<_>>>()?,
            }
        }
    };
    let at = |n: Option<&str>| n.and_then(|n| norm(&join(&p, n)));
    let (pre_attn, post_attn, pre_mlp, post_mlp) = match arch.block {
        BlockLayout::Sequential {
            pre_attn,
            post_attn,
            pre_mlp,
            post_mlp,
        } => (at(pre_attn), at(post_attn), at(pre_mlp), at(post_mlp)),
        BlockLayout::Parallel {
            attn_norm,
            mlp_norm,
        } => (at(Some(attn_norm)), None, at(Some(mlp_norm)), None),
        BlockLayout::PostNorm {
            attn_norm,
            mlp_norm,
        } => (None, at(Some(attn_norm)), None, at(Some(mlp_norm))),
    };
    let (q_norm, k_norm) = match arch.qk_norm {
        Some((qn, kn)) => (norm(&join(&attn_prefix, qn)), norm(&join(&attn_prefix, kn))),
        None => (None, None),
    };
    Ok(Layer {
        pre_attn,
        post_attn,
        pre_mlp,
        post_mlp,
        q,
        k,
        v,
        o,
        q_norm,
        k_norm,
        mlp,
        qkv: None,
        gate_up: None,
    })
}

impl Decoder {
    pub fn load(ckpt: &Checkpoint, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self::load_with(ckpt, dtype, device, false, None, false)?.0)
    }

    /// As [`Decoder::load`], with each Linear weight packed once for the packed kernels
    /// (f32 on x86-64 with AVX2+FMA or AVX-512F, bf16 with AVX512-BF16: packed_linear.rs;
    /// elsewhere a view of its contiguous transpose, gemm's fast case) and the fused causal
    /// attention (in f32 for a bf16 model): faster forwards (1x128 SmolLM2 on 2 threads of
    /// a Zen 4: 0.30 -> 0.20 s in f32, 0.56-0.64 -> 0.25-0.26 s in bf16) for a costlier load; the logits may differ from `load`'s in the last bits (the matmuls sum in
    /// another order), so verification uses `load` and the streamed forward, which agree
    /// bit for bit.
    pub fn load_for_inference(ckpt: &Checkpoint, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self::load_with(ckpt, dtype, device, false, None, true)?.0)
    }

    /// Loads with every weight (decoded to f64) passed through `perturb` first: used to
    /// measure how much storage rounding of the weights moves the logits.
    pub fn load_perturbed(
        ckpt: &Checkpoint,
        dtype: DType,
        device: &Device,
        perturb: &Perturb<'_>,
    ) -> Result<Self> {
        Ok(Self::load_with(ckpt, dtype, device, false, Some(perturb), false)?.0)
    }

    /// Loads every weight as a trainable variable (every layout: fused and transposed
    /// weights are used through views, see [`Linear`]).
    pub fn load_trainable(
        ckpt: &Checkpoint,
        dtype: DType,
        device: &Device,
    ) -> Result<(Self, Vec<Param>)> {
        if ckpt.config.num_experts > 0 {
            return Err(NnError::Unsupported(format!(
                "{}: training a Mixture-of-Experts model ({}) is not implemented (its load-balancing loss is not); \
                 clone, verify, forward and generate work",
                ckpt.dir.display(),
                ckpt.config.family.model_type
            )));
        }
        Self::load_with(ckpt, dtype, device, true, None, false)
    }

    fn load_with(
        ckpt: &Checkpoint,
        dtype: DType,
        device: &Device,
        trainable: bool,
        perturb: Option<&Perturb<'_>>,
        gemm_layout: bool,
    ) -> Result<(Self, Vec<Param>)> {
        let (arch, spec) = resolve(ckpt)?;
        let mut weights = Weights {
            map: HashMap::new(),
            dir: &ckpt.dir,
            norm: arch.norm,
            gemm_layout: gemm_layout && !trainable,
        };
        let mut params = Vec::new();
        // For inference each layer's tensors are decoded just before the layer is packed
        // and dropped right after, so the load touches the weights' memory about once
        // rather than twice (fresh pages cost their zeroing: 41% of an x2 SmolLM2 load).
        let layer_of = |name: &str| -> Option<usize> {
            let rest = name.strip_prefix(arch.layers)?.strip_prefix('.')?;
            rest.split('.').next()?.parse().ok()
        };
        let mut by_layer: Vec<Vec<&SourceTensor>> = vec![Vec::new(); spec.layers];
        let mut now = Vec::new();
        for t in &ckpt.tensors {
            let layer = layer_of(&t.info.name).filter(|&l| weights.gemm_layout && l < spec.layers);
            match layer {
                Some(l) => by_layer[l].push(t),
                None => now.push(t),
            }
        }
        for t in now {
            let mut tensor = decode(ckpt, t, dtype, device, perturb)?;
            if trainable {
                let var = Var::from_tensor(&tensor)?;
                tensor = var.as_tensor().clone();
                params.push(Param {
                    name: t.info.name.clone(),
                    var,
                    decay: t.info.shape.len() >= 2,
                });
            }
            weights.map.insert(t.info.name.clone(), tensor);
        }
        // The head first: a tied head's embedding is dropped once packed, before the layers
        // take their memory, so the load peaks at the weights plus one layer.
        let embed = weights.take(&format!("{}.weight", arch.embed))?;
        let head_weight = weights.opt(&format!("{}.weight", arch.head));
        let tied = head_weight.is_none();
        let head = Linear::new(
            head_weight.unwrap_or_else(|| embed.clone()),
            weights.opt(&format!("{}.bias", arch.head)),
        );
        let positions = match arch.positions {
            Some((name, offset)) => Some((weights.take(&format!("{name}.weight"))?, offset)),
            None => None,
        };
        let (mut head, mut project_in, mut project_out) = (
            head,
            weights.projection(arch.project_in),
            weights.projection(arch.project_out),
        );
        let mut embed = Some(embed);
        if weights.gemm_layout {
            head.pack_for_inference()?;
            for p in [&mut project_in, &mut project_out].into_iter().flatten() {
                p.pack_for_inference()?;
            }
            // A tied head's packed panels hold the embedding's rows: the lookup reads them
            // there, so the embedding is held once (a 262k-token vocabulary is GBs).
            if tied && head.packed.is_some() {
                embed = None;
            }
        }
        let mut layers = Vec::with_capacity(spec.layers);
        for (l, deferred) in by_layer.iter().enumerate() {
            for t in deferred {
                let tensor = decode(ckpt, t, dtype, device, perturb)?;
                weights.map.insert(t.info.name.clone(), tensor);
            }
            let mut layer = build_layer(&arch, &spec, device, l, &weights)?;
            if weights.gemm_layout {
                layer.pack_for_inference()?;
            }
            layers.push(layer);
            // The layer holds its own (packed) copies now: drop the stored ones, so the
            // load peaks at the weights plus one layer, not twice the weights.
            for t in deferred {
                weights.map.remove(&t.info.name);
            }
        }
        if weights.gemm_layout {
            // Which f32 schedule is fastest here, for each input width just packed (speed
            // only: every schedule gives the same bits).
            crate::packed_linear::tune_schedules()?;
        }
        let mut frame = Frame::new(spec, dtype, device, &arch);
        frame.inference = weights.gemm_layout;
        let decoder = Decoder {
            project_in,
            project_out,
            norm: weights.norm(arch.final_norm),
            frame,
            embed,
            positions,
            layers,
            head,
        };
        Ok((decoder, params))
    }

    /// Runs token ids [B, T] through the model.
    pub fn forward(&self, ids: &Tensor) -> Result<ForwardOutput> {
        self.forward_with(ids, None)
    }

    /// Forward with optional (training) dropout on each attention and MLP output.
    pub fn forward_with(&self, ids: &Tensor, dropout: Option<&Dropout>) -> Result<ForwardOutput> {
        let (b, t) = ids.dims2()?;
        crate::shard::on_pool(|| {
            let (residual, h) = self.body(ids, dropout, None)?;
            let logits = self.softcap(self.head.forward(&h)?)?;
            self.output(logits, residual, h, b, t)
        })
    }

    /// An empty cache for [`Decoder::forward_next`].
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![None; self.layers.len()],
            len: 0,
        }
    }

    /// Runs ids [B, T] as the positions after those already in `cache`, appends their keys
    /// and values to it, and returns the logits of the last new position [B, vocab]. The same
    /// numbers as a full forward over the whole sequence, up to summation order.
    pub fn forward_next(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        crate::shard::on_pool(|| {
            let (_, h) = self.body(ids, None, Some(cache))?;
            let last = h
                .reshape((b, t, h.dim(1)?))?
                .narrow(1, t - 1, 1)?
                .squeeze(1)?;
            self.softcap(self.head.forward(&last)?)
        })
    }

    /// Embedding and blocks: the residual stream after the embedding and each layer, and
    /// what the head reads [B*T, d']. With a cache, ids are the positions after the cached
    /// ones (whose keys and values it holds); their own are appended.
    fn body(
        &self,
        ids: &Tensor,
        dropout: Option<&Dropout>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<(Vec<Tensor>, Tensor)> {
        let (b, t) = ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.len);
        self.check_ids(ids)?;
        let ids_flat = ids.flatten_all()?;
        let rows = match (&self.embed, &self.head.packed) {
            (Some(embed), _) => embed.index_select(&ids_flat, 0)?,
            (None, Some(packed)) => packed.rows(&ids_flat.to_vec1::<u32>()?)?,
            (None, None) => return Err(NnError::Input("a decoder without embeddings".into())),
        };
        let positions = match &self.positions {
            Some((table, offset)) => {
                Some(table.index_select(&self.position_ids(b, t, past + *offset)?, 0)?)
            }
            None => None,
        };
        let mut x = self.input(rows, self.project_in.as_ref(), positions)?;
        let ropes = self.rope_tables(past, t)?;
        let d = x.dim(1)?;
        let mut residual = vec![x.reshape((b, t, d))?];
        for (l, layer) in self.layers.iter().enumerate() {
            let kv = cache.as_deref_mut().map(|c| &mut c.layers[l]);
            x = self.layer_forward(l, layer, x, b, t, ropes.of(&self.spec, l), dropout, kv)?;
            residual.push(x.reshape((b, t, d))?);
        }
        let h = self.head_input(&x, self.norm.as_ref(), self.project_out.as_ref())?;
        if let Some(c) = cache {
            c.len += t;
        }
        Ok((residual, h))
    }
}

impl Frame {
    fn new(spec: DecoderSpec, dtype: DType, device: &Device, arch: &Arch) -> Frame {
        Frame {
            spec,
            dtype,
            device: device.clone(),
            block: arch.block,
            learned_positions: arch.positions.is_some(),
            inference: false,
        }
    }

    /// The frame of a checkpoint's decoder (its family layout and switches).
    pub(crate) fn of(ckpt: &Checkpoint, dtype: DType, device: &Device) -> Result<(Arch, Frame)> {
        let (arch, spec) = resolve(ckpt)?;
        let frame = Frame::new(spec, dtype, device, &arch);
        Ok((arch, frame))
    }

    /// Refuses token ids outside the vocabulary (an embedding lookup would read past it).
    pub(crate) fn check_ids(&self, ids: &Tensor) -> Result<()> {
        let vocab = self.spec.vocab;
        if let Some(bad) = ids
            .flatten_all()?
            .to_vec1::<u32>()?
            .iter()
            .find(|&&i| i as usize >= vocab)
        {
            return Err(NnError::Input(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        Ok(())
    }

    /// The rows of a learned position table that B sequences of T tokens read.
    pub(crate) fn position_ids(&self, b: usize, t: usize, offset: usize) -> Result<Tensor> {
        let pos: Vec<u32> = (0..b)
            .flat_map(|_| (0..t).map(|p| (p + offset) as u32))
            .collect();
        Ok(Tensor::from_vec(pos, b * t, &self.device)?)
    }

    /// The residual stream's start [B*T, d] from the tokens' embedding rows and (learned
    /// positions) their position rows.
    pub(crate) fn input(
        &self,
        rows: Tensor,
        project_in: Option<&Linear>,
        positions: Option<Tensor>,
    ) -> Result<Tensor> {
        let mut x = rows;
        if let Some(scale) = self.spec.embed_scale {
            x = (x * scale)?;
        }
        if let Some(p) = project_in {
            x = p.forward(&x)?;
        }
        if let Some(pos) = positions {
            x = (x + pos)?;
        }
        Ok(x)
    }

    /// One block: the residual stream [B*T, d] after layer `l`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn layer_forward(
        &self,
        l: usize,
        layer: &Layer,
        x: Tensor,
        b: usize,
        t: usize,
        (cos, sin): (&Option<Tensor>, &Option<Tensor>),
        dropout: Option<&Dropout>,
        mut kv: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let eps = self.spec.norm_eps;
        let (window, scale) = (self.spec.sliding_window[l], self.spec.attn_scale[l]);
        let apply = |n: &Option<Norm>, x: &Tensor| -> Result<Tensor> {
            match n {
                Some(n) => n.forward(x, eps),
                None => Ok(x.clone()),
            }
        };
        let dropped = |x: Tensor, site: u64| -> Result<Tensor> {
            match dropout {
                Some(d) => d.apply(&x, site, b),
                None => Ok(x),
            }
        };
        // Granite scales each sublayer's output before adding it to the residual stream.
        let res = |x: Tensor| -> Result<Tensor> {
            Ok(match self.spec.residual_multiplier {
                Some(r) => (x * r)?,
                None => x,
            })
        };
        Ok(if let BlockLayout::PostNorm { .. } = self.block {
            let a = dropped(
                self.attention(layer, &x, b, t, cos, sin, window, scale, kv.take())?,
                2 * l as u64,
            )?;
            let x = apply(&layer.post_attn, &(x + a)?)?;
            let m = dropped(self.mlp(layer, &x)?, 2 * l as u64 + 1)?;
            apply(&layer.post_mlp, &(x + m)?)?
        } else {
            let h = apply(&layer.pre_attn, &x)?;
            let a = dropped(
                self.attention(layer, &h, b, t, cos, sin, window, scale, kv.take())?,
                2 * l as u64,
            )?;
            if let BlockLayout::Parallel { .. } = self.block {
                // Both branches read the same x.
                let m = dropped(
                    self.mlp(layer, &apply(&layer.pre_mlp, &x)?)?,
                    2 * l as u64 + 1,
                )?;
                ((x + a)? + m)?
            } else {
                let x = (x + res(apply(&layer.post_attn, &a)?)?)?;
                let m = dropped(
                    self.mlp(layer, &apply(&layer.pre_mlp, &x)?)?,
                    2 * l as u64 + 1,
                )?;
                (x + res(apply(&layer.post_mlp, &m)?)?)?
            }
        })
    }

    /// What the head reads: the last residual state through the final norm (and OPT's
    /// project_out).
    pub(crate) fn head_input(
        &self,
        x: &Tensor,
        norm: Option<&Norm>,
        project_out: Option<&Linear>,
    ) -> Result<Tensor> {
        let mut h = match norm {
            Some(n) => n.forward(x, self.spec.norm_eps)?,
            None => x.clone(),
        };
        if let Some(p) = project_out {
            h = p.forward(&h)?;
        }
        Ok(h)
    }

    /// The final logit soft-cap (Gemma-2), if the model has one, after Granite's
    /// `logits_scaling` division.
    pub(crate) fn softcap(&self, logits: Tensor) -> Result<Tensor> {
        let logits = match self.spec.logits_divisor {
            Some(d) => (logits / d)?,
            None => logits,
        };
        Ok(match self.spec.final_softcap {
            Some(c) => ((logits / c)?.tanh()? * c)?,
            None => logits,
        })
    }

    /// Logits [B*T, vocab], the residual states and the head's input, shaped [B, T, ..].
    pub(crate) fn output(
        &self,
        logits: Tensor,
        residual: Vec<Tensor>,
        h: Tensor,
        b: usize,
        t: usize,
    ) -> Result<ForwardOutput> {
        let dh = h.dim(1)?;
        Ok(ForwardOutput {
            logits: logits.reshape((b, t, self.spec.vocab))?,
            residual,
            final_norm: h.reshape((b, t, dh))?,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        l: &Layer,
        h: &Tensor,
        b: usize,
        t: usize,
        cos: &Option<Tensor>,
        sin: &Option<Tensor>,
        window: Option<usize>,
        scale: f64,
        past: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let s = &self.spec;
        let (nh, nk, hd) = (s.heads, s.kv_heads, s.head_dim);
        let eps = s.norm_eps;
        let [mut q, mut k, mut v] = forward_packed_group([&l.q, &l.k, &l.v], l.qkv.as_ref(), h)?;
        // A q/k norm as wide as the projection (OLMo-2) runs before the head split; a
        // per-head one (Qwen3) after it.
        let whole = |n: &Option<Norm>| n.as_ref().is_some_and(|n| n.w.dims1().ok() != Some(hd));
        if whole(&l.q_norm) {
            q = l.q_norm.as_ref().expect("checked").forward(&q, eps)?;
        }
        if whole(&l.k_norm) {
            k = l.k_norm.as_ref().expect("checked").forward(&k, eps)?;
        }
        let heads = |x: Tensor, n: usize| -> Result<Tensor> {
            Ok(x.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        // OLMoE clamps q and k after their (whole-projection) norms, and v.
        if let Some(c) = s.clip_qkv {
            q = q.clamp(-c, c)?;
            k = k.clamp(-c, c)?;
            v = v.clamp(-c, c)?;
        }
        let mut q = heads(q, nh)?;
        let mut k = heads(k, nk)?;
        let mut v = heads(v, nk)?;
        if !whole(&l.q_norm) {
            if let Some(n) = &l.q_norm {
                q = n.forward(&q, eps)?;
            }
        }
        if !whole(&l.k_norm) {
            if let Some(n) = &l.k_norm {
                k = n.forward(&k, eps)?;
            }
        }
        if let (Some(cos), Some(sin)) = (cos, sin) {
            q = apply_rope(&q, cos, sin)?;
            k = apply_rope(&k, cos, sin)?;
        }
        if let Some(slot) = past {
            if let Some((pk, pv)) = slot.take() {
                k = Tensor::cat(&[&pk, &k], 2)?;
                v = Tensor::cat(&[&pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        // Keys span the cached positions and the t new ones; query row i is position
        // offset + i.
        let offset = k.dim(2)? - t;
        // Grouped-query attention without copying k and v: the nh/nk query heads that share
        // a kv head are adjacent, so [B, nh, T, hd] views as [B, nk, group*T, hd] and each
        // kv head serves group*T query rows (query position = row % T).
        let group = nh / nk;
        let q = q.reshape((b, nk, group * t, hd))?;
        let cpu_float = self.device.is_cpu() && matches!(self.dtype, DType::F32 | DType::F64);
        let fused = self.inference
            && s.attn_softcap.is_none()
            && (cpu_float || (self.device.is_cpu() && self.dtype == DType::BF16));
        // [B, K, G*T, hd]: each query row's weighted sum of the values.
        let attended = if fused {
            crate::attention::causal_attention(&q, &k, &v, scale, window, offset)?
        } else {
            let raw = q.matmul(&k.t()?)?;
            let softcapped = |scores: Tensor, c: f64| (scores / c)?.tanh()? * c;
            let probs = match (cpu_float, s.attn_softcap) {
                // The scaling inside the fused softmax: the same bits, one pass less each
                // way (see `CausalSoftmax::scale`).
                (true, None) => raw.apply_op1(CausalSoftmax {
                    window,
                    offset,
                    scale: Some(scale),
                })?,
                (true, Some(c)) => softcapped((raw * scale)?, c)?.apply_op1(CausalSoftmax {
                    window,
                    offset,
                    scale: None,
                })?,
                (false, softcap) => {
                    let mut scores = (raw * scale)?;
                    if let Some(c) = softcap {
                        scores = softcapped(scores, c)?;
                    }
                    let mask = self.mask(offset, t, window)?.repeat((group, 1))?;
                    softmax_last_dim(&scores.broadcast_add(&mask)?)?
                }
            };
            probs.matmul(&v)?
        };
        let out = attended
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b * t, nh * hd))?;
        l.o.forward(&out)
    }

    fn mlp(&self, l: &Layer, h: &Tensor) -> Result<Tensor> {
        let act = |g: Tensor| -> Result<Tensor> {
            Ok(match self.spec.activation {
                Activation::Silu => (&g * candle_nn::ops::sigmoid(&g)?)?,
                Activation::GeluTanh => g.gelu()?,
                Activation::Gelu => g.gelu_erf()?,
                Activation::Relu => g.relu()?,
            })
        };
        match &l.mlp {
            Mlp::Gated { gate, up, down } => {
                let [g, u] = forward_packed_group([gate, up], l.gate_up.as_ref(), h)?;
                // A bf16 model takes the fused op too, for inference (its backward is f32/f64).
                let bf16_inference =
                    self.inference && g.dtype() == DType::BF16 && g.device().is_cpu();
                if self.spec.activation == Activation::Silu
                    && (crate::fused::fusable(&g) || bf16_inference)
                {
                    // SwiGLU in one pass: silu(g) * u without the sigmoid and product temporaries.
                    return down.forward(&g.apply_op2(&u, crate::fused::SiluMul)?);
                }
                down.forward(&(act(g)? * u)?)
            }
            Mlp::Plain { up, down } => down.forward(&act(up.forward(h)?)?),
            Mlp::Moe {
                router,
                experts,
                shared,
            } => {
                let moe = self.spec.moe.ok_or_else(|| {
                    NnError::Input("a Mixture-of-Experts layer without routing settings".into())
                })?;
                let weights = route(&router.forward(h)?, moe.top_k, moe.norm_topk_prob)?;
                let (n, d) = h.dims2()?;
                // Each expert runs on the tokens routed to it; outputs are added in expert
                // order, as transformers' index_add_ loop over the experts does.
                let picked: Vec<Vec<f64>> = weights.to_dtype(DType::F64)?.to_vec2()?;
                let mut out = Tensor::zeros((n, d), h.dtype(), h.device())?;
                for (e, (gate, up, down)) in experts.iter().enumerate() {
                    let rows: Vec<u32> = (0..n)
                        .filter(|&t| picked[t][e] != 0.0)
                        .map(|t| t as u32)
                        .collect();
                    if rows.is_empty() {
                        continue;
                    }
                    let idx = Tensor::from_vec(rows.clone(), rows.len(), h.device())?;
                    let x = h.index_select(&idx, 0)?;
                    let y = down.forward(&(act(gate.forward(&x)?)? * up.forward(&x)?)?)?;
                    let w = weights.index_select(&idx, 0)?.narrow(1, e, 1)?;
                    out = out.index_add(&idx, &y.broadcast_mul(&w)?, 0)?;
                }
                // Qwen2-MoE: experts' sum + sigmoid(gate(x)) * shared_expert(x), every token.
                if let Some(((gate, up, down), g)) = shared {
                    let y = down.forward(&(act(gate.forward(h)?)? * up.forward(h)?)?)?;
                    let s = candle_nn::ops::sigmoid(&g.forward(h)?)?;
                    out = (out + y.broadcast_mul(&s)?)?;
                }
                Ok(out)
            }
        }
    }

    /// cos/sin tables [T, rotary_dim] for positions past..past+T, computed in f64 (the exact
    /// rotation) then cast; None for learned-position families. The sliding layers' own
    /// table too where some layer uses it (Gemma-3, OLMo-3).
    pub(crate) fn rope_tables(&self, past: usize, t: usize) -> Result<RopeTables> {
        if self.learned_positions {
            return Ok(RopeTables {
                global: (None, None),
                local: (None, None),
                none: (None, None),
            });
        }
        let s = &self.spec;
        let rot = ((s.head_dim as f64 * s.partial_rotary) as usize) & !1;
        let local = if s.layer_rope.contains(&LayerRope::Local) {
            let (c, s) = self.rope_table(past, t, rot, &s.local_inv_freq(rot))?;
            (Some(c), Some(s))
        } else {
            (None, None)
        };
        let (c, s) = self.rope_table(past, t, rot, &s.inv_freq(rot))?;
        Ok(RopeTables {
            global: (Some(c), Some(s)),
            local,
            none: (None, None),
        })
    }

    /// One cos/sin table pair [T, rot] from inverse frequencies.
    fn rope_table(
        &self,
        past: usize,
        t: usize,
        rot: usize,
        inv: &[f64],
    ) -> Result<(Tensor, Tensor)> {
        let mut cos = Vec::with_capacity(t * rot);
        let mut sin = Vec::with_capacity(t * rot);
        for p in past..past + t {
            for f in inv {
                let a = p as f64 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
            // Both halves of a row hold the same angles: computed once, copied.
            cos.extend_from_within(cos.len() - inv.len()..);
            sin.extend_from_within(sin.len() - inv.len()..);
        }
        let mk = |v: Vec<f64>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, (t, rot), &self.device)?.to_dtype(self.dtype)?)
        };
        Ok((mk(cos)?, mk(sin)?))
    }

    /// Additive causal mask [T, offset + T] for queries at positions offset.. (0 where
    /// attended, -inf elsewhere), for devices and dtypes without the fused causal softmax.
    fn mask(&self, offset: usize, t: usize, window: Option<usize>) -> Result<Tensor> {
        let keys = offset + t;
        let m: Vec<f64> = (0..t * keys)
            .map(|k| {
                let (i, j) = (offset + k / keys, k % keys);
                if j <= i && window.is_none_or(|w| i - j < w) {
                    0.0
                } else {
                    f64::NEG_INFINITY
                }
            })
            .collect();
        Ok(Tensor::from_vec(m, (t, keys), &self.device)?.to_dtype(self.dtype)?)
    }
}

/// The rotary tables of one forward pass, picked per layer by [`DecoderSpec::layer_rope`].
pub(crate) struct RopeTables {
    global: (Option<Tensor>, Option<Tensor>),
    local: (Option<Tensor>, Option<Tensor>),
    /// NoPE layers: no tables.
    none: (Option<Tensor>, Option<Tensor>),
}

impl RopeTables {
    pub(crate) fn of(&self, spec: &DecoderSpec, l: usize) -> (&Option<Tensor>, &Option<Tensor>) {
        let (c, s) = match spec.layer_rope.get(l) {
            Some(LayerRope::Local) => &self.local,
            Some(LayerRope::None) => &self.none,
            _ => &self.global,
        };
        (c, s)
    }
}

/// RMSNorm over the last dimension, in the working dtype.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if crate::fused::fusable(x) && w.dtype() == x.dtype() {
        // One pass (and one for the backward) instead of six candle ops and their temporaries.
        return Ok(x
            .contiguous()?
            .apply_op2(&w.contiguous()?, crate::fused::RmsNorm { eps })?);
    }
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)?)
}

/// A Mixture-of-Experts router's weights [N, E] from its logits [N, E], as transformers
/// 5.23's TopKRouter computes them: p = softmax over all experts; the `top_k` largest p of
/// each token (ties to the lower expert index) keep their p, the others 0; renormalised to
/// sum 1 over the picked ones with `norm`. A clone's router logits equal its source's (same
/// normed input, hidden columns tiled / n), so it picks the same experts with the same weights.
pub(crate) fn route(logits: &Tensor, top_k: usize, norm: bool) -> Result<Tensor> {
    if matches!(logits.dtype(), DType::BF16 | DType::F16) {
        // transformers routes a half-precision model in f32 (softmax, top-k, renormalising)
        // and casts the weights back; in bf16 the probabilities tie far more often.
        let w = route(&logits.to_dtype(DType::F32)?, top_k, norm)?;
        return Ok(w.to_dtype(logits.dtype())?);
    }
    let p = softmax_last_dim(logits)?;
    let (n, e) = p.dims2()?;
    let values: Vec<Vec<f64>> = p.to_dtype(DType::F64)?.to_vec2()?;
    let mut mask = vec![0f64; n * e];
    for (t, row) in values.iter().enumerate() {
        let mut order: Vec<usize> = (0..e).collect();
        // Stable: equal probabilities keep the lower index first.
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        for &x in order.iter().take(top_k) {
            mask[t * e + x] = 1.0;
        }
    }
    let mask = Tensor::from_vec(mask, (n, e), p.device())?.to_dtype(p.dtype())?;
    let w = (p * mask)?;
    Ok(if norm {
        w.broadcast_div(&w.sum_keepdim(D::Minus1)?)?
    } else {
        w
    })
}

/// Numerically stable softmax from differentiable ops.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Rotary embedding, transformers' rotate_half convention, on the first rotary_dim dims.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if crate::fused::fusable(x) && cos.dtype() == x.dtype() {
        // One pass instead of narrow/neg/cat/mul/mul/add (and their backwards).
        return Ok(x.contiguous()?.apply_op3(
            &cos.contiguous()?,
            &sin.contiguous()?,
            crate::fused::Rope,
        )?);
    }
    let hd = x.dim(D::Minus1)?;
    let rot = cos.dim(D::Minus1)?;
    let (xr, pass) = if rot == hd {
        (x.clone(), None)
    } else {
        (
            x.narrow(D::Minus1, 0, rot)?,
            Some(x.narrow(D::Minus1, rot, hd - rot)?),
        )
    };
    let half = rot / 2;
    let x1 = xr.narrow(D::Minus1, 0, half)?;
    let x2 = xr.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let y = (xr.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?;
    Ok(match pass {
        Some(p) => Tensor::cat(&[&y, &p], D::Minus1)?,
        None => y,
    })
}
