#!/usr/bin/env bash
# Gray failure, measured: one of two striped cache members becomes far slower than the backing
# while clients read (issue 19). A script, not a test: it measures and reports, it asserts nothing
# about speed.
#
#   scripts/bench-slow-cache.sh [--hedge] [--out FILE.md]
#
# Devices, as in tests/slow_cache.rs: the backing is an image served by nbdkit through its rate
# filter (full rate, 10G) and presented as a file by nbdfuse; cache member 0 is a plain file; cache
# member 1 is an image behind its own rate filter, also through nbdfuse, whose rate-file this
# script changes. So the backing and the slow member are the same kind of device, and only the rate
# makes the difference. superdisk opens all three O_DIRECT (direct, cache_direct), with
# io_engine = "psync" (FUSE has no asynchronous O_DIRECT: io_uring would punt every request to a
# bounded pool of kernel workers that the slow member's requests fill, stalling the other devices
# too) and hedge_reads = false (a hedged read the backing wins stays queued in the rate filter, which
# a merely slow SSD would not do; --hedge leaves hedging on, to compare hedging alone with routing).
#
# fio's nbd engine over the daemon's Unix socket reads 4 KiB at random, 4 in flight, for
# BENCH_RUNTIME seconds (time_based) per phase:
#   1. normal     both members at full rate;
#   2. slow       member 1 drops to BENCH_SLOW_RATE bits/s just before fio starts; the phase
#                 includes the time the watch takes to route around it (slow_cache_window_ms);
#   3. routed     after the "cache member slower than the backing" log line;
#   4. recovered  the rate restored, after the "cache member is fast again" line.
# The whole sequence runs twice in one invocation: slow_cache_policy = "route", then "off". With
# "off" there are no log lines: phase 3 starts when phase 2 ends, and phase 4 waits as long after
# the rate is restored as the "route" run waited for its line. Before both, fio reads the FUSE
# backing file itself (O_DIRECT, io_uring, the same job), and the slowed member's FUSE file: the
# devices' own figures.
#
# Environment:
#   BENCH_DIR        working directory                          (default /var/tmp/superdisk-bench-slow)
#   BENCH_SIZE       exported size, with K/M/G suffix           (default 256M)
#   BENCH_RUNTIME    seconds per phase                          (default 10)
#   BENCH_SLOW_RATE  member 1's rate in phases 2 and 3 (bits/s) (default 200K: ~160 ms per 4 KiB)
#   BENCH_WINDOW_MS  slow_cache_window_ms                       (default 2000; the default 30 s
#                    would not fit in phases of seconds)
#   SUPERDISK        superdisk binary; when unset: cargo build --release
#
# Output: the tables on stdout; with --out FILE.md also as a Markdown document. Raw fio JSON, daemon
# logs, status snapshots after each phase and the watch's view every 0.5 s while the "route" run
# waits for a line (*.trace.jsonl) stay in BENCH_DIR/run-*/ (the images are removed on exit).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib/common.sh
. "$here/lib/common.sh"
repo="$(cd "$here/.." && pwd)"

hedge=false
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --hedge) hedge=true ;;
        --out) [ $# -ge 2 ] || die "--out needs a file"; out="$2"; shift ;;
        -h|--help) sed -n '2,42p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
    shift
done

size="${BENCH_SIZE:-256M}"
runtime="${BENCH_RUNTIME:-10}"
slow_rate="${BENCH_SLOW_RATE:-200K}"
window_ms="${BENCH_WINDOW_MS:-2000}"
bench_dir="${BENCH_DIR:-/var/tmp/superdisk-bench-slow}"
for v in runtime window_ms; do
    if ! [[ "${!v}" =~ ^[0-9]+$ ]] || [ "${!v}" -lt 1 ]; then die "$v must be a positive whole number, got '${!v}'"; fi
done
[[ "$slow_rate" =~ ^[0-9]+[KMG]?$ ]] || die "BENCH_SLOW_RATE must be bits/s like 200K, got '$slow_rate'"
size_b="$(size_bytes "$size")"
[ "$size_b" -ge $((16 * 1024 * 1024)) ] || die "BENCH_SIZE must be at least 16M"
[ $((size_b % (1024 * 1024))) = 0 ] || die "BENCH_SIZE must be a multiple of 1M"
# Each member holds half the export (striped) plus its own metadata.
member_b=$((size_b / 2 + 16 * 1024 * 1024))
# How long a line may take: the window, a few ticks, and a slow device's queued requests.
line_timeout=$((window_ms / 1000 * 4 + 60))

