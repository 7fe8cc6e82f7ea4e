//! The study's numbers, budget-matched: for each row (a clone arm grown from one base) and
//! seed, the budget at which the clone's final loss equals the same seed's random-init final
//! loss at its full budget (budget.rs), the speedup, the same charging the base's training
//! FLOPs (compute.rs), whether the paper's regime holds (the random init ends at least 0.05
//! nats below the base); the learning-rate screens; the within-run curves as a secondary
//! view; report.md and report.json with the `headline`.

use crate::budget::{crossing, Crossing, Speedup};
use crate::compute::{charged_speedup, training_flops_per_token, Flops, Shape};
use crate::curve::{forgetting_dip, mega, tokens_to_reach, Curve};
use crate::runs::{Run, StudyRuns};
use crate::settings::{Arm, Settings, MIN_FINAL_EVAL_TOKENS, REGIME_MARGIN_NATS};
use crate::Result;
use hyperclone_core::config::ModelConfig;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::Path;

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

/// "target T; the clone's runs ...; speedup X (charging the base Y)" of one seed.
fn speedup_words(r: &SeedResult) -> String {
    let runs: Vec<String> = r
        .points
        .iter()
        .map(|(tk, l)| format!("{}: {l:.4}", mega(*tk)))
        .collect();
    format!(
        "the random init's final loss {}, the clone's runs {}, {}: speedup {}, charging the base {}",
        r.target.map_or("pending".into(), |l| format!("{l:.4}")),
        runs.join(", "),
        r.crossing.map_or("pending", |c| c.status()),
        r.speedup.map_or("-".into(), |x| x.text()),
        r.charged.map_or("-".into(), |x| x.text()),
    )
}

fn lr_text(lr: Option<f64>) -> String {
    lr.map_or("-".into(), |l| format!("{l:e}"))
}

/// One seed of a row: its ladder points and where they cross its random init's final loss.
#[derive(Clone, Debug)]
pub struct SeedResult {
    pub seed: u64,
    /// The random init's final loss at its full budget on this seed.
    pub target: Option<f64>,
    /// (budget tokens, final loss) of this seed's finished rungs.
    pub points: Vec<(f64, f64)>,
    pub crossing: Option<Crossing>,
    pub speedup: Option<Speedup>,
    pub charged: Option<Speedup>,
}

/// A clone arm grown from one base, over seeds.
pub struct Row {
    pub base_steps: u64,
    pub base_tokens: f64,
    /// The base's final evaluation.
    pub base_loss: Option<f64>,
    pub arm: Arm,
    pub lr: Option<f64>,
    pub seeds: Vec<SeedResult>,
}

impl Row {
    pub fn label(&self) -> String {
        format!("{} (base-{})", self.arm.name(), self.base_steps)
    }

    fn measured(&self) -> impl Iterator<Item = &SeedResult> {
        self.seeds.iter().filter(|r| r.speedup.is_some())
    }
}

pub struct Report {
    pub settings: Settings,
    pub settings_json: Value,
    pub models: Value,
    /// Training FLOPs per token of the small and the large model.
    pub flops: Option<(Flops, Flops)>,
    pub corpus: Value,
    pub runs: StudyRuns,
    /// The strongest base's rows (headline arm first), then the weaker bases' rows.
    pub rows: Vec<Row>,
    /// Whether the whole plan has run (false: a slice ended first).
    pub complete: bool,
    /// Notes on how runs were obtained (a base retrained from the record on this machine).
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(
        s: &Settings,
        models: Option<(ModelConfig, ModelConfig, Value)>,
        corpus: Value,
        runs: StudyRuns,
        complete: bool,
    ) -> Report {
        let (models, flops) = match models {
            Some((small, large, v)) => (
                v,
                Some((
                    training_flops_per_token(&Shape::of(&small), s.seq),
                    training_flops_per_token(&Shape::of(&large), s.seq),
                )),
            ),
            None => (Value::Null, None),
        };
        let mut report = Report {
            settings: s.clone(),
            settings_json: s.to_json(),
            models,
            flops,
            corpus,
            runs,
            rows: Vec::new(),
            complete,
            notes: Vec::new(),
        };
        let top = s.largest_base();
        let mut rows: Vec<Row> = s
            .clone_arms()
            .into_iter()
            .map(|a| report.row(top, a))
            .collect();
        for &b in s.base_steps[..s.base_steps.len() - 1].iter().rev() {
            rows.push(report.row(b, s.headline_arm));
        }
        report.rows = rows;
        report
    }

    fn rung_tokens(&self, steps: u64) -> f64 {
        (steps * self.settings.tokens_per_step()) as f64
    }

    /// The lr a row's ladder runs at (the best of its full-budget lr check; None until the
    /// check has finished).
    pub fn ladder_lr(&self, base: Option<u64>, arm: Arm) -> Option<f64> {
        self.runs.ladder_lr(&self.settings, base, arm)
    }

