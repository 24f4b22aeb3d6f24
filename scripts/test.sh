#!/usr/bin/env bash
# Builds and runs every test:
#   1. g++ developer preset (-Werror), all tests, examples, benchmarks (built) and packaging checks;
#   2. clang++ (-Werror) build of all tests under AddressSanitizer + UndefinedBehaviorSanitizer, run
#      (one build is both the clang check and the sanitizer check);
#   3. clang-tidy (bugprone-*, performance-*) over the headers;
#   4. each libFuzzer target for a bounded time from its committed corpus (scripts/fuzz.sh).
#   ./scripts/test.sh                 everything
#   ./scripts/test.sh --quick         step 1 only
#   ./scripts/test.sh --fuzz-seconds N   fuzzing budget per target (default 60)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
fastattn_require_packages "${FASTATTN_BUILD_PACKAGES[@]}" clang libomp-14-dev clang-tidy

quick=0
fuzz_seconds=60
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --fuzz-seconds) fuzz_seconds=$2; shift ;;
    *) echo "usage: $0 [--quick] [--fuzz-seconds N]" >&2; exit 2 ;;
  esac
  shift
done

jobs=$(nproc)
# Each step's header says how long the script has run so far (bash's SECONDS).
step() { echo; echo "== $* (at $((SECONDS / 60)) min $((SECONDS % 60)) s)"; }

step "1/4 g++ build (-Werror) and tests"
cmake --preset dev >/dev/null
cmake --build --preset dev -j "$jobs"
ctest --preset dev
[ "$quick" = 1 ] && { echo "== quick: all tests passed"; exit 0; }

step "2/4 clang++ build (-Werror) under address + undefined sanitizers, and tests"
cmake --preset asan-ubsan >/dev/null
cmake --build --preset asan-ubsan -j "$jobs"
ctest --preset asan-ubsan

step "3/4 clang-tidy"
./scripts/tidy.sh

if [ -x scripts/fuzz.sh ]; then
  step "4/4 fuzzing, ${fuzz_seconds} s per target"
  ./scripts/fuzz.sh --seconds "$fuzz_seconds"
fi
echo
echo "== all tests passed in $((SECONDS / 60)) min $((SECONDS % 60)) s"
