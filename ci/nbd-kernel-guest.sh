#!/usr/bin/env bash
# ci/nbd-kernel-guest.sh [WORKDIR]: the Linux kernel's own NBD client (nbd.ko + nbd-client) against
# `thaw serve`, in a throwaway guest.
#
# The host has no nbd driver, and /dev/kvm here cannot boot stock kernels, so this boots a Debian
# kernel under qemu TCG (no network device at all) with a small busybox initramfs. The guest reaches
# `thaw serve`'s HOST unix socket through virtio-serial ports (qemu connects one chardev per port to
# the socket; a tiny static relay in the guest turns each port into a guest unix socket, because the
# kernel needs a socket fd). One port carries one NBD connection.
#
# Checks:
#   1. /dev/nbd0 = export "chain": the top of a generated 2-build zstd chain (thaw-bench gen);
#      md5 of the whole device in the guest == md5 of the flattened top image on the host.
#   2. /dev/nbd1 = export "demo": `thaw demo`'s layered ext4 image; the guest mounts it (ext4
#      module), reads /hello.txt (replaced in the diff layer) and md5s /data/blob.bin; both must
#      equal what debugfs reads from the flat top image on the host. The guest then writes a file
#      (it lands in the copy-on-write overlay), syncs, unmounts, remounts and reads it back.
#   3. thaw attaches the kernel device itself, inside the guest (`thaw serve --attach`, generic
#      netlink NBD_CMD_CONNECT over socketpairs; no nbd-client, no handshake): the thaw binary
#      (stripped) and the file:// store of both builds ride on a read-only virtio disk, its shared
#      libraries in the initramfs.
#      /dev/nbd2 = "chain" (explicit device): md5 of the whole device == the flat image's, and
#      /sys/block/nbd2/pid is thaw's pid; a second thaw asking for /dev/nbd2 is refused (busy);
#      "demo" = auto (the lowest free device, after nbd-client released nbd0/nbd1): mounted,
#      /hello.txt and /data/blob.bin as in 2, a write read back after a remount. SIGTERM: thaw
#      sends NBD_CMD_DISCONNECT and exits 0; both devices are free again (no pid file, size 0,
#      inflight "0 0", no holders).
#      Then D4: a thaw attached to /dev/nbd2 is SIGKILLed: the device stays configured (pid file
#      naming a dead process), a new thaw refuses it as busy, `nbd-client -d` frees it.
#   4. Attach over the control API (D5): `thaw serve --control SOCK` with no export; `thaw ctl add
#      chain --attach auto` names a device (listed by `thaw ctl exports`; its pid file names thaw's
#      control thread, which sent NBD_CMD_CONNECT); md5 of
#      the device == the flat image's; 64 KiB written through it + fsync: `unsaved_changes`, so
#      `thaw ctl remove` answers 409 and the device stays; `remove --force` disconnects it, the
#      kernel releases it (no pid file, size 0) and the export list is empty; the same device,
#      named explicitly (1 connection), serves the build again (md5 == flat: the write was
#      discarded with the overlay); a third add to that busy device is refused (409) and adds
#      nothing; SIGTERM exits 0 and frees the device. D6: an export attached at start (`--attach
#      /dev/nbd3 --control`) is removed with `thaw ctl remove` (clean, no force): the reply names
#      the device, which is free at once; the list is empty; SIGTERM exits 0.
# Prints KERNEL-NBD: PASS / FAIL; exit status 0 / 1. Root (apt, when something is missing).
# Measured (Debian 12, 2 cores, with the thaw attach checks): 52-120 s with everything present
# while the machine's load average was 8-12 (other builds); the guest alone 41-100 s, of which
# ~7-16 s is thaw's md5 of the attached 64 MiB device. With D5 (load average 3.5-6): the guest
# 23-73 s, D5 7-8 s of it (two more md5s of 64 MiB); with D6, 36 s (D5 + D6 11 s). The first run adds ~26 s of packages +
# kernel download.
#
# Packages (idempotent, root): qemu-system-x86 must come from bookworm-backports (10.0.x) because
# the machine's qemu-utils 10.0.x Breaks qemu-system-common << 8.0 (bookworm's 7.2 would remove
# qemu-utils); private apt lists, /etc/apt untouched. The Debian kernel is downloaded and
# extracted, never installed (no initramfs-tools/grub hooks).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-/tmp/nbd-kernel-guest}
mkdir -p "$W"; W=$(cd "$W" && pwd); cd "$W"
T_START=$(date +%s)

