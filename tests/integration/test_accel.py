"""The accelerator probe boots a real guest: it succeeds under TCG, and tells a PVM KVM apart."""

import os

import pytest

from cri_shim import accel

pytestmark = pytest.mark.libvirt


def test_probe_boots_the_test_image_under_tcg(test_image):
    ok, why = accel.probe_kvm(test_image, timeout=90, accel="tcg")
    assert ok, why


@pytest.mark.skipif(not os.path.isdir("/sys/module/kvm_pvm"), reason="only PVM hosts have a /dev/kvm that fails")
def test_probe_sees_that_pvm_kvm_cannot_boot_an_ordinary_guest(test_image):
    ok, why = accel.probe_kvm(test_image, timeout=15)
    assert not ok, why


def test_auto_resolution_is_cached_per_boot(test_image, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(accel, "host_verdict", lambda: (True, "pretend /dev/kvm is usable"))
    monkeypatch.setattr(accel, "probe_kvm", lambda image: calls.append(image) or (False, "probe failed"))
    assert accel.resolve("auto", test_image, tmp_path) == ("qemu", "probe failed")
    domain_type, why = accel.resolve("auto", test_image, tmp_path)
    assert domain_type == "qemu" and "cached" in why and len(calls) == 1
    assert accel.resolve("kvm", test_image, tmp_path) == ("kvm", "configured")
