"""ExecSync, and the exec sessions of the streaming server: commands run in the guest through its agent.

Everything goes through cri_shim/guest_agent.py (guest-exec + guest-exec-status
polling; see docs/exec.md for the semantics). What qemu-guest-agent 7.2 cannot
do shapes the answers: no pty (tty=true is refused, naming `kubectl attach`),
no streaming stdin (the session's stdin is read to EOF first, up to
guest_agent.INPUT_CAP), output when the command ends.

Timeouts, as containerd does it: ExecSync's `timeout` (seconds, 0 = none)
kills the command in the guest and answers DEADLINE_EXCEEDED ("timeout Ns
exceeded"), which the kubelet's remote runtime client turns into a timed-out
exec probe; so does an agent that does not answer within the timeout (every
agent call is capped by what is left of it). Without a timeout ExecSync is
still bounded by EXEC_SYNC_MAX (the command is killed and DEADLINE_EXCEEDED
says so), so no gRPC worker waits on a guest forever.
"""

from __future__ import annotations

import re

import grpc

from proto.runtime.v1 import api_pb2

from . import errors, guest_agent
from .streaming import backend

EXEC_SYNC_MAX = 600  # s: the bound on an ExecSync without a timeout
STDIN_CAP = guest_agent.INPUT_CAP


def _deadline_exceeded(message: str) -> errors.CRIError:
    return errors.CRIError(grpc.StatusCode.DEADLINE_EXCEEDED, message)


def _running_container(rt, container_id: str, cmd=None):
    """The container (NotFound), the command checked (InvalidArgument), then running (FailedPrecondition)."""
    c = rt.container(container_id)
    if cmd is not None:
        _check_cmd(cmd)
    if c.state != api_pb2.CONTAINER_RUNNING:
        state = api_pb2.ContainerState.Name(c.state)
        raise errors.failed_precondition(
            f"container {c.id[:12]} is not running ({state}): there is no VM to run the command in")
    return c


def _who(rt, c) -> str:
    sb = rt.store.sandboxes.get(c.sandbox_id)
    if sb is not None:
        md = rt.sandbox_config(sb).metadata
        return f"VM pod {md.namespace}/{md.name} (container {c.id[:12]})"
    return f"the VM of container {c.id[:12]}"


def _check_cmd(cmd) -> list[str]:
    if not cmd:
        raise errors.invalid_argument("cmd must not be empty: name the program to run in the guest")
    out = []
    for i, arg in enumerate(cmd):
        if "\x00" in arg:
            raise errors.invalid_argument(f"cmd[{i}] contains a NUL byte, which a guest argument cannot carry")
        out.append(arg)
    if not out[0]:
        raise errors.invalid_argument("cmd[0] must not be empty: name the program to run in the guest")
    return out


# POSIX's portable user name (3.437: the portable filename character set, no leading hyphen); 256 is
# LOGIN_NAME_MAX. Anything else could not be a passwd name, and must never reach setpriv as options.
USER_NAME = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]{0,255}\Z")


def _user_of(rt, c) -> tuple[int | str | None, int | None]:
    return user_of(rt.container_config(c).linux.security_context)


def user_of(sc: api_pb2.LinuxContainerSecurityContext) -> tuple[int | str | None, int | None]:
    """(uid or user name, gid) from the container's security context; None where not set."""
    uid: int | str | None = None
    gid: int | None = None
    if sc.HasField("run_as_user"):
        uid = sc.run_as_user.value
    elif sc.run_as_username:
        if not USER_NAME.match(sc.run_as_username):
            raise errors.invalid_argument(
                f"config.linux.security_context.run_as_username {errors.show(sc.run_as_username)} is not a "
                "portable user name (letters, digits, '.', '_', '-', not starting with '-', at most 256)")
        uid = sc.run_as_username
    if sc.HasField("run_as_group"):
        gid = sc.run_as_group.value
    for field, value in (("run_as_user", uid), ("run_as_group", gid)):
        if isinstance(value, int) and not 0 <= value < 2 ** 32 - 1:
            raise errors.failed_precondition(
                f"the container's config.linux.security_context.{field} {value} is not a valid Linux id")
    return uid, gid


def _domain(rt, c):
    dom = rt.host.lookup(c.domain_name)
    if dom is None:
        raise errors.failed_precondition(f"container {c.id[:12]}: its VM (libvirt domain) is gone")
    return dom


def _agent_error(e: guest_agent.AgentError, who: str) -> errors.CRIError:
    return errors.failed_precondition(guest_agent.describe(e, who))


