"""The one place that speaks QGA (the QEMU guest agent protocol), through libvirt's qemuAgentCommand.

Every call has a timeout. libvirt answers at once when the agent's channel
is missing or closed, and syncs with the agent (guest-sync) before every
command, so a connected but silent agent costs at most the call's timeout.
Failures are typed (`NoAgentChannel`, `AgentNotConnected`, `AgentTimeout`,
`AgentCommandFailed`, `VMNotRunning`); the RPC modules turn them into
FailedPrecondition with `describe` (an AgentTimeout of an ExecSync with a
timeout: DeadlineExceeded). Calls to one VM's agent take turns (`call`).

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

`ExecLedger` keeps the pids whose exit was not seen yet on disk; `sweep` kills
and drains what a crash of vmlet (or a lost agent) left behind.

`AgentTracker` keeps connected/disconnected per domain from libvirt's agent
lifecycle events, and a cache of guest facts (OS, hostname, interfaces)
refreshed in the background, so ContainerStatus never waits on an agent.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import os
import queue
import shutil
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

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
    # Quoted: a user name is one argument, never extra setpriv options.
    sp=
    for p in /usr/bin/setpriv /bin/setpriv /usr/sbin/setpriv /sbin/setpriv; do
        if [ -x "$p" ] && "$p" "--reuid=$uid" ${gid:+"--regid=$gid"} --clear-groups true 2>/dev/null; then
            sp=$p; break
        fi
    done
    if [ -z "$sp" ]; then
        echo "vmlet-exec: cannot run as uid/gid: the image has no util-linux setpriv (--reuid/--regid)" \
            "or the user is unknown to it" >&2
        exit 125
    fi
    set -- "$sp" "--reuid=$uid" ${gid:+"--regid=$gid"} --clear-groups -- "$@"
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

# Stops a pid (stopped processes cannot fork), kills its children the same way, then kills it.
_KILL_FUNCTIONS = r'''children() {
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
'''

# $1: a wrapper's pid qemu-ga reported running.
KILL_TREE = _KILL_FUNCTIONS + r'''killtree "$1"
rm -rf "/tmp/.vmlet-exec.$1."* 2>/dev/null
exit 0
'''

# $@: pids of wrappers qemu-ga no longer knows (it restarted while they ran: they are orphans now). Only a pid
# that still has its wrapper's directory is killed (a reused pid has none); then the directories of wrappers
# that are gone are removed.
SWEEP = _KILL_FUNCTIONS + r'''for p in "$@"; do
    for d in /tmp/.vmlet-exec."$p".*; do
        if [ -d "$d" ] && [ -d "/proc/$p" ]; then killtree "$p"; rm -rf "/tmp/.vmlet-exec.$p."*; break; fi
    done
done
for d in /tmp/.vmlet-exec.*; do
    [ -d "$d" ] || continue
    p=${d#/tmp/.vmlet-exec.}
    p=${p%%.*}
    [ -d "/proc/$p" ] || rm -rf "$d"
done
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


# One agent call at a time per domain, waited for within the caller's timeout: libvirt runs one agent job per
# domain and makes any other wait up to 30 s for it, whatever that call's own timeout.
_call_locks: "weakref.WeakValueDictionary[str, threading.Lock]" = weakref.WeakValueDictionary()
_call_locks_guard = threading.Lock()


def _call_lock(dom: libvirt.virDomain) -> threading.Lock:
    name = dom.name()  # local to the binding: no RPC
    with _call_locks_guard:
        lock = _call_locks.get(name)
        if lock is None:
            lock = _call_locks[name] = threading.Lock()
        return lock


# libvirt syncs with the agent (guest-sync) before a command when a call before it timed out, and waits for that
# up to the domain's agent response timeout (5 s by default), not the command's: set it to the call's, so a short
# ExecSync timeout bounds the sync too. Kept per running domain (name and ID) to call libvirt only on a change.
_sync_timeouts: dict[tuple[str, int], int] = {}


def _set_sync_timeout(dom: libvirt.virDomain, seconds: int) -> None:
    key = (dom.name(), dom.ID())
    if _sync_timeouts.get(key) == seconds:
        return
    try:
        dom.agentSetResponseTimeout(seconds if seconds < CALL_TIMEOUT else
                                    libvirt.VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT, 0)
    except libvirt.libvirtError as e:  # the command still runs; its sync may just wait longer
        log.debug("cannot set the agent response timeout of %s: %s", key[0], e)
        return
    if len(_sync_timeouts) > 4096:
        _sync_timeouts.clear()  # domains long gone
    _sync_timeouts[key] = seconds


def call(dom: libvirt.virDomain, command: str, arguments: dict | None = None, timeout: float = CALL_TIMEOUT):
    """One agent command; its "return" value. Raises AgentError; AgentTimeout when no answer within `timeout`
    seconds (waiting for another call to the same agent included)."""
    message = {"execute": command}
    if arguments is not None:
        message["arguments"] = arguments
    end = time.monotonic() + timeout
    lock = _call_lock(dom)
    if timeout <= 0 or not lock.acquire(timeout=timeout):
        raise AgentTimeout(f"{command}: the agent is still busy with an earlier call")
    try:
        left = end - time.monotonic()
        if left <= 0:
            raise AgentTimeout(f"{command}: no time left after waiting for an earlier call")
        seconds = max(1, math.ceil(left - 0.05))  # libvirt's timeouts are whole seconds
        _set_sync_timeout(dom, min(seconds, CALL_TIMEOUT))
        text = libvirt_qemu.qemuAgentCommand(dom, json.dumps(message), seconds, 0)
    except libvirt.libvirtError as e:
        raise error_from_libvirt(e) from None
    finally:
        lock.release()
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


INT32 = range(-2 ** 31, 2 ** 31)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def exit_code_of(status: dict) -> int:
    """The shell's convention: exit code, or 128 + the signal that ended the process (an int32 either way: the
    CRI's exit_code field)."""
    if "exitcode" in status:
        code = status["exitcode"]
        if type(code) is not int or code not in INT32:  # type(): True is an int to isinstance
            raise AgentCommandFailed(f"guest-exec-status: exitcode {_short(code)} is not a 32-bit integer")
        return code
    if "signal" in status:
        sig = status["signal"]
        if type(sig) is not int or not 0 <= sig < INT32.stop - 128:
            raise AgentCommandFailed(f"guest-exec-status: signal {_short(sig)} is not a signal number")
        return 128 + sig
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


