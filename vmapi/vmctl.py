"""`vmctl`: start, stop, restart, list and show VirtualMachines, the way `virtctl` users expect.

How each command acts depends on the VM's runStrategy (KubeVirt's rules):

| runStrategy    | start                               | stop                          | restart              |
|----------------|-------------------------------------|-------------------------------|----------------------|
| Always         | refused: does not take start        | runStrategy → Halted          | Stop(pod) + Start    |
| Halted         | runStrategy → Always                | refused: VM is not running    | refused              |
| RerunOnFailure | Start (Stop(pod)+Start if it        | Stop(pod) request             | Stop(pod) + Start    |
|                | Succeeded; refused if it Failed)    |                               |                      |
| Manual         | Start (Stop(pod)+Start if finished) | Stop(pod) request             | Stop(pod) + Start    |
| Once           | refused                             | runStrategy → Halted          | refused              |

Requests go to the annotation `vmlet.dev/state-change-requests` (see vmapi/requests.py);
runStrategy changes are merge patches of spec. Every write carries the VM's
resourceVersion, so a concurrent change makes the command fail instead of losing it.
Exit codes: 0 done, 1 refused or failed (message on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from kubernetes.client.rest import ApiException

from vmapi import podspec, requests
from vmapi.client import Conflict, Kube, load_api_client
from vmapi.requests import Request


class Refused(Exception):
    pass


def _pod(kube: Kube, vm: dict[str, Any]) -> dict[str, Any] | None:
    meta = vm["metadata"]
    pod = kube.get_pod(meta["namespace"], podspec.pod_name(meta["name"]))
    return pod if pod is not None and podspec.is_owned_by(pod, vm) else None


def _phase(pod: dict[str, Any] | None) -> str | None:
    return None if pod is None else (pod.get("status") or {}).get("phase") or "Pending"


def _running(pod: dict[str, Any] | None) -> bool:
    return pod is not None and _phase(pod) not in ("Succeeded", "Failed")


def _queue(kube: Kube, vm: dict[str, Any], new: list[Request], replace_stop: bool = False) -> str:
    meta = vm["metadata"]
    current, err = requests.parse(meta.get("annotations"))
    if current and not (replace_stop and len(new) == 1 and new[0].action == "Stop"):
        raise Refused("a stop/start is already underway")  # KubeVirt answers the same
    _patch(kube, vm, {"metadata": {"annotations": {requests.ANNOTATION: requests.dump(new)}}})
    return " + ".join(r.action for r in new) + " requested"


def _set_strategy(kube: Kube, vm: dict[str, Any], strategy: str) -> str:
    _patch(kube, vm, {"spec": {"runStrategy": strategy}})
    return f"runStrategy set to {strategy}"


def _patch(kube: Kube, vm: dict[str, Any], patch: dict[str, Any]) -> None:
    rv = vm["metadata"].get("resourceVersion")
    if rv:
        patch.setdefault("metadata", {})["resourceVersion"] = rv
    kube.patch_vm(vm["metadata"]["namespace"], vm["metadata"]["name"], patch)


def start(kube: Kube, vm: dict[str, Any]) -> str:
    rs, pod = vm["spec"].get("runStrategy", "Always"), _pod(kube, vm)
    if _running(pod):
        raise Refused("VM is already running")
    if rs == "Halted":
        return _set_strategy(kube, vm, "Always")
    if rs in ("Always", "Once"):
        raise Refused(f"{rs} does not support manual start requests")
    if rs == "RerunOnFailure" and _phase(pod) == "Failed":
        raise Refused("RerunOnFailure does not support starting VM from failed state")
    if pod is not None:  # finished: remove it first, then start
        return _queue(kube, vm, [Request("Stop", pod["metadata"].get("uid")), Request("Start")])
    return _queue(kube, vm, [Request("Start")])


def stop(kube: Kube, vm: dict[str, Any]) -> str:
    rs, pod = vm["spec"].get("runStrategy", "Always"), _pod(kube, vm)
    if rs in ("Always", "Once"):
        return _set_strategy(kube, vm, "Halted")
    if not _running(pod):
        raise Refused("VM is not running")
    if rs == "Halted":
        raise Refused("VM is already stopping (runStrategy Halted)")
    return _queue(kube, vm, [Request("Stop", pod["metadata"].get("uid"))], replace_stop=True)


def restart(kube: Kube, vm: dict[str, Any]) -> str:
    rs, pod = vm["spec"].get("runStrategy", "Always"), _pod(kube, vm)
    if rs in ("Halted", "Once"):
        raise Refused(f"runStrategy {rs} does not support manual restart requests")
    if pod is None:
        raise Refused("VM is not running")
    return _queue(kube, vm, [Request("Stop", pod["metadata"].get("uid")), Request("Start")])


def _row(vm: dict[str, Any]) -> list[str]:
    st, meta = vm.get("status") or {}, vm["metadata"]
    return [meta.get("namespace", ""), meta["name"], st.get("printableStatus") or "-",
            str(bool(st.get("ready"))).lower(), vm["spec"].get("runStrategy", "Always"),
            st.get("nodeName") or "-", st.get("podIP") or "-"]


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def show(vm: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(vm.get("status") or {}, indent=2, sort_keys=True)
    st = vm.get("status") or {}
    lines = [f"Name:            {vm['metadata']['name']}",
             f"Namespace:       {vm['metadata'].get('namespace', '')}",
             f"RunStrategy:     {vm['spec'].get('runStrategy', 'Always')}",
             f"Status:          {st.get('printableStatus') or '-'}",
             f"Ready:           {str(bool(st.get('ready'))).lower()}",
             f"Pod:             {st.get('podName') or '-'} ({st.get('podPhase') or '-'})",
             f"Node:            {st.get('nodeName') or '-'}",
             f"IP:              {st.get('podIP') or '-'}",
             f"Restarts:        {st.get('restartCount') or 0}",
             "Conditions:"]
    for c in st.get("conditions") or []:
        lines.append(f"  {c.get('type')}={c.get('status')} {c.get('reason') or ''} {c.get('message') or ''}".rstrip())
    volumes = [v for v in st.get("volumeStatus") or [] if isinstance(v, dict)]
    if volumes:
        lines.append("Volumes:")
        rows = [[str(v.get("name") or "-"), str((v.get("persistentVolumeClaimInfo") or {}).get("claimName") or "-"),
                 str(v.get("phase") or "-"), str(v.get("target") or "-"), str(v.get("message") or "")] for v in volumes]
        lines += ["  " + line for line in _table([["NAME", "CLAIM", "PHASE", "TARGET", "MESSAGE"], *rows]).splitlines()]
    pending, _ = requests.parse(vm["metadata"].get("annotations"))
    if pending:
        lines.append("Pending requests: " + ", ".join(r.action for r in pending))
    return "\n".join(lines)


ACTIONS: dict[str, Callable[[Kube, dict[str, Any]], str]] = {"start": start, "stop": stop, "restart": restart}


def main(argv: list[str] | None = None, kube: Kube | None = None) -> int:
    from cri_shim.main import package_version
    p = argparse.ArgumentParser(prog="vmctl", description="Manage vmlet VirtualMachines (kubectl-like).")
    p.add_argument("--version", action="version", version=f"vmctl {package_version()}")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    p.add_argument("--context", help="kubeconfig context")
    p.add_argument("-n", "--namespace", help="namespace (default: the context's, else default)")
    sub = p.add_subparsers(dest="command", required=True)
    for name in ACTIONS:
        sub.add_parser(name, help=f"{name} a VM").add_argument("name")
    ls = sub.add_parser("list", help="list VMs")
    ls.add_argument("-A", "--all-namespaces", action="store_true")
    stp = sub.add_parser("status", help="show a VM's status")
    stp.add_argument("name")
    stp.add_argument("-o", "--output", choices=("text", "json"), default="text")
    args = p.parse_args(argv)

    try:
        if kube is None:
            kube = Kube(load_api_client(args.kubeconfig, context=args.context))
        ns = args.namespace or _default_namespace(args.kubeconfig, args.context)
        if args.command == "list":
            vms = kube.list_vms(None if args.all_namespaces else ns)
            rows = [["NAMESPACE", "NAME", "STATUS", "READY", "STRATEGY", "NODE", "IP"]] + [_row(v) for v in vms]
            print(_table(rows) if vms else f"No VirtualMachines found in {'any namespace' if args.all_namespaces else ns}.")
            return 0
        vm = kube.get_vm(ns, args.name)
        if vm is None:
            print(f"vmctl: VirtualMachine {ns}/{args.name} not found", file=sys.stderr)
            return 1
        if args.command == "status":
            print(show(vm, args.output))
            return 0
        print(f"VM {args.name}: {ACTIONS[args.command](kube, vm)}")
        return 0
    except Refused as e:
        print(f"vmctl: {args.command} {getattr(args, 'name', '')}: {e}", file=sys.stderr)
        return 1
    except Conflict as e:
        print(f"vmctl: {e}; try again", file=sys.stderr)
        return 1
    except ApiException as e:
        print(f"vmctl: API error {e.status} {e.reason}", file=sys.stderr)
        return 1
    except Exception as e:  # kubeconfig missing or unreadable, server unreachable
        print(f"vmctl: {e}", file=sys.stderr)
        return 1


def _default_namespace(kubeconfig: str | None, context: str | None) -> str:
    try:
        import kubernetes
        _, active = kubernetes.config.list_kube_config_contexts(config_file=kubeconfig)
        if context:
            contexts, _ = kubernetes.config.list_kube_config_contexts(config_file=kubeconfig)
            active = next((c for c in contexts if c["name"] == context), active)
        return (active or {}).get("context", {}).get("namespace") or "default"
    except Exception:
        return "default"


if __name__ == "__main__":
    sys.exit(main())
