"""ExecSync into a real guest through the CRI socket, by its qemu-guest-agent (cri_shim/guest_agent.py).

One VM pod (TCG boots are slow) carries the whole story: exit codes, stdout and
stderr kept apart, a timeout that kills the command in the guest, output over
the cap, runAsGroup through setpriv, the pod's DNS config, hostname and a
directory volume seen from inside, the agent's facts in verbose status, and at
the end a guest whose agent is gone (FailedPrecondition, fast).
"""

from __future__ import annotations

import json
import time

import grpc
import libvirt
import pytest

from cri_shim import guest_agent
from proto.runtime.v1 import api_pb2
from tests.support import cri

from .conftest import TESTVM
from .test_lifecycle import wait_for_log

pytestmark = pytest.mark.libvirt


def exec_sync(rt, cid, cmd, timeout=30):
    return rt.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout), timeout=timeout + 60)


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def wait_for_agent(dom, timeout: float = 60) -> None:
    """"ready" on the console comes a moment before qemu-ga (started in the background) opens its port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return guest_agent.ping(dom)
        except guest_agent.AgentError:
            assert time.monotonic() < deadline, "the guest agent never connected"
            time.sleep(0.5)


def guest_agent_leftovers() -> str:
    """Shell: the wrapper directories in the guest's /tmp, but for the one of the wrapper running it."""
    return 'for d in /tmp/.vmlet-exec.*; do case $d in /tmp/.vmlet-exec.$PPID.*) ;; *) [ -e "$d" ] && echo "$d";; esac; done; true'


def verbose_info(rt, cid) -> dict:
    return json.loads(rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid, verbose=True)).info["info"])


