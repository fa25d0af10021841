"""vmlet's config: YAML + flags, unknown keys and bad values are errors naming the key."""

import pytest

from cri_shim.config import ConfigError, load


def test_defaults_file_and_flag_overrides(tmp_path):
    f = tmp_path / "vmlet.yaml"
    f.write_text("accelerator: qemu\ndefault_memory_mib: 512\n")
    cfg = load(f, state_dir=tmp_path / "state", accelerator=None)
    assert cfg.accelerator == "qemu" and cfg.default_memory_mib == 512
    assert cfg.state_dir == tmp_path / "state" and cfg.vms_dir == tmp_path / "state" / "vms"
    assert load(None).libvirt_uri == "qemu:///system"


@pytest.mark.parametrize("text, key", [
    ("acclerator: kvm\n", "acclerator"),
    ("accelerator: xen\n", "accelerator"),
    ("default_memory_mib: 1\n", "default_memory_mib"),
    ("domain_prefix: '../x'\n", "domain_prefix"),
])
def test_bad_config_names_the_key(tmp_path, text, key):
    f = tmp_path / "vmlet.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=key):
        load(f)


def test_non_mapping_and_missing_file(tmp_path):
    f = tmp_path / "vmlet.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load(f)
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.yaml")
