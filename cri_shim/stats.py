"""Container and pod sandbox stats, and the metrics the kubelet can list, from libvirt.

CPU: the domain's total CPU time (all vCPUs and QEMU's own threads), and a
rate from the previous sample of the same container. Memory: QEMU's
resident set as working set and usage, the balloon's unused memory as
available. Writable layer: the allocated bytes of the VM's own files and of its
emptyDisks (not of disks on volumes). Disk I/O (bytes and operations of every
disk, labelled with the guest device as cAdvisor does) is offered as metrics.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import libvirt

from proto.runtime.v1 import api_pb2

from .filters import container_matches, sandbox_matches
from .runtime import Runtime
from .state import ContainerRecord, SandboxRecord
from .storage import disks as vm_disks
from .storage.vm_files import allocated_bytes, vm_files


@dataclass(frozen=True)
class Sample:
    timestamp: int  # ns
    cpu_time: int  # ns
    rss_bytes: int
    available_bytes: int | None
    # guest device (vda, sdb...) → (read ops, read bytes, write ops, write bytes), every disk of the VM
    disks: dict[str, tuple[int, int, int, int]]


_last_cpu: dict[str, tuple[int, int]] = {}
_last_cpu_lock = threading.Lock()


def sample(rt: Runtime, c: ContainerRecord) -> Sample | None:
    """libvirt's numbers for a running container's VM, or None when it does not run."""
    if c.state != api_pb2.CONTAINER_RUNNING:
        return None
    dom = rt.host.lookup(c.domain_name)
    try:
        if dom is None or not dom.isActive():
            return None
        cpu_time = int(dom.getCPUStats(True)[0].get("cpu_time", 0))
        mem = dom.memoryStats()
        disks = _block_stats(dom)
    except libvirt.libvirtError:
        return None  # the VM stopped between the calls
    available = mem.get("unused")
    return Sample(timestamp=time.time_ns(), cpu_time=cpu_time, rss_bytes=int(mem.get("rss", 0)) * 1024,
                  available_bytes=int(available) * 1024 if available is not None else None, disks=disks)


def _block_stats(dom: libvirt.virDomain) -> dict[str, tuple[int, int, int, int]]:
    """Per guest disk, in one call (libvirt's bulk stats: block.<n>.name, .rd.reqs, .rd.bytes, ...)."""
    found = dom.connect().domainListGetStats([dom], libvirt.VIR_DOMAIN_STATS_BLOCK)
    if not found:  # undefined since it was looked up (a racing RemoveContainer): libvirt skips it
        raise libvirt.libvirtError("the domain went away")
    st = found[0][1]
    out = {}
    for n in range(int(st.get("block.count", 0))):
        p = f"block.{n}."
        name = st.get(p + "name")
        if name:
            out[name] = tuple(int(st.get(p + k, 0)) for k in ("rd.reqs", "rd.bytes", "wr.reqs", "wr.bytes"))
    return out  # type: ignore[return-value]


def forget(container_id: str) -> None:
    """Drop a removed container's last CPU sample."""
    with _last_cpu_lock:
        _last_cpu.pop(container_id, None)


def _usage_nano_cores(container_id: str, s: Sample) -> int | None:
    with _last_cpu_lock:
        prev = _last_cpu.get(container_id)
        _last_cpu[container_id] = (s.timestamp, s.cpu_time)
    if prev is None or s.timestamp <= prev[0]:
        return None
    return max(0, (s.cpu_time - prev[1]) * 1_000_000_000 // (s.timestamp - prev[0]))


def container_stats(rt: Runtime, c: ContainerRecord) -> api_pb2.ContainerStats:
    cfg = rt.container_config(c)
    stats = api_pb2.ContainerStats(attributes=api_pb2.ContainerAttributes(
        id=c.id, metadata=cfg.metadata, labels=cfg.labels, annotations=cfg.annotations))
    files = vm_files(rt.config.vms_dir, c.id)
    now = time.time_ns()
    stats.writable_layer.timestamp = now
    stats.writable_layer.fs_id.mountpoint = str(rt.config.vms_dir)
    # The VM's own files and the sandbox's emptyDisks; disks on volumes are the volumes' (the kubelet
    # accounts for those).
    own = [files.root_disk, files.cloud_init_iso, files.console_log]
    try:
        own += [Path(d.path) for d in vm_disks.load(files.disks_record) if not d.persistent]
    except vm_disks.DiskBuildError:
        pass
    stats.writable_layer.used_bytes.value = sum(allocated_bytes(p) for p in own)
    stats.writable_layer.inodes_used.value = sum(1 for p in own if p.exists())
    s = sample(rt, c)
    if s is None:
        return stats
    stats.cpu.timestamp = s.timestamp
    stats.cpu.usage_core_nano_seconds.value = s.cpu_time
    rate = _usage_nano_cores(c.id, s)
    if rate is not None:
        stats.cpu.usage_nano_cores.value = rate
    stats.memory.timestamp = s.timestamp
    stats.memory.working_set_bytes.value = s.rss_bytes
    stats.memory.usage_bytes.value = s.rss_bytes
    stats.memory.rss_bytes.value = s.rss_bytes
    if s.available_bytes is not None:
        stats.memory.available_bytes.value = s.available_bytes
    return stats


def pod_sandbox_stats(rt: Runtime, sb: SandboxRecord) -> api_pb2.PodSandboxStats:
    cfg = rt.sandbox_config(sb)
    out = api_pb2.PodSandboxStats(attributes=api_pb2.PodSandboxAttributes(
        id=sb.id, metadata=cfg.metadata, labels=cfg.labels, annotations=cfg.annotations))
    containers = [container_stats(rt, c) for c in rt.store.containers_of(sb.id)]
    out.linux.containers.extend(containers)
    # A VM pod's usage is its one container's.
    running = [s for s in containers if s.HasField("cpu")]
    if running:
        out.linux.cpu.CopyFrom(running[0].cpu)
        out.linux.memory.CopyFrom(running[0].memory)
    return out


def list_container_stats(rt: Runtime, flt: api_pb2.ContainerStatsFilter | None) -> list[api_pb2.ContainerStats]:
    _, containers = rt.store.snapshot()
    return [container_stats(rt, c) for c in containers if container_matches(rt, c, flt)]


def list_pod_sandbox_stats(rt: Runtime, flt: api_pb2.PodSandboxStatsFilter | None) -> list[api_pb2.PodSandboxStats]:
    sandboxes, _ = rt.store.snapshot()
    return [pod_sandbox_stats(rt, sb) for sb in sandboxes if sandbox_matches(rt, sb, flt)]


# -------------------------------------------------------------- metrics (cAdvisor names)

METRIC_LABELS = ["container", "id", "image", "namespace", "pod"]
DISK_LABELS = [*METRIC_LABELS, "device"]  # cAdvisor's fs metrics are per device too
# name, help, type, how to read it from a Sample
METRICS = [
    ("container_cpu_usage_seconds_total", "Cumulative CPU time consumed by the VM, in nanoseconds.",
     api_pb2.COUNTER, lambda s: s.cpu_time),
    ("container_memory_working_set_bytes", "Resident memory of the VM's QEMU process.",
     api_pb2.GAUGE, lambda s: s.rss_bytes),
]
# name, help, index into a disk's (read ops, read bytes, write ops, write bytes)
DISK_METRICS = [
    ("container_fs_reads_total", "Read operations on a disk of the VM.", 0),
    ("container_fs_reads_bytes_total", "Bytes read from a disk of the VM.", 1),
    ("container_fs_writes_total", "Write operations on a disk of the VM.", 2),
    ("container_fs_writes_bytes_total", "Bytes written to a disk of the VM.", 3),
]


def metric_descriptors() -> list[api_pb2.MetricDescriptor]:
    return ([api_pb2.MetricDescriptor(name=name, help=help_, label_keys=METRIC_LABELS)
             for name, help_, _type, _read in METRICS]
            + [api_pb2.MetricDescriptor(name=name, help=help_, label_keys=DISK_LABELS)
               for name, help_, _i in DISK_METRICS])


def pod_sandbox_metrics(rt: Runtime, sb: SandboxRecord) -> api_pb2.PodSandboxMetrics:
    out = api_pb2.PodSandboxMetrics(pod_sandbox_id=sb.id)
    smd = rt.sandbox_config(sb).metadata
    for c in rt.store.containers_of(sb.id):
        s = sample(rt, c)
        if s is None:
            continue
        labels = [rt.container_config(c).metadata.name, c.id, c.image, smd.namespace, smd.name]
        cm = out.container_metrics.add(container_id=c.id)
        for name, _help, mtype, read in METRICS:
            cm.metrics.add(name=name, timestamp=s.timestamp, metric_type=mtype, label_values=labels,
                           value=api_pb2.UInt64Value(value=int(read(s))))
        for device, counters in sorted(s.disks.items()):
            for name, _help, i in DISK_METRICS:
                cm.metrics.add(name=name, timestamp=s.timestamp, metric_type=api_pb2.COUNTER,
                               label_values=[*labels, device], value=api_pb2.UInt64Value(value=counters[i]))
    return out
