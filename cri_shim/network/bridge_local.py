"""Bridge binding: the VM's frames for dnsmasq's address are delivered to br0, not bridged out of eth0.

Under the bridge binding the pod netns holds no address on the pod's subnet,
only dnsmasq's link-local address on br0 (manager.DHCP_SERVER_CIDR). The pod
netns reaches the VM through an on-link route from that address (links.py),
but the VM sends its replies to an off-subnet address to its gateway's MAC,
so br0 would forward them out of eth0 into the CNI network. An nftables rule
in the pod netns (bridge family, prerouting) rewrites the destination MAC of
IPv4 frames from vm0 for dnsmasq's address to br0's own and marks them for
the host: they reach br0's stack (port-forward's connections, and DHCP
renewals unicast to dnsmasq). Nothing else is touched.

The rules are built as nft JSON from data, loaded in one transaction that
replaces the table (idempotent), and compared with what `nft -j list` gives
back to tell whether they are in place with the MAC br0 has now (a re-created
br0 gets a new random MAC). They live in the pod netns and die with it.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import NetworkError
from .names import POD_VM_VETH
from .netns import nft

FAMILY = "bridge"
TABLE = "vmlet_local"
CHAIN = "prerouting"
PRIORITY_DSTNAT = -300  # the bridge family's dstnat priority: before the bridge's forwarding decision


def rule_expr(server_ip: str, bridge_mac: str, vm_port: str = POD_VM_VETH) -> list[dict[str, Any]]:
    """`iifname VM_PORT ip daddr SERVER meta pkttype set host ether daddr set BRIDGE_MAC` (pure)."""
    return [
        {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": vm_port}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": server_ip}},
        {"mangle": {"key": {"meta": {"key": "pkttype"}}, "value": "host"}},
        {"mangle": {"key": {"payload": {"protocol": "ether", "field": "daddr"}}, "value": bridge_mac.lower()}},
    ]


def ruleset(server_ip: str, bridge_mac: str, vm_port: str = POD_VM_VETH) -> dict[str, Any]:
    """The nft JSON batch (pure): create-or-flush the table by deleting it, then the chain and the rule."""
    table = {"family": FAMILY, "name": TABLE}
    return {"nftables": [
        {"add": {"table": dict(table)}},
        {"delete": {"table": dict(table)}},
        {"add": {"table": dict(table)}},
        {"add": {"chain": {"family": FAMILY, "table": TABLE, "name": CHAIN, "type": "filter", "hook": "prerouting",
                           "prio": PRIORITY_DSTNAT, "policy": "accept"}}},
        {"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": CHAIN,
                          "expr": rule_expr(server_ip, bridge_mac, vm_port)}}},
    ]}



def apply(netns_path: str, server_ip: str, bridge_mac: str) -> None:
    proc = nft(netns_path, json.dumps(ruleset(server_ip, bridge_mac)), "-j", "-f", "-")
    if proc.returncode != 0:
        raise NetworkError("nft could not load the bridge binding's local delivery rule into the pod network "
                           "namespace: " + proc.stderr.decode(errors="replace").strip()[-2000:])


def rules_in(listing: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The expressions of the table's rules in an `nft -j list table` answer (pure)."""
    out = []
    for item in listing.get("nftables", ()):
        rule = item.get("rule") if isinstance(item, dict) else None
        if isinstance(rule, dict) and rule.get("table") == TABLE and rule.get("chain") == CHAIN:
            out.append(rule.get("expr"))
    return out


def present(netns_path: str, server_ip: str, bridge_mac: str) -> bool:
    """Exactly our rule, for br0's current MAC, is loaded."""
    proc = nft(netns_path, None, "-j", "list", "table", FAMILY, TABLE)
    if proc.returncode != 0:
        return False
    try:
        listing = json.loads(proc.stdout)
    except ValueError:
        return False
    return rules_in(listing) == [rule_expr(server_ip, bridge_mac)]


def remove(netns_path: str) -> None:
    nft(netns_path, None, "delete", "table", FAMILY, TABLE)  # absent table: fine
