#!/usr/bin/env bash
# Clone throughput and memory against the cost of copying the same bytes, in one run.
#
#   benches/clone_vs_cp.sh [--variant V]... MODEL_DIR [FACTOR...]     (default factors: 2 4)
#
# Variants: repeat --variant, or set VARIANTS="symmetric noisy ..."; default all four
# (symmetric noisy diagonal noisy-diagonal), so one run reports every variant's ratio.
# For each factor and variant: `hyperclone clone MODEL --factor N --variant V` (wall time,
# user CPU, peak RssAnon sampled from /proc every 10 ms: memory the process allocated;
# mapped source pages are RssFile and do not count), then `cp -r` of the folder it
# produced. Both run with a warm page cache (the source was read once before) and each
# starts after `sync`, so neither pays for the other's write-back. Reports clone/cp time
# ratio; the goal is <= 1.3 with peak RssAnon <= 256 MiB. user_s/sys_s are the clone's CPU
# seconds, cp_cpu cp's user+sys: on a machine others load, the steadier figures.
#
# BASELINE_BIN=/path/to/older/hyperclone also times that binary in the same repetitions
# (interleaved, taking turns at going first, same cp), for before/after figures on a
# machine whose load varies.
# Set RAYON_NUM_THREADS to pin the thread count; BENCH_DIR for scratch space; BENCH_REPS
# for the repetitions (default 3; medians are reported, min-max spread beside them).
set -euo pipefail
variants=()
while [ $# -gt 0 ]; do
  case $1 in
    --variant) variants+=("${2:?--variant needs a value}"); shift 2 ;;
    --variant=*) variants+=("${1#--variant=}"); shift ;;
    *) break ;;
  esac
