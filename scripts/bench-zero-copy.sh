#!/usr/bin/env bash
# A/B of `zero_copy_reads`: one superdisk binary serving one image, 1 MiB sequential reads at QD8
# with fio's nbd engine, the copying path (`--zero-copy-reads false`) and `sendfile`
# (`--zero-copy-reads true`) alternated round by round so background noise lands on both. Prints
# throughput and the server's CPU time per MiB for each run, then the medians. A script, not a
# test: it asserts nothing about speed.
#
#   scripts/bench-zero-copy.sh [--jobs "1 4"] [--rounds 3] [--unix] [--cache]
#
# --cache serves the image with a cache file (rebuilt once, then valid across restarts), so the
# reads come from the cache, as superdisk-mirror's do in bench.sh.
#
# Environment: SUPERDISK (binary; default target/release/superdisk, built if missing), BENCH_DIR
# (image directory; default /tmp/superdisk-bench/zero-copy), BENCH_SIZE (default 1G),
# BENCH_RUNTIME (seconds per run; default 5). Each job reads its own BENCH_SIZE/jobs slice.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-superdisk.sh
. scripts/bench-superdisk.sh

jobs_list="1"
rounds=3
unix=0
cache=0
while [ $# -gt 0 ]; do
    case "$1" in
        --jobs) jobs_list="$2"; shift 2 ;;
        --rounds) rounds="$2"; shift 2 ;;
        --unix) unix=1; shift ;;
        --cache) cache=1; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

bin="${SUPERDISK:-target/release/superdisk}"
if [ ! -x "$bin" ]; then
    cargo build --release
fi
dir="${BENCH_DIR:-/tmp/superdisk-bench/zero-copy}"
size="${BENCH_SIZE:-1G}"
runtime="${BENCH_RUNTIME:-5}"
command -v fio >/dev/null || { echo "fio is needed (apt-get install fio)" >&2; exit 1; }
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

# run ZERO_COPY JOBS -> "MB/s cpu_us_per_MiB"
run() {
    local zc=$1 jobs=$2 uri pid t0 t1 port sock
    if [ "$unix" = 1 ]; then
        sock="$dir/nbd.sock"
        rm -f "$sock"
        "$bin" serve --backing "$img" "${cache_args[@]}" --listen "" --unix "$sock" --zero-copy-reads "$zc" \
            >"$dir/serve.log" 2>&1 &
        uri="nbd+unix:///?socket=$sock"
    else
        port=$(( 20000 + RANDOM % 20000 ))
        "$bin" serve --backing "$img" "${cache_args[@]}" --listen "127.0.0.1:$port" --zero-copy-reads "$zc" \
            >"$dir/serve.log" 2>&1 &
        uri="nbd://127.0.0.1:$port"
    fi
    pid=$!
    # With a cache, measure only once it holds the whole disk (the first start rebuilds it).
    local ready=listening
    [ "$cache" = 1 ] && ready="mode=healthy"
    for _ in $(seq 6000); do grep -q "$ready" "$dir/serve.log" && break; sleep 0.1; done
    grep -q "$ready" "$dir/serve.log" || { echo "superdisk did not become ready: $(tail -n 3 "$dir/serve.log")" >&2; exit 1; }
    if [ "$cache" = 1 ] && [ ! -e "$dir/cache.warm" ]; then
        bench_warm_without_readahead "$cache_img"
        touch "$dir/cache.warm"
    fi
    local slice=$(( size_bytes / jobs / 1048576 ))M
    t0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    fio --name=zc --ioengine=nbd --uri="$uri" --rw=read --bs=1M --iodepth=8 --numjobs="$jobs" \
        --offset_increment="$slice" --size="$slice" --time_based --runtime="$runtime" \
        --group_reporting --output-format=json >"$dir/fio.json" 2>"$dir/fio.err"
    t1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    python3 - "$dir/fio.json" "$t0" "$t1" "$ticks_per_s" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
job = json.loads(text[text.index("{"):])["jobs"][0]["read"]
mib = job["io_bytes"] / 1048576
cpu_us = (float(sys.argv[3]) - float(sys.argv[2])) / float(sys.argv[4]) * 1e6
print(f"{job['bw_bytes'] / 1e6:.0f} {cpu_us / mib:.0f}")
EOF
}

echo "$("$bin" --version 2>/dev/null || echo "$bin"), $(nproc) CPUs, $(uname -r)"
rm -f "$dir/cache.warm"
echo "fio 1 MiB sequential reads QD8$([ "$cache" = 1 ] && echo " from the cache") over $([ "$unix" = 1 ] && echo "a Unix socket" || echo "TCP loopback"), ${runtime} s per run, image $size"
printf '%-6s %-5s %-10s %10s %16s\n' jobs round path "MB/s" "server µs/MiB"
for jobs in $jobs_list; do
    declare -a copy_mb=() zc_mb=() copy_cpu=() zc_cpu=()
    for r in $(seq "$rounds"); do
        read -r mb cpu < <(run false "$jobs")
        copy_mb+=("$mb"); copy_cpu+=("$cpu")
        printf '%-6s %-5s %-10s %10s %16s\n' "$jobs" "$r" copying "$mb" "$cpu"
        read -r mb cpu < <(run true "$jobs")
        zc_mb+=("$mb"); zc_cpu+=("$cpu")
        printf '%-6s %-5s %-10s %10s %16s\n' "$jobs" "$r" sendfile "$mb" "$cpu"
    done
    median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }
    cm=$(median "${copy_mb[@]}"); zm=$(median "${zc_mb[@]}")
    cc=$(median "${copy_cpu[@]}"); zcpu=$(median "${zc_cpu[@]}")
    echo "jobs=$jobs medians: copying $cm MB/s, $cc µs/MiB; sendfile $zm MB/s, $zcpu µs/MiB;" \
        "sendfile/copying: throughput $(awk -v a="$zm" -v b="$cm" 'BEGIN{printf "%.2f", a/b}')×," \
        "CPU per MiB $(awk -v a="$zcpu" -v b="$cc" 'BEGIN{printf "%.2f", a/b}')×"
    unset copy_mb zc_mb copy_cpu zc_cpu
done
