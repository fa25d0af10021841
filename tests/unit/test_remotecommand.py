"""remotecommand and port-forward protocol logic: status as client-go decodes it, the streams each version
waits for, resize decoding, WebSocket channel messages, port parsing, the HTTP request head."""

import base64
import json
import threading

import pytest

from cri_shim.errors import CRIError
from cri_shim.streaming import portforward as pf
from cri_shim.streaming import remotecommand as rc
from cri_shim.streaming import server as srv
from cri_shim.streaming import websocket as ws
from cri_shim.streaming.backend import Session


def client_go_v4_decode(message: bytes):
    """client-go's errorDecoderV4, transcribed: None (success), an exit code, or an error text."""
    status = json.loads(message)
    if status["status"] == "Success":
        return None
    if status["status"] == "Failure":
        if status.get("reason") == "NonZeroExitCode":
            for cause in status["details"]["causes"]:
                if cause.get("reason") == "ExitCode":
                    code = int(cause["message"])
                    assert 0 <= code <= 255  # ParseUint(..., 8)
                    return code
            raise AssertionError("no ExitCode cause")
        return status["message"]
    raise AssertionError("unknown status")


def test_success_and_exit_status():
    assert rc.encode_status(rc.status_success(), True) == b'{"metadata":{},"status":"Success"}'
    assert rc.encode_status(rc.status_success(), False) == b""
    for code in (1, 42, 255):
        st = rc.status_exit(code, "command 'x'")
        assert client_go_v4_decode(rc.encode_status(st, True)) == code
        assert rc.encode_status(st, False).startswith(b"command terminated with non-zero exit code")
    st = rc.status_internal("error executing command in container: no agent")
    assert client_go_v4_decode(rc.encode_status(st, True)) == \
        "Internal error occurred: error executing command in container: no agent"
    assert rc.encode_status(st, False) == b"Internal error occurred: error executing command in container: no agent"


@pytest.mark.parametrize("code, sent", [(1, 1), (255, 255), (256, 255), (70000, 255), (-9, 137), (-15, 143)])
def test_exit_codes_fit_a_uint8(code, sent):
    assert rc.exit_code_for_client(code) == sent


def _session():
    return Session(stdin=None, stdout=None, stderr=None, tty=False)


def test_runners_and_runtime_errors():
    s = _session()
    grpc = __import__("grpc")

    def status(body, action="executing"):
        st, cut_off = rc.run_body(body, s, action)
        assert cut_off is False
        return st
    assert status(rc.exec_runner(lambda _: 0, ["true"]))["status"] == "Success"
    st = status(rc.exec_runner(lambda _: 3, ["sh", "-c", "exit 3"]))
    assert st["reason"] == "NonZeroExitCode" and "'sh -c exit 3'" in st["message"]

    def refuse(_):
        raise CRIError(grpc.StatusCode.FAILED_PRECONDITION, "the guest agent is not connected")
    st = status(rc.exec_runner(refuse, ["x"]), "executing command in container")
    assert st["message"] == ("Internal error occurred: error executing command in container: "
                             "the guest agent is not connected")

    def bug(_):
        raise KeyError("oops")
    st = status(rc.attach_runner(bug), "attaching to container")
    assert st["reason"] == "InternalError" and "internal error" in st["message"]
    assert status(rc.attach_runner(lambda _: None), "attaching")["status"] == "Success"

    # the runtime's word that the client read too little: the connection is cut, not told
    def overrun(_):
        raise CRIError(grpc.StatusCode.RESOURCE_EXHAUSTED, "disconnected: output unread")
    st, cut_off = rc.run_body(rc.attach_runner(overrun), s, "attaching to container")
    assert cut_off is True and "output unread" in st["message"]


def test_stdin_eof_refusal_names_v5_and_spdy():
    assert rc.stdin_eof_refusal(rc.V5) is None
    for protocol in (rc.V4, rc.WS_V4_BASE64, rc.V1, rc.WS_BASE64, ""):
        st = rc.stdin_eof_refusal(protocol)
        assert st["status"] == "Failure" and st["reason"] == "BadRequest"
        assert "v5.channel.k8s.io" in st["message"] and "SPDY" in st["message"]
        assert (protocol or "no protocol") in st["message"]