def _run_script(dom: libvirt.virDomain, script: str, name: str, args: list[str]) -> None:
    started = call(dom, "guest-exec", {"path": "/bin/sh", "arg": ["-c", script, name, *args]})
    pid = started.get("pid") if isinstance(started, dict) else None
    if isinstance(pid, int):
        _wait_exited(dom, pid, time.monotonic() + KILL_GRACE)  # also drains its record in qemu-ga


def kill_tree(dom: libvirt.virDomain, pid: int) -> None:
    """Kill a guest-exec'd wrapper and everything under it (qemu-ga 7.2 has no guest-exec kill). Only for a pid
    qemu-ga last reported running: once its exit was seen the pid may belong to anything."""
    _run_script(dom, KILL_TREE, "vmlet-kill", [str(pid)])


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


def _budget(deadline: float | None) -> float:
    """One call's timeout: CALL_TIMEOUT, capped by what is left of the caller's deadline."""
    if deadline is None:
        return CALL_TIMEOUT
    return min(CALL_TIMEOUT, deadline - time.monotonic())


GUARD_WAIT = 30.0  # s a command without deadline waits for a sweep of its VM (a sweep's calls are bounded)


def run(dom: libvirt.virDomain, argv: list[str], *, stdin: bytes | None = None, timeout: float | None = None,
        uid: int | str | None = None, gid: int | None = None, cancel: threading.Event | None = None,
        cap: int = OUTPUT_CAP, ledger: "ExecLedger | None" = None) -> ExecResult:
    """Run argv in the guest to its end, the deadline (`timeout` s: killed, timed_out) or `cancel` (killed,
    cancelled). Raises AgentError; AgentTimeout when the agent did not answer in time (every call is capped by
    what is left of `timeout`). With a `ledger`, the pid is on record until its exit was seen, so a command that
    could not be killed (or outlived a crash of vmlet) is swept later (`sweep`)."""
    if stdin is not None and len(stdin) > INPUT_CAP:
        raise ValueError(f"stdin is {len(stdin)} bytes, over the {INPUT_CAP} the guest agent takes")
    deadline = time.monotonic() + timeout if timeout else None
    domain = dom.name() if ledger is not None else ""
    guard = ledger.guard(domain) if ledger is not None else None
    # guest-exec and its record under the ledger's guard: a sweep never takes a new command for a stale record.
    if guard is not None and not guard.acquire(timeout=max(0.0, _budget(deadline)) if deadline else GUARD_WAIT):
        raise AgentTimeout("guest-exec: the leftovers of an earlier vmlet are still being killed in this VM")
    try:
        started = call(dom, "guest-exec", exec_request(argv, stdin, uid, gid, cap), _budget(deadline))
        pid = started.get("pid") if isinstance(started, dict) else None
        if type(pid) is not int or pid <= 0:
            raise AgentCommandFailed("guest-exec: the reply has no pid")
        if ledger is not None:
            ledger.started(domain, pid)
    finally:
        if guard is not None:
            guard.release()
    status = None
    timed_out = cancelled = False
    try:
        status, timed_out, cancelled = _poll(dom, pid, deadline, cancel)
        if status is None:
            kill_tree(dom, pid)
            status = _wait_exited(dom, pid, time.monotonic() + KILL_GRACE)
    except AgentTimeout:
        raise  # no answer: another call (the kill) would only wait again; the record stays for the sweep
    except AgentError:
        # A bad reply while it ran: don't leave the command behind if it can be helped.
        try:
            kill_tree(dom, pid)
            status = _wait_exited(dom, pid, time.monotonic() + KILL_GRACE)
        except AgentError:
            pass
        raise
    finally:
        if ledger is not None:
            ledger.ended(domain, pid, drained=status is not None)
    # Decoded after the exit was seen, outside the kill-on-error block: the pid is qemu-ga's no more.
    if not (timed_out or cancelled):
        return result_of(status, cap)
    result = ExecResult(137, b"", b"")
    if status is not None:
        try:
            result = result_of(status, cap)
        except AgentError:
            pass  # killed anyway: its partial output is not worth an error
    result.timed_out, result.cancelled = timed_out, cancelled
    return result


