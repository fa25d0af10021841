"""The one place that speaks QGA (the QEMU guest agent protocol), through libvirt's qemuAgentCommand.

Every call has a timeout. libvirt answers at once when the agent's channel
is missing or closed, and syncs with the agent (guest-sync) before every
command, so a connected but silent agent costs at most the call's timeout.
Failures are typed (`NoAgentChannel`, `AgentNotConnected`, `AgentTimeout`,
`AgentCommandFailed`, `VMNotRunning`); the RPC modules turn them into
FailedPrecondition with `describe`.

Running a command (`run`): qemu-ga 7.2 has `guest-exec` + `guest-exec-status`
and nothing else: no kill, no pty, no streaming stdin (all of stdin goes in
the guest-exec request). So every command runs under a small POSIX sh
wrapper (`WRAPPER`) that:
- caps each output stream in the guest: qemu-ga itself buffers up to 16 MiB
  a stream, but libvirt's RPC carries an agent reply of at most 4 MiB
  (REMOTE_STRING_MAX; a bigger guest-exec-status reply fails with "Unable
  to encode message payload" and the result is lost), so the wrapper keeps
  the first OUTPUT_CAP + 1 bytes of each (the +1 tells vmlet it was cut)
  and drains the rest, so the command is not killed by a closed pipe;
- switches to the requested uid/gid with util-linux `setpriv` when asked;
- stays the parent of the command, so a kill (`kill_tree`: a second
  guest-exec that stops and kills the wrapper's whole process tree, found
  through /proc) takes everything the command started.
The guest needs /bin/sh, mktemp, mkfifo, head and cat (any Linux image).

`AgentTracker` keeps connected/disconnected per domain from libvirt's agent
lifecycle events, and a cache of guest facts (OS, hostname, interfaces)
refreshed in the background, so ContainerStatus never waits on an agent.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import libvirt
import libvirt_qemu

log = logging.getLogger("vmlet.agent")

CALL_TIMEOUT = 5  # s: one agent call (libvirt's own default)
PING_TIMEOUT = 2
OUTPUT_CAP = 1024 * 1024  # bytes of stdout and of stderr vmlet keeps (2 x 4/3 base64 fits libvirt's 4 MiB)
INPUT_CAP = 1024 * 1024  # bytes of stdin (base64 in the guest-exec request, the same 4 MiB limit)
TRUNCATED_MARKER = b"\n[vmlet: output truncated at %d bytes]\n"
KILL_GRACE = 5.0  # s to see a killed command gone
# The exit code and stderr line the wrapper gives when it cannot switch user (no util-linux setpriv).
NO_SETPRIV_EXIT = 125
NO_SETPRIV_MESSAGE = b"vmlet-exec: cannot run as uid/gid:"

# $1 cap, $2 uid or user name ("" = as the agent, root), $3 gid ("" = 0), rest: the command. Output capped in the guest (see above).
WRAPPER = r'''cap=$1 uid=$2 gid=$3
shift 3
if [ -n "$uid" ]; then
    # By path: a busybox sh may run its own setpriv applet (no --reuid) for a bare name.
    # No gid: setpriv keeps gid 0 (the CRI's default without runAsGroup and an image passwd entry).
    ids="--reuid=$uid"
    [ -n "$gid" ] && ids="$ids --regid=$gid"
    sp=
    for p in /usr/bin/setpriv /bin/setpriv /usr/sbin/setpriv /sbin/setpriv; do
        if [ -x "$p" ] && "$p" $ids --clear-groups true 2>/dev/null; then sp=$p; break; fi
    done
    if [ -z "$sp" ]; then
        echo "vmlet-exec: cannot run as uid/gid: the image has no util-linux setpriv (--reuid/--regid)" \
            "or the user is unknown to it" >&2
        exit 125
    fi
    set -- "$sp" $ids --clear-groups -- "$@"
fi
d=$(mktemp -d "/tmp/.vmlet-exec.$$.XXXXXX") || exit 125
mkfifo "$d/o" "$d/e" || exit 125
{ head -c "$cap"; cat >/dev/null; } <"$d/o" &
{ head -c "$cap" >&2; cat >/dev/null; } <"$d/e" &
"$@" >"$d/o" 2>"$d/e"
rc=$?
wait
rm -rf "$d"
exit $rc
'''

# $1: a pid. Stops it (stopped processes cannot fork), kills its children the same way, then kills it.
KILL_TREE = r'''children() {
    for s in /proc/[0-9]*/stat; do
        read -r line <"$s" 2>/dev/null || continue
        rest=${line##*) }
        rest=${rest#* }
        [ "${rest%% *}" = "$1" ] || continue
        p=${s#/proc/}
        echo "${p%/stat}"
    done
}
killtree() {
    kill -STOP "$1" 2>/dev/null
    for c in $(children "$1"); do killtree "$c"; done
    kill -KILL "$1" 2>/dev/null
}
killtree "$1"
rm -rf "/tmp/.vmlet-exec.$1."* 2>/dev/null
exit 0
'''


class AgentError(Exception):
    """The guest agent could not do it; `reason` says why in words for the client."""

    reason = "failed"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.reason)
        self.detail = detail


class NoAgentChannel(AgentError):
    reason = "has no guest agent channel (the VM was defined without org.qemu.guest_agent.0)"


class AgentNotConnected(AgentError):
    reason = "is not connected: the image has no qemu-guest-agent or the guest is still booting"


class AgentTimeout(AgentError):
    reason = "did not answer in time"


class AgentCommandFailed(AgentError):
    reason = "refused the command"


class VMNotRunning(AgentError):
    reason = "cannot be reached: the VM is not running"


def describe(e: AgentError, who: str) -> str:
    """A message for the client: "the guest agent of VM pod X is not connected: ..." plus libvirt's detail."""
    text = f"the guest agent of {who} {e.reason}"
    if e.detail and not isinstance(e, (AgentNotConnected, NoAgentChannel)):
        text += f": {e.detail}"
    return text


