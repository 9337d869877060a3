#!/usr/bin/env python3
"""Turn the raw output of scripts/bench.sh into a table (Markdown, also printed) and a plot (SVG).

Reads results.tsv (one line per fio run: workload, server, repetition, server CPU ticks over the
measured window, path of fio's JSON) and writes latest.md, latest.svg and latest.json into --out.
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
}
COLOURS = {
    "superdisk": "#d1495b",
    "superdisk-mirror": "#6a4c93",
    "nbdkit-file": "#2e86ab",
    "nbdkit-file-cache": "#00798c",
    "qemu-nbd": "#edae49",
    "nbdkit-null": "#8d8d8d",
}
BASELINE = "nbdkit-file"


def load_fio(path):
    """fio prints the nbd engine's "connected" line on stdout ahead of the JSON; skip to the JSON."""
    with open(path) as f:
        text = f.read()
    start = 0 if text.startswith("{") else text.find("\n{") + 1
    if start == 0 and not text.startswith("{"):
        sys.exit(f"bench_report: no JSON in {path}")
    return json.loads(text[start:])


def measure(fio, unit, cpu_ticks, clk_tck):
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
    p99_us = side["lat_ns"]["percentile"]["99.000000"] / 1000.0
    cpu_us_per_io = cpu_ticks / clk_tck * 1e6 / ios
    return {
        "value": value,
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


def render_svg(rows, servers, title):
    """Grouped bars, one group per workload, bar height = throughput ratio to nbdkit file."""
    width, height = 900, 440
    left, right, top, bottom = 60, 20, 70, 70
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
        f"throughput ÷ nbdkit file</text>"
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
            f'nbdkit file = {escape(fmt_value(r["servers"][BASELINE]["value"], r["unit"]))} '
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


def main():
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
    a = ap.parse_args()
    servers = a.servers.split()

    runs = {}  # (workload, server) -> list of per-repetition measurements
    units = {w: u for w, _, u in WORKLOADS}
    with open(a.results) as f:
        next(f)
        for line in f:
            w, s, rep, ticks, path = line.rstrip("\n").split("\t")
            m = measure(load_fio(path), units[w], int(ticks), a.clk_tck)
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
                "p99_us": statistics.median(m["p99_us"] for m in reps),
                "cpu_us_per_io": statistics.median(m["cpu_us_per_io"] for m in reps),
                # How far apart the repetitions were, relative to their median: a ratio that
                # differs from 1.0 by less than this is not a difference.
                "spread_pct": (max(values) - min(values)) / med * 100 if med else 0.0,
                "reps": reps,
            }
        base = row["servers"][BASELINE]["value"]
        for s in servers:
            row["servers"][s]["ratio"] = row["servers"][s]["value"] / base if base else 0.0
        rows.append(row)

    mach = machine()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    size_mib = a.size // (1024 * 1024)

    md = [
        f"# superdisk benchmark — {now}",
        "",
        f"Command: `{a.command}` (superdisk at {a.revision})",
        "",
        f"Machine: {mach['nproc']} CPUs, {mach['cpu']}, Linux {mach['kernel']}; "
        f"{mach['fio']}, {mach['nbdkit']}, {mach['qemu-nbd']}.",
        f"fio nbd engine over loopback TCP (127.0.0.1), one connection, one job; {size_mib} MiB image "
        f"of random data, page cache warm; {a.runtime} s measured after {a.ramp} s ramp per cell; "
        f"servers alternated round-robin, median of {a.reps}."
        + (f" superdisk serve extra args: `{a.superdisk_args}`." if a.superdisk_args else "")
        + f" Load average before the run: {a.loadavg}.",
        "",
        "Throughput (IOPS for 4 KiB rows, MB/s = 10^6 bytes/s for 1 MiB rows) and ratio to nbdkit "
        "file:",
        "",
    ]

    def thr(r, s):
        if s is None:
            return [r["label"], r["unit"]]
        c = r["servers"][s]
        return [f"{fmt_value(c['value'], r['unit'])} ({c['ratio']:.2f}×)"]

    md += table(rows, servers, ["workload", "unit"], thr)
    md += ["", "p99 latency, submission to completion (µs):", ""]
    md += table(
        rows,
        servers,
        ["workload"],
        lambda r, s: [r["label"]] if s is None else [fmt_us(r["servers"][s]["p99_us"])],
    )
    md += ["", "Server CPU time (user + system, all threads) per I/O (µs):", ""]
    md += table(
        rows,
        servers,
        ["workload"],
        lambda r, s: [r["label"]] if s is None else [f"{r['servers'][s]['cpu_us_per_io']:.1f}"],
    )
    if a.reps > 1:
        md += ["", "Spread of throughput over the repetitions, (max − min) / median:", ""]
        md += table(
            rows,
            servers,
            ["workload"],
            lambda r, s: [r["label"]] if s is None else [f"{r['servers'][s]['spread_pct']:.0f}%"],
        )
    md += [
        "",
        "nbdkit null does no I/O at all: its row is the ceiling that fio, libnbd and loopback set "
        "with nbdkit's request handling on this machine (a server that spends less CPU per request "
        "can pass it). Client and servers share the same CPUs.",
    ]
    if "nbdkit-file-cache" in servers:
        md += [
            "",
            "nbdkit file + cache filter is nbdkit's file plugin under `--filter=cache "
            "cache=writethrough`: each write goes to the filter's cache file and to the image, the "
            "same two page-cache writes superdisk + cache makes (nbdkit file writes one), so it is "
            "the like-for-like peer for superdisk + cache's writes.",
        ]
    md += [
        "",
        "![ratio to nbdkit file](latest.svg)",
        "",
    ]
    text = "\n".join(md)

    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "latest.md"), "w") as f:
        f.write(text)
    title = f"Throughput relative to nbdkit file ({mach['nproc']} CPUs, median of {a.reps})"
    with open(os.path.join(a.out, "latest.svg"), "w") as f:
        f.write(render_svg(rows, servers, title))
    with open(os.path.join(a.out, "latest.json"), "w") as f:
        json.dump(
            {
                "date": now,
                "command": a.command,
                "revision": a.revision,
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
