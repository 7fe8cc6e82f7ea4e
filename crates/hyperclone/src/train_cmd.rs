//! `hyperclone train` and `hyperclone tokenizer`: flags to [`hyperclone_nn::trainer`], a
//! progress bar, a summary line.

use crate::args::{ScheduleArg, TokenizerArgs, TrainArgs};
use anyhow::Result;
use hyperclone_nn::train::Schedule;
use hyperclone_nn::trainer::{self, TrainOptions, TrainProgress, LAST};
use indicatif::{ProgressBar, ProgressStyle};

pub fn train(a: TrainArgs) -> Result<()> {
    let done = trainer::run(&options(&a)?, &StepBar::new(""))?;
    outln!(
        "trained {} steps ({} tokens) in {:.1} s; checkpoint {}, metrics {}",
        done.steps,
        done.tokens,
        done.seconds,
        a.out.join(LAST).display(),
        a.out.join("metrics.jsonl").display()
    );
    Ok(())
}

/// The flags as the trainer's options (one field each; the defaults are
/// `TrainOptions::default()`'s, checked in a test below).
pub(crate) fn options(a: &TrainArgs) -> Result<TrainOptions> {
    // Checked whatever the schedule, as the flag always was (the trainer checks it for WSD).
    trainer::check_decay_frac(a.decay_frac)?;
    Ok(TrainOptions {
        model: a.model.clone(),
        init_config: a.init_config.clone(),
        data: a.data.clone(),
        val: a.val.clone(),
        tokenizer: a.tokenizer.clone(),
        out: a.out.clone(),
        steps: a.steps,
        batch: a.batch,
        seq: a.seq,
        lr: a.lr,
        warmup: a.warmup,
        schedule: match a.schedule {
            ScheduleArg::Cosine => Schedule::Cosine,
            ScheduleArg::Wsd => Schedule::Wsd {
                decay_frac: a.decay_frac,
            },
            ScheduleArg::Constant => Schedule::Constant,
        },
        min_lr: a.min_lr,
        optimizer_from: a.optimizer_from.clone(),
        weight_decay: a.weight_decay,
        grad_clip: a.grad_clip,
        grad_accum: a.grad_accum,
        dropout: a.dropout,
        eval_every: a.eval_every,
        eval_windows: a.eval_windows,
        token_cache: a.token_cache.clone(),
        save_every: a.save_every,
        seed: a.seed,
        resume: a.resume,
        force: a.force,
        stop_at: a.stop_at,
        adam_beta1: a.adam_beta1,
        adam_beta2: a.adam_beta2,
        adam_epsilon: a.adam_epsilon,
    })
}

/// A run's progress as an indicatif bar of steps, prefixed with `label` (the study's run
/// names); notices go to stderr.
pub struct StepBar {
    bar: ProgressBar,
    label: String,
}

impl StepBar {
    pub fn new(label: &str) -> StepBar {
        StepBar {
            bar: ProgressBar::new(0),
            label: label.to_string(),
        }
    }
}

impl TrainProgress for StepBar {
    fn begin(&self, steps: u64, start: u64) {
        self.bar.set_length(steps);
        self.bar.set_position(start);
        self.bar.set_style(
            ProgressStyle::with_template("{prefix}{bar:30} {pos}/{len} steps {msg} ETA {eta}")
                .expect("template"),
        );
        self.bar.set_prefix(if self.label.is_empty() {
            String::new()
        } else {
            format!("{:<18} ", self.label)
        });
    }
    fn step(&self, done: u64, loss: f64, tokens_per_s: f64) {
        self.bar.set_position(done);
        self.bar
            .set_message(format!("loss {loss:.4} {tokens_per_s:.0} tok/s"));
    }
    fn finish(&self) {
        self.bar.finish();
    }
    fn abandon(&self) {
        self.bar.abandon();
    }
    fn notice(&self, message: &str) {
        self.bar.suspend(|| eprintln!("{message}"));
    }
}

pub fn tokenizer(a: TokenizerArgs) -> Result<()> {
    let done = trainer::train_tokenizer(&a.data, a.vocab_size, a.min_frequency, &a.out, a.force)?;
    outln!(
        "trained a {}-token byte-level BPE on {} file(s) in {:.1} s: {}",
        done.vocab_size,
        done.files,
        done.seconds,
        a.out.display()
    );
    Ok(())
}
