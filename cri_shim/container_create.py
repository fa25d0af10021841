"""CreateContainer: build the VM — root overlay, cloud-init disk, libvirt domain.

validate → reserve → build files → define domain → record → answer. Any
failure rolls back what was built; a crash half-way leaves a domain or a
directory without a record, which recovery removes on the next start. The
domain's metadata names the container, sandbox and pod, so state can be
rebuilt from libvirt alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import uuid

import libvirt

from image_service.errors import ImageError
from proto.runtime.v1 import api_pb2

from . import cloudinit, errors, host_caps, validation
from .storage import disks as vm_disks
from .storage import pod_volumes
from .annotations import CPU_MODEL, LIBVIRT_CPU_SETTING, AnnotationError, VMAnnotations
from .crashpoints import crashpoint
from .domain_xml import CPU, CPUFeature, Disk, DomainSpec, Interface, SharedDir, UnsafeText, build_domain_xml
from .runtime import Runtime, new_id, now_ns
from .state import ContainerRecord, NameConflict
from .storage.vm_files import (VolumeError, create_root_overlay, ensure_traversable, pod_files, remove_vm_files,
                               vm_files, write_file_atomic)

log = logging.getLogger("vmlet.cri")

MIB = 1024 * 1024


def container_name_key(cfg: api_pb2.ContainerConfig, sandbox_cfg: api_pb2.PodSandboxConfig) -> str:
    md, smd = cfg.metadata, sandbox_cfg.metadata
    return "_".join((md.name, smd.name, smd.namespace, smd.uid, str(md.attempt)))


def cpu_for(vm: VMAnnotations) -> CPU | None:
    """The domain's <cpu> from VirtletLibvirtCPUSetting, else VirtletCPUModel, else the default."""
    s = vm.libvirt_cpu
    if s is not None:
        return CPU(mode=s.mode, match=s.match, check=s.check,
                   model=s.model.value if s.model else None, fallback=s.model.fallback if s.model else None,
                   features=[CPUFeature(f.name, f.policy) for f in s.features])
    if vm.cpu_mode is not None:
        return CPU(mode=vm.cpu_mode, model=vm.cpu_model_name)
    return None


def vm_resources(rt: Runtime, cfg: api_pb2.ContainerConfig, vm: VMAnnotations,
                 max_memory: int) -> tuple[int, int, tuple[int, int]]:
    """(memory in MiB, vCPUs, (CFS period, quota) or (0, 0)) from the container's limits and the pod's annotations.

    The limits follow validation's one rule (the same as UpdateContainerResources).
    """
    res = cfg.linux.resources
    field = "config.linux.resources"
    memory = validation.memory_limit(res.memory_limit_in_bytes, f"{field}.memory_limit_in_bytes", max_memory)
    memory_mib = math.ceil(memory / MIB) if memory else rt.config.default_memory_mib
    period, quota = validation.cpu_limit(res.cpu_period, res.cpu_quota, field)
    if vm.vcpu_count:
        vcpus = vm.vcpu_count
    elif quota:
        vcpus = max(1, math.ceil(quota / period))
    else:
        vcpus = 1
    if vcpus > rt.config.max_vcpus:
        source = "pod annotation VirtletVCPUCount" if vm.vcpu_count else f"{field}.cpu_quota / cpu_period"
        raise errors.invalid_argument(f"{source}: the VM would get {vcpus} vCPUs; this node allows at most "
                                      f"{rt.config.max_vcpus}")
    return memory_mib, vcpus, (period, quota)


def check_cpu(caps: host_caps.HostCaps, vm: VMAnnotations) -> CPU | None:
    """The domain's <cpu>, refused here when this host's hypervisor can never start it."""
    cpu = cpu_for(vm)
    where = f"pod annotation {LIBVIRT_CPU_SETTING if vm.libvirt_cpu is not None else CPU_MODEL}"
    try:
        caps.check_cpu(cpu, where)
    except host_caps.UnknownCPUFeature as e:
        raise errors.invalid_argument(str(e)) from None
    except host_caps.UnsupportedCPU as e:
        raise errors.failed_precondition(str(e)) from None
    return cpu


