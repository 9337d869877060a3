#!/usr/bin/env bash
# Benchmark superdisk against qemu-nbd, nbdkit (file plugin) and `nbdkit null` with fio's nbd engine.
# A script, not a test: it asserts nothing about speed, it measures and reports.
#
#   scripts/bench.sh [--path direct|buffered] [--quick] [--workloads "read-1m-qd8 …"] [--out DIR]
#                    [--servers "…"]
#
# --path direct (the default) is the production path: the client on a Unix socket, both devices
# (image and cache) opened O_DIRECT. Servers, all by default:
#   device            no server: fio's io_uring engine, O_DIRECT, on its own copy of the image, the
#                     same workloads; the device floor (it has no server CPU)
#   nbdkit-null       no I/O: the floor that fio's nbd engine, libnbd and the socket set
#   superdisk         --direct true;  superdisk-mirror: also a cache file, --cache-direct true
#   qemu-nbd          --cache=none --aio=io_uring; every ratio is relative to it, so it must run
#   nbdkit-file       cache=none: nbdkit 1.32's file plugin has no O_DIRECT, this is its closest
# The report adds superdisk's ratio to each of them and checks it against the project's goals
# (reported as met / not met, never asserted). BENCH_DIR must take O_DIRECT (checked at start);
# the default is on the local disk. BENCH_DIR=/dev/shm/superdisk-bench-direct puts the images on
# tmpfs (O_DIRECT there needs Linux 6.6+): a near-zero-latency device, so the figures are the
# servers' own overhead; it needs memory for six images (6 GiB at the default size). On a disk the
# page cache is dropped before each cell (not on tmpfs, where the pages are the data).
#
# --path buffered: TCP loopback, page cache warm, servers superdisk superdisk-mirror nbdkit-file
# nbdkit-file-cache qemu-nbd nbdkit-null, every ratio relative to nbdkit-file.
# `superdisk` serves the image alone (no cache); `superdisk-mirror` serves it with a cache file that is
# fully rebuilt before measuring, so its reads come from the cache and its writes go to both files.
# `nbdkit-file-cache` is nbdkit's file plugin under its cache filter with cache=writethrough: every
# write goes to a cache file and to the image, the same two page-cache writes superdisk-mirror makes,
# so it is the like-for-like peer for superdisk-mirror's writes (nbdkit-file writes one file).
#
# Every workload is run round-robin over every server, BENCH_REPS times, and the median is reported, so
# that background noise on the machine lands on all servers alike rather than on whichever ran last.
#
# Environment:
#   BENCH_DIR       where images and raw fio output go          (default /var/tmp/superdisk-bench-direct;
#                   /tmp/superdisk-bench with --path buffered)
#   BENCH_SIZE      image size, bytes or with K/M/G suffix       (default 1G; 256M with --quick)
#   BENCH_RUNTIME   measured seconds per cell                     (default 10; 2 with --quick)
#   BENCH_RAMP      fio ramp seconds per cell, not measured       (default 2; 1 with --quick)
#   BENCH_REPS      repetitions per cell, median reported         (default 3; 1 with --quick)
#   SUPERDISK       superdisk binary; when unset the script runs `cargo build --release` and uses
#                   target/release/superdisk
#   SUPERDISK_ARGS  extra arguments for `superdisk serve`         (default none)
#   SUPERDISK_MIRROR_ARGS  extra arguments for superdisk-mirror   (default none; e.g. on the buffered
#                   path "--cache-direct true" for a cache written with O_DIRECT, as a block-device SSD is)
#
# Outputs: the tables on stdout; for a full run docs/bench/NAME.{md,svg,json}, NAME being direct,
# direct-tmpfs (BENCH_DIR on tmpfs) or latest (--path buffered). A --quick run is a smoke run and
# writes next to its raw data in BENCH_DIR instead, so it never overwrites recorded figures;
# --out DIR sends either kind elsewhere.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
# shellcheck source=scripts/lib/common.sh
. "$here/lib/common.sh"
# shellcheck source=scripts/lib/servers.sh
. "$here/lib/servers.sh"

quick=0
bench_path=direct
servers=""
only_workloads=""
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --path) [ $# -ge 2 ] || die "--path needs direct or buffered"; bench_path="$2"; shift ;;
        --servers) [ $# -ge 2 ] || die "--servers needs a list"; servers="$2"; shift ;;
        --workloads) [ $# -ge 2 ] || die "--workloads needs a list"; only_workloads="$2"; shift ;;
        --out) [ $# -ge 2 ] || die "--out needs a directory"; out="$2"; shift ;;
        # The help is the comment block at the top, up to its first line that is not a comment.
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
    shift
done

case "$bench_path" in
    direct) default_servers="$known_direct_servers"; default_dir=/var/tmp/superdisk-bench-direct ;;
    buffered) default_servers="$known_servers"; default_dir=/tmp/superdisk-bench ;;
    *) die "--path must be direct or buffered, got '$bench_path'" ;;
