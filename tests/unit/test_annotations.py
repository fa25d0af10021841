"""annotations: every VM pod annotation, good values, each class of bad value, hostile input."""

import pytest

from cri_shim import annotations as a
from cri_shim.annotations import AnnotationError, VMAnnotations

KEY1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOaXnZ1m5hUoZ6xw0kQ6Xo1v alice@laptop"
KEY2 = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAy"
KEY3 = "sk-ssh-ed25519@openssh.com AAAAGnNrLXNzaC1lZDI1NTE5QG9wZW5zc2guY29t bob"


def parse(**annotations: str) -> VMAnnotations:
    return VMAnnotations.from_pod_annotations(annotations)


def parse_one(name: str, value: object) -> VMAnnotations:
    return VMAnnotations.from_pod_annotations({name: value})


def rejects(name: str, value: object, *fragments: str) -> AnnotationError:
    with pytest.raises(AnnotationError) as info:
        parse_one(name, value)
    err = info.value
    assert err.annotation == name
    assert name in str(err)
    for fragment in fragments:
        assert fragment in err.message, err.message
    return err


# --- defaults ------------------------------------------------------------------------


@pytest.mark.parametrize("annotations", [None, {}, {"unrelated/annotation": "x", "VirtletSomethingNew": "x"}])
def test_defaults_when_absent(annotations):
    vm = VMAnnotations.from_pod_annotations(annotations)
    assert vm == VMAnnotations()
    assert vm.vcpu_count is None
    assert vm.disk_driver == "virtio"
    assert vm.cpu_model is None and vm.libvirt_cpu is None
    assert vm.root_volume_size is None
    assert vm.ssh_keys == () and vm.ssh_key_source is None
    assert vm.cloud_init_user_data is None and vm.cloud_init_meta_data is None
    assert vm.cloud_init_user_data_overwrite is False
    assert vm.cloud_init_user_data_script is None
    assert vm.cloud_init_image_type == "nocloud"
    assert vm.cloud_init_user_data_source_encoding == "plain"
    assert vm.network_binding == "bridge"
    assert vm.chown_9pfs_mounts is False and vm.force_dhcp_network_config is False
    assert vm.system_uuid is None and vm.target_runtime is None


@pytest.mark.parametrize("name", list(a.ANNOTATIONS))
@pytest.mark.parametrize("value", ["", "   ", "\n\t "])
def test_empty_value_means_absent(name, value):
    assert parse_one(name, value) == VMAnnotations()


def test_model_is_frozen():
    vm = parse_one(a.VCPU_COUNT, "2")
    with pytest.raises(Exception):
        vm.vcpu_count = 3  # type: ignore[misc]


def test_error_is_a_value_error_naming_the_annotation():
    err = rejects(a.VCPU_COUNT, "lots")
    assert isinstance(err, ValueError)
    assert str(err).startswith("pod annotation VirtletVCPUCount: ")


def test_first_bad_value_in_table_order_wins():
    with pytest.raises(AnnotationError) as info:
        VMAnnotations.from_pod_annotations({a.NETWORK_BINDING: "nat", a.VCPU_COUNT: "0", a.DISK_DRIVER: "ide"})
    assert info.value.annotation == a.VCPU_COUNT


def test_target_runtime_is_read():
    assert parse_one(a.TARGET_RUNTIME, " virtlet.cloud ").target_runtime == "virtlet.cloud"


# --- VirtletVCPUCount ---------------------------------------------------------------


@pytest.mark.parametrize("value,expected", [("1", 1), (" 4 ", 4), ("02", 2), ("255", 255)])
def test_vcpu_count(value, expected):
    assert parse_one(a.VCPU_COUNT, value).vcpu_count == expected


@pytest.mark.parametrize("value,fragment", [
    ("0", "out of range"), ("256", "out of range"), ("9999", "out of range"),
    ("-1", "whole number"), ("+2", "whole number"), ("2.0", "whole number"), ("1e2", "whole number"),
    ("two", "whole number"), ("1_0", "whole number"), ("٣", "whole number"), ("99999", "whole number"),
    ("0x10", "whole number"),
])
def test_vcpu_count_bad(value, fragment):
    rejects(a.VCPU_COUNT, value, fragment)


