#!/usr/bin/env bash
# Issue 20's benchmark: `superdisk serve --ublk` (/dev/ublkbN) beside the cache device itself and
# beside NBD over a Unix socket, side by side in one run. A script, not a test: it measures and
# reports (with the issue's goals marked met or missed); it fails only when it cannot measure.
#
#   sudo scripts/bench-ublk.sh [--backing PATH] [--cache PATH] [--runtime SECS] [--quick]
#
# Paths, each with fio (libaio, direct=1, time_based) over the first 1 GiB of the volume:
#   device     fio on the cache device (or file) itself, read only: the floor for the others;
#   ublk       one daemon, `superdisk serve` with ublk = true, on /dev/ublkbN;
#   nbd        the same daemon's Unix socket, with the kernel NBD client attached by
#              `superdisk attach` (or nbd-client -unix when this superdisk has no attach);
#   nbd-null   `nbdkit null` on a Unix socket through nbd-client: the socket path's floor
#              (skipped, with a note, when nbdkit is missing).
# Jobs: 4 KiB random read QD1 (IOPS, p50 and p99 completion latency in µs), 4 KiB random read QD32
# (IOPS), 1 MiB sequential read QD8 (MB/s). Ratios are against the device's own figure. Goals:
# ublk QD1 p50 within 10 µs of the device's, ublk QD32 IOPS at least 0.9x the device's.
#
# Before measuring, fio writes the 1 GiB range once through /dev/ublkbN (so every read comes from
# the cache), and the script waits for the cache's rebuild to finish.
#
# Options:
#   --backing PATH   the backing (block device or file), prepared by `superdisk create`
#   --cache PATH     the cache (block device or file) of that backing
#                    Without both: files in a temporary directory under ${TMPDIR:-/var/tmp}, a
#                    2 GiB volume on a backing file and a cache file of 2 GiB + 64 MiB (a cache
#                    member holds the whole volume plus its metadata), made by `superdisk create`.
#                    Given paths are used as they are: THE FIRST 1 GiB OF THE VOLUME IS OVERWRITTEN.
#   --runtime SECS   seconds per fio job (default 10; each job also ramps for 1 s first)
#   --quick          --runtime 3
#   -h, --help
#
# Environment:
#   SUPERDISK_BIN    the superdisk binary (default target/release/superdisk, built when missing)
#
# Needs root (ublk needs CAP_SYS_ADMIN), a kernel with ublk_drv (6.12+; elsewhere run it inside
# scripts/ublk-guest.sh) and nbd, fio with libaio, python3; nbd-client and nbdkit are optional.
set -euo pipefail

prog=bench-ublk
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib/common.sh
. "$here/lib/common.sh"
repo="$(cd "$here/.." && pwd)"

orig_args=("$@")
backing=""
cache=""
runtime=10
while [ $# -gt 0 ]; do
    case "$1" in
        --backing) [ $# -ge 2 ] || die "--backing needs a path"; backing="$2"; shift ;;
        --cache) [ $# -ge 2 ] || die "--cache needs a path"; cache="$2"; shift ;;
        --runtime) [ $# -ge 2 ] || die "--runtime needs seconds"; runtime="$2"; shift ;;
        --quick) runtime=3 ;;
        -h|--help) sed -n '2,37p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
    shift
done
if ! [[ "$runtime" =~ ^[0-9]+$ ]] || [ "$runtime" -lt 1 ]; then die "--runtime must be a positive whole number, got '$runtime'"; fi
if [[ ( -n "$backing" && -z "$cache" ) || ( -z "$backing" && -n "$cache" ) ]]; then
    die "--backing and --cache go together (or neither, for temporary files)"
fi

# --- the kernel first: without ublk there is nothing to measure -----------------------------------

if [ ! -e /dev/ublk-control ]; then
    modprobe ublk_drv >/dev/null 2>&1 || true
    for _ in $(seq 20); do [ -e /dev/ublk-control ] && break; sleep 0.1; done
