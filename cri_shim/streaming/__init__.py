"""The CRI streaming server: the HTTP endpoint behind the URLs that Exec, Attach and PortForward answer.

The kubelet (or crictl) gets a URL from the RPC and connects to it; this
package serves it (`server`), as the kubelet's own `cri/streaming` server
does for containerd: a single-use token per request (`tokens`), SPDY/3.1 (`spdy`) and
WebSocket (`websocket`) transports, and on top of them the remotecommand
(`remotecommand`) and port-forward (`portforward`) protocols. What a session
does in the VM is the runtime's business (`backend` names the interface):
the guest agent for exec, the serial console for attach, a TCP connection
from the pod's network namespace for port-forward. docs/streaming.md has the
URLs, configuration, protocols and limits.
"""
