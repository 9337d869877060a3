# shellcheck shell=bash
# Sourced by every benchmark script: messages, tool checks, sizes, ports, CPU accounting. A script
# sets `prog` (its name, for messages) before sourcing; everything else is defined here once.

: "${prog:=$(basename "$0")}"

die() { echo "$prog: $*" >&2; exit 1; }
log() { echo "$prog: $*" >&2; }

# need TOOL HOW: fails with how to install TOOL if it is missing.
need() { command -v "$1" >/dev/null 2>&1 || die "missing tool '$1' ($2)"; }

# size_bytes SIZE: bytes of "4096", "64K", "256M", "1G" or "1T" (powers of 1024); dies on anything else.
size_bytes() {
    local s="$1" n mult=1
    case "$s" in
        *[kK]) mult=1024; n="${s%?}" ;;
        *[mM]) mult=$((1024 * 1024)); n="${s%?}" ;;
        *[gG]) mult=$((1024 * 1024 * 1024)); n="${s%?}" ;;
        *[tT]) mult=$((1024 * 1024 * 1024 * 1024)); n="${s%?}" ;;
        *) n="$s" ;;
    esac
    [[ "$n" =~ ^[0-9]+$ ]] || die "'$s' is not a size (bytes, or a number with K, M, G or T)"
    echo $((n * mult))
}

# A TCP port nobody listens on right now (there is a race with other processes; callers that bind
# check the bind).
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# cpu_ticks PID: utime + stime of the whole process (all threads, io_uring workers included), in
# clock ticks. Field numbers count from after the ")" that closes the command name, which may
# itself hold spaces.
cpu_ticks() {
    local stat
    stat="$(cat "/proc/$1/stat")" || die "pid $1 is gone"
    stat="${stat##*) }"
    # shellcheck disable=SC2086
    set -- $stat
    echo $(( ${12} + ${13} ))
}

# stop_pid PID: TERM, up to 10 s to exit, then KILL.
stop_pid() {
    local p="$1"
    [ -n "$p" ] || return 0
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
}

# A fio with the nbd engine: present in some distributions' builds only; ask rather than find out
# mid-run.
need_fio_nbd() {
    need fio "apt-get install fio"
    fio --enghelp=nbd 2>/dev/null | grep -q uri || die "this fio has no nbd engine (fio --enghelp=nbd)"
}

# Sets sd: $SUPERDISK, or a fresh `cargo build --release` of the checkout at $repo.
find_superdisk() {
    if [ -n "${SUPERDISK:-}" ]; then
        sd="$SUPERDISK"
    else
        need cargo "install a Rust toolchain, or set SUPERDISK to a built binary"
        log "building superdisk (cargo build --release)"
        (cd "${repo:?}" && cargo build --release --quiet) || die "cargo build --release failed"
        sd="$repo/target/release/superdisk"
    fi
    [ -x "$sd" ] || die "superdisk binary '$sd' is missing or not executable"
}

# Sets loadavg_start (warning when the machine is already busy) and run, a fresh directory under
# $bench_dir with fio/ inside it.
start_run_dir() {
    loadavg_start="$(cut -d' ' -f1-3 /proc/loadavg)"
    awk '{ exit !($1 > 1.0) }' /proc/loadavg \
        && log "warning: load average is $loadavg_start before we start; figures will be noisy"
    run="${bench_dir:?}/run-$(date +%Y%m%d-%H%M%S)"
    mkdir -p "$run/fio"
}
