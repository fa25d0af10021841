"""Kubelet-like valid requests with exactly one field changed, at any depth, then what the kubelet does next.

The base requests are tests/support/cri.py's pod_config/container_config, the ones
the lifecycle tests use (and that succeed). The mutated field is chosen among all
fields of the request's descriptor (protofuzz.field_paths), so new fields are
mutated too. What a request was accepted with must then work: a sandbox accepted
by RunPodSandbox takes its VM container; a container accepted by CreateContainer
answers ContainerStatus, and (a few examples, they boot a VM under TCG) starts and stops.
A refusal with INVALID_ARGUMENT must name what was wrong.
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from proto.runtime.v1 import api_pb2

from . import calls
from .conftest import RPCS, Shown, examples
from .protofuzz import ANNOTATION_KEYS, ANNOTATION_VALUES, field_paths, mutations, path_name

pytestmark = pytest.mark.libvirt

R = RPCS


def names_what_was_wrong(rpc, request, answer, path: str, value) -> list[str]:
    """INVALID_ARGUMENT for a mutated field must say which field (or which map key) is wrong."""
    if answer.code != grpc.StatusCode.INVALID_ARGUMENT or not path:
        return []
    details = answer.details.lower()
    leaf = path.rsplit(".", 1)[-1]
    names = {leaf.lower(), leaf.replace("_", " ").lower(), path.lower()}
    if isinstance(value, dict):
        names |= {str(k)[:32].lower() for k in value if str(k)}
    if any(n and n in details for n in names):
        return []
    return [f"{rpc.name}: INVALID_ARGUMENT for the mutated field {path} does not name it: {answer.details[:300]!r}"]


def check_mutated(fuzzer, rpc_name: str, request, path: str, value, follow=None) -> None:
    """Send the mutated request (and what follows it); its refusal, if any, must name the mutated field."""
    fuzzer.check([(R[rpc_name], request)], follow=follow,
                 extra=lambda rpc, req, ans: names_what_was_wrong(rpc, req, ans, path, value)
                 if rpc.name == rpc_name else [])


POD_PATHS = field_paths(api_pb2.RunPodSandboxRequest.DESCRIPTOR)
CREATE_PATHS = [p for p in field_paths(api_pb2.CreateContainerRequest.DESCRIPTOR)
                if not path_name(p).startswith("sandbox_config")]  # vmlet uses the stored config, as containerd
UPDATE_PATHS = field_paths(api_pb2.UpdateContainerResourcesRequest.DESCRIPTOR)
# What a started VM is built from: the container's resources, envs and mounts, the pod's annotations.
START_PATHS = [p for p in CREATE_PATHS if path_name(p).startswith(("config.linux.resources", "config.envs",
                                                                      "config.mounts", "config.labels"))]


class _Mutation(tuple):
    def __repr__(self) -> str:
        request, path, value = self
        return f"{path} := {repr(value)[:200]} in {Shown(request)!r}"


def _shown(m) -> _Mutation:
    return _Mutation(m)


VM_ANNOTATIONS = [k for k in ANNOTATION_KEYS if k != "kubernetes.io/target-runtime"]


def _status_after_create(fuzzer):
    def follow(answer):
        if answer.rpc.name == "CreateContainer" and answer.code == calls.OK:
            return [(R["ContainerStatus"], api_pb2.ContainerStatusRequest(
                container_id=answer.response.container_id, verbose=True))]
        return []
    return follow


@settings(max_examples=examples(25))
@given(data=st.data())
def test_run_pod_sandbox_one_field_mutated(fuzzer, data):
    """RunPodSandbox with one field changed; an accepted pod then gets its VM container created."""
    live = fuzzer.live
    live.ensure()
    base = api_pb2.RunPodSandboxRequest(config=live.pod_config())
    request, path, value = data.draw(mutations(base, live.pools(), POD_PATHS).map(_shown), label="mutation")
    assume(request.ByteSize() < 1 << 20)

    def follow(answer):
        if answer.rpc.name == "RunPodSandbox" and answer.code == calls.OK:
            sid = answer.response.pod_sandbox_id
            return [(R["PodSandboxStatus"], api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True)),
                    (R["CreateContainer"], api_pb2.CreateContainerRequest(
                        pod_sandbox_id=sid, config=live.container_config(), sandbox_config=request.config))]
        return _status_after_create(fuzzer)(answer)

    check_mutated(fuzzer, "RunPodSandbox", request, path, value, follow=follow)


@settings(max_examples=examples(25))
@given(data=st.data())
def test_create_container_one_field_mutated(fuzzer, data):
    live = fuzzer.live
    live.ensure()
    sid = live.sandboxes["empty"]
    base = api_pb2.CreateContainerRequest(pod_sandbox_id=sid, config=live.container_config(),
                                          sandbox_config=live.pod_configs[sid])
    request, path, value = data.draw(mutations(base, live.pools(), CREATE_PATHS).map(_shown), label="mutation")
    assume(request.ByteSize() < 1 << 20)
    check_mutated(fuzzer, "CreateContainer", request, path, value, follow=_status_after_create(fuzzer))


@settings(max_examples=examples(20))
@given(data=st.data())
def test_update_container_resources_one_field_mutated(fuzzer, data):
    live = fuzzer.live
    live.ensure()
    base = api_pb2.UpdateContainerResourcesRequest(container_id=live.container)
    base.linux.memory_limit_in_bytes = 256 << 20
    base.linux.cpu_period, base.linux.cpu_quota = 100000, 50000
    request, path, value = data.draw(mutations(base, live.pools(), UPDATE_PATHS).map(_shown), label="mutation")
    assume(request.ByteSize() < 1 << 20)

    def follow(answer):
        if answer.rpc.name == "UpdateContainerResources" and answer.code == calls.OK:
            return [(R["ContainerStatus"], api_pb2.ContainerStatusRequest(container_id=request.container_id))]
        return []

    check_mutated(fuzzer, "UpdateContainerResources", request, path, value, follow=follow)


@settings(max_examples=examples(4))
@given(data=st.data())
def test_start_container_after_one_field_mutated(fuzzer, data):
    """A container accepted with a changed resource, env, mount or pod annotation must start, and stop."""
    live = fuzzer.live
    live.ensure()
    pod_side = data.draw(st.booleans(), label="mutate the pod")
    pod = live.pod_config()
    if pod_side:
        keys = data.draw(st.dictionaries(st.sampled_from(VM_ANNOTATIONS),
                                         st.sampled_from(ANNOTATION_VALUES), min_size=1, max_size=1),
                         label="annotation")
        pod.annotations.update(keys)
        path, value = "config.annotations", keys
        create = api_pb2.CreateContainerRequest(config=live.container_config(), sandbox_config=pod)
    else:
        base = api_pb2.CreateContainerRequest(config=live.container_config(), sandbox_config=pod)
        create, path, value = data.draw(mutations(base, live.pools(), START_PATHS).map(_shown), label="mutation")

    def follow(answer):
        name = answer.rpc.name
        if name == "RunPodSandbox" and answer.code == calls.OK:
            create.pod_sandbox_id = answer.response.pod_sandbox_id
            return [(R["CreateContainer"], create)]
        if name == "CreateContainer" and answer.code == calls.OK:
            cid = answer.response.container_id
            return [(R["StartContainer"], api_pb2.StartContainerRequest(container_id=cid)),
                    (R["ContainerStatus"], api_pb2.ContainerStatusRequest(container_id=cid)),
                    (R["StopContainer"], api_pb2.StopContainerRequest(container_id=cid, timeout=0))]
        return []

    def allowed(rpc, req):
        # Accepted by CreateContainer means startable: a VM that can never start is refused at create
        # (issue #12 defect 5: host-passthrough under TCG, unknown CPU models).
        return {calls.OK} if rpc.name == "StartContainer" else None

    fuzzer.check([(R["RunPodSandbox"], api_pb2.RunPodSandboxRequest(config=pod))], follow=follow, allowed=allowed,
                 extra=lambda rpc, req, ans: names_what_was_wrong(rpc, req, ans, path, value)
                 if rpc.name in ("RunPodSandbox", "CreateContainer") else [])
