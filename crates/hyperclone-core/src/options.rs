//! Resolved growth options: every size a whole number, every name parsed. What the growth
//! map, the plan and the provenance read; [`crate::growth_spec::GrowthSpec`] (the options
//! as a user or a recipe gives them) resolves into them against a source's config.

use crate::config::ModelConfig;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::family::Space;
use crate::kernel::Variant;

/// The lowest `--snr-db` a noisy clone may use. The noise pairs cancel exactly in exact
/// arithmetic; in floating point each copy of the hidden state carries its own rounding
/// (about the storage dtype's epsilon times the noise), and the next noisy matrix multiplies
/// that difference between copies by roughly noise/signal = 10^(-snr/20). Below 0 dB that
/// gain exceeds 1, so the error grows geometrically with depth instead of staying at the
/// dtype's rounding. Measured on the 2-layer fixtures (verify's max relative logit
/// difference, f64 forward; tolerance 1e-5 for f32 storage, 7e-2 for bf16):
///   f32 llama-gqa: 10 dB 1.3e-7, 0 dB 3.0e-7, -3 dB 7.8e-7, -6 dB 4.4e-6, -10 dB FAIL (residual 1.1e-4)
///   f32 gpt2-mha:  10 dB 2.6e-8, 0 dB 6.2e-8, -10 dB FAIL (residual 1.5e-5)
///   bf16 llama-gqa: 10 dB 5.2e-3, 0 dB 1.1e-2, -3 dB 1.7e-2, -6 dB FAIL (residual 1.4e-1)
/// and on SmolLM2-135M (30 layers), where depth compounds it:
///   f32 0 dB 1.2e-7; bf16 0 dB 7.3e-3, -3 dB FAIL (logits 1.6e-1 of their scale, tol 1e-1)
/// So one floor for every dtype: 0 dB, where the error is still near the 10 dB level.
pub const MIN_SNR_DB: f64 = 0.0;

#[derive(Debug, Clone)]
pub struct GrowthOptions {
    /// Hidden width and head count multiplier n.
    pub factor: usize,
    /// FFN width multiplier m (the CLI defaults it to n).
    pub ffn_factor: usize,
    pub variant: Variant,
    pub snr_db: f64,
    pub seed: u64,
    /// Output dtype; `None` keeps each tensor's source dtype.
    pub dtype: Option<DType>,
    /// Maximum data bytes per output shard.
    pub shard_size: u64,
    /// Destination FFN width, any F >= the source's (Net2Net when not a whole multiple);
    /// `None`: source x `ffn_factor`.
    pub intermediate_size: Option<usize>,
    /// Destination layer count (>= the source's); `None` keeps the depth.
    pub num_layers: Option<usize>,
    pub depth_mode: DepthMode,
    /// Keep a tied embedding tied (the residual is carried as tile/n).
    pub keep_tied: bool,
    /// Destination query-head count (head_dim kept); `None`: the source's x `factor`.
    /// Other counts copy heads unevenly (Net2Net at head granularity, kv groups kept).
    pub num_heads: Option<usize>,
    /// Upcycle the dense source into its Mixture-of-Experts sibling ([`crate::upcycle`]).
    pub upcycle: Option<crate::upcycle::UpcycleOptions>,
}

impl Default for GrowthOptions {
    /// The paper's x2 symmetric growth into 5 GB shards.
    fn default() -> Self {
        GrowthOptions {
            factor: 2,
            ffn_factor: 2,
            variant: Variant::Symmetric,
            snr_db: 10.0,
            seed: 0,
            dtype: None,
            shard_size: 5_000_000_000,
            intermediate_size: None,
            num_layers: None,
            depth_mode: DepthMode::Identity,
            keep_tied: false,
            num_heads: None,
            upcycle: None,
        }
    }
}

impl GrowthOptions {
    pub fn validate(&self) -> Result<()> {
        if self.factor == 0 || self.ffn_factor == 0 {
            return Err(Error::Options(
                "growth factors must be whole numbers >= 1 (got 0)".into(),
            ));
        }
        if !self.snr_db.is_finite() {
            return Err(Error::Options(format!(
                "snr_db must be a finite number of decibels, got {}",
                self.snr_db
            )));
        }
        if self.snr_db < MIN_SNR_DB {
            return Err(Error::Options(format!(
                "snr_db {}: below {MIN_SNR_DB} dB the noise outweighs the weights and the clone no longer \
                 computes the source's function in floating point (noise cancels exactly only in exact arithmetic)",
                self.snr_db
            )));
        }
        if self.shard_size == 0 {
            return Err(Error::Options("shard_size must be positive".into()));
        }
        Ok(())
    }

    /// Copies of each space in the destination.
    pub fn copies(&self, space: Space, cfg: &ModelConfig) -> usize {
        match space {
            Space::Vocab
            | Space::HeadDim
            | Space::Positions
            | Space::Experts
            | Space::SharedGate => 1,
            Space::Hidden | Space::Heads | Space::QkvPerHead => self.factor,
            // A single shared kv head (MQA) stays single: every query head may read it.
            Space::KvHeads if cfg.num_key_value_heads == 1 => 1,
            Space::KvHeads => self.factor,
            Space::Ffn | Space::SharedFfn => self.ffn_factor,
            // OPT's embedding width: a space of its own behind project_in/out (never grown),
            // but the hidden space itself when the two are equal and there is no projection.
            Space::EmbedProj if cfg.embed_proj_dim == cfg.hidden_size => self.factor,
            Space::EmbedProj => 1,
        }
    }
}

/// The factor that takes `source` to `target`, or an error naming both when it does not
/// divide (HyperCloning tiles whole copies).
pub fn factor_for(what: &str, source: usize, target: usize) -> Result<usize> {
    if target == 0 || !target.is_multiple_of(source) {
        return Err(Error::Options(format!(
            "{what} {target} is not a whole multiple of the source's {source}: the width grows by whole copies, \
             because a norm's mean and variance over the grown hidden vector equal the source's only when it is \
             whole copies of it (the FFN may grow by any amount: intermediate_size)"
        )));
    }
    Ok(target / source)
}

/// How `--num-hidden-layers` / `--depth-factor` adds layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DepthMode {
    /// Function-preserving: after each source layer, as many copies of it as the even
    /// spread gives, with their residual writers zeroed (LLaMA Pro).
    #[default]
    Identity,
    /// The whole stack repeated (G_stack): destination layer j is source layer j mod L.
    /// Not function-preserving; for experiments.
    Stack,
}

impl DepthMode {
    pub fn name(self) -> &'static str {
        match self {
            DepthMode::Identity => "identity",
            DepthMode::Stack => "stack",
        }
    }

    pub fn parse(s: &str) -> Option<DepthMode> {
        [DepthMode::Identity, DepthMode::Stack]
            .into_iter()
            .find(|m| m.name() == s)
    }
}
