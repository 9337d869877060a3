#!/usr/bin/python3
"""Reads JSON on stdin and prints one `path=value` line per scalar, e.g. `exports.0.export-size=1024`,
so that the Rust tests can assert on nbdinfo's and fio's JSON output without a JSON dependency.
Strings are printed bare, booleans as true/false, null as null."""

import json
import sys


def walk(prefix, v):
    if isinstance(v, dict):
        for k, x in v.items():
            walk(f"{prefix}{k}.", x)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            walk(f"{prefix}{i}.", x)
    else:
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif v is None:
            v = "null"
        print(f"{prefix[:-1]}={v}")


text = sys.stdin.read()
# fio prints a line or two (such as "fio: connected to NBD server") before its JSON document.
lines = text.splitlines(keepends=True)
first = next((i for i, line in enumerate(lines) if line[:1] in "{["), 0)
try:
    doc = json.loads("".join(lines[first:]))
except (ValueError, IndexError) as e:
    print(f"FAIL: not JSON ({e}):\n{text}", file=sys.stderr)
    sys.exit(1)
walk("", doc)
