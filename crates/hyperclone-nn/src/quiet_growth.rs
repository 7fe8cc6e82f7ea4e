//! Growing a small checkpoint without progress output, for the optimizer carry (and the
//! study): [`hyperclone_core::grow::grow_quietly`], the one clone orchestration the CLI and
//! the Python package use too.

use crate::Result;
use hyperclone_core::{Checkpoint, GrowthOptions, Plan};
use std::path::Path;

/// Grows `src` into `dst`. Returns the source and the plan it followed. The provenance is
/// derived from the source and the options alone (no path, no command line); `_source` and
/// `_command` are kept for existing callers and no longer recorded.
pub fn grow_quietly(
    src: &Path,
    dst: &Path,
    options: &GrowthOptions,
    _source: &str,
    _command: &str,
) -> Result<(Checkpoint, Plan)> {
    Ok(hyperclone_core::grow::grow_quietly(src, dst, options)?)
}