fi
if [ ! -e /dev/ublk-control ]; then
    echo "$prog: this kernel has no ublk driver (/dev/ublk-control missing after modprobe ublk_drv); run it on a 6.12+ kernel or inside scripts/ublk-guest.sh" >&2
    exit 2
fi
[ "$(id -u)" = 0 ] || die "run as root: ublk needs CAP_SYS_ADMIN, and the NBD client attaches kernel devices"

need fio "apt-get install fio"
need python3 "apt-get install python3"
fio --enghelp=libaio >/dev/null 2>&1 || die "this fio has no libaio engine"
modprobe nbd >/dev/null 2>&1 || true
[ -e /sys/block/nbd0 ] || die "no NBD devices (/sys/block/nbd0): modprobe nbd"
have_nbdkit=false
if command -v nbdkit >/dev/null 2>&1 && nbdkit null --version >/dev/null 2>&1; then have_nbdkit=true; fi
have_nbd_client=false
command -v nbd-client >/dev/null 2>&1 && have_nbd_client=true

# The binary: SUPERDISK_BIN, else the checkout's release build (built when missing or when it
# predates ublk).
if [ -n "${SUPERDISK_BIN:-}" ]; then
    sd="$SUPERDISK_BIN"
else
    sd="$repo/target/release/superdisk"
    if [ ! -x "$sd" ] || ! "$sd" serve --help 2>/dev/null | grep -q -- --ublk; then
        need cargo "install a Rust toolchain, or set SUPERDISK_BIN to a built binary"
        log "building superdisk (cargo build --release)"
        (cd "$repo" && cargo build --release --quiet) || die "cargo build --release failed"
    fi
fi
[ -x "$sd" ] || die "superdisk binary '$sd' is missing or not executable"
"$sd" serve --help 2>/dev/null | grep -q -- --ublk || die "$sd has no ublk support (serve --ublk)"
have_attach=false
"$sd" attach --help >/dev/null 2>&1 && have_attach=true
if [ "$have_attach" = false ] && [ "$have_nbd_client" = false ]; then
    die "neither 'superdisk attach' nor nbd-client is available to attach the NBD path (apt-get install nbd-client)"
fi

# --- set-up and clean-up ---------------------------------------------------------------------------

work="$(mktemp -d "${TMPDIR:-/var/tmp}/superdisk-bench-ublk.XXXXXX")"
mkdir -p "$work/fio"
sock="$work/nbd.sock"
null_sock="$work/null.sock"
admin_sock="$work/admin.sock"
if [ "${#null_sock}" -gt 107 ] || [ "${#admin_sock}" -gt 107 ]; then
    die "socket paths under $work are longer than 107 bytes: use a shorter TMPDIR"
fi

