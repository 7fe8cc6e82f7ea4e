//! Does a clone compute its source's function? Logits, their scale, and the residual
//! stream, compared between a small model and its n-times-wider clone.

use crate::error::{NnError, Result};
use crate::model::{Decoder, ForwardOutput};
use crate::spec::DecoderSpec;
use crate::stream::forward_streamed;
use candle_core::{DType, Tensor, D};

#[derive(Debug, Clone)]
pub struct StateDeviation {
    /// "embedding", "layer 3", "final norm".
    pub name: String,
    /// max |big - tile(small, n)|
    pub max_abs: f64,
    /// max_abs relative to max |small state|.
    pub relative: f64,
}

#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub factor: usize,
    pub tokens: usize,
    pub max_abs_logit_diff: f64,
    /// max_abs_logit_diff / max |small logit|.
    pub max_rel_logit_diff: f64,
    /// std(big logits) / std(small logits): 1 for a correct clone; catches a global scale
    /// (e.g. a head divided by an extra n) that leaves every argmax unchanged.
    pub std_ratio: f64,
    pub top1_agreement: f64,
    /// Mean over positions of KL(softmax(small) || softmax(big)).
    pub kl_small_big: f64,
    pub states: Vec<StateDeviation>,
    pub tolerance: f64,
    /// Allowed |std_ratio - 1|: `tolerance` (at least 1e-6) unless measured separately
    /// (bf16/f16 clones, see [`rounding_sensitivity`]).
    pub std_tolerance: f64,
}

impl VerifyReport {
    /// Logits and every state within tolerance, and the logit scale preserved.
    pub fn passed(&self) -> bool {
        self.max_rel_logit_diff <= self.tolerance // false for NaN
            && (self.std_ratio - 1.0).abs() <= self.std_tolerance
            && self.first_divergence().is_none()
    }

    /// The first residual-stream state that is not the n-fold tile of the small model's.
    pub fn first_divergence(&self) -> Option<&StateDeviation> {
        // NaN compares false: a NaN deviation is a divergence, never a pass.
        self.states
            .iter()
            .find(|s| s.relative.is_nan() || s.relative > self.tolerance)
    }
}

/// The tolerance a correct clone meets, relative to the logit (or state) scale.
///
/// Two limits add up: the working precision (f64 agrees to rounding, 1e-9; f32 accumulates
/// ~1e-6 per layer, so 1e-4) and the precision BIG's weights are *stored* in: W/3, or W/2
/// plus noise, is rounded once per weight to the output dtype, an error of half an ulp
/// (3e-8 in f32, 2e-3 in bf16) that no working precision can undo. Storage limits allow
/// ~100 ulps of growth through the network.
pub fn default_tolerance(working: DType, coarsest_storage: hyperclone_core::DType) -> f64 {
    let work = working_tolerance(working);
    let storage = match coarsest_storage {
        hyperclone_core::DType::F64 => 0.0,
        hyperclone_core::DType::F32 => 1e-5,
        hyperclone_core::DType::F16 => 5e-3,
        hyperclone_core::DType::BF16 => 3e-2,
    };
    work + storage
}

/// How many times the measured rounding sensitivity a correct clone may deviate.
///
/// A clone's stored weights carry one rounding error each (W/n, or W/n plus noise, written
/// in the storage dtype), the same kind and size of error the sensitivity probe puts into
/// SMALL: one draw against another. Measured on the tiny fixtures (9 folders x 5 growth
/// settings in bf16/f16: x2, x3, noisy x2, diagonal x5, noisy-diagonal x4 in f16; 45
/// clones), every correct clone stayed within 0.67 of the value tolerance and 0.49 of the
/// scale tolerance this margin gives, while a final norm off by 5% is refused.
pub const ROUNDING_MARGIN: f64 = 4.0;

/// The working-precision part of the tolerance (see [`default_tolerance`]).
pub fn working_tolerance(working: DType) -> f64 {
    match working {
        DType::F64 => 1e-9,
        DType::F32 => 1e-4,
        _ => 5e-2,
    }
}

