"""A VM's disks and volumes → the pod's volumes, mounts, devices and `vmlet.dev/disks`; claim templates → PVCs.

Pure: no API calls. docs/storage.md is the contract with the node; per disk, by its volume's source:

| volume | pod | `vmlet.dev/disks` entry |
| --- | --- | --- |
| persistentVolumeClaim, Filesystem | volume + volumeMount at /vmlet/disks/<disk> | `volume:` (+ `capacity`) |
| persistentVolumeClaim, Block | volume + volumeDevice at /dev/vmlet/<disk> | `device:` |
| emptyDisk | nothing | `emptyDisk: {capacity}` |
| configMap, secret | volume + read-only volumeMount at /vmlet/config/<disk> | `configVolume:` |

A configMap/secret volume that is one of `domain.filesystems` instead is mounted read-only at its
`mountPath`; the node shares every such directory over virtio-fs and cloud-init mounts it at the same
path in the guest.

Two steps, because the claims decide part of the pod: `plan(spec, vm_name)` checks everything the spec
alone can tell (names, references, one root, what may be combined) and lists the claims the pod needs;
the controller reads them, creating the ones `volumeClaimTemplates` make (`claim_manifest`); `render(plan,
claims)` then makes the pod's parts — a Block claim is a device, a Filesystem claim a mount holding
disk.img, whose capacity is the claim's requested storage less KubeVirt's 5.5% file system overhead.
`report(plan, claims)` is what `status.volumeStatus` says about them.
"""

from __future__ import annotations

import dataclasses
import json
from fractions import Fraction
from typing import Any, Mapping

from cri_shim import annotations as va
from cri_shim.cloudinit import CloudInitError, Mount
from cri_shim.storage import disk_spec
from vmapi import types
from vmapi.errors import ClaimsUnavailable, SpecError

T = "spec.template.spec"
DISK_DIR = "/vmlet/disks"
DEVICE_DIR = "/dev/vmlet"
CONFIG_DIR = "/vmlet/config"
RESERVED_DIRS = ("/vmlet", DEVICE_DIR)  # the disks' container paths: no filesystem may be mounted there
# KubeVirt's default file system overhead: disk.img leaves this share of a Filesystem claim free
# (the file system's own metadata, reserved blocks), or the guest fills a volume that cannot hold it.
FILESYSTEM_OVERHEAD = Fraction(55, 1000)
MIB = 1024 ** 2
# Where a guest with udev finds a disk by its serial (docs/storage.md, "Inside the guest").
BY_ID = {"virtio": "/dev/disk/by-id/virtio-{}", "scsi": "/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_{}",
         "sata": "/dev/disk/by-id/ata-QEMU_HARDDISK_{}"}
_KIND = {"persistentVolumeClaim": "a persistentVolumeClaim", "emptyDisk": "an emptyDisk",
         "configMap": "a configMap", "secret": "a secret"}


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def source_of(volume: types.Volume) -> str:
    return next(s for s in types.VOLUME_SOURCES if getattr(volume, s) is not None)


def claim_name(template: str, vm_name: str) -> str:
    """The claim a volumeClaimTemplate makes for a VM (a StatefulSet's <template>-<pod>)."""
    return f"{template}-{vm_name}"


@dataclasses.dataclass(frozen=True)
class ClaimRef:
    volume: str
    claim: str  # the claim's name in the VM's namespace
    template: int | None  # index into spec.volumeClaimTemplates when the controller makes it
    read_only: bool
    where: str  # the field that names it


@dataclasses.dataclass(frozen=True)
class DiskUse:
    name: str  # the disk's and its volume's
    where: str  # the field that makes it a disk
    volume: types.Volume
    volume_where: str
    disk: types.Disk | None  # None: the persistent root without a domain.disks entry
    root: bool = False


@dataclasses.dataclass(frozen=True)
class FilesystemUse:
    name: str
    where: str
    volume: types.Volume
    mount_path: str


@dataclasses.dataclass(frozen=True)
class Plan:
    vm_name: str
    spec: types.VirtualMachineSpec
    disks: tuple[DiskUse, ...]  # the root first, then domain.disks in order: the guest's order
    filesystems: tuple[FilesystemUse, ...]
    claims: tuple[ClaimRef, ...]

    def claim_of(self, volume: str) -> ClaimRef:
        return next(c for c in self.claims if c.volume == volume)


