//! Counter-based randomness: core's (see `hyperclone_core::rng`), re-exported for nn.
pub use hyperclone_core::rng::{mix64, normal, uniform};
