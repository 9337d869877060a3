#!/usr/bin/env bash
# CI's fuzzing pass: builds every cargo-fuzz target and runs each for a bounded time from the
# committed corpus (fuzz/corpus/TARGET) and past findings (fuzz/regressions/TARGET), two at a
# time; fails on any crash, hang or memory-limit hit and prints the reproducer. See
# docs/FUZZING.md.
#
#   scripts/fuzz-ci.sh [--seconds N] [--jobs N] [--sanitizer none|address] [TARGET...]
#                      (defaults: 45 s per target, 2 at a time, no sanitizer, all targets)
#
# No sanitizer by default: the code under test is safe Rust but for a few audited buffers, and
# without ASan the build is faster and each target runs about three times as many inputs in the
# same time (scripts/fuzz.sh, for developer runs, uses ASan). The toolchain is stable: cargo-fuzz's
# -Z flags are accepted through RUSTC_BOOTSTRAP=1 (the same compiler, its unstable options
# unlocked), so no nightly toolchain is needed. cargo-fuzz is installed from crates.io when
# missing. Discovered inputs go to a scratch directory, never into the committed corpus.
set -euo pipefail

usage() {
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

seconds=45
jobs=2
sanitizer=none
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --sanitizer) sanitizer="$2"; shift 2 ;;
    -h | --help) usage ;;
    -*) echo "fuzz-ci: unknown option $1" >&2; usage 2 ;;
    *) targets+=("$1"); shift ;;
    esac
done

cd "$(dirname "$0")/../fuzz"
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

# 16 codegen units: cargo-fuzz defaults to 1, which makes the build several times longer on a
# 2-core machine for a few percent of fuzzing speed.
# Each sanitizer builds into its own directory, so CI and developer runs do not rebuild each other.
build_flags=(--release --debug-assertions --codegen-units 16 --sanitizer "$sanitizer" --target-dir "target/$sanitizer")
start=$(date +%s)
echo "== building ${targets[*]}"
cargo fuzz build "${build_flags[@]}"
built=$(date +%s)
echo "== built in $((built - start)) s"

bin_dir="target/$sanitizer/x86_64-unknown-linux-gnu/release"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# Inputs bigger than libFuzzer's 4 KiB default: whole metadata tails, recorded client sessions.
max_len() {
    case "$1" in
    meta) echo 81920 ;;
    server) echo 65536 ;;
    *) echo 4096 ;;
    esac
}

run_one() {
    local t="$1" log="$scratch/$1.log"
    mkdir -p "$scratch/$t" "artifacts/$t"
    # -timeout: one input running this long is a hang; -rss_limit_mb: the process as a whole
    # (the server target also checks its own heap bound per input).
    # Past findings (fuzz/regressions/TARGET) run once each first, so a fixed bug stays fixed. They
    # stay out of the fuzzing corpus: some are deliberately heavy and would slow every mutation.
    local regressions=()
    [ -d "regressions/$t" ] && mapfile -t regressions < <(find "regressions/$t" -type f | sort)
    if [ ${#regressions[@]} -gt 0 ] && ! "$bin_dir/$t" -artifact_prefix="artifacts/$t/" -timeout=60 \
        "${regressions[@]}" >"$log" 2>&1; then
        echo "FAIL $t: a regression input fails again" >&2
        tail -n 40 "$log" >&2
        grep -E '^Running: ' "$log" | tail -n 1 | sed 's/^Running: /reproducer: fuzz\//' >&2
        return 1
    fi
    if "$bin_dir/$t" "$scratch/$t" "corpus/$t" \
        -artifact_prefix="artifacts/$t/" -max_total_time="$seconds" -timeout=60 -rss_limit_mb=3072 \
        -max_len="$(max_len "$t")" -print_final_stats=1 >"$log" 2>&1; then
        echo "ok   $t: $(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}') runs," \
            "$(grep -E '^stat::new_units_added' "$log" | awk '{print $2}') new inputs"
        return 0
    fi
    echo "FAIL $t" >&2
    tail -n 60 "$log" >&2
    local found
    found=$(grep -oE 'Test unit written to [^ ]+' "$log" | awk '{print $NF}' | tail -n 1)
    if [ -n "$found" ]; then
        echo "reproducer: fuzz/$found" >&2
        echo "replay:     (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run ${build_flags[*]} $t $found)" >&2
    fi
    return 1
}

failed=()
pids=()
names=()
for t in "${targets[@]}"; do
    [ -x "$bin_dir/$t" ] || { echo "fuzz-ci: no binary for target $t" >&2; exit 2; }
    run_one "$t" &
    pids+=($!)
    names+=("$t")
    if [ ${#pids[@]} -ge "$jobs" ]; then
        wait "${pids[0]}" || failed+=("${names[0]}")
        pids=("${pids[@]:1}")
        names=("${names[@]:1}")
    fi
done
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || failed+=("${names[$i]}")
done

end=$(date +%s)
echo "== fuzzing took $((end - built)) s; total $((end - start)) s"
if [ ${#failed[@]} -ne 0 ]; then
    echo "fuzz-ci: targets that failed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz-ci: all ${#targets[@]} targets ran ${seconds}s each without a failure"
