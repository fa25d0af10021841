#!/bin/sh
# Boot script of the vmlet test VM, run by busybox init (::sysinit).
#
# Every status line on the serial console starts with "VMLET-TESTVM: " so
# that tests can grep for it (see deploy/images/README.md for the list).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
T="VMLET-TESTVM:"
say() { echo "$T $*"; }
# The boot loader may leave a half line (escape codes) on the console.
echo

DS_MNT=/mnt/datasource
VRUN=/run/vmlet

# --- 1. early mounts, modules, boot marker ---------------------------------
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o mode=0755,nosuid devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mkdir -p "$VRUN/net" "$DS_MNT"
# Keep the console for our markers: only kernel errors from now on.
dmesg -n 3
hostname -F /etc/hostname

while read -r mod; do
    modprobe "$mod" || say "modprobe-failed $mod"
done </etc/vmlet/modules.load

# acpid as early as possible, so a power-button press during boot is not
# lost. It needs the /dev/input/event* nodes (button + evdev modules).
if [ -e /dev/input/event0 ]; then
    acpid -c /etc/acpi -a /etc/acpid.conf -l /run/acpid.log || say "acpid-failed"
else
    say "acpid-failed no /dev/input/event0"
fi

say "boot marker"
say "cmdline $(cat /proc/cmdline)"

# --- 2. block devices --------------------------------------------------------
for d in /sys/block/*; do
    [ -e "$d/size" ] || continue
    name=${d##*/}
    case "$name" in loop*|ram*|zram*|nbd*) continue ;; esac
    bytes=$(($(cat "$d/size") * 512))
    # An empty CD-ROM drive reports a bogus size: report 0 if unreadable.
    case "$name" in
    sr*) dd if="/dev/$name" of=/dev/null bs=2048 count=1 2>/dev/null || bytes=0 ;;
    esac
    say "disk $name $bytes"
done

# --- 4. datasource (before the network, so DHCP sends the hostname) ---------
# "<type> <label>" of the iso9660 or FAT filesystem on device $1 (nothing if
# neither). Read directly: busybox findfs misses filesystems smaller than
# 68 KiB (as small NoCloud ISOs are) and is slow with an empty CD-ROM drive.
fs_probe() {
    p=$VRUN/probe
    # iso9660: primary volume descriptor in sector 16: "\1CD001", id at 40..71
    if dd if="$1" of="$p" bs=2048 skip=16 count=1 2>/dev/null &&
        [ "$(dd if="$p" bs=1 skip=1 count=5 2>/dev/null)" = CD001 ]; then
        echo "iso9660 $(dd if="$p" bs=1 skip=40 count=32 2>/dev/null | sed 's/ *$//')"
        return 0
    fi
    # FAT: boot sector, label at 43 (FAT12/16, type at 54) or 71 (FAT32, at 82)
    dd if="$1" of="$p" bs=512 count=1 2>/dev/null || return 1
    if [ "$(dd if="$p" bs=1 skip=82 count=5 2>/dev/null)" = FAT32 ]; then
        echo "vfat $(dd if="$p" bs=1 skip=71 count=11 2>/dev/null | sed 's/ *$//')"
    elif [ "$(dd if="$p" bs=1 skip=54 count=3 2>/dev/null)" = FAT ]; then
        echo "vfat $(dd if="$p" bs=1 skip=43 count=11 2>/dev/null | sed 's/ *$//')"
    fi
}

# "<device> <type> <label>" for every block device with an iso9660/FAT fs.
scan_labels() {
    for dev in $(awk 'NR > 2 && $4 != "" { print "/dev/" $4 }' /proc/partitions); do
        [ -b "$dev" ] || continue
        probe=$(fs_probe "$dev")
        [ -n "$probe" ] && echo "$dev $probe"
    done
}