def test_exec_sync_in_the_guest(client, pulled, vmlet_dir, libvirt_conn):
    rt = client.runtime
    volume = vmlet_dir / "vol" / "data"
    volume.mkdir(parents=True)
    (volume / "greeting").write_text("hello-from-the-host\n")
    log_dir = vmlet_dir / "pods" / "exec"
    pod = cri.pod_config(name="exec-pod", log_directory=str(log_dir),
                         annotations={"VirtletCloudInitUserDataScript": "#!/bin/sh\n@virtlet-mount-script@\n"})
    pod.dns_config.servers.append("10.214.255.53")
    pod.dns_config.searches.extend(["vmlet.test", "svc.vmlet.test"])
    pod.dns_config.options.extend(["ndots:5", "timeout:2", "rotate"])
    sid = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod)).pod_sandbox_id
    ccfg = cri.container_config(TESTVM)
    ccfg.mounts.append(api_pb2.Mount(container_path="/data", host_path=str(volume)))
    ccfg.linux.security_context.run_as_user.value = 0
    ccfg.linux.security_context.run_as_group.value = 4242
    cid = rt.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=sid, config=ccfg, sandbox_config=pod)).container_id

    # Not running yet: FailedPrecondition; unknown: NotFound; no command: InvalidArgument naming cmd.
    code, message = code_of(lambda: exec_sync(rt, cid, ["true"]))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "not running" in message
    code, message = code_of(lambda: exec_sync(rt, "f" * 64, ["true"]))
    assert code == grpc.StatusCode.NOT_FOUND
    code, message = code_of(lambda: exec_sync(rt, cid, []))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "cmd" in message

    rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid))
    ip = rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sid)).status.network.ip
    log = log_dir / "vm" / "0.log"
    wait_for_log(log, r"VMLET-TESTVM: ready$", 240)
    dom = libvirt_conn.lookupByName(verbose_info(rt, cid)["domain"])
    wait_for_agent(dom)

    for status in (0, 1, 42):
        resp = exec_sync(rt, cid, ["sh", "-c", f"echo to-out; echo to-err >&2; exit {status}"])
        assert (resp.exit_code, resp.stdout, resp.stderr) == (status, b"to-out\n", b"to-err\n")
    resp = exec_sync(rt, cid, ["no-such-program"])
    assert resp.exit_code == 127 and b"no-such-program" in resp.stderr

    # runAsUser 0 / runAsGroup 4242 from the security context, applied by setpriv in the guest.
    assert exec_sync(rt, cid, ["id"]).stdout.decode().startswith("uid=0(root) gid=4242")
    # The agent layer as another user (no security context field reaches this one): nobody.
    assert guest_agent.run(dom, ["id", "-u"], uid=65534, gid=65534).stdout == b"65534\n"
    # stdin (ExecSync has none; Exec's sessions give it whole): the agent layer hands it over.
    assert guest_agent.run(dom, ["sh", "-c", "tr a-z A-Z"], stdin=b"given on stdin").stdout == b"GIVEN ON STDIN"

    # The pod's DNS config, hostname and volume, seen from inside the guest.
    resolv = exec_sync(rt, cid, ["cat", "/etc/resolv.conf"]).stdout.decode()
    assert "nameserver 10.214.255.53" in resolv.splitlines()
    assert "search vmlet.test svc.vmlet.test" in resolv.splitlines(), resolv
    # Options through cloud-init vendor-data (resolv_conf's mapping: the order within the line is its own).
    options = [sorted(line.split()[1:]) for line in resolv.splitlines() if line.startswith("options ")]
    assert options == [["ndots:5", "rotate", "timeout:2"]], resolv
    # A DHCP renewal (unicast to dnsmasq through the pod netns) rewrites resolv.conf: the options stay.
    exec_sync(rt, cid, ["sh", "-c", 'for p in /proc/[0-9]*; do [ "$(cat $p/comm 2>/dev/null)" = udhcpc ] && '
                                    'kill -USR1 "${p#/proc/}"; done; true'])
    wait_for_log(log, r"VMLET-TESTVM: renew eth0 " + ip.replace(".", r"\.") + "/", 60)
    resolv = exec_sync(rt, cid, ["cat", "/etc/resolv.conf"]).stdout.decode()
    assert [sorted(line.split()[1:]) for line in resolv.splitlines() if line.startswith("options ")] == options
    assert "nameserver 10.214.255.53" in resolv.splitlines(), resolv
    assert exec_sync(rt, cid, ["hostname"]).stdout == b"exec-pod\n"
    assert exec_sync(rt, cid, ["cat", "/data/greeting"]).stdout == b"hello-from-the-host\n"

    # Output over the cap: truncated with the marker, the exit code kept.
    resp = exec_sync(rt, cid, ["sh", "-c", f"head -c {3 * guest_agent.OUTPUT_CAP} /dev/zero | tr '\\0' x; exit 3"])
    marker = guest_agent.TRUNCATED_MARKER % guest_agent.OUTPUT_CAP
    assert resp.exit_code == 3
    assert resp.stdout == b"x" * guest_agent.OUTPUT_CAP + marker

    # A timeout kills the command in the guest (its child too) and answers DEADLINE_EXCEEDED, as containerd does.
    started = time.monotonic()
    code, message = code_of(lambda: exec_sync(rt, cid, ["sh", "-c", "sleep 4242 & sleep 4343"], timeout=2))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "timeout 2s exceeded" in message
    assert time.monotonic() - started < 15
    ps = exec_sync(rt, cid, ["ps", "-o", "args"]).stdout.decode()
    assert "sleep 4242" not in ps and "sleep 4343" not in ps, ps

    # A command whose exit was seen is never killed after it (its pid is qemu-ga's no more), even when its answer
    # is refused: this one looks like the wrapper's no-setpriv answer. A kill would have removed the canary,
    # named like the wrapper's own directory.
    code, message = code_of(lambda: exec_sync(rt, cid, ["sh", "-c", 'mkdir "/tmp/.vmlet-exec.$PPID.canary"; '
                                                        'echo "vmlet-exec: cannot run as uid/gid: x" >&2; exit 125']))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "runAsUser" in message, message
    assert exec_sync(rt, cid, ["sh", "-c", "ls -d /tmp/.vmlet-exec.*.canary && rm -r /tmp/.vmlet-exec.*.canary"]
                     ).exit_code == 0, "the exited command's pid was killed"

    # The sweep (after a crash of vmlet or a restart of the agent): a pid qemu-ga does not know is killed only
    # while it has its wrapper's directory (else it may be anything by now); directories of gone wrappers go.
    orphan, bystander = map(int, exec_sync(rt, cid, ["sh", "-c", (
        "sleep 4646 >/dev/null 2>&1 & o=$!; mkdir /tmp/.vmlet-exec.$o.t; sleep 4747 >/dev/null 2>&1 & "
        "echo $o $!; mkdir /tmp/.vmlet-exec.999999.t")]).stdout.split())
    assert guest_agent.sweep(dom, [orphan, bystander]) == {orphan, bystander}
    ps = exec_sync(rt, cid, ["ps", "-o", "args"]).stdout.decode()
    assert "sleep 4646" not in ps and "sleep 4747" in ps, ps
    assert exec_sync(rt, cid, ["sh", "-c", guest_agent_leftovers()]).stdout == b""
    exec_sync(rt, cid, ["kill", str(bystander)])

    # Guest facts in verbose status (fetched in the background: poll).
    deadline = time.monotonic() + 30
    while True:
        agent = verbose_info(rt, cid)["guestAgent"]
        if agent.get("guestOSInfo", {}).get("id") == "vmlet-testvm" and agent.get("interfaces") \
                or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert agent["connected"] is True
    assert agent["guestOSInfo"]["id"] == "vmlet-testvm" and agent["guestOSInfo"]["kernelRelease"]
    assert agent["hostname"] == "exec-pod"
    eth0 = next(i for i in agent["interfaces"] if i["name"] == "eth0")
    assert any(a.startswith(ip + "/") for a in eth0["ipAddresses"]), (ip, eth0)

    # The agent goes away (its supervisor first, so nothing restarts it): FailedPrecondition saying so, fast.
    exec_sync(rt, cid, ["sh", "-c", "kill $(cat /run/qemu-ga-supervise.pid); "
                                    "(sleep 1; killall qemu-ga) >/dev/null 2>&1 &"])
    deadline = time.monotonic() + 30
    while True:
        started = time.monotonic()
        try:
            exec_sync(rt, cid, ["true"])
        except grpc.RpcError as e:
            took = time.monotonic() - started
            code, message = e.code(), e.details()
            break
        assert time.monotonic() < deadline, "the agent never went away"
        time.sleep(0.5)
    assert code == grpc.StatusCode.FAILED_PRECONDITION, message
    assert "guest agent of VM pod default/exec-pod" in message and "not connected" in message, message
    assert took < 5, f"no-agent answer took {took:.1f}s"
    assert verbose_info(rt, cid)["guestAgent"]["connected"] is False
    with pytest.raises(guest_agent.AgentNotConnected):
        guest_agent.ping(dom)

    rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=0))
    code, message = code_of(lambda: exec_sync(rt, cid, ["true"]))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "not running" in message
    rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid))
    rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid))
    with pytest.raises(libvirt.libvirtError):
        libvirt_conn.lookupByName(dom.name())
