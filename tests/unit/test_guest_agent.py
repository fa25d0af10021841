"""The pure parts of cri_shim/guest_agent.py: replies, caps, requests, error mapping; no libvirt guest needed."""

import base64
import json
import os
import subprocess

import grpc
import libvirt
import pytest

from cri_shim import container_exec, errors, guest_agent as ga
from proto.runtime.v1 import api_pb2


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_parse_reply_returns_the_value_and_types_errors():
    assert ga.parse_reply('{"return": {"pid": 7}}', "guest-exec") == {"pid": 7}
    with pytest.raises(ga.AgentCommandFailed, match="guest-exec: Guest agent command failed"):
        ga.parse_reply(json.dumps({"error": {"class": "GenericError", "desc": "Guest agent command failed"}}),
                       "guest-exec")
    for bad in ("not json", "[1]", "{}"):
        with pytest.raises(ga.AgentCommandFailed):
            ga.parse_reply(bad, "guest-ping")


def test_output_over_the_cap_is_cut_with_the_marker():
    assert ga.cap_output(b"abc", False, cap=3) == (b"abc", False)
    out, cut = ga.cap_output(b"abcd", False, cap=3)  # the wrapper passes cap + 1 bytes when there was more
    assert cut and out == b"abc" + ga.TRUNCATED_MARKER % 3
    out, cut = ga.cap_output(b"ab", True, cap=3)  # qemu-ga's own truncation flag
    assert cut and out.startswith(b"ab\n[vmlet: output truncated")


def test_exit_status_reply_decoded():
    r = ga.result_of({"exited": True, "exitcode": 42, "out-data": b64(b"o"), "err-data": b64(b"e")})
    assert (r.exit_code, r.stdout, r.stderr) == (42, b"o", b"e")
    assert ga.result_of({"exited": True, "signal": 9}).exit_code == 137
    with pytest.raises(ga.AgentCommandFailed):
        ga.result_of({"exited": True})
    with pytest.raises(ga.AgentCommandFailed, match="not base64"):
        ga.result_of({"exited": True, "exitcode": 0, "out-data": "!!!"})


def test_the_wrappers_no_setpriv_answer_is_its_own_error():
    err = ga.NO_SETPRIV_MESSAGE + b" the image has no util-linux setpriv\n"
    with pytest.raises(ga.NoSetpriv):
        ga.result_of({"exited": True, "exitcode": ga.NO_SETPRIV_EXIT, "err-data": b64(err)})
    # The same exit code from the command itself is just an exit code.
    assert ga.result_of({"exited": True, "exitcode": ga.NO_SETPRIV_EXIT, "err-data": b64(b"x")}).exit_code == 125


def test_exec_request_runs_the_command_under_the_wrapper():
    req = ga.exec_request(["echo", "a b", "$HOME"], b"in", None, None, cap=10)
    assert req["path"] == "/bin/sh" and req["capture-output"] is True
    assert req["arg"][:2] == ["-c", ga.WRAPPER]
    assert req["arg"][3:] == ["11", "", "", "echo", "a b", "$HOME"], "arguments stay arguments, never shell text"
    assert base64.b64decode(req["input-data"]) == b"in"
    assert "input-data" not in ga.exec_request(["true"], None, None, None)
    assert ga.exec_request(["id"], None, 1000, 2000)["arg"][4:6] == ["1000", "2000"]
    assert ga.exec_request(["id"], None, None, 5)["arg"][4:6] == ["0", "5"], "a group alone: root with it"
    assert ga.exec_request(["id"], None, "www-data", None)["arg"][4:6] == ["www-data", ""]


def test_stdin_over_the_cap_is_refused_before_any_call():
    with pytest.raises(ValueError, match="stdin"):
        ga.run(None, ["cat"], stdin=b"x" * (ga.INPUT_CAP + 1))


