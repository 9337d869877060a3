# shellcheck shell=bash
# Sourced by the scripts that boot a Debian kernel under qemu with a busybox initramfs
# (scripts/kernel-e2e.sh, scripts/ublk-guest.sh): pick and fetch a kernel package with
# `apt-get download` (never installed), keep a small kit (vmlinuz, config, the needed modules
# decompressed, in load order), copy host programs with their shared libraries into an initramfs,
# choose KVM or TCG, boot the guest and judge the one result line its init prints. The caller
# defines `die` and `log` (scripts/lib/common.sh has both) and, for the guest, QEMU_PID (which its
# exit trap stops) and STEP (the step its `die` names).

# kg_candidate PACKAGE: the version apt would fetch for PACKAGE, or nothing.
kg_candidate() {
  apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" && $2 != "(none)" { print $2; exit }'
}

# kg_newest_package REGEX: "NAME VERSION" of the package whose name matches REGEX (an
# `apt-cache search --names-only` pattern) with the highest candidate version; nothing if none
# has a candidate (no package lists, or the archive dropped them all). One `apt-cache policy` for
# all the names: the search finds dozens of old builds.
kg_newest_package() {
  local names name ver best='' best_ver=''
  names=$(apt-cache search --names-only "$1" 2>/dev/null | awk '{ print $1 }')
  [ -n "$names" ] || return 0
  while read -r name ver; do
    if [ -z "$best" ] || dpkg --compare-versions "$ver" gt "$best_ver"; then
      best=$name
      best_ver=$ver
    fi
  done < <(xargs apt-cache policy <<<"$names" 2>/dev/null |
    awk '/^[^ ].*:$/ { name = substr($0, 1, length($0) - 1) }
         $1 == "Candidate:" && $2 != "(none)" { print name, $2 }')
  [ -z "$best" ] || echo "$best $best_ver"
}

# kg_find_package FINDER [ARG...]: what FINDER (a function printing "NAME VERSION", or nothing)
# prints; when it prints nothing and this is root, the package lists are updated and it is asked
# once more.
kg_find_package() {
  local found
  found=$("$@")
  if [ -z "$found" ] && [ "$(id -u)" = 0 ]; then
    apt-get update -qq >&2
    found=$("$@")
  fi
  [ -z "$found" ] || echo "$found"
}

# kg_install_packages PACKAGE...: apt-get installs those that are missing (root only), after
# updating the package lists.
kg_install_packages() {
  local p missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  [ "$(id -u)" = 0 ] || die "need root to install: ${missing[*]}"
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    die "apt-get install ${missing[*]} failed"
}

# kg_find_module TREE NAME: the module's file (maybe compressed); module names treat - and _ alike.
kg_find_module() {
  local a=${2//-/_} b=${2//_/-}
  find "$1" \( -name "$a.ko" -o -name "$a.ko.*" -o -name "$b.ko" -o -name "$b.ko.*" \) -print -quit
}

kg_is_builtin() {
  local a=${2//-/_} b=${2//_/-}
  grep -q -E "/($a|$b)\.ko$" "$1/modules.builtin"
}

# kg_decompress_module SRC DST: busybox insmod reads neither .ko.xz nor .ko.zst.
kg_decompress_module() {
  case "$1" in
    *.ko) cp "$1" "$2" ;;
    *.ko.xz) xz -dc "$1" >"$2" ;;
    *.ko.zst) zstd -dcq "$1" >"$2" ;;
    *.ko.gz) gzip -dc "$1" >"$2" ;;
    *) die "unknown module compression: $1" ;;
  esac
}

