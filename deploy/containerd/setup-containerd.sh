#!/usr/bin/env bash
# containerd for vmlet (the CRI proxy's default runtime), as root, on Debian 12.
#
# Idempotent: installs containerd + runc + CNI plugins if missing, installs the
# project's config (own root/state/socket/CNI dirs, CRI plugin on,
# restrict_oom_score_adj) under /etc/vmlet-containerd, starts containerd as a
# long-running daemon (systemd unit when PID 1 is systemd, else in the background
# with a pid file, like libvirtd), waits for its socket, and imports the local
# images built from busybox-static (the pause image and a test image):
#   localhost/vmlet/pause:1     the sandbox image (config.toml's sandbox_image)
#   localhost/vmlet/busybox:1   a tiny container image for tests and demos
# Nothing is fetched from a container registry.
#
# Environment: VMLET_CONTAINERD_SOCKET is printed at the end for callers.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ETC=/etc/vmlet-containerd
CONFIG="$ETC/config.toml"
CNI_DIR="$ETC/cni/net.d"
RUN=/run/vmlet-containerd
SOCK="$RUN/containerd.sock"
PIDFILE="$RUN/containerd.pid"
LOG=/var/log/vmlet-containerd.log
CACHE=/var/cache/vmlet/oci
PAUSE_IMAGE=localhost/vmlet/pause:1
TEST_IMAGE=localhost/vmlet/busybox:1
PKGS=(containerd runc containernetworking-plugins busybox-static)
export DEBIAN_FRONTEND=noninteractive

log() { printf '[setup-containerd] %s\n' "$*" >&2; }
die() { printf '[setup-containerd] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root"

install_packages() {
    local missing=() p
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return
    log "installing: ${missing[*]}"
    if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages' -mmin -1440 2>/dev/null | head -1)" ]; then
        apt-get update -qq >/dev/null || die "apt-get update failed"
    fi
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null || die "apt-get install failed: ${missing[*]}"
}

install_config() {
    mkdir -p "$ETC" "$CNI_DIR" "$RUN" /var/lib/vmlet-containerd
    # Copy only when changed: containerd watches the CNI dir and reloads on every event.
    cmp -s "$HERE/config.toml" "$CONFIG" || install -m 0644 "$HERE/config.toml" "$CONFIG"
    cmp -s "$HERE/10-vmlet-containerd.conflist" "$CNI_DIR/10-vmlet-containerd.conflist" \
        || install -m 0644 "$HERE/10-vmlet-containerd.conflist" "$CNI_DIR/10-vmlet-containerd.conflist"
}

running() { [ -s "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

answering() { ctr --address "$SOCK" version >/dev/null 2>&1; }

start_containerd() {
    local want; want="$(sha256sum "$CONFIG" | cut -c1-16)"
    if [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then
        sed "s#@CONFIG@#$CONFIG#" "$HERE/vmlet-containerd.service" > /etc/systemd/system/vmlet-containerd.service
        systemctl daemon-reload
        if [ "$(cat "$RUN/config.sha" 2>/dev/null)" != "$want" ]; then systemctl restart vmlet-containerd
        else systemctl enable --now vmlet-containerd >/dev/null 2>&1; fi
    else
        if running && [ "$(cat "$RUN/config.sha" 2>/dev/null)" != "$want" ]; then
            log "config changed: restarting containerd (containers keep running in their shims)"
            kill "$(cat "$PIDFILE")"
            for _ in $(seq 1 50); do running || break; sleep 0.2; done
        fi
        if ! running; then
            log "starting containerd ($CONFIG, log $LOG)"
            setsid containerd --config "$CONFIG" >>"$LOG" 2>&1 < /dev/null &
            echo $! > "$PIDFILE"
        fi
    fi
    echo "$want" > "$RUN/config.sha"
    for _ in $(seq 1 100); do answering && break; sleep 0.2; done
    answering || die "containerd is not answering on $SOCK (see $LOG)"
    log "containerd: up on $SOCK ($(ctr --address "$SOCK" version 2>/dev/null | awk '/Version/{print $2; exit}'))"
}

import_image() {  # $1 = name, rest = Cmd
    local name="$1"; shift
    local tar="$CACHE/$(echo "$name" | tr '/:' '__').tar" digest have
    mkdir -p "$CACHE"
    digest="$(python3 "$HERE/build-oci-image.py" --name "$name" --out "$tar" -- "$@")"
    have="$(ctr --address "$SOCK" -n k8s.io images ls 2>/dev/null | awk -v n="$name" '$1==n {print $3}')"
    if [ "$have" = "$digest" ]; then
        log "image $name: present ($digest)"
        return
    fi
    ctr --address "$SOCK" -n k8s.io images import "$tar" >/dev/null || die "ctr images import $tar failed"
    log "image $name: imported ($digest)"
}

install_packages
install_config
start_containerd
import_image "$PAUSE_IMAGE" /bin/sh -c 'trap "exit 0" TERM INT; while :; do sleep 3600 & wait $!; done'
import_image "$TEST_IMAGE" /bin/sh
echo "$SOCK"
