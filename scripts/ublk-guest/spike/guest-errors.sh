#!/bin/sh
# Runs inside the ublk-guest (busybox sh): how libublk reports missing privileges and ids in use (docs/UBLK.md).
truncate -s 64M /tmp/a.img
echo "-- without CAP_SYS_ADMIN (root, bounding set without it):"
setpriv --bounding-set -sys_admin ublk-spike features
setpriv --bounding-set -sys_admin timeout 5 ublk-spike add /tmp/a.img 3; echo "rc=$?"
echo "-- /run/ublksrvd read-only (libublk writes its json there):"
mkdir -p /run/ublksrvd; mount -t tmpfs -o ro tmpfs /run/ublksrvd
timeout 5 ublk-spike add /tmp/a.img 4; echo "rc=$?"; ls /sys/class/ublk-char/; umount /run/ublksrvd
echo "-- a second add of an id that a LIVE server holds:"
ublk-spike add /tmp/a.img 6 >/tmp/l.out 2>/tmp/l.err &
lpid=$!
sleep 2; cat /tmp/l.out; ublk-spike info 6
dd if=/dev/ublkb6 of=/dev/null bs=4k count=1 2>&1 | tail -n 1
timeout 5 ublk-spike add /tmp/a.img 6; echo "second add rc=$?"
sleep 1
ublk-spike info 6; echo "info rc=$?"
kill -0 $lpid 2>/dev/null && echo "first server still running" || echo "first server gone"
ls /dev/ublkb6 2>&1
dd if=/dev/ublkb6 of=/dev/null bs=4k count=1 2>&1 | tail -n 1
cat /tmp/l.err | tail -n 3
kill $lpid 2>/dev/null; true
