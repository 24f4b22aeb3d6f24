#!/usr/bin/env bash
# The main job: builds the release preset and runs fastattn_bench for every kernel over
# N = 256 ... 32768, then prints the table (medians, speed-ups over dense, dense / gemm_bound,
# rel_err), each kernel's log-log slope and crossover with dense, thread scaling, dense's peak
# memory at N = 32768, and draws time_vs_n and error_vs_time (PNG + SVG).
#   ./scripts/bench.sh                 full run (about 10 minutes on 2 cores)
#   ./scripts/bench.sh --quick         N = 256, 1024, 4096 only, one repetition (about 1 minute)
#   ./scripts/bench.sh --out DIR       output folder (default build/report)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh

quick=0
out=build/report
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --out) out=$2; shift ;;
    *) echo "usage: $0 [--quick] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
fastattn_require_packages "${FASTATTN_BUILD_PACKAGES[@]}" jq gnuplot-nox

echo "== building the release preset (-O3 -march=native)"
cmake --preset release >/dev/null
cmake --build --preset release -j "$(nproc)" --target fastattn_bench fastattn_memory >/dev/null
bench=build/release/bench/fastattn_bench

rm -rf "$out"
mkdir -p "$out/json" "$out/logs"
if [ "$quick" = 1 ]; then
  sizes='(256|1024|4096)'
  args=(--benchmark_repetitions=1 --benchmark_min_time=0.05)
else
  sizes='[0-9]+'
  # Repetitions interleaved in random order within a group (a kernel's series and its variants):
  # the machine's drift over the group's minutes then reaches every benchmark alike, so the
  # report's ratios (causal, window, estimate, head sizes) compare like with like.
  args=(--benchmark_repetitions=3 --benchmark_report_aggregates_only=true --benchmark_min_time=0.2
        --benchmark_enable_random_interleaving=true)
fi

# One run and one JSON file per group, a group being the first part of the benchmark names in
# registration order (fastattn_bench --benchmark_list_tests): fma_peak, every kernel of
# fastattn::kernels, gemm_bound, dense_naive, multihead, sweep. A kernel added to the library is
# picked up from the list; nothing here names one.
tests=$("$bench" --benchmark_list_tests)
mapfile -t groups < <(awk -F/ 'NF && !seen[$1]++ { print $1 }' <<<"$tests")
i=0
for g in "${groups[@]}"; do
  i=$((i + 1))
  if grep -Eq "^$g/N:[0-9]+\$" <<<"$tests"; then
    f="^$g/N:$sizes(/.*)?\$"  # a size series (and its variants): --quick runs three sizes
  else
    f="^$g(/.*)?\$"           # fma_peak, multihead/..., sweep/...: always in full
  fi
  start=$(date +%s)
  printf '[%d/%d] %-20s ' "$i" "${#groups[@]}" "$g"
  "$bench" --benchmark_filter="$f" "${args[@]}" \
    --benchmark_out="$out/json/$g.json" --benchmark_out_format=json >"$out/logs/$g.txt" 2>&1
  echo "done in $(( $(date +%s) - start )) s"
done

echo "== dense peak memory"
if [ "$quick" = 1 ]; then mem_n=8192; else mem_n=32768; fi
build/release/bench/fastattn_memory "$mem_n" | tee "$out/memory.txt"

scripts/report.sh "$out"

{
  echo "# fastattn benchmark report"
  echo
  echo "Produced by \`./scripts/bench.sh$([ "$quick" = 1 ] && echo ' --quick')\` on $(date -u '+%Y-%m-%d %H:%M UTC'),"
  echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(g++ --version | head -1)."
  echo "One head, E = M = 64, float, one thread; medians of Google Benchmark repetitions: CPU ms per call for the one-thread rows (robust to a shared machine), wall-clock ms for the multi-head thread-scaling rows."
  echo
  cat "$out/peak.txt" 2>/dev/null || true
  echo
  cat "$out/table.md"
  echo
  cat "$out/slopes.md"
  echo
  cat "$out/variants.md" 2>/dev/null || true
  echo
  cat "$out/mix.md" 2>/dev/null || true
  echo
  echo "Thread scaling through the multi-head driver:"
  echo
  cat "$out/threads.md"
  echo
  cat "$out/memory.txt"
} > "$out/report.md"

echo
cat "$out/report.md"
echo
echo "== report written to $out/ (report.md, results.tsv, time_vs_n.png/.svg, error_vs_time.png/.svg, json/)"