/// How far rounding every weight to `storage` moves SMALL's function, measured: SMALL is
/// run with each weight w replaced by `round(w / k) * k` (an independent rounding error of
/// up to half an ulp of `storage` at w's magnitude, as writing W/n or W/n + noise gives a
/// clone) and compared with SMALL as stored (`small`: its output on `ids`). The rounded
/// SMALL is streamed layer by layer ([`forward_streamed`]), never held whole.
pub fn rounding_sensitivity(
    ckpt: &hyperclone_core::Checkpoint,
    small: &ForwardOutput,
    storage: hyperclone_core::DType,
    working: DType,
    ids: &[u32],
) -> Result<Sensitivity> {
    let device = small.logits.device();
    let input = Tensor::from_vec(ids.to_vec(), (1, ids.len()), device)?;
    let same = Expectation::same_depth(small.residual.len() - 1);
    // Three independent draws of the rounding (w/3, w/5, w/7 rounded, scaled back): one
    // draw can by chance leave a metric (the signed scale error) near zero.
    let mut out = Sensitivity {
        values: 0.0,
        scale: 0.0,
    };
    for k in [3.0, 5.0, 7.0] {
        let round = |v: &mut [f64]| {
            let part: Vec<f64> = v.iter().map(|x| x / k).collect();
            let mut bytes = vec![0u8; part.len() * storage.size()];
            storage.encode(&part, &mut bytes);
            storage.decode(&bytes, v);
            for x in v.iter_mut() {
                *x *= k;
            }
        };
        let rounded = forward_streamed(ckpt, working, device, Some(&round), &input)?;
        let r = compare(small, &rounded, 1, ids.len(), 0.0, &same)?;
        let states = r.states.iter().map(|s| s.relative).fold(0.0, nan_max);
        out.values = nan_max(out.values, nan_max(r.max_rel_logit_diff, states));
        out.scale = nan_max(out.scale, (r.std_ratio - 1.0).abs());
    }
    Ok(out)
}

/// What storage rounding does to SMALL (see [`rounding_sensitivity`]).
#[derive(Debug, Clone, Copy)]
pub struct Sensitivity {
    /// Largest relative deviation of the logits and of every residual state.
    pub values: f64,
    /// |std ratio - 1| of the logits: rounding barely moves their scale, so a clone whose
    /// scale is off (a norm or head mis-scaled) is caught even where values are noisy.
    pub scale: f64,
}

impl VerifyReport {
    /// Sets the tolerances of a clone stored in a coarse dtype (bf16, f16): the working
    /// precision's plus [`ROUNDING_MARGIN`] times the measured sensitivity, separately for
    /// the values and for the logit scale.
    pub fn with_measured_tolerance(mut self, working: DType, s: Sensitivity) -> Self {
        let work = working_tolerance(working);
        self.tolerance = work + ROUNDING_MARGIN * s.values;
        self.std_tolerance = (work + ROUNDING_MARGIN * s.scale).max(1e-6);
        self
    }
}

/// What BIG's residual states should be, relative to SMALL's.
#[derive(Debug, Clone, PartialEq)]
pub struct Expectation {
    /// For each BIG layer, the SMALL layer whose output its output equals (inserted
    /// identity blocks repeat their neighbour's).
    pub layer_of: Vec<usize>,
    /// BIG's residual stream is tile(h) * residual_scale (1/n when a tie was kept).
    pub residual_scale: f64,
}

impl Expectation {
    /// Width growth only: layer i is layer i, the residual a plain tile.
    pub fn same_depth(layers: usize) -> Expectation {
        Expectation {
            layer_of: (0..layers).collect(),
            residual_scale: 1.0,
        }
    }

