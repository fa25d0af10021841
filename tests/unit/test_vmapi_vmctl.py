"""vmctl's decisions per runStrategy (virtctl's rules), against an in-memory fake of the API."""

from __future__ import annotations

import pytest

from vmapi import requests, vmctl


class FakeKube:
    def __init__(self, rs, phase=None, reqs=None):
        ann = {requests.ANNOTATION: reqs} if reqs else {}
        self.vm = {"metadata": {"name": "v", "namespace": "n", "uid": "u", "resourceVersion": "7",
                                "annotations": ann}, "spec": {"runStrategy": rs}}
        self.pod = None if phase is None else {
            "metadata": {"name": "v-vm", "uid": "p1", "ownerReferences": [
                {"kind": "VirtualMachine", "uid": "u", "controller": True}]},
            "status": {"phase": phase}}
        self.patches = []

    def get_pod(self, ns, name):
        return self.pod

    def get_vm(self, ns, name):
        return self.vm

    def patch_vm(self, ns, name, patch):
        self.patches.append(patch)
        return self.vm


def run(action, rs, phase=None, reqs=None):
    kube = FakeKube(rs, phase, reqs)
    try:
        return getattr(vmctl, action)(kube, kube.vm), kube.patches
    except vmctl.Refused as e:
        return f"refused: {e}", kube.patches


@pytest.mark.parametrize("action,rs,phase,expect", [
    ("start", "Halted", None, {"spec": {"runStrategy": "Always"}}),
    ("start", "Always", None, "refused: Always does not support manual start requests"),
    ("start", "Always", "Running", "refused: VM is already running"),
    ("start", "Once", None, "refused: Once does not support manual start requests"),
    ("start", "Manual", None, [{"action": "Start"}]),
    ("start", "Manual", "Succeeded", [{"action": "Stop", "uid": "p1"}, {"action": "Start"}]),
    ("start", "RerunOnFailure", "Succeeded", [{"action": "Stop", "uid": "p1"}, {"action": "Start"}]),
    ("start", "RerunOnFailure", "Failed", "refused: RerunOnFailure does not support starting VM from failed state"),
    ("stop", "Always", "Running", {"spec": {"runStrategy": "Halted"}}),
    ("stop", "Once", "Running", {"spec": {"runStrategy": "Halted"}}),
    ("stop", "Halted", None, "refused: VM is not running"),
    ("stop", "Manual", "Running", [{"action": "Stop", "uid": "p1"}]),
    ("stop", "RerunOnFailure", "Running", [{"action": "Stop", "uid": "p1"}]),
    ("stop", "Manual", "Succeeded", "refused: VM is not running"),
    ("restart", "Always", "Running", [{"action": "Stop", "uid": "p1"}, {"action": "Start"}]),
    ("restart", "Manual", None, "refused: VM is not running"),
    ("restart", "Halted", None, "refused: runStrategy Halted does not support manual restart requests"),
    ("restart", "Once", "Running", "refused: runStrategy Once does not support manual restart requests"),
])
def test_actions(action, rs, phase, expect):
    msg, patches = run(action, rs, phase)
    if isinstance(expect, str):
        assert msg == expect and patches == []
        return
    (patch,) = patches
    assert patch["metadata"]["resourceVersion"] == "7"  # never a lost update
    if isinstance(expect, dict):
        assert patch["spec"] == expect["spec"]
    else:
        import json
        assert json.loads(patch["metadata"]["annotations"][requests.ANNOTATION]) == expect


def test_one_change_at_a_time_but_stop_may_replace_a_pending_request():
    pending = requests.dump([requests.Request("Start")])
    assert run("restart", "Manual", "Running", pending)[0] == "refused: a stop/start is already underway"
    msg, patches = run("stop", "Manual", "Running", pending)
    assert msg == "Stop requested" and len(patches) == 1


def test_cli_reports_a_missing_kubeconfig(tmp_path, capsys):
    assert vmctl.main(["--kubeconfig", str(tmp_path / "none"), "list"]) == 1
    assert "vmctl:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        vmctl.main(["--version"])
    assert e.value.code == 0


def test_status_lists_the_volumes_and_what_holds_them_back():
    vm = {"metadata": {"name": "db", "namespace": "n"}, "spec": {}, "status": {
        "printableStatus": "ErrorPvcNotFound",
        "volumeStatus": [
            {"name": "root", "target": "/dev/disk/by-id/virtio-root", "phase": "Pending", "reason": "PvcNotFound",
             "message": "persistentvolumeclaim 'root-db' not found", "persistentVolumeClaimInfo": {"claimName": "root-db"}},
            {"name": "conf", "target": "/etc/app"}, "junk"]}}
    text = vmctl.show(vm, "text")
    lines = text.splitlines()
    at = lines.index("Volumes:")
    header, root, conf = (line.split() for line in lines[at + 1:at + 4])
    assert header == ["NAME", "CLAIM", "PHASE", "TARGET", "MESSAGE"]
    assert root[:4] == ["root", "root-db", "Pending", "/dev/disk/by-id/virtio-root"] and "not found" in lines[at + 2]
    assert conf == ["conf", "-", "-", "/etc/app"]
    assert "Volumes:" not in vmctl.show({"metadata": {"name": "x"}, "spec": {}, "status": {}}, "text")