@pytest.mark.parametrize("version, opts, want", [
    (4, rc.Options(stdin=True, stdout=True, stderr=True, tty=False), {rc.ERROR, rc.STDIN, rc.STDOUT, rc.STDERR}),
    (4, rc.Options(stdin=True, stdout=True, stderr=False, tty=True), {rc.ERROR, rc.STDIN, rc.STDOUT, rc.RESIZE}),
    (3, rc.Options(stdin=False, stdout=True, stderr=True, tty=True), {rc.ERROR, rc.STDOUT, rc.RESIZE}),
    (2, rc.Options(stdin=False, stdout=True, stderr=False, tty=True), {rc.ERROR, rc.STDOUT}),  # no resize before v3
    (1, rc.Options(stdin=True, stdout=False, stderr=False, tty=False), {rc.ERROR, rc.STDIN}),
])
def test_required_streams(version, opts, want):
    assert rc.required_streams(version, opts) == want


def test_spdy_versions():
    assert [rc.spdy_version(p) for p in rc.SPDY_PROTOCOLS] == [4, 4, 3, 2, 1]  # v5 served as v4


class FakeStream:
    def __init__(self, kind):
        self.headers = {"streamtype": kind}


def test_stream_collector_waits_for_every_required_stream():
    c = rc.StreamCollector({rc.ERROR, rc.STDOUT})
    assert c.add(FakeStream("error")) and not c.add(FakeStream("bogus"))
    assert c.wait(0.05) is None  # stdout missing: the creation timeout
    threading.Timer(0.05, c.add, args=(FakeStream("stdout"),)).start()
    got = c.wait(5)
    assert set(got) == {rc.ERROR, rc.STDOUT}
    ended = rc.StreamCollector({rc.ERROR})
    ended.end()
    assert ended.wait(5) is None  # the connection went away first


def test_resize_decoder():
    d = rc.ResizeDecoder()
    assert d.feed(b'{"Width":80,"Height":24}\n{"width"') == [(80, 24)]
    assert d.feed(b':100, "HEIGHT": 40}') == [(100, 40)]
    assert d.feed(b'  {"Width": 5}') == [(5, 0)]  # Go's zero value for a missing field
    bad = rc.ResizeDecoder()
    assert bad.feed(b'{"Width": -1, "Height": 2}{"Width":1,"Height":1}') == []
    assert bad.failed and bad.feed(b'{"Width":1,"Height":1}') == []
    for junk in (b'[1,2]', b'{"Width": 70000, "Height": 1}', b'{"Width": true}', b'"text"'):
        assert rc.ResizeDecoder().feed(junk) == []
    flood = rc.ResizeDecoder()
    flood.feed(b'{"Width": ' + b" " * 5000)
    assert flood.failed  # capped, not buffered without bound


def test_resize_queue_keeps_the_newest():
    s = _session()
    for i in range(40):
        rc.push_resize(s, (i, i))
    sizes = []
    while not s.resize.empty():
        sizes.append(s.resize.get_nowait())
    assert sizes[-1] == (39, 39) and len(sizes) == s.resize.maxsize


def test_ws_messages():
    assert rc.decode_ws_message(ws.OP_BINARY, b"\x00abc", True) == (0, b"abc")
    assert rc.decode_ws_message(ws.OP_TEXT, b"\x00abc", True) == (0, b"abc")  # the Python client's str stdin
    assert rc.decode_ws_message(ws.OP_BINARY, b"", True) is None
    assert rc.decode_ws_message(ws.OP_TEXT, b"0" + base64.b64encode(b"\xff\x00"), False) == (0, b"\xff\x00")
    assert rc.decode_ws_message(ws.OP_TEXT, b"0not base64!", False) is None
    assert rc.decode_ws_message(ws.OP_TEXT, b"xabc", False) is None


class Recorder:
    def __init__(self):
        self.sent = []
        self.close_sent = False

    def send(self, opcode, data):
        self.sent.append((opcode, data))


def test_channel_writer_binary_base64_and_chunks():
    r = Recorder()
    rc.ChannelWriter(r, 1, True).write(b"x" * (rc.MAX_WS_OUT_MESSAGE + 10))
    assert [len(d) for _, d in r.sent] == [rc.MAX_WS_OUT_MESSAGE + 1, 11] and all(d[0] == 1 for _, d in r.sent)
    r = Recorder()
    rc.ChannelWriter(r, 2, False).write(b"\x00\xff")
    assert r.sent == [(ws.OP_TEXT, b"2" + base64.b64encode(b"\x00\xff"))]


