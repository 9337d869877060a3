#!/bin/sh
# Issue 20's end-to-end test of `superdisk serve --ublk`, run inside the 6.12 guest by
# scripts/ublk-e2e.sh (busybox sh). The daemon serves a mirror (backing + cache image files in the
# guest's RAM) as /dev/ublkb0 and over NBD on the guest's loopback. Checks: XFS with fio
# verification across a remount and xfs_repair -n; SIGKILL of the daemon under fio, then a
# restart that recovers the device (zero I/O errors); an in-place upgrade under fio; a stop
# that removes the device and a clean restart; the error lines; and the same fio job through
# /dev/ublkb0 and /dev/nbd0 side by side (a ratio only: the guest is emulated).
set -u
t() { awk '{ printf "%.2f", $1 }' /proc/uptime; }
say() { echo "ublk-e2e +$(t)s: $*"; }
bad() {
	say "FAILED: $*"
	for f in /tmp/d*.log; do [ -f "$f" ] && { echo "--- $f"; tail -n 20 "$f"; }; done
	dmesg | tail -n 30
	exit 1
}
since() { awk -v a="$1" -v b="$(t)" 'BEGIN { printf "%.2f", b - a }'; }
SD=/usr/bin/superdisk
CONF=/tmp/superdisk.toml
SOCK=/tmp/admin.sock
FIO_SIZE=48M
RUN=20

# start_daemon LOG: starts `superdisk serve` on the config in the background, waits for READY
# (the line naming /dev/ublkb0) and sets $dpid.
start_daemon() {
	"$SD" serve --config "$CONF" >"$1" 2>&1 &
	dpid=$!
	i=0
	until grep -q "/dev/ublkb0" "$1" 2>/dev/null && [ -b /dev/ublkb0 ]; do
		i=$((i + 1))
		[ "$i" -le 600 ] || bad "the daemon did not come up (log $1)"
		kill -0 "$dpid" 2>/dev/null || bad "the daemon exited (log $1)"
		sleep 0.1
	done
}

fio_verify() { # NAME RUNTIME [extra fio args]: random writes, verified as they go
	name=$1 runtime=$2
	shift 2
	fio --name="$name" --filename="/mnt/$name.fio" --size=$FIO_SIZE --rw=randwrite --bsrange=4k-64k \
		--ioengine=libaio --iodepth=8 --direct=1 --verify=crc32c --verify_backlog=16 --verify_fatal=1 \
		--time_based --runtime="$runtime" --end_fsync=1 --group_reporting --eta=never \
		--write_lat_log="/tmp/$name" --log_avg_msec=0 "$@"
}

# seq_file write|verify: a 16 MiB file written sequentially with checksums, verified later
# (random overwrites of mixed sizes cannot be re-verified after the fact; this can).
seq_file() {
	extra="--do_verify=0"
	[ "$1" = verify ] && extra="--verify_only=1"
	fio --name=seq --filename=/mnt/seq.fio --size=16M --rw=write --bs=64k --ioengine=libaio --iodepth=8 \
		--direct=1 --verify=crc32c --end_fsync=1 --eta=never $extra >/tmp/seq.out 2>&1 || {
		tail -n 20 /tmp/seq.out
		bad "seq_file $1"
	}
}

# longest_pause NAME: the slowest completion fio logged, in ms.
longest_pause() {
	cat /tmp/"$1"_clat.*.log 2>/dev/null | awk -F, '{ if ($2 > m) m = $2 } END { printf "%.0f", m / 1000000 }'
}

no_io_errors() {
	if dmesg | grep -E 'I/O error|Buffer I/O|XFS .*(rror|Corruption|shutdown)'; then bad "I/O errors in dmesg ($1)"; fi
}

say "== set-up: a 512 MiB mirror in the guest's memory"
mkdir -p /mnt
truncate -s 520M /tmp/cache.img
"$SD" create --backing /tmp/backing.img --size 512M --cache /tmp/cache.img >/tmp/create.log 2>&1 || {
	cat /tmp/create.log
	bad "superdisk create"
}
cat >"$CONF" <<EOF
backing = "/tmp/backing.img"
cache = ["/tmp/cache.img"]
listen = "127.0.0.1:10809"
admin_socket = "$SOCK"
ublk = true
ublk_queues = 2
ublk_queue_depth = 32
EOF

say "== errors: one line each"
for img in other third; do
	truncate -s 64M /tmp/$img.img
	"$SD" create --backing /tmp/$img.img >/dev/null 2>&1 || bad "create $img"
