"""Netlink work (pyroute2): the host bridge + veth that carry the VM's segment, and the pod-side wiring.

Host side (host netns, calling thread):   vb<id12> (bridge, no IP, no ARP) ── vh<id12> ══╗
Pod side (inside the pod netns, through `netns.run_in`):                               ║
    bridge binding:     br0 (169.254.75.10/32, dnsmasq) ─┬─ vm0 (veth peer) ═══════════╝
                        route <pod IP>/32 dev br0        └─ eth0 (CNI; addresses moved to the VM)
    masquerade binding: br0 (10.0.2.1/24, dnsmasq, NAT to eth0) ── vm0;  eth0 keeps the pod IP
libvirt adds the VM's tap to vb<id12> when the domain starts and removes it when it stops.

Every function here is idempotent: `ensure` re-runs them to repair a half-broken pod.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import netns
from .model import Route
from .names import POD_BRIDGE, POD_IFNAME, POD_VM_VETH, parse_link_alias, random_mac

RT_TABLE_MAIN = 254
RTPROT_KERNEL = 2
RT_SCOPE_LINK = 253
IFF_NOARP = 0x80


def _lookup(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def _link(ipr: IPRoute, index: int):
    return ipr.get_links(index)[0]


def _delete(ipr: IPRoute, ifname: str) -> bool:
    idx = _lookup(ipr, ifname)
    if idx is None:
        return False
    try:
        ipr.link("del", index=idx)
    except NetlinkError as e:
        if e.code != errno.ENODEV:
            raise
        return False
    return True


def _delete_all(*ifnames: str) -> list[str]:
    """Delete the links, in order; returns those that existed."""
    with IPRoute() as ipr:
        return [name for name in ifnames if _delete(ipr, name)]


def _ensure_bridge(ipr: IPRoute, name: str, mtu: int, alias: str | None = None) -> int:
    idx = _lookup(ipr, name)
    if idx is None:
        attrs = {"ifname": name, "kind": "bridge", "br_stp_state": 0, "br_forward_delay": 0,
                 "address": random_mac(), "mtu": mtu}
        if alias:
            attrs["ifalias"] = alias
        ipr.link("add", **attrs)
        idx = _lookup(ipr, name)
        assert idx is not None
    return idx


def _disable_ipv6(*ifnames: str) -> None:
    # No IPv6 link-local chatter (router solicitations, MLD) from our own ports into the VM's segment.
    for name in ifnames:
        netns.write_sysctl(f"net/ipv6/conf/{name}/disable_ipv6", "1")


# ---------------------------------------------------------------- host side

def host_create(bridge: str, veth: str, netns_path: str, mtu: int, alias: str) -> None:
    """The host bridge and the veth pair whose peer is `vm0` in the pod netns (idempotent).

    The bridge is pure L2 and never speaks ARP (IFF_NOARP): with the host's default arp_ignore=0 it
    would answer the guest's ARP for its gateway (a host address) with its own MAC, and the guest's
    gateway traffic would enter the host stack here instead of travelling the pod's segment."""
    with IPRoute() as ipr:
        br = _ensure_bridge(ipr, bridge, mtu, alias)
        ipr.link("set", index=br, flags=IFF_NOARP, change=IFF_NOARP)
        vh = _lookup(ipr, veth)
        if vh is None:
            ipr.link("add", ifname=veth, kind="veth", mtu=mtu, ifalias=alias,
                     peer={"ifname": POD_VM_VETH, "net_ns_fd": netns_path, "mtu": mtu})
            vh = _lookup(ipr, veth)
            assert vh is not None
        ipr.link("set", index=vh, master=br, mtu=mtu, ifalias=alias, state="up")
        ipr.link("set", index=br, ifalias=alias, state="up")
    _disable_ipv6(bridge, veth)


