//! hyperclone-study: the convergence study of `hyperclone experiment`, as a library the CLI
//! and the Python package share.
//!
//! The modules in dependency order (no cycles): [`settings`] (the arms and the resolved
//! hyperparameters), [`curve`] (one run's metrics and the measurements taken of them),
//! [`runs`] (the study folder's layout and its finished runs), [`report`] (the numbers,
//! report.md and report.json), [`plot`] (the PNGs, from curves and the report), and
//! [`experiment`] (the orchestration that trains the runs, then reports).
//!
//! Errors are hyperclone-nn's: a study fails where training or a file does, and the
//! context chain names the run.

/// `return Err(NnError::Input(format!(..)))`: a refused input or state, in one line.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err(hyperclone_nn::NnError::Input(format!($($arg)*)))
    };
}

pub mod curve;
pub mod experiment;
pub mod plot;
pub mod report;
pub mod runs;
pub mod settings;

pub use hyperclone_nn::{NnError as Error, Result};