    /// The random init's full-budget run of `seed` at its ladder lr.
    fn random_full(&self, seed: u64) -> Option<&Run> {
        let lr = self.ladder_lr(None, Arm::RANDOM)?;
        self.runs
            .run(None, Arm::RANDOM, lr, self.settings.steps, seed)
    }

    /// One seed of a clone arm at peak lr `clone_lr` against the random init's full-budget
    /// run at `random_lr`: its points, crossing and speedups.
    fn seed_result(
        &self,
        base_steps: u64,
        arm: Arm,
        clone_lr: Option<f64>,
        random_lr: Option<f64>,
        seed: u64,
    ) -> SeedResult {
        let s = &self.settings;
        let base_tokens = self.rung_tokens(base_steps);
        let r_tokens = s.budget_tokens() as f64;
        let target = random_lr
            .and_then(|lr| self.runs.run(None, Arm::RANDOM, lr, s.steps, seed))
            .and_then(Run::final_loss);
        let points: Vec<(f64, f64)> = clone_lr
            .map(|lr| self.runs.points(Some(base_steps), arm, lr, seed))
            .unwrap_or_default()
            .into_iter()
            .map(|(steps, loss)| (self.rung_tokens(steps), loss))
            .collect();
        let crossing = target.and_then(|t| crossing(&points, t));
        SeedResult {
            seed,
            target,
            crossing,
            speedup: crossing.map(|c| c.speedup(|b| r_tokens / b)),
            charged: crossing.zip(self.flops).map(|(c, (fs, fl))| {
                c.speedup(|b| charged_speedup(r_tokens, b, base_tokens, &fs, &fl))
            }),
            points,
        }
    }

    /// The headline row's seed 0 at both arms' screened lrs (the protocol before the
    /// full-budget lr check), when those runs exist and either lr differs from the ladder's.
    pub fn at_screened_lrs(&self) -> Option<(f64, f64, SeedResult)> {
        let row = self.headline_row()?;
        let base = Some(row.base_steps);
        let clone = self.runs.screened_lr(base, row.arm)?;
        let random = self.runs.screened_lr(None, Arm::RANDOM)?;
        if Some(clone) == row.lr && Some(random) == self.ladder_lr(None, Arm::RANDOM) {
            return None;
        }
        let r = self.seed_result(
            row.base_steps,
            row.arm,
            Some(clone),
            Some(random),
            self.settings.seeds[0],
        );
        (r.target.is_some() && !r.points.is_empty()).then_some((clone, random, r))
    }

    /// (seed, final loss) of the random init's full-budget runs.
    pub fn random_finals(&self) -> Vec<(u64, f64)> {
        self.settings
            .seeds
            .iter()
            .filter_map(|&seed| Some((seed, self.random_full(seed)?.final_loss()?)))
            .collect()
    }

    fn row(&self, base_steps: u64, arm: Arm) -> Row {
        let lr = self.ladder_lr(Some(base_steps), arm);
        let random_lr = self.ladder_lr(None, Arm::RANDOM);
        let seeds = self
            .settings
            .seeds
            .iter()
            .map(|&seed| self.seed_result(base_steps, arm, lr, random_lr, seed))
            .collect();
        Row {
            base_steps,
            base_tokens: self.rung_tokens(base_steps),
            base_loss: self.runs.bases.get(&base_steps).and_then(Run::final_loss),
            arm,
            lr,
            seeds,
        }
    }

    pub fn headline_row(&self) -> Option<&Row> {
        self.rows.first()
    }

    /// base loss - random final loss per seed; None until both exist.
    fn regime_margins(&self, row: &Row) -> Vec<(u64, f64)> {
        let Some(base) = row.base_loss else {
            return Vec::new();
        };
        self.random_finals()
            .into_iter()
            .map(|(seed, loss)| (seed, base - loss))
            .collect()
    }

    /// Whether the random init ends >= 0.05 nats below the base on every seed (None until
    /// every seed's full-budget run and the base are evaluated).
    pub fn regime_met(&self, row: &Row) -> Option<bool> {
        let m = self.regime_margins(row);
        (m.len() == self.settings.seeds.len()).then(|| m.iter().all(|x| x.1 >= REGIME_MARGIN_NATS))
    }

    /// The fewest held-out tokens any evaluated final point was measured on.
    fn final_eval_tokens(&self) -> Option<usize> {
        self.runs
            .ladder
            .values()
            .chain(self.runs.bases.values())
            .filter_map(|r| r.final_eval.map(|e| e.tokens))
            .min()
    }

    fn corpus_train_tokens(&self) -> Option<f64> {
        self.corpus["train_tokens"].as_f64()
    }

