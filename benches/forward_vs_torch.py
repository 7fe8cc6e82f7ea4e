#!/usr/bin/env python3
"""Forward-pass speed: the Rust decoder (candle, CPU) against PyTorch eager and sdpa.

    PY=$(scripts/pyenv.sh | tail -1)
    "$PY" benches/forward_vs_torch.py [MODEL_DIR] [--threads 2] [--repeat 3] [--shapes 1x128,4x512]

MODEL_DIR defaults to the SmolLM2-135M folder made by tests/fixtures/smollm2.py. For each
BATCHxTOKENS shape, in float32, on the same number of threads:
  * rust:  `hyperclone forward MODEL --random-tokens T --batch B --repeat R --json` with
           RAYON_NUM_THREADS=N; it times R passes after one warm-up, excluding load time, and
           reports their mean ("seconds_per_forward").
  * torch: AutoModelForCausalLM with attn_implementation "eager" and "sdpa",
           torch.set_num_threads(N), no grad, one warm-up, median of R passes.
Both run a full forward (all positions' logits, no KV cache) on random ids of that shape.
The binary is ${HYPERCLONE_BIN:-target/release/hyperclone}; build it with
`cargo build --release` first.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def default_model() -> Path:
    spec = importlib.util.spec_from_file_location("smollm2", REPO / "tests" / "fixtures" / "smollm2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.convert(mod.DEFAULT_OUT)


def parse_shapes(s: str) -> list[tuple[int, int]]:
    out = []
    for part in s.split(","):
        b, t = part.lower().split("x")
        out.append((int(b), int(t)))
    return out


def time_rust(binary: Path, model: Path, b: int, t: int, repeat: int, threads: int) -> float:
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    cmd = [str(binary), "forward", str(model), "--random-tokens", str(t), "--batch", str(b),
           "--repeat", str(repeat), "--dtype", "f32", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"`{' '.join(cmd)}` exited {proc.returncode}:\n{proc.stderr}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return float(summary["seconds_per_forward"])


def time_torch(model, ids, repeat: int) -> float:
    import torch

    with torch.no_grad():
        model(input_ids=ids)  # warm-up
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", type=Path, help="HF model folder (default: SmolLM2-135M)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both sides (default 2)")
    ap.add_argument("--repeat", type=int, default=3, help="timed passes per measurement (default 3)")
    ap.add_argument("--shapes", default="1x128,4x512", help="BATCHxTOKENS list (default 1x128,4x512)")
    args = ap.parse_args()

    binary = Path(os.environ.get("HYPERCLONE_BIN", REPO / "target" / "release" / "hyperclone"))
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        sys.exit(f"hyperclone binary not found at {binary}: run `cargo build --release` or set HYPERCLONE_BIN")
    model_dir = (args.model or default_model()).resolve()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    models = {
        impl: AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation=impl
        ).eval()
        for impl in ("eager", "sdpa")
    }
    vocab = models["eager"].config.vocab_size

    print(f"model {model_dir}")
    print(f"float32, {args.threads} threads each, repeat {args.repeat} (rust: mean after 1 warm-up; "
          f"torch: median after 1 warm-up); torch {torch.__version__}, transformers {transformers.__version__}")
    header = f"{'shape':>8} {'rust s':>9} {'torch-eager s':>14} {'torch-sdpa s':>13} {'rust/eager':>11} {'rust/sdpa':>10}"
    print(header)
    print("-" * len(header))
    for b, t in parse_shapes(args.shapes):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (b, t), generator=g)
        rust = time_rust(binary, model_dir, b, t, args.repeat, args.threads)
        eager = time_torch(models["eager"], ids, args.repeat)
        sdpa = time_torch(models["sdpa"], ids, args.repeat)
        print(f"{f'{b}x{t}':>8} {rust:>9.4f} {eager:>14.4f} {sdpa:>13.4f} {rust / eager:>11.2f} {rust / sdpa:>10.2f}",
              flush=True)


if __name__ == "__main__":
    main()
