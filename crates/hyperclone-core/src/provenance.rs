//! What made a clone: recorded in every shard's `__metadata__` and in the model card, so a
//! grown checkpoint can always be traced to its source and reproduced.

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::family::Component;
use crate::plan::Plan;
use std::collections::BTreeMap;
use std::fmt::Write as _;

pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, Clone)]
pub struct Provenance {
    /// The command line as typed (paths as given, so reruns give identical bytes).
    pub command: String,
    pub source: String,
    pub config_sha256: String,
    pub headers_sha256: String,
}

impl Provenance {
    pub fn of(ckpt: &Checkpoint, source_as_given: &str, command: &str) -> Result<Self> {
        Ok(Provenance {
            command: command.to_string(),
            source: source_as_given.to_string(),
            config_sha256: ckpt.config_sha256()?,
            headers_sha256: ckpt.headers_sha256(),
        })
    }

    /// The `__metadata__` of every output shard. `format: pt` is what transformers requires
    /// to load a safetensors file.
    pub fn metadata(
        &self,
        factor: usize,
        ffn_factor: usize,
        variant: &str,
        snr_db: f64,
        seed: u64,
    ) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("format".into(), "pt".into());
        m.insert("hyperclone.version".into(), TOOL_VERSION.into());
        m.insert("hyperclone.source".into(), self.source.clone());
        m.insert(
            "hyperclone.source_config_sha256".into(),
            self.config_sha256.clone(),
        );
        m.insert(
            "hyperclone.source_headers_sha256".into(),
            self.headers_sha256.clone(),
        );
        m.insert("hyperclone.factor".into(), factor.to_string());
        m.insert("hyperclone.ffn_factor".into(), ffn_factor.to_string());
        m.insert("hyperclone.variant".into(), variant.into());
        m.insert("hyperclone.snr_db".into(), snr_db.to_string());
        m.insert("hyperclone.seed".into(), seed.to_string());
        m.insert("hyperclone.command".into(), self.command.clone());
        m
    }
}

/// The README.md model card of a clone.
pub fn model_card(ckpt: &Checkpoint, plan: &Plan, prov: &Provenance) -> String {
    let o = &plan.options;
    let cfg = &ckpt.config;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "---\nlibrary_name: transformers\ntags:\n- hyperclone\n- hypercloning\n---\n"
    );
    let _ = writeln!(s, "# HyperCloned from `{}`\n", prov.source);
    let _ = writeln!(
        s,
        "This checkpoint was grown with [hyperclone](https://arxiv.org/abs/2409.12903) {TOOL_VERSION}: every weight of the \
         source `{}` model was tiled so that this wider model computes the same function (each hidden vector \
         is {} stacked copies of the source's). Continue pre-training from here.\n",
        cfg.family.model_type, o.factor
    );
    let _ = writeln!(s, "| | source | clone |\n|---|---|---|");
    for c in &plan.changes {
        let _ = writeln!(s, "| `{}` | {} | {} |", c.key, c.before, c.after);
    }
    for comp in Component::ALL {
        let b = plan.params_before.get(&comp).copied().unwrap_or(0);
        let a = plan.params_after.get(&comp).copied().unwrap_or(0);
        let _ = writeln!(s, "| parameters: {} | {b} | {a} |", comp.name());
    }
    let before: u64 = plan.params_before.values().sum();
    let after: u64 = plan.params_after.values().sum();
    let _ = writeln!(s, "| parameters: total | {before} | {after} |\n");
    let _ = writeln!(s, "## Recipe\n");
    let _ = writeln!(s, "- factor (hidden, heads): {}", o.factor);
    let _ = writeln!(s, "- FFN factor: {}", o.ffn_factor);
    let _ = writeln!(s, "- variant: {}", o.variant.name());
    if o.variant.is_noisy() {
        let _ = writeln!(s, "- noise: {} dB SNR per block, seed {}", o.snr_db, o.seed);
    }
    let _ = writeln!(s, "- source config.json sha256: `{}`", prov.config_sha256);
    let _ = writeln!(
        s,
        "- source tensor headers sha256: `{}`",
        prov.headers_sha256
    );
    let _ = writeln!(s, "- command: `{}`\n", prov.command);
    let _ = writeln!(
        s,
        "The same source, flags and seed reproduce these files byte for byte. The recipe is also stored in the \
         `__metadata__` of every safetensors file (keys `hyperclone.*`)."
    );
    s
}