def _poll(dom: libvirt.virDomain, pid: int, deadline: float | None,
          cancel: threading.Event | None) -> tuple[dict | None, bool, bool]:
    """(the exited status, False, False), or (None, timed_out, cancelled) when the deadline or cancel came first."""
    delay = 0.02
    while True:
        left = _budget(deadline)
        if left <= 0:
            return None, True, False
        status = call(dom, "guest-exec-status", {"pid": pid}, left)
        if not isinstance(status, dict):
            raise AgentCommandFailed("guest-exec-status: the reply is not an object")
        if status.get("exited"):
            return status, False, False
        now = time.monotonic()
        if cancel is not None and cancel.is_set():
            return None, False, True
        if deadline is not None and now >= deadline:
            return None, True, False
        wait = delay if deadline is None else min(delay, deadline - now)
        if cancel is not None:
            cancel.wait(max(0.0, wait))
        else:
            time.sleep(max(0.0, wait))
        delay = min(delay * 1.5, 0.25)


def sweep(dom: libvirt.virDomain, pids: list[int]) -> set[int]:
    """Kill what is left of earlier commands (recorded pids whose exit nobody saw) and drain qemu-ga's records
    of them; remove wrapper directories whose wrapper is gone. Returns the pids settled (exit seen, or not
    qemu-ga's any more). Raises AgentError (nothing settled after the error)."""
    settled: set[int] = set()
    orphans: list[int] = []
    for pid in pids:
        try:
            status = call(dom, "guest-exec-status", {"pid": pid})
        except AgentCommandFailed:  # unknown to qemu-ga: it restarted (or the guest rebooted) since
            orphans.append(pid)
            continue
        if isinstance(status, dict) and status.get("exited"):
            settled.add(pid)  # asking drained it
            continue
        kill_tree(dom, pid)
        if _wait_exited(dom, pid, time.monotonic() + KILL_GRACE) is not None:
            settled.add(pid)
    _run_script(dom, SWEEP, "vmlet-sweep", [str(p) for p in orphans])
    return settled | set(orphans)