def test_facts_parsing_uses_kubevirt_names_and_skips_loopback():
    assert ga.parse_os_info({"kernel-release": "6.1", "pretty-name": "X", "id": "d", "junk": 3}) == \
        {"kernelRelease": "6.1", "prettyName": "X", "id": "d"}
    nics = ga.parse_interfaces([
        {"name": "lo", "ip-addresses": [{"ip-address": "127.0.0.1", "prefix": 8}]},
        {"name": "eth0", "hardware-address": "52:54:00:00:00:01",
         "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "10.1.2.3", "prefix": 24}, "junk"]},
        "junk", {"name": 5}])
    assert nics == [{"name": "eth0", "mac": "52:54:00:00:00:01", "ipAddresses": ["10.1.2.3/24"]}]
    assert ga.parse_interfaces({"not": "a list"}) == []


def libvirt_error(code: int, message: str) -> libvirt.libvirtError:
    e = libvirt.libvirtError(message)
    e.err = (code, 0, message, 2, "", None, None, 0, 0)
    return e


@pytest.mark.parametrize("code, message, kind", [
    (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, "Guest agent is not responding: QEMU guest agent is not connected",
     ga.AgentNotConnected),
    (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, "Guest agent is not responding: Guest agent not available for now",
     ga.AgentTimeout),
    (libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED, "argument unsupported: QEMU guest agent is not configured",
     ga.NoAgentChannel),
    (libvirt.VIR_ERR_OPERATION_INVALID, "Requested operation is not valid: domain is not running", ga.VMNotRunning),
    (libvirt.VIR_ERR_OPERATION_TIMEOUT, "Timed out during operation: cannot acquire state change lock",
     ga.AgentTimeout),
    (libvirt.VIR_ERR_INTERNAL_ERROR, "unable to execute QEMU agent command 'guest-exec': failed",
     ga.AgentCommandFailed),
])
def test_libvirt_errors_become_typed_agent_errors(code, message, kind):
    err = ga.error_from_libvirt(libvirt_error(code, message))
    assert type(err) is kind
    text = ga.describe(err, "VM pod default/web")
    assert text.startswith("the guest agent of VM pod default/web ")
    if kind is ga.AgentNotConnected:
        assert "is not connected: the image has no qemu-guest-agent or the guest is still booting" in text


def test_tracker_follows_agent_events_and_forgets():
    t = ga.AgentTracker(lambda name: None)
    try:
        assert t.connected("d") is None
        t.on_agent_event("d", libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_DISCONNECTED, 2)
        assert t.connected("d") is False
        assert t.facts("d") is None, "known down: no fetch is even asked for"
        t.on_agent_event("d", libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED, 2)
        assert t.connected("d") is True
        t.on_agent_event(None, 0, 0)  # reconnected to libvirtd
        assert t.connected("d") is None
        t.on_agent_event("d", libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED, 1)
        t.forget("d")
        assert t.connected("d") is None and t.facts("d") is None
    finally:
        t.close()


# ------------------------------------------------------------------ hostile replies


@pytest.mark.parametrize("status", [
    {"exited": True, "exitcode": 2 ** 40}, {"exited": True, "exitcode": 2 ** 31},
    {"exited": True, "exitcode": -2 ** 31 - 1}, {"exited": True, "exitcode": True},
    {"exited": True, "exitcode": False}, {"exited": True, "exitcode": 1.5}, {"exited": True, "exitcode": "0"},
    {"exited": True, "exitcode": None, "signal": 9},  # a present but junk exit code is not overridden
    {"exited": True, "signal": True}, {"exited": True, "signal": -1}, {"exited": True, "signal": 2 ** 31},
])
def test_an_exit_code_the_cri_cannot_carry_is_a_clear_agent_error(status):
    # ExecSyncResponse.exit_code is an int32: anything else made the answer INTERNAL.
    with pytest.raises(ga.AgentCommandFailed, match="guest-exec-status: (exitcode|signal) .* is not"):
        ga.result_of(status)


def test_exit_codes_at_the_int32_bounds_pass():
    assert ga.result_of({"exited": True, "exitcode": 2 ** 31 - 1}).exit_code == 2 ** 31 - 1
    assert ga.result_of({"exited": True, "exitcode": -2 ** 31}).exit_code == -2 ** 31
    assert ga.result_of({"exited": True, "signal": 15}).exit_code == 143


def test_os_info_and_host_name_are_capped():
    big = "x" * (1 << 20)
    info = ga.parse_os_info({**{f"k{i}": big for i in range(1000)}, "y" * 1000: "long key"})
    assert len(info) == ga.FACT_KEYS and all(len(v) == ga.FACT_TEXT for v in info.values())
    assert len(json.dumps(info)) < 8 * 1024
    assert ga.parse_host_name({"host-name": big}) == "x" * ga.FACT_TEXT
    assert ga.parse_host_name({"host-name": 7}) == "" and ga.parse_host_name([]) == ""


def test_interfaces_are_capped_in_count_and_length():
    ip = {"ip-address": "10.0.0.1", "prefix": 24}
    nics = ga.parse_interfaces([{"name": "n" * 100000, "hardware-address": "m" * 100000,
                                 "ip-addresses": [ip] * 10000 + [{"ip-address": "a" * 100000}]}] * 10000)
    assert len(nics) == ga.MAX_INTERFACES
    assert all(len(n["name"]) == ga.FACT_TEXT and len(n["mac"]) == 64 for n in nics)
    assert all(len(n["ipAddresses"]) == ga.MAX_ADDRESSES for n in nics)
    assert len(json.dumps(nics)) < 128 * 1024
    odd = ga.parse_interfaces([{"name": "eth0", "ip-addresses": [
        {"ip-address": "a" * (ga.ADDRESS_TEXT + 1), "prefix": 8},  # no address
        {"ip-address": "10.0.0.2", "prefix": True},  # a bool is no prefix
        {"ip-address": "10.0.0.3", "prefix": 10 ** 6},
        {"ip-address": "", "prefix": 8}]}, {"name": "eth1", "ip-addresses": "10.0.0.4"}])
    assert odd == [{"name": "eth0", "mac": "", "ipAddresses": ["10.0.0.2", "10.0.0.3"]},
                   {"name": "eth1", "mac": "", "ipAddresses": []}]


# ------------------------------------------------------------------ run as user


def security_context(**fields) -> api_pb2.LinuxContainerSecurityContext:
    sc = api_pb2.LinuxContainerSecurityContext()
    for name, value in fields.items():
        if name in ("run_as_user", "run_as_group"):
            getattr(sc, name).value = value
        else:
            setattr(sc, name, value)
    return sc


@pytest.mark.parametrize("name", ["www-data", "user.name_1", "_apt", "a" * 256, "0"])
def test_portable_user_names_pass(name):
    assert container_exec.user_of(security_context(run_as_username=name)) == (name, None)


@pytest.mark.parametrize("name", ["nobody --regid=0", "-x", "a*", "a b", "a\nb", "a\x00b", "é", "a" * 257, "a/b"])
def test_a_user_name_that_is_not_portable_is_refused_naming_the_field(name):
    with pytest.raises(errors.CRIError) as e:
        container_exec.user_of(security_context(run_as_username=name))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.linux.security_context.run_as_username" in e.value.message


def test_ids_from_the_security_context():
    assert container_exec.user_of(security_context()) == (None, None)
    assert container_exec.user_of(security_context(run_as_user=1000, run_as_group=2000)) == (1000, 2000)
    assert container_exec.user_of(security_context(run_as_user=0, run_as_username="x")) == (0, None)


SETPRIV = next((p for p in ("/usr/bin/setpriv", "/bin/setpriv", "/usr/sbin/setpriv", "/sbin/setpriv")
                if os.access(p, os.X_OK)), None)


def wrapper(uid: str, gid: str, *argv: str) -> subprocess.CompletedProcess:
    """The exec wrapper run by this host's /bin/sh, as qemu-ga runs it in a guest."""
    return subprocess.run(["/bin/sh", "-c", ga.WRAPPER, "vmlet-exec", "1000", uid, gid, *argv],
                          capture_output=True, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0 or SETPRIV is None, reason="needs root and util-linux setpriv")
def test_the_wrapper_passes_a_user_to_setpriv_as_one_argument():
    done = wrapper("65534", "4242", "sh", "-c", "id -u; id -g")
    assert (done.returncode, done.stdout) == (0, b"65534\n4242\n"), done
    # Split, "65534 --regid=4242" would be two setpriv options and run the command with gid 4242.
    done = wrapper("65534 --regid=4242", "", "id", "-g")
    assert done.returncode == ga.NO_SETPRIV_EXIT and done.stderr.startswith(ga.NO_SETPRIV_MESSAGE), done
    assert done.stdout == b""


# ------------------------------------------------------------------ the exec ledger


def test_the_ledger_keeps_unfinished_commands_across_a_restart(tmp_path):
    root = tmp_path / "exec-inflight"
    ledger = ga.ExecLedger(root)
    ledger.started("vm-a", 100)
    ledger.started("vm-a", 101)
    ledger.started("vm-b", 7)
    assert ledger.stale("vm-a") == [], "running here: live, not stale"
    ledger.ended("vm-a", 100, drained=True)  # exit seen: the record goes
    ledger.ended("vm-b", 7, drained=False)  # could not be killed: the record stays
    assert ledger.stale("vm-b") == [7]
    assert sorted(p.name for p in (root / "vm-a").iterdir()) == ["101"]
    (root / "vm-a" / "junk").write_text("")
    (root / "vm-c").mkdir()

    again = ga.ExecLedger(root)  # a vmlet started after a crash
    assert again.stale("vm-a") == [101] and again.stale("vm-b") == [7]
    assert sorted(again.domains()) == ["vm-a", "vm-b"] and not (root / "vm-c").exists()
    again.started("vm-a", 101)  # the same pid for a new command: its own now, never swept
    assert again.stale("vm-a") == []
    again.settle("vm-a", [101])
    assert (root / "vm-a" / "101").exists(), "a live command's record stays"
    again.settle("vm-b", [7])
    assert again.stale("vm-b") == [] and not (root / "vm-b" / "7").exists()
    again.forget("vm-a")
    assert again.stale("vm-a") == [] and not (root / "vm-a").exists()
    assert ga.ExecLedger(root).domains() == []


def test_the_tracker_forgets_a_stopped_vms_records(tmp_path):
    ledger = ga.ExecLedger(tmp_path)
    ledger.started("d", 5)
    ledger.ended("d", 5, drained=False)
    t = ga.AgentTracker(lambda name: None, ledger)
    try:
        assert t.ledger.stale("d") == [5]
        t.forget("d")
        assert t.ledger.stale("d") == [] and not (tmp_path / "d").exists()
    finally:
        t.close()
