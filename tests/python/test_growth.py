"""Growth beyond the paper, checked in transformers on every family where it applies:
kept ties (`--keep-tied`), depth (`--depth-factor 2`, alone and with width x2), uneven FFN
growth (x2.5 with width x2), and their combination; `hyperclone verify` (f64) must pass on
the same clones. Where a growth cannot be exact, the refusal must say why in one line.

The expected layer map and the parameter counts are computed here from the formulas in
docs/growth.md, not read from the Rust code.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import check_clone as cc
from conftest import FIXTURES, run_clone

FAMILIES = FIXTURES / "families"
TINY = FIXTURES / "tiny"
MANIFEST = json.loads((FAMILIES / "MANIFEST.json").read_text())["fixtures"]
FAMILY_DIRS = {fx["name"]: FAMILIES / fx["name"] for fx in MANIFEST}
ALL_SOURCES = {**FAMILY_DIRS, **{name: TINY / name for name in ("llama-gqa-tied", "mistral-gqa", "qwen2-gqa", "qwen3-mqa-tied")}}

# Families where a kept tie cannot be exact, and the reason the refusal must name.
TIE_REFUSED = {
    "opt": "eps is fixed",
    "olmo3": "without a norm",
}
# Families whose kept tie is not the plain tile(h)/n of pre-norm blocks: Gemma's embedding
# multiplier (stream at 1/sqrt(n)), Gemma-2's and OLMo-2's post-norms, OLMo-2's un-normed
# readers. Checked for n = 2 and 3 and every variant.
TIE_RESCALED = ("gemma-mqa", "gemma2-gqa", "olmo2-gqa")
VARIANTS = ("symmetric", "noisy", "diagonal", "noisy-diagonal")


def config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


@functools.lru_cache(maxsize=None)
def source(path: Path):
    model = cc.load_model(path)
    ids = cc.default_ids(model.config.vocab_size)
    return model, ids, cc.forward(model, ids)


def tied_copy(src: Path, dst: Path) -> Path:
    """SRC with its head tied to the embedding (the head tensor dropped): a tied model of
    the same family, for families whose fixture is untied."""
    shutil.copytree(src, dst)
    cfg = config(dst)
    cfg["tie_word_embeddings"] = True
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in dst.glob("*.safetensors"):
        tensors = load_file(f)
        head = [k for k in tensors if k in ("lm_head.weight", "embed_out.weight")]
        for k in head:
            del tensors[k]
        save_file(tensors, f, metadata={"format": "pt"})
    return dst


def is_tied(path: Path) -> bool:
    model, _, _ = source(path)
    return bool(getattr(model.config, "tie_word_embeddings", False))


def rust_verify(binary: Path, small: Path, big: Path) -> dict:
    proc = subprocess.run(
        [str(binary), "verify", str(small), str(big), "--dtype", "f64", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stdout)


def check_growth(binary, src: Path, dst: Path, n: int, growth: cc.Growth):
    model_s, ids, out_s = source(src)
    report = cc.check(src, dst, n=n, ids=ids, model_s=model_s, out_s=out_s, growth=growth)
    assert report["pass"], cc.format_report(report)
    v = rust_verify(binary, src, dst)
    assert v["passed"], json.dumps(v, indent=1)


def family_source(name: str, tmp_path: Path, tied: bool) -> Path:
    src = ALL_SOURCES[name]
    if tied and not is_tied(src):
        src = tied_copy(src, tmp_path / "tied-src")
        source.cache_clear()
    return src


def model_type(name: str) -> str:
    return config(ALL_SOURCES[name])["model_type"]


@pytest.mark.parametrize("name", sorted(n for n in ALL_SOURCES if model_type(n) not in TIE_REFUSED))
def test_keep_tied_is_exact_and_stays_tied(name, hyperclone_bin, tmp_path):
    src = family_source(name, tmp_path, tied=True)
    dst = tmp_path / "dst"
    run_clone(hyperclone_bin, src, dst, "--factor", 2, "--keep-tied")
    tensors = load_file(next(dst.glob("*.safetensors")))
    assert "lm_head.weight" not in tensors and "embed_out.weight" not in tensors
    check_growth(hyperclone_bin, src, dst, 2, cc.Growth(keep_tied=True))
    # Parameters: the untied clone's minus the head it no longer stores (vocab x hidden x n).
    untied = tmp_path / "untied"
    run_clone(hyperclone_bin, src, untied, "--factor", 2)
    cfg = config(src)
    hidden = cfg.get("hidden_size") or cfg.get("n_embd")
    count = lambda d: sum(t.size for f in d.glob("*.safetensors") for t in load_file(f).values())
    assert count(untied) - count(dst) == cfg["vocab_size"] * hidden * 2


@pytest.mark.parametrize("name,n,variant", [(f, n, v) for f in TIE_RESCALED for n in (2, 3) for v in VARIANTS],
                         ids=lambda v: str(v))
def test_keep_tied_is_exact_with_a_rescaled_stream(name, n, variant, hyperclone_bin, tmp_path):
    src = family_source(name, tmp_path, tied=True)
    dst = tmp_path / "dst"
    run_clone(hyperclone_bin, src, dst, "--factor", n, "--keep-tied", "--variant", variant)
    tensors = {k: v for f in dst.glob("*.safetensors") for k, v in load_file(f).items()}
    assert "lm_head.weight" not in tensors
    check_growth(hyperclone_bin, src, dst, n, cc.Growth(keep_tied=True))
    # The embedding is tile(E)/n in every family (the head reads it): for Gemma that is
    # not the untied clone's tile(E)/sqrt(n).
    emb = load_file(src / "model.safetensors")["model.embed_tokens.weight"]
    want = np.concatenate([emb] * n, axis=1) / n
    np.testing.assert_allclose(tensors["model.embed_tokens.weight"], want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", sorted(n for n in ALL_SOURCES if model_type(n) in TIE_REFUSED))
def test_keep_tied_is_refused_with_the_reason(name, hyperclone_bin, tmp_path):
    src = family_source(name, tmp_path, tied=True)
    proc = run_clone(hyperclone_bin, src, tmp_path / "dst", "--factor", 2, "--keep-tied", check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert TIE_REFUSED[model_type(name)] in lines[0], lines[0]
    assert not (tmp_path / "dst").exists()


# Tensors that add into the residual stream from inside a block, in every family.
RESIDUAL_WRITERS = ("o_proj", "down_proj", "self_attn.dense", "attention.dense", "fc2", "attn.c_proj",
                    "mlp.c_proj", "out_proj", "dense_4h_to_h")

def post_layernorm(name: str) -> bool:
    return config(ALL_SOURCES[name]).get("do_layer_norm_before") is False


DEPTH_CASES = [(name, n) for name in sorted(ALL_SOURCES) if not post_layernorm(name) for n in (1, 2)]


@pytest.mark.parametrize("name", sorted(n for n in ALL_SOURCES if post_layernorm(n)))
def test_identity_depth_is_refused_for_post_layernorm(name, hyperclone_bin, tmp_path):
    proc = run_clone(hyperclone_bin, ALL_SOURCES[name], tmp_path / "dst", "--factor", 2, "--depth-factor", 2,
                     check=False)
    assert proc.returncode == 1 and "do_layer_norm_before: false" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name,n", DEPTH_CASES, ids=lambda v: str(v))
def test_depth_x2_preserves_the_function(name, n, hyperclone_bin, tmp_path):
    src = ALL_SOURCES[name]
    layers = source(src)[0].config.num_hidden_layers
    dst = tmp_path / "dst"
    run_clone(hyperclone_bin, src, dst, "--factor", n, "--depth-factor", 2, "--variant", "noisy")
    layer_of = cc.identity_layer_map(layers, 2 * layers)
    check_growth(hyperclone_bin, src, dst, n, cc.Growth(layer_of=layer_of))
    # An inserted block is a copy of its neighbour with its residual writers zeroed.
    tensors = {k: v for f in dst.glob("*.safetensors") for k, v in load_file(f).items()}
    writers = [k for k in tensors if re.search(r"\.(h|layers)\.1\.", k) and k.rsplit(".", 1)[0].endswith(RESIDUAL_WRITERS)]
    if layers >= 1 and layer_of[1] == 0:  # dst layer 1 is the identity copy of layer 0
        assert writers and all((tensors[k] == 0).all() for k in writers), writers


@pytest.mark.parametrize("name", sorted(ALL_SOURCES))
def test_uneven_ffn_x2_5_with_width_x2(name, hyperclone_bin, tmp_path):
    src = ALL_SOURCES[name]
    f = cc.ffn_size(source(src)[0].config)
    target = f * 5 // 2
    dst = tmp_path / "dst"
    run_clone(hyperclone_bin, src, dst, "--factor", 2, "--intermediate-size", target, "--variant", "noisy")
    check_growth(hyperclone_bin, src, dst, 2, cc.Growth(ffn=target))


@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen3-mqa-tied", "phi3-gqa", "gpt2-mha"])
def test_everything_at_once_and_replayed_from_the_recipe(name, hyperclone_bin, tmp_path):
    src = family_source(name, tmp_path, tied=True)
    layers = source(src)[0].config.num_hidden_layers
    f = cc.ffn_size(source(src)[0].config)
    args = ["--factor", 3, "--num-hidden-layers", layers + 1, "--intermediate-size", 2 * f + 1,
            "--keep-tied", "--variant", "noisy-diagonal", "--seed", 5]
    dst = tmp_path / "dst"
    run_clone(hyperclone_bin, src, dst, *args)
    growth = cc.Growth(ffn=2 * f + 1, layer_of=cc.identity_layer_map(layers, layers + 1), keep_tied=True)
    check_growth(hyperclone_bin, src, dst, 3, growth)
    if config(src)["model_type"] == "llama":
        # docs/growth.md's formula: P' = V·nd·(2 - kept_tie) + nd + L'·(2·nd·nH·hd + 2·nd·kv'·hd + 3·nd·F + 2·nd)
        c = config(src)
        n, hd = 3, c["hidden_size"] // c["num_attention_heads"]
        nd, kv = n * c["hidden_size"], c.get("num_key_value_heads", c["num_attention_heads"])
        kv2 = 1 if kv == 1 else n * kv
        per_layer = 2 * nd * n * c["num_attention_heads"] * hd + 2 * nd * kv2 * hd + 3 * nd * (2 * f + 1) + 2 * nd
        want = c["vocab_size"] * nd + nd + (layers + 1) * per_layer
        got = sum(t.size for fp in dst.glob("*.safetensors") for t in load_file(fp).values())
        assert got == want
    # plan --json's recipe, replayed, gives the same files, byte for byte.
    plan = subprocess.run([str(hyperclone_bin), "plan", str(src), *map(str, args), "--json"],
                          capture_output=True, text=True, check=True)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(json.loads(plan.stdout)["recipe"], indent=1))
    replay = tmp_path / "replay"
    run_clone(hyperclone_bin, src, replay, "--recipe", recipe)
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in replay.iterdir())
    for fpath in sorted(dst.iterdir()):
        assert fpath.read_bytes() == (replay / fpath.name).read_bytes(), fpath.name


# transformers derives head_dim from hidden / heads (or olmo2: q/k norms over all heads).
HEADS_REFUSED = {"gpt2", "gpt_neox", "opt", "stablelm", "olmo2"}
HEADS_REFUSED |= {"olmo3", "olmoe"}  # OLMo-2's q/k norms over all heads
# transformers' config validation wants the head count to divide the hidden size.
HEADS_DIVIDING_HIDDEN = {"llama", "gemma2"}
HEADS_DIVIDING_HIDDEN |= {"smollm3", "granite", "gemma3_text"}


def other_head_count(cfg, model_type: str, n: int = 2) -> int:
    """A head count other than n x the source's that keeps whole kv groups: 1.5 x the heads
    rounded up to the group size (an uneven Net2Net copy), or where the count must divide
    the hidden size, the smallest such count above n x the heads (e.g. heads x4, width x2)."""
    h, k = cfg.num_attention_heads, cc.kv_heads(cfg)
    group = h // k if k > 1 else 1
    if model_type in HEADS_DIVIDING_HIDDEN:
        hidden = n * cfg.hidden_size
        return next(t for t in range(n * h + 1, hidden + 1) if hidden % t == 0 and t % group == 0)
    target = -(-3 * h // 2 // group) * group
    return target if target % h else target + group


@pytest.mark.parametrize("name", sorted(n for n in ALL_SOURCES if model_type(n) not in HEADS_REFUSED))
def test_other_head_counts_with_width_x2(name, hyperclone_bin, tmp_path):
    src = ALL_SOURCES[name]
    cfg = source(src)[0].config
    heads = other_head_count(cfg, model_type(name))
    dst = tmp_path / "dst"
    run_clone(hyperclone_bin, src, dst, "--factor", 2, "--num-attention-heads", heads, "--variant", "noisy")
    model_s, ids, out_s = source(src)
    report = cc.check(src, dst, n=2, ids=ids, model_s=model_s, out_s=out_s, heads=heads)
    assert report["pass"], cc.format_report(report)
    v = rust_verify(hyperclone_bin, src, dst)
    assert v["passed"], json.dumps(v, indent=1)


@pytest.mark.parametrize("name", sorted(n for n in ALL_SOURCES if model_type(n) in HEADS_REFUSED))
def test_uneven_heads_are_refused_where_head_dim_is_derived(name, hyperclone_bin, tmp_path):
    cfg = source(ALL_SOURCES[name])[0].config
    proc = run_clone(hyperclone_bin, ALL_SOURCES[name], tmp_path / "dst", "--factor", 2,
                     "--num-attention-heads", other_head_count(cfg, model_type(name)), check=False)
    assert proc.returncode == 1 and "head" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
