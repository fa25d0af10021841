"""The VirtualMachine API (vmlet.dev/v1alpha1) as pydantic models: the one source of truth.

`vmapi.crdgen` turns these models into the CRD's structural OpenAPI v3 schema
(deploy/manifests/crds/virtualmachines.yaml; a test fails when it is stale), so
the schema the API server enforces and the model the controller parses cannot
drift apart. Field names and nesting follow KubeVirt where vmlet has the same
concept (`runStrategy`, `template.spec.domain.cpu.cores`, `domain.memory.guest`,
`printableStatus`, `conditions`, `domain.disks`, `volumes`, `volumeStatus`); a VM
has one root disk (its `virtlet.cloud/` image, ephemeral or imported onto a claim)
and one interface, so those are single objects, not KubeVirt's named lists. Disks
are flat (`bus`, `readonly` directly on the disk; KubeVirt nests them under
`disk:`). vmapi/storage.py turns disks and volumes into the pod (docs/storage.md).

What a schema cannot check (a quantity too large for the node, cloud-init user
data that is not a YAML mapping, malformed SSH keys) is checked by rendering the
pod annotations and running the node runtime's own parser on them
(`podspec.validate`); failures become a `Failure` condition, never a crash.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
    "ErrorPvcNotFound", "WaitingForVolumeBinding",
]

# Kubernetes quantities as the API server writes them (no sign, binary or decimal suffix).
QUANTITY_PATTERN = r"^([0-9]+(\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DATA_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Labels on the VM pod and on the claims made from volumeClaimTemplates.
LABEL_VM = "vmlet.dev/vm"
LABEL_VM_UID = "vmlet.dev/vm-uid"
MAX_DISKS = 32  # the node's limit on vmlet.dev/disks entries (cri_shim/storage/disk_spec.py)
# The node's default max_disks (cri_shim/config.py): every disk counts, vmlet's cloud-init disk and an ephemeral
# root too. A node configured lower refuses the pod (CreateContainerError), a higher one is not used.
NODE_MAX_DISKS = 24
# The pod is "<vm>-vm" and carries the VM's name as a label value: both cap the name.
MAX_VM_NAME = 60

_FREE_FORM = {"x-kubernetes-preserve-unknown-fields": True}
# A list keyed by `name`: the API server itself refuses two entries of one name.
_NAMED_LIST = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]}
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
    """The disk the VM boots: a copy-on-write overlay of the image (ephemeral), or, with `volume`,
    the image imported once onto a claim (persistent)."""

    image: str = Field(..., min_length=14, max_length=512, pattern=r"^virtlet\.cloud/[^\s]+$",
                       description="virtlet.cloud/<name>: the qcow2 image the node runtime pulls.")
    imagePullPolicy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    bus: Literal["virtio", "scsi"] = Field(
        "virtio", description="Disk bus (VirtletDiskDriver): the root's and every disk's without a bus of its own.")
    size: str | None = Field(None, pattern=QUANTITY_PATTERN,
                             description="Size of the ephemeral root (VirtletRootVolumeSize); default: the "
                                         "image's. Not with volume: a persistent root's size is its claim's.")
    volume: str | None = Field(
        None, max_length=63, pattern=DNS_LABEL_PATTERN,
        description="The persistent root: a persistentVolumeClaim volume in volumes. The node writes the image "
                    "onto it once, when it is blank; it then outlives pods. A disk of the same name in "
                    "domain.disks gives its options.")
    capacity: str | None = Field(
        None, pattern=QUANTITY_PATTERN,
        description="Size of disk.img for a persistent root on a Filesystem claim; default: the claim's "
                    "requested storage less 5.5% file system overhead. Not for a Block claim.")
    # None, not False, as the default: a new defaulted field would change every existing VM's template
    # hash (podspec.template_hash dumps without None), and with it RestartRequired under running pods.
    reimage: bool | None = Field(
        None, description="Write the image over a persistent root that holds another image "
                          "(vmlet.dev/root-reimage); default false. Idempotent: once it holds this image, "
                          "nothing happens.")


class Disk(_Model):
    """A disk of the guest, from the volume of the same name. Flat: KubeVirt nests bus and readonly
    under `disk:`."""

    name: str = Field(..., max_length=63, pattern=DNS_LABEL_PATTERN,
                      description="The volume (in volumes) this disk is made from.")
    bus: Literal["virtio", "scsi", "sata"] | None = Field(None, description="Default: rootDisk.bus.")
    bootOrder: int | None = Field(None, ge=1, le=1000,
                                  description="Boot order (1 first); default: not bootable, the root is 1.")
    readonly: bool = Field(False, description="Read-only for the guest. ConfigMap/Secret disks always are.")
    serial: str | None = Field(None, max_length=20, pattern=r"^[A-Za-z0-9_.+-]{1,20}$",
                               description="Serial number; the guest finds the disk at "
                                           "/dev/disk/by-id/virtio-<serial>. Default: the name.")
    cache: Literal["none", "writethrough", "writeback", "directsync", "unsafe"] | None = Field(
        None, description="Host page cache mode; default none.")
    io: Literal["native", "threads", "io_uring"] | None = Field(
        None, description="QEMU I/O mode (native needs cache none or directsync); default: libvirt's.")


class VirtioFS(_Model):
    """Shared over virtio-fs (the only kind)."""


class Filesystem(_Model):
    """A ConfigMap or Secret volume shared with the guest as a directory (virtio-fs), as KubeVirt's
    domain.devices.filesystems; vmlet also mounts it (cloud-init) at mountPath."""

    name: str = Field(..., max_length=63, pattern=DNS_LABEL_PATTERN,
                      description="The configMap or secret volume (in volumes) to share.")
    virtiofs: VirtioFS = Field(default_factory=VirtioFS, json_schema_extra=_DEFAULTED)
    mountPath: str = Field(..., min_length=2, max_length=4096, pattern=r"^/\S+$",
                           description="Where the guest mounts it (read-only); a normalised absolute path.")


class ClaimSource(_Model):
    claimName: str = Field(..., max_length=253, pattern=DNS_SUBDOMAIN_PATTERN,
                           description="A claim in the VM's namespace, or the name of one of "
                                       "spec.volumeClaimTemplates (the claim <template>-<vm>).")
    readOnly: bool = Field(False, description="Mount the claim read-only (the disk is read-only too).")


class EmptyDiskSource(_Model):
    capacity: str = Field(..., pattern=QUANTITY_PATTERN,
                          description="Size of the blank disk; it lives as long as the pod.")


class KeyToPath(_Model):
    key: str = Field(..., min_length=1, max_length=253, pattern=DATA_KEY_PATTERN)
    path: str = Field(..., min_length=1, max_length=4096, pattern=r"^[^/]",
                      description="Relative file path (no '..' component).")
    mode: int | None = Field(None, ge=0, le=0o777)


class ConfigMapSource(_Model):
    name: str = Field(..., max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    items: list[KeyToPath] | None = Field(None, max_length=256, description="Keys to project; default all.")
    optional: bool | None = None


class SecretSource(_Model):
    secretName: str = Field(..., max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    items: list[KeyToPath] | None = Field(None, max_length=256, description="Keys to project; default all.")
    optional: bool | None = None


VOLUME_SOURCES = ("persistentVolumeClaim", "emptyDisk", "configMap", "secret")


class Volume(_Model):
    """Exactly one source. A disk of the same name makes it a guest disk; a configMap/secret volume
    may instead be one of domain.filesystems."""

    name: str = Field(..., max_length=63, pattern=DNS_LABEL_PATTERN)
    persistentVolumeClaim: ClaimSource | None = Field(
        None, description="A claim: its disk outlives the pod (disk.img on a Filesystem claim, the device of a "
                          "Block one).")
    emptyDisk: EmptyDiskSource | None = Field(None, description="A blank qcow2 that lives as long as the pod.")
    configMap: ConfigMapSource | None = Field(None, description="A ConfigMap: an ISO disk, or a shared directory.")
    secret: SecretSource | None = Field(None, description="A Secret: an ISO disk, or a shared directory.")


class Interface(_Model):
    binding: Literal["bridge", "masquerade"] = Field(
        "bridge", description="How the pod network reaches the guest (vmlet.dev/network-binding).")


class Domain(_Model):
    cpu: CPU = Field(default_factory=CPU, json_schema_extra=_DEFAULTED)
    memory: Memory = Field(default_factory=Memory, json_schema_extra=_DEFAULTED)
    rootDisk: RootDisk
    interface: Interface = Field(default_factory=Interface, json_schema_extra=_DEFAULTED)
    disks: list[Disk] | None = Field(None, max_length=MAX_DISKS, json_schema_extra=_NAMED_LIST,
                                     description="The guest's disks besides the root, in this order.")
    filesystems: list[Filesystem] | None = Field(None, max_length=64, json_schema_extra=_NAMED_LIST,
                                                 description="ConfigMap/Secret volumes shared as directories.")


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


class ExecAction(_Model):
    command: list[Annotated[str, Field(max_length=4096)]] = Field(
        ..., min_length=1, max_length=256,
        description="Run in the guest through its guest agent (argv, no shell); exit 0 is success.")


# Probe kinds KubeVirt and Kubernetes have that vmlet does not run: declared (free-form) so the API server
# keeps them and the controller can refuse them by name, instead of pruning them silently.
UNSUPPORTED_PROBES = ("httpGet", "tcpSocket", "grpc", "guestAgentPing")


class Probe(_Model):
    """A readiness or liveness probe of the VM, KubeVirt's names: `exec` only (run through the guest agent by
    the node's ExecSync); the pod's container gets it as is, so the kubelet runs it."""

    exec: ExecAction | None = None
    httpGet: dict[str, Any] | None = Field(None, json_schema_extra=_FREE_FORM, description="Not supported.")
    tcpSocket: dict[str, Any] | None = Field(None, json_schema_extra=_FREE_FORM, description="Not supported.")
    grpc: dict[str, Any] | None = Field(None, json_schema_extra=_FREE_FORM, description="Not supported.")
    guestAgentPing: dict[str, Any] | None = Field(None, json_schema_extra=_FREE_FORM, description="Not supported.")
    initialDelaySeconds: int | None = Field(None, ge=0, le=86400, description="Default 0.")
    timeoutSeconds: int | None = Field(None, ge=1, le=3600, description="Default 1 (the kubelet's).")
    periodSeconds: int | None = Field(None, ge=1, le=86400, description="Default 10.")
    successThreshold: int | None = Field(None, ge=1, le=1000, description="Default 1; 1 for a liveness probe.")
    failureThreshold: int | None = Field(None, ge=1, le=1000, description="Default 3.")

    @model_validator(mode="after")
    def _exec_only(self) -> "Probe":
        other = [k for k in UNSUPPORTED_PROBES if getattr(self, k) is not None]
        if other:
            raise ValueError(f"{other[0]} probes are not supported (only exec: a command run in the guest "
                             "through its guest agent)")
        if self.exec is None:
            raise ValueError("a probe needs exec.command (the only kind supported)")
        return self


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
    volumes: list[Volume] | None = Field(None, max_length=96, json_schema_extra=_NAMED_LIST,
                                         description="What disks and filesystems are made from.")
    readinessProbe: Probe | None = Field(None, description="Exec probe: the VM is ready while it succeeds.")
    livenessProbe: Probe | None = Field(
        None, description="Exec probe: the VM is stopped when it fails (runStrategy decides the restart).")

    @field_validator("livenessProbe")
    @classmethod
    def _liveness_threshold(cls, probe: Probe | None) -> Probe | None:
        if probe is not None and probe.successThreshold not in (None, 1):
            raise ValueError("successThreshold must be 1 for a liveness probe (as for a pod)")
        return probe


class TemplateMeta(_Model):
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class Template(_Model):
    metadata: TemplateMeta | None = None
    spec: VMISpec


class ClaimTemplateMeta(_Model):
    name: str = Field(..., max_length=63, pattern=DNS_LABEL_PATTERN,
                      description="The template's name; the claim is <name>-<vm name>.")
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class StorageRequest(_Model):
    storage: str = Field(..., pattern=QUANTITY_PATTERN)


class ClaimResources(_Model):
    requests: StorageRequest
    limits: StorageRequest | None = None


AccessMode = Literal["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]


class ClaimSpec(_Model):
    """The PersistentVolumeClaim spec fields a VM disk needs."""

    accessModes: list[AccessMode] = Field(..., min_length=1, max_length=4)
    resources: ClaimResources
    storageClassName: str | None = Field(
        None, max_length=253, pattern=r"^$|" + DNS_SUBDOMAIN_PATTERN,
        description="Default: the cluster's default class; \"\" for none.")
    volumeMode: Literal["Filesystem", "Block"] = Field(
        "Filesystem", description="Filesystem: the disk is disk.img in the volume; Block: the device itself.")


class ClaimTemplate(_Model):
    """A claim the controller creates, as a StatefulSet's volumeClaimTemplates."""

    metadata: ClaimTemplateMeta
    spec: ClaimSpec


