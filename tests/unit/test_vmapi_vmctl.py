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


# ---------------------------------------------------------------- console: the pure parts

@pytest.mark.parametrize("value,key", [("^]", 0x1D), ("^a", 0x01), ("^A", 0x01), ("^@", 0x00), ("^_", 0x1F),
                                       ("^?", 0x7F), ("~", ord("~")), ("q", ord("q"))])
def test_escape_keys_in_caret_notation_or_one_character(value, key):
    assert vmctl.parse_escape(value) == key
    assert vmctl.parse_escape(vmctl.escape_name(key)) == key


@pytest.mark.parametrize("value", ["", "^]]", "ab", "^1", "é", "^é"])
def test_bad_escape_keys_are_refused_naming_the_option(value):
    with pytest.raises(ValueError, match="--escape"):
        vmctl.parse_escape(value)


def test_the_default_escape_is_ctrl_close_bracket_as_virsh_and_virtctl():
    assert vmctl.parse_escape(vmctl.DEFAULT_ESCAPE) == 0x1D and vmctl.escape_name(0x1D) == "^]"


@pytest.mark.parametrize("data,sent,leave", [
    (b"ls\r", b"ls\r", False), (b"\x1d", b"", True), (b"ab\x1dcd", b"ab", True), (b"\x03", b"\x03", False)])
def test_bytes_before_the_escape_key_go_to_the_guest_and_nothing_after_it(data, sent, leave):
    assert vmctl.split_at_escape(data, 0x1D) == (sent, leave)


def _refused(status, reason, body):
    """An attach refused as the kubernetes client reports it: ApiException(status=0) raised while
    handling websocket-client's bad-status error (what kubernetes.stream does)."""
    from kubernetes.client.rest import ApiException
    from websocket import WebSocketBadStatusException
    try:
        try:
            raise WebSocketBadStatusException(f"Handshake status {status} {reason}", status, reason, {}, body)
        except WebSocketBadStatusException as e:
            raise ApiException(status=0, reason=str(e))
    except ApiException as outer:
        return outer


def test_the_refusal_names_the_servers_reason():
    status = (b'{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",'
              b'"message":"pods \\"x-vm\\" not found","reason":"NotFound","code":404}')
    assert vmctl.attach_error(_refused(404, "Not Found", status)) == '404: pods "x-vm" not found'
    kubelet = b"rpc error: code = FailedPrecondition desc = the console is held by another client"
    assert vmctl.attach_error(_refused(500, "Internal Server Error", kubelet)) == \
        "500: rpc error: code = FailedPrecondition desc = the console is held by another client"
    assert vmctl.attach_error(_refused(502, "Bad Gateway", b"")) == "502: no reason given"
    from kubernetes.client.rest import ApiException
    assert vmctl.attach_error(ApiException(status=0, reason="[Errno 111] Connection refused")) == \
        "[Errno 111] Connection refused"


@pytest.mark.parametrize("phase,expect", [(None, "VM is not running (it has no pod)"),
                                          ("Pending", "VM is not running (its pod v-vm is Pending)"),
                                          ("Succeeded", "VM is not running (its pod v-vm is Succeeded)")])
def test_console_of_a_vm_that_is_not_running_is_refused_before_any_attach(phase, expect):
    kube = FakeKube("Always", phase)
    with pytest.raises(vmctl.Refused, match=r"^" + __import__("re").escape(expect) + "$"):
        vmctl.open_console(kube, kube.vm)


def test_raw_mode_is_restored_on_every_way_out():
    """A real pty: raw inside, the saved mode after a normal exit, an exception and a signal."""
    import os
    import pty
    import signal
    import termios
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        with vmctl.raw_terminal(slave):
            inside = termios.tcgetattr(slave)
        assert inside != before and not inside[3] & termios.ICANON and not inside[3] & termios.ECHO
        assert termios.tcgetattr(slave) == before
        with pytest.raises(RuntimeError):
            with vmctl.raw_terminal(slave):
                raise RuntimeError("boom")
        assert termios.tcgetattr(slave) == before
        handler = signal.getsignal(signal.SIGTERM)
        with pytest.raises(vmctl._Signalled) as e:
            with vmctl.raw_terminal(slave):
                os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next line
                raise AssertionError("the signal did not leave the block")
        assert e.value.signum == signal.SIGTERM
        assert termios.tcgetattr(slave) == before and signal.getsignal(signal.SIGTERM) == handler
    finally:
        os.close(master)
        os.close(slave)


def test_console_takes_the_namespace_after_the_command_too(monkeypatch):
    seen = {}

    class Kube(FakeKube):
        def get_vm(self, ns, name):
            seen["ns"] = ns
            return None
    assert vmctl.main(["console", "v", "-n", "other"], kube=Kube("Always")) == 1
    assert seen["ns"] == "other"
    assert vmctl.main(["-n", "first", "console", "v"], kube=Kube("Always")) == 1
    assert seen["ns"] == "first"
