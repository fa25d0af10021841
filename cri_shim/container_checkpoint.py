"""CheckpointContainer: not for VMs (a VM's memory and disks are not a container checkpoint)."""

from __future__ import annotations

from . import errors


def checkpoint_container(_rt, req):
    raise errors.unimplemented(
        f"CheckpointContainer {errors.show(req.container_id)}: checkpointing VMs is not supported yet")
