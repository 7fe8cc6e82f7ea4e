//! Checking a clone on disk against its source: memory check, loading both models, the
//! probe, the tolerance for the clone's storage dtype, and the report. Used by `hyperclone
//! verify`, `clone --verify`, the demo and the Python package alike.

use crate::error::{stop_if_cancelled, NnError, Result};
use crate::model::resolve;
use crate::stream::{forward_streamed_cancellable, streamed_bytes};
use crate::verify::{
    compare, default_tolerance, grown_factor, rounding_sensitivity, Expectation, VerifyReport,
};
use candle_core::{DType, Device, Tensor};
use hyperclone_core::symmetry::mean_row_half_cosine;
use hyperclone_core::Checkpoint;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

pub use crate::generate::probe_tokens;

/// The outcome of checking BIG against SMALL.
#[derive(Debug, Clone)]
pub struct Verification {
    pub report: VerifyReport,
    /// Mean cosine between the row halves of BIG's weights (1 = exact copies), if defined.
    pub symmetry: Option<f64>,
}

impl Verification {
    pub fn passed(&self) -> bool {
        self.report.passed()
    }

    /// The JSON object of `hyperclone verify --json` (and `clone --json`'s `verification`).
    pub fn json(&self) -> Value {
        let r = &self.report;
        json!({
            "passed": r.passed(),
            "factor": r.factor,
            "tokens": r.tokens,
            "tolerance": r.tolerance,
            "std_tolerance": r.std_tolerance,
            "max_abs_logit_diff": r.max_abs_logit_diff,
            "max_rel_logit_diff": r.max_rel_logit_diff,
            "std_ratio": r.std_ratio,
            "top1_agreement": r.top1_agreement,
            "kl_small_big": r.kl_small_big,
            "first_divergence": r.first_divergence().map(|s| s.name.clone()),
            "states": r.states.iter().map(|s| json!({"state": s.name, "max_abs": s.max_abs, "relative": s.relative})).collect::<Vec<_>>(),
            "mean_row_half_cosine": self.symmetry,
        })
    }

    /// One line saying why the clone does not verify.
    pub fn failure_reason(&self) -> String {
        let r = &self.report;
        if let Some(s) = r.first_divergence() {
            return format!(
                "residual stream first diverges at {} (max deviation {:.3e}, {:.3e} of its scale; tolerance {:.0e})",
                s.name, s.max_abs, s.relative, r.tolerance
            );
        }
        format!(
            "logits differ by {:.3e} ({:.3e} of their scale; tolerance {:.0e}) and std ratio is {:.9} (tolerance {:.0e})",
            r.max_abs_logit_diff, r.max_rel_logit_diff, r.tolerance, r.std_ratio, r.std_tolerance
        )
    }
}

/// Verification streams each model a layer at a time ([`crate::stream::forward_streamed`]); refuse up
/// front, with the numbers, when even that does not fit rather than be killed by the OOM
/// killer half-way.
pub fn ensure_memory_for(models: &[&Checkpoint], dtype: DType, tokens: usize) -> Result<()> {
    let (need, available) = memory_for(models, dtype, tokens);
    if let Some(avail) = available {
        if need > avail {
            return Err(NnError::Input(format!(
                "verifying needs about {:.1} GiB in {:?} but {:.1} GiB is available (use `hyperclone verify --dtype f32`, \
                 fewer tokens, or a bigger machine)",
                need as f64 / (1u64 << 30) as f64,
                dtype,
                avail as f64 / (1u64 << 30) as f64
            )));
        }
    }
    Ok(())
}

/// (bytes verification needs for `tokens` tokens, bytes available if known): the models run
/// one after the other, so the largest one's streaming peak, plus every model's outputs
/// kept for the comparison.
pub fn memory_for(models: &[&Checkpoint], dtype: DType, tokens: usize) -> (u64, Option<u64>) {
    let peak = models
        .iter()
        .map(|c| streamed_bytes(c, dtype, tokens))
        .max()
        .unwrap_or(0);
    let size = dtype.size_in_bytes() as u64;
    let kept = models.iter().fold(0u64, |sum, c| {
        let c = &c.config;
        let states = (c.num_hidden_layers as u64 + 2).saturating_mul(c.hidden_size as u64);
        // The logits once in the working dtype and once in f64 for the comparison.
        let logits = (c.vocab_size as u64).saturating_mul(size + 8);
        let per_token = states.saturating_mul(size).saturating_add(logits);
        sum.saturating_add((tokens as u64).saturating_mul(per_token))
    });
    let need = peak.saturating_add(kept);
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    (need, available)
}

/// The precision `clone --verify` can afford: f64 (exact to 1e-9) when verifying the probe
/// fits in memory that way, else f32 (1e-4 of the logit scale).
pub fn affordable_dtype(small: &Path, big: &Path) -> Result<DType> {
    let (s, b) = (Checkpoint::open(small)?, Checkpoint::open(big)?);
    let tokens = probe_tokens(s.config.vocab_size).len();
    Ok(match memory_for(&[&s, &b], DType::F64, tokens) {
        (need, Some(avail)) if need > avail => DType::F32,
        _ => DType::F64,
    })
}

