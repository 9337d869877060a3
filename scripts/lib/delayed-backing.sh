# shellcheck shell=bash
# shellcheck disable=SC2154  # $run comes from the sourcing script; die() and stop_pid() from lib/common.sh
# Sourced by bench-mirror.sh and bench-hedge.sh: a backing with network-disk latency, i.e. an image
# served by nbdkit's delay filter and presented as a file by nbdfuse, and the clean-up for it.
# The caller sources lib/common.sh first and sets $run (working directory, with $run/fuse created).

nbdkit_pid=""
fuse_up=0

# start_delayed_backing IMG NBDKIT_DELAY_ARGS...: serves IMG through the delay filter (e.g. rdelay=1ms
# wdelay=2ms) and presents it as $run/fuse/backing, the same size as IMG.
start_delayed_backing() {
    local img="$1"
    shift
    nbdkit -f -U "$run/nbdkit.sock" -P "$run/nbdkit.pid" --filter=delay file "$img" "$@" 2>"$run/nbdkit.log" &
    nbdkit_pid=$!
    for _ in $(seq 100); do [ -e "$run/nbdkit.pid" ] && break; sleep 0.1; done
    [ -e "$run/nbdkit.pid" ] || die "nbdkit did not start: $(cat "$run/nbdkit.log")"
    nbdfuse -P "$run/nbdfuse.pid" "$run/fuse/backing" "nbd+unix:///?socket=$run/nbdkit.sock" 2>"$run/nbdfuse.log" &
    fuse_up=1
    for _ in $(seq 100); do [ -e "$run/nbdfuse.pid" ] && break; sleep 0.1; done
    [ "$(stat -c %s "$run/fuse/backing" 2>/dev/null)" = "$(stat -c %s "$img")" ] \
        || die "nbdfuse did not present the backing"
}

# stop_delayed_backing: after whatever held the FUSE file has exited.
stop_delayed_backing() {
    if [ "$fuse_up" = 1 ]; then fusermount3 -u "$run/fuse" 2>/dev/null || fusermount3 -uz "$run/fuse" 2>/dev/null || true; fi
    fuse_up=0
    stop_pid "$nbdkit_pid"
    nbdkit_pid=""
}
