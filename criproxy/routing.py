"""Pure routing decisions: which backend a request goes to, ID prefixes, image names, list filters.

Nothing here does I/O. The proxy keeps no state: every decision comes from the
request itself.

- Pods: RunPodSandbox goes to the backend named by the pod annotation
  `kubernetes.io/target-runtime` (e.g. `virtlet.cloud`), else to the default backend.
- Object IDs (pod sandbox and container IDs) returned by a non-default backend are
  prefixed `<backend>__`; a request carrying a prefixed ID goes to that backend with
  the prefix removed. Unprefixed IDs belong to the default backend.
- Images: a name starting with `<backend>/` (e.g. `virtlet.cloud/cirros`) goes to that
  backend. Image IDs and refs of a non-default backend that are not already such a
  name (e.g. `sha256:...`) are prefixed `<backend>__` as object IDs are, so that
  RemoveImage/ImageStatus by ID (the kubelet's image GC) reach the right backend.

Which fields are IDs is derived once per message type from the proto descriptor
(see `IdFields`), so new CRI messages carrying `pod_sandbox_id`/`container_id`
are handled without code changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from criproxy.messages import cap_message

TARGET_RUNTIME_ANNOTATION = "kubernetes.io/target-runtime"
SEP = "__"

# Field kinds
OBJ = "obj"   # pod sandbox / container ID
IMG = "img"   # image ID or reference


# ---------------------------------------------------------------- backends and prefixes

@dataclass(frozen=True)
class Routes:
    """The backends by name; `default` gets everything not claimed by another."""
    default: str
    others: tuple[str, ...]

    def __post_init__(self):
        names = (self.default, *self.others)
        if len(set(names)) != len(names):
            raise ValueError(f"backend names must be unique: {names}")
        for n in names:
            if not n or SEP in n or "/" in n:
                raise ValueError(f"bad backend name {n!r}: must be non-empty, without {SEP!r} or '/'")

    @property
    def all(self) -> tuple[str, ...]:
        return (self.default, *self.others)

    # -- object IDs

    def split_id(self, value: str) -> tuple[str, str]:
        """`virtlet.cloud__abc` -> ("virtlet.cloud", "abc"); unprefixed -> (default, value)."""
        head, sep, rest = value.partition(SEP)
        if sep and head in self.others:
            return head, rest
        return self.default, value

    def add_prefix(self, backend: str, value: str) -> str:
        if backend == self.default or not value:
            return value
        return f"{backend}{SEP}{value}"

    # -- images

    def image_backend(self, image: str) -> tuple[str, str]:
        """Route an image name or ID: (backend, the image as that backend knows it)."""
        for name in self.others:
            if image.startswith(name + "/"):
                return name, image
        return self.split_id(image)

    def add_image_prefix(self, backend: str, value: str) -> str:
        if backend == self.default or not value or value.startswith(backend + "/"):
            return value
        return f"{backend}{SEP}{value}"

    # -- pods

    def sandbox_backend(self, annotations: dict[str, str] | None) -> str:
        """The backend for a new pod; raises UnknownRuntime for an annotation naming no backend."""
        target = (annotations or {}).get(TARGET_RUNTIME_ANNOTATION, "")
        if not target or target == self.default:
            return self.default
        if target in self.others:
            return target
        shown = cap_message(repr(target), 300)  # the annotation may be 64 KiB: the message stays readable
        raise UnknownRuntime(f"pod annotation {TARGET_RUNTIME_ANNOTATION}={shown} names no configured runtime "
                             f"(configured: {', '.join(self.all)})")


class UnknownRuntime(ValueError):
    pass


# ---------------------------------------------------------------- which fields are IDs

def _is_repeated(f: FieldDescriptor) -> bool:
    flag = getattr(f, "is_repeated", None)  # protobuf >= 5.29; `label` is gone in 7
    if flag is not None:
        return bool(flag)
    return f.label == FieldDescriptor.LABEL_REPEATED


class IdFields:
    """Per message type: the string fields that hold object IDs or image refs, and the
    sub-message fields that (transitively) contain any. Derived from the descriptor."""

    OBJ_NAMES = frozenset({"pod_sandbox_id", "container_id"})
    IMG_NAMES = frozenset({"image_ref", "image_id"})

    def __init__(self) -> None:
        self._plans: dict[str, tuple] = {}

    def plan(self, desc: Descriptor) -> tuple:
        """((field_name, kind, is_repeated, sub_descriptor|None), ...); empty when nothing to touch."""
        cached = self._plans.get(desc.full_name)
        if cached is not None:
            return cached
        self._plans[desc.full_name] = ()  # cycle guard
        plan = []
        for f in desc.fields:
            repeated = _is_repeated(f)
            if f.type == FieldDescriptor.TYPE_STRING:
                kind = self._string_kind(desc, f)
                if kind:
                    plan.append((f.name, kind, repeated, None))
            elif f.type == FieldDescriptor.TYPE_MESSAGE:
                sub = f.message_type
                if sub.GetOptions().map_entry:
                    continue  # labels, annotations, info: no IDs
                if self.plan(sub):
                    plan.append((f.name, "msg", repeated, sub))
        result = tuple(plan)
        self._plans[desc.full_name] = result
        return result

    @classmethod
    def _string_kind(cls, desc: Descriptor, f: FieldDescriptor) -> str | None:
        if f.name in cls.OBJ_NAMES:
            return OBJ
        if f.name in cls.IMG_NAMES:
            return IMG
        if f.name == "id":
            return IMG if desc.name == "Image" else OBJ
        if desc.name == "ImageSpec" and f.name == "image":
            return IMG
        return None


ID_FIELDS = IdFields()


def rewrite_ids(msg, obj: Callable[[str], str], img: Callable[[str], str]) -> None:
    """Apply obj() to every object-ID field and img() to every image-ref field of msg, in place.
    Fields that are not set are left unset (no presence is created)."""
    for name, kind, repeated, sub in ID_FIELDS.plan(msg.DESCRIPTOR):
        if kind == "msg":
            if repeated:
                for item in getattr(msg, name):
                    rewrite_ids(item, obj, img)
            elif msg.HasField(name):
                rewrite_ids(getattr(msg, name), obj, img)
            continue
        fn = obj if kind == OBJ else img
        if repeated:
            values = getattr(msg, name)
            values[:] = [fn(v) for v in values]
        else:
            value = getattr(msg, name)
            if value:
                new = fn(value)
                if new != value:
                    setattr(msg, name, new)


def has_id_fields(desc: Descriptor) -> bool:
    return bool(ID_FIELDS.plan(desc))


def add_prefixes(routes: Routes, backend: str, msg) -> None:
    """A response from `backend`: prefix its IDs (no-op for the default backend)."""
    if backend == routes.default:
        return
    rewrite_ids(msg, lambda v: routes.add_prefix(backend, v), lambda v: routes.add_image_prefix(backend, v))


def strip_prefixes(routes: Routes, backend: str, msg) -> None:
    """A request going to `backend`: remove `<backend>__` from its IDs and image refs."""
    if backend == routes.default:
        return
    prefix = backend + SEP

    def strip(v: str) -> str:
        return v[len(prefix):] if v.startswith(prefix) else v

    rewrite_ids(msg, strip, strip)


def foreign_markers(routes: Routes) -> tuple[bytes, ...]:
    """Byte strings without which no value in a serialized message can route to a non-default backend: a
    default backend's answer containing none of them is passed on without being decoded."""
    return tuple(m for o in routes.others for m in (f"{o}{SEP}".encode(), f"{o}/".encode()))