# ---- 1. packages (only what is missing; apt-get update once, into private lists)
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x /bin/busybox ] || need+=(busybox-static)
[ -x /usr/sbin/nbd-client ] || need+=(nbd-client)
command -v debugfs >/dev/null || need+=(e2fsprogs)
command -v gcc >/dev/null || need+=(gcc libc6-dev)
O="-o Dir::Etc::SourceParts=$W/aptparts -o Dir::State::Lists=$W/aptlists"
updated=0
apt_update_once() {   # private lists (bookworm + bookworm-backports); /etc/apt untouched
  [ $updated = 1 ] && return 0
  mkdir -p aptparts aptlists/partial
  cp /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list aptparts/ 2>/dev/null || true
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources) bookworm-backports main" > aptparts/zz-bookworm-backports.list
  apt-get $O update -qq; updated=1
}
if [ ${#need[@]} -gt 0 ]; then
  apt_update_once
  # Only qemu-system-x86 (and its exact-version dependencies) comes from backports.
  rest=(); for p in "${need[@]}"; do [ "$p" = qemu-system-x86 ] || rest+=("$p"); done
  [ ${#rest[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive apt-get $O install -y -qq --no-install-recommends "${rest[@]}" >/dev/null
  command -v qemu-system-x86_64 >/dev/null || DEBIAN_FRONTEND=noninteractive \
    apt-get $O install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 >/dev/null
fi
# ---- 2. Debian kernel (downloaded + extracted, NOT installed)
if [ ! -d kern/root/boot ]; then
  apt_update_once
  rm -rf kern; mkdir -p kern; KPKG=$(apt-cache $O depends linux-image-amd64/bookworm | awk '/Depends: linux-image-/{print $2; exit}')
  (cd kern && apt-get $O -o APT::Sandbox::User=root download -qq "$KPKG" && dpkg-deb -x ./"$KPKG"_*.deb root && rm -f ./*.deb)
fi
VMLINUZ=$(ls kern/root/boot/vmlinuz-*); KM=$(ls -d kern/root/lib/modules/*)
T_PKG=$(date +%s)

# ---- 3. thaw, the images, the server
# THAW_PROFILE=dev reuses the debug binaries `cargo test` already built (ci/test.sh does that).
PROFILE=${THAW_PROFILE:-release}; PDIR=$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")
(cd "$REPO" && cargo build --profile "$PROFILE" -q --bin thaw --bin thaw-bench)
THAW=$REPO/target/$PDIR/thaw; BENCH=$REPO/target/$PDIR/thaw-bench
rm -rf data; mkdir -p data
"$BENCH" gen --layers 1 --codec zstd:1 --size 64MiB --file rootfs.ext4 --store "file://$W/data/store" \
    --expected "$W/data/exp" >/dev/null
read -r CHAIN_ID CHAIN_FLAT < <(python3 -c '
import json, sys; m = json.load(open(sys.argv[1])); top = m["layers"][-1]
print(top["build_id"], top["files"]["rootfs.ext4"]["flat"])' data/exp/chain.json)
# `thaw demo` builds its ext4 image into data/demo and serves it; it is only needed for the build.
"$THAW" demo --dir data/demo --size 64MiB >data/demo.log 2>&1 &
DEMO=$!
for _ in $(seq 1 300); do [ -S data/demo/nbd.sock ] && break; sleep 0.1; done
kill "$DEMO"; wait "$DEMO" || true
read -r DEMO_ID DEMO_FLAT < <(python3 -c '
import json, sys; m = json.load(open(sys.argv[1])); print(m["top"], m["top_image"])' data/demo/demo.json)
# One store for both: copy the demo's builds next to the chain's.
cp -r data/demo/store/. data/store/
EXP_CHAIN=$(md5sum < "$CHAIN_FLAT" | cut -d' ' -f1)
EXP_HELLO=$(debugfs -R 'cat /hello.txt' "$DEMO_FLAT" 2>/dev/null)
EXP_BLOB=$(debugfs -R 'cat /data/blob.bin' "$DEMO_FLAT" 2>/dev/null | md5sum | cut -d' ' -f1)
SOCK=$W/data/nbd.sock
# The guest reads the greeting ~10 s after qemu connects (TCG boot): generous handshake deadline.
"$THAW" serve --store "file://$W/data/store" --export "chain=$CHAIN_ID:rootfs.ext4" \
    --export "demo=$DEMO_ID:rootfs.ext4" --listen "unix:$SOCK" --handshake-timeout 600s \
    >data/serve.log 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null && wait $SERVE 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do grep -q '^ready' data/serve.log && break; sleep 0.1; done
grep -q '^ready' data/serve.log || { cat data/serve.log; echo "KERNEL-NBD: FAIL (thaw serve did not start)"; exit 1; }

# ---- 4. static relay: virtio-serial port <-> guest-local unix socket
cat > vrelay.c <<'EOF'
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
static int wall(int fd, const char *b, ssize_t n) {
  while (n > 0) { ssize_t w = write(fd, b, n); if (w < 0) { if (errno == EINTR) continue; return -1; } b += w; n -= w; }
  return 0;
}
int main(int argc, char **argv) {
  if (argc != 3) { fprintf(stderr, "usage: %s PORTDEV SOCKPATH\n", argv[0]); return 2; }
  int dev = open(argv[1], O_RDWR); if (dev < 0) { perror("open port"); return 1; }
  int ls = socket(AF_UNIX, SOCK_STREAM, 0);
  struct sockaddr_un a = { .sun_family = AF_UNIX };
  strncpy(a.sun_path, argv[2], sizeof a.sun_path - 1); unlink(argv[2]);
  if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0 || listen(ls, 1) < 0) { perror("bind/listen"); return 1; }
  int c = accept(ls, NULL, NULL); if (c < 0) { perror("accept"); return 1; }
  static char buf[1 << 20];
  struct pollfd p[2] = { { .fd = dev, .events = POLLIN }, { .fd = c, .events = POLLIN } };
  for (;;) {
    if (poll(p, 2, -1) < 0) { if (errno == EINTR) continue; perror("poll"); return 1; }
    for (int i = 0; i < 2; i++)
      if (p[i].revents & (POLLIN | POLLHUP | POLLERR)) {
        ssize_t n = read(p[i].fd, buf, sizeof buf);
        if (n <= 0) { fprintf(stderr, "vrelay: %s closed\n", i ? "socket" : "port"); return 0; }
        if (wall(p[1 - i].fd, buf, n) < 0) { perror("write"); return 1; }
      }
  }
}
EOF
[ vrelay -nt vrelay.c ] || gcc -O2 -static -o vrelay vrelay.c

# ---- 5. initramfs: busybox + vrelay + nbd-client (dynamic: its libs too) + modules (with deps)
R=$(mktemp -d); mkdir -p "$R"/bin "$R"/lib/modules "$R"/tmp "$R"/proc "$R"/sys "$R"/dev "$R"/mnt
cp /bin/busybox vrelay /usr/sbin/nbd-client "$R"/bin/
for l in $(ldd /usr/sbin/nbd-client "$THAW" | grep -o '/[^ ]*' | grep -v ':$' | sort -u); do
  mkdir -p "$R$(dirname "$l")"; cp -L "$l" "$R$l"; done
# thaw and the store (~35 MB) ride on a read-only virtio disk (ext4, no journal) read on demand,
# not in the initramfs the kernel unpacks whole at boot.
rm -rf disk; mkdir -p disk; cp -r data/store disk/store
strip -o disk/thaw "$THAW"   # the debug info of a dev build is ~90 MB
echo "chain=$CHAIN_ID:rootfs.ext4 demo=$DEMO_ID:rootfs.ext4" > disk/exports
rm -f disk.img; mke2fs -q -t ext4 -O ^has_journal -d disk disk.img "$(( $(du -sm disk | cut -f1) + 16 ))M"
MODS=()   # load order: dependencies first
add_mod() {
  local m=${1//-/_} f d
  for x in "${MODS[@]}"; do [ "$x" = "$m" ] && return 0; done
  f=$(find "$KM/kernel" -name "$m.ko" -o -name "${m//_/-}.ko" | head -1)
  [ -n "$f" ] || return 0            # built in
  for d in $(strings "$f" | sed -n 's/^depends=//p' | tr ',' ' '); do add_mod "$d"; done
  cp "$f" "$R/lib/modules/$m.ko"; MODS+=("$m")
}
for m in virtio_pci virtio_console virtio_blk nbd crc32c_generic ext4; do add_mod "$m"; done
echo "${MODS[*]}" > "$R"/modules
cat > "$R"/init <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mount -t tmpfs tmp /tmp
for m in $(cat /modules); do insmod /lib/modules/$m.ko; done
port() { P=""; for i in $(seq 1 100); do
  for p in /sys/class/virtio-ports/*; do [ "$(cat $p/name 2>/dev/null)" = "$1" ] && P=/dev/${p##*/}; done
  [ -n "$P" ] && [ -e "$P" ] && break; sleep 0.1; done; echo $P; }
/bin/vrelay $(port nbd0) /tmp/nbd0.sock &
/bin/vrelay $(port nbd1) /tmp/nbd1.sock &
while [ ! -S /tmp/nbd0.sock ] || [ ! -S /tmp/nbd1.sock ]; do sleep 0.05; done
nbd-client -unix /tmp/nbd0.sock /dev/nbd0 -N chain -b 4096
nbd-client -unix /tmp/nbd1.sock /dev/nbd1 -N demo -b 4096
echo "GUEST: nbd0 size=$(blockdev --getsize64 /dev/nbd0) ro=$(blockdev --getro /dev/nbd0) uptime=$(cut -d' ' -f1 /proc/uptime)"
echo "GUEST_CHAIN_MD5=$(md5sum /dev/nbd0 | cut -d' ' -f1) uptime=$(cut -d' ' -f1 /proc/uptime)"
if mount -t ext4 /dev/nbd1 /mnt; then
  echo "GUEST_HELLO=$(cat /mnt/hello.txt)"
  echo "GUEST_BLOB_MD5=$(md5sum /mnt/data/blob.bin | cut -d' ' -f1)"
  echo "written by the guest kernel" > /mnt/guest.txt; sync; umount /mnt
  echo 3 > /proc/sys/vm/drop_caches
  mount -t ext4 /dev/nbd1 /mnt && echo "GUEST_WRITE=$(cat /mnt/guest.txt)" && umount /mnt
else echo "GUEST: mount failed"; fi
nbd-client -d /dev/nbd0; nbd-client -d /dev/nbd1
echo "GUEST: nbd-client done uptime=$(cut -d' ' -f1 /proc/uptime)"

# ---- thaw attaches the kernel devices itself (generic netlink; no nbd-client, no handshake)
free_dev() {   # thaw's free-device rule: no pid file, size 0, inflight "0 0", no holders
  D=/sys/block/$1; set -- $(cat $D/inflight)
  [ ! -e $D/pid ] && [ "$(cat $D/size)" = 0 ] && [ "$1 $2" = "0 0" ] && [ -z "$(ls $D/holders)" ] \
    && echo yes || echo no; }
wait_line() { for i in $(seq 1 600); do grep -q "$2" "$1" && return 0; sleep 0.1; done; return 1; }
mkdir -p /data; for i in $(seq 1 50); do [ -e /dev/vda ] && break; sleep 0.1; done
mount -t ext4 -o ro /dev/vda /data || echo "GUEST: no /dev/vda"
set -- $(cat /data/exports); EXP_CHAIN=$1; EXP_DEMO=$2
ln -s /data/thaw /bin/thaw
THAW_ARGS="--store file:///data/store --workers 1 --fetch-threads 4 --connections 2 --nbd-timeout 60s"
/bin/thaw serve $THAW_ARGS --export $EXP_CHAIN --export $EXP_DEMO \
  --attach chain=/dev/nbd2 --attach demo=auto >/tmp/thaw.out 2>/tmp/thaw.err &
THAW=$!
if wait_line /tmp/thaw.out '^ready'; then
  DEMO_DEV=$(sed -n 's/^attached "demo" //p' /tmp/thaw.out)
  echo "GUEST_ATTACH_LINES=$(grep -c '^attached' /tmp/thaw.out) demo=$DEMO_DEV uptime=$(cut -d' ' -f1 /proc/uptime)"
  echo "GUEST_ATTACH_PID=$([ "$(cat /sys/block/nbd2/pid)" = $THAW ] && echo thaw || echo "other:$(cat /sys/block/nbd2/pid)")"
  echo "GUEST_ATTACH_SIZE=$(blockdev --getsize64 /dev/nbd2)"
  echo "GUEST_ATTACH_CHAIN_MD5=$(md5sum /dev/nbd2 | cut -d' ' -f1) uptime=$(cut -d' ' -f1 /proc/uptime)"
  if /bin/thaw serve $THAW_ARGS --export $EXP_CHAIN --attach /dev/nbd2 >/tmp/thaw2.out 2>/tmp/thaw2.err; then
    echo "GUEST_ATTACH_BUSY=accepted"
  else echo "GUEST_ATTACH_BUSY=$(grep -q 'nbd2 is busy: connected by pid' /tmp/thaw2.err && echo refused || cat /tmp/thaw2.err)"; fi
  if mount -t ext4 $DEMO_DEV /mnt; then
    echo "GUEST_ATTACH_HELLO=$(cat /mnt/hello.txt)"
    echo "GUEST_ATTACH_BLOB_MD5=$(md5sum /mnt/data/blob.bin | cut -d' ' -f1)"
    echo "written through thaw attach" > /mnt/guest2.txt; sync; umount /mnt
    echo 3 > /proc/sys/vm/drop_caches
    mount -t ext4 $DEMO_DEV /mnt && echo "GUEST_ATTACH_WRITE=$(cat /mnt/guest2.txt)" && umount /mnt
  else echo "GUEST: attach mount failed"; fi
  kill -TERM $THAW; wait $THAW; RC=$?
  echo "GUEST_ATTACH_SIGTERM=rc$RC nbd2:$(free_dev nbd2) demo:$(free_dev ${DEMO_DEV#/dev/})"
  # D4: SIGKILL leaves the device configured; a new thaw refuses it; nbd-client -d frees it.
  /bin/thaw serve $THAW_ARGS --export $EXP_CHAIN --attach /dev/nbd2 >/tmp/thaw3.out 2>/tmp/thaw3.err &
  K=$!
  if wait_line /tmp/thaw3.out '^ready'; then
    kill -KILL $K; wait $K
    S1=$(free_dev nbd2)
    /bin/thaw serve $THAW_ARGS --export $EXP_CHAIN --attach /dev/nbd2 >/tmp/thaw4.out 2>/tmp/thaw4.err \
      && S2=accepted || S2=$(grep -q 'which is gone' /tmp/thaw4.err && echo refused || echo "?")
    nbd-client -d /dev/nbd2 >/dev/null 2>&1; sleep 0.2
    echo "GUEST_ATTACH_SIGKILL=free:$S1 restart:$S2 after-d:$(free_dev nbd2)"
  else echo "GUEST: thaw 3 did not start"; cat /tmp/thaw3.err; fi
  # D5: attach over the control API: a thaw with no export; `thaw ctl add --attach auto`.
  CHAIN_BUILD=${EXP_CHAIN#*=}; CHAIN_BUILD=${CHAIN_BUILD%%:*}
  ctl() { /bin/thaw ctl --control /tmp/ctl.sock "$@"; }
  field() { sed -n "s/^ *\"$1\": \"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}$/\1/p" | head -1; }
  /bin/thaw serve $THAW_ARGS --control /tmp/ctl.sock >/tmp/thaw5.out 2>/tmp/thaw5.err &
  C=$!
  if wait_line /tmp/thaw5.out '^ready'; then
    API_DEV=$(ctl add chain --build $CHAIN_BUILD --attach auto 2>/tmp/ctl.err | field attach)
    echo "GUEST_API_ADD=${API_DEV:-$(cat /tmp/ctl.err)} listed:$(ctl exports | field attach) uptime=$(cut -d' ' -f1 /proc/uptime)"
    if [ -n "$API_DEV" ]; then
      # The pid file names the thread that sent NBD_CMD_CONNECT: thaw's control API thread, which
      # lives as long as thaw (a blocking-pool thread would exit when idle: a dead owner).
      P=$(cat /sys/block/${API_DEV#/dev/}/pid)
      echo "GUEST_API_PID=$(cat /proc/$C/task/$P/comm 2>/dev/null || echo "other:$P")"
      echo "GUEST_API_MD5=$(md5sum $API_DEV | cut -d' ' -f1) uptime=$(cut -d' ' -f1 /proc/uptime)"
      # 64 KiB written through the device at 1 MiB, flushed: unsaved changes in the overlay.
      dd if=/dev/urandom of=$API_DEV bs=4096 count=16 seek=256 conv=fsync 2>/dev/null; sync
      echo "GUEST_API_DIRTY=$(ctl exports | field unsaved_changes)"
      ctl remove chain >/tmp/rm1.out 2>/tmp/rm1.err && R1=removed || \
        R1=$(grep -q 'answered 409.*holds writes no snapshot stored' /tmp/rm1.err && echo 409 || cat /tmp/rm1.err)
      echo "GUEST_API_REMOVE=$R1 still-attached:$(ctl exports | field attach)"
      ctl remove chain --force >/tmp/rm2.out 2>/tmp/rm2.err || cat /tmp/rm2.err
      echo "GUEST_API_FORCE=device:$(field device </tmp/rm2.out) discarded:$(field discarded_changes </tmp/rm2.out) free:$(free_dev ${API_DEV#/dev/}) listed:$(ctl exports | tr -d ' \n')"
      # The freed device, named explicitly, 1 connection: a fresh export (the write is gone).
      AGAIN=$(ctl add chain2 --build $CHAIN_BUILD --attach $API_DEV --connections 1 2>/tmp/ctl2.err | field attach)
      echo "GUEST_API_AGAIN=${AGAIN:-$(cat /tmp/ctl2.err)}"
      [ -n "$AGAIN" ] && echo "GUEST_API_AGAIN_MD5=$(md5sum $AGAIN | cut -d' ' -f1) uptime=$(cut -d' ' -f1 /proc/uptime)"
      ctl add chain3 --build $CHAIN_BUILD --attach $API_DEV >/dev/null 2>/tmp/ctl3.err && B=accepted || \
        B=$(grep -q 'answered 409.*is busy: connected by pid' /tmp/ctl3.err && echo refused || cat /tmp/ctl3.err)
      echo "GUEST_API_BUSY=$B listed:$(ctl exports | grep -c '"name"')"
    fi
    kill -TERM $C; wait $C; RC=$?
    echo "GUEST_API_SIGTERM=rc$RC free:$(free_dev ${API_DEV#/dev/})"
  else echo "GUEST: thaw 5 did not start"; cat /tmp/thaw5.out /tmp/thaw5.err; fi
  echo "GUEST: thaw 5 log:"; sed 's/^/  thaw5: /' /tmp/thaw5.err | tail -20
  # D6: an export attached at start (--attach) is removed over the API (clean: no force needed).
  /bin/thaw serve $THAW_ARGS --export $EXP_CHAIN --attach /dev/nbd3 --control /tmp/ctl6.sock \
    >/tmp/thaw6.out 2>/tmp/thaw6.err &
  C6=$!
  if wait_line /tmp/thaw6.out '^ready'; then
    S6=$(free_dev nbd3)
    /bin/thaw ctl --control /tmp/ctl6.sock remove chain >/tmp/rm6.out 2>&1 || cat /tmp/rm6.out
    echo "GUEST_API_START_ATTACHED=before:$S6 device:$(field device </tmp/rm6.out) free:$(free_dev nbd3) listed:$(/bin/thaw ctl --control /tmp/ctl6.sock exports | tr -d ' \n')"
    kill -TERM $C6; wait $C6; echo "GUEST_API_START_SIGTERM=rc$?"
  else echo "GUEST: thaw 6 did not start"; cat /tmp/thaw6.out /tmp/thaw6.err; fi
else
  echo "GUEST: thaw attach did not start"; cat /tmp/thaw.out /tmp/thaw.err
fi
echo "GUEST: thaw log:"; sed 's/^/  thaw: /' /tmp/thaw.err | tail -20
echo "GUEST: done uptime=$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
EOF
chmod +x "$R"/init
# Not compressed: gunzip under TCG costs more (seconds) than loading the ~16 MB as they are.
(cd "$R" && find . | busybox cpio -o -H newc 2>/dev/null) > initramfs.cpio; rm -rf "$R" disk initramfs.cpio.gz

# ---- 6. boot (TCG: /dev/kvm here hangs stock kernels; -smp 1 is faster than 2). No network device.
T0=$(date +%s)
timeout 900 qemu-system-x86_64 -accel tcg -cpu max -smp "${GUEST_SMP:-1}" -m 1024 -nographic -no-reboot -nic none \
  -kernel "$VMLINUZ" -initrd initramfs.cpio -append "console=ttyS0 panic=-1 quiet" \
  -drive file=disk.img,format=raw,if=virtio,readonly=on \
  -device virtio-serial-pci \
  -chardev socket,id=c0,path="$SOCK" -device virtserialport,chardev=c0,name=nbd0 \
  -chardev socket,id=c1,path="$SOCK" -device virtserialport,chardev=c1,name=nbd1 \
  </dev/null > guest.log 2>&1 || true
T1=$(date +%s)
g() { grep -ao "^$1=.*" guest.log | head -1 | cut -d= -f2- | sed 's/ uptime=.*//; s/\r$//' || true; }
GOT_CHAIN=$(g GUEST_CHAIN_MD5); GOT_HELLO=$(g GUEST_HELLO); GOT_BLOB=$(g GUEST_BLOB_MD5); GOT_WRITE=$(g GUEST_WRITE)
grep -a 'GUEST' guest.log || true
echo "timings: packages+kernel $((T_PKG - T_START))s, build+images+server $((T0 - T_PKG))s, guest $((T1 - T0))s, total $((T1 - T_START))s"
fail=0
check() { if [ "$2" = "$3" ]; then echo "ok   $1: $2"; else echo "FAIL $1: expected '$2' got '${3:-none}'"; fail=1; fi; }
check "chain export md5 (/dev/nbd0)" "$EXP_CHAIN" "$GOT_CHAIN"
check "ext4 /hello.txt (/dev/nbd1)" "$EXP_HELLO" "$GOT_HELLO"
check "ext4 /data/blob.bin md5" "$EXP_BLOB" "$GOT_BLOB"
check "ext4 write, remount, read back" "written by the guest kernel" "$GOT_WRITE"
check "thaw --attach: two devices attached" "2" "$(g GUEST_ATTACH_LINES | cut -d' ' -f1)"
check "thaw --attach: /sys/block/nbd2/pid is thaw's" "thaw" "$(g GUEST_ATTACH_PID)"
check "thaw --attach: /dev/nbd2 size" "$(stat -c %s "$CHAIN_FLAT")" "$(g GUEST_ATTACH_SIZE)"
check "thaw --attach: chain md5 (/dev/nbd2)" "$EXP_CHAIN" "$(g GUEST_ATTACH_CHAIN_MD5)"
check "thaw --attach: a busy /dev/nbd2 is refused" "refused" "$(g GUEST_ATTACH_BUSY)"
check "thaw --attach auto: ext4 /hello.txt" "$EXP_HELLO" "$(g GUEST_ATTACH_HELLO)"
check "thaw --attach auto: /data/blob.bin md5" "$EXP_BLOB" "$(g GUEST_ATTACH_BLOB_MD5)"
check "thaw --attach auto: write, remount, read back" "written through thaw attach" "$(g GUEST_ATTACH_WRITE)"
check "thaw --attach: SIGTERM exits 0, devices free" "rc0 nbd2:yes demo:yes" "$(g GUEST_ATTACH_SIGTERM)"
check "thaw --attach: SIGKILL (D4) busy, refused, freed by nbd-client -d" "free:no restart:refused after-d:yes" "$(g GUEST_ATTACH_SIGKILL)"
API_DEV=$(g GUEST_API_ADD | sed -n 's/^\(\/dev\/nbd[0-9]*\) .*/\1/p')
check "control API: ctl add --attach auto names a device, listed" "$API_DEV listed:$API_DEV" "$(g GUEST_API_ADD)"
check "control API: the device's pid file names thaw's control thread" "thaw-control" "$(g GUEST_API_PID)"
check "control API: chain md5 ($API_DEV)" "$EXP_CHAIN" "$(g GUEST_API_MD5)"
check "control API: a write through the device is unsaved" "true" "$(g GUEST_API_DIRTY)"
check "control API: remove without force: 409, still attached" "409 still-attached:$API_DEV" "$(g GUEST_API_REMOVE)"
check "control API: remove --force: disconnected, freed, gone" "device:$API_DEV discarded:true free:yes listed:[]" "$(g GUEST_API_FORCE)"
check "control API: the freed device attached again by name" "$API_DEV" "$(g GUEST_API_AGAIN)"
check "control API: md5 after re-attach (the discarded write is gone)" "$EXP_CHAIN" "$(g GUEST_API_AGAIN_MD5)"
check "control API: a busy device is refused (409), nothing added" "refused listed:1" "$(g GUEST_API_BUSY)"
check "control API: SIGTERM exits 0, the API-attached device freed" "rc0 free:yes" "$(g GUEST_API_SIGTERM)"
check "control API: an --attach export removed over the API, device freed" "before:no device:/dev/nbd3 free:yes listed:[]" "$(g GUEST_API_START_ATTACHED)"
check "control API: then SIGTERM exits 0" "rc0" "$(g GUEST_API_START_SIGTERM)"
if [ $fail = 0 ]; then echo "KERNEL-NBD: PASS"; else echo "KERNEL-NBD: FAIL"; tail -40 guest.log; exit 1; fi
