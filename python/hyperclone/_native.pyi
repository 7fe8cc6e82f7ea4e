"""The compiled bindings (crates/hyperclone-py); use the functions of `hyperclone` instead."""

from typing import Optional

__version__: str

class HypercloneError(Exception): ...

def clone(src: str, dst: str, factor: Optional[str], hidden_size: Optional[int],
          ffn_factor: Optional[str], intermediate_size: Optional[int],
          num_attention_heads: Optional[int], variant: str, snr_db: float, seed: int,
          dtype: str, shard_size: str, force: bool, verify: bool,
          allow_nonfinite: bool) -> str: ...
def plan(src: str, factor: Optional[str], hidden_size: Optional[int],
         ffn_factor: Optional[str], intermediate_size: Optional[int],
         num_attention_heads: Optional[int], variant: str, snr_db: float, seed: int,
         dtype: str, shard_size: str) -> str: ...
def verify(small: str, big: str, tokens: Optional[list[int]], dtype: str) -> str: ...
def grow(config_json: str, tensors: list[tuple[str, str, list[int], bytes]],
         factor: Optional[str], hidden_size: Optional[int], ffn_factor: Optional[str],
         intermediate_size: Optional[int], num_attention_heads: Optional[int], variant: str,
         snr_db: float, seed: int, dtype: str,
         allow_nonfinite: bool) -> tuple[str, list[tuple[str, str, list[int], bytearray]]]: ...
