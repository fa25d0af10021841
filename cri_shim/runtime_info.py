"""Version, Status, RuntimeConfig, UpdateRuntimeConfig.

Status is also where a dead per-pod DHCP server is noticed while vmlet runs:
the kubelet polls Status every few seconds (its runtime health check), and
checking that each ready pod's dnsmasq is alive costs a pidfile and a /proc
read. A dead one is restarted by the network manager's `ensure` on a worker
thread, so Status never waits on a pod's network lock (held through CNI calls
of a pod being torn down) and `ensure` decides, under that lock, whether the
pod still wants a DHCP server at all.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from pathlib import Path

from proto.runtime.v1 import api_pb2

from .main import package_version
from .network import NetworkError, NetworkLost, dhcp
from .runtime import Runtime

log = logging.getLogger("vmlet.cri")

CRI_VERSION = "0.1.0"  # the kubelet checks this value for the v1 API
RUNTIME_NAME = "vmlet"


def version(_rt: Runtime, _req: api_pb2.VersionRequest) -> api_pb2.VersionResponse:
    return api_pb2.VersionResponse(version=CRI_VERSION, runtime_name=RUNTIME_NAME,
                                   runtime_version=package_version(), runtime_api_version="v1")


class _DHCPRepair:
    """Restarts dead dnsmasq processes of ready pods, one pod at a time, off the RPC thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: set[str] = set()

    def check(self, rt: Runtime) -> None:
        for sb in list(rt.store.sandboxes.values()):
            if sb.state == api_pb2.SANDBOX_READY and dhcp.running_pid(rt.network.pidfile(sb.id)) is None:
                self._schedule(rt, sb.id)

    def _schedule(self, rt: Runtime, sandbox_id: str) -> None:
        with self._lock:
            if sandbox_id in self._pending:
                return
            self._pending.add(sandbox_id)
        threading.Thread(target=self._repair, args=(rt, sandbox_id), name=f"dhcp-repair-{sandbox_id[:8]}",
                         daemon=True).start()

    def _repair(self, rt: Runtime, sandbox_id: str) -> None:
        try:
            repaired = rt.network.ensure(sandbox_id)  # a no-op for a pod being stopped or removed
            if repaired:
                log.warning("sandbox %s: its network had to be repaired: %s", sandbox_id[:12], ", ".join(repaired))
        except NetworkLost as e:
            # Nothing vmlet may re-create (eth0, CNI's result, the netns): the kubelet must recreate the pod.
            log.warning("sandbox %s lost its network: %s; marking it not ready", sandbox_id[:12], e)
            rt.mark_sandbox_not_ready(sandbox_id)
        except (NetworkError, OSError, ValueError) as e:
            log.warning("sandbox %s: cannot repair its network: %s", sandbox_id[:12], e)
        except Exception:  # noqa: BLE001 - a worker thread: log the bug, Status goes on
            log.exception("sandbox %s: repairing its network failed", sandbox_id[:12])
        finally:
            with self._lock:
                self._pending.discard(sandbox_id)


_dhcp_repair = _DHCPRepair()


def virtlogd_condition(sock_path: Path) -> api_pb2.RuntimeCondition:
    """VirtlogdReady: virtlogd accepts connections. Informational (RuntimeReady stays as libvirtd is): running
    VMs are unaffected, and a NotReady node would get its pods evicted; new VMs fail to start meanwhile."""
    cond = api_pb2.RuntimeCondition(type="VirtlogdReady", status=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(str(sock_path))
    except OSError as e:
        cond.status = False
        cond.reason = "VirtlogdUnavailable"
        cond.message = (f"virtlogd is not accepting connections on {sock_path} ({e.strerror or e}): new VMs cannot "
                        "start (libvirt logs their consoles through it) until it runs again")
    finally:
        s.close()
    return cond


def status(rt: Runtime, req: api_pb2.StatusRequest) -> api_pb2.StatusResponse:
    _dhcp_repair.check(rt)
    ok, why = rt.host.alive()
    runtime_ready = api_pb2.RuntimeCondition(type="RuntimeReady", status=ok)
    if not ok:
        runtime_ready.reason = "LibvirtUnavailable"
        runtime_ready.message = f"libvirtd at {rt.config.libvirt_uri} is not answering: {why}"
    network_ready, reason, message = rt.network_status()
    network = api_pb2.RuntimeCondition(type="NetworkReady", status=network_ready, reason=reason, message=message)
    conditions = [runtime_ready, network]
    if rt.config.virtlogd_socket is not None:
        conditions.append(virtlogd_condition(rt.config.virtlogd_socket))
    resp = api_pb2.StatusResponse(status=api_pb2.RuntimeStatus(conditions=conditions))
    resp.runtime_handlers.append(api_pb2.RuntimeHandler(name=""))
    if req.verbose:
        resp.info["config"] = json.dumps({
            "libvirtURI": rt.config.libvirt_uri, "stateDir": str(rt.config.state_dir),
            "accelerator": rt.config.accelerator, "domainType": rt.domain_type,
            "podCIDR": rt.pod_cidr,
        }, sort_keys=True)
    return resp


def runtime_config(_rt: Runtime, _req: api_pb2.RuntimeConfigRequest) -> api_pb2.RuntimeConfigResponse:
    # vmlet does not use systemd to place VMs; libvirt manages their cgroups itself.
    return api_pb2.RuntimeConfigResponse(linux=api_pb2.LinuxRuntimeConfiguration(cgroup_driver=api_pb2.CGROUPFS))


def update_runtime_config(rt: Runtime, req: api_pb2.UpdateRuntimeConfigRequest) -> api_pb2.UpdateRuntimeConfigResponse:
    rt.pod_cidr = req.runtime_config.network_config.pod_cidr
    return api_pb2.UpdateRuntimeConfigResponse()
