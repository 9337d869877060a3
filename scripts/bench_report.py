#!/usr/bin/env python3
"""Turn the raw output of scripts/bench.sh into a table (Markdown, also printed) and a plot (SVG).

Reads results.tsv (one line per fio run: workload, server, repetition, server CPU ticks over the
measured window or "-" where there is no server, path of fio's JSON) and writes NAME.md, NAME.svg and
NAME.json into --out (NAME: --out-name, default latest). --path direct adds what the production path
is judged by: p50 latencies, superdisk's ratio to each reference and the goal checks (reported, never
asserted).
Only the standard library is used, so the benchmark needs nothing beyond python3; the SVG is written
by hand for the same reason.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from xml.sax.saxutils import escape

# Row order and labels follow the list. "unit" decides what the headline figure is: IOPS for
# small blocks (what limits them is per-request cost), MB/s for 1 MiB blocks (bandwidth).
WORKLOADS = [
    ("randread-4k-qd1", "4 KiB rand read QD1", "IOPS"),
    ("randread-4k-qd32", "4 KiB rand read QD32", "IOPS"),
    ("randwrite-4k-qd1", "4 KiB rand write QD1", "IOPS"),
    ("randwrite-4k-qd32", "4 KiB rand write QD32", "IOPS"),
    ("read-1m-qd8", "1 MiB seq read QD8", "MB/s"),
    ("write-1m-qd8", "1 MiB seq write QD8", "MB/s"),
]
LABELS = {
    "superdisk": "superdisk",
    "superdisk-mirror": "superdisk + cache",
    "nbdkit-file": "nbdkit file",
    "nbdkit-file-cache": "nbdkit file + cache filter",
    "qemu-nbd": "qemu-nbd",
    "nbdkit-null": "nbdkit null",
    "device": "device (fio io_uring O_DIRECT)",
}
COLOURS = {
    "superdisk": "#d1495b",
    "superdisk-mirror": "#6a4c93",
    "nbdkit-file": "#2e86ab",
    "nbdkit-file-cache": "#00798c",
    "qemu-nbd": "#edae49",
    "nbdkit-null": "#8d8d8d",
    "device": "#3c3c3c",
}
# The superdisk variants the direct report's reference ratios and goals are about, and the
# references they are held against (floors first, then peers).
SUBJECTS = ["superdisk", "superdisk-mirror"]
REFERENCES = ["device", "nbdkit-null", "qemu-nbd", "nbdkit-file"]


def load_fio(path):
    """fio prints the nbd engine's "connected" line on stdout ahead of the JSON; skip to the JSON."""
    with open(path) as f:
        text = f.read()
    start = 0 if text.startswith("{") else text.find("\n{") + 1
    if start == 0 and not text.startswith("{"):
        sys.exit(f"bench_report: no JSON in {path}")
    return json.loads(text[start:])


def measure(fio, unit, cpu_ticks, clk_tck):
    """One fio run's figures; cpu_ticks is None where no server ran (the device floor)."""
    job = fio["jobs"][0]
    if job.get("error"):
        sys.exit(f"bench_report: fio reported error {job['error']} in job {job['jobname']}")
    # One direction per workload; take the one that did I/O.
    side = job["read"] if job["read"]["total_ios"] > 0 else job["write"]
    ios = side["total_ios"]
    if ios <= 0:
        sys.exit(f"bench_report: fio completed no I/O in job {job['jobname']}")
    if unit == "IOPS":
        value = side["iops"]
    else:
        value = side["bw_bytes"] / 1e6
    # Total latency (submission to completion): what a client waits. fio only keeps percentiles of
    # it with --lat_percentiles=1, which bench.sh sets.
    pct = side["lat_ns"]["percentile"]
    p99_us = pct["99.000000"] / 1000.0
    cpu_us_per_io = None if cpu_ticks is None else cpu_ticks / clk_tck * 1e6 / ios
    return {
        "value": value,
        "p50_us": pct["50.000000"] / 1000.0,
        "p99_us": p99_us,
        "cpu_us_per_io": cpu_us_per_io,
        "ios": ios,
        "client_cpu_pct": job["usr_cpu"] + job["sys_cpu"],
    }


def fmt_value(v, unit):
    if unit == "IOPS":
        return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"
    return f"{v:,.0f}"


def fmt_us(v):
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def machine():
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    def version(cmd):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
            return out.splitlines()[0].strip() if out else "?"
        except (OSError, subprocess.SubprocessError):
            return "?"

    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "fio": version(["fio", "--version"]),
        "nbdkit": version(["nbdkit", "--version"]),
        "qemu-nbd": version(["qemu-nbd", "--version"]),
    }


