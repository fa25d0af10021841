"""validation, errors and host_caps: the pure rules behind refusing hostile values (issue #12, defects 5 and 7)."""

import grpc
import libvirt
import pytest

from cri_shim import errors, host_caps, validation
from cri_shim.domain_xml import CPU, CPUFeature
from image_service.errors import shorten, status_message

MIB = 1024 * 1024
GIB = 1024 * MIB


def refused(call, *args) -> str:
    with pytest.raises(errors.CRIError) as e:
        call(*args)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return e.value.message


@pytest.mark.parametrize("char", ["\x00", "\x01", "\t", "\n", "\x1b", "\x7f", "\x85", "\ud800", "\udfff",
                                  "\ufffe", "\uffff"])
def test_text_refuses_controls_and_what_xml_cannot_carry(char):
    message = refused(validation.text, f"ab{char}c", "config.metadata.name", 253)
    assert message.startswith("config.metadata.name ") and "position 2" in message


@pytest.mark.parametrize("value", ["default", "pod-1.x", "名前", "\U0001F600", "a\ufffdb", "\ufdd0"])
def test_text_keeps_what_xml_carries(value):
    assert validation.text(value, "f", 253) == value


def test_text_bounds_and_names():
    assert "at most 253" in refused(validation.name, "x" * 254, "config.metadata.uid")
    assert "must not be empty" in refused(validation.name, "", "config.metadata.uid")
    assert validation.name("", "f", required=False) == ""


def test_log_paths_echo_shortened():
    message = refused(validation.log_path, "/logs", "../" * 10000)
    assert "config.log_path" in message and len(message) < 300
    assert "config.log_directory" in refused(validation.log_directory, "relative/dir")


@pytest.mark.parametrize("value", [1, 64 * MIB - 1, 5 * GIB, 2**63 - 1, -1, -2**63])
def test_memory_limit_outside_the_range_names_it(value):
    message = refused(validation.memory_limit, value, "linux.memory_limit_in_bytes", 4 * GIB)
    assert message.startswith("linux.memory_limit_in_bytes is ")
    assert str(64 * MIB) in message and str(4 * GIB) in message


def test_memory_limit_within_the_range():
    assert validation.memory_limit(0, "f", GIB) == 0
    assert validation.memory_limit(64 * MIB, "f", GIB) == 64 * MIB
    assert validation.memory_limit(GIB, "f", GIB) == GIB


@pytest.mark.parametrize("period, quota, field", [
    (999, 100000, "cpu_period"), (1_000_001, 100000, "cpu_period"), (-1, 100000, "cpu_period"),
    (-1, 0, "cpu_period"), (100000, 999, "cpu_quota"), (100000, 2**44, "cpu_quota"),
    (100000, 2**63 - 1, "cpu_quota"),
])
def test_cpu_limit_outside_libvirts_ranges(period, quota, field):
    message = refused(validation.cpu_limit, period, quota, "linux")
    assert message.startswith(f"linux.{field} is ")


@pytest.mark.parametrize("period, quota, expected", [
    (0, 0, (0, 0)), (100000, 0, (0, 0)), (100000, -1, (0, 0)), (100000, -5, (0, 0)),
    (0, 50000, (100000, 50000)), (1000, 1000, (1000, 1000)), (1_000_000, 2**44 - 1, (1_000_000, 2**44 - 1)),
])
def test_cpu_limit_accepted_and_normalised(period, quota, expected):
    assert validation.cpu_limit(period, quota, "linux") == expected


# --- echoing and capping --------------------------------------------------------------------------------------


def test_shorten_keeps_short_values_and_says_how_long_long_ones_were():
    assert shorten("abc") == "'abc'"
    out = shorten("f" * 65536)
    assert out.startswith("'" + "f" * 64 + "'") and "65536 chars" in out and len(out) < 100
    assert "bytes" in shorten(b"x" * 1000)


@pytest.mark.parametrize("message", ["x" * 70000, "é" * 70000, "\U0001F600" * 70000, "ok", "a\udc80b"])
def test_status_message_is_bounded_valid_utf8(message):
    out = status_message(message)
    data = out.encode("utf-8")  # never raises: lone surrogates are escaped
    assert len(data) <= 2048
    if len(message) < 100:
        assert out == message.encode("utf-8", "backslashreplace").decode()
    else:
        assert "truncated" in out


def _libvirt_error(code: int, message: str) -> libvirt.libvirtError:
    e = libvirt.libvirtError(message)
    e.err = (code, 0, message, 0, "", None, None, 0, 0)
    return e


