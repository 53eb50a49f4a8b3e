#!/usr/bin/env bash
# NBD benchmark: thaw serve against its peers, same machine, same clients, every peer in the same
# run (docs/benchmarks.md, "NBD"). Three parts, run in this order:
#
#   warm        1 GiB zstd build, fully cached, vs nbdkit file, qemu-nbd raw and nbdkit null on the
#               flattened raw image (tmpfs): fio nbd engine 4 KiB randread QD1 (p50/p99) and QD16
#               (IOPS, server CPU per I/O), 1 MiB sequential QD4, warm nbdcopy.
#   compressed  the same zstd build on local disk vs qemu-nbd serving a zstd qcow2 with 2 MiB
#               clusters made from the same raw image: 4 KiB randread for RAND_RUNTIME s (QD1, QD16)
#               and a cold nbdcopy; page cache dropped and a fresh server (no cache dir) per point.
#   cold        a COLD_SIZE build behind the simulated store (sim:ttfb=20ms,bw=100MB/s), zstd and
#               uncompressed, vs nbdkit --filter=cache --filter=delay --filter=rate file (delay-read
#               20 ms, rate 800 Mbit/s = 100 MB/s): first-read latency of FIRST_READS distinct 4 MiB
#               regions (bench/nbd_first_reads.py, QD1) and a cold nbdcopy; fresh servers per point.
#
#   bench/nbd_bench.sh                                  # everything, defaults below
#   PARTS=warm THAW_BASE=/tmp/thaw-before bench/nbd_bench.sh   # before/after of a change
#
# Environment:
#   PARTS        which parts (default "warm compressed cold")
#   SIZE         image size of the warm and compressed parts (default 1GiB)
#   RUNTIME      seconds per warm fio point (default 6)
#   QD1_REPS     warm QD1 repetitions per server, interleaved (default 5)
#   REPS         repetitions of every other point, interleaved (default 3); median and range reported
#   RAND_RUNTIME seconds per compressed random-read point (default 10)
#   COLD_SIZE    image size of the cold part (default 256MiB)
#   FIRST_READS  first reads per cold server per repetition (default 64)
#   THAW_BASE    a second thaw binary, measured as "thaw-base" next to "thaw" in the warm part
#   WORKDIR      scratch directory on tmpfs (default /dev/shm/thaw-nbd-bench.PID)
#   DISKDIR      scratch directory on local disk for the compressed part
#                (default /var/tmp/thaw-nbd-bench.PID); both removed at exit unless KEEP=1
#   THAW, THAW_BENCH  binaries (default target/release/...)
#   OUT          where the results (fio JSON, latencies, summary.txt) are copied (default: not kept)
#
# Only unix sockets are used (no TCP port). Requires nbdkit, qemu-nbd, qemu-img, fio (with the nbd
# engine), nbdcopy, jq, bc, /usr/bin/python3 with python3-libnbd (ci/install.sh installs them), and
# root for the compressed part (echo 3 > /proc/sys/vm/drop_caches).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PARTS=${PARTS:-warm compressed cold}
SIZE=${SIZE:-1GiB}
RUNTIME=${RUNTIME:-6}
QD1_REPS=${QD1_REPS:-5}
REPS=${REPS:-3}
RAND_RUNTIME=${RAND_RUNTIME:-10}
COLD_SIZE=${COLD_SIZE:-256MiB}
FIRST_READS=${FIRST_READS:-64}
THAW=${THAW:-$ROOT/target/release/thaw}
THAW_BENCH=${THAW_BENCH:-$ROOT/target/release/thaw-bench}
THAW_BASE=${THAW_BASE:-}
W=${WORKDIR:-/dev/shm/thaw-nbd-bench.$$}
D=${DISKDIR:-/var/tmp/thaw-nbd-bench.$$}
PY=/usr/bin/python3
TCK=$(getconf CLK_TCK)

has_part() { [[ " $PARTS " == *" $1 "* ]]; }

for t in nbdkit qemu-nbd qemu-img fio nbdcopy jq bc; do
    command -v "$t" >/dev/null || { echo "missing tool: $t (run ci/install.sh)" >&2; exit 1; }
done
"$PY" -c 'import nbd' 2>/dev/null || { echo "missing python3-libnbd (run ci/install.sh)" >&2; exit 1; }
[ -x "$THAW" ] && [ -x "$THAW_BENCH" ] ||
    { echo "build first: cargo build --release -p thaw-server -p thaw-bench" >&2; exit 1; }
