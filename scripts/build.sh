#!/usr/bin/env bash
# build.sh [BUILD_DIR] [cmake args...] — configure and build twn (Release, warnings as errors).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
shift || true
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DTWN_WERROR=ON "$@" >/dev/null
cmake --build "$BUILD" -j"$(nproc)"
