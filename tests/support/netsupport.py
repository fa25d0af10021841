"""Helpers for the pod network tests: a test CNI network, "fake VMs" in namespaces, leftover sweeps.

Everything the tests create is recognisable *and names the pytest process that made it*,
so a sweep removes what a crashed run left behind without touching a concurrent run's
things (several sessions share a machine), and a session can prove at its end that it
left nothing:
- sandbox IDs are SID_PREFIX `7e5` + the pid (6 hex) + a per-session counter (3 hex) + random, so
  pod netns are `vmlet-7e5<pid><n>…` and host links `vb7e5<pid><n>`/`vh7e5<pid><n>` (the names use
  the ID's first 12/16 characters: the counter keeps them unique within a session);
- the tests' own netns and links are `vmlt-<pid, 6 hex>…` (fake VMs, the CNI bridge);
- state dirs contain STATE_MARK (`vmlet-nettest-<pid, 6 hex>`), which dnsmasq's --pid-file names.
Traffic only flows between namespaces on this machine: the test CNI network has
no NAT and a subnet of the tests' own (10.214.0.0/16); fake VMs only speak DHCP
and answer the host.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from pyroute2 import IPRoute

from cri_shim.network import dhcp, netns
from cri_shim.network.names import netns_name

SID_PREFIX = "7e5"
PID6 = f"{os.getpid():06x}"  # pid_max is at most 2^22
_counter = itertools.count(1)
STATE_MARK = f"vmlet-nettest-{PID6}"
TEST_LINK_PREFIX = "vmlt-"
OWN_PREFIX = TEST_LINK_PREFIX + PID6
CNI_BIN_DIR = "/usr/lib/cni"
BUSYBOX = shutil.which("busybox") or "/bin/busybox"


def new_sandbox_id() -> str:
    return f"{SID_PREFIX}{PID6}{next(_counter) % 0x1000:03x}" + secrets.token_hex(26)


def test_name() -> str:
    """`vmlt-<pid6><n, 4 hex>`: 15 characters, fits a link name."""
    return f"{OWN_PREFIX}{next(_counter) % 0x10000:04x}"


def _owner(name: str) -> int | None:
    """The pid of the test session that made a netns, link or state dir; None if not a test's."""
    m = (re.match(rf"^vmlet-{SID_PREFIX}([0-9a-f]{{6}})", name)
         or re.match(rf"^v[bh]{SID_PREFIX}([0-9a-f]{{6}})[0-9a-f]{{3}}$", name)
         or re.match(rf"^{TEST_LINK_PREFIX}([0-9a-f]{{6}})", name) or re.search(r"vmlet-nettest-([0-9a-f]{6})", name))
    return int(m.group(1), 16) if m else None


def _mine(name: str, or_dead: bool) -> bool:
    """Made by this session (or, with or_dead, by one that no longer runs)."""
    pid = _owner(name)
    if pid is None:
        return False
    return pid == os.getpid() or (or_dead and not os.path.exists(f"/proc/{pid}"))


# ---------------------------------------------------------------- the test CNI network

def _used_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    with IPRoute() as ipr:
        for a in ipr.get_addr(family=2):
            nets.append(ipaddress.ip_interface(f"{a.get('address')}/{a.get('prefixlen')}").network)
        for r in ipr.get_routes(family=2):
            if r.get("dst"):
                nets.append(ipaddress.ip_network(f"{r.get('dst')}/{r.get('dst_len')}", strict=False))
    return nets


def pick_subnet() -> ipaddress.IPv4Network:
    """A free /24 in 10.214.0.0/16, the range the network tests keep for themselves."""
    used = _used_networks()
    for i in range(256):
        candidate = ipaddress.IPv4Network(f"10.214.{(os.getpid() + i) % 256}.0/24")
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise RuntimeError("no free /24 left in 10.214.0.0/16")


