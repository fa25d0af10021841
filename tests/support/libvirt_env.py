"""Real libvirt for tests: connection, isolated networks, VMs, console reading, sweeping.

Everything a test creates in libvirt carries TEST_PREFIX in its name, so a
sweep can remove what a crashed earlier run left behind and the session can
prove at its end that nothing is left.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import libvirt

LIBVIRT_URI = os.environ.get("VMLET_TEST_LIBVIRT_URI", "qemu:///system")
TEST_PREFIX = "vmlet-test-"
# Names carry the test run's pid: concurrent runs leave each other alone, and a
# run sweeps what dead runs left behind.
RUN_PREFIX = f"{TEST_PREFIX}{os.getpid()}-"
# TCG by default: on the project's machines /dev/kvm cannot run ordinary guests.
DOMAIN_TYPE = os.environ.get("VMLET_TEST_DOMAIN_TYPE", "qemu")
# Scratch space QEMU (running as libvirt-qemu) can reach: pytest's tmp dirs are 0700.
WORK_ROOT = Path(os.environ.get("VMLET_TEST_WORK_ROOT", "/var/lib/vmlet-test"))

# libvirt reports errors on stderr by default; tests read them from exceptions.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


class Connection:
    """A virConnect that reopens itself when libvirtd restarted (the fault tests restart the shared daemon).

    Attribute access goes to the current connection; a call that fails because the connection died is
    retried once on a fresh one. Objects got before a restart (domains, networks) belong to the dead
    connection: look them up again.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn = libvirt.open(uri)

    def current(self) -> libvirt.virConnect:
        try:
            if self._conn.isAlive():
                return self._conn
        except libvirt.libvirtError:
            pass
        self._conn = libvirt.open(self.uri)
        return self._conn

    def __getattr__(self, name: str):
        attr = getattr(self.current(), name)
        if not callable(attr) or name == "close":
            return attr

        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except libvirt.libvirtError:
                if self._conn.isAlive():
                    raise
                return getattr(self.current(), name)(*args, **kwargs)

        return call


def connect() -> Connection:
    return Connection(LIBVIRT_URI)


def _ignore_missing(fn, *args) -> None:
    try:
        fn(*args)
    except libvirt.libvirtError as e:
        if e.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_NO_NETWORK,
                                      libvirt.VIR_ERR_OPERATION_INVALID):
            raise


def remove_domain(dom: libvirt.virDomain) -> None:
    """Destroy (if running) and undefine; tolerant of a domain already gone."""
    try:
        active = dom.isActive()
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return
        raise
    if active:
        _ignore_missing(dom.destroy)
    _ignore_missing(dom.undefineFlags, libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)


def remove_network(net: libvirt.virNetwork) -> None:
    try:
        if net.isActive():
            _ignore_missing(net.destroy)
        _ignore_missing(net.undefine)
    except libvirt.libvirtError as e:
        if e.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:
            raise


def _sweepable(name: str) -> bool:
    """Ours, or a test run's that no longer exists."""
    if not name.startswith(TEST_PREFIX):
        return False
    if name.startswith(RUN_PREFIX):
        return True
    pid = name[len(TEST_PREFIX):].split("-", 1)[0]
    return not (pid.isdigit() and Path(f"/proc/{pid}").exists())


def test_domains(conn: libvirt.virConnect) -> list[libvirt.virDomain]:
    return [d for d in conn.listAllDomains() if _sweepable(d.name())]


def test_networks(conn: libvirt.virConnect) -> list[libvirt.virNetwork]:
    return [n for n in conn.listAllNetworks() if _sweepable(n.name())]


def sweep(conn: libvirt.virConnect) -> list[str]:
    """Remove this run's and dead runs' test domains and networks; return what was removed."""
    removed = []
    for dom in test_domains(conn):
        removed.append(f"domain {dom.name()}")
        remove_domain(dom)
    for net in test_networks(conn):
        removed.append(f"network {net.name()}")
        remove_network(net)
    return removed


