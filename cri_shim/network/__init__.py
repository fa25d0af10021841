"""The network side of a VM pod sandbox: CNI in a per-pod netns, handed to the VM over a host bridge.

The shim uses `NetworkManager` (manager.py) and the data types below; see
docs/networking.md for the design.
"""

from .errors import CNIConfigError, CNIPluginError, NetworkError, NetworkLost
from .manager import NetworkManager
from .model import BINDING_ANNOTATION, Binding, DNSSettings, PodNetwork, Route, binding_from_annotations

__all__ = [
    "BINDING_ANNOTATION", "Binding", "CNIConfigError", "CNIPluginError", "DNSSettings", "NetworkError",
    "NetworkLost", "NetworkManager", "PodNetwork", "Route", "binding_from_annotations",
]