# -------------------------------------------------------------- facts and tracking


def _camel(key: str) -> str:
    head, *rest = key.split("-")
    return head + "".join(part.capitalize() for part in rest)


# Caps on what a guest tells about itself (it reaches every verbose ContainerStatus and the VM's status).
FACT_KEYS = 16  # guest-get-osinfo has 10
FACT_TEXT = 256  # characters of a name or value (longer ones are cut)
MAX_INTERFACES = 32
MAX_ADDRESSES = 32  # per interface
ADDRESS_TEXT = 64  # an IPv6 address with a zone fits; longer is no address


def _text(value, limit: int = FACT_TEXT) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def parse_os_info(reply) -> dict:
    """guest-get-osinfo with KubeVirt's guestOSInfo names (kernel-release -> kernelRelease, ...), capped."""
    out: dict[str, str] = {}
    for k, v in reply.items() if isinstance(reply, dict) else ():
        if len(out) >= FACT_KEYS:
            break
        if isinstance(k, str) and len(k) <= 64 and isinstance(v, str):
            out[_camel(k)] = v[:FACT_TEXT]
    return out


def os_info(dom: libvirt.virDomain, timeout: int = CALL_TIMEOUT) -> dict:
    return parse_os_info(call(dom, "guest-get-osinfo", timeout=timeout))


def parse_host_name(reply) -> str:
    name = _text(reply.get("host-name")) if isinstance(reply, dict) else None
    return name or ""


def host_name(dom: libvirt.virDomain, timeout: int = CALL_TIMEOUT) -> str:
    return parse_host_name(call(dom, "guest-get-host-name", timeout=timeout))


def parse_interfaces(reply) -> list[dict]:
    """guest-network-get-interfaces as KubeVirt names it: name, mac, ipAddresses (addr/prefix), without lo;
    capped in count and length."""
    out = []
    for nic in reply if isinstance(reply, list) else []:
        if len(out) >= MAX_INTERFACES:
            break
        if not isinstance(nic, dict) or not isinstance(nic.get("name"), str) or nic["name"] == "lo":
            continue
        ips = []
        given = nic.get("ip-addresses")
        for ip in given if isinstance(given, list) else []:
            if len(ips) >= MAX_ADDRESSES:
                break
            addr = ip.get("ip-address") if isinstance(ip, dict) else None
            if not isinstance(addr, str) or not addr or len(addr) > ADDRESS_TEXT:
                continue
            prefix = ip.get("prefix")
            ips.append(f"{addr}/{prefix}" if type(prefix) is int and 0 <= prefix <= 128 else addr)
        out.append({"name": nic["name"][:FACT_TEXT], "mac": _text(nic.get("hardware-address"), 64) or "",
                    "ipAddresses": ips})
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