def render_svg(rows, servers, title, baseline):
    """Grouped bars, one group per workload, bar height = throughput ratio to the baseline."""
    left, right, top, bottom = 60, 20, 70, 70
    # Wide enough for the legend on one line (the direct path's labels are longer).
    width = max(900, left + right + sum(30 + 8 * len(LABELS[s]) for s in servers))
    height = 440
    plot_w, plot_h = width - left - right, height - top - bottom
    ratios = [r["servers"][s]["ratio"] for r in rows for s in servers]
    y_max = max(1.25, max(ratios) * 1.1)
    y_max = -(-y_max // 0.25) * 0.25  # round up to a multiple of 0.25, so the ticks fall on it

    def y(v):
        return top + plot_h - v / y_max * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">'
        f"{escape(title)}</text>",
    ]
    # Legend across the top.
    lx = left
    for s in servers:
        out.append(f'<rect x="{lx}" y="36" width="12" height="12" fill="{COLOURS[s]}"/>')
        out.append(f'<text x="{lx + 17}" y="46">{escape(LABELS[s])}</text>')
        lx += 30 + 8 * len(LABELS[s])
    # Grid and y axis.
    tick = 0.25 if y_max <= 2 else 0.5
    v = 0.0
    while v <= y_max + 1e-9:
        out.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
            f'stroke="#e4e4e4"/>'
        )
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.2f}×</text>')
        v += tick
    out.append(
        f'<text transform="translate(16 {top + plot_h / 2}) rotate(-90)" text-anchor="middle">'
        f"throughput ÷ {escape(LABELS[baseline])}</text>"
    )
    # Bars.
    group_w = plot_w / len(rows)
    bar_w = group_w * 0.8 / len(servers)
    for i, r in enumerate(rows):
        gx = left + i * group_w + group_w * 0.1
        for j, s in enumerate(servers):
            ratio = r["servers"][s]["ratio"]
            x = gx + j * bar_w
            out.append(
                f'<rect x="{x:.1f}" y="{y(ratio):.1f}" width="{bar_w - 2:.1f}" '
                f'height="{y(0) - y(ratio):.1f}" fill="{COLOURS[s]}">'
                f"<title>{escape(LABELS[s])}: {ratio:.2f}×</title></rect>"
            )
            out.append(
                f'<text x="{x + (bar_w - 2) / 2:.1f}" y="{y(ratio) - 3:.1f}" text-anchor="middle" '
                f'font-size="9">{ratio:.2f}</text>'
            )
        out.append(
            f'<text x="{left + (i + 0.5) * group_w:.1f}" y="{top + plot_h + 18}" '
            f'text-anchor="middle">{escape(r["label"])}</text>'
        )
        out.append(
            f'<text x="{left + (i + 0.5) * group_w:.1f}" y="{top + plot_h + 33}" '
            f'text-anchor="middle" fill="#666" font-size="10">'
            f'{escape(LABELS[baseline])} = '
            f'{escape(fmt_value(r["servers"][baseline]["value"], r["unit"]))} '
            f'{r["unit"]}</text>'
        )
    # The baseline, drawn last so that bars do not hide it.
    out.append(
        f'<line x1="{left}" x2="{left + plot_w}" y1="{y(1):.1f}" y2="{y(1):.1f}" stroke="black" '
        f'stroke-dasharray="5 4"/>'
    )
    out.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{y(0)}" stroke="black"/>')
    out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(0)}" y2="{y(0)}" stroke="black"/>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def table(rows, servers, header, cell):
    lines = ["| " + " | ".join(header + [LABELS[s] for s in servers]) + " |"]
    lines.append("|" + "|".join(["---"] * len(header) + ["---:"] * len(servers)) + "|")
    for r in rows:
        lines.append("| " + " | ".join(cell(r, None) + [cell(r, s)[0] for s in servers]) + " |")
    return lines


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--servers", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--runtime", type=int, required=True)
    ap.add_argument("--ramp", type=int, required=True)
    ap.add_argument("--reps", type=int, required=True)
    ap.add_argument("--clk-tck", type=int, required=True)
    ap.add_argument("--command", required=True)
    ap.add_argument("--superdisk-args", default="")
    ap.add_argument("--loadavg", default="?")
    ap.add_argument("--revision", default="unknown")
    ap.add_argument("--path", choices=["buffered", "direct"], default="buffered",
                    help="how the servers were reached and opened their files (bench.sh --path)")
    ap.add_argument("--baseline", default="nbdkit-file", help="the server every ratio is relative to")
    ap.add_argument("--out-name", default="latest", help="file name of the outputs, without suffix")
    ap.add_argument("--storage", default="", help="the direct path's device, in words")
    a = ap.parse_args()
    if a.baseline not in a.servers.split():
        sys.exit(f"bench_report: the baseline {a.baseline} is not among the servers")
    return a


