"""Type stubs of the hyperclone package (see __init__.py for the documentation)."""

import os
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

__version__: str
__all__: list[str]

PathLike = Union[str, os.PathLike[str]]

class HypercloneError(Exception):
    """An error of hyperclone, with the one-line message the CLI prints after `error: `."""

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
) -> dict[str, Any]: ...
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
) -> tuple[dict[str, np.ndarray], dict[str, Any]]: ...
