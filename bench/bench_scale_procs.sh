#!/bin/sh
# bench_scale_procs.sh — control-plane scale with the roles as separate processes: N JSONL items
# through `twn coordinator`, G `twn gate`, W `twn worker` and S `twn indexer` processes over
# ipc:// with the null engine (a vector from the id in ~100 ns, so what is measured is planning,
# leasing, routing, the data path, WAL and shards).  Samples every process's VmRSS (and VmHWM, the
# kernel's own peak, which catches what a 1 s sample misses) once a second and reports, per role
# (the sum over that role's processes): the first and last sample, the peak, the growth
# (peak - first) in MB per million items, and the CPU time the role used (user + system, to its
# last sample; for the coordinator also items per CPU second).  A role whose state is bounded by
# what is in flight has a growth that does not scale with N; the indexers hold their store +
# FAISS index until the snapshot, so theirs does by design (BENCHMARKS.md, "Control plane at
# scale").
#
#   bench/bench_scale_procs.sh TWN_BIN N_ITEMS [SHARDS] [DIM] [WORKDIR] [GATES] [WORKERS]
#
# UNIT_ITEMS=U in the environment sets job.unit_items (default 10000).  Writes WORKDIR/rss
# (t role pid VmRSS_kB VmHWM_kB cpu_ticks per line), WORKDIR/<role>.log and WORKDIR/job.yaml.
set -eu
TWN=${1:?usage: bench_scale_procs.sh TWN_BIN N_ITEMS [SHARDS] [DIM] [WORKDIR] [GATES] [WORKERS]}
N=${2:?N_ITEMS}
S=${3:-4}
DIM=${4:-8}
W=${5:-/tmp/twn-bench-procs}
G=${6:-2}
WK=${7:-2}
UNIT=${UNIT_ITEMS:-10000}
[ -x "$TWN" ] || { echo "bench_scale_procs.sh: $TWN is not an executable" >&2; exit 2; }
mkdir -p "$W"
W=$(cd "$W" && pwd)
IN="$W/items-$N.jsonl"
if [ ! -s "$IN" ]; then
    /usr/bin/python3 -c "
import sys
w = sys.stdout.write
for i in range($N): w('{\"id\": \"n%09d\", \"text\": \"item %d\"}\n' % (i, i))" >"$IN.tmp"
    mv "$IN.tmp" "$IN"
fi
rm -rf "$W/out" "$W/sock"
mkdir -p "$W/sock"
CFG="$W/job.yaml"
{
    printf 'job:\n  inputs:\n    - %s\n  out: %s/out\n  engine: null\n  dim: %s\n' "$IN" "$W" "$DIM"
    printf '  shards: %s\n  unit_items: %s\n' "$S" "$UNIT"
    printf 'coordinator:\n  listen: ipc://%s/sock/ctl\nindexer:\n  endpoints:\n' "$W"
    s=0
    while [ $s -lt "$S" ]; do
        printf '    - ipc://%s/sock/shard-%d\n' "$W" $s
        s=$((s + 1))
    done
    printf 'log:\n  progress: off\n'
} >"$CFG"

PIDS=""
spawn() { # ROLE NAME ARGS...
    role=$1
    name=$2
    shift 2
    "$TWN" "$@" >"$W/$name.log" 2>&1 &
    PIDS="$PIDS $role:$name:$!"
}
s=0
while [ $s -lt "$S" ]; do
    spawn indexers indexer-$s indexer --config "$CFG" --shard $s
    s=$((s + 1))
done
i=0
while [ $i -lt "$G" ]; do
    spawn gates gate-$i gate --config "$CFG"
    i=$((i + 1))
done
i=0
while [ $i -lt "$WK" ]; do
    spawn workers worker-$i worker --config "$CFG"
    i=$((i + 1))
done
spawn coordinator coordinator coordinator --config "$CFG" --log.progress lines
trap 'for e in $PIDS; do kill "${e##*:}" 2>/dev/null || true; done' INT TERM

T0=$(date +%s.%N)
sleep 0.5 # the first sample: every process started and connected, before much work
CEND=""
: >"$W/rss"
while :; do
    alive=0
    t=$(echo "$(date +%s.%N) - $T0" | bc)
    for e in $PIDS; do
        pid=${e##*:}
        role=${e%%:*}
        r=$(awk '/^VmRSS/ {r = $2} /^VmHWM/ {h = $2} END {if (r != "") print r, h}' \
            /proc/$pid/status 2>/dev/null || true)
        [ -z "$r" ] || r="$r $(awk '{print $14 + $15}' /proc/$pid/stat 2>/dev/null || echo 0)"
        if [ -n "$r" ]; then
            alive=1
            echo "$t $role $pid $r" >>"$W/rss"
        elif [ "$role" = coordinator ] && [ -z "$CEND" ]; then
            CEND=$t
        fi
    done
    [ $alive = 1 ] || break
    sleep 1
done
T1=$(date +%s.%N)
rc=0
for e in $PIDS; do
    pid=${e##*:}
    n=${e#*:}
    n=${n%%:*}
    if ! wait "$pid"; then
        echo "$n exited with a failure; its log:" >&2
        tail -5 "$W/$n.log" >&2
        rc=1
    fi
done
grep '^units ' "$W/coordinator.log" || true
SECS=$(awk '/^units / {print $NF}' "$W/coordinator.log")
RATE=?
[ -z "$SECS" ] || RATE=$(echo "$N / $SECS" | bc)
echo "items $N: job ${SECS:-?} s by the coordinator's summary ($RATE items/s)," \
    "coordinator exited within ${CEND:-?} s of the spawn, every process gone after $(echo "$T1 - $T0" | bc) s;" \
    "load average now: $(cut -d' ' -f1-3 /proc/loadavg)"
# Per role: at each sample time, the sum of its processes' VmRSS; the peak is the larger of the
# largest such sum and the sum of the processes' VmHWM at their last sample.
awk -v n="$N" -v hz="$(getconf CLK_TCK)" '
    {
        t = $1; role = $2; pid = $3
        key = role SUBSEP t
        if (!(key in sum)) { ts[role, ++ns[role]] = t }
        sum[key] += $4
        hwm[role, pid] = $5; cpu[role, pid] = $6; roles[role] = 1; pids[role, pid] = 1
    }
    END {
        printf "%-12s %5s %10s %10s %10s %12s %10s %8s\n", "role", "procs", "first MB", "last MB",
               "peak MB", "growth MB", "MB/M items", "CPU s"
        split("coordinator gates workers indexers", order, " ")
        for (o = 1; o <= 4; o++) {
            r = order[o]
            if (!(r in roles)) continue
            first = sum[r, ts[r, 1]]; last = sum[r, ts[r, ns[r]]]; peak = 0
            for (k = 1; k <= ns[r]; k++) if (sum[r, ts[r, k]] > peak) peak = sum[r, ts[r, k]]
            h = 0; np = 0; c = 0
            for (rp in pids) {
                split(rp, a, SUBSEP)
                if (a[1] == r) { h += hwm[r, a[2]]; c += cpu[r, a[2]]; np++ }
            }
            if (h > peak) peak = h
            printf "%-12s %5d %10.1f %10.1f %10.1f %12.1f %10.2f %8.1f\n", r, np, first / 1024,
                   last / 1024, peak / 1024, (peak - first) / 1024, (peak - first) / 1024 / (n / 1e6),
                   c / hz
            if (r == "coordinator" && c > 0)
                printf "coordinator: %.2f M items per CPU second (user + system, to its last sample)\n",
                       n / (c / hz) / 1e6
        }
    }' "$W/rss"
exit $rc