def leftover_qemu_processes() -> list[str]:
    """QEMU processes of test domains (their command line names the domain)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in out.splitlines()
            if "qemu-system" in line and f"guest={RUN_PREFIX}" in line]


def release_work_dir(d: Path) -> None:
    """Stop what a run's vmlet daemons left under `d` (daemons, pod networks, volume binds, loop devices) before
    it is deleted.

    Pod netns and host links are named after random sandbox IDs and dnsmasq's pidfile lies under the state
    dir: once the directory is gone nothing can tell them from another run's, so they go first."""
    from cri_shim.storage import pod_volumes
    from cri_shim.network import NetworkManager

    prefix = f"{d}/".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.startswith(prefix) for a in argv[1:]) and b"cri_shim.main" in argv:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    for records in d.glob("**/network"):
        state = records.parent
        if records.is_dir() and any((r / "record.json").exists() for r in records.iterdir()):
            try:
                NetworkManager(state).sweep([])
            except Exception as e:  # noqa: BLE001 - best effort: report, and go on with the rest
                print(f"sweeping the pod networks of {state} failed: {e}")
    pod_volumes.unmount_under(d)
    # Loop devices standing in for block PVs outlive the run that attached them (a busy one detaches when freed).
    from tests.support import storage
    for dev in storage.loop_devices_of(d):
        storage.detach_loop(dev)


def remove_stale_work_dirs() -> list[Path]:
    """Remove run-<pid> work dirs of test runs that no longer exist (killed runs), with what they left running."""
    removed = []
    for d in WORK_ROOT.glob("run-*"):
        pid = d.name.removeprefix("run-")
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            release_work_dir(d)
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def unique_name(kind: str) -> str:
    return f"{RUN_PREFIX}{kind}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------- networks

@dataclass(frozen=True)
class IsolatedNetwork:
    name: str
    bridge: str
    subnet: ipaddress.IPv4Network

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 1


def _used_subnets() -> list[ipaddress.IPv4Network]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    return [ipaddress.ip_interface(m).network for m in re.findall(r"inet (\S+)", out)]


def pick_subnet() -> ipaddress.IPv4Network:
    """A free /24 in 10.213.0.0/16, the range the tests keep for themselves."""
    used = _used_subnets()
    for third in range(0, 256):
        candidate = ipaddress.IPv4Network(f"10.213.{(os.getpid() + third) % 256}.0/24")
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise RuntimeError("no free /24 left in 10.213.0.0/16")


def network_xml(name: str, bridge: str, subnet: ipaddress.IPv4Network) -> str:
    """An isolated libvirt network: a host bridge with DHCP, no <forward> (no route or NAT out)."""
    net = ET.Element("network")
    ET.SubElement(net, "name").text = name
    ET.SubElement(net, "bridge", {"name": bridge, "stp": "off", "delay": "0"})
    hosts = list(subnet.hosts())
    ip = ET.SubElement(net, "ip", {"address": str(hosts[0]), "netmask": str(subnet.netmask)})
    dhcp = ET.SubElement(ip, "dhcp")
    ET.SubElement(dhcp, "range", {"start": str(hosts[99]), "end": str(hosts[199])})
    return ET.tostring(net, encoding="unicode")


def create_isolated_network(conn: libvirt.virConnect) -> IsolatedNetwork:
    name = unique_name("net")
    bridge = "vmlt" + name[-8:]  # interface names are limited to 15 characters
    subnet = pick_subnet()
    net = conn.networkDefineXML(network_xml(name, bridge, subnet))
    try:
        net.create()
    except Exception:
        remove_network(net)
        raise
    return IsolatedNetwork(name=name, bridge=bridge, subnet=subnet)


# ---------------------------------------------------------------- console

class ConsoleLog:
    """The serial console as virtlogd writes it to a file; waits for lines."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, timeout: float, dom: libvirt.virDomain | None = None) -> re.Match:
        """Wait until `pattern` matches a line; fail early if the domain stops."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.text())
            if m:
                return m
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {pattern!r} on the console within {timeout}s; console so far:\n"
                                   + self.text()[-4000:])
            if dom is not None and not dom.isActive():
                raise AssertionError(f"domain stopped before {pattern!r} appeared; console:\n" + self.text()[-4000:])
            time.sleep(0.2)


def wait_inactive(dom: libvirt.virDomain, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not dom.isActive():
                return True
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return True
            raise
        time.sleep(0.2)
    return False