def _run(rt, c, cmd: list[str], *, stdin: bytes | None, timeout: float | None, cancel=None,
         given_timeout: int = 0):
    uid, gid = _user_of(rt, c)
    who = _who(rt, c)
    if rt.agent.connected(c.domain_name) is False:
        # Known down from libvirt's events: answer now (libvirt would too, but this costs no call at all).
        raise _agent_error(guest_agent.AgentNotConnected(), who)
    dom = _domain(rt, c)
    if rt.agent.ledger.stale(c.domain_name):
        rt.agent.sweep(c.domain_name)  # commands an earlier run could not kill: the worker tries again
    try:
        return guest_agent.run(dom, cmd, stdin=stdin, timeout=timeout, uid=uid, gid=gid, cancel=cancel,
                               ledger=rt.agent.ledger)
    except guest_agent.NoSetpriv as e:
        raise errors.failed_precondition(
            f"{who}: cannot honour the container's runAsUser/runAsGroup in the guest: {e.detail}") from None
    except guest_agent.AgentTimeout as e:
        if given_timeout:
            # What the kubelet counts as a timed-out probe (any other error is "unknown" and dropped).
            raise _deadline_exceeded(f"timeout {given_timeout}s exceeded: {guest_agent.describe(e, who)}") \
                from None
        raise _agent_error(e, who) from None
    except guest_agent.AgentError as e:
        raise _agent_error(e, who) from None


def exec_sync(rt, req: api_pb2.ExecSyncRequest) -> api_pb2.ExecSyncResponse:
    c = _running_container(rt, req.container_id, req.cmd)
    cmd = _check_cmd(req.cmd)
    if req.timeout < 0:
        raise errors.invalid_argument(f"timeout must not be negative (got {req.timeout})")
    bound = min(req.timeout, EXEC_SYNC_MAX) if req.timeout else EXEC_SYNC_MAX
    result = _run(rt, c, cmd, stdin=None, timeout=bound, given_timeout=req.timeout if req.timeout <= EXEC_SYNC_MAX
                  else 0)
    if result.timed_out:
        if req.timeout and req.timeout <= EXEC_SYNC_MAX:
            raise _deadline_exceeded(f"timeout {req.timeout}s exceeded: the command was killed in the guest")
        raise _deadline_exceeded(f"the command ran longer than vmlet's ExecSync bound of {EXEC_SYNC_MAX}s "
                                 "and was killed in the guest (give a timeout, or use Exec)")
    return api_pb2.ExecSyncResponse(stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code)


def check_exec(rt, container_id: str, cmd: list[str], tty: bool, stdin: bool) -> None:
    """Called by the Exec RPC before a URL is handed out."""
    c = _running_container(rt, container_id, cmd)
    if tty:
        raise errors.failed_precondition(
            "tty: the guest agent (qemu-guest-agent 7.2) has no terminals for exec; use `kubectl attach` "
            "(the VM's serial console) for an interactive shell, or exec without -t")
    _user_of(rt, c)
    if rt.agent.connected(c.domain_name) is False:
        raise _agent_error(guest_agent.AgentNotConnected(), _who(rt, c))


def _read_stdin(session: backend.Session) -> bytes | None:
    if session.stdin is None:
        return None
    chunks, size = [], 0
    while not session.closed.is_set():
        data = session.stdin.read(65536)
        if not data:
            break
        size += len(data)
        if size > STDIN_CAP:
            raise errors.failed_precondition(
                f"stdin: more than {STDIN_CAP} bytes; the guest agent takes stdin whole, before the command "
                "starts (qemu-guest-agent has no streaming stdin): copy big inputs in another way")
        chunks.append(data)
    return b"".join(chunks)


def exec_stream(rt, container_id: str, cmd: list[str], session: backend.Session) -> int:
    """Run cmd in the guest for an exec session: stdin read to EOF first, output written when it ends."""
    c = _running_container(rt, container_id, cmd)
    cmd = _check_cmd(cmd)
    if session.tty:
        raise errors.failed_precondition("tty: the guest agent has no terminals; use `kubectl attach`")
    data = _read_stdin(session)
    if session.closed.is_set():
        raise errors.CRIError(grpc.StatusCode.CANCELLED, "the exec session closed before the command started")
    result = _run(rt, c, cmd, stdin=data, timeout=None, cancel=session.closed)
    if result.cancelled:
        return result.exit_code
    for writer, data in ((session.stdout, result.stdout), (session.stderr, result.stderr)):
        if writer is not None and data:
            try:
                writer.write(data)
            except BrokenPipeError:
                break
    return result.exit_code
