#!/usr/bin/env bash
# End-to-end test with the Linux kernel's NBD client: boots a Debian kernel under qemu with a small
# initramfs; the guest attaches superdisk's export over two connections, makes XFS, runs fio with
# verification, detaches, re-attaches and verifies again. Then it attaches with `superdisk attach`
# (the supervisor) and runs a verifying writer while the host SIGKILLs and restarts the daemon
# three times and upgrades it in place twice (the second time to another build): zero I/O errors
# allowed. The host then stops the daemon with SIGTERM and runs the offline verify (must be clean)
# and xfs_repair -n. See docs/KERNEL-E2E.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/kernel-e2e.sh [--tcg] [--keep] [--timeout SECS] [--fio-size SIZE] [-h|--help]

Boots a Debian kernel under qemu-system-x86_64 whose init attaches superdisk's export with
`nbd-client -C 2`, makes XFS, runs fio with crc32c verification, detaches, re-attaches and
verifies again. Then stops the daemon (SIGTERM, must exit 0) and runs `superdisk verify` offline.
Exits non-zero naming the step that failed.

  --tcg            force software emulation (default: KVM when /dev/kvm is usable and the CPU
                   has vmx/svm, else TCG)
  --keep           keep the work directory (logs, images, initramfs) and print its path
  --timeout SECS   bound on the guest's whole run, boot to poweroff (default 600)
  --fio-size SIZE  bytes fio writes and verifies in the guest (default 128M)

Environment:
  SUPERDISK_BIN           superdisk binary to test (default: `cargo build --release`, then
                          target/release/superdisk)
  SUPERDISK_KERNEL_CACHE  where the kernel, its config and the needed modules are kept
                          (default ${XDG_CACHE_HOME:-~/.cache}/superdisk-kernel-e2e)
  E2E_ACCEL               kvm, tcg or auto (default auto; --tcg is E2E_ACCEL=tcg; kvm skips
                          the usability check)

Missing host packages are installed with apt-get when run as root.
EOF
}

REPO=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib/kernel-guest.sh
. "$REPO/scripts/lib/kernel-guest.sh"
ACCEL=${E2E_ACCEL:-auto}
KEEP=0
GUEST_TIMEOUT_SECS=600
FIO_SIZE=128M
CACHE_DIR=${SUPERDISK_KERNEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/superdisk-kernel-e2e}
DISK_SIZE=1G
# Loaded in this order, each after its own dependencies (read from the modules). crc32c_generic is
# only a soft dependency of libcrc32c (which xfs needs) and nothing in the guest could load it on
# demand, so it is named first.
MODULES=(crc32c_generic virtio_pci virtio_net nbd xfs)
HOST_PACKAGES=(qemu-system-x86 busybox-static nbd-client xfsprogs fio cpio gzip xz-utils zstd apt dpkg)
GUEST_PROGRAMS=(nbd-client mkfs.xfs fio)
# The module list never changes here: keep the kit, not the .deb it came from.
KG_KEEP_DEB=0
# Seconds the guest's verifying writer runs while the host breaks the daemon (0: skip that phase).
RESTART_SECS=${E2E_RESTART_SECS:-75}
ADMIN_SOCK=
SD_B=
ADOPTED=0

STEP=setup
WORK=
DAEMON_PID=
QEMU_PID=
DIED=0
T0=$SECONDS

log() { printf 'kernel-e2e: %s\n' "$*"; }
die() {
  DIED=1
  printf 'kernel-e2e: FAILED at step "%s": %s\n' "$STEP" "$*" >&2
  exit 1
}

# step NAME: names the step that a failure is reported under, and times the previous one.
STEP_T0=$SECONDS
step() {
  if [ "$STEP" != setup ]; then log "ok $STEP ($((SECONDS - STEP_T0))s)"; fi
  STEP=$1
  STEP_T0=$SECONDS
  log "== $STEP"
}

# stop_process PID: SIGTERM, then SIGKILL if it is still there after 10 seconds.
stop_process() {
  local i
  kill -TERM "$1" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$1" 2>/dev/null
}

