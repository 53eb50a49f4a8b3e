#!/usr/bin/env bash
# Before/after of a change in thaw serve's warm read path: two (or more) thaw binaries serve the
# same warm build side by side, and fio's nbd engine (4 KiB randread, QD, RUNTIME s per point)
# runs against each in turn, rotating the order every repetition. Per point: the server's CPU
# time (`perf stat -e task-clock -p PID`, all threads) per completed I/O, IOPS and p50 latency;
# then the median and range per binary.
#
#   bench/nbd_ab.sh base=/tmp/thaw-before new=target/release/thaw
#   QD=1 REPS=6 bench/nbd_ab.sh base=/tmp/thaw-before new=target/release/thaw
#
# Environment: QD (16), REPS (8), RUNTIME (4), SIZE (256MiB), WORKDIR (/dev/shm/thaw-nbd-ab.PID,
# removed at exit), THAW_BENCH (target/release/thaw-bench). Unix sockets only. Needs perf, fio,
# nbdcopy, jq.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
QD=${QD:-16}
REPS=${REPS:-8}
RUNTIME=${RUNTIME:-4}
SIZE=${SIZE:-256MiB}
THAW_BENCH=${THAW_BENCH:-$ROOT/target/release/thaw-bench}
W=${WORKDIR:-/dev/shm/thaw-nbd-ab.$$}
[ $# -ge 2 ] || { echo "usage: $0 NAME=THAW_BINARY NAME=THAW_BINARY..." >&2; exit 1; }
for t in perf fio nbdcopy jq; do command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 1; }; done

declare -A PID
cleanup() {
    for p in "${PID[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PID[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$W"
}
trap cleanup EXIT
rm -rf "$W"; mkdir -p "$W"

"$THAW_BENCH" gen --store "file://$W/store" --expected "$W/expected" --layers 0 --codec zstd:1 \
    --frame-size 2MiB --size "$SIZE" --file rootfs.ext4 >/dev/null
BUILD=$(jq -r '.layers[0].build_id' "$W/expected/chain.json")
BYTES=$(jq -r '.layers[0].files["rootfs.ext4"].size' "$W/expected/chain.json")

NAMES=()
for nb in "$@"; do
    n=${nb%%=*} b=${nb#*=}
    [ -x "$b" ] || { echo "$b is not executable" >&2; exit 1; }
    "$b" serve --store "file://$W/store" --build "$BUILD" --file rootfs.ext4 --read-only \
        --listen "unix:$W/$n.sock" >"$W/$n.out" 2>&1 &
    PID[$n]=$!; NAMES+=("$n")
done
for n in "${NAMES[@]}"; do
    for _ in $(seq 100); do grep -q '^ready' "$W/$n.out" && break; sleep 0.1; done
    nbdcopy "nbd+unix:///?socket=$W/$n.sock" null: # warm: every frame decoded once
done

: >"$W/points"
for rep in $(seq "$REPS"); do
    k=$((rep % ${#NAMES[@]}))
    for n in "${NAMES[@]:k}" "${NAMES[@]:0:k}"; do
        perf stat -e task-clock -x, -o "$W/perf-$n-$rep" -p "${PID[$n]}" &
        pp=$!
        sleep 0.2
        fio --name=j --ioengine=nbd --uri="nbd+unix:///?socket=$W/$n.sock" --rw=randread --bs=4k \
            --iodepth="$QD" --size="$BYTES" --time_based --runtime="$RUNTIME" --lat_percentiles=1 \
            --output-format=json --output="$W/fio-$n-$rep.json" >/dev/null
        kill -INT "$pp"; wait "$pp" || true
        ios=$(jq -r '.jobs[0].read.total_ios' "$W/fio-$n-$rep.json")
        p50=$(jq -r '.jobs[0].read.lat_ns.percentile["50.000000"] / 1000' "$W/fio-$n-$rep.json")
        awk -F, -v ios="$ios" -v n="$n" -v p50="$p50" -v s="$RUNTIME" \
            '$3 ~ /task-clock/ {printf "%s %.3f %.0f %.1f\n", n, $1 * 1000 / ios, ios / s, p50}' \
            "$W/perf-$n-$rep" | tee -a "$W/points" >&2
    done
done

echo "4 KiB randread QD$QD, ${RUNTIME}s x $REPS per binary, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| binary | server CPU per I/O (µs) | IOPS | p50 (µs) |"
echo "|---|---|---|---|"
for n in "${NAMES[@]}"; do
    awk -v n="$n" '$1 == n {print $2, $3, $4}' "$W/points" | sort -g -k1,1 | awk -v n="$n" '
        {c[NR] = $1; i[NR] = $2; p[NR] = $3}
        function med(a, k,   j, t, m) { # insertion sort copy, then median
            for (j = 1; j <= k; j++) m[j] = a[j]
            for (j = 2; j <= k; j++) { t = m[j]; x = j - 1; while (x > 0 && m[x] > t) { m[x + 1] = m[x]; x-- } m[x + 1] = t }
            lo = m[1]; hi = m[k]
            return (k % 2) ? m[(k + 1) / 2] : (m[k / 2] + m[k / 2 + 1]) / 2
        }
        END {
            mc = med(c, NR); clo = lo; chi = hi; mi = med(i, NR); ilo = lo; ihi = hi; mp = med(p, NR)
            printf "| %s | %.2f (%.2f-%.2f) | %.0f (%.0f-%.0f) | %.1f (%.1f-%.1f) |\n", n, mc, clo, chi, mi, ilo, ihi, mp, lo, hi
        }'
done
