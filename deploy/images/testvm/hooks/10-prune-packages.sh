# Build hook (run by build-test-image.sh with ROOTFS, DEB_CACHE set): the `packages` are unpacked whole;
# keep only the programs in KEEP (the guest agent; util-linux's setpriv for exec as another user) and the
# shared libraries they load, drop everything else those packages brought (docs, locales, gconv, libc's
# other libraries and tools, init/udev files, util-linux's other programs: busybox's applets stay).
# The closure is read from the ELF files themselves (PT_INTERP and DT_NEEDED, with binutils' readelf),
# resolved in the guest's library directories, symlinks followed.
set -euo pipefail
KEEP=(/usr/sbin/qemu-ga /usr/bin/setpriv)
LIBDIRS=(/lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib64 /lib /usr/lib)

command -v readelf >/dev/null || { echo "ERROR: readelf (binutils) is needed to prune the packages" >&2; exit 1; }

declare -A keep=()
# Mark a guest path and every link on the way to the file it names (links resolved inside the root fs, not
# on the host: libc's /lib64 loader link is absolute); sets MARKED to that file's guest path (no subshell, so
# the marks stay).
mark() {
    local p=$1 t n=0
    while :; do
        keep[$p]=1
        if [ ! -L "$ROOTFS$p" ]; then MARKED=$p; return 0; fi
        n=$((n + 1)); [ "$n" -le 16 ] || { echo "ERROR: symlink loop at $1" >&2; return 1; }
        t=$(readlink "$ROOTFS$p")
        case "$t" in /*) p=$t ;; *) p=$(dirname "$p")/$t ;; esac
        p=$(realpath -m -s "$p")
    done
}
resolve_lib() {
    local d
    for d in "${LIBDIRS[@]}"; do
        if [ -e "$ROOTFS$d/$1" ] || [ -L "$ROOTFS$d/$1" ]; then printf '%s\n' "$d/$1"; return 0; fi
    done
    echo "ERROR: shared library $1 not found in the root fs (add its package to 'packages')" >&2
    return 1
}
declare -A seen=()
queue=("${KEEP[@]}")
while [ "${#queue[@]}" -gt 0 ]; do
    f=${queue[0]}; queue=("${queue[@]:1}")
    [ -n "${seen[$f]:-}" ] && continue
    seen[$f]=1
    [ -e "$ROOTFS$f" ] || [ -L "$ROOTFS$f" ] || { echo "ERROR: $f is not in the root fs" >&2; exit 1; }
    mark "$f"
    real=$ROOTFS$MARKED
    [ -f "$real" ] || { echo "ERROR: $f does not lead to a file in the root fs" >&2; exit 1; }
    interp=$(readelf -lW "$real" | sed -n 's/.*Requesting program interpreter: \(.*\)\]/\1/p')
    [ -n "$interp" ] && queue+=("$interp")
    while IFS= read -r lib; do
        queue+=("$(resolve_lib "$lib")")
    done < <(readelf -dW "$real" | sed -n 's/.*(NEEDED).*Shared library: \[\(.*\)\]/\1/p')
done

# Every file the packages brought (from the .debs just unpacked), minus the closure.
removed=0
while IFS='=' read -r key name version; do
    [ "$key" = package ] || continue
    grep -qx "$name" <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$RECIPE_DIR/packages") || continue
    deb=$(ls "$DEB_CACHE/${name}_${version//:/%3a}_"*.deb | head -n1)
    while IFS= read -r p; do
        p=/${p#./}
        [ -n "${keep[$p]:-}" ] && continue
        if [ -L "$ROOTFS$p" ] || [ -f "$ROOTFS$p" ]; then rm -f "$ROOTFS$p"; removed=$((removed + 1)); fi
    done < <(dpkg-deb --fsys-tarfile "$deb" | tar -t | grep -v '/$')
done <"$ROOTFS/etc/vmlet/build-info"
find "$ROOTFS/usr/share" "$ROOTFS/etc" "$ROOTFS/lib" "$ROOTFS/usr/lib" -mindepth 1 -depth -type d -empty -delete 2>/dev/null || true
# A package file may have replaced a busybox applet link: put back the ones removed.
"$ROOTFS/bin/busybox" --list-full | while IFS= read -r applet; do
    [ -e "$ROOTFS/$applet" ] || [ -L "$ROOTFS/$applet" ] || ln -s /bin/busybox "$ROOTFS/$applet"
done
echo "pruned $removed package files; kept: ${!keep[*]}"