done
"$SD" serve --backing /tmp/other.img --listen "" --ublk --ublk-id 7 >/tmp/e1.log 2>&1 &
e1=$!
i=0
until [ -b /dev/ublkb7 ] || [ "$i" -ge 300 ]; do i=$((i + 1)); sleep 0.1; done
[ -b /dev/ublkb7 ] || { cat /tmp/e1.log; bad "a daemon on ublk id 7 did not come up"; }
if "$SD" serve --backing /tmp/third.img --listen "" --ublk --ublk-id 7 >/tmp/e2.log 2>&1; then bad "a second device took id 7"; fi
grep "ublk device id 7 is in use" /tmp/e2.log || { cat /tmp/e2.log; bad "no 'in use' line"; }
if "$SD" serve --backing /tmp/other.img --listen "" --ublk >/tmp/e3.log 2>&1; then bad "a second daemon served the same backing"; fi
tail -n 1 /tmp/e3.log
if /usr/bin/setpriv --bounding-set -sys_admin "$SD" serve --backing /tmp/third.img --listen "" --ublk >/tmp/e4.log 2>&1; then
	bad "served without CAP_SYS_ADMIN"
fi
grep -i "CAP_SYS_ADMIN" /tmp/e4.log || { cat /tmp/e4.log; bad "no CAP_SYS_ADMIN line"; }
chown 1000:1000 /tmp/third.img
if /usr/bin/setpriv --reuid 1000 --regid 1000 --clear-groups "$SD" serve --backing /tmp/third.img --listen "" --ublk \
	>/tmp/e5.log 2>&1; then
	bad "served as a user who cannot open /dev/ublk-control"
fi
grep "/dev/ublk-control cannot be opened" /tmp/e5.log || { cat /tmp/e5.log; bad "no permission line"; }
kill "$e1"
wait "$e1" || { cat /tmp/e1.log; bad "the daemon on id 7 did not stop cleanly"; }
[ ! -e /dev/ublkb7 ] || bad "/dev/ublkb7 still there after the daemon stopped"
say "errors reported; a stopped daemon removed its device"

say "== XFS on /dev/ublkb0, fio with verification, remount, xfs_repair -n"
start_daemon /tmp/d1.log
cat /sys/block/ublkb0/queue/logical_block_size /sys/block/ublkb0/queue/write_cache /sys/block/ublkb0/queue/fua \
	/sys/block/ublkb0/queue/discard_max_bytes /sys/block/ublkb0/size | tr '\n' ' '
echo "(logical block, write cache, fua, discard max, sectors)"
mkfs.xfs -f -q /dev/ublkb0 || bad mkfs
mount -t xfs /dev/ublkb0 /mnt || bad mount
fio_verify base 8 >/tmp/fio-base.out 2>&1 || { tail -n 30 /tmp/fio-base.out; bad "fio"; }
seq_file write
dd if=/dev/urandom of=/mnt/blob bs=1M count=16 2>/dev/null
sum1=$(md5sum /mnt/blob | cut -d' ' -f1)
fstrim -v /mnt || bad fstrim
umount /mnt || bad umount
mount -t xfs /dev/ublkb0 /mnt || bad remount
[ "$(md5sum /mnt/blob | cut -d' ' -f1)" = "$sum1" ] || bad "checksum changed across remount"
seq_file verify
no_io_errors "first pass"
say "fio verified, checksum kept across remount"

say "== SIGKILL the daemon under fio, restart it"
fio_verify crash $RUN >/tmp/fio-crash.out 2>&1 &
fpid=$!
sleep 6
say "kill -9 $dpid"
kill -9 "$dpid"
wait "$dpid" 2>/dev/null
sleep 0.5
t0=$(t)
start_daemon /tmp/d2.log
say "restarted and serving in $(since "$t0")s"
grep -E "recovering|ublk device serving" /tmp/d2.log
grep -q "recovered=true" /tmp/d2.log || bad "the restarted daemon did not recover the device"
wait "$fpid" || { tail -n 30 /tmp/fio-crash.out; bad "fio under SIGKILL"; }
no_io_errors "SIGKILL"
seq_file verify
say "fio: zero errors across the crash; longest completion $(longest_pause crash) ms"

say "== in-place upgrade under fio"
fio_verify upgrade $RUN >/tmp/fio-upgrade.out 2>&1 &
fpid=$!
sleep 6
t0=$(t)
"$SD" upgrade --socket "$SOCK" --binary "$SD" || bad "upgrade refused"
say "upgrade returned in $(since "$t0")s"
wait "$fpid" || { tail -n 30 /tmp/fio-upgrade.out; bad "fio under upgrade"; }
no_io_errors "upgrade"
"$SD" status --socket "$SOCK" | grep -E "^ublk|pid" || bad "status"
say "fio: zero errors across the upgrade; longest completion $(longest_pause upgrade) ms"