done
model=${1:?usage: benches/clone_vs_cp.sh [--variant V]... MODEL_DIR [FACTOR...]}
shift
factors=("$@")
[ ${#factors[@]} -gt 0 ] || factors=(2 4)
if [ ${#variants[@]} -eq 0 ]; then
  read -r -a variants <<<"${VARIANTS:-symmetric noisy diagonal noisy-diagonal}"
fi
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${HYPERCLONE_BIN:-$root/target/release/hyperclone}
[ -x "$bin" ] || (cd "$root" && cargo build --release -q)
base=${BASELINE_BIN:-}
work=$(mktemp -d "${BENCH_DIR:-/tmp}/hyperclone-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT

now() { date +%s.%N; }

# The process's user and system CPU seconds so far (utime and stime, fields 14 and 15 of
# /proc/PID/stat, in clock ticks).
cpu_times() { awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); print $12 / hz, $13 / hz }' "/proc/$1/stat" 2>/dev/null || true; }

# Runs a command, prints "seconds peak_rss_anon_kib user_cpu_s sys_cpu_s" (CPU: the last
# sample taken while it ran, so it can miss up to the final 10 ms). CPU seconds are less
# sensitive than wall time to other load on a shared machine.
measure() {
  local t0 t1 pid peak=0 kb user=0 sys=0 u
  t0=$(now)
  "$@" >/dev/null &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    kb=$(awk '/^RssAnon:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
    [ -n "$kb" ] && [ "$kb" -gt "$peak" ] && peak=$kb
    u=$(cpu_times "$pid")
    [ -n "$u" ] && read -r user sys <<<"$u"
    sleep 0.01
  done
  wait "$pid"
  t1=$(now)
  echo "$(echo "$t1 - $t0" | bc -l) $peak $user $sys"
}

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
spread() { printf '%s\n' "$@" | sort -g | awk 'NR == 1 {lo = $1} {hi = $1} END {printf "%.2f-%.2f", lo, hi}'; }
timed_sync() { local t0; t0=$(now); sync; echo "$(now) - $t0" | bc -l; }

# One repetition of the clone under test, then `cp -r` of what it produced.
run_new() {
  local t peak_kib user sys s
  sync
  read -r t peak_kib user sys < <(measure "$bin" clone "$model" "$work/x$n" --factor "$n" --variant "$v" --json)
  s=$(timed_sync)
  c+=("$t"); cd_+=("$(echo "$t + $s" | bc -l)"); peaks+=("$peak_kib"); users+=("$user"); syss+=("$sys")
  out_bytes=$(du -sb "$work/x$n" | cut -f1)
  read -r t _ user sys < <(measure cp -r "$work/x$n" "$work/x$n-cp")
  s=$(timed_sync)
  p+=("$t"); pd+=("$(echo "$t + $s" | bc -l)"); cpc+=("$(echo "$user + $sys" | bc -l)")
  rm -rf "$work/x$n-cp" "$work/x$n"
  sync
}

# One repetition of the baseline binary (BASELINE_BIN) on the same clone.
run_base() {
  local t user sys
  sync
  read -r t _ user sys < <(measure "$base" clone "$model" "$work/x$n-base" --factor "$n" --variant "$v" --json)
  timed_sync >/dev/null
  bc_+=("$t"); bu+=("$user"); bs+=("$sys")
  rm -rf "$work/x$n-base"
  sync
}

cat "$model"/*.safetensors >/dev/null # warm the source pages
src_bytes=$(du -sb "$model" | cut -f1)
reps=${BENCH_REPS:-3}
echo "median of $reps runs (min-max beside); 'cached' = until the process exits (data in the"
echo "page cache), 'durable' = plus the sync that puts it on disk; cp copies the clone's output"
printf '%-6s %-15s %11s %9s %11s %9s %11s %7s %8s %7s %7s %7s %8s %9s\n' factor variant out_bytes \
  clone_s spread cp_s spread ratio durable user_s sys_s cp_cpu peak_MiB GB/s
for n in "${factors[@]}"; do
  for v in "${variants[@]}"; do
    c=(); p=(); cd_=(); pd=(); peaks=(); users=(); syss=(); cpc=(); bc_=(); bu=(); bs=()
    # With a baseline, the two binaries alternate which goes first: the second one otherwise
    # pays the first one's page-cache reclaim in sys time (seen: 7-11 s on a 2.16 GB output).
    for rep in $(seq "$reps"); do
      if [ -n "$base" ] && [ $((rep % 2)) -eq 0 ]; then
        run_base; run_new
      else
        run_new; [ -z "$base" ] || run_base
      fi
    done
    mc=$(median "${c[@]}"); mp=$(median "${p[@]}"); mcd=$(median "${cd_[@]}"); mpd=$(median "${pd[@]}")
    peak=$(printf '%s\n' "${peaks[@]}" | sort -g | tail -1)
    printf '%-6s %-15s %11s %9.2f %11s %9.2f %11s %7.2f %8.2f %7.2f %7.2f %7.2f %8.1f %9.2f\n' "x$n" "$v" \
      "$out_bytes" "$mc" "$(spread "${c[@]}")" "$mp" "$(spread "${p[@]}")" "$(echo "$mc / $mp" | bc -l)" \
      "$(echo "$mcd / $mpd" | bc -l)" "$(median "${users[@]}")" "$(median "${syss[@]}")" \
      "$(median "${cpc[@]}")" "$(echo "$peak / 1024" | bc -l)" "$(echo "$out_bytes / $mc / 1000000000" | bc -l)"
    if [ -n "$base" ]; then
      mb=$(median "${bc_[@]}")
      printf '%-6s %-15s %11s %9.2f %11s %9s %11s %7.2f %8s %7.2f %7.2f\n' "" "  baseline" "" "$mb" \
        "$(spread "${bc_[@]}")" "" "" "$(echo "$mb / $mp" | bc -l)" "" "$(median "${bu[@]}")" "$(median "${bs[@]}")"
    fi
  done
done
echo "source: $model ($src_bytes bytes); threads: ${RAYON_NUM_THREADS:-all $(nproc)}; $(nproc) cores"
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'); avx512f: $(grep -qw avx512f /proc/cpuinfo && echo yes || echo no)"
if [ -d /sys/module/page_reporting ]; then
  echo "free page reporting: on (a VM balloon): slower writers pay more system time per byte; see benches/write_pace.py"
fi
[ -z "$base" ] || echo "baseline: $base (ratio = its clone time / the same repetitions' cp time)"