[ -z "$THAW_BASE" ] || [ -x "$THAW_BASE" ] || { echo "THAW_BASE $THAW_BASE is not executable" >&2; exit 1; }
if has_part compressed && ! [ -w /proc/sys/vm/drop_caches ]; then
    echo "the compressed part drops the page cache: run as root (or PARTS without compressed)" >&2
    exit 1
fi

declare -A PID SOCK
cleanup() {
    for p in "${PID[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PID[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ -n "${OUT:-}" ] && [ -d "$W/res" ]; then mkdir -p "$OUT" && cp -r "$W/res/." "$OUT/"; fi
    if [ "${KEEP:-0}" != 1 ]; then rm -rf "$W" "$D"; fi
}
trap cleanup EXIT
rm -rf "$W" "$D"; mkdir -p "$W/res" "$W/cold/nbdkit-tmp"

log() { echo "[$(date +%T)] $*" >&2; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# median, then "(min-max)", of the arguments
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
# range FORMAT VALUES...: "min-max", each printed with the printf FORMAT (e.g. %.0f)
range() { local f=$1; shift; printf '%s\n' "$@" | sort -g | awk -v f="$f" 'NR==1{lo=$1} {hi=$1} END {printf f "-" f, lo, hi}'; }
# nearest-rank percentile P of the numbers in file F
pctl() { sort -g "$2" | awk -v p="$1" '{a[NR]=$1} END {i=int(NR*p/100+0.999999); if (i<1) i=1; print a[i]}'; }
ratio() { echo "scale=4; $1 / $2" | bc; }
verdict() { if (( $(echo "$1" | bc) )); then echo met; else echo MISSED; fi; }

# ---- images
gen() { # STORE EXPECTED SIZE CODEC -> build id in $GEN_BUILD, flat image in $GEN_RAW, size in $GEN_BYTES
    "$THAW_BENCH" gen --store "file://$1" --expected "$2" --layers 0 --codec "$4" \
        --frame-size 2MiB --size "$3" --file rootfs.ext4 >"$2.log"
    GEN_RAW=$(jq -r '.layers[0].files["rootfs.ext4"].flat' "$2/chain.json")
    GEN_BYTES=$(jq -r '.layers[0].files["rootfs.ext4"].size' "$2/chain.json")
    GEN_BUILD=$(jq -r '.layers[0].build_id' "$2/chain.json")
}
if has_part warm || has_part compressed; then
    log "generating $SIZE zstd:1 2 MiB-frame build in $W"
    gen "$W/store" "$W/expected" "$SIZE" zstd:1
    BUILD=$GEN_BUILD; RAW=$GEN_RAW; BYTES=$GEN_BYTES
    log "build $BUILD, raw $RAW ($BYTES bytes), compressed $(stat -c %s "$W/store/$BUILD/rootfs.ext4.zstd") bytes"
fi

# ---- servers (unix sockets only); launch NAME starts it and waits until it serves
launch() {
    local n=$1 s=$W/$1.sock
    SOCK[$n]=$s; rm -f "$s"
    case $n in
    thaw | thaw-base)
        local bin=$THAW; [ "$n" = thaw-base ] && bin=$THAW_BASE
        "$bin" serve --store "file://$W/store" --build "$BUILD" --file rootfs.ext4 --read-only \
            --listen "unix:$s" >"$W/$n.out" 2>"$W/$n.err" & ;;
    nbdkit-file) nbdkit -f -r -U "$s" file "$RAW" >"$W/$n.out" 2>"$W/$n.err" & ;;
    qemu-nbd) qemu-nbd -t -r -f raw -k "$s" --aio=io_uring -e 4 "$RAW" >"$W/$n.out" 2>"$W/$n.err" & ;;
    nbdkit-null) nbdkit -f -r -U "$s" null size="$BYTES" >"$W/$n.out" 2>"$W/$n.err" & ;;
    thaw-disk)
        "$THAW" serve --store "file://$D/store" --build "$BUILD" --file rootfs.ext4 --read-only \
            --listen "unix:$s" >"$W/$n.out" 2>"$W/$n.err" & ;;
    qemu-qcow2)
        qemu-nbd -t -r -f qcow2 -k "$s" --aio=io_uring -e 4 "$D/img.qcow2" >"$W/$n.out" 2>"$W/$n.err" & ;;
    thaw-sim-zstd | thaw-sim-none)
        local c=${n#thaw-sim-} b=$CB_ZSTD; [ "$c" = none ] && b=$CB_NONE
        "$THAW" serve --store "sim:ttfb=20ms,bw=100MB/s,inner=file://$W/cold/$c" --build "$b" \
            --file rootfs.ext4 --read-only --listen "unix:$s" >"$W/$n.out" 2>"$W/$n.err" & ;;
    nbdkit-remote)
        TMPDIR=$W/cold/nbdkit-tmp nbdkit -f -r -U "$s" --filter=cache --filter=delay --filter=rate \
            file "$CRAW" cache-on-read=true delay-read=20ms rate=800M >"$W/$n.out" 2>"$W/$n.err" & ;;
    *) echo "unknown server $n" >&2; exit 1 ;;
    esac
    PID[$n]=$!
    for _ in $(seq 200); do [ -S "$s" ] && break; sleep 0.05; done
    [ -S "$s" ] || { echo "$n did not start" >&2; cat "$W/$n.err" >&2 || true; exit 1; }
    if [[ $n == thaw* ]]; then
        for _ in $(seq 200); do grep -q '^ready' "$W/$n.out" && break; sleep 0.05; done
    fi
}
stop() {
    kill "${PID[$1]}" 2>/dev/null || true
    wait "${PID[$1]}" 2>/dev/null || true
    unset "PID[$1]"
}
uri() { echo "nbd+unix:///?socket=${SOCK[$1]}"; }
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }

