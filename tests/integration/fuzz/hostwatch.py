"""What the vmlet daemon under fuzzing has on the host, so each example can prove it created nothing stray.

`Snapshot` records, cheaply enough to take around every example:
- files: the top of the shared directories (/tmp, /run, /, the repo the daemon runs in,
  the test work root) and the whole of the node's own places (/var/lib/vmlet, /etc/cni,
  libvirt's domain configs), plus everything under the daemon's own dir outside its state dir;
- the libvirt domains of this test run, network namespaces, host links carrying the
  daemon's owner tag, dnsmasq processes of its state dir, QEMU processes of this run,
  and mount points.
Other test sessions share this machine and create things in /tmp, /run and the work
root meanwhile, so a new entry there only counts when it is the daemon's: it names
one of the request's string values or one of the daemon's IDs. The node's own places,
our domains, links, dnsmasq, QEMU and mounts are never touched by anyone else.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
from pyroute2 import IPRoute

from cri_shim.network import netns
from cri_shim.network.names import owner_tag, parse_link_alias
from tests.support import libvirt_env
from tests.support.cri import REPO

SHARED_DIRS = [Path("/tmp"), Path("/run"), Path("/"), REPO, libvirt_env.WORK_ROOT, Path("/var/lib")]
NODE_DIRS = [Path("/var/lib/vmlet"), Path("/etc/cni"), Path("/run/vmlet")]
LIBVIRT_CONFIGS = Path("/etc/libvirt/qemu")  # shared: only this run's domains (RUN_PREFIX) count
MAX_WALK = 5000


def _walk(root: Path, limit: int = MAX_WALK) -> set[str]:
    out: set[str] = set()
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            out.add(os.path.join(dirpath, n))
        if len(out) > limit:
            break
    return out


def _top(root: Path) -> set[str]:
    try:
        return {str(root / n) for n in os.listdir(root)}
    except OSError:
        return set()


@dataclass
class Snapshot:
    shared: set[str] = field(default_factory=set)
    node: set[str] = field(default_factory=set)
    own: set[str] = field(default_factory=set)
    domains: set[str] = field(default_factory=set)
    netns: set[str] = field(default_factory=set)
    links: set[str] = field(default_factory=set)
    dnsmasq: set[int] = field(default_factory=set)
    qemu: set[str] = field(default_factory=set)
    mounts: set[str] = field(default_factory=set)


class HostWatch:
    def __init__(self, daemon_dir: Path, state_dir: Path) -> None:
        self._conn = None  # our own connection: other suites restart libvirtd under this one
        self.daemon_dir = daemon_dir
        self.state_dir = state_dir
        self.tag = owner_tag(str(state_dir.resolve()))

    def snapshot(self) -> Snapshot:
        s = Snapshot()
        for d in SHARED_DIRS:
            s.shared |= _top(d)
        for d in NODE_DIRS:
            s.node |= _walk(d)
        s.node |= {str(p) for p in LIBVIRT_CONFIGS.glob(libvirt_env.RUN_PREFIX + "*")}
        s.own = {p for p in _walk(self.daemon_dir) if not p.startswith(str(self.state_dir) + "/")}
        s.domains = self.domains()
        s.netns = set(netns.list_names())
        with IPRoute() as ipr:
            for link in ipr.get_links():
                parsed = parse_link_alias(link.get("ifalias"))
                if parsed and parsed[0] == self.tag:
                    s.links.add(f"{link.get('ifname')} ({parsed[1][:12]})")
        s.dnsmasq = set(self.dnsmasq_pids())
        s.qemu = set(libvirt_env.leftover_qemu_processes())
        s.mounts = set(_mount_points())
        return s

    def domains(self) -> set[str]:
        for attempt in range(3):
            try:
                if self._conn is None:
                    self._conn = libvirt_env.connect()
                return {d.name() for d in self._conn.listAllDomains() if d.name().startswith(libvirt_env.RUN_PREFIX)}
            except libvirt.libvirtError:
                self.close()  # libvirtd restarted: reconnect
                if attempt == 2:
                    raise
                time.sleep(2)
        return set()

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except libvirt.libvirtError:
                pass
            self._conn = None

    def dnsmasq_pids(self) -> list[int]:
        out = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and os.path.basename(argv[0]) == b"dnsmasq" and any(
                    str(self.state_dir).encode() in a for a in argv):
                out.append(int(d))
        return out

    def strays(self, before: Snapshot, after: Snapshot, request_strings: list[str], known_ids: set[str],
               live_ids: set[str], named_paths: list[str]) -> list[str]:
        """What appeared between the snapshots that the daemon had no business leaving.

        `live_ids`: sandboxes and containers that exist now (their netns, links, domains are expected);
        `named_paths`: absolute paths the requests named (the daemon may create those).
        """
        tokens = _tokens(request_strings) | {i[:12] for i in known_ids}

        def named(p: str) -> bool:
            return any(p == n or p.startswith(n.rstrip("/") + "/") or n.startswith(p + "/") for n in named_paths)

        def daemons(p: str) -> bool:
            name = os.path.basename(p)
            return any(t in name for t in tokens)

        out = []
        out += [f"new file {p}" for p in sorted(after.shared - before.shared) if daemons(p) and not named(p)]
        out += [f"new file in a node dir {p}" for p in sorted(after.node - before.node)
                if not named(p) and not any(i[:32] in p for i in live_ids)]
        out += [f"new file beside the state dir {p}" for p in sorted(after.own - before.own) if not named(p)]
        live12 = {i[:12] for i in live_ids}
        live16 = {i[:16] for i in live_ids}
        out += [f"domain {d}" for d in sorted(after.domains - before.domains)
                if not any(d.endswith(i[:32]) for i in live_ids)]
        out += [f"netns {n}" for n in sorted(after.netns - before.netns)
                if n.startswith("vmlet-") and n[6:] in {i[:16] for i in known_ids} and n[6:] not in live16]
        out += [f"link {link}" for link in sorted(after.links - before.links) if link.split("(")[-1][:12] not in live12]
        out += [f"dnsmasq {p}" for p in sorted(after.dnsmasq - before.dnsmasq)]
        out += [f"qemu {q}" for q in sorted(after.qemu - before.qemu)]
        out += [f"mount {m}" for m in sorted(after.mounts - before.mounts) if self._stray_mount(m, daemons, live_ids)]
        return out

    def _stray_mount(self, m: str, daemons, live_ids: set[str]) -> bool:
        """A new mount point is the daemon's when it is in its dir, a node dir, or named after the request/IDs."""
        if m.startswith(str(self.state_dir) + "/"):
            rel = m[len(str(self.state_dir)) + 1:]
            return not any(rel.startswith(f"vms/{i}/") for i in live_ids)
        if m.startswith("/run/netns/vmlet-") and m[len("/run/netns/vmlet-"):] in {i[:16] for i in live_ids}:
            return False  # a live sandbox's network namespace
        return (m.startswith(str(self.daemon_dir) + "/") or any(m.startswith(str(d) + "/") for d in NODE_DIRS)
                or daemons(m))


