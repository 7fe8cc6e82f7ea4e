//! The study's numbers: for each clone arm and seed, the tokens it needs to reach the same
//! seed's random-init final loss (the paper's speedup), the same charging the base's
//! training compute, the speedup at every loss level, the early rise after growth,
//! symmetry, final-loss differences with their seed spread; the learning-rate screen; the
//! speedup against the base's budget; report.md and report.json with the `headline`.

use crate::curve::{forgetting_dip, mega, tokens_to_reach, Curve, RunRole};
use crate::runs::StudyRuns;
use crate::settings::{Arm, Settings};
use crate::Result;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// One clone run measured against the same seed's random init.
#[derive(Clone, Debug)]
pub struct Paired {
    pub seed: u64,
    pub final_loss: f64,
    /// The random init's final loss for this seed: the target.
    pub target: f64,
    pub random_tokens: f64,
    pub clone_tokens: Option<f64>,
    /// random_tokens / clone_tokens; infinite when the clone starts at or below the target.
    pub speedup: Option<f64>,
    /// random_tokens / (clone_tokens + base tokens x N_small / N_large): the base's training
    /// compute charged at 6N FLOPs per token.
    pub speedup_charging_base: Option<f64>,
    pub rise: f64,
    pub rise_peak_tokens: f64,
    pub final_symmetry: Option<f64>,
}

fn pair(clone: &Curve, random: &Curve, seed: u64, base_compute_tokens: f64) -> Paired {
    let target = random.final_loss();
    // The random run's own first crossing, not its length: a noisy curve may touch its
    // final value early, and timing every run by the same rule keeps the ratio fair.
    let random_tokens = tokens_to_reach(&random.evals, target).unwrap_or(random.tokens());
    let clone_tokens = tokens_to_reach(&clone.evals, target);
    let dip = forgetting_dip(&clone.evals);
    Paired {
        seed,
        final_loss: clone.final_loss(),
        target,
        random_tokens,
        clone_tokens,
        speedup: clone_tokens.map(|t| {
            if t > 0.0 {
                random_tokens / t
            } else {
                f64::INFINITY
            }
        }),
        speedup_charging_base: clone_tokens.map(|t| random_tokens / (t + base_compute_tokens)),
        rise: dip.rise,
        rise_peak_tokens: dip.peak_tokens,
        final_symmetry: clone.evals.last().and_then(|e| e.symmetry),
    }
}

/// Tokens of the base's training, in large-model token equivalents (6N FLOPs per token).
fn base_compute_tokens(base: &Curve, models: &Value) -> f64 {
    let small = models["small"]["parameters"].as_f64();
    let large = models["large"]["parameters"].as_f64();
    match (small, large) {
        (Some(s), Some(l)) if l > 0.0 => base.tokens() * s / l,
        _ => f64::NAN,
    }
}

/// The next learning rate to screen when the best of `results` ((lr, loss), any order) sits
/// at the grid's edge: half the smallest or twice the largest; None when it is inside.
pub fn edge_extension(results: &[(f64, f64)]) -> Option<f64> {
    let finite: Vec<&(f64, f64)> = results.iter().filter(|r| r.1.is_finite()).collect();
    let best = finite.iter().min_by(|a, b| a.1.total_cmp(&b.1))?.0;
    let lo = results.iter().map(|r| r.0).fold(f64::INFINITY, f64::min);
    let hi = results
        .iter()
        .map(|r| r.0)
        .fold(f64::NEG_INFINITY, f64::max);
    if results.len() < 2 {
        None
    } else if best == lo {
        Some(lo / 2.0)
    } else if best == hi {
        Some(hi * 2.0)
    } else {
        None
    }
}

/// The (lr, loss) with the lowest finite loss.
pub fn best_of(results: &[(f64, f64)]) -> Option<(f64, f64)> {
    results
        .iter()
        .copied()
        .filter(|r| r.1.is_finite())
        .min_by(|a, b| a.1.total_cmp(&b.1))
}

