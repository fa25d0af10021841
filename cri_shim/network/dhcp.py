"""The VM's DHCP server: one dnsmasq per pod, inside the pod's network namespace.

`dnsmasq_args` is pure (unit-tested); the rest supervises the process:
dnsmasq runs in the foreground (`--keep-in-foreground`: no daemonising double
fork that would leave orphans to init) in a session of its own, started through
`nsenter --net=<netns>` (which execs it: same pid), and writes a pidfile under
the pod's state dir. It is ready when that pidfile names it and its DHCP socket
is bound. It survives shim restarts untouched: the shim finds it again by the
pidfile, and trusts a pid only when /proc/<pid>/cmdline is a dnsmasq naming
that very pidfile (pid reuse).

What the VM gets (bridge binding): exactly the pod IP with the pod's prefix,
from a one-address `static` range on a subnet br0 does not carry
(`--shared-network`, dnsmasq >= 2.81), an infinite lease (the pod IP never
changes while the pod lives; a renewal asked for anyway is unicast to dnsmasq's
link-local address and reaches it through bridge_local's rule), the router of
the pod's default route, classless static routes (121, with the default route
repeated, RFC 3442) for the pod's other routes, the MTU of eth0, DNS servers,
domain (15: the first search domain) and search list (119), and the hostname.
DNS itself is off (`--port=0`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import NetworkError
from .model import DNSSettings, Route, valid_hostname
from .netns import nsenter_argv

log = logging.getLogger("vmlet.network.dhcp")

DEFAULT_DNSMASQ = "dnsmasq"


@dataclass(frozen=True)
class Lease:
    """What the DHCP server hands to the one VM it serves."""

    interface: str                # where dnsmasq listens (br0)
    vm_mac: str
    vm_ip: str
    prefixlen: int
    gateway: str | None = None
    routes: tuple[Route, ...] = ()   # non-default IPv4 routes (gw None: on-link)
    dns: DNSSettings = DNSSettings()
    hostname: str = ""
    mtu: int = 0
    shared_network: bool = True   # the VM's subnet is not configured on `interface`


def _routes_option(gateway: str | None, routes: Sequence[Route]) -> list[str]:
    extra = [r for r in routes if not r.is_default and ipaddress.ip_network(r.dst).version == 4]
    if not extra:
        return []
    # RFC 3442: a client that gets option 121 ignores option 3, so the default route goes in as well.
    items = []
    if gateway:
        items += ["0.0.0.0/0", gateway]
    for r in extra:
        items += [r.dst, r.gw or "0.0.0.0"]
    return ["--dhcp-option-force=option:classless-static-route," + ",".join(items)]


def dnsmasq_args(lease: Lease, pidfile: str, leasefile: str, logfile: str | None = None) -> list[str]:
    """dnsmasq's argv (without the binary): DHCP only, for exactly one MAC and one address."""
    ip = ipaddress.IPv4Address(lease.vm_ip)
    netmask = ipaddress.IPv4Network(f"{ip}/{lease.prefixlen}", strict=False).netmask
    dns = lease.dns.validated()
    host = [lease.vm_mac, str(ip)]
    if lease.hostname and valid_hostname(lease.hostname):
        host.append(lease.hostname)
    host.append("infinite")
    args = [
        "--conf-file=/dev/null",          # never read /etc/dnsmasq.conf
        "--port=0",                       # no DNS
        "--no-resolv", "--no-hosts", "--no-poll",
        "--bind-interfaces", f"--interface={lease.interface}", "--except-interface=lo",
        "--dhcp-authoritative",           # ACK a VM's request for its address after a dnsmasq restart
        f"--pid-file={pidfile}",
        f"--dhcp-leasefile={leasefile}",
        f"--dhcp-range={ip},static,{netmask},infinite",
        "--dhcp-host=" + ",".join(host),
    ]
    if lease.shared_network:
        args.append(f"--shared-network={lease.interface},{ip}")
    if logfile:
        args.append(f"--log-facility={logfile}")
    # An empty option suppresses dnsmasq's default (its own address) for router and DNS server.
    args.append(f"--dhcp-option=option:router,{lease.gateway}" if lease.gateway else "--dhcp-option=3")
    args.append("--dhcp-option=option:dns-server," + ",".join(dns.servers) if dns.servers else "--dhcp-option=6")
    if dns.searches:
        args.append(f"--dhcp-option=option:domain-name,{dns.searches[0]}")
        args.append("--dhcp-option-force=option:domain-search," + ",".join(dns.searches))
    args += _routes_option(lease.gateway, lease.routes)
    if lease.mtu:
        args.append(f"--dhcp-option-force=option:mtu,{lease.mtu}")
    return args


