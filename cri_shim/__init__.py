"""vmlet's node runtime: the CRI RuntimeService that runs pod sandboxes as libvirt VMs."""