def plan(spec: types.VirtualMachineSpec, vm_name: str) -> Plan:
    """What the spec's disks, volumes and claim templates make; SpecError naming the field otherwise."""
    vmi = spec.template.spec
    dom = vmi.domain
    root = dom.rootDisk

    volumes: dict[str, tuple[int, types.Volume]] = {}
    for i, v in enumerate(vmi.volumes or []):
        at = f"{T}.volumes[{i}]"
        if v.name in volumes:
            raise SpecError(f"{at}.name: {v.name!r} is also volumes[{volumes[v.name][0]}]'s")
        sources = [s for s in types.VOLUME_SOURCES if getattr(v, s) is not None]
        if len(sources) != 1:
            raise SpecError(f"{at}: needs exactly one of {', '.join(types.VOLUME_SOURCES)}"
                            + (f", not {' and '.join(sources)}" if sources else ""))
        src = v.configMap or v.secret
        if src is not None:
            _check_items(f"{at}.{sources[0]}.items", src.items or [])
        volumes[v.name] = (i, v)

    templates: dict[str, int] = {}
    for i, t in enumerate(spec.volumeClaimTemplates or []):
        at = f"spec.volumeClaimTemplates[{i}]"
        if t.metadata.name in templates:
            raise SpecError(f"{at}.metadata.name: {t.metadata.name!r} is also volumeClaimTemplates"
                            f"[{templates[t.metadata.name]}]'s")
        request = _quantity(f"{at}.spec.resources.requests.storage", t.spec.resources.requests.storage)
        if request <= 0:
            raise SpecError(f"{at}.spec.resources.requests.storage: must be greater than zero")
        if t.spec.resources.limits is not None:
            limit = _quantity(f"{at}.spec.resources.limits.storage", t.spec.resources.limits.storage)
            if limit < request:
                raise SpecError(f"{at}.spec.resources.limits.storage: {t.spec.resources.limits.storage!r} is less "
                                f"than the request {t.spec.resources.requests.storage!r}")
        templates[t.metadata.name] = i

    claims: list[ClaimRef] = []
    claim_users: dict[str, str] = {}
    for name, (i, v) in volumes.items():
        if v.persistentVolumeClaim is None:
            continue
        where = f"{T}.volumes[{i}].persistentVolumeClaim.claimName"
        wanted = v.persistentVolumeClaim.claimName
        tindex = templates.get(wanted)
        actual = claim_name(wanted, vm_name) if tindex is not None else wanted
        if actual in claim_users:  # two disks on one disk.img (or device) would write over each other
            raise SpecError(f"{where}: claim {actual!r} is also {claim_users[actual]}'s; a claim is one disk")
        claim_users[actual] = f"volumes[{i}]"
        claims.append(ClaimRef(name, actual, tindex, v.persistentVolumeClaim.readOnly, where))
    for tname, ti in templates.items():
        if not any(c.template == ti for c in claims):
            raise SpecError(f"spec.volumeClaimTemplates[{ti}].metadata.name: {tname!r} is the claimName of no "
                            f"persistentVolumeClaim volume in {T}.volumes")

    used: dict[str, str] = {}  # volume -> the field using it
    listed: dict[str, tuple[int, types.Disk]] = {}
    seen: dict[tuple[str, Any], int] = {}
    for j, d in enumerate(dom.disks or []):
        at = f"{T}.domain.disks[{j}]"
        if d.name not in volumes:
            raise SpecError(f"{at}.name: {d.name!r} names no volume in {T}.volumes")
        for kind, value in (("name", d.name), ("serial", d.serial or disk_spec.default_serial(d.name)),
                            ("bootOrder", d.bootOrder)):
            if value is None:
                continue
            k = seen.setdefault((kind, value), j)
            if k != j:
                raise SpecError(f"{at}.{kind}: {value!r} is also disks[{k}]'s")
        listed[d.name] = (j, d)

    disks: list[DiskUse] = []
    if root.volume is None:
        for field, value in (("capacity", root.capacity), ("reimage", root.reimage)):
            if value:
                raise SpecError(f"{T}.domain.rootDisk.{field}: only a persistent root (rootDisk.volume) has "
                                + ("a capacity; the ephemeral root's size is rootDisk.size" if field == "capacity"
                                   else "an image to write over"))
    else:
        at = f"{T}.domain.rootDisk.volume"
        if root.volume not in volumes:
            raise SpecError(f"{at}: {root.volume!r} names no volume in {T}.volumes")
        i, v = volumes[root.volume]
        if v.persistentVolumeClaim is None:
            raise SpecError(f"{at}: volume {root.volume!r} is {_KIND[source_of(v)]} volume; a persistent root "
                            "needs a persistentVolumeClaim volume")
        if root.size:
            raise SpecError(f"{T}.domain.rootDisk.size: not with rootDisk.volume: a persistent root's size is its "
                            "claim's (VirtletRootVolumeSize sizes the ephemeral root)")
        if v.persistentVolumeClaim.readOnly:
            raise SpecError(f"{T}.volumes[{i}].persistentVolumeClaim.readOnly: the persistent root cannot be "
                            "read-only (the image is written onto it)")
        j, d = listed.get(root.volume, (None, None))
        if d is not None and d.readonly:
            raise SpecError(f"{T}.domain.disks[{j}].readonly: disk {d.name!r} is the persistent root, which "
                            "cannot be read-only (the image is written onto it)")
        where = f"{T}.domain.disks[{j}]" if d is not None else at
        disks.append(DiskUse(root.volume, where, v, f"{T}.volumes[{i}]", d, root=True))
        used[root.volume] = where
    for name, (j, d) in listed.items():
        if name == root.volume:
            continue
        i, v = volumes[name]
        disks.append(DiskUse(name, f"{T}.domain.disks[{j}]", v, f"{T}.volumes[{i}]", d))
        used[name] = f"{T}.domain.disks[{j}]"
    own = 1 if any(d.root for d in disks) else 2  # cloud-init, and the ephemeral root unless a volume is the root
    if len(disks) + own > types.NODE_MAX_DISKS:
        raise SpecError(f"{T}.domain.disks: {len(disks)} disks and the node's own {own} (cloud-init"
                        f"{'' if own == 1 else ', the ephemeral root'}) are more than the node's "
                        f"{types.NODE_MAX_DISKS}")

    filesystems: list[FilesystemUse] = []
    paths: dict[str, int] = {}
    for k, f in enumerate(dom.filesystems or []):
        at = f"{T}.domain.filesystems[{k}]"
        if f.name not in volumes:
            raise SpecError(f"{at}.name: {f.name!r} names no volume in {T}.volumes")
        if f.name in used:
            raise SpecError(f"{at}.name: volume {f.name!r} is used by {used[f.name]} already")
        i, v = volumes[f.name]
        if v.configMap is None and v.secret is None:
            raise SpecError(f"{at}.name: volume {f.name!r} is {_KIND[source_of(v)]} volume; only configMap and "
                            "secret volumes can be filesystems")
        path = f.mountPath
        try:  # the node's own rule for a shared directory's container path (= the guest's mount point)
            Mount(host_path="/", container_path=path, read_only=True)
        except CloudInitError as e:
            raise SpecError(f"{at}.mountPath: {_shown(path)}: {e}") from None
        for reserved in RESERVED_DIRS:
            if path == reserved or path.startswith(reserved + "/"):
                raise SpecError(f"{at}.mountPath: {_shown(path)} is under {reserved}, where vmlet puts the disks")
        if path in paths:
            raise SpecError(f"{at}.mountPath: {_shown(path)} is also filesystems[{paths[path]}]'s")
        paths[path] = k
        filesystems.append(FilesystemUse(f.name, at, v, path))
        used[f.name] = at

    for name, (i, v) in volumes.items():
        if name not in used:
            src = source_of(v)
            how = ("domain.disks[].name, or domain.filesystems[].name" if src in ("configMap", "secret")
                   else "domain.disks[].name or domain.rootDisk.volume")
            raise SpecError(f"{T}.volumes[{i}]: volume {name!r} is used by nothing (name it in {how})")
    return Plan(vm_name, spec, tuple(disks), tuple(filesystems), tuple(claims))


