"""`criproxy install|uninstall`: put the proxy between an existing node's kubelet and its runtime, reversibly.

install:
- reads the kubelet's current runtime endpoint from its flags file
  (`--container-runtime-endpoint=...`, e.g. /var/lib/kubelet/kubeadm-flags.env) and/or its
  KubeletConfiguration (`containerRuntimeEndpoint:`, e.g. /var/lib/kubelet/config.yaml); that
  runtime becomes the proxy's default backend (kubelet default: containerd's socket);
- rewrites the endpoint to the proxy's socket in place, touching nothing else in the files,
  and keeps a byte-exact backup of each file;
- writes the proxy's config (/etc/criproxy/criproxy.yaml), its systemd unit
  (/etc/systemd/system/criproxy.service) and a kubelet drop-in ordering the kubelet after it;
- records all of it in /etc/criproxy/install-state.json.
uninstall: restores each file (byte-exact when it was not edited since; otherwise only the
endpoint is put back), removes what install created. Both are idempotent.
All paths live under --root (default /), so tests run on a copy in a temp dir.
It does not run systemctl: it prints the commands that activate the change.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

DEFAULT_KUBELET_ENDPOINT = "unix:///run/containerd/containerd.sock"
PROXY_SOCKET = "/run/criproxy/criproxy.sock"
STATE = "etc/criproxy/install-state.json"
CONFIG = "etc/criproxy/criproxy.yaml"
UNIT = "etc/systemd/system/criproxy.service"
KUBELET_DROPIN = "etc/systemd/system/kubelet.service.d/20-criproxy.conf"
UNIT_TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "criproxy" / "criproxy.service"

_FLAG_RE = re.compile(r"--container-runtime-endpoint(?:=|\s+)(?P<v>[^\s\"']+)")
_YAML_RE = re.compile(r"^(?P<k>containerRuntimeEndpoint:[ \t]*)(?P<q>[\"']?)(?P<v>[^\"'\s#]*)(?P=q)", re.M)

DROPIN_TEXT = """# Added by `criproxy install`: the kubelet talks CRI to criproxy.
[Unit]
Wants=criproxy.service
After=criproxy.service
"""

UNIT_FALLBACK = """[Unit]
Description=CRI proxy (vmlet): routes VM pods to vmlet, other pods to the default runtime
Before=kubelet.service