def host_present(bridge: str, veth: str) -> bool:
    """The bridge (ARP off) with the veth as a port."""
    with IPRoute() as ipr:
        br, vh = _lookup(ipr, bridge), _lookup(ipr, veth)
        return (br is not None and vh is not None and _link(ipr, vh).get("master") == br
                and bool(_link(ipr, br).get("flags", 0) & IFF_NOARP))


def host_delete(bridge: str, veth: str) -> list[str]:
    """Delete the veth (its pod-side peer goes with it) and the bridge; returns what existed."""
    return _delete_all(veth, bridge)


def host_links(tag: str) -> dict[str, list[str]]:
    """{sandbox id: [ifname, ...]} of host links whose alias says this vmlet instance made them."""
    out: dict[str, list[str]] = {}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            owner = parse_link_alias(link.get("ifalias"))
            if owner and owner[0] == tag:
                out.setdefault(owner[1], []).append(link.get("ifname"))
    return out


def bridge_ports(bridge: str) -> list[str]:
    with IPRoute() as ipr:
        br = _lookup(ipr, bridge)
        if br is None:
            return []
        return [link.get("ifname") for link in ipr.get_links() if link.get("master") == br]


# ---------------------------------------------------------------- pod side (call through netns.run_in)

@dataclass(frozen=True)
class PodInterface:
    mac: str
    mtu: int
    addresses: tuple[str, ...]  # CIDRs with scope global, IPv4 first
    routes: tuple[Route, ...]   # IPv4 routes through the interface, without the connected ones
    gateway: str | None         # of the IPv4 default route


def read_interface(ifname: str = POD_IFNAME) -> PodInterface:
    with IPRoute() as ipr:
        idx = _lookup(ipr, ifname)
        if idx is None:
            raise LookupError(f"interface {ifname} does not exist in the pod network namespace")
        link = _link(ipr, idx)
        addrs4, addrs6 = [], []
        for a in ipr.get_addr(index=idx):
            if a.get("scope", 0) != 0:  # 0 = universe; skip link-local / host scope
                continue
            cidr = f"{a.get('address')}/{a.get('prefixlen')}"
            (addrs4 if a.get("family") == socket.AF_INET else addrs6).append(cidr)
        connected = {ipaddress.ip_interface(c).network for c in addrs4}
        routes, gateway = [], None
        for r in ipr.get_routes(family=socket.AF_INET, table=RT_TABLE_MAIN):
            if r.get("oif") != idx or r.get("multipath"):
                continue
            dst = ipaddress.ip_network(f"{r.get('dst') or '0.0.0.0'}/{r.get('dst_len')}", strict=False)
            gw = r.get("gateway")
            if gw is None and r.get("proto") == RTPROT_KERNEL and dst in connected:
                continue
            if dst.prefixlen == 0:
                gateway = gw
            routes.append(Route(dst=str(dst), gw=gw))
        return PodInterface(mac=link.get("address"), mtu=link.get("mtu"), addresses=tuple(addrs4 + addrs6),
                            routes=tuple(routes), gateway=gateway)


def wire_bridge_binding(vm_mac: str, server_cidr: str, mtu: int, pod_ip: str) -> None:
    """eth0 and vm0 into br0; eth0 loses its addresses and the VM's MAC; br0 gets dnsmasq's address
    and an on-link route to the pod IP (the VM) with that address as its source, so the pod netns
    reaches the VM (port-forward). The VM's replies come back through bridge_local's rule."""
    with IPRoute() as ipr:
        eth = _lookup(ipr, POD_IFNAME)
        vm = _lookup(ipr, POD_VM_VETH)
        if eth is None or vm is None:
            raise LookupError(f"{POD_IFNAME if eth is None else POD_VM_VETH} is missing in the pod network namespace")
        link = _link(ipr, eth)
        if link.get("address", "").lower() == vm_mac.lower():
            ipr.link("set", index=eth, state="down")
            ipr.link("set", index=eth, address=random_mac())
        for a in ipr.get_addr(index=eth):
            if a.get("scope", 0) == 0:
                ipr.addr("del", index=eth, address=a.get("address"), prefixlen=a.get("prefixlen"))
        br = _ensure_bridge(ipr, POD_BRIDGE, mtu)
        server = ipaddress.ip_interface(server_cidr)
        if not any(a.get("address") == str(server.ip) for a in ipr.get_addr(index=br)):
            ipr.addr("add", index=br, address=str(server.ip), prefixlen=server.network.prefixlen)
        for idx in (eth, vm):
            ipr.link("set", index=idx, master=br, mtu=mtu, state="up")
        ipr.link("set", index=br, state="up")
        ipr.route("replace", dst=pod_ip, dst_len=32, oif=br, prefsrc=str(server.ip), scope=RT_SCOPE_LINK,
                  table=RT_TABLE_MAIN)
    _disable_ipv6(POD_BRIDGE, POD_VM_VETH, POD_IFNAME)


