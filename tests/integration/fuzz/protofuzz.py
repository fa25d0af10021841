"""Hypothesis strategies for CRI requests, built from the message descriptors of proto/runtime/v1.

Nothing here names a CRI message or field: the strategies walk `DESCRIPTOR.fields`
and the service descriptors, so a field or RPC added to api.proto is fuzzed without
touching the suite. What the strategies know is the *kind* of a value:
- integers: the type's edges (0, ±1, min/max) and libvirt-ish edges (999, 1000, 1000000, ...);
- strings: characters XML 1.0 cannot carry, C0 controls, NUL, 64 KiB, path traversal,
  absolute paths, format strings, XML metacharacters, newlines;
- fields whose name says they hold an ID (`*_id`, `id`) also get IDs from `Pools`:
  unknown, empty, prefixes and ambiguous prefixes of live objects' IDs, the IDs themselves;
- enums: known values and values out of range; maps and repeated fields: a few random entries.
`mutations()` takes a valid (kubelet-like) request and changes exactly one field, at any depth.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

from google.protobuf import descriptor as pbd
from google.protobuf import message_factory
from google.protobuf.message import Message
from hypothesis import strategies as st

from cri_shim import annotations as cri_annotations
from proto.runtime.v1 import api_pb2, api_pb2_grpc

FD = pbd.FieldDescriptor
MAX_DEPTH = 4
KIB = 1024

INT_EDGES = [0, 1, -1, 2, 63, 64, 65, 255, 256, 999, 1000, 1001, 4095, 4096, 65535, 65536, 999999, 1000000,
             1000001, 2**20, 64 * 2**20 - 1, 64 * 2**20, 2**31 - 1, -2**31, 2**32 - 1, 2**32, 2**53, 2**62,
             2**63 - 1, -2**63, 2**63, 2**64 - 1]
_RANGES = {
    FD.TYPE_INT32: (-2**31, 2**31 - 1), FD.TYPE_SINT32: (-2**31, 2**31 - 1), FD.TYPE_SFIXED32: (-2**31, 2**31 - 1),
    FD.TYPE_INT64: (-2**63, 2**63 - 1), FD.TYPE_SINT64: (-2**63, 2**63 - 1), FD.TYPE_SFIXED64: (-2**63, 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1), FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1), FD.TYPE_FIXED64: (0, 2**64 - 1),
}

# Strings that have broken runtimes before: XML-invalid characters, controls, traversal, format strings.
HOSTILE = [
    "", " ", "\ufffe", "\uffff", "a\ufffeb", "\x00", "a\x00b", "\x01", "\x08", "\x0b", "\x0c", "\x1b[2J", "\x1f",
    "\x7f", "\x85", "\u2028", "\u202e", "\ufeff", "\t", "\n", "a\nb", "\r\n", "é", "😀", "../", "../../../etc/passwd",
    "a/../../b", "..", ".", "/", "/etc/passwd", "/tmp/vmlet-fuzz", "/proc/self/mem", "/dev/null", "C:\\x", "%s",
    "%n%n%n%n", "%(x)s", "{}", "{0}", "{x.__class__}", "${PATH}", "$(id)", "`id`", "<", ">", "&", "<&]]>",
    "<![CDATA[x]]>", "<!--", "]]>", "&amp;", "'", '"', "\\", "*", "?", "-rf", "--help", "a" * 63, "a" * 64,
    "a" * 253, "a" * 254, "a" * 4096,
]
LONG = ["a" * (64 * KIB), "\ufffe" * (16 * KIB), "../" * (20 * KIB), "%s" * (32 * KIB)]


def hostile_strings() -> st.SearchStrategy[str]:
    specials = st.sampled_from(HOSTILE)
    # Only characters a client can put on the wire (UTF-8: no lone surrogates).
    text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=24)
    return st.one_of(
        specials,
        text,
        st.text(string.ascii_lowercase + string.digits + "-._", min_size=1, max_size=16),
        st.builds(lambda a, b, c: a + b + c, text, specials, text),
        st.sampled_from(LONG),
    )


# Pod annotations vmlet reads (taken from cri_shim.annotations, so a new one is fuzzed too) and values
# that are plausible for some of them: map fields named `annotations` draw keys from here as well.
ANNOTATION_KEYS = sorted(v for k, v in vars(cri_annotations).items()
                         if k.isupper() and isinstance(v, str) and (v.startswith("Virtlet") or "/" in v))
ANNOTATION_VALUES = ["0", "1", "2", "999", "1000000", "-1", "1Gi", "-1Gi", "1Ti", "1Ei", "99999999999999999999Gi",
                     "host-model", "host-passthrough", "maximum", "Skylake-Client", "no-such-cpu", "scsi", "virtio",
                     "ide", "bridge", "masquerade", "nocloud", "configdrive", "true", "false", "yes",
                     "mode: host-passthrough", "mode: custom\nmodel:\n  value: no-such-cpu",
                     "mode: custom\nfeatures:\n- name: no-such-flag\n  policy: require", "#cloud-config\n",
                     "{a: [1, 2]}", "[]", "virtlet.cloud", "kubernetes.io/target-runtime"]


def annotation_keys() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(ANNOTATION_KEYS), hostile_strings())


def annotation_values() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(ANNOTATION_VALUES), hostile_strings())


def hex_ids() -> st.SearchStrategy[str]:
    return st.text("0123456789abcdef", min_size=1, max_size=64)


@dataclass
class Pools:
    """Real IDs and names of the live objects, for the fields that hold one."""

    sandboxes: list[str] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)

    def ids(self, kinds: list[str]) -> st.SearchStrategy[str]:
        # The strategy's shape must not depend on the live IDs (which change between examples), or hypothesis
        # replays an example differently ("Inconsistent data generation"): pick from the pools by index.
        real = sorted({i for kind in kinds for i in getattr(self, kind)})
        chosen = _pick(real)
        return st.one_of([
            hostile_strings(), hex_ids(), st.just("0" * 64), chosen, chosen,
            st.tuples(chosen, st.integers(1, 64)).map(lambda t: t[0][:t[1]]),
            chosen.map(lambda i: i + "0"), chosen.map(str.upper), chosen.map(lambda i: i[:8] + "x"),
            _pick(ambiguous_prefixes(real)),
        ])


def _pick(pool: list[str]) -> st.SearchStrategy[str]:
    """One of `pool` (a random ID when it is empty), drawn the same way whatever the pool holds."""
    return st.tuples(st.integers(0, 255), hex_ids()).map(lambda t: pool[t[0] % len(pool)] if pool else t[1])


def ambiguous_prefixes(ids: list[str]) -> list[str]:
    """Prefixes shared by two or more of the IDs."""
    out = set()
    for a in ids:
        for b in ids:
            if a != b:
                n = 0
                while n < min(len(a), len(b)) and a[n] == b[n]:
                    n += 1
                out.update(a[:k] for k in range(1, n + 1))
    return sorted(out)


def _id_kinds(f: FD, parent: pbd.Descriptor) -> list[str] | None:
    """Which pools a field draws from, by its name: None for an ordinary field."""
    name = f.name
    if f.type != FD.TYPE_STRING:
        return None
    if name == "image" or (parent.name == "ImageSpec" and name in ("image", "user_specified_image")):
        return ["images"]
    if name in ("pod_sandbox_id",) or (name == "id" and "Sandbox" in parent.name):
        return ["sandboxes"]
    if name == "container_id" or (name == "id" and "Container" in parent.name):
        return ["containers", "sandboxes"]  # the events API carries sandbox IDs in container_id too
    if name == "id" or name.endswith("_id"):
        return ["sandboxes", "containers"]
    return None


def scalar(f: FD, parent: pbd.Descriptor, pools: Pools) -> st.SearchStrategy:
    t = f.type
    if t in _RANGES:
        lo, hi = _RANGES[t]
        return st.one_of(st.sampled_from([v for v in INT_EDGES if lo <= v <= hi]), st.integers(lo, hi))
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=64 if t == FD.TYPE_DOUBLE else 32)
    if t == FD.TYPE_ENUM:
        known = [v.number for v in f.enum_type.values]
        return st.one_of(st.sampled_from(known), st.sampled_from([-1, max(known) + 1, 2**31 - 1, -2**31]))
    if t == FD.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"\x00", b"\xff" * 1024]))
    if t == FD.TYPE_STRING:
        kinds = _id_kinds(f, parent)
        return pools.ids(kinds) if kinds else hostile_strings()
    raise AssertionError(f"unhandled field type {t} of {parent.full_name}.{f.name}")


def _is_map(f: FD) -> bool:
    return f.type == FD.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


def _is_repeated(f: FD) -> bool:
    return f.is_repeated


def messages(desc: pbd.Descriptor, pools: Pools, depth: int = 0) -> st.SearchStrategy[Message]:
    """A message of type `desc` with a random subset of its fields set to fuzzed values."""
    cls = api_pb2_message_class(desc)
    if depth > MAX_DEPTH:
        return st.just(cls())
    parts = {f.name: st.one_of(st.none(), field_values(f, desc, pools, depth)) for f in desc.fields}

    def build(values: dict) -> Message:
        msg = cls()
        for f in desc.fields:
            if values[f.name] is not None:
                assign(msg, f, values[f.name])
        return msg

    return st.fixed_dictionaries(parts).map(build)


def field_values(f: FD, parent: pbd.Descriptor, pools: Pools, depth: int) -> st.SearchStrategy:
    if _is_map(f):
        kf, vf = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
        if f.name == "annotations" and vf.type == FD.TYPE_STRING:
            return st.dictionaries(annotation_keys(), annotation_values(), max_size=4)
        return st.dictionaries(one_value(kf, f.message_type, pools, depth), one_value(vf, f.message_type, pools,
                                                                                     depth), max_size=4)
    if _is_repeated(f):
        return st.lists(one_value(f, parent, pools, depth), max_size=3)
    return one_value(f, parent, pools, depth)


def one_value(f: FD, parent: pbd.Descriptor, pools: Pools, depth: int) -> st.SearchStrategy:
    if f.type == FD.TYPE_MESSAGE:
        return st.deferred(lambda: messages(f.message_type, pools, depth + 1))
    return scalar(f, parent, pools)


def assign(msg: Message, f: FD, value) -> None:
    """Set one field (scalar, message, repeated or map) of msg."""
    if _is_map(f):
        target = getattr(msg, f.name)
        value_is_msg = f.message_type.fields_by_name["value"].type == FD.TYPE_MESSAGE
        for k, v in value.items():
            if value_is_msg:
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif _is_repeated(f):
        target = getattr(msg, f.name)
        del target[:]
        if f.type == FD.TYPE_MESSAGE:
            for v in value:
                target.add().CopyFrom(v)
        else:
            target.extend(value)
    elif f.type == FD.TYPE_MESSAGE:
        getattr(msg, f.name).CopyFrom(value)
    else:
        setattr(msg, f.name, value)


def api_pb2_message_class(desc: pbd.Descriptor):
    return message_factory.GetMessageClass(desc)


# ---------------------------------------------------------------- one field mutated


def field_paths(desc: pbd.Descriptor, depth: int = 0, seen: tuple = ()) -> list[tuple[FD, ...]]:
    """Every field reachable from desc (bounded depth, no recursion through a type twice)."""
    out = []
    for f in desc.fields:
        out.append((f,))
        if f.type == FD.TYPE_MESSAGE and not _is_map(f) and not _is_repeated(f) and depth < MAX_DEPTH \
                and f.message_type.full_name not in seen:
            out += [(f, *rest) for rest in field_paths(f.message_type, depth + 1, seen + (desc.full_name,))]
    return out


def path_name(path: tuple[FD, ...]) -> str:
    return ".".join(f.name for f in path)


@st.composite
def mutations(draw, base: Message, pools: Pools, paths: list[tuple[FD, ...]] | None = None):
    """(request, "a.b.c") — `base` with the field at one path replaced (or, for maps/lists, extended)."""
    paths = paths or field_paths(base.DESCRIPTOR)
    path = draw(st.sampled_from(paths))
    msg = type(base)()
    msg.CopyFrom(base)
    parent = msg
    for f in path[:-1]:
        parent = getattr(parent, f.name)  # reading a sub-message of a proto3 message makes it present on write
    leaf = path[-1]
    value = draw(field_values(leaf, parent.DESCRIPTOR, pools, len(path)))
    if _is_map(leaf) or _is_repeated(leaf):
        assign_extend(parent, leaf, value)
    else:
        assign(parent, leaf, value)
    return msg, path_name(path), value


def assign_extend(msg: Message, f: FD, value) -> None:
    """Add map entries / list items to what the valid request already has."""
    if _is_map(f):
        assign(msg, f, value)  # adds or overrides keys, keeps the rest
        return
    target = getattr(msg, f.name)
    if f.type == FD.TYPE_MESSAGE:
        for v in value:
            target.add().CopyFrom(v)
    else:
        target.extend(value)


# ---------------------------------------------------------------- the services


@dataclass(frozen=True)
class Rpc:
    service: str           # RuntimeService | ImageService
    name: str
    request: pbd.Descriptor
    streaming: bool

    @property
    def id(self) -> str:
        return f"{self.service}.{self.name}"


def rpcs() -> list[Rpc]:
    """Every RPC of every service in api.proto, from the file descriptor."""
    out = []
    for service in api_pb2.DESCRIPTOR.services_by_name.values():
        for m in service.methods:
            assert not m.client_streaming, f"{m.full_name}: client streaming is not handled"
            out.append(Rpc(service.name, m.name, m.input_type, m.server_streaming))
    return out


def stub_method(client, rpc: Rpc):
    stub = {"RuntimeService": client.runtime, "ImageService": client.images}[rpc.service]
    return getattr(stub, rpc.name)


assert {s for s in api_pb2.DESCRIPTOR.services_by_name} <= {"RuntimeService", "ImageService"}, \
    "a new service in api.proto: give stub_method() its stub"
assert api_pb2_grpc  # the stubs the client uses come from the same generated module
