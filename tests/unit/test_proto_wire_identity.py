"""Our runtime.v1 descriptor must be wire-compatible with an independent copy of the CRI API.

The reference is the descriptor embedded in the PyPI wheel
``container-runtime-interface-api`` (``cri_api/v1/api_pb2.py``). The package is
never imported (it pins old grpcio/protobuf and would register a clashing
``runtime.v1`` in the default pool): its source is parsed with ``ast`` and the
serialized FileDescriptorProto handed to ``AddSerializedFile`` is read out.

Everything in the wheel must be in ours unchanged; ours may add to it, since
upstream moves ahead of the wheel.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

from proto.runtime.v1 import api_pb2

WHEEL_DIST = "container-runtime-interface-api"
WHEEL_MODULE = Path("cri_api", "v1", "api_pb2.py")
PACKAGE = "runtime.v1"
FDP = descriptor_pb2.FieldDescriptorProto


# ---------------------------------------------------------------- loading the reference


def _wheel_api_pb2_path() -> Path | None:
    spec = importlib.util.find_spec("cri_api")  # top-level: locates without importing
    if spec is not None:
        for base in spec.submodule_search_locations or ():
            candidate = Path(base, *WHEEL_MODULE.parts[1:])
            if candidate.is_file():
                return candidate
    try:
        files = importlib.metadata.files(WHEEL_DIST) or ()
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if Path(str(f)) == WHEEL_MODULE:
            return Path(f.locate())
    return None


def _serialized_descriptor(source: str) -> bytes:
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "AddSerializedFile"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, bytes)
        ):
            return node.args[0].value
    raise AssertionError("no AddSerializedFile(b'...') call found in the wheel's api_pb2.py")


@pytest.fixture(scope="module")
def wheel_bytes() -> bytes:
    path = _wheel_api_pb2_path()
    if path is None:
        reason = (
            f"reference wheel not installed: pip install --no-deps {WHEEL_DIST}==2.0.1 "
            "(needed to prove CRI wire identity)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return _serialized_descriptor(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def wheel_fdp(wheel_bytes: bytes) -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(wheel_bytes)


@pytest.fixture(scope="module")
def our_fdp() -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto()
    api_pb2.DESCRIPTOR.CopyToProto(fdp)
    return fdp


@pytest.fixture(scope="module")
def wheel_pool(wheel_bytes: bytes) -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()  # private pool: no clash with our runtime.v1
    pool.AddSerializedFile(wheel_bytes)
    return pool


# ---------------------------------------------------------------- structural comparison


def _messages(fdp) -> dict[str, descriptor_pb2.DescriptorProto]:
    """Every message (nested ones and map entries included) by full name."""
    out = {}

    def walk(prefix, msgs):
        for m in msgs:
            name = f"{prefix}.{m.name}"
            out[name] = m
            walk(name, m.nested_type)

    walk(f".{fdp.package}", fdp.message_type)
    return out


def _enums(fdp) -> dict[str, descriptor_pb2.EnumDescriptorProto]:
    out = {f".{fdp.package}.{e.name}": e for e in fdp.enum_type}
    for name, m in _messages(fdp).items():
        out.update({f"{name}.{e.name}": e for e in m.enum_type})
    return out


def _field_facts(msg: descriptor_pb2.DescriptorProto, f: descriptor_pb2.FieldDescriptorProto) -> dict:
    """What decides a field's wire format and generated API (json_name left out)."""
    return {
        "number": f.number,
        "type": FDP.Type.Name(f.type),
        "label": FDP.Label.Name(f.label),
        "type_name": f.type_name,
        "oneof": msg.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None,
        "proto3_optional": f.proto3_optional,
        "deprecated": f.options.deprecated,
    }


