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

`vmctl console NAME [--escape CHAR]` opens the VM's serial console through its pod's `attach`
subresource (WebSocket, the kubernetes client's `stream`; stdin + stdout + tty on the VM container),
with the local terminal in raw mode while it is open (restored on every way out: the escape key, the
console closing, an error, SIGTERM/SIGHUP), and leaves on the escape key, `^]` (Ctrl+], 0x1d) by
default, as virsh and virtctl. Every other byte, Ctrl+C included, goes to the guest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import sys
from typing import Any, Callable, Iterator

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


def _shown(value: Any) -> str:
    """Guest-supplied text on a terminal: no control characters (escape sequences) get through."""
    return "".join(ch if ch.isprintable() else "?" for ch in str(value))[:256]


def _guest_lines(st: dict[str, Any]) -> list[str]:
    """The guest agent's facts (vmapi/guest_info.py) when the status has them."""
    lines = []
    os_info = st.get("guestOSInfo")
    if isinstance(os_info, dict) and os_info:
        name = os_info.get("prettyName") or " ".join(str(os_info[k]) for k in ("name", "version") if os_info.get(k))
        extra = ", ".join(f"{label} {os_info[k]}" for label, k in (("id", "id"), ("kernel", "kernelRelease"))
                          if os_info.get(k))
        lines.append(f"Guest OS:        {_shown(name or '-')}" + (f" ({_shown(extra)})" if extra else ""))
    nics = [n for n in st.get("interfaces") or [] if isinstance(n, dict)] if isinstance(st.get("interfaces"), list) else []
    for i, nic in enumerate(nics):
        ips = nic.get("ipAddresses") if isinstance(nic.get("ipAddresses"), list) else []
        where = _shown(nic.get("interfaceName") or "-") + (f" ({_shown(nic['name'])})" if nic.get("name") else "")
        lines.append(f"{'Guest IPs:' if i == 0 else '':<17}{where} {_shown(', '.join(map(str, ips)) or '-')}")
    return lines


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
             *_guest_lines(st),
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


# ---------------------------------------------------------------- console

DEFAULT_ESCAPE = "^]"
STDOUT_CHANNEL, ERROR_CHANNEL = 1, 3  # remotecommand's WebSocket channels
READ_SIZE = 4096


def parse_escape(value: str) -> int:
    """The escape key as a byte: caret notation (`^]`, `^A`, `^?`) or one ASCII character."""
    if len(value) == 2 and value[0] == "^":
        c = value[1].upper()
        if c == "?":
            return 0x7F
        if "@" <= c <= "_":
            return ord(c) - 0x40
    elif len(value) == 1 and ord(value) < 0x80:
        return ord(value)
    raise ValueError(f"--escape: {value!r} is not one character or a control key in caret notation (^] ^A ... ^_)")


def escape_name(key: int) -> str:
    return "^?" if key == 0x7F else f"^{chr(key + 0x40)}" if key < 0x20 else chr(key)


def split_at_escape(data: bytes, key: int) -> tuple[bytes, bool]:
    """What goes to the guest from `data`, and whether the escape key came (what follows it does not go)."""
    i = data.find(bytes([key]))
    return (data, False) if i < 0 else (data[:i], True)


def attach_error(e: BaseException) -> str:
    """The server's reason an attach was refused: the Status message (the API server's), the text (the
    kubelet's), or the client's own error."""
    from websocket import WebSocketBadStatusException
    cause = e if isinstance(e, WebSocketBadStatusException) else e.__context__
    if isinstance(cause, WebSocketBadStatusException):
        body = cause.resp_body or b""
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
        try:
            message = json.loads(text).get("message")
        except (ValueError, AttributeError):
            message = None
        return f"{cause.status_code}: {(message or text).strip() or 'no reason given'}"
    return str(getattr(e, "reason", None) or e)


class ConsoleClosed(Exception):
    """The server ended the console (the VM stopped, the pod went away)."""