class RetentionPolicy(_Model):
    whenDeleted: Literal["Retain", "Delete"] = Field(
        "Delete", description="Delete: the claims made from volumeClaimTemplates are owned by the VM and go "
                              "with it (garbage collection); Retain: they stay.")


class VirtualMachineSpec(_Model):
    runStrategy: RunStrategy = Field("Always", description="KubeVirt run strategy.")
    template: Template
    volumeClaimTemplates: list[ClaimTemplate] | None = Field(
        None, max_length=MAX_DISKS,
        description="Claims the controller creates (as <template>-<vm>) before the pod; a volume's "
                    "persistentVolumeClaim.claimName naming a template means that claim.")
    persistentVolumeClaimRetentionPolicy: RetentionPolicy | None = Field(
        None, description="What happens to the claims of volumeClaimTemplates when the VM is deleted.")


class Condition(_Model):
    # AgentConnected: the node's guest-info reporter's (vmapi/guest_info.py); the others the controller's.
    type: Literal["Ready", "Paused", "RestartRequired", "Failure", "AgentConnected"]
    status: Literal["True", "False", "Unknown"]
    reason: str | None = None
    message: str | None = None
    lastTransitionTime: str | None = None


class StartFailure(_Model):
    consecutiveFailCount: int = Field(0, ge=0)
    retryAfterTimestamp: str | None = None
    lastFailedPodUID: str | None = None


