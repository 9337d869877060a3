#!/usr/bin/env bash
# Longer fuzzing runs on a developer machine, and corpus upkeep. CI runs scripts/fuzz-ci.sh.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   fuzz (default: 300 s, all targets, in turn)
#   scripts/fuzz.sh --seeds                            regenerate the server/meta seeds from real
#                                                      clients and images (fuzz/make_corpus.py)
#   scripts/fuzz.sh --cmin [TARGET...]                 minimize the committed corpus in place
#
# Seeds come from fuzz/corpus/TARGET (committed, kept small, never written to by a run); what
# libFuzzer discovers goes to fuzz/work/TARGET (ignored), so repeated runs build on earlier ones.
# Crashes land in fuzz/artifacts/TARGET. Built with AddressSanitizer unless FUZZ_SANITIZER=none.
# The stable toolchain is used, with RUSTC_BOOTSTRAP=1 for the -Z flags cargo-fuzz passes (see
# docs/FUZZING.md).
set -euo pipefail

cd "$(dirname "$0")/.."
export RUSTC_BOOTSTRAP=1
san="${FUZZ_SANITIZER:-address}"
build_flags=(--release --debug-assertions --codegen-units 16 --sanitizer "$san" --target-dir "target/$san")

case "${1:-}" in
-h | --help)
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
--seeds)
    cargo build
    /usr/bin/python3 fuzz/make_corpus.py --bin target/debug/superdisk
    exec "$0" --cmin server meta
    ;;
--cmin)
    shift
    cd fuzz
    targets=("$@")
    [ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
    for t in "${targets[@]}"; do
        before=$(find "corpus/$t" -type f | wc -l)
        cargo fuzz cmin "${build_flags[@]}" "$t" "corpus/$t" -- -max_len=81920
        echo "== $t: $before seeds -> $(find "corpus/$t" -type f | wc -l)"
    done
    du -sh --apparent-size corpus
    exit 0
    ;;
esac

seconds="${1:-300}"
shift || true
cd fuzz
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
cargo fuzz build "${build_flags[@]}"
failed=()
for t in "${targets[@]}"; do
    mkdir -p "work/$t"
    echo "== fuzzing $t for ${seconds}s"
    # The first corpus directory receives new inputs, so the scratch one goes first.
    if [ -d "regressions/$t" ] && [ -n "$(ls -A "regressions/$t")" ]; then
        # Past findings, once each; outside the fuzzing corpus (some are deliberately heavy).
        if ! cargo fuzz run "${build_flags[@]}" "$t" "regressions/$t"/* -- -timeout=60; then
            failed+=("$t")
            continue
        fi
    fi
    if ! cargo fuzz run "${build_flags[@]}" "$t" "work/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=60 -rss_limit_mb=3072 -max_len=81920 -print_final_stats=1; then
        failed+=("$t")
    fi
done
if [ ${#failed[@]} -ne 0 ]; then
    echo "fuzz targets that failed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "all fuzz targets ran ${seconds}s without a failure"
