"""The `hyperclone` Python package (`pip install .`): the same functions as the CLI, so the
same bytes; plan and verify as the CLI's --json; grow() in memory equal to a clone on disk;
errors with the CLI's messages; a model card whose front matter the Hub can read.

Needs the package installed in this interpreter (scripts/test-all.sh does `pip install .`)
and the CLI binary (HYPERCLONE_BIN) to compare against. Missing either is a failure.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file, save_file
from safetensors import safe_open

from conftest import FIXTURES, run_clone

try:
    import hyperclone
except ImportError as e:  # pragma: no cover - the failure message is the point
    pytest.fail(f"the hyperclone package is not installed ({e}): run `pip install .`",
                pytrace=False)

TINY = FIXTURES / "tiny"


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def cli(binary: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def cli_error(binary: Path, *args) -> str:
    proc = cli(binary, *args)
    assert proc.returncode != 0, proc.stdout
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), proc.stderr
    return line[len("error: "):]


def load_state(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a folder, bfloat16 as uint16 bits (numpy has no bfloat16)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name.startswith("golden"):
            continue
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                out[k] = (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()
    return out


# --- clone: the CLI's bytes -------------------------------------------------------------

CLONE_CASES = [
    ("llama-gqa-untied", dict(factor=2), ["--factor", 2]),
    ("llama-mha-tied", dict(factor=3, variant="noisy", snr_db=20, seed=5),
     ["--factor", 3, "--variant", "noisy", "--snr-db", 20, "--seed", 5]),
    ("llama-gqa-sharded", dict(factor=2, ffn_factor=3, shard_size=100_000, dtype="f32"),
     ["--factor", 2, "--ffn-factor", 3, "--shard-size", "100KB", "--dtype", "f32"]),
    ("llama-gqa-bf16", dict(hidden_size=64, variant="noisy-diagonal", seed=1),
     ["--hidden-size", 64, "--variant", "noisy-diagonal", "--seed", 1]),
    ("qwen3-gqa", dict(factor=2, variant="diagonal"), ["--factor", 2, "--variant", "diagonal"]),
    ("llama-gqa-tied", dict(factor=2, keep_tied=True, num_hidden_layers=3),
     ["--factor", 2, "--keep-tied", "--num-hidden-layers", 3]),
    ("llama-mha-untied", dict(factor=2, intermediate_size=100, depth_factor=2, depth_mode="stack"),
     ["--factor", 2, "--intermediate-size", 100, "--depth-factor", 2, "--depth-mode", "stack"]),
    ("mistral-gqa", dict(factor=2, experts=4, expert_init="drop", drop_ratio=0.25, router_init="normal", seed=3),
     ["--factor", 2, "--experts", 4, "--expert-init", "drop", "--drop-ratio", 0.25, "--router-init", "normal",
      "--seed", 3]),
]


@pytest.mark.parametrize("fixture,kwargs,flags", CLONE_CASES, ids=[c[0] for c in CLONE_CASES])
def test_clone_is_byte_identical_to_the_cli(fixture, kwargs, flags, hyperclone_bin, tmp_path):
    src = TINY / fixture
    run_clone(hyperclone_bin, src, tmp_path / "cli", *flags)
    summary = hyperclone.clone(src, tmp_path / "py", **kwargs)
    cli_files, py_files = files_of(tmp_path / "cli"), files_of(tmp_path / "py")
    assert sorted(cli_files) == sorted(py_files)
    for name in cli_files:
        assert cli_files[name] == py_files[name], f"{name} differs between CLI and Python"
    assert sorted(summary["files"]) == sorted(py_files)
    assert summary["destination"] == str(tmp_path / "py")
    assert summary["verification"] is None


def test_clone_summary_matches_the_cli_json(hyperclone_bin, tmp_path):
    src = TINY / "mistral-gqa"
    proc = run_clone(hyperclone_bin, src, tmp_path / "cli", "--factor", 2, "--verify", "--json")
    ours = hyperclone.clone(src, tmp_path / "py", factor=2, verify=True)
    theirs = json.loads(proc.stdout)
    varying = {"destination", "seconds", "gb_per_s"}
    assert {k: v for k, v in ours.items() if k not in varying} == \
        {k: v for k, v in theirs.items() if k not in varying}
    assert ours["verification"]["passed"] is True


def test_equivalent_options_and_recipes_give_the_same_bytes(hyperclone_bin, tmp_path):
    """ffn_factor=2 and the doubled intermediate_size are one growth, so one file set; a
    recipe written from plan() replays it from the CLI and from Python alike."""
    src = TINY / "llama-gqa-untied"
    ffn = json.loads((src / "config.json").read_text())["intermediate_size"]
    hyperclone.clone(src, tmp_path / "a", 2, ffn_factor=2, variant="noisy", seed=3)
    run_clone(hyperclone_bin, src, tmp_path / "b", "--factor", 2, "--intermediate-size",
              2 * ffn, "--variant", "noisy", "--seed", 3)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(hyperclone.plan(src, 2, variant="noisy", seed=3)["recipe"]))
    hyperclone.clone(src, tmp_path / "c", recipe=recipe)
    run_clone(hyperclone_bin, src, tmp_path / "d", "--recipe", recipe)
    reference = files_of(tmp_path / "a")
    for other in "bcd":
        assert files_of(tmp_path / other) == reference, other
    with pytest.raises(hyperclone.HypercloneError, match="recipe= holds the whole growth"):
        hyperclone.clone(src, tmp_path / "e", 2, recipe=recipe)


# --- plan and verify: the CLI's --json ----------------------------------------------------


def test_plan_matches_cli_plan_json(hyperclone_bin):
    src = TINY / "llama-gqa-sharded"
    proc = cli(hyperclone_bin, "plan", src, "--factor", 3, "--shard-size", "50KB", "--json")
    assert proc.returncode == 0, proc.stderr
    ours = hyperclone.plan(str(src), 3, shard_size="50KB")
    assert ours == json.loads(proc.stdout)
    assert ours["factor"] == 3 and ours["ffn_factor"] == 3
    assert ours["params_after"]["total"] > 3 * ours["params_before"]["total"]
    assert len(ours["shards"]) >= 2


def test_verify_passes_on_a_clone_and_fails_on_a_corrupted_one(hyperclone_bin, tmp_path):
    src = TINY / "llama-gqa-untied"
    big = tmp_path / "big"
    hyperclone.clone(src, big, 2, variant="noisy")
    report = hyperclone.verify(src, big)
    assert report["passed"] is True, report
    proc = cli(hyperclone_bin, "verify", src, big, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout) == report
    assert hyperclone.verify(src, big, tokens=[1, 2, 3], dtype="f32")["tokens"] == 3

    # One layer's attention output scaled by 1.01: the residual stream diverges there.
    with safe_open(str(big / "model.safetensors"), "np") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.1.self_attn.o_proj.weight"] *= 1.01
    save_file(tensors, str(big / "model.safetensors"), metadata=meta)
    bad = hyperclone.verify(src, big)
    assert bad["passed"] is False and bad["first_divergence"] == "layer 1", bad
    assert cli(hyperclone_bin, "verify", src, big).returncode == 1


def test_clone_with_verify_reports_and_keeps_a_passing_clone(tmp_path):
    out = hyperclone.clone(TINY / "llama-mqa-tied", tmp_path / "big", 2, verify=True)
    assert out["verification"]["passed"] and (tmp_path / "big" / "config.json").is_file()


def test_clone_with_verify_keeps_nothing_when_the_check_fails(hyperclone_bin, tmp_path):
    """A NaN weight cloned with allow_nonfinite gives NaN logits: the staged check fails, the
    error is the CLI's, and DST is never created."""
    src = tmp_path / "src"
    shutil.copytree(TINY / "llama-gqa-untied", src)
    with safe_open(str(src / "model.safetensors"), "np") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.0.mlp.down_proj.weight"][0, 0] = np.nan
    save_file(tensors, str(src / "model.safetensors"), metadata=meta)
    with pytest.raises(hyperclone.HypercloneError) as info:
        hyperclone.clone(src, tmp_path / "py", 2, verify=True, allow_nonfinite=True)
    assert str(info.value).startswith("verification failed, nothing was written: ")
    assert str(info.value) == cli_error(hyperclone_bin, "clone", src, tmp_path / "py",
                                        "--factor", 2, "--verify", "--allow-nonfinite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"], "nothing left behind"


