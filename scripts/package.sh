#!/usr/bin/env bash
# Builds the Debian package (docs/PACKAGING.md): the superdisk binary, the systemd units, an
# example configuration, man pages and shell completions generated from the binary itself, and the
# documentation. Prints the path of the .deb as the last line on stdout (a release build also
# writes superdisk-dbgsym_*.ddeb, the binary's debug info, next to it).
#
#   scripts/package.sh [--profile PROFILE] [--no-build] [--out DIR] [--deb-version VERSION] [--fast]
#   scripts/package.sh --install-tools
#
#   --profile        the Cargo profile whose binary is packaged (default release). `dev` packages
#                    target/debug/superdisk, the binary the test suite builds (tests/package.rs):
#                    a package for tests, not for machines
#   --no-build       package the binary already built for that profile; run no cargo build
#   --out DIR        where the .deb is written (default target/debian)
#   --deb-version    the package's version (default: Cargo.toml's version, Debian revision 1)
#   --fast           lighter compression: quicker to build, larger to ship
#   --install-tools  install cargo-deb (pinned below) if it is missing, then stop; about a minute
#                    of compiling on 2 cores, once (scripts/install-test-deps.sh runs this)
#
# Needs cargo, dpkg-dev (dpkg-shlibdeps works out the package's library dependencies) and
# binutils (strip). cargo-deb is installed with `cargo install` when missing.
set -euo pipefail
prog="package.sh"
caller_dir="$PWD"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib/common.sh
. scripts/lib/common.sh

# The cargo-deb this script is tested with. 3.x packages `--profile dev` with a warning (it is
# meant for releases); the test suite relies on that to package its debug binary.
CARGO_DEB_VERSION="3.8.0"

profile="release"
build=1
out="target/debian"
deb_version=""
fast=0
tools_only=0
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) [ $# -ge 2 ] || die "--profile needs a value"; profile="$2"; shift ;;
        --no-build) build=0 ;;
        --out)
            [ $# -ge 2 ] || die "--out needs a value"
            case "$2" in /*) out="$2" ;; *) out="$caller_dir/$2" ;; esac
            shift
            ;;
        --deb-version) [ $# -ge 2 ] || die "--deb-version needs a value"; deb_version="$2"; shift ;;
        --fast) fast=1 ;;
        --install-tools) tools_only=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
    shift
done

need cargo "https://rustup.rs"
if [ "$(cargo deb --version 2>/dev/null || true)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
    log "installing cargo-deb $CARGO_DEB_VERSION (cargo install; about a minute)"
    start=$SECONDS
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked --quiet
    log "cargo-deb installed in $((SECONDS - start)) s"
fi
[ "$tools_only" = 0 ] || exit 0
need dpkg-shlibdeps "apt-get install dpkg-dev"
need strip "apt-get install binutils"

# Where cargo puts the profile's binary (cargo-deb resolves it the same way).
target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
case "$profile" in
    dev|debug) profile_dir="debug" ;;
    *) profile_dir="$profile" ;;
esac
binary="$target_dir/$profile_dir/superdisk"
if [ "$build" = 1 ]; then
    # Names the build in `superdisk status` and `superdisk upgrade` (two builds of one version).
    if [ -z "${SUPERDISK_BUILD_ID:-}" ] && id="$(git describe --always --dirty 2>/dev/null)"; then
        export SUPERDISK_BUILD_ID="$id"
    fi
    cargo build --profile "$profile" --bin superdisk
fi
[ -x "$binary" ] || die "$binary is missing: build it (cargo build --profile $profile) or leave out --no-build"

# What Cargo.toml's [package.metadata.deb] takes from target/deb-assets/.
stage="target/deb-assets"
rm -rf "$stage"
mkdir -p "$stage/systemd" "$stage/doc"
"$binary" generate-docs --out "$stage" >/dev/null
# The units in systemd/ run /usr/local/bin/superdisk, where a hand install puts it; the package
# installs /usr/bin/superdisk.
for unit in superdisk@.service superdisk-nbd@.service; do
    sed 's|/usr/local/bin/superdisk|/usr/bin/superdisk|g' "systemd/$unit" >"$stage/systemd/$unit"
    if grep -q '/usr/local/' "$stage/systemd/$unit"; then die "$unit still names /usr/local"; fi
done
cp README.md docs/*.md "$stage/doc/"
if [ -d docs/monitoring ]; then
    cp -r docs/monitoring "$stage/doc/"
fi

mkdir -p "$out"
log "packaging $binary"
args=(--no-build --profile "$profile" --output "$out")
# A release binary keeps its debug info ([profile.release] debug = 1, for profiles and backtraces):
# it goes into superdisk-dbgsym_*.ddeb next to the .deb, and the packaged binary is stripped. A dev
# binary is only stripped: its debug info is of no use on a machine.
case "$profile_dir" in
    debug) ;;
    *) args+=(--dbgsym) ;;
esac
[ -z "$deb_version" ] || args+=(--deb-version "$deb_version")
[ "$fast" = 0 ] || args+=(--fast)
start=$SECONDS
# cargo-deb prints the path of each package it wrote, the .deb last.
deb="$(cargo deb "${args[@]}" | tail -n 1)"
[ -f "$deb" ] || die "cargo deb did not report a package (got '$deb')"
log "built in $((SECONDS - start)) s: $(du -h "$deb" | cut -f1)"
echo "$deb"
