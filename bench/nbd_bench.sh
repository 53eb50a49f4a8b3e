#!/usr/bin/env bash
# NBD benchmark: thaw serve vs nbdkit file, qemu-nbd raw and nbdkit null (the client ceiling),
# same machine, same client (fio's nbd engine over unix sockets), all servers in one run.
#
#   bench/nbd_bench.sh                      # 1 GiB image, defaults below
#   SIZE=512MiB RUNTIME=5 QD1_REPS=3 bench/nbd_bench.sh
#
# Environment:
#   SIZE       image size passed to `thaw-bench gen --size` (default 1GiB)
#   RUNTIME    seconds per fio point (default 6)
#   QD1_REPS   QD1 repetitions per server, interleaved; the median of the p50s is reported (default 5)
#   WORKDIR    scratch directory (default /dev/shm/thaw-nbd-bench.PID; removed at exit unless KEEP=1)
#   THAW, THAW_BENCH  binaries (default target/release/...)
#   OUT        where the results (fio JSON, summary.tsv) are copied (default: not kept)
#
# Only unix sockets are used (no TCP port, never 10809). Requires nbdkit, qemu-nbd, fio (with the
# nbd engine), nbdcopy, jq (ci/install.sh installs them).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE=${SIZE:-1GiB}
RUNTIME=${RUNTIME:-6}
QD1_REPS=${QD1_REPS:-5}
THAW=${THAW:-$ROOT/target/release/thaw}
THAW_BENCH=${THAW_BENCH:-$ROOT/target/release/thaw-bench}
W=${WORKDIR:-/dev/shm/thaw-nbd-bench.$$}
TCK=$(getconf CLK_TCK)

for t in nbdkit qemu-nbd fio nbdcopy jq; do
    command -v "$t" >/dev/null || { echo "missing tool: $t (run ci/install.sh)" >&2; exit 1; }
done
[ -x "$THAW" ] && [ -x "$THAW_BENCH" ] ||
    { echo "build first: cargo build --release -p thaw-server -p thaw-bench" >&2; exit 1; }

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ -n "${OUT:-}" ] && [ -d "$W/res" ]; then mkdir -p "$OUT" && cp -r "$W/res/." "$OUT/"; fi
    [ "${KEEP:-0}" = 1 ] || rm -rf "$W"
}
trap cleanup EXIT
rm -rf "$W"; mkdir -p "$W/res"

log() { echo "[$(date +%T)] $*" >&2; }

# ---- 1. image: zstd:1, 2 MiB frames, one layer; plus its flattened raw file for the peers
log "generating $SIZE zstd:1 2 MiB-frame build in $W"
"$THAW_BENCH" gen --store "file://$W/store" --expected "$W/expected" --layers 0 \
    --codec zstd:1 --frame-size 2MiB --size "$SIZE" --file rootfs.ext4 >"$W/gen.log"
BUILD=$(jq -r '.layers[0].build_id' "$W/expected/chain.json")
RAW=$(jq -r '.layers[0].files["rootfs.ext4"].flat' "$W/expected/chain.json")
BYTES=$(jq -r '.layers[0].files["rootfs.ext4"].size' "$W/expected/chain.json")
log "build $BUILD, raw $RAW ($BYTES bytes), compressed $(stat -c %s "$W/store/$BUILD/rootfs.ext4.zstd") bytes"

# ---- 2. servers, unix sockets only
SERVERS=(thaw nbdkit-file qemu-nbd nbdkit-null)
declare -A PID SOCK
for s in "${SERVERS[@]}"; do SOCK[$s]=$W/$s.sock; done

"$THAW" serve --store "file://$W/store" --build "$BUILD" --file rootfs.ext4 --read-only \
    --listen "unix:${SOCK[thaw]}" >"$W/thaw.out" 2>"$W/thaw.err" &
