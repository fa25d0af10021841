"""ExecSync, and the exec sessions of the streaming server: commands run in the guest through its agent."""

from __future__ import annotations

from . import errors


def exec_sync(_rt, req):
    raise errors.unimplemented(
        f"ExecSync into container {errors.show(req.container_id)}: VM pods have no exec in vmlet yet; "
        "reach the VM over SSH or its serial console")
