#!/usr/bin/env bash
# Build the vmlet test VM image (a small bootable qcow2) from Debian packages.
#
#   deploy/images/build-test-image.sh [--hash | --force | --help]
#
# Output: ${VMLET_IMAGE_CACHE:-/var/cache/vmlet/images}/vmlet-testvm-<hash>.qcow2
# plus the stable symlink vmlet-testvm.qcow2. The absolute path of the qcow2 is
# the last line on stdout; progress goes to stderr. A second run with the same
# recipe is a cache hit (no download, no build).
#
# The recipe hash covers: every file under the recipe dir (deploy/images/testvm,
# override with VMLET_TESTVM_RECIPE), this script, the exact Debian package
# versions used (kernel, busybox-static, extra packages) and the host's
# syslinux version. See deploy/images/README.md.
#
# Host packages needed: apt, dpkg, coreutils, util-linux (flock), findutils,
# gawk|mawk, sed, gzip, cpio, dosfstools, mtools, syslinux, syslinux-common,
# fdisk, qemu-utils. Nothing is installed on the host: the kernel and busybox
# .debs are fetched with `apt-get download` and unpacked with `dpkg-deb -x`.
set -euo pipefail

SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
SCRIPT_DIR=$(dirname "$SCRIPT_PATH")
RECIPE_DIR=${VMLET_TESTVM_RECIPE:-$SCRIPT_DIR/testvm}
CACHE_DIR=${VMLET_IMAGE_CACHE:-/var/cache/vmlet/images}
KERNEL_PACKAGE=${VMLET_TESTVM_KERNEL_PACKAGE:-linux-image-cloud-amd64}
IMAGE_NAME=vmlet-testvm
DISK_MB=64            # virtual disk size; the FAT boot partition fills it
PART_START=2048       # first partition sector (1 MiB)
MBR_BIN=/usr/lib/syslinux/mbr/mbr.bin

log() { printf 'build-test-image: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

usage() {
    sed -n '2,20s/^# \{0,1\}//p' "$SCRIPT_PATH" >&2
}

MODE=build
case "${1:-}" in
    "") ;;
    --hash) MODE=hash ;;
    --force) MODE=force ;;
    -h|--help) usage; exit 0 ;;
    *) usage; die "unknown argument: $1" ;;
esac

# --------------------------------------------------------------------------
# Preconditions
# --------------------------------------------------------------------------
need_cmd() {
    local c
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || die "missing host command '$c' (install the host packages listed in deploy/images/README.md)"
    done
}
need_cmd apt-cache apt-get dpkg-deb dpkg-query sha256sum find sort awk sed flock
if [ "$MODE" != hash ]; then
    need_cmd cpio gzip mkfs.vfat syslinux mcopy sfdisk qemu-img truncate dd
    [ -r "$MBR_BIN" ] || die "missing $MBR_BIN (install syslinux-common)"
fi

[ -d "$RECIPE_DIR" ] || die "recipe directory not found: $RECIPE_DIR"
RECIPE_DIR=$(cd "$RECIPE_DIR" && pwd -P)
for f in syslinux.cfg modules rootfs/etc/inittab; do
    [ -e "$RECIPE_DIR/$f" ] || die "recipe is incomplete: $RECIPE_DIR/$f is missing"
done

# Read a list file: strip comments and blank lines.
read_list() {
    [ -f "$1" ] || return 0
    sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e 's/^[[:space:]]*//' "$1" | awk 'NF'
}

# --------------------------------------------------------------------------
# Resolve exact package versions (part of the recipe hash)
# --------------------------------------------------------------------------
# apt-cache takes ~1 s a call where apt keeps no binary cache, so the answer
# is memoised in the cache dir, keyed by the state of the apt lists and
# config: a cache hit stays fast, and `apt-get update` re-resolves.
mapfile -t EXTRA_PKGS < <(read_list "$RECIPE_DIR/packages")

