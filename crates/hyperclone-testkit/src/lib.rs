//! Test support for the workspace's integration tests (a dev-dependency only; never shipped).
//!
//! - [`tiny`]: tiny synthetic Llama folders written byte by byte, so CLI tests need no Python.
//! - [`mutate`]: seeded mutations of such a folder, shared by the library and CLI harnesses.
//! - [`cli`]: running the `hyperclone` binary and its failure contract (exit 1, one
//!   `error:` line).
//! - [`files`]: folder listings and snapshots ("input unchanged", "nothing left behind"),
//!   in-place tensor edits.
//! - [`fixtures`]: the committed fixtures (`tests/fixtures`), the family list read from its
//!   manifest so a new family is covered by adding its fixture.

pub mod cli;
pub mod files;
pub mod fixtures;
pub mod mutate;
pub mod tiny;

/// What a CLI test usually needs: the binary and its contract, the tiny Llama writer, the
/// toy corpus, listings and snapshots.
pub mod prelude {
    pub use crate::cli::*;
    pub use crate::files::*;
    pub use crate::tiny::*;
}
