"""The CRI RuntimeService servicer: one line per RPC, handing over to the module that owns it.

Errors: RPC modules raise errors.CRIError; `grpc_errors` maps it (and any bug)
to a gRPC status. Streaming RPCs are generators and map errors themselves.
"""

from __future__ import annotations

import logging

import grpc

from proto.runtime.v1 import api_pb2, api_pb2_grpc

from . import (container_checkpoint, container_create, container_exec, container_start, container_status,
               container_stop, container_update, runtime_info, sandbox_run, sandbox_status, sandbox_stop, stats,
               stream_requests)
from .errors import CRIError, grpc_errors, status_message
from .runtime import Runtime

log = logging.getLogger("vmlet.cri")


def _stream(method):
    """grpc_errors for server-streaming methods (generators)."""

    def wrapper(self, request, context):
        try:
            yield from method(self, request, context)
        except CRIError as e:
            context.abort(e.code, status_message(e.message))
        except Exception as e:  # noqa: BLE001
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, status_message(f"{method.__name__}: internal error: {e}"))

    wrapper.__name__ = method.__name__
    return wrapper


def _filter(req):
    return req.filter if req.HasField("filter") else None


class RuntimeService(api_pb2_grpc.RuntimeServiceServicer):
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    # runtime
    @grpc_errors
    def Version(self, req, ctx):
        return runtime_info.version(self.rt, req)

    @grpc_errors
    def Status(self, req, ctx):
        return runtime_info.status(self.rt, req)

    @grpc_errors
    def RuntimeConfig(self, req, ctx):
        return runtime_info.runtime_config(self.rt, req)

    @grpc_errors
    def UpdateRuntimeConfig(self, req, ctx):
        return runtime_info.update_runtime_config(self.rt, req)

    # sandboxes
    @grpc_errors
    def RunPodSandbox(self, req, ctx):
        return sandbox_run.run_pod_sandbox(self.rt, req)

    @grpc_errors
    def StopPodSandbox(self, req, ctx):
        return sandbox_stop.stop_pod_sandbox(self.rt, req)

    @grpc_errors
    def RemovePodSandbox(self, req, ctx):
        return sandbox_stop.remove_pod_sandbox(self.rt, req)

    @grpc_errors
    def PodSandboxStatus(self, req, ctx):
        return sandbox_status.pod_sandbox_status(self.rt, req)

    @grpc_errors
    def ListPodSandbox(self, req, ctx):
        return sandbox_status.list_pod_sandbox(self.rt, req)

    @_stream
    def StreamPodSandboxes(self, req, ctx):
        yield api_pb2.StreamPodSandboxesResponse(pod_sandboxes=sandbox_status.list_sandboxes(self.rt, _filter(req)))

    @grpc_errors
    def UpdatePodSandboxResources(self, req, ctx):
        return container_update.update_pod_sandbox_resources(self.rt, req)

    # containers
    @grpc_errors
    def CreateContainer(self, req, ctx):
        return container_create.create_container(self.rt, req)

    @grpc_errors
    def StartContainer(self, req, ctx):
        return container_start.start_container(self.rt, req)

    @grpc_errors
    def StopContainer(self, req, ctx):
        return container_stop.stop_container(self.rt, req, ctx.is_active)

    @grpc_errors
    def RemoveContainer(self, req, ctx):
        return container_stop.remove_container(self.rt, req)

    @grpc_errors
    def ListContainers(self, req, ctx):
        return container_status.list_containers_rpc(self.rt, req)

    @_stream
    def StreamContainers(self, req, ctx):
        yield api_pb2.StreamContainersResponse(containers=container_status.list_containers(self.rt, _filter(req)))

    @grpc_errors
    def ContainerStatus(self, req, ctx):
        return container_status.container_status(self.rt, req)

    @grpc_errors
    def UpdateContainerResources(self, req, ctx):
        return container_update.update_container_resources(self.rt, req)

    @grpc_errors
    def ReopenContainerLog(self, req, ctx):
        return container_update.reopen_container_log(self.rt, req)

    # streaming (exec & co.)
    @grpc_errors
    def ExecSync(self, req, ctx):
        return container_exec.exec_sync(self.rt, req)

    @grpc_errors
    def Exec(self, req, ctx):
        return stream_requests.exec_(self.rt, req)

    @grpc_errors
    def Attach(self, req, ctx):
        return stream_requests.attach(self.rt, req)

    @grpc_errors
    def PortForward(self, req, ctx):
        return stream_requests.port_forward(self.rt, req)

    @grpc_errors
    def CheckpointContainer(self, req, ctx):
        return container_checkpoint.checkpoint_container(self.rt, req)

    # stats and metrics
    @grpc_errors
    def ContainerStats(self, req, ctx):
        return api_pb2.ContainerStatsResponse(stats=stats.container_stats(self.rt, self.rt.container(req.container_id)))

    @grpc_errors
    def ListContainerStats(self, req, ctx):
        return api_pb2.ListContainerStatsResponse(stats=stats.list_container_stats(self.rt, _filter(req)))

    @_stream
    def StreamContainerStats(self, req, ctx):
        yield api_pb2.StreamContainerStatsResponse(container_stats=stats.list_container_stats(self.rt, _filter(req)))

    @grpc_errors
    def PodSandboxStats(self, req, ctx):
        sb = self.rt.sandbox(req.pod_sandbox_id)
        return api_pb2.PodSandboxStatsResponse(stats=stats.pod_sandbox_stats(self.rt, sb))

    @grpc_errors
    def ListPodSandboxStats(self, req, ctx):
        return api_pb2.ListPodSandboxStatsResponse(stats=stats.list_pod_sandbox_stats(self.rt, _filter(req)))

    @_stream
    def StreamPodSandboxStats(self, req, ctx):
        yield api_pb2.StreamPodSandboxStatsResponse(
            pod_sandbox_stats=stats.list_pod_sandbox_stats(self.rt, _filter(req)))

    @grpc_errors
    def ListMetricDescriptors(self, req, ctx):
        return api_pb2.ListMetricDescriptorsResponse(descriptors=stats.metric_descriptors())

    @grpc_errors
    def ListPodSandboxMetrics(self, req, ctx):
        sandboxes, _ = self.rt.store.snapshot()
        return api_pb2.ListPodSandboxMetricsResponse(
            pod_metrics=[stats.pod_sandbox_metrics(self.rt, sb) for sb in sandboxes])

    @_stream
    def StreamPodSandboxMetrics(self, req, ctx):
        sandboxes, _ = self.rt.store.snapshot()
        yield api_pb2.StreamPodSandboxMetricsResponse(
            pod_sandbox_metrics=[stats.pod_sandbox_metrics(self.rt, sb) for sb in sandboxes])

    # events
    @_stream
    def GetContainerEvents(self, req, ctx):
        yield from self.rt.events.stream(ctx.is_active)