def median_or_none(values):
    """The median, or None where any value is None (a server CPU figure where there is no server)."""
    values = list(values)
    return None if any(v is None for v in values) else statistics.median(values)


def load_rows(a, servers):
    runs = {}  # (workload, server) -> list of per-repetition measurements
    units = {w: u for w, _, u in WORKLOADS}
    with open(a.results) as f:
        next(f)
        for line in f:
            w, s, rep, ticks, path = line.rstrip("\n").split("\t")
            ticks = None if ticks == "-" else int(ticks)
            m = measure(load_fio(path), units[w], ticks, a.clk_tck)
            m["rep"] = int(rep)
            runs.setdefault((w, s), []).append(m)

    rows = []
    # A run limited with --workloads reports only the workloads it ran.
    measured = {w for w, _ in runs}
    for w, label, unit in WORKLOADS:
        if w not in measured:
            continue
        row = {"workload": w, "label": label, "unit": unit, "servers": {}}
        for s in servers:
            reps = runs.get((w, s))
            if not reps:
                sys.exit(f"bench_report: no runs of {w} on {s}")
            values = [m["value"] for m in reps]
            med = statistics.median(values)
            row["servers"][s] = {
                "value": med,
                "p50_us": statistics.median(m["p50_us"] for m in reps),
                "p99_us": statistics.median(m["p99_us"] for m in reps),
                "cpu_us_per_io": median_or_none(m["cpu_us_per_io"] for m in reps),
                # How far apart the repetitions were, relative to their median: a ratio that
                # differs from 1.0 by less than this is not a difference.
                "spread_pct": (max(values) - min(values)) / med * 100 if med else 0.0,
                "reps": reps,
            }
        base = row["servers"][a.baseline]["value"]
        for s in servers:
            row["servers"][s]["ratio"] = row["servers"][s]["value"] / base if base else 0.0
        rows.append(row)
    return rows


def on_tmpfs(a):
    return a.storage.startswith("tmpfs")


def intro(a, mach, now):
    """Title, command, machine and method: the buffered path's wording is today's, unchanged."""
    size_mib = a.size // (1024 * 1024)
    extra = f" superdisk serve extra args: `{a.superdisk_args}`." if a.superdisk_args else ""
    common = (f"{a.runtime} s measured after {a.ramp} s ramp per cell; servers alternated "
              f"round-robin, median of {a.reps}.")
    if a.path == "buffered":
        title = f"# superdisk benchmark — {now}"
        method = (f"fio nbd engine over loopback TCP (127.0.0.1), one connection, one job; {size_mib} "
                  f"MiB image of random data, page cache warm; {common}")
    else:
        device = "tmpfs, a near-zero-latency device" if on_tmpfs(a) else "the local disk"
        title = f"# superdisk benchmark, production path ({device}) — {now}"
        cache = ("the pages are the data on tmpfs" if on_tmpfs(a)
                 else "page cache dropped before each cell")
        method = (f"fio nbd engine over a Unix socket, one connection, one job; both devices opened "
                  f"O_DIRECT (superdisk `--direct true`, its cache `--cache-direct true`; qemu-nbd "
                  f"`--cache=none --aio=io_uring`; nbdkit file `cache=none`, see below); {size_mib} "
                  f"MiB image of random data per server on {a.storage or '?'}, {cache}; {common}")
    return [
        title,
        "",
        f"Command: `{a.command}` (superdisk at {a.revision})",
        "",
        f"Machine: {mach['nproc']} CPUs, {mach['cpu']}, Linux {mach['kernel']}; "
        f"{mach['fio']}, {mach['nbdkit']}, {mach['qemu-nbd']}.",
        method + extra + f" Load average before the run: {a.loadavg}.",
        "",
        "Throughput (IOPS for 4 KiB rows, MB/s = 10^6 bytes/s for 1 MiB rows) and ratio to "
        f"{LABELS[a.baseline]}:",
        "",
    ]


def fmt_cpu(v):
    return "–" if v is None else f"{v:.1f}"


