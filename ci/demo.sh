#!/usr/bin/env bash
# ci/demo.sh [DIR]: the main job. `thaw demo` builds a small layered, compressed ext4 image in DIR
# (a zstd-framed base build plus one diff layer) and serves it read-write over NBD on a unix socket
# and a loopback TCP port; this script then uses it the way a person would (nbdinfo, qemu-img
# compare, nbdcopy + debugfs, qemu-io writes), stops it with SIGTERM and checks it exits cleanly.
# Then, as before, it generates a 3-layer chain in e2b's uncompressed layout, compresses the whole
# chain with `thaw compress --recursive` and verifies every layer with `thaw inspect --verify`.
# To keep the server running for your own experiments: target/release/thaw demo --dir DIR
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-$(mktemp -d /tmp/thaw-demo.XXXXXX)}
mkdir -p "$DIR"
cargo build --release -q -p thaw-server -p thaw-bench
BIN=$PWD/target/release
export PATH=/usr/bin:/usr/sbin:/bin:/sbin:$PATH

echo "== thaw demo --dir $DIR/serve"
"$BIN/thaw" demo --dir "$DIR/serve" > "$DIR/demo.out" &
PID=$!
cleanup() { kill -9 "$PID" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 1 300); do
  grep -q '^ready$' "$DIR/demo.out" 2>/dev/null && break
  kill -0 "$PID" 2>/dev/null || { echo "thaw demo exited early" >&2; exit 1; }
  sleep 0.1
done
grep -q '^ready$' "$DIR/demo.out" || { echo "thaw demo did not become ready" >&2; exit 1; }
TCP=$(grep -o 'nbd://127.0.0.1:[0-9]*' "$DIR/demo.out" | head -1)
SOCK="$DIR/serve/nbd.sock"
echo "serving at $TCP and $SOCK"

nbdinfo --list "$TCP"
qemu-img compare -f raw -F raw "$DIR/serve/top.ext4" "$TCP/demo"
qemu-img compare -f raw -F raw "$DIR/serve/base.ext4" "nbd+unix:///base?socket=$SOCK"
nbdcopy "nbd+unix:///demo?socket=$SOCK" "$DIR/copy.raw"
cmp "$DIR/copy.raw" "$DIR/serve/top.ext4"
debugfs -R 'cat /hello.txt' "$DIR/copy.raw" 2>/dev/null | grep -q 'diff layer'
nbdinfo --map "$TCP/demo" | head -5
qemu-io -f raw -c 'write -P 0xaa 1048576 65536' -c 'read -P 0xaa 1048576 65536' "$TCP/demo" >/dev/null
nbdcopy "$TCP/demo" "$DIR/copy2.raw"
python3 - "$DIR/copy2.raw" "$DIR/serve/top.ext4" <<'PY'
import sys
got, base = open(sys.argv[1], 'rb').read(), bytearray(open(sys.argv[2], 'rb').read())
base[1048576:1048576 + 65536] = b'\xaa' * 65536
assert got == bytes(base), "write through the overlay did not read back"
print("overlay write read back: ok")
PY

# A real kernel block device without nbd.ko: nbdfuse exposes the export as a file, the loop driver
# makes it a block device, and the kernel's ext4 mounts it read-write (writes go to the overlay).
if [ -e /dev/fuse ] && [ "$(id -u)" = 0 ] && command -v nbdfuse >/dev/null; then
  echo "== mount the served ext4 (base export) through nbdfuse + loop, read-write"
  mkdir -p "$DIR/fuse" "$DIR/mnt"
  nbdfuse "$DIR/fuse/disk" "nbd+unix:///base?socket=$SOCK" &
  FUSE=$!
  cleanup() {
    umount "$DIR/mnt" 2>/dev/null || true
    umount "$DIR/fuse" 2>/dev/null || true
    kill -9 "$PID" 2>/dev/null || true
  }
  for _ in $(seq 1 100); do [ -f "$DIR/fuse/disk" ] && break; sleep 0.1; done
  mount -o loop -t ext4 "$DIR/fuse/disk" "$DIR/mnt"
  grep -q 'base build' "$DIR/mnt/hello.txt"
  ls -l "$DIR/mnt"
  echo "written by the kernel through thaw's overlay" > "$DIR/mnt/kernel.txt"
  sync
  umount "$DIR/mnt"
  umount "$DIR/fuse"
  wait "$FUSE"
  nbdcopy "nbd+unix:///base?socket=$SOCK" "$DIR/copy3.raw"
  debugfs -R 'cat /kernel.txt' "$DIR/copy3.raw" 2>/dev/null | grep -q 'written by the kernel'
  echo "kernel ext4 mount, write, remount-read through the overlay: ok"
else
  echo "== skipping the nbdfuse + loop mount (needs root and /dev/fuse)"
fi

kill -TERM "$PID"
wait "$PID"
trap - EXIT
echo "thaw demo stopped cleanly"

echo "== chain: generate, compress, verify"
"$BIN/thaw-bench" gen --store "file://$DIR/plain" --expected "$DIR/expected" \
  --layers 3 --size 32MiB --codec none --seed 42
TOP=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["layers"][-1]["build_id"])' "$DIR/expected/chain.json")

"$BIN/thaw" compress --store "file://$DIR/plain" --build "$TOP" --recursive \
  --codec zstd:2 --to "file://$DIR/zstd"

for id in $(python3 -c 'import json,sys; [print(l["build_id"]) for l in json.load(open(sys.argv[1]))["layers"]]' "$DIR/expected/chain.json"); do
  "$BIN/thaw" inspect --store "file://$DIR/zstd" --build "$id" --verify >/dev/null
  echo "verified $id"
done
"$BIN/thaw" inspect --store "file://$DIR/zstd" --build "$TOP"
echo "demo in $DIR (serve/: the served image, plain/ and zstd/: the chain, expected/: flattened images)"
