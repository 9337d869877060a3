#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time and fails if any finds a crash.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60 s, all targets)
#
# Needs a nightly toolchain and cargo-fuzz (`rustup toolchain install nightly`,
# `cargo install cargo-fuzz`). Seeds come from fuzz/corpus/TARGET (committed, never written to);
# what libFuzzer discovers goes to fuzz/work/TARGET (ignored), so the seed set stays small and
# reviewable while repeated runs still build on earlier ones. Crashes land in fuzz/artifacts/TARGET.
set -euo pipefail

cd "$(dirname "$0")/../fuzz"
seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

cargo +nightly fuzz build
failed=()
for t in "${targets[@]}"; do
    mkdir -p "work/$t" "corpus/$t"
    echo "== fuzzing $t for ${seconds}s"
    # The first corpus directory receives new inputs, so the scratch one goes first.
    if ! cargo +nightly fuzz run "$t" "work/$t" "corpus/$t" -- -max_total_time="$seconds" -print_final_stats=1; then
        failed+=("$t")
    fi
done
if [ ${#failed[@]} -ne 0 ]; then
    echo "fuzz targets that failed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "all fuzz targets ran ${seconds}s without a failure"