def main_tables(a, rows, servers):
    def thr(r, s):
        if s is None:
            return [r["label"], r["unit"]]
        c = r["servers"][s]
        return [f"{fmt_value(c['value'], r['unit'])} ({c['ratio']:.2f}×)"]

    def per_server(key, fmt):
        return lambda r, s: [r["label"]] if s is None else [fmt(r["servers"][s][key])]

    md = table(rows, servers, ["workload", "unit"], thr)
    if a.path == "direct":
        md += ["", "p50 latency, submission to completion (µs):", ""]
        md += table(rows, servers, ["workload"], per_server("p50_us", fmt_us))
    md += ["", "p99 latency, submission to completion (µs):", ""]
    md += table(rows, servers, ["workload"], per_server("p99_us", fmt_us))
    md += ["", "Server CPU time (user + system, all threads) per I/O (µs):", ""]
    md += table(rows, servers, ["workload"], per_server("cpu_us_per_io", fmt_cpu))
    if a.reps > 1:
        md += ["", "Spread of throughput over the repetitions, (max − min) / median:", ""]
        md += table(rows, servers, ["workload"], per_server("spread_pct", lambda v: f"{v:.0f}%"))
    return md


def reference_ratios(rows, servers):
    """superdisk's throughput divided by each floor and peer, one line per workload and variant."""
    subjects = [s for s in SUBJECTS if s in servers]
    refs = [s for s in REFERENCES if s in servers]
    if not subjects or not refs:
        return []
    md = ["", "superdisk's throughput relative to each floor and peer:", ""]
    md.append("| workload | server | " + " | ".join(f"÷ {LABELS[s]}" for s in refs) + " |")
    md.append("|---|---|" + "|".join(["---:"] * len(refs)) + "|")
    for r in rows:
        for s in subjects:
            v = r["servers"][s]["value"]
            cells = [f"{v / r['servers'][x]['value']:.2f}×" if r["servers"][x]["value"] else "–"
                     for x in refs]
            md.append(f"| {r['label']} | {LABELS[s]} | " + " | ".join(cells) + " |")
    return md


def goal_list():
    """The production path's goals: (workload, wording, figure, bound) where bound(get) returns
    (target, how the target is made up) from get(server, figure), or raises KeyError when a
    reference server did not run. p50 and p99 figures must stay at or under the target, throughput
    at or over it."""
    def floors_plus(slack):
        def bound(get):
            null, dev = get("nbdkit-null", "p50_us"), get("device", "p50_us")
            return null + dev + slack, f"{fmt_us(null)} + {fmt_us(dev)} + {slack}"
        return bound

    def times(server, figure, k, unit):
        def bound(get):
            v = get(server, figure)
            shown = fmt_us(v) if figure != "value" else fmt_value(v, unit)
            return k * v, (f"{k:g} × " if k != 1 else "") + f"{LABELS[server]} {shown}"
        return bound

    def floor_min(get):
        null, dev = get("nbdkit-null", "value"), get("device", "value")
        return 0.8 * min(null, dev), f"0.8 × min({fmt_value(null, 'IOPS')}, {fmt_value(dev, 'IOPS')})"

    floors = "p50 ≤ socket floor + device floor"
    return [
        ("randread-4k-qd1", f"{floors} + 5 µs", "p50_us", floors_plus(5)),
        ("randread-4k-qd1", "p50 ≤ 0.8 × qemu-nbd's", "p50_us", times("qemu-nbd", "p50_us", 0.8, "")),
        ("randread-4k-qd1", "p99 ≤ qemu-nbd's", "p99_us", times("qemu-nbd", "p99_us", 1, "")),
        ("randread-4k-qd32", "IOPS ≥ 0.8 × min(socket floor, device floor)", "value", floor_min),
        ("randread-4k-qd32", "IOPS ≥ 2 × qemu-nbd's", "value", times("qemu-nbd", "value", 2, "IOPS")),
        ("randwrite-4k-qd1", f"{floors} + 10 µs (for superdisk + cache)", "p50_us", floors_plus(10)),
        ("randwrite-4k-qd32", "IOPS ≥ 1.5 × qemu-nbd's", "value",
         times("qemu-nbd", "value", 1.5, "IOPS")),
        ("read-1m-qd8", "MB/s ≥ 1.2 × qemu-nbd's", "value", times("qemu-nbd", "value", 1.2, "MB/s")),
        ("write-1m-qd8", "MB/s ≥ 1.2 × qemu-nbd's", "value", times("qemu-nbd", "value", 1.2, "MB/s")),
    ]