esac
servers="${servers:-$default_servers}"

if [ "$quick" = 1 ]; then
    size="${BENCH_SIZE:-256M}"; runtime="${BENCH_RUNTIME:-2}"; ramp="${BENCH_RAMP:-1}"; reps="${BENCH_REPS:-1}"
else
    size="${BENCH_SIZE:-1G}"; runtime="${BENCH_RUNTIME:-10}"; ramp="${BENCH_RAMP:-2}"; reps="${BENCH_REPS:-3}"
fi
bench_dir="${BENCH_DIR:-$default_dir}"

for v in runtime ramp reps; do
    [[ "${!v}" =~ ^[0-9]+$ ]] && [ "${!v}" -ge 0 ] || die "BENCH_${v^^} must be a whole number, got '${!v}'"
done
[ "$runtime" -ge 1 ] || die "BENCH_RUNTIME must be at least 1"
[ "$reps" -ge 1 ] || die "BENCH_REPS must be at least 1"

size_b="$(size_bytes "$size")"
# 1 MiB sequential cells need room to run; below that the "disk" is mostly cache-line noise.
[ "$size_b" -ge $((16 * 1024 * 1024)) ] || die "BENCH_SIZE must be at least 16M"
[ $((size_b % 4096)) = 0 ] || die "BENCH_SIZE must be a multiple of 4096"

# --- tools -----------------------------------------------------------------------------------------

bench_check_tools

# Other work on the machine skews every figure; record how busy it was before our own build and load.
loadavg_start="$(cut -d' ' -f1-3 /proc/loadavg)"
awk '{ exit !($1 > 1.0) }' /proc/loadavg \
    && log "warning: load average is $loadavg_start before we start; figures will be noisy"

rev="$(bench_revision)"
bench_superdisk_bin

# --- images ----------------------------------------------------------------------------------------

# The direct path measures O_DIRECT; on a filesystem that refuses it (tmpfs before Linux 6.6, some
# overlay filesystems) every server would fail at its first request instead, less clearly.
check_direct_dir() {
    mkdir -p "$1"
    if ! dd if=/dev/zero of="$1/probe" bs=4096 count=1 oflag=direct status=none 2>/dev/null; then
        rm -f "$1/probe"
        die "$1 ($(stat -f -c %T "$1")) does not take O_DIRECT: point BENCH_DIR at a local disk's" \
            "filesystem, or at tmpfs (/dev/shm/...) on Linux 6.6 or later"
    fi
    rm -f "$1/probe"
}

# The report's file name, and a description of the device for its text.
out_name=latest
storage=""
if [ "$bench_path" = direct ]; then
    check_direct_dir "$bench_dir"
    out_name=direct
    [ "$(stat -f -c %T "$bench_dir")" != tmpfs ] || out_name=direct-tmpfs
    storage="$(findmnt -n -o FSTYPE,SOURCE -T "$bench_dir" 2>/dev/null | awk '{ print $1 " on " $2 }')"
    storage="${storage:-$(stat -f -c %T "$bench_dir")} at $bench_dir"
fi

run_dir="$bench_dir/run-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$run_dir/fio"
[ -n "$out" ] || { if [ "$quick" = 1 ]; then out="$run_dir"; else out="$repo/docs/bench"; fi; }

bench_traps
bench_make_images
bench_start_all

# --- measurement -----------------------------------------------------------------------------------

# Re-reads the server's files before each of its cells: the table promises a warm page cache, and
# some VMs page out file pages that sit idle (DAMON's proactive reclaim, on the machine in
# docs/PERFORMANCE.md's "The machines"), so an image that waited out the other servers' cells
# could start its cell with pieces on disk; at QD1 each such read costs a disk round trip. Files
# already in memory take a fraction of a second. The mirror's cache file is warmed without
# readahead, as after its rebuild.
# The direct path wants the opposite, a cold page cache: O_DIRECT servers never use it, but nbdkit
# file (buffered, cache=none) would find pages left by the copy or by its own earlier cells.
warm_images() {
    if [ "$bench_path" = direct ]; then
        [ "$1" = nbdkit-null ] || bench_evict "$run_dir/$1".*img
        return
    fi
    case "$1" in
        nbdkit-null) ;;
        superdisk-mirror)
            cat "$run_dir/superdisk-mirror.img" >/dev/null
            bench_warm_without_readahead "$run_dir/superdisk-mirror.cache.img"
            ;;
        *) cat "$run_dir/$1.img" >/dev/null ;;
    esac
}

