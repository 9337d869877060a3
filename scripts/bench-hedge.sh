#!/usr/bin/env bash
# Hedged reads against a stalling cache: the tail latency of 4 KiB random reads with hedging on and
# off. A script, not a test: it measures and reports, it asserts nothing about speed.
#
#   scripts/bench-hedge.sh [--quick] [--out FILE]
#
# Set-up: a backing with network-disk latency (a file served by nbdkit's delay filter, rdelay
# BENCH_RDELAY, presented as a file by nbdfuse and opened with O_DIRECT, as bench-mirror.sh does) and
# a cache file that superdisk has fully rebuilt. Stalls are injected into the cache's reads with
# SUPERDISK_INJECT_READ_STALL=cache0:PPM:MS (BENCH_STALL_PPM of them per million reads wait
# BENCH_STALL_MS first, as an SSD in garbage collection does). fio's nbd engine reads 4 KiB at random,
# BENCH_QD in flight, for BENCH_RUNTIME seconds per cell, in three cells:
#   1. no stalls, hedging on (the baseline: what hedging costs when nothing is wrong);
#   2. stalls, hedging off (hedge_reads = false);
#   3. stalls, hedging on (the defaults: threshold from the cache's p99, at least hedge_min_us).
#
# Environment:
#   BENCH_DIR        working directory                       (default /tmp/superdisk-bench-hedge)
#   BENCH_SIZE       exported size                           (default 256M)
#   BENCH_RUNTIME    measured seconds per cell               (default 30; 5 with --quick)
#   BENCH_QD         reads in flight                         (default 4)
#   BENCH_RDELAY     backing read latency                    (default 1ms)
#   BENCH_STALL_PPM  stalled cache reads per million         (default 2000)
#   BENCH_STALL_MS   length of one stall                     (default 50)
#   SUPERDISK        superdisk binary; when unset: cargo build --release
#
# Output: the table on stdout; docs/bench/hedge.md for a full run, BENCH_DIR/run-*/hedge.md for --quick.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib/common.sh
. "$here/lib/common.sh"
repo="$(cd "$here/.." && pwd)"

quick=0
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --out) [ $# -ge 2 ] || die "--out needs a file"; out="$2"; shift ;;
        -h|--help) sed -n '2,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
    shift
done
size="${BENCH_SIZE:-256M}"
if [ "$quick" = 1 ]; then runtime="${BENCH_RUNTIME:-5}"; else runtime="${BENCH_RUNTIME:-30}"; fi
qd="${BENCH_QD:-4}"
rdelay="${BENCH_RDELAY:-1ms}"
stall_ppm="${BENCH_STALL_PPM:-2000}"
stall_ms="${BENCH_STALL_MS:-50}"
bench_dir="${BENCH_DIR:-/tmp/superdisk-bench-hedge}"
for v in runtime qd stall_ppm stall_ms; do
    if ! [[ "${!v}" =~ ^[0-9]+$ ]] || [ "${!v}" -lt 1 ]; then die "$v must be a positive whole number, got '${!v}'"; fi
done
size_b="$(numfmt --from=iec "$size")" || die "BENCH_SIZE '$size' is not a size"

for t in fio nbdkit nbdfuse nbdinfo fusermount3 python3 numfmt; do
    command -v "$t" >/dev/null || die "missing tool '$t' (scripts/install-test-deps.sh installs it)"
done
if [ -z "${SUPERDISK:-}" ]; then
    (cd "$repo" && cargo build --release --quiet) || die "cargo build --release failed"
    sd="$repo/target/release/superdisk"
else
    sd="$SUPERDISK"
fi
[ -x "$sd" ] || die "superdisk binary '$sd' is missing or not executable"

run="$bench_dir/run-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$run/fio" "$run/fuse"
[ -n "$out" ] || { if [ "$quick" = 1 ]; then out="$run/hedge.md"; else out="$repo/docs/bench/hedge.md"; fi; }
loadavg_start="$(cut -d' ' -f1-3 /proc/loadavg)"