# fio NAME SERVER RW BS QD SECONDS -> $W/res/NAME.json; prints the server CPU ticks used
run_fio() {
    local name=$1 s=$2 rw=$3 bs=$4 qd=$5 secs=$6 c0 c1
    c0=$(cpu_ticks "${PID[$s]}")
    fio --name=j --ioengine=nbd --uri="$(uri "$s")" --rw="$rw" --bs="$bs" --iodepth="$qd" \
        --size="$BYTES" --time_based --runtime="$secs" --lat_percentiles=1 \
        --output-format=json --output="$W/res/$name.json" >/dev/null
    c1=$(cpu_ticks "${PID[$s]}")
    echo $((c1 - c0))
}
iops() { jq -r '.jobs[0].read.iops' "$W/res/$1.json"; }
ios() { jq -r '.jobs[0].read.total_ios' "$W/res/$1.json"; }
pct() { jq -r ".jobs[0].read.lat_ns.percentile[\"$2\"] / 1000" "$W/res/$1.json"; }
mbs() { jq -r '.jobs[0].read.bw_bytes / 1e6' "$W/res/$1.json"; }
# nbdcopy SERVER -> seconds for the whole export to null:
copy_s() {
    local t0 t1
    t0=$(date +%s.%N); nbdcopy "$(uri "$1")" null:; t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc
}

SUMMARY=$W/res/summary.txt
: >"$SUMMARY"
say() { tee -a "$SUMMARY"; }
printf '%s\n' "NBD benchmark $(date -u +%FT%TZ), $(nproc) CPUs, fio $(fio --version), nbdkit $(nbdkit --version | cut -d' ' -f2), qemu-nbd $(qemu-nbd --version | head -1 | cut -d' ' -f2)" | say

