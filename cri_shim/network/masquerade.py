"""Masquerade binding: the VM sits behind NAT on a private segment inside the pod netns (KubeVirt's default).

The VM gets VM_IP (10.0.2.2/24, gateway 10.0.2.1 on br0) by DHCP; the pod IP
stays on eth0. An nftables table in the pod netns DNATs everything that
arrives for the pod IP over TCP and UDP (DHCP excepted) to the VM, so the pod
IP answers for the VM on all ports, and masquerades what the VM sends out of
eth0. ICMP to the pod IP is answered by the pod netns itself. Forwarding is
switched on in the pod netns only.
"""

from __future__ import annotations

import ipaddress

from .errors import NetworkError
from .names import POD_BRIDGE, POD_IFNAME
from .netns import nft

VM_SUBNET = ipaddress.IPv4Network("10.0.2.0/24")
VM_GATEWAY = "10.0.2.1"
VM_IP = "10.0.2.2"
TABLE = "vmlet"


def ruleset(pod_ips: list[str], vm_ip: str = VM_IP, subnet: str = str(VM_SUBNET),
            pod_if: str = POD_IFNAME, vm_bridge: str = POD_BRIDGE) -> str:
    """The nft script (pure). Re-applying it replaces the table: idempotent."""
    v4 = [ip for ip in pod_ips if ipaddress.ip_address(ip).version == 4]
    if not v4:
        raise ValueError("masquerade binding needs an IPv4 pod address")
    daddr = v4[0] if len(v4) == 1 else "{ " + ", ".join(v4) + " }"
    return "\n".join([
        f"table ip {TABLE} {{}}",
        f"delete table ip {TABLE}",
        f"table ip {TABLE} {{",
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
        f'    iifname "{pod_if}" ip daddr {daddr} meta l4proto tcp dnat to {vm_ip}',
        f'    iifname "{pod_if}" ip daddr {daddr} udp dport != {{ 67, 68 }} dnat to {vm_ip}',
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f'    ip saddr {subnet} oifname "{pod_if}" masquerade',
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy drop;",
        "    ct state established,related accept",
        f'    iifname "{vm_bridge}" oifname "{pod_if}" ip saddr {subnet} accept',
        f'    iifname "{pod_if}" oifname "{vm_bridge}" ip daddr {vm_ip} ct status dnat accept',
        "  }",
        "}",
        "",
    ])



def apply(netns_path: str, pod_ips: list[str]) -> None:
    proc = nft(netns_path, ruleset(pod_ips), "-f", "-")
    if proc.returncode != 0:
        raise NetworkError("nft could not load the masquerade rules into the pod network namespace: "
                           + proc.stderr.decode(errors="replace").strip()[-2000:])


def present(netns_path: str) -> bool:
    return nft(netns_path, None, "list", "table", "ip", TABLE).returncode == 0


def remove(netns_path: str) -> None:
    nft(netns_path, None, "delete", "table", "ip", TABLE)  # absent table: fine