def compare(wheel, ours) -> tuple[list[str], list[str]]:
    """Return (differences, additions): wheel items missing/changed in ours, and items only ours has."""
    diffs: list[str] = []
    adds: list[str] = []

    for key in ("package", "syntax"):
        if getattr(wheel, key) != getattr(ours, key):
            diffs.append(f"file {key}: wheel {getattr(wheel, key)!r} != ours {getattr(ours, key)!r}")

    wm, om = _messages(wheel), _messages(ours)
    adds += [f"message {n}" for n in sorted(set(om) - set(wm))]
    for name, w in wm.items():
        o = om.get(name)
        if o is None:
            diffs.append(f"message {name}: missing")
            continue
        if w.options.map_entry != o.options.map_entry:
            diffs.append(f"message {name}: map_entry wheel {w.options.map_entry} != ours {o.options.map_entry}")
        missing_oneofs = {d.name for d in w.oneof_decl} - {d.name for d in o.oneof_decl}
        if missing_oneofs:
            diffs.append(f"message {name}: oneof(s) missing: {sorted(missing_oneofs)}")
        wf = {f.name: _field_facts(w, f) for f in w.field}
        of = {f.name: _field_facts(o, f) for f in o.field}
        for fname, facts in wf.items():
            if fname not in of:
                diffs.append(f"field {name}.{fname} (#{facts['number']}): missing")
                continue
            for k, v in facts.items():
                if of[fname][k] != v:
                    diffs.append(f"field {name}.{fname}: {k} wheel {v!r} != ours {of[fname][k]!r}")
        wnums = {facts["number"]: fname for fname, facts in wf.items()}
        for fname in sorted(set(of) - set(wf), key=lambda n: of[n]["number"]):
            num = of[fname]["number"]
            if num in wnums:
                diffs.append(f"field {name}.{fname}: number {num} is {wnums[num]} in the wheel")
            else:
                adds.append(f"field {name}.{fname} = {num}")
        for rng in w.reserved_range:
            for fname, facts in of.items():
                if rng.start <= facts["number"] < rng.end:
                    diffs.append(f"field {name}.{fname}: uses number {facts['number']} reserved in the wheel")

    we, oe = _enums(wheel), _enums(ours)
    adds += [f"enum {n}" for n in sorted(set(oe) - set(we))]
    for name, w in we.items():
        o = oe.get(name)
        if o is None:
            diffs.append(f"enum {name}: missing")
            continue
        wv = {v.name: v.number for v in w.value}
        ov = {v.name: v.number for v in o.value}
        for vname, num in wv.items():
            if vname not in ov:
                diffs.append(f"enum value {name}.{vname} (= {num}): missing")
            elif ov[vname] != num:
                diffs.append(f"enum value {name}.{vname}: wheel {num} != ours {ov[vname]}")
        wnums = set(wv.values())
        for vname in sorted(set(ov) - set(wv)):
            if ov[vname] in wnums:
                diffs.append(f"enum value {name}.{vname}: number {ov[vname]} has another name in the wheel")
            else:
                adds.append(f"enum value {name}.{vname} = {ov[vname]}")

    ws = {s.name: s for s in wheel.service}
    os_ = {s.name: s for s in ours.service}
    adds += [f"service {n}" for n in sorted(set(os_) - set(ws))]
    for sname, w in ws.items():
        o = os_.get(sname)
        if o is None:
            diffs.append(f"service {sname}: missing")
            continue
        om_ = {m.name: m for m in o.method}
        for m in w.method:
            mo = om_.get(m.name)
            if mo is None:
                diffs.append(f"rpc {sname}.{m.name}: missing")
                continue
            for k in ("input_type", "output_type", "client_streaming", "server_streaming"):
                if getattr(m, k) != getattr(mo, k):
                    diffs.append(f"rpc {sname}.{m.name}: {k} wheel {getattr(m, k)!r} != ours {getattr(mo, k)!r}")
        wnames = {m.name for m in w.method}
        adds += [
            f"rpc {sname}.{m.name}({m.input_type}) returns ({'stream ' if m.server_streaming else ''}{m.output_type})"
            for m in o.method
            if m.name not in wnames
        ]
    return diffs, adds


