#!/usr/bin/env python3
"""Which precision to continue a clone in: f32, pure bf16, or f32 master + bf16 autocast.

    PY=$(scripts/pyenv.sh | tail -1)
    target/release/hyperclone clone assets/shakespeare-tiny /tmp/st2 --factor 2 --dtype f32
    OMP_NUM_THREADS=2 nice -n 19 $PY benches/precision_continuation.py --model /tmp/st2 \
        --small assets/shakespeare-tiny \
        --train ~/.cache/hyperclone/shakespeare/train --val ~/.cache/hyperclone/shakespeare/val \
        --json /tmp/precision.json

One process, no FSDP (the precision question does not depend on sharding; FSDP2's
MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=f32) is the sharded form of mode c).
Every mode starts from the same clone and sees the same windows (continue_fsdp.batch with
one rank), the same AdamW settings (--lr after a linear --warmup, betas 0.9/0.95, no weight decay, grad
clip 1.0) and the same seed:

  f32        weights, gradients, AdamW state and compute in float32
  bf16       model.to(bfloat16): weights, gradients and AdamW state in bfloat16
  f32+amp    float32 weights/optimizer, forward/backward under torch.autocast(bfloat16)

Reported per mode: training loss averaged over the first and the last --avg steps, the
held-out loss (--val, fixed windows, evaluated in f32 after casting the weights to f32)
before and after, the relative L2 change of all weights and the share of weights that
never changed (a pure-bf16 update smaller than half a bf16 ulp rounds away), and seconds
per step (only comparable on a quiet machine). With --small the small model's held-out loss is
printed too (it must equal the clone's start: the clone is function-preserving).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("cf", ROOT / "examples" / "continue_fsdp.py")
cf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cf)

MODES = ("f32", "bf16", "f32+amp")


def val_loss(model, val_batches) -> float:
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=b, labels=b).loss.float().item() for b in val_batches]
    model.train()
    return sum(losses) / len(losses)


def run_mode(mode, args, train_tokens, val_batches) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.config.use_cache = False
    start_val = val_loss(model, val_batches)
    if mode == "bf16":
        model.to(torch.bfloat16)
    start = [q.detach().clone() for q in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) if args.warmup else 1.0)
    losses = []
    t0 = time.time()
    for step in range(1, args.steps + 1):
        ids = cf.batch(train_tokens, step, 0, 1, args.batch_size, args.seq_len, args.seed)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=(mode == "f32+amp")):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.float().item())
        if step % args.log_every == 0:
            print(f"  {mode} step {step} loss {losses[-1]:.4f} {time.time() - t0:.0f}s", flush=True)
    secs = (time.time() - t0) / args.steps
    # How far the weights moved, and the share of them that never changed (in their dtype).
    with torch.no_grad():
        diff = sum((q.float() - s0.float()).pow(2).sum() for q, s0 in zip(model.parameters(), start))
        norm = sum(s0.float().pow(2).sum() for s0 in start)
        frozen = sum((q == s0).sum().item() for q, s0 in zip(model.parameters(), start))
        total = sum(s0.numel() for s0 in start)
    model.float()
    end_val = val_loss(model, val_batches)
    k = args.avg
    return dict(mode=mode, train_first=sum(losses[:k]) / k, train_last=sum(losses[-k:]) / k,
                val_start=start_val, val_end=end_val, sec_per_step=secs,
                rel_change=(diff / norm).sqrt().item(), unchanged=frozen / total, losses=losses)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, type=Path, help="the clone (f32)")
    p.add_argument("--small", type=Path, help="the small model, to print its held-out loss")
    p.add_argument("--train", required=True, type=Path)
    p.add_argument("--val", required=True, type=Path)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=10, help="linear warmup steps, then constant")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--avg", type=int, default=10, help="steps averaged for first/last loss")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    vocab = AutoConfig.from_pretrained(a.model).vocab_size
    train, how = cf.load_tokens(a.model, a.train, vocab)
    val, _ = cf.load_tokens(a.model, a.val, vocab)
    val_batches = [cf.batch(val, 10_000 + i, 0, 1, a.batch_size, a.seq_len, a.seed)
                   for i in range(a.val_batches)]
    print(f"train {train.numel()} tokens, val {val.numel()} tokens ({how}); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    small_val = None
    if a.small:
        small_val = val_loss(AutoModelForCausalLM.from_pretrained(a.small, dtype=torch.float32),
                             val_batches)
        print(f"small model held-out loss {small_val:.4f}")
    results = []
    for mode in a.modes.split(","):
        if mode not in MODES:
            p.error(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        r = run_mode(mode, a, train, val_batches)
        results.append(r)
        print(f"{mode:8s} train {r['train_first']:.4f} -> {r['train_last']:.4f}  "
              f"held-out {r['val_start']:.4f} -> {r['val_end']:.4f}  "
              f"weights moved {r['rel_change']:.2e} (unchanged {100 * r['unchanged']:.1f}%)  "
              f"{r['sec_per_step']:.2f} s/step", flush=True)
    if a.json:
        a.json.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(a).items()},
                                          small_val=small_val, results=results), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
