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

install_deps() {
  local p missing=()
  for p in "${HOST_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    [ "$(id -u)" = 0 ] || die "need root to install: ${missing[*]}"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

locate_superdisk() {
  if [ -n "${SUPERDISK_BIN:-}" ]; then
    SD=$SUPERDISK_BIN
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
  ver=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null | awk '$1 == "Version:" { print $2; exit }')
  [ -n "$ver" ] && echo "$pkg $ver"
}

# find_module TREE NAME: the module's file (maybe compressed); module names treat - and _ alike.
find_module() {
  local a=${2//-/_} b=${2//_/-}
  find "$1" \( -name "$a.ko" -o -name "$a.ko.*" -o -name "$b.ko" -o -name "$b.ko.*" \) -print -quit
}

is_builtin() {
  local a=${2//-/_} b=${2//_/-}
  grep -q -E "/($a|$b)\.ko$" "$1/modules.builtin"
}

decompress_module() {
  case "$1" in
    *.ko) cp "$1" "$2" ;;
    *.ko.xz) xz -dc "$1" >"$2" ;;
    *.ko.zst) zstd -dcq "$1" >"$2" ;;
    *.ko.gz) gzip -dc "$1" >"$2" ;;
    *) die "unknown module compression: $1" ;;
  esac
}

# add_module MODDIR KIT NAME: copies NAME and, first, what it depends on into KIT/modules,
# appending to KIT/modules/order in load order. Dependencies come from the module's own
# .modinfo "depends=" string (no depmod needed).
declare -A ADDED=()
add_module() {
  local moddir=$1 kit=$2 name=$3 src base dep deps
  [ -z "${ADDED[$name]:-}" ] || return 0
  ADDED[$name]=1
  if is_builtin "$moddir" "$name"; then
    log "  $name: built into the kernel"
    return 0
  fi
  src=$(find_module "$moddir/kernel" "$name")
  [ -n "$src" ] || die "module $name not found in the kernel package"
  base=$(basename "$src")
  base=${base%%.ko*}
  decompress_module "$src" "$kit/modules/$base.ko.tmp"
  deps=$(tr '\0' '\n' <"$kit/modules/$base.ko.tmp" | sed -n 's/^depends=//p' | head -n 1 | tr ',' ' ')
  for dep in $deps; do add_module "$moddir" "$kit" "$dep"; done
  mv "$kit/modules/$base.ko.tmp" "$kit/modules/$base.ko"
  echo "$base" >>"$kit/modules/order"
  log "  $name: ${src#"$moddir"/}${deps:+ (after $deps)}"
}