def _check_items(where: str, items: list[types.KeyToPath]) -> None:
    paths: dict[str, int] = {}
    for n, item in enumerate(items):
        parts = item.path.split("/")
        if ".." in parts or "" in parts:
            raise SpecError(f"{where}[{n}].path: {_shown(item.path)} must be a relative path without '..' or "
                            "empty components")
        if item.path in paths:
            raise SpecError(f"{where}[{n}].path: {_shown(item.path)} is also items[{paths[item.path]}]'s")
        paths[item.path] = n


def _quantity(where: str, value: Any) -> int:
    if not isinstance(value, str):
        raise SpecError(f"{where}: {_shown(value)} is not a quantity such as 10Gi")
    try:
        return va.parse_quantity(value.strip())
    except ValueError as e:
        raise SpecError(f"{where}: {e}") from None


# --- claims -----------------------------------------------------------------------------------------


def owner_reference(vm: Mapping[str, Any]) -> dict[str, Any]:
    """The claims' owner reference: not the controller (another controller, a volume populator, may be),
    blocking the VM's foreground deletion until the claim is gone."""
    meta = vm["metadata"]
    return {"apiVersion": types.API_VERSION, "kind": types.KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": False, "blockOwnerDeletion": True}


def retains(spec: types.VirtualMachineSpec) -> bool:
    policy = spec.persistentVolumeClaimRetentionPolicy
    return policy is not None and policy.whenDeleted == "Retain"


def claim_manifest(vm: Mapping[str, Any], plan_: Plan, ref: ClaimRef) -> dict[str, Any]:
    """The PVC a volumeClaimTemplate makes for this VM: labelled with the VM, owned by it unless the
    retention policy is Retain."""
    assert ref.template is not None
    t = (plan_.spec.volumeClaimTemplates or [])[ref.template]
    meta: dict[str, Any] = {"name": ref.claim, "namespace": vm["metadata"]["namespace"],
                            "labels": {**(t.metadata.labels or {}), types.LABEL_VM: plan_.vm_name}}
    if t.metadata.annotations:
        meta["annotations"] = dict(t.metadata.annotations)
    if not retains(plan_.spec):
        meta["ownerReferences"] = [owner_reference(vm)]
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta,
            "spec": t.spec.model_dump(mode="json", exclude_none=True)}