apt_fingerprint() {
    {
        printf 'kernel-package %s\n' "$KERNEL_PACKAGE"
        printf 'package %s\n' busybox-static "${EXTRA_PKGS[@]}"
        find /var/lib/apt/lists /etc/apt -maxdepth 2 -type f -printf '%p %s %T@\n' 2>/dev/null | LC_ALL=C sort
    } | sha256sum | cut -c1-16
}

resolve_packages() { # prints "kernel NAME" then "version NAME VERSION" lines
    local kpkg pkgs out p v
    if [[ "$KERNEL_PACKAGE" =~ ^linux-image-[0-9] ]]; then
        kpkg=$KERNEL_PACKAGE
    else
        # metapackage -> its versioned linux-image-X.Y.Z-N-flavour dependency
        kpkg=$(apt-cache depends "$KERNEL_PACKAGE" 2>/dev/null \
            | sed -n 's/^[[:space:]]*|\{0,1\}Depends:[[:space:]]*\(linux-image-[0-9][^[:space:]]*\).*/\1/p' | head -n1)
        [ -n "$kpkg" ] || die "cannot resolve the kernel package behind '$KERNEL_PACKAGE' (apt-cache depends; is 'apt-get update' done?)"
    fi
    printf 'kernel %s\n' "$kpkg"
    pkgs=("$kpkg" busybox-static "${EXTRA_PKGS[@]}")
    out=$(apt-cache policy "${pkgs[@]}" 2>/dev/null \
        | awk '/^[^[:space:]]/ { p = $1; sub(/:$/, "", p) } $1 == "Candidate:" { print p, $2 }')
    for p in "${pkgs[@]}"; do
        v=$(printf '%s\n' "$out" | awk -v p="$p" '$1 == p { print $2; exit }')
        if [ -z "$v" ] || [ "$v" = "(none)" ]; then
            die "Debian package '$p' has no candidate version (is 'apt-get update' done?)"
        fi
        printf 'version %s %s\n' "$p" "$v"
    done
}

# QEMU may run as another user (libvirt-qemu): keep the cache world-readable.
umask 022
mkdir -p "$CACHE_DIR" 2>/dev/null || true
RESOLVED_FILE=$CACHE_DIR/.resolved-$(apt_fingerprint)
RESOLVED=
if [ "$MODE" != force ]; then
    RESOLVED=$(cat "$RESOLVED_FILE" 2>/dev/null) || RESOLVED=
fi
if [ -z "$RESOLVED" ]; then
    RESOLVED=$(resolve_packages)
    if [ -d "$CACHE_DIR" ] && [ -w "$CACHE_DIR" ]; then
        find "$CACHE_DIR" -maxdepth 1 -name '.resolved-*' -mtime +7 -delete 2>/dev/null || true
        printf '%s\n' "$RESOLVED" >"$RESOLVED_FILE.$$" && mv -f "$RESOLVED_FILE.$$" "$RESOLVED_FILE"
    fi
