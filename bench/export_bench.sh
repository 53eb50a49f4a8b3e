#!/usr/bin/env bash
# Export (pause) benchmark: time for `thaw ctl snapshot` to turn a writable export's dirty blocks
# into a new layer, per codec, against the time to merely read the same dirty bytes and compress
# them with the zstd / lz4 command-line tools (or copy them, for `none`) in the same run.
#
#   bench/export_bench.sh                       # 1 GiB disk, 10 % dirty
#   SIZE=256MiB DIRTY=0.2 REPS=3 bench/export_bench.sh
#
# Environment: SIZE (default 1GiB), DIRTY (fraction of 4 KiB blocks, default 0.1), REPS (default 3,
# the median is reported), CODECS (default "zstd:1 zstd:2 lz4 none"), WORKDIR (default
# /dev/shm/thaw-export-bench.PID, removed unless KEEP=1), DEST (extra destination store URL, e.g.
# gs://bucket/prefix with STORAGE_EMULATOR_HOST set; default: only the local file store),
# THAW / THAW_BENCH (default target/release/...).
# Needs python3-libnbd, zstd, lz4, jq. Unix sockets only.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE=${SIZE:-1GiB}
DIRTY=${DIRTY:-0.1}
REPS=${REPS:-3}
CODECS=${CODECS:-zstd:1 zstd:2 lz4 none}
THAW=${THAW:-$ROOT/target/release/thaw}
THAW_BENCH=${THAW_BENCH:-$ROOT/target/release/thaw-bench}
W=${WORKDIR:-/dev/shm/thaw-export-bench.$$}
for t in zstd lz4 jq /usr/bin/python3; do command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 1; }; done
[ -x "$THAW" ] && [ -x "$THAW_BENCH" ] || { echo "build first: cargo build --release -p thaw-server -p thaw-bench" >&2; exit 1; }
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null; [ "${KEEP:-0}" = 1 ] || rm -rf "$W"; }
trap cleanup EXIT
rm -rf "$W"; mkdir -p "$W"
log() { echo "[$(date +%T)] $*" >&2; }
now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

log "generating a $SIZE zstd:2 base build"
"$THAW_BENCH" gen --store "file://$W/store" --expected "$W/expected" --layers 0 --codec zstd:2 \
    --size "$SIZE" --file rootfs.ext4 >/dev/null
BUILD=$(jq -r '.layers[0].build_id' "$W/expected/chain.json")
RAW=$(jq -r '.layers[0].files["rootfs.ext4"].flat' "$W/expected/chain.json")

"$THAW" serve --store "file://$W/store" --export "disk=$BUILD" --listen "unix:$W/nbd.sock" \
    --control "$W/control.sock" --overlay-dir "$W/overlay" >"$W/serve.out" 2>"$W/serve.err" &
PID=$!
for _ in $(seq 100); do grep -q '^ready' "$W/serve.out" 2>/dev/null && break; sleep 0.1; done
log "dirtying $DIRTY of the blocks"
DIRTY_BYTES=$(/usr/bin/python3 "$ROOT/bench/export_dirty.py" "nbd+unix:///disk?socket=$W/nbd.sock" "$RAW" "$DIRTY" 7 "$W/dirty.bin")
log "dirty bytes: $DIRTY_BYTES"
cat "$W/dirty.bin" >/dev/null  # the overlay is in the page cache too

dests=("file://$W/out")
[ -n "${DEST:-}" ] && dests+=("$DEST")
printf '%-8s %-10s %12s %12s %8s %s\n' codec dest thaw_s floor_s ratio floor_tool
for codec in $CODECS; do
    case $codec in
        zstd:*) lvl=${codec#zstd:}; floor_cmd=(zstd "-$lvl" -T2 -q -f "$W/dirty.bin" -o "$W/floor.out"); tool="zstd -$lvl -T2" ;;
        lz4) floor_cmd=(lz4 -1 -q -f "$W/dirty.bin" "$W/floor.out"); tool="lz4 -1" ;;
        none) floor_cmd=(cp "$W/dirty.bin" "$W/floor.out"); tool="cp" ;;
    esac
    floors=(); for _ in $(seq "$REPS"); do t0=$(now); "${floor_cmd[@]}"; t1=$(now); floors+=("$(echo "$t1 - $t0" | bc -l)"); rm -f "$W/floor.out"; done
    floor=$(printf '%s\n' "${floors[@]}" | median)
    for dest in "${dests[@]}"; do
        times=()
        for _ in $(seq "$REPS"); do
            id=$(cat /proc/sys/kernel/random/uuid)
            t0=$(now)
            "$THAW" ctl --control "$W/control.sock" snapshot disk --new-build "$id" --codec "$codec" --to "$dest" >"$W/reply.json"
            t1=$(now)
            [ "$(jq -r .diff_bytes "$W/reply.json")" = "$DIRTY_BYTES" ] || { echo "diff size mismatch" >&2; cat "$W/reply.json" >&2; exit 1; }
            times+=("$(echo "$t1 - $t0" | bc -l)")
        done
        t=$(printf '%s\n' "${times[@]}" | median)
        label=${dest%%:*}
        printf '%-8s %-10s %12.3f %12.3f %8.2f %s\n' "$codec" "$label" "$t" "$floor" "$(echo "$t / $floor" | bc -l)" "$tool"
    done
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
