"""Type stubs of the hyperclone package (see __init__.py for the documentation)."""

import os
from typing import Any, Literal, Mapping, Optional, Sequence, TypedDict, Union

from typing_extensions import Unpack  # stubs are not run: Python 3.10 type checkers read it

import numpy as np

__version__: str
__all__: list[str]

PathLike = Union[str, os.PathLike[str]]

class HypercloneError(Exception):
    """An error of hyperclone, with the one-line message the CLI prints after `error: `."""

class Growth(TypedDict, total=False):
    """The growth keywords: core's GrowthSpec, one per field (the CLI's growth flags with
    underscores, a recipe's `options` keys). A size is required: `factor` (which clone, plan
    and grow also take positionally) or `hidden_size`, unless `recipe=` is given."""

    factor: Union[int, str]
    hidden_size: int
    ffn_factor: Union[int, str]
    intermediate_size: int
    depth_factor: Union[int, str]
    num_hidden_layers: int
    num_attention_heads: int
    depth_mode: Literal["identity", "stack"]
    keep_tied: bool
    experts: int
    experts_per_token: int
    expert_init: Literal["copy", "drop"]
    drop_ratio: float
    router_init: Literal["zero", "normal"]
    variant: Literal["symmetric", "noisy", "diagonal", "noisy-diagonal"]
    snr_db: float
    seed: int
    dtype: Literal["keep", "f32", "bf16", "f16", "f64"]
    shard_size: Union[int, str]

def clone(
    src: PathLike,
    dst: PathLike,
    factor: Optional[Union[int, str]] = None,
    *,
    recipe: Optional[PathLike] = None,
    force: bool = False,
    verify: bool = False,
    allow_nonfinite: bool = False,
    **growth: Unpack[Growth],
) -> dict[str, Any]: ...
def plan(
    src: PathLike,
    factor: Optional[Union[int, str]] = None,
    *,
    recipe: Optional[PathLike] = None,
    **growth: Unpack[Growth],
) -> dict[str, Any]: ...
def verify(
    small: PathLike,
    big: PathLike,
    *,
    tokens: Optional[Sequence[int]] = None,
    dtype: str = "f64",
) -> dict[str, Any]: ...
def grow(
    tensors: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    factor: Optional[Union[int, str]] = None,
    *,
    recipe: Optional[PathLike] = None,
    allow_nonfinite: bool = False,
    **growth: Unpack[Growth],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]: ...
