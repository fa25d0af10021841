"""The main job, for now: boot the project's test VM under the local libvirt and show it.

Boots the test image with a NoCloud seed on an isolated libvirt network (no
forwarding: the VM reaches nothing outside this host), streams the serial
console to stdout, prints the IP the VM leased, then powers it off through the
ACPI power button and removes everything it created.

Until the CRI shim lands this drives libvirt directly; afterwards the demo
becomes "a VM pod through the CRI socket". Run via deploy/demo.sh.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import libvirt

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cri_shim import cloudinit  # noqa: E402
from cri_shim.domain_xml import Disk, DomainSpec, Interface, build_domain_xml  # noqa: E402
from tests.support import libvirt_env  # noqa: E402


def follow(console: libvirt_env.ConsoleLog, dom, until: str, timeout: float, shown: int) -> tuple[int, str | None]:
    """Print complete console lines from index `shown` on until one starts with `until`.

    Returns (lines printed so far, the matching line or None on timeout/VM stop).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = console.text().split("\n")[:-1]  # the last element is a partial line
        for index in range(shown, len(lines)):
            print("  | " + lines[index].rstrip("\r"), flush=True)
            if lines[index].startswith(until):
                return index + 1, lines[index].strip()
        shown = max(shown, len(lines))
        if not dom.isActive():
            break
        time.sleep(0.2)
    return shown, None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path, help="the test VM qcow2")
    parser.add_argument("--domain-type", default=libvirt_env.DOMAIN_TYPE, choices=("qemu", "kvm"),
                        help="libvirt domain type (qemu = TCG; default %(default)s)")
    args = parser.parse_args()

    conn = libvirt_env.connect()
    work = libvirt_env.WORK_ROOT / f"demo-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True, mode=0o755)
    libvirt_env.WORK_ROOT.chmod(0o755)
    net = dom = None
    try:
        net = libvirt_env.create_isolated_network(conn)
        print(f"network   {net.name}: {net.subnet} on bridge {net.bridge}, DHCP, no forwarding")
        overlay = work / "root.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(args.image), str(overlay)],
                       check=True)
        seed = work / "cidata.iso"
        seed.write_bytes(cloudinit.build_iso("nocloud", instance_id=str(uuid.uuid4()), hostname="vmlet-demo",
                                             user_data="#!/bin/sh\necho hello from user-data on $(hostname)\n"))
        spec = DomainSpec(
            name=libvirt_env.unique_name("demo"), memory_kib=256 * 1024, vcpus=1, domain_type=args.domain_type,
            disks=[Disk(str(overlay), "vda"), Disk(str(seed), "sda", bus="scsi", device="cdrom", format="raw")],
            interfaces=[Interface("network", source=net.name)],
            console_log=str(work / "console.log"),
        )
        dom = conn.defineXML(build_domain_xml(spec))
        started = time.monotonic()
        dom.create()
        print(f"domain    {spec.name} ({args.domain_type}) started; serial console:")
        console = libvirt_env.ConsoleLog(work / "console.log")
        shown, ready = follow(console, dom, "VMLET-TESTVM: ready", 180, 0)
        if ready is None:
            print("the VM did not finish booting", file=sys.stderr)
            return 1
        leases = conn.networkLookupByName(net.name).DHCPLeases()
        ips = ", ".join(f"{l['ipaddr']}/{l['prefix']} ({l['mac']})" for l in leases) or "none"
        print(f"booted in {time.monotonic() - started:.1f}s; DHCP lease: {ips}")
        print("pressing the ACPI power button ...")
        dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        follow(console, dom, "VMLET-TESTVM: acpi poweroff", 60, shown)
        if not libvirt_env.wait_inactive(dom, 60):
            print("the VM ignored the power button", file=sys.stderr)
            return 1
        print("powered off cleanly")
        return 0
    finally:
        if dom is not None:
            libvirt_env.remove_domain(dom)
        if net is not None:
            libvirt_env.remove_network(conn.networkLookupByName(net.name))
        shutil.rmtree(work, ignore_errors=True)
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