# shellcheck source=scripts/lib/delayed-backing.sh
. "$here/lib/delayed-backing.sh"
sd_pid=""
cleanup() {
    local rc=$?
    stop_pid "$sd_pid"
    stop_delayed_backing
    rm -f "$run"/*.img
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "writing $size of random data to the backing"
head -c "$size_b" /dev/urandom >"$run/backing.img"
"$sd" create --backing "$run/backing.img" --size "$size_b" >"$run/create.log" 2>&1 \
    || die "superdisk create failed: $(cat "$run/create.log")"
start_delayed_backing "$run/backing.img" rdelay="$rdelay"
truncate -s "$((size_b + 64 * 1024 * 1024))" "$run/cache.img"

# start_sd NAME HEDGE STALL: serves the delayed backing with the cache; HEDGE is true or false, STALL
# the injection spec or empty. Waits until the cache is fully rebuilt (mode healthy).
start_sd() {
    local name="$1" hedge="$2" stall="$3" port
    port="$(free_port)"
    printf 'backing = "%s"\ncache = ["%s"]\ndirect = true\nlisten = "127.0.0.1:%s"\nadmin_socket = "%s"\nhedge_reads = %s\n' \
        "$run/fuse/backing" "$run/cache.img" "$port" "$run/admin.sock" "$hedge" >"$run/$name.toml"
    SUPERDISK_INJECT_READ_STALL="$stall" "$sd" serve --config "$run/$name.toml" 2>"$run/$name.log" &
    sd_pid=$!
    uri="nbd://127.0.0.1:$port"
    for _ in $(seq 12000); do
        kill -0 "$sd_pid" 2>/dev/null || die "superdisk ($name) exited: $(tail -n 5 "$run/$name.log")"
        "$sd" status --json --socket "$run/admin.sock" 2>/dev/null | grep -q '"mode":"healthy"' && return 0
        sleep 0.1
    done
    die "superdisk ($name) did not become healthy: $(tail -n 5 "$run/$name.log")"
}
stop_sd() {
    "$sd" status --json --socket "$run/admin.sock" >"$run/$1.status.json"
    kill -TERM "$sd_pid"
    wait "$sd_pid" || die "superdisk exited with $? after SIGTERM"
    sd_pid=""
}
cell() {
    local name="$1" hedge="$2" stall="$3"
    start_sd "$name" "$hedge" "$stall"
    log "fio $name ($runtime s)"
    fio --name="$name" --ioengine=nbd --uri="$uri" --rw=randread --bs=4k --iodepth="$qd" --numjobs=1 \
        --time_based --runtime="$runtime" --ramp_time=1 --lat_percentiles=1 \
        --percentile_list=50:99:99.9:99.99 --output-format=json >"$run/fio/$name.json" 2>"$run/fio/$name.err" \
        || die "fio $name failed: $(tail -n 5 "$run/fio/$name.err")"
    stop_sd "$name"
}

stall="cache0:$stall_ppm:$stall_ms"
cell baseline true ""
cell stall-off false "$stall"
cell stall-on true "$stall"

cmdline="scripts/bench-hedge.sh"
[ "$quick" = 1 ] && cmdline+=" --quick"
env_note=""
for v in BENCH_SIZE BENCH_RUNTIME BENCH_QD BENCH_RDELAY BENCH_STALL_PPM BENCH_STALL_MS; do
    [ -n "${!v:-}" ] && env_note+="$v=${!v} "
done
python3 - "$run" "$out" "$env_note$cmdline" "$loadavg_start" "$rdelay" "$stall_ppm" "$stall_ms" "$qd" "$runtime" \
    "$("$sd" --version)" "$(fio --version)" <<'EOF'
import json, os, platform, sys

run, out, cmd, load0, rdelay, ppm, ms, qd, runtime, sd_ver, fio_ver = sys.argv[1:]


def load(name):
    with open(os.path.join(run, "fio", name + ".json")) as f:
        text = f.read()
    r = json.loads(text[text.index("{"):])["jobs"][0]["read"]
    pct = r["clat_ns"]["percentile"] if "percentile" in r["clat_ns"] else r["lat_ns"]["percentile"]
    with open(os.path.join(run, name + ".status.json")) as f:
        h = json.load(f)["cache"]["hedge"]
    return {
        "iops": r["iops"],
        "p50": pct["50.000000"] / 1000, "p99": pct["99.000000"] / 1000,
        "p999": pct["99.900000"] / 1000, "p9999": pct["99.990000"] / 1000,
        "max": r["lat_ns"]["max"] / 1000, "n": r["total_ios"],
        "hedged": h["hedged_total"], "won": h["backing_won_total"], "over": h["over_budget_total"],
        "threshold": h["threshold_us"],
    }


rows = [
    ("no stalls, hedging on", load("baseline")),
    ("stalls, hedging off", load("stall-off")),
    ("stalls, hedging on", load("stall-on")),
]
lines = ["| cell | IOPS | p50 µs | p99 µs | p99.9 µs | p99.99 µs | max µs | reads | hedged | backing won | over budget | threshold µs |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
for label, c in rows:
    lines.append(f"| {label} | {c['iops']:.0f} | {c['p50']:.0f} | {c['p99']:.0f} | {c['p999']:.0f} | {c['p9999']:.0f} | "
                 f"{c['max']:.0f} | {c['n']} | {c['hedged']} | {c['won']} | {c['over']} | {c['threshold'] or '-'} |")
off, on = rows[1][1], rows[2][1]
summary = (f"p99.9 with stalls: {off['p999']:.0f} µs hedging off, {on['p999']:.0f} µs hedging on "
           f"({off['p999'] / on['p999']:.1f}× lower); hedged {on['hedged']} of {on['n']} reads "
           f"({100 * on['hedged'] / max(on['n'], 1):.2f} %).")
table = "\n".join(lines)
print(table)
print()
print(summary)
host = f"{os.cpu_count()} CPUs, Linux {platform.release()}, load average {load0} at the start"
doc = f"""# Hedged reads under cache stalls

Produced by `{cmd}` ({sd_ver}; {fio_ver}); {host}.

A backing with {rdelay} read latency (nbdkit delay filter behind nbdfuse, O_DIRECT) and a fully
rebuilt cache file; {ppm} of every million cache reads stall {ms} ms first
(`SUPERDISK_INJECT_READ_STALL`). fio's nbd engine: 4 KiB random reads, {qd} in flight, {runtime} s per
cell. Hedging with its defaults (threshold = the cache's recent p99 clamped to 500 µs – 20 ms,
budget 5 % of reads per second plus 32).

{table}

{summary}
"""
with open(out, "w") as f:
    f.write(doc)
print(f"\nwrote {out}")
EOF