on_exit() {
  local rc=$?
  set +e
  # QEMU_PID is timeout(1), which passes SIGTERM on to qemu.
  [ -z "$QEMU_PID" ] || stop_process "$QEMU_PID"
  [ -z "$DAEMON_PID" ] || stop_process "$DAEMON_PID"
  if [ "$rc" != 0 ]; then
    # die() has already named the step; this covers commands that failed under set -e.
    [ "$DIED" = 1 ] || printf 'kernel-e2e: FAILED at step "%s" (exit %s)\n' "$STEP" "$rc" >&2
    if [ -n "$WORK" ] && [ -s "$WORK/daemon.log" ]; then
      echo "kernel-e2e: last lines of the daemon log:" >&2
      tail -n 40 "$WORK/daemon.log" | sed 's/^/  daemon| /' >&2
    fi
  fi
  if [ -n "$WORK" ]; then
    if [ "$KEEP" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
  fi
  exit "$rc"
}

parse_args() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --tcg) ACCEL=tcg ;;
      --keep) KEEP=1 ;;
      --timeout) GUEST_TIMEOUT_SECS=${2:?--timeout needs a value}; shift ;;
      --fio-size) FIO_SIZE=${2:?--fio-size needs a value}; shift ;;
      -h | --help) usage; exit 0 ;;
      *) usage >&2; exit 2 ;;
    esac
    shift
  done
  case "$ACCEL" in auto | kvm | tcg) ;; *) echo "E2E_ACCEL must be kvm, tcg or auto" >&2; exit 2 ;; esac
  [[ "$GUEST_TIMEOUT_SECS" =~ ^[0-9]+$ ]] || { echo "--timeout takes seconds" >&2; exit 2; }
}

locate_superdisk() {
  if [ -n "${SUPERDISK_BIN:-}" ]; then
    # Absolute, so build_second_binary recognises a cargo output however it was named
    # (scripts/test.sh passes target/debug/superdisk).
    SD=$(realpath "$SUPERDISK_BIN")
  else
    # Cheap when up to date, and it keeps a stale binary from being tested.
    (cd "$REPO" && cargo build --release --quiet) || die "cargo build --release failed"
    SD=$REPO/target/release/superdisk
  fi
  [ -x "$SD" ] || die "no superdisk binary at $SD"
  log "superdisk: $SD"
}

# Prints the name and version of the kernel package linux-image-amd64 points at, e.g.
# "linux-image-6.1.0-56-amd64 6.1.192-2", or nothing when apt has no package lists.
kernel_package() {
  local pkg ver
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
  [ -n "$pkg" ] || return 0
  ver=$(kg_candidate "$pkg")
  [ -z "$ver" ] || echo "$pkg $ver"
}

# Downloads Debian's kernel package (never installs it) and keeps, per package version and module
# list, a small kit: vmlinuz, its config and the modules the guest needs, uncompressed.
fetch_kernel() {
  local found
  found=$(kg_find_package kernel_package)
  # No package lists (and not root): the newest kit already built.
  kg_kit "$CACHE_DIR" 'linux-image-*' "$found" "${MODULES[@]}" ||
    die "apt knows no linux-image-amd64 (run apt-get update) and no kernel is cached"
}

build_initramfs() {
  local root=$WORK/initramfs p
  kg_initramfs_base "$root" "$REPO/scripts/kernel-e2e/init" /lib/modules/e2e
  for p in "${GUEST_PROGRAMS[@]}"; do kg_copy_program "$root" "$p"; done
  # The supervisor under test, as the guest's `superdisk`.
  kg_copy_program "$root" "$SD" /usr/bin/superdisk
  kg_pack_initramfs "$root" "$WORK/initramfs.cpio.gz"
}

create_disk() {
  # The cache holds the export plus its own metadata; 64 MiB of slack covers that at 1 GiB.
  truncate -s 1088M "$WORK/cache.img"
  "$SD" create --backing "$WORK/backing.img" --size "$DISK_SIZE" --cache "$WORK/cache.img" \
    >"$WORK/create.log" 2>&1 || { cat "$WORK/create.log" >&2; die "superdisk create failed"; }
}