def test_package_and_service_names(our_fdp):
    assert api_pb2.DESCRIPTOR.package == PACKAGE
    assert our_fdp.syntax == "proto3"
    services = {s.full_name for s in api_pb2.DESCRIPTOR.services_by_name.values()}
    assert services == {"runtime.v1.RuntimeService", "runtime.v1.ImageService"}


def test_wire_identity_with_reference_wheel(wheel_fdp, our_fdp):
    assert wheel_fdp.package == PACKAGE, f"unexpected reference package {wheel_fdp.package!r}"
    diffs, adds = compare(wheel_fdp, our_fdp)
    if adds:
        print(f"ours has {len(adds)} addition(s) beyond the reference wheel:")
        for a in adds:
            print(f"  + {a}")
    assert not diffs, "runtime.v1 differs from the reference wheel:\n" + "\n".join(f"  - {d}" for d in diffs)
    # Sanity: the comparison really looked at the whole API.
    assert len(_messages(wheel_fdp)) > 100 and len(wheel_fdp.service) == 2


def test_compare_reports_a_changed_field(wheel_fdp, our_fdp):
    """The comparison itself must catch a renumbered field and a dropped rpc."""
    broken = descriptor_pb2.FileDescriptorProto()
    broken.CopyFrom(our_fdp)
    msg = next(m for m in broken.message_type if m.name == "PodSandboxMetadata")
    next(f for f in msg.field if f.name == "uid").number = 42
    svc = next(s for s in broken.service if s.name == "RuntimeService")
    del svc.method[0]
    diffs, _ = compare(wheel_fdp, broken)
    assert any("PodSandboxMetadata.uid: number" in d for d in diffs), diffs
    assert any(d.startswith("rpc RuntimeService.") and "missing" in d for d in diffs), diffs


# ---------------------------------------------------------------- round trips over the wire


def _wheel_class(pool, name: str):
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))


def _as_dict(msg) -> dict:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def _sandbox_config() -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name="vm-0", uid="1234-abcd", namespace="default", attempt=2),
        hostname="vm-0",
        log_directory="/var/log/pods/default_vm-0_1234-abcd",
        dns_config=api_pb2.DNSConfig(servers=["10.96.0.10"], searches=["svc.cluster.local"], options=["ndots:5"]),
        port_mappings=[
            api_pb2.PortMapping(protocol=api_pb2.UDP, container_port=53, host_port=5353, host_ip="0.0.0.0")
        ],
        labels={"app": "vm", "io.kubernetes.pod.name": "vm-0"},
        annotations={"vmlet/cpus": "2"},
        linux=api_pb2.LinuxPodSandboxConfig(
            cgroup_parent="/kubepods/burstable/pod1234",
            sysctls={"net.ipv4.ip_forward": "1"},
            security_context=api_pb2.LinuxSandboxSecurityContext(
                namespace_options=api_pb2.NamespaceOption(
                    network=api_pb2.NODE,
                    pid=api_pb2.CONTAINER,
                    userns_options=api_pb2.UserNamespace(
                        mode=api_pb2.POD,
                        uids=[api_pb2.IDMapping(host_id=100000, container_id=0, length=65536)],
                    ),
                ),
                run_as_user=api_pb2.Int64Value(value=1000),
                supplemental_groups=[5, 6],
                supplemental_groups_policy=api_pb2.Strict,
                seccomp=api_pb2.SecurityProfile(
                    profile_type=api_pb2.SecurityProfile.Localhost, localhost_ref="/var/lib/seccomp.json"
                ),
            ),
            resources=api_pb2.LinuxContainerResources(
                cpu_quota=200000, cpu_period=100000, memory_limit_in_bytes=1 << 30, unified={"memory.high": "max"}
            ),
        ),
        windows=api_pb2.WindowsPodSandboxConfig(
            security_context=api_pb2.WindowsSandboxSecurityContext(run_as_username="x", host_process=True)
        ),
    )