def error_from_libvirt(e: libvirt.libvirtError) -> AgentError:
    """The typed error for libvirt's answer to qemuAgentCommand."""
    code = e.get_error_code()
    message = e.get_error_message() or str(e)
    if code == libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED or "not configured" in message:
        return NoAgentChannel(message)
    if code == libvirt.VIR_ERR_OPERATION_INVALID and "not running" in message:
        return VMNotRunning(message)
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return VMNotRunning(message)
    if code == libvirt.VIR_ERR_AGENT_UNRESPONSIVE:
        if "not connected" in message:
            return AgentNotConnected(message)
        return AgentTimeout(message)
    if code in (libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_ERR_AGENT_UNSYNCED):
        return AgentTimeout(message)
    return AgentCommandFailed(message)


def parse_reply(text: str, command: str):
    """The "return" of an agent reply; AgentCommandFailed for an error reply or anything else."""
    try:
        reply = json.loads(text)
    except ValueError as e:
        raise AgentCommandFailed(f"{command}: the agent's reply is not JSON: {e}") from None
    if not isinstance(reply, dict):
        raise AgentCommandFailed(f"{command}: the agent's reply is not an object")
    if "error" in reply:
        err = reply["error"]
        desc = err.get("desc") if isinstance(err, dict) else err
        raise AgentCommandFailed(f"{command}: {desc}")
    if "return" not in reply:
        raise AgentCommandFailed(f"{command}: the agent's reply has no return value")
    return reply["return"]


def call(dom: libvirt.virDomain, command: str, arguments: dict | None = None, timeout: int = CALL_TIMEOUT):
    """One agent command; its "return" value. Raises AgentError."""
    message = {"execute": command}
    if arguments is not None:
        message["arguments"] = arguments
    try:
        text = libvirt_qemu.qemuAgentCommand(dom, json.dumps(message), max(1, int(timeout)), 0)
    except libvirt.libvirtError as e:
        raise error_from_libvirt(e) from None
    if text is None:
        raise AgentCommandFailed(f"{command}: no reply")
    return parse_reply(text, command)


