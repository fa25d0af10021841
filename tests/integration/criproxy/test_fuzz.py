"""Fuzzing the proxy: every RuntimeService and ImageService RPC with requests generated from the message
descriptors (hostile.py), sent through the proxy to three scripted fake runtimes whose answers are hostile
too (IDs with and without prefixes, duplicates, lists, odd error codes, long messages, garbage, answers
after the deadline).

Each call must end in one of the codes it may (a backend's code unchanged, INVALID_ARGUMENT for a request
the proxy cannot read or route, DEADLINE_EXCEEDED when a backend is too slow, INTERNAL naming the backend
whose answer it cannot read or route); never UNKNOWN, never later than the caller's deadline plus a margin.
A request routed by an ID or image reaches the backend the ID names, with that backend's own ID. Every ID
in an answer routes back (checked by sending it through the proxy) to the backend that handed it out, as
that backend's value; merged lists drop no routable item and contain none that would route elsewhere.

VMLET_FUZZ=long runs many more examples with random seeds (hostile.py).
"""

from __future__ import annotations

import re
import time

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from criproxy import routing
from criproxy.backends import MAX_MESSAGE
from criproxy.messages import cap_message
from criproxy.server import ProxyThread
from proto.runtime.v1 import api_pb2
from tests.integration.criproxy import hostile
from tests.integration.criproxy.hostile import GARBAGE, METHODS, Behaviour, ScriptedRuntime, raw_call

DEFAULT, VM, KATA = "containerd", "virtlet.cloud", "kata"
OTHERS = (VM, KATA)
TIMEOUT = 0.6  # the caller's deadline for fuzzed calls
MARGIN = 0.5   # how much later than its deadline a call may end (a loaded 2-core machine)
SLOW = 0.9     # a backend answering after the caller's deadline
METADATA_BUDGET = 8 * 1024  # a Python client's soft metadata limit: error details must fit well under it
OBJ, IMG = "obj", "img"


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    d = tmp_path_factory.mktemp("criproxy-fuzz")
    fakes = {n: ScriptedRuntime(d / f"{n}.sock", n).start() for n in (DEFAULT, VM, KATA)}
    sock = d / "proxy.sock"
    proxy = ProxyThread(str(sock), [(n, str(f.socket)) for n, f in fakes.items()]).start()
    channel = grpc.insecure_channel(f"unix://{sock}", options=[("grpc.max_receive_message_length", MAX_MESSAGE)])
    yield channel, fakes
    channel.close()
    proxy.stop()
    for f in fakes.values():
        f.stop()


# ---------------------------------------------------------------- the spec the proxy is checked against

def id_values(msg, kind_of_image_field: bool = False) -> list[tuple[str, str]]:
    """[(kind, value)] of every non-empty ID field (docs/criproxy.md: pod_sandbox_id, container_id, id of
    pods/containers/attributes; image_ref, image_id, Image.id, ImageSpec.image), map fields excluded."""
    out = []
    desc = msg.DESCRIPTOR
    for f, value in msg.ListFields():
        if f.type == f.TYPE_MESSAGE:
            if f.message_type.GetOptions().map_entry:
                continue
            for item in (value if hostile._is_repeated(f) else [value]):
                out += id_values(item)
            continue
        if f.type != f.TYPE_STRING:
            continue
        if f.name in ("pod_sandbox_id", "container_id") or (f.name == "id" and desc.name != "Image"):
            kind = OBJ
        elif f.name in ("image_ref", "image_id") or (f.name == "id" and desc.name == "Image") or (
                f.name == "image" and desc.name == "ImageSpec"):
            kind = IMG
        else:
            continue
        out += [(kind, v) for v in (value if hostile._is_repeated(f) else [value]) if v]
    return out


def owner(kind: str, value: str) -> tuple[str, str]:
    """Which backend an ID or image sent by the kubelet belongs to, and its value there."""
    if kind == IMG:
        for o in OTHERS:
            if value.startswith(o + "/"):
                return o, value
    for o in OTHERS:
        if value.startswith(o + "__"):
            return o, value[len(o) + 2:]
    return DEFAULT, value


def routable_from_default(msg) -> bool:
    """A default backend's object whose every ID the proxy can hand out unchanged (none looks like another
    backend's)."""
    return all(owner(k, v)[0] == DEFAULT for k, v in id_values(msg))


def list_field(desc) -> str | None:
    """The repeated field holding the items of a List*/Stream* answer."""
    for f in desc.fields:
        if f.type == f.TYPE_MESSAGE and hostile._is_repeated(f) and not f.message_type.GetOptions().map_entry:
            return f.name
    return None


def route_field(desc) -> str | None:
    names = {f.name for f in desc.fields}
    return next((n for n in ("container_id", "pod_sandbox_id") if n in names), None)


