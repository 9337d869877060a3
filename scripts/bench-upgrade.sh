#!/usr/bin/env bash
# The longest I/O pause a client sees across in-place upgrades (`superdisk upgrade`), under a busy
# fio workload (fio's nbd engine: libnbd, 4 KiB random read/write, QD16, one connection per job)
# against the mirror over its Unix socket. Every completion latency is logged; the report gives,
# per upgrade, the daemon's own "clients paused" figure and the slowest completion fio saw around
# it, and the run's slowest completion without upgrades for comparison. The goal is ≤ 500 ms.
# A script, not a test: it measures and reports, it asserts nothing about speed.
#
#   scripts/bench-upgrade.sh [--upgrades 3] [--jobs 2]
#
# Both image files are opened O_DIRECT (--direct true --cache-direct true), as the block devices
# of a real deployment are: with buffered files the final flush of a handover writes back
# whatever the page cache collected meanwhile, which measures the page cache, not the handover.
#
# Environment: SUPERDISK (binary; default target/release/superdisk, built if missing), BENCH_DIR
# (default /var/tmp/superdisk-bench-upgrade; a filesystem that takes O_DIRECT), BENCH_SIZE
# (default 1G), SUPERDISK_ARGS (default "--direct true --cache-direct true"; "" for buffered).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
# shellcheck source=scripts/lib/common.sh
. "$here/lib/common.sh"

upgrades=3 jobs=2
while [ $# -gt 0 ]; do
    case "$1" in
        --upgrades) [ $# -ge 2 ] || die "--upgrades needs a value"; upgrades="$2"; shift ;;
        --jobs) [ $# -ge 2 ] || die "--jobs needs a value"; jobs="$2"; shift ;;
        -h|--help) sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
    shift
done
need_fio_nbd
size_b="$(size_bytes "${BENCH_SIZE:-1G}")"
sd="${SUPERDISK:-$repo/target/release/superdisk}"
[ -x "$sd" ] || (cd "$repo" && cargo build --release --quiet) || die "cargo build --release failed"
dir="${BENCH_DIR:-/var/tmp/superdisk-bench-upgrade}"
rm -rf "$dir"; mkdir -p "$dir"
pid=""
cleanup() { [ -z "$pid" ] || kill -TERM "$pid" 2>/dev/null || true; rm -f "$dir"/*.img; }
trap cleanup EXIT

truncate -s "$((size_b + 64 * 1048576))" "$dir/cache.img"
"$sd" create --backing "$dir/backing.img" --size "$size_b" --cache "$dir/cache.img" >/dev/null
head -c "$size_b" /dev/urandom | dd of="$dir/backing.img" conv=notrunc bs=1M status=none
# shellcheck disable=SC2086  # SUPERDISK_ARGS is a word list on purpose
"$sd" serve --backing "$dir/backing.img" --cache "$dir/cache.img" --listen "" --unix "$dir/nbd.sock" \
    --admin-socket "$dir/admin.sock" ${SUPERDISK_ARGS---direct true --cache-direct true} 2>"$dir/serve.log" &
pid=$!
for _ in $(seq 6000); do grep -q "mode=healthy" "$dir/serve.log" && break; sleep 0.1; done
grep -q "mode=healthy" "$dir/serve.log" || die "the cache did not finish its rebuild"

runtime=$(( (upgrades + 1) * 5 ))
fio --name=upgrade --ioengine=nbd --uri="nbd+unix:///?socket=$dir/nbd.sock" --rw=randrw --bs=4k \
    --iodepth=16 --numjobs="$jobs" --time_based --runtime="$runtime" --group_reporting \
    --write_lat_log="$dir/lat" --log_avg_msec=0 --output-format=json >"$dir/fio.json" 2>"$dir/fio.err" &
fio_pid=$!
start=$(date +%s%N)
marks=()
for n in $(seq "$upgrades"); do
    sleep 5
    t=$(( ($(date +%s%N) - start) / 1000000 ))
    out=$("$sd" upgrade --socket "$dir/admin.sock" --binary "$sd" 2>&1) || die "upgrade $n failed: $out"
    pid=$(sed -n 's/.*, pid \([0-9]*\);.*/\1/p' <<<"$out")
    marks+=("$t")
    log "upgrade $n at ${t} ms: $out"
done
wait "$fio_pid" || die "fio failed: $(tail -n 5 "$dir/fio.err")"

echo "In-place upgrades under fio (randrw 4 KiB, QD16 x $jobs connections, Unix socket; serve ${SUPERDISK_ARGS---direct true --cache-direct true}), $(nproc) CPUs, $(uname -r)"
echo
echo "| upgrade | at (ms into the run) | daemon: clients paused (ms) | slowest completion within 2 s (ms) |"
echo "|---:|---:|---:|---:|"
n=0
for t in "${marks[@]}"; do
    n=$((n + 1))
    paused=$(grep -o "pause_ms=[0-9]*" "$dir/serve.log" | sed -n "${n}p" | cut -d= -f2)
    # fio's lat log: time (ms since start, at completion), latency (ns), direction, size.
    slowest=$(cat "$dir"/lat_clat.*.log | awk -F', *' -v t="$t" '$1 >= t - 500 && $1 <= t + 2000 { if ($2 > m) m = $2 } END { printf "%.1f", m / 1e6 }')
    echo "| $n | $t | ${paused:-?} | $slowest |"
done
quiet=$(cat "$dir"/lat_clat.*.log | awk -F', *' -v a="${marks[0]}" '$1 < a - 1000 { if ($2 > m) m = $2 } END { printf "%.1f", m / 1e6 }')
echo
echo "Slowest completion before the first upgrade (no upgrade running): $quiet ms."
