//! Command-line flags. Names are a contract: scripts call them.

use clap::{ArgGroup, Args, Parser, Subcommand};
use hyperclone_core::grow::Growth;
use hyperclone_core::growth_spec::GrowthSpec;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "hyperclone",
    version,
    about = "Grow a pretrained language model wider with HyperCloning: the grown model computes exactly the \
             small model's function, then training continues from there.",
    long_about = "Grow a pretrained language model wider with HyperCloning (Samragh et al., 2024).\n\n\
        Every weight of a Hugging Face checkpoint (config.json + safetensors) is tiled so that the wider model \
        computes exactly the small model's function: each hidden vector becomes n stacked copies. The output is an \
        ordinary Hugging Face folder that loads with AutoModelForCausalLM.from_pretrained.\n\n\
        Start with `hyperclone plan MODEL --factor 2` to see what a clone would produce, then \
        `hyperclone clone MODEL OUT --factor 2`."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Grow SRC into a wider checkpoint at DST (streamed; memory does not grow with the model).
    Clone(CloneArgs),
    /// Show what `clone` would produce: config changes, parameters, bytes, memory. Writes nothing.
    Plan(PlanArgs),
    /// Describe a checkpoint: family, dimensions, parameters, dtypes, shards.
    Inspect(InspectArgs),
    /// Run a model on tokens or text and report (or save) the logits of every position.
    Forward(ForwardArgs),
    /// Check that BIG computes SMALL's function: logits, their scale, every residual state.
    Verify(VerifyArgs),
    /// Continue a prompt with a model (greedy at --temperature 0), streaming to stdout.
    Generate(GenerateArgs),
    /// Train a checkpoint (or a random init) on text: AdamW, warmup + cosine, checkpoints, metrics.
    Train(TrainArgs),
    /// Train a byte-level BPE tokenizer on text files and write tokenizer.json.
    Tokenizer(TokenizerArgs),
    /// Grow the bundled Shakespeare model, verify it, and let both continue a verse (offline).
    Demo(DemoArgs),
    /// The convergence study on a CPU, budget-matched: complete runs at a ladder of budgets
    /// for a random init and grown clones, learning rates screened alike, several seeds.
    Experiment(ExperimentArgs),
}

