#!/usr/bin/env bash
# Benchmark superdisk against nbdkit (file plugin), qemu-nbd and `nbdkit null` with fio's nbd engine
# over loopback. A script, not a test: it asserts nothing about speed, it measures and reports.
#
#   scripts/bench.sh [--quick] [--workloads "read-1m-qd8 …"] [--out DIR]
#                    [--servers "superdisk superdisk-mirror nbdkit-file nbdkit-file-cache qemu-nbd nbdkit-null"]
#
# `superdisk` serves the image alone (no cache); `superdisk-mirror` serves it with a cache file that is
# fully rebuilt before measuring, so its reads come from the cache and its writes go to both files.
# `nbdkit-file-cache` is nbdkit's file plugin under its cache filter with cache=writethrough: every
# write goes to a cache file and to the image, the same two page-cache writes superdisk-mirror makes,
# so it is the like-for-like peer for superdisk-mirror's writes (nbdkit-file writes one file).
# Every workload is run round-robin over every server, BENCH_REPS times, and the median is reported, so
# that background noise on the machine lands on all servers alike rather than on whichever ran last.
#
# Environment:
#   BENCH_DIR       where images and raw fio output go          (default /tmp/superdisk-bench)
#   BENCH_SIZE      image size, bytes or with K/M/G suffix       (default 1G; 256M with --quick)
#   BENCH_RUNTIME   measured seconds per cell                     (default 10; 2 with --quick)
#   BENCH_RAMP      fio ramp seconds per cell, not measured       (default 2; 1 with --quick)
#   BENCH_REPS      repetitions per cell, median reported         (default 3; 1 with --quick)
#   SUPERDISK       superdisk binary; when unset the script runs `cargo build --release` and uses
#                   target/release/superdisk
#   SUPERDISK_ARGS  extra arguments for `superdisk serve`         (default none)
#   SUPERDISK_MIRROR_ARGS  extra arguments for superdisk-mirror   (default none; e.g.
#                   "--cache-direct true" for a cache written with O_DIRECT, as a block-device SSD is)
#
# Outputs: the table on stdout; docs/bench/latest.{md,svg,json} for a full run. A --quick run is a smoke
# run and writes next to its raw data in BENCH_DIR instead, so it never overwrites recorded figures;
# --out DIR sends either kind elsewhere.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
# shellcheck source=scripts/lib/common.sh
. "$here/lib/common.sh"
# shellcheck source=scripts/lib/superdisk-images.sh
. "$here/lib/superdisk-images.sh"


quick=0
default_servers="superdisk superdisk-mirror nbdkit-file nbdkit-file-cache qemu-nbd nbdkit-null"
servers="$default_servers"
only_workloads=""
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --servers) [ $# -ge 2 ] || die "--servers needs a list"; servers="$2"; shift ;;
        --workloads) [ $# -ge 2 ] || die "--workloads needs a list"; only_workloads="$2"; shift ;;
        --out) [ $# -ge 2 ] || die "--out needs a directory"; out="$2"; shift ;;
        -h|--help) sed -n '2,30p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
    shift
done

if [ "$quick" = 1 ]; then
    size="${BENCH_SIZE:-256M}"; runtime="${BENCH_RUNTIME:-2}"; ramp="${BENCH_RAMP:-1}"; reps="${BENCH_REPS:-1}"
else
    size="${BENCH_SIZE:-1G}"; runtime="${BENCH_RUNTIME:-10}"; ramp="${BENCH_RAMP:-2}"; reps="${BENCH_REPS:-3}"
fi
bench_dir="${BENCH_DIR:-/tmp/superdisk-bench}"

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

need fio "apt-get install fio"
need nbdinfo "apt-get install libnbd-bin"
need python3 "apt-get install python3"
need getconf "libc-bin"
# fio is built with the nbd engine only in some distributions; ask it rather than find out mid-run.
fio --enghelp=nbd 2>/dev/null | grep -q uri || die "this fio has no nbd engine (fio --enghelp=nbd)"

for s in $servers; do
    case "$s" in
        superdisk|superdisk-mirror) ;;
        nbdkit-file|nbdkit-null|nbdkit-file-cache)
            need nbdkit "apt-get install nbdkit"
            plugin="${s#nbdkit-}"
            plugin="${plugin%-cache}"
            nbdkit "$plugin" --version >/dev/null 2>&1 || die "nbdkit has no '$plugin' plugin"
            [ "$s" != nbdkit-file-cache ] || nbdkit --filter=cache null --version >/dev/null 2>&1 \
                || die "nbdkit has no cache filter"
            ;;
        qemu-nbd) need qemu-nbd "apt-get install qemu-utils" ;;
        *) die "unknown server '$s' (known: $default_servers)" ;;
    esac
done
case " $servers " in
    *" nbdkit-file "*) ;;
    *) die "nbdkit-file must be among the servers: every ratio is relative to it" ;;