@dataclass(frozen=True)
class TestNetwork:
    name: str
    bridge: str
    subnet: ipaddress.IPv4Network
    extra_route: ipaddress.IPv4Network  # a non-default route the pods get (never used for traffic)
    ipam_dir: Path

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    def bridge_plugin(self) -> dict:
        return {
            "type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False,
            "ipam": {"type": "host-local", "dataDir": str(self.ipam_dir),
                     "ranges": [[{"subnet": str(self.subnet), "gateway": self.gateway}]],
                     # The default route points at the local gateway (the test bridge): no NAT, and
                     # nothing in the tests sends traffic anywhere but to the host and fake VMs.
                     "routes": [{"dst": "0.0.0.0/0"}, {"dst": str(self.extra_route), "gw": self.gateway}]},
        }

    def conflist(self, extra_plugins: list[dict] | None = None, version: str = "1.0.0") -> dict:
        return {"cniVersion": version, "name": self.name, "plugins": [self.bridge_plugin(), *(extra_plugins or [])]}

    def allocated_ips(self) -> list[str]:
        """IPs host-local still holds for this network (files named after the IP)."""
        d = self.ipam_dir / self.name
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if re.match(r"^\d+\.\d+\.\d+\.\d+$", p.name))


@contextlib.contextmanager
def private_network(work_dir: Path, name: str) -> Iterator[tuple[TestNetwork, Path]]:
    """A CNI network of a program's own (the demo, the benchmarks): (the network, its CNI config dir).

    The tests' kind of network (Debian's bridge + host-local on a free /24 of 10.214.0.0/16, no NAT,
    no route out of this machine), its config and IPAM state under `work_dir`: nothing goes to
    /etc/cni/net.d. On exit the host bridge and anything else this process left (netns, links,
    dnsmasq of state dirs marked STATE_MARK) are swept and ip_forward, which the bridge plugin
    turns on, is put back."""
    forwarding = netns.read_sysctl("net/ipv4/ip_forward")
    subnet = pick_subnet()
    third = int(str(subnet.network_address).split(".")[2])
    network = TestNetwork(name=name, bridge=test_name(), subnet=subnet,
                          extra_route=ipaddress.IPv4Network(f"10.214.{(third + 128) % 256}.0/24"),
                          ipam_dir=work_dir / "ipam")
    conf_dir = work_dir / "net.d"
    write_conf(conf_dir, f"10-{name}.conflist", network.conflist())
    try:
        yield network, conf_dir
    finally:
        sweep()
        if forwarding is not None:
            netns.write_sysctl("net/ipv4/ip_forward", forwarding)


def write_conf(conf_dir: Path, filename: str, doc: dict | str) -> Path:
    conf_dir.mkdir(parents=True, exist_ok=True)
    p = conf_dir / filename
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc, indent=1))
    return p


