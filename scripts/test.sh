#!/usr/bin/env bash
# test.sh — the README's test command: setup, then
#   1. the release build (gcc, -Werror) and its ctest suite;
#   2. an ASan+UBSan build (clang) with the same suite;
#   3. every libFuzzer target for TWN_FUZZ_SECONDS (default 20) seconds each.
# Prints one closing line "N passed, N failed" over the three stages' tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
FUZZ_SECONDS=${TWN_FUZZ_SECONDS:-20}
export OPENBLAS_NUM_THREADS=1

passed=0
failed=0
count() { # count LOGFILE: adds ctest's totals from its summary line
  local line
  line=$(grep -E "tests passed, [0-9]+ tests failed out of [0-9]+" "$1" | tail -1 || true)
  if [ -z "$line" ]; then failed=$((failed + 1)); return; fi
  local total fail
  total=$(echo "$line" | sed -E 's/.*out of ([0-9]+).*/\1/')
  fail=$(echo "$line" | sed -E 's/.* ([0-9]+) tests failed.*/\1/')
  passed=$((passed + total - fail))
  failed=$((failed + fail))
}

echo "== release build + tests"
scripts/build.sh build
(cd build && ctest --output-on-failure -j2 2>&1 | tee ctest.log) || true
count build/ctest.log

echo "== ASan+UBSan build + tests (clang)"
CC=clang CXX=clang++ scripts/build.sh build-asan -DCMAKE_BUILD_TYPE=Debug \
  -DTWN_SANITIZE=address,undefined -DTWN_FUZZ=ON
(cd build-asan && ASAN_OPTIONS=detect_leaks=1 ctest --output-on-failure -j2 2>&1 | tee ctest.log) || true
count build-asan/ctest.log

echo "== fuzzing, ${FUZZ_SECONDS}s per target"
for f in build-asan/tests/fuzz_*; do
  [ -x "$f" ] || continue
  name=$(basename "$f")
  corpus=build-asan/fuzz-corpus/$name
  mkdir -p "$corpus"
  if "$f" -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=0 \
      "$corpus" "tests/fuzz/seeds/$name" >"build-asan/$name.log" 2>&1; then
    echo "fuzz $name: ok ($(grep -c . "$corpus"/* 2>/dev/null | wc -l) corpus files)"
    passed=$((passed + 1))
  else
    echo "fuzz $name: FAILED — see build-asan/$name.log"; tail -40 "build-asan/$name.log"
    failed=$((failed + 1))
  fi
done

echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
