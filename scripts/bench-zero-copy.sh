#!/usr/bin/env bash
# A/B of `zero_copy_reads` (scripts/bench-ab.sh with these sides): 1 MiB sequential reads at QD8,
# the copying path (`--zero-copy-reads false`) against one way of sending from the page cache
# (`--mode sendfile`, the default, or `--mode mapped`), alternated round by round. A script, not a
# test: it asserts nothing about speed.
#
#   scripts/bench-zero-copy.sh [--mode sendfile|mapped] [--jobs "1 4"] [--rounds 3] [--unix]
#                              [--cache] [--fio "FIO ARGS"]
#
# --cache reads from a cache file (rebuilt once), as superdisk-mirror's reads in bench.sh.
# Environment as for scripts/bench-ab.sh; BENCH_DIR defaults to /tmp/superdisk-bench/zero-copy.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=sendfile
case "${1:-}" in
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    --mode) mode="${2:?--mode needs sendfile or mapped}"; shift 2 ;;
esac
case "$mode" in
    sendfile|mapped) ;;
    *) echo "--mode: $mode is not sendfile or mapped" >&2; exit 2 ;;
esac
# bench-ab.sh takes the last --fio it is given, so a caller's --fio replaces this default.
BENCH_DIR="${BENCH_DIR:-/tmp/superdisk-bench/zero-copy}" exec scripts/bench-ab.sh \
    --names "copying $mode" --a "--zero-copy-reads false" --b "--zero-copy-reads $mode" \
    --fio "--rw=read --bs=1M --iodepth=8" "$@"
