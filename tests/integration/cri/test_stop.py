"""Stopping VMs the way the kubelet does it: grace periods, force deletes, impatient clients, early stops.

- A graceful StopContainer with a long grace period (a guest ignoring ACPI)
  must not hold up a later force stop (`kubectl delete --grace-period=0
  --force`), RemoveContainer or StopPodSandbox: they destroy the VM now, and
  the graceful call returns too.
- A caller whose client gave up stops waiting; the VM is still destroyed at
  its deadline.
- A VM stopped right after StartContainer (boot loader, no acpid yet) loses
  an ACPI press; the press is repeated, so it powers off cleanly instead of
  being killed at the end of its grace period.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from proto.runtime.v1 import api_pb2
from tests.support import cri

from .conftest import TESTVM
from .test_lifecycle import wait_for_log

pytestmark = pytest.mark.libvirt

LONG_GRACE = 3600  # terminationGracePeriodSeconds of a patient pod
# A guest that ignores the ACPI power button: acpid gone.
DEAF_GUEST = "#!/bin/sh\nkillall acpid && echo ACPID-GONE\n"


def start_pod(client, vmlet_dir, name, script=None, wait=True):
    ann = {"VirtletCloudInitUserDataScript": script} if script else {}
    pod = cri.pod_config(name=name, log_directory=str(vmlet_dir / "pods" / name), annotations=ann)
    sid = client.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=120).pod_sandbox_id
    cid = client.runtime.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=sid, config=cri.container_config(TESTVM), sandbox_config=pod), timeout=120).container_id
    client.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=120)
    log = vmlet_dir / "pods" / name / "vm" / "0.log"
    if wait:
        wait_for_log(log, r"ACPID-GONE$" if script == DEAF_GUEST else r"VMLET-TESTVM: ready$", 180)
    return sid, cid, log


def status(client, cid):
    return client.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=10).status


class PendingStop:
    """A StopContainer call running in a thread (the kubelet's graceful stop)."""

    def __init__(self, client, cid, timeout, deadline):
        self.error: grpc.RpcError | None = None
        self.returned = threading.Event()

        def run():
            try:
                client.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=timeout),
                                             timeout=deadline)
            except grpc.RpcError as e:
                self.error = e
            self.returned.set()

        threading.Thread(target=run, daemon=True).start()
        time.sleep(1.5)  # the graceful stop has pressed the button and is waiting
        assert not self.returned.is_set(), f"the graceful stop returned at once: {self.error}"


def assert_killed(client, cid):
    st = status(client, cid)
    assert (st.state, st.exit_code, st.reason) == (api_pb2.CONTAINER_EXITED, 137, "Killed")


def test_force_stop_cuts_a_graceful_stop_short(client, pulled, vmlet_dir):
    _, cid, _ = start_pod(client, vmlet_dir, "force", DEAF_GUEST)
    graceful = PendingStop(client, cid, LONG_GRACE, LONG_GRACE + 60)
    # kubectl delete --grace-period=0 --force: the kubelet's StopContainer with timeout 0.
    client.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=0), timeout=30)
    assert_killed(client, cid)
    assert graceful.returned.wait(30), "the graceful StopContainer is still waiting after the VM was destroyed"
    assert graceful.error is None, graceful.error


def test_a_shorter_grace_period_wins(client, pulled, vmlet_dir):
    _, cid, _ = start_pod(client, vmlet_dir, "shorter", DEAF_GUEST)
    graceful = PendingStop(client, cid, LONG_GRACE, LONG_GRACE + 60)
    client.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=3), timeout=60)
    assert_killed(client, cid)
    assert graceful.returned.wait(30) and graceful.error is None, graceful.error


@pytest.mark.parametrize("rpc", ["RemoveContainer", "StopPodSandbox", "RemovePodSandbox"])
def test_remove_and_sandbox_stop_force_a_pending_graceful_stop(client, pulled, vmlet_dir, rpc):
    sid, cid, _ = start_pod(client, vmlet_dir, f"pending-{rpc.lower()}", DEAF_GUEST)
    graceful = PendingStop(client, cid, LONG_GRACE, LONG_GRACE + 60)
    rt = client.runtime
    if rpc == "RemoveContainer":
        rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=30)
    elif rpc == "StopPodSandbox":
        rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=30)
        assert_killed(client, cid)
    else:
        rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=30)
        assert not rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items
    assert graceful.returned.wait(30) and graceful.error is None, graceful.error


def test_callers_that_gave_up_stop_waiting_and_the_escalation_still_happens(client, pulled, vmlet_dir):
    _, cid, _ = start_pod(client, vmlet_dir, "gaveup", DEAF_GUEST)
    # More impatient callers than the daemon has RPC threads (32): if a caller kept waiting after its client
    # left, they would all be stuck and nothing else would be served.
    calls = [client.runtime.StopContainer.future(api_pb2.StopContainerRequest(container_id=cid, timeout=8),
                                                 timeout=0.5) for _ in range(40)]
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            call.result()
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    client.runtime.Version(api_pb2.VersionRequest(), timeout=3)
    client.runtime.UpdateContainerResources(api_pb2.UpdateContainerResourcesRequest(container_id=cid), timeout=3)
    # Nobody waits any more; the guest ignores ACPI; at the 8 s deadline the VM is destroyed all the same.
    assert status(client, cid).state == api_pb2.CONTAINER_RUNNING
    end = time.monotonic() + 60
    while status(client, cid).state == api_pb2.CONTAINER_RUNNING and time.monotonic() < end:
        time.sleep(0.5)
    assert_killed(client, cid)


def test_a_vm_stopped_right_after_start_powers_off_cleanly(client, pulled, vmlet_dir):
    """Stops at 0, 1, 2 and 5 s after StartContainer (each guest boots on its own)."""
    results: dict[int, object] = {}

    def lifecycle(delay):
        try:
            _, cid, log = start_pod(client, vmlet_dir, f"early-{delay}", wait=False)
            time.sleep(delay)
            client.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=170), timeout=200)
            results[delay] = (status(client, cid), log)
        except BaseException as e:  # noqa: BLE001 - reported below
            results[delay] = e

    for pair in ((0, 2), (1, 5)):  # two guests boot at once: four TCG boots on two cores starve acpid
        threads = [threading.Thread(target=lifecycle, args=(d,), daemon=True) for d in pair]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
            assert not t.is_alive(), f"a stop did not return: {results}"
    assert sorted(results) == [0, 1, 2, 5], results
    for delay, result in sorted(results.items()):
        assert not isinstance(result, BaseException), (delay, result)
        st, log = result
        # Killed (137) would mean the guest never saw a press and sat out its grace period.
        assert (st.state, st.exit_code, st.reason) == (api_pb2.CONTAINER_EXITED, 0, "Completed"), \
            (delay, st.reason, log.read_text(errors="replace")[-1500:])