#[derive(Args, Clone)]
#[command(
    long_about = "The convergence study, budget-matched: does a clone of a strong base reach a long random-init \
    run's final loss in half the budget (the HyperCloning paper's claim), on one CPU machine?\n\n\
    1. train small Llama bases (the strongest, 2250 steps x 2048 tokens, is the headline's; weaker ones are \
    second rows) and grow them x2;\n\
    2. every arm (random init; noisy clone with fresh AdamW moments, the paper's protocol; noisy clone with \
    carried moments) screens its own peak learning rate on the same grid, with runs of the final runs' \
    schedule shape and the shortest budget's length;\n\
    3. phase 1: seed 0 trains every arm at every budget of the ladder (1/8, 1/4, 1/2, 1 of the random \
    init's budget, 4000 steps x 2048 tokens), each a complete WSD run; phase 2: the other seeds train the \
    random init at its full budget and the clone budgets that bracket the crossing;\n\
    4. every run is evaluated at its end on 512 x 128 = 65,536 held-out tokens; the speedup is the random \
    init's budget over the clone's budget at which its final loss equals the random init's final loss, \
    interpolated in log-budget between the two bracketing runs;\n\
    5. write OUT/report.md, OUT/report.json (with a `headline`), plots, and every run's compact curve \
    under OUT/curves.\n\n\
    Finished runs are kept and an interrupted run resumes from its last checkpoint, so rerunning the same \
    command continues a study; --max-minutes ends a slice at a checkpoint. --quick (tiny models, about a \
    minute) checks the pipeline.\n\n\
    Data: the prose corpus of scripts/fetch_corpus.sh by default (--quick: Shakespeare)."
)]
pub struct ExperimentArgs {
    /// Output folder: bases/, clones/, screen/, ladder/ (each run: checkpoint + metrics.jsonl +
    /// final_eval.json), curves/ (compact CSVs), report.md, report.json, *.png.
    #[arg(long, value_name = "DIR", default_value = "experiment")]
    pub out: PathBuf,
    /// Tiny models, few steps, two seeds: checks the pipeline in about a minute.
    #[arg(long, conflicts_with = "paper_regime")]
    pub quick: bool,
    /// The paper's regime (the default preset, spelled out): the 4.61M-token base, an
    /// 8.19M-token random init, three seeds.
    #[arg(long)]
    pub paper_regime: bool,
    /// Stop after about this many minutes, at a checkpoint, and write the report of what has
    /// finished; the same command continues.
    #[arg(long, value_name = "MINUTES")]
    pub max_minutes: Option<f64>,
    /// Training text [default: ~/.cache/hyperclone/prose/train from scripts/fetch_corpus.sh;
    /// quick: the Shakespeare corpus].
    #[arg(long, value_name = "FILE_OR_DIR", num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Validation text [default: the corpus's val/, whole held-out documents].
    #[arg(long, value_name = "FILE_OR_DIR", num_args = 1..)]
    pub val: Vec<PathBuf>,
    /// tokenizer.json [default: a 4096-token BPE trained on the training split, kept in OUT;
    /// quick: the bundled Shakespeare BPE].
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// config.json of the small base model [default: a built-in Llama, hidden 64 (quick: 32)].
    #[arg(long, value_name = "CONFIG")]
    pub base_config: Option<PathBuf>,
    /// Growth factor of hidden size, heads and FFN.
    #[arg(long, default_value_t = 2)]
    pub factor: usize,
    /// Signal-to-noise ratio of the noisy clones, in dB.
    #[arg(long, default_value_t = 10.0)]
    pub snr_db: f64,
    /// Dropout of the symmetric+dropout arms (the other arms train without dropout).
    #[arg(long, default_value_t = 0.1)]
    pub dropout: f64,
    /// Arms, random-init first: random-init, then clone arms named START-MOMENTS with START
    /// noisy, symmetric, symmetric+dropout or diagonal and MOMENTS fresh or carried
    /// [default: random-init,noisy-fresh,noisy-carried].
    #[arg(long, value_delimiter = ',', value_name = "ARMS")]
    pub arms: Option<Vec<String>>,
    /// The clone arm the headline reports, fixed before any run [default: noisy-fresh, the
    /// paper's protocol].
    #[arg(long, value_name = "ARM")]
    pub headline_arm: Option<String>,
    /// Steps of each small base, ascending; the largest is the headline's, the others are
    /// second rows [default: 750,2250; quick: 15,40].
    #[arg(long, value_delimiter = ',', value_name = "STEPS")]
    pub base_steps: Option<Vec<u64>>,
    /// Peak learning rate of the bases [default: 3e-3].
    #[arg(long)]
    pub base_lr: Option<f64>,
    /// The random init's full budget in steps: the ladder's top rung [default: 4000; quick: 24].
    #[arg(long)]
    pub steps: Option<u64>,
    /// The budget ladder as ascending fractions of --steps ending at 1 [default: 0.125,0.25,0.5,1].
    #[arg(long, value_delimiter = ',', value_name = "FRACTIONS")]
    pub ladder: Option<Vec<f64>>,
    /// Steps of each learning-rate screen run, at least the shortest rung [default: the
    /// shortest rung].
    #[arg(long)]
    pub screen_steps: Option<u64>,
    /// Peak learning rates screened for every arm alike [default: 5e-4,1e-3,2e-3,4e-3;
    /// quick: 1e-3,3e-3].
    #[arg(long, value_delimiter = ',', value_name = "LRS")]
    pub lrs: Option<Vec<f64>>,
    /// Seeds: data order, noise, random init, dropout; the first runs every rung [default:
    /// 0,1,2; quick: 0,1].
    #[arg(long, value_delimiter = ',', value_name = "SEEDS")]
    pub seeds: Option<Vec<u64>>,
    /// Warmup steps of every run [default: 50; quick: 1].
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Fraction of every run spent in the final linear decay (warmup-stable-decay schedule).
    #[arg(long, default_value_t = 0.2)]
    pub decay_frac: f64,
    /// Where the decay ends, as a fraction of the run's peak learning rate.
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_frac: f64,
    /// Sequences per step [default: 16; quick: 8].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Tokens per sequence [default: 128; quick: 32].
    #[arg(long)]
    pub seq: Option<usize>,
    /// Evaluate the curve every E steps [default: 50; quick: 2].
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Validation windows per curve evaluation [default: 64; quick: 16].
    #[arg(long)]
    pub eval_windows: Option<usize>,
    /// Validation windows of every run's final evaluation [default: 512 (65,536 tokens);
    /// quick: 64].
    #[arg(long)]
    pub final_eval_windows: Option<usize>,
    /// Only rewrite the report and plots from the runs that have finished.
    #[arg(long)]
    pub report_only: bool,
    /// A committable record of the study (e.g. docs/experiment/budget-matched): every
    /// finished run's curve, final evaluation and step count, the settings and tokenizer,
    /// the report; no weights. Its runs count as finished, so the study continues on a new
    /// machine (a base is retrained from its seed when a clone grows from it). With
    /// --report-only: writes the record of the runs finished in --out, training nothing.
    #[arg(long)]
    pub record: Option<PathBuf>,
}

