"""CNI runner: config parsing/selection, results, plugin execution, the result cache (no root needed)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from cri_shim.network import cni
from cri_shim.network.errors import CNIConfigError, CNIPluginError

BRIDGE = {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.1.0.0/24"}}


def conflist(**over) -> bytes:
    doc = {"cniVersion": "1.0.0", "name": "net1", "plugins": [BRIDGE, {"type": "portmap"}]}
    doc.update(over)
    return json.dumps(doc).encode()


# ---------------------------------------------------------------- configuration

def test_parse_conflist_and_single_plugin_conf():
    c = cni.parse_config(conflist(disableCheck="true"), "/x/10.conflist")
    assert (c.name, c.cni_version, c.plugin_types, c.disable_check) == ("net1", "1.0.0", ("bridge", "portmap"), True)
    single = cni.parse_config(json.dumps({"cniVersion": "0.4.0", "name": "n", **BRIDGE}).encode())
    assert single.plugin_types == ("bridge",) and single.cni_version == "0.4.0"


@pytest.mark.parametrize("data, message", [
    (b"{", "not valid JSON"),
    (b"[]", "must be a JSON object"),
    (json.dumps({"cniVersion": "1.0.0", "name": "n"}).encode(), "neither 'plugins'"),
    (conflist(plugins=[]), "'plugins' must be a non-empty list"),
    (conflist(name="bad name"), "'name' must be a string"),
    (conflist(cniVersion="0.2.0"), "cniVersion '0.2.0' is not supported"),
    (conflist(cniVersion=None), "cniVersion None is not supported"),
    (conflist(plugins=[{"bridge": "x"}]), "plugin #0 has no valid 'type'"),
    (conflist(plugins=[{"type": "../../bin/sh"}]), "plugin #0 has no valid 'type'"),
    (conflist(plugins=["bridge"]), "plugin #0 must be a JSON object"),
])
def test_parse_config_rejects_with_a_clear_message(data, message):
    with pytest.raises(CNIConfigError, match=message):
        cni.parse_config(data, "/etc/cni/net.d/10.conflist")


def test_conf_dir_first_valid_file_by_name_wins(tmp_path):
    (tmp_path / "00-broken.conflist").write_text("{")
    (tmp_path / "05-notes.txt").write_text("ignored")
    (tmp_path / "20-b.conf").write_text(json.dumps({"cniVersion": "0.4.0", "name": "b", **BRIDGE}))
    (tmp_path / "10-a.conflist").write_bytes(conflist(name="a"))
    conf, problems = cni.load_conf_dir(tmp_path)
    assert conf.name == "a" and conf.source.endswith("10-a.conflist")
    assert len(problems) == 1 and "00-broken.conflist is not valid JSON" in problems[0]


def test_conf_dir_missing_empty_or_all_invalid(tmp_path):
    assert cni.load_conf_dir(tmp_path / "nope") == (None, [f"CNI config directory {tmp_path / 'nope'} does not exist"])
    assert "no CNI config" in cni.load_conf_dir(tmp_path)[1][0]
    (tmp_path / "a.conf").write_text("{}")
    runner = cni.CNI(tmp_path, ["/nonexistent"], tmp_path / "cache")
    with pytest.raises(CNIConfigError, match="no valid CNI configuration: .*a.conf has neither"):
        runner.load()


def test_plugin_config_injects_name_version_and_converted_prev_result():
    c = cni.parse_config(conflist())
    prev = {"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "10.1.0.5/24"}]}
    doc = json.loads(c.plugin_config(1, prev))
    assert doc == {"type": "portmap", "name": "net1", "cniVersion": "1.0.0",
                   "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/24"}]}}
    assert "prevResult" not in json.loads(c.plugin_config(0, None))


def test_convert_result_between_versions():
    r = {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/24"}, {"address": "fd00::5/64"}]}
    assert [ip["version"] for ip in cni.convert_result(r, "0.4.0")["ips"]] == ["4", "6"]
    assert r["ips"][0] == {"address": "10.1.0.5/24"}  # not modified in place


def test_find_plugin_searches_the_dirs_in_order(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "bridge").write_text("#!/bin/sh\n")
        (d / "bridge").chmod(0o755)
    (a / "noexec").write_text("")
    assert cni.find_plugin("bridge", [str(tmp_path / "none"), str(b), str(a)]) == str(b / "bridge")
    assert cni.find_plugin("noexec", [str(a)]) is None
    assert cni.find_plugin("../a/bridge", [str(b)]) is None


# ---------------------------------------------------------------- results

RESULT = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "cni0", "mac": "aa:00:00:00:00:01"}, {"name": "veth1", "mac": "aa:00:00:00:00:02"},
                   {"name": "eth0", "mac": "aa:00:00:00:00:03", "sandbox": "/run/netns/x"}],
    "ips": [{"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 2},
            {"address": "10.9.0.1/32", "interface": 0},
            {"address": "fd00::5/64", "interface": 2}],
    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "10.2.0.0/16", "gw": "10.1.0.254"}],
    "dns": {"nameservers": ["10.96.0.10"], "search": ["a.example"], "options": ["ndots:2"]},
}


def test_parse_result_types_everything_and_picks_the_sandbox_interface_ips():
    r = cni.parse_result(RESULT)
    assert [ip.address for ip in r.ips_of("eth0")] == ["10.1.0.5/24", "fd00::5/64"]
    assert r.ips[0].gateway == "10.1.0.1"
    assert [(x.dst, x.gw) for x in r.routes] == [("0.0.0.0/0", None), ("10.2.0.0/16", "10.1.0.254")]
    assert r.dns.servers == ("10.96.0.10",) and r.dns.searches == ("a.example",) and r.dns.options == ("ndots:2",)


@pytest.mark.parametrize("doc", [
    [], {"ips": [{"address": "300.1.1.1/24"}]}, {"ips": [{}]}, {"routes": [{"gw": "1.2.3.4"}]},
    {"cniVersion": "0.2.0"}, {"ips": [{"address": "10.0.0.1/24", "gateway": "nope"}]},
])
def test_parse_result_rejects_malformed_results(doc):
    with pytest.raises(CNIPluginError):
        cni.parse_result(doc, "bridge")


def test_error_message_of_a_cni_error_result():
    assert cni.error_message(b'{"cniVersion":"1.0.0","code":7,"msg":"m","details":"d"}') == (7, "m", "d")
    assert cni.error_message(b"plain text") == (None, "", "")
    assert cni.error_message(b'{"ips": []}') == (None, "", "")


def test_invocation_environment_and_args():
    inv = cni.Invocation("ADD", "c1", "/run/netns/x", "eth0",
                         cni.format_args([("IgnoreUnknown", "1"), ("K8S_POD_NAME", "p")]))
    env = inv.environ(["/opt/cni/bin", "/usr/lib/cni"], base={"PATH": "/bin", "CNI_STRAY": "x", "HOME": "/root"})
    assert env == {"PATH": "/bin", "HOME": "/root", "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1",
                   "CNI_NETNS": "/run/netns/x", "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin:/usr/lib/cni",
                   "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=p"}
    with pytest.raises(ValueError):
        cni.format_args([("K8S_POD_NAME", "a;b=c")])


# ---------------------------------------------------------------- execution

def plugin(tmp_path: Path, name: str, body: str) -> str:
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return str(p)


def test_exec_plugin_passes_stdin_and_env_and_returns_output(tmp_path):
    p = plugin(tmp_path, "echo", 'cat; echo "$CNI_COMMAND" >&2\n')
    big = b"x" * 300_000  # more than a pipe buffer both ways
    rc, out, err = cni.exec_plugin(p, big, {"CNI_COMMAND": "ADD", "PATH": os.environ["PATH"]}, 10)
    assert (rc, out, err) == (0, big, b"ADD\n")


def test_exec_plugin_kills_the_process_group_on_timeout(tmp_path):
    pidfile = tmp_path / "child.pid"
    p = plugin(tmp_path, "hang", f"sleep 300 & echo $! > {pidfile}\nsleep 300\n")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="within 0.5s"):
        cni.exec_plugin(p, b"{}", {"PATH": os.environ["PATH"]}, 0.5)
    assert time.monotonic() - start < 5
    child = int(pidfile.read_text())
    time.sleep(0.1)
    stat = Path(f"/proc/{child}/stat")
    assert not stat.exists() or stat.read_text().split(") ")[1][0] == "Z"


def test_exec_plugin_caps_stdout_and_keeps_the_tail_of_stderr(tmp_path):
    p = plugin(tmp_path, "loud", "head -c 3000000 /dev/zero\n")
    with pytest.raises(OverflowError, match="more than 1000 bytes"):
        cni.exec_plugin(p, b"", {"PATH": os.environ["PATH"]}, 10, stdout_cap=1000)
    p = plugin(tmp_path, "noisy", "head -c 100000 /dev/zero >&2; echo END >&2\n")
    rc, _, err = cni.exec_plugin(p, b"", {"PATH": os.environ["PATH"]}, 10, stderr_cap=100)
    assert rc == 0 and len(err) == 100 and err.endswith(b"END\n")


def test_exec_plugin_returns_when_the_plugin_exits_but_a_child_keeps_stdout_open(tmp_path):
    p = plugin(tmp_path, "daemonish", 'echo \'{"cniVersion":"1.0.0"}\'; sleep 30 &\nexit 0\n')
    start = time.monotonic()
    rc, out, _ = cni.exec_plugin(p, b"", {"PATH": os.environ["PATH"]}, 10)
    assert rc == 0 and json.loads(out) == {"cniVersion": "1.0.0"} and time.monotonic() - start < 3


# ---------------------------------------------------------------- chains and the cache (script plugins)

RECORDER = """
mkdir -p {log}
n=$(ls {log} | grep -c "json$")
cat > {log}/$n-$CNI_COMMAND-{name}.json
echo "$CNI_NETNS" > {log}/$n-$CNI_COMMAND-{name}.netns
if [ "$CNI_COMMAND" = ADD ]; then
  echo '{result}'
