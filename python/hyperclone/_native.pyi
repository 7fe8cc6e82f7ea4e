"""The compiled bindings (crates/hyperclone-py); use the functions of `hyperclone` instead.

`growth` is the dict of growth keywords given (core's GrowthSpec as a recipe's `options`
mapping); `recipe` a recipe file instead (then `growth` must be empty)."""

from typing import Any, Optional

__version__: str

class HypercloneError(Exception): ...

def clone(src: str, dst: str, growth: dict[str, Any], recipe: Optional[str], force: bool,
          verify: bool, allow_nonfinite: bool) -> str: ...
def plan(src: str, growth: dict[str, Any], recipe: Optional[str]) -> str: ...
def verify(small: str, big: str, tokens: Optional[list[int]], dtype: str) -> str: ...
def grow(config_json: str, tensors: list[tuple[str, str, list[int], bytes]],
         growth: dict[str, Any], recipe: Optional[str],
         allow_nonfinite: bool) -> tuple[str, list[tuple[str, str, list[int], bytearray]]]: ...
