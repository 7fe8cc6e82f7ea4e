//! hyperclone-study: the convergence study of `hyperclone experiment`, as a library the CLI
//! and the Python package share.
//!
//! The protocol is budget-matched: every point is a complete run with its own schedule at
//! one budget of a ladder, and a clone arm's speedup is the random init's budget over the
//! budget at which the clone's final loss equals the random init's final loss.
//!
//! The modules in dependency order (no cycles): [`settings`] (the arms and the resolved
//! hyperparameters), [`compute`] (training FLOPs per token), [`budget`] (the crossing of
//! final loss against budget, and which rungs still bracket it), [`curve`] (one run's
//! metrics), [`evaluate`] (a finished run's final evaluation), [`runs`] (the study folder's
//! layout and its finished runs), [`report`] (the numbers, report.md and report.json),
//! [`plot`] (the PNGs), [`record`] (the committable record a study continues from), and [`experiment`] (the orchestration that trains the runs in
//! resumable slices, then reports).
//!
//! Errors are hyperclone-nn's: a study fails where training or a file does, and the
//! context chain names the run.

/// `return Err(NnError::Input(format!(..)))`: a refused input or state, in one line.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err(hyperclone_nn::NnError::Input(format!($($arg)*)))
    };
}

pub mod budget;
pub mod compute;
pub mod curve;
pub mod evaluate;
pub mod experiment;
pub mod plot;
pub mod record;
pub mod report;
pub mod runs;
pub mod settings;

pub use hyperclone_nn::{NnError as Error, Result};
