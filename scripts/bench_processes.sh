#!/usr/bin/env bash
# Modes from process to process: runs fastattn_bench in several fresh processes, one after the
# other, and prints per benchmark each process's median (CPU ms per call, as the report) and the
# max / min of those medians. One process shows one memory layout, one placement and one state of
# the machine; a benchmark that is fast in some processes and slow in others (issue #14: smyrf at
# N = 16384 was reported at 13.5-14 ms in some processes and 22-24 ms in others) only shows here.
#   ./scripts/bench_processes.sh                    the `<kernel>/N:16384/iid` benchmarks, 10 processes
#                                                   (about 3 minutes on 2 cores, dense most of it)
#   ./scripts/bench_processes.sh --filter REGEX     other benchmarks (a --benchmark_filter regex)
#   ./scripts/bench_processes.sh --processes P      P fresh processes (default 10)
#   ./scripts/bench_processes.sh --repetitions R    repetitions per process, their median kept (default 5)
#   ./scripts/bench_processes.sh --limit X          max / min allowed (default 1.15)
#   ./scripts/bench_processes.sh --bench PATH       an already built fastattn_bench (no build)
#   ./scripts/bench_processes.sh --out FILE         also write the per-process medians as TSV
# Exits 1 when a benchmark's max / min exceeds the limit. Run it on an otherwise idle machine: a
# process that shares the machine with other work is a mode of its own, so each process's line
# says how many cores other work used meanwhile ("other load", from /proc/stat). Work outside
# this machine (other guests on the host, sharing its L3 and memory) is invisible there; the
# table's last column shows it instead: how far one process's own repetitions spread.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh

filter='/N:16384/iid$'
processes=10
repetitions=5
limit=1.15
bench=""
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --filter) filter=$2; shift ;;
    --processes) processes=$2; shift ;;
    --repetitions) repetitions=$2; shift ;;
    --limit) limit=$2; shift ;;
    --bench) bench=$2; shift ;;
    --out) out=$2; shift ;;
    *) echo "usage: $0 [--filter REGEX] [--processes P] [--repetitions R] [--limit X] [--bench PATH] [--out FILE]" >&2
       exit 2 ;;
  esac
  shift
done

if [ -z "$bench" ]; then
  fastattn_require_packages "${FASTATTN_BUILD_PACKAGES[@]}" jq
  echo "== building the release preset (-O3 -march=native)"
  cmake --preset release >/dev/null
  cmake --build --preset release -j "$(nproc)" --target fastattn_bench >/dev/null
  bench=build/release/bench/fastattn_bench
else
  fastattn_require_packages jq
fi
if ! "$bench" --benchmark_list_tests --benchmark_filter="$filter" | grep -q .; then
  echo "no benchmark matches --filter '$filter'" >&2
  exit 2
fi

# Busy CPU ticks of the whole machine (/proc/stat) and of this script's finished children: what
# else ran during a process is the first minus the second.
machine_busy() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }
children_ticks() { awk '{ print $16 + $17 }' "/proc/$$/stat"; }
ticks_per_s=$(getconf CLK_TCK)

tsv=$(mktemp)
trap 'rm -f "$tsv"' EXIT
for p in $(seq 1 "$processes"); do
  printf '[process %d/%d] ' "$p" "$processes"
  start=$(date +%s)
  start_ns=$(date +%s%N)
  busy0=$(machine_busy)
  own0=$(children_ticks)
  # process <TAB> name <TAB> median CPU ms of this process's repetitions <TAB> max / min of them
  "$bench" --benchmark_filter="$filter" --benchmark_repetitions="$repetitions" \
    --benchmark_min_time=0.2 --benchmark_format=json 2>/dev/null |
    jq -r --arg p "$p" '
      def ms: .cpu_time * (if .time_unit == "ns" then 1e-6 elif .time_unit == "us" then 1e-3
                           elif .time_unit == "s" then 1e3 else 1 end);
      [.benchmarks[] | select(.run_type == "iteration" or .aggregate_name == "median")]
      | group_by(.run_name)[]
      | ([.[] | select(.run_type == "iteration") | ms]) as $reps
      | [$p, .[0].run_name, (.[] | select(.run_type == "aggregate") | ms),
         ($reps | max) / ($reps | min)]
      | @tsv' >>"$tsv"
  # Other work on the machine during this process, in cores (0 = the machine was otherwise idle).
  other=$(awk -v b=$(( $(machine_busy) - busy0 )) -v o=$(( $(children_ticks) - own0 )) \
    -v s="$(( $(date +%s%N) - start_ns ))" -v hz="$ticks_per_s" 'BEGIN { x = (b - o) / (s / 1e9 * hz); printf "%.2f", x < 0 ? 0 : x }')
  note=""
  awk -v x="$other" 'BEGIN { exit !(x > 0.1) }' && note=" (not alone: other work used $other cores meanwhile)"
  echo "done in $(( $(date +%s) - start )) s, other load $other$note"
done
if [ -n "$out" ]; then cp "$tsv" "$out"; fi

echo
echo "Medians (CPU ms per call) of $repetitions repetitions in each of $processes fresh processes, limit max / min <= $limit."
echo "'within a process': the median over the processes of max / min of one process's repetitions,"
echo "how far the machine drifted while one process ran; a spread between processes no larger than"
echo "it is the machine's drift, not a mode of the code (a mode shows as medians in two bands)."
echo
awk -F'\t' -v limit="$limit" '
  { if (!($2 in n)) order[++names] = $2; m[$2, ++n[$2]] = $3; w[$2, n[$2]] = $4 }
  END {
    print "| benchmark | medians, in process order | min | max | max / min | within a process |"
    print "|---|---|---|---|---|---|"
    bad = 0
    for (i = 1; i <= names; i++) {
      b = order[i]; lo = hi = m[b, 1]; list = ""
      for (j = 1; j <= n[b]; j++) {
        x = m[b, j]; if (x < lo) lo = x; if (x > hi) hi = x
        list = list (j > 1 ? " " : "") sprintf("%.2f", x)
        s[j] = w[b, j]
      }
      # The median over the processes of max / min of one process'"'"'s repetitions: how much the
      # machine moved while one process ran.
      for (j = 2; j <= n[b]; j++) for (k = j; k > 1 && s[k] < s[k - 1]; k--) { t = s[k]; s[k] = s[k - 1]; s[k - 1] = t }
      within = n[b] % 2 ? s[(n[b] + 1) / 2] : (s[n[b] / 2] + s[n[b] / 2 + 1]) / 2
      r = hi / lo; flag = r > limit ? " (over the limit)" : ""; if (r > limit) bad = 1
      printf "| %s | %s | %.2f | %.2f | %.3f%s | %.3f |\n", b, list, lo, hi, r, flag, within
    }
    exit bad
  }' "$tsv"
