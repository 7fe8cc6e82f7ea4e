//! The generic decoder: embedding, pre-norm attention + gated MLP blocks, final norm, head.
//!
//! Written with plain differentiable candle ops (no fused kernels without a backward), so
//! the same code serves verification in f64 and training in f32.

use crate::error::{NnError, Result};
use crate::softmax::CausalSoftmax;
use crate::spec::{Activation, DecoderSpec};
use candle_core::{DType, Device, Tensor, D};
use hyperclone_core::Checkpoint;
use std::collections::HashMap;

struct Linear {
    w: Tensor,
    b: Option<Tensor>,
}

impl Linear {
    /// x: [N, in] -> [N, out]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.w.t()?)?;
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

struct Layer {
    input_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    post_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

pub struct Decoder {
    pub spec: DecoderSpec,
    pub dtype: DType,
    pub device: Device,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    head: Tensor,
}

/// Logits and the residual stream, for verification.
pub struct ForwardOutput {
    /// [B, T, vocab]
    pub logits: Tensor,
    /// The residual stream after the embedding and after every layer: L + 1 tensors [B, T, d].
    pub residual: Vec<Tensor>,
    /// After the final norm: [B, T, d].
    pub final_norm: Tensor,
}

impl Decoder {
    pub fn load(ckpt: &Checkpoint, dtype: DType, device: &Device) -> Result<Self> {
        let spec = DecoderSpec::from_checkpoint(ckpt)?;
        let mut weights: HashMap<String, Tensor> = HashMap::new();
        for t in &ckpt.tensors {
            let f = &ckpt.files[t.file];
            let mut v = vec![0f64; t.info.numel()];
            t.info.dtype.decode(f.data(&t.info), &mut v);
            let tensor = Tensor::from_vec(v, t.info.shape.clone(), device)?.to_dtype(dtype)?;
            weights.insert(t.info.name.clone(), tensor);
        }
        let family = ckpt.config.family;
        let take = |name: &str| -> Result<Tensor> {
            weights.get(name).cloned().ok_or_else(|| {
                NnError::Input(format!("{}: tensor `{name}` missing", ckpt.dir.display()))
            })
        };
        let opt = |name: &str| weights.get(name).cloned();
        let lin = |p: &str| -> Result<Linear> {
            Ok(Linear {
                w: take(&format!("{p}.weight"))?,
                b: opt(&format!("{p}.bias")),
            })
        };
        let mut layers = Vec::with_capacity(spec.layers);
        for l in 0..spec.layers {
            let p = format!("model.layers.{l}");
            layers.push(Layer {
                input_norm: take(&format!("{p}.input_layernorm.weight"))?,
                q: lin(&format!("{p}.self_attn.q_proj"))?,
                k: lin(&format!("{p}.self_attn.k_proj"))?,
                v: lin(&format!("{p}.self_attn.v_proj"))?,
                o: lin(&format!("{p}.self_attn.o_proj"))?,
                q_norm: opt(&format!("{p}.self_attn.q_norm.weight")),
                k_norm: opt(&format!("{p}.self_attn.k_norm.weight")),
                post_norm: take(&format!("{p}.post_attention_layernorm.weight"))?,
                gate: lin(&format!("{p}.mlp.gate_proj"))?,
                up: lin(&format!("{p}.mlp.up_proj"))?,
                down: lin(&format!("{p}.mlp.down_proj"))?,
            });
        }
        let embed = take(family.embedding)?;
        let head = opt(family.head).unwrap_or_else(|| embed.clone());
        Ok(Decoder {
            spec,
            dtype,
            device: device.clone(),
            embed,
            layers,
            norm: take("model.norm.weight")?,
            head,
        })
    }

