#!/usr/bin/env bash
# Prepare a Debian 12 node (or a developer/CI machine) for vmlet, as root.
#
# Idempotent: every step checks before it acts, so rerunning is cheap and safe.
# It installs the Debian packages a vmlet node needs, starts virtlogd + libvirtd
# (also on machines without systemd), reports whether KVM can run ordinary
# guests, and creates the project's Python virtualenv (.venv) with vmlet in it.
#
# Exit status is non-zero when something the node cannot work without failed;
# problems it can live with (no usable KVM -> TCG) are reported as NOTE lines.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VMLET_VENV:-$REPO/.venv}"
LIBVIRT_URI="qemu:///system"
export DEBIAN_FRONTEND=noninteractive

log()  { printf '[setup-host] %s\n' "$*" >&2; }
note() { printf '[setup-host] NOTE: %s\n' "$*" >&2; }
die()  { printf '[setup-host] ERROR: %s\n' "$*" >&2; exit 1; }

# Debian packages, grouped by what needs them.
PKGS_LIBVIRT=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils
              dnsmasq-base iptables nftables)
# Pod networking: CNI plugins (in /usr/lib/cni), dnsmasq per pod (above), nsenter (util-linux);
# busybox-static gives the network tests udhcpc/ping/nc for their fake VMs.
PKGS_NETWORK=(containernetworking-plugins util-linux busybox-static)
PKGS_PYTHON_BUILD=(python3 python3-venv python3-dev gcc pkg-config libvirt-dev)
PKGS_TEST_IMAGE=(syslinux syslinux-common mtools dosfstools fdisk cpio gzip)
PKGS_TOOLS=(curl ca-certificates procps iproute2 openssl util-linux)
# Tests read vmlet's ISO disks (cloud-init, configVolume) back with isoinfo.
PKGS_TEST_TOOLS=(genisoimage)
# Tests: a container registry (distribution v2) that the CRI proxy's pull test runs on loopback with a
# config of its own (`docker-registry serve <config>`); when this script installs the package, its own
# service is kept off (below).
PKGS_TEST_REGISTRY=(docker-registry)
# Tests: a SPDY/3.1 client over moby's spdystream (tests/support/spdyclient, built in GOPATH mode with
# Debian's Go) is the independent peer of the streaming server's SPDY framing.
PKGS_TEST_SPDY=(golang-go golang-github-docker-spdystream-dev)

[ "$(id -u)" = 0 ] || die "run as root"
[ -r /etc/debian_version ] || die "this script targets Debian 12 (no /etc/debian_version)"

pid1_is_systemd() { [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; }

# The temporary policy-rc.d of install_packages: found by its marker line, never someone else's file.
POLICY_RC_D=/usr/sbin/policy-rc.d
POLICY_MARKER="# vmlet-setup-host: temporary policy-rc.d"
own_policy() { [ -f "$POLICY_RC_D" ] && grep -qxF "$POLICY_MARKER" "$POLICY_RC_D" 2>/dev/null; }
remove_own_policy() { ! own_policy || rm -f "$POLICY_RC_D"; }

pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

registry_install_over() {
    # The end of an install of docker-registry by this script, however it ended: the policy-rc.d goes,
    # and if the package is in, its packaged service is kept off.
    remove_own_policy
    if pkg_installed docker-registry; then registry_service_off; fi
}

remove_leftover_policy() {
    # A run killed during its apt-get install (SIGKILL: no trap runs) left its policy-rc.d. That run
    # was installing docker-registry (the file is written for nothing else): finish its job.
    own_policy || return 0
    log "removing $POLICY_RC_D left by an interrupted run"
    registry_install_over
}

install_packages() {
    local want=("${PKGS_LIBVIRT[@]}" "${PKGS_NETWORK[@]}" "${PKGS_PYTHON_BUILD[@]}" "${PKGS_TEST_IMAGE[@]}" "${PKGS_TOOLS[@]}"
                "${PKGS_TEST_TOOLS[@]}"
                "${PKGS_TEST_REGISTRY[@]}" "${PKGS_TEST_SPDY[@]}")
    local missing=()
    for p in "${want[@]}"; do
        pkg_installed "$p" || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        log "Debian packages: all ${#want[@]} present"
        return
    fi
    log "installing: ${missing[*]}"
    # Refresh the package lists when they are missing or older than a day.
    local lists=/var/lib/apt/lists
    if [ -z "$(find "$lists" -maxdepth 1 -name '*_Packages' -mmin -1440 2>/dev/null | head -1)" ]; then
        apt-get update -qq >/dev/null || die "apt-get update failed"
    fi
    # --no-install-recommends keeps libvirt-daemon-system (needs systemd) out.
    # docker-registry's postinst would start its service (on :5000, all interfaces, /etc/docker/registry):
    # unless the machine already has a policy-rc.d, a temporary one refuses that service only. A trap
    # removes it however the script ends; a SIGKILL leaves it behind, and the next run removes it
    # (remove_leftover_policy, which knows it by its marker line).
    local rc=0 registry=""
    for p in "${missing[@]}"; do
        if [ "$p" = docker-registry ]; then registry=1; fi
    done
    if [ -n "$registry" ]; then
        # A signal (or die) during the install still ends it properly.
        trap registry_install_over EXIT
        trap 'exit 129' HUP
        trap 'exit 130' INT
        trap 'exit 143' TERM
    fi
    if [ -n "$registry" ] && [ ! -e "$POLICY_RC_D" ]; then
        cat > "$POLICY_RC_D" <<EOF
#!/bin/sh
$POLICY_MARKER
# Temporary, for one apt-get install: keep docker-registry's service off. Safe to delete.
for arg; do
    case "\$arg" in
        -*) ;;
        docker-registry|docker-registry.service) exit 101 ;;
        *) exit 0 ;;
    esac