#[derive(Args)]
pub struct DemoArgs {
    /// Growth factor.
    #[arg(long, default_value_t = 2)]
    pub factor: usize,
    /// The verse to continue.
    #[arg(long, default_value = "ROMEO.\nBut soft, what light")]
    pub prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 24)]
    pub max_tokens: usize,
}

#[derive(Args)]
pub struct TokenizerArgs {
    /// Text: .txt files or folders of them.
    #[arg(long, value_name = "FILE_OR_DIR", num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// Vocabulary size: the end-of-text token, the 256 bytes, then merges.
    #[arg(long, default_value_t = 4096)]
    pub vocab_size: usize,
    /// Merges need at least this many occurrences.
    #[arg(long, default_value_t = 2)]
    pub min_frequency: u64,
    /// Output tokenizer.json (never onto a --data file; an existing FILE only with --force).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Replace an existing --out FILE.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Clone)]
pub struct TrainArgs {
    /// Model folder to start from (e.g. a clone).
    #[arg(long, value_name = "DIR", conflicts_with = "init_config")]
    pub model: Option<PathBuf>,
    /// Start from a random init of this config.json instead (weights N(0, 0.02), seeded).
    #[arg(long, value_name = "CONFIG")]
    pub init_config: Option<PathBuf>,
    /// Training text: .txt files or folders of them.
    #[arg(long, value_name = "FILE_OR_DIR", num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// Validation text [default: the last --data file is held out].
    #[arg(long, value_name = "FILE_OR_DIR", num_args = 1..)]
    pub val: Vec<PathBuf>,
    /// tokenizer.json [default: the model's].
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Output folder: OUT/last (an HF checkpoint + optimizer state), OUT/metrics.jsonl.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 200)]
    pub steps: u64,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Peak learning rate (reached after --warmup steps).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Linear warmup steps from 0 to --lr.
    #[arg(long, default_value_t = 20)]
    pub warmup: u64,
    /// After warmup: `cosine` to --min-lr at the last step; `wsd` (warmup-stable-decay):
    /// --lr until the last --decay-frac of the steps, then linear to --min-lr (the usual
    /// choice for continuing a grown model); `constant`.
    #[arg(long, value_enum, default_value_t = ScheduleArg::Cosine)]
    pub schedule: ScheduleArg,
    /// Fraction of --steps spent decaying under `--schedule wsd`.
    #[arg(long, default_value_t = 0.2, value_name = "FRAC")]
    pub decay_frac: f64,
    /// Learning rate at the end of the decay [default: 10% of --lr].
    #[arg(long, value_name = "LR")]
    pub min_lr: Option<f64>,
    /// With --model CLONE: start AdamW from the moments of the model it was grown from
    /// (that model's OUT/last folder, written by `hyperclone train`), grown with the same
    /// tiling as the weights, instead of from zero.
    #[arg(long, value_name = "DIR", requires = "model")]
    pub optimizer_from: Option<PathBuf>,
    /// AdamW decoupled weight decay (matrices and embeddings only, not norms or biases).
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    /// Global gradient-norm clipping (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: u64,
    /// Dropout on attention and MLP outputs; a symmetric clone needs dropout or noise for
    /// its copies to diverge.
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    /// Evaluate (validation loss, symmetry) every E steps.
    #[arg(long, default_value_t = 50)]
    pub eval_every: u64,
    /// Validation windows of --seq tokens per evaluation, spread evenly over the validation
    /// text [default: max(--batch, 8)].
    #[arg(long, value_name = "K")]
    pub eval_windows: Option<usize>,
    /// Where tokenized text is cached [default: OUT/tokens].
    #[arg(long, value_name = "DIR")]
    pub token_cache: Option<PathBuf>,
    /// Save OUT/last every S steps (and at the end).
    #[arg(long, default_value_t = 100)]
    pub save_every: u64,
    /// Seed of the batches, dropout and a random init.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue from OUT/last, reproducing the uninterrupted run exactly.
    #[arg(long, conflicts_with = "force")]
    pub resume: bool,
    /// Start over in an OUT that holds an earlier run (its OUT/last and metrics.jsonl are
    /// replaced); without it such an OUT is refused.
    #[arg(long)]
    pub force: bool,
    /// Stop after this step with a checkpoint, as if interrupted (run long jobs in slices:
    /// the schedule still spans --steps; continue with --resume).
    #[arg(long, value_name = "STEP")]
    pub stop_at: Option<u64>,
    /// AdamW's first-moment decay (beta1).
    #[arg(long, default_value_t = 0.9, value_name = "B1")]
    pub adam_beta1: f64,
    /// AdamW's second-moment decay (beta2); 0.95 as in most LLM pretraining recipes.
    #[arg(long, default_value_t = 0.95, value_name = "B2")]
    pub adam_beta2: f64,
    /// AdamW's epsilon.
    #[arg(long, default_value_t = 1e-8, value_name = "EPS")]
    pub adam_epsilon: f64,
}