# ---------------------------------------------------------------- process supervision

def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _alive(pid: int) -> bool:
    """Running and not a zombie (an orphan whose init does not reap is dead all the same)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def is_ours(pid: int, pidfile: str) -> bool:
    argv = _cmdline(pid)
    return (bool(argv) and os.path.basename(argv[0]) == "dnsmasq" and f"--pid-file={pidfile}" in argv
            and _alive(pid))


def running_pid(pidfile: str) -> int | None:
    """The pid of the dnsmasq that owns this pidfile, if it runs."""
    try:
        pid = int(Path(pidfile).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pid = 0
    if pid > 0 and is_ours(pid, pidfile):
        return pid
    # The pidfile may be missing or stale (crash between start and write): look the process up.
    for p in find_processes(pidfile):
        return p
    return None


def find_processes(pidfile_prefix: str) -> list[int]:
    """Live dnsmasq processes whose --pid-file starts with the prefix (a pod's, or a whole state dir's)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        argv = _cmdline(int(d))
        if argv and os.path.basename(argv[0]) == "dnsmasq" and \
                any(a.startswith("--pid-file=" + pidfile_prefix) for a in argv) and _alive(int(d)):
            out.append(int(d))
    return out


def pidfile_of(pid: int) -> str | None:
    for a in _cmdline(pid):
        if a.startswith("--pid-file="):
            return a[len("--pid-file="):]
    return None


def _udp_port_open(pid: int, port: int) -> bool:
    """The process's netns has a UDP socket on `port` (dnsmasq has bound its DHCP socket)."""
    try:
        lines = Path(f"/proc/{pid}/net/udp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(line.split()[1].endswith(f":{port:04X}") for line in lines if len(line.split()) > 1)


# dnsmasq processes this shim process started: reaped when they stop (dnsmasq may outlive the shim:
# after a shim restart it is found by its pidfile and is some other process's child).
_children: dict[str, subprocess.Popen] = {}
_children_lock = threading.Lock()


def _reap(pidfile: str, wait: float = 0.0) -> None:
    with _children_lock:
        proc = _children.get(pidfile)
    if proc is None:
        return
    try:
        proc.wait(timeout=wait) if wait else proc.poll()
    except subprocess.TimeoutExpired:
        return
    if proc.returncode is not None:
        with _children_lock:
            if _children.get(pidfile) is proc:
                del _children[pidfile]


def start(netns_path: str, args: list[str], pidfile: str, dnsmasq: str = DEFAULT_DNSMASQ,
          timeout: float = 10.0) -> int:
    """Start dnsmasq inside the namespace (in the foreground of a session of its own, so it outlives
    the shim); return its pid once it serves DHCP. Raises NetworkError with dnsmasq's own message."""
    _reap(pidfile)
    old = running_pid(pidfile)
    if old:
        return old
    Path(pidfile).unlink(missing_ok=True)
    errfile = Path(pidfile).with_suffix(".stderr")
    argv = nsenter_argv(netns_path) + [dnsmasq, "--keep-in-foreground", *args]
    try:
        with open(errfile, "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, cwd="/",
                                    start_new_session=True, close_fds=True)
    except OSError as e:
        raise NetworkError(f"cannot run dnsmasq ({dnsmasq}): {e}") from None
    with _children_lock:
        _children[pidfile] = proc  # nsenter execs dnsmasq: same pid
    deadline = time.monotonic() + timeout
    while True:
        rc = proc.poll()
        if rc is not None:
            _reap(pidfile)
            msg = errfile.read_text(errors="replace").strip()[-2000:] if errfile.exists() else ""
            raise NetworkError(f"dnsmasq failed to start (exit status {rc}): {msg}")
        if running_pid(pidfile) == proc.pid and _udp_port_open(proc.pid, 67):
            return proc.pid
        if time.monotonic() > deadline:
            stop(pidfile)
            raise NetworkError(f"dnsmasq did not start serving DHCP within {timeout:g}s")
        time.sleep(0.02)


def stop(pidfile: str, grace: float = 2.0) -> list[int]:
    """Stop the pod's dnsmasq (SIGTERM, then SIGKILL); idempotent. Returns the pids signalled."""
    pids = set(find_processes(pidfile))
    pid = running_pid(pidfile)
    if pid:
        pids.add(pid)
    for p in pids:
        _signal(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    for p in pids:
        if _alive(p):
            _signal(p, signal.SIGKILL)
    _reap(pidfile, wait=grace)
    Path(pidfile).unlink(missing_ok=True)
    return sorted(pids)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
