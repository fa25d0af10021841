"""Exec, Attach, PortForward: the RPCs that answer a URL of the streaming server (cri_shim/streaming/).

A VM has no process namespace to exec into; the serial console and SSH are
the ways in. These answer UNIMPLEMENTED with a message saying so, which is
how the kubelet expects an unsupported CRI call to fail.
"""

from __future__ import annotations

from . import errors

_WHY = "VM pods have no exec/attach/port-forward in vmlet yet; reach the VM over SSH or its serial console"


def exec_(_rt, req):
    raise errors.unimplemented(f"Exec into container {errors.show(req.container_id)}: {_WHY}")


def attach(_rt, req):
    raise errors.unimplemented(f"Attach to container {errors.show(req.container_id)}: {_WHY}")


def port_forward(_rt, req):
    raise errors.unimplemented(f"PortForward to pod sandbox {errors.show(req.pod_sandbox_id)}: {_WHY}")