/// Each arm's screen winner: (lr, final validation loss) of its lowest finished screen run.
pub fn best_lrs(runs: &StudyRuns, s: &Settings) -> BTreeMap<&'static str, (f64, f64)> {
    s.arms
        .iter()
        .filter_map(|arm| {
            runs.screen
                .iter()
                .filter(|((name, _), c)| *name == arm.name() && c.final_loss().is_finite())
                .map(|((_, lr), c)| (f64::from_bits(*lr), c.final_loss()))
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map(|best| (arm.name(), best))
        })
        .collect()
}

/// The clone arm that is grown from every base: the lowest screen loss at its best lr (the
/// screen selects; the seeded final runs measure).
pub fn chosen_clone_arm(runs: &StudyRuns, s: &Settings) -> Option<Arm> {
    let best = best_lrs(runs, s);
    s.arms
        .iter()
        .filter(|a| a.role() == RunRole::Clone)
        .filter_map(|a| best.get(a.name()).map(|(_, loss)| (*a, *loss)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(a, _)| a)
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// Sample standard deviation (0 for one value).
fn sd(xs: &[f64]) -> f64 {
    if xs.len() < 2 {
        return 0.0;
    }
    let m = mean(xs);
    (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (xs.len() - 1) as f64).sqrt()
}

fn fmt_speedup(x: Option<f64>) -> String {
    match x {
        Some(x) if x.is_infinite() => "starts below".into(),
        Some(x) => format!("{x:.2}x"),
        None => "not reached".into(),
    }
}

fn json_speedup(x: Option<f64>) -> Value {
    match x {
        Some(x) if x.is_finite() => json!(x),
        Some(_) => json!("starts below"),
        None => Value::Null,
    }
}

/// One arm's final runs, summarised over seeds.
pub struct ArmSummary {
    pub arm: Arm,
    pub lr: Option<f64>,
    pub finals: Vec<(u64, f64)>,
    pub paired: Vec<Paired>,
}

pub struct Report {
    pub settings: Settings,
    pub settings_json: Value,
    pub models: Value,
    pub corpus: Value,
    pub runs: StudyRuns,
    pub arms: Vec<ArmSummary>,
    /// The best clone arm from every base budget, ascending.
    pub budget: Vec<BudgetRow>,
}

/// The best clone arm grown from one base budget, paired with the random inits.
pub struct BudgetRow {
    pub steps: u64,
    pub base_loss: f64,
    pub base_tokens: f64,
    pub arm: Arm,
    /// The peak lr its runs used: screened from this base.
    pub lr: Option<f64>,
    pub paired: Vec<Paired>,
}

impl BudgetRow {
    /// The clones start at or below every random init's final loss: the random init never
    /// catches up with this base within the budget, so a speedup in tokens is unbounded and
    /// only the one charging the base's compute means anything.
    pub fn starts_below(&self) -> bool {
        !self.paired.is_empty() && self.paired.iter().all(|p| self.base_loss <= p.target)
    }
}

impl Report {
    pub fn new(s: &Settings, models: Value, corpus: Value, runs: StudyRuns) -> Report {
        let top_steps = s.largest_base();
        let top_compute = runs
            .bases
            .get(&top_steps)
            .map_or(f64::NAN, |b| base_compute_tokens(b, &models));
        let screen_best = best_lrs(&runs, s);
        let best_lr = |arm: &Arm| screen_best.get(arm.name()).map(|b| b.0);
        let arms = s
            .arms
            .iter()
            .map(|arm| {
                let finals: Vec<(u64, f64)> = s
                    .seeds
                    .iter()
                    .filter_map(|&seed| {
                        runs.finals
                            .get(&(arm.name(), seed))
                            .map(|c| (seed, c.final_loss()))
                    })
                    .collect();
                let paired = if arm.role() == RunRole::Clone {
                    s.seeds
                        .iter()
                        .filter_map(|&seed| {
                            let c = runs.finals.get(&(arm.name(), seed))?;
                            let r = runs.finals.get(&(Arm::Random.name(), seed))?;
                            Some(pair(c, r, seed, top_compute))
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                ArmSummary {
                    arm: *arm,
                    lr: best_lr(arm),
                    finals,
                    paired,
                }
            })
            .collect();
        let best_arm = chosen_clone_arm(&runs, s);
        let mut budget = Vec::new();
        if let Some(arm) = best_arm {
            for &steps in &s.base_steps {
                let Some(base) = runs.bases.get(&steps) else {
                    continue;
                };
                let compute = base_compute_tokens(base, &models);
                let paired: Vec<Paired> = s
                    .seeds
                    .iter()
                    .filter_map(|&seed| {
                        let c = if steps == top_steps {
                            runs.finals.get(&(arm.name(), seed))?
                        } else {
                            runs.budget.get(&(steps, arm.name(), seed))?
                        };
                        let r = runs.finals.get(&(Arm::Random.name(), seed))?;
                        Some(pair(c, r, seed, compute))
                    })
                    .collect();
                let lr = if steps == top_steps {
                    best_lr(&arm)
                } else {
                    let results: Vec<(f64, f64)> = runs
                        .budget_screen
                        .iter()
                        .filter(|((b, a, _), _)| *b == steps && *a == arm.name())
                        .map(|((_, _, lr), loss)| (f64::from_bits(*lr), *loss))
                        .collect();
                    best_of(&results).map(|b| b.0)
                };
                budget.push(BudgetRow {
                    steps,
                    base_loss: base.final_loss(),
                    base_tokens: base.tokens(),
                    arm,
                    lr,
                    paired,
                });
            }
        }
        Report {
            settings: s.clone(),
            settings_json: s.to_json(),
            models,
            corpus,
            runs,
            arms,
            budget,
        }
    }

    fn random_finals(&self) -> Vec<f64> {
        self.arms
            .iter()
            .find(|a| a.arm == Arm::Random)
            .map(|a| a.finals.iter().map(|f| f.1).collect())
            .unwrap_or_default()
    }

    fn top_base(&self) -> Option<&Curve> {
        self.runs.bases.get(&self.settings.largest_base())
    }

    fn large_budget_tokens(&self) -> f64 {
        (self.settings.steps * self.settings.tokens_per_step()) as f64
    }

    fn corpus_train_tokens(&self) -> Option<f64> {
        self.corpus["train_tokens"].as_f64()
    }

    /// The large run of `arm` from the base of `steps` steps with `seed`.
    pub fn run(&self, steps: u64, arm: Arm, seed: u64) -> Option<&Curve> {
        if steps == self.settings.largest_base() {
            self.runs.finals.get(&(arm.name(), seed))
        } else {
            self.runs.budget.get(&(steps, arm.name(), seed))
        }
    }

    /// Speedup at each loss level between the random init's mean final loss and the base's
    /// loss, for `arm` grown from the base of `steps` steps: mean over seeds of random tokens
    /// / clone tokens to reach it. A level is what the random init reaches at a shorter
    /// budget, so this is the speedup map over large-run budgets.
    pub fn speedup_curve(&self, steps: u64, arm: Arm) -> Vec<(f64, f64)> {
        let (Some(base), false) = (self.runs.bases.get(&steps), self.random_finals().is_empty())
        else {
            return Vec::new();
        };
        let lo = mean(&self.random_finals());
        let hi = base.final_loss();
        if hi.is_nan() || lo.is_nan() || hi <= lo {
            return Vec::new();
        }
        let seeds: Vec<u64> = self
            .settings
            .seeds
            .iter()
            .copied()
            .filter(|&seed| self.run(steps, arm, seed).is_some())
            .collect();
        if seeds.is_empty() {
            return Vec::new();
        }
        (0..24)
            .filter_map(|i| {
                // Levels strictly below the base loss: at the base loss itself a clone "reaches"
                // it within its first evaluation and the ratio says nothing.
                let level = lo + (hi - lo) * i as f64 / 24.0;
                let ratios: Vec<f64> = seeds
                    .iter()
                    .filter_map(|&seed| {
                        let c = self.run(steps, arm, seed)?;
                        let r = self.runs.finals.get(&(Arm::Random.name(), seed))?;
                        let tr = tokens_to_reach(&r.evals, level)?;
                        let tc = tokens_to_reach(&c.evals, level)?;
                        (tc > 0.0).then(|| tr / tc)
                    })
                    .collect();
                (ratios.len() == seeds.len()).then(|| (level, mean(&ratios)))
            })
            .collect()
    }

    /// The setting the headline reports: the largest base from which the best clone arm has
    /// to learn to reach the random init (does not start below it) and has finished seeds;
    /// the largest base when every budget starts below (the report then says so).
    pub fn headline_row(&self) -> Option<&BudgetRow> {
        let finished = || self.budget.iter().filter(|r| !r.paired.is_empty());
        finished()
            .filter(|r| !r.starts_below())
            .max_by_key(|r| (r.paired.len() == self.settings.seeds.len(), r.steps))
            .or_else(|| finished().max_by_key(|r| r.steps))
    }

    pub fn headline(&self) -> Value {
        let Some(row) = self.headline_row() else {
            return Value::Null;
        };
        let lr = row.lr;
        let speedups: Vec<Value> = row.paired.iter().map(|p| json_speedup(p.speedup)).collect();
        let charged: Vec<Value> = row
            .paired
            .iter()
            .map(|p| json_speedup(p.speedup_charging_base))
            .collect();
        let every_2x = !row.paired.is_empty()
            && row
                .paired
                .iter()
                .all(|p| p.speedup.is_some_and(|x| x.is_finite() && x >= 2.0));
        json!({
            "variant": row.arm.name(),
            "lr": lr,
            "base_steps": row.steps,
            "seeds": row.paired.iter().map(|p| p.seed).collect::<Vec<_>>(),
            "speedups": speedups,
            "speedups_charging_base": charged,
            "reaches_2x_on_every_seed": every_2x,
            "clones_start_below_target": row.starts_below(),
            "base_tokens": row.base_tokens,
            "base_val_loss": row.base_loss,
            "large_budget_tokens": self.large_budget_tokens(),
            "corpus_train_tokens": self.corpus_train_tokens(),
            "corpus_passes_of_a_large_run": self.corpus_train_tokens().map(|c| self.large_budget_tokens() / c),
        })
    }

    pub fn headline_sentence(&self) -> String {
        let Some(row) = self.headline_row() else {
            return "headline: pending (no clone arm has finished next to the random init)".into();
        };
        let per_seed: Vec<String> = row.paired.iter().map(|p| fmt_speedup(p.speedup)).collect();
        let charged: Vec<String> = row
            .paired
            .iter()
            .map(|p| fmt_speedup(p.speedup_charging_base))
            .collect();
        let seeds: Vec<u64> = row.paired.iter().map(|p| p.seed).collect();
        if row.starts_below() {
            return format!(
                "headline: every base budget starts at or below the random init's final loss, so the token \
                 speedup is unbounded: {} grown from the {}-token base is already there at step 0 (seeds {seeds:?}); \
                 charging the base's compute it is {} sooner",
                row.arm.name(),
                mega(row.base_tokens),
                charged.join(", "),
            );
        }
        let verdict = if self.headline()["reaches_2x_on_every_seed"] == json!(true) {
            "the paper's >= 2x holds on every seed"
        } else {
            "the paper's >= 2x on every seed is NOT reproduced"
        };
        format!(
            "headline: {} grown from the {}-token base reaches the random init's final loss {} sooner \
             (seeds {seeds:?}; {} charging the base's compute): {verdict}",
            row.arm.name(),
            mega(row.base_tokens),
            per_seed.join(", "),
            charged.join(", "),
        )
    }

    pub fn table_markdown(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "| arm | lr | final val loss (mean ± sd) | vs random init | tokens to random's final loss | speedup per seed | charging the base | early rise (peak at) | final symmetry |"
        );
        let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|");
        let random = self.random_finals();
        for a in &self.arms {
            let losses: Vec<f64> = a.finals.iter().map(|f| f.1).collect();
            let lr = a.lr.map_or("-".into(), |l| format!("{l:e}"));
            if losses.is_empty() {
                let _ = writeln!(t, "| {} | {lr} | pending | | | | | | |", a.arm.name());
                continue;
            }
            let loss = format!(
                "{:.4} ± {:.4} (n={})",
                mean(&losses),
                sd(&losses),
                losses.len()
            );
            if a.arm == Arm::Random {
                let _ = writeln!(
                    t,
                    "| {} | {lr} | {loss} | - | {} | 1x | - | - | - |",
                    a.arm.name(),
                    mega(self.large_budget_tokens())
                );
                continue;
            }
            let diffs: Vec<f64> = a.paired.iter().map(|p| p.final_loss - p.target).collect();
            let reach: Vec<String> = a
                .paired
                .iter()
                .map(|p| p.clone_tokens.map_or("-".into(), mega))
                .collect();
            let rises: Vec<f64> = a.paired.iter().map(|p| p.rise).collect();
            let syms: Vec<f64> = a.paired.iter().filter_map(|p| p.final_symmetry).collect();
            let _ = writeln!(
                t,
                "| {} | {lr} | {loss} | {} | {} | {} | {} | {} | {} |",
                a.arm.name(),
                if diffs.is_empty() || random.is_empty() {
                    "-".into()
                } else {
                    format!("{:+.4} ± {:.4}", mean(&diffs), sd(&diffs))
                },
                reach.join(", "),
                a.paired
                    .iter()
                    .map(|p| fmt_speedup(p.speedup))
                    .collect::<Vec<_>>()
                    .join(", "),
                a.paired
                    .iter()
                    .map(|p| fmt_speedup(p.speedup_charging_base))
                    .collect::<Vec<_>>()
                    .join(", "),
                if rises.is_empty() {
                    "-".into()
                } else {
                    format!(
                        "{:+.4} ({})",
                        mean(&rises),
                        mega(mean(
                            &a.paired
                                .iter()
                                .map(|p| p.rise_peak_tokens)
                                .collect::<Vec<_>>()
                        ))
                    )
                },
                if syms.is_empty() {
                    "-".into()
                } else {
                    format!("{:.4}", mean(&syms))
                },
            );
        }
        t
    }

    fn screen_markdown(&self) -> String {
        let mut lrs: Vec<f64> = self
            .runs
            .screen
            .keys()
            .map(|(_, lr)| f64::from_bits(*lr))
            .collect();
        lrs.sort_by(f64::total_cmp);
        lrs.dedup();
        let mut t = String::new();
        let _ = write!(t, "| arm |");
        for lr in &lrs {
            let _ = write!(t, " lr {lr:e} |");
        }
        let _ = writeln!(t, " chosen |");
        let _ = writeln!(t, "|---|{}---|", "---|".repeat(lrs.len()));
        for a in &self.arms {
            let _ = write!(t, "| {} |", a.arm.name());
            for lr in &lrs {
                let cell = self
                    .runs
                    .screen
                    .get(&(a.arm.name(), lr.to_bits()))
                    .map_or("".into(), |c| format!("{:.4}", c.final_loss()));
                let _ = write!(t, " {cell} |");
            }
            let _ = writeln!(t, " {} |", a.lr.map_or("-".into(), |l| format!("{l:e}")));
        }
        t
    }

    fn budget_markdown(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(t, "| base steps | base tokens | base val loss | arm | lr (screened from this base) | seeds | speedup per seed | charging the base | final loss vs random init |");
        let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|");
        for row in &self.budget {
            let join = |f: &dyn Fn(&Paired) -> String| {
                row.paired.iter().map(f).collect::<Vec<_>>().join(", ")
            };
            let diffs: Vec<f64> = row.paired.iter().map(|p| p.final_loss - p.target).collect();
            let _ = writeln!(
                t,
                "| {} | {} | {:.4} | {} | {} | {} | {} | {} | {} |",
                row.steps,
                mega(row.base_tokens),
                row.base_loss,
                row.arm.name(),
                row.lr.map_or("-".into(), |l| format!("{l:e}")),
                row.paired.len(),
                if row.paired.is_empty() {
                    "pending".into()
                } else {
                    join(&|p| fmt_speedup(p.speedup))
                },
                join(&|p| fmt_speedup(p.speedup_charging_base)),
                if diffs.is_empty() {
                    "-".into()
                } else {
                    format!("{:+.4} ± {:.4}", mean(&diffs), sd(&diffs))
                },
            );
        }
        t
    }

    pub fn to_json(&self) -> Value {
        let curve = |c: &Curve| {
            json!({
                "name": c.name,
                "tokens": c.tokens(),
                "final_val_loss": c.final_loss(),
                "train_seconds": c.train_seconds,
                "evals": c.evals.iter().map(|e| json!({
                    "step": e.step, "tokens": e.tokens, "val_loss": e.val_loss, "symmetry": e.symmetry,
                })).collect::<Vec<_>>(),
            })
        };
        let paired = |p: &Paired| {
            json!({
                "seed": p.seed,
                "final_val_loss": p.final_loss,
                "target_val_loss": p.target,
                "random_tokens_to_target": p.random_tokens,
                "tokens_to_target": p.clone_tokens,
                "speedup": json_speedup(p.speedup),
                "speedup_charging_base": json_speedup(p.speedup_charging_base),
                "early_rise": p.rise,
                "early_rise_peak_tokens": p.rise_peak_tokens,
                "final_symmetry": p.final_symmetry,
            })
        };
        json!({
            "headline": self.headline(),
            "settings": self.settings_json,
            "models": self.models,
            "corpus": self.corpus,
            "bases": self.runs.bases.iter().map(|(steps, c)| json!({"steps": steps, "curve": curve(c)})).collect::<Vec<_>>(),
            "screen": self.runs.screen.iter().map(|((arm, lr), c)| json!({
                "arm": arm, "lr": f64::from_bits(*lr), "final_val_loss": c.final_loss(),
            })).collect::<Vec<_>>(),
            "arms": self.arms.iter().map(|a| json!({
                "arm": a.arm.name(),
                "lr": a.lr,
                "final_val_loss": a.finals.iter().map(|f| json!({"seed": f.0, "loss": f.1})).collect::<Vec<_>>(),
                "paired_with_random_init": a.paired.iter().map(paired).collect::<Vec<_>>(),
                "speedup_by_loss_level": self.speedup_curve(self.settings.largest_base(), a.arm).iter().map(|(l, x)| json!({"loss": l, "speedup": x})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "speedup_vs_base_budget": self.budget.iter().map(|r| json!({
                "base_steps": r.steps, "base_tokens": r.base_tokens, "base_val_loss": r.base_loss,
                "arm": r.arm.name(), "lr": r.lr, "clones_start_below_target": r.starts_below(),
                "screen": self.runs.budget_screen.iter().filter(|((b, a, _), _)| *b == r.steps && *a == r.arm.name())
                    .map(|((_, _, lr), loss)| json!({"lr": f64::from_bits(*lr), "final_val_loss": loss})).collect::<Vec<_>>(),
                "runs": r.paired.iter().map(paired).collect::<Vec<_>>(),
                "speedup_by_loss_level": self.speedup_curve(r.steps, r.arm).iter().map(|(l, x)| json!({"loss": l, "speedup": x})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "curves": self.runs.finals.iter().map(|((arm, seed), c)| json!({
                "arm": arm, "seed": seed, "curve": curve(c),
            })).collect::<Vec<_>>(),
        })
    }

    pub fn markdown(&self) -> String {
        let s = &self.settings;
        let mut m = String::new();
        let _ = writeln!(m, "# Convergence study: HyperCloning on one CPU machine\n");
        let _ = writeln!(m, "**{}**\n", self.headline_sentence());
        let small = &self.models["small"];
        let large = &self.models["large"];
        let _ = writeln!(
            m,
            "Small Llama: hidden {}, {} layers, {} parameters. Large (x{}): hidden {}, {} parameters. \
             Bases trained for {:?} steps; every large run {} steps x {} tokens = {}; learning rates screened \
             for {} steps from the largest base on {:?}; final runs on seeds {:?}. Schedule: linear warmup ({} steps), \
             stable, linear decay over the last {:.0}% to {:.0}% of the peak (WSD); AdamW (0.9, 0.95), weight decay 0.1, \
             clipping 1.0; clones {} their base's AdamW moments.\n",
            small["hidden_size"], small["num_hidden_layers"], small["parameters"], s.factor,
            large["hidden_size"], large["parameters"],
            s.base_steps, s.steps, s.tokens_per_step(), mega(self.large_budget_tokens()),
            s.screen_steps, s.lrs, s.seeds, s.warmup, s.decay_frac * 100.0, s.min_lr_frac * 100.0,
            if s.carry_optimizer { "carry (grown with the weights' tiling)" } else { "do not carry" },
        );
        if let Some(train) = self.corpus_train_tokens() {
            let _ = writeln!(
                m,
                "Corpus: {} training tokens, {} validation tokens (whole held-out documents); a large run reads {:.2} of the training split, its base {:.2}.\n",
                mega(train),
                self.corpus["val_tokens"].as_f64().map_or("?".into(), mega),
                self.large_budget_tokens() / train,
                self.top_base().map_or(f64::NAN, |b| b.tokens() / train),
            );
        }
        let _ = writeln!(m, "## Final runs\n\nEach clone seed is paired with the random init of the same seed (data order, init, noise): the target is that run's final validation loss. \"Charging the base\" adds the base's training compute in large-model tokens (6N FLOPs per token).\n");
        m.push_str(&self.table_markdown());
        let _ = writeln!(m, "\n![validation loss](val_loss.png)\n\n![speedup by loss level](speedup.png)\n\n![symmetry](symmetry.png)\n");
        let _ = writeln!(
            m,
            "## Learning-rate screen (final validation loss after {} steps, seed {})\n",
            s.screen_steps, s.seeds[0]
        );
        m.push_str(&self.screen_markdown());
        let _ = writeln!(m, "\n## Speedup vs base budget\n");
        if self.budget.is_empty() {
            let _ = writeln!(m, "pending\n");
        } else {
            m.push_str(&self.budget_markdown());
        }
        m.push('\n');
        m.push_str(&self.findings());
        m
    }

    /// What the tables say, in sentences.
    fn findings(&self) -> String {
        let mut f = String::from("## Findings\n\n");
        let random = self.random_finals();
        if let (Some(base), false) = (self.top_base(), random.is_empty()) {
            let r = mean(&random);
            let gap = base.final_loss() - r;
            let _ = writeln!(
                f,
                "- The large random init ends at {r:.4} (sd {:.4} over {} seeds), {} the largest base's {:.4} by {:.4}{}",
                sd(&random),
                random.len(),
                if gap > 0.0 { "below" } else { "above" },
                base.final_loss(),
                gap.abs(),
                if gap > 0.05 {
                    ": the extra width pays within the budget, so there is something for growth to speed up."
                } else {
                    ": at this budget the large model does not beat the small one, so a speedup is not meaningful; raise --steps."
                }
            );
        }
        for a in self.arms.iter().filter(|a| !a.paired.is_empty()) {
            let sp: Vec<String> = a.paired.iter().map(|p| fmt_speedup(p.speedup)).collect();
            let diffs: Vec<f64> = a.paired.iter().map(|p| p.final_loss - p.target).collect();
            let rises: Vec<f64> = a.paired.iter().map(|p| p.rise).collect();
            let _ = writeln!(
                f,
                "- {} (lr {}): speedup {} ; final loss {:+.4} ± {:.4} against the random init; early rise {:+.4}{}.",
                a.arm.name(),
                a.lr.map_or("-".into(), |l| format!("{l:e}")),
                sp.join(", "),
                mean(&diffs),
                sd(&diffs),
                mean(&rises),
                a.paired
                    .first()
                    .and_then(|p| p.final_symmetry)
                    .map_or(String::new(), |x| format!("; symmetry ends at {x:.4}"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grid_grows_past_an_edge_until_the_best_is_inside() {
        let r = [(1e-3, 4.6), (2e-3, 4.7), (5e-4, 4.5)];
        assert_eq!(edge_extension(&r), Some(2.5e-4), "best at the low edge");
        let r = [(1e-3, 5.8), (2e-3, 5.6), (4e-3, 5.5)];
        assert_eq!(edge_extension(&r), Some(8e-3), "best at the high edge");
        let r = [(1e-3, 5.8), (2e-3, 5.4), (4e-3, 5.5)];
        assert_eq!(edge_extension(&r), None, "inside");
        // A diverged run never counts as best; one point is no grid.
        let r = [(1e-3, 5.8), (2e-3, f64::NAN), (5e-4, 5.9)];
        assert_eq!(edge_extension(&r), None);
        assert_eq!(edge_extension(&[(1e-3, 5.0)]), None);
    }

    #[test]
    fn mean_and_sample_sd() {
        assert_eq!(mean(&[1.0, 2.0, 3.0]), 2.0);
        assert_eq!(sd(&[1.0, 2.0, 3.0]), 1.0);
        assert_eq!(sd(&[4.0]), 0.0);
    }
}
