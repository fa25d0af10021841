"""One CRI call with a deadline, and what its answer may be.

The codes are the ones the CRI (and containerd, the reference runtime the kubelet
is written against) gives for a client's mistake or an object's state. UNKNOWN and
INTERNAL mean vmlet lost track of what went wrong; RESOURCE_EXHAUSTED on a small
request means an error message too big for the client's metadata limit; a
DEADLINE_EXCEEDED means a call hung. All four fail the suite.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass

import grpc
from google.protobuf.message import Message

from .protofuzz import Rpc, stub_method

OK = grpc.StatusCode.OK
IA = grpc.StatusCode.INVALID_ARGUMENT
NF = grpc.StatusCode.NOT_FOUND
FP = grpc.StatusCode.FAILED_PRECONDITION
AE = grpc.StatusCode.ALREADY_EXISTS
UN = grpc.StatusCode.UNIMPLEMENTED

# Per RPC, the codes a correct runtime may answer with. RPCs not listed (new ones) get DEFAULT.
DEFAULT = {OK, IA, NF, FP}
ALLOWED: dict[str, set[grpc.StatusCode]] = {
    "Version": {OK, IA},
    "Status": {OK},
    "RuntimeConfig": {OK},
    "UpdateRuntimeConfig": {OK, IA},
    "RunPodSandbox": {OK, IA, FP, AE},
    "StopPodSandbox": {OK, IA, NF},
    "RemovePodSandbox": {OK, IA},
    "PodSandboxStatus": {OK, IA, NF},
    "ListPodSandbox": {OK, IA},
    "StreamPodSandboxes": {OK, IA},
    "UpdatePodSandboxResources": {OK, IA, NF, FP, UN},
    "CreateContainer": {OK, IA, NF, FP, AE},
    "StartContainer": {OK, IA, NF, FP},
    "StopContainer": {OK, IA, NF},
    "RemoveContainer": {OK, IA},
    "ListContainers": {OK, IA},
    "StreamContainers": {OK, IA},
    "ContainerStatus": {OK, IA, NF},
    "UpdateContainerResources": {OK, IA, NF, FP},
    "ReopenContainerLog": {OK, IA, NF, FP},
    # ExecSync's timeout kills the command in the guest and answers DEADLINE_EXCEEDED, as containerd does.
    "ExecSync": {OK, IA, NF, FP, grpc.StatusCode.DEADLINE_EXCEEDED},
    "Exec": {OK, IA, NF, FP},
    "Attach": {OK, IA, NF, FP},
    "PortForward": {OK, IA, NF, FP},
    "CheckpointContainer": {UN, IA, NF},
    "ContainerStats": {OK, IA, NF},
    "ListContainerStats": {OK, IA},
    "StreamContainerStats": {OK, IA},
    "PodSandboxStats": {OK, IA, NF},
    "ListPodSandboxStats": {OK, IA},
    "StreamPodSandboxStats": {OK, IA},
    "GetContainerEvents": {OK},
    "ListMetricDescriptors": {OK},
    "ListPodSandboxMetrics": {OK},
    "StreamPodSandboxMetrics": {OK},
    "ListImages": {OK, IA},
    "StreamImages": {OK, IA},
    # CRI: an absent image is an empty ImageStatus answer, not an error (issue #12 defect 6); only a
    # request without any image is the client's mistake.
    "ImageStatus": {OK, IA},
    "PullImage": {OK, IA, NF, FP},
    "RemoveImage": {OK, IA},
    "ImageFsInfo": {OK},
}
# RPCs that do real work (CNI, disks, libvirt, downloads): a longer deadline. All others answer from memory.
SLOW = {"RunPodSandbox", "StopPodSandbox", "RemovePodSandbox", "CreateContainer", "StartContainer",
        "StopContainer", "RemoveContainer", "UpdateContainerResources", "PullImage", "RemoveImage",
        "UpdatePodSandboxResources", "ReopenContainerLog"}
CHEAP_DEADLINE = 20.0
SLOW_DEADLINE = 120.0
MAX_MESSAGE = 2048  # bytes of grpc-message: vmlet caps every status message here (docs/robustness.md)
FIRST_MESSAGE_WAIT = 10.0  # streams: wait this long for a first message (a loaded 2-core machine), then cancel
EVENTS_WAIT = 1.0  # GetContainerEvents has no first message until something happens: listen this long


@dataclass
class Answer:
    rpc: Rpc
    code: grpc.StatusCode
    details: str
    response: Message | None
    elapsed: float

    def describe(self) -> str:
        return f"{self.rpc.name} -> {self.code.name} after {self.elapsed:.2f}s: {self.details[:600]!r}"


def deadline_of(rpc: Rpc) -> float:
    return SLOW_DEADLINE if rpc.name in SLOW else CHEAP_DEADLINE


_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="fuzz-stream")


def invoke(client, rpc: Rpc, request: Message) -> Answer:
    method = stub_method(client, rpc)
    timeout = deadline_of(rpc)
    start = time.monotonic()
    if not rpc.streaming:
        try:
            response = method(request, timeout=timeout)
            return Answer(rpc, OK, "", response, time.monotonic() - start)
        except grpc.RpcError as e:
            return Answer(rpc, e.code(), e.details() or "", None, time.monotonic() - start)
    # Server streaming: read the first message (or wait a little for one), then cancel.
    call = method(request, timeout=timeout)
    first = _pool.submit(next, call, None)
    try:
        response = first.result(timeout=EVENTS_WAIT if rpc.name == "GetContainerEvents" else FIRST_MESSAGE_WAIT)
        code, details = OK, ""
    except concurrent.futures.TimeoutError:
        response, code, details = None, OK, "(no first message yet: a stream of future events)"
    except grpc.RpcError as e:
        response, code, details = None, e.code(), e.details() or ""
    call.cancel()
    try:
        first.result(timeout=10)
    except (grpc.RpcError, concurrent.futures.TimeoutError):
        pass
    return Answer(rpc, code, details, response, time.monotonic() - start)


def problems(answer: Answer, allowed: set[grpc.StatusCode] | None = None) -> list[str]:
    """Why this answer is wrong; [] when it is one a correct runtime could give."""
    allowed = allowed if allowed is not None else ALLOWED.get(answer.rpc.name, DEFAULT)
    out = []
    if answer.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        out.append(f"{answer.rpc.name} did not answer within its {deadline_of(answer.rpc)}s deadline")
    elif answer.code not in allowed:
        out.append(f"{answer.rpc.name} answered {answer.code.name}, not one of "
                   f"{sorted(c.name for c in allowed)}: {answer.details[:600]!r}")
    if len(answer.details.encode()) > MAX_MESSAGE:
        out.append(f"{answer.rpc.name}'s error message is {len(answer.details.encode())} bytes long, over the "
                   f"{MAX_MESSAGE}-byte cap (echoes the request)")
    if answer.rpc.streaming and answer.code == OK and answer.response is None \
            and answer.rpc.name != "GetContainerEvents":
        out.append(f"{answer.rpc.name} sent no first message within {FIRST_MESSAGE_WAIT}s")
    return out
