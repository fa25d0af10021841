"""The pure parts of cri_shim/guest_agent.py: replies, caps, requests, error mapping; no libvirt guest needed."""

import base64
import json

import libvirt
import pytest

from cri_shim import guest_agent as ga


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