esac

# Other work on the machine skews every figure; record how busy it was before our own build and load.
loadavg_start="$(cut -d' ' -f1-3 /proc/loadavg)"
awk '{ exit !($1 > 1.0) }' /proc/loadavg \
    && log "warning: load average is $loadavg_start before we start; figures will be noisy"

# Which superdisk is measured: the commit, and whether the tree it is built from has edits on top.
# Taken now, at build time, since the tree may change during a run that lasts a quarter of an hour.
rev="$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)"
git -C "$repo" diff --quiet HEAD -- 2>/dev/null || rev+=" with uncommitted changes"

superdisk_bin=""
if [[ " $servers " == *" superdisk "* || " $servers " == *" superdisk-mirror "* ]]; then
    if [ -n "${SUPERDISK:-}" ]; then
        superdisk_bin="$SUPERDISK"
    else
        need cargo "install a Rust toolchain, or set SUPERDISK to a built binary"
        log "building superdisk (cargo build --release)"
        (cd "$repo" && cargo build --release --quiet) || die "cargo build --release failed"
        superdisk_bin="$repo/target/release/superdisk"
    fi
    [ -x "$superdisk_bin" ] || die "superdisk binary '$superdisk_bin' is missing or not executable"
fi

# --- images ----------------------------------------------------------------------------------------

run_dir="$bench_dir/run-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$run_dir/fio"
[ -n "$out" ] || { if [ "$quick" = 1 ]; then out="$run_dir"; else out="$repo/docs/bench"; fi; }

