"""The node's guest-info reporter: the guest agent's facts in the VirtualMachine's status.

    python -m vmapi.guest_info --cri-socket PATH --node NODE [--kubeconfig F] [--interval S]

KubeVirt's split: the controller cannot reach a node's runtime, and vmlet holds no
Kubernetes credentials, so a small process on each node (virt-handler's part, with a
ServiceAccount of its own) reads the local runtime over the CRI — ListContainers, then
ContainerStatus(verbose) of each VM container, whose `info["info"]` JSON carries the
`guestAgent` entry (cri_shim/container_status.py) — maps the container to its pod (the
kubelet's `io.kubernetes.pod.*` labels) and the pod to its VM (`<vm>-vm`, owned by the
VM), and merge-patches the fields it owns in the VM's status subresource:

* `guestOSInfo` — KubeVirt's VirtualMachineInstanceGuestOSInfo names;
* `interfaces` — KubeVirt's VirtualMachineInstanceNetworkInterface names (`name` is
  `default`, KubeVirt's name of the pod network, on the guest interface that carries
  the pod IP — or on the only one), `infoSource: guest-agent`;
* the `AgentConnected` condition (KubeVirt's; present, True, while the agent is
  connected, removed when it is not — as virt-handler does).

Who writes what: this reporter, on the node the VM's pod is bound to, sets and clears
them while that pod lives; it never touches a VM whose pod is bound elsewhere. The
controller (vmapi/status.py) keeps them in every status it writes and drops them once
the VM has no live pod (gone or finished) — the one case a reporter can miss (its
node gone, or it restarted and forgot what it wrote). Reporter patches carry the VM's
resourceVersion, read before the pod: a pod deleted after that read makes the
controller write the VM, so the stale patch is a 409, never facts on a stopped VM.

Only patches what changed (compared with the VM's status as read); the CRI is polled
every TICK seconds and the API asked only about pods whose facts changed (a new VM
pod, an agent that connected), everything again every `--interval`. Bounded work per
pass, a deadline on every call, errors logged and retried with back-off: it never
exits on its own but for bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import logging
import re
import signal
import sys
import threading
import time
from typing import Any, Mapping, Sequence

from vmapi import podspec, types
from vmapi.strategy import FINAL

log = logging.getLogger("vmapi.guest_info")

CONDITION = "AgentConnected"
INFO_SOURCE = "guest-agent"
POD_NETWORK = "default"  # KubeVirt's name for the pod network interface
OS_FIELDS = ("name", "id", "version", "versionId", "prettyName", "kernelRelease", "kernelVersion", "machine")
FIELDS = ("guestOSInfo", "interfaces")  # the status fields this reporter owns, with CONDITION
# The guest writes these facts: cap what reaches the API (the CRD's bounds are the same).
MAX_TEXT = 256
MAX_INTERFACES = 16
MAX_ADDRESSES = 16
MAX_INFO_BYTES = 1 << 20  # a verbose info JSON larger than this is not read
MAX_PODS_PER_PASS = 64  # API round trips per pass; the rest wait for the next one
TICK = 2.0  # s between CRI polls
CRI_TIMEOUT = 10.0
API_TIMEOUT = 10.0
LABEL_POD_NAME = "io.kubernetes.pod.name"
LABEL_POD_NAMESPACE = "io.kubernetes.pod.namespace"
LABEL_POD_UID = "io.kubernetes.pod.uid"
LABEL_CONTAINER_NAME = "io.kubernetes.container.name"
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")

# What the reporter calls (deploy/manifests/rbac.yaml's vmlet-guest-info role grants this and no more;
# tests/unit/test_vmapi_manifests.py checks it). list/watch: granted for a watch-based successor.
PERMISSIONS: dict[tuple[str, str, str], str] = {
    ("", "pods", "get"): "the pod of a local VM container: its node, uid, owner, IPs",
    ("", "pods", "list"): "reserved: a node-filtered pod watch",
    ("", "pods", "watch"): "reserved: a node-filtered pod watch",
    (types.GROUP, types.PLURAL, "get"): "the VM of the pod: its uid, status, resourceVersion",
    (types.GROUP, types.PLURAL, "list"): "reserved: a VM watch",
    (types.GROUP, types.PLURAL, "watch"): "reserved: a VM watch",
    (types.GROUP, f"{types.PLURAL}/status", "patch"): "guestOSInfo, interfaces, the AgentConnected condition",
}


# ---------------------------------------------------------------- pure: agent facts -> status


def _text(value: Any) -> str | None:
    """A guest-supplied string fit for the API: a str, encodable (no lone surrogates), capped."""
    if not isinstance(value, str) or not value:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value[:MAX_TEXT]


def os_info(agent: Mapping[str, Any]) -> dict[str, str] | None:
    info = agent.get("guestOSInfo")
    if not isinstance(info, Mapping):
        return None
    out = {k: v for k in OS_FIELDS if (v := _text(info.get(k))) is not None}
    return out or None


def _address(text: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not isinstance(text, str) or len(text) > 64:
        return None
    try:
        return ipaddress.ip_address(text.split("/", 1)[0])  # the shim gives addr/prefix
    except ValueError:
        return None


def interfaces(agent: Mapping[str, Any], pod_ips: Sequence[str] = ()) -> list[dict[str, Any]] | None:
    """The guest's interfaces as KubeVirt names them. Addresses without the prefix, link-local last
    (`ipAddress` is the first: a usable one); `name: default` on the pod network's interface."""
    nics = agent.get("interfaces")
    if not isinstance(nics, list):
        return None
    want = {a for a in (_address(ip) for ip in pod_ips) if a is not None}
    out = []
    for nic in nics[:MAX_INTERFACES]:
        if not isinstance(nic, Mapping) or (name := _text(nic.get("name"))) is None:
            continue
        addrs = []
        for ip in (nic.get("ipAddresses") if isinstance(nic.get("ipAddresses"), list) else [])[:MAX_ADDRESSES]:
            a = _address(ip)
            if a is not None and a not in addrs:
                addrs.append(a)
        addrs.sort(key=lambda a: a.is_link_local)  # stable: the guest's order otherwise
        item: dict[str, Any] = {"interfaceName": name, "infoSource": INFO_SOURCE}
        mac = nic.get("mac").lower() if isinstance(nic.get("mac"), str) else ""
        if _MAC.match(mac):
            item["mac"] = mac
        if addrs:
            item["ipAddress"] = str(addrs[0])
            item["ipAddresses"] = [str(a) for a in addrs]
        item["_pod"] = bool(want & set(addrs))
        out.append(item)
    pod_nics = [i for i in out if i["_pod"]]
    if not pod_nics and len(out) == 1:  # masquerade: the guest has a private address; vmlet VMs have one NIC
        pod_nics = out
    if pod_nics:
        pod_nics[0]["name"] = POD_NETWORK
    for i in out:
        del i["_pod"]
    return out or None


