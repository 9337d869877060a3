#!/usr/bin/env bash
# Sets up superdisk on a Google Cloud VM: the local SSDs become the read mirror of a persistent
# disk, `superdisk attach` attaches the export as /dev/nbdX (and keeps it attached through daemon
# restarts and upgrades), and XFS on it is mounted for the
# database (/var/lib/scylla by default).
#
#   scripts/gcp-setup.sh [--dry-run] [--name NAME] [--pd-name DEVICE_NAME | --backing PATH]
#                        [--cache PATH]... [--mountpoint DIR] [--nbd-device /dev/nbdN]
#                        [--connections N] [--io-timeout SECS] [--dead-timeout SECS]
#                        [--metrics [HOST:]PORT | --metrics ""]
#                        [--for-service UNIT | --for-service ""] [--binary PATH | --deb PATH]
#                        [--replace-config] [--take-over-cache] [--no-mount] [--root DIR]
#
#   --dry-run          print every step and every command, change nothing
#   --name             instance name: /etc/superdisk/NAME.toml, superdisk@NAME      (default disk0)
#   --pd-name          the persistent disk's device name (/dev/disk/by-id/google-DEVICE_NAME)
#   --backing          the persistent disk by path. Without either, the one persistent disk that
#                      is neither a local SSD nor in use (mounted, partitioned, swap, held by md/dm)
#                      is taken; with several candidates the script stops and lists them
#   --cache            a local SSD; repeat for several. Default: every
#                      /dev/disk/by-id/google-local-nvme-ssd-* and google-local-ssd-* link
#   --mountpoint       where the XFS filesystem is mounted                (default /var/lib/scylla)
#   --nbd-device       the kernel device                                         (default /dev/nbd0)
#   --connections      connections the kernel spreads requests over                      (default 4)
#   --io-timeout       seconds before an unanswered request is resent                   (default 10)
#   --dead-timeout     seconds I/O waits for the daemon to come back before failing   (default 120)
#   --metrics          Prometheus endpoint of the daemon ("" for none)      (default 127.0.0.1:9510)
#   --for-service      a unit that needs the mount: gets a RequiresMountsFor= drop-in, so it starts
#                      after the mount and stops before it          (default scylla-server.service)
#   --binary           install this superdisk binary as /usr/local/bin/superdisk first
#   --deb              install this superdisk package (scripts/package.sh) with apt-get instead:
#                      /usr/bin/superdisk and the units in /usr/lib/systemd/system come from it,
#                      and the script writes only the drop-ins and the mount unit. A superdisk@NAME
#                      already running keeps its binary until `superdisk upgrade --instance NAME`
#   --replace-config   overwrite an existing /etc/superdisk/NAME.toml or NAME.nbd.env that differs
#                      from what this script would write (the old one is kept as .bak)
#   --take-over-cache  let `superdisk create` format local SSDs that hold other data
#   --no-mount         stop after attaching /dev/nbdX (no mkfs, no mount)
#   --root DIR         treat DIR as / for every file it reads or writes (/dev, /etc, /proc, /sys,
#                      /usr/local/bin); also SUPERDISK_SETUP_ROOT. For tests: only with --dry-run,
#                      and the live state of services, NBD devices and mounts is not queried
#
# Safe to run again: files that already hold the right content, a running service, an attached
# device, an existing filesystem and a mounted one are left alone, and the run says so. It never
# makes a filesystem on a device that has one, and never picks a disk that is mounted or holds the
# root filesystem. `superdisk create` itself refuses a persistent disk whose tail holds data and
# SSDs that hold another superdisk's data (unless --take-over-cache).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
units_src="$repo/systemd"

prog="gcp-setup"
die() { echo "$prog: error: $*" >&2; exit 1; }
say() { echo "$prog: $*"; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }

name="disk0"
pd_name=""
backing=""
caches=()
mountpoint="/var/lib/scylla"
nbd_device="/dev/nbd0"
connections=4
io_timeout_secs=10
dead_timeout_secs=120
metrics="127.0.0.1:9510"
for_service="scylla-server.service"
binary=""
deb=""
replace_config=0
take_over_cache=0
no_mount=0
dry_run=0
root="${SUPERDISK_SETUP_ROOT:-}"

