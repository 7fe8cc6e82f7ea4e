"""Every family beyond the Llama layout (tests/fixtures/families): `hyperclone clone` output
loads in transformers and computes the source's function, for n in {2, 3}, every variant,
and an FFN factor different from n.

The fixtures and their exact-f64 goldens come from tests/fixtures/make_family_fixtures.py.
"""

from __future__ import annotations

import functools
import json

import pytest

import check_clone as cc
from conftest import FIXTURES, run_clone

FAMILIES = FIXTURES / "families"
MANIFEST = json.loads((FAMILIES / "MANIFEST.json").read_text())["fixtures"]
VARIANTS = ("symmetric", "noisy", "diagonal", "noisy-diagonal")
CASES = [(fx["name"], n, v, None) for fx in MANIFEST for n in (2, 3) for v in VARIANTS]
CASES += [(fx["name"], 2, "noisy", 3) for fx in MANIFEST]


@functools.lru_cache(maxsize=None)
def source(name: str):
    model = cc.load_model(FAMILIES / name)
    ids = cc.default_ids(model.config.vocab_size)
    return model, ids, cc.forward(model, ids)


@pytest.mark.parametrize("name,n,variant,m", CASES, ids=lambda v: str(v))
def test_family_clone_preserves_function(name, n, variant, m, hyperclone_bin, tmp_path):
    dst = tmp_path / "dst"
    args = ["--factor", n, "--variant", variant] + (["--ffn-factor", m] if m else [])
    run_clone(hyperclone_bin, FAMILIES / name, dst, *args)
    model_s, ids, out_s = source(name)
    report = cc.check(FAMILIES / name, dst, n=n, m=m or n, ids=ids, model_s=model_s, out_s=out_s)
    assert report["pass"], cc.format_report(report)


def test_every_family_is_covered():
    # The supported list the binary prints must include every fixture's model_type.
    types = {fx["model_type"] for fx in MANIFEST}
    assert {"gpt2", "gpt_neox", "opt", "gemma", "gemma2", "olmo2", "phi3", "stablelm", "starcoder2", "phi"} <= types
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"} <= types  # Mixture of Experts
