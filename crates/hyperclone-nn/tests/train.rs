//! Training: every parameter gets the right gradient (finite differences in f64), the loss
//! goes down, and a resumed run is bit-identical to an uninterrupted one.

use candle_core::{DType, Device};
use hyperclone_core::Checkpoint;
use hyperclone_nn::train::{
    batch_loss, save_params, train_step, train_step_cut, AdamW, Schedule, TrainOptions,
};
use hyperclone_nn::Decoder;
use hyperclone_testkit::fixtures::{self, families};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    let tiny = fixtures::tiny(name);
    if tiny.exists() {
        tiny
    } else {
        fixtures::family(name)
    }
}

fn config(steps: u64) -> TrainOptions {
    TrainOptions {
        steps,
        lr: 3e-3,
        warmup: 2,
        schedule: Schedule::Cosine,
        min_lr: Some(3e-4),
        weight_decay: 0.1,
        grad_clip: 1.0,
        grad_accum: 2,
        dropout: 0.1,
        seed: 7,
        ..TrainOptions::default()
    }
}

/// A deterministic batch for (step, micro): ids < 96.
fn batch_for(step: u64, micro: u64) -> (Vec<u32>, Vec<u32>) {
    let seq: Vec<u32> = (0..2 * 9)
        .map(|i| ((i as u64 * 7 + step * 3 + micro * 11) % 96) as u32)
        .collect();
    let mut inputs = Vec::new();
    let mut targets = Vec::new();
    for row in seq.chunks(9) {
        inputs.extend_from_slice(&row[..8]);
        targets.extend_from_slice(&row[1..]);
    }
    (inputs, targets)
}

#[test]
fn every_parameter_gets_the_finite_difference_gradient() {
    // Every family: fused q|k|v (phi3), fused gate|up (phi3), Conv1D [in, out] (gpt2) and
    // NeoX's per-head interleave are used through views, and a perturbation of the stored
    // tensor must move the loss (a stale copy made at load time would give 0 here).
    let tiny = [
        "llama-gqa-untied",
        "qwen3-gqa",
        "qwen2-gqa",
        "llama-mqa-tied",
    ];
    let every_family = families().into_iter().map(|(name, _)| name);
    for name in tiny.into_iter().map(String::from).chain(every_family) {
        let name = name.as_str();
        let ckpt = Checkpoint::open(&fixture(name)).unwrap();
        if ckpt.config.num_experts > 0 {
            // Training a Mixture of Experts is refused in one line (no load-balancing loss).
            match Decoder::load_trainable(&ckpt, DType::F64, &Device::Cpu) {
                Ok(_) => panic!("{name}: a Mixture-of-Experts model loaded for training"),
                Err(e) => assert!(e.to_string().contains("Mixture-of-Experts"), "{name}: {e}"),
            }
            continue;
        }
        finite_difference_gradients(name);
    }
}

