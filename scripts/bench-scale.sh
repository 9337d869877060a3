#!/usr/bin/env bash
# How superdisk scales with the number of NBD connections, against `nbdkit file` (the baseline) and
# `nbdkit null` (no I/O: the ceiling fio, libnbd and loopback leave), optionally qemu-nbd.
# A script, not a test: it measures and reports, it asserts nothing about speed.
#
#   scripts/bench-scale.sh [--quick] [--conns "1 2 4 8"] [--servers "superdisk superdisk-mirror nbdkit-file nbdkit-null"]
#                          [--workloads "randread-4k-qd32 randwrite-4k-qd32 read-1m-qd8"] [--out PREFIX]
#
# fio's nbd engine with numjobs=N: every job opens its own NBD connection (the script counts the
# established connections during each cell and reports the count), and offset_increment gives each
# job its own 1/N of the disk. Workloads per job: 4 KiB random read QD32, 4 KiB random write QD32,
# 1 MiB sequential read QD8. Servers run in turn for each (workload, N) cell, BENCH_REPS times, the
# starting server rotated, median reported. Page cache warm for every image.
#
# Environment:
#   BENCH_DIR       images and raw fio output                    (default /tmp/superdisk-bench-scale)
#   BENCH_SIZE      image size, bytes or K/M/G                   (default 1G; 256M with --quick)
#   BENCH_RUNTIME   measured seconds per cell                    (default 5; 2 with --quick)
#   BENCH_RAMP      fio ramp seconds per cell, not measured      (default 1)
#   BENCH_REPS      repetitions per cell, median reported        (default 1)
#   SUPERDISK       superdisk binary; unset: `cargo build --release`, target/release/superdisk
#   SUPERDISK_ARGS  extra arguments for `superdisk serve`        (default none)
#   SUPERDISK_MIRROR_ARGS  extra arguments for superdisk-mirror (the image with a cache file,
#                   rebuilt before measuring)                   (default none)
#   FIO, NBDKIT, NBDINFO, QEMU_NBD   tool paths (default: found on PATH)
#   NBDKIT_PLUGINS  directory holding nbdkit-file-plugin.so and nbdkit-null-plugin.so (default: nbdkit's own)
#   BENCH_THREADS   1: also record each server thread's CPU time per cell (RUN_DIR/threads/)
#
# Connection counts default to 1 2 4 8, and 16 too where the machine has at least 16 CPUs.
# Outputs: the tables on stdout, PREFIX.md and PREFIX.json (default PREFIX: $BENCH_DIR/run-…/scale).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
# shellcheck source=scripts/lib/common.sh
. "$here/lib/common.sh"
# shellcheck source=scripts/lib/servers.sh
. "$here/lib/servers.sh"

quick=0
servers="superdisk nbdkit-file nbdkit-null"
conns=""
workload_names="randread-4k-qd32 randwrite-4k-qd32 read-1m-qd8"
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --servers) [ $# -ge 2 ] || die "--servers needs a list"; servers="$2"; shift ;;
        --conns) [ $# -ge 2 ] || die "--conns needs a list"; conns="$2"; shift ;;
        --workloads) [ $# -ge 2 ] || die "--workloads needs a list"; workload_names="$2"; shift ;;
        --out) [ $# -ge 2 ] || die "--out needs a path prefix"; out="$2"; shift ;;
        -h|--help) sed -n '2,28p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
    shift
done

ncpu="$(nproc)"
if [ -z "$conns" ]; then
    conns="1 2 4 8"
    [ "$ncpu" -ge 16 ] && conns+=" 16"
fi
for n in $conns; do
    if ! [[ "$n" =~ ^[0-9]+$ ]] || [ "$n" -lt 1 ]; then
        die "connection count '$n' is not a positive whole number"
    fi
done

if [ "$quick" = 1 ]; then
    size="${BENCH_SIZE:-256M}"; runtime="${BENCH_RUNTIME:-2}"
else
    size="${BENCH_SIZE:-1G}"; runtime="${BENCH_RUNTIME:-5}"
fi
ramp="${BENCH_RAMP:-1}"; reps="${BENCH_REPS:-1}"
bench_dir="${BENCH_DIR:-/tmp/superdisk-bench-scale}"
for v in runtime ramp reps; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || die "BENCH_${v^^} must be a whole number, got '${!v}'"
done
[ "$runtime" -ge 1 ] || die "BENCH_RUNTIME must be at least 1"
[ "$reps" -ge 1 ] || die "BENCH_REPS must be at least 1"