def ping(dom: libvirt.virDomain, timeout: int = PING_TIMEOUT) -> None:
    """Raises AgentError unless the agent answers (libvirt's guest-sync, then guest-ping)."""
    call(dom, "guest-ping", timeout=timeout)


# -------------------------------------------------------------- exec


@dataclass
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    timed_out: bool = False  # killed at the deadline
    cancelled: bool = False  # killed because the caller went away


class NoSetpriv(AgentError):
    reason = "cannot run the command as the requested user"


def _b64(status: dict, key: str) -> bytes:
    data = status.get(key)
    if not data:
        return b""
    if not isinstance(data, str):
        raise AgentCommandFailed(f"guest-exec-status: {key} is not a string")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise AgentCommandFailed(f"guest-exec-status: {key} is not base64") from None


def cap_output(data: bytes, agent_truncated: bool, cap: int = OUTPUT_CAP) -> tuple[bytes, bool]:
    """At most `cap` bytes, with the marker appended when the stream was longer (the wrapper passes cap + 1)."""
    if len(data) > cap or agent_truncated:
        return data[:cap] + TRUNCATED_MARKER % cap, True
    return data, False


def exit_code_of(status: dict) -> int:
    """The shell's convention: exit code, or 128 + the signal that ended the process."""
    if isinstance(status.get("exitcode"), int):
        return status["exitcode"]
    if isinstance(status.get("signal"), int):
        return 128 + status["signal"]
    raise AgentCommandFailed("guest-exec-status: an exited process without exit code or signal")


def result_of(status: dict, cap: int = OUTPUT_CAP) -> ExecResult:
    """An exited guest-exec-status reply as a result: output decoded and capped, exit code."""
    out, out_cut = cap_output(_b64(status, "out-data"), bool(status.get("out-truncated")), cap)
    err, err_cut = cap_output(_b64(status, "err-data"), bool(status.get("err-truncated")), cap)
    code = exit_code_of(status)
    if code == NO_SETPRIV_EXIT and err.startswith(NO_SETPRIV_MESSAGE):
        raise NoSetpriv(err.decode(errors="replace").strip())
    return ExecResult(code, out, err, out_cut, err_cut)


def exec_request(argv: list[str], stdin: bytes | None, uid: int | str | None, gid: int | None,
                 cap: int = OUTPUT_CAP) -> dict:
    """The guest-exec arguments running `argv` under the wrapper (uid: a number or a user name)."""
    if uid is None and gid is not None:
        uid = 0  # a group alone: root with that group, as runc does
    args = {"path": "/bin/sh",
            "arg": ["-c", WRAPPER, "vmlet-exec", str(cap + 1),
                    "" if uid is None else str(uid), "" if gid is None else str(gid), *argv],
            "capture-output": True}
    if stdin:
        args["input-data"] = base64.b64encode(stdin).decode("ascii")
    return args


def kill_tree(dom: libvirt.virDomain, pid: int) -> None:
    """Kill a guest-exec'd wrapper and everything under it (qemu-ga 7.2 has no guest-exec kill)."""
    started = call(dom, "guest-exec", {"path": "/bin/sh", "arg": ["-c", KILL_TREE, "vmlet-kill", str(pid)]})
    killer = started.get("pid") if isinstance(started, dict) else None
    if isinstance(killer, int):
        _wait_exited(dom, killer, time.monotonic() + KILL_GRACE)


def _wait_exited(dom: libvirt.virDomain, pid: int, deadline: float) -> dict | None:
    delay = 0.02
    while True:
        status = call(dom, "guest-exec-status", {"pid": pid})
        if not isinstance(status, dict):
            raise AgentCommandFailed("guest-exec-status: the reply is not an object")
        if status.get("exited"):
            return status
        if time.monotonic() >= deadline:
            return None
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 0.25)


