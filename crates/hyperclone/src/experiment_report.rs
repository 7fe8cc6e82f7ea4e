//! The experiment's numbers: curves read from each run's metrics.jsonl, the paper's
//! comparisons (tokens to reach the random-init run's final loss, speedup, the early
//! forgetting rise right after growth, symmetry), and report.md / report.json.

use crate::experiment::Settings;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RunRole {
    Base,
    Clone,
    Random,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EvalPoint {
    pub step: u64,
    pub tokens: f64,
    pub val_loss: f64,
    pub symmetry: Option<f64>,
}

#[derive(Clone, Debug)]
pub struct Curve {
    pub name: String,
    pub role: RunRole,
    /// Validation evaluations in step order, the first at step 0.
    pub evals: Vec<EvalPoint>,
    /// (tokens, training loss) of every step.
    pub train: Vec<(f64, f64)>,
    /// Seconds spent in training steps (from each step's tokens/s; evaluation excluded).
    pub train_seconds: f64,
}

impl Curve {
    pub fn read(name: &str, role: RunRole, path: &Path) -> Result<Curve> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "run {name}: no {} (run the experiment without --report-only)",
                path.display()
            )
        })?;
        let mut curve = Curve {
            name: name.to_string(),
            role,
            evals: Vec::new(),
            train: Vec::new(),
            train_seconds: 0.0,
        };
        let mut last_tokens = 0.0;
        for (i, line) in text.lines().enumerate() {
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
            let tokens = v["tokens"].as_f64().unwrap_or(0.0);
            if let Some(loss) = v["val_loss"].as_f64() {
                curve.evals.push(EvalPoint {
                    step: v["step"].as_u64().unwrap_or(0),
                    tokens,
                    val_loss: loss,
                    symmetry: v["symmetry"].as_f64(),
                });
            }
            if let Some(loss) = v["train_loss"].as_f64() {
                curve.train.push((tokens, loss));
                if let Some(tps) = v["tokens_per_s"].as_f64().filter(|t| *t > 0.0) {
                    curve.train_seconds += (tokens - last_tokens) / tps;
                }
            }
            last_tokens = tokens;
        }
        if curve.evals.first().map(|e| e.step) != Some(0) || curve.evals.len() < 2 {
            bail!(
                "run {name}: {} has no evaluation at step 0 and at the end; rerun the experiment",
                path.display()
            );
        }
        Ok(curve)
    }

    pub fn final_loss(&self) -> f64 {
        self.evals.last().expect("checked in read").val_loss
    }

    pub fn tokens(&self) -> f64 {
        self.evals.last().expect("checked in read").tokens
    }
}

/// Tokens after which the validation loss first reaches `target`, interpolating linearly
/// between the two evaluations around the crossing; 0 when the run starts there.
pub fn tokens_to_reach(evals: &[EvalPoint], target: f64) -> Option<f64> {
    let first = evals.first()?;
    if first.val_loss <= target {
        return Some(first.tokens);
    }
    evals.windows(2).find_map(|w| {
        let (a, b) = (&w[0], &w[1]);
        (b.val_loss <= target).then(|| {
            let frac = (a.val_loss - target) / (a.val_loss - b.val_loss);
            a.tokens + frac * (b.tokens - a.tokens)
        })
    })
}

/// How far the validation loss rose above where the run started (a clone starts at the
/// small model's loss), where it peaked, and when it came back down.
#[derive(Clone, Debug, PartialEq)]
pub struct Dip {
    pub rise: f64,
    pub peak_tokens: f64,
    pub recovered_tokens: Option<f64>,
}

pub fn forgetting_dip(evals: &[EvalPoint]) -> Dip {
    let start = evals[0].val_loss;
    let (peak_at, peak) = evals.iter().enumerate().fold((0, start), |(i, m), (j, e)| {
        if e.val_loss > m {
            (j, e.val_loss)
        } else {
            (i, m)
        }
    });
    Dip {
        rise: peak - start,
        peak_tokens: evals[peak_at].tokens,
        recovered_tokens: if peak_at == 0 {
            Some(evals[0].tokens)
        } else {
            tokens_to_reach(&evals[peak_at..], start)
        },
    }
}