def goal_checks(rows, servers):
    """One line per goal whose workload ran: the target with its make-up, then each superdisk
    variant's figure and whether it meets it. Reported, never asserted."""
    subjects = [s for s in SUBJECTS if s in servers]
    by_workload = {r["workload"]: r for r in rows}
    if not subjects:
        return []
    md = ["", "Goals of the production path (socket floor = nbdkit null, device floor = device; "
          "p50 and p99 of the total latency):", ""]
    md.append("| workload | goal | target | " + " | ".join(LABELS[s] for s in subjects) + " |")
    md.append("|---|---|---|" + "|".join(["---"] * len(subjects)) + "|")
    for w, wording, figure, bound in goal_list():
        r = by_workload.get(w)
        if r is None:
            continue

        def get(server, key, r=r):
            if server not in r["servers"]:
                raise KeyError(server)
            return r["servers"][server][key]

        try:
            target, how = bound(get)
        except KeyError as missing:
            cells = ["–"] * len(subjects)
            md.append(f"| {r['label']} | {wording} | not checked: {LABELS[missing.args[0]]} did "
                      f"not run | " + " | ".join(cells) + " |")
            continue
        lower_is_better = figure != "value"
        shown = (lambda v: f"{fmt_us(v)} µs") if lower_is_better else (
            lambda v: f"{fmt_value(v, r['unit'])} {r['unit']}")
        cells = []
        for s in subjects:
            v = get(s, figure)
            met = v <= target if lower_is_better else v >= target
            cells.append(f"{shown(v)}: {'met' if met else '**not met**'}")
        sign = "≤" if lower_is_better else "≥"
        md.append(f"| {r['label']} | {wording} | {sign} {shown(target)} ({how}) | "
                  + " | ".join(cells) + " |")
    return md


def notes(a, servers):
    if a.path == "buffered":
        md = [
            "",
            "nbdkit null does no I/O at all: its row is the ceiling that fio, libnbd and loopback set "
            "with nbdkit's request handling on this machine (a server that spends less CPU per request "
            "can pass it). Client and servers share the same CPUs.",
        ]
    else:
        said = {
            "device": "device is fio's io_uring engine with O_DIRECT on its own copy of the image: no "
            "server and no socket, the floor the device sets (no server CPU to report).",
            "nbdkit-null": "nbdkit null does no I/O: its row is the floor that fio's nbd engine, "
            "libnbd and the Unix socket set with nbdkit's request handling.",
            "nbdkit-file": "nbdkit 1.32's file plugin cannot open its file O_DIRECT; `cache=none`, its "
            "closest, is buffered I/O that drops the pages it read or wrote.",
        }
        md = ["", " ".join([said[s] for s in said if s in servers]
                           + ["Client and servers share the same CPUs."])]
        if on_tmpfs(a):
            md += ["", "The images are on tmpfs (O_DIRECT there needs Linux 6.6+): the device costs "
                   "next to nothing, so each server's figures are its own overhead plus the socket."]
    if "nbdkit-file-cache" in servers:
        md += [
            "",
            "nbdkit file + cache filter is nbdkit's file plugin under `--filter=cache "
            "cache=writethrough`: each write goes to the filter's cache file and to the image, the "
            "same two page-cache writes superdisk + cache makes (nbdkit file writes one), so it is "
            "the like-for-like peer for superdisk + cache's writes.",
        ]
    return md + ["", f"![ratio to {LABELS[a.baseline]}]({a.out_name}.svg)", ""]


def main():
    a = parse_args()
    servers = a.servers.split()
    rows = load_rows(a, servers)
    mach = machine()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    md = intro(a, mach, now) + main_tables(a, rows, servers)
    if a.path == "direct":
        md += reference_ratios(rows, servers) + goal_checks(rows, servers)
    md += notes(a, servers)
    text = "\n".join(md)

    title = f"Throughput relative to {LABELS[a.baseline]}"
    if a.path == "direct":
        title += ", O_DIRECT over a Unix socket" + (" (tmpfs)" if on_tmpfs(a) else "")
    title += f" ({mach['nproc']} CPUs, median of {a.reps})"
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"{a.out_name}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.out, f"{a.out_name}.svg"), "w") as f:
        f.write(render_svg(rows, servers, title, a.baseline))
    with open(os.path.join(a.out, f"{a.out_name}.json"), "w") as f:
        json.dump(
            {
                "date": now,
                "command": a.command,
                "revision": a.revision,
                "path": a.path,
                "baseline": a.baseline,
                "storage": a.storage,
                "machine": mach,
                "size_bytes": a.size,
                "runtime_s": a.runtime,
                "ramp_s": a.ramp,
                "reps": a.reps,
                "loadavg_before": a.loadavg,
                "rows": rows,
            },
            f,
            indent=1,
        )
        f.write("\n")
    print(text)


if __name__ == "__main__":
    main()
