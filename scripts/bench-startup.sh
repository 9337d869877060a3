#!/usr/bin/env bash
# Time from `superdisk serve` to ready (every listener bound, READY=1 sent) on a large export, after
# a clean stop and after a SIGKILL (crash recovery), with and without a cache. Sparse image files:
# what is measured is the metadata work at start (superblocks, bitmaps, the intent regions marked
# for resync), not the resync itself, which runs in the background after READY.
# A script, not a test: it measures and reports, it asserts nothing about speed.
#
#   scripts/bench-startup.sh [--size 1T] [--runs 3]
#
# Environment: SUPERDISK (binary; default target/release/superdisk, built if missing), BENCH_DIR
# (default /var/tmp/superdisk-bench-startup; must hold sparse files of --size).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
# shellcheck source=scripts/lib/common.sh
. "$here/lib/common.sh"

size=1T runs=3
while [ $# -gt 0 ]; do
    case "$1" in
        --size) [ $# -ge 2 ] || die "--size needs a value"; size="$2"; shift ;;
        --runs) [ $# -ge 2 ] || die "--runs needs a value"; runs="$2"; shift ;;
        -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
    shift
done
size_b="$(size_bytes "$size")"
sd="${SUPERDISK:-$repo/target/release/superdisk}"
if [ ! -x "$sd" ]; then
    (cd "$repo" && cargo build --release --quiet) || die "cargo build --release failed"
fi
dir="${BENCH_DIR:-/var/tmp/superdisk-bench-startup}"
mkdir -p "$dir"
pid="" ms=0
cleanup() { [ -z "$pid" ] || kill -KILL "$pid" 2>/dev/null || true; rm -f "$dir"/*.img "$dir"/*.sock; }
trap cleanup EXIT

# start ARGS...: starts serve; sets $ms to the milliseconds until its "listening" line and $pid.
# (Not in a command substitution: the daemon would inherit its pipe and hold it open.)
start() {
    local t0 t1
    : >"$dir/serve.log"
    t0=$(date +%s%N)
    "$sd" serve --listen "" --unix "$dir/nbd.sock" "$@" 2>"$dir/serve.log" &
    pid=$!
    for _ in $(seq 6000); do
        grep -q "listening" "$dir/serve.log" && break
        kill -0 "$pid" 2>/dev/null || die "serve exited: $(tail -n 3 "$dir/serve.log")"
        sleep 0.005
    done
    t1=$(date +%s%N)
    ms=$(( (t1 - t0) / 1000000 ))
}

# A few writes spread over the export, so that a crash leaves write-intent bits to find.
scribble() {
    /usr/bin/python3 - "nbd+unix:///?socket=$dir/nbd.sock" "$size_b" <<'PY' || die "python3-libnbd is needed (apt-get install python3-libnbd)"
import os, sys
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = int(sys.argv[2])
for i in range(64):
    h.pwrite(os.urandom(65536), (size // 64) * i)
h.flush()
h.shutdown()
PY
}

measure() {
    local label="$1"; shift
    local clean=() crash=() i
    for i in $(seq "$runs"); do
        start "$@"; clean+=("$ms"); scribble; stop_pid "$pid"; pid=""
        start "$@"; scribble; kill -KILL "$pid"; wait "$pid" 2>/dev/null || true; pid=""
        # The start after the crash is the one measured: it finds FLAG_OPEN and the intent bits.
        start "$@"; crash+=("$ms"); stop_pid "$pid"; pid=""
        : "$i"
    done
    printf '| %s | %s | %s |\n' "$label" "$(printf '%s ' "${clean[@]}")" "$(printf '%s ' "${crash[@]}")"
}

rm -f "$dir"/*.img
truncate -s "$((size_b + 1073741824))" "$dir/cache.img"
"$sd" create --backing "$dir/backing.img" --size "$size" >/dev/null
echo "superdisk start-up to ready, ms per run ($size export, sparse files; $(nproc) CPUs, $(uname -r))"
echo
echo "| setup | after a clean stop | after SIGKILL (crash recovery) |"
echo "|---|---|---|"
measure "backing only" --backing "$dir/backing.img"
"$sd" create --backing "$dir/backing.img" --size "$size" --cache "$dir/cache.img" --force >/dev/null
measure "backing + cache" --backing "$dir/backing.img" --cache "$dir/cache.img"
