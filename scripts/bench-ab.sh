#!/usr/bin/env bash
# A/B of two sets of `superdisk serve` flags, or of two binaries: one image, fio's nbd engine, the
# two sides alternated round by round so background noise lands on both. Prints throughput and the
# server's CPU time per I/O and per MiB (from /proc/PID/stat before and after each run) and fio's
# completion-latency p99 for every run, then medians and B/A ratios. A script, not a test: it asserts nothing about speed.
#
#   scripts/bench-ab.sh --a "FLAGS" --b "FLAGS" [--names "A B"] [--fio "FIO ARGS"]
#                       [--serve "FLAGS"] [--jobs "1 4"] [--rounds 3] [--unix] [--cache]
#
# --fio     the workload (default "--rw=read --bs=1M --iodepth=8")
# --serve   flags both sides get (e.g. "--direct true" to measure the O_DIRECT path)
# --jobs    fio jobs, each its own connection reading or writing its own slice of the image
# --cache   serve the image with a cache file (rebuilt once, then valid across restarts), so reads
#           come from the cache and writes go to both files, as superdisk-mirror's in bench.sh
#
# Environment: SUPERDISK (binary; default target/release/superdisk, built if missing), SUPERDISK_A
# and SUPERDISK_B (a different binary for one side, e.g. an older build), BENCH_DIR
# (image directory, on a filesystem that takes O_DIRECT if --serve asks for it; default
# /var/tmp/superdisk-bench/ab), BENCH_SIZE (default 1G), BENCH_RUNTIME (seconds per run; default 5).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/common.sh
. scripts/lib/common.sh
# shellcheck source=scripts/lib/servers.sh
. scripts/lib/servers.sh

a_flags="" b_flags="" names="A B" fio_args="--rw=read --bs=1M --iodepth=8" serve_flags=""
jobs_list="1"
rounds=3
unix=0
cache=0
while [ $# -gt 0 ]; do
    case "$1" in
        --a) a_flags="$2"; shift 2 ;;
        --b) b_flags="$2"; shift 2 ;;
        --names) names="$2"; shift 2 ;;
        --fio) fio_args="$2"; shift 2 ;;
        --serve) serve_flags="$2"; shift 2 ;;
        --jobs) jobs_list="$2"; shift 2 ;;
        --rounds) rounds="$2"; shift 2 ;;
        --unix) unix=1; shift ;;
        --cache) cache=1; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
read -r a_name b_name <<<"$names"

bin="${SUPERDISK:-target/release/superdisk}"
if [ ! -x "$bin" ]; then
    cargo build --release
fi
a_bin="${SUPERDISK_A:-$bin}"
b_bin="${SUPERDISK_B:-$bin}"
dir="${BENCH_DIR:-/var/tmp/superdisk-bench/ab}"
size="${BENCH_SIZE:-1G}"
runtime="${BENCH_RUNTIME:-5}"
need fio "apt-get install fio"
mkdir -p "$dir"
img="$dir/backing.img"
cache_img="$dir/cache.img"
rm -f "$img" "$cache_img"
size_bytes=$(numfmt --from=iec "$size")
cache_args=()
if [ "$cache" = 1 ]; then
    truncate -s $(( size_bytes + 64 * 1048576 )) "$cache_img"
    cache_args=(--cache "$cache_img")
fi
"$bin" create --backing "$img" --size "$size" "${cache_args[@]}" >/dev/null
# Random data over the export (not the metadata at the tail), then warm the page cache.
head -c "$size_bytes" /dev/urandom | dd of="$img" conv=notrunc bs=1M status=none
cat "$img" >/dev/null
ticks_per_s=$(getconf CLK_TCK)

