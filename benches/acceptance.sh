#!/usr/bin/env bash
# Every figure of the performance acceptance, in one run on this machine, each as a ratio
# against its baseline measured in the same run:
#
#   benches/acceptance.sh [MODEL_DIR]        (default: SmolLM2-135M from tests/fixtures/smollm2.py)
#
#   1. training tokens/s / PyTorch's, study-large and hidden 256 / vocab 49152 (goal >= 1.0)
#   2. forward time / torch sdpa's, 1x128 and 4x512 (goal <= 1.0)
#   3. clone x2 time / `cp -r` of its output, noisy and symmetric (goal <= 1.3)
#   4. `verify --dtype f64` of the x2 clone: verdict, seconds, peak RSS (goal < 2 GiB)
#   5. `generate` of 64 tokens on the x2 clone: time, time per token and peak RSS / transformers'
#   6. the packed linear's f32 schedules against each other (AVX-512F; identical logits):
#      what the load's timing (`auto`) chose, and whether whole forwards agree with it
#      (benches/packed_schedules.sh)
#
# It starts with the machine: lscpu's model, family/model numbers and SIMD flags, and
# PyTorch's version and CPU capability, so the figures can be stated with their machine.
# PARTS picks sections (default "1 2 3 4 5 6"). THREADS (default 2) is the thread count of both sides; PY the Python with torch and
# transformers (default: scripts/pyenv.sh's). Nothing else should run meanwhile.
# A full run takes about 15 minutes on 2 cores. Output: stdout and $OUT_DIR/acceptance.txt
# (OUT_DIR defaults to a fresh temporary folder, which also holds the clone).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
threads=${THREADS:-2}
PY=${PY:-$(scripts/pyenv.sh | tail -1)}
bin=${HYPERCLONE_BIN:-$root/target/release/hyperclone}
[ -x "$bin" ] || cargo build --release -q
model=${1:-$("$PY" tests/fixtures/smollm2.py | tail -1)}
[ -f "$model/config.json" ] || { echo "error: $model has no config.json" >&2; exit 2; }
out=${OUT_DIR:-$(mktemp -d)}
mkdir -p "$out"
report=$out/acceptance.txt
parts=" ${PARTS:-1 2 3 4 5 6} "
want() { [[ $parts == *" $1 "* ]]; }

{
  echo "== machine ($(date -u +%Y-%m-%dT%H:%MZ))"
  lscpu | grep -E '^(Model name|CPU family|Model|CPU\(s\)|Hypervisor vendor):' || true
  echo "simd: $(grep -m1 -o -E '\b(avx2|fma|avx512[a-z0-9_]*|amx[a-z0-9_]*)\b' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  "$PY" -c 'import torch; print("torch", torch.__version__, "capability", torch.backends.cpu.get_cpu_capability())'
  echo "threads $threads, binary $bin"

  if want 1; then
    echo "== 1. training, study-large (tok/s ratio >= 1.0)"
    "$PY" benches/train_vs_torch.py --shape study-large --threads "$threads"
    echo "== 1. training, hidden 256, vocab 49152 (tok/s ratio >= 1.0)"
    "$PY" benches/train_vs_torch.py --shape default --threads "$threads"
  fi

  if want 2; then
    echo "== 2. forward (time / sdpa <= 1.0)"
    HYPERCLONE_BIN=$bin "$PY" benches/forward_vs_torch.py "$model" --threads "$threads" --repeat 5
  fi

  if want 3; then
    echo "== 3. clone x2 (time / cp -r <= 1.3)"
    mkdir -p "$out/clone-bench"
    RAYON_NUM_THREADS=$threads BENCH_DIR=$out/clone-bench HYPERCLONE_BIN=$bin BENCH_REPS=3 \
      benches/clone_vs_cp.sh --variant noisy --variant symmetric "$model" 2
  fi

  if want 4 || want 5; then
    rm -rf "$out/x2"
    "$bin" clone "$model" "$out/x2" --factor 2 --variant noisy >/dev/null
  fi
  if want 4; then
    echo "== 4. verify --dtype f64, x2 noisy clone (peak RSS < 2 GiB)"
    RAYON_NUM_THREADS=$threads /usr/bin/time -f "peak RSS %M KiB, %e s" \
      "$bin" verify "$model" "$out/x2" --dtype f64 2>&1 | tail -3
  fi
  if want 5; then
    echo "== 5. generate 64 tokens on the x2 clone, against transformers' generate"
    HYPERCLONE_BIN=$bin "$PY" benches/generate_vs_torch.py "$out/x2" --threads "$threads" --tokens 64
  fi
  rm -rf "$out/x2"

  if want 6; then
    echo "== 6. packed f32 schedules (same logits; did auto pick the fastest here?)"
    THREADS=$threads HYPERCLONE_BIN=$bin PY=$PY benches/packed_schedules.sh "$model"
  fi
} 2>&1 | tee "$report"
echo "report: $report"
