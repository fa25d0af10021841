"""Names of everything vmlet creates for a pod's network, derived from the sandbox ID (pure).

Interface names are limited to 15 characters (IFNAMSIZ - 1). Host-side links
also carry an ifalias `vmlet:<owner tag>:<sandbox id>` so a sweep can tell
its own links (and their full sandbox ID) from anyone else's.
"""

from __future__ import annotations

import hashlib
import re
import secrets

NETNS_PREFIX = "vmlet-"
HOST_BRIDGE_PREFIX = "vb"
HOST_VETH_PREFIX = "vh"
ALIAS_PREFIX = "vmlet:"

# Inside the pod netns.
POD_IFNAME = "eth0"          # CNI_IFNAME
POD_BRIDGE = "br0"           # joins eth0 (bridge binding) or is the NAT segment (masquerade)
POD_VM_VETH = "vm0"          # the pod-side end of the veth pair that reaches the host bridge

_SANDBOX_ID = re.compile(r"^[0-9a-f]{16,64}\Z")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}\Z")


def check_sandbox_id(sandbox_id: str) -> str:
    if not _SANDBOX_ID.match(sandbox_id):
        raise ValueError(f"sandbox id {sandbox_id!r} must be 16 to 64 lowercase hex digits")
    return sandbox_id


def netns_name(sandbox_id: str) -> str:
    return NETNS_PREFIX + check_sandbox_id(sandbox_id)[:16]


def host_bridge(sandbox_id: str) -> str:
    return HOST_BRIDGE_PREFIX + check_sandbox_id(sandbox_id)[:12]


def host_veth(sandbox_id: str) -> str:
    return HOST_VETH_PREFIX + check_sandbox_id(sandbox_id)[:12]


def owner_tag(state_dir: str) -> str:
    """A short tag naming one vmlet instance (its state dir): sweeps never touch other instances' links."""
    return hashlib.sha256(str(state_dir).encode()).hexdigest()[:8]


def link_alias(tag: str, sandbox_id: str) -> str:
    return f"{ALIAS_PREFIX}{tag}:{sandbox_id}"


def parse_link_alias(alias: str | None) -> tuple[str, str] | None:
    """(owner tag, sandbox id) of a vmlet link alias, None for anything else."""
    if not alias or not alias.startswith(ALIAS_PREFIX):
        return None
    parts = alias[len(ALIAS_PREFIX):].split(":")
    if len(parts) != 2 or not _SANDBOX_ID.match(parts[1]):
        return None
    return parts[0], parts[1]


def valid_ifname(name: str) -> bool:
    return bool(_IFNAME.match(name)) and name not in (".", "..")


def random_mac() -> str:
    """A random unicast, locally administered MAC (02:…; QEMU's 52:54:00 is a real OUI)."""
    b = bytearray(secrets.token_bytes(6))
    b[0] = (b[0] & 0xFC) | 0x02
    return ":".join(f"{x:02x}" for x in b)


def random_vm_mac() -> str:
    """A MAC in QEMU's 52:54:00 range, as libvirt would pick."""
    return "52:54:00:" + ":".join(f"{x:02x}" for x in secrets.token_bytes(3))


def cache_key(network: str, container_id: str, ifname: str) -> str:
    """libcni's result cache file name: <network>-<containerid>-<ifname>."""
    return f"{network}-{container_id}-{ifname}"