/// Checks that BIG computes SMALL's function on `ids` (default: [`probe_tokens`]) in the
/// working `dtype`, running each model a layer at a time (see [`crate::stream::forward_streamed`]).
pub fn run_verify(
    small: &Path,
    big: &Path,
    ids: Option<&[u32]>,
    dtype: DType,
) -> Result<Verification> {
    run_verify_cancellable(small, big, ids, dtype, &AtomicBool::new(false))
}

/// [`run_verify`] that stops between its stages (loading each model, running them) once
/// `cancel` is set (Ctrl-C during `clone --verify`).
pub fn run_verify_cancellable(
    small: &Path,
    big: &Path,
    ids: Option<&[u32]>,
    dtype: DType,
    cancel: &AtomicBool,
) -> Result<Verification> {
    let stop = || stop_if_cancelled(cancel);
    let small_ckpt = Checkpoint::open(small)?;
    let big_ckpt = Checkpoint::open(big)?;
    let (_, small_spec) = resolve(&small_ckpt)?;
    let (_, big_spec) = resolve(&big_ckpt)?;
    let vocab = small_spec.vocab;
    let ids = match ids {
        Some(ids) => {
            if ids.is_empty() {
                return Err(NnError::Input("no tokens to verify on".into()));
            }
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(NnError::Input(format!(
                    "token id {bad} is outside the model's vocabulary of {vocab}"
                )));
            }
            ids.to_vec()
        }
        None => probe_tokens(vocab),
    };
    ensure_memory_for(&[&small_ckpt, &big_ckpt], dtype, ids.len())?;
    stop()?;
    let expect = Expectation::recorded(&big_ckpt)?;
    let n = grown_factor(&small_spec, &big_spec, &expect)?;
    let device = Device::Cpu;
    let input = Tensor::from_vec(ids.clone(), (1, ids.len()), &device)?;
    let small_out = forward_streamed_cancellable(&small_ckpt, dtype, &device, &input, cancel)?;
    stop()?;
    let big_out = forward_streamed_cancellable(&big_ckpt, dtype, &device, &input, cancel)?;
    stop()?;
    // The coarsest dtype BIG stores weights in bounds how exact it can be (see
    // default_tolerance); SMALL's own rounding is shared by both models.
    let coarsest = big_ckpt
        .dtypes()
        .into_iter()
        .max_by_key(|d| std::cmp::Reverse(d.size()))
        .unwrap_or(hyperclone_core::DType::F64);
    // In bf16/f16 the storage rounding dominates, and how much it moves the logits depends
    // on the model (depth, norms, scale): measure it on SMALL instead of assuming it.
    let report = match coarsest {
        hyperclone_core::DType::BF16 | hyperclone_core::DType::F16 => {
            let s = rounding_sensitivity(&small_ckpt, &small_out, coarsest, dtype, &ids)?;
            compare(&small_out, &big_out, n, ids.len(), 0.0, &expect)?
                .with_measured_tolerance(dtype, s)
        }
        _ => compare(
            &small_out,
            &big_out,
            n,
            ids.len(),
            default_tolerance(dtype, coarsest),
            &expect,
        )?,
    };
    stop()?; // the symmetry reads every weight of BIG again
    let symmetry = mean_row_half_cosine(&big_ckpt, &small_ckpt.config);
    Ok(Verification { report, symmetry })
}

/// The check `clone --verify` runs on the finished staging folder before it is moved into
/// place: the affordable precision, the default probe; keeps the report for the summary.
pub struct StagedCheck<'a> {
    source: &'a Path,
    report: Mutex<Option<Value>>,
    cancel: Option<&'a AtomicBool>,
}

impl<'a> StagedCheck<'a> {
    pub fn new(source: &'a Path) -> Self {
        StagedCheck {
            source,
            report: Mutex::new(None),
            cancel: None,
        }
    }

    /// Stops between verification stages once `cancel` is set (the clone's Ctrl-C flag;
    /// the clone then reports the interruption and keeps nothing).
    pub fn with_cancel(mut self, cancel: &'a AtomicBool) -> Self {
        self.cancel = Some(cancel);
        self
    }

    /// `Err(reason)` when the staged clone does not compute the source's function.
    pub fn check(&self, staged: &Path) -> std::result::Result<(), String> {
        let dtype = affordable_dtype(self.source, staged).map_err(|e| e.to_string())?;
        let never = AtomicBool::new(false);
        let cancel = self.cancel.unwrap_or(&never);
        let v = run_verify_cancellable(self.source, staged, None, dtype, cancel)
            .map_err(|e| e.to_string())?;
        *self.report.lock().expect("not poisoned") = Some(v.json());
        if v.passed() {
            Ok(())
        } else {
            Err(v.failure_reason())
        }
    }

    /// The JSON report of the last check, if one ran.
    pub fn into_report(self) -> Option<Value> {
        self.report.into_inner().expect("not poisoned")
    }
}