/// Token input for forward and verify.
#[derive(Args, Clone)]
pub struct InputArgs {
    /// Comma-separated token ids, e.g. 1,2,3 [default: a built-in 16-token probe].
    #[arg(long, value_name = "IDS", conflicts_with = "text")]
    pub tokens: Option<String>,
    /// Text, tokenized with the model's tokenizer.json.
    #[arg(long, value_name = "TEXT", conflicts_with = "random_tokens")]
    pub text: Option<String>,
    /// T seeded pseudo-random token ids (for benchmarks).
    #[arg(long, value_name = "T", conflicts_with = "tokens")]
    pub random_tokens: Option<usize>,
}

#[derive(Args)]
pub struct ForwardArgs {
    /// Model folder.
    pub model: PathBuf,
    #[command(flatten)]
    pub input: InputArgs,
    /// Working precision.
    #[arg(long, default_value = "f32", value_parser = ["f64", "f32", "bf16"])]
    pub dtype: String,
    /// Save the logits as tensor `logits` [T, vocab] (f32) in a safetensors file (never
    /// onto the model; an existing FILE only with --force).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Replace an existing --out FILE.
    #[arg(long, requires = "out")]
    pub force: bool,
    /// Run a batch of B copies of the input (for benchmarks; reports use the first).
    #[arg(long, value_name = "B", default_value_t = 1)]
    pub batch: usize,
    /// Time R forward passes after one warm-up and report seconds per pass.
    #[arg(long, value_name = "R", default_value_t = 0)]
    pub repeat: usize,
    /// Print a JSON summary (shape, last position's top 5, seconds per pass, and which
    /// packed f32 schedule the load timed fastest on this CPU: `packed_schedules`; set
    /// HYPERCLONE_PACKED_SCHEDULE=gemm, own, kblock:KC, half or half:KC to fix one, same
    /// logits whichever).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// The source model.
    pub small: PathBuf,
    /// Its clone.
    pub big: PathBuf,
    #[command(flatten)]
    pub input: InputArgs,
    /// Working precision: f64 checks to 1e-9 of the logit scale, f32 to 1e-4.
    #[arg(long, default_value = "f64", value_parser = ["f64", "f32"])]
    pub dtype: String,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// Model folder (with tokenizer.json).
    pub model: PathBuf,
    /// The text to continue.
    #[arg(long)]
    pub prompt: String,
    /// Tokens to generate at most (stops early at the end-of-sequence token).
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// 0 = greedy; otherwise sample from softmax(logits / T).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Working precision.
    #[arg(long, default_value = "f32", value_parser = ["f64", "f32", "bf16"])]
    pub dtype: String,
}

