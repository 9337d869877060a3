"""Fetches a superdisk /metrics page and parses it with Prometheus' own text parser.

Checks what the format promises beyond parsing: every histogram's buckets are cumulative and end in
+Inf equal to _count, counters are non-negative. Prints one JSON object: {"types": {family: type},
"samples": {"name{k=v,...}": value}} for the test to assert on. Exit 1 on any violation.
Usage: metrics_check.py URL
"""
import json
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def key(name, labels):
    inner = ",".join(f"{k}={labels[k]}" for k in sorted(labels))
    return f"{name}{{{inner}}}" if inner else name


def main():
    url = sys.argv[1]
    with urllib.request.urlopen(url, timeout=10) as r:
        ctype = r.headers.get("Content-Type", "")
        text = r.read().decode()
    if not ctype.startswith("text/plain"):
        sys.exit(f"unexpected Content-Type {ctype!r}")
    types, samples, problems = {}, {}, []
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        buckets = {}
        for s in fam.samples:
            samples[key(s.name, s.labels)] = s.value
            if fam.type == "counter" and s.value < 0:
                problems.append(f"negative counter {key(s.name, s.labels)}")
            if fam.type == "histogram" and s.name.endswith("_bucket"):
                series = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                buckets.setdefault(series, []).append((float(s.labels["le"]), s.value))
        for series, bs in buckets.items():
            les = [le for le, _ in bs]
            counts = [c for _, c in bs]
            if les != sorted(les) or les[-1] != float("inf"):
                problems.append(f"{fam.name}{series}: bucket bounds not increasing to +Inf")
            if any(a > b for a, b in zip(counts, counts[1:])):
                problems.append(f"{fam.name}{series}: buckets not cumulative")
            count = samples.get(key(fam.name + "_count", dict(series)))
            if count != counts[-1]:
                problems.append(f"{fam.name}{series}: +Inf bucket {counts[-1]} != _count {count}")
    if problems:
        sys.exit("\n".join(problems))
    print(json.dumps({"types": types, "samples": samples}))


if __name__ == "__main__":
    main()
