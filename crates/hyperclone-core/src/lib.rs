//! hyperclone-core: HyperCloning growth math and streaming checkpoint I/O.
//!
//! The pieces, in the order a clone uses them: [`checkpoint`] opens a Hugging Face folder
//! (config + safetensors) and classifies every tensor by its [`family`] rules; a
//! [`growth_spec::GrowthSpec`] (the options as given: flags, recipe, Python keywords)
//! resolves into [`options::GrowthOptions`] and, through [`grow::plan_growth`], into the
//! [`growth_map`] and the [`plan`], which derives every destination tensor, shard and
//! header; [`kernel`] expands one tensor; and [`write`] streams the plan into a [`staging`]
//! folder renamed into place when complete (the one atomic replace every command uses).

pub mod checkpoint;
pub mod config;
pub mod dtype;
pub mod error;
pub mod family;
pub mod family_table;
pub mod grow;
pub mod growth_map;
pub mod growth_spec;
pub mod kernel;
pub mod limits;
pub mod options;
pub mod output_guard;
pub mod plan;
pub mod provenance;
pub mod recipe;
pub mod rng;
pub mod safetensors;
pub mod staging;
pub mod symmetry;
pub mod upcycle;
pub mod wiring;
pub mod write;

pub use checkpoint::Checkpoint;
pub use dtype::DType;
pub use error::{Error, Result};
pub use growth_map::GrowthMap;
pub use growth_spec::GrowthSpec;
pub use kernel::Variant;
pub use options::{DepthMode, GrowthOptions};
pub use plan::Plan;