class ExecLedger:
    """The guest-exec pids of each domain whose exit nobody has seen yet, on disk, so that a vmlet restarted
    after a crash (or an agent that came back) gets the commands killed and qemu-ga's records of them drained.

    A record is an empty file <root>/<domain>/<pid>: created when guest-exec answers (atomic and cheap: one
    open(O_EXCL)), removed once the exit was seen. Records of this process's running commands are "live";
    the rest are "stale" and left to `sweep` (run by AgentTracker's worker). `root` None: memory only.
    """

    def __init__(self, root: Path | None) -> None:
        self._root = root
        self._lock = threading.Lock()
        self._recorded: dict[str, set[int]] = {}
        self._live: dict[str, set[int]] = {}
        self._guards: dict[str, threading.Lock] = {}
        if root is not None and root.is_dir():
            for d in root.iterdir():
                if not d.is_dir():
                    continue
                pids = {int(f.name) for f in d.iterdir() if f.name.isdigit() and 0 < int(f.name) < 2 ** 31}
                if pids:
                    self._recorded[d.name] = pids
                else:
                    shutil.rmtree(d, ignore_errors=True)

    def guard(self, domain: str) -> threading.Lock:
        """Held across guest-exec + `started` and by the sweep across a pid's check and kill."""
        with self._lock:
            return self._guards.setdefault(domain, threading.Lock())

    def started(self, domain: str, pid: int) -> None:
        with self._lock:
            self._recorded.setdefault(domain, set()).add(pid)
            self._live.setdefault(domain, set()).add(pid)
        if self._root is not None:
            try:
                (self._root / domain).mkdir(parents=True, exist_ok=True)
                os.close(os.open(self._root / domain / str(pid), os.O_CREAT | os.O_WRONLY, 0o600))
            except OSError as e:  # the state dir full or read-only: the command still runs, unrecorded
                log.warning("cannot record guest exec %d of %s: %s", pid, domain, e)

    def ended(self, domain: str, pid: int, drained: bool) -> None:
        """The command is no longer this process's; `drained`: its exit was seen (else the record stays)."""
        with self._lock:
            self._live.get(domain, set()).discard(pid)
        if drained:
            self.settle(domain, [pid])

    def stale(self, domain: str) -> list[int]:
        with self._lock:
            return sorted(self._recorded.get(domain, set()) - self._live.get(domain, set()))

    def settle(self, domain: str, pids) -> None:
        with self._lock:
            recorded = self._recorded.get(domain, set())
            live = self._live.get(domain, set())
            for pid in pids:
                if pid in live:
                    continue  # a new command got the same pid meanwhile: its record is its own
                recorded.discard(pid)
                if self._root is not None:
                    try:
                        os.unlink(self._root / domain / str(pid))
                    except FileNotFoundError:
                        pass
                    except OSError as e:
                        log.warning("cannot remove the record of guest exec %d of %s: %s", pid, domain, e)

    def forget(self, domain: str) -> None:
        """The domain stopped or is gone: its processes went with it."""
        with self._lock:
            self._recorded.pop(domain, None)
            self._live.pop(domain, None)
            self._guards.pop(domain, None)
            if self._root is not None:
                shutil.rmtree(self._root / domain, ignore_errors=True)

    def domains(self) -> list[str]:
        with self._lock:
            return [d for d, pids in self._recorded.items() if pids]


class AgentTracker:
    """Agent connected/disconnected per domain (libvirt's agent lifecycle events) and cached guest facts.

    `connected(domain)` is True/False from the last event, None when no event
    was seen (a VM older than this vmlet, or after a libvirtd reconnect).
    Facts are fetched by one background thread; `facts()` never blocks. The same
    thread sweeps a VM's exec leftovers (`ledger`'s stale records, wrapper
    directories of gone wrappers) when its agent connects and when asked (`sweep`).
    """

    def __init__(self, lookup, ledger: ExecLedger | None = None) -> None:
        self._lookup = lookup  # domain name -> virDomain | None
        self.ledger = ledger if ledger is not None else ExecLedger(None)
        self._sweeps: set[str] = set()
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
            self.sweep(domain)  # (re)connected: what an earlier agent or vmlet left is ours to clean

    def forget(self, domain: str) -> None:
        """The domain stopped or is gone."""
        with self._lock:
            self._state.pop(domain, None)
            self._facts.pop(domain, None)
            self._sweeps.discard(domain)
        self.ledger.forget(domain)

    def sweep(self, domain: str) -> None:
        """Ask the worker to sweep the domain's exec leftovers (and refresh its facts)."""
        with self._lock:
            self._sweeps.add(domain)
        self.refresh(domain)

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
                wanted = domain in self._sweeps
                self._sweeps.discard(domain)
            try:
                self._fetch(domain, wanted)
            except Exception:  # noqa: BLE001 - keep serving other domains
                log.exception("fetching the guest facts of %s failed", domain)

    def _sweep(self, dom: libvirt.virDomain, domain: str) -> None:
        with self.ledger.guard(domain):
            pids = self.ledger.stale(domain)
            try:
                settled = sweep(dom, pids)
            except AgentError as e:
                log.info("sweeping the exec leftovers of %s: %s (tried again later)", domain, e)
                return
            self.ledger.settle(domain, settled)
        if pids:
            log.info("%s: killed or drained the guest commands %s left by an earlier vmlet or agent", domain,
                     sorted(settled))

    def _fetch(self, domain: str, sweep_wanted: bool = False) -> None:
        try:
            dom = self._lookup(domain)
        except libvirt.libvirtError:
            return
        if dom is None:
            self.forget(domain)
            return
        if sweep_wanted or self.ledger.stale(domain):
            self._sweep(dom, domain)
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
