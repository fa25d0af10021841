"""Deliberately failing tests, run only by test_cleanup_on_failure.py in a child pytest.

The file name does not match test_*.py, so a normal run never collects it.
VMLET_PROBE_DOMAIN names the domain to start; VMLET_PROBE_MODE says how to die.
"""

import os
import signal

from cri_shim.domain_xml import DomainSpec, build_domain_xml
from tests.support import libvirt_env


def test_dies_halfway(start_domain, vm_dir):
    spec = DomainSpec(name=os.environ["VMLET_PROBE_DOMAIN"], memory_kib=64 * 1024, vcpus=1,
                      domain_type=libvirt_env.DOMAIN_TYPE, console_log=str(vm_dir / "console.log"))
    dom = start_domain(build_domain_xml(spec))
    assert dom.isActive()
    if os.environ["VMLET_PROBE_MODE"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)  # no finalizer runs
    raise AssertionError("failing halfway on purpose")