def run(dom: libvirt.virDomain, argv: list[str], *, stdin: bytes | None = None, timeout: float | None = None,
        uid: int | str | None = None, gid: int | None = None, cancel: threading.Event | None = None,
        cap: int = OUTPUT_CAP) -> ExecResult:
    """Run argv in the guest to its end, the deadline (`timeout` s: killed, timed_out) or `cancel` (killed,
    cancelled). Raises AgentError."""
    if stdin is not None and len(stdin) > INPUT_CAP:
        raise ValueError(f"stdin is {len(stdin)} bytes, over the {INPUT_CAP} the guest agent takes")
    started = call(dom, "guest-exec", exec_request(argv, stdin, uid, gid, cap))
    pid = started.get("pid") if isinstance(started, dict) else None
    if not isinstance(pid, int):
        raise AgentCommandFailed("guest-exec: the reply has no pid")
    deadline = time.monotonic() + timeout if timeout else None
    delay = 0.02
    try:
        while True:
            status = call(dom, "guest-exec-status", {"pid": pid})
            if not isinstance(status, dict):
                raise AgentCommandFailed("guest-exec-status: the reply is not an object")
            if status.get("exited"):
                return result_of(status, cap)
            now = time.monotonic()
            if cancel is not None and cancel.is_set():
                return _killed(dom, pid, cap, cancelled=True)
            if deadline is not None and now >= deadline:
                return _killed(dom, pid, cap, timed_out=True)
            wait = delay if deadline is None else min(delay, deadline - now)
            if cancel is not None:
                cancel.wait(max(0.0, wait))
            else:
                time.sleep(max(0.0, wait))
            delay = min(delay * 1.5, 0.25)
    except AgentError:
        # Lost the agent mid-way (or a bug on its side): don't leave the command behind if it can be helped.
        try:
            kill_tree(dom, pid)
        except AgentError:
            pass
        raise


def _killed(dom: libvirt.virDomain, pid: int, cap: int, timed_out: bool = False,
            cancelled: bool = False) -> ExecResult:
    kill_tree(dom, pid)
    status = _wait_exited(dom, pid, time.monotonic() + KILL_GRACE)
    if status is None:
        result = ExecResult(137, b"", b"")
    else:
        try:
            result = result_of(status, cap)
        except NoSetpriv:
            result = ExecResult(137, b"", b"")
    result.timed_out, result.cancelled = timed_out, cancelled
    return result


# -------------------------------------------------------------- facts and tracking


def _camel(key: str) -> str:
    head, *rest = key.split("-")
    return head + "".join(part.capitalize() for part in rest)


def parse_os_info(reply) -> dict:
    """guest-get-osinfo with KubeVirt's guestOSInfo names (kernel-release -> kernelRelease, ...)."""
    return {_camel(k): v for k, v in reply.items() if isinstance(k, str) and isinstance(v, str)} \
        if isinstance(reply, dict) else {}


def os_info(dom: libvirt.virDomain, timeout: int = CALL_TIMEOUT) -> dict:
    return parse_os_info(call(dom, "guest-get-osinfo", timeout=timeout))


def host_name(dom: libvirt.virDomain, timeout: int = CALL_TIMEOUT) -> str:
    reply = call(dom, "guest-get-host-name", timeout=timeout)
    name = reply.get("host-name") if isinstance(reply, dict) else None
    return name if isinstance(name, str) else ""


def parse_interfaces(reply) -> list[dict]:
    """guest-network-get-interfaces as KubeVirt names it: name, mac, ipAddresses (addr/prefix), without lo."""
    out = []
    for nic in reply if isinstance(reply, list) else []:
        if not isinstance(nic, dict) or not isinstance(nic.get("name"), str) or nic["name"] == "lo":
            continue
        ips = []
        for ip in nic.get("ip-addresses") or []:
            if isinstance(ip, dict) and isinstance(ip.get("ip-address"), str):
                prefix = ip.get("prefix")
                ips.append(f"{ip['ip-address']}/{prefix}" if isinstance(prefix, int) else ip["ip-address"])
        mac = nic.get("hardware-address")
        out.append({"name": nic["name"], "mac": mac if isinstance(mac, str) else "", "ipAddresses": ips})
    return out


def interfaces(dom: libvirt.virDomain, timeout: int = CALL_TIMEOUT) -> list[dict]:
    return parse_interfaces(call(dom, "guest-network-get-interfaces", timeout=timeout))