@pytest.mark.parametrize("code, expected", [
    (libvirt.VIR_ERR_XML_ERROR, grpc.StatusCode.INVALID_ARGUMENT),
    (libvirt.VIR_ERR_CONFIG_UNSUPPORTED, grpc.StatusCode.INVALID_ARGUMENT),
    (libvirt.VIR_ERR_OVERFLOW, grpc.StatusCode.INVALID_ARGUMENT),
    (libvirt.VIR_ERR_INVALID_ARG, grpc.StatusCode.INVALID_ARGUMENT),
    (libvirt.VIR_ERR_NO_CONNECT, grpc.StatusCode.UNAVAILABLE),
    (libvirt.VIR_ERR_RPC, grpc.StatusCode.UNAVAILABLE),
    (libvirt.VIR_ERR_OPERATION_FAILED, grpc.StatusCode.FAILED_PRECONDITION),
    (libvirt.VIR_ERR_INTERNAL_ERROR, grpc.StatusCode.FAILED_PRECONDITION),
])
def test_one_mapping_of_libvirt_refusals(code, expected):
    err = errors.from_libvirt(_libvirt_error(code, "numerical overflow: value too large"), "cannot define the VM")
    assert err.code == expected
    assert err.message.startswith("cannot define the VM: ") and "numerical overflow" in err.message


# --- host capabilities -----------------------------------------------------------------------------------------

DOMCAPS = """<domainCapabilities>
  <path>/usr/bin/qemu-system-x86_64</path><domain>qemu</domain><machine>pc-i440fx-7.2</machine><arch>x86_64</arch>
  <vcpu max='255'/>
  <cpu>
    <mode name='host-passthrough' supported='no'/>
    <mode name='maximum' supported='yes'/>
    <mode name='host-model' supported='yes'><model fallback='forbid'>EPYC</model></mode>
    <mode name='custom' supported='yes'>
      <model usable='yes' vendor='unknown'>qemu64</model>
      <model usable='no' vendor='Intel'>Skylake-Client</model>
    </mode>
  </cpu>
</domainCapabilities>"""


def caps(known_features=("sse4.2", "avx512f"), compatible=True) -> host_caps.HostCaps:
    asked: list[str] = []

    def feature_known(name):
        asked.append(name)
        return name in known_features

    hc = host_caps.HostCaps(host_caps.parse_domain_capabilities(DOMCAPS), 8 * GIB, feature_known,
                            lambda cpu: compatible)
    hc.asked = asked
    return hc


def test_parse_domain_capabilities():
    dc = host_caps.parse_domain_capabilities(DOMCAPS)
    assert dc.domain_type == "qemu" and dc.max_vcpus == 255
    assert dc.cpu_modes == {"host-passthrough": False, "maximum": True, "host-model": True, "custom": True}
    assert dc.cpu_models == {"qemu64": True, "Skylake-Client": False}


@pytest.mark.parametrize("cpu", [None, CPU(mode="host-model"), CPU(mode="maximum"), CPU(mode="custom", model="qemu64"),
                                 CPU(model="Skylake-Client"),  # usable='no' starts under TCG
                                 CPU(mode="custom", model="qemu64", features=[CPUFeature("sse4.2", "require")])])
def test_cpu_the_host_can_start(cpu):
    caps().check_cpu(cpu, "pod annotation VirtletCPUModel")


@pytest.mark.parametrize("cpu, error, fragment", [
    (CPU(mode="host-passthrough"), host_caps.UnsupportedCPU, "host-passthrough is not supported"),
    (CPU(mode="custom", model="NoSuch"), host_caps.UnsupportedCPU, "'NoSuch' is not offered"),
    (CPU(mode="host-model", features=[CPUFeature("bogus")]), host_caps.UnknownCPUFeature, "'bogus' is unknown"),
])
def test_cpu_the_host_can_never_start(cpu, error, fragment):
    with pytest.raises(error) as e:
        caps().check_cpu(cpu, "pod annotation VirtletCPUModel")
    assert str(e.value).startswith("pod annotation VirtletCPUModel: ") and fragment in str(e.value)


def test_check_full_needs_a_compatible_cpu_and_feature_answers_are_cached():
    cpu = CPU(mode="custom", check="full", model="qemu64", features=[CPUFeature("avx512f", "require")])
    caps(compatible=True).check_cpu(cpu, "x")
    with pytest.raises(host_caps.UnsupportedCPU, match="check full"):
        caps(compatible=False).check_cpu(cpu, "x")
    hc = caps()
    for _ in range(3):
        hc.check_cpu(CPU(mode="host-model", features=[CPUFeature("sse4.2")]), "x")
    assert hc.asked == ["sse4.2"]