fn run(
    dir: &Path,
    from: u64,
    to: u64,
    cfg: &TrainOptions,
    resume: Option<&Path>,
) -> (Vec<f64>, Vec<Vec<f64>>) {
    let src = resume
        .map(Path::to_path_buf)
        .unwrap_or_else(|| fixture("llama-gqa-untied"));
    let ckpt = Checkpoint::open(&src).unwrap();
    let (model, params) = Decoder::load_trainable(&ckpt, DType::F32, &Device::Cpu).unwrap();
    let mut opt = match resume {
        Some(r) => AdamW::load(&params, &r.join("optimizer.safetensors")).unwrap(),
        None => AdamW::new(&params),
    };
    let mut losses = Vec::new();
    for step in from..to {
        let s = train_step(&model, &params, &mut opt, cfg, step, 2, |micro| {
            Ok(batch_for(step, micro))
        })
        .unwrap();
        losses.push(s.loss);
    }
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    save_params(
        &params,
        hyperclone_core::DType::F32,
        &dir.join("model.safetensors"),
    )
    .unwrap();
    opt.save(&params, &dir.join("optimizer.safetensors"))
        .unwrap();
    let weights = params
        .iter()
        .map(|p| {
            p.var
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    (losses, weights)
}

#[test]
fn loss_decreases_and_resume_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(12);
    let (straight, w_straight) = run(&tmp.path().join("straight"), 0, 12, &cfg, None);
    assert!(
        straight[11] < straight[0] - 0.5,
        "the loss goes down: {straight:?}"
    );
    let (first, _) = run(&tmp.path().join("half"), 0, 5, &cfg, None);
    let (second, w_resumed) = run(
        &tmp.path().join("resumed"),
        5,
        12,
        &cfg,
        Some(&tmp.path().join("half")),
    );
    let resumed: Vec<f64> = first.into_iter().chain(second).collect();
    assert_eq!(straight, resumed, "loss curves");
    assert!(w_straight == w_resumed, "final weights differ");
}

#[test]
fn schedule_warms_up_then_decays_to_a_tenth() {
    let cfg = TrainOptions {
        steps: 100,
        warmup: 10,
        ..config(100)
    };
    assert!((cfg.lr_at(0) - 3e-4).abs() < 1e-12);
    assert!((cfg.lr_at(9) - 3e-3).abs() < 1e-12);
    assert!((cfg.lr_at(10) - 3e-3).abs() < 1e-12);
    assert!((cfg.lr_at(100) - 3e-4).abs() < 1e-12);
    assert!(cfg.lr_at(55) < cfg.lr_at(30));
}

#[test]
fn wsd_holds_the_peak_then_decays_linearly_to_min_lr_at_the_last_step() {
    let cfg = TrainOptions {
        steps: 100,
        warmup: 10,
        schedule: Schedule::Wsd { decay_frac: 0.2 },
        min_lr: Some(1e-4),
        ..config(100)
    };
    assert!((cfg.lr_at(0) - 3e-4).abs() < 1e-12, "warmup");
    for step in 9..80 {
        assert_eq!(cfg.lr_at(step), 3e-3, "stable at step {step}");
    }
    // 20 decay steps: 80 is the first below the peak, 99 (the last) is at min_lr.
    assert!((cfg.lr_at(80) - (3e-3 + (1e-4 - 3e-3) / 20.0)).abs() < 1e-15);
    assert!((cfg.lr_at(99) - 1e-4).abs() < 1e-15);
    assert!(
        (80..99).all(|s| cfg.lr_at(s + 1) < cfg.lr_at(s)),
        "monotone decay"
    );
    let constant = TrainOptions {
        schedule: Schedule::Constant,
        ..cfg.clone()
    };
    assert_eq!(constant.lr_at(99), 3e-3);
    // A decay longer than what follows the warmup is cut to fit.
    let long = TrainOptions {
        schedule: Schedule::Wsd { decay_frac: 1.0 },
        ..cfg
    };
    assert_eq!(long.lr_at(9), 3e-3);
    assert!((long.lr_at(99) - 1e-4).abs() < 1e-15);
}

#[test]
fn random_init_from_a_config_is_a_valid_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["llama-mqa-tied", "qwen2-gqa", "qwen3-gqa"] {
        let out = tmp.path().join(name);
        hyperclone_nn::init::write_random_checkpoint(
            &fixture(name).join("config.json"),
            &out,
            0.02,
            1,
        )
        .unwrap();
        let ckpt = Checkpoint::open(&out).unwrap();
        assert_eq!(
            ckpt.parameter_count(),
            Checkpoint::open(&fixture(name)).unwrap().parameter_count(),
            "{name}"
        );
        let model = Decoder::load(&ckpt, DType::F32, &Device::Cpu).unwrap();
        let (inputs, targets) = batch_for(0, 0);
        let loss = batch_loss(&model, &inputs, &targets, 2, None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Near-uniform predictions at std 0.02: loss close to ln(96) = 4.56.
        assert!(
            (loss - 96f32.ln()).abs() < 0.1,
            "{name}: initial loss {loss}"
        );
    }
}

/// The dense families of 2026 (issue 19): NoPE layers (smollm3), Granite's multipliers, rope
/// per layer type (olmo3, gemma3_text) and Gemma-3's per-head q/k norms all train: every
/// stored tensor gets the finite-difference gradient (the same check as above).
#[test]
fn dense_2026_families_get_the_finite_difference_gradient() {
    for name in [
        "smollm3-nope",
        "granite-gqa",
        "olmo3-sliding",
        "gemma3-text",
        "gemma3-linear-rope",
    ] {
        finite_difference_gradients(name);
    }
}

fn finite_difference_gradients(name: &str) {
    let ckpt = Checkpoint::open(&fixture(name)).unwrap();
    let (model, params) = Decoder::load_trainable(&ckpt, DType::F64, &Device::Cpu).unwrap();
    let (inputs, targets) = batch_for(0, 0);
    let loss = batch_loss(&model, &inputs, &targets, 2, None).unwrap();
    let grads = loss.backward().unwrap();
    for p in &params {
        let g: Vec<f64> = grads
            .get(p.var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient for {}", p.name))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            g.iter().any(|x| *x != 0.0),
            "{name}: zero gradient for {}",
            p.name
        );
        // Central differences on the element with the largest gradient.
        let k = (0..g.len())
            .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
            .unwrap();
        let w: Vec<f64> = p.var.flatten_all().unwrap().to_vec1().unwrap();
        // h = 1e-5: the loss is ~10, so one unit in its last place over 2h is ~1e-10
        // (at h = 1e-6 two such units made 1.8e-5 of the 1e-4 floor, when the largest
        // "gradient" picked is rounding noise); the central difference's truncation
        // error, h^2 f'''/6, stays ~1e-10.
        let h = 1e-5;
        let at = |delta: f64| {
            let mut w2 = w.clone();
            w2[k] += delta;
            p.var
                .set(&candle_core::Tensor::from_vec(w2, p.var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let l = batch_loss(&model, &inputs, &targets, 2, None)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            p.var
                .set(
                    &candle_core::Tensor::from_vec(w.clone(), p.var.shape(), &Device::Cpu).unwrap(),
                )
                .unwrap();
            l
        };
        let fd = (at(h) - at(-h)) / (2.0 * h);
        // Relative, with a floor of 1e-4 for gradients that are analytically zero (a
        // k-projection bias shifts every score of a query alike; softmax ignores it): the
        // difference quotient's own noise is ~1e-16 * loss / h = 1e-10.
        let err = (fd - g[k]).abs() / g[k].abs().max(1e-4);
        assert!(
            err < 1e-5,
            "{name}: {}: autograd {} vs finite difference {fd}",
            p.name,
            g[k]
        );
    }
}

/// One step of `cfg` from the fixture's weights on rows cut at `cut`, inside a rayon pool
/// of `threads` threads: (loss, gradient norm, every weight after the step).
fn one_cut_step(
    cfg: &TrainOptions,
    cut: &[std::ops::Range<usize>],
    threads: usize,
) -> (f64, f64, Vec<Vec<f32>>) {
    let ckpt = Checkpoint::open(&fixture("llama-gqa-untied")).unwrap();
    let (model, params) = Decoder::load_trainable(&ckpt, DType::F32, &Device::Cpu).unwrap();
    let mut opt = AdamW::new(&params);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let data = (0..cfg.grad_accum.max(1))
        .map(|micro| batch_for(3, micro))
        .collect();
    let s = pool
        .install(|| train_step_cut(&model, &params, &mut opt, cfg, 3, 2, cut, data))
        .unwrap();
    let weights = params
        .iter()
        .map(|p| p.var.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect();
    (s.loss, s.grad_norm, weights)
}

#[test]
fn a_sharded_step_is_the_whole_batch_step_and_does_not_depend_on_threads() {
    let cfg = TrainOptions {
        grad_accum: 1,
        ..config(12)
    };
    let whole = std::slice::from_ref(&(0..2));
    let halves = [0..1, 1..2];
    let (loss, norm, _) = one_cut_step(&cfg, whole, 1);
    let (loss_s, norm_s, w1) = one_cut_step(&cfg, &halves, 1);
    // f32 forward and backward; the halves differ from the whole batch only in rounding.
    assert!(
        (loss - loss_s).abs() <= 1e-6 * loss.abs(),
        "{loss} vs {loss_s}"
    );
    assert!((norm - norm_s).abs() <= 1e-5 * norm, "{norm} vs {norm_s}");
    // Each shard draws the whole batch's dropout masks: without dropout the loss moves by
    // far more than the tolerance above, so a shard drawing other masks would fail it.
    let (loss_nodrop, _, _) = one_cut_step(
        &TrainOptions {
            dropout: 0.0,
            ..cfg.clone()
        },
        &halves,
        1,
    );
    assert!(
        (loss_nodrop - loss_s).abs() > 1e-3,
        "{loss_nodrop} vs {loss_s}"
    );
    // The shards' sums run in a fixed order: the same bits on 1 and 3 threads.
    let (loss_3, norm_3, w3) = one_cut_step(&cfg, &halves, 3);
    assert_eq!(
        (loss_s.to_bits(), norm_s.to_bits()),
        (loss_3.to_bits(), norm_3.to_bits())
    );
    assert!(w1 == w3, "weights differ between 1 and 3 threads");
}
