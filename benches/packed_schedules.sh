# The packed linear's f32 schedules against each other on this CPU (AVX-512F only): every
# schedule gives the same logits bit for bit (checked here first), so the only question is
# which is fastest. By default (`auto`) a load times the candidates on a small product of
# each input width and keeps the fastest (see crates/hyperclone-nn/src/packed_schedule.rs);
# this checks that choice against whole forwards under each fixed schedule, and prints what
# `auto` chose with its timings.
#
#   benches/packed_schedules.sh [MODEL_DIR]    (default: SmolLM2-135M from tests/fixtures/smollm2.py)
#
# For each schedule, ROUNDS (default 2) interleaved rounds of `hyperclone forward` at 1x128
# (20 passes) and 4x512 (3 passes), seconds per pass; THREADS (default 2) threads;
# SCHEDULES overrides the list. Reports every round and the best per schedule.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bin=${HYPERCLONE_BIN:-$root/target/release/hyperclone}
[ -x "$bin" ] || cargo build --release -q
PY=${PY:-$(scripts/pyenv.sh | tail -1)}
model=${1:-$("$PY" tests/fixtures/smollm2.py | tail -1)}
schedules=${SCHEDULES:-auto gemm own kblock:64 kblock:128 kblock:256 half half:128}
rounds=${ROUNDS:-2}
export RAYON_NUM_THREADS=${THREADS:-2}
grep -qw avx512f /proc/cpuinfo || { echo "no AVX-512F: only the gemm schedule runs here"; exit 0; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

logits() { HYPERCLONE_PACKED_SCHEDULE=$1 "$bin" forward "$model" --random-tokens 300 --out "$2" >/dev/null; }
logits gemm "$tmp/reference.safetensors"
for s in $schedules; do
  logits "$s" "$tmp/$s.safetensors"
  cmp -s "$tmp/reference.safetensors" "$tmp/$s.safetensors" ||
    { echo "error: schedule $s gave other logits than gemm" >&2; exit 1; }
done
echo "every schedule: logits identical to gemm's (300 tokens)"
echo "auto's timing at load (per candidate: median time / gemm's in the same round; best ms):"
HYPERCLONE_PACKED_SCHEDULE=auto "$bin" forward "$model" --random-tokens 8 --json | tail -1 | "$PY" -c '
import json, sys
for t in json.load(sys.stdin)["packed_schedules"]:
    print("  %5d inputs: chose %-10s %s" % (t["inputs"], t["chosen"], "  ".join(
        "%s %.3f (%.3f ms)" % (s, r, 1e3 * t["best_seconds"][s]) for s, r in t["median_ratio_to_gemm"].items())))'

seconds() {
  HYPERCLONE_PACKED_SCHEDULE=$1 "$bin" forward "$model" --random-tokens "$3" --batch "$2" --repeat "$4" --json |
    tail -1 | "$PY" -c 'import json,sys; print("%.4f" % json.load(sys.stdin)["seconds_per_forward"])'
}
printf '%-12s %6s %9s %9s\n' schedule round 1x128_s 4x512_s
for r in $(seq "$rounds"); do
  for s in $schedules; do
    printf '%-12s %6s %9s %9s\n' "$s" "$r" "$(seconds "$s" 1 128 20)" "$(seconds "$s" 4 512 3)"
  done
done | tee "$tmp/rows"
echo "best per schedule:"
sort -k1,1 -k3,3n "$tmp/rows" | awk '!seen1[$1]++ {b1[$1]=$3} {if (!($1 in b4) || $4 < b4[$1]) b4[$1]=$4} END {for (s in b1) printf "%-12s 1x128 %s s  4x512 %s s\n", s, b1[s], b4[s]}' | sort
