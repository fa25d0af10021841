"""A VM's storage on the node.

`vm_files`: the VM's own directory (root overlay, cloud-init disk, console log).
`pod_volumes`: the kubelet's directory mounts shared with the guest over virtio-fs.
`disks`: the pod's volumes given to the guest as disks (block PVs, disk images on
filesystem volumes, emptyDisks, ConfigMap/Secret ISOs, persistent roots) — see
docs/storage.md for the `vmlet.dev/disks` annotation and what survives what.
"""
