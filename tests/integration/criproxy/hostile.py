"""Hostile inputs for the proxy's robustness suites: hypothesis strategies that build any runtime.v1 message
from its descriptor, and a scripted fake runtime whose answers are hostile too.

Strategies: boundary integers per wire type, hostile strings (U+FFFE/U+FFFF, C0 controls, 64 KiB strings,
IDs with and without a backend's prefix, prefix-only, prefixes of IDs), random maps and repeated fields,
unknown enum values, and serialized requests with one field mutated or the bytes corrupted.

Profiles: `VMLET_FUZZ=ci` (the default: derandomized, a bounded example count) or `VMLET_FUZZ=long`
(random seeds, many more examples). No example database is written (the checkout stays clean).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests.integration.criproxy import raw_server
from tests.support import fuzz_profile
from tests.integration.criproxy.raw_server import SERVICES

METHODS = {m.name: (svc, m) for svc in SERVICES for m in svc.methods}


def fuzz_settings(ci_examples: int, long_examples: int | None = None) -> settings:
    """Per-test settings (no global profile: other suites in the same session keep theirs)."""
    common = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    if fuzz_profile.LONG:
        return settings(max_examples=long_examples or ci_examples * 20, **common)
    return settings(max_examples=ci_examples, derandomize=True, **common)


# ---------------------------------------------------------------- values

VM = "virtlet.cloud"
SEP = "__"
HEX_ID = "3f2a9c0d" * 8  # an ID of the shape containerd and vmlet hand out
C0 = "".join(chr(c) for c in range(0x20) if chr(c) not in "\t\n\r")
LONG = 64 * 1024

INT_BOUNDS = {
    FieldDescriptor.TYPE_INT32: (-2**31, 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-2**31, 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-2**31, 2**31 - 1), FieldDescriptor.TYPE_INT64: (-2**63, 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-2**63, 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-2**63, 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def integers(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = sorted({lo, lo + 1, -1 if lo < 0 else 0, 0, 1, 1000, 1000000, hi - 1, hi})
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


def hostile_text(max_size: int = 12) -> st.SearchStrategy[str]:
    """Short strings over an alphabet of the characters that break things, or a few fixed nasty ones."""
    alphabet = st.one_of(st.sampled_from(list(C0 + "\t\n\r\ufffe\uffff\u2028\x7f_/:%") + ["\U0010ffff"]),
                         st.characters(codec="utf-8"))
    return st.one_of(
        st.text(alphabet, max_size=max_size),
        st.sampled_from(["", " ", "\x00", "\ufffe", "\uffff", "a" * LONG, "\uffff" * (LONG // 3), "%" * 4096]))


def ids(prefixes=(VM, "kata")) -> st.SearchStrategy[str]:
    """Object IDs and image refs as the kubelet could send them: real-looking, prefixed, prefix-only,
    prefixes of the prefix, prefixes of IDs, doubly prefixed, other backends' names, hostile."""
    fixed = ["", HEX_ID, HEX_ID[:1], HEX_ID[:12], "sha256:" + HEX_ID, "busybox", "virtlet.cloud/testvm",
             "virtlet.cloud/", VM, VM + "_", VM + SEP, VM + SEP + HEX_ID, VM + SEP + HEX_ID[:5],
             VM + SEP + VM + SEP + "x", VM + SEP + "sha256:" + HEX_ID, "containerd" + SEP + "x", "kata" + SEP,
             "kata" + SEP + "x", SEP, SEP + "x", "x" * LONG, VM + SEP + "\uffff" * 3]
    return st.one_of(st.sampled_from(fixed),
                     st.builds(lambda p, s: p + SEP + s, st.sampled_from(prefixes), hostile_text()),
                     hostile_text())


ID_NAMES = {"id", "pod_sandbox_id", "container_id", "image_ref", "image_id", "image"}


def _is_repeated(f: FieldDescriptor) -> bool:
    flag = getattr(f, "is_repeated", None)
    return bool(flag) if flag is not None else f.label == FieldDescriptor.LABEL_REPEATED


def _scalar(f: FieldDescriptor, id_values: st.SearchStrategy[str]) -> st.SearchStrategy:
    t = f.type
    if t == FieldDescriptor.TYPE_STRING:
        return id_values if f.name in ID_NAMES else st.one_of(hostile_text(), id_values)
    if t == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=16), st.just(b"\xff" * LONG))
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=32 if t == FieldDescriptor.TYPE_FLOAT else 64)
    if t == FieldDescriptor.TYPE_ENUM:  # open enums: unknown values are legal on the wire
        return st.one_of(st.sampled_from([v.number for v in f.enum_type.values]), integers(-2**31, 2**31 - 1))
    lo, hi = INT_BOUNDS[t]
    return integers(lo, hi)