class _Signalled(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """The terminal at `fd` in raw mode (when it is one), restored on the way out, whatever it is;
    SIGTERM, SIGHUP and SIGINT (raw mode sends Ctrl+C to the guest; a kill(1) may still send it) become
    an exception, so that the way out is taken."""
    import termios
    import tty
    saved = termios.tcgetattr(fd) if os.isatty(fd) else None

    def on_signal(signum, _frame):
        raise _Signalled(signum)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        if saved is not None:
            tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        try:
            if saved is not None:
                termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def open_console(kube: Kube, vm: dict[str, Any]):
    """The attach session of the VM's pod (a kubernetes.stream WSClient); Refused with the server's reason."""
    import websocket
    from kubernetes.client.rest import ApiException as _ApiException
    pod = _pod(kube, vm)
    if pod is None:
        raise Refused("VM is not running (it has no pod)")
    if _phase(pod) != "Running":
        raise Refused(f"VM is not running (its pod {pod['metadata']['name']} is {_phase(pod)})")
    previous = websocket.getdefaulttimeout()
    websocket.setdefaulttimeout(kube.timeout)  # connecting and the handshake: never a hang
    try:
        ws = kube.attach_pod(vm["metadata"]["namespace"], pod["metadata"]["name"], podspec.CONTAINER)
    except _ApiException as e:
        raise Refused(f"attach refused: {attach_error(e)}") from None
    finally:
        websocket.setdefaulttimeout(previous)
    ws.sock.sock.settimeout(None)  # the session itself may be quiet for hours
    return ws


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def run_console(ws, stdin_fd: int, stdout_fd: int, escape: int) -> None:
    """Copy both ways until the escape key (return), stdin's EOF (return) or the server closing
    (ConsoleClosed, with the error channel's message if there was one)."""
    from websocket import WebSocketException
    try:
        _copy_console(ws, stdin_fd, stdout_fd, escape)
    except (WebSocketException, ConnectionError) as e:  # the connection dropped without a close frame
        raise ConsoleClosed(str(e) or type(e).__name__) from None


def _copy_console(ws, stdin_fd: int, stdout_fd: int, escape: int) -> None:
    sock = ws.sock.sock
    while True:
        if not ws.is_open():
            err = ws.read_channel(ERROR_CHANNEL)
            detail = ""
            if err:
                try:
                    detail = json.loads(err).get("message") or ""
                except (ValueError, AttributeError):
                    detail = err.decode("utf-8", "replace") if isinstance(err, bytes) else str(err)
            raise ConsoleClosed(detail)
        pending = getattr(sock, "pending", lambda: 0)()  # TLS: records already decrypted
        readable = [sock] if pending else select.select([stdin_fd, sock], [], [])[0]
        if sock in readable:
            ws.update(timeout=0)
            out = ws.read_channel(STDOUT_CHANNEL)
            if out:
                _write_all(stdout_fd, out)
        if stdin_fd in readable:
            data = os.read(stdin_fd, READ_SIZE)
            if not data:
                return
            data, leave = split_at_escape(data, escape)
            if data:
                ws.write_stdin(data)
            if leave:
                return


def console(kube: Kube, vm: dict[str, Any], escape: int, stdin_fd: int = 0, stdout_fd: int = 1) -> int:
    name = vm["metadata"]["name"]
    ws = open_console(kube, vm)
    try:
        print(f"Successfully connected to {name} console. The escape sequence is {escape_name(escape)}",
              file=sys.stderr, flush=True)
        try:
            with raw_terminal(stdin_fd):
                run_console(ws, stdin_fd, stdout_fd, escape)
        except ConsoleClosed as e:
            print(f"\nvmctl: the console of VM {name} was closed by the server{': ' + str(e) if str(e) else ''}",
                  file=sys.stderr)
            return 1
        except _Signalled as e:
            print(f"\nvmctl: console: {signal.Signals(e.signum).name}", file=sys.stderr)
            return 128 + e.signum
        print(file=sys.stderr)  # the guest's last line had no newline of ours
        return 0
    finally:
        ws.close()


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
    con = sub.add_parser("console", help="open a VM's serial console (leave with the escape key)")
    con.add_argument("name")
    # -n after the command too (`vmctl console NAME -n NS`), as virtctl; SUPPRESS keeps the global one otherwise.
    con.add_argument("-n", "--namespace", default=argparse.SUPPRESS, help="namespace")
    con.add_argument("--escape", default=DEFAULT_ESCAPE, metavar="CHAR",
                     help=f"the key that leaves the console (default {DEFAULT_ESCAPE}, Ctrl+]); caret notation or "
                          "one character")
    args = p.parse_args(argv)
    escape = None
    if args.command == "console":
        try:
            escape = parse_escape(args.escape)
        except ValueError as e:
            p.error(str(e))

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
        if args.command == "console":
            return console(kube, vm, escape)
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