def foreign_ids(routes: Routes, msg) -> list[str]:
    """The ID values in a default backend's message that the kubelet, sending them back, would reach
    another backend with (`virtlet.cloud__x`, an image `virtlet.cloud/x`): the proxy cannot hand them out."""
    bad: list[str] = []

    def obj(v: str) -> str:
        if routes.split_id(v)[0] != routes.default:
            bad.append(v)
        return v

    def img(v: str) -> str:
        if routes.image_backend(v)[0] != routes.default:
            bad.append(v)
        return v

    rewrite_ids(msg, obj, img)
    return bad


def drop_foreign_items(routes: Routes, msg) -> list[str]:
    """A default backend's list answer: remove the items (elements of its top-level repeated fields) that
    carry a foreign ID; returns those IDs. IDs outside such items are left for foreign_ids()."""
    bad: list[str] = []
    for name, kind, repeated, _ in ID_FIELDS.plan(msg.DESCRIPTOR):
        if kind != "msg" or not repeated:
            continue
        items = getattr(msg, name)
        for i in reversed(range(len(items))):
            found = foreign_ids(routes, items[i])
            if found:
                bad += found
                del items[i]
    return bad


# ---------------------------------------------------------------- requests routed by one ID

def request_route_field(desc: Descriptor) -> str | None:
    """The top-level field that routes a request (`pod_sandbox_id` or `container_id`), if any."""
    names = {f.name for f in desc.fields if f.type == FieldDescriptor.TYPE_STRING}
    for name in ("container_id", "pod_sandbox_id"):
        if name in names:
            return name
    return None


# ---------------------------------------------------------------- list filters

FILTER_ID_FIELDS = ("id", "pod_sandbox_id")


def plan_list(routes: Routes, ids: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    """Fan-out plan for a list call whose filter carries the given non-empty ID fields.

    Returns [(backend, {field: id as that backend knows it})]: every backend when no
    ID is given; only the owner of the IDs otherwise (none when the IDs belong to
    different backends: nothing can match both).
    """
    if not ids:
        return [(b, {}) for b in routes.all]
    owners = {field: routes.split_id(value) for field, value in ids.items()}
    backends = {b for b, _ in owners.values()}
    if len(backends) != 1:
        return []
    (backend,) = backends
    return [(backend, {field: stripped for field, (_, stripped) in owners.items()})]


def filter_ids(filter_msg) -> dict[str, str]:
    return {f: getattr(filter_msg, f) for f in FILTER_ID_FIELDS
            if f in filter_msg.DESCRIPTOR.fields_by_name and getattr(filter_msg, f)}


def image_filter_backends(routes: Routes, image: str) -> list[tuple[str, str]]:
    """ListImages: a filter naming an image goes to its backend only; no filter goes everywhere."""
    if not image:
        return [(b, "") for b in routes.all]
    return [routes.image_backend(image)]


def parse_backends(specs: Iterable[str]) -> list[tuple[str, str]]:
    """`name=socket` strings -> [(name, socket)]; the socket may be given as unix://path."""
    out = []
    for spec in specs:
        name, sep, socket = spec.partition("=")
        if not sep or not name or not socket:
            raise ValueError(f"backend {spec!r}: expected NAME=SOCKET (e.g. virtlet.cloud=/run/vmlet/vmlet.sock)")
        out.append((name.strip(), socket.strip().removeprefix("unix://")))
    return out