fi
"""


def recorder_runner(tmp_path: Path, version: str = "1.0.0"):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir(parents=True)
    res1 = json.dumps({"cniVersion": version, "ips": [{"address": "10.1.0.5/24"}]})
    res2 = json.dumps({"cniVersion": version, "ips": [{"address": "10.1.0.5/24"}], "dns": {"nameservers": ["1.1.1.1"]}})
    plugin(bin_dir, "first", RECORDER.format(log=log, name="first", result=res1))
    plugin(bin_dir, "second", RECORDER.format(log=log, name="second", result=res2))
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    (conf_dir / "10.conflist").write_text(json.dumps(
        {"cniVersion": version, "name": "rec", "plugins": [{"type": "first"}, {"type": "second", "x": 1}]}))
    return cni.CNI(conf_dir, [str(bin_dir)], tmp_path / "cache", timeout=10), log


def calls(log: Path) -> list[str]:
    return [p.name.split("-", 1)[1].removesuffix(".json") for p in sorted(log.glob("*.json"),
                                                                          key=lambda p: int(p.name.split("-")[0]))]


def test_add_chains_prev_results_and_del_reverses_with_the_cached_result(tmp_path):
    runner, log = recorder_runner(tmp_path)
    conf = runner.load()
    result = runner.add(conf, "cid1", "/run/netns/x", "eth0", [("K8S_POD_NAME", "p")])
    assert result.dns.servers == ("1.1.1.1",)
    second_in = json.loads((log / "1-ADD-second.json").read_text())
    assert second_in["prevResult"]["ips"] == [{"address": "10.1.0.5/24"}] and second_in["x"] == 1
    entry = runner.cached("cid1", "eth0")
    assert entry.path.name == "rec-cid1-eth0" and entry.result["dns"] == {"nameservers": ["1.1.1.1"]}
    assert entry.args == (("K8S_POD_NAME", "p"),)

    # The conf dir changes; DEL still uses the config the ADD ran with, and tolerates a gone netns.
    (runner.conf_dir / "10.conflist").unlink()
    assert runner.delete("cid1", "eth0", "") is True
    assert calls(log) == ["ADD-first", "ADD-second", "DEL-second", "DEL-first"]
    del_in = json.loads((log / "2-DEL-second.json").read_text())
    assert del_in["prevResult"]["dns"] == {"nameservers": ["1.1.1.1"]}
    assert (log / "2-DEL-second.netns").read_text() == "\n"
    assert runner.cached("cid1", "eth0") is None
    assert runner.delete("cid1", "eth0", "") is False  # nothing left: idempotent


def test_check_uses_the_cached_result_and_is_skipped_before_0_4_0(tmp_path):
    runner, log = recorder_runner(tmp_path)
    with pytest.raises(CNIPluginError, match="no cached ADD result"):
        runner.check("cid1", "/run/netns/x", "eth0")
    runner.add(runner.load(), "cid1", "/run/netns/x", "eth0")
    runner.check("cid1", "/run/netns/x", "eth0")
    assert calls(log)[-2:] == ["CHECK-first", "CHECK-second"]
    assert "prevResult" in json.loads((log / "2-CHECK-first.json").read_text())

    old, old_log = recorder_runner(tmp_path / "old", version="0.3.1")
    old.add(old.load(), "cid2", "/run/netns/x", "eth0")
    old.check("cid2", "/run/netns/x", "eth0")
    old.delete("cid2", "eth0", "/run/netns/x")
    assert calls(old_log) == ["ADD-first", "ADD-second", "DEL-second", "DEL-first"]
    assert "prevResult" not in json.loads((old_log / "2-DEL-second.json").read_text())  # < 0.4.0: no prevResult


def test_a_failed_add_leaves_a_cache_entry_so_del_can_run_with_that_config(tmp_path):
    runner, log = recorder_runner(tmp_path)
    plugin(tmp_path / "bin", "second", 'cat >/dev/null; [ "$CNI_COMMAND" = ADD ] && '
                                       '{ echo \'{"code": 4, "msg": "bad"}\'; exit 1; }; exit 0\n')
    with pytest.raises(CNIPluginError, match=r"second .* ADD for network 'rec' failed: bad \(code 4\)"):
        runner.add(runner.load(), "cid1", "/run/netns/x", "eth0")
    entry = runner.cached("cid1", "eth0")
    assert entry is not None and entry.result is None
    assert runner.delete("cid1", "eth0", "/run/netns/x") is True
    assert calls(log) == ["ADD-first", "DEL-first"]
    assert runner.cache_entries() == []


def test_del_tries_every_plugin_and_keeps_the_cache_when_one_fails(tmp_path):
    runner, log = recorder_runner(tmp_path)
    runner.add(runner.load(), "cid1", "/run/netns/x", "eth0")
    plugin(tmp_path / "bin", "second", "cat >/dev/null; echo broken >&2; exit 3\n")
    with pytest.raises(CNIPluginError, match="second .*DEL .*exit status 3: broken"):
        runner.delete("cid1", "eth0", "/run/netns/x")
    assert calls(log)[-1] == "DEL-first"  # still ran
    assert runner.cached("cid1", "eth0") is not None
