# shellcheck shell=bash disable=SC2154  # run_dir, size_b, superdisk_bin, pid_of: the caller's
# Sourced by bench.sh, bench-scale.sh and bench-ab.sh: the superdisk images and the mirror's cache, prepared the
# same way for both. Uses the caller's `log`, `die`, `superdisk_bin`, `size_b`, `run_dir`, `pid_of`.

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
    bench_warm_without_readahead "$run_dir/superdisk-mirror.cache.img"
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