workloads=(
    "randread-4k-qd1 randread 4k 1"
    "randread-4k-qd32 randread 4k 32"
    "randwrite-4k-qd1 randwrite 4k 1"
    "randwrite-4k-qd32 randwrite 4k 32"
    "read-1m-qd8 read 1m 8"
    "write-1m-qd8 write 1m 8"
)
if [ -n "$only_workloads" ]; then
    kept=()
    for w in "${workloads[@]}"; do [[ " $only_workloads " == *" ${w%% *} "* ]] && kept+=("$w"); done
    [ "${#kept[@]}" -gt 0 ] || die "--workloads matched none of: ${workloads[*]%% *}"
    workloads=("${kept[@]}")
fi
# run_cell SERVER NAME RW BS QD JSON: one fio run into JSON; sets `ticks` to the server's CPU ticks
# over the measured window, "-" for the device, which has no server (fio's own CPU is in JSON).
run_cell() {
    local s="$1" name="$2" json="$6"
    local args=(--name="$name" --rw="$3" --bs="$4" --iodepth="$5" --numjobs=1 --time_based
        --runtime="$runtime" --ramp_time="$ramp" --lat_percentiles=1 --output-format=json)
    if [ "$s" = device ]; then
        # The device floor: the servers' workload issued by fio itself, as a server would issue it.
        "$fio" "${args[@]}" --ioengine=io_uring --direct=1 --filename="${uri_of[$s]}" >"$json" 2>"$json.err" &
        fio_pid=$!
        wait "$fio_pid" || die "fio failed on the device ($name): $(tail -n 5 "$json.err")"
        fio_pid=""
        ticks="-"
        return
    fi
    kill -0 "${pid_of[$s]}" 2>/dev/null || die "$s died: $(tail -n 5 "$run_dir/$s.log")"
    "$fio" "${args[@]}" --ioengine=nbd --uri="${uri_of[$s]}" >"$json" 2>"$json.err" &
    fio_pid=$!
    bench_open_window "$s" "$json" 1 "$name"
    wait "$fio_pid" || die "fio failed on $s ($name): $(tail -n 5 "$json.err")"
    c1="$(cpu_ticks "${pid_of[$s]}")"
    fio_pid=""
    ticks=$((c1 - c0))
}

read -r -a server_list <<<"$servers"
nserv=${#server_list[@]}
results="$run_dir/results.tsv"
printf 'workload\tserver\trep\tcpu_ticks\tfio_json\n' >"$results"

total=$(( ${#workloads[@]} * reps * nserv ))
cell=0
log "$total cells of ${runtime}s (+${ramp}s ramp) each; raw output in $run_dir"
for w in "${workloads[@]}"; do
    read -r name rw bs qd <<<"$w"
    for rep in $(seq 1 "$reps"); do
        # Rotate the starting server each repetition so that no server always runs right after the
        # same neighbour (whose dirty pages or warm caches it would inherit).
        for i in $(seq 0 $((nserv - 1))); do
            s="${server_list[$(( (i + rep - 1) % nserv ))]}"
            cell=$((cell + 1))
            json="$run_dir/fio/$name.$s.$rep.json"
            # Dirty pages left by the previous write cell would be written back during this one.
            sync
            warm_images "$s"
            run_cell "$s" "$name" "$rw" "$bs" "$qd" "$json"
            printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$s" "$rep" "$ticks" "$json" >>"$results"
            log "[$cell/$total] $name $s rep $rep done"
        done
    done
done

# --- report ----------------------------------------------------------------------------------------

cmdline="scripts/bench.sh --path $bench_path"
[ "$quick" = 1 ] && cmdline+=" --quick"
[ "$servers" = "$default_servers" ] || cmdline+=" --servers \"$servers\""
[ -z "$only_workloads" ] || cmdline+=" --workloads \"$only_workloads\""
[ "$out" = "$repo/docs/bench" ] || cmdline+=" --out $out"
env_note=""
for v in BENCH_DIR BENCH_SIZE BENCH_RUNTIME BENCH_RAMP BENCH_REPS SUPERDISK SUPERDISK_ARGS SUPERDISK_MIRROR_ARGS; do
    [ -n "${!v:-}" ] && env_note+="$v=${!v} "
done

mkdir -p "$out"
python3 "$here/bench_report.py" \
    --results "$results" --out "$out" --servers "$servers" \
    --size "$size_b" --runtime "$runtime" --ramp "$ramp" --reps "$reps" \
    --clk-tck "$(getconf CLK_TCK)" --command "$env_note$cmdline" \
    --superdisk-args "${SUPERDISK_ARGS:-}" --loadavg "$loadavg_start" \
    --revision "$rev" --path "$bench_path" --baseline "$(bench_baseline)" --out-name "$out_name" \
    --storage "$storage"
log "wrote $out/$out_name.md, $out/$out_name.svg and $out/$out_name.json"
