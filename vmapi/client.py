"""Thin wrappers around the official kubernetes client, and the API permissions they need.

Every call the controller makes goes through a method declared with `@uses(group,
resource, verb)`; `PERMISSIONS` is that table plus what kopf itself calls. The
RBAC manifest is tested against it, and the kmock tests check that every request
the running operator sends is in it.

Bodies are read as plain dicts (`_preload_content=False`): the controller works on
JSON like kopf does, and skipping the client's model classes is most of a
reconcile's CPU time. Patches are JSON merge patches: strategic merge is a
kube-apiserver speciality (and kmock, the test emulator, lacks it).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, TypeVar

import kubernetes
from kubernetes.client.rest import ApiException

from vmapi import types

MERGE = "application/merge-patch+json"
F = TypeVar("F", bound=Callable[..., Any])

USED: dict[tuple[str, str, str], str] = {}
# kopf's own calls: watching the handled resources, posting events, peering, CRD scanning.
KOPF: dict[tuple[str, str, str], str] = {
    (types.GROUP, types.PLURAL, "list"): "kopf: list+watch VMs",
    (types.GROUP, types.PLURAL, "watch"): "kopf: list+watch VMs",
    (types.GROUP, types.PLURAL, "patch"): "kopf: finalizer and progress annotations",
    ("", "pods", "list"): "kopf: list+watch VM pods",
    ("", "pods", "watch"): "kopf: list+watch VM pods",
    ("", "events", "create"): "kopf.event(): transitions as Kubernetes events",
    ("", "persistentvolumeclaims", "list"): "kopf: list+watch claims (one that appears wakes the VMs waiting for it)",
    ("", "persistentvolumeclaims", "watch"): "kopf: list+watch claims",
    ("kopf.dev", "clusterkopfpeerings", "list"): "kopf peering (one active controller)",
    ("kopf.dev", "clusterkopfpeerings", "watch"): "kopf peering",
    ("kopf.dev", "clusterkopfpeerings", "patch"): "kopf peering",
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"): "kopf: resource scanning",
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"): "kopf: resource scanning",
}


# Not a call, but what the API server checks when one is made: an owner reference with
# blockOwnerDeletion (the pod's, the claims') needs update on the owner's finalizers subresource where
# the OwnerReferencesPermissionEnforcement admission plugin runs.
ADMISSION: dict[tuple[str, str, str], str] = {
    (types.GROUP, f"{types.PLURAL}/finalizers", "update"): "blockOwnerDeletion in the pod's and claims' owner references",
}


def uses(group: str, resource: str, verb: str) -> Callable[[F], F]:
    def mark(fn: F) -> F:
        USED[(group, resource, verb)] = f"{fn.__qualname__}"
        return fn
    return mark


class Conflict(Exception):
    """409: already exists, or a precondition (resourceVersion, uid) did not hold."""


def load_api_client(kubeconfig: str | None = None, context: str | None = None,
                    user_agent: str | None = None) -> kubernetes.client.ApiClient:
    """From a kubeconfig file, else in-cluster service account, else ~/.kube/config (or $KUBECONFIG)."""
    cfg = kubernetes.client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        kubernetes.config.load_incluster_config(client_configuration=cfg)
    else:
        kubernetes.config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
    # No urllib3 retries (its default is 3): a read timeout retried three times makes a request's
    # deadline four times what Kube(timeout=...) says. The controller's worker retries with back-off.
    cfg.retries = 0
    api = kubernetes.client.ApiClient(configuration=cfg)
    if user_agent:
        api.user_agent = user_agent
    return api


def connection_info(api: kubernetes.client.ApiClient):
    """The same endpoint and credentials for kopf (its own aiohttp client), from the kubernetes client's."""
    import kopf
    cfg = api.configuration
    auth = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
    scheme, token = (None, None)
    if auth:
        scheme, _, token = auth.partition(" ") if " " in auth else ("Bearer", "", auth)
    return kopf.ConnectionInfo(
        server=cfg.host, ca_path=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl, scheme=scheme, token=token,
        certificate_path=cfg.cert_file, private_key_path=cfg.key_file,
    )


def _json(resp: Any) -> dict[str, Any]:
    return json.loads(resp.data or b"{}")


DEFAULT_TIMEOUT = 30.0


