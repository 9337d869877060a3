#!/usr/bin/env bash
# The one command that runs every test: installs the external clients the tests use, then checks
# formatting and lints, then runs unit, property, model and integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
shellcheck -x -S warning scripts/*.sh scripts/lib/*.sh
# The module docs carry the architecture's detail (docs/ARCHITECTURE.md is the map): links stay true.
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet
# Integration tests start daemons and mount filesystems; two at a time keeps a 2-core machine honest.
cargo test --lib --bins --tests -- --test-threads=2
# The criterion benches are built (clippy already linted them) but not run: timings never decide.
cargo build --benches --quiet
# The kernel's own NBD client against the debug binary cargo test just built (about 1-2 min here).
SUPERDISK_BIN=target/debug/superdisk scripts/kernel-e2e.sh
# `serve --ublk` in Debian's 6.12 kernel with ublk_drv (this machine's kernel has none): XFS, fio
# verification, SIGKILL and restart, in-place upgrade, stop/start, error lines (docs/UBLK.md).
SUPERDISK_BIN=target/debug/superdisk scripts/ublk-e2e.sh
# Every fuzz target from the committed corpus and past findings, 30 s each (docs/FUZZING.md).
scripts/fuzz-ci.sh --seconds 30