/// The growth flags: every option of core's [`GrowthSpec`] (its fields and their docs are
/// the flags and their help), or a recipe holding them all.
#[derive(Args, Clone)]
#[command(group(ArgGroup::new("size").required(true).multiple(true)
    .args(["factor", "hidden_size", "recipe", "experts"])))]
pub struct GrowthArgs {
    #[command(flatten)]
    pub spec: GrowthSpec,
    /// Read the whole growth from a recipe file (JSON or YAML; `plan --json` prints one
    /// under `recipe`). The recorded growth map must match what the options give for SRC.
    // `GrowthSpec` is the group clap gives the flattened options.
    #[arg(long, value_name = "FILE", conflicts_with = "GrowthSpec")]
    pub recipe: Option<PathBuf>,
}

impl GrowthArgs {
    pub fn growth(&self) -> Growth {
        match &self.recipe {
            Some(path) => Growth::Recipe(path.clone()),
            None => Growth::Spec(self.spec.clone()),
        }
    }
}

#[derive(Args)]
#[command(after_long_help = "Examples:\n  \
    hyperclone clone SRC DST --factor 2                      # the paper: hidden, heads and FFN x2\n  \
    hyperclone clone SRC DST --factor 2 --depth-factor 2 --keep-tied\n  \
    hyperclone clone SRC DST --experts 8                     # upcycle (llama/mistral -> mixtral, qwen3/qwen2 -> qwen3_moe/qwen2_moe)\n  \
    hyperclone clone SRC DST --experts 8 --factor 2          # upcycle and grow the width in one clone\n  \
    hyperclone clone SRC DST --experts 8 --expert-init drop --router-init normal   # Drop-Upcycling (not exact)\n\n\
    Upcycling: every expert starts as the (grown) dense MLP and the router at zero, so routing is uniform \
    and the k renormalised weights 1/k sum to 1: the MoE model computes the dense model's function \
    exactly (`verify` checks it). --expert-init drop and --router-init normal break the experts' symmetry \
    and are recorded as not function-preserving. Details: docs/growth.md, section Upcycling.")]
pub struct CloneArgs {
    /// Source model folder (config.json + model.safetensors or an index and shards; with
    /// both, model.safetensors, as transformers loads it). SRC is memory-mapped: truncating
    /// or rewriting it during a clone kills the clone with SIGBUS; the next clone into DST
    /// removes the partial folder it left.
    pub src: PathBuf,
    /// Destination folder; must not exist unless --force.
    pub dst: PathBuf,
    #[command(flatten)]
    pub growth: GrowthArgs,
    /// Replace DST if it exists (only once the new clone is complete).
    #[arg(long)]
    pub force: bool,
    /// Before moving the clone into place, run both models (f64) on a probe sequence and
    /// fail, keeping nothing, unless the clone computes the source's function.
    #[arg(long)]
    pub verify: bool,
    /// Clone source tensors that hold NaN or Inf (refused by default, naming the tensor).
    #[arg(long)]
    pub allow_nonfinite: bool,
    /// Print one JSON object with the summary instead of text and a progress bar.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct PlanArgs {
    /// Source model folder.
    pub src: PathBuf,
    #[command(flatten)]
    pub growth: GrowthArgs,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct InspectArgs {
    /// Model folder.
    pub model: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `train --schedule`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleArg {
    Cosine,
    Wsd,
    Constant,
}