# --- tools -----------------------------------------------------------------------------------------

need nbdkit "apt-get install nbdkit"
need nbdfuse "apt-get install libnbd-bin"
need fusermount3 "apt-get install fuse3"
need python3 "apt-get install python3"
need_fio_nbd
nbdkit --filter=rate file --version >/dev/null 2>&1 || die "nbdkit has no rate filter"
fio --enghelp=io_uring >/dev/null 2>&1 || die "this fio has no io_uring engine"
[ -e /dev/fuse ] || die "/dev/fuse is missing (nbdfuse needs FUSE)"

find_superdisk

# --- set-up and clean-up ---------------------------------------------------------------------------

start_run_dir
sock="$run/nbd.sock"
[ "${#sock}" -le 107 ] || die "socket path $sock is longer than 107 bytes: use a shorter BENCH_DIR"
uri="nbd+unix:///superdisk?socket=$sock"

sd_pid=""
fio_pid=""
nbdkit_pids=()
nbdfuse_pids=()
mounts=()
cleanup() {
    local rc=$? p m
    stop_pid "$fio_pid"
    stop_pid "$sd_pid"
    # superdisk held the FUSE files; with it gone the mounts can go, then the servers behind them.
    for m in "${mounts[@]}"; do
        fusermount3 -u "$m" 2>/dev/null || fusermount3 -uz "$m" 2>/dev/null || true
    done
    for p in "${nbdfuse_pids[@]}"; do stop_pid "$p"; done
    for p in "${nbdkit_pids[@]}"; do stop_pid "$p"; done
    rm -f "$run"/*.img "$run"/*.sock
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start_rated NAME IMG: serves IMG through nbdkit's rate filter (10G, changed with set_rate NAME)
# and presents it as $run/fuse-NAME/NAME.
start_rated() {
    local name="$1" img="$2" dir="$run/fuse-$1" want
    want="$(stat -c %s "$img")"
    printf '10G\n' >"$run/$name.rate"
    nbdkit -f -U "$run/$name.sock" -P "$run/$name.nbdkit.pid" --filter=rate file "$img" rate=10G \
        rate-file="$run/$name.rate" 2>"$run/$name.nbdkit.log" &
    nbdkit_pids+=("$!")
    for _ in $(seq 200); do [ -e "$run/$name.nbdkit.pid" ] && break; sleep 0.05; done
    [ -e "$run/$name.nbdkit.pid" ] || die "nbdkit ($name) did not start: $(tail -n 5 "$run/$name.nbdkit.log")"
    mkdir -p "$dir"
    nbdfuse -P "$run/$name.nbdfuse.pid" "$dir/$name" "nbd+unix:///?socket=$run/$name.sock" \
        2>"$run/$name.nbdfuse.log" &
    nbdfuse_pids+=("$!")
    mounts+=("$dir")
    for _ in $(seq 200); do
        [ -e "$run/$name.nbdfuse.pid" ] && [ "$(stat -c %s "$dir/$name" 2>/dev/null)" = "$want" ] && return 0
        sleep 0.05
    done
    die "nbdfuse did not present $name ($want bytes): $(tail -n 5 "$run/$name.nbdfuse.log")"
}

# set_rate NAME BITS: the filter re-reads its rate-file; replaced atomically, as its manual asks.
set_rate() {
    printf '%s\n' "$2" >"$run/$1.rate.new"
    mv -f "$run/$1.rate.new" "$run/$1.rate"
}

# The backing: random bytes (reads move real data), prepared by superdisk (metadata at its tail)
# before nbdkit serves it, since the FUSE file cannot grow. The members are formatted through the
# FUSE paths the daemon uses, with the test's 64 KiB stripe.
log "writing $size of random data to $run/backing.img"
head -c "$size_b" /dev/urandom >"$run/backing.img"
"$sd" create --backing "$run/backing.img" --size "$size_b" >"$run/create.log" 2>&1 \
    || die "superdisk create failed: $(cat "$run/create.log")"
truncate -s "$member_b" "$run/cache0.img" "$run/cache1.img"
start_rated backing "$run/backing.img"
start_rated cache1 "$run/cache1.img"
backing="$run/fuse-backing/backing"
member1="$run/fuse-cache1/cache1"
"$sd" create --backing "$backing" --cache "$run/cache0.img" --cache "$member1" --stripe-size 64K \
    >>"$run/create.log" 2>&1 || die "superdisk create (caches) failed: $(tail -n 5 "$run/create.log")"

# fio_job NAME ARGS...: one 4 KiB random-read job, QD4, BENCH_RUNTIME s, started in the background
# (fio_pid); fio_done waits for it.
fio_job() {
    local name="$1"
    shift
    log "fio $name ($runtime s)"
    fio --name="$name" --rw=randread --bs=4k --iodepth=4 --numjobs=1 --time_based --runtime="$runtime" \
        --lat_percentiles=1 --output-format=json "$@" >"$run/fio/$name.json" 2>"$run/fio/$name.err" &
    fio_pid=$!
}
fio_done() {
    local rc=0
    wait "$fio_pid" || rc=$?
    fio_pid=""
    [ "$rc" = 0 ] || die "fio failed: $(tail -n 5 "$run"/fio/*.err)"
}

# The devices' own figures: the backing's FUSE file at full rate, then member 1's at the slow rate
# (read only; nothing serves them yet).
fio_job device-backing --ioengine=io_uring --direct=1 --filename="$backing" --size="$size_b"
fio_done
set_rate cache1 "$slow_rate"
sleep 1
fio_job device-member1-slow --ioengine=io_uring --direct=1 --filename="$member1" --size=$((size_b / 2))
fio_done
set_rate cache1 10G

# start_sd POLICY: the daemon on the Unix socket with slow_cache_policy = POLICY; waits until the
# mirror is healthy (the first start fills the caches from the backing).
start_sd() {
    local policy="$1" cfg="$run/$1.toml"
    cat >"$cfg" <<EOF
backing = "$backing"
cache = ["$run/cache0.img", "$member1"]
direct = true
cache_direct = true
io_engine = "psync"
listen = ""
unix = "$sock"
admin_socket = "$run/admin.sock"
hedge_reads = $hedge
slow_cache_policy = "$policy"
slow_cache_factor = 4
slow_cache_min_latency_us = 300
slow_cache_window_ms = $window_ms
EOF
    "$sd" serve --config "$cfg" 2>"$run/sd-$policy.log" &
    sd_pid=$!
    for _ in $(seq 6000); do
        kill -0 "$sd_pid" 2>/dev/null || die "superdisk ($policy) exited: $(tail -n 5 "$run/sd-$policy.log")"
        if [ -S "$sock" ] && "$sd" status --json --socket "$run/admin.sock" 2>/dev/null | grep -q '"mode":"healthy"'; then
            return 0
        fi
        sleep 0.1
    done
    die "superdisk ($policy) did not become healthy in 10 min: $(tail -n 5 "$run/sd-$policy.log")"
}
stop_sd() {
    kill -TERM "$sd_pid"
    wait "$sd_pid" || die "superdisk exited with $? after SIGTERM"
    sd_pid=""
}
snapshot() { "$sd" status --json --socket "$run/admin.sock" >"$run/$1.status.json" || die "status failed"; }
log_size() { stat -c %s "$1"; }
# seen LOG MARK NEEDLE: whether LOG has NEEDLE after byte MARK.
seen() { tail -c +"$(($2 + 1))" "$1" | grep -q "$3"; }
now() { date +%s.%N; }
# trace NAME T0: appends the watch's view (status --json) with the seconds since T0 to
# $run/NAME.trace.jsonl, for reading how a state change came about.
trace() {
    local st
    st="$("$sd" status --json --socket "$run/admin.sock" 2>/dev/null)" || return 0
    printf '{"t": %s, "status": %s}\n' "$(elapsed "$2" "$(now)")" "$st" >>"$run/$1.trace.jsonl"
}
elapsed() { python3 -c 'import sys; print(f"{float(sys.argv[2]) - float(sys.argv[1]):.2f}")' "$1" "$2"; }

# Seconds from the drop to the "slower" line and from the restore to the "fast again" line
# (route), reused as the wait before phase 4 of the "off" run.
declare -A t_slow t_fast
off_wait=""

sequence() {
    local policy="$1" lg mark t0 t1 wait_s i
    lg="$run/sd-$policy.log"
    start_sd "$policy"
    log "slow_cache_policy = $policy, hedge_reads = $hedge"

    fio_job "$policy-1-normal" --ioengine=nbd --uri="$uri"
    fio_done
    snapshot "$policy-1-normal"

    mark="$(log_size "$lg")"
    t0="$(now)"
    set_rate cache1 "$slow_rate"
    fio_job "$policy-2-slow" --ioengine=nbd --uri="$uri"
    t_slow[$policy]="-"
    i=0
    while kill -0 "$fio_pid" 2>/dev/null; do
        if [ "${t_slow[$policy]}" = - ] && seen "$lg" "$mark" "cache member slower than the backing"; then
            t_slow[$policy]="$(elapsed "$t0" "$(now)")"
        fi
        [ $((i++ % 5)) != 0 ] || trace "$policy-slow" "$t0"
        sleep 0.1
    done
    fio_done
    snapshot "$policy-2-slow"
    if [ "$policy" = route ] && [ "${t_slow[$policy]}" = - ]; then
        log "no 'slower than the backing' line during phase 2; waiting up to $line_timeout s"
        for _ in $(seq $((line_timeout * 10))); do
            seen "$lg" "$mark" "cache member slower than the backing" && { t_slow[$policy]="$(elapsed "$t0" "$(now)")"; break; }
            sleep 0.1
        done
        [ "${t_slow[$policy]}" != - ] || log "warning: the slow member was never marked slow"
    fi

    fio_job "$policy-3-routed" --ioengine=nbd --uri="$uri"
    fio_done
    snapshot "$policy-3-routed"

    mark="$(log_size "$lg")"
    t1="$(now)"
    set_rate cache1 10G
    t_fast[$policy]="-"
    if [ "$policy" = route ]; then
        for i in $(seq 0 $((line_timeout * 10))); do
            seen "$lg" "$mark" "cache member is fast again" && { t_fast[$policy]="$(elapsed "$t1" "$(now)")"; break; }
            [ $((i % 5)) != 0 ] || trace "$policy-recovery" "$t1"
            sleep 0.1
        done
        [ "${t_fast[$policy]}" != - ] || log "warning: no 'fast again' line within $line_timeout s"
    else
        wait_s="${t_fast[route]:-}"
        [[ "$wait_s" =~ ^[0-9.]+$ ]] || wait_s=$((window_ms / 1000 + 1))
        off_wait="$wait_s"
        sleep "$wait_s"
    fi
    fio_job "$policy-4-recovered" --ioengine=nbd --uri="$uri"
    fio_done
    snapshot "$policy-4-recovered"
    stop_sd
}

sequence route
sequence off

# --- report ----------------------------------------------------------------------------------------

cmdline="scripts/bench-slow-cache.sh"
[ "$hedge" = false ] || cmdline+=" --hedge"
env_note=""
for v in BENCH_SIZE BENCH_RUNTIME BENCH_SLOW_RATE BENCH_WINDOW_MS; do
    [ -n "${!v:-}" ] && env_note+="$v=${!v} "
done

python3 - "$run" "$out" "$env_note$cmdline" "$loadavg_start" "$hedge" "$runtime" "$slow_rate" "$window_ms" \
    "$size" "${t_slow[route]}" "${t_fast[route]}" "${t_slow[off]}" "$off_wait" "$line_timeout" "$("$sd" --version)" "$(fio --version)" \
    "$(nbdkit --version | head -n1)" <<'EOF'
import json
import os
import platform
import sys

(run, out, cmd, load0, hedge, runtime, slow_rate, window_ms, size, slow_route, fast_route, slow_off, off_wait, limit,
 sd_ver, fio_ver, nbdkit_ver) = sys.argv[1:]


def cell(name):
    with open(os.path.join(run, "fio", name + ".json")) as f:
        text = f.read()
    # fio may print notes before the JSON document.
    r = json.loads(text[text.index("{"):])["jobs"][0]["read"]
    pct = r["lat_ns"].get("percentile", {})
    return {"iops": r["iops"], "n": r["total_ios"], "max": r["lat_ns"]["max"] / 1000,
            "p50": pct.get("50.000000", 0) / 1000, "p99": pct.get("99.000000", 0) / 1000}


def status(name):
    with open(os.path.join(run, name + ".status.json")) as f:
        j = json.load(f)
    c = j["cache"]
    m = c.get("members", [])
    return {"mode": j.get("mode", "-"), "states": "/".join(x["state"] for x in m) or "-",
            "routed": c.get("routed_reads_total", 0), "hedged": c.get("hedge", {}).get("hedged_total", 0)}


def us(v):
    return f"{v:.0f}" if v else "-"


PHASES = [("1-normal", "normal"), ("2-slow", "slow (includes time to route)"), ("3-routed", "routed"),
          ("4-recovered", "recovered")]
POLICIES = ["route", "off"]
cells = {(p, ph): cell(f"{p}-{ph}") for p in POLICIES for ph, _ in PHASES}
stats = {(p, ph): status(f"{p}-{ph}") for p in POLICIES for ph, _ in PHASES}

lines = ["| phase | route IOPS | route p50 µs | route p99 µs | route max µs | off IOPS | off p50 µs | off p99 µs | off max µs "
         "| p99 route/off |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
for ph, label in PHASES:
    r, o = cells[("route", ph)], cells[("off", ph)]
    ratio = f"{r['p99'] / o['p99']:.3g}×" if r["p99"] and o["p99"] else "-"
    lines.append(f"| {label} | {r['iops']:.0f} | {us(r['p50'])} | {us(r['p99'])} | {us(r['max'])} | "
                 f"{o['iops']:.0f} | {us(o['p50'])} | {us(o['p99'])} | {us(o['max'])} | {ratio} |")
dev_b, dev_s = cell("device-backing"), cell("device-member1-slow")
lines.append(f"| device: backing FUSE file itself (fio io_uring, O_DIRECT) | {dev_b['iops']:.0f} | {us(dev_b['p50'])} | "
             f"{us(dev_b['p99'])} | {us(dev_b['max'])} | | | | | |")
lines.append(f"| device: member 1 FUSE file at {slow_rate} (fio io_uring, O_DIRECT) | {dev_s['iops']:.0f} | "
             f"{us(dev_s['p50'])} | {us(dev_s['p99'])} | {us(dev_s['max'])} | | | | | |")
table = "\n".join(lines)

st = ["| after phase | route: mode | members | reads routed | reads hedged | off: mode | members | reads routed "
      "| reads hedged |",
      "|---|---|---|---:|---:|---|---|---:|---:|"]
for ph, label in PHASES:
    r, o = stats[("route", ph)], stats[("off", ph)]
    st.append(f"| {label.split(' ')[0]} | {r['mode']} | {r['states']} | {r['routed']} | {r['hedged']} | "
              f"{o['mode']} | {o['states']} | {o['routed']} | {o['hedged']} |")
states = "\n".join(st)

marked = (f"member 1 marked slow {slow_route} s after its rate dropped" if slow_route != "-"
          else "member 1 never marked slow")
fast = (f"fast again {fast_route} s after the rate was restored" if fast_route != "-"
        else f"no \"fast again\" line within {limit} s of the restore")
timeline = (f"route: {marked} (window {window_ms} ms; phase 2 lasts {runtime} s), {fast}. "
            f"off: {'no' if slow_off == '-' else 'a (unexpected)'} \"slower than the backing\" line; phase 4 "
            f"started {off_wait} s after the restore.")

print(table)
print()
print(states)
print()
print(timeline)

if out:
    host = f"{os.cpu_count()} CPUs, Linux {platform.release()}, load average {load0} at the start"
    doc = f"""# Slow cache member: route vs off

Produced by `{cmd}` ({sd_ver}; {fio_ver}; {nbdkit_ver}); {host}.

A {size} export. Backing: an image behind nbdkit's rate filter at 10G, presented by nbdfuse.
Cache member 0: a plain file; member 1: an image behind its own rate filter via nbdfuse, dropped to
{slow_rate} bits/s for phases 2 and 3 and restored for phase 4. 64 KiB stripes; superdisk with
O_DIRECT on every device, io_engine = "psync", hedge_reads = {hedge}, slow_cache_factor = 4,
slow_cache_min_latency_us = 300, slow_cache_window_ms = {window_ms}. fio's nbd engine on the Unix
socket: 4 KiB random reads, QD4, {runtime} s per phase (time_based). Latencies are fio's total
latency (lat_ns).

{table}

{states}

{timeline}
"""
    with open(out, "w") as f:
        f.write(doc)
    print(f"\nwrote {out}")
EOF
