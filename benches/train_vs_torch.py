"""Training throughput: `hyperclone train` against PyTorch on the same model, batch and
sequence length, same thread count, in one run.

    PY=$(scripts/pyenv.sh | tail -1); $PY benches/train_vs_torch.py [--shape S] [--threads 2] [--steps 12]

--shape default: a small Llama (hidden 256, 4 layers, 4 heads / 2 kv heads, FFN 688) with the
SmolLM2 tokenizer's 49152-token vocabulary (tied head), batch 8 x 128.
--shape study-small / study-large: the convergence study's models (`hyperclone experiment`):
hidden 64 (tied) and its x2 clone, hidden 128 (untied), 4 layers, vocabulary 4096 (the
bundled BPE), batch 16 x 128.
f32, AdamW. Both sides skip the first 2 steps (warm-up) and report the median tokens/s of the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "fixtures"))

COMMON = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 4,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
}
SHAPES = {
    "default": dict(COMMON, hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=49152, tie_word_embeddings=True),
    "study-small": dict(COMMON, hidden_size=64, intermediate_size=172, num_attention_heads=2, num_key_value_heads=1,
                        vocab_size=4096, tie_word_embeddings=True),
    "study-large": dict(COMMON, hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=2,
                        vocab_size=4096, tie_word_embeddings=False),
}
CONFIG = SHAPES["default"]


def rust(binary: Path, work: Path, tokenizer: Path, steps: int, batch: int, seq: int, threads: int) -> float:
    (work / "cfg.json").write_text(json.dumps(CONFIG))
    text = (REPO / "README.md").read_text() + (REPO / "tests" / "fixtures" / "families" / "NOTES.md").read_text()
    (work / "data").mkdir(exist_ok=True)
    (work / "data" / "a.txt").write_text(text * 4)
    (work / "data" / "b.txt").write_text(text)
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    subprocess.run(
        [str(binary), "train", "--init-config", "cfg.json", "--tokenizer", str(tokenizer), "--data", "data",
         "--out", "out", "--force", "--steps", str(steps), "--batch", str(batch), "--seq", str(seq), "--eval-every", "1000000",
         "--save-every", "1000000"],
        cwd=work, env=env, check=True, capture_output=True,
    )
    rows = [json.loads(l) for l in (work / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens_per_s" in r]  # the step-0 evaluation has no step time
    return statistics.median(r["tokens_per_s"] for r in steps[2:])


def torch_side(steps: int, batch: int, seq: int, threads: int) -> float:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in CONFIG.items() if k not in ("architectures", "model_type")}))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    rates = []
    for _ in range(steps):
        ids = torch.randint(0, CONFIG["vocab_size"], (batch, seq + 1))
        t0 = time.perf_counter()
        out = model(input_ids=ids[:, :-1], labels=ids[:, 1:].contiguous())
        # transformers shifts labels itself; pass inputs as labels for the same token count.
        loss = out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        rates.append(batch * seq / (time.perf_counter() - t0))
    return statistics.median(rates[2:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=None, help="default: 8 (study shapes: 16)")
    args = ap.parse_args()
    global CONFIG
    CONFIG = SHAPES[args.shape]
    if args.batch is None:
        args.batch = 8 if args.shape == "default" else 16
    binary = Path(os.environ.get("HYPERCLONE_BIN", REPO / "target" / "release" / "hyperclone"))
    if args.shape == "default":
        import smollm2  # tests/fixtures/smollm2.py: SmolLM2's tokenizer gives a real vocabulary

        tokenizer = smollm2.convert(smollm2.DEFAULT_OUT) / "tokenizer.json"
    else:
        tokenizer = REPO / "assets" / "shakespeare-tiny" / "tokenizer.json"
    with tempfile.TemporaryDirectory() as tmp:
        r = rust(binary, Path(tmp), tokenizer, args.steps, args.batch, args.seq, args.threads)
    t = torch_side(args.steps, args.batch, args.seq, args.threads)
    c = CONFIG
    print(f"model ({args.shape}): llama hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, vocab {c['vocab_size']}, "
          f"tied {c['tie_word_embeddings']}; f32; batch {args.batch} x {args.seq}; {args.threads} threads")
    print(f"{'':10} {'tokens/s':>10}")
    print(f"{'rust':10} {r:10.0f}")
    print(f"{'torch':10} {t:10.0f}")
    print(f"rust / torch = {r / t:.2f}")


if __name__ == "__main__":
    main()
