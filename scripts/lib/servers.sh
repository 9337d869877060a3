# shellcheck shell=bash disable=SC2154  # run_dir, size_b, servers: the caller's
# Sourced by bench.sh, bench-scale.sh and bench-ab.sh after lib/common.sh: the peer servers every
# comparison runs (superdisk alone and with a cache, nbdkit file, nbdkit file + cache filter,
# qemu-nbd, nbdkit null), their images, start-up, readiness and clean-up, done the same way for all
# of them. The caller sets `run_dir`, `size_b` and `servers` (a word list); tool paths may be
# overridden with FIO, NBDKIT, NBDINFO, QEMU_NBD, and NBDKIT_PLUGINS names a directory of plugins.
#
# `bench_path` picks how the servers are reached and open their files: `buffered` (the default, and
# all that bench-scale.sh and bench-ab.sh use) is TCP loopback with page-cache-warm images;
# `direct` (bench.sh --path direct, the production path) is a Unix socket per server, every image
# opened O_DIRECT where the server can, and `device`: no server at all, fio on its own image file.

: "${bench_path:=buffered}"
known_servers="superdisk superdisk-mirror nbdkit-file nbdkit-file-cache qemu-nbd nbdkit-null"
known_direct_servers="device nbdkit-null superdisk superdisk-mirror qemu-nbd nbdkit-file"
fio="${FIO:-fio}"; nbdkit="${NBDKIT:-nbdkit}"; nbdinfo="${NBDINFO:-nbdinfo}"; qemu_nbd="${QEMU_NBD:-qemu-nbd}"
declare -A pid_of uri_of port_of
pids=()
fio_pid=""
superdisk_bin=""

# nbdkit's plugin argument: its name, or the .so under NBDKIT_PLUGINS (a device machine without
# nbdkit installed gets the plugins carried beside the binary).
plugin_arg() {
    if [ -n "${NBDKIT_PLUGINS:-}" ]; then echo "$NBDKIT_PLUGINS/nbdkit-$1-plugin.so"; else echo "$1"; fi
}

# The server every ratio is relative to: nbdkit file on the buffered path; on the direct path
# qemu-nbd, the peer that opens its image O_DIRECT (nbdkit 1.32's file plugin cannot).
bench_baseline() {
    if [ "$bench_path" = direct ]; then echo qemu-nbd; else echo nbdkit-file; fi
}

# The tools every listed server and fio's nbd engine need; dies naming what is missing.
bench_check_tools() {
    local s plugin known="$known_servers" base
    need "$fio" "apt-get install fio"
    need "$nbdinfo" "apt-get install libnbd-bin"
    need python3 "apt-get install python3"
    need getconf "libc-bin"
    "$fio" --enghelp=nbd 2>/dev/null | grep -q uri || die "this fio has no nbd engine ($fio --enghelp=nbd)"
    [ "$bench_path" != direct ] || known="$known_direct_servers"
    for s in $servers; do
        [[ " $known " == *" $s "* ]] || die "unknown server '$s' for the $bench_path path (known: $known)"
        case "$s" in
            superdisk|superdisk-mirror) ;;
            device)
                "$fio" --enghelp=io_uring >/dev/null 2>&1 || die "this fio has no io_uring engine" ;;
            nbdkit-file|nbdkit-null|nbdkit-file-cache)
                need "$nbdkit" "apt-get install nbdkit"
                plugin="${s#nbdkit-}"; plugin="${plugin%-cache}"
                "$nbdkit" "$(plugin_arg "$plugin")" --version >/dev/null 2>&1 \
                    || die "nbdkit cannot load its '$plugin' plugin"
                [ "$s" != nbdkit-file-cache ] || "$nbdkit" --filter=cache null --version >/dev/null 2>&1 \
                    || die "nbdkit has no cache filter"
                ;;
            qemu-nbd) need "$qemu_nbd" "apt-get install qemu-utils" ;;
        esac
    done
    base="$(bench_baseline)"
    [[ " $servers " == *" $base "* ]] || die "$base must be among the servers: every ratio is relative to it"
}

