"""Typed data of a pod's network: what the shim passes in and what it stores (JSON-serialisable)."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

Binding = Literal["bridge", "masquerade"]
BINDINGS: tuple[str, ...] = ("bridge", "masquerade")
BINDING_ANNOTATION = "vmlet.dev/network-binding"

# \Z, not $: $ also matches before a final newline.
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")

# resolv.conf(5) `options`: whitespace-separated `name` or `name:n` items (glibc and musl take a number
# for every option that has a value: ndots, timeout, attempts). Anything else (spaces, `#`, quotes,
# control characters) could end the line or start another directive in the guest's resolv.conf.
_RESOLVER_OPTION = re.compile(r"^[a-z][a-z0-9_-]*(:[0-9]+)?\Z", re.ASCII)
MAX_RESOLVER_OPTION = 64    # characters per option (glibc's longest name is 21)
MAX_RESOLVER_OPTIONS = 32   # options per pod


def resolver_option_problem(option: str) -> str | None:
    """Why `option` cannot go into a resolv.conf `options` line, None when it can."""
    if not isinstance(option, str) or not option:
        return "must not be empty"
    if len(option) > MAX_RESOLVER_OPTION:
        return f"is {len(option)} characters long; at most {MAX_RESOLVER_OPTION} are allowed"
    if not _RESOLVER_OPTION.match(option):
        return ("is not a resolv.conf option: want NAME or NAME:NUMBER (NAME lower-case letters, digits, "
                "- and _, starting with a letter), e.g. ndots:5, timeout:2, rotate, edns0")
    if len(option.partition(":")[2]) > 9:
        return "has a value of more than 9 digits"
    return None


def valid_domain(name: str) -> bool:
    name = name.rstrip(".")
    return 0 < len(name) <= 253 and all(_LABEL.match(part) for part in name.split("."))


def valid_hostname(name: str) -> bool:
    return bool(_LABEL.match(name))


def binding_from_annotations(annotations: Mapping[str, str]) -> Binding:
    """The binding a pod asks for (`vmlet.dev/network-binding`), bridge by default."""
    value = annotations.get(BINDING_ANNOTATION, "bridge").strip() or "bridge"
    if value not in BINDINGS:
        raise ValueError(f"annotation {BINDING_ANNOTATION}: {value!r} is not one of {', '.join(BINDINGS)}")
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class DNSSettings:
    """Resolver settings for the VM: the CRI DNSConfig shape (servers, searches, options)."""

    servers: tuple[str, ...] = ()
    searches: tuple[str, ...] = ()
    options: tuple[str, ...] = ()

    @classmethod
    def of(cls, servers: Sequence[str] = (), searches: Sequence[str] = (),
           options: Sequence[str] = ()) -> "DNSSettings":
        return cls(tuple(servers), tuple(searches), tuple(options))

    def merged_over(self, fallback: "DNSSettings") -> "DNSSettings":
        """Per field, these settings win; empty fields are taken from `fallback` (the CNI result's dns)."""
        return DNSSettings(self.servers or fallback.servers, self.searches or fallback.searches,
                           self.options or fallback.options)

    def validated(self) -> "DNSSettings":
        """Only what the guest can be given safely: IPv4 servers, valid domains, resolv.conf options (the
        first MAX_RESOLVER_OPTIONS); others dropped. RunPodSandbox refuses them before this."""
        servers = []
        for s in self.servers:
            try:
                if ipaddress.ip_address(s).version == 4:
                    servers.append(s)
            except ValueError:
                pass
        options = tuple(o for o in self.options if resolver_option_problem(o) is None)[:MAX_RESOLVER_OPTIONS]
        return DNSSettings(tuple(servers), tuple(d.rstrip(".") for d in self.searches if valid_domain(d)), options)


@dataclass(frozen=True)
class Route:
    dst: str              # CIDR, "0.0.0.0/0" for the default route
    gw: str | None = None  # None: on-link

    @property
    def is_default(self) -> bool:
        return ipaddress.ip_network(self.dst).prefixlen == 0


@dataclass(frozen=True)
class PodNetwork:
    """Everything the shim needs about a pod's network, and what teardown/ensure need after a restart.

    The shim stores `to_json()` in its sandbox record and puts
    `<interface type='bridge'><source bridge=host_bridge/><mac address=vm_mac/>`
    in the VM's domain XML.
    """

    sandbox_id: str
    binding: Binding
    netns_name: str
    netns_path: str
    host_bridge: str               # the libvirt <source bridge=…/> of the VM's NIC
    host_veth: str
    vm_mac: str                    # the VM NIC's MAC (bridge binding: the CNI eth0's original MAC)
    pod_ip: str                    # primary pod IP (first IPv4, else first IP) for PodSandboxStatus
    additional_ips: tuple[str, ...] = ()
    prefixlen: int = 0             # of pod_ip
    gateway: str | None = None     # the pod's default gateway (from its default route), if any
    routes: tuple[Route, ...] = ()  # the pod's non-link routes, as handed to the VM (bridge binding)
    mtu: int = 1500
    dns: DNSSettings = field(default_factory=DNSSettings)
    hostname: str = ""
    cni_network: str = ""
    cni_version: str = ""
    vm_ip: str = ""                # the address the VM gets by DHCP (pod_ip, or 10.0.2.2 under masquerade)
    vm_prefixlen: int = 0
    vm_gateway: str | None = None
    dnsmasq_pid: int = 0
    state: Literal["ready", "stopped"] = "ready"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PodNetwork":
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in d.items() if k in known}
        data["additional_ips"] = tuple(data.get("additional_ips", ()))
        data["routes"] = tuple(Route(**r) if isinstance(r, Mapping) else r for r in data.get("routes", ()))
        dns = data.get("dns") or {}
        data["dns"] = dns if isinstance(dns, DNSSettings) else DNSSettings(
            tuple(dns.get("servers", ())), tuple(dns.get("searches", ())), tuple(dns.get("options", ())))
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "PodNetwork":
        return cls.from_dict(json.loads(text))

    def network_config(self) -> dict[str, Any]:
        """A cloud-init network-config v2 document for the VM's NIC (static, same data the DHCP server gives).

        Optional: DHCP already configures the VM. Resolver options go neither here nor in DHCP:
        cloudinit.compose(dns=...) puts them in vendor-data.
        """
        eth: dict[str, Any] = {"match": {"macaddress": self.vm_mac}, "set-name": "eth0",
                               "addresses": [f"{self.vm_ip}/{self.vm_prefixlen}"], "mtu": self.mtu}
        routes = []
        if self.vm_gateway:
            routes.append({"to": "0.0.0.0/0", "via": self.vm_gateway})
        if self.binding == "bridge":
            routes += [{"to": r.dst, "via": r.gw} for r in self.routes if not r.is_default and r.gw]
        if routes:
            eth["routes"] = routes
        ns: dict[str, Any] = {}
        if self.dns.servers:
            ns["addresses"] = list(self.dns.servers)
        if self.dns.searches:
            ns["search"] = list(self.dns.searches)
        if ns:
            eth["nameservers"] = ns
        return {"version": 2, "ethernets": {"eth0": eth}}

