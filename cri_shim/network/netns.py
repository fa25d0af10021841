"""Named network namespaces (/run/netns/<name>, iproute2's convention) without fork().

The shim is a multi-threaded gRPC server, where fork() is unsafe (pyroute2's
`netns.create` and `NetNS` fork a helper). A network namespace is a per-thread
attribute on Linux, so everything here works the way Go's CNI `ns` package
does: a short-lived thread enters (setns) or creates (unshare) the namespace,
does its work there — netlink sockets it opens stay bound to that namespace,
/proc/sys/net it opens is that namespace's — and exits. The bind mount that
names a namespace is made with pyroute2's `netns.attach` on that thread's
/proc/thread-self/ns/net; removal is pyroute2's `netns.remove`.

Processes that must live in a namespace (dnsmasq, nft) are exec'd through
`nsenter --net=<path>`, which enters and execs: no Python runs in the child.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import subprocess
import threading
from pathlib import Path
from typing import Callable, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from .errors import NetworkError

NETNS_DIR = Path(pr_netns.NETNS_RUN_DIR)
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def path_of(name: str) -> str:
    return str(NETNS_DIR / name)


def _nsfs_dev() -> int:
    return os.stat("/proc/self/ns/net").st_dev


def exists(name_or_path: str) -> bool:
    """True when the name is a mounted network namespace (an empty file left by a crash is not)."""
    p = name_or_path if name_or_path.startswith("/") else path_of(name_or_path)
    try:
        return os.stat(p).st_dev == _nsfs_dev()
    except OSError:
        return False


def list_names() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def _in_thread(fn: Callable[[], T]) -> T:
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=run, name="vmlet-netns", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


def create(name: str) -> str:
    """Create the named namespace with its loopback up; fail if it exists. Returns its path."""
    p = path_of(name)
    if exists(p):
        raise FileExistsError(errno.EEXIST, f"network namespace {name} already exists", p)
    if os.path.lexists(p):
        os.unlink(p)  # an unmounted placeholder from an interrupted create

    def work() -> str:
        if _libc.unshare(CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"unshare(CLONE_NEWNET): {os.strerror(e)}")
        pr_netns.attach(name, "thread-self")  # bind-mounts /proc/thread-self/ns/net on /run/netns/<name>
        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return p

    try:
        return _in_thread(work)
    except BaseException:
        remove(name)
        raise


def remove(name: str) -> bool:
    """Unmount and delete the name (the namespace dies with its last user). Idempotent."""
    p = path_of(name)
    if not os.path.lexists(p):
        return False
    try:
        pr_netns.remove(name)
    except FileNotFoundError:
        return False
    return True


def run_in(name_or_path: str, fn: Callable[..., T], *args, **kwargs) -> T:
    """Run fn(*args) on a thread inside the namespace; its netlink sockets and /proc/sys/net are the namespace's."""
    p = name_or_path if name_or_path.startswith("/") else path_of(name_or_path)
    fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)

    def work() -> T:
        _setns(fd)
        return fn(*args, **kwargs)

    try:
        return _in_thread(work)
    finally:
        os.close(fd)


def nsenter_argv(name_or_path: str) -> list[str]:
    """argv prefix that execs a command inside the namespace."""
    p = name_or_path if name_or_path.startswith("/") else path_of(name_or_path)
    return ["nsenter", f"--net={p}", "--"]


def nft(netns_path: str, stdin: str | None, *args: str) -> subprocess.CompletedProcess:
    """Run `nft ARGS` inside the namespace with `stdin` as its input (rulesets); the caller reads the result."""
    argv = nsenter_argv(netns_path) + ["nft", *args]
    try:
        return subprocess.run(argv, input=(stdin or "").encode(), capture_output=True, timeout=30)
    except FileNotFoundError as e:
        raise NetworkError(f"cannot run nft (Debian package nftables): {e}") from None
    except subprocess.TimeoutExpired:
        raise NetworkError("nft did not finish within 30s") from None


def write_sysctl(key: str, value: str) -> bool:
    """Write /proc/sys/<key> (slash-separated: interface names may hold dots) of the calling
    thread's namespace; False if the key does not exist."""
    try:
        with open("/proc/sys/" + key, "w") as f:
            f.write(value)
        return True
    except FileNotFoundError:
        return False


def read_sysctl(key: str) -> str | None:
    try:
        return Path("/proc/sys/" + key).read_text().strip()
    except FileNotFoundError:
        return None


def connect_tcp(name_or_path: str, host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to host:port opened from inside the namespace (blocking, close-on-exec).

    The socket is made on a short-lived thread that entered the namespace and
    stays bound to it after that thread ends; no other thread changes
    namespace. Raises OSError (ConnectionRefusedError, TimeoutError, ...)."""

    def work() -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.settimeout(timeout)
            s.connect((host, port))
            s.settimeout(None)
        except BaseException:
            s.close()
            raise
        return s

    return run_in(name_or_path, work)