    /// Whether every measured seed reaches the paper's 2x (clone budget <= R/2): None while
    /// any seed is pending or its bound cannot tell.
    fn half_budget_on_every_seed(&self, row: &Row) -> Option<bool> {
        let answers: Vec<Option<bool>> = row
            .seeds
            .iter()
            .map(|r| r.speedup.and_then(|x| x.at_least(2.0)))
            .collect();
        if answers.contains(&Some(false)) {
            return Some(false);
        }
        answers.iter().all(|a| *a == Some(true)).then_some(true)
    }

    pub fn row_json(&self, row: &Row) -> Value {
        let s = &self.settings;
        let measured: Vec<&SeedResult> = row.measured().collect();
        let exact: Vec<f64> = measured.iter().filter_map(|r| r.speedup?.exact()).collect();
        let all_exact = !measured.is_empty() && exact.len() == measured.len();
        let randoms = self.random_finals();
        let random_losses: Vec<f64> = randoms.iter().map(|r| r.1).collect();
        json!({
            "protocol": "budget-matched",
            "arm": row.arm.name(),
            "variant": row.arm.variant_name(),
            "moments": row.arm.moments.name(),
            "lr": row.lr,
            "seeds": measured.iter().map(|r| r.seed).collect::<Vec<_>>(),
            "base_steps": row.base_steps,
            "base_tokens": row.base_tokens,
            "base_val_loss": row.base_loss,
            "random_budget_tokens": s.budget_tokens(),
            "random_final_loss": (!random_losses.is_empty()).then(|| mean(&random_losses)),
            "random_final_loss_sd": (!random_losses.is_empty()).then(|| sd(&random_losses)),
            "random_final_losses": randoms.iter().map(|(seed, l)| json!({"seed": seed, "loss": l})).collect::<Vec<_>>(),
            "paper_regime": {
                "required_margin_nats": REGIME_MARGIN_NATS,
                "margins_below_base": self.regime_margins(row).iter().map(|(seed, m)| json!({"seed": seed, "nats": m})).collect::<Vec<_>>(),
                "met": self.regime_met(row),
            },
            "clone_budget_tokens": measured.iter().map(|r| r.crossing.map_or(Value::Null, |c| c.budget_json())).collect::<Vec<_>>(),
            "crossings": measured.iter().map(|r| r.crossing.map(|c| c.status())).collect::<Vec<_>>(),
            "speedups": measured.iter().map(|r| r.speedup.map_or(Value::Null, |x| x.to_json())).collect::<Vec<_>>(),
            "speedups_charging_base": measured.iter().map(|r| r.charged.map_or(Value::Null, |x| x.to_json())).collect::<Vec<_>>(),
            "speedup_mean": all_exact.then(|| mean(&exact)),
            "speedup_sd": all_exact.then(|| sd(&exact)),
            "half_budget_on_every_seed": self.half_budget_on_every_seed(row),
            "ladder": row.seeds.iter().map(|r| json!({
                "seed": r.seed,
                "target_val_loss": r.target,
                "runs": r.points.iter().map(|(t, l)| json!({"tokens": t, "final_val_loss": l})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }

    pub fn headline(&self) -> Value {
        let Some(row) = self.headline_row() else {
            return Value::Null;
        };
        let mut h = self.row_json(row);
        let s = &self.settings;
        let extra = json!({
            "complete": self.complete,
            "final_eval_tokens": self.final_eval_tokens(),
            "final_eval_tokens_at_least_65536": self.final_eval_tokens().map(|t| t >= MIN_FINAL_EVAL_TOKENS),
            "corpus_train_tokens": self.corpus_train_tokens(),
            "corpus_passes": self.corpus_train_tokens().map(|c| s.corpus_passes(c as usize)),
            "flops_per_token": self.flops.map(|(fs, fl)| json!({"small": fs.total(), "large": fl.total()})),
        });
        if let (Some(h), Some(e)) = (h.as_object_mut(), extra.as_object()) {
            h.extend(e.clone());
        }
        h
    }

    /// The headline in sentences: the measured ratio with its spread, the paper's claim
    /// against it, and whether the regime is the paper's.
    pub fn headline_sentence(&self) -> String {
        let Some(row) = self.headline_row() else {
            return "headline: pending".into();
        };
        let measured: Vec<&SeedResult> = row.measured().collect();
        if measured.is_empty() {
            return format!(
                "headline: pending ({} has no seed with both its ladder and the random init's full-budget run finished{})",
                row.label(),
                if self.complete { "" } else { "; the study is not complete: rerun the command to continue" }
            );
        }
        let per_seed: Vec<String> = measured
            .iter()
            .map(|r| r.speedup.map_or("-".into(), |x| x.text()))
            .collect();
        let charged: Vec<String> = measured
            .iter()
            .map(|r| r.charged.map_or("-".into(), |x| x.text()))
            .collect();
        let exact: Vec<f64> = measured.iter().filter_map(|r| r.speedup?.exact()).collect();
        let spread = if exact.len() == measured.len() {
            format!(" (mean {:.2}x, sd {:.2})", mean(&exact), sd(&exact))
        } else {
            String::new()
        };
        let seeds: Vec<u64> = measured.iter().map(|r| r.seed).collect();
        const CLAIM: &str =
            "The paper's claim (the clone matches in at most half the budget, on every seed)";
        // Outside the regime the claim is not tested, whatever the ratio: say that first.
        let verdict = match (self.regime_met(row), self.half_budget_on_every_seed(row)) {
            (Some(false), _) => "The paper's regime is NOT met (the random init does not end >= 0.05 nats below the base on every seed), so this does not test the paper's claim".to_string(),
            (regime, half) => {
                let claim = match half {
                    Some(true) => format!("{CLAIM} holds here"),
                    Some(false) => format!(
                        "{CLAIM} is NOT reproduced here: the measured ratio is {}{spread}",
                        per_seed.join(", ")
                    ),
                    None => format!("{CLAIM}: the ladder cannot tell yet"),
                };
                let regime = if regime == Some(true) {
                    "the paper's regime holds (the random init ends >= 0.05 nats below the base on every seed)"
                } else {
                    "whether the paper's regime holds is pending"
                };
                format!("{claim}; {regime}")
            }
        };
        format!(
            "headline (budget-matched): {} grown from the {}-token base matches the random init's {}-token final loss {} sooner on seeds {seeds:?}{spread}; charging the base's FLOPs {}. {verdict}.{}",
            row.arm.name(),
            mega(row.base_tokens),
            mega(self.settings.budget_tokens() as f64),
            per_seed.join(", "),
            charged.join(", "),
            if self.complete { "" } else { " (The study is not complete: rerun the command to continue.)" }
        )
    }

    /// Final loss (mean ± sd over seeds) at every rung, per row; the random init first.
    pub fn ladder_markdown(&self) -> String {
        let s = &self.settings;
        let rungs = s.ladder_steps();
        let mut t = String::from("| arm (base) | lr |");
        for r in &rungs {
            let _ = write!(t, " {} |", mega(self.rung_tokens(*r)));
        }
        let _ = writeln!(t, "\n|---|---|{}", "---|".repeat(rungs.len()));
        let cell = |base: Option<u64>, arm: Arm, lr: Option<f64>, steps: u64| -> String {
            let losses: Vec<f64> = s
                .seeds
                .iter()
                .filter_map(|&seed| self.runs.run(base, arm, lr?, steps, seed)?.final_loss())
                .collect();
            match losses.len() {
                0 => "-".into(),
                1 => format!("{:.4} (n=1)", losses[0]),
                n => format!("{:.4} ± {:.4} (n={n})", mean(&losses), sd(&losses)),
            }
        };
        let mut line = |label: String, base: Option<u64>, arm: Arm, lr: Option<f64>| {
            let _ = write!(t, "| {label} | {} |", lr_text(lr));
            for r in &rungs {
                let _ = write!(t, " {} |", cell(base, arm, lr, *r));
            }
            t.push('\n');
        };
        let mut rows: Vec<(String, Option<u64>, Arm)> =
            vec![("random-init".into(), None, Arm::RANDOM)];
        rows.extend(
            self.rows
                .iter()
                .map(|r| (r.label(), Some(r.base_steps), r.arm)),
        );
        for (label, base, arm) in &rows {
            line(label.clone(), *base, *arm, self.ladder_lr(*base, *arm));
        }
        // Runs of the shorter rungs at a screened lr the lr check replaced: kept and shown,
        // marked as such.
        for (label, base, arm) in &rows {
            let screened = self.runs.screened_lr(*base, *arm);
            let Some(lr) = screened.filter(|l| Some(*l) != self.ladder_lr(*base, *arm)) else {
                continue;
            };
            if self.runs.points(*base, *arm, lr, s.seeds[0]).len() > 1 {
                line(
                    format!("{label}, at the screened lr"),
                    *base,
                    *arm,
                    Some(lr),
                );
            }
        }
        t
    }

    /// Every row's seeds: target, bracketing runs, clone budget, speedups.
    pub fn speedup_markdown(&self) -> String {
        let mut t = String::from(
            "| arm (base) | base final loss | seed | random init's final loss (target) | clone runs (tokens: loss) | crossing | clone budget | speedup | charging the base |\n|---|---|---|---|---|---|---|---|---|\n",
        );
        for row in &self.rows {
            for r in &row.seeds {
                let runs: Vec<String> = r
                    .points
                    .iter()
                    .map(|(tk, l)| format!("{}: {l:.4}", mega(*tk)))
                    .collect();
                let budget = match r.crossing {
                    Some(Crossing::Between { tokens, .. }) => mega(tokens),
                    Some(Crossing::BelowSmallest { tokens }) => format!("<= {}", mega(tokens)),
                    Some(Crossing::NotReached { tokens }) => format!("> {}", mega(tokens)),
                    None => "-".into(),
                };
                let _ = writeln!(
                    t,
                    "| {} | {} | {} | {} | {} | {} | {budget} | {} | {} |",
                    row.label(),
                    row.base_loss.map_or("-".into(), |l| format!("{l:.4}")),
                    r.seed,
                    r.target.map_or("pending".into(), |l| format!("{l:.4}")),
                    if runs.is_empty() {
                        "pending".into()
                    } else {
                        runs.join(", ")
                    },
                    r.crossing.map_or("pending", |c| c.status()),
                    r.speedup.map_or("-".into(), |x| x.text()),
                    r.charged.map_or("-".into(), |x| x.text()),
                );
            }
        }
        t
    }

    fn screen_markdown(&self) -> String {
        let mut keys: Vec<(Option<u64>, Arm)> = vec![(None, Arm::RANDOM)];
        keys.extend(self.rows.iter().map(|r| (Some(r.base_steps), r.arm)));
        let mut lrs: Vec<f64> = self
            .runs
            .screen
            .keys()
            .map(|(_, _, lr)| f64::from_bits(*lr))
            .collect();
        lrs.sort_by(f64::total_cmp);
        lrs.dedup();
        let mut t = String::from("| arm (base) |");
        for lr in &lrs {
            let _ = write!(t, " lr {lr:e} |");
        }
        let _ = writeln!(t, " chosen |\n|---|{}---|", "---|".repeat(lrs.len()));
        for (base, arm) in keys {
            let label = base.map_or(arm.name().to_string(), |b| {
                format!("{} (base-{b})", arm.name())
            });
            let _ = write!(t, "| {label} |");
            for lr in &lrs {
                let cell = self
                    .runs
                    .screen
                    .get(&(base, arm, lr.to_bits()))
                    .map_or(String::new(), |c| format!("{:.4}", c.final_loss()));
                let _ = write!(t, " {cell} |");
            }
            let best = best_of(&self.runs.screen_results(base, arm)).map(|b| b.0);
            let _ = writeln!(t, " {} |", lr_text(best));
        }
        t
    }

    /// The rows of the full-budget lr check: (base, arm, screened lr) for every row with
    /// check runs, the random init first.
    /// (base, arm, screened lr) of every row with full-budget runs at more than one lr.
    fn lr_check_keys(&self) -> Vec<(Option<u64>, Arm, Option<f64>)> {
        let mut keys: Vec<(Option<u64>, Arm)> = vec![(None, Arm::RANDOM)];
        keys.extend(self.rows.iter().map(|r| (Some(r.base_steps), r.arm)));
        keys.into_iter()
            .filter(|(b, a)| self.runs.lr_check_results(&self.settings, *b, *a).len() > 1)
            .map(|(b, a)| (b, a, self.runs.screened_lr(b, a)))
            .collect()
    }

    /// (best lr at the full budget, its loss, the screened lr's loss) of one check row.
    fn lr_check_verdict(
        &self,
        base: Option<u64>,
        arm: Arm,
        lr: Option<f64>,
    ) -> Option<(f64, f64, f64)> {
        let results = self.runs.lr_check_results(&self.settings, base, arm);
        let screened = results.iter().find(|r| Some(r.0) == lr)?.1;
        let (best, loss) = best_of(&results)?;
        Some((best, loss, screened))
    }

    fn lr_check_markdown(&self) -> String {
        let s = &self.settings;
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\n## Learning rate at the full budget ({} steps, seed {})\n",
            s.steps, s.seeds[0]
        );
        let _ = writeln!(t, "The screens run {} steps; a short run favours small steps for a clone (it barely leaves its base), so every arm alike also runs the whole budget at its screened lr, half and twice it (further past an edge, as the screen), and its ladder and seeds run at the best of these (the ladder's lr). Final loss of complete runs.\n", s.screen_steps);
        let _ = writeln!(t, "| arm (base) | lr | final loss | |\n|---|---|---|---|");
        for (base, arm, lr) in self.lr_check_keys() {
            let label = base.map_or(arm.name().to_string(), |b| {
                format!("{} (base-{b})", arm.name())
            });
            let best = self.lr_check_verdict(base, arm, lr).map(|v| v.0);
            let ladder = self.ladder_lr(base, arm);
            for (l, loss) in self.runs.lr_check_results(s, base, arm) {
                let mut mark = Vec::new();
                if Some(l) == lr {
                    mark.push("screened");
                }
                if Some(l) == best {
                    mark.push("best");
                }
                if Some(l) == ladder {
                    mark.push("the ladder's lr");
                }
                let _ = writeln!(t, "| {label} | {l:e} | {loss:.4} | {} |", mark.join(", "));
            }
        }
        if let Some((clone, random, r)) = self.at_screened_lrs() {
            let _ = writeln!(
                t,
                "\nAt the screened lrs (the protocol before this check: {} at {clone:e}, the random init at {random:e}), seed {}: {}.",
                self.headline_row().map_or(String::new(), Row::label),
                r.seed,
                speedup_words(&r)
            );
        }
        t
    }

    fn lr_check_json(&self) -> Value {
        Value::Array(
            self.lr_check_keys()
                .into_iter()
                .map(|(base, arm, lr)| {
                    let v = self.lr_check_verdict(base, arm, lr);
                    json!({
                        "arm": arm.name(), "base_steps": base, "steps": self.settings.steps,
                        "seed": self.settings.seeds[0], "screened_lr": lr,
                        "ladder_lr": self.ladder_lr(base, arm),
                        "runs": self.runs.lr_check_results(&self.settings, base, arm).iter()
                            .map(|(l, loss)| json!({"lr": l, "final_val_loss": loss})).collect::<Vec<_>>(),
                        "best_lr": v.map(|v| v.0),
                        "screened_minus_best": v.map(|v| v.2 - v.1),
                    })
                })
                .collect(),
        )
    }

    fn flops_markdown(&self) -> String {
        let Some((fs, fl)) = self.flops else {
            return "pending (the strongest base has not been grown yet)\n".into();
        };
        let mut t = String::from("| model | non-embedding matmuls | LM head | attention (QK^T, AV) | input embedding | total |\n|---|---|---|---|---|---|\n");
        for (name, f) in [("small (base)", fs), ("large", fl)] {
            let _ = writeln!(
                t,
                "| {name} | {:.0} | {:.0} | {:.0} | 0 | {:.0} |",
                f.non_embedding,
                f.head,
                f.attention,
                f.total()
            );
        }
        let _ = writeln!(
            t,
            "\nThe base's training costs {:.3} large-model tokens per base token.",
            fs.total() / fl.total()
        );
        t
    }

    /// The within-run view: a clone's full-budget run against the random init's, inside
    /// one schedule (secondary: a point inside a run is not a shorter run's final loss).
    fn within_run_markdown(&self) -> String {
        let s = &self.settings;
        let mut t = String::from(
            "| arm (base) | seed | final loss in-run | tokens to the random init's in-run final loss | ratio | early rise | final symmetry |\n|---|---|---|---|---|---|---|\n",
        );
        for row in &self.rows {
            for &seed in &s.seeds {
                let c = row.lr.and_then(|lr| {
                    self.runs
                        .run(Some(row.base_steps), row.arm, lr, s.steps, seed)
                });
                let (Some(c), Some(r)) = (c, self.random_full(seed)) else {
                    continue;
                };
                let target = r.curve.final_loss();
                let reach = tokens_to_reach(&c.curve.evals, target);
                let random_reach =
                    tokens_to_reach(&r.curve.evals, target).unwrap_or(r.curve.tokens());
                let dip = forgetting_dip(&c.curve.evals);
                let _ = writeln!(
                    t,
                    "| {} | {seed} | {:.4} | {} | {} | {:+.4} | {} |",
                    row.label(),
                    c.curve.final_loss(),
                    reach.map_or("not reached".into(), mega),
                    reach.map_or("-".into(), |x| if x > 0.0 {
                        format!("{:.2}x", random_reach / x)
                    } else {
                        "at step 0".into()
                    }),
                    dip.rise,
                    c.curve
                        .evals
                        .last()
                        .and_then(|e| e.symmetry)
                        .map_or("-".into(), |x| format!("{x:.4}")),
                );
            }
        }
        t
    }

    pub fn to_json(&self) -> Value {
        let curve = |c: &Curve| {
            json!({
                "tokens": c.tokens(),
                "final_val_loss_in_run": c.final_loss(),
                "train_seconds": c.train_seconds,
                "evals": c.evals.iter().map(|e| json!({
                    "step": e.step, "tokens": e.tokens, "val_loss": e.val_loss, "symmetry": e.symmetry,
                })).collect::<Vec<_>>(),
            })
        };
        json!({
            "headline": self.headline(),
            "rows": self.rows.iter().map(|r| self.row_json(r)).collect::<Vec<_>>(),
            "settings": self.settings_json,
            "models": self.models,
            "flops_per_token": self.flops.map(|(fs, fl)| json!({"small": fs.to_json(), "large": fl.to_json()})),
            "corpus": self.corpus,
            "complete": self.complete,
            "notes": self.notes,
            "bases": self.runs.bases.iter().map(|(steps, r)| json!({
                "steps": steps, "final_val_loss": r.final_loss(),
                "final_eval_tokens": r.final_eval.map(|e| e.tokens),
            })).collect::<Vec<_>>(),
            "lr_check": self.lr_check_json(),
            "headline_at_screened_lrs": self.at_screened_lrs().map(|(clone, random, r)| json!({
                "clone_lr": clone, "random_lr": random, "seed": r.seed, "target_val_loss": r.target,
                "runs": r.points.iter().map(|(t, l)| json!({"tokens": t, "final_val_loss": l})).collect::<Vec<_>>(),
                "crossing": r.crossing.map(|c| c.status()),
                "speedup": r.speedup.map_or(Value::Null, |x| x.to_json()),
                "speedup_charging_base": r.charged.map_or(Value::Null, |x| x.to_json()),
            })),
            "screen": self.runs.screen.iter().map(|((base, arm, lr), c)| json!({
                "arm": arm.name(), "base_steps": base, "lr": f64::from_bits(*lr), "final_val_loss_in_run": c.final_loss(),
            })).collect::<Vec<_>>(),
            "runs": self.runs.ladder.iter().map(|((base, arm, lr, steps, seed), r)| json!({
                "arm": arm.name(), "base_steps": base, "lr": f64::from_bits(*lr), "steps": steps,
                "tokens": self.rung_tokens(*steps), "seed": seed,
                "final_val_loss": r.final_loss(),
                "final_eval_tokens": r.final_eval.map(|e| e.tokens),
            })).collect::<Vec<_>>(),
            "within_run_curves_full_budget": self.runs.ladder.iter()
                .filter(|((_, _, _, steps, _), _)| *steps == self.settings.steps)
                .map(|((base, arm, lr, _, seed), r)| json!({
                    "arm": arm.name(), "base_steps": base, "lr": f64::from_bits(*lr), "seed": seed, "curve": curve(&r.curve),
                })).collect::<Vec<_>>(),
        })
    }

    pub fn markdown(&self) -> String {
        let s = &self.settings;
        let mut m = String::new();
        let _ = writeln!(
            m,
            "# Convergence study, budget-matched: HyperCloning on one CPU machine\n"
        );
        let _ = writeln!(m, "**{}**\n", self.headline_sentence());
        if !self.complete {
            let _ = writeln!(m, "The study is not complete: the numbers below are from the runs finished so far; rerunning the same command continues it.\n");
        }
        let small = &self.models["small"];
        let large = &self.models["large"];
        let _ = writeln!(
            m,
            "Small Llama: hidden {}, {} layers, {} parameters (tied head). Large (x{}): hidden {}, {} parameters. \
             Bases: {:?} steps x {} tokens. The random init's budget R = {} steps = {} tokens; ladder {:?} of R = {:?} steps. \
             Every point is a complete run (linear warmup {} steps, stable, linear decay over the last {:.0}% to {:.0}% of the peak: WSD), \
             evaluated at its end on {} held-out windows of {} tokens. Arms: {}. Each arm screens its own peak learning rate \
             on {:?} (extended by 2x past an edge up to {} times) with runs of {} steps, the final runs' schedule shape. \
             Seeds {:?}: seed {} runs every rung; the others run the random init at R and the rungs that bracket the crossing. \
             AdamW (0.9, 0.95), weight decay 0.1, clipping 1.0.\n",
            small["hidden_size"], small["num_hidden_layers"], small["parameters"], s.factor,
            large["hidden_size"], large["parameters"],
            s.base_steps, s.tokens_per_step(), s.steps, mega(s.budget_tokens() as f64),
            s.ladder, s.ladder_steps(), s.warmup, s.decay_frac * 100.0, s.min_lr_frac * 100.0,
            s.final_eval_windows, s.seq,
            s.arms.iter().map(Arm::name).collect::<Vec<_>>().join(", "),
            s.lrs, s.lr_extensions, s.screen_steps, s.seeds, s.seeds[0],
        );
        if let Some(train) = self.corpus_train_tokens() {
            let _ = writeln!(
                m,
                "Corpus: {} training tokens, {} validation tokens (whole held-out documents); the longest run reads the training split {:.2} times (at most 2 allowed).\n",
                mega(train),
                self.corpus["val_tokens"].as_f64().map_or("?".into(), mega),
                s.corpus_passes(train as usize),
            );
        }
        let _ = writeln!(m, "## Final loss against budget\n\nFinal validation loss of complete runs (mean ± sd over the seeds that ran that rung).\n");
        m.push_str(&self.ladder_markdown());
        let _ = writeln!(m, "\n![final loss against budget](budget.png)\n");
        let _ = writeln!(m, "## Speedup per seed\n");
        m.push_str(&self.speedup_markdown());
        m.push('\n');
        m.push_str(METHOD);
        m.push('\n');
        m.push_str(&self.flops_markdown());
        let _ = writeln!(
            m,
            "\n## Learning-rate screens ({} steps, seed {}, loss at the run's end)\n",
            s.screen_steps, s.seeds[0]
        );
        m.push_str(&self.screen_markdown());
        if !self.lr_check_keys().is_empty() {
            m.push_str(&self.lr_check_markdown());
        }
        let _ = writeln!(m, "\n## Secondary view: within-run curves of the full-budget runs\n\nInside one run a point is not a shorter run's final loss: the random init reaches its own final loss only in its decay, so a within-run ratio is capped by the schedule. Shown for the curves only; the headline is the budget-matched table above.\n");
        m.push_str(&self.within_run_markdown());
        let _ = writeln!(m, "\n![validation loss within the full-budget runs](val_loss.png)\n\n![symmetry](symmetry.png)\n");
        m.push_str(&self.findings());
        m
    }

    /// The checks the protocol needs, in sentences.
    fn findings(&self) -> String {
        let s = &self.settings;
        let mut f = String::from("## Checks\n\n");
        for row in &self.rows {
            let margins = self.regime_margins(row);
            if margins.is_empty() {
                let _ = writeln!(f, "- {}: regime check pending.", row.label());
                continue;
            }
            let text: Vec<String> = margins
                .iter()
                .map(|(seed, m)| format!("s{seed} {m:+.4}"))
                .collect();
            let _ = writeln!(
                f,
                "- {}: the random init ends below the base's {:.4} by {} nats: {}.",
                row.label(),
                row.base_loss.unwrap_or(f64::NAN),
                text.join(", "),
                match self.regime_met(row) {
                    Some(true) => "the paper's regime (>= 0.05 on every seed) holds".to_string(),
                    Some(false) =>
                        "the paper's regime (>= 0.05 on every seed) is NOT met".to_string(),
                    None => "pending for the other seeds".to_string(),
                }
            );
        }
        for (base, arm, lr) in self.lr_check_keys() {
            let label = base.map_or(arm.name().to_string(), |b| {
                format!("{} (base-{b})", arm.name())
            });
            let Some((best, loss, screened)) = self.lr_check_verdict(base, arm, lr) else {
                continue;
            };
            if Some(best) == lr {
                let _ = writeln!(f, "- {label}: at the full budget its screened lr {best:e} is still the best of those checked ({loss:.4}).");
            } else {
                let _ = writeln!(f, "- {label}: at the full budget lr {best:e} ends {:.4} nats below its screened lr {} ({loss:.4} against {screened:.4}): the short screen mis-picks this arm's lr{}.", screened - loss, lr_text(lr), if self.ladder_lr(base, arm) == Some(best) { "; its ladder runs at the better one" } else { "" });
            }
        }
        match self.final_eval_tokens() {
            Some(t) if t >= MIN_FINAL_EVAL_TOKENS => {
                let _ = writeln!(
                    f,
                    "- Every final point is evaluated on at least {t} held-out tokens."
                );
            }
            Some(t) => {
                let _ = writeln!(f, "- Final points are evaluated on only {t} held-out tokens (the protocol asks for {MIN_FINAL_EVAL_TOKENS}): a pipeline check, not a measurement.");
            }
            None => {}
        }
        if s.seeds.len() < 3 {
            let _ = writeln!(
                f,
                "- {} seed(s): the protocol asks for at least 3.",
                s.seeds.len()
            );
        }
        if let Some(train) = self.corpus_train_tokens() {
            let passes = s.corpus_passes(train as usize);
            if passes > crate::settings::MAX_CORPUS_PASSES {
                let _ = writeln!(f, "- The longest run reads the training split {passes:.1} times (more than 2): a pipeline check, not a measurement.");
            }
        }
        f
    }

    pub fn write(&self, out: &Path) -> Result<()> {
        let mut md = self.markdown();
        if !self.notes.is_empty() {
            md.push_str("\n## Notes\n\n");
            for n in &self.notes {
                md.push_str(&format!("- {n}\n"));
            }
        }
        std::fs::write(out.join("report.md"), md)?;
        std::fs::write(
            out.join("report.json"),
            serde_json::to_string_pretty(&self.to_json())?,
        )?;
        Ok(())
    }
}

/// How the headline numbers are computed (report.md states it next to them).
const METHOD: &str = "## How the numbers are computed

- **Speedup.** For each seed, T is the random init's final loss after its full budget R.
  The clone arm's complete runs of that seed give (budget b_i, final loss L_i). At the
  first rung with L_i <= T the crossing is interpolated linearly in log-budget between it
  and the rung before: b* = b_{i-1} (b_i / b_{i-1})^t with t = (L_{i-1} - T) / (L_{i-1} -
  L_i), and the speedup is R / b*. If the shortest rung already reaches T the report says
  \"below the smallest budget\" (speedup >= R / b_1); if the longest does not, \"not
  reached within the ladder\" (speedup < R / b_k). Nothing is extrapolated.
- **Compute.** Training FLOPs per token = 6 x (non-embedding matmul parameters) + 6 x d x V
  (the LM head) + 12 x L x n_ctx x (heads x head_dim) (QK^T and the weighted sum over the
  full n_ctx window the decoder computes); the input embedding is a lookup and costs no
  matmul FLOPs. Charging the base: R F_large / (b* F_large + B F_small), B the base's
  training tokens.
- **Regime.** The paper's question needs a large run that beats the base: the random init
  must end at least 0.05 nats below the base's final loss on every seed.
";

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