sd_pid=""
attach_pid=""
nbdkit_pid=""
fio_pid=""
nbd_devs=()      # attached with nbd-client: detached with nbd-client -d
ok=false
cleanup() {
    local rc=$? d
    trap - EXIT
    stop_pid "$fio_pid"
    # The NBD clients first (superdisk attach was started with --detach-on-exit), then the servers.
    stop_pid "$attach_pid"
    for d in "${nbd_devs[@]}"; do nbd-client -d "$d" >/dev/null 2>&1 || true; done
    stop_pid "$nbdkit_pid"
    # SIGTERM: the daemon drains, removes /dev/ublkbN and exits; it gets 60 s before SIGKILL.
    if [ -n "$sd_pid" ]; then
        kill -TERM "$sd_pid" 2>/dev/null || true
        for _ in $(seq 600); do kill -0 "$sd_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$sd_pid" 2>/dev/null || true
        wait "$sd_pid" 2>/dev/null || true
    fi
    rm -f "$work"/*.img "$work"/*.sock
    if [ "$ok" = true ]; then
        rm -rf "$work"
    else
        echo "$prog: logs and fio output kept in $work" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

size_b=$((2 * 1024 * 1024 * 1024))
range_b=$((1024 * 1024 * 1024))
if [ -z "$backing" ]; then
    backing="$work/backing.img"
    cache="$work/cache.img"
    truncate -s "$size_b" "$backing"
    truncate -s $((size_b + 64 * 1024 * 1024)) "$cache"
    log "creating a 2 GiB volume: backing $backing, cache $cache"
    "$sd" create --backing "$backing" --size "$size_b" --cache "$cache" >"$work/create.log" 2>&1 \
        || die "superdisk create failed: $(tail -n 5 "$work/create.log")"
fi
[ -e "$backing" ] || die "backing '$backing' does not exist"
[ -e "$cache" ] || die "cache '$cache' does not exist"

cpus="$(nproc)"
queues=$((cpus < 4 ? cpus : 4))
cat >"$work/superdisk.toml" <<EOF
backing = "$backing"
cache = ["$cache"]
listen = ""
unix = "$sock"
ublk = true
ublk_queues = $queues
ublk_queue_depth = 128
admin_socket = "$admin_sock"
# fio reads the device with O_DIRECT; so does the daemon.
direct = true
cache_direct = true
EOF

fio_common=(--ioengine=libaio --direct=1 --time_based --runtime="$runtime" --ramp_time=1
    --offset=0 --size=1G --percentile_list=50:99 --output-format=json)
echo "bench-ublk: kernel $(uname -r), $cpus CPUs, $("$sd" --version 2>/dev/null || echo "superdisk $sd")"
echo "  backing $backing, cache $cache; daemon config $work/superdisk.toml (ublk_queues $queues, depth 128)"
echo "  fio ${fio_common[*]} --readonly --filename=DEV --name=JOB with"
echo "    qd1:   --rw=randread --bs=4k --iodepth=1"
echo "    qd32:  --rw=randread --bs=4k --iodepth=32"
echo "    seq:   --rw=read --bs=1M --iodepth=8"
echo

# --- the daemon: ublk and the Unix socket ----------------------------------------------------------

"$sd" serve --config "$work/superdisk.toml" >"$work/superdisk.out" 2>"$work/superdisk.log" &
sd_pid=$!
ublk_dev=""
for _ in $(seq 300); do
    kill -0 "$sd_pid" 2>/dev/null || die "superdisk serve exited during start-up: $(tail -n 5 "$work/superdisk.log")"
    ublk_dev="$(grep -oh '/dev/ublkb[0-9]\+' "$work/superdisk.out" "$work/superdisk.log" 2>/dev/null | head -n 1 || true)"
    [ -n "$ublk_dev" ] && [ -b "$ublk_dev" ] && break
    sleep 0.1
done
[[ -n "$ublk_dev" && -b "$ublk_dev" ]] \
    || die "no ublk block device within 30 s (seen: '${ublk_dev:-none}'): $(tail -n 5 "$work/superdisk.log")"
log "daemon up (pid $sd_pid): $ublk_dev and $sock"

# The read range written once through ublk: every measured read then comes from the cache.
log "writing the first 1 GiB through $ublk_dev"
fio --name=fill --filename="$ublk_dev" --ioengine=libaio --direct=1 --rw=write --bs=1M --iodepth=8 \
    --offset=0 --size="$range_b" --output-format=json >"$work/fio/fill.json" 2>"$work/fio/fill.err" \
    || die "writing through $ublk_dev failed: $(tail -n 5 "$work/fio/fill.err")"

# A cache rebuild still running would compete with the measurements.
log "waiting for the cache's rebuild to finish"
for _ in $(seq 6000); do
    grep -q "rebuild complete" "$work/superdisk.log" && break
    kill -0 "$sd_pid" 2>/dev/null || die "superdisk serve died: $(tail -n 5 "$work/superdisk.log")"
    sleep 0.1
done
grep -q "rebuild complete" "$work/superdisk.log" \
    || log "warning: no 'rebuild complete' line after 10 min; measuring anyway"

# free_nbd: an NBD device nobody uses (no size, no client pid).
free_nbd() {
    local b
    for b in /sys/block/nbd*; do
        [ -e "$b/pid" ] && continue
        [ "$(cat "$b/size")" = 0 ] || continue
        echo "/dev/${b##*/}"
        return 0
    done
    return 1
}

