"""PortForward: each forwarded connection is a TCP connection to the guest, opened inside the pod's netns.

The kubelet's runtimes dial localhost:PORT inside the pod's network
namespace; a VM pod's workload is not there but behind it, at the address
recorded with the pod network (network/model.py `PodNetwork.vm_ip`): the pod
IP under the bridge binding, the guest's private 10.0.2.2 under masquerade.
The socket is opened by a short-lived thread inside the namespace
(`netns.connect_tcp`), so it reaches the guest over the pod's own segment and
no other thread changes namespace.

Bytes are copied both ways through one bounded buffer per direction (the reads
block until the other side has taken the previous chunk), and a half-close is
passed on: the client's EOF becomes shutdown(SHUT_WR) towards the guest, the
guest's EOF becomes `close_write()` towards the client. The call returns once
both directions ended, the stream closed, or GRACE after the guest's side
ended first (as containerd's portForward): a v4 WebSocket client cannot
half-close and hears of the guest's close only when the call returned, and
older client-go closed the local connection only then too, so waiting for the
client's EOF would hang both. The client's EOF first leaves the guest all the
time it needs to answer. The guest connection is shut down before it is
closed, so a copy blocked sending to a guest that does not read wakes up; when
such a copy is cut short, the close resets the connection (the guest would
otherwise keep it open behind the unsent data). TCP only, as with kubectl: a
port the pod declares only as UDP (or SCTP) is refused.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import threading

from proto.runtime.v1 import api_pb2

from . import errors
from .network import netns

log = logging.getLogger("vmlet.portforward")

CONNECT_TIMEOUT = 10.0
CHUNK = 64 * 1024
POLL_INTERVAL = 0.5  # how often a copy waiting on the guest looks at stream.closed
GRACE = 1.0  # after the guest's side ended, how long the client's side may go on (containerd: 1 s)


def _sandbox(rt, pod_sandbox_id: str):
    sb = rt.sandbox(pod_sandbox_id)
    if sb.state != api_pb2.SANDBOX_READY:
        raise errors.failed_precondition(f"pod sandbox {errors.show(pod_sandbox_id)} is not ready: "
                                         "port-forward needs a running pod")
    return sb


def _check_port(rt, sb, port, field: str) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port <= 65535:
        raise errors.invalid_argument(f"{field}: {errors.show(str(port))} is not a TCP port (1-65535)")
    protocols = {pm.protocol for pm in rt.sandbox_config(sb).port_mappings if pm.container_port == port}
    if protocols and api_pb2.TCP not in protocols:
        names = "/".join(sorted(api_pb2.Protocol.Name(p) for p in protocols))
        raise errors.invalid_argument(
            f"{field}: port {port} is declared {names} only in the pod's port_mappings; "
            "port-forward is TCP only")


def check_port_forward(rt, pod_sandbox_id: str, ports: list[int]) -> None:
    """Called by the PortForward RPC before a URL is handed out (NotFound, FailedPrecondition, InvalidArgument)."""
    sb = _sandbox(rt, pod_sandbox_id)
    for i, port in enumerate(ports):
        _check_port(rt, sb, port, f"port[{i}]")
    _target(rt, sb)


def _target(rt, sb) -> tuple[str, str, str]:
    """(netns path, netns name, guest address) of a ready sandbox."""
    pn = rt.network.get(sb.id)
    if pn is None or pn.state != "ready" or not pn.vm_ip:
        raise errors.failed_precondition(f"pod sandbox {sb.id[:12]} has no pod network to forward into")
    return pn.netns_path, pn.netns_name, pn.vm_ip


def _strerror(e: OSError) -> str:
    if isinstance(e, (socket.timeout, TimeoutError)) and not e.errno:
        return "i/o timeout"
    return os.strerror(e.errno).lower() if e.errno else str(e)


def forward_stream(rt, pod_sandbox_id: str, port: int, stream) -> None:
    """Forward one connection: returns when both directions are done, the stream closed, or GRACE after the
    guest's side ended while the client's had not.

    Raises errors.CRIError when the guest cannot be reached (the message goes to the client). On return, a
    copy thread blocked in the stream's read ends as soon as the server closes the stream."""
    sb = _sandbox(rt, pod_sandbox_id)
    _check_port(rt, sb, port, "port")
    ns_path, ns_name, host = _target(rt, sb)
    try:
        sock = netns.connect_tcp(ns_path, host, port, CONNECT_TIMEOUT)
    except OSError as e:
        raise errors.failed_precondition(
            f"failed to connect to {host}:{port} inside namespace {ns_name} of pod sandbox {sb.id[:12]}: "
            f"{_strerror(e)}") from None
    _copy(sock, stream, f"pf-{sb.id[:8]}-{port}")


def _copy(sock: socket.socket, stream, name: str) -> None:
    """Copy both ways; closes sock once neither this call nor the copy thread still uses it."""
    upstream_done = threading.Event()
    sending = threading.Event()  # the copy thread is inside sendall (it may block on a guest that does not read)
    users = [2]
    users_lock = threading.Lock()

    def release() -> None:
        # The last user closes: closing under a thread still in a call would let a reused fd number take its data.
        with users_lock:
            users[0] -= 1
            last = users[0] == 0
        if last:
            sock.close()

    def client_to_guest() -> None:
        try:
            while True:
                data = stream.read(CHUNK)
                if not data:
                    break
                sending.set()
                sock.sendall(data)
                sending.clear()
        except OSError as e:  # the guest reset the connection, or the forward ended while we were sending
            log.debug("%s: to the guest: %s", name, e)
        finally:
            upstream_done.set()
            try:
                sock.shutdown(socket.SHUT_WR)  # the client's EOF, passed on
            except OSError:
                pass
            release()

    up = threading.Thread(target=client_to_guest, name=name, daemon=True)
    try:
        up.start()
    except BaseException:
        release()  # the thread's share: it never ran
        release()
        raise
    try:
        if _guest_to_client(sock, stream, name):
            # The guest is done sending; the client may still be (the rest of a request), for GRACE at most.
            upstream_done.wait(GRACE)
    finally:
        if not upstream_done.is_set() and sending.is_set():
            # Cut short while the guest was not taking the client's data: reset rather than leave the guest a
            # connection whose FIN waits behind data nobody will read (an orphan until the kernel gives up).
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes a sendall blocked in the copy thread; close() would not
        except OSError:
            pass
        up.join(POLL_INTERVAL)
        release()


def _guest_to_client(sock: socket.socket, stream, name: str) -> bool:
    """Copy until the guest's EOF (True) or a broken connection, the client gone or the stream closed (False)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
    while not stream.closed.is_set():
        if not poller.poll(POLL_INTERVAL * 1000):
            continue
        try:
            data = sock.recv(CHUNK)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EINTR):
                continue
            log.debug("%s: from the guest: %s", name, e)  # reset: nothing more either way
            return False
        if not data:
            try:
                stream.close_write()  # the guest's EOF, passed on
            except OSError:
                return False
            return True
        try:
            stream.write(data)
        except OSError:  # the client went away
            return False
    return False