PID[thaw]=$!; PIDS+=($!)
nbdkit -f -r -U "${SOCK[nbdkit-file]}" file "$RAW" 2>"$W/nbdkit-file.err" &
PID[nbdkit-file]=$!; PIDS+=($!)
qemu-nbd -t -r -f raw -k "${SOCK[qemu-nbd]}" --aio=io_uring -e 4 "$RAW" 2>"$W/qemu-nbd.err" &
PID[qemu-nbd]=$!; PIDS+=($!)
nbdkit -f -r -U "${SOCK[nbdkit-null]}" null size="$BYTES" 2>"$W/nbdkit-null.err" &
PID[nbdkit-null]=$!; PIDS+=($!)

uri() { echo "nbd+unix:///?socket=${SOCK[$1]}"; }
for s in "${SERVERS[@]}"; do
    for _ in $(seq 100); do [ -S "${SOCK[$s]}" ] && break; sleep 0.1; done
    [ -S "${SOCK[$s]}" ] || { echo "$s did not start" >&2; cat "$W/$s.err" >&2 || true; exit 1; }
done
for _ in $(seq 100); do grep -q '^ready' "$W/thaw.out" && break; sleep 0.1; done

# ---- 3. warm: one full nbdcopy per server (thaw decodes every frame into its cache)
for s in "${SERVERS[@]}"; do
    t0=$(date +%s.%N); nbdcopy "$(uri "$s")" null:; t1=$(date +%s.%N)
    echo "$s nbdcopy_warm_s $(echo "$t1 - $t0" | bc)" | tee -a "$W/res/nbdcopy.txt" >&2
done
# a second (warm) nbdcopy per server, timed
for s in "${SERVERS[@]}"; do
    t0=$(date +%s.%N); nbdcopy "$(uri "$s")" null:; t1=$(date +%s.%N)
    echo "$s nbdcopy_s $(echo "$t1 - $t0" | bc)" | tee -a "$W/res/nbdcopy.txt" >&2
done

cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }

# fio NAME SERVER RW BS QD -> writes $W/res/NAME.json; prints server CPU ticks used
run_fio() {
    local name=$1 s=$2 rw=$3 bs=$4 qd=$5 c0 c1
    c0=$(cpu_ticks "${PID[$s]}")
    fio --name=j --ioengine=nbd --uri="$(uri "$s")" --rw="$rw" --bs="$bs" --iodepth="$qd" \
        --size="$BYTES" --time_based --runtime="$RUNTIME" --lat_percentiles=1 \
        --output-format=json --output="$W/res/$name.json" >/dev/null
    c1=$(cpu_ticks "${PID[$s]}")
    echo $((c1 - c0))
}
iops() { jq -r '.jobs[0].read.iops' "$W/res/$1.json"; }
ios() { jq -r '.jobs[0].read.total_ios' "$W/res/$1.json"; }
pct() { jq -r ".jobs[0].read.lat_ns.percentile[\"$2\"] / 1000" "$W/res/$1.json"; }
mbs() { jq -r '.jobs[0].read.bw_bytes / 1e6' "$W/res/$1.json"; }

declare -A QD1P50 QD1P99 QD1IOPS QD16 QD16P50 QD16P99 CPUIO SEQ SEQCPU
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# QD1: interleaved repetitions (thread wake-up noise on a VM swings QD1 a lot)
declare -A P50S P99S IOPSS
for r in $(seq "$QD1_REPS"); do
    for s in "${SERVERS[@]}"; do
        log "qd1 rep $r $s"
        run_fio "qd1-$s-$r" "$s" randread 4k 1 >/dev/null
        P50S[$s]+=" $(pct "qd1-$s-$r" 50.000000)"
        P99S[$s]+=" $(pct "qd1-$s-$r" 99.000000)"
        IOPSS[$s]+=" $(iops "qd1-$s-$r")"
    done
done
for s in "${SERVERS[@]}"; do
    QD1P50[$s]=$(median ${P50S[$s]}); QD1P99[$s]=$(median ${P99S[$s]}); QD1IOPS[$s]=$(median ${IOPSS[$s]})
