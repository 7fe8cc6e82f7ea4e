//! Turning flags into core growth options; the rules and their messages live in
//! [`hyperclone_core::grow`], shared with the Python package.

use crate::args::GrowthArgs;
use anyhow::Result;
use hyperclone_core::grow::GrowthRequest;
use hyperclone_core::{Checkpoint, GrowthOptions, Plan};
use std::path::Path;

/// The flags as a core growth request.
pub fn request(args: &GrowthArgs) -> GrowthRequest {
    GrowthRequest {
        factor: args.factor.clone(),
        hidden_size: args.hidden_size,
        ffn_factor: args.ffn_factor.clone(),
        intermediate_size: args.intermediate_size,
        depth_factor: args.depth_factor.clone(),
        num_hidden_layers: args.num_hidden_layers,
        depth_mode: args.depth_mode.clone(),
        keep_tied: args.keep_tied,
        recipe: args.recipe.clone(),
        num_attention_heads: args.num_attention_heads,
        variant: args.variant.clone(),
        snr_db: args.snr_db,
        seed: args.seed,
        dtype: args.dtype.clone(),
        shard_size: args.shard_size.clone(),
    }
}

/// Grows `src` into `dst` without progress output (see [`hyperclone_core::grow::grow_quietly`]).
/// The provenance is derived from the source and the options alone; `_source` and
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
