#!/bin/sh
# bench_pipeline.sh — pipeline efficiency: items/s of `twn run` / items/s of the bare engine
# (`twn embed`: one process calling twn_embed_items over the same file in batches of 64, no
# sockets, no shards) on the same items, alternating them so that machine load hits all alike.
# The engine is timed with OpenMP's default (active) wait policy and with passive, and the faster
# of the two is the baseline.  `twn run` is timed as it runs (it sets passive itself) and with
# OMP_WAIT_POLICY=active forced (what it ran with before).
#
#   bench/bench_pipeline.sh TWN_BIN MODEL_DIR ITEMS [REPS] [WORKDIR]
# MODEL_DIR "tiny" builds the tiny preset (twn mkmodel --preset tiny --seed 1) in WORKDIR.
set -eu
TWN=${1:?usage: bench_pipeline.sh TWN_BIN MODEL_DIR ITEMS [REPS] [WORKDIR]}
MODEL=${2:?MODEL_DIR}
N=${3:?ITEMS}
REPS=${4:-3}
W=${5:-/tmp/twn-bench-pipeline}
mkdir -p "$W"
if [ "$MODEL" = tiny ]; then
    MODEL="$W/tiny"
    [ -d "$MODEL" ] || "$TWN" mkmodel --preset tiny --seed 1 --out "$MODEL" >/dev/null
fi
SRC=$(dirname "$0")/..
[ -s "$W/corpus-$N/items.jsonl" ] ||
    /usr/bin/python3 "$SRC/scripts/make_sample_corpus.py" "$W/corpus-$N" --items "$N" >/dev/null
IN="$W/corpus-$N/items.jsonl"
export OPENBLAS_NUM_THREADS=1
secs() { # seconds of one command (wall)
    s=$(date +%s.%N)
    "$@" >/dev/null 2>"$W/err" || { cat "$W/err" >&2; exit 1; }
    echo "$(date +%s.%N) - $s" | bc
}
echo "items $N, model $MODEL, $(nproc) cpus, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "rep  embed_active_s  embed_passive_s  run_s  run_active_s  engine_items/s  run_items/s  run/engine  run_active/engine"
for r in $(seq 1 "$REPS"); do
    rm -rf "$W/embed" "$W/embed-p" "$W/run" "$W/run-active"
    e=$(OMP_WAIT_POLICY=active secs "$TWN" embed --model "$MODEL" --input "$IN" --out "$W/embed")
    q=$(OMP_WAIT_POLICY=passive secs "$TWN" embed --model "$MODEL" --input "$IN" --out "$W/embed-p")
    p=$(secs "$TWN" run --model "$MODEL" --input "$IN" --out "$W/run" --shards 2)
    a=$(OMP_WAIT_POLICY=active secs "$TWN" run --model "$MODEL" --input "$IN" --out "$W/run-active" --shards 2)
    echo "$r $e $q $p $a" | awk -v n="$N" '{b = $2 < $3 ? $2 : $3;
        printf "%3d  %14.2f  %15.2f  %5.2f  %12.2f  %14.1f  %11.1f  %10.3f  %17.3f\n",
        $1, $2, $3, $4, $5, n / b, n / $4, b / $4, b / $5}'
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