done
for s in "${SERVERS[@]}"; do
    log "qd16 $s"
    ticks=$(run_fio "qd16-$s" "$s" randread 4k 16)
    QD16[$s]=$(iops "qd16-$s"); QD16P50[$s]=$(pct "qd16-$s" 50.000000); QD16P99[$s]=$(pct "qd16-$s" 99.000000)
    CPUIO[$s]=$(echo "scale=3; $ticks * 1000000 / $TCK / $(ios "qd16-$s")" | bc)
done
for s in "${SERVERS[@]}"; do
    log "seq $s"
    ticks=$(run_fio "seq-$s" "$s" read 1m 4)
    SEQ[$s]=$(mbs "seq-$s")
    SEQCPU[$s]=$(echo "scale=1; $ticks * 1000000 / $TCK / $(ios "seq-$s")" | bc)
done

# ---- 4. table
{
printf '\n%s\n' "NBD benchmark: $SIZE zstd:1 2 MiB frames (thaw) / flattened raw on tmpfs (peers); fio $(fio --version) nbd engine, unix sockets, ${RUNTIME}s per point, QD1 median of $QD1_REPS"
printf '%s\n' "load average at end: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) CPUs"
printf '\n| server | 4k randread QD1 IOPS, p50 / p99 | 4k randread QD16 IOPS | QD16 p50 / p99 | server CPU per I/O, QD16 | 1 MiB seq read QD4 | server CPU per 1 MiB read |\n'
printf '|---|---|---|---|---|---|---|\n'
for s in "${SERVERS[@]}"; do
    printf '| %s | %.0f, %.1f / %.1f µs | %.0f | %.0f / %.0f µs | %.2f µs | %.0f MB/s | %.1f µs |\n' \
        "$s" "${QD1IOPS[$s]}" "${QD1P50[$s]}" "${QD1P99[$s]}" "${QD16[$s]}" "${QD16P50[$s]}" "${QD16P99[$s]}" \
        "${CPUIO[$s]}" "${SEQ[$s]}" "${SEQCPU[$s]}"
done
bestpeer=nbdkit-file
if (( $(echo "${QD1P50[qemu-nbd]} < ${QD1P50[nbdkit-file]}" | bc) )); then bestpeer=qemu-nbd; fi
verdict() { if (( $(echo "$1" | bc) )); then echo met; else echo MISSED; fi; }
r1=$(echo "scale=4; ${QD16[thaw]} / ${QD16[nbdkit-null]}" | bc)
r2=$(echo "scale=4; ${CPUIO[thaw]} / ${CPUIO[nbdkit-file]}" | bc)
r3=$(echo "scale=4; ${QD1P50[thaw]} / ${QD1P50[$bestpeer]}" | bc)
r4=$(echo "scale=4; ${SEQ[thaw]} / ${SEQ[nbdkit-null]}" | bc)
printf '\n| ratio | value | goal | verdict |\n|---|---|---|---|\n'
printf '| thaw QD16 IOPS / nbdkit null | %.2f | ≥ 0.9 | %s |\n' "$r1" "$(verdict "$r1 >= 0.9")"
printf '| thaw CPU/IO / nbdkit file CPU/IO (QD16) | %.2f | ≤ 0.6 | %s |\n' "$r2" "$(verdict "$r2 <= 0.6")"
printf '| thaw QD1 p50 / best peer (%s) | %.2f | ≤ 0.75 | %s |\n' "$bestpeer" "$r3" "$(verdict "$r3 <= 0.75")"
printf '| thaw 1M seq / nbdkit null | %.2f | ≥ 0.9 | %s |\n' "$r4" "$(verdict "$r4 >= 0.9")"
printf '\nnbdcopy (second, warm pass, whole image):'
grep ' nbdcopy_s ' "$W/res/nbdcopy.txt" | awk '{printf " %s %.2f s;", $1, $3}'; echo
} | tee "$W/res/summary.txt"
