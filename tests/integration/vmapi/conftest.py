"""Fixtures: a kmock API server per test, the real operator against it, and the test's client.

Needs kopf, kmock and pytest-asyncio (pinned in deploy/requirements.lock). When
one is missing the tests skip with the reason — or fail under CI=true.
"""

from __future__ import annotations

import importlib

import pytest

from tests.support.prereq import IN_CI, require

_MISSING = []
for _mod in ("kopf", "kmock", "pytest_asyncio", "jsonschema"):
    try:
        importlib.import_module(_mod)
    except ImportError as e:  # pragma: no cover - depends on the venv
        _MISSING.append(f"{_mod} ({e})")


def pytest_configure(config):
    # Without pytest-asyncio the asyncio marker is unknown; register it so collection works
    # and the prerequisite check below reports the real problem.
    config.addinivalue_line("markers", "asyncio: run the test on an asyncio event loop (pytest-asyncio)")


if _MISSING and not IN_CI:
    # The test modules import kmock at the top; without it they are skipped here, with the reason.
    collect_ignore_glob = ["test_*.py"]
    print("tests/integration/vmapi skipped: missing " + ", ".join(_MISSING))

if _MISSING:
    def _missing():
        require(False, "VM API tests need " + ", ".join(_MISSING) + " (run deploy/setup-host.sh)")

    server = pytest.fixture(_missing, name="server")
    kubeconfig = pytest.fixture(lambda server: None, name="kubeconfig")
    cluster = pytest.fixture(lambda server: None, name="cluster")
    operator = pytest.fixture(lambda server: None, name="operator")
else:
    import pytest_asyncio
    import kmock

    from tests.integration.vmapi.harness import ApiServer, Cluster, Operator, declare_resources, write_kubeconfig

    @pytest_asyncio.fixture
    async def server():
        async with ApiServer() as srv, kmock.Server(srv):
            declare_resources(srv)
            try:
                yield srv
            finally:  # no fault outlives the test; hanging answers end now
                srv.faults = srv.on_request = None
                srv.released.set()

    @pytest.fixture
    def kubeconfig(server, tmp_path):
        return write_kubeconfig(server, tmp_path / "kubeconfig")

    @pytest.fixture
    def cluster(server, kubeconfig):
        return Cluster(server, kubeconfig)

    @pytest_asyncio.fixture
    async def operator(server, kubeconfig):
        op = Operator(server, kubeconfig)
        await op.start()
        yield op
        await op.stop()
