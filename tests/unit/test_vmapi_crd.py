"""The VirtualMachine CRD: generated from vmapi.types, structural, and judged by a real JSON-schema validator."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tests.support.prereq import require
from vmapi import crdgen, types

@pytest.fixture(scope="module")
def validator():
    try:
        import jsonschema as js
    except ImportError as e:
        require(False, f"jsonschema not installed ({e})")
    crd = yaml.safe_load(crdgen.CRD_PATH.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    js.Draft7Validator.check_schema(schema)
    return js.Draft7Validator(schema)


GOOD = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy/manifests/samples/vm-testvm.yaml").read_text()
                      .split("---\n")[1])
SAMPLES = Path(__file__).resolve().parents[2] / "deploy/manifests/samples"
PERSISTENT = next(d for d in yaml.safe_load_all((SAMPLES / "vm-persistent.yaml").read_text())
                  if d["kind"] == types.KIND)
MINIMAL = {"apiVersion": "vmlet.dev/v1alpha1", "kind": "VirtualMachine", "metadata": {"name": "m"},
           "spec": {"template": {"spec": {"domain": {"rootDisk": {"image": "virtlet.cloud/x"}}}}}}


def test_checked_in_crd_is_generated_from_the_model():
    assert crdgen.main(["--check"]) == 0, "run: python -m vmapi.crdgen"


def _walk(node, path="schema"):
    yield path, node
    for key in ("properties",):
        for name, sub in (node.get(key) or {}).items():
            yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural():
    crd = crdgen.crd()
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert crd["spec"]["names"]["shortNames"] == ["vm", "vms"]
    assert [c["jsonPath"] for c in version["additionalPrinterColumns"]][:3] == [
        ".metadata.creationTimestamp", ".status.printableStatus", ".status.ready"]
    for path, node in _walk(version["schema"]["openAPIV3Schema"]):
        assert "type" in node, f"{path}: no type"
        for bad in ("$ref", "anyOf", "oneOf", "allOf", "title", "$defs"):
            assert bad not in node, f"{path}: {bad} is not allowed in a structural schema"
        assert not ("properties" in node and "additionalProperties" in node), path
        if node.get("x-kubernetes-preserve-unknown-fields"):
            assert node["type"] == "object", path
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec["runStrategy"]["enum"] == list(types.RUN_STRATEGIES) and spec["runStrategy"]["default"] == "Always"
    domain = spec["template"]["properties"]["spec"]["properties"]["domain"]["properties"]
    assert domain["cpu"]["default"] == {} and domain["cpu"]["properties"]["cores"]["default"] == 1


def test_good_manifests_pass(validator):
    for vm in (GOOD, MINIMAL, PERSISTENT):
        errors = list(validator.iter_errors(vm))
        assert not errors, [e.message for e in errors]
        types.VirtualMachine.model_validate(vm)  # and the model agrees


def _bad(path, value, base=GOOD):
    vm = copy.deepcopy(base)
    node = vm
    for p in path[:-1]:
        node = node[p]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return vm


T = ("spec", "template", "spec")
BAD = [
    (("spec", "runStrategy"), "Sometimes"),
    (("spec", "template"), KeyError),
    (T + ("domain", "rootDisk", "image"), "docker.io/nginx"),
    (T + ("domain", "rootDisk", "bus"), "ide"),
    (T + ("domain", "rootDisk", "size"), "-4Gi"),
    (T + ("domain", "memory", "guest"), "lots"),
    (T + ("domain", "cpu", "cores"), 0),
    (T + ("domain", "cpu", "cores"), 256),
    (T + ("domain", "cpu", "cores"), "2"),
    (T + ("domain", "interface", "binding"), "sriov"),
    (T + ("cloudInit", "sshKeys"), ["not a key"]),
    (T + ("cloudInit", "sshKeysSecretRef", "name"), "Bad_Name"),
    (T + ("terminationGracePeriodSeconds",), -1),
    (("metadata", "name"), "x" * 61),
    (T + ("nodeSelector",), {"a": 1}),
]
P = ("spec", "template", "spec")
BAD_STORAGE = [
    (P + ("domain", "disks", 0, "bus"), "ide"),
    (P + ("domain", "disks", 0, "cache"), "fast"),
    (P + ("domain", "disks", 0, "io"), "aio"),
    (P + ("domain", "disks", 0, "bootOrder"), 0),
    (P + ("domain", "disks", 0, "serial"), "has space"),
    (P + ("domain", "disks", 0, "name"), "Data"),
    (P + ("domain", "disks", 0, "name"), KeyError),
    (P + ("domain", "filesystems", 0, "mountPath"), "relative/path"),
    (P + ("domain", "rootDisk", "capacity"), "big"),
    (P + ("domain", "rootDisk", "volume"), "Root"),
    (P + ("volumes", 0, "persistentVolumeClaim", "claimName"), "Bad_Name"),
    (P + ("volumes", 2, "emptyDisk", "capacity"), "-1Gi"),
    (P + ("volumes", 3, "configMap"), {"items": []}),
    (("spec", "volumeClaimTemplates", 0, "spec", "accessModes"), []),
    (("spec", "volumeClaimTemplates", 0, "spec", "accessModes"), ["ReadWriteSometimes"]),
    (("spec", "volumeClaimTemplates", 0, "spec", "volumeMode"), "Object"),
    (("spec", "volumeClaimTemplates", 0, "spec", "resources", "requests"), {}),
    (("spec", "volumeClaimTemplates", 0, "metadata", "name"), "Root"),
    (("spec", "persistentVolumeClaimRetentionPolicy", "whenDeleted"), "Sometimes"),
]


@pytest.mark.parametrize("path,value", BAD, ids=[".".join(p[-2:]) + f"={v!r:.20}" for p, v in BAD])
def test_bad_manifests_are_rejected_by_the_schema(validator, path, value):
    errors = list(validator.iter_errors(_bad(path, value)))
    assert errors, f"{path}={value!r} passed the schema"


@pytest.mark.parametrize("path,value", BAD_STORAGE,
                         ids=[".".join(map(str, p[-3:])) + f"={v!r:.20}" for p, v in BAD_STORAGE])
def test_bad_disks_volumes_and_claim_templates_are_rejected_by_the_schema(validator, path, value):
    errors = list(validator.iter_errors(_bad(path, value, PERSISTENT)))
    assert errors, f"{path}={value!r} passed the schema"


def test_named_lists_are_keyed_by_name_and_every_storage_field_is_explained():
    """x-kubernetes-list-type map: the API server itself refuses two disks (volumes, filesystems) of one
    name. kubectl explain shows the descriptions."""
    spec = crdgen.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    vmi = spec["properties"]["template"]["properties"]["spec"]["properties"]
    domain = vmi["domain"]["properties"]
    for node in (domain["disks"], domain["filesystems"], vmi["volumes"]):
        assert node["x-kubernetes-list-type"] == "map" and node["x-kubernetes-list-map-keys"] == ["name"]
        assert "name" in node["items"]["required"]
    explained = [domain["disks"]["items"], domain["filesystems"]["items"], vmi["volumes"]["items"],
                 spec["properties"]["volumeClaimTemplates"], spec["properties"]["persistentVolumeClaimRetentionPolicy"]]
    explained += [domain["rootDisk"]["properties"][k] for k in ("volume", "capacity", "reimage", "size")]
    explained += [domain["disks"]["items"]["properties"][k] for k in ("name", "bus", "bootOrder", "readonly", "serial",
                                                                      "cache", "io")]
    explained += [domain["filesystems"]["items"]["properties"][k] for k in ("name", "mountPath")]
    explained += [vmi["volumes"]["items"]["properties"][k] for k in types.VOLUME_SOURCES]
    for node in explained:
        assert node.get("description") and "\n" not in node["description"], node
