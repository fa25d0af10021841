"""The CNI plugin protocol, spoken directly (what libcni does for containerd).

- Configuration: the first valid file (sorted by name) of a directory, `.conflist`
  or single-plugin `.conf`/`.json`, as the kubelet and containerd pick it.
- Execution: each plugin binary is looked up in a list of directories, run with
  CNI_COMMAND/CNI_CONTAINERID/CNI_NETNS/CNI_IFNAME/CNI_ARGS/CNI_PATH and its network
  config (with `name`, `cniVersion` and `prevResult` injected) on stdin, in a
  process group of its own that is killed when it overruns its timeout; stdout
  and stderr are capped. A failure carries the plugin's error JSON (`code`,
  `msg`, `details`).
- ADD runs the chain in order, each plugin getting the previous result; DEL runs
  it in reverse with the cached ADD result; CHECK (0.4.0+) with the cached result.
- Result cache: `<cache_dir>/<network>-<containerid>-<ifname>`, JSON with the
  config it was made with, written before ADD (without a result) and after it,
  so DEL after a crash uses the config the ADD ran with.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import re
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .errors import CNIConfigError, CNIPluginError
from .model import DNSSettings, Route
from .names import cache_key

log = logging.getLogger("vmlet.network.cni")

DEFAULT_CONF_DIR = "/etc/cni/net.d"
# /opt/cni/bin: the upstream convention; /usr/lib/cni: Debian's containernetworking-plugins.
DEFAULT_BIN_DIRS: tuple[str, ...] = ("/opt/cni/bin", "/usr/lib/cni")
CONF_EXTENSIONS = (".conflist", ".conf", ".json")
SUPPORTED_VERSIONS: tuple[str, ...] = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
MAX_CONF_BYTES = 1 << 20
STDOUT_CAP = 1 << 20
STDERR_CAP = 64 << 10
CACHE_KIND = "cniCacheV1"

_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*\Z")  # libcni's network name rule
_PLUGIN_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")  # a file name: no path separators


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


# ---------------------------------------------------------------- configuration

@dataclass(frozen=True)
class NetworkConfigList:
    name: str
    cni_version: str
    plugins: tuple[Mapping[str, Any], ...]
    raw: bytes = b""
    source: str = ""
    disable_check: bool = False

    @property
    def plugin_types(self) -> tuple[str, ...]:
        return tuple(p["type"] for p in self.plugins)

    def plugin_config(self, index: int, prev_result: Mapping[str, Any] | None) -> bytes:
        """The stdin of plugin `index`: its config with the list's name and version (and prevResult)."""
        conf = dict(self.plugins[index])
        conf["name"] = self.name
        conf["cniVersion"] = self.cni_version
        conf.pop("prevResult", None)
        if prev_result is not None:
            conf["prevResult"] = convert_result(prev_result, self.cni_version)
        return json.dumps(conf).encode()