def _validate_request(cfg: api_pb2.ContainerConfig) -> None:
    """The request's own strings, before anything is looked up or built."""
    if not cfg.HasField("metadata"):
        raise errors.invalid_argument("config.metadata must be set")
    validation.name(cfg.metadata.name, "config.metadata.name")
    if not cfg.image.image:
        raise errors.invalid_argument("config.image.image must name the VM image")
    validation.text(cfg.image.image, "config.image.image", validation.MAX_PATH)
    for i, m in enumerate(cfg.mounts):
        validation.path(m.host_path, f"config.mounts[{i}].host_path")
        validation.path(m.container_path, f"config.mounts[{i}].container_path")
    for i, kv in enumerate(cfg.envs):
        # cloud-init's own rule for the environment file, checked per entry and part to name the field.
        for part, entry in (("key", {kv.key: ""}), ("value", {"V": kv.value})):
            try:
                cloudinit.env_file_content(entry)
            except cloudinit.CloudInitError as e:
                raise errors.invalid_argument(f"config.envs[{i}].{part}: {e}") from None
    for i, d in enumerate(cfg.devices):
        validation.path(d.host_path, f"config.devices[{i}].host_path")
        validation.path(d.container_path, f"config.devices[{i}].container_path")
        validation.text(d.permissions, f"config.devices[{i}].permissions", 8)


def create_container(rt: Runtime, req: api_pb2.CreateContainerRequest) -> api_pb2.CreateContainerResponse:
    sb = rt.sandbox(req.pod_sandbox_id)
    cfg = req.config
    _validate_request(cfg)
    try:
        caps = host_caps.for_runtime(rt)
    except libvirt.libvirtError as e:
        raise errors.from_libvirt(e, "cannot read the host's domain capabilities") from None
    with rt.lock(sb.id):
        sb = rt.sandbox(sb.id)
        if sb.state != api_pb2.SANDBOX_READY:
            raise errors.failed_precondition(f"pod sandbox {sb.id} is not ready")
        # One VM per pod. An exited one does not count: the kubelet restarts a container (restartPolicy, a
        # failed start) by creating its next attempt beside the dead one, which it garbage-collects later.
        existing = [c for c in rt.store.containers_of(sb.id) if c.state != api_pb2.CONTAINER_EXITED]
        if existing:
            raise errors.failed_precondition(
                f"a VM pod has exactly one container: sandbox {sb.id} already has container "
                f"{existing[0].id} ({rt.container_config(existing[0]).metadata.name!r})")
        sandbox_cfg = rt.sandbox_config(sb)
        try:
            vm = VMAnnotations.from_pod_annotations(sandbox_cfg.annotations)
        except AnnotationError as e:
            raise errors.invalid_argument(str(e)) from None
        memory_mib, vcpus, cpu_limit = vm_resources(rt, cfg, vm, caps.memory_bytes)
        cpu = check_cpu(caps, vm)
        log_path = validation.log_path(sandbox_cfg.log_directory, cfg.log_path)
        disk_plan = plan_disks(rt, cfg, vm)
        return _build(rt, sb.id, sandbox_cfg, cfg, vm, memory_mib, vcpus, cpu_limit, cpu, log_path, disk_plan)


def plan_disks(rt: Runtime, cfg: api_pb2.ContainerConfig, vm: VMAnnotations
               ) -> tuple[list[vm_disks.Planned], set[str]]:
    """The disks from the pod's volumes, checked against the request before anything is built."""
    try:
        return vm_disks.plan(vm.disks, cfg.mounts, cfg.devices, max_disks=rt.config.max_disks)
    except vm_disks.DiskPlanError as e:
        raise errors.invalid_argument(str(e)) from None