#[derive(Clone, Debug)]
pub struct RunSummary {
    pub name: String,
    pub role: RunRole,
    pub final_loss: f64,
    pub tokens_to_target: Option<f64>,
    pub speedup: Option<f64>,
    pub speedup_with_base: Option<f64>,
    pub dip: Dip,
    pub final_symmetry: Option<f64>,
    pub train_seconds: f64,
}

pub struct Report {
    pub settings: Value,
    pub models: Value,
    pub base: Curve,
    pub runs: Vec<Curve>,
    pub summaries: Vec<RunSummary>,
    /// The random-init run's final validation loss: what every clone is timed to reach.
    pub target: f64,
    pub random_tokens: f64,
}

impl Report {
    pub fn new(settings: &Settings, models: Value, base: Curve, runs: Vec<Curve>) -> Report {
        let random = runs.iter().find(|r| r.role == RunRole::Random);
        let target = random.map_or(f64::NAN, Curve::final_loss);
        // The random run's own crossing, not its length: a noisy curve may touch its final
        // value before the end, and timing every run by the same rule keeps ratios fair.
        let random_tokens = random
            .and_then(|r| tokens_to_reach(&r.evals, target))
            .unwrap_or(f64::NAN);
        let base_tokens = base.tokens();
        let summaries = runs
            .iter()
            .map(|r| {
                let reach = tokens_to_reach(&r.evals, target);
                RunSummary {
                    name: r.name.clone(),
                    role: r.role,
                    final_loss: r.final_loss(),
                    tokens_to_target: reach,
                    speedup: reach.filter(|t| *t > 0.0).map(|t| random_tokens / t),
                    speedup_with_base: reach.map(|t| {
                        let base = if r.role == RunRole::Clone {
                            base_tokens
                        } else {
                            0.0
                        };
                        random_tokens / (t + base)
                    }),
                    dip: forgetting_dip(&r.evals),
                    final_symmetry: r.evals.last().and_then(|e| e.symmetry),
                    train_seconds: r.train_seconds,
                }
            })
            .collect();
        Report {
            settings: settings.to_json(),
            models,
            base,
            runs,
            summaries,
            target,
            random_tokens,
        }
    }

    /// The large random-init model must end clearly below the small model, or growth has
    /// nothing to show.
    pub fn large_beats_small(&self) -> bool {
        self.target < self.base.final_loss() - 0.05
    }