# kg_add_module MODDIR KIT NAME: copies NAME and, first, what it depends on into KIT/modules,
# appending to KIT/modules/order in load order. Debian's package ships no modules.dep, so the
# dependencies come from each module's own .modinfo "depends=" string. Soft dependencies
# ("softdep=pre: crc32c" of libcrc32c) are not followed: name those modules yourself, first.
declare -gA KG_ADDED=()
kg_add_module() {
  local moddir=$1 kit=$2 name=$3 src base dep deps
  [ -z "${KG_ADDED[$name]:-}" ] || return 0
  KG_ADDED[$name]=1
  if kg_is_builtin "$moddir" "$name"; then
    log "  $name: built into the kernel"
    return 0
  fi
  src=$(kg_find_module "$moddir/kernel" "$name")
  [ -n "$src" ] || die "module $name not found in the kernel package"
  base=$(basename "$src")
  base=${base%%.ko*}
  kg_decompress_module "$src" "$kit/modules/$base.ko.tmp"
  deps=$(tr '\0' '\n' <"$kit/modules/$base.ko.tmp" | sed -n 's/^depends=//p' | head -n 1 | tr ',' ' ')
  for dep in $deps; do kg_add_module "$moddir" "$kit" "$dep"; done
  mv "$kit/modules/$base.ko.tmp" "$kit/modules/$base.ko"
  echo "$base" >>"$kit/modules/order"
  log "  $name: ${src#"$moddir"/}${deps:+ (after $deps)}"
}

# kg_fetch_kit CACHE_DIR PACKAGE VERSION MODULE...: sets KIT to a folder holding vmlinuz, config,
# kernel-release and modules/ (NAME.ko files and `order`), built once per package version and
# module list. The .deb itself is kept in CACHE_DIR/debs, so another module list costs no download;
# with KG_KEEP_DEB=0 it is deleted once the kit is built (a caller whose module list never changes).
kg_fetch_kit() {
  local cache=$1 pkg=$2 ver=$3 tag deb dl moddir m
  shift 3
  tag=$(printf '%s\n' "$@" | sha256sum | cut -c1-12)
  KIT=$cache/${pkg}_$ver-$tag
  if [ -e "$KIT/complete" ]; then
    log "kernel $pkg $ver: cached in $KIT"
    return 0
  fi
  mkdir -p "$cache/debs"
  deb=$cache/debs/${pkg}_$ver.deb
  if [ ! -s "$deb" ]; then
    log "kernel $pkg $ver: downloading (apt-get download) into $cache/debs"
    dl=$(mktemp -d "$cache/download.XXXXXX")
    # apt drops privileges to _apt for the download; a root-only cache folder would make it warn.
    chmod 755 "$dl"
    (cd "$dl" && apt-get download "$pkg=$ver" >"$dl/apt.log" 2>&1) ||
      { cat "$dl/apt.log" >&2; rm -rf "$dl"; die "apt-get download $pkg=$ver failed"; }
    mv "$(find "$dl" -maxdepth 1 -name '*.deb' -print -quit)" "$deb"
    rm -rf "$dl"
  fi
  log "kernel $pkg $ver: unpacking vmlinuz and modules ($*)"
  rm -rf "$KIT"
  dl=$(mktemp -d "$cache/unpack.XXXXXX")
  dpkg-deb -x "$deb" "$dl/root"
  moddir=$(find "$dl/root/lib/modules" -mindepth 1 -maxdepth 1 -type d -print -quit)
  mkdir -p "$KIT/modules"
  cp "$dl"/root/boot/vmlinuz-* "$KIT/vmlinuz"
  cp "$dl"/root/boot/config-* "$KIT/config"
  basename "$moddir" >"$KIT/kernel-release"
  : >"$KIT/modules/order"
  KG_ADDED=()
  for m in "$@"; do kg_add_module "$moddir" "$KIT" "$m"; done
  rm -rf "$dl"
  touch "$KIT/complete"
  [ "${KG_KEEP_DEB:-1}" = 1 ] || rm -f "$deb"
}

# kg_kit CACHE_DIR PACKAGE_GLOB "NAME VERSION" MODULE...: sets KIT to that package's kit
# (kg_fetch_kit) or, when the package is "" (apt offers none: no package lists, say), to the newest
# cached kit of a package matching PACKAGE_GLOB for that module list; returns 1 if there is none.
kg_kit() {
  local cache=$1 glob=$2 found=$3 pkg ver
  shift 3
  if [ -z "$found" ]; then
    KIT=$(kg_cached_kit "$cache" "$glob" "$@")
    [ -n "$KIT" ] || return 1
    log "apt offers no kernel package; using the newest cached kit, $KIT"
    return 0
  fi
  read -r pkg ver <<<"$found"
  mkdir -p "$cache"
  kg_fetch_kit "$cache" "$pkg" "$ver" "$@"
}