say "== an upgrade whose successor fails with the state: the daemon takes the device back"
printf '#!/bin/sh\n[ "$1" = serve ] && export SUPERDISK_INJECT_READ_STALL=nonsense\nexec %s "$@"\n' "$SD" \
	>/tmp/fails-with-the-state
chmod +x /tmp/fails-with-the-state
pid_before=$(pidof superdisk)
fio_verify failed $RUN >/tmp/fio-failed.out 2>&1 &
fpid=$!
sleep 6
if "$SD" upgrade --socket "$SOCK" --binary /tmp/fails-with-the-state >/tmp/failed-upgrade.out 2>&1; then
	bad "an upgrade to a failing successor succeeded"
fi
cat /tmp/failed-upgrade.out
wait "$fpid" || { tail -n 30 /tmp/fio-failed.out; bad "fio under a failed upgrade"; }
no_io_errors "failed upgrade"
[ "$(pidof superdisk)" = "$pid_before" ] || bad "the old daemon should still serve (was $pid_before, now $(pidof superdisk))"
"$SD" status --socket "$SOCK" | grep -E "^ublk" || bad "status after the failed upgrade"
say "fio: zero errors across the failed upgrade; longest completion $(longest_pause failed) ms"

say "== NBD beside ublk: the same fio jobs (relative figures: TCG guest)"
umount /mnt
nbd-client 127.0.0.1 10809 /dev/nbd0 -N superdisk -b 4096 >/dev/null 2>&1 || bad "nbd-client"
for job in "randread 4k 1" "randread 4k 32" "read 1m 8"; do
	set -- $job
	for dev in /dev/ublkb0 /dev/nbd0; do
		iops=$(fio --name=cmp --filename=$dev --rw="$1" --bs="$2" --iodepth="$3" --ioengine=libaio --direct=1 \
			--size=256M --time_based --runtime=4 --readonly --output-format=terse --terse-version=3 2>/dev/null |
			awk -F';' '{ print $8 }')
		printf '%-9s %-4s QD%-3s %-12s %8s IOPS\n' "$1" "$2" "$3" "$dev" "$iops"
	done
done | tee /tmp/compare.txt
nbd-client -d /dev/nbd0 >/dev/null 2>&1

say "== stop removes the device; a fresh start serves the same data"
"$SD" status --socket "$SOCK" >/dev/null || bad "status before stop"
pid=$(pidof superdisk)
kill -TERM $pid
for p in $pid; do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done
[ ! -e /dev/ublkb0 ] || bad "/dev/ublkb0 still there after SIGTERM"
start_daemon /tmp/d3.log
grep -q "recovered=false" /tmp/d3.log || bad "a fresh start should add a new device"
mount -t xfs /dev/ublkb0 /mnt || bad "mount after restart"
[ "$(md5sum /mnt/blob | cut -d' ' -f1)" = "$sum1" ] || bad "checksum changed across stop/start"
seq_file verify
umount /mnt
xfs_repair -n /dev/ublkb0 >/tmp/repair.out 2>&1 || { cat /tmp/repair.out; bad "xfs_repair -n"; }
say "== a crash, then ublk turned off: the daemon names the waiting device; detach removes it"
kill -9 "$(pidof superdisk)"
sleep 0.5
[ -b /dev/ublkb0 ] || bad "after SIGKILL the device must stay, waiting"
"$SD" serve --backing /tmp/backing.img --cache /tmp/cache.img --listen 127.0.0.1:10810 >/tmp/d4.log 2>&1 &
dpid=$!
i=0
until grep -q "listening" /tmp/d4.log || [ "$i" -ge 600 ]; do i=$((i + 1)); sleep 0.1; done
grep "waits for a daemon with .ublk = true." /tmp/d4.log || { cat /tmp/d4.log; bad "no warning about the waiting device"; }
kill -TERM "$dpid"
wait "$dpid" || bad "the daemon without ublk did not stop cleanly"
"$SD" detach /dev/ublkb0 || bad "detach /dev/ublkb0"
[ ! -e /dev/ublkb0 ] || bad "/dev/ublkb0 still there after detach"
if "$SD" detach /dev/ublkb0 >/tmp/e6.log 2>&1; then bad "detach of a missing device succeeded"; fi
cat /tmp/e6.log
no_io_errors "end"
say "PASS: xfs_repair -n clean, data intact after SIGKILL, upgrade and stop/start; a left device named and removed"
