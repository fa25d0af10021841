"""The demo, run as a newcomer runs it after the README's set-up: it succeeds and its screen shows no error.

`deploy/demo.sh` is set-up + `deploy/demo.py IMAGE`; the set-up is the test run's own, so this runs
the second half. Its screen includes the VM's whole serial console, where the guest runs vmlet's
user-data with the pod-volume mount script (`@virtlet-mount-script@`): a command the guest lacks
there (`mountpoint: not found` on busybox guests) is what a newcomer would see first.
"""

from __future__ import annotations

import re

import pytest

from tests.integration.test_bench_quick import PYTHON, require_for, run_as_user
from tests.support import libvirt_env

pytestmark = pytest.mark.libvirt

ERROR_LINE = re.compile(r"not found|no such|error|fail|denied|cannot|can't|traceback|warning|invalid|unknown",
                        re.IGNORECASE)


def test_demo_succeeds_and_shows_no_error_line(test_image):
    require_for("libvirt")
    rc, out, left = run_as_user([str(PYTHON), "deploy/demo.py", str(test_image)])
    assert rc == 0, f"deploy/demo.py exited {rc}; output:\n{out[-6000:]}"
    console = [line for line in out.splitlines() if line.startswith("  | ")]
    assert any("VMLET-TESTVM: ready" in line for line in console), out
    assert any("/etc/motd.d/motd: hello from a pod volume" in line for line in console), out  # the mount ran
    errors = [line for line in out.splitlines() if ERROR_LINE.search(line)]
    assert not errors, f"error lines on the demo's screen: {errors}"
    container = re.search(r"^container ([0-9a-f]{13}) ", out, re.MULTILINE)
    assert container, out
    conn = libvirt_env.connect()
    try:
        domains = [d.name() for d in conn.listAllDomains() if d.name().startswith(f"vmlet-demo-{container[1]}")]
    finally:
        conn.close()
    assert not domains and not left, f"the demo left behind: {domains + left}"
