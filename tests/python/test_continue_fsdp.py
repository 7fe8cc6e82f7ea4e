"""The continuation examples: examples/continue_fsdp.py (FSDP2 under torchrun, 2 CPU ranks
over gloo) and examples/continue_trainer.py (transformers Trainer), on a tiny llama
fixture cloned x2 (noisy variant, f32) by the Rust binary.

Checked: the first logged loss equals the SMALL model's loss on the same windows (the
clone is function-preserving and step 1's loss is computed before any update); the loss
falls; OUT reloads with from_pretrained, in f32, with finite logits that differ from the
clone's; and the Trainer run, fed the same global batch, logs the same losses and ends
at the same weights as the 2-rank FSDP run (so FSDP's sharded gradients and optimizer
match single-process training). Skipped only where torch.distributed (gloo) is missing.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES, REPO, run_clone

pytestmark = pytest.mark.slow

EXAMPLES = REPO / "examples"
FIXTURE = FIXTURES / "tiny" / "llama-gqa-untied"  # vocab 96, no tokenizer: char fallback
STEPS, PER_RANK, RANKS, SEQ, LR = 8, 4, 2, 32, 3e-3
TIMEOUT = 240

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available",
                allow_module_level=True)

LINES = [
    "When in the chronicle of wasted time",
    "I see descriptions of the fairest wights,",
    "And beauty making beautiful old rhyme",
    "In praise of ladies dead, and lovely knights,",
    "Then, in the blazon of sweet beauty's best,",
    "Of hand, of foot, of lip, of eye, of brow,",
    "I see their antique pen would have express'd",
    "Even such a beauty as you master now.",
]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cf = load_example("continue_fsdp")


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env, cwd=REPO, **kw)
    if proc.returncode != 0:
        pytest.fail(f"`{' '.join(map(str, cmd))}` exited {proc.returncode}\n"
                    f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}",
                    pytrace=False)
    return proc


@pytest.fixture(scope="module")
def setup(hyperclone_bin, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("continue")
    clone = tmp / "clone"
    # The noisy variant, as docs/continue-training.md recommends (a symmetric clone trained
    # without dropout keeps its copies identical); it is function-preserving all the same.
    run_clone(hyperclone_bin, FIXTURE, clone, "--factor", 2, "--variant", "noisy", "--dtype", "f32")
    corpus = tmp / "corpus.txt"
    # 64 stanzas, lines rotated so windows differ: ~18 KB of text, 50 distinct bytes.
    corpus.write_text("\n".join(f"{i}. " + " ".join(LINES[(i + j) % len(LINES)]
                                                     for j in range(4))
                                for i in range(64 * len(LINES))) + "\n")
    return tmp, clone, corpus


def common(clone, corpus, out) -> list:
    return ["--model", clone, "--data", corpus, "--out", out, "--steps", STEPS,
            "--seq-len", SEQ, "--lr", LR, "--seed", 0, "--mixed-precision", "off"]


@pytest.fixture(scope="module")
def fsdp_run(setup):
    tmp, clone, corpus = setup
    out = tmp / "fsdp"
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", RANKS, EXAMPLES / "continue_fsdp.py",
                *common(clone, corpus, out), "--batch-size", PER_RANK])
    lines = (out / "training_log.jsonl").read_text().splitlines()
    head, recs = json.loads(lines[0]), [json.loads(x) for x in lines[1:]]
    return out, head, recs, proc.stdout


@pytest.fixture(scope="module")
def trainer_run(setup):
    tmp, clone, corpus = setup
    out = tmp / "trainer"
    proc = run([sys.executable, EXAMPLES / "continue_trainer.py",
                *common(clone, corpus, out), "--batch-size", RANKS * PER_RANK])
    return out, proc.stdout


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def probe_ids(corpus: Path, clone: Path):
    tokens, _ = cf.load_tokens(clone, corpus, 96)
    return cf.batch(tokens, 999, 0, 1, 2, SEQ, 0)


def test_fsdp_first_loss_is_the_small_models(setup, fsdp_run):
    tmp, clone, corpus = setup
    out, head, recs, stdout = fsdp_run
    assert head["world_size"] == RANKS and head["bf16"] is False and "chars" in head["tokenization"]
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in recs), recs
    tokens, _ = cf.load_tokens(clone, corpus, 96)
    small = load(FIXTURE)
    with torch.no_grad():
        losses = [small(input_ids=(b := cf.batch(tokens, 1, r, RANKS, PER_RANK, SEQ, 0)),
                        labels=b).loss.item() for r in range(RANKS)]
    expected = sum(losses) / RANKS
    assert abs(recs[0]["loss"] - expected) < 1e-4, (recs[0]["loss"], expected)
    # Ranks read different windows.
    assert not torch.equal(cf.batch(tokens, 1, 0, RANKS, PER_RANK, SEQ, 0),
                           cf.batch(tokens, 1, 1, RANKS, PER_RANK, SEQ, 0))
    assert f"step {STEPS}/{STEPS} loss" in stdout


def test_fsdp_loss_falls(fsdp_run):
    _, _, recs, _ = fsdp_run
    first, last = recs[0]["loss"], recs[-1]["loss"]
    assert last < first - 0.1, [round(r["loss"], 4) for r in recs]


def test_fsdp_output_reloads_and_trained(setup, fsdp_run):
    tmp, clone, corpus = setup
    out = fsdp_run[0]
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    ids = probe_ids(corpus, clone)
    trained, start = load(out), load(clone)
    assert trained.config.hidden_size == start.config.hidden_size == 64
    assert all(p.dtype == torch.float32 for p in trained.parameters())
    with torch.no_grad():
        a, b = trained(input_ids=ids).logits, start(input_ids=ids).logits
    assert torch.isfinite(a).all()
    assert (a - b).abs().max().item() > 1e-2, "the saved model equals the clone: it did not train"
    assert_card_kept(clone, out, "continue_fsdp.py")


def assert_card_kept(clone: Path, out: Path, script: str):
    # The clone's model card (provenance, recipe, Hub metadata) survives, with the training
    # since said below it.
    card = (out / "README.md").read_text()
    assert card.startswith((clone / "README.md").read_text().rstrip("\n")), card[:400]
    tail = card.split("## Continued training", 1)[1]
    assert f"examples/{script}" in tail and f"{STEPS} steps" in tail and f"lr {LR:g}" in tail, tail


def test_trainer_matches_fsdp(setup, fsdp_run, trainer_run):
    tmp, clone, corpus = setup
    out_t, stdout = trainer_run
    assert "saved" in stdout
    _, _, recs, _ = fsdp_run
    # Trainer reads the same global batch (all ranks' windows) each step: same losses.
    logged = stdout.splitlines()
    t_losses = [float(json.loads(line.replace("'", '"'))["loss"]) for line in logged
                if line.startswith("{'loss'")]
    assert len(t_losses) == STEPS, stdout
    for r, t in zip(recs, t_losses):
        assert abs(r["loss"] - t) < 2e-3, (r["loss"], t)  # Trainer prints 4 digits
    ids = probe_ids(corpus, clone)
    with torch.no_grad():
        a = load(fsdp_run[0])(input_ids=ids).logits
        b = load(out_t)(input_ids=ids).logits
        c = load(clone)(input_ids=ids).logits
    assert torch.isfinite(b).all()
    moved = (b - c).abs().max().item()
    assert moved > 1e-2
    # Measured: 1.7e-5 to 3e-5 (weights within 1e-6) after 8 steps that moved logits by ~10.
    assert (a - b).abs().max().item() < 1e-3, "FSDP and Trainer ended at different weights"
    assert_card_kept(clone, out_t, "continue_trainer.py")


def test_fsdp_bf16_mixed_precision(setup, fsdp_run):
    """bf16 compute over f32 masters runs on gloo, starts at the f32 loss, saves f32."""
    tmp, clone, corpus = setup
    out = tmp / "fsdp-bf16"
    args = common(clone, corpus, out)
    args[args.index("--mixed-precision") + 1] = "bf16"
    args[args.index("--steps") + 1] = 2
    run([sys.executable, "-m", "torch.distributed.run", "--standalone",
         "--nproc_per_node", RANKS, EXAMPLES / "continue_fsdp.py", *args,
         "--batch-size", PER_RANK])
    lines = (out / "training_log.jsonl").read_text().splitlines()
    head, recs = json.loads(lines[0]), [json.loads(x) for x in lines[1:]]
    assert head["bf16"] is True and len(recs) == 2
    f32 = fsdp_run[2][0]["loss"]
    assert abs(recs[0]["loss"] - f32) < 2e-2 * f32, (recs[0]["loss"], f32)
    assert all(p.dtype == torch.float32 for p in load(out).parameters())


def test_default_lr_is_the_documented_one(tmp_path):
    # docs/continue-training.md runs both examples with one --lr and explains why (fresh
    # AdamW at 3e-4 raised the held-out loss); a bare run must get the same, as must the
    # usage lines at the top of both scripts.
    doc = (REPO / "docs" / "continue-training.md").read_text()
    documented = set(re.findall(r"examples/continue_\w+\.py[^`]*?--lr (\S+)", doc, re.S))
    assert len(documented) == 1, documented
    lr = float(documented.pop())
    args = cf.parse_args(["--model", str(FIXTURE), "--data", str(FIXTURE / "config.json"),
                          "--out", str(tmp_path / "o"), "--steps", "1"])
    assert args.lr == lr
    for name in ("continue_fsdp.py", "continue_trainer.py"):
        usage = (EXAMPLES / name).read_text().split('"""')[1]
        assert f"[--lr {documented_text(lr)}]" in usage, name


def documented_text(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def test_bad_arguments(setup, tmp_path, capsys):
    _, clone, corpus = setup
    ok = ["--model", clone, "--data", corpus, "--out", tmp_path / "o", "--steps", "1"]
    cases = {
        "--steps must be >= 1": ["--steps", "0"],
        "no config.json": ["--model", tmp_path],
        "--data": ["--data", tmp_path / "missing.txt"],
        "--lr must be a positive": ["--lr", "-1"],
        "--seq-len must be >= 2": ["--seq-len", "1"],
    }
    for message, override in cases.items():
        argv = [str(x) for x in ok + override]
        with pytest.raises(SystemExit) as e:
            cf.parse_args(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("x")
    with pytest.raises(SystemExit):
        cf.parse_args([str(x) for x in ok])
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="fewer than"):
        cf.batch(torch.arange(10), 1, 0, 1, 1, 32, 0)
