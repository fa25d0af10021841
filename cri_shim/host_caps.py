"""What this host's hypervisor can run, from libvirt's domain capabilities: checked at CreateContainer.

A VM whose CPU settings can never start (host-passthrough under TCG, a CPU
model QEMU does not offer, a CPU feature libvirt does not know) used to be
defined and only fail at StartContainer. `HostCaps.check_cpu` refuses it
up front with the reason. The capabilities are read once per process and
domain type (`for_runtime`); a feature name's validity is asked of libvirt
once per name (libvirt's CPU map is the only list of them).

Checked by experiment on libvirt 9.0 / QEMU 7.2 under TCG: unknown models and
features, and unsupported modes, fail at start; models marked usable='no'
start under TCG (QEMU emulates what is missing), so they are not refused;
`check: full` with a required feature the hypervisor lacks fails at start, so
that combination is compared against the hypervisor's CPU.
"""

from __future__ import annotations

import logging
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Callable, Mapping

import libvirt

from .domain_xml import CPU, CPUFeature, cpu_xml

log = logging.getLogger("vmlet.cri")

ARCH = "x86_64"  # what domain_xml renders


class UnsupportedCPU(ValueError):
    """CPU settings this host's hypervisor cannot run; the message says which and why."""


class UnknownCPUFeature(UnsupportedCPU):
    """A CPU feature name libvirt does not know on any host (a typo, most likely)."""


@dataclass(frozen=True)
class DomainCaps:
    """The parts of `<domainCapabilities>` vmlet checks against."""

    domain_type: str
    cpu_modes: Mapping[str, bool]  # mode name -> supported
    cpu_models: Mapping[str, bool]  # custom-mode model name -> usable on this host
    max_vcpus: int | None = None


def parse_domain_capabilities(text: str) -> DomainCaps:
    root = ET.fromstring(text)
    modes: dict[str, bool] = {}
    models: dict[str, bool] = {}
    for mode in root.findall("cpu/mode"):
        name = mode.get("name", "")
        modes[name] = mode.get("supported") == "yes"
        if name == "custom":
            for model in mode.findall("model"):
                if model.text:
                    models[model.text.strip()] = model.get("usable") != "no"
    vcpu = root.find("vcpu")
    max_vcpus = int(vcpu.get("max")) if vcpu is not None and (vcpu.get("max") or "").isdigit() else None
    return DomainCaps(domain_type=root.findtext("domain") or "", cpu_modes=modes, cpu_models=models,
                      max_vcpus=max_vcpus)


class HostCaps:
    """Domain capabilities plus what libvirt answers about CPU definitions (both injected: testable)."""

    def __init__(self, caps: DomainCaps, memory_bytes: int, feature_known: Callable[[str], bool],
                 compatible: Callable[[CPU], bool]) -> None:
        self.caps = caps
        self.memory_bytes = memory_bytes  # the host's RAM: no VM of this node can have more
        self._feature_known = feature_known
        self._compatible = compatible
        self._features: dict[str, bool] = {}
        self._lock = threading.Lock()

    def check_cpu(self, cpu: CPU | None, where: str) -> None:
        """UnsupportedCPU unless a domain with this `<cpu>` can start here; `where` names the setting."""
        if cpu is None:
            return
        mode = cpu.mode or ("custom" if cpu.model else None)
        dt = self.caps.domain_type
        if mode is not None and not self.caps.cpu_modes.get(mode, False):
            supported = ", ".join(m for m, ok in self.caps.cpu_modes.items() if ok) or "none"
            raise UnsupportedCPU(f"{where}: CPU mode {mode} is not supported by this host's hypervisor "
                                 f"(domain type {dt}; supported modes: {supported})")
        if cpu.model and mode == "custom" and cpu.model not in self.caps.cpu_models:
            known = sorted(self.caps.cpu_models)
            listed = ", ".join(known[:24]) + (f", … ({len(known)} in all)" if len(known) > 24 else "")
            raise UnsupportedCPU(f"{where}: CPU model {cpu.model!r} is not offered by this host's hypervisor "
                                 f"(domain type {dt}; models: {listed})")
        for feature in cpu.features:
            if not self._known(feature.name):
                raise UnknownCPUFeature(f"{where}: CPU feature {feature.name!r} is unknown to libvirt")
        if cpu.check == "full" and mode == "custom" and not self._compatible(cpu):
            raise UnsupportedCPU(f"{where}: with check full the hypervisor must provide every required CPU "
                                 f"feature, and it does not (domain type {dt})")

    def _known(self, name: str) -> bool:
        with self._lock:
            known = self._features.get(name)
        if known is None:
            known = self._feature_known(name)
            with self._lock:
                self._features[name] = known
        return known


_cache: dict[tuple[str, str], HostCaps] = {}
_cache_lock = threading.Lock()


def load(conn: Callable[[], libvirt.virConnect], domain_type: str) -> HostCaps:
    """Read the capabilities of `domain_type` guests (libvirtError if libvirtd cannot say).

    `conn` gives the current connection: the later feature checks must not
    hold on to one that a libvirtd restart closed.
    """
    caps = parse_domain_capabilities(conn().getDomainCapabilities(None, ARCH, None, domain_type, 0))
    memory_bytes = conn().getInfo()[1] * 1024 * 1024
    probe_model = next((m for m, usable in caps.cpu_models.items() if usable), None)

    def feature_known(name: str) -> bool:
        if probe_model is None:
            return True  # nothing to probe with: leave it to libvirt at define/start
        probe = cpu_xml(CPU(mode="custom", model=probe_model, features=[CPUFeature(name, "optional")]))
        try:
            conn().compareHypervisorCPU(None, ARCH, None, domain_type, probe, 0)
        except libvirt.libvirtError as e:
            if "feature" in (e.get_error_message() or ""):
                return False
            raise
        return True

    def compatible(cpu: CPU) -> bool:
        result = conn().compareHypervisorCPU(None, ARCH, None, domain_type, cpu_xml(cpu), 0)
        return result != libvirt.VIR_CPU_COMPARE_INCOMPATIBLE

    return HostCaps(caps, memory_bytes, feature_known, compatible)


def for_runtime(rt) -> HostCaps:
    """The runtime's host capabilities, read once per process (the hypervisor does not change under us)."""
    key = (rt.host.uri, rt.domain_type)
    with _cache_lock:
        found = _cache.get(key)
    if found is None:
        found = load(rt.host.conn, rt.domain_type)
        with _cache_lock:
            found = _cache.setdefault(key, found)
    return found