# "<device> <type>" of the first device (from $LABELS) labelled with one of
# the given labels; with FINDFS_FALLBACK=1 also ask busybox findfs for the
# first label (other filesystem types; type "auto").
find_label() {
    for l in "$@"; do
        found=$(echo "$LABELS" | awk -v l="$l" '$3 == l { print $1, $2; exit }')
        [ -n "$found" ] && { echo "$found"; return 0; }
    done
    if [ "$FINDFS_FALLBACK" = 1 ]; then
        for l in "$1"; do
            dev=$(findfs "LABEL=$l" 2>/dev/null) && [ -n "$dev" ] && { echo "$dev auto"; return 0; }
        done
    fi
    return 1
}

# First scalar value of a top-level key of a simple YAML (or JSON) mapping.
yaml_get() { # key file
    v=$(tr -d '\r' <"$2" | sed -n "s/^[[:space:]]*\"\{0,1\}$1\"\{0,1\}[[:space:]]*:[[:space:]]*//p" | head -n1)
    case "$v" in
    \"*) v=$(printf '%s\n' "$v" | sed 's/^"\([^"]*\)".*/\1/') ;;
    \'*) v=$(printf '%s\n' "$v" | sed "s/^'\\([^']*\\)'.*/\\1/") ;;
    *) v=$(printf '%s\n' "$v" | sed -e 's/[[:space:]]#.*//' -e 's/[[:space:],]*$//') ;;
    esac
    printf '%s\n' "$v"
}

# String value of a top-level key of a JSON object (may be all on one line).
json_get() { # key file
    tr '\r\n' '  ' <"$2" | awk -v k="$1" -f /etc/vmlet/json_get.awk
}

DS=none DS_DEV= INSTANCE_ID= DS_HOSTNAME= USER_DATA= NETWORK_CONFIG= VENDOR_DATA=
# Disks exist once their modules are loaded (module init waits for async
# probing), so a few short retries are enough; findfs only on the last one.
tries=0 FINDFS_FALLBACK=0
while :; do
    tries=$((tries + 1))
    [ "$tries" -ge 3 ] && FINDFS_FALLBACK=1
    LABELS=$(scan_labels)
    if found=$(find_label cidata CIDATA); then
        DS=nocloud
    elif found=$(find_label config-2 CONFIG-2); then
        DS=configdrive
    fi
    [ "$DS" != none ] && break
    [ "$tries" -ge 3 ] && break
    sleep 0.25
done

if [ "$DS" != none ]; then
    DS_DEV=${found%% *} DS_FSTYPE=${found#* }
    case "$DS_FSTYPE" in
    vfat) mopts="-t vfat -o ro,iocharset=utf8" ;;
    iso9660) mopts="-t iso9660 -o ro" ;;
    *) mopts="-o ro" ;;
    esac
    if ! mount $mopts "$DS_DEV" "$DS_MNT"; then
        say "datasource-mount-failed $DS_DEV"
        DS=none
    fi
fi
say "datasource $DS"
[ "$DS" != none ] && say "datasource-device $DS_DEV"

case "$DS" in
nocloud)
    if [ -f "$DS_MNT/meta-data" ]; then
        INSTANCE_ID=$(yaml_get instance-id "$DS_MNT/meta-data")
        DS_HOSTNAME=$(yaml_get local-hostname "$DS_MNT/meta-data")
        [ -n "$DS_HOSTNAME" ] || DS_HOSTNAME=$(yaml_get hostname "$DS_MNT/meta-data")
    fi
    USER_DATA=$DS_MNT/user-data
    [ -f "$DS_MNT/network-config" ] && NETWORK_CONFIG=$DS_MNT/network-config
    [ -f "$DS_MNT/vendor-data" ] && VENDOR_DATA=$DS_MNT/vendor-data
    ;;
configdrive)
    md=$DS_MNT/openstack/latest/meta_data.json
    if [ -f "$md" ]; then
        INSTANCE_ID=$(json_get uuid "$md")
        DS_HOSTNAME=$(json_get hostname "$md")
    fi
    USER_DATA=$DS_MNT/openstack/latest/user_data
    [ -f "$DS_MNT/openstack/latest/network_data.json" ] && NETWORK_CONFIG=$DS_MNT/openstack/latest/network_data.json
    # vendor_data.json: {"cloud-init": "<vendor-data text>"}, as cloud-init's OpenStack reader takes it.
    if [ -f "$DS_MNT/openstack/latest/vendor_data.json" ]; then
        json_get cloud-init "$DS_MNT/openstack/latest/vendor_data.json" >"$VRUN/vendor-data"
        VENDOR_DATA=$VRUN/vendor-data
    fi
    ;;