# --- grow: in memory == on disk ---------------------------------------------------------

GROW_CASES = [
    ("llama-gqa-untied", dict(factor=2)),
    ("llama-mha-tied", dict(factor=3, variant="noisy", seed=9)),
    ("llama-gqa-bf16", dict(factor=2, variant="noisy", seed=2)),
    ("llama-gqa-sharded", dict(factor=2, dtype="bf16")),
    ("qwen3-mqa-tied", dict(factor=2, ffn_factor=4)),
    ("llama-gqa-tied", dict(factor=2, keep_tied=True, intermediate_size=70, depth_factor=2)),
    ("llama-gqa-untied", dict(experts=4, experts_per_token=4, factor=2)),
]


@pytest.mark.parametrize("fixture,kwargs", GROW_CASES, ids=[c[0] for c in GROW_CASES])
def test_grow_in_memory_equals_the_clone_on_disk(fixture, kwargs, tmp_path):
    src = TINY / fixture
    state = load_state(src)
    config = json.loads((src / "config.json").read_text())
    grown, grown_config = hyperclone.grow(state, config, **kwargs)
    hyperclone.clone(src, tmp_path / "big", **kwargs)
    on_disk = load_state(tmp_path / "big")
    assert sorted(grown) == sorted(on_disk)
    for name, array in on_disk.items():
        assert grown[name].dtype == array.dtype, name
        assert grown[name].shape == array.shape, name
        assert grown[name].tobytes() == array.tobytes(), f"{name} differs from the clone on disk"
    assert grown_config == json.loads((tmp_path / "big" / "config.json").read_text())
    assert list(grown_config) == list(json.loads((tmp_path / "big" / "config.json").read_text()))
    assert state.keys() == load_state(src).keys(), "the input dict is left alone"


