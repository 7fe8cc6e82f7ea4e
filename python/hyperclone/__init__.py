"""hyperclone: grow a pretrained language model wider with HyperCloning, from Python.

The same library functions as the ``hyperclone`` command line run in-process (no
subprocess), so a clone made here is byte-identical to ``hyperclone clone`` with the same
options. Keywords mirror the CLI's flags (``factor`` is ``--factor``, ``snr_db`` is
``--snr-db``, ...) and errors raise :class:`HypercloneError` with the one-line message the CLI
prints after ``error:`` (it names the flag, which is the keyword of the same name).

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


def _text(x):
    return None if x is None else str(x)


def _count(name, x, minimum=1):
    """A whole-number keyword, refused as the CLI refuses its flag (not as OverflowError)."""
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, int) or x < minimum or x >= 2**64:
        raise HypercloneError(f"{name}={x!r}: must be a whole number >= {minimum}")
    return x


def _growth(factor, hidden_size, ffn_factor, intermediate_size, depth_factor,
            num_hidden_layers, depth_mode, keep_tied, num_attention_heads, variant, snr_db,
            seed, dtype, recipe):
    """The growth keywords in the CLI's terms (factors as text, as the flags take them)."""
    hidden_size = _count("hidden_size", hidden_size)
    intermediate_size = _count("intermediate_size", intermediate_size)
    num_hidden_layers = _count("num_hidden_layers", num_hidden_layers)
    num_attention_heads = _count("num_attention_heads", num_attention_heads)
    seed = _count("seed", seed, minimum=0)
    if recipe is not None:
        given = [k for k, v in (("factor", factor), ("hidden_size", hidden_size),
                                ("ffn_factor", ffn_factor),
                                ("intermediate_size", intermediate_size),
                                ("depth_factor", depth_factor),
                                ("num_hidden_layers", num_hidden_layers),
                                ("num_attention_heads", num_attention_heads)) if v is not None]
        if given:
            raise HypercloneError(
                f"recipe= holds the whole growth: do not also give {', '.join(given)}")
    elif factor is None and hidden_size is None:
        factor = 2
    return dict(
        factor=_text(factor),
        hidden_size=hidden_size,
        ffn_factor=_text(ffn_factor),
        intermediate_size=intermediate_size,
        depth_factor=_text(depth_factor),
        num_hidden_layers=num_hidden_layers,
        depth_mode=str(depth_mode),
        keep_tied=bool(keep_tied),
        num_attention_heads=num_attention_heads,
        variant=str(variant),
        snr_db=float(snr_db),
        seed=int(seed),
        dtype=str(dtype),
        recipe=None if recipe is None else os.fspath(recipe),
    )


def clone(
    src: PathLike,
    dst: PathLike,
    factor: Optional[int] = None,
    *,
    hidden_size: Optional[int] = None,
    ffn_factor: Optional[int] = None,
    intermediate_size: Optional[int] = None,
    depth_factor: Optional[int] = None,
    num_hidden_layers: Optional[int] = None,
    depth_mode: str = "identity",
    keep_tied: bool = False,
    num_attention_heads: Optional[int] = None,
    variant: str = "symmetric",
    snr_db: float = 10.0,
    seed: int = 0,
    dtype: str = "keep",
    recipe: Optional[PathLike] = None,
    shard_size: Union[int, str] = "5GB",
    force: bool = False,
    verify: bool = False,
    allow_nonfinite: bool = False,
) -> dict[str, Any]:
    """Grow the Hugging Face model folder ``src`` into ``dst``, as ``hyperclone clone``.

    Give ``factor`` (hidden size and heads x N; 2 unless ``hidden_size`` is given) or
    ``hidden_size``; ``ffn_factor`` defaults
    to ``factor``. ``variant``: symmetric, noisy, diagonal or noisy-diagonal (noise of
    ``snr_db`` dB, seeded by ``seed``). ``dtype``: keep, f32, bf16, f16 or f64.
    ``intermediate_size`` may be any width >= the source's (Net2Net when not a multiple);
    ``depth_factor`` or ``num_hidden_layers`` add layers (``depth_mode`` identity or stack);
    ``keep_tied`` keeps a tied embedding tied; ``recipe`` reads the whole growth from a
    recipe file (``plan(...)["recipe"]`` written as JSON or YAML) instead of the keywords.
    ``shard_size``: bytes or a size like "5GB". ``force`` replaces an existing ``dst``;
    ``verify`` checks the finished clone against ``src`` before moving it into place.

    Returns the summary ``hyperclone clone --json`` prints (config changes, parameters,
    files, bytes, ``verification`` when asked). Raises :class:`HypercloneError`.
    """
    out = _native.clone(
        os.fspath(src), os.fspath(dst),
        _growth(factor, hidden_size, ffn_factor, intermediate_size, depth_factor,
                num_hidden_layers, depth_mode, keep_tied, num_attention_heads, variant, snr_db,
                seed, dtype, recipe),
        shard_size=str(shard_size), force=bool(force), verify=bool(verify),
        allow_nonfinite=bool(allow_nonfinite),
    )
    return json.loads(out)


def plan(
    src: PathLike,
    factor: Optional[int] = None,
    *,
    hidden_size: Optional[int] = None,
    ffn_factor: Optional[int] = None,
    intermediate_size: Optional[int] = None,
    depth_factor: Optional[int] = None,
    num_hidden_layers: Optional[int] = None,
    depth_mode: str = "identity",
    keep_tied: bool = False,
    num_attention_heads: Optional[int] = None,
    variant: str = "symmetric",
    snr_db: float = 10.0,
    seed: int = 0,
    dtype: str = "keep",
    recipe: Optional[PathLike] = None,
    shard_size: Union[int, str] = "5GB",
) -> dict[str, Any]:
    """What :func:`clone` would produce, writing nothing: the dict ``hyperclone plan --json``
    prints (config changes, parameters by component, shards, bytes, expected peak memory).
    Keywords as for :func:`clone`."""
    out = _native.plan(
        os.fspath(src),
        _growth(factor, hidden_size, ffn_factor, intermediate_size, depth_factor,
                num_hidden_layers, depth_mode, keep_tied, num_attention_heads, variant, snr_db,
                seed, dtype, recipe),
        shard_size=str(shard_size),
    )
    return json.loads(out)


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
    factor: Optional[int] = None,
    *,
    hidden_size: Optional[int] = None,
    ffn_factor: Optional[int] = None,
    intermediate_size: Optional[int] = None,
    depth_factor: Optional[int] = None,
    num_hidden_layers: Optional[int] = None,
    depth_mode: str = "identity",
    keep_tied: bool = False,
    num_attention_heads: Optional[int] = None,
    variant: str = "symmetric",
    snr_db: float = 10.0,
    seed: int = 0,
    dtype: str = "keep",
    recipe: Optional[PathLike] = None,
    allow_nonfinite: bool = False,
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
        json.dumps(dict(config)), items,
        _growth(factor, hidden_size, ffn_factor, intermediate_size, depth_factor,
                num_hidden_layers, depth_mode, keep_tied, num_attention_heads, variant, snr_db,
                seed, dtype, recipe),
        allow_nonfinite=bool(allow_nonfinite),
    )
    numpy_of = {"F64": np.dtype("float64"), "F32": np.dtype("float32"),
                "F16": np.dtype("float16"), "BF16": bf16_dtype or np.dtype("uint16")}
    out = {name: np.frombuffer(data, dtype=numpy_of[kind]).reshape(shape)
           for name, kind, shape, data in grown}
    return out, json.loads(grown_config)
