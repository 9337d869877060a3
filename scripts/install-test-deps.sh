#!/usr/bin/env bash
# Installs what the test suite drives: real NBD clients (libnbd, qemu, fio), the peer servers
# (nbdkit, qemu-nbd), and the filesystem tools for the XFS-on-export tests. Idempotent.
set -euo pipefail
pkgs=(libnbd-bin python3-libnbd qemu-utils fio nbdkit xfsprogs fuse3 util-linux coreutils)
# tests/postgres.rs: PostgreSQL on XFS on the export (server, pgbench, pg_amcheck, pg_checksums).
pkgs+=(postgresql)
# tests/admin.rs: the metrics endpoint is parsed with Prometheus' own Python parser.
pkgs+=(python3-prometheus-client)
# scripts/kernel-e2e.sh: a Debian kernel under qemu with nbd-client, mkfs.xfs and fio in an initramfs.
pkgs+=(qemu-system-x86 busybox-static nbd-client cpio gzip xz-utils zstd)
# tests/ops.rs: systemd-analyze verify on the units, and the unit run under systemd-nspawn;
# verify also checks that the commands the units run exist (superdisk-nbd@ runs /sbin/modprobe).
pkgs+=(systemd systemd-container kmod)
# tests/tls.rs: certificates generated per test.
pkgs+=(openssl)
# scripts/test.sh: the shell scripts are linted like the Rust is.
pkgs+=(shellcheck)
# tests/monitoring.rs: promtool checks and unit-tests docs/monitoring/superdisk-alerts.yml; Debian
# ships it in the prometheus package. Where systemd runs services (no policy-rc.d denying them) the
# install also enables and starts a Prometheus on :9090 scraping itself and :9100: harmless, the
# tests use ports the kernel hands out.
pkgs+=(prometheus)
# tests/package.rs: scripts/package.sh builds the .deb (cargo-deb needs dpkg-shlibdeps and strip),
# lintian checks it, man renders its pages.
pkgs+=(lintian dpkg-dev binutils man-db)
missing_pkgs() {
  local p
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}
# Twice: installing one package can make apt remove another that was already there (a machine
# image with a newer qemu-utils from backports loses it to the distribution's qemu-system-x86),
# and the second pass puts back what the first took away.
for pass in 1 2; do
  mapfile -t missing < <(missing_pkgs)
  ((${#missing[@]})) || break
  if [ "$(id -u)" != 0 ]; then
    echo "install-test-deps: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  [ "$pass" = 2 ] || apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
done
mapfile -t missing < <(missing_pkgs)
if ((${#missing[@]})); then
  echo "install-test-deps: still not installed after two passes: ${missing[*]}" >&2
  exit 1
fi
# tests/package.rs: cargo-deb, pinned in scripts/package.sh (compiled once: about a minute on 2 cores).
"$(dirname "$0")/package.sh" --install-tools