def test_grow_takes_torch_state_dicts_and_float64(tmp_path):
    src = TINY / "llama-mha-untied"
    model_sd = {k: torch.from_numpy(v.copy()) for k, v in load_state(src).items()}
    config = json.loads((src / "config.json").read_text())
    grown, cfg = hyperclone.grow({k: t.numpy() for k, t in model_sd.items()}, config, 2)
    assert cfg["hidden_size"] == 2 * config["hidden_size"]
    back = {k: torch.from_numpy(v) for k, v in grown.items()}  # writable, zero-copy
    assert back["model.embed_tokens.weight"].shape[1] == 2 * config["hidden_size"]
    back["model.norm.weight"] += 0  # arrays are writable
    wide, _ = hyperclone.grow({k: t.double().numpy() for k, t in model_sd.items()}, config, 2)
    assert all(v.dtype == np.float64 for v in wide.values())
    for k in grown:
        np.testing.assert_allclose(wide[k], grown[k].astype(np.float64), rtol=1e-6, atol=1e-7)
    # bfloat16 from torch as uint16 bits, back as uint16 bits.
    bf = {k: t.to(torch.bfloat16).view(torch.uint16).numpy() for k, t in model_sd.items()}
    g16, _ = hyperclone.grow(bf, config, 2)
    assert all(v.dtype == np.uint16 for v in g16.values())
    head = torch.from_numpy(g16["lm_head.weight"].copy()).view(torch.bfloat16)
    assert head.shape == (config["vocab_size"], 2 * config["hidden_size"])


def test_grow_errors_name_the_tensor(tmp_path):
    src = TINY / "llama-gqa-untied"
    state = load_state(src)
    config = json.loads((src / "config.json").read_text())
    bad = dict(state, **{"model.norm.weight": state["model.norm.weight"].astype(np.int32)})
    with pytest.raises(hyperclone.HypercloneError, match="model.norm.weight.*int32"):
        hyperclone.grow(bad, config, 2)
    short = dict(state, **{"model.norm.weight": state["model.norm.weight"][:-1]})
    with pytest.raises(hyperclone.HypercloneError, match="model.norm.weight.*contradicts config"):
        hyperclone.grow(short, config, 2)
    missing = {k: v for k, v in state.items() if k != "lm_head.weight"}
    with pytest.raises(hyperclone.HypercloneError, match="lm_head.weight.*missing"):
        hyperclone.grow(missing, config, 2)
    nan = dict(state)
    nan["model.norm.weight"] = state["model.norm.weight"].copy()
    nan["model.norm.weight"][0] = np.nan
    with pytest.raises(hyperclone.HypercloneError,
                       match=r"NaN or infinite.*\(pass allow_nonfinite=True to clone them anyway\)$"):
        hyperclone.grow(nan, config, 2)
    assert hyperclone.grow(nan, config, 2, allow_nonfinite=True)[0]


