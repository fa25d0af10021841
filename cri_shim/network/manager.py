"""NetworkManager: the one object the shim talks to about pod networks.

    nm = NetworkManager(state_dir, cni_conf_dir, cni_bin_dirs, plugin_timeout)
    nm.status()                         -> (ready, reason, message)        Status: NetworkReady
    nm.setup(sandbox_id, ...)           -> PodNetwork                       RunPodSandbox
    nm.check(sandbox_id)                CNI CHECK
    nm.ensure(network)                  -> [repaired...]                    after a shim restart
    nm.teardown(network)                CNI DEL, dnsmasq, links (idempotent) StopPodSandbox
    nm.remove(network)                  teardown + netns + state            RemovePodSandbox
    nm.sweep(known_sandbox_ids)         -> [removed...]                     start-up reconcile

State, under <state_dir>:
    network/<sandbox id>/record.json     written before anything is created (phase "setting-up"),
                                         then with the PodNetwork ("ready"); before teardown starts
                                         ("tearing-down": CNI DEL may have released the IP), then
                                         "stopped"
    network/<sandbox id>/dnsmasq.{pid,leases,log}
    cni/results/<network>-<sandbox id>-eth0   the CNI result cache (cni.py)
Everything a pod gets is named after its sandbox ID (names.py), so teardown
needs nothing but the ID, and a crash at any point leaves only things that
`sweep` finds: a record, a cache entry, an aliased host link, a dnsmasq whose
pidfile lies under network/.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..crashpoints import crashpoint
from . import cni as cnimod
from . import bridge_local, dhcp, links, masquerade, netns
from .errors import CNIConfigError, CNIPluginError, NetworkError, NetworkLost
from .model import BINDINGS, Binding, DNSSettings, PodNetwork, valid_hostname
from .names import (POD_BRIDGE, POD_IFNAME, check_sandbox_id, host_bridge, host_veth, link_alias, netns_name,
                    owner_tag, random_vm_mac)

log = logging.getLogger("vmlet.network")

# dnsmasq's address on br0 under the bridge binding: link-local, /32, and not Calico's 169.254.1.1
# (KubeVirt uses this range for the same purpose).
DHCP_SERVER_CIDR = "169.254.75.10/32"
DHCP_SERVER_IP = DHCP_SERVER_CIDR.split("/")[0]

PHASE_SETTING_UP = "setting-up"
PHASE_READY = "ready"
PHASE_TEARING_DOWN = "tearing-down"
PHASE_STOPPED = "stopped"
TORN_DOWN = (PHASE_TEARING_DOWN, PHASE_STOPPED)  # teardown began (and maybe finished)


class NetworkManager:
    def __init__(self, state_dir: str | os.PathLike, cni_conf_dir: str | os.PathLike = cnimod.DEFAULT_CONF_DIR,
                 cni_bin_dirs: Sequence[str] = cnimod.DEFAULT_BIN_DIRS, plugin_timeout: float = 60.0,
                 dnsmasq: str = dhcp.DEFAULT_DNSMASQ) -> None:
        self.state_dir = Path(state_dir)
        self.records_dir = self.state_dir / "network"
        self.cni = cnimod.CNI(cni_conf_dir, cni_bin_dirs, self.state_dir / "cni" / "results", plugin_timeout)
        self.dnsmasq = dnsmasq
        self.tag = owner_tag(str(self.state_dir.resolve()))
        self._locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._guard = threading.Lock()

    # ------------------------------------------------------------ status

    def status(self) -> tuple[bool, str, str]:
        """(ready, reason, message) for the runtime's NetworkReady condition."""
        conf, problems = cnimod.load_conf_dir(self.cni.conf_dir)
        if conf is None:
            return False, "NetworkPluginNotReady", "cni config uninitialized: " + "; ".join(problems)
        missing = self.cni.missing_plugins(conf)
        if missing:
            return False, "NetworkPluginNotReady", (
                f"CNI network {conf.name!r} ({conf.source}) needs plugins not found in "
                f"{':'.join(self.cni.bin_dirs)}: {', '.join(missing)}")
        for tool in (self.dnsmasq, "nsenter"):
            if shutil.which(tool) is None:
                return False, "NetworkPluginNotReady", f"{tool} not found (Debian packages dnsmasq-base, util-linux)"
        return True, "", f"CNI network {conf.name!r} from {conf.source}"

    # ------------------------------------------------------------ paths and records

    def _lock(self, sandbox_id: str) -> threading.Lock:
        with self._guard:
            return self._locks[sandbox_id]

    def _dir(self, sandbox_id: str) -> Path:
        return self.records_dir / check_sandbox_id(sandbox_id)

    def pidfile(self, sandbox_id: str) -> str:
        return str(self._dir(sandbox_id) / "dnsmasq.pid")

    def _write_record(self, sandbox_id: str, phase: str, network: PodNetwork | None, **extra: Any) -> None:
        d = self._dir(sandbox_id)
        d.mkdir(parents=True, exist_ok=True)
        doc = {"sandbox_id": sandbox_id, "phase": phase, "network": network.to_dict() if network else None, **extra}
        tmp = d / "record.json.tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, d / "record.json")

    def _read_record(self, sandbox_id: str) -> dict[str, Any] | None:
        try:
            return json.loads((self._dir(sandbox_id) / "record.json").read_text())
        except (OSError, ValueError):
            return None

    def get(self, sandbox_id: str) -> PodNetwork | None:
        """The pod network as recorded (None when there is none or setup never finished)."""
        rec = self._read_record(sandbox_id)
        if not rec or not rec.get("network"):
            return None
        try:
            return PodNetwork.from_dict(rec["network"])
        except (KeyError, TypeError, ValueError) as e:
            log.warning("sandbox %s: unreadable network record: %s", sandbox_id[:12], e)
            return None

    @staticmethod
    def _id_of(network: PodNetwork | str) -> str:
        return check_sandbox_id(network.sandbox_id if isinstance(network, PodNetwork) else network)

    # ------------------------------------------------------------ setup

    def setup(self, sandbox_id: str, *, pod_namespace: str, pod_name: str, pod_uid: str,
              dns: DNSSettings | None = None, hostname: str = "", binding: Binding = "bridge") -> PodNetwork:
        """Create the pod's netns, run CNI ADD in it and hand its address to the VM's segment.

        On any failure everything created is removed again (CNI DEL included) and the error
        is raised (NetworkError and subclasses, with the cause in the message)."""
        check_sandbox_id(sandbox_id)
        if binding not in BINDINGS:
            raise ValueError(f"network binding {binding!r} is not one of {', '.join(BINDINGS)}")
        if hostname and not valid_hostname(hostname):
            raise ValueError(f"hostname {hostname!r} is not a valid DNS label")
        args = cnimod.format_args([("IgnoreUnknown", "1"), ("K8S_POD_NAMESPACE", pod_namespace),
                                   ("K8S_POD_NAME", pod_name), ("K8S_POD_INFRA_CONTAINER_ID", sandbox_id),
                                   ("K8S_POD_UID", pod_uid)])
        with self._lock(sandbox_id):
            # Checks that need no side effects come first: nothing to roll back when they fail.
            conf = self.cni.load()
            for t in conf.plugin_types:
                self.cni.plugin_path(t, "ADD")
            if self._read_record(sandbox_id) is not None or netns.exists(netns_name(sandbox_id)):
                raise NetworkError(f"the network of sandbox {sandbox_id[:12]} already exists")
            self._write_record(sandbox_id, PHASE_SETTING_UP, None, binding=binding)
            try:
                network = self._setup(sandbox_id, conf, args, dns or DNSSettings(), hostname, binding)
            except BaseException as e:
                try:
                    self._teardown(sandbox_id)
                    self._remove_rest(sandbox_id)
                except Exception as rollback_error:  # noqa: BLE001
                    log.error("rollback of sandbox %s failed: %s", sandbox_id[:12], rollback_error)
                    e.add_note(f"rolling back failed too: {rollback_error}")
                if isinstance(e, (NetworkError, ValueError)) or not isinstance(e, Exception):
                    raise
                raise NetworkError(f"setting up the network of sandbox {sandbox_id[:12]} failed: {e}") from e
            self._write_record(sandbox_id, PHASE_READY, network)
            log.info("sandbox %s: network %s ready: pod IP %s, %s binding, host bridge %s", sandbox_id[:12],
                     network.cni_network, network.pod_ip, binding, network.host_bridge)
            return network

    def _setup(self, sid: str, conf: cnimod.NetworkConfigList, args, dns: DNSSettings, hostname: str,
               binding: Binding) -> PodNetwork:
        ns = netns_name(sid)
        ns_path = netns.create(ns)
        result = self.cni.add(conf, sid, ns_path, POD_IFNAME, args)
        ips = result.ips_of(POD_IFNAME)
        v4 = [ip for ip in ips if ip.interface_address.version == 4]
        if not v4:
            raise NetworkError(f"CNI network {conf.name!r} gave {POD_IFNAME} no IPv4 address "
                               f"(got {[ip.address for ip in ips] or 'none'}); the VM needs one")
        primary = v4[0].interface_address
        additional = tuple(str(ip.interface_address.ip) for ip in ips if ip.interface_address != primary)
        pod_if = netns.run_in(ns_path, links.read_interface, POD_IFNAME)
        mtu = pod_if.mtu or 1500
        dns = dns.merged_over(result.dns).validated()
        routes = tuple(r for r in pod_if.routes if not r.is_default)
        bridge, veth = host_bridge(sid), host_veth(sid)
        links.host_create(bridge, veth, ns_path, mtu, link_alias(self.tag, sid))
        if binding == "bridge":
            # The VM takes over the pod's address and eth0's MAC (plugins may pin the MAC, as virtlet knew).
            vm_mac = pod_if.mac
            vm_ip, vm_prefix, vm_gw = str(primary.ip), primary.network.prefixlen, pod_if.gateway
            netns.run_in(ns_path, links.wire_bridge_binding, vm_mac, DHCP_SERVER_CIDR, mtu, vm_ip)
            self._apply_local_delivery(ns_path)
        else:
            vm_mac = random_vm_mac()
            vm_ip, vm_prefix, vm_gw = masquerade.VM_IP, masquerade.VM_SUBNET.prefixlen, masquerade.VM_GATEWAY
            netns.run_in(ns_path, links.wire_masquerade_binding,
                         f"{masquerade.VM_GATEWAY}/{masquerade.VM_SUBNET.prefixlen}", mtu)
            masquerade.apply(ns_path, [str(primary.ip)])
        network = PodNetwork(
            sandbox_id=sid, binding=binding, netns_name=ns, netns_path=ns_path, host_bridge=bridge,
            host_veth=veth, vm_mac=vm_mac, pod_ip=str(primary.ip), additional_ips=additional,
            prefixlen=primary.network.prefixlen, gateway=pod_if.gateway, routes=routes, mtu=mtu, dns=dns,
            hostname=hostname, cni_network=conf.name, cni_version=conf.cni_version, vm_ip=vm_ip,
            vm_prefixlen=vm_prefix, vm_gateway=vm_gw)
        pid = self._start_dhcp(network)
        return dataclasses.replace(network, dnsmasq_pid=pid)

    @staticmethod
    def _apply_local_delivery(ns_path: str) -> None:
        bridge_local.apply(ns_path, DHCP_SERVER_IP, netns.run_in(ns_path, links.bridge_mac))

    @staticmethod
    def _local_delivery_present(ns_path: str) -> bool:
        try:
            mac = netns.run_in(ns_path, links.bridge_mac)
        except LookupError:
            return False
        return bridge_local.present(ns_path, DHCP_SERVER_IP, mac)

    def lease(self, network: PodNetwork) -> dhcp.Lease:
        return dhcp.Lease(interface=POD_BRIDGE, vm_mac=network.vm_mac, vm_ip=network.vm_ip,
                          prefixlen=network.vm_prefixlen, gateway=network.vm_gateway,
                          routes=network.routes if network.binding == "bridge" else (),
                          dns=network.dns, hostname=network.hostname, mtu=network.mtu,
                          shared_network=network.binding == "bridge")

    def _start_dhcp(self, network: PodNetwork) -> int:
        d = self._dir(network.sandbox_id)
        pidfile = str(d / "dnsmasq.pid")
        args = dhcp.dnsmasq_args(self.lease(network), pidfile, str(d / "dnsmasq.leases"), str(d / "dnsmasq.log"))
        return dhcp.start(network.netns_path, args, pidfile, self.dnsmasq)

    # ------------------------------------------------------------ check / ensure

    def check(self, network: PodNetwork | str) -> None:
        """Verify a ready pod's network; raise NetworkError naming what is broken (NetworkLost: netns gone).

        Checks vmlet's own wiring (host bridge + veth, br0 in the pod netns, NAT rules, dnsmasq),
        then, for the masquerade binding, runs CNI CHECK. The bridge binding hands eth0's MAC and
        addresses to the VM on purpose, so a plugin's CHECK of eth0 cannot pass there and is skipped."""
        sid = self._id_of(network)
        pn = network if isinstance(network, PodNetwork) else self.get(sid)
        if pn is None:
            raise NetworkError(f"sandbox {sid[:12]} has no pod network")
        problems = self._problems(pn)
        if problems:
            raise NetworkError(f"the network of sandbox {sid[:12]} is broken: " + "; ".join(problems))
        if pn.binding == "masquerade":
            self.cni.check(sid, pn.netns_path, POD_IFNAME)

    def _problems(self, pn: PodNetwork) -> list[str]:
        if not netns.exists(pn.netns_name):
            raise NetworkLost(f"the network namespace {pn.netns_name} of sandbox {pn.sandbox_id[:12]} is gone")
        problems = []
        if not links.host_present(pn.host_bridge, pn.host_veth):
            problems.append(f"host bridge {pn.host_bridge} / veth {pn.host_veth} missing")
        if not netns.run_in(pn.netns_path, links.pod_wired, pn.binding, pn.vm_ip, DHCP_SERVER_CIDR):
            problems.append(f"{POD_BRIDGE} in {pn.netns_name} is not wired")
        if pn.binding == "masquerade" and not masquerade.present(pn.netns_path):
            problems.append("masquerade rules missing")
        if pn.binding == "bridge" and not self._local_delivery_present(pn.netns_path):
            problems.append(f"the local delivery rule for {DHCP_SERVER_IP} on {POD_BRIDGE} is missing")
        if dhcp.running_pid(self.pidfile(pn.sandbox_id)) is None:
            problems.append("dnsmasq is not running")
        return problems

    def phase(self, sandbox_id: str) -> str | None:
        """The recorded phase of the sandbox's network (PHASE_*), None when it has no record."""
        return (self._read_record(check_sandbox_id(sandbox_id)) or {}).get("phase")

    def teardown_interrupted(self, sandbox_id: str) -> bool:
        """Teardown began and never finished, or finished without the sandbox learning of it (a crash)."""
        return self.phase(sandbox_id) in TORN_DOWN

    def stop_dhcp(self, sandbox_id: str) -> None:
        """Stop the pod's dnsmasq (the first step of teardown), nothing else."""
        with self._lock(check_sandbox_id(sandbox_id)):
            dhcp.stop(self.pidfile(sandbox_id))

    def ensure(self, network: PodNetwork | str) -> list[str]:
        """Repair a ready pod's network after a restart: links, wiring, NAT rules, dnsmasq.

        Returns what had to be repaired; raises NetworkLost when the netns, eth0 or CNI's result
        is gone (nothing vmlet may re-create). A network being torn down is left alone."""
        sid = self._id_of(network)
        with self._lock(sid):
            pn = network if isinstance(network, PodNetwork) else self.get(sid)
            rec = self._read_record(sid) or {}
            if rec.get("phase") in TORN_DOWN or (pn and pn.state == PHASE_STOPPED):
                return []  # nothing to repair in a network being (or already) torn down
            if pn is None:
                raise NetworkLost(f"the network record of sandbox {sid[:12]} is missing or unreadable")
            if not netns.exists(pn.netns_name):
                raise NetworkLost(f"the network namespace {pn.netns_name} of sandbox {sid[:12]} is gone "
                                  "(host reboot?): the pod's network cannot be repaired")
            lost = self._lost_facts(pn)
            if lost:
                raise NetworkLost(f"the network of sandbox {sid[:12]} cannot be repaired: " + "; ".join(lost))
            repaired: list[str] = []
            if not links.host_present(pn.host_bridge, pn.host_veth):
                links.host_create(pn.host_bridge, pn.host_veth, pn.netns_path, pn.mtu, link_alias(self.tag, sid))
                repaired.append(f"host bridge {pn.host_bridge} / veth {pn.host_veth}")
            if not netns.run_in(pn.netns_path, links.pod_wired, pn.binding, pn.vm_ip, DHCP_SERVER_CIDR):
                if pn.binding == "bridge":
                    netns.run_in(pn.netns_path, links.wire_bridge_binding, pn.vm_mac, DHCP_SERVER_CIDR, pn.mtu,
                                 pn.vm_ip)
                else:
                    netns.run_in(pn.netns_path, links.wire_masquerade_binding,
                                 f"{masquerade.VM_GATEWAY}/{masquerade.VM_SUBNET.prefixlen}", pn.mtu)
                repaired.append(f"{POD_BRIDGE} in {pn.netns_name}")
            if pn.binding == "masquerade" and not masquerade.present(pn.netns_path):
                masquerade.apply(pn.netns_path, [pn.pod_ip])
                repaired.append("masquerade rules")
            # After br0's re-creation too: the rule names br0's MAC, which is new then.
            if pn.binding == "bridge" and not self._local_delivery_present(pn.netns_path):
                self._apply_local_delivery(pn.netns_path)
                repaired.append(f"local delivery for {DHCP_SERVER_IP}")
            pid = dhcp.running_pid(self.pidfile(sid))
            if pid is None:
                pid = self._start_dhcp(pn)
                repaired.append(f"dnsmasq (pid {pid})")
            if pid != pn.dnsmasq_pid or repaired:
                self._write_record(sid, PHASE_READY, dataclasses.replace(pn, dnsmasq_pid=pid))
            if repaired:
                log.warning("sandbox %s: repaired %s", sid[:12], ", ".join(repaired))
            return repaired

    # ------------------------------------------------------------ teardown

    def teardown(self, network: PodNetwork | str) -> None:
        """StopPodSandbox: stop dnsmasq, unwire, CNI DEL (also when the netns is gone), delete host links.

        Idempotent. Raises NetworkError when CNI DEL failed (the cache entry is kept for a retry)."""
        sid = self._id_of(network)
        with self._lock(sid):
            self._finish_teardown(sid, self._read_record(sid))

    def remove(self, network: PodNetwork | str) -> None:
        """RemovePodSandbox: teardown if needed, then the netns and all state. Idempotent."""
        sid = self._id_of(network)
        with self._lock(sid):
            self._mark_tearing_down(sid, self._read_record(sid))
            self._teardown(sid)
            self._remove_rest(sid)

    def _mark_tearing_down(self, sid: str, rec: dict[str, Any] | None) -> None:
        """Record that teardown starts (before CNI DEL), so a crash from here on is not mistaken for a ready pod."""
        if rec is not None and rec.get("phase") == PHASE_READY:
            self._write_record(sid, PHASE_TEARING_DOWN, self.get(sid), binding=rec.get("binding"))

    def _finish_teardown(self, sid: str, rec: dict[str, Any] | None) -> None:
        self._mark_tearing_down(sid, rec)
        self._teardown(sid)
        if rec is not None and rec.get("phase") != PHASE_STOPPED:
            pn = self.get(sid)
            self._write_record(sid, PHASE_STOPPED, dataclasses.replace(pn, state="stopped", dnsmasq_pid=0)
                               if pn else None, binding=rec.get("binding"))

    def _lost_facts(self, pn: PodNetwork) -> list[str]:
        """What a ready pod's network lost that vmlet cannot give back: CNI's result, eth0, the pod IP on it.

        Re-creating vmlet's own links over a released IP would hand the VM an address IPAM may
        already have given to another pod."""
        lost = []
        entry = self.cni.cached(pn.sandbox_id, POD_IFNAME)
        if entry is None:
            lost.append(f"CNI has no result for {POD_IFNAME} (CNI DEL ran: its IP {pn.pod_ip} is released)")
        elif entry.result is not None:
            try:
                ips = {str(ip.interface_address.ip) for ip in cnimod.parse_result(entry.result).ips_of(POD_IFNAME)}
            except Exception as e:  # noqa: BLE001 - an unreadable cached result is a lost one
                ips = set()
                lost.append(f"the cached CNI result is unreadable: {e}")
            if ips and pn.pod_ip not in ips:
                lost.append(f"CNI's result gives {POD_IFNAME} {sorted(ips)}, not the pod IP {pn.pod_ip}")
        try:
            pod_if = netns.run_in(pn.netns_path, links.read_interface, POD_IFNAME)
        except LookupError:
            lost.append(f"{POD_IFNAME} is gone from {pn.netns_name}")
        else:
            # The masquerade binding leaves the pod IP on eth0; the bridge binding moved it to the VM.
            if pn.binding == "masquerade" and not any(a.split("/")[0] == pn.pod_ip for a in pod_if.addresses):
                lost.append(f"{POD_IFNAME} in {pn.netns_name} no longer has the pod IP {pn.pod_ip}")
        return lost

    def _teardown(self, sid: str) -> None:
        errors: list[str] = []
        ns = netns_name(sid)
        ns_path = netns.path_of(ns)
        have_ns = netns.exists(ns)
        dhcp.stop(self.pidfile(sid))
        if have_ns:
            try:
                netns.run_in(ns_path, links.pod_unwire)
                if shutil.which("nft"):
                    masquerade.remove(ns_path)
                    bridge_local.remove(ns_path)
            except Exception as e:  # noqa: BLE001
                errors.append(f"unwiring {ns}: {e}")
        try:
            self.cni.delete(sid, POD_IFNAME, ns_path if have_ns else "")
        except (CNIPluginError, CNIConfigError) as e:
            errors.append(str(e))
        crashpoint("network.teardown.after-cni-del")
        try:
            links.host_delete(host_bridge(sid), host_veth(sid))
        except Exception as e:  # noqa: BLE001
            errors.append(f"deleting host links: {e}")
        if errors:
            raise NetworkError(f"tearing down the network of sandbox {sid[:12]}: " + "; ".join(errors))

    def _remove_rest(self, sid: str) -> None:
        netns.remove(netns_name(sid))
        shutil.rmtree(self._dir(sid), ignore_errors=True)

    # ------------------------------------------------------------ reconcile

    def sweep(self, known_sandbox_ids: Iterable[str]) -> list[str]:
        """Remove every pod network of this instance whose sandbox the shim does not know.

        Also tears down known sandboxes whose setup never finished (a crash inside setup: the
        shim never got their PodNetwork). Call it at start-up, before serving."""
        known = set(known_sandbox_ids)
        removed: list[str] = []
        if self.records_dir.is_dir():
            for d in sorted(self.records_dir.iterdir()):
                sid = d.name
                try:
                    check_sandbox_id(sid)
                except ValueError:
                    continue
                rec = self._read_record(sid) or {}
                try:
                    if sid not in known:
                        self.remove(sid)
                        removed.append(f"sandbox {sid}")
                    elif rec.get("phase", PHASE_SETTING_UP) == PHASE_SETTING_UP:
                        self.remove(sid)
                        removed.append(f"half-set-up sandbox {sid}")
                except NetworkError as e:
                    log.error("sweep: %s", e)
        for entry in self.cni.cache_entries():
            if entry.container_id in known:
                continue
            ns = netns.path_of(netns_name(entry.container_id)) if len(entry.container_id) >= 16 else ""
            try:
                self.cni.delete(entry.container_id, entry.ifname, ns if ns and netns.exists(ns) else "")
                removed.append(f"CNI {entry.network}/{entry.container_id}/{entry.ifname}")
            except (CNIPluginError, CNIConfigError) as e:
                log.error("sweep: CNI DEL of %s failed: %s", entry.path.name, e)
        for sid, names in links.host_links(self.tag).items():
            if sid not in known:
                links.host_delete(host_bridge(sid), host_veth(sid))
                removed += [f"link {n}" for n in names]
        prefix = str(self.records_dir) + "/"
        for pid in dhcp.find_processes(prefix):
            pidfile = dhcp.pidfile_of(pid) or ""
            sid = pidfile[len(prefix):].split("/", 1)[0]
            if sid not in known:
                dhcp.stop(pidfile)
                removed.append(f"dnsmasq {pid}")
        if removed:
            log.warning("swept leftovers: %s", ", ".join(removed))
        return removed


__all__ = ["NetworkManager", "DHCP_SERVER_CIDR", "DHCP_SERVER_IP"]