fi
KPKG=$(printf '%s\n' "$RESOLVED" | awk '$1 == "kernel" { print $2 }')
KVER=${KPKG#linux-image-}
declare -a PKGS=("$KPKG" busybox-static "${EXTRA_PKGS[@]}")
declare -A PKGVER=()
while read -r kind name version; do
    [ "$kind" = version ] && PKGVER[$name]=$version
done <<<"$RESOLVED"
for p in "${PKGS[@]}"; do
    [ -n "${PKGVER[$p]:-}" ] || die "internal error: no version resolved for $p"
done

host_pkg_version() {
    dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo "not-installed"
}

recipe_manifest() {
    local f
    printf 'recipe-format 1\n'
    printf 'script %s\n' "$(sha256sum <"$SCRIPT_PATH" | cut -d' ' -f1)"
    printf 'disk-mb %s\n' "$DISK_MB"
    (
        cd "$RECIPE_DIR"
        find . \( -type f -o -type l \) -print | LC_ALL=C sort | while IFS= read -r f; do
            if [ -L "$f" ]; then
                printf 'link %s %s\n' "$f" "$(readlink "$f")"
            else
                printf 'file %s %s\n' "$f" "$(sha256sum <"$f" | cut -d' ' -f1)"
            fi
        done
    )
    for p in "${PKGS[@]}"; do
        printf 'package %s %s\n' "$p" "${PKGVER[$p]}"
    done
    printf 'host-package syslinux %s\n' "$(host_pkg_version syslinux)"
    printf 'host-package syslinux-common %s\n' "$(host_pkg_version syslinux-common)"
}

MANIFEST=$(recipe_manifest)
HASH=$(printf '%s\n' "$MANIFEST" | sha256sum | cut -c1-12)

if [ "$MODE" = hash ]; then
    printf '%s\n' "$HASH"
    exit 0
fi

mkdir -p "$CACHE_DIR" || die "cannot create cache directory $CACHE_DIR"
[ -w "$CACHE_DIR" ] || die "cache directory $CACHE_DIR is not writable"
CACHE_DIR=$(cd "$CACHE_DIR" && pwd -P)
IMAGE_FILE=$IMAGE_NAME-$HASH.qcow2
IMAGE_PATH=$CACHE_DIR/$IMAGE_FILE
LINK_PATH=$CACHE_DIR/$IMAGE_NAME.qcow2
DEB_CACHE=$CACHE_DIR/debs

update_link() {
    ln -sfn "$IMAGE_FILE" "$CACHE_DIR/.$IMAGE_NAME.link.$$"
    mv -Tf "$CACHE_DIR/.$IMAGE_NAME.link.$$" "$LINK_PATH"
}

finish() {
    update_link
    printf '%s\n' "$IMAGE_PATH"
    exit 0
}

# A cache hit marks the image as used (its mtime): the pruning below removes only images nobody has
# used for a day, so an image another checkout's session is serving is not deleted under it. An hour's
# precision is plenty for that, so a hit within the hour writes nothing.
cache_hit() {
    log "$1: $IMAGE_PATH"
    find "$IMAGE_PATH" -maxdepth 0 -mmin +60 -exec touch -c {} + 2>/dev/null || true
    finish
}

if [ "$MODE" = build ] && [ -f "$IMAGE_PATH" ]; then
    cache_hit "cache hit"
fi

# Serialise concurrent builds sharing one cache directory.
exec 9>"$CACHE_DIR/.build.lock"
flock 9
if [ "$MODE" = build ] && [ -f "$IMAGE_PATH" ]; then
    cache_hit "cache hit (built concurrently)"
fi

# Holding the lock, no other build runs: remove leftovers of killed builds.
find "$CACHE_DIR" -maxdepth 1 -name '.build-*' -type d -exec rm -rf {} + 2>/dev/null || true
find "$CACHE_DIR" -maxdepth 2 -path '*/debs/.dl.*' -type d -exec rm -rf {} + 2>/dev/null || true

log "building $IMAGE_FILE (kernel $KPKG ${PKGVER[$KPKG]}, busybox-static ${PKGVER[busybox-static]})"
WORK=$(mktemp -d "$CACHE_DIR/.build-$HASH.XXXXXX")
cleanup() {
    local rc=$?
    rm -rf "$WORK"
    if [ "$rc" -ne 0 ]; then
        log "ERROR: build of $IMAGE_FILE failed (exit $rc); no image was written"
    fi
}
trap cleanup EXIT
trap 'log "command failed (line $LINENO): $BASH_COMMAND"' ERR
printf '%s\n' "$MANIFEST" >"$WORK/manifest"

# --------------------------------------------------------------------------
# Fetch .debs (cached under $CACHE_DIR/debs, keyed by name and version)
# --------------------------------------------------------------------------
mkdir -p "$DEB_CACHE"
fetch_deb() {
    local name=$1 version=$2 enc f dl
    enc=${version//:/%3a}
    for f in "$DEB_CACHE/${name}_${enc}_"*.deb; do
        if [ -f "$f" ]; then
            printf '%s\n' "$f"
            return 0
        fi
    done
    log "downloading $name=$version"
    dl=$(mktemp -d "$DEB_CACHE/.dl.XXXXXX")
    # _apt cannot write into a root-owned mktemp dir; let it, to avoid the
    # "unsandboxed download" warning (harmless either way).
    chmod 0755 "$dl"
    chown _apt "$dl" 2>/dev/null || true
    if ! (cd "$dl" && apt-get download -q "$name=$version" >&2); then
        rm -rf "$dl"
        die "apt-get download $name=$version failed"
    fi
    f=$(find "$dl" -maxdepth 1 -name '*.deb' | head -n1)
    if [ -z "$f" ] || [ "$(dpkg-deb -f "$f" Package)" != "$name" ] \
        || [ "$(dpkg-deb -f "$f" Version)" != "$version" ]; then
        rm -rf "$dl"
        die "downloaded package for $name=$version is not what was asked for"
    fi
    mv -f "$f" "$DEB_CACHE/$(basename "$f")"
    rm -rf "$dl"
    printf '%s\n' "$DEB_CACHE/$(basename "$f")"
}

declare -A DEB=()
for p in "${PKGS[@]}"; do
    DEB[$p]=$(fetch_deb "$p" "${PKGVER[$p]}")
done

# --------------------------------------------------------------------------
# Unpack kernel and busybox (never installed on the host)
# --------------------------------------------------------------------------
KDIR=$WORK/kernel
ROOT=$WORK/rootfs
log "unpacking $KPKG"
dpkg-deb -x "${DEB[$KPKG]}" "$KDIR"
VMLINUZ=$KDIR/boot/vmlinuz-$KVER
[ -f "$VMLINUZ" ] || die "kernel package $KPKG has no boot/vmlinuz-$KVER"
KMOD=$KDIR/lib/modules/$KVER
[ -d "$KMOD" ] || die "kernel package $KPKG has no lib/modules/$KVER"

dpkg-deb -x "${DEB[busybox-static]}" "$WORK/busybox"
BUSYBOX=$WORK/busybox/bin/busybox
[ -x "$BUSYBOX" ] || die "busybox-static has no bin/busybox"

# --------------------------------------------------------------------------
# Root filesystem (becomes the initramfs; the whole OS lives in it)
# --------------------------------------------------------------------------
log "assembling the root filesystem"
mkdir -p "$ROOT"
for d in bin sbin usr/bin usr/sbin lib/modules etc proc sys dev run tmp mnt root var/log; do
    mkdir -p "$ROOT/$d"
done
chmod 1777 "$ROOT/tmp"
chmod 0700 "$ROOT/root"
ln -s /run "$ROOT/var/run"
install -m 0755 "$BUSYBOX" "$ROOT/bin/busybox"
"$BUSYBOX" --list-full | while IFS= read -r applet; do
    [ -e "$ROOT/$applet" ] || [ -L "$ROOT/$applet" ] || ln -s /bin/busybox "$ROOT/$applet"
done
ln -s /bin/busybox "$ROOT/init"   # busybox init reads /etc/inittab

# Extra packages from the recipe's `packages` list: unpacked as they are,
# without dependency resolution (list the libraries they need too).
for p in "${EXTRA_PKGS[@]}"; do
    log "adding package $p ${PKGVER[$p]}"
    dpkg-deb -x "${DEB[$p]}" "$ROOT"
done

# The recipe's rootfs overlay. Modes are normalised: files starting with
# "#!" are executable, everything else is 0644 (git and copies may lose bits).
cp -R --no-preserve=mode,ownership "$RECIPE_DIR/rootfs/." "$ROOT/"
(cd "$RECIPE_DIR/rootfs" && find . -type f -print) | while IFS= read -r f; do
    if [ "$(head -c 2 "$ROOT/$f")" = "#!" ]; then
        chmod 0755 "$ROOT/$f"
    else
        chmod 0644 "$ROOT/$f"
    fi
done
(cd "$RECIPE_DIR/rootfs" && find . -type d -print) | while IFS= read -r d; do
    chmod 0755 "$ROOT/$d"
done

# --------------------------------------------------------------------------
# Kernel modules: the recipe's `modules` list plus their dependencies
# --------------------------------------------------------------------------
log "resolving kernel modules"
"$BUSYBOX" depmod -b "$KDIR" "$KVER"
[ -s "$KMOD/modules.dep" ] || die "depmod produced no modules.dep for $KVER"
mapfile -t WANT_MODS < <(read_list "$RECIPE_DIR/modules" | tr '-' '_')
# Prints "load NAME" for each loadable wanted module (in list order), then
# "file PATH" for every .ko needed (wanted modules and dependencies).
awk -v want="${WANT_MODS[*]}" -v builtin="$KMOD/modules.builtin" '
    function modname(path,   n) { n = path; sub(/.*\//, "", n); sub(/\.ko(\.[a-z]+)?$/, "", n); gsub(/-/, "_", n); return n }
    BEGIN {
        while ((getline line < builtin) > 0) isbuiltin[modname(line)] = 1
    }
    {
        p = $1; sub(/:$/, "", p)
        n = modname(p); path[n] = p
        deps[n] = ""
        for (i = 2; i <= NF; i++) deps[n] = deps[n] " " $i
    }
    END {
        nw = split(want, w, " ")
        for (i = 1; i <= nw; i++) {
            m = w[i]
            if (m in path) {
                print "load " m
                need[path[m]] = 1
                nd = split(deps[m], d, " ")
                for (j = 1; j <= nd; j++) need[d[j]] = 1
            } else if (m in isbuiltin) {
                print "builtin " m
            } else {
                print "missing " m
            }
        }
        for (f in need) print "file " f
    }
' "$KMOD/modules.dep" >"$WORK/modules.plan"
if grep -q '^missing ' "$WORK/modules.plan"; then
    die "kernel $KVER has no module(s): $(sed -n 's/^missing //p' "$WORK/modules.plan" | tr '\n' ' ')"
fi
RMOD=$ROOT/lib/modules/$KVER
mkdir -p "$RMOD"
sed -n 's/^file //p' "$WORK/modules.plan" | while IFS= read -r f; do
    mkdir -p "$RMOD/$(dirname "$f")"
    cp "$KMOD/$f" "$RMOD/$f"
done
for f in modules.builtin modules.builtin.modinfo modules.order; do
    if [ -f "$KMOD/$f" ]; then cp "$KMOD/$f" "$RMOD/$f"; fi
done
"$BUSYBOX" depmod -b "$ROOT" "$KVER"
mkdir -p "$ROOT/etc/vmlet"
sed -n 's/^load //p' "$WORK/modules.plan" >"$ROOT/etc/vmlet/modules.load"
log "modules: $(sed -n 's/^file //p' "$WORK/modules.plan" | wc -l) files," \
    "$(wc -l <"$ROOT/etc/vmlet/modules.load") loaded at boot," \
    "builtin: $(sed -n 's/^builtin //p' "$WORK/modules.plan" | tr '\n' ' ')"

{
    printf 'image=%s\n' "$IMAGE_FILE"
    printf 'recipe_hash=%s\n' "$HASH"
    printf 'kernel=%s\n' "$KVER"
    for p in "${PKGS[@]}"; do printf 'package=%s=%s\n' "$p" "${PKGVER[$p]}"; done
} >"$ROOT/etc/vmlet/build-info"

# Optional build hooks: hooks/*.sh run with ROOTFS, KERNEL_DIR, KVER,
# DEB_CACHE and RECIPE_DIR set, in name order, to customise the root fs.
if [ -d "$RECIPE_DIR/hooks" ]; then
    for h in "$RECIPE_DIR"/hooks/*.sh; do
        [ -f "$h" ] || continue
        log "running hook $(basename "$h")"
        ROOTFS=$ROOT KERNEL_DIR=$KDIR KVER=$KVER DEB_CACHE=$DEB_CACHE RECIPE_DIR=$RECIPE_DIR \
            bash "$h" >&2
    done
fi

# --------------------------------------------------------------------------
# initramfs: newc cpio (files, owned by root) + a tiny hand-made archive with
# the /dev/console node (no mknod, so no root needed), gzip-compressed.
# --------------------------------------------------------------------------
newc_entry() { # name mode(octal) rdevmajor rdevminor ino
    local name=$1 mode=$((8#$2)) maj=$3 min=$4 ino=$5 namesize pad
    namesize=$((${#name} + 1))
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        "$ino" "$mode" 0 0 1 0 0 0 0 "$maj" "$min" "$namesize" 0
    printf '%s\0' "$name"
    pad=$(((4 - (110 + namesize) % 4) % 4))
    head -c "$pad" /dev/zero
}
log "creating the initramfs"
(
    cd "$ROOT"
    find . -mindepth 1 -print | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet
    newc_entry dev/console 020600 5 1 900001
    newc_entry 'TRAILER!!!' 0 0 0 0
) | gzip -9n >"$WORK/initrd.gz"

# --------------------------------------------------------------------------
# Disk: MBR (syslinux mbr.bin) + one bootable FAT partition holding SYSLINUX,
# the kernel, the initramfs and syslinux.cfg. Built without loop devices.
# --------------------------------------------------------------------------
log "creating the boot disk"
DISK_SECTORS=$((DISK_MB * 1024 * 1024 / 512))
PART_SECTORS=$((DISK_SECTORS - PART_START))
truncate -s $((PART_SECTORS * 512)) "$WORK/part.img"
mkfs.vfat -F 16 -n VMLETBOOT -i "${HASH:0:8}" -h "$PART_START" "$WORK/part.img" >&2
syslinux --install "$WORK/part.img"
export MTOOLS_SKIP_CHECK=1
mcopy -i "$WORK/part.img" "$VMLINUZ" ::vmlinuz
mcopy -i "$WORK/part.img" "$WORK/initrd.gz" ::initrd.gz
mcopy -i "$WORK/part.img" "$RECIPE_DIR/syslinux.cfg" ::syslinux.cfg
mcopy -i "$WORK/part.img" "$ROOT/etc/vmlet/build-info" ::build-info.txt

truncate -s $((DISK_SECTORS * 512)) "$WORK/disk.img"
printf 'label: dos\nlabel-id: 0x%s\nstart=%d, size=%d, type=e, bootable\n' \
    "${HASH:0:8}" "$PART_START" "$PART_SECTORS" \
    | sfdisk --no-reread --no-tell-kernel -q "$WORK/disk.img" >&2
dd if="$MBR_BIN" of="$WORK/disk.img" bs=440 count=1 conv=notrunc status=none
dd if="$WORK/part.img" of="$WORK/disk.img" bs=1M seek=$((PART_START * 512 / 1048576)) conv=notrunc,sparse status=none
qemu-img convert -f raw -O qcow2 "$WORK/disk.img" "$WORK/$IMAGE_FILE"
qemu-img check -q "$WORK/$IMAGE_FILE"
chmod 0644 "$WORK/$IMAGE_FILE"

cp "$WORK/manifest" "$CACHE_DIR/$IMAGE_NAME-$HASH.manifest"
mv -f "$WORK/$IMAGE_FILE" "$IMAGE_PATH"
log "built $IMAGE_PATH ($(du -k "$IMAGE_PATH" | cut -f1) KiB)"

# Older recipes' images: an image's mtime is when it was last built or served (a cache hit touches it).
# Drop those unused for more than a day, but keep the most recently used one besides this (another
# checkout may still use it). Nothing runs from these files directly: tests and the demo serve them to
# vmlet, which copies them into its own image store.
PRUNE_BEFORE=$(($(date +%s) - 24 * 3600))
find "$CACHE_DIR" -maxdepth 1 -name "$IMAGE_NAME-*.qcow2" ! -name "$IMAGE_FILE" -printf '%T@ %f\n' \
    | sort -rn | tail -n +2 | while read -r used old; do
        [ "${used%.*}" -lt "$PRUNE_BEFORE" ] || continue
        log "pruning old image $old (unused since $(date -d "@${used%.*}" '+%F %T'))"
        rm -f "$CACHE_DIR/$old" "$CACHE_DIR/${old%.qcow2}.manifest"
    done
trap - ERR
finish
