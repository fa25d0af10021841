"""The shim's view of libvirtd: one connection, an event loop, domain operations.

libvirt-python needs its default event loop registered before the first
connection opens and running in a thread for lifecycle events to arrive;
this module owns both. Domain lifecycle events are handed to listeners as
(domain name, event, detail) so the runtime can record exits as they happen;
guest agent lifecycle events (connected/disconnected) to agent listeners as
(domain name, state, reason).
Operations tolerate "already gone" so Stop/Remove stay idempotent.

libvirtd may restart under a running vmlet (an upgrade, a crash): the VMs keep
running, but the connection and its event registration die with the old
daemon. A close callback notices at once and a background thread reconnects
(retrying while libvirtd is down), registers the events again, and reports
every shut-off domain to the listeners as stopped, so an exit that happened
while no events could arrive is recorded too (listeners are idempotent).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import libvirt

from . import domain_xml

log = logging.getLogger("vmlet.libvirt")

LifecycleListener = Callable[[str, int, int], None]
# (domain name, agent state, reason); domain None after a reconnect: every agent state is unknown again.
AgentListener = Callable[["str | None", int, int], None]

_event_loop_lock = threading.Lock()
_event_loop_started = False

# libvirt prints every error to stderr by default; errors reach us as exceptions.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def _start_event_loop() -> None:
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


RECONNECT_INTERVAL = 1.0  # s between attempts while libvirtd is down


def _close_quietly(conn: libvirt.virConnect) -> None:
    """Drop a connection whose libvirtd went away: its callbacks and its handle (one leaked per restart else)."""
    for release in (conn.unregisterCloseCallback, conn.close):
        try:
            release()
        except libvirt.libvirtError:
            pass


def _is_missing(e: libvirt.libvirtError) -> bool:
    return e.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN,)


class LibvirtHost:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._lock = threading.RLock()
        self._conn: libvirt.virConnect | None = None
        self._listeners: list[LifecycleListener] = []
        self._agent_listeners: list[AgentListener] = []
        self._closed = False
        self._connected_before = False
        self._reconnecting = threading.Lock()  # one reconnect thread at a time
        _start_event_loop()

    # -------------------------------------------------------------- connection

    def conn(self) -> libvirt.virConnect:
        """The connection, reopened if libvirtd restarted meanwhile.

        libvirt.open() runs without the lock: while libvirtd is down every caller fails fast on its own
        instead of queueing behind one that waits on the socket."""
        with self._lock:
            current = self._conn
            if current is not None:
                try:
                    if current.isAlive():
                        return current
                except libvirt.libvirtError:
                    pass
                log.warning("libvirt connection to %s lost; reconnecting", self.uri)
                self._conn = None
        if current is not None:
            _close_quietly(current)
        conn = libvirt.open(self.uri)
        with self._lock:
            if self._conn is not None:  # another thread reconnected first
                winner = self._conn
            else:
                winner = None
                try:
                    conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle,
                                                None)
                    # The guest agent's channel opening/closing (qemu-ga started or gone), beside the lifecycle
                    # events and re-registered with them on every new connection.
                    conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE,
                                                self._on_agent_lifecycle, None)
                    conn.setKeepAlive(5, 3)
                    conn.registerCloseCallback(self._on_close, None)
                except libvirt.libvirtError:
                    _close_quietly(conn)  # libvirtd went away again right after open()
                    raise
                self._conn = conn
                replay = self._connected_before
                self._connected_before = True
        if winner is not None:
            _close_quietly(conn)
            return winner
        if replay:
            log.info("reconnected to libvirtd at %s", self.uri)
            self._notify_agent(None, 0, 0)
            self._replay_stopped(conn)
        return conn

    def _on_close(self, conn, reason: int, _opaque) -> None:
        # On libvirt's event loop thread: never block it; reconnect from a thread of our own.
        if self._closed:
            return
        log.warning("libvirt connection to %s closed (reason %d); reconnecting in the background", self.uri, reason)
        threading.Thread(target=self._reconnect, name="libvirt-reconnect", daemon=True).start()

    def _reconnect(self) -> None:
        if not self._reconnecting.acquire(blocking=False):
            return
        try:
            failures = 0
            while not self._closed:
                try:
                    self.conn()
                    return
                except libvirt.libvirtError as e:
                    failures += 1
                    if failures == 1 or failures % 30 == 0:
                        log.warning("libvirtd at %s not answering yet (%s); retrying", self.uri, e)
                    time.sleep(RECONNECT_INTERVAL)
        finally:
            self._reconnecting.release()

    def _replay_stopped(self, conn: libvirt.virConnect) -> None:
        """Report every shut-off domain as stopped: events of the time without a connection are lost."""
        try:
            stopped = [d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE)]
        except libvirt.libvirtError as e:
            log.warning("cannot list domains after reconnecting: %s", e)
            return
        for name in stopped:
            self._notify(name, libvirt.VIR_DOMAIN_EVENT_STOPPED, 0)

    def alive(self) -> tuple[bool, str]:
        try:
            self.conn().getLibVersion()
            return True, ""
        except libvirt.libvirtError as e:
            return False, str(e)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                except libvirt.libvirtError:
                    pass
                self._conn = None

    def add_lifecycle_listener(self, listener: LifecycleListener) -> None:
        self._listeners.append(listener)

    def _on_lifecycle(self, _conn, dom, event: int, detail: int, _opaque) -> None:
        self._notify(dom.name(), event, detail)

    def add_agent_listener(self, listener: AgentListener) -> None:
        self._agent_listeners.append(listener)

    def _on_agent_lifecycle(self, _conn, dom, state: int, reason: int, _opaque) -> None:
        self._notify_agent(dom.name(), state, reason)

    def _notify_agent(self, name: str | None, state: int, reason: int) -> None:
        for listener in self._agent_listeners:
            try:
                listener(name, state, reason)
            except Exception:  # noqa: BLE001 - a listener bug must not stop the event loop
                log.exception("agent lifecycle listener failed for %s", name)

    def _notify(self, name: str, event: int, detail: int) -> None:
        for listener in self._listeners:
            try:
                listener(name, event, detail)
            except Exception:  # noqa: BLE001 - a listener bug must not stop the event loop
                log.exception("lifecycle listener failed for %s", name)

    # -------------------------------------------------------------- domains

    def lookup(self, name: str) -> libvirt.virDomain | None:
        try:
            return self.conn().lookupByName(name)
        except libvirt.libvirtError as e:
            if _is_missing(e):
                return None
            raise

    def define(self, xml: str) -> libvirt.virDomain:
        return self.conn().defineXML(xml)

    def start(self, name: str) -> None:
        dom = self.lookup(name)
        if dom is None:
            raise LookupError(f"domain {name} does not exist")
        if not dom.isActive():
            dom.create()

    def state(self, name: str) -> tuple[int, int] | None:
        """(libvirt state, reason), or None when the domain does not exist."""
        dom = self.lookup(name)
        if dom is None:
            return None
        try:
            return tuple(dom.state())  # type: ignore[return-value]
        except libvirt.libvirtError as e:
            if _is_missing(e):
                return None
            raise

    def is_active(self, name: str) -> bool:
        st = self.state(name)
        return st is not None and st[0] not in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED)

    def _apply(self, name: str, operation: Callable[[libvirt.virDomain], object], tolerate_inactive: bool) -> None:
        """Run `operation` on the domain; a domain already gone (or not running, if tolerated) is no error."""
        dom = self.lookup(name)
        if dom is None:
            return
        try:
            operation(dom)
        except libvirt.libvirtError as e:
            inactive = e.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID
            if not (_is_missing(e) or (tolerate_inactive and inactive)):
                raise

    def shutdown(self, name: str) -> None:
        """Press the ACPI power button (the guest decides)."""
        self._apply(name, lambda d: d.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN), True)

    def destroy(self, name: str) -> None:
        self._apply(name, lambda d: d.destroy(), True)

    def undefine(self, name: str) -> None:
        self.destroy(name)
        self._apply(name, lambda d: d.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM), False)

    def vmlet_domains(self, instance: str) -> dict[str, dict[str, str]]:
        """Every domain this vmlet instance created (per its metadata): name -> metadata."""
        out = {}
        for dom in self.conn().listAllDomains():
            try:
                md = domain_xml.read_metadata(dom.XMLDesc())
            except libvirt.libvirtError as e:
                if _is_missing(e):
                    continue
                raise
            if md.get("instance") == instance and md.get("container-id"):
                out[dom.name()] = md
        return out