# ---------------------------------------------------------------- strategies for one call

def answer_items(method: str):
    _, m = METHODS[method]
    n = st.integers(0, 3) if m.server_streaming else st.just(1)
    return n.flatmap(lambda k: st.lists(hostile.messages(m.output_type, depth=3).map(
        lambda msg: msg.SerializeToString()), min_size=k, max_size=k))


CODES = [c for c in grpc.StatusCode if c != grpc.StatusCode.OK]


def behaviours(method: str):
    """Mostly answers; sometimes an error with any code and a hostile message, garbage, or an answer after
    the caller's deadline (rare: each costs a deadline's wait)."""
    answer = answer_items(method)
    kinds = ["answer"] * 6 + ["error"] * 2 + ["garbage", "slow"]
    return st.sampled_from(kinds).flatmap(lambda kind: {
        "answer": answer.map(lambda items: Behaviour(items=items)),
        "error": st.builds(lambda c, d: Behaviour(code=c, details=d), st.sampled_from(CODES),
                           hostile.hostile_text()),
        "garbage": st.just(Behaviour(items=[GARBAGE])),
        "slow": answer.map(lambda items: Behaviour(items=items, delay=SLOW)),
    }[kind])


def requests(method: str):
    _, m = METHODS[method]
    msgs = hostile.messages(m.input_type, depth=3)
    if method == "RunPodSandbox":  # the routing annotation, set often enough to matter
        target = st.sampled_from(["", DEFAULT, VM, KATA, "nope", "x" * hostile.LONG, "\uffff"])
        msgs = st.tuples(msgs, st.booleans(), target).map(_with_target)
    valid = msgs.map(lambda msg: msg.SerializeToString())
    return st.one_of(valid, valid, valid, valid, valid.flatmap(hostile.corrupt))


def _with_target(t):
    msg, set_it, target = t
    if set_it:
        msg.config.annotations["kubernetes.io/target-runtime"] = target
    return msg


# ---------------------------------------------------------------- the checks

def call(channel, method: str, raw: bytes, timeout: float = TIMEOUT):
    """(code, details, answer: bytes | list[bytes] | None, seconds)."""
    fn = raw_call(channel, method)
    t0 = time.monotonic()
    try:
        out = fn(raw, timeout=timeout)
        if METHODS[method][1].server_streaming:
            out = list(out)
        return grpc.StatusCode.OK, "", out, time.monotonic() - t0
    except grpc.RpcError as e:
        return e.code(), e.details() or "", None, time.monotonic() - t0


def parses(cls, raw: bytes) -> bool:
    try:
        cls.FromString(raw)
        return True
    except DecodeError:
        return False


def check_request_routing(method, raw, fakes):
    """The backends that got the call are the ones the request names, with their own IDs."""
    _, m = METHODS[method]
    req_cls = hostile._cls(m.input_type)
    called = {n for n, f in fakes.items() if f.calls}
    if not parses(req_cls, raw):
        return
    req = req_cls.FromString(raw)
    field = route_field(m.input_type)
    if method in ("ImageStatus", "PullImage", "RemoveImage"):
        field, kind, value = "image", IMG, req.image.image
    elif field and method not in ("RunPodSandbox",) and not m.input_type.name.startswith("List") \
            and not method.startswith("Stream"):
        kind, value = OBJ, getattr(req, field)
    else:
        return
    want, stripped = owner(kind, value)
    assert called <= {want}, (method, value, called)
    for name in called:
        got = req_cls.FromString(fakes[name].calls[0][1])
        got_value = got.image.image if field == "image" else getattr(got, field)
        assert got_value == stripped, (method, value, name, got_value)
        if name == DEFAULT:  # the default backend gets the kubelet's bytes untouched
            assert fakes[name].calls[0][1] == raw


CUT = re.compile(r"(?s)(?P<head>.*)… \((?P<length>\d+) characters\)")  # criproxy.backends.cap_message
KEPT = 100  # characters of a backend's message that a cut one keeps at least


def passes_on(details: str, backend_details: str, code: grpc.StatusCode) -> bool:
    """The proxy's `details` carry the backend's message: whole, or cut to fit the metadata budget, its start
    kept (KEPT characters at least) and its full length said; for UNAVAILABLE after the proxy's own
    `backend <name> (<socket>) is unavailable: `. A backend's empty message leaves nothing to carry, but a
    non-empty one must not come back empty."""
    if not backend_details:
        return True
    prefix = ""
    if code == grpc.StatusCode.UNAVAILABLE:
        m = re.match(r"backend \S+ \([^)]*\) is unavailable: ", details)
        if m is None:
            return False
        prefix = m.group(0)
    whole = prefix + backend_details
    if details == whole:
        return True
    cut = CUT.fullmatch(details)
    return (cut is not None and whole.startswith(cut["head"]) and int(cut["length"]) == len(whole)
            and len(cut["head"]) - len(prefix) >= KEPT)


