#!/usr/bin/env bash
# Soak: 64 NBD connections of verified fio I/O against superdisk with a cache, through a cache
# failure and a daemon restart, with the daemon's memory sampled every second. See docs/SOAK.md.
#
#   scripts/soak.sh [--duration SECS] [--bin PATH] [--unit-mib N] [--rss-limit-mib N]
#                   [--dir DIR] [--keep] [-h|--help]
#
#   --duration SECS      time for the I/O phases (default 600); rebuild waits and checks come on top
#   --bin PATH           the superdisk binary (default target/release/superdisk, else target/debug)
#   --unit-mib N         range of each 4 KiB writer; the export is 128 units (default 4)
#   --rss-limit-mib N    fail if the daemon's peak RSS (VmHWM) exceeds this (default 1024)
#   --dir DIR            work directory (images, logs); default a new temp dir, removed at the end
#   --keep               keep the work directory
#
# Phases (each fio run: 64 jobs, one NBD connection each, every writer on a range of its own):
#   1. write+verify rounds (new seed each round) for 55% of the duration; half-way, `superdisk
#      cache fail`: no client may see an error, and status must say degraded. Then `cache add`
#      with the rebuild throttled, SIGTERM in the middle of the rebuild (exit status 0), start
#      again with the cache.
#   2. verify-only of phase 1's last round (same seeds, offsets) while the cache rebuilds, then
#      more write+verify rounds for the other 45%.
#   3. wait for healthy, verify-only of phase 2's last round, `superdisk verify --socket --wait`,
#      SIGTERM, offline `superdisk verify --backing --cache`.
# Prints a summary ending in `RESULT: PASS` or `RESULT: FAIL (reason)`; exit status 0 only on PASS.
set -euo pipefail

usage() {
    sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

duration=600
bin=""
unit_mib=4
rss_limit_mib=1024
dir=""
keep=0
while [ $# -gt 0 ]; do
    case "$1" in
    --duration) duration="${2:?}"; shift 2 ;;
    --bin) bin="${2:?}"; shift 2 ;;
    --unit-mib) unit_mib="${2:?}"; shift 2 ;;
    --rss-limit-mib) rss_limit_mib="${2:?}"; shift 2 ;;
    --dir) dir="${2:?}"; shift 2 ;;
    --keep) keep=1; shift ;;
    -h | --help) usage ;;
    *) echo "soak: unknown argument $1" >&2; usage 2 ;;
    esac
done

root="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "$bin" ]; then
    bin="$root/target/release/superdisk"
    [ -x "$bin" ] || bin="$root/target/debug/superdisk"
fi
[ -x "$bin" ] || { echo "soak: no superdisk binary at $bin (cargo build first, or --bin)" >&2; exit 2; }
for tool in fio python3; do
    command -v "$tool" >/dev/null || { echo "soak: $tool is not installed (apt-get install $tool)" >&2; exit 2; }
done
fio --enghelp=nbd >/dev/null 2>&1 || { echo "soak: this fio has no nbd engine" >&2; exit 2; }

if [ -z "$dir" ]; then
    dir=$(mktemp -d "${TMPDIR:-/tmp}/superdisk-soak.XXXXXX")
else
    mkdir -p "$dir"
    keep=1 # the caller owns it
fi
backing="$dir/backing.img"
cache="$dir/cache.img"
admin="$dir/admin.sock"
log="$dir/daemon.log"
export_bytes=$((128 * unit_mib << 20))
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
uri="nbd://127.0.0.1:$port/superdisk"

daemon_pid=""
sampler_pid=""
failer_pid=""
result="FAIL (interrupted)"
summary=()

say() { echo "soak: $*" >&2; }
note() { summary+=("$*"); say "$*"; }

