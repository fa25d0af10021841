"""Bad input: broken config, missing/failing/hanging plugins -> a clear error and nothing left behind."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from cri_shim.network import CNIConfigError, CNIPluginError, NetworkError, netns
from cri_shim.network.names import netns_name
from tests.support import netsupport


def assert_nothing_of(nm, sid, test_network) -> None:
    assert not netns.exists(netns_name(sid))
    assert not (nm.records_dir / sid).exists()
    assert nm.cni.cache_entries() == []
    assert test_network.allocated_ips() == []
    assert [x for x in netsupport.leftovers() if not x.startswith(f"link {test_network.bridge}")] == []


def setup(nm, sid):
    return nm.setup(sid, pod_namespace="ns1", pod_name="bad-pod", pod_uid="uid-3")


def test_broken_conflist_is_refused_before_anything_is_created(make_manager, conf_dir, test_network, sandbox_id):
    (conf_dir / "10-vmlet-nettest.conflist").write_text('{"cniVersion": "1.0.0", "name": "x", "plugins": [')
    nm = make_manager()
    ready, reason, message = nm.status()
    assert not ready and reason == "NetworkPluginNotReady" and "not valid JSON" in message
    with pytest.raises(CNIConfigError, match=r"10-vmlet-nettest.conflist is not valid JSON"):
        setup(nm, sandbox_id)
    assert_nothing_of(nm, sandbox_id, test_network)


def test_first_valid_config_wins_and_an_empty_dir_is_not_ready(make_manager, conf_dir, test_network, tmp_path):
    netsupport.write_conf(conf_dir, "05-broken.conflist", {"cniVersion": "9.9.9", "name": "x", "plugins": [{}]})
    netsupport.write_conf(conf_dir, "99-other.conf", {"cniVersion": "0.4.0", "name": "other", "type": "bridge"})
    nm = make_manager()
    assert nm.status() == (True, "", f"CNI network {test_network.name!r} from {conf_dir}/10-vmlet-nettest.conflist")
    empty = tmp_path / "empty.d"
    empty.mkdir()
    ready, _, message = make_manager(conf=empty).status()
    assert not ready and "no CNI config" in message


def test_missing_plugin_is_named_and_nothing_is_created(make_manager, conf_dir, test_network, sandbox_id):
    netsupport.write_conf(conf_dir, "10-vmlet-nettest.conflist",
                          test_network.conflist([{"type": "vmlet-no-such-plugin"}]))
    nm = make_manager()
    ready, _, message = nm.status()
    assert not ready and "vmlet-no-such-plugin" in message
    with pytest.raises(CNIPluginError, match=r"CNI plugin 'vmlet-no-such-plugin' not found in /usr/lib/cni"):
        setup(nm, sandbox_id)
    assert_nothing_of(nm, sandbox_id, test_network)


def test_failing_plugin_error_json_is_surfaced_and_the_chain_is_rolled_back(
        make_manager, conf_dir, test_network, sandbox_id, tmp_path):
    bin_dir = tmp_path / "bin"
    log = tmp_path / "calls.log"
    netsupport.script_plugin(bin_dir, "vmlet-failer", f"""
echo "$CNI_COMMAND $CNI_CONTAINERID $CNI_ARGS" >> {log}
cat > {tmp_path}/stdin.$CNI_COMMAND
if [ "$CNI_COMMAND" = ADD ]; then
  echo '{{"cniVersion": "1.0.0", "code": 11, "msg": "quota exhausted", "details": "try again later"}}'
  echo "some noise on stderr" >&2
  exit 1
fi
exit 0
""")
    netsupport.write_conf(conf_dir, "10-vmlet-nettest.conflist", test_network.conflist([{"type": "vmlet-failer"}]))
    nm = make_manager(bin_dirs=[str(bin_dir), netsupport.CNI_BIN_DIR])
    with pytest.raises(CNIPluginError) as err:
        setup(nm, sandbox_id)
    assert "vmlet-failer" in str(err.value) and "ADD" in str(err.value)
    assert "quota exhausted (code 11): try again later" in str(err.value)
    assert (err.value.code, err.value.msg, err.value.details) == (11, "quota exhausted", "try again later")
    # The failer got the bridge plugin's result as prevResult, and CNI_ARGS as the kubelet sets them.
    import json
    stdin = json.loads((tmp_path / "stdin.ADD").read_text())
    assert stdin["name"] == test_network.name and stdin["cniVersion"] == "1.0.0"
    assert stdin["prevResult"]["ips"][0]["address"].startswith(str(test_network.subnet.network_address)[:-1])
    calls = log.read_text().splitlines()
    assert [c.split()[0] for c in calls] == ["ADD", "DEL"]  # rolled back: DEL after the failed ADD
    assert calls[0].split()[1] == sandbox_id
    assert ("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=bad-pod;"
            f"K8S_POD_INFRA_CONTAINER_ID={sandbox_id};K8S_POD_UID=uid-3") == calls[0].split()[2]
    assert_nothing_of(nm, sandbox_id, test_network)  # the bridge plugin's IP released too


def test_hanging_plugin_times_out_is_killed_with_its_children_and_rolled_back(
        make_manager, conf_dir, test_network, sandbox_id, tmp_path):
    bin_dir = tmp_path / "bin"
    marker = f"vmlet-hang-{sandbox_id[:8]}"
    netsupport.script_plugin(bin_dir, "vmlet-hanger", f"""
cat >/dev/null
if [ "$CNI_COMMAND" = ADD ]; then
  sh -c 'sleep 300; : {marker}' &
  sleep 300
fi
exit 0
""")
    netsupport.write_conf(conf_dir, "10-vmlet-nettest.conflist", test_network.conflist([{"type": "vmlet-hanger"}]))
    nm = make_manager(bin_dirs=[str(bin_dir), netsupport.CNI_BIN_DIR], timeout=1.5)
    start = time.monotonic()
    with pytest.raises(CNIPluginError, match=r"vmlet-hanger .*ADD .*did not finish within 1.5s; killed"):
        setup(nm, sandbox_id)
    assert time.monotonic() - start < 10
    time.sleep(0.2)
    hung = [p for p in os.listdir("/proc") if p.isdigit() and marker.encode() in _cmdline(p)]
    assert hung == [], "the plugin's process group was not killed"
    assert_nothing_of(nm, sandbox_id, test_network)


def test_plugin_without_a_result_and_a_result_without_ipv4_fail_clearly(
        make_manager, conf_dir, test_network, sandbox_id, tmp_path):
    bin_dir = tmp_path / "bin"
    netsupport.script_plugin(bin_dir, "vmlet-silent", "cat >/dev/null\nexit 0\n")
    netsupport.write_conf(conf_dir, "10-vmlet-nettest.conflist", test_network.conflist([{"type": "vmlet-silent"}]))
    nm = make_manager(bin_dirs=[str(bin_dir), netsupport.CNI_BIN_DIR])
    with pytest.raises(CNIPluginError, match="vmlet-silent .*succeeded but returned no result"):
        setup(nm, sandbox_id)
    assert_nothing_of(nm, sandbox_id, test_network)

    netsupport.script_plugin(bin_dir, "vmlet-noip", 'cat >/dev/null\necho \'{"cniVersion": "1.0.0"}\'\n')
    netsupport.write_conf(conf_dir, "10-vmlet-nettest.conflist", {
        "cniVersion": "1.0.0", "name": "noip", "plugins": [{"type": "vmlet-noip"}]})
    with pytest.raises(NetworkError, match="gave eth0 no IPv4 address"):
        setup(nm, sandbox_id)
    assert_nothing_of(nm, sandbox_id, test_network)


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
