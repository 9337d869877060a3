#!/bin/sh
# Runs inside the ublk-guest (busybox sh). Needs ublk-spike, mkfs.xfs, xfs_repair, fio in the guest.
set -u
t() { awk '{ printf "%.2f", $1 }' /proc/uptime; }
say() { echo "spike-test +$(t)s: $*"; }
bad() { say "FAILED: $*"; dmesg | tail -n 30; exit 1; }

# wait_ready LOG: waits for the spike's READY line (30 s).
wait_ready() {
	i=0
	while ! grep -q '^READY' "$1"; do
		i=$((i + 1)); [ "$i" -le 300 ] || { cat "$1"; bad "no READY in $1"; }
		sleep 0.1
	done
	grep '^READY' "$1"
}

say "== error reporting"
ublk-spike errors

say "== zero copy flag on this kernel (UBLK_F_AUTO_BUF_REG)"
truncate -s 64M /tmp/zc.img
timeout 10 ublk-spike add /tmp/zc.img 5 zc >/tmp/zc.out 2>&1 &
zpid=$!
sleep 3
cat /tmp/zc.out
ublk-spike info 5 || true
kill "$zpid" 2>/dev/null; wait "$zpid"
ublk-spike del 5 || true

say "== add a file-backed device with USER_RECOVERY|REISSUE"
truncate -s 512M /tmp/disk.img
ublk-spike add /tmp/disk.img 0 >/tmp/s1.out 2>/tmp/s1.err &
spid=$!
wait_ready /tmp/s1.out
ublk-spike info 0
cat /sys/block/ublkb0/queue/logical_block_size /sys/block/ublkb0/queue/write_cache /sys/block/ublkb0/queue/fua \
	/sys/block/ublkb0/queue/discard_max_bytes /sys/block/ublkb0/queue/write_zeroes_max_bytes /sys/block/ublkb0/size | tr '\n' ' '
echo "(lbs, write_cache, fua, discard_max, write_zeroes_max, sectors)"
ls /sys/block/ublkb0/mq
t0=$(t)
mkfs.xfs -f -q /dev/ublkb0 || bad mkfs
say "mkfs.xfs took $(awk -v a="$t0" -v b="$(t)" 'BEGIN { print b - a }')s"
mount -t xfs /dev/ublkb0 /mnt || bad mount

say "== fio with verification; SIGKILL the server under it, recover"
fio --name=rec --filename=/mnt/rec.fio --size=64M --rw=randwrite --bsrange=4k-64k --ioengine=libaio \
	--iodepth=8 --direct=1 --verify=crc32c --verify_backlog=16 --verify_fatal=1 --time_based --runtime=25 \
	--end_fsync=1 --group_reporting --eta=never --write_lat_log=/tmp/rec --log_avg_msec=0 >/tmp/fio.out 2>&1 &
fpid=$!
sleep 8
say "kill -9 server pid $spid"
kill -9 "$spid"; wait "$spid" 2>/dev/null
cat /tmp/s1.err | tail -n 5
sleep 0.5
ublk-spike info 0
t0=$(t)
ublk-spike recover 0 /tmp/disk.img >/tmp/s2.out 2>/tmp/s2.err &
spid=$!
wait_ready /tmp/s2.out
say "recovered in $(awk -v a="$t0" -v b="$(t)" 'BEGIN { print b - a }')s"
cat /tmp/s2.err
ublk-spike info 0
wait "$fpid"; frc=$?
tail -n 25 /tmp/fio.out
for f in /tmp/rec_clat.*.log; do
	awk -F, '{ ms = $2 / 1000000; if (ms > 200) printf "pause %.0f ms at %.1f s\n", ms, $1 / 1000 }' "$f"
done | tail -n 10
[ "$frc" = 0 ] || bad "fio exited $frc"
if dmesg | grep -E 'I/O error|Buffer I/O|XFS .*(rror|Corruption|shutdown)'; then bad "I/O errors in dmesg"; fi
say "fio passed, no I/O errors in dmesg"

say "== verify again after remount; xfs_repair -n"
fio --name=rec --filename=/mnt/rec.fio --size=64M --rw=randwrite --bsrange=4k-64k --ioengine=libaio \
	--iodepth=8 --direct=1 --verify=crc32c --verify_only=1 --group_reporting --eta=never >/dev/null 2>&1
dd if=/dev/urandom of=/mnt/blob bs=1M count=16 2>/dev/null
sum1=$(md5sum /mnt/blob | cut -d' ' -f1)
fstrim -v /mnt || true
umount /mnt || bad umount
mount -t xfs /dev/ublkb0 /mnt || bad remount
sum2=$(md5sum /mnt/blob | cut -d' ' -f1)
[ "$sum1" = "$sum2" ] || bad "checksum changed across remount"
say "checksum ok across remount"
umount /mnt
xfs_repair -n /dev/ublkb0 >/tmp/repair.out 2>&1 || { cat /tmp/repair.out; bad "xfs_repair -n"; }
say "xfs_repair -n clean"

say "== first use of each op type (server's stderr)"
cat /tmp/s2.err

say "== stop: SIGTERM leaves a recoverable device (USER_RECOVERY), del removes it"
kill "$spid"; wait "$spid" 2>/dev/null
sleep 0.5
ublk-spike info 0
ublk-spike del 0 || bad "del 0"
[ ! -e /dev/ublkb0 ] || bad "/dev/ublkb0 still there after del"
say "device deleted"
dmesg | grep -i ublk | tail -n 20
