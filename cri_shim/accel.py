"""Which accelerator VMs get: KVM when it really runs guests, else TCG.

`/dev/kvm` existing proves little: on PVM hosts (kvm_pvm) only guest kernels
built for PVM run, an ordinary one hangs right after decompression. So
`auto` boots a probe image under KVM once and waits for its boot marker on
the serial console; the verdict is cached for the host's boot (boot_id), so
later starts do not pay for it. Without a probe image `auto` decides from the
host alone: no /dev/kvm or a PVM module means TCG.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger("vmlet.accel")

PROBE_TIMEOUT = 30.0
PROBE_MARKER = re.compile(rb"VMLET-TESTVM: boot marker|login:|Welcome to", re.IGNORECASE)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def probe_kvm(image: Path, timeout: float = PROBE_TIMEOUT, accel: str = "kvm") -> tuple[bool, str]:
    """Boot `image` under KVM (snapshot mode: the image is not written); True when it reaches its marker.

    `accel` is there so the probe itself can be checked under TCG.
    """
    with tempfile.TemporaryDirectory(prefix="vmlet-accel-") as tmp:
        console = Path(tmp) / "console"
        cmd = ["qemu-system-x86_64", "-accel", accel, "-m", "256", "-display", "none", "-no-reboot",
               "-nic", "none", "-serial", f"file:{console}", "-monitor", "none",
               "-drive", f"file={image},if=virtio,snapshot=on,format=qcow2"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if console.exists() and PROBE_MARKER.search(console.read_bytes()):
                    return True, f"probe guest booted under {accel}"
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                    return False, f"QEMU exited under {accel}: {err or proc.returncode}"
                time.sleep(0.2)
            return False, f"probe guest did not boot under {accel} within {timeout:.0f}s"
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def host_verdict() -> tuple[bool, str]:
    if not os.path.exists("/dev/kvm"):
        return False, "no /dev/kvm"
    if os.path.isdir("/sys/module/kvm_pvm"):
        return False, "KVM is PVM (kvm_pvm loaded): ordinary guest kernels do not run on it"
    return True, "/dev/kvm present (no probe image configured)"


def resolve(setting: str, probe_image: Path | None, cache_dir: Path) -> tuple[str, str]:
    """('kvm' | 'qemu', why) for the configured setting."""
    if setting in ("kvm", "qemu"):
        return setting, "configured"
    if probe_image is None:
        ok, why = host_verdict()
        return ("kvm" if ok else "qemu"), why
    cache = cache_dir / "accelerator.json"
    key = {"boot_id": _boot_id(), "image": str(probe_image)}
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["domain_type"], cached["why"] + " (cached for this boot)"
    except (OSError, ValueError, KeyError):
        pass
    ok, why = host_verdict()
    if ok:
        ok, why = probe_kvm(probe_image)
    domain_type = "kvm" if ok else "qemu"
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "domain_type": domain_type, "why": why}))
    return domain_type, why
