"""One CRI socket for the kubelet: VM pods to vmlet, everything else to containerd."""