[Service]
ExecStart=@CRIPROXY@ --config @CONFIG@
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
"""


class InstallError(Exception):
    pass


@dataclass
class Edit:
    path: str      # relative to root
    backup: str    # relative to root
    original_endpoint: str
    written: str   # file text after our edit (to tell whether someone edited it since)
    appended: bool


def _unix(endpoint: str) -> str:
    return endpoint if "://" in endpoint else f"unix://{endpoint}"


def _rel(root: Path, p: str | Path) -> str:
    p = Path(p)
    return str(p.relative_to("/")) if p.is_absolute() else str(p)


def read_endpoint_flags(text: str) -> str | None:
    m = _FLAG_RE.search(text)
    return m["v"] if m else None


def read_endpoint_yaml(text: str) -> str | None:
    data = yaml.safe_load(text) or {}
    v = data.get("containerRuntimeEndpoint") if isinstance(data, dict) else None
    return str(v) if v else None


def set_endpoint_flags(text: str, endpoint: str) -> tuple[str, bool]:
    """(new text, appended?)"""
    if _FLAG_RE.search(text):
        return _FLAG_RE.sub(lambda m: m[0].replace(m["v"], endpoint), text, count=1), False
    flag = f"--container-runtime-endpoint={endpoint}"
    m = re.search(r'^(KUBELET_[A-Z_]*ARGS=")(.*?)(")', text, re.M)
    if m:
        inner = f"{m[2]} {flag}" if m[2] else flag
        return text[:m.start()] + m[1] + inner + m[3] + text[m.end():], True
    return text + ("" if text.endswith("\n") or not text else "\n") + f'KUBELET_EXTRA_ARGS="{flag}"\n', True


def set_endpoint_yaml(text: str, endpoint: str) -> tuple[str, bool]:
    if _YAML_RE.search(text):
        return _YAML_RE.sub(lambda m: f"{m['k']}{m['q']}{endpoint}{m['q']}", text, count=1), False
    return text + ("" if text.endswith("\n") or not text else "\n") + f"containerRuntimeEndpoint: {endpoint}\n", True


def install(root: Path, kubelet_flags: str | None, kubelet_config: str | None, backends: list[tuple[str, str]],
            default_name: str = "containerd", listen: str = PROXY_SOCKET, criproxy_bin: str = "/usr/local/bin/criproxy",
            unit_template: Path = UNIT_TEMPLATE) -> dict:
    """Returns the install state. `backends`: the non-default backends (e.g. [("virtlet.cloud", "/run/vmlet/vmlet.sock")])."""
    root = Path(root)
    state_path = root / STATE
    if state_path.exists():
        return json.loads(state_path.read_text())  # already installed
    files = [(p, kind) for p, kind in ((kubelet_flags, "flags"), (kubelet_config, "yaml")) if p]
    present = [(p, kind) for p, kind in files if (root / _rel(root, p)).exists()]
    if not present:
        raise InstallError(f"none of the kubelet files exist under {root}: {[p for p, _ in files]}")
    proxy_endpoint = _unix(listen)
    # The current endpoint: the flag wins over the config file, as in the kubelet.
    current = None
    for p, kind in sorted(present, key=lambda x: x[1] != "flags"):
        text = (root / _rel(root, p)).read_text()
        current = current or (read_endpoint_flags(text) if kind == "flags" else read_endpoint_yaml(text))
    current = current or DEFAULT_KUBELET_ENDPOINT
    if current == proxy_endpoint:
        raise InstallError(f"the kubelet already talks to {proxy_endpoint}, but there is no {STATE}: refusing to guess "
                           "the runtime behind it")
    edits: list[Edit] = []
    # Rewrite where the endpoint is set; if set nowhere, add it to the config file (else the flags file).
    setters = {"flags": (read_endpoint_flags, set_endpoint_flags), "yaml": (read_endpoint_yaml, set_endpoint_yaml)}
    targets = [(p, k) for p, k in present if setters[k][0]((root / _rel(root, p)).read_text())]
    if not targets:
        targets = [next(((p, k) for p, k in present if k == "yaml"), present[0])]
    for p, kind in targets:
        rel = _rel(root, p)
        path = root / rel
        text = path.read_text()
        new, appended = setters[kind][1](text, proxy_endpoint)
        backup = rel + ".criproxy-orig"
        shutil.copy2(path, root / backup)
        path.write_text(new)
        edits.append(Edit(rel, backup, setters[kind][0](text) or "", new, appended))
    created = []
    config = {"listen": listen, "default": default_name,
              "backends": [{"name": default_name, "socket": current.removeprefix("unix://")}]
              + [{"name": n, "socket": s} for n, s in backends],
              "log_level": "info"}
    _write(root, CONFIG, yaml.safe_dump(config, sort_keys=False), created)
    template = unit_template.read_text() if unit_template.exists() else UNIT_FALLBACK
    _write(root, UNIT, template.replace("@CRIPROXY@", criproxy_bin).replace("@CONFIG@", "/" + CONFIG), created)
    _write(root, KUBELET_DROPIN, DROPIN_TEXT, created)
    state = {"proxy_endpoint": proxy_endpoint, "runtime_endpoint": current,
             "edits": [e.__dict__ for e in edits], "created": created}
    state_path.parent.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps(state, indent=2) + "\n")
    return state


def _write(root: Path, rel: str, text: str, created: list[str]) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    created.append(rel)


def uninstall(root: Path) -> dict | None:
    """Undo install; None when it was not installed."""
    root = Path(root)
    state_path = root / STATE
    if not state_path.exists():
        return None
    state = json.loads(state_path.read_text())
    for e in state["edits"]:
        path, backup = root / e["path"], root / e["backup"]
        if path.exists() and path.read_text() == e["written"] and backup.exists():
            shutil.copy2(backup, path)  # untouched since install: byte-exact restore
        elif path.exists():
            text = path.read_text()
            if e["appended"]:
                text = _remove_appended(text, state["proxy_endpoint"])
            else:
                text = text.replace(state["proxy_endpoint"], e["original_endpoint"], 1)
            path.write_text(text)
        if backup.exists():
            backup.unlink()
    for rel in state["created"]:
        (root / rel).unlink(missing_ok=True)
    for rel in (KUBELET_DROPIN, CONFIG):
        d = (root / rel).parent
        if d.exists() and not any(d.iterdir()):
            d.rmdir()
    state_path.unlink()
    d = state_path.parent
    if d.exists() and not any(d.iterdir()):
        d.rmdir()
    return state


def _remove_appended(text: str, endpoint: str) -> str:
    text = text.replace(f"containerRuntimeEndpoint: {endpoint}\n", "")
    text = text.replace(f'KUBELET_EXTRA_ARGS="--container-runtime-endpoint={endpoint}"\n', "")
    text = text.replace(f" --container-runtime-endpoint={endpoint}", "")
    return text.replace(f"--container-runtime-endpoint={endpoint}", "")


NEXT_STEPS = "systemctl daemon-reload && systemctl enable --now criproxy && systemctl restart kubelet"