class Kube:
    """The API calls the controller and vmctl make; dicts in, dicts out.

    Every call has a deadline (`timeout` seconds to connect, and again to read the
    answer): without one a request that the API server (or a half-open connection)
    never answers blocks the VM's worker thread for good.
    """

    def __init__(self, api: kubernetes.client.ApiClient, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.api = api
        self.timeout = timeout
        self._opts: dict[str, Any] = {"_preload_content": False, "_request_timeout": (timeout, timeout)}
        self.core = kubernetes.client.CoreV1Api(api)
        self.custom = kubernetes.client.CustomObjectsApi(api)

    # -- pods
    @uses("", "pods", "get")
    def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return _json(self.core.read_namespaced_pod(name, namespace, **self._opts))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    @uses("", "pods", "create")
    def create_pod(self, manifest: dict[str, Any]) -> dict[str, Any]:
        try:
            return _json(self.core.create_namespaced_pod(manifest["metadata"]["namespace"], manifest,
                                                         **self._opts))
        except ApiException as e:
            if e.status == 409:
                raise Conflict(f"pod {manifest['metadata']['name']} already exists") from None
            raise

    @uses("", "pods/attach", "create")
    def attach_pod(self, namespace: str, name: str, container: str):
        """A WebSocket to the pod's attach subresource (stdin, stdout, tty): the VM's serial console."""
        # Only vmctl console needs the WebSocket client. capture_all=False: else WSClient.update appends every
        # console byte to a copy (WSClient._all) nobody reads, for as long as the console stays open. kubernetes
        # 37's stream() does not pass capture_all on (the generated method refuses the keyword), so its request
        # function gets it directly and stream()'s own plumbing (URL, auth headers, binary) does the rest.
        import functools

        from kubernetes.stream import stream, ws_client
        call = functools.partial(ws_client.websocket_call, capture_all=False)
        no_copy_stream = functools.partial(stream.func, call, *stream.args[1:])
        return no_copy_stream(self.core.connect_get_namespaced_pod_attach, name, namespace, container=container,
                              stdin=True, stdout=True, stderr=False, tty=True, _preload_content=False,
                              binary=True)

    @uses("", "pods", "delete")
    def delete_pod(self, namespace: str, name: str, uid: str | None = None) -> bool:
        """False when already gone. The uid precondition never deletes a newer pod of the same name."""
        body = kubernetes.client.V1DeleteOptions(
            preconditions=kubernetes.client.V1Preconditions(uid=uid) if uid else None)
        try:
            self.core.delete_namespaced_pod(name, namespace, body=body, **self._opts)
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            if e.status == 409:
                raise Conflict(f"pod {name}: uid precondition failed") from None
            raise

    # -- persistent volume claims
    @uses("", "persistentvolumeclaims", "get")
    def get_pvc(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return _json(self.core.read_namespaced_persistent_volume_claim(name, namespace, **self._opts))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    @uses("", "persistentvolumeclaims", "create")
    def create_pvc(self, manifest: dict[str, Any]) -> dict[str, Any]:
        try:
            return _json(self.core.create_namespaced_persistent_volume_claim(
                manifest["metadata"]["namespace"], manifest, **self._opts))
        except ApiException as e:
            if e.status == 409:
                raise Conflict(f"persistentvolumeclaim {manifest['metadata']['name']} already exists") from None
            raise

    @uses("", "persistentvolumeclaims", "patch")
    def patch_pvc(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A merge patch; Conflict when it names a resourceVersion that is not the claim's any more."""
        try:
            return _json(self.core.patch_namespaced_persistent_volume_claim(
                name, namespace, patch, _content_type=MERGE, **self._opts))
        except ApiException as e:
            if e.status == 409:
                raise Conflict(f"persistentvolumeclaim {name} changed meanwhile") from None
            raise

    # -- virtual machines
    @uses(types.GROUP, types.PLURAL, "get")
    def get_vm(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return _json(self.custom.get_namespaced_custom_object(
                types.GROUP, types.VERSION, namespace, types.PLURAL, name, **self._opts))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    @uses(types.GROUP, types.PLURAL, "list")
    def list_vms(self, namespace: str | None) -> list[dict[str, Any]]:
        if namespace is None:
            resp = self.custom.list_cluster_custom_object(types.GROUP, types.VERSION, types.PLURAL,
                                                          **self._opts)
        else:
            resp = self.custom.list_namespaced_custom_object(types.GROUP, types.VERSION, namespace, types.PLURAL,
                                                             **self._opts)
        items = _json(resp).get("items") or []
        # kmock (and only it) ignores the namespace of a namespaced list: filter here too.
        return [i for i in items if namespace is None or i.get("metadata", {}).get("namespace") == namespace]

    @uses(types.GROUP, types.PLURAL, "patch")
    def patch_vm(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        try:
            return _json(self.custom.patch_namespaced_custom_object(
                types.GROUP, types.VERSION, namespace, types.PLURAL, name, patch,
                _content_type=MERGE, **self._opts))
        except ApiException as e:
            if e.status == 409:
                raise Conflict(f"virtualmachine {name} changed meanwhile") from None
            raise

    @uses(types.GROUP, f"{types.PLURAL}/status", "patch")
    def patch_vm_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        return _json(self.custom.patch_namespaced_custom_object_status(
            types.GROUP, types.VERSION, namespace, types.PLURAL, name, {"status": status},
            _content_type=MERGE, **self._opts))


# Used by vmctl only (it runs with the user's credentials, not the controller's).
VMCTL_ONLY = ("Kube.list_vms", "Kube.attach_pod")


def controller_permissions() -> dict[tuple[str, str, str], str]:
    """(group, resource, verb) the controller needs: kopf's calls, the Kube methods it uses, and what
    admission checks on its writes."""
    return {**KOPF, **ADMISSION, **{k: v for k, v in USED.items() if v not in VMCTL_ONLY}}
