#!/usr/bin/env bash
# Builds and runs every test: the developer preset (tests, examples, packaging checks), then the
# same tests under AddressSanitizer + UndefinedBehaviorSanitizer.
#   ./scripts/test.sh            everything
#   ./scripts/test.sh --no-sanitize   skip the sanitizer build
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
fastattn_require_packages "${FASTATTN_BUILD_PACKAGES[@]}"

sanitize=1
for arg in "$@"; do
  case "$arg" in
    --no-sanitize) sanitize=0 ;;
    *) echo "usage: $0 [--no-sanitize]" >&2; exit 2 ;;
  esac
done

jobs=$(nproc)
echo "== dev build (g++, -Werror) and tests"
cmake --preset dev >/dev/null
cmake --build --preset dev -j "$jobs"
ctest --preset dev

if [ "$sanitize" = 1 ]; then
  echo "== address + undefined sanitizer build and tests"
  cmake --preset asan-ubsan >/dev/null
  cmake --build --preset asan-ubsan -j "$jobs"
  ctest --preset asan-ubsan
fi
echo "== all tests passed"
