#!/bin/sh
# bench_gate_fill.sh — gate batch fill with small units: items per gate pass
# (twn_gate_batch_items_total / twn_gate_batches_total, scraped from `twn run`'s /metrics at the
# end of the job) and wall time, for each TWN binary given, alternating, with the null engine.
#
#   bench/bench_gate_fill.sh ITEMS UNIT_ITEMS CREDITS ITEM_US REPS TWN_BIN...
# e.g. bench/bench_gate_fill.sh 20000 5 16 100 3 /tmp/old/twn build/cli/twn
# gate.batch is 32 (the default); one gate, one worker, 2 shards.
set -eu
N=${1:?usage: bench_gate_fill.sh ITEMS UNIT_ITEMS CREDITS ITEM_US REPS TWN_BIN...}
U=${2:?UNIT_ITEMS}
C=${3:?CREDITS}
US=${4:?ITEM_US}
REPS=${5:?REPS}
shift 5
W=${TWN_BENCH_DIR:-/tmp/twn-bench-gate-fill}
mkdir -p "$W"
IN="$W/items-$N.jsonl"
[ -s "$IN" ] || /usr/bin/python3 -c "
import sys
with open(sys.argv[1], 'w') as f:
    for i in range(int(sys.argv[2])):
        f.write('{\"id\": \"g%07d\", \"text\": \"item %d\"}\n' % (i, i))" "$IN" "$N"
echo "items $N, unit_items $U, gate.credits $C, gate.batch 32, null_item_us $US, $(nproc) cpus, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "rep  binary  passes  items  items/pass  fill  seconds"
for r in $(seq 1 "$REPS"); do
    for B in "$@"; do
        rm -rf "$W/out" "$W/log"
        s=$(date +%s.%N)
        "$B" run --engine null --input "$IN" --out "$W/out" --shards 2 --unit-items "$U" \
            --gate.credits "$C" --job.null_item_us "$US" --metrics.linger_ms 3000 \
            >"$W/log" 2>&1 &
        pid=$!
        until grep -qs '^units .* seconds' "$W/log"; do
            kill -0 $pid 2>/dev/null || { cat "$W/log" >&2; exit 1; }
            sleep 0.05
        done
        e=$(date +%s.%N)
        url=$(sed -n 's/.*metrics at \(http:[^)]*\)).*/\1/p' "$W/log" | head -1)
        m=$(curl -s "$url")
        wait $pid
        p=$(echo "$m" | awk '$1 == "twn_gate_batches_total" {print $2}')
        i=$(echo "$m" | awk '$1 == "twn_gate_batch_items_total" {print $2}')
        echo "$r $B $p $i $s $e" | awk '{printf "%3d  %s  %6d  %6d  %10.1f  %4.2f  %7.2f\n",
            $1, $2, $3, $4, $4 / $3, $4 / $3 / 32, $6 - $5}'
    done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