def test_passes_on_refuses_a_dropped_or_mangled_message():
    """The check itself: it must catch a proxy that drops, replaces or over-cuts a backend's message."""
    long = "\uffff" * 21845
    NF, UNAV = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE
    assert passes_on("no such pod", "no such pod", NF) and passes_on(cap_message(long), long, NF)
    assert passes_on("", "", NF) and passes_on("anything", "", NF)
    sock_msg = f"backend {VM} (/run/vmlet/vmlet.sock) is unavailable: "
    assert passes_on(sock_msg + "restarting", "restarting", UNAV)
    assert passes_on(cap_message(sock_msg + long), long, UNAV)
    for wrong in ("", "no such", "no such pod!", "x… (11 characters)", "no such pod… (11 characters)"):
        assert not passes_on(wrong, "no such pod", NF), wrong
    assert not passes_on(long[:20] + f"… ({len(long)} characters)", long, NF)  # cut to almost nothing
    assert not passes_on(long[:500] + "… (9 characters)", long, NF)  # the length said wrong
    assert not passes_on(sock_msg, "restarting", UNAV) and not passes_on("restarting", "restarting", UNAV)


def allowed_error(method, raw, code, details, fakes, script) -> None:
    _, m = METHODS[method]
    called = [n for n, f in fakes.items() if f.calls]
    assert len(details.encode()) < METADATA_BUDGET / 2, f"{code}: details of {len(details)} characters"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        # The proxy's own refusal of a request it cannot read (a fan-out may have passed the raw bytes to the
        # default backend first), or of an unknown target runtime; otherwise it must be a backend's answer.
        req_cls = hostile._cls(m.input_type)
        if (not parses(req_cls, raw) and m.input_type.full_name in details) or (
                method == "RunPodSandbox" and "kubernetes.io/target-runtime" in details):
            return
        assert called, details[:300]
    failing = {n: script[n] for n in called if script[n].code is not None}
    if code in {b.code for b in failing.values()}:
        # a backend's code comes back unchanged, its message too (perhaps shortened)
        msgs = [b.details for b in failing.values() if b.code == code]
        assert any(passes_on(details, d, code) for d in msgs), (code, details[:200], [d[:200] for d in msgs])
        return
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        assert any(script[n].delay >= TIMEOUT for n in called), "DEADLINE_EXCEEDED without a slow backend"
        return
    if code == grpc.StatusCode.INTERNAL:
        # the proxy could not read or route a backend's answer: it names that backend
        assert any(f"backend {n}" in details for n in called), details[:300]
        return
    # UNKNOWN, CANCELLED, or any other code no backend gave
    raise AssertionError(f"{method}: unexpected {code}: {details[:300]}")


def check_answer(channel, method, out, fakes, script):
    """Every ID in the answer routes back to the backend that handed it out, as its value there; lists
    keep every routable item and no other."""
    _, m = METHODS[method]
    resp_cls = hostile._cls(m.output_type)
    raws = out if isinstance(out, list) else [out]
    if not all(parses(resp_cls, r) for r in raws):
        # only the default's bytes are passed through undecoded
        assert script[DEFAULT].items and GARBAGE in script[DEFAULT].items, "the proxy made an unreadable answer"
        return
    msgs = [resp_cls.FromString(r) for r in raws]
    produced: dict[str, set] = {n: set() for n in fakes}
    for n, f in fakes.items():
        if f.calls and script[n].code is None:
            for item in script[n].items:
                if parses(resp_cls, item):
                    produced[n] |= set(id_values(resp_cls.FromString(item)))
    field = list_field(m.output_type)
    item_desc = field and m.output_type.fields_by_name[field].message_type
    if field and routing.has_id_fields(item_desc) and (m.output_type.name.startswith("List") or method.startswith("Stream")):
        want = 0
        for n, f in fakes.items():
            if not f.calls:
                continue
            for item in script[n].items:
                for obj in getattr(resp_cls.FromString(item), field):
                    want += n != DEFAULT or routable_from_default(obj)
        got = sum(len(getattr(msg, field)) for msg in msgs)
        assert got == want, f"{method}: {got} items, expected {want}"
    seen = set()
    for msg in msgs:
        for kind, value in id_values(msg):
            if (kind, value) in seen or len(seen) >= 6:
                continue
            seen.add((kind, value))
            backend, got = probe(channel, fakes, kind, value)
            assert (kind, got) in produced[backend], (method, kind, value[:80], backend, got[:80])