# Which superdisk is measured: the commit, and whether the tree has edits on top. Taken before the
# run, since the tree may change during a run that lasts a quarter of an hour.
bench_revision() {
    local rev
    rev="$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    git -C "$repo" diff --quiet HEAD -- 2>/dev/null || rev+=" with uncommitted changes"
    echo "$rev"
}

# Sets superdisk_bin: $SUPERDISK, or a fresh `cargo build --release`; only when a superdisk runs.
bench_superdisk_bin() {
    [[ " $servers " == *" superdisk "* || " $servers " == *" superdisk-mirror "* ]] || return 0
    local sd
    find_superdisk
    superdisk_bin="$sd"
}

# Installed as the EXIT trap: stops a running fio and every server this script started (by PID,
# TERM then KILL), removes the images and keeps the small logs and raw fio output.
bench_cleanup() {
    local rc=$? p
    # A fio still running would only fail against servers that are about to go.
    [ -z "$fio_pid" ] || kill -TERM "$fio_pid" 2>/dev/null || true
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do stop_pid "$p"; done
    rm -f "$run_dir"/*.img "$run_dir"/*.sock "$run_dir"/data.raw
    exit "$rc"
}
bench_traps() {
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# Random bytes, so that reads move real data (a zero-filled file is sparse and reads of holes are
# cheaper than reads of data); every file server (and the direct path's device) gets its own copy
# of the same bytes. Buffered: every image is read once so that the page cache is warm for all
# alike. Direct: written back and dropped from the page cache instead, so that nbdkit file (which
# cannot open O_DIRECT) starts as cold as the others, and O_DIRECT writes have no cached pages to
# invalidate.
bench_make_images() {
    local s
    log "writing $size_b bytes of random data to $run_dir"
    head -c "$size_b" /dev/urandom >"$run_dir/data.raw"
    for s in $servers; do
        case "$s" in
            nbdkit-file|nbdkit-file-cache|qemu-nbd|device) cp "$run_dir/data.raw" "$run_dir/$s.img" ;;
            superdisk|superdisk-mirror) bench_create_superdisk "$s" ;;
        esac
    done
    rm -f "$run_dir/data.raw"
    if [ "$bench_path" = direct ]; then
        sync
        bench_evict "$run_dir"/*.img
    else
        cat "$run_dir"/*.img >/dev/null 2>&1 || true
    fi
}

# bench_evict FILE…: drops the files' clean pages from the page cache (after a sync, all of them).
# Not on tmpfs: there the pages are the data itself, and eviction could only push them to swap.
bench_evict() {
    [ "$(stat -f -c %T "$1")" != tmpfs ] || return 0
    python3 -c 'import os, sys
for path in sys.argv[1:]:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)' "$@"
}

# Starts server $1 on a free loopback port, in the foreground of its own process so that $! is the
# server and its CPU time is its own. The direct path has its own start-up, bench_start_direct.
bench_start_server() {
    local s="$1" port errlog="$run_dir/$1.log"
    [ "$bench_path" != direct ] || { bench_start_direct "$s"; return; }
    port="$(free_port)"
    # shellcheck disable=SC2034  # read by bench-scale.sh, which counts connections per port
    port_of[$s]="$port"
    uri_of[$s]="nbd://127.0.0.1:$port"
    case "$s" in
        superdisk|superdisk-mirror)
            local cache_args=()
            [ "$s" = superdisk ] || cache_args=(--cache "$run_dir/$s.cache.img")
            # shellcheck disable=SC2086  # the *_ARGS are word lists on purpose
            "$superdisk_bin" serve --backing "$run_dir/$s.img" "${cache_args[@]}" --listen "127.0.0.1:$port" \
                ${SUPERDISK_ARGS:-} ${cache_args:+${SUPERDISK_MIRROR_ARGS:-}} 2>"$errlog" &
            uri_of[$s]+="/superdisk"
            ;;
        nbdkit-file)
            "$nbdkit" -f -i 127.0.0.1 -p "$port" "$(plugin_arg file)" "$run_dir/$s.img" 2>"$errlog" & ;;
        nbdkit-file-cache)
            # The filter's cache file is created (and unlinked) in TMPDIR: the same filesystem as
            # the image and superdisk-mirror's cache file, and removed with the run.
            TMPDIR="$run_dir" "$nbdkit" -f -i 127.0.0.1 -p "$port" --filter=cache "$(plugin_arg file)" \
                "$run_dir/$s.img" cache=writethrough 2>"$errlog" & ;;
        qemu-nbd)
            # -e: qemu-nbd serves one client unless told more; the scaling runs open up to 64.
            "$qemu_nbd" -f raw -t -e 64 -x bench -b 127.0.0.1 -p "$port" --cache=writeback \
                --aio=threads "$run_dir/$s.img" 2>"$errlog" &
            uri_of[$s]+="/bench"
            ;;
        nbdkit-null)
            "$nbdkit" -f -i 127.0.0.1 -p "$port" "$(plugin_arg null)" "$size_b" 2>"$errlog" & ;;
    esac
    pid_of[$s]=$!
    pids+=("$!")
}

# The direct path's server $1: a Unix socket in the run directory (no TCP: the production client
# is local), the image opened O_DIRECT. `device` starts nothing; its "URI" is the image that fio
# opens itself. nbdkit 1.32's file plugin has no O_DIRECT; cache=none (buffered I/O that drops
# the pages it used) is its closest.
bench_start_direct() {
    local s="$1" sock="$run_dir/$1.sock" img="$run_dir/$1.img" errlog="$run_dir/$1.log"
    # sun_path holds 108 bytes with the terminating NUL; a longer path fails late and obscurely.
    [ "${#sock}" -le 107 ] || die "socket path $sock is longer than 107 bytes: use a shorter BENCH_DIR"
    rm -f "$sock"
    case "$s" in
        device) uri_of[$s]="$img"; return ;;
        superdisk|superdisk-mirror)
            local cache_args=()
            [ "$s" = superdisk ] || cache_args=(--cache "$run_dir/$s.cache.img" --cache-direct true)
            # shellcheck disable=SC2086  # the *_ARGS are word lists on purpose
            "$superdisk_bin" serve --backing "$img" "${cache_args[@]}" --unix "$sock" --listen "" \
                --direct true ${SUPERDISK_ARGS:-} ${cache_args:+${SUPERDISK_MIRROR_ARGS:-}} 2>"$errlog" &
            uri_of[$s]="nbd+unix:///superdisk?socket=$sock"
            ;;
        qemu-nbd)
            "$qemu_nbd" -f raw -t -e 64 -x bench -k "$sock" --cache=none --aio=io_uring "$img" 2>"$errlog" &
            uri_of[$s]="nbd+unix:///bench?socket=$sock"
            ;;
        nbdkit-file)
            "$nbdkit" -f -U "$sock" "$(plugin_arg file)" "$img" cache=none 2>"$errlog" &
            uri_of[$s]="nbd+unix:///?socket=$sock"
            ;;
        nbdkit-null)
            "$nbdkit" -f -U "$sock" "$(plugin_arg null)" "$size_b" 2>"$errlog" &
            uri_of[$s]="nbd+unix:///?socket=$sock"
            ;;
    esac
    pid_of[$s]=$!
    pids+=("$!")
}

# Up means: the process still runs and a real NBD client completes a handshake and sees the size.
bench_wait_up() {
    local s="$1" got=""
    for _ in $(seq 100); do
        kill -0 "${pid_of[$s]}" 2>/dev/null || die "$s exited during startup: $(tail -n 5 "$run_dir/$s.log")"
        got="$("$nbdinfo" --size "${uri_of[$s]}" 2>/dev/null || true)"
        [ "$got" = "$size_b" ] && return 0
        sleep 0.1
    done
    die "$s did not come up at ${uri_of[$s]} within 10 s (size seen: '${got:-none}'): $(tail -n 5 "$run_dir/$s.log")"
}

# Every listed server started and ready; the mirror's cache fully rebuilt.
bench_start_all() {
    local s
    for s in $servers; do bench_start_server "$s"; done
    for s in $servers; do
        [ "$s" != device ] || continue  # no server: fio opens the image itself
        bench_wait_up "$s"; log "$s up at ${uri_of[$s]} (pid ${pid_of[$s]})"
    done
    [[ " $servers " != *" superdisk-mirror "* ]] || bench_wait_mirror_rebuilt
}

# bench_open_window SERVER JSON CONNS LABEL: waits until the fio started as $fio_pid reports
# CONNS connections in JSON, then the ramp; sets c0 to the server's CPU ticks at the window's start.
# Server CPU is read over the measured window only, as fio's I/O counts are: the window opens ramp
# seconds after fio reports its connections (fio takes a few hundred ms to start, too much to
# guess) and closes when fio exits, after which the server is idle.
bench_open_window() {
    local s="$1" json="$2" n="$3" label="$4" seen=0 got
    for _ in $(seq 2000); do
        # Empty until the backgrounded fio's shell has created JSON: count that as none yet.
        got="$(grep -c "connected to NBD server" "$json" 2>/dev/null || true)"
        [ "${got:-0}" -ge "$n" ] && { seen=1; break; }
        kill -0 "$fio_pid" 2>/dev/null || break
        sleep 0.005
    done
    if [ "$seen" = 0 ]; then
        wait "$fio_pid" || true
        die "fio never reported $n connection(s) to $s ($label): $(tail -n 5 "$json.err")"
    fi
    sleep "$ramp"
    # shellcheck disable=SC2034  # the caller's window start
    c0="$(cpu_ticks "${pid_of[$s]}")"
}

# Copies the random data to "$run_dir/$1.img" and prepares it with `superdisk create`;
# for superdisk-mirror also a cache file, "$run_dir/$1.cache.img".
bench_create_superdisk() {
    local s="$1"
    cp "$run_dir/data.raw" "$run_dir/$s.img"
    local cache_args=()
    if [ "$s" = superdisk-mirror ]; then
        truncate -s "$((size_b + 64 * 1024 * 1024))" "$run_dir/$s.cache.img"
        cache_args=(--cache "$run_dir/$s.cache.img")
    fi
    # The exported disk is the file's first bytes; create only appends metadata at the tail.
    "$superdisk_bin" create --backing "$run_dir/$s.img" --size "$size_b" "${cache_args[@]}" \
        >"$run_dir/$s-create.log" 2>&1 \
        || die "superdisk create failed: $(cat "$run_dir/$s-create.log")"
    cmp -n "$size_b" "$run_dir/data.raw" "$run_dir/$s.img" >/dev/null \
        || die "superdisk create changed the first $size_b bytes of the image"
}

# The mirror is measured once its cache holds the whole disk (reads then never touch the backing).
bench_wait_mirror_rebuilt() {
    for _ in $(seq 6000); do
        grep -q "rebuild complete" "$run_dir/superdisk-mirror.log" && break
        kill -0 "${pid_of[superdisk-mirror]}" 2>/dev/null || die "superdisk-mirror died during its rebuild"
        sleep 0.1
    done
    grep -q "rebuild complete" "$run_dir/superdisk-mirror.log" || die "superdisk-mirror did not finish its rebuild in 10 min"
    # An O_DIRECT cache never reads through the page cache; warming it would only cost time.
    [ "$bench_path" = direct ] || bench_warm_without_readahead "$run_dir/superdisk-mirror.cache.img"
    log "superdisk-mirror: cache rebuilt"
}

# Reads file $1 into the page cache as the other images are warmed, but without readahead:
# readahead fills the page cache with large folios, and on ext4 (Linux 6.18) every 4 KiB buffered
# write into a large folio walks all its blocks, which would measure that instead of the server
# (the daemon drops the rebuild's pages for the same reason; docs/PERFORMANCE.md).
bench_warm_without_readahead() {
    python3 -c 'import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
while os.read(fd, 1 << 20):
    pass' "$1"
}