cleanup() {
    local rc=$?
    for p in "$failer_pid" "$sampler_pid"; do
        if [ -n "$p" ]; then kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; fi
    done
    if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill -TERM "$daemon_pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$daemon_pid" 2>/dev/null || true
    fi
    if [ "$keep" = 0 ]; then rm -rf "$dir"; else say "work directory kept: $dir"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() {
    result="FAIL ($*)"
    print_summary
    if [ -f "$log" ]; then
        say "last daemon log lines:"
        tail -n 30 "$log" >&2
    fi
    exit 1
}

print_summary() {
    echo "==== soak summary"
    local l
    for l in "${summary[@]}"; do echo "$l"; done
    if [ -s "$dir/rss.log" ]; then
        awk -v limit="$rss_limit_mib" '{ if ($4 > hwm) hwm = $4; if ($3 > rss) rss = $3 }
            END { printf "memory: peak_rss_mib=%d (VmHWM; sampled VmRSS max %d) bound_mib=%d\n", hwm / 1024, rss / 1024, limit }' \
            "$dir/rss.log"
    fi
    echo "RESULT: $result"
}

sd() { "$bin" "$@"; }

start_daemon() {
    echo "---- start $(date +%T)" >>"$log"
    rm -f "$admin"
    "$bin" serve --backing "$backing" --cache "$cache" --listen "127.0.0.1:$port" --admin-socket "$admin" \
        --log-level info 2>>"$log" >/dev/null &
    daemon_pid=$!
    echo "$daemon_pid" >"$dir/daemon.pid"
    for _ in $(seq 300); do
        if [ -S "$admin" ] && sd status --socket "$admin" >/dev/null 2>&1; then return 0; fi
        kill -0 "$daemon_pid" 2>/dev/null || fail "the daemon exited at start-up"
        sleep 0.1
    done
    fail "the daemon did not come up within 30 s"
}

# SIGTERM and wait; the exit status goes to $stop_rc (not a subshell: the daemon is our child).
stop_daemon() {
    kill -TERM "$daemon_pid"
    stop_rc=0
    wait "$daemon_pid" || stop_rc=$?
    daemon_pid=""
    rm -f "$dir/daemon.pid"
}

mode() {
    sd status --socket "$admin" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["mode"])'
}

wait_mode() {
    local want="$1" limit_s="$2" m=""
    local deadline=$((SECONDS + limit_s))
    while [ $SECONDS -lt $deadline ]; do
        m=$(mode) || m="?"
        [ "$m" = "$want" ] && return 0
        sleep 0.5
    done
    fail "mode is '$m', not '$want', after ${limit_s}s"
}

# Samples the serving daemon's VmRSS and VmHWM (KiB) once a second: "epoch pid rss hwm".
sample_memory() {
    while true; do
        local pid
        pid=$(cat "$dir/daemon.pid" 2>/dev/null || true)
        if [ -n "$pid" ] && [ -r "/proc/$pid/status" ]; then
            awk -v t="$(date +%s)" -v pid="$pid" '/^VmRSS:/ { r = $2 } /^VmHWM:/ { h = $2 }
                END { if (r != "") print t, pid, r, h }' "/proc/$pid/status" >>"$dir/rss.log" 2>/dev/null || true
        fi
        sleep 1
    done
}

# One fio job file: 64 jobs, each its own connection. Writers own disjoint ranges and verify what
# they write (verify_backlog interleaves verifying reads with the writes, so every writer's
# connection carries a read/write mix); readers read anywhere, unverified, as extra load.
# Layout in units of U MiB: 24 x 4 KiB writers of 1U, 16 x 64 KiB writers of 2U, 8 x 1 MiB writers
# of 8U (120U written in all), 16 readers over the same 120U.
write_job() {
    local file="$1" seed="$2" verify_only="$3" u="$unit_mib"
    cat >"$file" <<EOF
[global]
ioengine=nbd
uri=$uri
thread=1
randseed=$seed
verify_fatal=1
# fio would otherwise leave a local-*-verify.state file per job in its working directory.
verify_state_save=0
group_reporting=0
[w4k]
rw=randwrite
bs=4k
iodepth=16
numjobs=24
size=${u}M
offset=0
offset_increment=${u}M
verify=crc32c
verify_backlog=64
verify_only=$verify_only
[w64k]
rw=randwrite
bs=64k
iodepth=8
numjobs=16
size=$((2 * u))M
offset=$((24 * u))M
offset_increment=$((2 * u))M
verify=crc32c
verify_backlog=16
verify_only=$verify_only
[w1m]
rw=randwrite
bs=1M
iodepth=4
numjobs=8
size=$((8 * u))M
offset=$((56 * u))M
offset_increment=$((8 * u))M
verify=crc32c
verify_backlog=4
verify_only=$verify_only
[readers]
rw=randread
bssplit=4k/50:64k/30:1M/20
iodepth=8
numjobs=16
size=$((120 * u))M
offset=0
io_size=$((8 * u))M
EOF
}