def test_pipe_is_bounded_and_ends():
    p = rc.Pipe(capacity=4)
    p.feed(b"abcdef")  # one message may pass the mark; the next waits
    fed = threading.Event()
    t = threading.Thread(target=lambda: (p.feed(b"gh"), fed.set()))
    t.start()
    assert not fed.wait(0.1)
    assert p.read(3) == b"abc" and p.read() == b"def"
    assert fed.wait(5)
    p.close()
    assert p.read() == b"gh" and p.read() == b""
    t.join()
    q = rc.Pipe()
    q.feed(b"lost")
    q.abort()
    assert q.read() == b""
    assert q.feed(b"late") is False and q.read() == b""  # after the runtime is done: dropped, never waits


def test_pipe_feed_waiting_for_room_ends_on_abort_and_cancel():
    for end in ("abort", "cancel"):
        cancel = threading.Event()
        p = rc.Pipe(capacity=4, cancel=cancel)
        assert p.feed(b"full") is True
        result = []
        t = threading.Thread(target=lambda: result.append(p.feed(b"more")))
        t.start()
        t.join(0.2)
        assert t.is_alive()  # waiting for room
        p.abort() if end == "abort" else cancel.set()
        t.join(5)
        assert not t.is_alive() and result == [False], end


def test_port_forward_ports_and_headers():
    assert pf.ports_from_query({"port": ["80", "443,8080"]}) == [80, 443, 8080]
    assert pf.ports_from_query({"ports": ["22"]}) == [22]  # the kubernetes Python client's name
    for query, msg in [({}, "required"), ({"port": [""]}, "empty"), ({"port": ["0"]}, "between"),
                       ({"port": ["65536"]}, "between"), ({"port": ["x"]}, "unable to parse"),
                       ({"port": ["-1"]}, "unable to parse"), ({"port": [",".join(["1"] * 33)]}, "at most")]:
        with pytest.raises(pf.PortError, match=msg):
            pf.ports_from_query(query)
    h = pf.SpdyPortForward(lambda *a: None, "p", 1.0)
    assert h.check({"port": "80", "streamtype": "data"}) is None
    assert "required" in h.check({"streamtype": "data"})
    assert "between" in h.check({"port": "99999", "streamtype": "data"})
    assert "streamType" in h.check({"port": "80"})
    assert "invalid stream type" in h.check({"port": "80", "streamtype": "stdin"})


def test_http_request_head():
    req = srv.parse_head(b"POST /exec/tok?port=1&port=2 HTTP/1.1\r\nHost: x\r\nX-Stream-Protocol-Version: a, b"
                         b"\r\nx-stream-protocol-version: c")
    assert (req.method, req.path, req.query["port"]) == ("POST", "/exec/tok", ["1", "2"])
    assert req.headers["x-stream-protocol-version"] == ["a, b", "c"]
    for head, status in [(b"GET /x", 400), (b"GET /x HTTP/2.0", 505), (b"GET x HTTP/1.1", 400),
                         (b"GET /x HTTP/1.1\r\nNo-Colon", 400), (b"GET /x HTTP/1.1\r\nBad Name: v", 400),
                         (b"GET /x HTTP/1.1\r\nA: \x01", 400), (b"G\x00T /x HTTP/1.1", 400),
                         (b"GET /x HTTP/1.1" + b"\r\nA: b" * 101, 431)]:
        with pytest.raises(srv._BadRequest) as e:
            srv.parse_head(head)
        assert e.value.status == status


def test_request_validation_names_fields():
    from proto.runtime.v1 import api_pb2
    with pytest.raises(CRIError, match=r"port\[1\]"):
        srv.validate_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="p", port=[80, 0]))
    with pytest.raises(CRIError, match="pod_sandbox_id"):
        srv.validate_port_forward(api_pb2.PortForwardRequest(port=[80]))
    with pytest.raises(CRIError, match="container_id"):
        srv.validate_attach(api_pb2.AttachRequest(stdout=True))
    with pytest.raises(CRIError, match="tty and stderr"):
        srv.validate_attach(api_pb2.AttachRequest(container_id="c", tty=True, stderr=True))
    srv.validate_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="p"))  # ports may come with the streams
