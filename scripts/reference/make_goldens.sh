#!/usr/bin/env bash
# make_goldens.sh — regenerate the transformers + peft goldens for the twn engine tests.
#
#   scripts/reference/make_goldens.sh TWN_BIN OUT_DIR [preset ...]
#   e.g. scripts/reference/make_goldens.sh build/cli/twn tests/golden
#
# For each preset (default: tiny tiny-alt) it runs `TWN_BIN mkmodel --preset P --seed S` into a
# temporary directory, writes the fixed items file, and runs twn_reference.py:
#
#   load-report.{txt,json}              --check-load-only (no missing / unexpected keys, shapes)
#   fp32-cpu-eager-adaptive             the default mode
#   fp32-cpu-eager-always               every item thinks (all hard-path tensors)
#   fp32-cpu-eager-always-stopprobe     same, with twn-stopprobe.json: one more stop string taken
#                                       from the first CoT, so the stop rule is exercised
#   fp32-cpu-eager-budget               --mode budget=0.5
#   fp32-cpu-sdpa-always                attention implementation spread at fp32
#   with CUDA: fp32-cuda-eager-always, bf16-cuda-eager-always, bf16-cuda-sdpa-always,
#              bf16-cuda-eager-adaptive
#   without:   bf16-cpu-eager-always    (a CPU bf16 spread; not the CUDA tolerance)
#   spread-<name>.{txt,json}            compare_bf16_spread.py of fp32-cpu-eager-always vs <name>
#
# into OUT_DIR/<preset>/, with items.jsonl, twn.json, twn-stopprobe.json and model-files.sha256
# (the sha256 of every file mkmodel wrote: the goldens are only valid for a byte-identical
# checkpoint).  OUT_DIR/versions.json records the software.  Nothing here uses the network.
#
# Environment: PYTHON (default python3), TWN_GOLDEN_SEED (default 1, as tests/testutil.c),
# TWN_GOLDEN_CUDA=0 (skip GPU runs even if CUDA is there), TWN_GOLDEN_KEEP=1 (keep the
# generated checkpoints; their path is printed).
# Exit status: 0 all good; 1 a reference run reported check failures (listed in
# OUT_DIR/FAILURES, goldens still written); 2 usage or a run that failed outright.
set -euo pipefail

die() { echo "make_goldens: $*" >&2; exit 2; }
[ $# -ge 2 ] || die "usage: $0 TWN_BIN OUT_DIR [preset ...]   (default presets: tiny tiny-alt)"
TWN=$1
OUT=$2
shift 2
if [ $# -gt 0 ]; then PRESETS=("$@"); else PRESETS=(tiny tiny-alt); fi
if [ ! -f "$TWN" ] || [ ! -x "$TWN" ]; then die "$TWN is not an executable"; fi
TWN="$(cd "$(dirname "$TWN")" && pwd)/$(basename "$TWN")"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
HERE="$(cd "$(dirname "$0")" && pwd)"
PY=${PYTHON:-python3}
SEED=${TWN_GOLDEN_SEED:-1}
REF="$HERE/twn_reference.py"
CMP="$HERE/compare_bf16_spread.py"

# No network: the hub libraries must not try, and there is no proxy to try through.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false PYTHONHASHSEED=0 CUBLAS_WORKSPACE_CONFIG=:4096:8
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY all_proxy 2>/dev/null || true

"$PY" -c 'import torch, transformers, peft, tokenizers, safetensors' ||
  die "$PY needs torch, transformers, peft, tokenizers and safetensors"
echo "== self-check (pure Python)"
TWN_BIN="$TWN" "$PY" "$HERE/test_selfcheck.py" || die "test_selfcheck.py failed"

if [ "${TWN_GOLDEN_CUDA:-auto}" = 0 ]; then
  CUDA=0
else
  CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/twn-golden.XXXXXX")"
if [ "${TWN_GOLDEN_KEEP:-0}" = 1 ]; then
  echo "keeping the generated checkpoints in $WORK"
else
  trap 'rm -rf "$WORK"' EXIT
fi
rm -f "$OUT/FAILURES" "$OUT/WARNINGS"

"$PY" - "$TWN" >"$OUT/versions.json" <<'PYEOF'
import json, platform, subprocess, sys
import torch, transformers, peft, tokenizers, safetensors
v = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
     "transformers": transformers.__version__, "peft": peft.__version__, "tokenizers": tokenizers.__version__,
     "safetensors": getattr(safetensors, "__version__", "?")}
try:
    import PIL
    v["pillow"] = PIL.__version__
except ImportError:
    pass
if torch.cuda.is_available():
    v.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), gpu=torch.cuda.get_device_name())
try:
    v["twn"] = subprocess.run([sys.argv[1], "--version"], capture_output=True, text=True).stdout.strip()
except OSError as e:
    v["twn"] = repr(e)
print(json.dumps(v, indent=1, sort_keys=True))
PYEOF

