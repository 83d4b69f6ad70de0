#!/bin/sh
# bench_scale.sh — control-plane scale: N items end to end through `twn run --engine null`
# (coordinator, gates, workers and S indexers as threads; the null engine makes a vector from
# the id in ~100 ns, so what is measured is planning, leasing, routing, the data path, WAL and
# shards).  Samples the process's VmRSS every second and reports items/s and first/last/peak
# RSS, plus the RSS growth per million items (the shards keep every id, route and vector in
# memory until their snapshot, so some growth per item is by design: see BENCHMARKS.md).
#
#   bench/bench_scale.sh TWN_BIN N_ITEMS [SHARDS] [DIM] [WORKDIR]
set -eu
TWN=${1:?usage: bench_scale.sh TWN_BIN N_ITEMS [SHARDS] [DIM] [WORKDIR]}
N=${2:?N_ITEMS}
S=${3:-4}
DIM=${4:-8}
W=${5:-/tmp/twn-bench-scale}
mkdir -p "$W"
IN="$W/items-$N.jsonl"
if [ ! -s "$IN" ]; then
    /usr/bin/python3 -c "
import sys
w = sys.stdout.write
for i in range($N): w('{\"id\": \"n%09d\", \"text\": \"item %d\"}\n' % (i, i))" >"$IN"
fi
rm -rf "$W/out"
"$TWN" run --engine null --dim "$DIM" --input "$IN" --out "$W/out" --shards "$S" --gates 2 \
    --workers 2 --unit-items 10000 >"$W/stdout" 2>"$W/stderr" &
PID=$!
T0=$(date +%s.%N)
: >"$W/rss"
while kill -0 $PID 2>/dev/null; do
    R=$(awk '/VmRSS/ {print $2}' /proc/$PID/status 2>/dev/null || true)
    [ -n "$R" ] && echo "$(echo "$(date +%s.%N) - $T0" | bc) $R" >>"$W/rss"
    sleep 1
done
wait $PID
cat "$W/stdout"
awk -v n="$N" '
    NR == 1 {first = $2; t1 = $1}
    {last = $2; tl = $1; if ($2 > peak) peak = $2; if (NR == 2) {second = $2; t2 = $1}}
    END {
        printf "rss samples %d: first %.1f MB (t=%.1f s), second %.1f MB, last %.1f MB (t=%.1f s), peak %.1f MB\n",
               NR, first / 1024, t1, second / 1024, last / 1024, tl, peak / 1024
        if (tl > t2) printf "slope %.2f MB/s between the 2nd and last sample\n", (last - second) / 1024 / (tl - t2)
    }' "$W/rss"
