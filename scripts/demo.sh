#!/usr/bin/env bash
# demo.sh — the README's main-job command: set up, build, make the small TWN checkpoint, build a
# sample corpus from Debian-packaged text, and embed it on the CPU.  Until the pipeline issue
# lands `twn run`, the main job is `twn embed` (same engine, one process, local files).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh build
OUT=${TWN_DEMO_OUT:-out/demo}
mkdir -p "$OUT"
[ -f "$OUT/model/twn.json" ] || build/cli/twn mkmodel --out "$OUT/model" --preset tiny --seed 1
# Sample corpus: paragraphs of the licenses Debian ships (real text, no download).
python3 - "$OUT/items.jsonl" <<'PY'
import json, sys, glob, os
items = []
for path in sorted(glob.glob("/usr/share/common-licenses/*")):
    if not os.path.isfile(path): continue
    text = open(path, encoding="utf-8", errors="replace").read()
    for i, para in enumerate(p.strip() for p in text.split("\n\n")):
        if 40 <= len(para) <= 600:
            items.append({"id": f"{os.path.basename(path)}#{i}", "text": " ".join(para.split())})
items = items[:200]
with open(sys.argv[1], "w") as f:
    for it in items: f.write(json.dumps(it, ensure_ascii=False) + "\n")
print(f"demo: {len(items)} items from /usr/share/common-licenses")
PY
build/cli/twn inspect "$OUT/model"
build/cli/twn embed --model "$OUT/model" --input "$OUT/items.jsonl" --out "$OUT/embeddings"
echo "demo: embeddings in $OUT/embeddings (embeddings.npy, items.jsonl, dead_letter.jsonl)"