esac

if [ -n "$DS_HOSTNAME" ]; then
    hostname "$DS_HOSTNAME"
    echo "$DS_HOSTNAME" >/etc/hostname
    printf '127.0.1.1\t%s %s\n' "$DS_HOSTNAME" "${DS_HOSTNAME%%.*}" >>/etc/hosts
fi
say "instance-id ${INSTANCE_ID:-none}"
say "hostname $(hostname)"
[ -n "$NETWORK_CONFIG" ] && say "network-config present"

# --- resolver options: cloud-init's resolv_conf module (manage_resolv_conf) ---
# From vendor-data, then a cloud-config user-data (user data wins, as in
# cloud-init). DHCP brings servers and searches; the options line is kept in
# $VRUN/net/resolv.options, which udhcpc.script adds at every bound/renew.
for f in "$VENDOR_DATA" "$USER_DATA"; do
    [ -n "$f" ] && [ -s "$f" ] || continue
    case "$(head -n1 "$f" | tr -d '\r')" in '#cloud-config'*) ;; *) continue ;; esac
    o=$(awk -f /etc/vmlet/resolv_conf.awk "$f")
    [ -n "$o" ] && printf '%s\n' "$o" >"$VRUN/net/resolv.options"
done
[ -s "$VRUN/net/resolv.options" ] && say "resolv-$(cat "$VRUN/net/resolv.options")"

# --- 3. network: lo + every ethernet NIC via DHCP, in parallel ---------------
ip link set lo up
HOST=$(hostname)
for n in /sys/class/net/*; do
    ifname=${n##*/}
    [ "$ifname" = lo ] && continue
    [ "$(cat "$n/type" 2>/dev/null)" = 1 ] || continue   # ARPHRD_ETHER only
    (
        ip link set "$ifname" up
        # 3 discovers, 2 s apart: gives up after ~6 s without a DHCP server.
        # On success udhcpc forks into the background and keeps the lease.
        if ! udhcpc -i "$ifname" -n -t 3 -T 2 -s /etc/vmlet/udhcpc.script \
            -x "hostname:$HOST" >/dev/null 2>&1 </dev/null; then
            say "dhcp-failed $ifname"
        fi
    ) &
done
wait
# No lease (no DHCP server): still the resolver options, if any.
[ -e /etc/resolv.conf ] || cat "$VRUN/net/resolv.options" >/etc/resolv.conf 2>/dev/null || : >/etc/resolv.conf

# --- hooks shipped in the image (e.g. extra agents) --------------------------
if [ -d /etc/vmlet/boot.d ]; then
    for h in /etc/vmlet/boot.d/*; do
        [ -f "$h" ] && [ -x "$h" ] && "$h"
    done
fi

# --- 5. user data ------------------------------------------------------------
if [ -n "$USER_DATA" ] && [ -s "$USER_DATA" ]; then
    first=$(head -n1 "$USER_DATA" | tr -d '\r')
    case "$first" in
    '#!'*)
        cp "$USER_DATA" "$VRUN/user-data"
        chmod 0700 "$VRUN/user-data"
        (cd / && VMLET_DATASOURCE_DIR=$DS_MNT "$VRUN/user-data" </dev/null)
        say "user-data exit $?"
        ;;
    '#cloud-config'*)
        say "user-data cloud-config"
        awk -f /etc/vmlet/runcmd.awk "$USER_DATA" >"$VRUN/runcmd"
        rc=0
        while IFS= read -r cmd; do
            (cd / && sh -c "$cmd" </dev/null) || rc=$?
        done <"$VRUN/runcmd"
        say "user-data exit $rc"
        ;;
    *)
        say "user-data ignored"
        ;;
    esac
else
    say "user-data none"
fi

# --- 6. ready ----------------------------------------------------------------
say "ready"