# Phase counters: ios, bytes, seconds, rounds, errors.
declare -A ios bytes secs rounds errs

# run_round PHASE SEED VERIFY_ONLY: one fio run; any job error or fio failure fails the soak.
run_round() {
    local phase="$1" seed="$2" vonly="$3" job="$dir/round.fio" out="$dir/round.json"
    write_job "$job" "$seed" "$vonly"
    touch "$dir/round.running"
    local t0=$SECONDS rc=0
    fio --output-format=json --output="$out" "$job" >"$dir/fio.stderr" 2>&1 || rc=$?
    rm -f "$dir/round.running"
    local stats
    # The nbd engine prints its connect messages into the output file ahead of the JSON.
    stats=$(python3 - "$out" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
d = json.loads(text[text.index("{"):])
jobs = d["jobs"]
ios = sum(j[k]["total_ios"] for j in jobs for k in ("read", "write"))
nbytes = sum(j[k]["io_bytes"] for j in jobs for k in ("read", "write"))
errs = sum(1 for j in jobs if j["error"] != 0)
print(ios, nbytes, errs, len(jobs))
EOF
    ) || stats="0 0 1 0"
    read -r n b e njobs <<<"$stats"
    local dt=$((SECONDS - t0))
    ios[$phase]=$((${ios[$phase]:-0} + n))
    bytes[$phase]=$((${bytes[$phase]:-0} + b))
    secs[$phase]=$((${secs[$phase]:-0} + dt))
    rounds[$phase]=$((${rounds[$phase]:-0} + 1))
    errs[$phase]=$((${errs[$phase]:-0} + e))
    say "$phase round seed=$seed verify_only=$vonly: $njobs jobs, $n I/Os, $((b >> 20)) MiB in ${dt}s, job errors $e, fio exit $rc"
    if [ "$rc" != 0 ] || [ "$e" != 0 ] || [ "$njobs" != 64 ]; then
        tail -n 20 "$dir/fio.stderr" >&2
        fail "$phase: fio round (seed $seed, verify_only=$vonly) failed: exit $rc, $e job errors, $njobs jobs"
    fi
}

phase_line() {
    local p="$1" s="${secs[$1]:-0}"
    [ "$s" -gt 0 ] || s=1
    note "$p: rounds=${rounds[$p]:-0} seconds=${secs[$p]:-0} ios=${ios[$p]:-0} iops=$((${ios[$p]:-0} / s))" \
        "mib=$((${bytes[$p]:-0} >> 20)) mib_per_s=$(((${bytes[$p]:-0} >> 20) / s)) errors=${errs[$p]:-0}"
}

# ---- set-up
truncate -s $((export_bytes + (64 << 20))) "$cache"
sd create --backing "$backing" --size "$export_bytes" --cache "$cache" >>"$log" 2>&1 || fail "create failed"
note "setup: export_mib=$((export_bytes >> 20)) connections=64 duration_s=$duration bin=$bin"
start_daemon
sample_memory &
sampler_pid=$!
wait_mode healthy 60

p1_s=$((duration * 55 / 100))
p2_s=$((duration - p1_s))
seed=1000