    /// Runs token ids [B, T] through the model.
    pub fn forward(&self, ids: &Tensor) -> Result<ForwardOutput> {
        let (b, t) = ids.dims2()?;
        let s = &self.spec;
        if let Some(bad) = ids
            .flatten_all()?
            .to_vec1::<u32>()?
            .iter()
            .find(|&&i| i as usize >= s.vocab)
        {
            return Err(NnError::Input(format!(
                "token id {bad} is outside the vocabulary (size {})",
                s.vocab
            )));
        }
        let (cos, sin) = self.rope_tables(t)?;
        let mut x = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b * t, s.hidden))?;
        let mut residual = vec![x.reshape((b, t, s.hidden))?];
        for (l, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.input_norm, s.norm_eps)?;
            let a = self.attention(layer, &h, b, t, &cos, &sin, s.sliding_window[l])?;
            x = (x + a)?;
            let h = rms_norm(&x, &layer.post_norm, s.norm_eps)?;
            let m = self.mlp(layer, &h)?;
            x = (x + m)?;
            residual.push(x.reshape((b, t, s.hidden))?);
        }
        let normed = rms_norm(&x, &self.norm, s.norm_eps)?;
        let logits = normed.matmul(&self.head.t()?)?.reshape((b, t, s.vocab))?;
        Ok(ForwardOutput {
            logits,
            residual,
            final_norm: normed.reshape((b, t, s.hidden))?,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        l: &Layer,
        h: &Tensor,
        b: usize,
        t: usize,
        cos: &Tensor,
        sin: &Tensor,
        window: Option<usize>,
    ) -> Result<Tensor> {
        let s = &self.spec;
        let (nh, nk, hd) = (s.heads, s.kv_heads, s.head_dim);
        let heads = |x: Tensor, n: usize| -> Result<Tensor> {
            Ok(x.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let mut q = heads(l.q.forward(h)?, nh)?;
        let mut k = heads(l.k.forward(h)?, nk)?;
        let v = heads(l.v.forward(h)?, nk)?;
        if let Some(w) = &l.q_norm {
            q = rms_norm(&q, w, s.norm_eps)?;
        }
        if let Some(w) = &l.k_norm {
            k = rms_norm(&k, w, s.norm_eps)?;
        }
        let q = apply_rope(&q, cos, sin)?;
        let k = apply_rope(&k, cos, sin)?;
        // Grouped-query attention without copying k and v: the nh/nk query heads that share
        // a kv head are adjacent, so [B, nh, T, hd] views as [B, nk, group*T, hd] and each
        // kv head serves group*T query rows (query position = row % T).
        let group = nh / nk;
        let q = q.reshape((b, nk, group * t, hd))?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (hd as f64).sqrt()))?;
        let probs = if self.device.is_cpu() && matches!(self.dtype, DType::F32 | DType::F64) {
            scores.apply_op1(CausalSoftmax { window })?
        } else {
            let mask = self.mask(t, window)?.repeat((group, 1))?;
            softmax_last_dim(&scores.broadcast_add(&mask)?)?
        };
        let out = probs
            .matmul(&v)?
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b * t, nh * hd))?;
        l.o.forward(&out)
    }

    fn mlp(&self, l: &Layer, h: &Tensor) -> Result<Tensor> {
        let g = l.gate.forward(h)?;
        let g = match self.spec.activation {
            Activation::Silu => (&g * candle_nn::ops::sigmoid(&g)?)?,
            Activation::GeluTanh => g.gelu()?,
            Activation::Gelu => g.gelu_erf()?,
        };
        l.down.forward(&(g * l.up.forward(h)?)?)
    }

    /// cos/sin tables [T, rotary_dim], computed in f64 (the exact rotation) then cast.
    fn rope_tables(&self, t: usize) -> Result<(Tensor, Tensor)> {
        let s = &self.spec;
        let rot = ((s.head_dim as f64 * s.partial_rotary) as usize) & !1;
        let half = rot / 2;
        let mut cos = Vec::with_capacity(t * rot);
        let mut sin = Vec::with_capacity(t * rot);
        for p in 0..t {
            for _ in 0..2 {
                for i in 0..half {
                    let inv = 1.0 / s.rope_theta.powf((2 * i) as f64 / rot as f64);
                    let a = p as f64 * inv;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let mk = |v: Vec<f64>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, (t, rot), &self.device)?.to_dtype(self.dtype)?)
        };
        Ok((mk(cos)?, mk(sin)?))
    }

    /// Additive causal mask [T, T] (0 where attended, -inf elsewhere), for devices and dtypes
    /// without the fused causal softmax.
    fn mask(&self, t: usize, window: Option<usize>) -> Result<Tensor> {
        let m: Vec<f64> = (0..t * t)
            .map(|k| {
                let (i, j) = (k / t, k % t);
                if j <= i && window.is_none_or(|w| i - j < w) {
                    0.0
                } else {
                    f64::NEG_INFINITY
                }
            })
            .collect();
        Ok(Tensor::from_vec(m, (t, t), &self.device)?.to_dtype(self.dtype)?)
    }
}

/// RMSNorm over the last dimension, in the working dtype.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)?)
}

/// Numerically stable softmax from differentiable ops.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Rotary embedding, transformers' rotate_half convention, on the first rotary_dim dims.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
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
