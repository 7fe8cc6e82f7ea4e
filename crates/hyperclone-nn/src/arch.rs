//! A checkpoint's layout for the one generic decoder in `model.rs`, resolved from its
//! family's record (`hyperclone_core::family::Family::wiring`) and the config switches that
//! record names. Fused and transposed layouts are read through views of the stored tensors,
//! so the forward pass sees the same separate q/k/v and gate/up for every family, and
//! training updates the stored tensors themselves.

use crate::spec::NormKind;
use hyperclone_core::family::Family;
pub use hyperclone_core::wiring::{AttnLayout, BlockLayout, Flag, MlpLayout};

#[derive(Debug, Clone, Copy)]
pub struct Arch {
    /// Layer tensors are `{layers}.{L}.{name}`.
    pub layers: &'static str,
    pub embed: &'static str,
    /// Learned position table and the row offset of position 0 (OPT: 2).
    pub positions: Option<(&'static str, usize)>,
    /// OPT's optional projections around the layers.
    pub project_in: Option<&'static str>,
    pub project_out: Option<&'static str>,
    /// Final norm ("" when the model has none: post-LN OPT).
    pub final_norm: &'static str,
    pub head: &'static str,
    pub norm: NormKind,
    pub block: BlockLayout,
    pub attn: AttnLayout,
    pub mlp: MlpLayout,
    /// q_norm/k_norm names under the attention prefix.
    pub qk_norm: Option<(&'static str, &'static str)>,
}

/// A weight's name without its `.weight` suffix (the record names the growth tensors whole).
fn module(name: &'static str) -> &'static str {
    name.strip_suffix(".weight").unwrap_or(name)
}

/// The layout of a checkpoint of `family` with this config.json.
pub fn arch(family: &Family, config: &serde_json::Value) -> Arch {
    let w = &family.wiring;
    // A flag set against its default (absent, null or not a boolean reads as the default).
    let switched = |f: &Flag| {
        config
            .get(f.key)
            .and_then(|v| v.as_bool())
            .unwrap_or(f.default)
            != f.default
    };
    let block = match &w.block_switch {
        Some((flag, other)) if switched(flag) => *other,
        _ => w.block,
    };
    let final_norm = if w.final_norm_unless.iter().any(switched) {
        ""
    } else {
        w.final_norm
    };
    Arch {
        layers: w.layers,
        embed: module(family.embedding),
        positions: w.positions.map(|p| (p, family.position_offset)),
        project_in: w.project_in,
        project_out: w.project_out,
        final_norm,
        head: module(family.head),
        norm: w.norm,
        block,
        attn: w.attn,
        mlp: w.mlp,
        qk_norm: w.qk_norm,
    }
}
