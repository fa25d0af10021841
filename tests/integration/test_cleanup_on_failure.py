"""The harness leaves nothing behind when a test fails halfway, or when the run is killed.

A child pytest runs a test that starts a real domain and then fails (its
fixtures must remove the domain) or SIGKILLs itself (the next run's sweep must
remove it, as the session fixture does at start).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import libvirt_env

pytestmark = pytest.mark.libvirt

REPO = Path(__file__).resolve().parents[2]
CASE = "tests/integration/failing_cases/fail_halfway.py"


def run_child(mode: str, name: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, VMLET_PROBE_DOMAIN=name, VMLET_PROBE_MODE=mode)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-o", "python_files=fail_*.py", CASE],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def domain_names(conn) -> set[str]:
    return {d.name() for d in conn.listAllDomains()}


def test_failed_test_removes_its_domain(libvirt_conn):
    name = libvirt_env.unique_name("probe")
    child = run_child("fail", name)
    # "1 failed" alone: a teardown error (a leftover found by the session sweep) would add ", 1 error".
    assert re.search(r"^1 failed in ", child.stdout, re.MULTILINE), child.stdout[-3000:]
    assert "failing halfway on purpose" in child.stdout
    assert name not in domain_names(libvirt_conn)


def test_killed_run_leftovers_are_swept_by_the_next_run(libvirt_conn):
    name = libvirt_env.unique_name("probe")
    child = run_child("kill", name)
    assert child.returncode == -9, child.stdout[-3000:]
    assert name in domain_names(libvirt_conn), "the killed child should have left its domain running"
    assert f"domain {name}" in libvirt_env.sweep(libvirt_conn)
    assert name not in domain_names(libvirt_conn)
    assert not libvirt_env.leftover_qemu_processes()
    assert libvirt_env.remove_stale_work_dirs(), "the killed child's work dir should have been removed"
