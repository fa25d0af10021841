"""Image name parsing: strict, and hostile names never get through."""

import pytest

from image_service.errors import InvalidName
from image_service.names import parse

HEX = "ab" * 32


@pytest.mark.parametrize("image, repo, path, tag, digest", [
    ("virtlet.cloud/cirros", "virtlet.cloud/cirros", "cirros", "latest", None),
    ("virtlet.cloud/cirros:0.5.2", "virtlet.cloud/cirros", "cirros", "0.5.2", None),
    ("virtlet.cloud/download.cirros-cloud.net/0.3.5/cirros-0.3.5-x86_64-disk.img",
     "virtlet.cloud/download.cirros-cloud.net/0.3.5/cirros-0.3.5-x86_64-disk.img",
     "download.cirros-cloud.net/0.3.5/cirros-0.3.5-x86_64-disk.img", "latest", None),
    (f"virtlet.cloud/my/img@sha256:{HEX}", "virtlet.cloud/my/img", "my/img", None, HEX),
    (f"virtlet.cloud/my/img:v1@sha256:{HEX}", "virtlet.cloud/my/img", "my/img", "v1", HEX),
    ("virtlet.cloud/a__b--c/d_e:V1.0-rc_1", "virtlet.cloud/a__b--c/d_e", "a__b--c/d_e", "V1.0-rc_1", None),
])
def test_valid_names(image, repo, path, tag, digest):
    name = parse(image)
    assert (name.repo, name.path, name.tag, name.digest) == (repo, path, tag, digest)


def test_refs_derived_from_a_name():
    name = parse("virtlet.cloud/cirros")
    assert name.tagged == "virtlet.cloud/cirros:latest"  # the kubelet's default tag
    assert name.with_digest(HEX) == f"virtlet.cloud/cirros@sha256:{HEX}"
    assert parse(f"virtlet.cloud/cirros@sha256:{HEX}").tagged is None
    assert str(parse("virtlet.cloud/x:1")) == "virtlet.cloud/x:1"


@pytest.mark.parametrize("image", [
    "", "cirros", "docker.io/library/cirros", "virtlet.cloud", "virtlet.cloud/",
    "virtlet.cloud/../../etc/passwd", "virtlet.cloud/a/../../etc/passwd", "virtlet.cloud/./a",
    "virtlet.cloud//etc/passwd", "virtlet.cloud/a/", "virtlet.cloud/a%2f..%2fb", "virtlet.cloud/a\\..\\b",
    "virtlet.cloud/Cirros", "virtlet.cloud/host:8080/path", "virtlet.cloud/a?b", "virtlet.cloud/a#b",
    "virtlet.cloud/user:pw@host/x", "virtlet.cloud/a b", "virtlet.cloud/a\nb", "virtlet.cloud/a\x00",
    "virtlet.cloud/é", "virtlet.cloud/-a", "virtlet.cloud/a.", "virtlet.cloud/a:", "virtlet.cloud/a:.tag",
    "virtlet.cloud/a:" + "t" * 129, "virtlet.cloud/a@sha256:abc", f"virtlet.cloud/a@sha256:{HEX.upper()}",
    f"virtlet.cloud/a@sha512:{HEX}{HEX}", "file:///etc/passwd", "https://example.com/x.qcow2",
    "virtlet.cloud/" + "a" * 300,
])
def test_invalid_names_are_rejected_naming_the_field(image):
    with pytest.raises(InvalidName) as e:
        parse(image)
    assert str(e.value).startswith("image: ")


@pytest.mark.parametrize("image, reason", [
    ("docker.io/" + "a" * 65536, "is not a vmlet image name (expected virtlet.cloud/"),
    ("virtlet.cloud/" + "A" * 65536, "is not a valid image name: after virtlet.cloud/ it must be lowercase"),
])
def test_a_huge_name_is_echoed_shortened_and_the_reason_kept(image, reason):
    with pytest.raises(InvalidName) as e:
        parse(image)
    message = str(e.value)
    assert reason in message
    assert f"…({len(image)} chars)" in message  # says it was cut, and how long the value was
    assert len(message) < 600, len(message)