# nbd_client_attach SOCK EXPORT: attaches a free /dev/nbdX to SOCK with nbd-client; sets
# attached (not printed: a subshell could not record the device for the clean-up).
attached=""
nbd_client_attach() {
    local s="$1" export="$2" dev
    dev="$(free_nbd)" || die "no free /dev/nbdX (modprobe nbd nbds_max=16)"
    local args=(-unix "$s" "$dev" -b 4096)
    [ -z "$export" ] || args+=(-N "$export")
    nbd-client "${args[@]}" >"$work/nbd-client-${dev##*/}.log" 2>&1 \
        || die "nbd-client failed on $dev: $(tail -n 3 "$work/nbd-client-${dev##*/}.log")"
    nbd_devs+=("$dev")
    attached="$dev"
}

# wait_sized DEV: until the kernel shows DEV's size (the handshake is done).
wait_sized() {
    local b="/sys/block/${1##*/}/size"
    for _ in $(seq 100); do
        [ "$(cat "$b" 2>/dev/null || echo 0)" != 0 ] && return 0
        sleep 0.1
    done
    die "$1 has no size after 10 s"
}

nbd_dev=""
if [ "$have_attach" = true ]; then
    "$sd" attach --unix "$sock" --export superdisk --block-size 4096 --detach-on-exit \
        >"$work/attach.out" 2>"$work/attach.log" &
    attach_pid=$!
    for _ in $(seq 300); do
        kill -0 "$attach_pid" 2>/dev/null || die "superdisk attach exited: $(tail -n 5 "$work/attach.log")"
        nbd_dev="$(grep -o '^/dev/nbd[0-9]\+' "$work/attach.out" 2>/dev/null | head -n 1 || true)"
        [ -n "$nbd_dev" ] && break
        sleep 0.1
    done
    [ -n "$nbd_dev" ] || die "superdisk attach printed no device within 30 s: $(tail -n 5 "$work/attach.log")"
    nbd_how="superdisk attach --unix $sock"
else
    nbd_client_attach "$sock" superdisk
    nbd_dev="$attached"
    nbd_how="nbd-client -unix $sock $nbd_dev -N superdisk -b 4096"
fi
wait_sized "$nbd_dev"
log "NBD path: $nbd_dev ($nbd_how)"

null_dev=""
null_note=""
if [ "$have_nbdkit" = true ] && [ "$have_nbd_client" = true ]; then
    nbdkit -f -U "$null_sock" -P "$work/nbdkit.pid" null "$size_b" 2>"$work/nbdkit.log" &
    nbdkit_pid=$!
    for _ in $(seq 200); do [ -S "$null_sock" ] && break; sleep 0.05; done
    [ -S "$null_sock" ] || die "nbdkit null did not start: $(tail -n 5 "$work/nbdkit.log")"
    nbd_client_attach "$null_sock" ""
    null_dev="$attached"
    wait_sized "$null_dev"
    log "socket floor: nbdkit null on $null_dev"
elif [ "$have_nbdkit" = false ]; then
    null_note="nbd-null skipped: nbdkit is missing (apt-get install nbdkit)"
else
    null_note="nbd-null skipped: nbd-client is missing (apt-get install nbd-client)"
fi

# --- measurements ----------------------------------------------------------------------------------

# run_job PATH JOB DEV: one fio job; its JSON in $work/fio/PATH-JOB.json.
run_job() {
    local path="$1" job="$2" dev="$3" shape=() rc=0
    case "$job" in
        qd1) shape=(--rw=randread --bs=4k --iodepth=1) ;;
        qd32) shape=(--rw=randread --bs=4k --iodepth=32) ;;
        seq) shape=(--rw=read --bs=1M --iodepth=8) ;;
    esac
    log "fio $path $job on $dev ($runtime s)"
    fio --name="$path-$job" --filename="$dev" --readonly "${fio_common[@]}" "${shape[@]}" \
        >"$work/fio/$path-$job.json" 2>"$work/fio/$path-$job.err" &
    fio_pid=$!
    wait "$fio_pid" || rc=$?
    fio_pid=""
    [ "$rc" = 0 ] || die "fio $path $job failed: $(tail -n 5 "$work/fio/$path-$job.err")"
}

