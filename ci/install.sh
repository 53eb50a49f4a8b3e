#!/usr/bin/env bash
# ci/install.sh: installs what the test suite needs on a fresh Debian 12 machine (root). Idempotent:
# packages already present are not fetched again, so a developer can run it before every test run.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

# Debian packages the tests use as real peers: zstd/lz4 command-line tools (frame interop tests and
# the codec benchmark's reference figures).
need=()
for pkg_bin in zstd:zstd lz4:lz4; do
  pkg=${pkg_bin%%:*}; bin=${pkg_bin#*:}
  command -v "$bin" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "ci/install.sh: missing packages ${need[*]} and not root: install them first" >&2
    exit 1
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Rust components (the machine's one toolchain comes with rustfmt and clippy; make sure).
rustup component add rustfmt clippy >/dev/null 2>&1 || true
echo "ci/install.sh: test dependencies ready"
