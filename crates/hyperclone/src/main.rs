//! The `hyperclone` binary: flags in, core calls, progress and reports out. No growth math.

/// `println!` that ends the program quietly (exit 0) when stdout is a closed pipe
/// (`hyperclone plan ... | head -1`), as ripgrep does, instead of panicking.
macro_rules! outln {
    () => { $crate::write_stdout(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `print!` with the same broken-pipe handling as [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => { $crate::write_stdout(format_args!($($arg)*)) };
}

mod args;
mod demo;
mod experiment_cmd;
mod infer;
mod report;
mod train_cmd;

use anyhow::Result;
use args::{Cli, CloneArgs, Command, InspectArgs, PlanArgs};
use clap::Parser;
use hyperclone_core::grow::{clone_model, open_and_plan};
use hyperclone_core::write::{create_plain_file, Progress, WriteEnv};
use hyperclone_core::Checkpoint;
use hyperclone_nn::check::StagedCheck;
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// mimalloc, with freed memory kept mapped: a forward or training step frees and
/// re-allocates tensors of hundreds of MB, and handing them back to the kernel makes it
/// zero fresh pages every time (26% of a training step in perf; glibc's mmap threshold
/// cannot be raised past 32 MiB). Training went from 0.60 to 0.94 of PyTorch's tokens/s.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc 2.x's `mi_option_purge_delay` (not exported by libmimalloc-sys 0.1).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn tune_allocator() {
    // SAFETY: sets a process-wide mimalloc option; no other thread exists yet.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    // No transparent huge pages for this process: where the kernel backs fresh memory with
    // 2 MiB pages ("always"), each first touch zeroes (and may compact for) a whole huge
    // page. A 4x512 SmolLM2 forward spent 17 s of system time on it (wall 26.8 s; 2.9 s and
    // 16.2 s with 4 KiB pages); training's steady state is unchanged (it reuses its memory).
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_THP_DISABLE only sets a flag of this process.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// candle's CPU thread pool spins between ops by default; on a 2-core machine the spinning
/// worker steals the core gemm needs (1x128 SmolLM2 forward: 0.34 s spinning, 0.24 s not).
/// Park at once unless the user chose otherwise.
fn tune_thread_pool() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
}

fn main() {
    tune_allocator();
    tune_thread_pool();
    // Before any candle op: training, evaluation and batched forwards run row shards side
    // by side (see hyperclone_nn::shard).
    hyperclone_nn::shard::prefer_shard_parallelism();
    let cli = Cli::parse();
    if matches!(cli.command, Command::Train(_) | Command::Experiment(_)) {
        hyperclone_nn::shard::prefer_shard_parallelism();
    }
    let result = match cli.command {
        Command::Clone(a) => clone(a),
        Command::Plan(a) => plan(a),
        Command::Inspect(a) => inspect(a),
        Command::Forward(a) => infer::forward(a),
        Command::Verify(a) => match infer::verify_cmd(a) {
            Ok(true) => Ok(()),
            Ok(false) => std::process::exit(1),
            Err(e) => Err(e),
        },
        Command::Generate(a) => infer::generate(a),
        Command::Train(a) => train_cmd::train(a),
        Command::Experiment(a) => experiment_cmd::experiment(a),
        Command::Tokenizer(a) => train_cmd::tokenizer(a),
        Command::Demo(a) => demo::demo(a),
    };
    if let Err(e) = result {
        if is_broken_pipe(&e) {
            std::process::exit(0);
        }
        eprintln!("error: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// Writes to stdout; a closed pipe ends the program with success, other errors are ignored
/// (stdout is a report, not the product).
pub fn write_stdout(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|_| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The error chain as one line (see [`hyperclone_core::error::one_line`]); the Python
/// package raises the same line.
/// Core errors are phrased for the command line: an option that would allow what was
/// refused is its flag ("pass --force").
fn one_line(e: &anyhow::Error) -> String {
    hyperclone_core::error::one_line(e.chain().map(|c| {
        let core = c.downcast_ref::<hyperclone_core::Error>().or_else(|| {
            match c.downcast_ref::<hyperclone_nn::NnError>() {
                Some(hyperclone_nn::NnError::Core(core)) => Some(core),
                _ => None,
            }
        });
        match core {
            Some(core) => core.phrased(|option| format!("--{}", option.replace('_', "-"))),
            None => c.to_string(),
        }
    }))
}

/// Notes on stderr, for commands without a progress bar.
struct Notes;

impl Progress for Notes {
    fn notice(&self, message: &str) {
        eprintln!("note: {message}");
    }
}

struct Bar(ProgressBar);

impl Progress for Bar {
    fn begin(&self, total: u64) {
        self.0.set_length(total);
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn notice(&self, message: &str) {
        self.0.suspend(|| eprintln!("note: {message}"));
    }
}

fn clone(a: CloneArgs) -> Result<()> {
    let started = Instant::now();
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let cancel = cancel.clone();
        // Ctrl-C, SIGTERM and SIGHUP stop at the next chunk; the partial folder is then
        // removed (ctrlc's `termination` feature). SIGKILL cannot be caught: the next clone
        // into the same DST removes what it left.
        let _ = ctrlc::set_handler(move || cancel.store(true, Ordering::Relaxed));
    }
    let bar = if a.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}")
            .expect("valid template"),
    );
    let progress = Bar(bar.clone());
    // Verification runs on the finished staging folder, before it is moved into place.
    let staged = StagedCheck::new(&a.src).with_cancel(&cancel);
    let check = |dir: &std::path::Path| staged.check(dir);
    let env = WriteEnv {
        progress: &progress,
        cancel: &cancel,
        create: &create_plain_file,
        check: if a.verify { Some(&check) } else { None },
        allow_nonfinite: a.allow_nonfinite,
    };
    let cloned = clone_model(&a.src, &a.dst, &a.growth.growth(), a.force, &env);
    bar.finish_and_clear();
    let cloned = cloned?;
    let verification = staged.into_report();
    report::clone_summary(
        &cloned,
        &a,
        started.elapsed().as_secs_f64(),
        verification.as_ref(),
        a.json,
    );
    Ok(())
}

fn plan(a: PlanArgs) -> Result<()> {
    let (ckpt, plan, _) = open_and_plan(&a.src, &a.growth.growth(), &Notes)?;
    report::plan(&ckpt, &plan, a.json);
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    let ckpt = Checkpoint::open(&a.model)?;
    report::inspect(&ckpt, a.json);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_one_line_with_each_cause_once() {
        let io = std::io::Error::from_raw_os_error(2);
        let e = anyhow::Error::new(hyperclone_core::Error::io("a/config.json", io));
        assert_eq!(
            one_line(&e),
            "a/config.json: No such file or directory (os error 2)"
        );
        let bt = anyhow::anyhow!("shape mismatch in matmul\n   0: backtrace frame\n   1: more")
            .context("loading model");
        assert_eq!(one_line(&bt), "loading model: shape mismatch in matmul");
    }

    #[test]
    fn an_existing_output_says_force_as_a_flag() {
        let e = anyhow::Error::new(hyperclone_core::Error::NeedsForce {
            path: "big".into(),
            role: String::new(),
        });
        assert_eq!(
            one_line(&e),
            "big: already exists (pass --force to replace it)"
        );
        let nn = hyperclone_nn::NnError::Core(hyperclone_core::Error::NeedsForce {
            path: "x.bin".into(),
            role: "--out: ".into(),
        });
        assert_eq!(
            one_line(&anyhow::Error::new(nn)),
            "x.bin: --out: already exists (pass --force to replace it)"
        );
        let nan = hyperclone_core::Error::NonFinite {
            path: "m.safetensors".into(),
            tensor: "w".into(),
            message: "1 of 4 values are NaN or infinite; refusing to clone them".into(),
        };
        assert_eq!(
            one_line(&anyhow::Error::new(nan)),
            "m.safetensors: tensor `w`: 1 of 4 values are NaN or infinite; refusing to clone them \
             (pass --allow-nonfinite to clone them anyway)"
        );
    }

    #[test]
    fn growth_flags_default_to_the_specs_defaults() {
        use hyperclone_core::grow::Growth;
        use hyperclone_core::GrowthSpec;
        let growth = |args: &[&str]| -> Result<Growth, String> {
            let cli = Cli::try_parse_from(["hyperclone", "plan", "src"].iter().chain(args))
                .map_err(|e| e.to_string())?;
            match cli.command {
                Command::Plan(a) => Ok(a.growth.growth()),
                _ => unreachable!(),
            }
        };
        // One set of defaults: the flags' are GrowthSpec::default()'s (a recipe's and
        // Python's missing keys take the same).
        match growth(&["--factor", "2"]).unwrap() {
            Growth::Spec(spec) => assert_eq!(spec, GrowthSpec::factor(2)),
            other => panic!("{other:?}"),
        }
        // A recipe conflicts with the flags given, not with their defaults.
        assert!(matches!(
            growth(&["--recipe", "r.yaml"]).unwrap(),
            Growth::Recipe(_)
        ));
        let e = growth(&["--recipe", "r.yaml", "--seed", "1"]).unwrap_err();
        assert!(e.contains("cannot be used with"), "{e}");
        // A size is required.
        let e = growth(&["--seed", "1"]).unwrap_err();
        assert!(
            e.contains("--factor <N>|--hidden-size <D>|--recipe <FILE>"),
            "{e}"
        );
    }

    #[test]
    fn train_flags_default_to_the_trainers_defaults() {
        use hyperclone_nn::train::TrainOptions;
        let cli =
            Cli::try_parse_from(["hyperclone", "train", "--data", "d", "--out", "o"]).unwrap();
        let Command::Train(a) = cli.command else {
            unreachable!()
        };
        let from_flags = format!("{:?}", crate::train_cmd::options(&a).unwrap());
        let defaults = format!(
            "{:?}",
            TrainOptions {
                data: vec!["d".into()],
                out: "o".into(),
                ..TrainOptions::default()
            }
        );
        assert_eq!(from_flags, defaults, "one set of defaults");
    }
}