def _meta(obj: Any) -> dict[str, Any]:
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    return meta if isinstance(meta, dict) else {}


def _refs(meta: Mapping[str, Any]) -> list[Any]:
    refs = meta.get("ownerReferences")
    return refs if isinstance(refs, list) else []


def made_for(claim: Mapping[str, Any], vm_name: str) -> bool:
    """The controller made this claim for a VM of this name (it carries the VM label)."""
    labels = _meta(claim).get("labels")
    return isinstance(labels, Mapping) and labels.get(types.LABEL_VM) == vm_name


def owned_by_another_vm(claim: Mapping[str, Any], vm: Mapping[str, Any]) -> str | None:
    """The uid of another VirtualMachine owning the claim (a deleted VM of the same name, whose claims
    the garbage collector is about to delete); None otherwise."""
    uid = vm["metadata"].get("uid")
    for r in _refs(_meta(claim)):
        if isinstance(r, Mapping) and r.get("kind") == types.KIND and r.get("uid") != uid:
            return str(r.get("uid"))
    return None


def owner_patch(vm: Mapping[str, Any], plan_: Plan, claim: Mapping[str, Any]) -> dict[str, Any] | None:
    """The merge patch that makes a template claim's owner references follow the retention policy (as
    a StatefulSet does when its policy changes); None when they do, or for a claim the controller did
    not make (the user's own, or another VM's)."""
    meta = _meta(claim)
    if not made_for(claim, plan_.vm_name) or owned_by_another_vm(claim, vm):
        return None
    uid = vm["metadata"]["uid"]
    refs = _refs(meta)
    ours = [r for r in refs if isinstance(r, Mapping) and r.get("uid") == uid]
    want = not retains(plan_.spec)
    if want == bool(ours):
        return None
    others = [r for r in refs if not (isinstance(r, Mapping) and r.get("uid") == uid)]
    new = others + [owner_reference(vm)] if want else others
    patch: dict[str, Any] = {"ownerReferences": new or None}
    if isinstance(meta.get("resourceVersion"), str):  # a concurrent change makes it a 409, not a lost write
        patch["resourceVersion"] = meta["resourceVersion"]
    return {"metadata": patch}