# The fixed items: short English / CJK / emoji texts; NFC (a decomposed e + U+0301), tabs, double
# spaces, a newline, braces that must stay literal, a literal <think> that tokenizes as the token.
ITEMS="$WORK/items.jsonl"
cat >"$ITEMS" <<'JSONL'
{"id": "en-short", "text": "A red bicycle leaning against a brick wall."}
{"id": "en-instr", "instruction": "Represent this question for retrieving relevant passages: ", "text": "What is the capital of France?"}
{"id": "zh", "instruction": "为检索表示以下文本：", "text": "今天天气很好，我们去公园散步吧。"}
{"id": "ja", "text": "東京タワーの高さは333メートルです。"}
{"id": "emoji", "text": "Party time 🎉🎂 with friends 👩‍👩‍👧‍👦!"}
{"id": "mixed", "instruction": "", "text": "Cafe\u0301 naïve — tabs\tand  spaces\nnew line; braces {text} {cot} {instruction} stay literal; <think> is a token."}
JSONL

for preset in "${PRESETS[@]}"; do
  model="$WORK/$preset"
  dest="$OUT/$preset"
  echo "== $preset: twn mkmodel --preset $preset --seed $SEED"
  "$TWN" mkmodel --out "$model" --preset "$preset" --seed "$SEED"
  [ -f "$model/twn.json" ] || die "mkmodel wrote no $model/twn.json"
  mkdir -p "$dest"
  rm -f "$dest"/*.safetensors "$dest"/*.summary.json "$dest"/*.log "$dest"/spread-*.txt "$dest"/spread-*.json \
    "$dest"/load-report.* "$dest"/twn-stopprobe.json
  cp "$ITEMS" "$dest/items.jsonl"
  cp "$model/twn.json" "$dest/twn.json"
  (cd "$model" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) >"$dest/model-files.sha256"

  echo "== $preset: load check"
  rc=0
  "$PY" "$REF" --model "$model" --check-load-only --report-json "$dest/load-report.json" 2>&1 |
    tee "$dest/load-report.txt" || rc=$?
  [ $rc -eq 0 ] || die "$preset: the checkpoint does not load cleanly (see $dest/load-report.txt)"

  # ref NAME MODEL [twn_reference options...]
  ref() {
    local name=$1 mdl=$2
    shift 2
    echo "== $preset: $name"
    local rc=0
    "$PY" "$REF" --model "$mdl" --items "$dest/items.jsonl" --out "$dest/$name.safetensors" "$@" 2>&1 |
      tee "$dest/$name.log" || rc=$?
    if [ $rc -eq 3 ]; then
      echo "$preset/$name: check failures (see $preset/$name.log)" >>"$OUT/FAILURES"
    elif [ $rc -ne 0 ]; then
      die "$preset/$name failed (exit $rc, see $dest/$name.log)"
    fi
  }

  ref fp32-cpu-eager-adaptive "$model" --dtype fp32 --device cpu --attn eager --mode adaptive
  ref fp32-cpu-eager-always "$model" --dtype fp32 --device cpu --attn eager --mode always \
    --stop-probe-manifest "$model/twn-stopprobe.json"
  if [ -f "$model/twn-stopprobe.json" ]; then
    cp "$model/twn-stopprobe.json" "$dest/twn-stopprobe.json"
    ref fp32-cpu-eager-always-stopprobe "$model/twn-stopprobe.json" --dtype fp32 --device cpu --attn eager \
      --mode always
  else
    echo "$preset: no stop probe (no CoT of 6+ tokens without a stop); the stop rule is covered by" \
      "test_selfcheck.py only" | tee -a "$OUT/WARNINGS"
  fi
  ref fp32-cpu-eager-budget "$model" --dtype fp32 --device cpu --attn eager --mode budget=0.5
  ref fp32-cpu-sdpa-always "$model" --dtype fp32 --device cpu --attn sdpa --mode always
  others=(fp32-cpu-sdpa-always)
  if [ "$CUDA" = 1 ]; then
    ref fp32-cuda-eager-always "$model" --dtype fp32 --device cuda --attn eager --mode always
    ref bf16-cuda-eager-always "$model" --dtype bf16 --device cuda --attn eager --mode always
    ref bf16-cuda-sdpa-always "$model" --dtype bf16 --device cuda --attn sdpa --mode always
    ref bf16-cuda-eager-adaptive "$model" --dtype bf16 --device cuda --attn eager --mode adaptive
    others+=(fp32-cuda-eager-always bf16-cuda-eager-always bf16-cuda-sdpa-always)
  else
    ref bf16-cpu-eager-always "$model" --dtype bf16 --device cpu --attn eager --mode always
    others+=(bf16-cpu-eager-always)
  fi
  for o in "${others[@]}"; do
    echo "== $preset: spread fp32-cpu-eager-always vs $o"
    "$PY" "$CMP" "$dest/fp32-cpu-eager-always.safetensors" "$dest/$o.safetensors" --all \
      --json "$dest/spread-$o.json" | tee "$dest/spread-$o.txt"
  done
done

echo
echo "goldens in $OUT:"
(cd "$OUT" && find . -type f -newer "$ITEMS" | LC_ALL=C sort | sed 's/^/  /')
[ ! -f "$OUT/WARNINGS" ] || { echo "warnings:"; cat "$OUT/WARNINGS"; }
if [ -f "$OUT/FAILURES" ]; then
  echo "make_goldens: some runs reported check failures:" >&2
  cat "$OUT/FAILURES" >&2
  exit 1
fi
echo "make_goldens: ok"
