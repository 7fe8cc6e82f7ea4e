#!/usr/bin/env bash
# Build (once per machine) the pinned Python environment used by the transformers reference
# checks, and print its python path as the LAST line of stdout:
#     PY=$(scripts/pyenv.sh | tail -1)
#
# The venv path carries a hash of tests/python/requirements.txt, so changing a pin builds a
# fresh venv next to the old one instead of mutating it. A marker file is written only after
# every install step succeeded; if it is missing (first run, or an install that was
# interrupted) the venv is wiped and rebuilt, so a half-installed venv is never reused.
#
# Env overrides:
#   HYPERCLONE_PYENV    venv directory (default ~/.cache/hyperclone/pyenv-<hash12>)
#   HYPERCLONE_PYTHON   interpreter used to create the venv (default python3, needs >= 3.10)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
req="$root/tests/python/requirements.txt"
hash="$(sha256sum "$req" | cut -c1-12)"
venv="${HYPERCLONE_PYENV:-$HOME/.cache/hyperclone/pyenv-$hash}"
marker="$venv/.hyperclone-complete-$hash"
base_python="${HYPERCLONE_PYTHON:-python3}"

# Everything except the final path goes to stderr, so `| tail -1` is always the path.
exec 3>&1 1>&2

if [[ ! -f "$marker" ]]; then
    mkdir -p "$(dirname "$venv")"
    # Serialise concurrent callers (e.g. two test scripts started together) on one build.
    exec 9>"$venv.lock"
    if command -v flock >/dev/null; then flock 9; fi
    if [[ ! -f "$marker" ]]; then
        echo "pyenv: building $venv (one-off; torch and its CUDA wheels are ~3 GB)"
        start=$SECONDS
        "$base_python" -m venv --clear "$venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
            --no-input -r "$req"
        # Fail here, not in the middle of a test run, if the stack does not import.
        "$venv/bin/python" -c 'import torch, transformers, safetensors, gguf, numpy, pytest'
        touch "$marker"
        echo "pyenv: ready in $((SECONDS - start)) s"
    fi
fi

echo "$venv/bin/python" >&3
