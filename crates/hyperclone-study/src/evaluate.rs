//! The final evaluation of a finished run: its last checkpoint on `final_eval_windows`
//! held-out windows (at least 65,536 tokens in the paper regime), in chunks so memory
//! stays small; kept in the run's folder as final_eval.json. A run's curve evaluates on
//! fewer windows; the budget-matched measure reads only this.

use crate::Result;
use candle_core::Device;
use hyperclone_core::Checkpoint;
use hyperclone_nn::corpus::{eval_windows, TokenFile};
use hyperclone_nn::train::mean_loss;
use hyperclone_nn::{DType, Decoder};
use serde_json::{json, Value};
use std::path::Path;

/// Windows per forward pass.
const CHUNK: usize = 32;

pub const FILE: &str = "final_eval.json";

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FinalEval {
    pub val_loss: f64,
    /// Held-out tokens predicted (windows x seq; fewer windows when the split is short).
    pub tokens: usize,
}

/// The run's final evaluation, if it has one for these windows at this step.
pub fn read(run: &Path, windows: usize, seq: usize, step: u64) -> Option<FinalEval> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(run.join(FILE)).ok()?).ok()?;
    let same = v["windows_asked"].as_u64() == Some(windows as u64)
        && v["seq"].as_u64() == Some(seq as u64)
        && v["step"].as_u64() == Some(step);
    same.then(|| FinalEval {
        val_loss: v["val_loss"].as_f64().unwrap_or(f64::NAN),
        tokens: v["tokens"].as_u64().unwrap_or(0) as usize,
    })
}

/// Evaluates RUN/last (at `step`) on `windows` windows of `seq` tokens spread evenly over
/// the validation split, unless that is already recorded; returns the result.
pub fn final_eval(
    run: &Path,
    val: &TokenFile,
    windows: usize,
    seq: usize,
    step: u64,
) -> Result<FinalEval> {
    if let Some(e) = read(run, windows, seq, step) {
        return Ok(e);
    }
    let e = evaluate(&run.join("last"), val, windows, seq)?;
    let rows = e.tokens / seq.max(1);
    let record = json!({
        "step": step, "val_loss": e.val_loss, "tokens": e.tokens,
        "windows": rows, "windows_asked": windows, "seq": seq,
    });
    std::fs::write(run.join(FILE), serde_json::to_string_pretty(&record)?)?;
    Ok(e)
}

/// Evaluates the checkpoint CKPT on `windows` windows of `seq` tokens spread evenly over
/// the validation split (what final_eval records; nothing is written).
pub fn evaluate(ckpt: &Path, val: &TokenFile, windows: usize, seq: usize) -> Result<FinalEval> {
    let ckpt = Checkpoint::open(ckpt)?;
    let model = Decoder::load(&ckpt, DType::F32, &Device::Cpu)?;
    let (inputs, targets) = eval_windows(val, windows, seq)?;
    let rows = inputs.len() / seq;
    let mut sum = 0.0;
    for start in (0..rows).step_by(CHUNK) {
        let n = CHUNK.min(rows - start);
        let span = start * seq..(start + n) * seq;
        let mean = mean_loss(&model, &inputs[span.clone()], &targets[span], n)?;
        // Every window has seq targets, so the chunks' means weigh by their window counts.
        sum += mean * n as f64;
    }
    Ok(FinalEval {
        val_loss: sum / rows.max(1) as f64,
        tokens: rows * seq,
    })
}
