#!/usr/bin/env bash
# clang-tidy (bugprone-*, performance-*; .clang-tidy) over every public header, through one
# translation unit that instantiates each kernel for float and double. Exits non-zero on a finding.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
fastattn_require_packages "${FASTATTN_BUILD_PACKAGES[@]}" clang-tidy
flags=(-std=c++20 -Iinclude -isystem /usr/include/eigen3 -fopenmp)
echo "== clang-tidy on include/fastattn (via tools/tidy_all.cpp)"
clang-tidy --quiet tools/tidy_all.cpp -- "${flags[@]}"
echo "== clang-tidy: no findings"