def _container_status() -> api_pb2.ContainerStatus:
    return api_pb2.ContainerStatus(
        id="c0ffee",
        metadata=api_pb2.ContainerMetadata(name="main", attempt=1),
        state=api_pb2.CONTAINER_EXITED,
        created_at=1_700_000_000_000_000_000,
        started_at=1_700_000_001_000_000_000,
        finished_at=1_700_000_002_000_000_000,
        exit_code=-9,
        image=api_pb2.ImageSpec(image="docker.io/library/alpine:3", annotations={"a": "b"}, runtime_handler="vm"),
        image_ref="sha256:abc",
        image_id="sha256:abc",
        reason="OOMKilled",
        message="out of memory",
        labels={"l": "1"},
        annotations={"k": "v"},
        mounts=[
            api_pb2.Mount(
                container_path="/data",
                host_path="/srv/data",
                readonly=True,
                propagation=api_pb2.PROPAGATION_BIDIRECTIONAL,
                uidMappings=[api_pb2.IDMapping(host_id=1, container_id=2, length=3)],
                recursive_read_only=True,
            )
        ],
        log_path="main/1.log",
        resources=api_pb2.ContainerResources(
            linux=api_pb2.LinuxContainerResources(
                cpu_shares=512,
                cpuset_cpus="0-1",
                hugepage_limits=[api_pb2.HugepageLimit(page_size="2MB", limit=1 << 21)],
            )
        ),
        user=api_pb2.ContainerUser(linux=api_pb2.LinuxContainerUser(uid=0, gid=0, supplemental_groups=[10])),
        stop_signal=api_pb2.SIGTERM,
    )


@pytest.mark.parametrize("build", [_sandbox_config, _container_status], ids=["PodSandboxConfig", "ContainerStatus"])
def test_round_trip_ours_to_wheel_and_back(wheel_pool, build):
    ours = build()
    name = ours.DESCRIPTOR.name
    WheelMsg = _wheel_class(wheel_pool, name)

    theirs = WheelMsg.FromString(ours.SerializeToString())
    assert _as_dict(theirs) == _as_dict(ours), f"{name}: wheel decoded our bytes differently"

    back = type(ours).FromString(theirs.SerializeToString())
    assert back == ours, f"{name}: our decode of the wheel's bytes differs"


def test_round_trip_wheel_to_ours(wheel_pool):
    """Built with the reference classes only, decoded by ours."""
    Req = _wheel_class(wheel_pool, "CreateContainerRequest")
    theirs = Req()
    theirs.pod_sandbox_id = "sb-1"
    theirs.config.metadata.name = "main"
    theirs.config.image.image = "alpine"
    theirs.config.command.extend(["/bin/sh", "-c"])
    env = theirs.config.envs.add()
    env.key, env.value = "A", "1"
    theirs.config.linux.security_context.capabilities.add_capabilities.append("NET_ADMIN")
    theirs.config.linux.security_context.namespace_options.pid = 3  # TARGET
    theirs.config.labels["x"] = "y"
    theirs.config.CDI_devices.add().name = "vendor.com/gpu=0"
    theirs.config.stop_signal = 23  # SIGTERM
    theirs.sandbox_config.metadata.uid = "u"

    ours = api_pb2.CreateContainerRequest.FromString(theirs.SerializeToString())
    assert ours.pod_sandbox_id == "sb-1"
    assert list(ours.config.command) == ["/bin/sh", "-c"]
    assert ours.config.envs[0].key == "A" and ours.config.envs[0].value == "1"
    assert ours.config.linux.security_context.namespace_options.pid == api_pb2.TARGET
    assert ours.config.CDI_devices[0].name == "vendor.com/gpu=0"
    assert ours.config.stop_signal == api_pb2.SIGTERM
    assert _as_dict(ours) == _as_dict(theirs)
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)
