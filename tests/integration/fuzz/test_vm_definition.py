"""Values that end up in the VM's definition (domain XML, libvirt metadata, cloud-init, paths), fuzzed on purpose.

The one-field mutations pick among every field of a request, so the few that reach
libvirt get few examples. Here every example changes one of them, with the values
that broke runtimes before: characters XML 1.0 cannot carry (U+FFFE/U+FFFF, C0/C1
controls) inside otherwise ordinary text, and integers at libvirt's edges. The pod is
run, its container created and its status read: a value accepted by RunPodSandbox
must not make CreateContainer fail with INTERNAL (issue #12 defect 5), and a refusal
must name the field.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto.runtime.v1 import api_pb2

from . import calls
from .conftest import RPCS as R, examples
from .protofuzz import INT_EDGES, _is_repeated
from .test_mutations import names_what_was_wrong

pytestmark = pytest.mark.libvirt

XML_INVALID = ["\ufffe", "\uffff", "\x01", "\x08", "\x0b", "\x0c", "\x1b", "\x1f", "\x7f", "\x85", "\x9f"]
# Where the pod's and the container's strings go: names into libvirt metadata and cloud-init, paths onto the host.
POD_STRINGS = ["metadata.name", "metadata.namespace", "metadata.uid", "hostname", "log_directory"]
CONTAINER_STRINGS = ["metadata.name", "image.image", "log_path", "mounts.container_path", "envs.key", "envs.value"]
CONTAINER_INTS = ["linux.resources.cpu_period", "linux.resources.cpu_quota", "linux.resources.memory_limit_in_bytes",
                  "linux.resources.cpu_shares"]
LIBVIRT_EDGES = [999, 1000, 1000000, 1000001, 2**44 - 1, 2**44, 17592186044415, 2**62, 2**63 - 1, -2**63,
                 64 * 2**20 - 1, 64 * 2**20, 2**40]


def _text(marker: str, pre: str, post: str) -> str:
    return pre + marker + post


def hostile_text():
    word = st.text("abcdefghij-", min_size=1, max_size=8)
    return st.builds(_text, st.sampled_from(XML_INVALID), word, word)


def _set(msg, path: str, value) -> None:
    *parents, leaf = path.split(".")
    for name in parents:
        if _is_repeated(msg.DESCRIPTOR.fields_by_name[name]):
            items = getattr(msg, name)
            msg = items[0] if len(items) else items.add()
        else:
            msg = getattr(msg, name)
    if leaf == "log_directory" and isinstance(value, str):
        value = "/tmp/vmlet-fuzz-logs/" + value  # absolute: the relative ones are a different refusal
    if leaf == "container_path" and isinstance(value, str):
        value = "/data/" + value
    setattr(msg, leaf, value)


def create_then_status(create: api_pb2.CreateContainerRequest):
    """The kubelet's next steps after a RunPodSandbox: CreateContainer in the new sandbox, then its status."""
    def follow(answer):
        if answer.rpc.name == "RunPodSandbox" and answer.code == calls.OK:
            create.pod_sandbox_id = answer.response.pod_sandbox_id
            return [(R["CreateContainer"], create)]
        if answer.rpc.name == "CreateContainer" and answer.code == calls.OK:
            return [(R["ContainerStatus"], api_pb2.ContainerStatusRequest(
                container_id=answer.response.container_id, verbose=True))]
        return []
    return follow


@st.composite
def vm_definition_change(draw):
    side = draw(st.sampled_from(["pod", "container", "resources"]))
    if side == "pod":
        return "config." + draw(st.sampled_from(POD_STRINGS)), draw(hostile_text()), True
    if side == "container":
        return "config." + draw(st.sampled_from(CONTAINER_STRINGS)), draw(hostile_text()), False
    value = draw(st.sampled_from(LIBVIRT_EDGES + [v for v in INT_EDGES if -2**63 <= v < 2**63]))
    return "config." + draw(st.sampled_from(CONTAINER_INTS)), value, False


@settings(max_examples=examples(30))
@given(change=vm_definition_change())
def test_values_that_reach_the_vm_definition(fuzzer, change):
    path, value, on_pod = change
    live = fuzzer.live
    pod = live.pod_config()
    container = live.container_config()
    if path.startswith("config.mounts"):
        container.mounts.add(host_path=str(live.log_dir / "fuzz-volume"))
    run = api_pb2.RunPodSandboxRequest(config=pod)
    create = api_pb2.CreateContainerRequest(config=container, sandbox_config=pod)
    if on_pod:
        _set(run, path, value)
        create.sandbox_config.CopyFrom(run.config)
    else:
        _set(create, path, value)

    follow = create_then_status(create)

    def named(rpc, request, answer):
        mine = (rpc.name == "RunPodSandbox") == on_pod and rpc.name in ("RunPodSandbox", "CreateContainer")
        return names_what_was_wrong(rpc, request, answer, path, value) if mine else []

    fuzzer.check([(R["RunPodSandbox"], run)], follow=follow, extra=named)


# ------------------------------------------------------------------ the pod's disks (vmlet.dev/disks + devices)