def _tokens(strings: list[str]) -> set[str]:
    """Distinctive pieces of the request's strings: what a file named after them would contain."""
    out = set()
    for s in strings:
        for piece in re.split(r"[/\s\x00]+", s):
            if len(piece) >= 4 and piece not in ("vmlet", "test", "virtlet.cloud") and piece.strip("."):
                out.add(piece[:64])
    return out


def _mount_points() -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # field 5 is the mount point, octal-escaped
            mp = line.split(" ")[4]
            out.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), mp))
    return out


def strings_of(msg) -> list[str]:
    """Every string value in a message (keys of maps too), recursively."""
    from google.protobuf.descriptor import FieldDescriptor as FD
    out: list[str] = []
    for f, v in msg.ListFields():
        if f.type == FD.TYPE_MESSAGE:
            if f.message_type.GetOptions().map_entry:
                for k, val in v.items():
                    out.append(str(k))
                    if isinstance(val, str):
                        out.append(val)
                    elif hasattr(val, "ListFields"):
                        out += strings_of(val)
            elif f.is_repeated:
                for item in v:
                    out += strings_of(item)
            else:
                out += strings_of(v)
        elif f.type == FD.TYPE_STRING:
            out += list(v) if f.is_repeated else [v]
    return out


def absolute_paths(strings: list[str]) -> list[str]:
    """The absolute paths a request named; what lies under them (a log_path under log_directory) counts too."""
    return [os.path.normpath(s) for s in strings if s.startswith("/") and "\x00" not in s]
