"""A CNI plugin that hangs: RunPodSandbox fails within the plugin timeout, the plugin is killed, nothing leaks,
and the next RunPodSandbox with a good config works (the config dir is read at every RunPodSandbox)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import pytest

from cri_shim.network import dhcp
from proto.runtime.v1 import api_pb2
from tests.support import cri, netsupport

from .conftest import RPC_SLACK

pytestmark = pytest.mark.libvirt

PLUGIN_TIMEOUT = 2.0


def _cmdlines_with(marker: str) -> list[str]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{p}/cmdline").read_bytes():
                    out.append(p)
            except OSError:
                pass
    return out


def test_hanging_cni_plugin_fails_run_pod_sandbox_within_the_timeout_and_leaks_nothing(
        vmlet_factory, vmlet_dir, test_network):
    bin_dir, conf_dir = vmlet_dir / "hang-bin", vmlet_dir / "hang-net.d"
    seen = vmlet_dir / "hanger-saw"
    marker = f"vmlet-hang-{os.getpid()}-{vmlet_dir.name}"
    # Chained after the bridge plugin, so the pod already holds an IP and a veth when it hangs.
    netsupport.script_plugin(bin_dir, "vmlet-hanger", f"""
cat >/dev/null
if [ "$CNI_COMMAND" = ADD ]; then
  echo "$CNI_CONTAINERID $CNI_NETNS" >{seen}
  sh -c 'sleep 300; : {marker}' &
  sleep 300
fi
exit 0
""")
    netsupport.write_conf(conf_dir, "10-hang.conflist", test_network.conflist([{"type": "vmlet-hanger"}]))
    proc = vmlet_factory(cni_conf_dir=str(conf_dir), cni_bin_dirs=[str(bin_dir), netsupport.CNI_BIN_DIR],
                         cni_plugin_timeout=PLUGIN_TIMEOUT)
    client = proc.start()

    pod = cri.pod_config(name="hang")
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as exc:
        client.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=RPC_SLACK)
    elapsed = time.monotonic() - started
    err = exc.value
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
    assert "vmlet-hanger" in err.details() and f"did not finish within {PLUGIN_TIMEOUT:g}s" in err.details(), \
        err.details()
    # ADD's timeout, then the rollback's DEL (which this plugin answers at once): not the client's deadline.
    assert elapsed < RPC_SLACK / 2, f"RunPodSandbox took {elapsed:.1f}s"

    sandbox_id, netns_path = seen.read_text().split()
    time.sleep(0.3)
    assert _cmdlines_with(marker) == [], "the hanging plugin's process group was not killed"
    assert not os.path.exists(netns_path), f"the pod's netns {netns_path} leaked"
    assert not (proc.state_dir / "network" / sandbox_id).exists()
    assert not list((proc.state_dir / "cni" / "results").glob(f"*{sandbox_id}*"))
    assert test_network.allocated_ips() == [], "the bridge plugin's IP was not released"
    assert list(client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=RPC_SLACK).items) == []

    # The node's CNI config is fixed: the kubelet's retry of the same pod works.
    (conf_dir / "10-hang.conflist").unlink()
    netsupport.write_conf(conf_dir, "10-good.conflist", test_network.conflist())
    sid = client.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=RPC_SLACK).pod_sandbox_id
    st = client.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=RPC_SLACK)
    assert st.status.state == api_pb2.SANDBOX_READY and st.status.network.ip
    client.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=RPC_SLACK)
    client.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=RPC_SLACK)


def test_cni_plugin_hanging_on_del_fails_stop_pod_sandbox_in_time_and_the_retry_releases_everything(
        vmlet_factory, vmlet_dir, test_network):
    """StopPodSandbox whose CNI DEL hangs: FailedPrecondition within the plugin timeout, never a stuck call; the
    half torn-down pod gets no dnsmasq back (not even across a restart of vmlet), and the kubelet's retry, once the
    plugin behaves, releases the IP and leaves nothing."""
    bin_dir, conf_dir = vmlet_dir / "hang-del-bin", vmlet_dir / "hang-del-net.d"
    flag = vmlet_dir / "hang-del-now"
    netsupport.script_plugin(bin_dir, "vmlet-del-hanger", f"""
if [ "$CNI_COMMAND" = ADD ]; then
  # A chained plugin passes the previous result on.
  exec python3 -c 'import json, sys; c = json.load(sys.stdin); print(json.dumps(c["prevResult"]))'
fi
cat >/dev/null
if [ "$CNI_COMMAND" = DEL ] && [ -e {flag} ]; then
  sleep 300
fi
exit 0
""")
    # Last in the chain, so DEL (in reverse order) reaches it first, before bridge/host-local release anything.
    netsupport.write_conf(conf_dir, "10-hang-del.conflist",
                          test_network.conflist([{"type": "vmlet-del-hanger"}]))
    proc = vmlet_factory(cni_conf_dir=str(conf_dir), cni_bin_dirs=[str(bin_dir), netsupport.CNI_BIN_DIR],
                         cni_plugin_timeout=PLUGIN_TIMEOUT)
    client = proc.start()
    sid = client.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=cri.pod_config(name="hang-del")),
                                       timeout=RPC_SLACK).pod_sandbox_id
    assert len(test_network.allocated_ips()) == 1

    flag.touch()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as exc:
        client.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=RPC_SLACK)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.value
    assert "vmlet-del-hanger" in exc.value.details() and "retried" in exc.value.details(), exc.value.details()
    assert time.monotonic() - started < RPC_SLACK / 2
    # The kubelet's Status polls must not bring the DHCP server of a pod being torn down back.
    for _ in range(3):
        client.runtime.Status(api_pb2.StatusRequest(), timeout=RPC_SLACK)
        time.sleep(0.5)
    assert not dhcp.find_processes(f"{proc.state_dir / 'network'}/"), "dnsmasq restarted for a pod being torn down"

    proc.kill()  # and a crash of vmlet in between: recovery finishes what it can, the sandbox is not ready
    client = proc.start()
    st = client.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=RPC_SLACK)
    assert st.status.state == api_pb2.SANDBOX_NOTREADY
    assert not dhcp.find_processes(f"{proc.state_dir / 'network'}/")

    flag.unlink()
    client.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=RPC_SLACK)
    assert test_network.allocated_ips() == []
    client.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=RPC_SLACK)
    assert not (proc.state_dir / "network" / sid).exists()
    assert not list((proc.state_dir / "cni" / "results").iterdir())