# --- VirtletDiskDriver / VirtletCloudInitImageType / network binding ---------------------


@pytest.mark.parametrize("value,expected", [("virtio", "virtio"), ("scsi", "scsi"), (" SCSI\n", "scsi")])
def test_disk_driver(value, expected):
    assert parse_one(a.DISK_DRIVER, value).disk_driver == expected


@pytest.mark.parametrize("value", ["ide", "virtio-blk", "ducttape", "virtio scsi"])
def test_disk_driver_bad(value):
    rejects(a.DISK_DRIVER, value, "virtio, scsi")


@pytest.mark.parametrize("value,expected", [("nocloud", "nocloud"), ("ConfigDrive", "configdrive")])
def test_image_type(value, expected):
    assert parse_one(a.CLOUD_INIT_IMAGE_TYPE, value).cloud_init_image_type == expected


def test_image_type_bad():
    rejects(a.CLOUD_INIT_IMAGE_TYPE, "iso", "nocloud, configdrive")


@pytest.mark.parametrize("value,expected", [("bridge", "bridge"), ("Masquerade", "masquerade")])
def test_network_binding(value, expected):
    assert parse_one(a.NETWORK_BINDING, value).network_binding == expected


def test_network_binding_bad():
    rejects(a.NETWORK_BINDING, "nat", "bridge, masquerade")


# --- booleans ------------------------------------------------------------------------------


@pytest.mark.parametrize("name,field", [
    (a.CLOUD_INIT_USER_DATA_OVERWRITE, "cloud_init_user_data_overwrite"),
    (a.CHOWN_9PFS_MOUNTS, "chown_9pfs_mounts"),
    (a.FORCE_DHCP_NETWORK_CONFIG, "force_dhcp_network_config"),
])
@pytest.mark.parametrize("value,expected", [("true", True), ("TRUE", True), (" True ", True),
                                            ("false", False), ("False", False)])
def test_booleans(name, field, value, expected):
    assert getattr(parse_one(name, value), field) is expected


@pytest.mark.parametrize("value", ["yes", "1", "on", "t", "truee"])
def test_boolean_bad(value):
    rejects(a.CLOUD_INIT_USER_DATA_OVERWRITE, value, "true, false")


# --- VirtletCPUModel --------------------------------------------------------------------------


@pytest.mark.parametrize("value,expected", [
    ("host-model", "host-model"), ("Host-Model", "host-model"), ("host-passthrough", "host-passthrough"),
    ("Skylake-Client-IBRS", "Skylake-Client-IBRS"), ("core2duo", "core2duo"), ("486", "486"),
    ("EPYC-Rome-v2", "EPYC-Rome-v2"),
])
def test_cpu_model(value, expected):
    assert parse_one(a.CPU_MODEL, value).cpu_model == expected


@pytest.mark.parametrize("value,mode,name", [
    (None, None, None), ("host-model", "host-model", None), ("host-passthrough", "host-passthrough", None),
    ("core2duo", "custom", "core2duo"),
])
def test_cpu_mode_and_model_name(value, mode, name):
    vm = VMAnnotations() if value is None else parse_one(a.CPU_MODEL, value)
    assert vm.cpu_mode == mode
    assert vm.cpu_model_name == name


@pytest.mark.parametrize("value", ["host model", "<model>", "-leading-dash", "a" * 65, "Skylake'", "x;rm -rf /"])
def test_cpu_model_bad(value):
    rejects(a.CPU_MODEL, value, "CPU model name")


# --- VirtletLibvirtCPUSetting ------------------------------------------------------------------


def test_libvirt_cpu_setting_virtlet_example():
    vm = parse_one(a.LIBVIRT_CPU_SETTING, "Match: exact\nModel:\n  Fallback: allow\n  Value: core2duo\n")
    assert vm.libvirt_cpu == a.LibvirtCPUSetting(match="exact",
                                                 model=a.CPUModelSpec(value="core2duo", fallback="allow"))