size_b="$(size_bytes "$size")"
# Each job's share must hold whole 1 MiB blocks, or the sequential cells would wrap at once.
for n in $conns; do
    share=$((size_b / n))
    if [ $((share % (1024 * 1024))) != 0 ] || [ "$share" -lt $((8 * 1024 * 1024)) ]; then
        die "BENCH_SIZE $size split $n ways is not a whole number of MiB of at least 8 MiB per connection"
    fi
done

# --- tools -----------------------------------------------------------------------------------------

bench_check_tools

loadavg_start="$(cut -d' ' -f1-3 /proc/loadavg)"
awk -v n="$ncpu" '{ exit !($1 > n / 2) }' /proc/loadavg \
    && log "warning: load average is $loadavg_start on $ncpu CPUs before we start; figures will be noisy"

rev="$(bench_revision)"
bench_superdisk_bin

# --- images and servers ----------------------------------------------------------------------------

run_dir="$bench_dir/run-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$run_dir/fio"
[ -n "$out" ] || out="$run_dir/scale"

bench_traps
bench_make_images
bench_start_all

# --- measurement -----------------------------------------------------------------------------------

# Established TCP connections whose local port is the server's: proof that N jobs are N connections.
# /proc/net/tcp needs no tool; state 01 is ESTABLISHED, the local port is hex after the colon.
established() {
    local hex
    hex="$(printf '%04X' "$1")"
    awk -v p=":$hex" '$2 ~ p"$" && $4 == "01" { n++ } END { print n + 0 }' /proc/net/tcp
}

all_workloads=(
    "randread-4k-qd32 randread 4k 32"
    "randwrite-4k-qd32 randwrite 4k 32"
    "read-1m-qd8 read 1m 8"
)
workloads=()
for w in "${all_workloads[@]}"; do
    [[ " $workload_names " == *" ${w%% *} "* ]] && workloads+=("$w")
done
[ "${#workloads[@]}" -gt 0 ] || die "no known workload in '$workload_names' (known: randread-4k-qd32 randwrite-4k-qd32 read-1m-qd8)"

# Busy and total jiffies of the whole machine (all CPUs): whether the box itself ran out of CPU,
# which on loopback means client and server compete for it.
machine_ticks() {
    awk '$1 == "cpu" { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t; exit }' /proc/stat
}

