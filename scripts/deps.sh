#!/usr/bin/env bash
# Installs the Debian packages fastattn's build needs when they are missing (apt-get as root),
# otherwise prints the exact command to run. Sourced by test.sh and bench.sh.
set -euo pipefail

fastattn_require_packages() {
  local missing=()
  local pkg
  for pkg in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$pkg")
    fi
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "fastattn: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "fastattn: missing packages; run: sudo apt-get install -y ${missing[*]}" >&2
    return 1
  fi
}

# What every build needs.
FASTATTN_BUILD_PACKAGES=(cmake ninja-build g++ libeigen3-dev libgtest-dev libbenchmark-dev nlohmann-json3-dev libcli11-dev)