def script_plugin(bin_dir: Path, name: str, body: str) -> Path:
    """A tiny CNI plugin written as a shell script (it gets the config on stdin, env CNI_*)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    p = bin_dir / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return p


# ---------------------------------------------------------------- fake VMs

class FakeVM:
    """A network namespace plugged into a pod's host bridge with a veth carrying the VM's MAC.

    It plays the VM's NIC the way libvirt's tap would (same bridge, same MAC) without a VM.
    """

    def __init__(self, host_bridge: str, mac: str) -> None:
        self.host_end = test_name()
        self.ns = self.host_end + "-fakevm"
        self.mac = mac
        self.host_bridge = host_bridge
        self.procs: list[subprocess.Popen] = []
        self.path = netns.create(self.ns)
        try:
            with IPRoute() as ipr:
                br = ipr.link_lookup(ifname=host_bridge)[0]
                ipr.link("add", ifname=self.host_end, kind="veth",
                         peer={"ifname": "eth0", "net_ns_fd": self.path, "address": mac})
                idx = ipr.link_lookup(ifname=self.host_end)[0]
                ipr.link("set", index=idx, master=br, state="up")
            self.run("busybox", "ip", "link", "set", "eth0", "up")
        except BaseException:
            self.close()
            raise

    def argv(self, *argv: str) -> list[str]:
        return netns.nsenter_argv(self.path) + [BUSYBOX if argv[0] == "busybox" else argv[0], *argv[1:]]

    def run(self, *argv: str, timeout: float = 20, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*argv), capture_output=True, text=True, timeout=timeout, check=check)

    def spawn(self, *argv: str) -> subprocess.Popen:
        p = subprocess.Popen(self.argv(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def dhcp(self, script_dir: Path, configure: bool = True, timeout: float = 20, tries: int = 5) -> dict[str, str]:
        """Run busybox udhcpc once (-n -q) asking for search/routes/MTU; return what it was given."""
        script_dir.mkdir(parents=True, exist_ok=True)
        out = script_dir / f"lease-{self.ns}.env"
        script = script_dir / f"udhcpc-{self.ns}.sh"
        apply = ""
        if configure:
            apply = ('  busybox ip addr add "$ip/$mask" dev "$interface"\n'
                     '  [ -n "$router" ] && busybox ip route add default via "${router%% *}" dev "$interface"\n')
        script.write_text(
            "#!/bin/sh\n"
            'if [ "$1" = bound ]; then\n'
            f'  env | grep -E "^(ip|mask|subnet|router|dns|domain|search|hostname|mtu|staticroutes|lease|serverid)=" '
            f'> "{out}"\n' + apply + "fi\nexit 0\n")
        script.chmod(0o755)
        out.unlink(missing_ok=True)
        self.run("busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", str(tries), "-T", "1", "-A", "1",
                 "-O", "search", "-O", "staticroutes", "-O", "mtu", "-s", str(script), timeout=timeout)
        return dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()
        with IPRoute() as ipr:
            for idx in ipr.link_lookup(ifname=self.host_end):
                ipr.link("del", index=idx)
        netns.remove(self.ns)


def wait_tcp(host: str, port: int, timeout: float = 10.0) -> bytes:
    """Connect (retrying until the listener is up) and return what the peer sends."""
    import socket
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                s.settimeout(3)
                data = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        return data
                    data += chunk
        except OSError as e:
            last = e
            time.sleep(0.1)
    raise TimeoutError(f"no TCP answer from {host}:{port} within {timeout}s: {last}")


def ping(addr: str, count: int = 1, timeout: int = 3) -> bool:
    return subprocess.run([BUSYBOX, "ping", "-c", str(count), "-W", str(timeout), addr],
                          capture_output=True, timeout=timeout * count + 5).returncode == 0


# ---------------------------------------------------------------- leftovers

def leftovers(or_dead: bool = False) -> list[str]:
    """What this test session (or, with or_dead, a dead one) still has: netns, links, dnsmasq."""
    found = [f"netns {n}" for n in netns.list_names() if _mine(n, or_dead)]
    with IPRoute() as ipr:
        found += [f"link {link.get('ifname')}" for link in ipr.get_links() if _mine(link.get("ifname"), or_dead)]
    found += [f"dnsmasq {pid}" for pid in dnsmasq_pids(or_dead)]
    return found


def owned_by(pid: int) -> list[str]:
    """What the process `pid` (a demo or bench run as a subprocess, alive or not) left: netns, links, dnsmasq."""
    found = [f"netns {n}" for n in netns.list_names() if _owner(n) == pid]
    with IPRoute() as ipr:
        found += [f"link {link.get('ifname')}" for link in ipr.get_links() if _owner(link.get("ifname")) == pid]
    found += [f"dnsmasq {d}" for d in _all_dnsmasq() if _owner(dhcp.pidfile_of(d) or "") == pid]
    return found


def dnsmasq_pids(or_dead: bool = False) -> list[int]:
    return [pid for pid in _all_dnsmasq() if _mine(dhcp.pidfile_of(pid) or "", or_dead)]


def _all_dnsmasq() -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                argv0 = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0", 1)[0]
            except OSError:
                continue
            if os.path.basename(argv0) == b"dnsmasq":
                out.append(int(d))
    return out


def sweep() -> list[str]:
    """Remove what this session, or a crashed one, left: never a concurrent session's things."""
    removed = leftovers(or_dead=True)
    _remove(lambda name: _mine(name, True))
    return removed


