#!/usr/bin/env bash
# Clone throughput and memory against the cost of copying the same bytes, in one run.
#
#   benches/clone_vs_cp.sh MODEL_DIR [FACTOR...]        (default factors: 2 4)
#
# For each factor: `hyperclone clone MODEL --factor N` (wall time, peak RssAnon sampled
# from /proc every 10 ms: memory the process allocated; mapped source pages are RssFile and
# do not count), then `cp -r` of the folder it produced. Both run with a warm page cache
# (the source was read once before) and each starts after `sync`, so neither pays for the
# other's write-back. Reports clone/cp time ratio; the goal is <= 1.3 with peak RssAnon
# <= 256 MiB. Set RAYON_NUM_THREADS to pin the thread count; BENCH_DIR for scratch space.
set -euo pipefail
model=${1:?usage: benches/clone_vs_cp.sh MODEL_DIR [FACTOR...]}
shift
factors=("$@")
[ ${#factors[@]} -gt 0 ] || factors=(2 4)
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${HYPERCLONE_BIN:-$root/target/release/hyperclone}
[ -x "$bin" ] || (cd "$root" && cargo build --release -q)
work=$(mktemp -d "${BENCH_DIR:-/tmp}/hyperclone-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT

now() { date +%s.%N; }

# Runs a command, prints "seconds peak_rss_anon_kib".
measure() {
  local t0 t1 pid peak=0 kb
  t0=$(now)
  "$@" >/dev/null &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    kb=$(awk '/^RssAnon:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
    [ -n "$kb" ] && [ "$kb" -gt "$peak" ] && peak=$kb
    sleep 0.01
  done
  wait "$pid"
  t1=$(now)
  echo "$(echo "$t1 - $t0" | bc -l) $peak"
}

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
timed_sync() { local t0; t0=$(now); sync; echo "$(now) - $t0" | bc -l; }

cat "$model"/*.safetensors >/dev/null # warm the source pages
src_bytes=$(du -sb "$model" | cut -f1)
reps=${BENCH_REPS:-3}
echo "median of $reps runs; 'cached' = until the process exits (data in the page cache),"
echo "'durable' = plus the sync that puts it on disk; cp copies the clone's own output folder"
printf '%-6s %12s %9s %9s %7s %10s %10s %7s %10s %10s\n' factor out_bytes clone_s cp_s ratio clone+sync cp+sync ratio peak_MiB clone_GB/s
for n in "${factors[@]}"; do
  c=(); p=(); cd_=(); pd=(); peaks=()
  for _ in $(seq "$reps"); do
    sync
    read -r t peak_kib < <(measure "$bin" clone "$model" "$work/x$n" --factor "$n" --json)
    s=$(timed_sync)
    c+=("$t"); cd_+=("$(echo "$t + $s" | bc -l)"); peaks+=("$peak_kib")
    out_bytes=$(du -sb "$work/x$n" | cut -f1)
    read -r t _ < <(measure cp -r "$work/x$n" "$work/x$n-cp")
    s=$(timed_sync)
    p+=("$t"); pd+=("$(echo "$t + $s" | bc -l)")
    rm -rf "$work/x$n" "$work/x$n-cp"
  done
  mc=$(median "${c[@]}"); mp=$(median "${p[@]}"); mcd=$(median "${cd_[@]}"); mpd=$(median "${pd[@]}")
  peak=$(printf '%s\n' "${peaks[@]}" | sort -g | tail -1)
  printf '%-6s %12s %9.2f %9.2f %7.2f %10.2f %10.2f %7.2f %10.1f %10.2f\n' "x$n" "$out_bytes" "$mc" "$mp" \
    "$(echo "$mc / $mp" | bc -l)" "$mcd" "$mpd" "$(echo "$mcd / $mpd" | bc -l)" "$(echo "$peak / 1024" | bc -l)" \
    "$(echo "$out_bytes / $mc / 1000000000" | bc -l)"
done
echo "source: $model ($src_bytes bytes); threads: ${RAYON_NUM_THREADS:-all $(nproc)}; $(nproc) cores"
