#!/usr/bin/env bash
# Builds fastattn's libFuzzer targets with clang (build/fuzz) and runs each for a bounded time from
# a copy of its committed seed corpus (fuzz/corpus/<target>/), so runs never modify the repository.
# Prints each target's number of executions; exits non-zero if any target finds a crash, leak,
# timeout or property violation (the reproducer is kept under build/fuzz/artifacts/<target>/).
#   ./scripts/fuzz.sh                 every target, 60 s each
#   ./scripts/fuzz.sh --seconds 10    every target, 10 s each
#   ./scripts/fuzz.sh fuzz_npy        one target
#   ./scripts/fuzz.sh --seed 0        a random libFuzzer seed (the default, 1, makes runs repeatable:
#                                     the same mutations in the same order, up to the time limit)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
FASTATTN_FUZZ_PACKAGES=(clang-14 libclang-rt-14-dev libomp-14-dev)
fastattn_require_packages "${FASTATTN_BUILD_PACKAGES[@]}" "${FASTATTN_FUZZ_PACKAGES[@]}"

seconds=60
seed=1
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --seconds=*) seconds="${1#*=}"; shift ;;
    --seed) seed="$2"; shift 2 ;;
    --seed=*) seed="${1#*=}"; shift ;;
    fuzz_*) targets+=("$1"); shift ;;
    *) echo "usage: $0 [--seconds N] [--seed N] [fuzz_attention|fuzz_wrappers|fuzz_npy|fuzz_safetensors ...]" >&2; exit 2 ;;
  esac
done
[ ${#targets[@]} -eq 0 ] && targets=(fuzz_attention fuzz_wrappers fuzz_npy fuzz_safetensors)

cxx=clang++-14
command -v "$cxx" >/dev/null 2>&1 || cxx=clang++
build=build/fuzz
echo "== configure and build ($cxx, $build)"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O2 -g1 -DNDEBUG" -DCMAKE_CXX_COMPILER="$cxx" \
  -DFASTATTN_BUILD_FUZZERS=ON -DFASTATTN_WERROR=ON -DFASTATTN_BUILD_TESTS=OFF \
  -DFASTATTN_BUILD_BENCHMARKS=OFF -DFASTATTN_BUILD_EXAMPLES=OFF -DFASTATTN_INSTALL=OFF >/dev/null
cmake --build "$build" -j "$(nproc)" --target "${targets[@]}"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Each target runs in a process of its own (one libFuzzer worker, bounded time, per-input timeout
# 10 s; the reproducer of any finding goes to build/fuzz/artifacts/<target>/; UBSan findings abort:
# the targets are built with -fno-sanitize-recover=all), as many at a time as there are cores, each
# with its full time budget.
run_target() {
  local t=$1 corpus="$work/$1" artifacts="$build/artifacts/$1" log="$work/$1.log" rc runs
  mkdir -p "$corpus" "$artifacts"
  cp -r "fuzz/corpus/$t/." "$corpus/"
  set +e
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$build/fuzz/$t" -max_total_time="$seconds" -seed="$seed" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
    -print_final_stats=1 -artifact_prefix="$artifacts/" "$corpus" >"$log" 2>&1
  rc=$?
  set -e
  runs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -1)
  [ -z "$runs" ] && runs=$(grep -Eo 'Done [0-9]+ runs' "$log" | grep -Eo '[0-9]+' | tail -1)
  if [ "$rc" -ne 0 ]; then
    cp "$log" "$artifacts/last.log"
    echo "$t: FAILED after ${runs:-?} executions (exit $rc; see $artifacts)" >"$work/$t.result"
  else
    echo "$t: ${runs:-?} executions in ${seconds} s, no finding" >"$work/$t.result"
  fi
}

parallel=$(nproc)
running=0
for t in "${targets[@]}"; do
  echo "== $t: ${seconds} s, seed $seed, from $(ls "fuzz/corpus/$t" | wc -l) seed(s)"
  run_target "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$parallel" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait
status=0
for t in "${targets[@]}"; do
  if grep -q FAILED "$work/$t.result"; then
    status=1
    echo "!! $t: FAILED; log tail:"
    tail -n 60 "$work/$t.log"
  fi
done
echo "== fuzzing summary"
for t in "${targets[@]}"; do cat "$work/$t.result"; done
exit "$status"