# kg_cached_kit CACHE_DIR PACKAGE_GLOB MODULE...: the newest complete kit for that module list
# (for runs without package lists); nothing if none.
kg_cached_kit() {
  local cache=$1 glob=$2 tag
  shift 2
  tag=$(printf '%s\n' "$@" | sha256sum | cut -c1-12)
  find "$cache" -maxdepth 2 -name complete -path "$cache/${glob}_*-$tag/complete" -printf '%T@ %h\n' 2>/dev/null |
    sort -rn | head -n 1 | cut -d' ' -f2-
}

# kg_copy_into ROOT PATH: copies PATH's contents to the same path under ROOT.
kg_copy_into() {
  mkdir -p "$1$(dirname "$2")"
  cp -L "$2" "$1$2"
}

# kg_copy_libs ROOT BINARY: every shared library ldd names for BINARY, at its host path.
kg_copy_libs() {
  local root=$1 lib
  if ldd "$2" 2>/dev/null | grep -q 'not found'; then die "ldd $2: $(ldd "$2" | grep 'not found')"; fi
  for lib in $(ldd "$2" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
    [ -e "$root$lib" ] || kg_copy_into "$root" "$lib"
  done
}

# kg_copy_program ROOT PROGRAM [GUEST_PATH]: the program (a name on PATH or a path) and its
# libraries; at its host path, or at GUEST_PATH when given.
kg_copy_program() {
  local root=$1 path
  path=$(command -v "$2") || die "$2 not found on the host"
  if [ -n "${3:-}" ]; then
    mkdir -p "$root$(dirname "$3")"
    cp -L "$path" "$root$3"
  else
    kg_copy_into "$root" "$path"
  fi
  kg_copy_libs "$root" "$path"
}

# kg_initramfs_base ROOT INIT MODDIR: ROOT gets the usual top folders, the static busybox as
# /bin/busybox, INIT (a file on the host) as /init and the kit's modules with their `order` file in
# MODDIR (a guest path), for the init to load.
kg_initramfs_base() {
  local root=$1 busybox
  mkdir -p "$root"/{bin,sbin,dev,proc,sys,mnt,tmp} "$root$3"
  busybox=$(command -v busybox) || die "busybox not found (busybox-static)"
  if ldd "$busybox" >/dev/null 2>&1; then die "$busybox is dynamically linked; install busybox-static"; fi
  cp "$busybox" "$root/bin/busybox"
  install -m 0755 "$2" "$root/init"
  cp "$KIT"/modules/*.ko "$KIT/modules/order" "$root$3/"
}

# kg_pack_initramfs ROOT OUT: a gzipped newc cpio of ROOT; logs both sizes.
kg_pack_initramfs() {
  (cd "$1" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 >"$2"
  log "initramfs: $(du -sh "$1" | cut -f1) unpacked, $(du -h "$2" | cut -f1) gzipped"
}

# KVM needs /dev/kvm to open read-write and hardware virtualization behind it: a KVM without the
# vmx/svm CPU flag (e.g. PVM, as inside some cloud sandboxes) runs only specially built guest
# kernels, and Debian's hangs there right after the boot loader.
kg_kvm_usable() {
  [ -c /dev/kvm ] && (exec 3<>/dev/kvm) 2>/dev/null && grep -qwE 'vmx|svm' /proc/cpuinfo
}

# kg_choose_accel auto|kvm|tcg: sets ACCEL (kvm or tcg) and QEMU_ACCEL (qemu arguments).
# shellcheck disable=SC2034 # both are the caller's
kg_choose_accel() {
  ACCEL=$1
  if [ "$ACCEL" = kvm ] || { [ "$ACCEL" = auto ] && kg_kvm_usable; }; then
    ACCEL=kvm
    QEMU_ACCEL=(-accel kvm -cpu host)
  else
    if [ "$ACCEL" = auto ] && [ -c /dev/kvm ]; then
      log "/dev/kvm is there but not usable for a stock kernel (not openable, or no vmx/svm CPU flag)"
    fi
    ACCEL=tcg
    QEMU_ACCEL=(-accel "tcg,thread=multi" -cpu max)
  fi
}

# kg_nonce: 16 random hex digits, for the guest to echo in its result line (so that a line from
# another run can never match).
kg_nonce() {
  od -An -N8 -tx8 /dev/urandom | tr -d ' '
}

# kg_boot_start WORK SECS QEMU_ARG...: starts qemu-system-x86_64 in the background under
# `timeout SECS`, with QEMU_ACCEL, KIT's kernel, WORK/initramfs.cpio.gz, no devices but those in
# QEMU_ARG (which gives -smp, -m, -append ...), the serial console in WORK/console.log (echoed here
# as "  guest| " lines as it grows) and qemu's own output in WORK/qemu.log. Sets QEMU_PID (the
# timeout(1) process, which passes SIGTERM on to qemu); kg_boot_wait waits for it.
# shellcheck disable=SC2034 # QEMU_PID is the caller's
kg_boot_start() {
  local work=$1 secs=$2
  shift 2
  : >"$work/console.log"
  timeout -k 5 "$secs" qemu-system-x86_64 "${QEMU_ACCEL[@]}" \
    -nodefaults -no-user-config -display none -no-reboot -monitor none \
    -serial "file:$work/console.log" \
    -kernel "$KIT/vmlinuz" -initrd "$work/initramfs.cpio.gz" "$@" \
    >"$work/qemu.log" 2>&1 &
  QEMU_PID=$!
  # In the background too, so that a signal to the script is handled at once (bash runs traps only
  # between foreground commands, but interrupts wait).
  tail -n +1 -f --pid="$QEMU_PID" "$work/console.log" | sed -u 's/\r$//; s/^/  guest| /' &
  KG_TAIL_PID=$!
}

# kg_boot_wait WORK: waits for the guest kg_boot_start started; qemu's exit status in BOOT_RC
# (124 or 137: timeout(1) killed it), then qemu's own output, if any.
# shellcheck disable=SC2034 # BOOT_RC is the caller's
kg_boot_wait() {
  BOOT_RC=0
  wait "$QEMU_PID" || BOOT_RC=$?
  QEMU_PID=
  wait "$KG_TAIL_PID" || true
  [ ! -s "$1/qemu.log" ] || sed 's/^/  qemu| /' "$1/qemu.log"
}

# kg_guest_result CONSOLE MARKER NONCE RC SECS: returns when the last line of CONSOLE that starts
# with MARKER is "MARKER PASS nonce=NONCE" and qemu exited 0 (RC); otherwise dies, naming the
# guest's failed step ("MARKER FAIL step=NAME rc=N nonce=NONCE", which goes into STEP), the
# timeout of SECS seconds (RC 124 or 137) or the missing result line.
# shellcheck disable=SC2034 # STEP is the caller's
kg_guest_result() {
  local console=$1 marker=$2 nonce=$3 rc=$4 secs=$5 line
  line=$(tr -d '\r' <"$console" | grep -a "^$marker " | tail -n 1 || true)
  if [ "$line" = "$marker PASS nonce=$nonce" ]; then
    [ "$rc" = 0 ] || die "the guest passed but qemu exited $rc"
  elif [[ "$line" == "$marker FAIL "*"nonce=$nonce" ]]; then
    STEP="guest ${line#"$marker" FAIL }"
    STEP=${STEP% nonce=*}
    die "the guest reported a failure (console above)"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    die "the guest did not finish within ${secs}s (--timeout); qemu killed"
  else
    die "qemu exited $rc without a result line from the guest (kernel panic or boot failure?)"
  fi
}