def test_libvirt_cpu_setting_full_and_case_insensitive():
    vm = parse_one(a.LIBVIRT_CPU_SETTING, """
mode: custom
CHECK: Partial
model: Haswell-noTSX
Features:
- name: vmx
  policy: require
- Name: tsc-deadline
  Policy: disable
- Name: pcid
""")
    cpu = vm.libvirt_cpu
    assert cpu.mode == "custom" and cpu.check == "partial" and cpu.match is None
    assert cpu.model == a.CPUModelSpec(value="Haswell-noTSX")
    assert cpu.features == (a.CPUFeature(name="vmx", policy="require"),
                            a.CPUFeature(name="tsc-deadline", policy="disable"),
                            a.CPUFeature(name="pcid"))


def test_libvirt_cpu_setting_json_and_host_passthrough():
    vm = parse_one(a.LIBVIRT_CPU_SETTING, '{"Mode": "host-passthrough"}')
    assert vm.libvirt_cpu == a.LibvirtCPUSetting(mode="host-passthrough")


def test_libvirt_cpu_setting_numeric_model_name():
    assert parse_one(a.LIBVIRT_CPU_SETTING, "Model: 486").libvirt_cpu.model.value == "486"


@pytest.mark.parametrize("value,fragment", [
    ("Mode: turbo", "custom, host-model"),
    ("Match: loose", "minimum, exact, strict"),
    ("Check: maybe", "none, partial, full"),
    ("Topology: {Sockets: 1}", "unknown key 'Topology'"),
    ("Mode: custom\nmode: custom", "given twice"),
    ("Model: {Value: core2duo, Fallback: sometimes}", "allow, forbid"),
    ("Model: {Value: 'core2duo\"/><evil'}", "CPU model name"),
    ("Model: [a, b]", "Model must be"),
    ("Model: {Vendor: Intel}", "unknown key"),
    ("Model: core2duo\nFeatures: vmx", "Features must be a list"),
    ("Model: core2duo\nFeatures: [vmx]", "Features[0]: must be a mapping"),
    ("Model: core2duo\nFeatures: [{Name: 'v m x'}]", "not a CPU feature name"),
    ("Model: core2duo\nFeatures: [{Name: vmx, Policy: always}]", "force, require"),
    ("Model: core2duo\nFeatures: [{Name: vmx}, {Name: vmx}]", "listed twice"),
    ("Features: [{Name: vmx}]", "need a Model"),
    ("Mode: 3", "custom, host-model"),
    ("- Mode: custom", "must be a YAML mapping"),
])
def test_libvirt_cpu_setting_bad(value, fragment):
    rejects(a.LIBVIRT_CPU_SETTING, value, fragment)


def test_libvirt_cpu_setting_feature_count_capped():
    features = "\n".join(f"- Name: f{i}" for i in range(a.MAX_CPU_FEATURES + 1))
    rejects(a.LIBVIRT_CPU_SETTING, f"Model: core2duo\nFeatures:\n{features}\n", "too many Features")


# --- VirtletRootVolumeSize -------------------------------------------------------------------------


@pytest.mark.parametrize("value,expected", [
    ("4Gi", 4 * 2**30), ("1G", 10**9), ("500Mi", 500 * 2**20), ("1073741824", 2**30), ("1.5Gi", 3 * 2**29),
    ("1e9", 10**9), ("2E3", 2000), ("1Ti", 2**40), ("1k", 1000), ("64Ki", 65536), (" 10Gi ", 10 * 2**30),
    ("16Ti", a.MAX_ROOT_VOLUME_SIZE), ("+1Gi", 2**30), (".5Ki", 512),
])
def test_root_volume_size(value, expected):
    assert parse_one(a.ROOT_VOLUME_SIZE, value).root_volume_size == expected


@pytest.mark.parametrize("value,fragment", [
    ("0", "greater than zero"), ("0Gi", "greater than zero"), ("-1Gi", "negative"), ("-5", "negative"),
    ("17Ti", "larger than the limit"), ("1Ei", "larger than the limit"), ("9e99", "larger than the limit"),
    ("1.5", "whole number of bytes"), ("1e-3", "whole number of bytes"), ("100m", "not a quantity"),
    ("1GB", "not a quantity"), ("1gi", "not a quantity"), ("Gi", "not a quantity"), ("1 Gi", "not a quantity"),
    ("1e999", "not a quantity"), ("0x10", "not a quantity"), ("1..5Gi", "not a quantity"), ("NaN", "not a quantity"),
    ("١Gi", "not a quantity"),
])
def test_root_volume_size_bad(value, fragment):
    rejects(a.ROOT_VOLUME_SIZE, value, fragment)