FACTS_TTL = 30.0  # s before a refresh is asked for
FACTS_TIMEOUT = 3  # s per fact call in the background
_MAX_PENDING = 64


@dataclass
class Facts:
    os: dict = field(default_factory=dict)
    hostname: str = ""
    interfaces: list = field(default_factory=list)
    fetched_at: float = 0.0  # monotonic; 0 = never
    error: str = ""


class AgentTracker:
    """Agent connected/disconnected per domain (libvirt's agent lifecycle events) and cached guest facts.

    `connected(domain)` is True/False from the last event, None when no event
    was seen (a VM older than this vmlet, or after a libvirtd reconnect).
    Facts are fetched by one background thread; `facts()` never blocks.
    """

    def __init__(self, lookup) -> None:
        self._lookup = lookup  # domain name -> virDomain | None
        self._state: dict[str, bool] = {}
        self._facts: dict[str, Facts] = {}
        self._lock = threading.Lock()
        self._pending: queue.Queue[str | None] = queue.Queue(_MAX_PENDING)
        self._queued: set[str] = set()
        threading.Thread(target=self._worker, name="agent-facts", daemon=True).start()

    def close(self) -> None:
        try:
            self._pending.put_nowait(None)
        except queue.Full:
            pass

    # Event side: libvirt's event loop thread; never blocks.
    def on_agent_event(self, domain: str | None, state: int, _reason: int) -> None:
        with self._lock:
            if domain is None:  # reconnected to libvirtd: events of the gap are lost
                self._state.clear()
                return
            connected = state == libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED
            self._state[domain] = connected
            if not connected:
                facts = self._facts.get(domain)
                if facts is not None:
                    facts.fetched_at = 0.0  # stale: ask again once it is back
        if connected:
            self.refresh(domain)

    def forget(self, domain: str) -> None:
        """The domain stopped or is gone."""
        with self._lock:
            self._state.pop(domain, None)
            self._facts.pop(domain, None)

    def connected(self, domain: str) -> bool | None:
        with self._lock:
            return self._state.get(domain)

    def facts(self, domain: str) -> Facts | None:
        """The cached facts (None before the first fetch); asks for a refresh when they are old."""
        with self._lock:
            facts = self._facts.get(domain)
            stale = facts is None or not facts.fetched_at or time.monotonic() - facts.fetched_at > FACTS_TTL
            known_down = self._state.get(domain) is False
        if stale and not known_down:
            self.refresh(domain)
        return facts

    def refresh(self, domain: str) -> None:
        with self._lock:
            if domain in self._queued:
                return
            self._queued.add(domain)
        try:
            self._pending.put_nowait(domain)
        except queue.Full:
            with self._lock:
                self._queued.discard(domain)

    def _worker(self) -> None:
        while True:
            domain = self._pending.get()
            if domain is None:
                return
            with self._lock:
                self._queued.discard(domain)
            try:
                self._fetch(domain)
            except Exception:  # noqa: BLE001 - keep serving other domains
                log.exception("fetching the guest facts of %s failed", domain)

    def _fetch(self, domain: str) -> None:
        try:
            dom = self._lookup(domain)
        except libvirt.libvirtError:
            return
        if dom is None:
            self.forget(domain)
            return
        facts = Facts()
        try:
            facts.os = os_info(dom, FACTS_TIMEOUT)
            facts.hostname = host_name(dom, FACTS_TIMEOUT)
            facts.interfaces = interfaces(dom, FACTS_TIMEOUT)
            connected = True
        except AgentError as e:
            facts.error = str(e)
            connected = not isinstance(e, (AgentNotConnected, NoAgentChannel, VMNotRunning))
        facts.fetched_at = time.monotonic()
        with self._lock:
            if isinstance(facts.error, str) and facts.error and domain in self._facts:
                # Keep what was known; note the failure.
                old = self._facts[domain]
                old.error, old.fetched_at = facts.error, facts.fetched_at
            else:
                self._facts[domain] = facts
            if domain not in self._state or not connected:
                self._state[domain] = connected