need_arg() { [ "$2" -ge 2 ] || die "$1 needs a value (try --help)"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --name) need_arg "$1" $#; name="$2"; shift ;;
        --pd-name) need_arg "$1" $#; pd_name="$2"; shift ;;
        --backing) need_arg "$1" $#; backing="$2"; shift ;;
        --cache) need_arg "$1" $#; caches+=("$2"); shift ;;
        --mountpoint) need_arg "$1" $#; mountpoint="$2"; shift ;;
        --nbd-device) need_arg "$1" $#; nbd_device="$2"; shift ;;
        --connections) need_arg "$1" $#; connections="$2"; shift ;;
        --io-timeout) need_arg "$1" $#; io_timeout_secs="$2"; shift ;;
        --dead-timeout) need_arg "$1" $#; dead_timeout_secs="$2"; shift ;;
        --metrics) need_arg "$1" $#; metrics="$2"; shift ;;
        --for-service) need_arg "$1" $#; for_service="$2"; shift ;;
        --binary) need_arg "$1" $#; binary="$2"; shift ;;
        --deb) need_arg "$1" $#; deb="$2"; shift ;;
        --replace-config) replace_config=1 ;;
        --take-over-cache) take_over_cache=1 ;;
        --no-mount) no_mount=1 ;;
        --root) need_arg "$1" $#; root="$2"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
    shift
done

# --- arguments --------------------------------------------------------------------------------------

[[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$ ]] \
    || die "--name '$name': use letters, digits, '-' and '_' (it names files and systemd units)"
[ -z "$pd_name" ] || [[ "$pd_name" =~ ^[A-Za-z0-9][A-Za-z0-9_-]*$ ]] \
    || die "--pd-name '$pd_name' is not a GCP device name (letters, digits, '-', '_')"
[ -z "$pd_name" ] || [ -z "$backing" ] || die "give --pd-name or --backing, not both"
[ -z "$binary" ] || [ -z "$deb" ] || die "give --binary or --deb, not both"
[[ "$nbd_device" =~ ^/dev/nbd([0-9]+)$ ]] || die "--nbd-device '$nbd_device' is not /dev/nbdN"
nbd_index="${BASH_REMATCH[1]}"
if ! [[ "$connections" =~ ^[1-9][0-9]*$ ]] || [ "$connections" -gt 64 ]; then
    die "--connections '$connections': a number from 1 to 64"
