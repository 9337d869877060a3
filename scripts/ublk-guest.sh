#!/usr/bin/env bash
# Boots Debian's 6.12 kernel (bookworm-security's linux-image-6.12.*+deb12-amd64-unsigned, which
# builds ublk_drv; bookworm's 6.1 does not) under qemu with a busybox initramfs, loads ublk_drv (and
# nbd, crc32c_generic and xfs beside it), checks that /dev/ublk-control appears, and runs a command
# inside the guest. Prints one PASS or FAIL line and exits non-zero on failure. See docs/UBLK.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/ublk-guest.sh [OPTIONS] [--] [COMMAND...]

Boots the Debian 6.12 kernel under qemu-system-x86_64, loads ublk_drv, checks /dev/ublk-control
and runs COMMAND in the guest with busybox sh (default: a smoke check: kernel version,
`ls -l /dev/ublk-control`, ublk_drv's and nbd's parameters; scripts/ublk-e2e.sh runs superdisk's
test with it). The host prints `ublk-guest: PASS ...` or `ublk-guest: FAIL ...`.

  --program P[=PATH]  copy host program P (a name on PATH, or a path) with its shared libraries
                      into the guest; at PATH when given (e.g. target/release/superdisk=/usr/bin/superdisk),
                      else at its host path. Repeatable.
  --file SRC=DEST     copy a host file into the guest at DEST. Repeatable.
  --script FILE       run FILE (a busybox sh script) in the guest instead of COMMAND
  --module NAME       load another module (and what it depends on) after the default ones. Repeatable.
  --tcg               force software emulation (default: KVM when usable, else TCG)
  --timeout SECS      bound on the whole guest run, boot to poweroff (default 300)
  --memory MIB        guest memory (default 1024); files the command writes in / use it too
  --smp N             guest CPUs (default 2)
  --keep              keep the work directory (console log, initramfs) and print its path
  -h, --help

Environment:
  SUPERDISK_KERNEL_CACHE  kits and the .deb (default ${XDG_CACHE_HOME:-~/.cache}/superdisk-kernel-e2e,
                          the folder scripts/kernel-e2e.sh uses)
  UBLK_KERNEL_PKG         the kernel package, "NAME" or "NAME=VERSION" (default: the newest
                          linux-image-6.12.*+deb12-amd64-unsigned apt can fetch)
  E2E_ACCEL               kvm, tcg or auto (as for kernel-e2e.sh)

Missing host packages are installed with apt-get when run as root.
EOF
}

here=$(cd "$(dirname "$0")" && pwd)
prog=ublk-guest
# shellcheck source=scripts/lib/common.sh
. "$here/lib/common.sh"
# shellcheck source=scripts/lib/kernel-guest.sh
. "$here/lib/kernel-guest.sh"

KERNEL_REGEX='^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$'
KERNEL_GLOB='linux-image-6.12.*+deb12-amd64-unsigned'
# Load order: each after its dependencies (kg_add_module follows "depends="). crc32c_generic is only
# a soft dependency of libcrc32c (which xfs needs), so it is named first.
MODULES=(ublk_drv nbd crc32c_generic xfs)
HOST_PACKAGES=(qemu-system-x86 busybox-static cpio gzip xz-utils zstd apt dpkg)
CACHE_DIR=${SUPERDISK_KERNEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/superdisk-kernel-e2e}
ACCEL=${E2E_ACCEL:-auto}
GUEST_TIMEOUT_SECS=300
MEMORY=1024
SMP=2
KEEP=0
PROGRAMS=()
FILES=()
SCRIPT=
COMMAND=

STEP=setup
WORK=
QEMU_PID=
T0=$SECONDS
STEP_T0=$SECONDS
TIMES=()

# step NAME: names the step a failure is reported under, and times the previous one.
step() {
  if [ "$STEP" != setup ]; then
    TIMES+=("$STEP $((SECONDS - STEP_T0))s")
    log "ok $STEP ($((SECONDS - STEP_T0))s)"
  fi
  STEP=$1
  STEP_T0=$SECONDS
  log "== $STEP"
}

on_exit() {
  local rc=$?
  set +e
  # QEMU_PID is timeout(1), which passes SIGTERM on to qemu.
  [ -z "$QEMU_PID" ] || stop_pid "$QEMU_PID"
  if [ "$rc" != 0 ]; then
    echo "ublk-guest: FAIL in step \"$STEP\" (exit $rc) after $((SECONDS - T0))s" >&2
  fi
  if [ -n "$WORK" ]; then
    if [ "$KEEP" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
  fi
  exit "$rc"
}

parse_args() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --program) PROGRAMS+=("${2:?--program needs a value}"); shift ;;
      --file) FILES+=("${2:?--file needs SRC=DEST}"); shift ;;
      --script) SCRIPT=${2:?--script needs a file}; shift ;;
      --module) MODULES+=("${2:?--module needs a name}"); shift ;;
      --tcg) ACCEL=tcg ;;
      --timeout) GUEST_TIMEOUT_SECS=${2:?--timeout needs a value}; shift ;;
      --memory) MEMORY=${2:?--memory needs a value}; shift ;;
      --smp) SMP=${2:?--smp needs a value}; shift ;;
      --keep) KEEP=1 ;;
      -h | --help) usage; exit 0 ;;
      --) shift; break ;;
      -*) usage >&2; exit 2 ;;
      *) break ;;
    esac
    shift
  done
  COMMAND="$*"
  case "$ACCEL" in auto | kvm | tcg) ;; *) echo "E2E_ACCEL must be kvm, tcg or auto" >&2; exit 2 ;; esac
  for n in "$GUEST_TIMEOUT_SECS" "$MEMORY" "$SMP"; do
    [[ "$n" =~ ^[0-9]+$ ]] || { echo "--timeout, --memory and --smp take numbers" >&2; exit 2; }
  done
  [ -z "$SCRIPT" ] || [ -r "$SCRIPT" ] || { echo "--script $SCRIPT: not readable" >&2; exit 2; }
  [ -z "$SCRIPT" ] || [ -z "$COMMAND" ] || { echo "give --script or a command, not both" >&2; exit 2; }
}