# run BINARY "FLAGS" JOBS -> "MB/s IOPS cpu_us_per_io cpu_us_per_MiB p99_us"
run() {
    local bin=$1 flags=$2 jobs=$3 uri pid t0 t1 port sock
    local -a extra
    read -r -a extra <<<"$serve_flags $flags"
    if [ "$unix" = 1 ]; then
        sock="$dir/nbd.sock"
        rm -f "$sock"
        "$bin" serve --backing "$img" "${cache_args[@]}" --listen "" --unix "$sock" "${extra[@]}" \
            >"$dir/serve.log" 2>&1 &
        uri="nbd+unix:///?socket=$sock"
    else
        port=$(( 20000 + RANDOM % 20000 ))
        "$bin" serve --backing "$img" "${cache_args[@]}" --listen "127.0.0.1:$port" "${extra[@]}" \
            >"$dir/serve.log" 2>&1 &
        uri="nbd://127.0.0.1:$port"
    fi
    pid=$!
    # With a cache, measure only once it holds the whole disk (the first start rebuilds it).
    local ready=listening
    [ "$cache" = 1 ] && ready="mode=healthy"
    for _ in $(seq 6000); do grep -q "$ready" "$dir/serve.log" && break; sleep 0.1; done
    grep -q "$ready" "$dir/serve.log" || die "superdisk did not become ready: $(tail -n 3 "$dir/serve.log")"
    # Warm again before every run, as bench.sh does before every cell: idle file pages may have
    # been paged out since (DAMON on some VMs), and a read from disk at QD1 is a round trip.
    cat "$img" >/dev/null
    if [ "$cache" = 1 ]; then
        bench_warm_without_readahead "$cache_img"
    fi
    local slice=$(( size_bytes / jobs / 1048576 ))M
    local -a workload
    read -r -a workload <<<"$fio_args"
    t0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    fio --name=ab --ioengine=nbd --uri="$uri" "${workload[@]}" --numjobs="$jobs" \
        --offset_increment="$slice" --size="$slice" --time_based --runtime="$runtime" \
        --group_reporting --output-format=json >"$dir/fio.json" 2>"$dir/fio.err"
    t1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    python3 - "$dir/fio.json" "$t0" "$t1" "$ticks_per_s" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
job = json.loads(text[text.index("{"):])["jobs"][0]
ios = job["read"]["total_ios"] + job["write"]["total_ios"]
io_bytes = job["read"]["io_bytes"] + job["write"]["io_bytes"]
bw = job["read"]["bw_bytes"] + job["write"]["bw_bytes"]
iops = job["read"]["iops"] + job["write"]["iops"]
cpu_us = (float(sys.argv[3]) - float(sys.argv[2])) / float(sys.argv[4]) * 1e6
# Completion latency p99 of whichever direction did the I/O (the larger, for mixed workloads).
p99_us = max(job[d]["clat_ns"].get("percentile", {}).get("99.000000", 0) for d in ("read", "write")) / 1e3
print(f"{bw / 1e6:.0f} {iops:.0f} {cpu_us / max(ios, 1):.2f} {cpu_us / max(io_bytes / 1048576, 1e-9):.0f} {p99_us:.0f}")
EOF
}

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; }

echo "$("$bin" --version 2>/dev/null || echo "$bin"), $(nproc) CPUs, $(uname -r)"
echo "A ($a_name): $a_bin serve ${serve_flags:+$serve_flags }$a_flags"
echo "B ($b_name): $b_bin serve ${serve_flags:+$serve_flags }$b_flags"
echo "fio $fio_args$([ "$cache" = 1 ] && echo ", with a cache file") over $([ "$unix" = 1 ] && echo "a Unix socket" || echo "TCP loopback"), ${runtime} s per run, image $size"
printf '%-5s %-5s %-12s %9s %9s %12s %14s %8s\n' jobs round side "MB/s" IOPS "server µs/IO" "server µs/MiB" "p99 µs"
for jobs in $jobs_list; do
    declare -a a_mb=() b_mb=() a_io=() b_io=() a_cpu=() b_cpu=() a_p99=() b_p99=()
    for r in $(seq "$rounds"); do
        read -r mb iops cpu cpu_mib p99 < <(run "$a_bin" "$a_flags" "$jobs")
        a_mb+=("$mb"); a_io+=("$iops"); a_cpu+=("$cpu"); a_p99+=("$p99")
        printf '%-5s %-5s %-12s %9s %9s %12s %14s %8s\n' "$jobs" "$r" "$a_name" "$mb" "$iops" "$cpu" "$cpu_mib" "$p99"
        read -r mb iops cpu cpu_mib p99 < <(run "$b_bin" "$b_flags" "$jobs")
        b_mb+=("$mb"); b_io+=("$iops"); b_cpu+=("$cpu"); b_p99+=("$p99")
        printf '%-5s %-5s %-12s %9s %9s %12s %14s %8s\n' "$jobs" "$r" "$b_name" "$mb" "$iops" "$cpu" "$cpu_mib" "$p99"
    done
    am=$(median "${a_mb[@]}"); bm=$(median "${b_mb[@]}")
    ai=$(median "${a_io[@]}"); bi=$(median "${b_io[@]}")
    ac=$(median "${a_cpu[@]}"); bc=$(median "${b_cpu[@]}")
    ap=$(median "${a_p99[@]}"); bp=$(median "${b_p99[@]}")
    echo "jobs=$jobs medians: $a_name $am MB/s, $ai IOPS, $ac µs/IO, p99 $ap µs;" \
        "$b_name $bm MB/s, $bi IOPS, $bc µs/IO, p99 $bp µs;" \
        "$b_name/$a_name: throughput $(ratio "$bm" "$am")×, CPU per I/O $(ratio "$bc" "$ac")×, p99 $(ratio "$bp" "$ap")×"
    unset a_mb b_mb a_io b_io a_cpu b_cpu a_p99 b_p99
done