# First start on port 0: the daemon picks a free port and logs it in its "listening" line; every
# restart takes the same port again, as systemd's restart would, so the guest's supervisor finds it.
start_daemon() {
  local i from listen=127.0.0.1:${PORT:-0}
  from=$(wc -l <"$WORK/daemon.log" 2>/dev/null || echo 0)
  ADMIN_SOCK=$WORK/admin.sock
  "$SD" serve --backing "$WORK/backing.img" --cache "$WORK/cache.img" --listen "$listen" \
    --admin-socket "$ADMIN_SOCK" --log-level info 2>>"$WORK/daemon.log" &
  DAEMON_PID=$!
  ADOPTED=0
  for ((i = 0; i < 300; i++)); do
    PORT=$(tail -n +"$((from + 1))" "$WORK/daemon.log" | sed -n 's/.*endpoint=nbd:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' | head -n 1)
    [ -z "$PORT" ] || break
    kill -0 "$DAEMON_PID" 2>/dev/null || die "superdisk serve exited during start-up"
    sleep 0.1
  done
  [ -n "$PORT" ] || die "superdisk serve did not log a listening port within 30s"
  log "daemon pid $DAEMON_PID listening on 127.0.0.1:$PORT (the guest reaches it as 10.0.2.2:$PORT)"
}

# The second build for the last upgrade: the same sources with another SUPERDISK_BUILD_ID (only
# the binary's own crate reads it, so this relinks one crate), then the first build is restored.
build_second_binary() {
  local profile=() dir
  local built=$SD
  cp "$SD" "$WORK/superdisk-a"
  SD=$WORK/superdisk-a
  case "$built" in
    */target/release/*) profile=(--release); dir=release ;;
    */target/debug/*) dir=debug ;;
    *) log "no cargo build to vary; the second upgrade reuses the same binary"; SD_B=$SD; return 0 ;;
  esac
  (cd "$REPO" && SUPERDISK_BUILD_ID=kernel-e2e-b cargo build --quiet "${profile[@]}" --bin superdisk) ||
    die "building the second binary failed"
  cp "$REPO/target/$dir/superdisk" "$WORK/superdisk-b"
  (cd "$REPO" && cargo build --quiet "${profile[@]}" --bin superdisk) || die "restoring the first build failed"
  SD_B=$WORK/superdisk-b
  log "second build: $("$SD_B" handover-info)"
}

boot_guest() {
  local nonce
  nonce=$(kg_nonce)
  # user networking: the guest's 10.0.2.2 is the host's loopback, so the daemon stays on 127.0.0.1.
  # romfile= : no iPXE option ROM is needed (or installed) for a -kernel boot.
  kg_boot_start "$WORK" "$GUEST_TIMEOUT_SECS" -smp 2 -m 1024 \
    -append "console=ttyS0 panic=-1 loglevel=4 e2e.nonce=$nonce e2e.port=$PORT e2e.fio_size=$FIO_SIZE e2e.restart_secs=$RESTART_SECS" \
    -netdev user,id=n0,ipv6=off -device virtio-net-pci,netdev=n0,romfile=
  [ "$RESTART_SECS" = 0 ] || run_events "$WORK/console.log" "$nonce"
  kg_boot_wait "$WORK"
  kg_guest_result "$WORK/console.log" SUPERDISK-E2E-RESULT "$nonce" "$BOOT_RC" "$GUEST_TIMEOUT_SECS"
  log "guest: PASS"
}

# Once the guest's writer runs: SIGKILL + restart three times and upgrade twice, 12 s apart, each
# timed from the host (the guest prints the pauses its I/O saw).
run_events() {
  local console=$1 nonce=$2 i t0 ev
  for ((i = 0; i < GUEST_TIMEOUT_SECS * 10; i++)); do
    grep -aq "SUPERDISK-E2E-EVENTS-START nonce=$nonce" "$console" && break
    kill -0 "$QEMU_PID" 2>/dev/null || return 0
    sleep 0.1
  done
  t0=$SECONDS
  for ev in kill upgrade kill upgrade-b kill; do
    sleep 12
    grep -aq "SUPERDISK-E2E-EVENTS-END nonce=$nonce" "$console" && die "the guest's writer ended before event '$ev'"
    case "$ev" in
      kill) kill_and_restart ;;
      upgrade) upgrade_daemon "$SD" ;;
      upgrade-b) upgrade_daemon "$SD_B" ;;
    esac
    log "event '$ev' done at +$((SECONDS - t0))s of the writer's run"
  done
}

kill_and_restart() {
  kill -KILL "$DAEMON_PID"
  wait_gone "$DAEMON_PID"
  start_daemon
}

upgrade_daemon() {
  local out pid old=$DAEMON_PID
  out=$("$SD" upgrade --socket "$ADMIN_SOCK" --binary "$1" 2>&1) || die "upgrade to $1 failed: $out"
  log "upgrade: $out"
  pid=$(sed -n 's/.*, pid \([0-9]*\);.*/\1/p' <<<"$out")
  [ -n "$pid" ] || die "no pid in the upgrade's answer: $out"
  wait_gone "$old"
  DAEMON_PID=$pid
  ADOPTED=1
}