paths=(device ublk nbd)
declare -A dev_of=([device]="$cache" [ublk]="$ublk_dev" [nbd]="$nbd_dev")
if [ -n "$null_dev" ]; then paths+=(nbd-null); dev_of[nbd-null]="$null_dev"; fi
for job in qd1 qd32 seq; do
    for p in "${paths[@]}"; do run_job "$p" "$job" "${dev_of[$p]}"; done
done

# --- the table -------------------------------------------------------------------------------------

echo
python3 - "$work/fio" "${paths[@]}" <<'PY'
import json, os, sys

fio_dir, paths = sys.argv[1], sys.argv[2:]

def job(path, name):
    with open(os.path.join(fio_dir, f"{path}-{name}.json")) as f:
        text = f.read()
    # fio may print notes before the JSON document.
    return json.loads(text[text.index("{"):])["jobs"][0]["read"]

fig = {}
for p in paths:
    q1, q32, seq = job(p, "qd1"), job(p, "qd32"), job(p, "seq")
    pct = q1["clat_ns"].get("percentile", {})
    fig[p] = {
        "qd1_p50": pct.get("50.000000", 0) / 1000,
        "qd1_p99": pct.get("99.000000", 0) / 1000,
        "qd1_iops": q1["iops"],
        "qd32_iops": q32["iops"],
        "seq_mbs": seq["bw_bytes"] / 1e6,
    }

rows = [("4K randread QD1 p50 (µs)", "qd1_p50", "{:.1f}"),
        ("4K randread QD1 p99 (µs)", "qd1_p99", "{:.1f}"),
        ("4K randread QD1 IOPS", "qd1_iops", "{:.0f}"),
        ("4K randread QD32 IOPS", "qd32_iops", "{:.0f}"),
        ("1M seqread QD8 MB/s", "seq_mbs", "{:.0f}")]
ratio_cols = [p for p in ("ublk", "nbd") if p in paths]
head = ["figure"] + paths + [f"{p}/device" for p in ratio_cols]
table = []
for label, key, f in rows:
    dev = fig["device"][key]
    line = [label] + [f.format(fig[p][key]) for p in paths]
    line += ["{:.2f}x".format(fig[p][key] / dev) if dev else "-" for p in ratio_cols]
    table.append(line)
widths = [max(len(r[i]) for r in [head] + table) for i in range(len(head))]
fmt = lambda r: "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))
print(fmt(head))
print("  ".join("-" * w for w in widths))
for r in table:
    print(fmt(r))
print()

d, u = fig["device"], fig["ublk"]
gap = u["qd1_p50"] - d["qd1_p50"]
print("Goals (issue 20):")
print("  ublk QD1 p50 within 10 µs of the device's: {:.1f} vs {:.1f} µs ({:+.1f} µs): {}".format(
    u["qd1_p50"], d["qd1_p50"], gap, "met" if gap <= 10 else "MISSED"))
r = u["qd32_iops"] / d["qd32_iops"] if d["qd32_iops"] else 0
print("  ublk QD32 IOPS >= 0.9x the device's: {:.0f} vs {:.0f} ({:.2f}x): {}".format(
    u["qd32_iops"], d["qd32_iops"], r, "met" if r >= 0.9 else "MISSED"))
PY
[ -z "$null_note" ] || echo "Note: $null_note"
echo
reproduce="$(printf '%q ' "$here/bench-ublk.sh" "${orig_args[@]}")"
if [ -n "${SUPERDISK_BIN:-}" ]; then reproduce="SUPERDISK_BIN=$(printf '%q' "$(realpath "$SUPERDISK_BIN")") $reproduce"; fi
echo "Reproduce: sudo ${reproduce% }"
ok=true
