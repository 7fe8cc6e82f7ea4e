#!/usr/bin/env python3
"""Continue training a HyperClone (or any Hugging Face causal LM folder) with PyTorch FSDP2.

    torchrun --nproc_per_node N examples/continue_fsdp.py \
        --model CLONE --data TEXT_DIR_OR_FILE --steps S --out OUT \
        [--lr 3e-5] [--batch-size 8] [--seq-len 128] [--seed 0] \
        [--mixed-precision auto|bf16|off] [--warmup 0] [--weight-decay 0.0] \
        [--max-grad-norm 1.0] [--force]

CLONE is a folder written by `hyperclone clone SRC CLONE --factor 2 --dtype f32` (any
folder that AutoModelForCausalLM.from_pretrained loads works). Every rank loads the model
in float32, `fully_shard` is applied to every decoder layer and then to the root, so
parameters, gradients and AdamW state are sharded over the ranks and the f32 parameters
are the master weights. Backend: nccl on CUDA (one GPU per rank, LOCAL_RANK), else gloo
on the CPU.

--mixed-precision: bf16 computes forward/backward in bfloat16 through FSDP2's
MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=f32) while the optimizer updates the
f32 shards; off computes in f32. auto = bf16 on a CUDA device that supports it, off on
the CPU: there bf16 works (gloo, tested) but gave no measured gain, and f32 keeps step 1's
loss equal to the small model's (docs/continue-training.md). Never pure bf16: it drops
small AdamW updates (measured there).

Tokens: the model folder's own tokenizer if it has one (tokenizer.json or
tokenizer_config.json). Otherwise a byte fallback that stays inside the vocabulary: raw
bytes when vocab_size >= 256, else every distinct byte of the corpus gets its sorted rank
(modulo vocab_size, with a warning if the corpus has more distinct bytes than that).
--data is a text file or a folder (every *.txt under it, sorted). The whole corpus becomes
one token stream; at step s every rank draws its own --batch-size random windows of
--seq-len tokens (the windows of all ranks come from one generator seeded by --seed and s,
rank r takes the r-th slice), so ranks read different text and a run is reproducible.

Rank 0 logs the loss of every step (the mean over ranks, computed before that step's
update) and writes OUT/training_log.jsonl. At the end the full state dict is gathered to
CPU (get_model_state_dict, full_state_dict=True, cpu_offload=True) and rank 0 writes OUT
with save_pretrained (safetensors, f32) plus the tokenizer files of CLONE, so OUT reloads
with AutoModelForCausalLM.from_pretrained, and CLONE's model card (README.md) with a
"Continued training" section added. AdamW starts fresh (nothing of the small
model's optimizer state exists in a HF folder).

Multi-GPU on one node: torchrun --nproc_per_node 8 examples/continue_fsdp.py ...
Several nodes: torchrun --nnodes M --node_rank R --rdzv_endpoint HOST:PORT ... (standard
torchrun; nothing here is node-specific).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

DEFAULT_LR = 3e-5

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)


def keep_card(model_dir: Path, out: Path, script: str, args, sequences: int, bf16: bool,
              first_loss: float, last_loss: float) -> None:
    """Write MODEL's model card (README.md: the clone's provenance, recipe and Hub metadata)
    into OUT, with a section on the training since: the card's "computes the same function"
    now describes the starting point, not these weights."""
    card = model_dir / "README.md"
    if not card.is_file():
        return
    text = card.read_text(encoding="utf-8").rstrip("\n")
    text += (
        "\n\n## Continued training\n\n"
        f"The weights in this folder are the model above trained further with `examples/{script}`: "
        f"{args.steps} steps of AdamW (lr {args.lr:g}, warmup {args.warmup}, weight decay "
        f"{args.weight_decay:g}), {sequences} sequences of {args.seq_len} tokens per step, "
        f"{'bf16 mixed precision' if bf16 else 'f32'}, seed {args.seed}; training loss "
        f"{first_loss:.4f} -> {last_loss:.4f}. Training changes the function: what the card "
        "says above about computing the source's function describes the starting point.\n"
    )
    (out / "README.md").write_text(text, encoding="utf-8")


# --- arguments -------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Continue training a HyperClone with PyTorch FSDP2 (run under torchrun).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, type=Path, help="HF model folder (e.g. a clone)")
    p.add_argument("--data", required=True, type=Path, help="text file, or folder of *.txt")
    p.add_argument("--steps", required=True, type=int, help="optimizer steps")
    p.add_argument("--out", required=True, type=Path, help="output folder (HF format)")
    # 3e-5: docs/continue-training.md measured fresh AdamW at 3e-4 raising a clone's
    # held-out loss; continue near the small model's final learning rate.
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help="AdamW learning rate")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", choices=("auto", "bf16", "off"), default="auto",
                   help="bf16 compute with f32 master weights, or f32 throughout")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps, then constant")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    a = p.parse_args(argv)

    if not (a.model / "config.json").is_file():
        p.error(f"--model {a.model}: no config.json there (expected a Hugging Face model folder)")
    if not a.data.exists():
        p.error(f"--data {a.data}: no such file or folder")
    if a.steps < 1:
        p.error(f"--steps must be >= 1, got {a.steps}")
    if a.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {a.batch_size}")
    if a.seq_len < 2:
        p.error(f"--seq-len must be >= 2, got {a.seq_len}")
    if not (a.lr > 0 and math.isfinite(a.lr)):
        p.error(f"--lr must be a positive number, got {a.lr}")
    if a.warmup < 0:
        p.error(f"--warmup must be >= 0, got {a.warmup}")
    if a.out.exists() and not a.out.is_dir():
        p.error(f"--out {a.out} exists and is not a folder")
    if a.out.is_dir() and any(a.out.iterdir()) and not a.force:
        p.error(f"--out {a.out} exists and is not empty (pass --force to write into it)")
    if a.out.resolve() == a.model.resolve():
        p.error("--out must differ from --model")
    return a


# --- data ------------------------------------------------------------------------------


def text_files(data: Path) -> list[Path]:
    if data.is_file():
        return [data]
    files = sorted(f for f in data.rglob("*.txt") if f.is_file())
    if not files:
        raise SystemExit(f"error: --data {data}: no *.txt files under this folder")
    return files


def has_tokenizer(model_dir: Path) -> bool:
    return (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer_config.json").is_file()


def load_tokens(model_dir: Path, data: Path, vocab_size: int) -> tuple[torch.Tensor, str]:
    """The whole corpus as one int64 token stream, and how it was tokenized."""
    files = text_files(Path(data))
    model_dir = Path(model_dir)
    if has_tokenizer(model_dir):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        sep = [tok.eos_token_id] if tok.eos_token_id is not None else []
        ids: list[int] = []
        for f in files:
            ids += tok(f.read_text(encoding="utf-8", errors="replace"),
                       add_special_tokens=False)["input_ids"] + sep
        out = torch.tensor(ids, dtype=torch.long)
        if out.numel() and int(out.max()) >= vocab_size:
            raise SystemExit(f"error: the tokenizer of {model_dir} yields id {int(out.max())} "
                             f">= vocab_size {vocab_size}")
        how = f"tokenizer of {model_dir.name} ({type(tok).__name__})"
    else:
        raw = b"".join(f.read_bytes() for f in files)
        buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
        if vocab_size >= 256:
            out, how = buf, "bytes (no tokenizer in the model folder; vocab >= 256)"
        else:
            present = torch.unique(buf)  # sorted
            table = torch.zeros(256, dtype=torch.long)
            table[present] = torch.arange(len(present)) % vocab_size
            out = table[buf]
            how = f"chars: {len(present)} distinct bytes ranked into vocab {vocab_size}"
            if len(present) > vocab_size:
                how += " (folded modulo vocab: some bytes share an id)"
                print(f"warning: {how}", file=sys.stderr)
    return out, how


def batch(tokens: torch.Tensor, step: int, rank: int, world: int, batch_size: int,
          seq_len: int, seed: int) -> torch.Tensor:
    """Rank `rank`'s [batch_size, seq_len] windows for step `step` (1-based)."""
    n = tokens.numel() - seq_len
    if n < 1:
        raise SystemExit(f"error: the corpus has {tokens.numel()} tokens, fewer than "
                         f"--seq-len + 1 = {seq_len + 1}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, n + 1, (world * batch_size,), generator=g)
    mine = starts[rank * batch_size:(rank + 1) * batch_size]
    return torch.stack([tokens[s:s + seq_len] for s in mine.tolist()])


# --- training --------------------------------------------------------------------------


def decoder_layers(model) -> list[torch.nn.Module]:
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        m = model
        try:
            for part in path.split("."):
                m = getattr(m, part)
        except AttributeError:
            continue
        return list(m)
    raise SystemExit(f"error: cannot find the decoder layers of {type(model).__name__}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch.distributed as dist

    if not dist.is_available():
        raise SystemExit("error: this torch build has no torch.distributed")
    if "RANK" not in os.environ:
        raise SystemExit("error: run under torchrun, e.g. "
                         "`torchrun --nproc_per_node 2 examples/continue_fsdp.py ...`")

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    log = print if rank == 0 else (lambda *a, **k: None)
    if rank != 0:
        import transformers

        transformers.utils.logging.disable_progress_bar()

    if args.mixed_precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    else:
        bf16 = args.mixed_precision == "bf16"
    if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SystemExit("error: --mixed-precision bf16: this GPU does not support bfloat16")

    torch.manual_seed(args.seed)
    config = AutoConfig.from_pretrained(args.model)
    tokens, how = load_tokens(args.model, args.data, config.vocab_size)
    log(f"data: {tokens.numel()} tokens from {args.data} via {how}")
    batch(tokens, 1, 0, 1, 1, args.seq_len, args.seed)  # fails early if the corpus is too short

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.config.use_cache = False
    model.train()  # (dropout stays whatever the config says; llama-style configs have none)
    # No model.to(device): fully_shard moves each decoder layer to the mesh's device as it
    # shards it, so on a GPU the unsharded model never has to fit at once.
    n_params = sum(p.numel() for p in model.parameters())

    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    log(f"model: {args.model} ({type(model).__name__}, {n_params / 1e6:.2f}M parameters), "
        f"FSDP2 over {world} rank(s) on {device.type}, compute "
        f"{'bf16 (f32 master weights)' if bf16 else 'f32'}")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) if args.warmup else 1.0)

    records = []
    t0 = time.time()
    for step in range(1, args.steps + 1):
        ids = batch(tokens, step, rank, world, args.batch_size, args.seq_len, args.seed).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if args.max_grad_norm > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
        else:
            gnorm = float("nan")
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

        mean = loss.detach().float().clone()
        dist.all_reduce(mean)  # SUM: gloo has no AVG
        mean = mean.item() / world
        if not math.isfinite(mean):
            raise SystemExit(f"error: loss is {mean} at step {step}")
        rec = dict(step=step, loss=mean, lr=lr, grad_norm=gnorm,
                   tokens=step * world * args.batch_size * args.seq_len,
                   seconds=round(time.time() - t0, 3))
        records.append(rec)
        log(f"step {step}/{args.steps} loss {mean:.6f} lr {lr:.3g} grad_norm {gnorm:.3f} "
            f"{rec['seconds']:.1f}s", flush=True)

    state = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        # A plain (unsharded) model of the same class writes the folder, so save_pretrained
        # sees ordinary tensors and the config untouched by FSDP.
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(state, assign=True, strict=True)
        plain.config.use_cache = True
        plain.save_pretrained(args.out, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (args.model / name).is_file():
                shutil.copy2(args.model / name, args.out / name)
        keep_card(args.model, args.out, "continue_fsdp.py", args, args.batch_size * world, bf16,
                  records[0]["loss"], records[-1]["loss"])
        with open(args.out / "training_log.jsonl", "w") as fh:
            fh.write(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()},
                                     world_size=world, device=device.type, bf16=bf16,
                                     tokenization=how)) + "\n")
            for rec in records:
                fh.write(json.dumps(rec) + "\n")
        log(f"saved {args.out} (loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}, "
            f"{time.time() - t0:.1f}s)")
    dist.barrier()
    # Free the FSDP model and its optimizer now: reference cycles keep the model (with the
    # tensors and collective handles its FSDP state holds) alive past main() until a
    # garbage collection, which may otherwise be the one at interpreter shutdown. A rare
    # abort there (rank 1, SIGABRT "terminate called without an active exception" after
    # destroy_process_group: 2 of 9 runs of its test file in one batch, torch 2.12 on CPU;
    # none in 90 runs since) is the known class of gloo objects torn down while Python is
    # finalizing. (The device mesh, and through it the process group, stays cached by
    # torch until exit either way.)
    del model, opt, sched, state
    gc.collect()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