# Waits for PID to exit (reaping it when it is our child).
wait_gone() {
  local i
  for ((i = 0; i < 300; i++)); do
    kill -0 "$1" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$1" 2>/dev/null && die "pid $1 still runs"
  wait "$1" 2>/dev/null || true
}

# Two attaches of nbd-client -C 2, then the supervisor's two and its reconnections; nothing wrong.
check_daemon_log() {
  local n
  n=$(grep -c 'client connected' "$WORK/daemon.log" || true)
  [ "$n" -ge 4 ] || die "daemon logged $n NBD connections, expected at least 4"
  log "the daemon logged $n NBD connections and $(grep -c 'connection carried over' "$WORK/daemon.log" || true) carried over by upgrades"
  if grep -E 'handshake failed|I/O failed| ERROR |panicked' "$WORK/daemon.log"; then
    die "the daemon logged errors (above)"
  fi
  grep ' WARN ' "$WORK/daemon.log" | sed 's/^/  daemon warning| /' || true
}

stop_daemon() {
  local rc=0 i
  kill -TERM "$DAEMON_PID"
  for ((i = 0; i < 600; i++)); do
    kill -0 "$DAEMON_PID" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$DAEMON_PID" 2>/dev/null && die "daemon still running 60s after SIGTERM"
  if [ "$ADOPTED" = 1 ]; then
    # Not our child (an upgrade started it): its log says whether it stopped cleanly.
    tail -n 3 "$WORK/daemon.log" | grep -q 'clean shutdown recorded' || die "the daemon did not record a clean shutdown"
  else
    wait "$DAEMON_PID" || rc=$?
    [ "$rc" = 0 ] || die "daemon exited $rc after SIGTERM, expected 0"
  fi
  DAEMON_PID=
}

verify_offline() {
  "$SD" verify --backing "$WORK/backing.img" --cache "$WORK/cache.img" | tee "$WORK/verify.log" ||
    die "superdisk verify reported a difference between cache and backing"
}

# The exported disk is the backing's first bytes, so the filesystem can be checked there directly.
check_filesystem() {
  xfs_repair -n -f "$WORK/backing.img" >"$WORK/xfs_repair.log" 2>&1 ||
    { cat "$WORK/xfs_repair.log" >&2; die "xfs_repair -n found problems in the filesystem on the backing"; }
}

main() {
  parse_args "$@"
  trap on_exit EXIT
  trap 'exit 130' INT TERM HUP
  step install-deps
  kg_install_packages "${HOST_PACKAGES[@]}"
  step superdisk-binary
  locate_superdisk
  step kernel
  fetch_kernel
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/superdisk-kernel-e2e.XXXXXX")
  step initramfs
  build_initramfs
  step create
  create_disk
  step second-build
  [ "$RESTART_SECS" = 0 ] || build_second_binary
  step serve
  start_daemon
  step guest
  kg_choose_accel "$ACCEL"
  log "acceleration: $ACCEL"
  boot_guest
  step daemon-log
  check_daemon_log
  step sigterm
  stop_daemon
  step verify
  verify_offline
  step xfs-check
  check_filesystem
  step finish
  log "PASS in $((SECONDS - T0))s (acceleration: $ACCEL, kernel $(cat "$KIT/kernel-release"))"
}

main "$@"
