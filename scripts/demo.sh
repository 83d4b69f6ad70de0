#!/usr/bin/env bash
# demo.sh — the README's main-job command: set up, build, make the small TWN checkpoint, build a
# sample image-text corpus from Debian-packaged data, and embed it on the CPU.  Until the pipeline issue
# lands `twn run`, the main job is `twn embed` (same engine, one process, local files).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh build
OUT=${TWN_DEMO_OUT:-out/demo}
mkdir -p "$OUT"
[ -f "$OUT/model/twn.json" ] || build/cli/twn mkmodel --out "$OUT/model" --preset tiny --seed 1
# Sample corpus: real image-text pairs from Debian packages (Noto Color Emoji's PNG glyphs
# captioned with their Unicode names, image-only items, license paragraphs as text-only items).
[ -f "$OUT/corpus/items.jsonl" ] || /usr/bin/python3 scripts/make_sample_corpus.py "$OUT/corpus" --items 200
build/cli/twn inspect "$OUT/model"
build/cli/twn embed --model "$OUT/model" --input "$OUT/corpus/items.jsonl" --out "$OUT/embeddings"
echo "demo: embeddings in $OUT/embeddings (embeddings.npy, items.jsonl, dead_letter.jsonl)"
# The pipeline: coordinator, gate, reasoning worker and 2 index shards as threads of one process.
rm -rf "$OUT/index"
build/cli/twn run --model "$OUT/model" --input "$OUT/corpus/items.jsonl" --out "$OUT/index" --shards 2
echo "demo: index shards in $OUT/index/shard-*/ (index.faiss, embeddings.npy, items.jsonl, manifest.json)"
# Search the index with a caption, and with an indexed image (which finds itself first).
build/cli/twn search --model "$OUT/model" --index "$OUT/index" --text "grinning face" -k 3
build/cli/twn search --model "$OUT/model" --index "$OUT/index" --image "$OUT/corpus/images/02049.png" -k 3