def parse_config(data: bytes, source: str = "") -> NetworkConfigList:
    """Parse a `.conflist` or a single-plugin `.conf`; raise CNIConfigError saying what is wrong."""
    where = f" in {source}" if source else ""
    if len(data) > MAX_CONF_BYTES:
        raise CNIConfigError(f"CNI config{where} is larger than {MAX_CONF_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CNIConfigError(f"CNI config{where} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise CNIConfigError(f"CNI config{where} must be a JSON object")
    if "plugins" in doc:
        plugins = doc["plugins"]
        if not isinstance(plugins, list) or not plugins:
            raise CNIConfigError(f"CNI config list{where}: 'plugins' must be a non-empty list")
    elif "type" in doc:
        plugins = [doc]  # a single-plugin .conf
    else:
        raise CNIConfigError(f"CNI config{where} has neither 'plugins' (a .conflist) nor 'type' (a .conf)")
    name = doc.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise CNIConfigError(f"CNI config{where}: 'name' must be a string matching {_NAME.pattern}, got {name!r}")
    version = doc.get("cniVersion")
    if not isinstance(version, str) or version not in SUPPORTED_VERSIONS:
        raise CNIConfigError(f"CNI config{where}: cniVersion {version!r} is not supported "
                             f"(vmlet speaks {', '.join(SUPPORTED_VERSIONS)})")
    for i, p in enumerate(plugins):
        if not isinstance(p, dict):
            raise CNIConfigError(f"CNI config{where}: plugin #{i} must be a JSON object")
        t = p.get("type")
        if not isinstance(t, str) or not _PLUGIN_TYPE.match(t):
            raise CNIConfigError(f"CNI config{where}: plugin #{i} has no valid 'type' (a binary name), got {t!r}")
    disable_check = doc.get("disableCheck", False)
    if isinstance(disable_check, str):  # libcni accepts "true"/"false" strings too
        disable_check = disable_check.lower() == "true"
    return NetworkConfigList(name=name, cni_version=version, plugins=tuple(plugins), raw=bytes(data),
                             source=source, disable_check=bool(disable_check))


def load_conf_dir(conf_dir: str | os.PathLike) -> tuple[NetworkConfigList | None, list[str]]:
    """The first valid config of the directory (sorted by file name), and why the ones before it were skipped."""
    problems: list[str] = []
    d = Path(conf_dir)
    try:
        files = sorted(p for p in d.iterdir() if p.suffix in CONF_EXTENSIONS and p.is_file())
    except FileNotFoundError:
        return None, [f"CNI config directory {d} does not exist"]
    except OSError as e:
        return None, [f"cannot read CNI config directory {d}: {e}"]
    if not files:
        return None, [f"no CNI config (*.conflist, *.conf, *.json) in {d}"]
    for path in files:
        try:
            return parse_config(path.read_bytes(), str(path)), problems
        except CNIConfigError as e:
            problems.append(str(e))
        except OSError as e:
            problems.append(f"cannot read {path}: {e}")
    return None, problems


def find_plugin(plugin_type: str, bin_dirs: Sequence[str]) -> str | None:
    if not _PLUGIN_TYPE.match(plugin_type):
        return None
    for d in bin_dirs:
        p = os.path.join(d, plugin_type)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


# ---------------------------------------------------------------- results

@dataclass(frozen=True)
class IPConfig:
    address: str                 # CIDR: "10.1.2.3/24"
    gateway: str | None = None
    interface: int | None = None  # index into the result's interfaces

    @property
    def interface_address(self) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
        return ipaddress.ip_interface(self.address)


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str = ""
    sandbox: str = ""


@dataclass(frozen=True)
class CNIResult:
    cni_version: str
    interfaces: tuple[Interface, ...] = ()
    ips: tuple[IPConfig, ...] = ()
    routes: tuple[Route, ...] = ()
    dns: DNSSettings = field(default_factory=DNSSettings)
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def ips_of(self, ifname: str) -> tuple[IPConfig, ...]:
        """The IPs of the sandbox interface `ifname` (IPs that name no interface count as its)."""
        out = []
        for ip in self.ips:
            if ip.interface is None or not (0 <= ip.interface < len(self.interfaces)):
                out.append(ip)
            elif self.interfaces[ip.interface].name == ifname and self.interfaces[ip.interface].sandbox:
                out.append(ip)
        return tuple(out)


def parse_result(doc: Any, plugin: str = "") -> CNIResult:
    """Validate and type a plugin's result (0.3.0 to 1.0.0 share one shape)."""
    who = f"CNI plugin {plugin}" if plugin else "CNI result"
    if not isinstance(doc, dict):
        raise CNIPluginError(f"{who} returned a result that is not a JSON object", plugin=plugin)
    version = doc.get("cniVersion", "")
    if version and version not in SUPPORTED_VERSIONS:
        raise CNIPluginError(f"{who} returned a result of unsupported cniVersion {version!r}", plugin=plugin)
    try:
        interfaces = tuple(Interface(name=str(i["name"]), mac=str(i.get("mac", "")), sandbox=str(i.get("sandbox", "")))
                           for i in doc.get("interfaces") or ())
        ips = []
        for ip in doc.get("ips") or ():
            ipaddress.ip_interface(ip["address"])
            gw = ip.get("gateway") or None
            if gw is not None:
                ipaddress.ip_address(gw)
            idx = ip.get("interface")
            ips.append(IPConfig(address=str(ip["address"]), gateway=gw,
                                interface=int(idx) if idx is not None else None))
        routes = []
        for r in doc.get("routes") or ():
            ipaddress.ip_network(r["dst"], strict=False)
            gw = r.get("gw") or None
            if gw is not None:
                ipaddress.ip_address(gw)
            routes.append(Route(dst=str(ipaddress.ip_network(r["dst"], strict=False)), gw=gw))
        dns_doc = doc.get("dns") or {}
        dns = DNSSettings.of(servers=[str(s) for s in dns_doc.get("nameservers") or ()],
                             searches=[str(s) for s in dns_doc.get("search") or ()],
                             options=[str(s) for s in dns_doc.get("options") or ()])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CNIPluginError(f"{who} returned a malformed result: {e!r}", plugin=plugin) from None
    return CNIResult(cni_version=version, interfaces=interfaces, ips=tuple(ips), routes=tuple(routes), dns=dns,
                     raw=doc)


def convert_result(doc: Mapping[str, Any], to_version: str) -> dict[str, Any]:
    """A result re-labelled for another version of the 0.3.0..1.0.0 family (1.0.0 dropped ips[].version)."""
    out = json.loads(json.dumps(doc))
    out["cniVersion"] = to_version
    v1 = _version_tuple(to_version) >= (1, 0, 0)
    for ip in out.get("ips") or ():
        if v1:
            ip.pop("version", None)
        elif "version" not in ip and "address" in ip:
            ip["version"] = "4" if ipaddress.ip_interface(ip["address"]).version == 4 else "6"
    return out


def error_message(stdout: bytes) -> tuple[int | None, str, str]:
    """(code, msg, details) of a CNI error result on stdout; (None, "", "") when there is none."""
    try:
        doc = json.loads(stdout)
    except (ValueError, UnicodeDecodeError):
        return None, "", ""
    if not isinstance(doc, dict) or ("code" not in doc and "msg" not in doc):
        return None, "", ""
    code = doc.get("code")
    return (code if isinstance(code, int) else None), str(doc.get("msg", "")), str(doc.get("details", ""))


# ---------------------------------------------------------------- execution

@dataclass(frozen=True)
class Invocation:
    command: str            # ADD | DEL | CHECK | VERSION
    container_id: str
    netns: str              # path; "" allowed for DEL
    ifname: str
    args: tuple[tuple[str, str], ...] = ()

    def environ(self, bin_dirs: Sequence[str], base: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("CNI_")}
        env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        env.update(CNI_COMMAND=self.command, CNI_CONTAINERID=self.container_id, CNI_NETNS=self.netns,
                   CNI_IFNAME=self.ifname, CNI_PATH=":".join(bin_dirs),
                   CNI_ARGS=";".join(f"{k}={v}" for k, v in self.args))
        return env


def format_args(args: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    out = []
    for k, v in args:
        if not k or any(c in k + v for c in ";=\0"):
            raise ValueError(f"CNI_ARGS entry {k!r}={v!r} must not contain ';', '=' or NUL")
        out.append((k, v))
    return tuple(out)


def _tail(data: bytes, n: int = 2000) -> str:
    return data[-n:].decode(errors="replace").strip()


def exec_plugin(path: str, stdin: bytes, env: Mapping[str, str], timeout: float,
                stdout_cap: int = STDOUT_CAP, stderr_cap: int = STDERR_CAP) -> tuple[int, bytes, bytes]:
    """Run a plugin: (exit status, stdout, stderr). Kills its process group on timeout or oversized output.

    Raises TimeoutError or OverflowError (the caller words the message)."""
    proc = subprocess.Popen([path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(env), cwd="/", start_new_session=True, close_fds=True)
    out, err = bytearray(), bytearray()
    deadline = time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    pending = memoryview(stdin)
    assert proc.stdin and proc.stdout and proc.stderr
    for f in (proc.stdin, proc.stdout, proc.stderr):
        os.set_blocking(f.fileno(), False)
    if pending:
        sel.register(proc.stdin, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    failure: BaseException | None = None
    exited_at: float | None = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                failure = TimeoutError(f"did not finish within {timeout:g}s")
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.5:
                break  # exited; a leftover child of its own holds the pipes open
            for key, _ in sel.select(min(0.2, deadline - now)):
                if key.fileobj is proc.stdin:
                    try:
                        n = os.write(proc.stdin.fileno(), pending[:65536])
                        pending = pending[n:]
                    except BrokenPipeError:
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fileobj.fileno(), 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf: bytearray = key.data
                buf += chunk
                cap = stdout_cap if buf is out else stderr_cap
                if len(buf) > cap:
                    if buf is out:
                        failure = OverflowError(f"wrote more than {cap} bytes to stdout")
                        break
                    del buf[: len(buf) - cap]  # stderr: keep the tail
            if failure:
                break
        if failure is None:
            rc = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            return rc, bytes(out), bytes(err)
    except subprocess.TimeoutExpired:
        failure = TimeoutError(f"did not finish within {timeout:g}s")
    finally:
        sel.close()
        if failure is not None or proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f and not f.closed:
                f.close()
    raise failure


# ---------------------------------------------------------------- the runner with its cache

@dataclass(frozen=True)
class CacheEntry:
    network: str
    container_id: str
    ifname: str
    config: NetworkConfigList
    args: tuple[tuple[str, str], ...]
    result: Mapping[str, Any] | None
    path: Path


class CNI:
    def __init__(self, conf_dir: str | os.PathLike = DEFAULT_CONF_DIR,
                 bin_dirs: Sequence[str] = DEFAULT_BIN_DIRS,
                 cache_dir: str | os.PathLike = "/var/lib/vmlet/cni/results",
                 timeout: float = 60.0) -> None:
        self.conf_dir = Path(conf_dir)
        self.bin_dirs = tuple(str(d) for d in bin_dirs)
        self.cache_dir = Path(cache_dir)
        self.timeout = timeout

    # -- configuration

    def load(self) -> NetworkConfigList:
        conf, problems = load_conf_dir(self.conf_dir)
        for p in problems:
            log.warning("skipping CNI config: %s", p)
        if conf is None:
            raise CNIConfigError("no valid CNI configuration: " + "; ".join(problems))
        return conf

    def missing_plugins(self, conf: NetworkConfigList) -> list[str]:
        return [t for t in conf.plugin_types if find_plugin(t, self.bin_dirs) is None]

    def plugin_path(self, plugin_type: str, command: str = "") -> str:
        path = find_plugin(plugin_type, self.bin_dirs)
        if path is None:
            raise CNIPluginError(f"CNI plugin {plugin_type!r} not found in {':'.join(self.bin_dirs)}",
                                 plugin=plugin_type, command=command)
        return path

    # -- one plugin

    def _invoke(self, conf: NetworkConfigList, index: int, inv: Invocation,
                prev_result: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        ptype = conf.plugins[index]["type"]
        path = self.plugin_path(ptype, inv.command)
        what = f"CNI plugin {ptype} ({path}) {inv.command} for network {conf.name!r}"
        try:
            rc, out, err = exec_plugin(path, conf.plugin_config(index, prev_result),
                                       inv.environ(self.bin_dirs), self.timeout)
        except TimeoutError as e:
            raise CNIPluginError(f"{what} {e}; killed", plugin=ptype, command=inv.command) from None
        except OverflowError as e:
            raise CNIPluginError(f"{what} {e}; killed", plugin=ptype, command=inv.command) from None
        except OSError as e:
            raise CNIPluginError(f"{what} could not be run: {e}", plugin=ptype, command=inv.command) from None
        if rc != 0:
            code, msg, details = error_message(out)
            if msg or code is not None:
                text = f"{what} failed: {msg or 'error'} (code {code})" + (f": {details}" if details else "")
            else:
                text = f"{what} failed with exit status {rc}"
                if rc < 0:
                    text = f"{what} was killed by signal {-rc}"
                tail = _tail(err) or _tail(out)
                if tail:
                    text += f": {tail}"
            raise CNIPluginError(text, plugin=ptype, command=inv.command, code=code, msg=msg, details=details)
        if inv.command != "ADD":
            return None
        if not out.strip():
            raise CNIPluginError(f"{what} succeeded but returned no result", plugin=ptype, command=inv.command)
        try:
            doc = json.loads(out)
        except (ValueError, UnicodeDecodeError) as e:
            raise CNIPluginError(f"{what} returned invalid JSON: {e}", plugin=ptype, command=inv.command) from None
        parse_result(doc, ptype)  # validate
        return doc

    # -- chains

    def add(self, conf: NetworkConfigList, container_id: str, netns: str, ifname: str,
            args: Iterable[tuple[str, str]] = ()) -> CNIResult:
        """ADD through the chain. The cache entry is written first (no result), then with the result.

        On failure nothing is rolled back here: the caller runs `delete` (the CNI spec expects
        a DEL after a failed ADD to release whatever the chain took)."""
        inv = Invocation("ADD", container_id, netns, ifname, format_args(args))
        self._write_cache(conf, inv, None)
        prev: Mapping[str, Any] | None = None
        for i in range(len(conf.plugins)):
            prev = self._invoke(conf, i, inv, prev)
        assert prev is not None
        result = convert_result(prev, conf.cni_version)
        self._write_cache(conf, inv, result)
        return parse_result(result)

    def check(self, container_id: str, netns: str, ifname: str) -> None:
        entry = self.cached(container_id, ifname)
        if entry is None or entry.result is None:
            raise CNIPluginError(f"CNI CHECK for {container_id[:12]}/{ifname}: no cached ADD result", command="CHECK")
        conf = entry.config
        if _version_tuple(conf.cni_version) < (0, 4, 0) or conf.disable_check:
            return
        inv = Invocation("CHECK", container_id, netns, ifname, entry.args)
        for i in range(len(conf.plugins)):
            self._invoke(conf, i, inv, entry.result)

    def delete(self, container_id: str, ifname: str, netns: str, conf: NetworkConfigList | None = None,
               args: Iterable[tuple[str, str]] = ()) -> bool:
        """DEL through the chain in reverse; idempotent. `netns` may be "" (the namespace is gone).

        Uses the cached entry's config and result when there is one (else `conf`); returns False
        when there is nothing to delete. Every plugin is tried; the first failure is raised after,
        and the cache entry is kept so that a retry can DEL again."""
        entry = self.cached(container_id, ifname)
        result = None
        if entry is not None:
            conf, args, result = entry.config, entry.args, entry.result
        if conf is None:
            return False
        inv = Invocation("DEL", container_id, netns, ifname, format_args(args))
        prev = result if result is not None and _version_tuple(conf.cni_version) >= (0, 4, 0) else None
        errors: list[CNIPluginError] = []
        for i in reversed(range(len(conf.plugins))):
            try:
                self._invoke(conf, i, inv, prev)
            except CNIPluginError as e:
                errors.append(e)
        if errors:
            raise errors[0]
        if entry is not None:
            entry.path.unlink(missing_ok=True)
        return True

    # -- cache

    def _cache_path(self, network: str, container_id: str, ifname: str) -> Path:
        return self.cache_dir / cache_key(network, container_id, ifname)

    def _write_cache(self, conf: NetworkConfigList, inv: Invocation, result: Mapping[str, Any] | None) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        doc = {"kind": CACHE_KIND, "containerId": inv.container_id, "ifName": inv.ifname, "networkName": conf.name,
               "config": base64.b64encode(conf.raw).decode(), "cniArgs": [list(a) for a in inv.args],
               "result": result}
        path = self._cache_path(conf.name, inv.container_id, inv.ifname)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _read_cache(self, path: Path) -> CacheEntry | None:
        try:
            doc = json.loads(path.read_text())
            if doc.get("kind") != CACHE_KIND:
                return None
            conf = parse_config(base64.b64decode(doc["config"]), str(path))
            return CacheEntry(network=doc["networkName"], container_id=doc["containerId"], ifname=doc["ifName"],
                              config=conf, args=tuple((str(k), str(v)) for k, v in doc.get("cniArgs") or ()),
                              result=doc.get("result"), path=path)
        except (OSError, ValueError, KeyError, TypeError, CNIConfigError) as e:
            log.warning("ignoring unreadable CNI cache entry %s: %s", path, e)
            return None

    def cache_entries(self) -> list[CacheEntry]:
        if not self.cache_dir.is_dir():
            return []
        out = []
        for p in sorted(self.cache_dir.iterdir()):
            if p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
                continue
            e = self._read_cache(p)
            if e is not None:
                out.append(e)
        return out

    def cached(self, container_id: str, ifname: str) -> CacheEntry | None:
        if not self.cache_dir.is_dir():
            return None
        for p in self.cache_dir.glob(f"*-{container_id}-{ifname}"):
            e = self._read_cache(p)
            if e is not None and e.container_id == container_id and e.ifname == ifname:
                return e
        return None


__all__ = [
    "CNI", "CNIResult", "CacheEntry", "IPConfig", "Interface", "Invocation", "NetworkConfigList",
    "DEFAULT_BIN_DIRS", "DEFAULT_CONF_DIR", "SUPPORTED_VERSIONS", "convert_result", "error_message",
    "exec_plugin", "find_plugin", "load_conf_dir", "parse_config", "parse_result",
]
