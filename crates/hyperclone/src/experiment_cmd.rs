//! `hyperclone experiment`: flags to [`hyperclone_study::experiment`], its steps printed as
//! they happen, a bar per training run, and the report's table and headline at the end.

use crate::args::ExperimentArgs;
use crate::train_cmd::StepBar;
use anyhow::Result;
use hyperclone_nn::trainer::TrainProgress;
use hyperclone_study::experiment::{ExperimentOptions, StudyProgress};
use std::time::Instant;

struct Printed;

impl StudyProgress for Printed {
    fn line(&self, text: &str) {
        outln!("{text}");
    }
    fn run(&self, label: &str) -> Box<dyn TrainProgress> {
        Box::new(StepBar::new(label))
    }
}

pub fn experiment(a: ExperimentArgs) -> Result<()> {
    let started = Instant::now();
    let report = hyperclone_study::experiment::experiment(&options(&a), &Printed)?;
    outln!("{}", report.ladder_markdown());
    outln!("{}", report.speedup_markdown());
    outln!("{}", report.headline_sentence());
    outln!(
        "wrote {} (+ report.json, budget.png, val_loss.png, symmetry.png, curves/) in {:.0} s",
        a.out.join("report.md").display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn options(a: &ExperimentArgs) -> ExperimentOptions {
    ExperimentOptions {
        out: a.out.clone(),
        quick: a.quick,
        paper_regime: a.paper_regime,
        data: a.data.clone(),
        val: a.val.clone(),
        tokenizer: a.tokenizer.clone(),
        base_config: a.base_config.clone(),
        factor: a.factor,
        snr_db: a.snr_db,
        dropout: a.dropout,
        arms: a.arms.clone(),
        headline_arm: a.headline_arm.clone(),
        base_steps: a.base_steps.clone(),
        base_lr: a.base_lr,
        steps: a.steps,
        ladder: a.ladder.clone(),
        screen_steps: a.screen_steps,
        lrs: a.lrs.clone(),
        seeds: a.seeds.clone(),
        warmup: a.warmup,
        decay_frac: a.decay_frac,
        min_lr_frac: a.min_lr_frac,
        batch: a.batch,
        seq: a.seq,
        eval_every: a.eval_every,
        eval_windows: a.eval_windows,
        final_eval_windows: a.final_eval_windows,
        max_minutes: a.max_minutes,
        report_only: a.report_only,
        record: a.record.clone(),
    }
}
