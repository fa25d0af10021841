"""dnsmasq's argv for a pod (pure) and the pidfile checks."""

from __future__ import annotations

import os

from cri_shim.network import dhcp
from cri_shim.network.model import DNSSettings, Route

LEASE = dhcp.Lease(
    interface="br0", vm_mac="aa:bb:cc:00:11:22", vm_ip="10.1.0.5", prefixlen=24, gateway="10.1.0.1",
    routes=(Route("0.0.0.0/0", "10.1.0.1"), Route("10.2.0.0/16", "10.1.0.254"), Route("10.3.0.0/24")),
    dns=DNSSettings.of(["10.96.0.10", "fd00::10", "bogus"], ["ns.svc.cluster.local.", "svc.cluster.local", "bad..x"],
                       ["ndots:5"]),
    hostname="vm-1", mtu=1450)


def test_bridge_binding_args_lease_exactly_the_pod_address_with_its_options():
    args = dhcp.dnsmasq_args(LEASE, "/s/dnsmasq.pid", "/s/dnsmasq.leases", "/s/dnsmasq.log")
    assert args == [
        "--conf-file=/dev/null", "--port=0", "--no-resolv", "--no-hosts", "--no-poll",
        "--bind-interfaces", "--interface=br0", "--except-interface=lo", "--dhcp-authoritative",
        "--pid-file=/s/dnsmasq.pid", "--dhcp-leasefile=/s/dnsmasq.leases",
        "--dhcp-range=10.1.0.5,static,255.255.255.0,infinite",
        "--dhcp-host=aa:bb:cc:00:11:22,10.1.0.5,vm-1,infinite",
        "--shared-network=br0,10.1.0.5",
        "--log-facility=/s/dnsmasq.log",
        "--dhcp-option=option:router,10.1.0.1",
        "--dhcp-option=option:dns-server,10.96.0.10",
        "--dhcp-option=option:domain-name,ns.svc.cluster.local",
        "--dhcp-option-force=option:domain-search,ns.svc.cluster.local,svc.cluster.local",
        # RFC 3442: with option 121 the default route must be repeated in it; 0.0.0.0 = on-link.
        "--dhcp-option-force=option:classless-static-route,0.0.0.0/0,10.1.0.1,10.2.0.0/16,10.1.0.254,"
        "10.3.0.0/24,0.0.0.0",
        "--dhcp-option-force=option:mtu,1450",
    ]


def test_without_gateway_dns_routes_or_hostname_dnsmasq_defaults_are_suppressed():
    lease = dhcp.Lease(interface="br0", vm_mac="52:54:00:00:00:01", vm_ip="10.0.2.2", prefixlen=24,
                       hostname="Not_Valid", shared_network=False)
    args = dhcp.dnsmasq_args(lease, "/p", "/l")
    assert "--dhcp-option=3" in args and "--dhcp-option=6" in args  # not dnsmasq's own address
    assert "--dhcp-host=52:54:00:00:00:01,10.0.2.2,infinite" in args
    assert not [a for a in args if a.startswith(("--shared-network", "--log-facility", "--dhcp-option-force"))]


def test_pidfile_checks_trust_only_a_dnsmasq_naming_that_pidfile(tmp_path):
    pidfile = tmp_path / "dnsmasq.pid"
    assert dhcp.running_pid(str(pidfile)) is None
    pidfile.write_text(f"{os.getpid()}\n")  # a live pid that is not dnsmasq
    assert dhcp.running_pid(str(pidfile)) is None
    pidfile.write_text("garbage")
    assert dhcp.running_pid(str(pidfile)) is None
    assert dhcp.stop(str(pidfile)) == [] and not pidfile.exists()