def probe(channel, fakes, kind, value) -> tuple[str, str]:
    """Send an ID the proxy handed out back through it: (backend that got it, the value it got)."""
    for f in fakes.values():
        f.reset()
    if kind == OBJ:
        req = api_pb2.ContainerStatusRequest(container_id=value)
        raw_call(channel, "ContainerStatus")(req.SerializeToString(), timeout=5)
        (name,) = [n for n, f in fakes.items() if f.calls]
        return name, api_pb2.ContainerStatusRequest.FromString(fakes[name].calls[0][1]).container_id
    req = api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=value))
    raw_call(channel, "ImageStatus")(req.SerializeToString(), timeout=5)
    (name,) = [n for n, f in fakes.items() if f.calls]
    return name, api_pb2.ImageStatusRequest.FromString(fakes[name].calls[0][1]).image.image


def one_call(channel, fakes, method, raw, script):
    for n, f in fakes.items():
        f.reset(script[n])
    code, details, out, took = call(channel, method, raw)
    assert took < TIMEOUT + MARGIN, f"{method}: {took:.2f} s for a {TIMEOUT} s deadline"
    check_request_routing(method, raw, fakes)
    if code != grpc.StatusCode.OK:
        allowed_error(method, raw, code, details, fakes, script)
        return
    if method == "Status":  # answers even when backends fail (their failures become conditions)
        api_pb2.StatusResponse.FromString(out)
        return
    check_answer(channel, method, out, fakes, script)


# ---------------------------------------------------------------- the suites

FUZZ = hostile.fuzz_settings(ci_examples=12, long_examples=400)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_fuzz_through_hostile_backends(rig, method):
    channel, fakes = rig

    @FUZZ
    @given(raw=requests(method), script=st.fixed_dictionaries({n: behaviours(method) for n in fakes}))
    def run(raw, script):
        one_call(channel, fakes, method, raw, script)
    run()
    # alive and well afterwards
    for f in fakes.values():
        f.reset()
    assert call(channel, "Version", b"")[0] == grpc.StatusCode.OK


# ---------------------------------------------------------------- the real containerd and vmlet behind the proxy

# Read-only RPCs only: generated IDs could be prefixes of other runs' objects (containerd resolves ID
# prefixes), so nothing that stops, removes, execs or creates is sent to the real runtimes.
READ_ONLY = ["Version", "Status", "RuntimeConfig", "ListPodSandbox", "ListContainers", "ListContainerStats",
             "ListPodSandboxStats", "ListImages", "ImageStatus", "ImageFsInfo", "PodSandboxStatus",
             "ContainerStatus", "ContainerStats", "PodSandboxStats", "ListMetricDescriptors"]
REAL_TIMEOUT = 20.0


def _direct_request(method, req):
    """(backend name, request as that backend gets it) for a request routed by one ID or image."""
    field = route_field(req.DESCRIPTOR)
    if method == "ImageStatus":
        name, value = owner(IMG, req.image.image)
        req.image.image = value
        return name, req
    if field and not method.startswith("List"):
        name, value = owner(OBJ, getattr(req, field))
        setattr(req, field, value)
        return name, req
    return None, req


@pytest.mark.libvirt
def test_fuzz_real_backends(proxy, containerd, vmlet):
    direct = {DEFAULT: containerd.channel, VM: vmlet.client.channel}

    for method in READ_ONLY:
        _, m = METHODS[method]
        req_cls = hostile._cls(m.input_type)

        @hostile.fuzz_settings(ci_examples=4, long_examples=100)
        @given(msg=hostile.messages(m.input_type, depth=2, id_values=hostile.ids(prefixes=(VM,))))
        def run(msg):
            raw = msg.SerializeToString()
            code, details, _, took = call(proxy.channel, method, raw, timeout=REAL_TIMEOUT)
            assert took < REAL_TIMEOUT + MARGIN
            assert len(details.encode()) < METADATA_BUDGET / 2
            backend, stripped = _direct_request(method, req_cls.FromString(raw))
            if backend is None:
                assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (method, code, details[:300])
                return
            dcode, ddetails, _, _ = call(direct[backend], method, stripped.SerializeToString(), timeout=REAL_TIMEOUT)
            if dcode == grpc.StatusCode.RESOURCE_EXHAUSTED and "metadata" in ddetails:
                # the backend echoed a huge value; the proxy passes its code with the message shortened
                assert code != grpc.StatusCode.RESOURCE_EXHAUSTED, details[:300]
                return
            assert code == dcode, (method, backend, code, details[:200], dcode, ddetails[:200])
        run()
    assert call(proxy.channel, "Version", b"")[0] == grpc.StatusCode.OK