# --- VirtletSSHKeys -------------------------------------------------------------------------------


def test_ssh_keys():
    vm = parse_one(a.SSH_KEYS, f"\n  {KEY1}  \r\n\n# a comment\n{KEY2}\n{KEY3}\n{KEY1}\n")
    assert vm.ssh_keys == (KEY1, KEY2, KEY3)


def test_ssh_keys_internal_whitespace_normalised():
    assert parse_one(a.SSH_KEYS, KEY1.replace(" ", "\t  ")).ssh_keys == (KEY1,)


def test_ssh_keys_only_comments_is_absent():
    assert parse_one(a.SSH_KEYS, "# nothing here\n\n").ssh_keys == ()


@pytest.mark.parametrize("value,fragment", [
    ("key1\nkey2", "line 1: 'key1' is not a public key type"),
    (f"{KEY1}\nrsa AAAAB3NzaC1yc2EAAAADAQAB", "line 2"),
    ("ssh-rsa", "missing or not base64"),
    ("ssh-rsa not*base64*at*all*here", "not base64"),
    ('command="/bin/sh" ssh-rsa AAAAB3NzaC1yc2EAAAADAQAB', "not a public key type"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----", "not a public key type"),
    ("ssh-rsa " + "A" * a.MAX_SSH_KEY_CHARS, "too long"),
])
def test_ssh_keys_bad(value, fragment):
    rejects(a.SSH_KEYS, value, fragment)


def test_ssh_keys_count_capped():
    keys = "\n".join(f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA{i:08d} k" for i in range(a.MAX_SSH_KEYS + 1))
    rejects(a.SSH_KEYS, keys, "too many keys")


# --- data sources (resolved by the caller) ---------------------------------------------------------------


@pytest.mark.parametrize("value,expected", [
    ("secret/mysecret", a.DataSourceRef(kind="secret", name="mysecret", key="authorized_keys")),
    ("configmap/keys/pub_keys", a.DataSourceRef(kind="configmap", name="keys", key="pub_keys")),
    ("ConfigMap/my.keys-1/x.y", a.DataSourceRef(kind="configmap", name="my.keys-1", key="x.y")),
])
def test_ssh_key_source(value, expected):
    assert parse_one(a.SSH_KEY_SOURCE, value).ssh_key_source == expected


@pytest.mark.parametrize("value,fragment", [
    ("mysecret", "not of the form"), ("secret/a/b/c", "not of the form"), ("pod/x", "not configmap or secret"),
    ("secret/My_Secret", "not a valid object name"), ("secret/../etc", "not a valid object name"),
    ("secret/x/bad key", "not a valid key"), ("secret/x/", "not a valid key"), ("secret/" + "a" * 254, "object name"),
])
def test_ssh_key_source_bad(value, fragment):
    rejects(a.SSH_KEY_SOURCE, value, fragment)


def test_user_data_source_and_key_and_encoding():
    vm = parse(VirtletCloudInitUserDataSource="configmap/vm-user-data",
               VirtletCloudInitUserDataSourceKey="user-data",
               VirtletCloudInitUserDataSourceEncoding="Base64",
               VirtletFilesFromDataSource="secret/files")
    assert vm.cloud_init_user_data_source == a.DataSourceRef(kind="configmap", name="vm-user-data")
    assert vm.cloud_init_user_data_source_key == "user-data"
    assert vm.cloud_init_user_data_source_encoding == "base64"
    assert vm.files_from_data_source == a.DataSourceRef(kind="secret", name="files")


@pytest.mark.parametrize("name,value,fragment", [
    (a.CLOUD_INIT_USER_DATA_SOURCE, "configmap/x/key", "configmap/<name> or secret/<name>"),
    (a.CLOUD_INIT_USER_DATA_SOURCE_KEY, "a/b", "not a valid key"),
    (a.CLOUD_INIT_USER_DATA_SOURCE_ENCODING, "gzip", "plain, base64"),
    (a.FILES_FROM_DATA_SOURCE, "volume/x", "not configmap or secret"),
])
def test_data_source_bad(name, value, fragment):
    rejects(name, value, fragment)


# --- VirtletCloudInitUserData / MetaData ------------------------------------------------------------------


def test_user_and_meta_data():
    vm = parse(VirtletCloudInitUserData="users:\n- name: cloudy\n  gecos: Magic\n",
               VirtletCloudInitMetaData='{"instance-id": "foobar"}')
    assert vm.cloud_init_user_data == {"users": [{"name": "cloudy", "gecos": "Magic"}]}
    assert vm.cloud_init_meta_data == {"instance-id": "foobar"}


def test_user_data_timestamps_stay_strings_and_yaml11_scalars_parse():
    vm = parse_one(a.CLOUD_INIT_USER_DATA, "when: 2020-01-01\nflag: yes\nn: 3\nf: 1.5\nnothing: ~\n")
    assert vm.cloud_init_user_data == {"when": "2020-01-01", "flag": True, "n": 3, "f": 1.5, "nothing": None}


@pytest.mark.parametrize("name", [a.CLOUD_INIT_USER_DATA, a.CLOUD_INIT_META_DATA])
@pytest.mark.parametrize("value,fragment", [
    ("{", "not valid YAML"),
    ("a: [1, 2", "not valid YAML"),
    ("- a\n- b\n", "must be a YAML mapping"),
    ("just a string", "must be a YAML mapping"),
    ("42", "must be a YAML mapping"),
    ("null", "must be a YAML mapping (key: value), not empty"),
    ("---\na: 1\n---\nb: 2\n", "not valid YAML"),
    ("1: one", "mapping keys must be strings"),
    ("a:\n  true: x", "a: mapping keys must be strings"),
    ("x: !!binary aGVsbG8=", "type bytes is not allowed"),
    ("x: !!set {a, b}", "type set is not allowed"),
    ("x: !!timestamp 2020-01-01", "not allowed"),
    ("x: .inf", "not a finite number"),
    ("x: !!python/object:os.system {}", "not valid YAML"),
    ("a: &anchor [1, 2]\nb: *anchor\n", "aliases"),
    ("base: &b {x: 1}\nderived:\n  <<: *b\n", "aliases"),
])
def test_yaml_mapping_bad(name, value, fragment):
    rejects(name, value, fragment)


# --- VirtletCloudInitUserDataScript ----------------------------------------------------------------------------


def test_user_data_script_kept_verbatim():
    script = "#!/bin/sh\n\techo hi  \n@virtlet-mount-script@\n"
    assert parse_one(a.CLOUD_INIT_USER_DATA_SCRIPT, script).cloud_init_user_data_script == script


def test_user_data_script_placeholder_only():
    assert parse_one(a.CLOUD_INIT_USER_DATA_SCRIPT, "@virtlet-mount-script@").cloud_init_user_data_script \
        == a.MOUNT_SCRIPT_PLACEHOLDER


def test_user_data_script_bad():
    rejects(a.CLOUD_INIT_USER_DATA_SCRIPT, "#!/bin/sh\necho \x00", "control character")


# --- VirtletSystemUUID ---------------------------------------------------------------------------------------------


def test_system_uuid():
    vm = parse_one(a.SYSTEM_UUID, " 53008994-44C0-4017-AD44-9C49758083DA ")
    assert vm.system_uuid == "53008994-44c0-4017-ad44-9c49758083da"


def test_system_uuid_bad():
    rejects(a.SYSTEM_UUID, "not-a-uuid", "not a UUID")


# --- hostile input ---------------------------------------------------------------------------------------------------

_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
_DEEP = "a: " + "[" * 200 + "]" * 200
_DEEP_MAP = "".join("  " * i + f"k{i}:\n" for i in range(40)) + "  " * 40 + "leaf: 1\n"
_WIDE = "a: [" + ", ".join("1" for _ in range(a.MAX_YAML_NODES + 1)) + "]"


@pytest.mark.parametrize("name,value,fragment", [
    # huge strings: each annotation has a cap, checked before any parsing
    (a.VCPU_COUNT, "1" * 10_000, "too long"),
    (a.DISK_DRIVER, "v" * 1_000_000, "too long"),
    (a.TARGET_RUNTIME, "x" * (a.MAX_SCALAR_CHARS + 1), "too long"),
    (a.ROOT_VOLUME_SIZE, "9" * 2000, "too long"),
    (a.ROOT_VOLUME_SIZE, "9" * 200, "larger than the limit"),
    (a.SSH_KEYS, (KEY1 + "\n") * 2000, "too long"),
    (a.CLOUD_INIT_USER_DATA, "a: " + "x" * (a.MAX_USER_DATA_CHARS + 1), "too long"),
    (a.CLOUD_INIT_META_DATA, "a: " + "x" * (a.MAX_META_DATA_CHARS + 1), "too long"),
    (a.CLOUD_INIT_USER_DATA_SCRIPT, "#" * (a.MAX_SCRIPT_CHARS + 1), "too long"),
    (a.LIBVIRT_CPU_SETTING, "Mode: " + "x" * a.MAX_CPU_SETTING_CHARS, "too long"),
    # YAML bombs and resource exhaustion
    (a.CLOUD_INIT_USER_DATA, _BOMB, "aliases"),
    (a.CLOUD_INIT_META_DATA, _BOMB, "aliases"),
    (a.LIBVIRT_CPU_SETTING, _BOMB, "aliases"),
    (a.CLOUD_INIT_USER_DATA, _DEEP, "nested too deeply"),
    (a.CLOUD_INIT_USER_DATA, _DEEP_MAP, "nested too deeply"),
    (a.CLOUD_INIT_USER_DATA, _WIDE, "too many nodes"),
    (a.CLOUD_INIT_USER_DATA, "n: " + "9" * 5000, "not valid YAML"),
    # non-mapping where a mapping is required
    (a.CLOUD_INIT_USER_DATA, "[1, 2, 3]", "not a list"),
    (a.LIBVIRT_CPU_SETTING, "host-model", "not a string"),
    # unicode junk / control characters
    (a.DISK_DRIVER, "virtio\x00", "control character"),
    (a.VCPU_COUNT, "1\x1b[31m", "control character"),
    (a.CPU_MODEL, "host-model\ndisk: evil", "control character"),
    (a.SSH_KEYS, KEY1 + "\x07", "control character"),
    (a.CLOUD_INIT_USER_DATA, "a: b\x00", "control character"),
    (a.CLOUD_INIT_META_DATA, "a: \ud800", "unpaired surrogate"),
    (a.DISK_DRIVER, "vírtio", "virtio, scsi"),
    (a.DISK_DRIVER, "virtio\u200b", "virtio, scsi"),
    (a.VCPU_COUNT, "２", "whole number"),
    (a.CLOUD_INIT_USER_DATA, "a: \x85b", "not valid YAML"),
    # ints as floats, negatives
    (a.VCPU_COUNT, "2.0", "whole number"),
    (a.VCPU_COUNT, "-2", "whole number"),
    (a.ROOT_VOLUME_SIZE, "-1", "negative"),
    (a.ROOT_VOLUME_SIZE, "0.5", "whole number of bytes"),
    # not a string at all
    (a.VCPU_COUNT, 2, "must be a string"),
    (a.CLOUD_INIT_USER_DATA, None, "must be a string"),
    (a.SSH_KEYS, b"ssh-rsa AAAA", "must be a string"),
])
def test_hostile_input(name, value, fragment):
    rejects(name, value, fragment)


def test_hostile_yaml_is_fast():
    import time
    start = time.monotonic()
    for value in (_BOMB, _DEEP, _WIDE, "a: " + "[" * 50_000):
        with pytest.raises(AnnotationError):
            parse_one(a.CLOUD_INIT_USER_DATA, value)
    assert time.monotonic() - start < 5


def test_every_annotation_has_a_field_and_a_constant():
    fields = set(VMAnnotations.model_fields)
    for name, (field, _parse) in a.ANNOTATIONS.items():
        assert field in fields, name
    assert a.NETWORK_BINDING == "vmlet.dev/network-binding"


@pytest.mark.parametrize("value,fragment", [(_BOMB, "aliases"), (_DEEP, "nested too deeply"), (_WIDE, "too many nodes")])
def test_hostile_yaml_without_libyaml(monkeypatch, value, fragment):
    import yaml
    monkeypatch.setattr(a, "_BaseLoader", yaml.SafeLoader)  # the event pre-check in pure Python
    rejects(a.CLOUD_INIT_USER_DATA, value, fragment)
