//! Turning flags into core growth options; the rules and their messages live in
//! [`hyperclone_core::grow`], shared with the Python package.

use crate::args::GrowthArgs;
use hyperclone_core::grow::GrowthRequest;

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