# ---- phase 1: write+verify; the cache fails half-way
(
    sleep $((p1_s / 2))
    during="between-rounds"
    [ -e "$dir/round.running" ] && during="during-a-round"
    if sd cache --socket "$admin" fail >>"$log" 2>&1; then
        echo "ok $during $(mode)" >"$dir/cachefail.tmp"
    else
        echo "error - -" >"$dir/cachefail.tmp"
    fi
    mv "$dir/cachefail.tmp" "$dir/cachefail.result"
) &
failer_pid=$!
phase_end=$((SECONDS + p1_s))
while :; do
    seed=$((seed + 1))
    run_round phase1 "$seed" 0
    # Rounds go on until the phase's time is up and the cache has failed under them.
    if [ $SECONDS -ge $phase_end ] && [ -e "$dir/cachefail.result" ]; then break; fi
done
wait "$failer_pid" || true
failer_pid=""
read -r cf_status cf_when cf_mode <"$dir/cachefail.result"
[ "$cf_status" = ok ] || fail "superdisk cache fail did not succeed"
phase_line phase1
note "cache_fail: ok when=$cf_when mode_after=$cf_mode client_errors=${errs[phase1]}"
[ "$cf_mode" = degraded ] || fail "mode after cache fail is '$cf_mode', not degraded"
[ "$(mode)" = degraded ] || fail "mode is not degraded after phase 1"
last_p1_seed=$seed

# ---- the cache comes back; the daemon restarts in the middle of its rebuild
sd rebuild --socket "$admin" rate 1M 1M >>"$log" 2>&1 || fail "rebuild rate failed"
sd cache --socket "$admin" add "$cache" >>"$log" 2>&1 || fail "cache add failed"
m=$(mode)
[ "$m" = rebuilding ] || fail "mode after cache add is '$m', not rebuilding"
stop_daemon
[ "$stop_rc" = 0 ] || fail "the daemon exited $stop_rc on SIGTERM during the rebuild"
start_daemon
m=$(mode)
note "restart: sigterm_exit=0 mode_after_cache_add=rebuilding mode_after_restart=$m"
[ "$m" = rebuilding ] || [ "$m" = healthy ] || fail "mode after restart is '$m'"

# ---- phase 2: phase 1's data is intact; more writes while the cache rebuilds
run_round phase2-verify "$last_p1_seed" 1
note "phase2_verify: verify_only of phase 1 (seed $last_p1_seed) after the restart (mode at its start: $m): ok"
phase_end=$((SECONDS + p2_s))
while :; do
    seed=$((seed + 1))
    run_round phase2 "$seed" 0
    [ $SECONDS -lt $phase_end ] || break
done
phase_line phase2

# ---- phase 3: rebuilt, everything verified from the cache, online and offline
t0=$SECONDS
wait_mode healthy 600
note "rebuild: healthy after $((SECONDS - t0))s more"
run_round phase3-verify "$seed" 1
note "phase3_verify: verify_only of phase 2 (seed $seed) on the rebuilt cache: ok"
online=$(sd verify --socket "$admin" --wait 2>&1 | tail -n 1) || fail "online verify failed: $online"
echo "$online" | grep -q " 0 mismatches" || fail "online verify: $online"
note "online_verify: clean ($online)"
stop_daemon
[ "$stop_rc" = 0 ] || fail "the daemon exited $stop_rc on SIGTERM at the end"
kill "$sampler_pid" 2>/dev/null || true
wait "$sampler_pid" 2>/dev/null || true
sampler_pid=""
offline=$(sd verify --backing "$backing" --cache "$cache" 2>&1 | tail -n 1) || fail "offline verify failed: $offline"
note "offline_verify: clean ($offline)"

hwm_kib=$(awk '{ if ($4 > h) h = $4 } END { print h + 0 }' "$dir/rss.log")
[ "$hwm_kib" -gt 0 ] || fail "no memory samples"
[ $((hwm_kib >> 10)) -le "$rss_limit_mib" ] || fail "peak RSS $((hwm_kib >> 10)) MiB is over the ${rss_limit_mib} MiB bound"
result=PASS
print_summary