def _unavailable(ref: ClaimRef, claim: Any, vm: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """(reason, message) when the pod cannot use the claim yet; None when it can."""
    if not isinstance(claim, Mapping):
        if ref.template is not None:
            return "PvcNotCreated", f"persistentvolumeclaim {ref.claim!r} is not created yet"
        return "PvcNotFound", f"persistentvolumeclaim {ref.claim!r} not found"
    if _meta(claim).get("deletionTimestamp"):
        return "PvcTerminating", f"persistentvolumeclaim {ref.claim!r} is being deleted"
    other = owned_by_another_vm(claim, vm) if ref.template is not None and vm is not None else None
    if other:
        return "PvcOwnedByAnotherVM", (f"persistentvolumeclaim {ref.claim!r} belongs to another VirtualMachine "
                                       f"(uid {other}), whose claims are deleted with it")
    return None


def _claim_spec(claim: Mapping[str, Any]) -> dict[str, Any]:
    spec = claim.get("spec")
    return spec if isinstance(spec, dict) else {}


def volume_mode(claim: Mapping[str, Any], where: str) -> str:
    mode = _claim_spec(claim).get("volumeMode")
    if mode is None:
        return "Filesystem"  # the API server's default
    if mode not in ("Filesystem", "Block"):
        raise SpecError(f"{where}: claim {_meta(claim).get('name')!r} has volumeMode {_shown(mode)}, not "
                        "Filesystem or Block")
    return mode


def requested_storage(claim: Mapping[str, Any]) -> Any:
    """spec.resources.requests.storage as the claim has it (any type: the caller judges it); None if absent."""
    resources = _claim_spec(claim).get("resources")
    requests = resources.get("requests") if isinstance(resources, Mapping) else None
    return requests.get("storage") if isinstance(requests, Mapping) else None


def disk_capacity(request_bytes: int) -> int:
    """disk.img's size on a Filesystem claim: the request less the file system overhead, whole MiB."""
    return int(request_bytes * (1 - FILESYSTEM_OVERHEAD)) // MIB * MIB


# --- the pod ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rendered:
    volumes: list[dict[str, Any]]
    mounts: list[dict[str, Any]]
    devices: list[dict[str, Any]]
    annotations: dict[str, str]  # vmlet.dev/disks, vmlet.dev/root-reimage


def render(plan_: Plan, claims: Mapping[str, Any], vm: Mapping[str, Any] | None = None) -> Rendered:
    """The pod's parts for the plan, given the claims by name (None or absent: not there).

    ClaimsUnavailable when a claim the pod needs cannot be used (yet); SpecError when a claim and the
    spec do not go together (rootDisk.capacity on a Block claim, a claim too small for a disk)."""
    waiting = tuple(r.claim for r in plan_.claims if _unavailable(r, claims.get(r.claim), vm))
    if waiting:
        raise ClaimsUnavailable(waiting)
    root = plan_.spec.template.spec.domain.rootDisk
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    devices: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    for use in plan_.disks:
        v, d = use.volume, use.disk
        entry: dict[str, Any] = {"name": use.name}
        readonly = bool(d and d.readonly)
        if v.persistentVolumeClaim is not None:
            ref = plan_.claim_of(use.name)
            claim = claims[ref.claim]
            readonly = readonly or ref.read_only
            volumes.append({"name": use.name, "persistentVolumeClaim": {
                "claimName": ref.claim, **({"readOnly": True} if ref.read_only else {})}})
            if volume_mode(claim, ref.where) == "Block":
                if use.root and root.capacity:
                    raise SpecError(f"{T}.domain.rootDisk.capacity: claim {ref.claim!r} is a Block volume, whose "
                                    "size is the device's")
                entry["device"] = f"{DEVICE_DIR}/{use.name}"
                devices.append({"name": use.name, "devicePath": entry["device"]})
            else:
                entry["volume"] = f"{DISK_DIR}/{use.name}"
                mounts.append({"name": use.name, "mountPath": entry["volume"], **({"readOnly": True} if readonly else {})})
                capacity = _capacity(use, ref, claim, root.capacity if use.root else None)
                if capacity is not None:
                    entry["capacity"] = capacity
        elif v.emptyDisk is not None:
            entry["emptyDisk"] = {"capacity": v.emptyDisk.capacity}
        else:
            entry["configVolume"] = f"{CONFIG_DIR}/{use.name}"
            volumes.append({"name": use.name, **_config_source(v)})
            mounts.append({"name": use.name, "mountPath": entry["configVolume"], "readOnly": True})
            readonly = False  # always read-only: the node says so itself
        if use.root:
            entry["root"] = True
        if d is not None:
            entry.update({k: val for k, val in (("bus", d.bus), ("bootOrder", d.bootOrder), ("serial", d.serial),
                                                ("cache", d.cache), ("io", d.io)) if val is not None})
        if readonly:
            entry["readonly"] = True
        entries.append(entry)
    for fs in plan_.filesystems:
        volumes.append({"name": fs.name, **_config_source(fs.volume)})
        mounts.append({"name": fs.name, "mountPath": fs.mount_path, "readOnly": True})

    _check_entries(plan_, entries)
    annotations: dict[str, str] = {}
    if entries:
        annotations[disk_spec.DISKS] = json.dumps(entries, separators=(",", ":"))
    if root.reimage:
        annotations[disk_spec.ROOT_REIMAGE] = "true"
    return Rendered(volumes, mounts, devices, annotations)


def _capacity(use: DiskUse, ref: ClaimRef, claim: Mapping[str, Any], given: str | None) -> str | None:
    raw = requested_storage(claim)
    request = None
    if raw is not None:
        try:
            request = va.parse_quantity(raw.strip()) if isinstance(raw, str) else None
        except ValueError:
            pass
        if request is None:
            raise SpecError(f"{ref.where}: claim {ref.claim!r} requests {_shown(raw)}, which is not a quantity")
    if given is not None:
        size = _quantity(f"{T}.domain.rootDisk.capacity", given)
        if request is not None and size > request:
            raise SpecError(f"{T}.domain.rootDisk.capacity: {given!r} is more than claim {ref.claim!r} "
                            f"requests ({raw!r})")
        capacity = given
    elif request is None:
        return None  # the node's default: 94.5% of the volume's file system
    else:
        size = disk_capacity(request)
        if size <= 0:
            raise SpecError(f"{use.where}: claim {ref.claim!r} requests {raw!r}, less than 1Mi once the "
                            f"{float(FILESYSTEM_OVERHEAD):.1%} file system overhead is left free")
        capacity = f"{size // MIB}Mi"
    if size > va.MAX_ROOT_VOLUME_SIZE:
        raise SpecError(f"{use.where}: a {capacity} disk on claim {ref.claim!r} is over the node's limit of "
                        f"{va.MAX_ROOT_VOLUME_SIZE // 1024 ** 4}Ti")
    return capacity


def _config_source(v: types.Volume) -> dict[str, Any]:
    if v.configMap is not None:
        return {"configMap": v.configMap.model_dump(mode="json", exclude_none=True)}
    assert v.secret is not None
    return {"secret": v.secret.model_dump(mode="json", exclude_none=True)}


def _check_entries(plan_: Plan, entries: list[dict[str, Any]]) -> None:
    """The node's own parser on the entries; its `[i].field` becomes the spec field that made entry i."""
    try:
        disk_spec.parse_entries(entries, va.parse_quantity, va.MAX_ROOT_VOLUME_SIZE)
    except disk_spec.DiskSpecError as e:
        where, _, message = str(e).partition(": ")  # "[i].field", or "" for the list as a whole
        head, _, field = where.partition("]")
        index = head[1:] if head.startswith("[") else ""
        use = plan_.disks[int(index)] if index.isdigit() and int(index) < len(plan_.disks) else None
        at = use.where + field if use is not None else f"{T}.domain.disks"
        raise SpecError(f"{at}: {message} (pod annotation {disk_spec.DISKS}{where})") from None


# --- status -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Report:
    statuses: list[dict[str, Any]]  # status.volumeStatus
    missing: tuple[str, ...] = ()  # claims that do not exist and no template makes: ErrorPvcNotFound
    waiting: tuple[str, ...] = ()  # claims that exist or will, but cannot be used yet
    pending: tuple[str, ...] = ()  # claims not bound yet: WaitingForVolumeBinding

    @property
    def unavailable(self) -> tuple[str, ...]:
        return self.missing + self.waiting

    def blocking_message(self) -> str:
        """Why the pod waits for claims (for a condition), from the volume statuses."""
        names = set(self.unavailable)
        return "; ".join(s["message"] for s in self.statuses
                         if (s.get("persistentVolumeClaimInfo") or {}).get("claimName") in names and s.get("message"))


def report(plan_: Plan, claims: Mapping[str, Any], vm: Mapping[str, Any] | None = None) -> Report:
    """status.volumeStatus (KubeVirt's VMI volumeStatus) and the claims that hold the pod back."""
    dom = plan_.spec.template.spec.domain
    statuses: list[dict[str, Any]] = []
    missing: list[str] = []
    waiting: list[str] = []
    pending: list[str] = []
    for use in plan_.disks:
        serial = (use.disk.serial if use.disk else None) or disk_spec.default_serial(use.name)
        bus = (use.disk.bus if use.disk else None) or dom.rootDisk.bus
        st: dict[str, Any] = {"name": use.name, "target": BY_ID[bus].format(serial)}
        if use.volume.persistentVolumeClaim is not None:
            ref = plan_.claim_of(use.name)
            claim = claims.get(ref.claim)
            problem = _unavailable(ref, claim, vm)
            if problem is not None:
                (missing if problem[0] == "PvcNotFound" else waiting).append(ref.claim)
                st.update(phase="Pending", reason=problem[0], message=problem[1])
            else:
                cst = claim.get("status")
                phase = cst.get("phase") if isinstance(cst, Mapping) else None
                phase = phase if isinstance(phase, str) and phase else "Pending"  # a new claim has no status yet
                st["phase"] = phase
                if phase == "Pending":
                    pending.append(ref.claim)
                    st.update(reason="WaitingForVolumeBinding",
                              message=f"persistentvolumeclaim {ref.claim!r} is not bound to a volume yet")
                elif phase == "Lost":
                    st.update(reason="ClaimLost", message=f"persistentvolumeclaim {ref.claim!r} lost its volume")
            st["persistentVolumeClaimInfo"] = _claim_info(ref, claim if isinstance(claim, Mapping) else None)
        statuses.append(st)
    for fs in plan_.filesystems:
        statuses.append({"name": fs.name, "target": fs.mount_path})
    return Report(statuses, tuple(missing), tuple(waiting), tuple(pending))


def _strings(value: Any) -> dict[str, str] | None:
    if not isinstance(value, Mapping):
        return None
    out = {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}
    return out or None


def _claim_info(ref: ClaimRef, claim: Mapping[str, Any] | None) -> dict[str, Any]:
    info: dict[str, Any] = {"claimName": ref.claim}
    if claim is None:
        return info
    spec = _claim_spec(claim)
    status = claim.get("status") if isinstance(claim.get("status"), Mapping) else {}
    mode = spec.get("volumeMode") or "Filesystem"
    if isinstance(mode, str):
        info["volumeMode"] = mode
    modes = status.get("accessModes") or spec.get("accessModes")
    if isinstance(modes, list) and all(isinstance(m, str) for m in modes) and modes:
        info["accessModes"] = list(modes)
    if (capacity := _strings(status.get("capacity"))) is not None:
        info["capacity"] = capacity
    resources = spec.get("resources")
    if (requests := _strings(resources.get("requests") if isinstance(resources, Mapping) else None)) is not None:
        info["requests"] = requests
    if mode == "Filesystem":
        info["filesystemOverhead"] = str(float(FILESYSTEM_OVERHEAD))
    return info
