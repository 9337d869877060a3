#!/bin/sh
# Runs inside the ublk-guest (busybox sh): how libublk reports missing privileges and ids in use (docs/UBLK.md).
truncate -s 64M /tmp/a.img
echo "-- without CAP_SYS_ADMIN (root, bounding set without it):"
/usr/bin/setpriv --bounding-set -sys_admin grep Cap /proc/self/status
/usr/bin/setpriv --bounding-set -sys_admin ublk-spike features
/usr/bin/setpriv --bounding-set -sys_admin timeout 5 ublk-spike add /tmp/a.img 3; echo "rc=$?"
echo "-- no capabilities at all (the systemd unit's CapabilityBoundingSet=):"
/usr/bin/setpriv --bounding-set -all timeout 5 ublk-spike add /tmp/a.img 3; echo "rc=$?"
ls /sys/class/ublk-char/ 2>&1
