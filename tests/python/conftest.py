"""Shared pytest setup for the transformers reference checks.

These tests drive the Rust binary; they FAIL (never skip) when it is missing, so that a CI
run that forgot to build it cannot go green.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: the slow lane (SmolLM2-135M, torchrun FSDP2, the quick study); "
        "the fast lane deselects it with -m 'not slow'"
    )
    import transformers

    # Hundreds of from_pretrained calls: their progress bars would drown the pytest output.
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


@pytest.fixture(scope="session")
def hyperclone_bin() -> Path:
    path = Path(os.environ.get("HYPERCLONE_BIN", REPO / "target" / "release" / "hyperclone"))
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"hyperclone binary not found at {path}: run `cargo build --release` or set "
            f"HYPERCLONE_BIN",
            pytrace=False,
        )
    return path


def run_clone(binary: Path, src, dst, *args, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(binary), "clone", str(src), str(dst), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        pytest.fail(
            f"`{' '.join(cmd)}` exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}",
            pytrace=False,
        )
    return proc