def sweep_owned_by(pid: int) -> list[str]:
    """Remove what the process `pid` (a demo or bench run as a subprocess) left, nothing else; list it."""
    removed = owned_by(pid)
    _remove(lambda name: _owner(name) == pid)
    return removed


def state_dirs_of(pid: int, roots: Iterable[Path]) -> list[Path]:
    """The work dirs under `roots` that the process `pid` (a demo or bench run as a subprocess) marked as its
    own: their name carries its STATE_MARK (`bench-vmlet-nettest-<pid6>-…`, `run-vmlet-nettest-<pid6>-…`)."""
    mark = f"vmlet-nettest-{pid:06x}-"
    return sorted(d for root in roots if root.is_dir() for d in root.glob(f"*{mark}*") if d.is_dir())


def sweep_state_dirs_of(pid: int, roots: Iterable[Path]) -> list[str]:
    """Remove the pod networks that vmlet daemons of the process `pid` left in its work dirs under `roots`
    (see state_dirs_of); list them.

    vmlet names a pod's netns and host links after its sandbox ID, which is random, not after the process:
    owned_by(pid) cannot see them. Only the daemon's state dir (`<work>/state` or `<work>`: network records,
    CNI cache, the owner tag of its host links) tells them from another run's, so sweep it as a restarted
    vmlet would, with the work dir's CNI config (net.d, as private_network writes it) for DEL."""
    from cri_shim.network import NetworkManager  # the shim's own sweep: what its recovery would remove

    found = []
    for work in state_dirs_of(pid, roots):
        for state in (work, *sorted(p for p in work.iterdir() if p.is_dir())):
            if (state / "network").is_dir() or (state / "cni" / "results").is_dir():
                nm = NetworkManager(state, work / "net.d", [CNI_BIN_DIR], plugin_timeout=30)
                found += [f"{x} (state dir {state})" for x in nm.sweep([])]
    return found


def _remove(owned) -> None:
    """Kill the dnsmasq, delete the links and netns whose name (pid file, for dnsmasq) `owned` accepts."""
    for pid in _all_dnsmasq():
        if owned(dhcp.pidfile_of(pid) or ""):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    with IPRoute() as ipr:
        for link in ipr.get_links():  # veths first (their peers go too), then bridges
            if owned(link.get("ifname")) and link.get(("linkinfo", "kind")) != "bridge":
                _del(ipr, link.get("ifname"))
        for link in ipr.get_links():
            if owned(link.get("ifname")):
                _del(ipr, link.get("ifname"))
    for n in netns.list_names():
        if owned(n):
            netns.remove(n)


def _del(ipr: IPRoute, name: str) -> None:
    for idx in ipr.link_lookup(ifname=name):
        try:
            ipr.link("del", index=idx)
        except Exception:  # noqa: BLE001 - gone with its peer meanwhile
            pass


def pod_side(sandbox_id: str) -> dict:
    """What the pod netns holds: links with master, MAC, MTU and IPv4 addresses."""

    def read() -> dict:
        with IPRoute() as ipr:
            links = {link["index"]: link for link in ipr.get_links()}
            out = {}
            for idx, link in links.items():
                master = link.get("master")
                out[link.get("ifname")] = {
                    "master": links[master].get("ifname") if master in links else None,
                    "mac": link.get("address"), "mtu": link.get("mtu"),
                    "addrs": sorted(f"{a.get('address')}/{a.get('prefixlen')}" for a in ipr.get_addr(index=idx)
                                    if a.get("family") == 2),
                }
            return out

    return netns.run_in(netns_name(sandbox_id), read)