    /// What BIG records about its growth (every clone stores its growth map in its
    /// safetensors metadata); a checkpoint without one is expected to be a width-only clone.
    pub fn recorded(big: &hyperclone_core::Checkpoint) -> Result<Expectation> {
        use hyperclone_core::growth_map::{RecordedGrowth, GROWTH_MAP_KEY};
        let Some(text) = RecordedGrowth::text(big) else {
            return Ok(Expectation::same_depth(big.config.num_hidden_layers));
        };
        let r = RecordedGrowth::parse(text).ok_or_else(|| {
            NnError::Input(format!(
                "{}: `{GROWTH_MAP_KEY}` in the safetensors metadata is not a growth map",
                big.dir.display()
            ))
        })?;
        if let Some(why) = &r.upcycle_not_exact {
            return Err(NnError::Input(format!(
                "{} was upcycled with options that do not preserve the function ({why}): there is nothing to \
                 verify (compare losses after training instead)",
                big.dir.display()
            )));
        }
        if !r.preserves_function {
            return Err(NnError::Input(format!(
                "{} was grown with --depth-mode stack, which does not preserve the function: there is nothing \
                 to verify (compare losses after training instead)",
                big.dir.display()
            )));
        }
        Ok(Expectation {
            layer_of: r.layer_of(),
            residual_scale: r.residual_scale,
        })
    }
}

pub fn verify(small: &Decoder, big: &Decoder, ids: &[u32], tolerance: f64) -> Result<VerifyReport> {
    verify_expecting(
        small,
        big,
        ids,
        tolerance,
        &Expectation::same_depth(big.spec.layers),
    )
}

pub fn verify_expecting(
    small: &Decoder,
    big: &Decoder,
    ids: &[u32],
    tolerance: f64,
    expect: &Expectation,
) -> Result<VerifyReport> {
    let n = grown_factor(&small.spec, &big.spec, expect)?;
    let input = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &small.device)?;
    let so = small.forward(&input)?;
    let bo = big.forward(&input.to_device(&big.device)?)?;
    compare(&so, &bo, n, ids.len(), tolerance, expect)
}

/// The width factor n of BIG over SMALL, refusing a BIG that is not SMALL grown by the
/// recorded layer map.
pub fn grown_factor(s: &DecoderSpec, b: &DecoderSpec, expect: &Expectation) -> Result<usize> {
    let layers_match =
        expect.layer_of.len() == b.layers && expect.layer_of.iter().all(|&l| l < s.layers);
    if !b.hidden.is_multiple_of(s.hidden) || b.vocab != s.vocab || !layers_match {
        return Err(NnError::Input(format!(
            "BIG (hidden {}, vocab {}, {} layers) is not a grown SMALL (hidden {}, vocab {}, {} layers){}",
            b.hidden,
            b.vocab,
            b.layers,
            s.hidden,
            s.vocab,
            s.layers,
            if b.layers == s.layers {
                ""
            } else {
                " with the layer map BIG records"
            }
        )));
    }
    Ok(b.hidden / s.hidden)
}

/// The report on SMALL's and BIG's outputs for the same `tokens` tokens (BIG `n` times
/// wider, its layers mapped by `expect`), however each was computed.
pub fn compare(
    so: &ForwardOutput,
    bo: &ForwardOutput,
    n: usize,
    tokens: usize,
    tolerance: f64,
    expect: &Expectation,
) -> Result<VerifyReport> {
    let sl = to_rows(&so.logits)?;
    let bl = to_rows(&bo.logits)?;
    let scale = sl
        .iter()
        .flatten()
        .fold(0f64, |m, x| nan_max(m, x.abs()))
        .max(1e-30);
    let max_abs = sl
        .iter()
        .flatten()
        .zip(bl.iter().flatten())
        .fold(0f64, |m, (a, b)| nan_max(m, (a - b).abs()));
    let std_ratio = std_ratio(std(bl.iter().flatten()), std(sl.iter().flatten()));
    let mut agree = 0usize;
    let mut kl = 0.0;
    for (a, b) in sl.iter().zip(&bl) {
        agree += (argmax(a) == argmax(b)) as usize;
        kl += kl_divergence(a, b);
    }
    let states = state_deviations(so, bo, n, expect)?;
    Ok(VerifyReport {
        factor: n,
        tokens,
        max_abs_logit_diff: max_abs,
        max_rel_logit_diff: max_abs / scale,
        std_ratio,
        top1_agreement: agree as f64 / sl.len() as f64,
        kl_small_big: kl / sl.len() as f64,
        states,
        tolerance,
        std_tolerance: tolerance.max(1e-6),
    })
}