# ============================== warm
if has_part warm; then
    WARM=(thaw)
    [ -n "$THAW_BASE" ] && WARM+=(thaw-base)
    WARM+=(nbdkit-file qemu-nbd nbdkit-null)
    LOAD0=$(loadavg)
    for s in "${WARM[@]}"; do launch "$s"; done
    # one full nbdcopy per server (thaw decodes every frame into its cache), then a timed one
    declare -A COPYW
    for s in "${WARM[@]}"; do log "warm-up nbdcopy $s: $(copy_s "$s") s"; done
    for r in $(seq "$REPS"); do
        for s in "${WARM[@]}"; do COPYW[$s]+=" $(copy_s "$s")"; done
    done
    declare -A P50S P99S IOPSS Q16S Q16P50S Q16P99S CPUS SEQS SEQCPUS
    for r in $(seq "$QD1_REPS"); do
        for s in "${WARM[@]}"; do
            log "warm qd1 rep $r $s"
            run_fio "qd1-$s-$r" "$s" randread 4k 1 "$RUNTIME" >/dev/null
            P50S[$s]+=" $(pct "qd1-$s-$r" 50.000000)"
            P99S[$s]+=" $(pct "qd1-$s-$r" 99.000000)"
            IOPSS[$s]+=" $(iops "qd1-$s-$r")"
        done
    done
    for r in $(seq "$REPS"); do
        for s in "${WARM[@]}"; do
            log "warm qd16 rep $r $s"
            ticks=$(run_fio "qd16-$s-$r" "$s" randread 4k 16 "$RUNTIME")
            Q16S[$s]+=" $(iops "qd16-$s-$r")"
            Q16P50S[$s]+=" $(pct "qd16-$s-$r" 50.000000)"
            Q16P99S[$s]+=" $(pct "qd16-$s-$r" 99.000000)"
            CPUS[$s]+=" $(echo "scale=3; $ticks * 1000000 / $TCK / $(ios "qd16-$s-$r")" | bc)"
        done
    done
    for r in $(seq "$REPS"); do
        for s in "${WARM[@]}"; do
            log "warm seq rep $r $s"
            ticks=$(run_fio "seq-$s-$r" "$s" read 1m 4 "$RUNTIME")
            SEQS[$s]+=" $(mbs "seq-$s-$r")"
            SEQCPUS[$s]+=" $(echo "scale=1; $ticks * 1000000 / $TCK / $(ios "seq-$s-$r")" | bc)"
        done
    done
    for s in "${WARM[@]}"; do stop "$s"; done
    {
    printf '\n%s\n' "## warm: $SIZE zstd:1 2 MiB frames (thaw, fully cached) / flattened raw on tmpfs (peers); fio nbd engine, unix sockets, ${RUNTIME}s per point; QD1 median of $QD1_REPS, others median of $REPS (range)"
    printf '%s\n' "load average at start $LOAD0, at end $(loadavg)"
    printf '\n| server | 4k randread QD1 IOPS | QD1 p50 / p99 | QD16 IOPS | QD16 p50 / p99 | server CPU per I/O, QD16 | 1 MiB seq QD4 | server CPU per 1 MiB read | nbdcopy (warm) |\n'
    printf '|---|---|---|---|---|---|---|---|---|\n'
    for s in "${WARM[@]}"; do
        # shellcheck disable=SC2086
        printf '| %s | %.0f | %.1f / %.1f µs | %.0f (%s) | %.0f / %.0f µs | %.2f µs (%s) | %.0f MB/s (%s) | %.1f µs | %.2f s (%s) |\n' "$s" \
            "$(median ${IOPSS[$s]})" "$(median ${P50S[$s]})" "$(median ${P99S[$s]})" \
            "$(median ${Q16S[$s]})" "$(range %.0f ${Q16S[$s]})" "$(median ${Q16P50S[$s]})" "$(median ${Q16P99S[$s]})" \
            "$(median ${CPUS[$s]})" "$(range %.2f ${CPUS[$s]})" "$(median ${SEQS[$s]})" "$(range %.0f ${SEQS[$s]})" \
            "$(median ${SEQCPUS[$s]})" "$(median ${COPYW[$s]})" "$(range %.2f ${COPYW[$s]})"
    done
    printf '\nQD1 p50 of each repetition (µs):\n\n'
    for s in "${WARM[@]}"; do printf -- '- %s:%s\n' "$s" "${P50S[$s]}"; done
    printf '\nserver CPU per I/O at QD16 of each repetition (µs):\n\n'
    for s in "${WARM[@]}"; do printf -- '- %s:%s\n' "$s" "${CPUS[$s]}"; done
    # shellcheck disable=SC2086
    {
        fp50=$(median ${P50S[nbdkit-file]}); qp50=$(median ${P50S[qemu-nbd]})
        best=nbdkit-file; bp50=$fp50
        if (( $(echo "$qp50 < $fp50" | bc) )); then best=qemu-nbd; bp50=$qp50; fi
        printf '\n| ratio | goal |'; for t in thaw ${THAW_BASE:+thaw-base}; do printf ' %s |' "$t"; done
        printf '\n|---|---|'; for t in thaw ${THAW_BASE:+thaw-base}; do printf -- '---|'; done; printf '\n'
        row() { # LABEL GOAL-OP GOAL EXPR-per-server
            printf '| %s | %s %s |' "$1" "$2" "$3"
            for t in thaw ${THAW_BASE:+thaw-base}; do
                v=$(eval "$4"); printf ' %.2f %s |' "$v" "$(verdict "$v $2 $3")"
            done; printf '\n'
        }
        row "QD16 IOPS / nbdkit null" '>=' 0.9 'ratio "$(median ${Q16S[$t]})" "$(median ${Q16S[nbdkit-null]})"'
        row "server CPU per I/O at QD16 / nbdkit file's" '<=' 0.6 'ratio "$(median ${CPUS[$t]})" "$(median ${CPUS[nbdkit-file]})"'
        row "QD1 p50 / best peer's ($best)" '<=' 0.75 'ratio "$(median ${P50S[$t]})" "$bp50"'
        row "1 MiB sequential / nbdkit null" '>=' 0.9 'ratio "$(median ${SEQS[$t]})" "$(median ${SEQS[nbdkit-null]})"'
    }
    } | say
