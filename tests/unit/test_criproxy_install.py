"""`criproxy install|uninstall` on copies of a kubelet's flags file and KubeletConfiguration."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from criproxy import install as inst
from criproxy.main import main

FLAGS = ('KUBELET_KUBEADM_ARGS="--container-runtime-endpoint=unix:///run/containerd/containerd.sock '
         '--pod-infra-container-image=registry.k8s.io/pause:3.9"\n')
CONFIG = """# kubeadm wrote this
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: systemd
containerRuntimeEndpoint: "unix:///var/run/crio/crio.sock"   # the node's runtime
clusterDNS:
- 10.96.0.10
"""


def _node(tmp_path: Path, flags: str | None = FLAGS, config: str | None = CONFIG) -> Path:
    kubelet = tmp_path / "var/lib/kubelet"
    kubelet.mkdir(parents=True)
    if flags is not None:
        (kubelet / "kubeadm-flags.env").write_text(flags)
    if config is not None:
        (kubelet / "config.yaml").write_text(config)
    return tmp_path


def _install(root: Path, **kw) -> dict:
    return inst.install(root, "/var/lib/kubelet/kubeadm-flags.env", "/var/lib/kubelet/config.yaml",
                        [("virtlet.cloud", "/run/vmlet/vmlet.sock")], criproxy_bin="/usr/bin/criproxy", **kw)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_install_rewrites_both_and_uninstall_restores_exactly(tmp_path):
    root = _node(tmp_path)
    before = _snapshot(root)
    state = _install(root)
    flags = (root / "var/lib/kubelet/kubeadm-flags.env").read_text()
    config = (root / "var/lib/kubelet/config.yaml").read_text()
    assert "--container-runtime-endpoint=unix:///run/criproxy/criproxy.sock " in flags
    assert "--pod-infra-container-image=registry.k8s.io/pause:3.9" in flags
    assert yaml.safe_load(config)["containerRuntimeEndpoint"] == "unix:///run/criproxy/criproxy.sock"
    assert "# the node's runtime" in config and "# kubeadm wrote this" in config  # only the value changed
    # The flag wins over the config file (as in the kubelet): containerd is the default backend.
    assert state["runtime_endpoint"] == "unix:///run/containerd/containerd.sock"
    cfg = yaml.safe_load((root / inst.CONFIG).read_text())
    assert cfg["default"] == "containerd"
    assert cfg["backends"] == [{"name": "containerd", "socket": "/run/containerd/containerd.sock"},
                               {"name": "virtlet.cloud", "socket": "/run/vmlet/vmlet.sock"}]
    unit = (root / inst.UNIT).read_text()
    assert "ExecStart=/usr/bin/criproxy --config /etc/criproxy/criproxy.yaml" in unit and "@" not in unit
    assert "After=criproxy.service" in (root / inst.KUBELET_DROPIN).read_text()
    # idempotent
    assert _install(root) == state
    assert inst.uninstall(root) is not None
    assert _snapshot(root) == before
    assert inst.uninstall(root) is None


def test_config_only_and_endpoint_missing(tmp_path):
    root = _node(tmp_path, flags=None, config="kind: KubeletConfiguration\n")
    state = _install(root)
    assert state["runtime_endpoint"] == inst.DEFAULT_KUBELET_ENDPOINT
    cfg = yaml.safe_load((root / "var/lib/kubelet/config.yaml").read_text())
    assert cfg["containerRuntimeEndpoint"] == "unix:///run/criproxy/criproxy.sock"
    inst.uninstall(root)
    assert (root / "var/lib/kubelet/config.yaml").read_text() == "kind: KubeletConfiguration\n"


def test_uninstall_after_a_later_edit_keeps_the_edit(tmp_path):
    root = _node(tmp_path, config=None)
    _install(root)
    path = root / "var/lib/kubelet/kubeadm-flags.env"
    path.write_text(path.read_text() + "# later edit\n")
    inst.uninstall(root)
    assert path.read_text() == FLAGS + "# later edit\n"


def test_flags_file_without_endpoint(tmp_path):
    root = _node(tmp_path, flags='KUBELET_KUBEADM_ARGS="--v=2"\n', config=None)
    _install(root)
    assert (root / "var/lib/kubelet/kubeadm-flags.env").read_text() == (
        'KUBELET_KUBEADM_ARGS="--v=2 --container-runtime-endpoint=unix:///run/criproxy/criproxy.sock"\n')
    inst.uninstall(root)
    assert (root / "var/lib/kubelet/kubeadm-flags.env").read_text() == 'KUBELET_KUBEADM_ARGS="--v=2"\n'


def test_cli(tmp_path, capsys):
    root = _node(tmp_path)
    before = _snapshot(root)
    assert main(["install", "--root", str(root), "--backend", "virtlet.cloud=/run/vmlet/vmlet.sock",
                 "--criproxy-bin", "/opt/criproxy"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["proxy_endpoint"] == "unix:///run/criproxy/criproxy.sock"
    assert main(["uninstall", "--root", str(root)]) == 0
    assert _snapshot(root) == before
    assert main(["install", "--root", str(tmp_path / "empty")]) == 1