fn state_deviations(
    so: &ForwardOutput,
    bo: &ForwardOutput,
    n: usize,
    expect: &Expectation,
) -> Result<Vec<StateDeviation>> {
    // (name, SMALL's state, BIG's state, the factor on BIG's tile)
    let mut pairs: Vec<(String, &Tensor, &Tensor, f64)> = Vec::new();
    let r = expect.residual_scale;
    pairs.push(("embedding".into(), &so.residual[0], &bo.residual[0], r));
    for (j, &l) in expect.layer_of.iter().enumerate() {
        let name = if expect.layer_of.len() == so.residual.len() - 1 {
            format!("layer {j}")
        } else {
            format!("layer {j} (= source layer {l})")
        };
        pairs.push((name, &so.residual[l + 1], &bo.residual[j + 1], r));
    }
    // The final norm is scale-invariant: its output is the plain tile even when the
    // residual is carried scaled.
    pairs.push(("final norm".into(), &so.final_norm, &bo.final_norm, 1.0));
    pairs
        .into_iter()
        .map(|(name, a, b, factor)| {
            // A state outside the residual stream (OPT's project_out output) is not grown.
            let copies = if b.dim(D::Minus1)? == a.dim(D::Minus1)? {
                1
            } else {
                n
            };
            let tiled = (Tensor::cat(&vec![a; copies], D::Minus1)?.to_dtype(DType::F64)? * factor)?;
            let a_max = to_rows(a)?
                .iter()
                .flatten()
                .fold(0f64, |m, x| m.max(x.abs()))
                .max(1e-30);
            let d = (b.to_dtype(DType::F64)? - tiled.to_dtype(DType::F64)?)?
                .abs()?
                .flatten_all()?
                .to_vec1::<f64>()?
                .into_iter()
                .fold(0f64, nan_max);
            Ok(StateDeviation {
                name,
                max_abs: d,
                relative: d / (a_max * factor),
            })
        })
        .collect()
}

/// std(big) / std(small), with constant logits on both sides (a zero head) the same scale:
/// 1, not 0/0. A constant SMALL against a varying BIG stays infinite (a failure).
fn std_ratio(big: f64, small: f64) -> f64 {
    if big == 0.0 && small == 0.0 {
        1.0
    } else {
        big / small
    }
}

/// The larger of two, NaN if either is (f64::max drops NaN, hiding a broken model).
fn nan_max(m: f64, x: f64) -> f64 {
    if m.is_nan() || x.is_nan() {
        f64::NAN
    } else {
        m.max(x)
    }
}

/// [1, T, V] (or [T, V]) -> T rows of f64.
fn to_rows(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    let v = t.dim(D::Minus1)?;
    let flat: Vec<f64> = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    Ok(flat.chunks(v).map(<[f64]>::to_vec).collect())
}

fn std<'a>(xs: impl Iterator<Item = &'a f64> + Clone) -> f64 {
    let n = xs.clone().count() as f64;
    let mean = xs.clone().sum::<f64>() / n;
    (xs.map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt()
}

pub fn argmax(xs: &[f64]) -> usize {
    xs.iter()
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

fn log_softmax(xs: &[f64]) -> Vec<f64> {
    let m = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + xs.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
    xs.iter().map(|x| x - lse).collect()
}

fn kl_divergence(p_logits: &[f64], q_logits: &[f64]) -> f64 {
    let lp = log_softmax(p_logits);
    let lq = log_softmax(q_logits);
    lp.iter()
        .zip(&lq)
        .map(|(a, b)| a.exp() * (a - b))
        .sum::<f64>()
        .max(0.0)
}
