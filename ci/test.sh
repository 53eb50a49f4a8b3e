#!/usr/bin/env bash
# ci/test.sh: the project's test command (README). Installs what it needs, then checks formatting,
# lints, runs every workspace test, and builds the fuzz targets.
#   ci/test.sh            everything
#   SKIP_FUZZ_BUILD=1 ci/test.sh   skip the (slow) cargo-fuzz build
#   SKIP_KERNEL_NBD=1 ci/test.sh   skip the kernel NBD client guest (ci/nbd-kernel-guest.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

ci/install.sh
# Tests that need an external tool (an emulator, a client) fail instead of skipping when it is missing.
export THAW_REQUIRE_TOOLS=1

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo doc (workspace crates, warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

echo "== cargo test"
cargo test --workspace --locked 2>&1 | tee target/test-output.txt
# Fail loudly if the test harness ran nothing at all (a silent misconfiguration).
if ! grep -q "test result: ok" target/test-output.txt; then
  echo "ci/test.sh: no test ran" >&2
  exit 1
fi

if [ "${SKIP_KERNEL_NBD:-0}" != 1 ]; then
  echo "== kernel nbd.ko: nbd-client against thaw serve, and thaw serve --attach in the guest (TCG; ~40-60 s, first run +~30 s of packages)"
  THAW_PROFILE=dev ci/nbd-kernel-guest.sh target/nbd-kernel-guest
fi

if [ "${SKIP_FUZZ_BUILD:-0}" != 1 ]; then
  echo "== fuzz targets (build only)"
  ci/fuzz.sh
fi
echo "ci/test.sh: all checks passed"