@st.composite
def messages(draw, desc: Descriptor, depth: int = 3, id_values: st.SearchStrategy[str] | None = None,
             max_items: int = 3):
    """A message of type `desc` with a random subset of its fields set (recursively, `depth` levels)."""
    id_values = id_values or ids()
    msg = _cls(desc)()
    for f in desc.fields:
        if not draw(st.booleans()):
            continue
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if f.message_type.GetOptions().map_entry:
                key_f, val_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
                n = draw(st.integers(0, max_items))
                target = getattr(msg, f.name)
                for _ in range(n):
                    k = draw(_scalar(key_f, hostile_text()))
                    if val_f.type == FieldDescriptor.TYPE_MESSAGE:
                        if depth > 0:
                            target[k].CopyFrom(draw(messages(val_f.message_type, depth - 1, id_values, max_items)))
                    else:
                        target[k] = draw(_scalar(val_f, id_values))
                continue
            if depth <= 0:
                continue
            if _is_repeated(f):
                for _ in range(draw(st.integers(0, max_items))):
                    getattr(msg, f.name).add().CopyFrom(draw(messages(f.message_type, depth - 1, id_values,
                                                                      max_items)))
            else:
                getattr(msg, f.name).CopyFrom(draw(messages(f.message_type, depth - 1, id_values, max_items)))
                getattr(msg, f.name).SetInParent()  # present even when empty
            continue
        if _is_repeated(f):
            getattr(msg, f.name).extend(draw(st.lists(_scalar(f, id_values), max_size=max_items)))
        else:
            setattr(msg, f.name, draw(_scalar(f, id_values)))
    return msg


def _cls(desc: Descriptor):
    from google.protobuf import message_factory
    return message_factory.GetMessageClass(desc)


def corrupt(raw: bytes) -> st.SearchStrategy[bytes]:
    """Bytes of a request broken on the wire: truncated, a byte flipped, garbage appended, invalid UTF-8."""
    options = [st.just(raw + b"\x0a\x05ab"), st.just(b"\x0a\x02\xff\xfe" + raw), st.just(b"\xff" * 8)]
    if raw:
        options.append(st.integers(0, len(raw) - 1).map(lambda i: raw[:i]))
        options.append(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)).map(
            lambda t: raw[:t[0]] + bytes([t[1]]) + raw[t[0] + 1:]))
    return st.one_of(options)


# ---------------------------------------------------------------- a fake runtime with scripted, hostile answers

@dataclass
class Behaviour:
    """What a ScriptedRuntime does with its next calls: answer `items` (unary: the first; streams: each),
    fail with `code`/`details`, wait `delay` s first (longer than the caller's deadline: an answer too late),
    or `hang` until its caller goes away."""
    items: list[bytes] = field(default_factory=lambda: [b""])
    code: grpc.StatusCode | None = None
    details: str = ""
    delay: float = 0.0
    hang: bool = False


GARBAGE = b"\x0a\x05ab"  # a length-delimited field running past the end: no message parses from it


class ScriptedRuntime:
    """A CRI server for every runtime.v1 method; each call does what `behaviour` says. Records every call
    (method, raw request) and, for calls whose caller went away while it waited, their method in `gone`."""

    def __init__(self, socket: Path, name: str):
        self.socket, self.name = socket, name
        self.behaviour = Behaviour()
        self.by_method: dict[str, Behaviour] = {}
        self.calls: list[tuple[str, bytes]] = []
        self.gone: list[str] = []
        self.server: grpc.Server | None = None

    def reset(self, behaviour: Behaviour | None = None) -> None:
        self.behaviour = behaviour or Behaviour()
        self.by_method.clear()
        self.calls.clear()
        self.gone.clear()

    def _wait(self, b: Behaviour, method: str, ctx) -> bool:
        """False: the caller went away first (recorded)."""
        end = time.monotonic() + b.delay
        while b.hang or time.monotonic() < end:
            if not ctx.is_active():
                self.gone.append(method)
                return False
            time.sleep(0.01)
        return True

    def _handlers(self, method: str):
        def unary(req: bytes, ctx):
            self.calls.append((method, req))
            b = self.by_method.get(method, self.behaviour)
            if not self._wait(b, method, ctx):
                return b""
            if b.code is not None:
                ctx.abort(b.code, b.details)
            return b.items[0] if b.items else b""

        def stream(req: bytes, ctx):
            self.calls.append((method, req))
            b = self.by_method.get(method, self.behaviour)
            if not self._wait(b, method, ctx):
                return
            yield from b.items
            if b.code is not None:
                ctx.abort(b.code, b.details)
        return unary, stream

    def start(self) -> "ScriptedRuntime":
        self.server = raw_server.serve(self.socket, lambda m: self._handlers(m.name), workers=16, options=[
            ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)])
        return self

    def stop(self, grace: float | None = 0) -> None:
        if self.server is not None:
            self.server.stop(grace).wait()
            self.server = None


def raw_call(channel: grpc.Channel, method: str):
    """The proxy's method on raw bytes (unary or server-streaming)."""
    svc, m = METHODS[method]
    path = f"/{svc.full_name}/{method}"
    if m.server_streaming:
        return channel.unary_stream(path, request_serializer=None, response_deserializer=None)
    return channel.unary_unary(path, request_serializer=None, response_deserializer=None)