fi

# ============================== compressed, local disk
if has_part compressed; then
    mkdir -p "$D"
    cp -r "$W/store" "$D/store"
    log "qemu-img convert -> zstd qcow2, 2 MiB clusters"
    qemu-img convert -f raw -O qcow2 -o compression_type=zstd,cluster_size=2M -c "$RAW" "$D/img.qcow2"
    LOAD0=$(loadavg)
    COMP=(thaw-disk qemu-qcow2)
    declare -A R1 R16 CC
    for r in $(seq "$REPS"); do
        for s in "${COMP[@]}"; do
            for qd in 1 16; do
                log "compressed rand qd$qd rep $r $s"
                drop_caches; launch "$s"
                run_fio "rand$qd-$s-$r" "$s" randread 4k "$qd" "$RAND_RUNTIME" >/dev/null
                stop "$s"
                if [ "$qd" = 1 ]; then R1[$s]+=" $(iops "rand1-$s-$r")"; else R16[$s]+=" $(iops "rand16-$s-$r")"; fi
            done
            log "compressed cold nbdcopy rep $r $s"
            drop_caches; launch "$s"
            CC[$s]+=" $(copy_s "$s")"
            stop "$s"
        done
    done
    # shellcheck disable=SC2086
    {
    printf '\n%s\n' "## compressed on local disk: $SIZE, thaw zstd:1 2 MiB frames ($(du -sb "$D/store" | cut -f1) bytes) vs qemu-nbd qcow2 zstd 2 MiB clusters ($(stat -c %s "$D/img.qcow2") bytes); page cache dropped and a fresh server (thaw: no cache dir) before every point; random points ${RAND_RUNTIME}s; median of $REPS (range)"
    printf '%s\n' "load average at start $LOAD0, at end $(loadavg)"
    printf '\n| server | 4k randread QD1 IOPS | 4k randread QD16 IOPS | cold nbdcopy | cold nbdcopy MB/s |\n|---|---|---|---|---|\n'
    for s in "${COMP[@]}"; do
        c=$(median ${CC[$s]})
        printf '| %s | %.0f (%s) | %.0f (%s) | %.2f s (%s) | %.0f |\n' "$s" "$(median ${R1[$s]})" "$(range %.0f ${R1[$s]})" \
            "$(median ${R16[$s]})" "$(range %.0f ${R16[$s]})" "$c" "$(range %.2f ${CC[$s]})" "$(echo "$BYTES / $c / 1000000" | bc -l)"
    done
    q1=$(ratio "$(median ${R1[thaw-disk]})" "$(median ${R1[qemu-qcow2]})")
    q16=$(ratio "$(median ${R16[thaw-disk]})" "$(median ${R16[qemu-qcow2]})")
    mb=$(echo "$BYTES / $(median ${CC[thaw-disk]}) / 1000000" | bc -l)
    printf '\n| ratio | value | goal | verdict |\n|---|---|---|---|\n'
    printf '| thaw / qemu-nbd qcow2, 4k randread QD1 IOPS | %.1f | ≥ 10 | %s |\n' "$q1" "$(verdict "$q1 >= 10")"
    printf '| thaw / qemu-nbd qcow2, 4k randread QD16 IOPS | %.1f | — | — |\n' "$q16"
    printf '| thaw cold nbdcopy MB/s | %.0f | ≥ 900 | %s |\n' "$mb" "$(verdict "$mb >= 900")"
    } | say
fi

