"""The guest-info reporter's pure parts (vmapi.guest_info): the shim's guestAgent entry → the VM status
patch, change detection, clearing; and the controller's status (vmapi.status) keeping and dropping them."""

from __future__ import annotations

import copy
import json

from vmapi import guest_info as gi, status as vmstatus
from vmapi.client import Conflict
from vmapi.strategy import Decision

# A guestAgent entry as cri_shim/container_status.py writes it (test_exec.py reads the same from a real guest).
AGENT = {
    "connected": True,
    "guestOSInfo": {"id": "vmlet-testvm", "name": "vmlet test VM", "prettyName": "vmlet test VM 1",
                    "version": "1", "versionId": "1", "kernelRelease": "6.1.0-28-cloud-amd64",
                    "kernelVersion": "#1 SMP PREEMPT_DYNAMIC Debian 6.1.119-1", "machine": "x86_64",
                    "unknownKey": "dropped"},
    "hostname": "e2e-vm",
    "interfaces": [{"name": "eth0", "mac": "52:54:00:AB:CD:EF",
                    "ipAddresses": ["fe80::5054:ff:feab:cdef/64", "10.88.0.7/16"]}],
    "ageSeconds": 3.2,
}
NOW = 1_700_000_000.0


def test_facts_use_kubevirts_names():
    f = gi.facts(AGENT, ["10.88.0.7"])
    assert f["connected"] is True
    assert f["guestOSInfo"] == {k: AGENT["guestOSInfo"][k] for k in gi.OS_FIELDS}
    assert f["interfaces"] == [{"name": "default", "interfaceName": "eth0", "mac": "52:54:00:ab:cd:ef",
                                "ipAddress": "10.88.0.7", "ipAddresses": ["10.88.0.7", "fe80::5054:ff:feab:cdef"],
                                "infoSource": "guest-agent"}]


def test_the_pod_network_is_the_interface_with_the_pod_ip():
    agent = {**AGENT, "interfaces": [{"name": "eth0", "mac": "52:54:00:00:00:01", "ipAddresses": ["192.168.9.1/24"]},
                                     {"name": "eth1", "mac": "52:54:00:00:00:02", "ipAddresses": ["10.88.0.7/16"]}]}
    nics = gi.facts(agent, ["10.88.0.7"])["interfaces"]
    assert [(n["interfaceName"], n.get("name")) for n in nics] == [("eth0", None), ("eth1", "default")]
    # No interface has it (masquerade: a private address in the guest), two interfaces: none is named.
    assert all("name" not in n for n in gi.facts(agent, ["10.99.0.1"])["interfaces"])
    # ... one interface: it is the VM's only NIC, so the pod network's.
    one = {**AGENT, "interfaces": [{"name": "eth0", "ipAddresses": ["10.0.2.2/24"]}]}
    assert gi.facts(one, ["10.99.0.1"])["interfaces"][0]["name"] == "default"


def test_disconnected_or_missing_agent_says_nothing():
    for agent in (None, {}, {"connected": False, "guestOSInfo": AGENT["guestOSInfo"]}, {"connected": "yes"}, "junk"):
        assert gi.facts(agent) == gi.EMPTY
    # Connected but nothing fetched yet: the condition, no facts.
    assert gi.facts({"connected": True}) == {"connected": True, "guestOSInfo": None, "interfaces": None}


def test_hostile_guest_values_are_dropped_or_capped():
    agent = {"connected": True,
             "guestOSInfo": {"id": "x" * 10_000, "name": 7, "version": "\ud800", "machine": ["x86_64"],
                             "prettyName": ""},
             "interfaces": [{"name": "eth0", "mac": "not-a-mac", "ipAddresses": ["999.1.1.1", "10.0.0.1/8", 5,
                                                                                "10.0.0.1/24", "x" * 100]},
                            {"mac": "52:54:00:00:00:01"}, "junk", {"name": None},
                            *[{"name": f"e{i}", "ipAddresses": [f"10.1.{i}.{j}" for j in range(100)]}
                              for i in range(40)]]}
    f = gi.facts(agent)
    assert f["guestOSInfo"] == {"id": "x" * gi.MAX_TEXT}
    eth0 = f["interfaces"][0]
    assert eth0 == {"interfaceName": "eth0", "infoSource": "guest-agent", "ipAddress": "10.0.0.1",
                    "ipAddresses": ["10.0.0.1"]}
    assert len(f["interfaces"]) <= gi.MAX_INTERFACES
    assert all(len(n.get("ipAddresses", [])) <= gi.MAX_ADDRESSES for n in f["interfaces"])
    json.dumps(f).encode("utf-8")  # what the API gets is valid UTF-8 JSON
    assert gi.facts({"connected": True, "guestOSInfo": "junk", "interfaces": {"eth0": 1}}) == \
        {"connected": True, "guestOSInfo": None, "interfaces": None}