def _route_to_vm(ipr: IPRoute, br: int, pod_ip: str, server_ip: str) -> bool:
    for r in ipr.get_routes(family=socket.AF_INET, table=RT_TABLE_MAIN):
        if (r.get("dst") == pod_ip and r.get("dst_len") == 32 and r.get("oif") == br
                and r.get("prefsrc") == server_ip and r.get("gateway") is None):
            return True
    return False


def bridge_mac(ifname: str = POD_BRIDGE) -> str:
    """The MAC of br0 (random, chosen at its creation: a re-created br0 has a new one)."""
    with IPRoute() as ipr:
        idx = _lookup(ipr, ifname)
        if idx is None:
            raise LookupError(f"{ifname} does not exist in the pod network namespace")
        return _link(ipr, idx).get("address")


def wire_masquerade_binding(gateway_cidr: str, mtu: int) -> None:
    """br0 with the VM's gateway address, vm0 in it, IPv4 forwarding on (in this namespace only)."""
    with IPRoute() as ipr:
        vm = _lookup(ipr, POD_VM_VETH)
        if vm is None:
            raise LookupError(f"{POD_VM_VETH} is missing in the pod network namespace")
        br = _ensure_bridge(ipr, POD_BRIDGE, mtu)
        gw = ipaddress.ip_interface(gateway_cidr)
        if not any(a.get("address") == str(gw.ip) for a in ipr.get_addr(index=br)):
            ipr.addr("add", index=br, address=str(gw.ip), prefixlen=gw.network.prefixlen)
        ipr.link("set", index=vm, master=br, mtu=mtu, state="up")
        ipr.link("set", index=br, state="up")
    _disable_ipv6(POD_BRIDGE, POD_VM_VETH)
    if not netns.write_sysctl("net/ipv4/ip_forward", "1"):
        raise OSError("cannot enable IPv4 forwarding in the pod network namespace")


def pod_wired(binding: str, pod_ip: str = "", server_cidr: str = "") -> bool:
    """br0 exists with vm0 (and, for the bridge binding, eth0) as ports; for the bridge binding
    with `pod_ip` given, also the on-link route to it from dnsmasq's address."""
    with IPRoute() as ipr:
        br = _lookup(ipr, POD_BRIDGE)
        if br is None:
            return False
        ports = {link.get("ifname") for link in ipr.get_links() if link.get("master") == br}
        want = {POD_VM_VETH, POD_IFNAME} if binding == "bridge" else {POD_VM_VETH}
        if not want <= ports:
            return False
        if binding == "bridge" and pod_ip:
            return _route_to_vm(ipr, br, pod_ip, str(ipaddress.ip_interface(server_cidr).ip))
        return True


def pod_unwire() -> list[str]:
    """Delete br0 and vm0 (eth0 is the CNI plugins' to delete)."""
    return _delete_all(POD_VM_VETH, POD_BRIDGE)


def pod_links() -> list[str]:
    with IPRoute() as ipr:
        return [link.get("ifname") for link in ipr.get_links()]