pids=()
fio_pid=""
cleanup() {
    local rc=$?
    # A fio still running would only fail against servers that are about to go.
    [ -z "$fio_pid" ] || kill -TERM "$fio_pid" 2>/dev/null || true
    # Every server we started, and nothing else: by PID, TERM first, then KILL for one that hangs.
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    # Images are big; raw fio JSON and the logs are small and worth keeping for a second look.
    rm -f "$run_dir"/*.img "$run_dir"/data.raw
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Random bytes, so that reads move real data (a zero-filled file is sparse and reads of holes are
# cheaper than reads of data). Every file server gets its own copy of the same bytes.
log "writing $size of random data to $run_dir"
head -c "$size_b" /dev/urandom >"$run_dir/data.raw"
for s in $servers; do
    case "$s" in
        nbdkit-file|nbdkit-file-cache) cp "$run_dir/data.raw" "$run_dir/$s.img" ;;
        qemu-nbd) cp "$run_dir/data.raw" "$run_dir/qemu-nbd.img" ;;
        superdisk|superdisk-mirror) bench_create_superdisk "$s" ;;
    esac
done
rm -f "$run_dir/data.raw"
# Warm page cache for every image alike: the comparison is of servers, not of the disk under them.
cat "$run_dir"/*.img >/dev/null 2>&1 || true

# --- servers ---------------------------------------------------------------------------------------


declare -A pid_of uri_of
start_server() {
    local s="$1" port
    port="$(free_port)"
    local errlog="$run_dir/$s.log"
    case "$s" in
        superdisk)
            # shellcheck disable=SC2086  # SUPERDISK_ARGS is a word list on purpose
            "$superdisk_bin" serve --backing "$run_dir/superdisk.img" --listen "127.0.0.1:$port" \
                ${SUPERDISK_ARGS:-} 2>"$errlog" &
            uri_of[$s]="nbd://127.0.0.1:$port/superdisk"
            ;;
        superdisk-mirror)
            # shellcheck disable=SC2086
            "$superdisk_bin" serve --backing "$run_dir/$s.img" --cache "$run_dir/$s.cache.img" \
                --listen "127.0.0.1:$port" ${SUPERDISK_ARGS:-} ${SUPERDISK_MIRROR_ARGS:-} 2>"$errlog" &
            uri_of[$s]="nbd://127.0.0.1:$port/superdisk"
            ;;
        nbdkit-file)
            # -f keeps nbdkit in the foreground, so $! is the server itself and its CPU time is its own.
            nbdkit -f -i 127.0.0.1 -p "$port" file "$run_dir/nbdkit-file.img" 2>"$errlog" &
            uri_of[$s]="nbd://127.0.0.1:$port"
            ;;
        nbdkit-file-cache)
            # The filter's cache file is created (and unlinked) in TMPDIR: the same filesystem as
            # the image and superdisk-mirror's cache file, and removed with the run.
            TMPDIR="$run_dir" nbdkit -f -i 127.0.0.1 -p "$port" --filter=cache file \
                "$run_dir/nbdkit-file-cache.img" cache=writethrough 2>"$errlog" &
            uri_of[$s]="nbd://127.0.0.1:$port"
            ;;
        qemu-nbd)
            qemu-nbd -f raw -t -x bench -b 127.0.0.1 -p "$port" --cache=writeback --aio=threads \
                "$run_dir/qemu-nbd.img" 2>"$errlog" &
            uri_of[$s]="nbd://127.0.0.1:$port/bench"
            ;;
        nbdkit-null)
            nbdkit -f -i 127.0.0.1 -p "$port" null "$size_b" 2>"$errlog" &
            uri_of[$s]="nbd://127.0.0.1:$port"
            ;;
    esac
    pid_of[$s]=$!
    pids+=("$!")
}

# Up means: the process still runs and a real NBD client completes a handshake and sees the right size.
wait_up() {
    local s="$1" got=""
    for _ in $(seq 100); do
        kill -0 "${pid_of[$s]}" 2>/dev/null || die "$s exited during startup: $(tail -n 5 "$run_dir/$s.log")"
        got="$(nbdinfo --size "${uri_of[$s]}" 2>/dev/null || true)"
        [ "$got" = "$size_b" ] && return 0
        sleep 0.1
    done
    die "$s did not come up at ${uri_of[$s]} within 10 s (size seen: '${got:-none}'): $(tail -n 5 "$run_dir/$s.log")"
}

for s in $servers; do start_server "$s"; done
for s in $servers; do wait_up "$s"; log "$s up at ${uri_of[$s]} (pid ${pid_of[$s]})"; done
[[ " $servers " != *" superdisk-mirror "* ]] || bench_wait_mirror_rebuilt

# --- measurement -----------------------------------------------------------------------------------

# utime + stime of the whole process (all threads, io_uring workers included), in clock ticks. Field
# numbers count from after the ")" that closes the command name, which may itself hold spaces.

# Re-reads the server's files before each of its cells: the table promises a warm page cache, and
# some VMs page out file pages that sit idle (DAMON's proactive reclaim, on the machine in
# docs/PERFORMANCE.md's "The machines"), so an image that waited out the other servers' cells
# could start its cell with pieces on disk; at QD1 each such read costs a disk round trip. Files
# already in memory take a fraction of a second. The mirror's cache file is warmed without
# readahead, as after its rebuild.
warm_images() {
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
            kill -0 "${pid_of[$s]}" 2>/dev/null || die "$s died: $(tail -n 5 "$run_dir/$s.log")"
            fio --name="$name" --ioengine=nbd --uri="${uri_of[$s]}" --rw="$rw" --bs="$bs" \
                --iodepth="$qd" --numjobs=1 --time_based --runtime="$runtime" --ramp_time="$ramp" \
                --lat_percentiles=1 --output-format=json >"$json" 2>"$json.err" &
            fio_pid=$!
            # Server CPU is read over the measured window only, as fio's I/O counts are: the window
            # opens ramp seconds after fio reports its connection (fio takes a few hundred ms to
            # start, too much to guess) and closes when fio exits, after which the server is idle.
            seen=0
            for _ in $(seq 1000); do
                grep -q "connected to NBD server" "$json" 2>/dev/null && { seen=1; break; }
                kill -0 "$fio_pid" 2>/dev/null || break
                sleep 0.005
            done
            if [ "$seen" = 0 ]; then
                wait "$fio_pid" || true
                die "fio never reported connecting to $s ($name): $(tail -n 5 "$json.err")"
            fi
            sleep "$ramp"
            c0="$(cpu_ticks "${pid_of[$s]}")"
            wait "$fio_pid" || die "fio failed on $s ($name): $(tail -n 5 "$json.err")"
            c1="$(cpu_ticks "${pid_of[$s]}")"
            fio_pid=""
            printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$s" "$rep" "$((c1 - c0))" "$json" >>"$results"
            log "[$cell/$total] $name $s rep $rep done"
        done
    done
done

# --- report ----------------------------------------------------------------------------------------

cmdline="scripts/bench.sh"
[ "$quick" = 1 ] && cmdline+=" --quick"
[ "$servers" = "$default_servers" ] || cmdline+=" --servers \"$servers\""
[ -z "$only_workloads" ] || cmdline+=" --workloads \"$only_workloads\""
[ "$out" = "$repo/docs/bench" ] || cmdline+=" --out $out"
env_note=""
for v in BENCH_SIZE BENCH_RUNTIME BENCH_RAMP BENCH_REPS SUPERDISK SUPERDISK_ARGS SUPERDISK_MIRROR_ARGS; do
    [ -n "${!v:-}" ] && env_note+="$v=${!v} "
done

mkdir -p "$out"
python3 "$here/bench_report.py" \
    --results "$results" --out "$out" --servers "$servers" \
    --size "$size_b" --runtime "$runtime" --ramp "$ramp" --reps "$reps" \
    --clk-tck "$(getconf CLK_TCK)" --command "$env_note$cmdline" \
    --superdisk-args "${SUPERDISK_ARGS:-}" --loadavg "$loadavg_start" \
    --revision "$rev"
log "wrote $out/latest.md, $out/latest.svg and $out/latest.json"