DISK_PATHS = ["/vmlet/v0", "/vmlet/v1", "/vmlet/cfg", "/dev/d0", "/dev/d1", "/nowhere", "relative", "/vmlet/v0/"]
DISK_VALUES = {
    "bus": ["virtio", "scsi", "sata", "SCSI", "ide", "", 3],
    "cache": ["none", "writeback", "unsafe", "directsync", "bogus"],
    "io": ["native", "threads", "io_uring", "aio"],
    "bootOrder": [1, 2, 0, -1, 1001, "2", True],
    "readonly": [True, False, "true", "maybe"],
    "root": [True, False, "TRUE", 1],
    "serial": ["s1", "s2", "a" * 21, "bad serial", "\x01"],
    "capacity": ["1Mi", "16Mi", "1Pi", "0", "-1Mi", "1.5", "lots", 1048576],
}


@st.composite
def disk_entry(draw):
    entry = {"name": draw(st.sampled_from(["a", "b", "data", "root", "-bad", "x" * 64])
                          | hostile_text())}
    for source in draw(st.lists(st.sampled_from(["volume", "device", "configVolume", "emptyDisk"]),
                                min_size=0, max_size=2, unique=True)):
        if source == "emptyDisk":
            entry[source] = draw(st.sampled_from([{"capacity": "8Mi"}, {"capacity": "1Pi"}, {"capacity": "x"}, {},
                                                  "8Mi", {"capacity": "8Mi", "more": 1}]))
        else:
            entry[source] = draw(st.sampled_from(DISK_PATHS) | hostile_text())
    for key in draw(st.lists(st.sampled_from(sorted(DISK_VALUES)), max_size=3, unique=True)):
        entry[key] = draw(st.sampled_from(DISK_VALUES[key]))
    if draw(st.booleans()):
        entry[draw(st.sampled_from(["bogus", "Bus", "size"]))] = "x"
    return entry


@st.composite
def disks_request(draw):
    import yaml
    entries = draw(st.lists(disk_entry(), max_size=4))
    text = draw(st.sampled_from(["yaml", "yaml", "yaml", "garbage"]))
    annotation = yaml.safe_dump(entries) if text == "yaml" else draw(st.sampled_from(
        ["{", "- [", "not a list", "- 1\n- 2", "&a [*a]", "- name: a\n  volume: /vmlet/v0\n" * 40]))
    devices = draw(st.lists(st.tuples(st.sampled_from(["/dev/d0", "/dev/d1", "/dev/d0", "rel", "/dev/a b", "/dev/x/"]),
                                      st.sampled_from(["loop", "loop", "/dev/null", "file", "missing", "relative",
                                                       "dir"]),
                                      st.sampled_from(["rw", "r", "mrw", "", "w", "rwx"])), max_size=2))
    extra = draw(st.sampled_from([{}, {}, {"VirtletRootVolumeSize": "1Gi"}, {"vmlet.dev/root-reimage": "true"},
                                  {"VirtletDiskDriver": "scsi"}]))
    return annotation, devices, extra


def _disk_fields_named(rpc, request, answer) -> list[str]:
    if rpc.name != "CreateContainer" or answer.code != calls.IA:
        return []
    if any(n in answer.details for n in ("vmlet.dev/disks", "config.devices", "config.mounts",
                                         "VirtletRootVolumeSize", "VirtletDiskDriver")):
        return []
    return [f"CreateContainer: INVALID_ARGUMENT for a disk does not name the field: {answer.details[:300]!r}"]


@pytest.fixture(scope="module")
def fuzz_loop(work_root):
    """A real block device for the accepted-device paths (a loop device on a sparse file, detached after)."""
    from tests.support import storage
    backing = work_root / f"fuzz-loop-{os.getpid()}.img"
    dev = storage.attach_loop(backing, 16 * 1024 * 1024)
    try:
        yield dev
    finally:
        storage.detach_loop(dev)
        backing.unlink(missing_ok=True)


@settings(max_examples=examples(30))
@given(req=disks_request())
def test_disks_of_the_pod(fuzzer, fuzz_loop, req):
    """Random `vmlet.dev/disks` entries against random mounts and devices: every refusal names its field,
    nothing answers INTERNAL, and whatever is accepted is a VM whose status can be read (and nothing leaks:
    the fuzzer's host watch covers domains, mounts and files)."""
    annotation, devices, extra = req
    live = fuzzer.live
    base = live.log_dir / "fuzz-disks"
    for d in ("v0", "v1", "cfg", "dir"):
        (base / d).mkdir(parents=True, exist_ok=True)
    (base / "cfg" / "key").write_text("value\n")
    (base / "file").write_bytes(b"\0" * 4096)
    pod = live.pod_config()
    pod.annotations.update({"vmlet.dev/disks": annotation, **extra})
    container = live.container_config()
    for name in ("v0", "v1", "cfg"):
        container.mounts.add(container_path=f"/vmlet/{name}", host_path=str(base / name), readonly=name == "cfg")
    hosts = {"/dev/null": "/dev/null", "file": str(base / "file"), "missing": str(base / "missing"),
             "relative": "relative/dev", "dir": str(base / "dir"), "loop": str(fuzz_loop)}
    for cpath, host, perms in devices:
        container.devices.add(container_path=cpath, host_path=hosts[host], permissions=perms)
    run = api_pb2.RunPodSandboxRequest(config=pod)
    create = api_pb2.CreateContainerRequest(config=container, sandbox_config=pod)

    follow = create_then_status(create)

    fuzzer.check([(R["RunPodSandbox"], run)], follow=follow, extra=_disk_fields_named)