    pub fn table_markdown(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "| run | final val loss | tokens to reach {:.3} | speedup | speedup incl. base tokens | early rise of val loss (peak at) | final symmetry | step time |",
            self.target
        );
        let _ = writeln!(t, "|---|---|---|---|---|---|---|---|");
        for s in &self.summaries {
            let _ = writeln!(
                t,
                "| {} | {:.4} | {} | {} | {} | {} | {} | {:.0} s |",
                s.name,
                s.final_loss,
                s.tokens_to_target.map_or("not reached".into(), mega),
                match (s.speedup, s.tokens_to_target) {
                    (Some(x), _) => format!("{x:.2}x"),
                    (None, Some(_)) => "starts below".into(),
                    (None, None) => "-".into(),
                },
                s.speedup_with_base
                    .map_or("-".into(), |x| format!("{x:.2}x")),
                if s.role == RunRole::Random {
                    "-".into()
                } else {
                    format!("{:+.4} ({})", s.dip.rise, mega(s.dip.peak_tokens))
                },
                s.final_symmetry.map_or("-".into(), |x| format!("{x:.4}")),
                s.train_seconds
            );
        }
        t
    }

    pub fn to_json(&self) -> Value {
        let curve = |c: &Curve| {
            json!({
                "name": c.name,
                "evals": c.evals.iter().map(|e| json!({
                    "step": e.step, "tokens": e.tokens, "val_loss": e.val_loss, "symmetry": e.symmetry,
                })).collect::<Vec<_>>(),
            })
        };
        json!({
            "settings": self.settings,
            "models": self.models,
            "base": {
                "final_val_loss": self.base.final_loss(),
                "tokens": self.base.tokens(),
                "train_seconds": self.base.train_seconds,
            },
            "target_val_loss": self.target,
            "random_init_tokens_to_target": self.random_tokens,
            "large_beats_small": self.large_beats_small(),
            "runs": self.summaries.iter().map(|s| json!({
                "name": s.name,
                "role": format!("{:?}", s.role).to_lowercase(),
                "final_val_loss": s.final_loss,
                "tokens_to_target": s.tokens_to_target,
                "speedup": s.speedup,
                "speedup_with_base_tokens": s.speedup_with_base,
                "early_rise": s.dip.rise,
                "early_rise_peak_tokens": s.dip.peak_tokens,
                "early_rise_recovered_tokens": s.dip.recovered_tokens,
                "final_symmetry": s.final_symmetry,
                "train_seconds": s.train_seconds,
            })).collect::<Vec<_>>(),
            "curves": std::iter::once(&self.base).chain(&self.runs).map(curve).collect::<Vec<_>>(),
        })
    }

    pub fn markdown(&self) -> String {
        let s = &self.settings;
        let m = &self.models;
        let mut md = String::new();
        let _ = writeln!(md, "# HyperCloning experiment\n");
        let _ = writeln!(
            md,
            "Small base: hidden {}, {} layers, {} heads, {} parameters, trained {} steps ({} tokens) from random init \
             to validation loss **{:.4}**. Large shape (x{}): hidden {}, {} heads, FFN {}, {} parameters.\n",
            m["small"]["hidden_size"],
            m["small"]["num_hidden_layers"],
            m["small"]["num_attention_heads"],
            m["small"]["parameters"],
            s["base_steps"],
            mega(self.base.tokens()),
            self.base.final_loss(),
            s["factor"],
            m["large"]["hidden_size"],
            m["large"]["num_attention_heads"],
            m["large"]["intermediate_size"],
            m["large"]["parameters"],
        );
        let _ = writeln!(
            md,
            "Every large run: {} steps of {} x {} tokens ({} tokens), AdamW lr {} (warmup {}, cosine to 10%), \
             weight decay 0.1, clipping 1.0, the same batches in the same order (seed {}). Validation: {} fixed \
             windows of {} tokens from held-out plays, every {} steps. The noisy clone has SNR {} dB; the \
             dropout run uses p = {} on attention and MLP outputs; the others train without dropout.\n",
            s["steps"],
            s["batch"],
            s["seq"],
            mega(self.random_tokens_total()),
            s["lr"],
            s["warmup"],
            s["seed"],
            s["eval_windows"],
            s["seq"],
            s["eval_every"],
            s["snr_db"],
            s["dropout_of_symmetric_dropout_run"],
        );
        md.push_str(&self.table_markdown());
        let _ = writeln!(
            md,
            "\nTarget = the random-init run's final validation loss. Speedup = tokens the random init needed / \
             tokens the clone needed (linear interpolation between evaluations); the second speedup also \
             charges each clone the {} tokens its small base was trained on. Early rise = the largest increase \
             of validation loss above the clone's starting point (the small model's loss, since growth keeps \
             the function). Symmetry = mean cosine between the two halves of every grown weight row (1 = the \
             copies are identical). Step time excludes evaluation.\n",
            mega(self.base.tokens())
        );
        md.push_str(&self.findings());
        md.push_str("\n![validation loss](val_loss.png)\n\n![symmetry](symmetry.png)\n");
        md
    }

    fn random_tokens_total(&self) -> f64 {
        self.runs.iter().map(Curve::tokens).fold(0.0, f64::max)
    }

    /// What the table says, in sentences.
    fn findings(&self) -> String {
        let mut f = String::from("## Findings\n\n");
        if !self.large_beats_small() {
            let _ = writeln!(
                f,
                "- **The large random-init model ({:.4}) does not end clearly below the small base ({:.4})**: \
                 at this budget width does not pay, so growth cannot show anything. Raise --steps.",
                self.target,
                self.base.final_loss()
            );
        } else {
            let _ = writeln!(
                f,
                "- The large random-init model ends at {:.4}, {:.4} below the small base: the extra width pays \
                 at this budget.",
                self.target,
                self.base.final_loss() - self.target
            );
        }
        let clones: Vec<&RunSummary> = self
            .summaries
            .iter()
            .filter(|s| s.role == RunRole::Clone)
            .collect();
        let reached: Vec<f64> = clones.iter().filter_map(|s| s.speedup).collect();
        if !reached.is_empty() {
            let lo = reached.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = reached.iter().cloned().fold(0.0, f64::max);
            let _ = writeln!(
                f,
                "- {} of {} clones reached the random-init final loss, {:.2}x to {:.2}x sooner (paper: 2-4x).",
                reached.len(),
                clones.len(),
                lo,
                hi
            );
        }
        for s in &clones {
            let diff = s.final_loss - self.target;
            let _ = writeln!(
                f,
                "- {}: final loss {:.4} ({} the random init by {:.4}); early rise {:+.4} peaking at {} tokens{}.",
                s.name,
                s.final_loss,
                if diff < 0.0 { "below" } else { "above" },
                diff.abs(),
                s.dip.rise,
                mega(s.dip.peak_tokens),
                s.final_symmetry.map_or(String::new(), |x| format!("; symmetry ends at {x:.4}"))
            );
        }
        f
    }

    pub fn write(&self, out: &Path) -> Result<()> {
        std::fs::write(out.join("report.md"), self.markdown())?;
        std::fs::write(
            out.join("report.json"),
            serde_json::to_string_pretty(&self.to_json())?,
        )?;
        Ok(())
    }
}

