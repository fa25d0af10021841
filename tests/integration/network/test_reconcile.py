"""Crashes and restarts: sweep removes what a crashed setup left; ensure repairs a pod; teardown copes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cri_shim.network import NetworkLost, dhcp, links, netns
from cri_shim.network.names import host_bridge, netns_name
from tests.support import netsupport

REPO = Path(__file__).resolve().parents[3]


def setup(nm, sid, **kw):
    return nm.setup(sid, pod_namespace="ns1", pod_name="rec-pod", pod_uid="uid-4", **kw)


@pytest.mark.parametrize("crash_point", ["after-cni-add", "after-host-links", "before-ready-record",
                                         "teardown-before-host-links"])
def test_sweep_removes_what_a_setup_killed_halfway_left(make_manager, conf_dir, test_network, sandbox_id,
                                                        tmp_path, crash_point):
    state = tmp_path / f"{netsupport.STATE_MARK}-state"
    hooks = {
        "after-cni-add": "links.host_create = die",
        "after-host-links": "links.wire_bridge_binding = die",
        "before-ready-record": ("orig = manager.NetworkManager._write_record\n"
                                "manager.NetworkManager._write_record = lambda self, sid, phase, *a, **k: "
                                "die() if phase == 'ready' else orig(self, sid, phase, *a, **k)"),
        # set up fully, then die in StopPodSandbox after CNI DEL, before the host links go
        "teardown-before-host-links": "links.host_delete = die",
    }
    teardown = crash_point.startswith("teardown")
    script = textwrap.dedent("""
        import os
        from cri_shim.network import NetworkManager, links, manager
        def die(*a, **k):
            os._exit(17)  # a crash: no rollback, no finally
        """) + hooks[crash_point] + textwrap.dedent(f"""
        nm = NetworkManager({str(state)!r}, {str(conf_dir)!r}, [{netsupport.CNI_BIN_DIR!r}], 10)
        pn = nm.setup({sandbox_id!r}, pod_namespace="ns1", pod_name="rec-pod", pod_uid="uid-4")
        nm.teardown(pn)
        """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 17, proc.stderr
    assert netns.exists(netns_name(sandbox_id))
    assert len(test_network.allocated_ips()) == (0 if teardown else 1)
    assert Path(f"/sys/class/net/{host_bridge(sandbox_id)}").exists() == (crash_point != "after-cni-add")
    if crash_point == "before-ready-record":
        assert netsupport.dnsmasq_pids()

    nm = make_manager(state_dir=state)  # the restarted shim
    removed = nm.sweep([])
    assert f"sandbox {sandbox_id}" in removed
    assert not netns.exists(netns_name(sandbox_id))
    assert test_network.allocated_ips() == []  # CNI DEL ran with the cached config
    assert [x for x in netsupport.leftovers() if not x.startswith(f"link {test_network.bridge}")] == []


def test_sweep_keeps_known_sandboxes_and_a_restarted_manager_tears_them_down(make_manager, tmp_path, test_network):
    state = tmp_path / f"{netsupport.STATE_MARK}-state"
    nm = make_manager(state_dir=state)
    keep, forget = netsupport.new_sandbox_id(), netsupport.new_sandbox_id()
    kept = setup(nm, keep)
    setup(nm, forget)

    restarted = make_manager(state_dir=state)
    assert restarted.tag == nm.tag
    removed = restarted.sweep([keep])
    assert any(forget in r for r in removed) and not any(keep in r for r in removed)
    assert restarted.get(keep) == kept
    assert restarted.ensure(keep) == []  # nothing to repair
    pid = dhcp.running_pid(restarted.pidfile(keep))
    assert pid == kept.dnsmasq_pid
    restarted.remove(keep)  # stops a dnsmasq this instance did not start
    assert not Path(f"/proc/{pid}/cmdline").exists() or not dhcp.is_ours(pid, restarted.pidfile(keep))
    assert test_network.allocated_ips() == []


def test_ensure_restarts_a_dead_dnsmasq_and_rebuilds_deleted_links(make_manager, fake_vms, sandbox_id, tmp_path):
    nm = make_manager()
    pn = setup(nm, sandbox_id, hostname="rec-pod")
    dhcp.stop(nm.pidfile(sandbox_id))  # killed
    repaired = nm.ensure(pn)
    assert [r.split(" (")[0] for r in repaired] == ["dnsmasq"]
    assert nm.get(sandbox_id).dnsmasq_pid == dhcp.running_pid(nm.pidfile(sandbox_id)) != pn.dnsmasq_pid
    assert fake_vms(pn.host_bridge, pn.vm_mac).dhcp(tmp_path, configure=False)["ip"] == pn.pod_ip

    links.host_delete(pn.host_bridge, pn.host_veth)  # someone deleted the host side (vm0 went with it)
    repaired = nm.ensure(sandbox_id)
    assert repaired == [f"host bridge {pn.host_bridge} / veth {pn.host_veth}", f"br0 in {pn.netns_name}"]
    pod = netsupport.pod_side(sandbox_id)
    assert pod["vm0"]["master"] == "br0" and pod["eth0"]["master"] == "br0"
    vm = fake_vms(pn.host_bridge, pn.vm_mac)  # a VM (re)started on the rebuilt bridge
    assert vm.dhcp(tmp_path)["ip"] == pn.pod_ip
    assert netsupport.ping(pn.pod_ip)
    nm.check(pn)


def test_a_vanished_netns_is_reported_and_teardown_still_releases_the_ip(make_manager, test_network, sandbox_id):
    nm = make_manager()
    pn = setup(nm, sandbox_id)
    dhcp.stop(nm.pidfile(sandbox_id))
    netns.remove(pn.netns_name)  # e.g. a host reboot wiped /run/netns
    with pytest.raises(NetworkLost, match=pn.netns_name):
        nm.ensure(pn)
    nm.teardown(pn)  # CNI DEL with CNI_NETNS="" releases the IP
    assert test_network.allocated_ips() == []
    assert not Path(f"/sys/class/net/{host_bridge(sandbox_id)}").exists()
    nm.remove(pn)