fi
[[ "$io_timeout_secs" =~ ^[1-9][0-9]*$ ]] || die "--io-timeout '$io_timeout_secs': a whole number of seconds, at least 1"
[[ "$dead_timeout_secs" =~ ^[1-9][0-9]*$ ]] || die "--dead-timeout '$dead_timeout_secs': a whole number of seconds, at least 1"
[[ "$mountpoint" == /* && "$mountpoint" != "/" ]] || die "--mountpoint '$mountpoint' must be an absolute path other than /"
[ -z "$metrics" ] || [[ "$metrics" =~ ^(([A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\])?:)?[0-9]{1,5}$ ]] \
    || die "--metrics '$metrics' is not [HOST:]PORT"
[ -z "$for_service" ] || [[ "$for_service" =~ ^[A-Za-z0-9@_.:-]+\.service$ ]] \
    || die "--for-service '$for_service' is not a service unit name"
if [ -n "$root" ]; then
    [ "$dry_run" = 1 ] || die "--root (SUPERDISK_SETUP_ROOT) is for tests and works only with --dry-run"
    [ -d "$root" ] || die "--root '$root' is not a directory"
    root="$(cd "$root" && pwd)"
fi

# Every path this script reads or writes, relative to the root it runs against.
by_id="$root/dev/disk/by-id"
etc_dir="$root/etc/superdisk"
unit_dir="$root/etc/systemd/system"
mounts_file="$root/proc/self/mounts"
swaps_file="$root/proc/swaps"
sys_block="$root/sys/class/block"
bin_path="$root/usr/local/bin/superdisk"
# The package installs the binary where packages do.
[ -z "$deb" ] || bin_path="$root/usr/bin/superdisk"
config="$etc_dir/$name.toml"
nbd_env="$etc_dir/$name.nbd.env"
where="$root$mountpoint"

# --- tools ------------------------------------------------------------------------------------------

need() { command -v "$1" >/dev/null 2>&1 || die "missing tool '$1' ($2)"; }
need systemd-escape "apt-get install systemd"
need blkid "apt-get install util-linux"
need dd "coreutils"
need od "coreutils"
need cmp "apt-get install diffutils"
need diff "apt-get install diffutils"
need blockdev "apt-get install util-linux"
# Even a dry run reads the devices (signatures, superdisk's tail); unreadable would look blank.
[ "$(id -u)" = 0 ] || [ -n "$root" ] || die "run as root (a dry run too: it reads the devices)"
if [ "$dry_run" = 0 ]; then
    need systemctl "apt-get install systemd"
    need udevadm "apt-get install udev"
    need findmnt "apt-get install util-linux"
    need modprobe "apt-get install kmod"
    [ "$no_mount" = 1 ] || need mkfs.xfs "apt-get install xfsprogs"
fi
for u in superdisk@.service superdisk-nbd@.service; do
    if [ -n "$deb" ]; then
        # A copy in /etc/systemd/system (an earlier setup without the package) would override the
        # package's unit and keep running /usr/local/bin/superdisk.
        [ ! -e "$unit_dir/$u" ] || die "$unit_dir/$u overrides the package's unit (it runs \
/usr/local/bin/superdisk): remove it (and /usr/local/bin/superdisk) first, or leave out --deb"
    else
        [ -f "$units_src/$u" ] || die "$units_src/$u is missing (run the script from a superdisk checkout)"
    fi
done
if [ -n "$deb" ]; then
    need dpkg-deb "apt-get install dpkg"
    [ -f "$deb" ] || die "--deb $deb is not a file"
    deb="$(cd "$(dirname "$deb")" && pwd)/$(basename "$deb")"
    deb_name="$(dpkg-deb -f "$deb" Package 2>/dev/null)" || die "--deb $deb is not a Debian package"
    [ "$deb_name" = superdisk ] || die "--deb $deb is the package '$deb_name', not superdisk"
    deb_version="$(dpkg-deb -f "$deb" Version)"
fi

# --- how commands and files are handled --------------------------------------------------------------

changes=0
if [ "$dry_run" = 1 ]; then
    say "dry run: nothing is changed; '+' lines are the commands a real run would execute"
    [ -z "$root" ] || say "--root $root: services, NBD devices and mounts are not queried; assuming none is set up"
fi

# Prints a command the way `set -x` would and runs it, unless this is a dry run.
run() {
    local q
    q="$(printf ' %q' "$@")"
    echo "+${q}"
    [ "$dry_run" = 1 ] || "$@"
}

# install_file DEST MODE SRC [KIND]: writes DEST when it is missing or differs from SRC. KIND
# "config": an existing file that differs was edited by the operator or written for other devices,
# and is replaced only with --replace-config. KIND "copy": SRC is a file of this checkout (a dry run
# names it rather than printing it).
install_file() {
    local dest="$1" mode="$2" src="$3" kind="${4:-}"
    if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
        say "unchanged: $dest"
        return 0
    fi
    if [ -f "$dest" ] && [ "$kind" = config ] && [ "$replace_config" = 0 ]; then
        echo "$prog: $dest exists and differs from what this run would write:" >&2
        diff -u --label "$dest (existing)" --label "$dest (this run)" "$dest" "$src" >&2 || true
        die "refusing to overwrite $dest: run with the arguments that wrote it, or pass --replace-config"
    fi
    changes=$((changes + 1))
    if [ "$dry_run" = 1 ]; then
        local verb="write"
        [ ! -f "$dest" ] || verb="replace"
        if [ "$kind" = copy ]; then
            say "would $verb $dest with a copy of $src"
        else
            say "would $verb $dest:"
            sed 's/^/    /' "$src"
        fi
        return 0
    fi
    mkdir -p "$(dirname "$dest")"
    if [ -f "$dest" ]; then
        cp -p "$dest" "$dest.bak"
        say "replacing $dest (the previous one is kept as $dest.bak)"
    else
        say "writing $dest"
    fi
    install -m "$mode" "$src" "$dest.tmp.$$"
    mv -f "$dest.tmp.$$" "$dest"
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# --- device inspection (read-only) ------------------------------------------------------------------

size_bytes() {
    local real
    real="$(readlink -f "$1")"
    if [ -b "$real" ]; then blockdev --getsize64 "$real"; else stat -L -c %s "$real"; fi
}

# superdisk's superblock sits in one of the last two 4 KiB blocks (docs/FORMAT.md): magic
# "SPRDISK\x01" at 0, role at 12 (1 backing, 2 cache), generation at 16, data_size_bytes at 56.
# Prints "ROLE EXPORT_BYTES" from the newer slot, or nothing. The checksum is not checked here:
# this only decides what to tell the operator; `superdisk create` is the judge.
le_u64() {
    local s="" i
    local -a b=("$@")
    for ((i = ${#b[@]} - 1; i >= 0; i--)); do s+="${b[i]}"; done
    echo $((16#$s))
}
superdisk_tail() {
    local dev="$1" size blocks best_gen=-1 out="" slot
    size="$(size_bytes "$dev")" || return 0
    [ "$size" -ge 8192 ] || return 0
    blocks=$((size / 4096))
    for slot in 2 1; do
        local -a h
        read -r -a h <<<"$(dd if="$dev" bs=4096 skip=$((blocks - slot)) count=1 status=none 2>/dev/null \
            | od -An -tx1 -v -N64 | tr '\n' ' ')"
        [ "${#h[@]}" -eq 64 ] || continue
        [ "${h[*]:0:8}" = "53 50 52 44 49 53 4b 01" ] || continue
        local role gen
        case "${h[12]}${h[13]}${h[14]}${h[15]}" in
            01000000) role=backing ;;
            02000000) role=cache ;;
            *) continue ;;
        esac
        gen="$(le_u64 "${h[@]:16:8}")"
        if [ "$gen" -gt "$best_gen" ]; then
            best_gen="$gen"
            out="$role $(le_u64 "${h[@]:56:8}")"
        fi
    done
    [ -z "$out" ] || echo "$out"
}

# Filesystem or partition-table signature at the head of a device ("" when blkid finds none).
signature() {
    local out rc=0
    out="$(blkid -p -o export "$1" 2>/dev/null)" || rc=$?
    case "$rc" in
        0) printf '%s\n' "$out" | sed -n 's/^\(TYPE\|PTTYPE\)=//p' | head -n1 ;;
        2) echo "" ;;
        *) die "blkid -p $1 failed (exit $rc)" ;;
    esac
}

# Real paths of every mount source and swap area, resolved once.
in_use_paths=()
load_in_use() {
    local src _rest
    if [ -r "$mounts_file" ]; then
        while read -r src _rest; do
            [[ "$src" == /* ]] && in_use_paths+=("$(readlink -f "$src" 2>/dev/null || echo "$src")")
        done <"$mounts_file"
    fi
    if [ -r "$swaps_file" ]; then
        while read -r src _rest; do
            [[ "$src" == /* ]] && in_use_paths+=("$(readlink -f "$src" 2>/dev/null || echo "$src")")
        done < <(tail -n +2 "$swaps_file")
    fi
}
load_in_use

# Why a device may not be used, or nothing. Checks the device, its partitions (by-id -partN links
# and sysfs), its holders (md, dm, LVM) and the mount and swap tables.
in_use_reason() {
    local link="$1" real kname p part parts=()
    real="$(readlink -f "$link")"
    kname="$(basename "$real")"
    for part in "$link"-part*; do [ -e "$part" ] && parts+=("$(readlink -f "$part")"); done
    if [ -d "$sys_block/$kname" ]; then
        for part in "$sys_block/$kname"/"$kname"*; do
            [ -f "$part/partition" ] && parts+=("$(dirname "$real")/$(basename "$part")")
        done
        local holders
        holders="$(find "$sys_block/$kname/holders" -mindepth 1 -maxdepth 1 -printf '%f ' 2>/dev/null)"
        if [ -n "$holders" ]; then
            echo "held by ${holders}(md, dm or LVM)"
            return 0
        fi
    fi
    for p in "${in_use_paths[@]}"; do
        [ "$p" = "$real" ] && { echo "mounted or used as swap ($real)"; return 0; }
        for part in "${parts[@]}"; do
            [ "$p" = "$part" ] && { echo "a partition of it is mounted or used as swap ($part; the boot disk?)"; return 0; }
        done
    done
    if [ "${#parts[@]}" -gt 0 ]; then
        echo "it has partitions (${parts[*]}); superdisk needs a whole disk"
        return 0
    fi
}

is_local_ssd() {
    case "$(basename "$1")" in google-local-nvme-ssd-*|google-local-ssd-*) return 0 ;; esac
    return 1
}

# --- step 1: local SSDs -----------------------------------------------------------------------------

say "step 1: local SSDs"
if [ "${#caches[@]}" -eq 0 ]; then
    shopt -s nullglob
    for l in "$by_id"/google-local-nvme-ssd-* "$by_id"/google-local-ssd-*; do
        [[ "$l" == *-part[0-9]* ]] && continue
        caches+=("$l")
    done
    shopt -u nullglob
    [ "${#caches[@]}" -gt 0 ] || die "no local SSD found: no $by_id/google-local-nvme-ssd-* or google-local-ssd-* link. \
Create the VM with local SSDs (--local-ssd=interface=NVME), or check that the Google guest environment's \
udev rules are installed; --cache PATH names devices by hand"
    mapfile -t caches < <(printf '%s\n' "${caches[@]}" | sort -V)
fi
declare -A seen_real=()
for c in "${caches[@]}"; do
    [ -e "$c" ] || die "local SSD $c does not exist"
    real="$(readlink -f "$c")"
    [ -z "${seen_real[$real]:-}" ] || die "$c and ${seen_real[$real]} are the same device ($real)"
    seen_real[$real]="$c"
    why="$(in_use_reason "$c")"
    [ -z "$why" ] || die "local SSD $c is in use: $why. Unmount it and remove it from /etc/fstab \
(and from any md array) first"
    tail_info="$(superdisk_tail "$c")"
    sig="$(signature "$c")"
    if [[ "$tail_info" == cache* ]]; then
        say "  $c -> $real: already a superdisk cache"
    elif [ -n "$sig" ] && [ "$take_over_cache" = 0 ]; then
        die "local SSD $c holds a '$sig' signature and is not a superdisk cache; its data would be \
overwritten. Wipe it (wipefs -a $real) if it is not needed, or pass --take-over-cache"
    elif [ -n "$sig" ]; then
        say "  $c -> $real: holds '$sig', taken over (--take-over-cache)"
    else
        say "  $c -> $real"
    fi
done

# --- step 2: the persistent disk --------------------------------------------------------------------

say "step 2: persistent disk"
if [ -n "$pd_name" ]; then
    backing="$by_id/google-$pd_name"
    [ -e "$backing" ] || die "no persistent disk with device name '$pd_name': $backing does not exist \
(gcloud compute instances describe VM --format='value(disks[].deviceName)' lists them)"
elif [ -z "$backing" ]; then
    candidates=()
    excluded=()
    shopt -s nullglob
    for l in "$by_id"/google-*; do
        [[ "$l" == *-part[0-9]* ]] && continue
        is_local_ssd "$l" && continue
        why="$(in_use_reason "$l")"
        if [ -n "$why" ]; then excluded+=("$l: $why"); continue; fi
        candidates+=("$l")
    done
    shopt -u nullglob
    if [ "${#candidates[@]}" -eq 0 ]; then
        for e in "${excluded[@]}"; do echo "$prog:   not usable: $e" >&2; done
        die "no persistent disk to use under $by_id (every google-* disk is a local SSD or in use). \
Attach one (gcloud compute instances attach-disk VM --disk PD --device-name NAME) and pass --pd-name NAME"
    fi
    if [ "${#candidates[@]}" -gt 1 ]; then
        for c in "${candidates[@]}"; do echo "$prog:   candidate: $c -> $(readlink -f "$c")" >&2; done
        die "${#candidates[@]} persistent disks could be the backing; refusing to guess. Name one with \
--pd-name DEVICE_NAME (the part after google-) or --backing PATH"
    fi
    backing="${candidates[0]}"
    say "  the only persistent disk that is not a local SSD and not in use: $backing"
fi
[ -e "$backing" ] || die "backing $backing does not exist"
is_local_ssd "$backing" && die "$backing is a local SSD: the backing must be a persistent disk"
backing_real="$(readlink -f "$backing")"
[ -z "${seen_real[$backing_real]:-}" ] || die "$backing is the same device as local SSD ${seen_real[$backing_real]}"
why="$(in_use_reason "$backing")"
[ -z "$why" ] || die "persistent disk $backing is in use: $why"
backing_tail="$(superdisk_tail "$backing")"
backing_sig="$(signature "$backing")"
if [[ "$backing_tail" == backing* ]]; then
    export_bytes="${backing_tail#backing }"
    say "  $backing -> $backing_real: already a superdisk backing, export size $export_bytes bytes \
(${backing_sig:-no filesystem yet}${backing_sig:+ on it})"
elif [ -n "$backing_sig" ]; then
    die "persistent disk $backing holds a '$backing_sig' signature and is not a superdisk backing. superdisk \
exports the disk's first bytes minus a metadata tail, which would cut the end off that filesystem. \
Copy its data elsewhere and wipe it (wipefs -a $backing_real), or pick another disk"
else
    say "  $backing -> $backing_real: $(size_bytes "$backing") bytes, blank head"
fi

# --- step 3: the binary -----------------------------------------------------------------------------

say "step 3: superdisk binary"
if [ -n "$deb" ]; then
    installed=""
    [ -n "$root" ] || installed="$(dpkg-query -W -f='${Status} ${Version}' superdisk 2>/dev/null || true)"
    if [ "$installed" = "install ok installed $deb_version" ] && [ -x "$bin_path" ]; then
        say "unchanged: superdisk package $deb_version"
    else
        changes=$((changes + 1))
        # Installs or upgrades the files only: no unit is enabled, started or restarted by it.
        run apt-get install -y "$deb"
    fi
    [ "$dry_run" = 1 ] || [ -x "$bin_path" ] || die "the package did not install $bin_path"
elif [ -n "$binary" ]; then
    [ -x "$binary" ] || die "--binary $binary is not an executable file"
    if [ -f "$bin_path" ] && cmp -s "$binary" "$bin_path"; then
        say "unchanged: $bin_path"
    else
        changes=$((changes + 1))
        run install -D -m 0755 "$binary" "$bin_path"
    fi
elif [ -x "$bin_path" ]; then
    say "  using $bin_path"
else
    die "$bin_path is missing: build superdisk (cargo build --release) and pass --binary target/release/superdisk"
fi

# --- step 4: configuration --------------------------------------------------------------------------

say "step 4: configuration"
for p in "$backing" "${caches[@]}"; do
    [[ "$p" != *[\"\\]* ]] || die "device path '$p' holds a quote or backslash; name it by another path"
done
{
    echo "# superdisk instance $name, written by scripts/gcp-setup.sh. Keys: docs/CONFIG.md."
    echo "backing = \"$backing\""
    echo "cache = ["
    for c in "${caches[@]}"; do echo "    \"$c\","; done
    echo "]"
    echo "export = \"$name\""
    echo "# No TCP listener: superdisk attach connects over the Unix socket. superdisk@$name.service passes"
    echo "# these two socket paths on its command line too (its RuntimeDirectory holds them)."
    echo "listen = \"\""
    echo "unix = \"/run/superdisk/$name/nbd.sock\""
    echo "unix_mode = \"0600\""
    echo "admin_socket = \"/run/superdisk/$name/admin.sock\""
    [ -z "$metrics" ] || echo "metrics = \"$metrics\""
} >"$work/config"
install_file "$config" 0644 "$work/config" config

# Another instance attaching the same device would fail at start, or worse, detach ours at stop.
shopt -s nullglob
for f in "$etc_dir"/*.nbd.env; do
    [ "$f" = "$nbd_env" ] && continue
    if grep -qx "NBD_DEVICE=$nbd_device" "$f"; then
        die "$nbd_device is already the device of $(basename "$f" .nbd.env) ($f); pick another with --nbd-device"
    fi
done
shopt -u nullglob
{
    echo "# How superdisk-nbd@$name.service attaches superdisk@$name; written by scripts/gcp-setup.sh."
    echo "# Every variable: systemd/superdisk-nbd.env.example."
    echo "NBD_DEVICE=$nbd_device"
    echo "NBD_EXPORT=$name"
    echo "NBD_CONNECTIONS=$connections"
    echo "NBD_BLOCK_SIZE=4096"
    echo "NBD_IO_TIMEOUT=$io_timeout_secs"
    echo "NBD_DEAD_TIMEOUT=$dead_timeout_secs"
} >"$work/nbd.env"
install_file "$nbd_env" 0644 "$work/nbd.env" config

# --- live state (not queried with --root) -----------------------------------------------------------

query() { [ -z "$root" ] && "$@" >/dev/null 2>&1; }
service_active() { query systemctl is-active --quiet "$1"; }
service_enabled() { query systemctl is-enabled --quiet "$1"; }
nbd_attached() { [ -z "$root" ] && [ -e "/sys/block/nbd$nbd_index/pid" ]; }

# --- step 5: prepare the devices --------------------------------------------------------------------

say "step 5: prepare the devices"
create_cmd=("$bin_path" create --backing "$backing")
for c in "${caches[@]}"; do create_cmd+=(--cache "$c"); done
[ "$take_over_cache" = 0 ] || create_cmd+=(--take-over-cache)
if service_active "superdisk@$name.service"; then
    say "  superdisk@$name is running: its devices are prepared and in use, nothing to create"
else
    if [[ "$backing_tail" != backing* ]]; then
        changes=$((changes + 1))
    fi
    # Idempotent: a prepared backing is kept, and SSDs that already form its cache set are left alone.
    run "${create_cmd[@]}"
fi

# --- step 6: systemd units --------------------------------------------------------------------------

say "step 6: systemd units"
units_before=$changes
if [ -n "$deb" ]; then
    say "  superdisk@.service and superdisk-nbd@.service: the package's"
else
    install_file "$unit_dir/superdisk@.service" 0644 "$units_src/superdisk@.service" copy
    install_file "$unit_dir/superdisk-nbd@.service" 0644 "$units_src/superdisk-nbd@.service" copy
fi

# Wait for udev's links at boot: the backing is required, a missing SSD only delays the start
# (by the device timeout) and then the daemon serves degraded.
dev_unit() { systemd-escape --path --suffix=device "$1"; }
{
    echo "# Written by scripts/gcp-setup.sh: start superdisk@$name once udev has created the links to"
    echo "# the devices named in $config."
    echo "[Unit]"
    echo "Requires=$(dev_unit "$backing")"
    echo "After=$(dev_unit "$backing")"
    for c in "${caches[@]}"; do
        echo "Wants=$(dev_unit "$c")"
        echo "After=$(dev_unit "$c")"
    done
} >"$work/devices.conf"
install_file "$unit_dir/superdisk@$name.service.d/devices.conf" 0644 "$work/devices.conf"

mount_unit=""
if [ "$no_mount" = 0 ]; then
    mount_unit="$(systemd-escape --path --suffix=mount "$where")"
    {
        echo "# Written by scripts/gcp-setup.sh; the reasons for each line: systemd/var-lib-scylla.mount."
        echo "[Unit]"
        echo "Description=XFS on superdisk $name"
        echo "Requires=superdisk-nbd@$name.service"
        echo "After=superdisk-nbd@$name.service"
        echo ""
        echo "[Mount]"
        echo "What=$nbd_device"
        echo "Where=$where"
        echo "Type=xfs"
        echo "Options=noatime,_netdev"
        echo "TimeoutSec=5min"
        echo ""
        echo "[Install]"
        echo "WantedBy=remote-fs.target"
    } >"$work/mount"
    install_file "$unit_dir/$mount_unit" 0644 "$work/mount"
    if [ -n "$for_service" ]; then
        {
            echo "# Written by scripts/gcp-setup.sh: $for_service starts after $mountpoint is mounted and"
            echo "# stops before it is unmounted (and so before superdisk@$name stops)."
            echo "[Unit]"
            echo "RequiresMountsFor=$where"
        } >"$work/dropin"
        install_file "$unit_dir/$for_service.d/superdisk-$name.conf" 0644 "$work/dropin"
    fi
fi
if [ "$changes" -gt "$units_before" ]; then
    run systemctl daemon-reload
fi

# --- step 7: start and attach -----------------------------------------------------------------------

say "step 7: start superdisk@$name and attach $nbd_device"
for u in "superdisk@$name.service" "superdisk-nbd@$name.service"; do
    if service_enabled "$u" && service_active "$u"; then
        say "  $u: already enabled and running"
    else
        changes=$((changes + 1))
        run systemctl enable --now "$u"
    fi
done
if [ "$dry_run" = 0 ]; then
    # superdisk attach has configured the device when its unit is active; wait for the size to show and
    # for udev to finish with it (the mount waits for its .device unit, which udev marks ready).
    for _ in $(seq 120); do
        nbd_attached && [ "$(cat "/sys/block/nbd$nbd_index/size" 2>/dev/null || echo 0)" -gt 0 ] && break
        sleep 0.5
    done
    nbd_attached || die "$nbd_device did not attach within 60 s: journalctl -u superdisk-nbd@$name -u superdisk@$name"
    run udevadm settle
    say "  $nbd_device attached: $(blockdev --getsize64 "$nbd_device") bytes"
fi

if [ "$no_mount" = 1 ]; then
    say "--no-mount: stopping here; $nbd_device is attached"
else
    # --- step 8: filesystem -------------------------------------------------------------------------
    say "step 8: filesystem on $nbd_device"
    if [ "$dry_run" = 1 ]; then
        if [ -n "$backing_sig" ]; then
            say "  the export already holds '$backing_sig' (the persistent disk's head): no mkfs"
            [ "$backing_sig" = xfs ] || die "the export holds '$backing_sig', not xfs: this script mounts XFS only"
        else
            say "  a real run checks with 'blkid -p $nbd_device' and makes XFS only where it finds nothing:"
            changes=$((changes + 1))
            run mkfs.xfs -K "$nbd_device"
        fi
    else
        fs="$(signature "$nbd_device")"
        case "$fs" in
            xfs) say "  $nbd_device already holds XFS: keeping it" ;;
            "")
                changes=$((changes + 1))
                # -K: no discard of the whole device. superdisk carries a TRIM out as zeroing on the
                # persistent disk and every SSD; a new persistent disk already reads as zeroes.
                run mkfs.xfs -K "$nbd_device"
                ;;
            *) die "$nbd_device holds '$fs', not xfs: leaving it alone (this script mounts XFS only)" ;;
        esac
    fi

    # --- step 9: mount ------------------------------------------------------------------------------
    say "step 9: mount at $mountpoint"
    if query findmnt --source "$nbd_device" --mountpoint "$mountpoint"; then
        say "  $nbd_device is already mounted at $mountpoint"
        service_enabled "$mount_unit" || { changes=$((changes + 1)); run systemctl enable "$mount_unit"; }
    else
        if query findmnt --mountpoint "$mountpoint"; then
            die "something else is mounted at $mountpoint ($(findmnt -n -o SOURCE --mountpoint "$mountpoint"))"
        fi
        changes=$((changes + 1))
        run mkdir -p "$where"
        run systemctl enable --now "$mount_unit"
        if [ "$dry_run" = 0 ]; then
            findmnt --source "$nbd_device" --mountpoint "$mountpoint" >/dev/null \
                || die "$mount_unit started but $mountpoint is not mounted from $nbd_device: journalctl -u $mount_unit"
        fi
    fi
fi

# --- summary ----------------------------------------------------------------------------------------

if [ "$changes" -eq 0 ]; then
    say "nothing to do: everything was already in place"
elif [ "$dry_run" = 1 ]; then
    say "dry run: $changes change(s) would be made"
else
    say "done ($changes change(s)). Status: superdisk status --instance $name; logs: journalctl -u superdisk@$name"
fi
