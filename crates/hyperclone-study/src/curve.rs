//! One run's curve, read from its metrics.jsonl, and the measurements the study takes of
//! curves: tokens to reach a loss, and the early forgetting rise right after growth.
//! report.rs compares them across arms, seeds and bases.

use crate::Result;
use hyperclone_nn::Context;
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RunRole {
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
    /// Validation evaluations in step order, the first at step 0.
    pub evals: Vec<EvalPoint>,
    /// (tokens, training loss) of every step.
    pub train: Vec<(f64, f64)>,
    /// Seconds spent in training steps (from each step's tokens/s; evaluation excluded).
    pub train_seconds: f64,
}

impl Curve {
    pub fn read(name: &str, path: &Path) -> Result<Curve> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "run {name}: no {} (run the experiment without --report-only)",
                path.display()
            )
        })?;
        let mut curve = Curve {
            name: name.to_string(),
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

    /// A curve from its compact CSV (write_compact: every evaluation, exact, and every
    /// n-th step's training loss); `train_seconds` is not in the CSV and comes from the
    /// record's state. The same checks as [`Curve::read`].
    pub fn read_compact(name: &str, path: &Path, train_seconds: f64) -> Result<Curve> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("run {name}: reading {}", path.display()))?;
        let mut curve = Curve {
            name: name.to_string(),
            evals: Vec::new(),
            train: Vec::new(),
            train_seconds,
        };
        for (i, line) in text.lines().enumerate().skip(1) {
            let cells: Vec<&str> = line.split(',').collect();
            let bad = || {
                hyperclone_nn::NnError::Input(format!(
                    "{} line {}: not a compact curve row",
                    path.display(),
                    i + 1
                ))
            };
            if cells.len() != 6 {
                return Err(bad());
            }
            let num = |c: &str| -> Result<Option<f64>> {
                if c.is_empty() {
                    Ok(None)
                } else {
                    c.parse::<f64>().map(Some).map_err(|_| bad())
                }
            };
            let step: u64 = cells[0].parse().map_err(|_| bad())?;
            let tokens = num(cells[1])?.unwrap_or(0.0);
            if let Some(loss) = num(cells[4])? {
                curve.evals.push(EvalPoint {
                    step,
                    tokens,
                    val_loss: loss,
                    symmetry: num(cells[5])?,
                });
            }
            if let Some(loss) = num(cells[3])? {
                curve.train.push((tokens, loss));
            }
        }
        if curve.evals.first().map(|e| e.step) != Some(0) || curve.evals.len() < 2 {
            bail!(
                "run {name}: {} has no evaluation at step 0 and at the end",
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

/// Writes a run's metrics.jsonl as a compact CSV (step, tokens, lr, train_loss, val_loss,
/// symmetry): every evaluation, and the training loss of every `every`-th step, so a long
/// study's raw curves stay small enough to commit. Empty cells are absent values.
pub fn write_compact(metrics: &Path, dst: &Path, every: u64) -> Result<()> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("reading {}", metrics.display()))?;
    let mut csv = String::from("step,tokens,lr,train_loss,val_loss,symmetry\n");
    let cell = |v: &Value| v.as_f64().map_or(String::new(), |x| format!("{x}"));
    for (i, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", metrics.display(), i + 1))?;
        let step = v["step"].as_u64().unwrap_or(0);
        if v["val_loss"].is_null() && !step.is_multiple_of(every.max(1)) {
            continue;
        }
        csv.push_str(&format!(
            "{step},{},{},{},{},{}\n",
            v["tokens"].as_u64().unwrap_or(0),
            cell(&v["lr"]),
            cell(&v["train_loss"]),
            cell(&v["val_loss"]),
            cell(&v["symmetry"]),
        ));
    }
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(dst, csv).with_context(|| format!("writing {}", dst.display()))?;
    Ok(())
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

    #[test]
    fn the_compact_curve_keeps_evaluations_and_every_nth_step() {
        let dir = std::env::temp_dir().join(format!("hc-compact-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let m = dir.join("metrics.jsonl");
        std::fs::write(
            &m,
            concat!(
                "{\"step\":0,\"tokens\":0,\"val_loss\":8.0}\n",
                "{\"step\":1,\"tokens\":10,\"train_loss\":7.5,\"lr\":0.001}\n",
                "{\"step\":2,\"tokens\":20,\"train_loss\":7.0,\"lr\":0.002}\n",
                "{\"step\":3,\"tokens\":30,\"train_loss\":6.5,\"lr\":0.002,\"val_loss\":6.9,\"symmetry\":0.5}\n",
            ),
        )
        .unwrap();
        let out = dir.join("a/b.csv");
        write_compact(&m, &out, 2).unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "step,tokens,lr,train_loss,val_loss,symmetry\n0,0,,,8,\n2,20,0.002,7,,\n3,30,0.002,6.5,6.9,0.5\n"
        );
        // Read back (a study continued from its record): every evaluation exactly.
        let full = Curve::read("x", &m).unwrap();
        let compact = Curve::read_compact("x", &out, 1.5).unwrap();
        assert_eq!(compact.evals, full.evals);
        assert_eq!(compact.train, vec![(20.0, 7.0), (30.0, 6.5)]);
        assert_eq!(compact.train_seconds, 1.5);
        std::fs::write(
            &out,
            "step,tokens,lr,train_loss,val_loss,symmetry\n0,x,,,8,\n",
        )
        .unwrap();
        assert!(Curve::read_compact("x", &out, 0.0).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