def test_first_report_patches_the_fields_and_the_condition_last():
    status = {"printableStatus": "Running",
              "conditions": [{"type": "Ready", "status": "True"}, {"type": "Paused", "status": "False"}]}
    patch = gi.status_patch(status, gi.facts(AGENT, ["10.88.0.7"]), NOW)
    assert set(patch) == {"guestOSInfo", "interfaces", "conditions"}
    assert patch["conditions"][:2] == status["conditions"]
    assert patch["conditions"][2] == {"type": "AgentConnected", "status": "True", "reason": "GuestAgentConnected",
                                      "message": "the guest agent is connected",
                                      "lastTransitionTime": "2023-11-14T22:13:20Z"}


def _apply(status, patch):
    """RFC 7386 merge patch, as the API server applies it."""
    out = copy.deepcopy(status)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _apply(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def test_unchanged_facts_patch_nothing_and_the_age_is_not_a_change():
    want = gi.facts(AGENT, ["10.88.0.7"])
    status = _apply({"conditions": [{"type": "Ready", "status": "True"}]}, gi.status_patch({}, want, NOW))
    assert gi.status_patch(status, want, NOW + 100) == {}
    assert gi.fingerprint({**AGENT, "ageSeconds": 99}) == gi.fingerprint(AGENT)
    assert gi.fingerprint({**AGENT, "connected": False}) != gi.fingerprint(AGENT)
    assert gi.fingerprint(None) != gi.fingerprint({})


def test_a_change_patches_only_what_changed_and_keeps_the_transition_time():
    want = gi.facts(AGENT, ["10.88.0.7"])
    status = _apply({}, gi.status_patch({}, want, NOW))
    moved = copy.deepcopy(AGENT)
    moved["interfaces"][0]["ipAddresses"] = ["10.88.0.8/16"]
    patch = gi.status_patch(status, gi.facts(moved, ["10.88.0.8"]), NOW + 50)
    assert set(patch) == {"interfaces"} and patch["interfaces"][0]["ipAddress"] == "10.88.0.8"
    # An OS field that disappears is nulled: a merge patch merges objects key by key.
    fewer = {**AGENT, "guestOSInfo": {"id": "vmlet-testvm"}}
    patch = gi.status_patch(status, gi.facts(fewer, ["10.88.0.7"]), NOW + 60)
    assert _apply(status, patch)["guestOSInfo"] == {"id": "vmlet-testvm"}
    assert patch["guestOSInfo"]["machine"] is None


def test_disconnect_clears_everything_of_the_reporters_and_nothing_else():
    status = {"podIP": "10.88.0.7", "conditions": [{"type": "Ready", "status": "True"}]}
    status = _apply(status, gi.status_patch(status, gi.facts(AGENT), NOW))
    assert gi.reports(status)
    patch = gi.status_patch(status, gi.EMPTY, NOW + 1)
    assert patch == {"guestOSInfo": None, "interfaces": None, "conditions": [{"type": "Ready", "status": "True"}]}
    cleared = _apply(status, patch)
    assert not gi.reports(cleared) and cleared["podIP"] == "10.88.0.7"
    assert gi.status_patch(cleared, gi.EMPTY, NOW + 2) == {}  # nothing to clear: no write
    assert gi.status_patch({}, gi.EMPTY, NOW) == {}
    assert gi.status_patch("junk", gi.EMPTY, NOW) == {}


def test_vm_name_and_pod_ips():
    assert gi.vm_name_of("web-vm") == "web" and gi.vm_name_of("-vm") is None and gi.vm_name_of("web") is None
    pod = {"status": {"podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}, "junk"]}}
    assert gi.pod_ips(pod) == ["10.0.0.1", "10.0.0.1", "fd00::1"] and gi.pod_ips({"status": "x"}) == []


VM = {"metadata": {"name": "web", "namespace": "ns", "uid": "vm-uid", "resourceVersion": "7"},
      "spec": {"runStrategy": "Always"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}


def _pod(node="node-a", uid="pod-uid", phase="Running", owner="vm-uid"):
    return {"metadata": {"name": "web-vm", "namespace": "ns", "uid": uid,
                         "ownerReferences": [{"kind": "VirtualMachine", "uid": owner, "controller": True}]},
            "spec": {"nodeName": node}, "status": {"phase": phase, "podIP": "10.88.0.7"}}


def test_ours_only_for_the_vms_own_pod_on_this_node():
    assert gi.ours(_pod(), VM, "node-a", "pod-uid")
    assert not gi.ours(_pod(node="node-b"), VM, "node-a")
    assert not gi.ours(_pod(uid="other"), VM, "node-a", "pod-uid")
    assert not gi.ours(_pod(owner="another-vm"), VM, "node-a")
    assert not gi.ours(None, VM, "node-a")


class FakeCRI:
    def __init__(self, pods, agents):
        self.pods, self.agents = pods, agents

    def vm_pods(self):
        return list(self.pods)

    def agent(self, cid):
        return self.agents.get(cid)


class FakeApi:
    """The API's answers for the Reporter's bookkeeping (the real calls run in test_guest_info.py)."""

    def __init__(self, vm, pod):
        self.vm, self.pod, self.patches, self.conflict = vm, pod, [], False

    def get_vm(self, ns, name):
        return copy.deepcopy(self.vm) if self.vm and name == self.vm["metadata"]["name"] else None

    def get_pod(self, ns, name):
        return copy.deepcopy(self.pod)

    def patch_status(self, vm, patch):
        assert vm["metadata"]["resourceVersion"] == self.vm["metadata"]["resourceVersion"]
        if self.conflict:
            raise Conflict("changed")
        self.patches.append(patch)
        self.vm["status"] = _apply(self.vm.get("status") or {}, patch)
        self.vm["metadata"]["resourceVersion"] = str(int(self.vm["metadata"]["resourceVersion"]) + 1)


def _reporter(pod, agents, node="node-a", local=True):
    api = FakeApi(copy.deepcopy(VM), pod)
    lp = gi.LocalPod("ns", "web-vm", "pod-uid", "c1", True)
    cri = FakeCRI([lp] if local else [], agents)
    return gi.Reporter(api, cri, node, clock=lambda: NOW), api, cri


def test_reporter_writes_once_then_only_on_change_and_clears_when_the_pod_leaves():
    r, api, cri = _reporter(_pod(), {"c1": AGENT})
    assert r.run_pass(full=True).patched == ["ns/web"]
    assert api.vm["status"]["guestOSInfo"]["id"] == "vmlet-testvm"
    # Quick passes skip the API while the agent says the same; a full one reads and writes nothing.
    assert r.run_pass(full=False).checked == 0
    res = r.run_pass(full=True)
    assert res.checked == 1 and not res.patched and len(api.patches) == 1
    # The agent disconnects: cleared on the next quick pass.
    cri.agents["c1"] = {"connected": False}
    assert r.run_pass(full=False).cleared == ["ns/web"] and not gi.reports(api.vm["status"])
    cri.agents["c1"] = AGENT
    r.run_pass(full=False)
    assert gi.reports(api.vm["status"])
    # The container is gone from this node, the pod too: cleared.
    cri.pods, api.pod = [], None
    assert r.run_pass(full=False).cleared == ["ns/web"] and not gi.reports(api.vm["status"])
    assert api.vm["status"]["conditions"] == [{"type": "Ready", "status": "True"}]


def test_reporter_never_touches_a_vm_whose_pod_is_elsewhere():
    r, api, _ = _reporter(_pod(node="node-b"), {"c1": AGENT})
    r.run_pass(full=True)
    assert not api.patches
    # Facts another node's reporter wrote stay when this node's old container of the VM goes away.
    r, api, cri = _reporter(_pod(), {"c1": AGENT})
    r.run_pass(full=True)
    api.pod = _pod(node="node-b", uid="new-pod")
    api.vm["status"]["interfaces"] = [{"interfaceName": "eth0", "infoSource": "guest-agent"}]  # node-b's
    before = len(api.patches)
    cri.pods = []
    r.run_pass(full=False)
    assert len(api.patches) == before and api.vm["status"]["interfaces"][0]["interfaceName"] == "eth0"


def test_reporter_retries_after_a_conflict_and_bounds_its_work():
    r, api, _ = _reporter(_pod(), {"c1": AGENT})
    api.conflict = True
    assert not r.run_pass(full=False).patched
    api.conflict = False
    assert r.run_pass(full=False).patched == ["ns/web"]  # not recorded as sent: tried again
    many = [gi.LocalPod("ns", f"v{i}-vm", f"u{i}", f"c{i}", True) for i in range(10)]
    r = gi.Reporter(FakeApi(None, None), FakeCRI(many, {}), "node-a", max_per_pass=3)
    res = r.run_pass(full=True)
    assert res.checked == 3 and res.skipped == 7


def test_a_failing_api_is_logged_not_raised():
    class Broken(FakeApi):
        def get_vm(self, ns, name):
            raise OSError("connection refused")
    r = gi.Reporter(Broken(None, None), FakeCRI([gi.LocalPod("ns", "web-vm", "u", "c", True)], {}), "node-a")
    res = r.run_pass(full=True)
    assert res.errors and "connection refused" in res.errors[0]


# ---------------------------------------------------------------- the controller keeps and drops them


def _status_vm(status):
    return {"metadata": {"name": "web", "namespace": "ns", "uid": "vm-uid", "generation": 1},
            "spec": {"runStrategy": "Always", "template": {"spec": {"domain": {"rootDisk": {"image": "virtlet.cloud/x"}}}}},
            "status": status}


def _reported(status):
    return _apply(status, gi.status_patch(status, gi.facts(AGENT, ["10.88.0.7"]), NOW))


def test_the_controllers_status_keeps_the_reporters_fields_while_the_pod_lives():
    base = vmstatus.derive(_status_vm({}), _pod(), Decision("none", "", ()), now=NOW, current_hash=None)
    vm = _status_vm(_reported(base))
    new = vmstatus.derive(vm, _pod(), Decision("none", "", ()), now=NOW + 5, current_hash=None)
    assert vmstatus.changed(vm["status"], new) == {}
    # A controller change of its own conditions keeps the reporter's condition, last.
    new = vmstatus.derive(vm, _pod(phase="Pending"), Decision("none", "", ()), now=NOW + 5, current_hash=None)
    patch = vmstatus.changed(vm["status"], new)
    assert [c["type"] for c in patch["conditions"]] == ["Ready", "Paused", "AgentConnected"]
    assert "guestOSInfo" not in patch and "interfaces" not in patch


def test_a_vm_that_stops_loses_them():
    base = vmstatus.derive(_status_vm({}), _pod(), Decision("none", "", ()), now=NOW, current_hash=None)
    vm = _status_vm(_reported(base))
    for pod in (None, _pod(phase="Succeeded")):
        patch = vmstatus.changed(vm["status"], vmstatus.derive(vm, pod, Decision("none", "", ()), now=NOW + 5,
                                                               current_hash=None))
        assert patch["guestOSInfo"] is None and patch["interfaces"] is None
        assert "AgentConnected" not in [c["type"] for c in patch["conditions"]]
    # A VM that never had them gets no such keys (its status is what it was before they existed).
    assert "guestOSInfo" not in vmstatus.derive(_status_vm({}), None, Decision("none", "", ()), now=NOW,
                                                current_hash=None)
    # Junk of the wrong type is removed.
    junk = _status_vm({"guestOSInfo": "junk", "interfaces": {"a": 1}})
    new = vmstatus.derive(junk, _pod(), Decision("none", "", ()), now=NOW, current_hash=None)
    assert new["guestOSInfo"] is None and new["interfaces"] is None


def test_vmctl_status_shows_the_guest_os_and_ips_when_present():
    from vmapi import vmctl
    status = _reported({"podIP": "10.88.0.7"})
    vm = {"metadata": {"name": "web", "namespace": "ns"}, "spec": {}, "status": status}
    text = vmctl.show(vm, "text")
    assert "Guest OS:        vmlet test VM 1 (id vmlet-testvm, kernel 6.1.0-28-cloud-amd64)" in text
    assert "Guest IPs:       eth0 (default) 10.88.0.7, fe80::5054:ff:feab:cdef" in text
    assert "AgentConnected=True" in text
    bare = vmctl.show({**vm, "status": {"podIP": "10.88.0.7"}}, "text")
    assert "Guest OS" not in bare and "Guest IPs" not in bare
    # The guest writes these: no terminal control sequence reaches the user's terminal.
    evil = {**vm, "status": {"guestOSInfo": {"prettyName": "x\x1b]0;pwned\x07"},
                             "interfaces": [{"interfaceName": "eth\x1b[2J0", "ipAddresses": ["1.2.3.4"]}]}}
    assert "\x1b" not in vmctl.show(evil, "text")


def test_the_process_survives_failing_passes_and_refuses_bad_arguments(capsys):
    import threading
    import pytest

    stop, calls = threading.Event(), []

    class Flaky:
        def run_pass(self, full):
            calls.append(full)
            if len(calls) < 3:
                raise OSError("vmlet not up yet")
            stop.set()

    made = []

    def make():
        made.append(1)
        if len(made) == 1:
            raise OSError("no kubeconfig yet")  # credentials that are not there yet: retried too
        return Flaky()

    t = threading.Thread(target=gi.serve, args=(make, stop, 0.2), kwargs={"tick": 0.01}, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive() and len(made) == 2 and len(calls) == 3
    for argv in (["--node", "n"], ["--cri-socket", "/x", "--node", "n", "--interval", "0"],
                 ["--cri-socket", "/x", "--node", " "]):
        with pytest.raises(SystemExit) as e:
            gi.main(argv)
        assert e.value.code == 2
    assert "--interval" in capsys.readouterr().err
