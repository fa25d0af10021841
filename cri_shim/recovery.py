"""Start-up reconciliation: make the store, libvirt and the disks agree again.

Run once before the socket opens, after any kind of exit (graceful, kill -9
at any step, host reboot):

- a vmlet domain whose container has no record (a crash inside
  CreateContainer) is an orphan: undefined, its files deleted;
- a VM directory without a record is deleted (after detaching the bind mounts
  in it, so nothing on a pod's volume is ever deleted through them), and so is
  a pod directory (emptyDisks) without a sandbox record; data on volumes (disk
  images, block devices, persistent roots) is the user's and never touched;
- a created container whose domain runs (a crash inside StartContainer) is
  recorded as running;
- a running container whose domain still runs keeps running and gets its
  console copier back; one whose domain stopped meanwhile gets its exit
  recorded; one whose domain is gone is recorded as exited (DomainLost);
- networks of sandboxes without a record (a crash inside RunPodSandbox) are
  swept; ready sandboxes get their DHCP server and links back if they went
  missing, or are marked not ready when their network is gone (netns, eth0 or
  CNI's result lost) or was being torn down (StopPodSandbox killed after CNI
  DEL began: its IP may belong to another pod by now), never refusing to start;
- image references follow the records: every container holds its image,
  holders that are no containers any more are released;
- guest commands a crash left running (the exec ledger's records) are
  killed in the background by the agent tracker's worker; records of VMs that
  no longer run are dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil

from proto.runtime.v1 import api_pb2

from .network import NetworkError, NetworkLost
from .storage import pod_volumes
from .storage.pod_volumes import VolumeMountError
from .runtime import Runtime, now_ns
from .state import ContainerRecord
from .storage.vm_files import VMFiles, remove_vm_files

log = logging.getLogger("vmlet.recovery")


def recover(rt: Runtime) -> dict[str, list[str]]:
    report: dict[str, list[str]] = {"orphan_domains": [], "orphan_dirs": [], "exited": [], "running": [],
                                    "released_holders": [], "network_lost": []}
    containers = dict(rt.store.containers)

    for name, md in rt.host.vmlet_domains(rt.instance_id).items():
        if md.get("container-id") not in containers:
            log.warning("removing orphan domain %s (container %s has no record)", name, md.get("container-id"))
            try:
                rt.host.undefine(name)
            except Exception:  # noqa: BLE001 - one domain must never keep the daemon from starting
                log.exception("cannot remove orphan domain %s; the next start tries again", name)
                continue
            report["orphan_domains"].append(name)

    known_sandboxes = list(rt.store.sandboxes)
    report["network_swept"] = rt.network.sweep(known_sandboxes)
    for sb in list(rt.store.sandboxes.values()):
        if sb.state != api_pb2.SANDBOX_READY:
            continue
        try:
            if rt.network.teardown_interrupted(sb.id):
                # StopPodSandbox died after teardown began: CNI DEL may have released the pod IP already
                # (another pod may hold it now). The kubelet's StopPodSandbox of the NOTREADY sandbox finishes
                # the teardown; a CNI plugin that hangs on DEL must not hold up the start of the daemon.
                rt.network.stop_dhcp(sb.id)
                raise NetworkLost("its teardown was interrupted by a crash of vmlet")
            # dnsmasq restarted, links re-created if they went missing; raises if the network is gone
            # (netns, eth0 or CNI's result lost).
            rt.network.ensure(sb.id)
        except Exception as e:  # noqa: BLE001 - one sandbox must never keep the daemon from starting
            if isinstance(e, NetworkError):
                log.warning("sandbox %s lost its network: %s; marking it not ready", sb.id[:12], e)
            else:
                log.exception("sandbox %s: repairing its network failed; marking it not ready", sb.id[:12])
            # NOTREADY makes the kubelet stop and recreate the pod, which tears down what is left.
            rt.mark_sandbox_not_ready(sb.id)
            report["network_lost"].append(sb.id)

    if rt.config.vms_dir.is_dir():
        for d in rt.config.vms_dir.iterdir():
            if d.name not in containers:
                log.warning("removing orphan VM directory %s", d)
                try:
                    remove_vm_files(VMFiles(d))
                except VolumeMountError as e:
                    log.error("keeping orphan VM directory %s: %s", d, e)
                    continue
                report["orphan_dirs"].append(d.name)

    # emptyDisks of sandboxes without a record (a crash inside RemovePodSandbox or RunPodSandbox).
    report["orphan_pod_dirs"] = []
    if rt.config.pods_dir.is_dir():
        for d in rt.config.pods_dir.iterdir():
            if d.name not in rt.store.sandboxes:
                log.warning("removing the files of pod sandbox %s (it has no record)", d.name[:12])
                shutil.rmtree(d, ignore_errors=True)
                report["orphan_pod_dirs"].append(d.name)

    for c in containers.values():
        try:
            _recover_container(rt, c, report)
        except Exception:  # noqa: BLE001 - one container must never keep the daemon from starting
            log.exception("container %s: recovery failed; its record is kept as it was", c.id[:12])

    report["exec_sweeps"] = _sweep_execs(rt)

    # Every holding, also of images already removed (their file waits for its last holder).
    for image_id, holder in rt.images.holdings():
        if holder not in containers:
            rt.images.release(image_id, holder)
            report["released_holders"].append(holder)
    return report


def _recover_container(rt: Runtime, c: ContainerRecord, report: dict[str, list[str]]) -> None:
    if rt.images.get(c.image_ref) is not None:
        rt.images.acquire(c.image_ref, c.id)  # idempotent; re-takes a reference lost in a crash
    st = rt.host.state(c.domain_name)
    if st is None and c.state in (api_pb2.CONTAINER_CREATED, api_pb2.CONTAINER_RUNNING):
        with rt.store_lock():
            rt.store.update_container(dataclasses.replace(
                c, state=api_pb2.CONTAINER_EXITED, finished_at=now_ns(), exit_code=1,
                reason="DomainLost", message="the VM's libvirt domain disappeared while vmlet was not running"))
        report["exited"].append(c.id)
    elif c.state == api_pb2.CONTAINER_CREATED and rt.host.is_active(c.domain_name):
        # StartContainer booted the VM but died before recording it: the VM runs, so say so.
        c = dataclasses.replace(c, state=api_pb2.CONTAINER_RUNNING, started_at=now_ns())
        with rt.store_lock():
            rt.store.update_container(c)
        rt.start_console(c)
        report["running"].append(c.id)
    elif c.state == api_pb2.CONTAINER_RUNNING:
        if rt.host.is_active(c.domain_name):
            rt.start_console(c)
            report["running"].append(c.id)
        else:
            rt.record_exit(c.id)
            report["exited"].append(c.id)
    current = rt.store.containers.get(c.id)
    if current is not None and current.state == api_pb2.CONTAINER_EXITED:
        # The VM went down while vmlet was not running (or before its shares were detached).
        pod_volumes.release(VMFiles(rt.config.vms_dir / c.id).dir)


def _sweep_execs(rt: Runtime) -> list[str]:
    """Queue a sweep of every running VM with guest commands on record (in the background: an agent that does
    not answer must not hold up the start); forget the records of the others."""
    running = {c.domain_name for c in rt.store.containers.values() if c.state == api_pb2.CONTAINER_RUNNING}
    swept = []
    for domain in rt.agent.ledger.domains():
        if domain in running:
            rt.agent.sweep(domain)
            swept.append(domain)
        else:
            rt.agent.ledger.forget(domain)
    return swept