def _build(rt: Runtime, sandbox_id: str, sandbox_cfg: api_pb2.PodSandboxConfig, cfg: api_pb2.ContainerConfig,
           vm: VMAnnotations, memory_mib: int, vcpus: int, cpu_limit: tuple[int, int], cpu: CPU | None,
           log_path: str, disk_plan: tuple[list[vm_disks.Planned], set[str]]) -> api_pb2.CreateContainerResponse:
    container_id = new_id()
    files = vm_files(rt.config.vms_dir, container_id)
    domain = rt.domain_name_for(container_id)
    domain_uuid = str(uuid.UUID(container_id[:32]))
    try:
        image = rt.images.get(cfg.image.image)
        if image is None:
            raise errors.not_found(f"image {errors.show(cfg.image.image)} is not present on this node; pull it first")
        base = rt.images.acquire(image.id, container_id)
        crashpoint("create.after-acquire")
        planned, disk_paths = disk_plan
        targets = vm_disks.Targets()
        bus = vm.disk_driver
        root_order = vm_disks.root_boot_order(vm.disks)
        ensure_traversable(files.dir)
        with _disks_step():
            if vm.root_disk is None:
                root_size = vm.root_volume_size or None
                if root_size and root_size > rt.config.max_root_volume_gib * 1024 ** 3:
                    raise errors.invalid_argument(f"VirtletRootVolumeSize {root_size} bytes is above this node's "
                                                  f"cap of {rt.config.max_root_volume_gib} GiB")
                with _step("cannot create the VM's root disk"):
                    create_root_overlay(files, base, image.format, root_size)
                crashpoint("create.after-overlay")
                root = [Disk(str(files.root_disk), targets.take(bus), bus=bus, boot_order=root_order)]
            else:
                # The persistent root: the image is written onto the volume once (storage/persistent_root.py).
                root_image = vm_disks.RootImage(base=base, format=image.format, digest=f"sha256:{image.id}",
                                                name=cfg.image.image, reimage=vm.root_reimage)
                attached = vm_disks.build([p for p in planned if p.spec.root], files=files,
                                          pod=pod_files(rt.config.pods_dir, sandbox_id), default_bus=bus,
                                          targets=targets, root_image=root_image, root_boot_order=root_order)
                root = [attached[0].disk()]
            cloud_init_target = targets.take(bus)
            attached_disks = vm_disks.build([p for p in planned if not p.spec.root], files=files,
                                            pod=pod_files(rt.config.pods_dir, sandbox_id), default_bus=bus,
                                            targets=targets, root_image=None)
            if vm.root_disk is not None:
                attached_disks = attached + attached_disks
        crashpoint("create.after-disks")
        with _step(f"cannot record the VM's disks ({files.disks_record.name})"):
            write_file_atomic(files.disks_record, vm_disks.record(attached_disks))
        try:
            shares, skipped = pod_volumes.plan(cfg.mounts, disk_paths)
            pod_volumes.prepare(files.dir, shares)
        except pod_volumes.BadMount as e:
            raise errors.invalid_argument(str(e)) from None
        except pod_volumes.VolumeMountError as e:
            raise errors.failed_precondition(f"cannot share the pod's volumes with the VM: {e}") from None
        for k in skipped:
            log.info("container %s: mount %s (%s) not given to the VM: %s",
                     container_id[:12], k.container_path, k.host_path, k.reason)
        with _step(f"cannot record the VM's shared volumes ({files.volumes_record.name})"):
            write_file_atomic(files.volumes_record, pod_volumes.record(shares, skipped))

        smd = sandbox_cfg.metadata
        network = rt.network.get(sandbox_id)
        if network is None:
            raise errors.failed_precondition(f"pod sandbox {sandbox_id} has no network (its setup did not finish)")
        try:
            data = cloudinit.compose(
                vm, pod_uid=smd.uid, pod_name=smd.name,
                hostname=validation.hostname(sandbox_cfg.hostname or smd.name),
                env={kv.key: kv.value for kv in cfg.envs}, mounts=[sh.guest for sh in shares],
                device_links=[cloudinit.DeviceLink(d.container_path, d.serial)
                              for d in attached_disks if d.kind == "device" and d.container_path],
                network_config=network.network_config(), dns=network.dns)
        except cloudinit.CloudInitError as e:
            raise errors.invalid_argument(f"cloud-init data: {e}") from None
        with _step("cannot write the VM's cloud-init disk"):
            write_file_atomic(files.cloud_init_iso, cloudinit.build_iso_for(data))

        disks = [*root, Disk(str(files.cloud_init_iso), cloud_init_target, bus=bus, format="raw", readonly=True,
                             no_backing=True),
                 *(d.disk() for d in attached_disks if not d.root)]
        spec = DomainSpec(
            name=domain, uuid=domain_uuid, memory_kib=memory_mib * 1024, vcpus=vcpus,
            domain_type=rt.domain_type, disks=disks, console_log=str(files.console_log),
            # The VM's NIC joins the pod's network through the sandbox's host bridge (docs/networking.md).
            interfaces=[Interface("bridge", source=network.host_bridge, mac=network.vm_mac)],
            shared_dirs=[SharedDir(pod_volumes.share_source(files.dir, sh), sh.guest.tag) for sh in shares],
            cpu_period_us=cpu_limit[0], cpu_quota_us=cpu_limit[1], cpu=cpu,
            metadata={
                "instance": rt.instance_id, "container-id": container_id, "sandbox-id": sandbox_id,
                "pod-name": smd.name, "pod-namespace": smd.namespace, "pod-uid": smd.uid,
                "container-name": cfg.metadata.name, "attempt": str(cfg.metadata.attempt),
                "image": cfg.image.image, "image-ref": f"sha256:{image.id}",
            })
        try:
            rt.host.define(build_domain_xml(spec))
        except UnsafeText as e:  # a value the checks above let through: still the request's
            raise errors.invalid_argument(f"the VM's definition cannot carry a value of the request: {e}") from None
        except libvirt.libvirtError as e:
            raise errors.from_libvirt(e, "libvirt refused the VM's definition") from None
        crashpoint("create.after-define")

        record = ContainerRecord(
            id=container_id, sandbox_id=sandbox_id, name_key=container_name_key(cfg, sandbox_cfg),
            state=api_pb2.CONTAINER_CREATED, created_at=now_ns(), image=cfg.image.image,
            image_ref=f"sha256:{image.id}", domain_name=domain, domain_uuid=domain_uuid,
            log_path=log_path, config=cfg.SerializeToString())
        try:
            rt.store.add_container(record)
        except NameConflict as e:
            raise errors.already_exists(f"container name {errors.show(e.name_key, 300)} is already reserved for container "
                                        f"{e.owner_id}") from None
        crashpoint("create.after-record")
    except BaseException as e:
        _rollback(rt, container_id, domain, files)
        if isinstance(e, ImageError):
            raise errors.CRIError(e.code, str(e)) from None
        if isinstance(e, VolumeError):  # a step without its own wording
            raise errors.failed_precondition(f"cannot build the VM's files: {e}") from None
        raise
    rt.events.container_event(rt, container_id, api_pb2.CONTAINER_CREATED_EVENT)
    return api_pb2.CreateContainerResponse(container_id=container_id)


@contextlib.contextmanager
def _disks_step():
    try:
        yield
    except vm_disks.DiskBuildError as e:
        raise errors.failed_precondition(f"cannot attach the VM's disks: {e}") from None


@contextlib.contextmanager
def _step(what: str):
    """A VolumeError of this step is FAILED_PRECONDITION saying what failed (the error names the file and why)."""
    try:
        yield
    except VolumeError as e:
        raise errors.failed_precondition(f"{what}: {e}") from None


def _rollback(rt: Runtime, container_id: str, domain: str, files) -> None:
    try:
        rt.host.undefine(domain)
    except Exception:  # noqa: BLE001 - recovery removes what is left; report the original error
        log.exception("rollback: cannot undefine %s", domain)
    try:
        remove_vm_files(files)
    except pod_volumes.VolumeMountError:
        log.exception("rollback: keeping %s (recovery removes it)", files.dir)
    rt.images.release_holder(container_id)
