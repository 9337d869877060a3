#!/usr/bin/env bash
# Issue 20's end-to-end test: boots Debian's 6.12 kernel with ublk_drv under qemu
# (scripts/ublk-guest.sh) and runs scripts/ublk-guest/superdisk-ublk.sh in it against
# `superdisk serve --ublk`: XFS with fio verification, SIGKILL and restart under fio, an in-place
# upgrade under fio, stop/start, the error lines, and ublk beside NBD. Prints PASS or FAIL.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/ublk-e2e.sh [--keep] [--timeout SECS]

Environment:
  SUPERDISK_BIN   the superdisk binary to test (default: target/debug/superdisk, built if missing)
  E2E_ACCEL, SUPERDISK_KERNEL_CACHE, UBLK_KERNEL_PKG: as for scripts/ublk-guest.sh
USAGE
}

here=$(cd "$(dirname "$0")" && pwd)
prog=ublk-e2e
# shellcheck source=scripts/lib/common.sh
. "$here/lib/common.sh"

TIMEOUT=900
EXTRA=()
while [ $# -gt 0 ]; do
  case $1 in
    --keep) EXTRA+=(--keep) ;;
    --timeout) TIMEOUT=${2:?--timeout needs a value}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done

cd "$here/.."
bin=${SUPERDISK_BIN:-target/debug/superdisk}
if [ ! -x "$bin" ] && [ -z "${SUPERDISK_BIN:-}" ]; then
  cargo build --quiet
fi
[ -x "$bin" ] || die "no superdisk binary at $bin"
bin=$(realpath "$bin")
missing=0
for c in nbd-client fio mkfs.xfs xfs_repair fstrim /usr/bin/setpriv; do
  command -v "$c" >/dev/null || missing=1
done
if [ "$missing" = 1 ]; then
  [ "$(id -u)" = 0 ] || die "needs nbd-client, fio, xfsprogs and util-linux's setpriv (run as root to install them)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nbd-client fio xfsprogs util-linux >/dev/null
fi
exec "$here/ublk-guest.sh" --memory 2048 --timeout "$TIMEOUT" "${EXTRA[@]}" \
  --program "$bin=/usr/bin/superdisk" --program mkfs.xfs --program xfs_repair --program fio \
  --program nbd-client --program fstrim --program /usr/bin/setpriv=/usr/bin/setpriv \
  --script "$here/ublk-guest/superdisk-ublk.sh"