# Downloads Debian's kernel package (never installs it) and keeps, per package version and module
# list, a small kit: vmlinuz, its config and the modules the guest needs, uncompressed.
fetch_kernel() {
  local found pkg ver tag dl deb moddir m
  mkdir -p "$CACHE_DIR"
  found=$(kernel_package)
  if [ -z "$found" ] && [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    found=$(kernel_package)
  fi
  tag=$(printf '%s\n' "${MODULES[@]}" | sha256sum | cut -c1-12)
  if [ -z "$found" ]; then
    # No package lists (and not root): fall back to the newest kit already built.
    KIT=$(find "$CACHE_DIR" -maxdepth 2 -name complete -path "*-$tag/complete" -printf '%T@ %h\n' 2>/dev/null |
      sort -rn | head -n 1 | cut -d' ' -f2-)
    [ -n "$KIT" ] || die "apt knows no linux-image-amd64 (run apt-get update) and no kernel is cached"
    log "apt has no package lists; using the cached $KIT"
    return 0
  fi
  read -r pkg ver <<<"$found"
  KIT=$CACHE_DIR/${pkg}_$ver-$tag
  if [ -e "$KIT/complete" ]; then
    log "kernel $pkg $ver: cached in $KIT"
    return 0
  fi
  log "kernel $pkg $ver: downloading (apt-get download) into $CACHE_DIR"
  rm -rf "$KIT"
  dl=$(mktemp -d "$CACHE_DIR/download.XXXXXX")
  (cd "$dl" && apt-get download "$pkg" >"$dl/apt.log" 2>&1) || { cat "$dl/apt.log" >&2; die "apt-get download $pkg failed"; }
  deb=$(find "$dl" -maxdepth 1 -name '*.deb' -print -quit)
  dpkg-deb -x "$deb" "$dl/root"
  moddir=$(find "$dl/root/lib/modules" -mindepth 1 -maxdepth 1 -type d -print -quit)
  mkdir -p "$KIT/modules"
  cp "$dl"/root/boot/vmlinuz-* "$KIT/vmlinuz"
  cp "$dl"/root/boot/config-* "$KIT/config"
  basename "$moddir" >"$KIT/kernel-release"
  : >"$KIT/modules/order"
  for m in "${MODULES[@]}"; do add_module "$moddir" "$KIT" "$m"; done
  rm -rf "$dl"
  touch "$KIT/complete"
}

# copy_into ROOT PATH: copies PATH's contents to the same path under ROOT.
copy_into() {
  mkdir -p "$1$(dirname "$2")"
  cp -L "$2" "$1$2"
}

# copy_program ROOT PROGRAM: the program and every shared library ldd names, at their host paths.
copy_program() {
  local root=$1 path lib
  path=$(command -v "$2") || die "$2 not found on the host"
  copy_into "$root" "$path"
  if ldd "$path" | grep -q 'not found'; then die "ldd $path: $(ldd "$path" | grep 'not found')"; fi
  for lib in $(ldd "$path" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
    [ -e "$root$lib" ] || copy_into "$root" "$lib"
  done
}

build_initramfs() {
  local root=$WORK/initramfs busybox p
  mkdir -p "$root"/{bin,sbin,dev,proc,sys,mnt,tmp,lib/modules/e2e}
  busybox=$(command -v busybox) || die "busybox not found (busybox-static)"
  if ldd "$busybox" >/dev/null 2>&1; then die "$busybox is dynamically linked; install busybox-static"; fi
  cp "$busybox" "$root/bin/busybox"
  install -m 0755 "$REPO/scripts/kernel-e2e/init" "$root/init"
  for p in "${GUEST_PROGRAMS[@]}"; do copy_program "$root" "$p"; done
  # The supervisor under test, as the guest's `superdisk`.
  copy_program "$root" "$SD"
  mkdir -p "$root/usr/bin"
  cp "$SD" "$root/usr/bin/superdisk"
  cp "$KIT"/modules/*.ko "$KIT/modules/order" "$root/lib/modules/e2e/"
  (cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 >"$WORK/initramfs.cpio.gz"
  log "initramfs: $(du -sh "$root" | cut -f1) unpacked, $(du -h "$WORK/initramfs.cpio.gz" | cut -f1) gzipped"
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
  cp "$SD" "$WORK/superdisk-a"
  SD=$WORK/superdisk-a
  case "${SUPERDISK_BIN:-$REPO/target/release/superdisk}" in
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

# KVM needs /dev/kvm to open read-write and hardware virtualization behind it: a KVM without the
# vmx/svm CPU flag (e.g. PVM, as inside some cloud sandboxes) runs only specially built guest
# kernels, and Debian's hangs there right after the boot loader.
kvm_usable() {
  [ -c /dev/kvm ] && (exec 3<>/dev/kvm) 2>/dev/null && grep -qwE 'vmx|svm' /proc/cpuinfo
}

choose_accel() {
  if [ "$ACCEL" = kvm ] || { [ "$ACCEL" = auto ] && kvm_usable; }; then
    ACCEL=kvm
    QEMU_ACCEL=(-accel kvm -cpu host)
  else
    if [ "$ACCEL" = auto ] && [ -c /dev/kvm ]; then
      log "/dev/kvm is there but not usable for a stock kernel (not openable, or no vmx/svm CPU flag)"
    fi
    ACCEL=tcg
    QEMU_ACCEL=(-accel "tcg,thread=multi" -cpu max)
  fi
  log "acceleration: $ACCEL"
}

boot_guest() {
  local nonce console=$WORK/console.log rc=0 line tail_pid
  nonce=$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')
  : >"$console"
  # user networking: the guest's 10.0.2.2 is the host's loopback, so the daemon stays on 127.0.0.1.
  # romfile= : no iPXE option ROM is needed (or installed) for a -kernel boot.
  timeout -k 5 "$GUEST_TIMEOUT_SECS" qemu-system-x86_64 "${QEMU_ACCEL[@]}" -smp 2 -m 1024 \
    -nodefaults -no-user-config -display none -no-reboot -monitor none \
    -serial "file:$console" \
    -kernel "$KIT/vmlinuz" -initrd "$WORK/initramfs.cpio.gz" \
    -append "console=ttyS0 panic=-1 loglevel=4 e2e.nonce=$nonce e2e.port=$PORT e2e.fio_size=$FIO_SIZE e2e.restart_secs=$RESTART_SECS" \
    -netdev user,id=n0,ipv6=off -device virtio-net-pci,netdev=n0,romfile= \
    >"$WORK/qemu.log" 2>&1 &
  QEMU_PID=$!
  # In the background too, so that a signal to this script is handled at once (bash runs traps only
  # between foreground commands, but interrupts wait).
  tail -n +1 -f --pid="$QEMU_PID" "$console" | sed -u 's/\r$//; s/^/  guest| /' &
  tail_pid=$!
  [ "$RESTART_SECS" = 0 ] || run_events "$console" "$nonce"
  wait "$QEMU_PID" || rc=$?
  QEMU_PID=
  wait "$tail_pid" || true
  [ -s "$WORK/qemu.log" ] && sed 's/^/  qemu| /' "$WORK/qemu.log"
  line=$(tr -d '\r' <"$console" | grep -a '^SUPERDISK-E2E-RESULT ' | tail -n 1 || true)
  if [ "$line" = "SUPERDISK-E2E-RESULT PASS nonce=$nonce" ]; then
    [ "$rc" = 0 ] || die "guest passed but qemu exited $rc"
    log "guest: PASS"
  elif [[ "$line" == "SUPERDISK-E2E-RESULT FAIL "*"nonce=$nonce" ]]; then
    STEP="guest ${line#SUPERDISK-E2E-RESULT FAIL }"
    STEP=${STEP% nonce=*}
    die "the guest reported a failure (console above)"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    die "the guest did not finish within ${GUEST_TIMEOUT_SECS}s (--timeout); qemu killed"
  else
    die "qemu exited $rc without a result line from the guest (kernel panic or boot failure?)"
  fi
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
  install_deps
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
  choose_accel
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
