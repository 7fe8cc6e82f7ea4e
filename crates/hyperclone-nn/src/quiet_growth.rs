//! Growing a small checkpoint without progress output, for the optimizer carry (and the
//! study). The CLI's `growth::grow_quietly` does the same for the demo; the two become
//! one when clone orchestration moves into hyperclone-core (issue 12, the other half).

use crate::Result;
use hyperclone_core::provenance::{model_card, Provenance};
use hyperclone_core::write::{create_plain_file, write_clone, NoProgress, WriteEnv};
use hyperclone_core::{Checkpoint, GrowthOptions, Plan};
use std::path::Path;
use std::sync::atomic::AtomicBool;

/// Grows `src` into `dst`; `source` and `command` go into the provenance. Returns the
/// source and the plan it followed.
pub fn grow_quietly(
    src: &Path,
    dst: &Path,
    options: &GrowthOptions,
    source: &str,
    command: &str,
) -> Result<(Checkpoint, Plan)> {
    let ckpt = Checkpoint::open(src)?;
    let prov = Provenance::of(&ckpt, source, command)?;
    let plan = Plan::new(
        &ckpt,
        options,
        &prov.metadata(
            options.factor,
            options.ffn_factor,
            options.variant.name(),
            options.snr_db,
            options.seed,
        ),
    )?;
    let cancel = AtomicBool::new(false);
    let env = WriteEnv {
        progress: &NoProgress,
        cancel: &cancel,
        create: &create_plain_file,
        check: None,
        allow_nonfinite: false,
    };
    write_clone(
        &ckpt,
        &plan,
        &model_card(&ckpt, &plan, &prov),
        dst,
        false,
        &env,
    )?;
    Ok((ckpt, plan))
}
