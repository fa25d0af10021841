"""Names, the PodNetwork record, DNS merging, the binding annotation, the NAT ruleset (pure)."""

from __future__ import annotations

import json

import pytest

from cri_shim.network import PodNetwork, binding_from_annotations, masquerade, names
from cri_shim.network.model import DNSSettings, Route

SID = "0123456789abcdef" * 4


def test_names_derive_from_the_sandbox_id_and_fit_ifnamsiz():
    assert names.netns_name(SID) == "vmlet-0123456789abcdef"
    assert names.host_bridge(SID) == "vb0123456789ab" and names.host_veth(SID) == "vh0123456789ab"
    assert all(len(n) <= 15 for n in (names.host_bridge(SID), names.host_veth(SID), names.POD_VM_VETH))
    assert names.cache_key("net", SID, "eth0") == f"net-{SID}-eth0"
    for bad in ("", "XYZ", "0123", "../../etc", SID + "0"):
        with pytest.raises(ValueError):
            names.netns_name(bad)


def test_link_alias_round_trip_and_foreign_aliases():
    tag = names.owner_tag("/var/lib/vmlet")
    assert len(tag) == 8 and tag != names.owner_tag("/var/lib/other")
    assert names.parse_link_alias(names.link_alias(tag, SID)) == (tag, SID)
    for foreign in (None, "", "docker0", "vmlet:x", "vmlet:a:b:c", "vmlet:tag:not-hex"):
        assert names.parse_link_alias(foreign) is None


def test_random_macs_are_unicast_and_locally_administered_or_qemus():
    for _ in range(50):
        first = int(names.random_mac().split(":")[0], 16)
        assert first & 0x01 == 0 and first & 0x02 == 2
    assert names.random_vm_mac().startswith("52:54:00:")


def network(**over) -> PodNetwork:
    base = dict(sandbox_id=SID, binding="bridge", netns_name="vmlet-0123456789abcdef",
                netns_path="/run/netns/vmlet-0123456789abcdef", host_bridge="vb0123456789ab",
                host_veth="vh0123456789ab", vm_mac="aa:bb:cc:00:11:22", pod_ip="10.1.0.5",
                additional_ips=("fd00::5",), prefixlen=24, gateway="10.1.0.1",
                routes=(Route("10.2.0.0/16", "10.1.0.254"),), mtu=1450,
                dns=DNSSettings.of(["10.96.0.10"], ["a.example"], ["ndots:5"]), hostname="vm-1",
                cni_network="net1", cni_version="1.0.0", vm_ip="10.1.0.5", vm_prefixlen=24,
                vm_gateway="10.1.0.1", dnsmasq_pid=42)
    base.update(over)
    return PodNetwork(**base)


def test_pod_network_round_trips_through_json_and_ignores_unknown_keys():
    pn = network()
    assert PodNetwork.from_json(pn.to_json()) == pn
    doc = json.loads(pn.to_json())
    doc["added_in_a_later_version"] = 1
    assert PodNetwork.from_dict(doc) == pn


def test_network_config_v2_mirrors_the_dhcp_lease():
    assert network().network_config() == {"version": 2, "ethernets": {"eth0": {
        "match": {"macaddress": "aa:bb:cc:00:11:22"}, "set-name": "eth0", "addresses": ["10.1.0.5/24"],
        "mtu": 1450, "routes": [{"to": "0.0.0.0/0", "via": "10.1.0.1"}, {"to": "10.2.0.0/16", "via": "10.1.0.254"}],
        "nameservers": {"addresses": ["10.96.0.10"], "search": ["a.example"]}}}}


def test_pod_dns_config_wins_field_by_field_over_the_cni_result():
    pod = DNSSettings.of(searches=["pod.example"])
    cni = DNSSettings.of(["10.0.0.53"], ["cni.example"], ["ndots:1"])
    assert pod.merged_over(cni) == DNSSettings.of(["10.0.0.53"], ["pod.example"], ["ndots:1"])
    assert DNSSettings.of(["1.1.1.1", "::1", "x"], ["ok.example.", "-bad.example"]).validated() == \
        DNSSettings.of(["1.1.1.1"], ["ok.example"])


def test_binding_annotation():
    assert binding_from_annotations({}) == "bridge"
    assert binding_from_annotations({"vmlet.dev/network-binding": "masquerade"}) == "masquerade"
    with pytest.raises(ValueError, match="vmlet.dev/network-binding: 'slirp' is not one of bridge, masquerade"):
        binding_from_annotations({"vmlet.dev/network-binding": "slirp"})


def test_masquerade_ruleset_dnats_the_pod_ip_except_dhcp_and_replaces_the_table():
    rules = masquerade.ruleset(["fd00::5", "10.1.0.5"])
    assert rules.startswith("table ip vmlet {}\ndelete table ip vmlet\n")
    assert 'iifname "eth0" ip daddr 10.1.0.5 meta l4proto tcp dnat to 10.0.2.2' in rules
    assert 'iifname "eth0" ip daddr 10.1.0.5 udp dport != { 67, 68 } dnat to 10.0.2.2' in rules
    assert 'ip saddr 10.0.2.0/24 oifname "eth0" masquerade' in rules
    with pytest.raises(ValueError):
        masquerade.ruleset(["fd00::5"])


def test_a_trailing_newline_is_no_valid_name():
    # `$` would match before a final newline: these checks guard netns, link, dnsmasq and DHCP arguments.
    from cri_shim.network import cni
    from cri_shim.network.model import valid_domain, valid_hostname
    with pytest.raises(ValueError):
        names.check_sandbox_id("ab" * 32 + "\n")
    assert not names.valid_ifname("eth0\n")
    assert not valid_hostname("vm\n") and not valid_domain("a.example\n")
    assert DNSSettings.of(searches=["a.example\n"]).validated().searches == ()
    assert not cni._NAME.match("net\n") and not cni._PLUGIN_TYPE.match("bridge\n")
