#!/usr/bin/env python3
"""Continue training a HyperClone with the transformers Trainer (one process).

    python examples/continue_trainer.py --model CLONE --data TEXT_DIR_OR_FILE --steps S \
        --out OUT [--lr 3e-5] [--batch-size 8] [--seq-len 128] [--seed 0] \
        [--mixed-precision auto|bf16|off] [--force]

The same continuation as examples/continue_fsdp.py, with the same tokenization and the
same random windows: --batch-size B here reads exactly the windows that continue_fsdp.py
reads over N ranks with --batch-size B/N, so the two runs log the same losses up to float
rounding (tested). f32 weights, AdamW (adamw_torch), constant learning rate after
--warmup, bf16 autocast when --mixed-precision is bf16 (auto = bf16 on a CUDA device that
supports it, f32 on the CPU). OUT is written with Trainer.save_model (safetensors) plus
the tokenizer files, so it reloads with AutoModelForCausalLM.from_pretrained, and CLONE's
model card (README.md) with a "Continued training" section added. One process
only; for several GPUs use continue_fsdp.py (launching this under torchrun is untested).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("continue_fsdp", HERE / "continue_fsdp.py")
cf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cf)


class Windows(torch.utils.data.Dataset):
    """Step s's windows, in order (continue_fsdp.batch with one rank)."""

    def __init__(self, tokens, steps, batch_size, seq_len, seed):
        self.tokens, self.bs, self.seq, self.seed = tokens, batch_size, seq_len, seed
        self.n = steps * batch_size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        step, j = divmod(i, self.bs)
        ids = cf.batch(self.tokens, step + 1, 0, 1, self.bs, self.seq, self.seed)[j]
        return {"input_ids": ids, "labels": ids.clone()}


def main(argv=None) -> int:
    args = cf.parse_args(argv)
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

    cuda = torch.cuda.is_available()
    if args.mixed_precision == "auto":
        bf16 = cuda and torch.cuda.is_bf16_supported()
    else:
        bf16 = args.mixed_precision == "bf16"

    config = AutoConfig.from_pretrained(args.model)
    tokens, how = cf.load_tokens(args.model, args.data, config.vocab_size)
    print(f"data: {tokens.numel()} tokens via {how}")
    data = Windows(tokens, args.steps, args.batch_size, args.seq_len, args.seed)
    data[0]  # fails early if the corpus is too short

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.config.use_cache = False
    targs = TrainingArguments(
        output_dir=str(args.out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup" if args.warmup else "constant",
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        optim="adamw_torch",
        bf16=bf16,
        use_cpu=not cuda,
        seed=args.seed,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=True,
    )

    class InOrder(Trainer):  # the windows are random already; keep their order
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    trainer = InOrder(model=model, args=targs, train_dataset=data)
    trainer.train()
    model.config.use_cache = True
    trainer.save_model(str(args.out))
    shutil.rmtree(args.out / "trainer", ignore_errors=True)
    for name in cf.TOKENIZER_FILES:
        if (args.model / name).is_file():
            shutil.copy2(args.model / name, args.out / name)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    cf.keep_card(args.model, args.out, "continue_trainer.py", args, args.batch_size, bf16,
                 losses[0], losses[-1])
    print(f"saved {args.out} (loss {losses[0]:.4f} -> {losses[-1]:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