def facts(agent: Mapping[str, Any] | None, pod_ips: Sequence[str] = ()) -> dict[str, Any]:
    """What the status should say: {"connected", "guestOSInfo", "interfaces"} (None: absent).
    A disconnected agent (or none, or a container not running) says nothing."""
    if not isinstance(agent, Mapping) or agent.get("connected") is not True:
        return dict(EMPTY)
    return {"connected": True, "guestOSInfo": os_info(agent), "interfaces": interfaces(agent, pod_ips)}


EMPTY: Mapping[str, Any] = {"connected": False, "guestOSInfo": None, "interfaces": None}


def fingerprint(agent: Mapping[str, Any] | None) -> str:
    """The agent entry without what changes on every call (the facts' age): equal means unchanged."""
    if not isinstance(agent, Mapping):
        return "none"
    return json.dumps({k: v for k, v in agent.items() if k != "ageSeconds"}, sort_keys=True, default=str)


def _iso(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))


def _same_condition(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    keys = ("type", "status", "reason", "message")
    return (a is None) == (b is None) and (a is None or all(a.get(k) == b.get(k) for k in keys))


def _object_patch(old: Any, new: Mapping[str, Any] | None) -> Any:
    """A merge patch replacing object `old` with `new`: keys `new` lacks are nulled (a merge patch
    merges objects key by key)."""
    if new is None or not isinstance(old, Mapping):
        return None if new is None else dict(new)
    patch: dict[str, Any] = dict(new)
    for k in old:
        if k not in new:
            patch[k] = None
    return patch


def status_patch(status: Mapping[str, Any] | None, want: Mapping[str, Any], now: float) -> dict[str, Any]:
    """The status merge patch that makes `status` say `want` (see facts()); {} when it already does.
    Touches only the reporter's fields; the conditions list (replaced whole by a merge patch) keeps
    every other condition as it is, in its order, the AgentConnected one last."""
    status = status if isinstance(status, Mapping) else {}
    patch: dict[str, Any] = {}
    old_os, new_os = status.get("guestOSInfo"), want.get("guestOSInfo")
    if old_os != new_os and (old_os is not None or new_os is not None):
        patch["guestOSInfo"] = _object_patch(old_os, new_os)
    old_if, new_if = status.get("interfaces"), want.get("interfaces")
    if old_if != new_if and (old_if is not None or new_if is not None):
        patch["interfaces"] = new_if  # a list: a merge patch replaces it whole

    conds = [c for c in status.get("conditions") or [] if isinstance(c, Mapping)] \
        if isinstance(status.get("conditions"), list) else []
    old_c = next((c for c in conds if c.get("type") == CONDITION), None)
    new_c = None
    if want.get("connected"):
        new_c = {"type": CONDITION, "status": "True", "reason": "GuestAgentConnected",
                 "message": "the guest agent is connected",
                 "lastTransitionTime": old_c.get("lastTransitionTime") if old_c is not None
                 and old_c.get("status") == "True" and old_c.get("lastTransitionTime") else _iso(now)}
    if not _same_condition(old_c, new_c):
        patch["conditions"] = [dict(c) for c in conds if c.get("type") != CONDITION] + ([new_c] if new_c else [])
    return patch


def reports(status: Mapping[str, Any] | None) -> bool:
    """The status holds something of this reporter's."""
    if not isinstance(status, Mapping):
        return False
    conds = status.get("conditions") if isinstance(status.get("conditions"), list) else []
    return any(status.get(f) is not None for f in FIELDS) or any(
        isinstance(c, Mapping) and c.get("type") == CONDITION for c in conds)


def vm_name_of(pod_name: str) -> str | None:
    """The VM whose pod this name is (`<vm>-vm`, podspec.pod_name), or None."""
    if not pod_name.endswith(podspec.POD_SUFFIX) or len(pod_name) <= len(podspec.POD_SUFFIX):
        return None
    return pod_name[: -len(podspec.POD_SUFFIX)]


def pod_ips(pod: Mapping[str, Any]) -> list[str]:
    st = pod.get("status") if isinstance(pod.get("status"), Mapping) else {}
    ips = [p.get("ip") for p in st.get("podIPs") or [] if isinstance(p, Mapping)]
    return [ip for ip in [st.get("podIP"), *ips] if isinstance(ip, str)]


def ours(pod: Mapping[str, Any] | None, vm: Mapping[str, Any], node: str, pod_uid: str | None = None) -> bool:
    """The VM's own pod, bound to `node` (and of that uid): only then is its status this reporter's."""
    if not isinstance(pod, Mapping):
        return False
    meta = pod.get("metadata") or {}
    return ((pod.get("spec") or {}).get("nodeName") == node and podspec.is_owned_by(pod, vm)
            and (pod_uid is None or meta.get("uid") == pod_uid))


# ---------------------------------------------------------------- the node's runtime


@dataclasses.dataclass(frozen=True)
class LocalPod:
    namespace: str
    name: str
    uid: str
    container_id: str  # the running VM container, else the newest
    running: bool

    @property
    def key(self) -> tuple[str, str, str]:
        return self.namespace, self.name, self.uid


class CRI:
    """The local runtime's RuntimeService: vmlet's own socket (the DaemonSet's and the test's choice; the
    CRI proxy routes the same calls to it, but that path is not tested here)."""

    def __init__(self, socket: str, timeout: float = CRI_TIMEOUT) -> None:
        import grpc
        from proto.runtime.v1 import api_pb2_grpc

        self.timeout = timeout
        self.channel = grpc.insecure_channel(f"unix://{socket.removeprefix('unix://')}")
        self.stub = api_pb2_grpc.RuntimeServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def vm_pods(self) -> list[LocalPod]:
        """The pods of the VM containers here (container `vm` of a pod `<vm>-vm`), one entry per pod."""
        from proto.runtime.v1 import api_pb2

        resp = self.stub.ListContainers(api_pb2.ListContainersRequest(), timeout=self.timeout)
        best: dict[tuple[str, str, str], tuple[tuple[bool, int], LocalPod]] = {}
        for c in resp.containers:
            labels = c.labels
            ns, name, uid = (labels.get(LABEL_POD_NAMESPACE, ""), labels.get(LABEL_POD_NAME, ""),
                             labels.get(LABEL_POD_UID, ""))
            if not (ns and uid and vm_name_of(name)) or labels.get(LABEL_CONTAINER_NAME) != podspec.CONTAINER:
                continue
            running = c.state == api_pb2.CONTAINER_RUNNING
            rank = (running, c.created_at)
            lp = LocalPod(ns, name, uid, c.id, running)
            if lp.key not in best or rank > best[lp.key][0]:
                best[lp.key] = (rank, lp)
        return [lp for _, lp in sorted(best.values(), key=lambda x: x[1].key)]

    def agent(self, container_id: str) -> dict[str, Any] | None:
        """The `guestAgent` entry of the container's verbose status (None: no such entry)."""
        from proto.runtime.v1 import api_pb2

        resp = self.stub.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=container_id, verbose=True),
                                         timeout=self.timeout)
        if resp.status.state != api_pb2.CONTAINER_RUNNING:
            return None
        text = resp.info.get("info", "")
        if not text or len(text) > MAX_INFO_BYTES:
            return None
        try:
            info = json.loads(text)
        except ValueError:
            return None
        agent = info.get("guestAgent") if isinstance(info, dict) else None
        return agent if isinstance(agent, dict) else None


