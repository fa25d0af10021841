"""RunPodSandbox refuses resolver options resolv.conf cannot hold, naming the entry, before any network is
made (the in-process daemon of the attach test, over its CRI socket; no VM boots)."""

from __future__ import annotations

import grpc
import pytest

from cri_shim.network import netns
from cri_shim.network.model import MAX_RESOLVER_OPTIONS
from proto.runtime.v1 import api_pb2
from tests.integration.cri import conftest as cri_fixtures
from tests.integration.cri import test_console_attach as attach_test
from tests.support import cri

vmlet_dir = cri_fixtures.vmlet_dir
cni_conf_dir = cri_fixtures.cni_conf_dir
daemon = attach_test.daemon

pytestmark = pytest.mark.libvirt


def refused(client, options: list[str]) -> str:
    pod = cri.pod_config(name="dns-options")
    pod.dns_config.servers.append("10.214.255.53")
    pod.dns_config.options.extend(options)
    with pytest.raises(grpc.RpcError) as e:
        client.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    return e.value.details()


def test_bad_resolver_options_are_refused_naming_the_entry(daemon):
    d, client = daemon
    netns_before = set(netns.list_names())
    for bad in ("ndots:5 rotate", "rotate\nnameserver 10.0.0.1", "rotate # comment", "NDOTS:5", "ndots:x",
                "x" * 65, ""):
        message = refused(client, ["ndots:5", bad])
        assert message.startswith("config.dns_config.options[1] "), message
    message = refused(client, ["rotate"] * (MAX_RESOLVER_OPTIONS + 1))
    assert message.startswith("config.dns_config.options has "), message
    assert not client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items
    assert set(netns.list_names()) == netns_before

    # Good ones pass (and are kept for the VM's cloud-init vendor-data).
    pod = cri.pod_config(name="dns-options-ok")
    pod.dns_config.options.extend(["ndots:5", "timeout:2", "single-request-reopen"])
    sid = client.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=60).pod_sandbox_id
    assert d.runtime.network.get(sid).dns.options == ("ndots:5", "timeout:2", "single-request-reopen")
    client.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)
    client.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
