"""The compiled bindings (crates/hyperclone-py); use the functions of `hyperclone` instead.

`growth` is the dict `hyperclone._growth` builds: the growth keywords as the CLI's flags
take them (factors as text)."""

from typing import Any, Optional

__version__: str

class HypercloneError(Exception): ...

def clone(src: str, dst: str, growth: dict[str, Any], shard_size: str, force: bool,
          verify: bool, allow_nonfinite: bool) -> str: ...
def plan(src: str, growth: dict[str, Any], shard_size: str) -> str: ...
def verify(small: str, big: str, tokens: Optional[list[int]], dtype: str) -> str: ...
def grow(config_json: str, tensors: list[tuple[str, str, list[int], bytes]],
         growth: dict[str, Any],
         allow_nonfinite: bool) -> tuple[str, list[tuple[str, str, list[int], bytearray]]]: ...
