#!/usr/bin/env bash
# A/B of `zero_copy_reads` (scripts/bench-ab.sh with these sides): 1 MiB sequential reads at QD8,
# the copying path (`--zero-copy-reads false`) against `sendfile` (`--zero-copy-reads true`),
# alternated round by round. A script, not a test: it asserts nothing about speed.
#
#   scripts/bench-zero-copy.sh [--jobs "1 4"] [--rounds 3] [--unix] [--cache]
#
# --cache reads from a cache file (rebuilt once), as superdisk-mirror's reads in bench.sh.
# Environment as for scripts/bench-ab.sh; BENCH_DIR defaults to /tmp/superdisk-bench/zero-copy.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in -h|--help) sed -n '2,9p' "$0"; exit 0 ;; esac
BENCH_DIR="${BENCH_DIR:-/tmp/superdisk-bench/zero-copy}" exec scripts/bench-ab.sh \
    --names "copying sendfile" --a "--zero-copy-reads false" --b "--zero-copy-reads true" \
    --fio "--rw=read --bs=1M --iodepth=8" "$@"
