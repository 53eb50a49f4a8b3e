#!/usr/bin/env bash
# ci/demo.sh [DIR]: the main job until `thaw demo` exists. Generates a small layered chain in e2b's
# layout (uncompressed, V3 headers, as e2b's orchestrator writes them with compression off),
# compresses the whole chain with `thaw compress --recursive` (zstd level 2, 2 MiB frames, V4
# headers), then checks every layer with `thaw inspect --verify` and prints the top layer.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-$(mktemp -d /tmp/thaw-demo.XXXXXX)}
mkdir -p "$DIR"
cargo build --release -q -p thaw-server -p thaw-bench
BIN=target/release

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
echo "demo chain in $DIR (plain/: uncompressed, zstd/: compressed, expected/: flattened images)"
