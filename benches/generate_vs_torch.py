#!/usr/bin/env python3
"""Generation: `hyperclone generate` against transformers' generate, greedy, KV cache on both.

    PY=$(scripts/pyenv.sh | tail -1)
    "$PY" benches/generate_vs_torch.py [MODEL_DIR] [--threads 2] [--tokens 64] [--repeat 3] [--prompt TEXT]

MODEL_DIR defaults to the SmolLM2-135M folder made by tests/fixtures/smollm2.py (any folder
with tokenizer.json works, e.g. a clone). Both sides in float32 on the same number of
threads, each in its own process so that its peak RSS is its own (os.wait4's ru_maxrss):
  * rust:  `hyperclone generate MODEL --prompt P --max-tokens N`, RAYON_NUM_THREADS=T: the
           process's wall time with --max-tokens 1 (load and prompt: the first token) and
           with N; their difference over N - 1 tokens is the time per decoded token.
  * torch: AutoModelForCausalLM (sdpa) and its tokenizer, torch.set_num_threads(T): the load,
           then model.generate(do_sample=False, max_new_tokens=1 and N) timed in process; the
           first token is load + generate(1), the time per token as above.
Each side runs once untimed first (the first run pays for reading the files), then --repeat
times (default 3); the figures are medians, the peak RSS the largest.
Both stop early at the model's end-of-sequence token. The report gives both continuations'
agreement (greedy decoding of the same function agrees until an argmax near-tie). The binary
is ${HYPERCLONE_BIN:-target/release/hyperclone}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The history of the Roman Empire"


def child(cmd: list[str], env: dict) -> tuple[str, float, int]:
    """(stdout, wall seconds, peak RSS in MiB) of one child process, reaped with wait4."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    # Generation prints little, so reading after exit cannot fill the pipes.
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    if proc.returncode != 0:
        sys.exit(f"`{' '.join(cmd)}` exited {proc.returncode}:\n{err}")
    return out, wall, usage.ru_maxrss // 1024


def default_model() -> Path:
    sys.path.insert(0, str(REPO / "tests" / "fixtures"))
    import smollm2

    return smollm2.convert(smollm2.DEFAULT_OUT)


def torch_side(model_dir: str, prompt: str, tokens: int, threads: int, repeat: int) -> None:
    """Runs in the child: prints one JSON line (load s, median generate-1 and generate-N s, text)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    load = time.perf_counter() - start
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    eos = model.config.eos_token_id

    def gen(n: int) -> tuple[float, list[int]]:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**ids, do_sample=False, max_new_tokens=n, eos_token_id=eos,
                                 pad_token_id=eos if isinstance(eos, int) else None, use_cache=True)
        return time.perf_counter() - start, out[0, ids["input_ids"].shape[1]:].tolist()

    gen(1)  # warm-up
    ones, fulls = [], []
    for _ in range(repeat):
        ones.append(gen(1)[0])
        t, new = gen(tokens)
        fulls.append(t)
    text = tok.decode(new, skip_special_tokens=True)
    print(json.dumps({"load": load, "one": statistics.median(ones), "full": statistics.median(fulls),
                      "new_tokens": len(new), "text": text,
                      "torch": torch.__version__, "transformers": transformers.__version__}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", type=Path, help="HF model folder (default: SmolLM2-135M)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both sides (default 2)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens to generate (default 64)")
    ap.add_argument("--prompt", default=PROMPT, help=f"prompt (default {PROMPT!r})")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each length, median (default 3)")
    ap.add_argument("--torch-side", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tokens < 2:
        sys.exit("--tokens must be at least 2 (the time per token is the difference to 1)")
    model_dir = str((args.model or default_model()).resolve())
    if args.torch_side:
        torch_side(model_dir, args.prompt, args.tokens, args.threads, args.repeat)
        return

    binary = Path(os.environ.get("HYPERCLONE_BIN", REPO / "target" / "release" / "hyperclone"))
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        sys.exit(f"hyperclone binary not found at {binary}: run `cargo build --release` or set HYPERCLONE_BIN")
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))

    rust_cmd = [str(binary), "generate", model_dir, "--prompt", args.prompt, "--max-tokens"]
    child(rust_cmd + ["1"], env)  # warm-up: the first run pays for reading the files
    ones, fulls, rss = [], [], 0
    for _ in range(args.repeat):
        ones.append(child(rust_cmd + ["1"], env)[1])
        rust_out, wall, peak = child(rust_cmd + [str(args.tokens)], env)
        fulls.append(wall)
        rss = max(rss, peak)
    rust_one, rust_full, rust_rss = statistics.median(ones), statistics.median(fulls), rss
    rust_text = rust_out.rstrip("\n")[len(args.prompt):]
    torch_out, _, torch_rss = child(
        [sys.executable, __file__, model_dir, "--torch-side", "--threads", str(args.threads),
         "--tokens", str(args.tokens), "--prompt", args.prompt, "--repeat", str(args.repeat)], env)
    t = json.loads(torch_out.strip().splitlines()[-1])

    # Tokens rust generated: its continuation re-tokenized would be ambiguous, so count the
    # torch side's when the texts agree, else assume the full count (no early stop seen).
    same = rust_text == t["text"]
    common = next((i for i, (a, b) in enumerate(zip(rust_text, t["text"])) if a != b),
                  min(len(rust_text), len(t["text"])))
    n = t["new_tokens"] if same else args.tokens
    rust_per_token = (rust_full - rust_one) / max(n - 1, 1)
    torch_per_token = (t["full"] - t["one"]) / max(t["new_tokens"] - 1, 1)
    torch_first = t["load"] + t["one"]
    print(f"model {model_dir}")
    print(f"float32, {args.threads} threads each, greedy, {args.tokens} new tokens at most, median of "
          f"{args.repeat} after a warm-up; torch {t['torch']}, transformers {t['transformers']} (sdpa)")
    print(f"{'':8} {'first token s':>14} {'ms/token':>9} {'peak RSS MiB':>13}")
    print(f"{'rust':8} {rust_one:>14.2f} {rust_per_token * 1e3:>9.1f} {rust_rss:>13}   (whole process)")
    print(f"{'torch':8} {torch_first:>14.2f} {torch_per_token * 1e3:>9.1f} {torch_rss:>13}   "
          f"(load {t['load']:.2f} s + generate 1, in process)")
    print(f"rust / torch: first token {rust_one / torch_first:.2f}, per token {rust_per_token / torch_per_token:.2f}, "
          f"peak RSS {rust_rss / torch_rss:.2f}")
    if same:
        print(f"same continuation ({t['new_tokens']} tokens)")
    else:
        print(f"continuations differ after {common} characters:\n  rust:  {rust_text!r}\n  torch: {t['text']!r}")


if __name__ == "__main__":
    main()
