"""hyperclone: grow a pretrained language model wider with HyperCloning, from Python.

The same library functions as the ``hyperclone`` command line run in-process (no
subprocess), so a clone made here is byte-identical to ``hyperclone clone`` with the same
options. The growth keywords are the CLI's growth flags and a recipe's ``options`` keys
(``factor`` is ``--factor``, ``snr_db`` is ``--snr-db``, ...: one list, core's GrowthSpec),
and errors raise :class:`HypercloneError` with the one-line message the CLI prints after
``error:``; it names the option (``factor``, ``snr_db``), which is the keyword, and says
``force=True`` where the CLI says ``--force``.

    >>> import hyperclone
    >>> hyperclone.plan("small", factor=2)["params_after"]["total"]        # doctest: +SKIP
    >>> summary = hyperclone.clone("small", "big", factor=2, verify=True)   # doctest: +SKIP
    >>> hyperclone.verify("small", "big")["passed"]                         # doctest: +SKIP
    True
    >>> tensors, config = hyperclone.grow(state_dict, config, factor=2)     # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence, Union

# candle's CPU thread pool spins between ops by default, stealing the core its matrix
# products need on small machines; the CLI parks it too. Read when the pool starts.
os.environ.setdefault("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0")

from . import _native  # noqa: E402
from ._native import HypercloneError  # noqa: E402

__version__: str = _native.__version__
__all__ = ["HypercloneError", "clone", "plan", "verify", "grow", "__version__"]

PathLike = Union[str, "os.PathLike[str]"]


def _growth(factor, growth):
    """The growth keywords given (``factor`` may come positionally): the native layer reads
    them as a recipe's ``options`` mapping, with the same names, defaults and checks."""
    if factor is not None:
        growth = dict(growth, factor=factor)
    return growth


def _path(p):
    return None if p is None else os.fspath(p)


def clone(
    src: PathLike,
    dst: PathLike,
    factor: Optional[Union[int, str]] = None,
    *,
    recipe: Optional[PathLike] = None,
    force: bool = False,
    verify: bool = False,
    allow_nonfinite: bool = False,
    **growth: Any,
) -> dict[str, Any]:
    """Grow the Hugging Face model folder ``src`` into ``dst``, as ``hyperclone clone``.

    A size is required: ``factor`` (hidden size and heads x N) or ``hidden_size``; or
    ``recipe``, a recipe file (``plan(...)["recipe"]`` written as JSON or YAML) holding the
    whole growth instead of the keywords. The other growth keywords are the CLI's growth
    flags with underscores (docs/growth.md): ``ffn_factor`` (default: ``factor``) or
    ``intermediate_size`` (any width >= the source's; Net2Net when not a multiple);
    ``depth_factor`` or ``num_hidden_layers`` add layers (``depth_mode`` identity or stack);
    ``num_attention_heads``; ``keep_tied`` keeps a tied embedding tied; ``experts`` upcycles
    a llama or mistral into mixtral, a qwen3 or qwen2 into qwen3_moe or qwen2_moe (``experts_per_token``, default 2; ``expert_init`` copy
    or drop with ``drop_ratio``, ``router_init`` zero or normal: only the defaults are
    exact); ``variant``:
    symmetric, noisy, diagonal or noisy-diagonal (noise of ``snr_db`` dB, seeded by
    ``seed``); ``dtype``: keep, f32, bf16, f16 or f64; ``shard_size``: bytes or a size like
    "5GB". ``force=True`` replaces an existing ``dst``; ``verify`` checks the finished clone
    against ``src`` before moving it into place.

    Returns the summary ``hyperclone clone --json`` prints (config changes, parameters,
    files, bytes, ``verification`` when asked). Raises :class:`HypercloneError`, whose
    message names the keyword at fault.
    """
    out = _native.clone(
        os.fspath(src), os.fspath(dst), _growth(factor, growth), _path(recipe),
        force=bool(force), verify=bool(verify), allow_nonfinite=bool(allow_nonfinite),
    )
    return json.loads(out)


def plan(
    src: PathLike,
    factor: Optional[Union[int, str]] = None,
    *,
    recipe: Optional[PathLike] = None,
    **growth: Any,
) -> dict[str, Any]:
    """What :func:`clone` would produce, writing nothing: the dict ``hyperclone plan --json``
    prints (config changes, parameters by component, shards, bytes, expected peak memory).
    Keywords as for :func:`clone`."""
    return json.loads(_native.plan(os.fspath(src), _growth(factor, growth), _path(recipe)))


def verify(
    small: PathLike,
    big: PathLike,
    *,
    tokens: Optional[Sequence[int]] = None,
    dtype: str = "f64",
) -> dict[str, Any]:
    """Check that the model folder ``big`` computes ``small``'s function, as ``hyperclone
    verify --json``: logits, their scale and every residual state, on ``tokens`` (default: a
    built-in 16-token probe) in ``dtype`` (f64 or f32). The dict has ``passed`` and the
    measured deviations; a clone that does not verify is a result (``passed`` False), not an
    error."""
    toks = None if tokens is None else [int(t) for t in tokens]
    return json.loads(_native.verify(os.fspath(small), os.fspath(big), toks, str(dtype)))


_TO_SAFETENSORS = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                   "uint16": "BF16"}


def grow(
    tensors: Mapping[str, Any],
    config: Mapping[str, Any],
    factor: Optional[Union[int, str]] = None,
    *,
    recipe: Optional[PathLike] = None,
    allow_nonfinite: bool = False,
    **growth: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Grow a state dict in memory: ``(tensors, config) -> (grown tensors, grown config)``,
    equal to the files :func:`clone` writes for the same options (no disk involved).

    ``tensors`` maps Hugging Face names to numpy arrays (torch users pass ``t.numpy()``, or
    ``t.view(torch.uint16).numpy()`` for bfloat16). ``config`` is the model's config.json
    as a dict. Accepted dtypes: float32, float64, float16, and bfloat16 given either as
    ``ml_dtypes.bfloat16`` or as ``uint16`` arrays holding bfloat16 bits. Grown tensors come
    back in the source's dtype (or ``dtype``); bfloat16 ones come back in the numpy dtype the
    source's bfloat16 tensors came in (``uint16`` bits when there were none). Arrays are
    copied (the source once, into one buffer), so allow about twice the state dict's size.
    Growth keywords as for :func:`clone` (``shard_size`` has no effect in memory).
    """
    import numpy as np

    items = []
    bf16_dtype = None
    for name, array in tensors.items():
        a = np.asarray(array)
        kind = _TO_SAFETENSORS.get(a.dtype.name)
        if kind is None:
            raise HypercloneError(
                f"tensor `{name}`: numpy dtype {a.dtype} is not accepted (use float32, float64, "
                f"float16, or bfloat16 as ml_dtypes.bfloat16 or uint16 bits)")
        if kind == "BF16":
            bf16_dtype = bf16_dtype or a.dtype
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        a = np.ascontiguousarray(a)
        items.append((str(name), kind, [int(d) for d in a.shape], a.tobytes()))
    grown_config, grown = _native.grow(
        json.dumps(dict(config)), items, _growth(factor, growth), _path(recipe),
        allow_nonfinite=bool(allow_nonfinite),
    )
    numpy_of = {"F64": np.dtype("float64"), "F32": np.dtype("float32"),
                "F16": np.dtype("float16"), "BF16": bf16_dtype or np.dtype("uint16")}
    out = {name: np.frombuffer(data, dtype=numpy_of[kind]).reshape(shape)
           for name, kind, shape, data in grown}
    return out, json.loads(grown_config)