# --- errors: the CLI's messages -----------------------------------------------------------


def test_errors_raise_hyperclone_error_with_the_cli_message(hyperclone_bin, tmp_path):
    src = TINY / "llama-gqa-untied"
    hyperclone.clone(src, tmp_path / "big", 2)
    cases = [
        (lambda: hyperclone.clone(src, tmp_path / "big", 2),
         ["clone", src, tmp_path / "big", "--factor", 2]),
        (lambda: hyperclone.clone(src, tmp_path / "x", "1.5"),
         ["clone", src, tmp_path / "x", "--factor", "1.5"]),
        (lambda: hyperclone.plan(src, hidden_size=50),
         ["plan", src, "--hidden-size", 50]),
        (lambda: hyperclone.plan(src, 2, num_attention_heads=5),
         ["plan", src, "--factor", 2, "--num-attention-heads", 5]),
        (lambda: hyperclone.plan(tmp_path / "absent", 2),
         ["plan", tmp_path / "absent", "--factor", 2]),
        (lambda: hyperclone.plan(src, 2, shard_size="5 parsecs"),
         ["plan", src, "--factor", 2, "--shard-size", "5 parsecs"]),
        (lambda: hyperclone.verify(src, tmp_path / "absent"),
         ["verify", src, tmp_path / "absent"]),
        (lambda: hyperclone.verify(src, tmp_path / "big", tokens=[10**6]),
         None),
        # Out-of-range numbers the CLI's argument parser refuses (exit 2) are
        # HypercloneError here too, not OverflowError.
        (lambda: hyperclone.plan(src, 2, seed=-1), None),
        (lambda: hyperclone.plan(src, 2, num_hidden_layers=0), None),
        (lambda: hyperclone.plan(src, 2, intermediate_size=2**70), None),
    ]
    for call, args in cases:
        with pytest.raises(hyperclone.HypercloneError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and message, message
        if args is not None:
            # The same line, except that Python says how to allow a replacement in Python.
            expected = cli_error(hyperclone_bin, *args).replace("pass --force", "pass force=True")
            assert message == expected
    assert issubclass(hyperclone.HypercloneError, Exception)
    assert not (tmp_path / "x").exists()


def test_errors_name_keywords_and_a_size_is_required(tmp_path):
    src = TINY / "llama-gqa-untied"
    hyperclone.clone(src, tmp_path / "big", 2)
    for call, start in [
        # No silent default factor: a size is asked for, as the CLI asks for one.
        (lambda: hyperclone.clone(src, tmp_path / "x"), "give a size: factor N or hidden_size D"),
        (lambda: hyperclone.plan(src, variant="noisy"), "give a size: factor N or hidden_size D"),
        (lambda: hyperclone.clone(src, tmp_path / "big", 2),
         f"{tmp_path / 'big'}: already exists (pass force=True to replace it)"),
        (lambda: hyperclone.plan(src, 2, seed=-1), "`seed`: "),
        (lambda: hyperclone.plan(src, 2, snr_db=-3), "snr_db -3: below 0 dB"),
        (lambda: hyperclone.plan(src, 2, snr_db=float("inf")), "snr_db=inf: must be a finite"),
        (lambda: hyperclone.plan(src, 2, variant="bogus"), "unknown variant `bogus`"),
        (lambda: hyperclone.plan(src, 2, depth_factor=0), "depth_factor 0: "),
        (lambda: hyperclone.plan(src, 2, shard_size=0), "shard_size 0: "),
        (lambda: hyperclone.plan(src, 2, facter=3), "unknown field `facter`"),
        (lambda: hyperclone.plan(src, 2, intermediate_size=2**70), "intermediate_size="),
    ]:
        with pytest.raises(hyperclone.HypercloneError) as info:
            call()
        assert str(info.value).startswith(start), (start, str(info.value))
        assert "--" not in str(info.value), str(info.value)
    assert not (tmp_path / "x").exists()
    # force=True replaces.
    assert hyperclone.clone(src, tmp_path / "big", 2, force=True)["destination"]


# --- the model card -------------------------------------------------------------------------


def test_card_front_matter_is_valid_yaml_with_base_model(hyperclone_bin, tmp_path):
    src = tmp_path / "SmolThing-10M"
    shutil.copytree(TINY / "qwen2-gqa", src)
    (src / "README.md").write_text(
        "---\nlicense: apache-2.0\nlanguage:\n- en\ntags: [text-generation, 'chat']\n"
        "base_model: somebody/its-parent\nmodel-index:\n- name: x\n  results: []\n---\n# card\n")
    (src / "tokenizer_config.json").write_text('{"chat_template": "{{ x }}"}')
    (src / "special_tokens_map.json").write_text('{"eos_token": "<|endoftext|>"}')
    (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m }}{% endfor %}")
    hyperclone.clone(src, tmp_path / "py", 2)
    run_clone(hyperclone_bin, src, tmp_path / "cli", "--factor", 2)
    assert files_of(tmp_path / "py") == files_of(tmp_path / "cli")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        assert (tmp_path / "py" / name).read_bytes() == (src / name).read_bytes(), name
    card = (tmp_path / "py" / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "SmolThing-10M"
    assert meta["base_model_relation"] == "finetune"
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"]
    assert meta["tags"] == ["text-generation", "chat", "hyperclone", "hypercloning"]
    assert meta["library_name"] == "transformers"
    assert "model-index" not in meta
    assert str(tmp_path) not in card
    with safe_open(str(tmp_path / "py" / "model.safetensors"), "np") as f:
        md = f.metadata()
    assert md["hyperclone.source"] == "SmolThing-10M"
    assert not any(str(tmp_path) in v for v in md.values()), md


def test_card_without_a_source_card(tmp_path):
    hyperclone.clone(TINY / "llama-gqa-tied", tmp_path / "big", 2)
    card = (tmp_path / "big" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta == {"library_name": "transformers", "tags": ["hyperclone", "hypercloning"],
                    "base_model": "llama-gqa-tied", "base_model_relation": "finetune"}


# --- the package itself ---------------------------------------------------------------------


def test_stubs_match_the_functions():
    pkg = Path(hyperclone.__file__).parent
    assert (pkg / "py.typed").is_file()
    stub = ast.parse((pkg / "__init__.pyi").read_text())
    stubbed = {n.name: n for n in stub.body if isinstance(n, ast.FunctionDef)}
    for name in ("clone", "plan", "verify", "grow"):
        fn = getattr(hyperclone, name)
        assert fn.__doc__ and len(fn.__doc__) > 100, name
        params = list(inspect.signature(fn).parameters)
        a = stubbed[name].args
        stub_params = [p.arg for p in a.args + a.kwonlyargs] + ([a.kwarg.arg] if a.kwarg else [])
        assert stub_params == params, name
    # The stubs' growth keywords are core's GrowthSpec fields, which the unknown-keyword
    # error lists (one list: the CLI's flags, a recipe's keys, these keywords).
    growth = next(n for n in stub.body if isinstance(n, ast.ClassDef) and n.name == "Growth")
    stubbed_keys = [n.target.id for n in growth.body if isinstance(n, ast.AnnAssign)]
    with pytest.raises(hyperclone.HypercloneError) as info:
        hyperclone.plan(TINY / "llama-gqa-untied", 2, no_such_option=1)
    known = re.findall(r"`(\w+)`", str(info.value).split("expected one of", 1)[1])
    assert stubbed_keys == known
    assert hyperclone.__version__
    assert set(hyperclone.__all__) >= {"clone", "plan", "verify", "grow", "HypercloneError"}


def test_ctrl_c_stops_a_clone_and_removes_the_partial_output(tmp_path):
    """KeyboardInterrupt reaches Python while the clone runs without the GIL; the clone
    stops at the next chunk and removes its staging folder, as the CLI does on Ctrl-C."""
    script = tmp_path / "interrupt.py"
    script.write_text(
        "import os, signal, sys, threading, hyperclone\n"
        "threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGINT)).start()\n"
        "try:\n"
        f"    hyperclone.clone({str(TINY / 'llama-gqa-untied')!r}, 'big', 128)\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(3)\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 3, (proc.returncode, proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["interrupt.py"]