done
exit 0
EOF
        chmod 0755 "$POLICY_RC_D"
    fi
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
    if [ -n "$registry" ]; then
        trap - EXIT HUP INT TERM
        # This run installed the registry: its packaged service must not run (nor start at boot). A
        # docker-registry that was installed before is the admin's and left alone.
        registry_install_over
    fi
    [ "$rc" = 0 ] || die "apt-get install failed for: ${missing[*]}"
}

registry_service_off() {
    # The tests run docker-registry themselves, with a config of their own.
    log "keeping the packaged docker-registry service off (stopped, not started at boot)"
    if pid1_is_systemd; then
        systemctl disable --now docker-registry.service >/dev/null 2>&1 || true
    else
        if daemon_running /var/run/docker-registry.pid; then
            /etc/init.d/docker-registry stop >/dev/null 2>&1 || true
        fi
        update-rc.d docker-registry disable >/dev/null 2>&1 || true
    fi
}

ensure_accounts() {
    # libvirt's QEMU driver resolves its compiled-in user/group before reading
    # qemu.conf and refuses to start when they are missing (Debian's postinst
    # that creates them lives in libvirt-daemon-system, which we do not install).
    local g
    for g in kvm libvirt libvirt-qemu; do
        getent group "$g" >/dev/null || groupadd --system "$g"
    done
    if ! getent passwd libvirt-qemu >/dev/null; then
        useradd --system --gid libvirt-qemu --groups kvm --home-dir /var/lib/libvirt \
            --no-create-home --shell /usr/sbin/nologin libvirt-qemu
    fi
    [ -e /dev/kvm ] && chgrp kvm /dev/kvm && chmod 0660 /dev/kvm || true
    mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt
}

daemon_running() {  # $1 = pidfile
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

start_libvirt() {
    if pid1_is_systemd; then
        systemctl enable --now virtlogd.socket libvirtd.service >/dev/null 2>&1 \
            || systemctl start virtlogd libvirtd || die "could not start libvirtd via systemd"
    else
        # No systemd: run the daemons directly. virtlogd first, libvirtd's QEMU
        # driver connects to it for every guest's stdio log.
        daemon_running /var/run/virtlogd.pid || { log "starting virtlogd"; /usr/sbin/virtlogd -d; }
        daemon_running /var/run/libvirtd.pid || { log "starting libvirtd"; /usr/sbin/libvirtd -d; }
    fi
    local i
    for i in $(seq 1 60); do
        virsh -c "$LIBVIRT_URI" version >/dev/null 2>&1 && break
        sleep 0.5
    done
    virsh -c "$LIBVIRT_URI" version >/dev/null 2>&1 || die "libvirtd is not answering on $LIBVIRT_URI (see /var/log/libvirt/libvirtd.log)"
    virsh -c "$LIBVIRT_URI" capabilities | grep -q "<domain type='qemu'" \
        || die "libvirt has no QEMU domain type (is qemu-system-x86 installed?)"
    log "libvirtd: up ($(virsh -c "$LIBVIRT_URI" version | sed -n 's/^Running hypervisor: //p'))"
}

report_kvm() {
    # /dev/kvm existing is not enough: on PVM hosts (kvm_pvm) only PVM-built
    # guest kernels run. vmlet's accelerator setting 'auto' probes for real;
    # here we only tell the operator what to expect.
    if [ ! -e /dev/kvm ]; then
        note "no /dev/kvm: VMs will run under TCG (software emulation), much slower than KVM"
    elif [ -d /sys/module/kvm_pvm ]; then
        note "KVM is PVM (kvm_pvm loaded): ordinary guest kernels cannot run on it; VMs will run under TCG"
    else
        log "KVM: /dev/kvm present (vmlet's accelerator 'auto' probes it before use)"
    fi
}

setup_venv() {
    local stamp="$VENV/.vmlet-deps" want
    want="$(cat "$REPO/pyproject.toml" "$REPO/deploy/requirements.lock" | sha256sum | cut -c1-16)"
    if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        log "python venv: $VENV up to date"
        return
    fi
    log "python venv: installing vmlet and its dependencies into $VENV"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" || die "python3 -m venv failed"
    local pip_log="$VENV/pip-install.log"
    "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip >"$pip_log" 2>&1
    "$VENV/bin/pip" install -q --disable-pip-version-check -c "$REPO/deploy/requirements.lock" \
        -e "$REPO[test]" >>"$pip_log" 2>&1 || { tail -30 "$pip_log" >&2; die "pip install of vmlet failed (log: $pip_log)"; }
    # Test-only: an independent copy of the upstream CRI descriptor. It pins an
    # old grpcio/protobuf, so it is installed without dependencies and never imported.
    "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps \
        "$(grep -i '^container-runtime-interface-api==' "$REPO/deploy/requirements.lock")" \
        || die "pip install of container-runtime-interface-api failed"
    echo "$want" > "$stamp"
}

remove_leftover_policy
install_packages
ensure_accounts
start_libvirt
report_kvm
# containerd: the CRI proxy's default runtime (own config, state and socket; local images only).
bash "$REPO/deploy/containerd/setup-containerd.sh" >/dev/null || die "containerd set-up failed"
setup_venv
log "done"