# ============================== cold, simulated store
if has_part cold; then
    log "generating $COLD_SIZE builds (zstd:1 and none, same bytes) for the cold part"
    gen "$W/cold/zstd" "$W/cold/zstd-expected" "$COLD_SIZE" zstd:1
    CB_ZSTD=$GEN_BUILD; CRAW=$GEN_RAW; CBYTES=$GEN_BYTES
    gen "$W/cold/none" "$W/cold/none-expected" "$COLD_SIZE" none
    CB_NONE=$GEN_BUILD
    cmp "$CRAW" "$GEN_RAW" || { echo "the zstd and uncompressed builds differ" >&2; exit 1; }
    LOAD0=$(loadavg)
    COLD=(thaw-sim-zstd thaw-sim-none nbdkit-remote)
    declare -A CCOLD FP50S
    for r in $(seq "$REPS"); do
        for s in "${COLD[@]}"; do
            log "cold first reads rep $r $s"
            launch "$s"
            "$PY" "$ROOT/bench/nbd_first_reads.py" "$(uri "$s")" --size "$CBYTES" --region $((4 << 20)) \
                --count "$FIRST_READS" --seed "$r" --verify "$CRAW" >"$W/res/first-$s-$r.txt"
            stop "$s"
            cat "$W/res/first-$s-$r.txt" >>"$W/res/first-$s.txt"
            FP50S[$s]+=" $(pctl 50 "$W/res/first-$s-$r.txt")"
            log "cold nbdcopy rep $r $s"
            launch "$s"
            CCOLD[$s]+=" $(copy_s "$s")"
            stop "$s"
        done
    done
    # shellcheck disable=SC2086
    {
    printf '\n%s\n' "## cold through a simulated store (20 ms, 100 MB/s): $COLD_SIZE; thaw sim: store, zstd:1 2 MiB frames ($(du -sb "$W/cold/zstd" | cut -f1) bytes) and uncompressed; nbdkit file + cache (on read) + delay (read 20 ms) + rate (800M bit/s) on the raw image; a fresh server per point; first reads: $FIRST_READS per repetition, one per 4 MiB region, QD1, pooled over $REPS repetitions; nbdcopy median of $REPS (range)"
    printf '%s\n' "load average at start $LOAD0, at end $(loadavg)"
    printf '\n| server | first read p50 / p99 | p50 per repetition (ms) | cold nbdcopy | MB/s |\n|---|---|---|---|---|\n'
    for s in "${COLD[@]}"; do
        c=$(median ${CCOLD[$s]})
        printf '| %s | %.1f / %.1f ms | %s | %.2f s (%s) | %.1f |\n' "$s" \
            "$(echo "$(pctl 50 "$W/res/first-$s.txt") / 1000" | bc -l)" "$(echo "$(pctl 99 "$W/res/first-$s.txt") / 1000" | bc -l)" \
            "$(for v in ${FP50S[$s]}; do printf '%.1f ' "$(echo "$v / 1000" | bc -l)"; done)" \
            "$c" "$(range %.2f ${CCOLD[$s]})" "$(echo "$CBYTES / $c / 1000000" | bc -l)"
    done
    n50=$(pctl 50 "$W/res/first-nbdkit-remote.txt"); n99=$(pctl 99 "$W/res/first-nbdkit-remote.txt")
    nc=$(median ${CCOLD[nbdkit-remote]})
    printf '\n| ratio (vs nbdkit cache+delay+rate) | thaw-sim-zstd | thaw-sim-none |\n|---|---|---|\n'
    printf '| first read p50 | %.2f | %.2f |\n' "$(ratio "$(pctl 50 "$W/res/first-thaw-sim-zstd.txt")" "$n50")" "$(ratio "$(pctl 50 "$W/res/first-thaw-sim-none.txt")" "$n50")"
    printf '| first read p99 | %.2f | %.2f |\n' "$(ratio "$(pctl 99 "$W/res/first-thaw-sim-zstd.txt")" "$n99")" "$(ratio "$(pctl 99 "$W/res/first-thaw-sim-none.txt")" "$n99")"
    printf '| cold nbdcopy speed | %.1f | %.1f |\n' "$(ratio "$nc" "$(median ${CCOLD[thaw-sim-zstd]})")" "$(ratio "$nc" "$(median ${CCOLD[thaw-sim-none]})")"
    } | say
fi
log "done"