# ---------------------------------------------------------------- the API side


class Api:
    """The reporter's API calls (PERMISSIONS): reads through vmapi.client.Kube, and the status patch
    with the VM's resourceVersion as its precondition."""

    def __init__(self, kube) -> None:
        self.kube = kube

    def get_vm(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.kube.get_vm(namespace, name)

    def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.kube.get_pod(namespace, name)

    def patch_status(self, vm: Mapping[str, Any], patch: dict[str, Any]) -> None:
        """Raises vmapi.client.Conflict when the VM changed since it was read."""
        from kubernetes.client.rest import ApiException

        from vmapi.client import MERGE, Conflict

        meta = vm["metadata"]
        body: dict[str, Any] = {"status": patch}
        if meta.get("resourceVersion"):
            body["metadata"] = {"resourceVersion": meta["resourceVersion"]}
        try:
            self.kube.custom.patch_namespaced_custom_object_status(
                types.GROUP, types.VERSION, meta["namespace"], types.PLURAL, meta["name"], body,
                _content_type=MERGE, **self.kube._opts)
        except ApiException as e:
            if e.status == 409:
                raise Conflict(f"virtualmachine {meta['name']} changed meanwhile") from None
            raise


@dataclasses.dataclass
class PassResult:
    checked: int = 0  # pods looked up in the API
    patched: list[str] = dataclasses.field(default_factory=list)  # "ns/vm" written
    cleared: list[str] = dataclasses.field(default_factory=list)  # "ns/vm" whose facts were removed
    skipped: int = 0  # left for the next pass (bound reached)
    errors: list[str] = dataclasses.field(default_factory=list)


class Reporter:
    """One node's reporter. `run_pass(full)`: full passes look at every local VM pod; others only
    at pods whose agent facts changed since they were last reported."""

    def __init__(self, api: Api, cri: CRI, node: str, *, max_per_pass: int = MAX_PODS_PER_PASS,
                 clock=time.time) -> None:
        self.api, self.cri, self.node, self.max_per_pass, self.clock = api, cri, node, max_per_pass, clock
        self._sent: dict[tuple[str, str, str], str] = {}  # pod key -> fingerprint last reported
        self._wrote: dict[tuple[str, str, str], tuple[str, str]] = {}  # pod key -> (ns, vm) it reported for

    def run_pass(self, full: bool = True) -> PassResult:
        from vmapi.client import Conflict

        res = PassResult()
        local = self.cri.vm_pods()
        seen = set()
        for lp in local:
            seen.add(lp.key)
            try:
                agent = self.cri.agent(lp.container_id) if lp.running else None
            except Exception as e:  # noqa: BLE001 - e.g. removed meanwhile: not running
                log.debug("ContainerStatus %s: %s", lp.container_id, e)
                agent = None
            fp = fingerprint(agent)
            if not full and self._sent.get(lp.key) == fp:
                continue
            if res.checked >= self.max_per_pass:
                res.skipped += 1
                continue
            res.checked += 1
            try:
                self._report(lp, agent, res)
                self._sent[lp.key] = fp
            except Conflict:
                log.info("%s/%s: the VM changed meanwhile, again next pass", lp.namespace, lp.name)
            except Exception as e:  # noqa: BLE001 - one VM's failure is not the others'
                res.errors.append(f"{lp.namespace}/{lp.name}: {e}")
                log.warning("reporting %s/%s failed: %s", lp.namespace, lp.name, e)
        for key in [k for k in self._sent if k not in seen]:
            del self._sent[key]
        for key in [k for k in self._wrote if k not in seen]:
            if res.checked >= self.max_per_pass:
                res.skipped += 1
                continue
            res.checked += 1
            try:
                self._gone(key, res)
                del self._wrote[key]
            except Conflict:
                pass  # again next pass
            except Exception as e:  # noqa: BLE001
                res.errors.append(f"{key[0]}/{key[1]}: {e}")
                log.warning("clearing %s/%s failed: %s", key[0], key[1], e)
        return res

    def _report(self, lp: LocalPod, agent: Mapping[str, Any] | None, res: PassResult) -> None:
        vm_name = vm_name_of(lp.name)
        assert vm_name is not None
        # The VM before the pod: a pod deleted after this read means a controller write in between,
        # so the patch below (carrying this read's resourceVersion) is refused instead of applied.
        vm = self.api.get_vm(lp.namespace, vm_name)
        if vm is None:
            return
        pod = self.api.get_pod(lp.namespace, lp.name)
        if not ours(pod, vm, self.node, lp.uid):
            return  # another node's, another VM's, or a pod the API does not know: not ours to touch
        final = ((pod.get("status") or {}).get("phase")) in FINAL
        want = EMPTY if final or not lp.running else facts(agent, pod_ips(pod))
        patch = status_patch(vm.get("status"), want, self.clock())
        self._wrote[lp.key] = (lp.namespace, vm_name)
        if patch:
            self.api.patch_status(vm, patch)
            (res.patched if want.get("connected") else res.cleared).append(f"{lp.namespace}/{vm_name}")
            log.info("%s/%s: status %s", lp.namespace, vm_name, ", ".join(sorted(patch)))

    def _gone(self, key: tuple[str, str, str], res: PassResult) -> None:
        """The VM pod `key` reported for is no longer on this node: clear what it wrote, unless the VM
        has a pod on another node now (that node's reporter owns it)."""
        ns, name, _uid = key
        vm_name = vm_name_of(name)
        vm = self.api.get_vm(ns, vm_name) if vm_name else None
        if vm is None or not reports(vm.get("status")):
            return
        pod = self.api.get_pod(ns, name)
        if pod is not None and (pod.get("spec") or {}).get("nodeName") != self.node:
            return
        patch = status_patch(vm.get("status"), EMPTY, self.clock())
        if patch:
            self.api.patch_status(vm, patch)
            res.cleared.append(f"{ns}/{vm_name}")
            log.info("%s/%s: its pod left this node, guest facts cleared", ns, vm_name)


# ---------------------------------------------------------------- the process


def serve(make_reporter, stop: threading.Event, interval: float, tick: float = TICK) -> None:
    """Pass after pass until `stop`: a full pass every `interval`, quick ones every `tick`. A failed
    pass (the runtime or the API server away) is logged and retried with back-off up to `interval`."""
    reporter = None
    next_full, failures = 0.0, 0
    while not stop.is_set():
        now = time.monotonic()
        full = now >= next_full
        try:
            if reporter is None:
                reporter = make_reporter()
            reporter.run_pass(full)
            if failures:
                log.info("reporting again after %d failed passes", failures)
            failures = 0
            if full:
                next_full = now + interval
        except Exception as e:  # noqa: BLE001 - never exit: the next pass may work
            failures += 1
            if failures == 1 or failures % 30 == 0:
                log.warning("pass failed (%d in a row): %s", failures, e)
        stop.wait(min(interval, tick * 2 ** min(failures, 6)) if failures else min(tick, interval))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vmapi.guest_info", description=__doc__.split("\n\n")[0])
    p.add_argument("--cri-socket", required=True, help="vmlet's CRI socket")
    p.add_argument("--node", required=True, help="this node's name: only VMs whose pod is bound to it")
    p.add_argument("--kubeconfig", default=None, help="default: in-cluster service account, else ~/.kube/config")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between full passes (default 30)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if not (0.1 <= args.interval <= 3600):
        p.error("--interval: between 0.1 and 3600 seconds")
    if not args.node.strip():
        p.error("--node: empty")
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    cri = None

    def make() -> Reporter:
        nonlocal cri
        from vmapi.client import Kube, load_api_client

        api = Api(Kube(load_api_client(args.kubeconfig, user_agent="vmlet-guest-info"), timeout=API_TIMEOUT))
        cri = CRI(args.cri_socket)
        return Reporter(api, cri, args.node)

    log.info("reporting guest facts of node %s from %s every %ss", args.node, args.cri_socket, args.interval)
    try:
        serve(make, stop, args.interval)
    finally:
        if cri is not None:
            cri.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
