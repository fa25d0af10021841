"""PortForward: each forwarded connection is a TCP connection to the guest, opened inside the pod's netns.

The kubelet's runtimes dial localhost:PORT inside the pod's network
namespace; a VM pod's workload is not there but behind it, at the address
recorded with the pod network (network/model.py `PodNetwork.vm_ip`): the pod
IP under the bridge binding, the guest's private 10.0.2.2 under masquerade.
The socket is opened by a short-lived thread inside the namespace
(`netns.connect_tcp`), so it reaches the guest over the pod's own segment and
no other thread changes namespace.

Bytes are copied both ways through one bounded buffer per direction (the
reads block until the other side has taken the previous chunk), and a
half-close is passed on: the client's EOF becomes shutdown(SHUT_WR) towards
the guest, the guest's EOF becomes `close_write()` towards the client; the
call returns once both directions ended or the stream closed. TCP only, as
with kubectl: a port the pod declares only as UDP (or SCTP) is refused.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading

from proto.runtime.v1 import api_pb2

from . import errors
from .network import netns

log = logging.getLogger("vmlet.portforward")

CONNECT_TIMEOUT = 10.0
CHUNK = 64 * 1024
POLL_INTERVAL = 0.5  # how often a copy waiting on the guest looks at stream.closed


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
    """Forward one connection: returns when both directions are done or the stream closed.

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
    try:
        _copy(sock, stream, f"pf-{sb.id[:8]}-{port}")
    finally:
        sock.close()


def _copy(sock: socket.socket, stream, name: str) -> None:
    upstream_done = threading.Event()

    def client_to_guest() -> None:
        try:
            while True:
                data = stream.read(CHUNK)
                if not data:
                    break
                sock.sendall(data)
        except OSError as e:  # the guest reset the connection; the other direction sees it too
            log.debug("%s: to the guest: %s", name, e)
        finally:
            upstream_done.set()
            try:
                sock.shutdown(socket.SHUT_WR)  # the client's EOF, passed on
            except OSError:
                pass

    up = threading.Thread(target=client_to_guest, name=name, daemon=True)
    up.start()
    try:
        if _guest_to_client(sock, stream, name):
            # The guest is done sending; the client may still be (a half-closed request).
            while not upstream_done.wait(POLL_INTERVAL):
                if stream.closed.is_set():
                    break
    finally:
        up.join(POLL_INTERVAL)


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