class PersistentVolumeClaimInfo(_Model):
    claimName: str
    volumeMode: str | None = None
    accessModes: list[str] | None = None
    capacity: dict[str, str] | None = Field(None, description="The bound volume's (status.capacity).")
    requests: dict[str, str] | None = Field(None, description="What the claim asks for (spec.resources.requests).")
    filesystemOverhead: str | None = Field(
        None, description="Share of a Filesystem claim kept free of disk.img when its capacity is derived.")


class VolumeStatus(_Model):
    name: str
    target: str | None = Field(None, description="Where the guest finds it: /dev/disk/by-id/... for a disk, "
                                                 "the mount path for a filesystem.")
    phase: str | None = Field(None, description="A claim's: Pending, Bound, Lost.")
    reason: str | None = None
    message: str | None = None
    persistentVolumeClaimInfo: PersistentVolumeClaimInfo | None = None


# The guest agent's facts (KubeVirt's VMI names), written by the reporter of the node the VM's pod runs on
# (vmapi/guest_info.py, which caps guest-supplied text at these bounds).
_GuestText = Annotated[str, Field(max_length=256)]


class GuestOSInfo(_Model):
    """KubeVirt's VirtualMachineInstanceGuestOSInfo: the guest agent's guest-get-osinfo."""

    name: _GuestText | None = None
    id: _GuestText | None = None
    version: _GuestText | None = None
    versionId: _GuestText | None = None
    prettyName: _GuestText | None = None
    kernelRelease: _GuestText | None = None
    kernelVersion: _GuestText | None = None
    machine: _GuestText | None = None


class NetworkInterface(_Model):
    """KubeVirt's VirtualMachineInstanceNetworkInterface, from guest-network-get-interfaces."""

    name: _GuestText | None = Field(None, description="The network: default (the pod network) on the guest "
                                                      "interface that carries the pod IP.")
    interfaceName: _GuestText | None = Field(None, description="The interface's name in the guest.")
    ipAddress: _GuestText | None = Field(None, description="The first of ipAddresses.")
    ipAddresses: list[_GuestText] | None = Field(None, max_length=16, description="Without prefix lengths; "
                                                                                  "link-local ones last.")
    mac: _GuestText | None = None
    infoSource: _GuestText | None = Field(None, description="guest-agent.")


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
    volumeStatus: list[VolumeStatus] | None = Field(None, description="Per volume: the claim and its state.")
    guestOSInfo: GuestOSInfo | None = Field(
        None, description="The guest agent's OS facts, while it is connected (the node's reporter).")
    interfaces: list[NetworkInterface] | None = Field(
        None, max_length=16, description="The guest's interfaces and addresses from its agent (the node's reporter).")


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