/// Token counts as "1.23M" or "51.2k".
pub fn mega(tokens: f64) -> String {
    if tokens >= 1e6 {
        format!("{:.2}M", tokens / 1e6)
    } else {
        format!("{:.1}k", tokens / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evals(points: &[(f64, f64)]) -> Vec<EvalPoint> {
        points
            .iter()
            .enumerate()
            .map(|(i, &(tokens, val_loss))| EvalPoint {
                step: i as u64,
                tokens,
                val_loss,
                symmetry: None,
            })
            .collect()
    }

    #[test]
    fn reach_interpolates_between_evaluations() {
        let e = evals(&[(0.0, 6.0), (100.0, 5.0), (200.0, 4.0), (300.0, 3.5)]);
        assert_eq!(tokens_to_reach(&e, 4.5), Some(150.0));
        assert_eq!(tokens_to_reach(&e, 4.0), Some(200.0));
        assert_eq!(tokens_to_reach(&e, 7.0), Some(0.0));
        assert_eq!(tokens_to_reach(&e, 3.0), None);
        // The first crossing counts, even if the curve goes back up later.
        let e = evals(&[(0.0, 6.0), (100.0, 4.0), (200.0, 5.0), (300.0, 3.0)]);
        assert_eq!(tokens_to_reach(&e, 4.5), Some(75.0));
    }

    #[test]
    fn dip_is_the_rise_above_the_start_and_when_it_recovers() {
        let e = evals(&[
            (0.0, 4.0),
            (100.0, 4.3),
            (200.0, 4.5),
            (300.0, 4.1),
            (400.0, 3.5),
        ]);
        let d = forgetting_dip(&e);
        assert!((d.rise - 0.5).abs() < 1e-12);
        assert_eq!(d.peak_tokens, 200.0);
        // From 4.1 at 300 to 3.5 at 400, 4.0 is crossed a sixth of the way.
        assert!((d.recovered_tokens.unwrap() - (300.0 + 100.0 / 6.0)).abs() < 1e-9);
        let d = forgetting_dip(&evals(&[(0.0, 4.0), (100.0, 3.0)]));
        assert_eq!(d.rise, 0.0);
        assert_eq!(d.recovered_tokens, Some(0.0));
    }
}
