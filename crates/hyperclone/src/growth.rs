//! Turning flags into core growth options, with errors that say what to type instead.

use crate::args::GrowthArgs;
use anyhow::{bail, Context, Result};
use hyperclone_core::config::ModelConfig;
use hyperclone_core::plan::factor_for;
use hyperclone_core::provenance::{model_card, Provenance};
use hyperclone_core::recipe::Recipe;
use hyperclone_core::write::{create_plain_file, write_clone, NoProgress, WriteEnv};
use hyperclone_core::{Checkpoint, DType, DepthMode, GrowthOptions, Plan, Variant};
use std::path::Path;
use std::sync::atomic::AtomicBool;

pub fn options(args: &GrowthArgs, cfg: &ModelConfig) -> Result<GrowthOptions> {
    if let Some(path) = &args.recipe {
        return Ok(Recipe::load(path)?.options);
    }
    let factor = match (&args.factor, args.hidden_size) {
        (Some(f), _) => parse_factor("--factor", f)?,
        (None, Some(d)) => factor_for("--hidden-size", cfg.hidden_size, d)?,
        (None, None) => bail!("give --factor N or --hidden-size D"),
    };
    let ffn_factor = match &args.ffn_factor {
        Some(m) => parse_factor("--ffn-factor", m)?,
        None => factor,
    };
    let num_layers = match (&args.depth_factor, args.num_hidden_layers) {
        (Some(k), _) => {
            let k = parse_factor("--depth-factor", k)?;
            Some(
                cfg.num_hidden_layers
                    .checked_mul(k)
                    .with_context(|| format!("--depth-factor {k}: the layer count overflows"))?,
            )
        }
        (None, l) => l,
    };
    if let Some(h) = args.num_attention_heads {
        let expected = cfg.num_attention_heads.saturating_mul(factor);
        if h != expected {
            bail!(
                "--num-attention-heads {h} would change head_dim from {} to {:.3}: HyperCloning keeps head_dim and \
                 grows the head count with the hidden size (expected {expected} heads for factor {factor})",
                cfg.head_dim,
                cfg.hidden_size as f64 * factor as f64 / h as f64
            );
        }
    }
    let variant = Variant::parse(&args.variant).context("unknown --variant")?;
    let dtype = match args.dtype.as_str() {
        "keep" => None,
        other => Some(DType::parse(other).with_context(|| format!("unknown --dtype {other}"))?),
    };
    let opts = GrowthOptions {
        factor,
        ffn_factor,
        variant,
        snr_db: args.snr_db,
        seed: args.seed,
        dtype,
        shard_size: parse_size(&args.shard_size)?,
        intermediate_size: args.intermediate_size,
        num_layers,
        depth_mode: DepthMode::parse(&args.depth_mode).context("unknown --depth-mode")?,
        keep_tied: args.keep_tied,
    };
    opts.validate()?;
    Ok(opts)
}

fn parse_factor(flag: &str, text: &str) -> Result<usize> {
    match text.trim().parse::<usize>() {
        Ok(0) => bail!("{flag} 0: the factor must be a whole number >= 1"),
        Ok(n) => Ok(n),
        Err(_) => bail!(
            "{flag} {text}: the factor must be a whole number >= 1 (HyperCloning grows by whole copies; \
             fractional growth is not supported)"
        ),
    }
}

/// "5GB" (10^9), "500MB", "2GiB" (2^30), "1048576".
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .with_context(|| format!("--shard-size {text}: expected a size like 5GB or 500MiB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "tb" | "t" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        _ => bail!("--shard-size {text}: unknown unit `{unit}` (use B, KB, MB, GB, KiB, MiB, GiB)"),
    };
    let bytes = (value * mult).round();
    if bytes < 1.0 {
        bail!("--shard-size {text}: must be at least one byte");
    }
    Ok(bytes as u64)
}

/// Grows `src` into `dst` without progress output (small models, inside other commands);
/// `source` and `command` go into the provenance. Returns the source and the plan it followed.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("1.5MB").unwrap(), 1_500_000);
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn factors() {
        assert_eq!(parse_factor("--factor", "3").unwrap(), 3);
        assert!(parse_factor("--factor", "0")
            .unwrap_err()
            .to_string()
            .contains(">= 1"));
        assert!(parse_factor("--factor", "1.5")
            .unwrap_err()
            .to_string()
            .contains("whole number"));
    }
}
