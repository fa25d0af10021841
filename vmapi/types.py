"""The VirtualMachine API (vmlet.dev/v1alpha1) as pydantic models: the one source of truth.

`vmapi.crdgen` turns these models into the CRD's structural OpenAPI v3 schema
(deploy/manifests/crds/virtualmachines.yaml; a test fails when it is stale), so
the schema the API server enforces and the model the controller parses cannot
drift apart. Field names and nesting follow KubeVirt where vmlet has the same
concept (`runStrategy`, `template.spec.domain.cpu.cores`, `domain.memory.guest`,
`printableStatus`, `conditions`); a VM here has exactly one root disk (a
`virtlet.cloud/` image) and one interface, so those are single objects, not
KubeVirt's named lists.

What a schema cannot check (a quantity too large for the node, cloud-init user
data that is not a YAML mapping, malformed SSH keys) is checked by rendering the
pod annotations and running the node runtime's own parser on them
(`podspec.validate`); failures become a `Failure` condition, never a crash.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

GROUP = "vmlet.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "VirtualMachine"
PLURAL = "virtualmachines"
SINGULAR = "virtualmachine"
SHORT_NAMES = ["vm", "vms"]

RunStrategy = Literal["Always", "RerunOnFailure", "Once", "Manual", "Halted"]
RUN_STRATEGIES: tuple[str, ...] = RunStrategy.__args__  # type: ignore[attr-defined]

# KubeVirt's printableStatus values that vmlet can produce, plus ErrorInvalidSpec
# (KubeVirt rejects such specs in a webhook; vmlet has none, so it reports them).
PrintableStatus = Literal[
    "Stopped", "Starting", "Running", "Stopping", "Terminating", "CrashLoopBackOff",
    "ErrorUnschedulable", "ErrImagePull", "ImagePullBackOff", "ErrorInvalidSpec", "Unknown",
]

# Kubernetes quantities as the API server writes them (no sign, binary or decimal suffix).
QUANTITY_PATTERN = r"^([0-9]+(\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DATA_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
# The pod is "<vm>-vm" and carries the VM's name as a label value: both cap the name.
MAX_VM_NAME = 60

_FREE_FORM = {"x-kubernetes-preserve-unknown-fields": True}
# An empty object as the default makes the API server apply the defaults inside it.
_DEFAULTED = {"default": {}}

SSHKey = Annotated[str, Field(max_length=16384, pattern=r"^(ssh|ecdsa|sk)-[A-Za-z0-9@._+-]+ [A-Za-z0-9+/]+={0,2}( .*)?$")]


class _Model(BaseModel):
    # Unknown fields are an error in the model, as they are pruned by the API server.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class CPU(_Model):
    """Guest CPUs: `cores` becomes VirtletVCPUCount; `model` VirtletCPUModel."""

    cores: int = Field(1, ge=1, le=255, description="Number of vCPUs (VirtletVCPUCount).")
    model: str | None = Field(
        None, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$",
        description="host-model, host-passthrough or a libvirt CPU model name (VirtletCPUModel).",
    )


class Memory(_Model):
    guest: str = Field("1Gi", pattern=QUANTITY_PATTERN,
                       description="Guest RAM; becomes the container's memory request and limit.")


class RootDisk(_Model):
    """The VM's only disk: a copy-on-write overlay of the image."""

    image: str = Field(..., min_length=14, max_length=512, pattern=r"^virtlet\.cloud/[^\s]+$",
                       description="virtlet.cloud/<name>: the qcow2 image the node runtime pulls.")
    imagePullPolicy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    bus: Literal["virtio", "scsi"] = Field("virtio", description="Disk bus (VirtletDiskDriver).")
    size: str | None = Field(None, pattern=QUANTITY_PATTERN,
                             description="Root disk size (VirtletRootVolumeSize); default: the image's.")


class Interface(_Model):
    binding: Literal["bridge", "masquerade"] = Field(
        "bridge", description="How the pod network reaches the guest (vmlet.dev/network-binding).")