# Per-thread utime + stime of a process: "tid comm ticks" lines.
thread_ticks() {
    local t stat comm
    for t in /proc/"$1"/task/*; do
        stat="$(cat "$t/stat" 2>/dev/null)" || continue
        comm="${stat#*(}"; comm="${comm%%)*}"; comm="${comm// /_}"
        stat="${stat##*) }"
        # shellcheck disable=SC2086
        set -- $stat
        echo "${t##*/} $comm $(( ${12} + ${13} ))"
    done
}
read -r -a server_list <<<"$servers"
nserv=${#server_list[@]}
results="$run_dir/results.tsv"
printf 'workload\tconns\tserver\trep\tcpu_ticks\tconns_seen\tmachine_busy_ticks\tmachine_ticks\tfio_json\n' >"$results"
[ "${BENCH_THREADS:-0}" = 1 ] && mkdir -p "$run_dir/threads"
read -r -a conn_list <<<"$conns"
total=$(( ${#workloads[@]} * ${#conn_list[@]} * reps * nserv ))
cell=0
log "$total cells of ${runtime}s (+${ramp}s ramp) each; raw output in $run_dir"
for w in "${workloads[@]}"; do
    read -r name rw bs qd <<<"$w"
    for n in "${conn_list[@]}"; do
        share=$((size_b / n))
        for rep in $(seq 1 "$reps"); do
            for i in $(seq 0 $((nserv - 1))); do
                s="${server_list[$(( (i + rep - 1) % nserv ))]}"
                cell=$((cell + 1))
                json="$run_dir/fio/$name.c$n.$s.$rep.json"
                sync
                kill -0 "${pid_of[$s]}" 2>/dev/null || die "$s died: $(tail -n 5 "$run_dir/$s.log")"
                "$fio" --name="$name" --ioengine=nbd --uri="${uri_of[$s]}" --rw="$rw" --bs="$bs" \
                    --iodepth="$qd" --numjobs="$n" --size="$share" --offset_increment="$share" \
                    --group_reporting --time_based --runtime="$runtime" --ramp_time="$ramp" \
                    --output-format=json >"$json" 2>"$json.err" &
                fio_pid=$!
                bench_open_window "$s" "$json" "$n" "$name"
                read -r mb0 mt0 < <(machine_ticks)
                [ "${BENCH_THREADS:-0}" = 1 ] && thread_ticks "${pid_of[$s]}" >"$run_dir/threads/t0"
                nconn="$(established "${port_of[$s]}")"
                wait "$fio_pid" || die "fio failed on $s ($name, $n connections): $(tail -n 5 "$json.err")"
                c1="$(cpu_ticks "${pid_of[$s]}")"
                read -r mb1 mt1 < <(machine_ticks)
                if [ "${BENCH_THREADS:-0}" = 1 ]; then
                    # Threads by CPU time over the window, busiest first.
                    thread_ticks "${pid_of[$s]}" | awk -v clk="$(getconf CLK_TCK)" -v rt="$runtime" '
                        NR == FNR { t0[$1] = $3; next }
                        { printf "%s %s %.2f\n", $1, $2, ($3 - t0[$1]) / clk / rt }' "$run_dir/threads/t0" - \
                        | sort -k3 -rn >"$run_dir/threads/$name.c$n.$s.$rep.txt"
                fi
                fio_pid=""
                printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$n" "$s" "$rep" "$((c1 - c0))" "$nconn" \
                    "$((mb1 - mb0))" "$((mt1 - mt0))" "$json" >>"$results"
                log "[$cell/$total] $name x$n $s rep $rep: $nconn connections"
            done
        done
    done
done

# --- report ----------------------------------------------------------------------------------------

cmdline="scripts/bench-scale.sh"
[ "$quick" = 1 ] && cmdline+=" --quick"
cmdline+=" --conns \"$conns\" --servers \"$servers\""
[ "$workload_names" = "randread-4k-qd32 randwrite-4k-qd32 read-1m-qd8" ] || cmdline+=" --workloads \"$workload_names\""
env_note=""
for v in BENCH_SIZE BENCH_RUNTIME BENCH_RAMP BENCH_REPS BENCH_THREADS SUPERDISK_ARGS; do
    [ -n "${!v:-}" ] && env_note+="$v=${!v} "
done
versions="$("$fio" --version 2>/dev/null | head -n1); $("$nbdkit" --version 2>/dev/null | head -n1)"
mkdir -p "$(dirname "$out")"

python3 - "$results" "$out" "$servers" "$size_b" "$runtime" "$ramp" "$reps" "$(getconf CLK_TCK)" \
    "$env_note$cmdline" "$rev" "$loadavg_start" "$versions" <<'PY'
import datetime, json, os, platform, statistics, sys

(results, out, servers, size_b, runtime, ramp, reps, clk_tck, command, rev, loadavg, versions) = sys.argv[1:]
servers = servers.split()
clk_tck = int(clk_tck)
ALL_WORKLOADS = [
    ("randread-4k-qd32", "4 KiB rand read, QD32 per connection", "IOPS"),
    ("randwrite-4k-qd32", "4 KiB rand write, QD32 per connection", "IOPS"),
    ("read-1m-qd8", "1 MiB seq read, QD8 per connection", "MB/s"),
]
BASE = "nbdkit-file"


present = {line.split("\t")[0] for line in list(open(results))[1:]}
WORKLOADS = [w for w in ALL_WORKLOADS if w[0] in present]


def load(path):
    text = open(path).read()
    # fio prints the engine's "connected" lines ahead of the JSON.
    return json.loads(text[text.find("\n{") + 1 if not text.startswith("{") else 0:])


runs = {}
units = {w: u for w, _, u in WORKLOADS}
with open(results) as f:
    next(f)
    for line in f:
        w, n, s, rep, ticks, seen, mbusy, mtotal, path = line.rstrip("\n").split("\t")
        job = load(path)["jobs"][0]
        if job.get("error"):
            sys.exit(f"bench-scale: fio error {job['error']} in {path}")
        side = job["read"] if job["read"]["total_ios"] > 0 else job["write"]
        ios = side["total_ios"]
        value = side["iops"] if units[w] == "IOPS" else side["bw_bytes"] / 1e6
        runs.setdefault((w, int(n), s), []).append({
            "value": value,
            "cpu_us_per_io": int(ticks) / clk_tck * 1e6 / ios if ios else 0.0,
            "server_cpus": int(ticks) / clk_tck / float(runtime),
            "p99_us": side["clat_ns"]["percentile"]["99.000000"] / 1000.0,
            "conns_seen": int(seen),
            # Share of all the machine's CPUs that were busy (client, server, kernel, anything else).
            "machine_busy_pct": 100.0 * int(mbusy) / int(mtotal) if int(mtotal) else 0.0,
            "client_cpu_pct": job["usr_cpu"] + job["sys_cpu"],
        })

conns = sorted({n for (_, n, _) in runs})
rows = []
for w, label, unit in WORKLOADS:
    for n in conns:
        row = {"workload": w, "label": label, "unit": unit, "conns": n, "servers": {}}
        for s in servers:
            r = runs[(w, n, s)]
            med = lambda k: statistics.median(x[k] for x in r)
            row["servers"][s] = {
                k: med(k) for k in ("value", "cpu_us_per_io", "server_cpus", "p99_us", "machine_busy_pct")
            }
            row["servers"][s]["conns_seen"] = min(x["conns_seen"] for x in r)
            row["servers"][s]["reps"] = r
        base = row["servers"][BASE]["value"]
        for s in servers:
            row["servers"][s]["ratio"] = row["servers"][s]["value"] / base if base else 0.0
        rows.append(row)
one = {(r["workload"], s): r["servers"][s]["value"] for r in rows if r["conns"] == conns[0] for s in servers}


def fmt(v, unit):
    return (f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}") if unit == "IOPS" else f"{v:,.0f}"


def mach():
    model = "?"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release()}


m = mach()
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
names = {"superdisk": "superdisk", "superdisk-mirror": "superdisk + cache", "nbdkit-file": "nbdkit file", "nbdkit-null": "nbdkit null", "qemu-nbd": "qemu-nbd"}
md = [
    f"# superdisk scaling with connections — {now}",
    "",
    f"Command: `{command}` (superdisk at {rev})",
    "",
    f"Machine: {m['nproc']} CPUs, {m['cpu']}, Linux {m['kernel']}; {versions}. Load average before the run: "
    f"{loadavg}.",
    f"fio nbd engine over loopback TCP, numjobs = connections (one NBD connection per job, counted in "
    f"/proc/net/tcp during each cell: column 'conns'), each job on its own 1/N of a "
    f"{int(size_b) // 2**20} MiB image of random data, page cache warm; {runtime} s measured after {ramp} s "
    f"ramp; servers alternated, median of {reps}.",
    "",
    "Throughput (all connections together) and ratio to nbdkit file; in brackets below it, the "
    "scaling from " + f"{conns[0]} connection{'s' if conns[0] > 1 else ''}:",
    "",
    "| workload | conns | " + " | ".join(names[s] for s in servers) + " |",
    "|---|---:|" + "---:|" * len(servers),
]
for r in rows:
    cells = []
    for s in servers:
        c = r["servers"][s]
        scale = c["value"] / one[(r["workload"], s)] if one[(r["workload"], s)] else 0.0
        cells.append(f"{fmt(c['value'], r['unit'])} {r['unit']} ({c['ratio']:.2f}×) [{scale:.1f}×]")
    seen = {r["servers"][s]["conns_seen"] for s in servers}
    note = "" if seen == {r["conns"]} else f" (seen: {'/'.join(str(x) for x in sorted(seen))})"
    md.append(f"| {r['label']} | {r['conns']}{note} | " + " | ".join(cells) + " |")
md += [
    "",
    "Server CPU per I/O in µs (user + system, all threads) / CPUs the server kept busy on average / "
    "share of the whole machine's CPU that was busy (client, server and kernel together):",
    "",
    "| workload | conns | " + " | ".join(names[s] for s in servers) + " |",
    "|---|---:|" + "---:|" * len(servers),
]
for r in rows:
    md.append(
        f"| {r['label']} | {r['conns']} | "
        + " | ".join(
            f"{r['servers'][s]['cpu_us_per_io']:.1f} / {r['servers'][s]['server_cpus']:.2f} / "
            f"{r['servers'][s]['machine_busy_pct']:.0f}%"
            for s in servers
        )
        + " |"
    )
md += [
    "",
    "p99 completion latency (µs):",
    "",
    "| workload | conns | " + " | ".join(names[s] for s in servers) + " |",
    "|---|---:|" + "---:|" * len(servers),
]
for r in rows:
    md.append(f"| {r['label']} | {r['conns']} | " + " | ".join(f"{r['servers'][s]['p99_us']:,.0f}" for s in servers) + " |")
md.append("")
text = "\n".join(md)
with open(out + ".md", "w") as f:
    f.write(text)
with open(out + ".json", "w") as f:
    json.dump({"date": now, "command": command, "revision": rev, "machine": m, "versions": versions,
               "loadavg_before": loadavg, "size_bytes": int(size_b), "runtime_s": int(runtime),
               "ramp_s": int(ramp), "reps": int(reps), "rows": rows}, f, indent=1)
    f.write("\n")
print(text)
PY
log "wrote $out.md and $out.json"