# The package: UBLK_KERNEL_PKG, else the newest 6.12 bookworm-security build apt can fetch.
# Without package lists (and no root to fetch them) the newest cached kit is used.
kernel() {
  local found='' pkg ver
  if [ -n "${UBLK_KERNEL_PKG:-}" ]; then
    pkg=${UBLK_KERNEL_PKG%%=*}
    ver=${UBLK_KERNEL_PKG#*=}
    [ "$ver" != "$UBLK_KERNEL_PKG" ] || ver=$(kg_candidate "$pkg")
    [ -n "$ver" ] && found="$pkg $ver"
  else
    found=$(kg_find_package kg_newest_package "$KERNEL_REGEX")
  fi
  kg_kit "$CACHE_DIR" "$KERNEL_GLOB" "$found" "${MODULES[@]}" ||
    die "apt can fetch no $KERNEL_GLOB (bookworm-security in the sources? apt-get update?) and none is cached in $CACHE_DIR"
  grep -q '^CONFIG_BLK_DEV_UBLK=[ym]' "$KIT/config" || die "$(basename "$KIT") does not build ublk (CONFIG_BLK_DEV_UBLK)"
}

# What runs in the guest when no command is given.
smoke_command() {
  cat <<'EOF'
set -e
echo "kernel: $(uname -r)"
ls -l /dev/ublk-control
echo "ublk_drv: ublks_max=$(cat /sys/module/ublk_drv/parameters/ublks_max)"
echo "nbd: nbds_max=$(cat /sys/module/nbd/parameters/nbds_max), $(ls -d /sys/block/nbd* | wc -l) devices"
echo "char/block majors: $(grep -E 'ublk|nbd' /proc/devices | tr -s ' \n' ' ')"
EOF
}

build_initramfs() {
  local root=$WORK/initramfs spec src dest
  kg_initramfs_base "$root" "$here/ublk-guest/init" /lib/modules/guest
  mkdir -p "$root"/{run,usr/bin,ublk-guest}
  for spec in "${PROGRAMS[@]}"; do
    src=${spec%%=*}
    dest=${spec#*=}
    [ "$dest" != "$spec" ] || dest=
    kg_copy_program "$root" "$src" "$dest"
  done
  for spec in "${FILES[@]}"; do
    src=${spec%%=*}
    dest=${spec#*=}
    if [ "$dest" = "$spec" ] || [ ! -e "$src" ]; then die "--file $spec: want an existing SRC=DEST"; fi
    mkdir -p "$root$(dirname "$dest")"
    cp -L "$src" "$root$dest"
  done
  if [ -n "$SCRIPT" ]; then
    cp "$SCRIPT" "$root/ublk-guest/cmd.sh"
  elif [ -n "$COMMAND" ]; then
    printf '%s\n' "$COMMAND" >"$root/ublk-guest/cmd.sh"
  else
    smoke_command >"$root/ublk-guest/cmd.sh"
  fi
  kg_pack_initramfs "$root" "$WORK/initramfs.cpio.gz"
}

# One boot; its outcome in BOOT_RC (qemu's exit status), the console in $WORK/console.log.
boot_once() {
  # No network device: the guest needs none (its loopback is up, for NBD inside the guest).
  kg_boot_start "$WORK" "$GUEST_TIMEOUT_SECS" -smp "$SMP" -m "$MEMORY" \
    -append "console=ttyS0 panic=-1 loglevel=4 ublk.nonce=$1 ublk.cmd_timeout=$((GUEST_TIMEOUT_SECS - 20))"
  kg_boot_wait "$WORK"
}

boot_guest() {
  local nonce
  nonce=$(kg_nonce)
  boot_once "$nonce"
  # Under TCG with several vCPUs the kernel has been seen to oops in early boot (an int3 from
  # live code patching, before init ran: a QEMU multi-threaded TCG flake, more likely on a loaded
  # host). A guest that died before its init printed a line is booted once more, said so.
  if ! grep -aq '^ublk-guest: init' "$WORK/console.log" && grep -aq 'Kernel panic' "$WORK/console.log"; then
    log "the guest kernel panicked before init ran (console above); booting once more"
    boot_once "$nonce"
  fi
  kg_guest_result "$WORK/console.log" UBLK-GUEST-RESULT "$nonce" "$BOOT_RC" "$GUEST_TIMEOUT_SECS"
}

main() {
  parse_args "$@"
  trap on_exit EXIT
  trap 'exit 130' INT TERM HUP
  step host-packages
  kg_install_packages "${HOST_PACKAGES[@]}"
  step kernel
  kernel
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/ublk-guest.XXXXXX")
  step initramfs
  build_initramfs
  step guest
  kg_choose_accel "$ACCEL"
  log "acceleration: $ACCEL, kernel $(cat "$KIT/kernel-release"), ${SMP} CPUs, ${MEMORY} MiB"
  boot_guest
  step finish
  log "times: ${TIMES[*]}"
  echo "ublk-guest: PASS in $((SECONDS - T0))s (acceleration: $ACCEL, kernel $(cat "$KIT/kernel-release"))"
}

main "$@"