class Domain(_Model):
    cpu: CPU = Field(default_factory=CPU, json_schema_extra=_DEFAULTED)
    memory: Memory = Field(default_factory=Memory, json_schema_extra=_DEFAULTED)
    rootDisk: RootDisk
    interface: Interface = Field(default_factory=Interface, json_schema_extra=_DEFAULTED)


class SecretKeyRef(_Model):
    name: str = Field(..., min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    key: str | None = Field(None, min_length=1, max_length=253, pattern=DATA_KEY_PATTERN)


class CloudInit(_Model):
    """NoCloud data, as KubeVirt's cloudInitNoCloud plus SSH keys; Secrets are read on the node."""

    userData: str | None = Field(None, max_length=131072,
                                 description="#cloud-config YAML mapping, or a script starting with #!.")
    userDataSecretRef: SecretKeyRef | None = Field(
        None, description="Secret holding user data (VirtletCloudInitUserDataSource); key default userdata.")
    sshKeys: list[SSHKey] | None = Field(None, max_length=256, description="Public keys (VirtletSSHKeys).")
    sshKeysSecretRef: SecretKeyRef | None = Field(
        None, description="Secret with authorized keys (VirtletSSHKeySource); key default authorized_keys.")


class VMISpec(_Model):
    domain: Domain
    cloudInit: CloudInit | None = None
    nodeSelector: dict[str, str] | None = None
    affinity: dict[str, Any] | None = Field(None, json_schema_extra=_FREE_FORM,
                                            description="Pod affinity, passed to the pod as is.")
    tolerations: list[dict[str, Any]] | None = Field(
        None, json_schema_extra={"items": {"type": "object", **_FREE_FORM}},
        description="Pod tolerations, passed to the pod as is.")
    terminationGracePeriodSeconds: int = Field(
        180, ge=0, le=3600, description="Time the guest gets for an ACPI shutdown (KubeVirt's default).")


class TemplateMeta(_Model):
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class Template(_Model):
    metadata: TemplateMeta | None = None
    spec: VMISpec


class VirtualMachineSpec(_Model):
    runStrategy: RunStrategy = Field("Always", description="KubeVirt run strategy.")
    template: Template


class Condition(_Model):
    type: Literal["Ready", "Paused", "RestartRequired", "Failure"]
    status: Literal["True", "False", "Unknown"]
    reason: str | None = None
    message: str | None = None
    lastTransitionTime: str | None = None


class StartFailure(_Model):
    consecutiveFailCount: int = Field(0, ge=0)
    retryAfterTimestamp: str | None = None
    lastFailedPodUID: str | None = None


class VirtualMachineStatus(_Model):
    printableStatus: PrintableStatus | None = None
    ready: bool | None = None
    created: bool | None = None
    conditions: list[Condition] | None = None
    runStrategy: RunStrategy | None = Field(None, description="The run strategy last acted upon.")
    observedGeneration: int | None = None
    restartCount: int | None = Field(None, description="Pods created for this VM after its first one.")
    podName: str | None = None
    podUID: str | None = None
    podPhase: str | None = None
    podIP: str | None = None
    nodeName: str | None = None
    templateHash: str | None = Field(None, description="Template hash of the running pod.")
    startFailure: StartFailure | None = None


class VirtualMachine(_Model):
    model_config = ConfigDict(extra="ignore")  # apiVersion/kind/metadata are the API server's business

    spec: VirtualMachineSpec
    status: VirtualMachineStatus | None = None


PRINTER_COLUMNS = [
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Status", "type": "string", "jsonPath": ".status.printableStatus"},
    {"name": "Ready", "type": "boolean", "jsonPath": ".status.ready"},
    {"name": "Strategy", "type": "string", "jsonPath": ".spec.runStrategy", "priority": 1},
    {"name": "Node", "type": "string", "jsonPath": ".status.nodeName", "priority": 1},
    {"name": "IP", "type": "string", "jsonPath": ".status.podIP", "priority": 1},
]
