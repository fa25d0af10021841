"""cloudinit builds NoCloud / ConfigDrive ISOs; read back with pycdlib (no mount needed)."""

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pycdlib
import pytest
import yaml

from cri_shim import cloudinit
from tests.support.prereq import require


def read_iso(data: bytes) -> tuple[str, dict[str, bytes]]:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    label = iso.pvd.volume_identifier.decode().strip()
    files = {}
    facade = iso.get_rock_ridge_facade()
    for dirpath, _dirs, names in facade.walk("/"):
        for name in names:
            path = f"{dirpath.rstrip('/')}/{name}"
            out = io.BytesIO()
            facade.get_file_from_iso_fp(out, path)
            files[path.lstrip("/")] = out.getvalue()
    iso.close()
    return label, files


def test_nocloud_layout():
    label, files = read_iso(cloudinit.build_iso("nocloud", "uid-1", "web-0", "#!/bin/sh\necho hi\n",
                                                {"version": 2, "ethernets": {}}))
    assert label == "cidata"
    assert yaml.safe_load(files["meta-data"]) == {"instance-id": "uid-1", "local-hostname": "web-0"}
    assert files["user-data"] == b"#!/bin/sh\necho hi\n"
    assert yaml.safe_load(files["network-config"]) == {"version": 2, "ethernets": {}}


def test_nocloud_always_has_user_data_and_no_network_config_unless_given():
    _, files = read_iso(cloudinit.build_iso("nocloud", "uid-1", "web-0"))
    assert files["user-data"] == b""
    assert "network-config" not in files


def test_configdrive_layout():
    label, files = read_iso(cloudinit.build_iso("configdrive", "uid-2", "db-1", "#cloud-config\n{}\n"))
    assert label == "config-2"
    assert json.loads(files["openstack/latest/meta_data.json"])["uuid"] == "uid-2"
    assert json.loads(files["openstack/latest/meta_data.json"])["hostname"] == "db-1"
    assert files["openstack/latest/user_data"] == b"#cloud-config\n{}\n"


def test_hostile_metadata_stays_data():
    hostile = "x\ninstance-id: evil\n"
    _, files = read_iso(cloudinit.build_iso("nocloud", hostile, "h"))
    assert yaml.safe_load(files["meta-data"])["instance-id"] == hostile


def test_unknown_type_is_rejected():
    with pytest.raises(ValueError, match="nocloud or configdrive"):
        cloudinit.build_iso("iso", "u", "h")


# --- compose: cloud-init data for one VM pod -----------------------------------------------


from cri_shim.annotations import VMAnnotations  # noqa: E402
from cri_shim.cloudinit import CloudInitError, Mount, compose  # noqa: E402
from cri_shim.network.model import DNSSettings, PodNetwork  # noqa: E402

KEY1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOaXnZ1m5hUoZ6xw0kQ6Xo1v alice@laptop"
KEY2 = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAy"
KEY3 = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCaJEcFDXEK2Z from-secret"


def vm(**annotations: str) -> VMAnnotations:
    return VMAnnotations.from_pod_annotations(annotations)


def make(v: VMAnnotations | None = None, **kwargs) -> cloudinit.CloudInitData:
    args = {"pod_uid": "6f1c7d2e-uid", "pod_name": "web-0", "hostname": "web-0"}
    args.update(kwargs)
    return compose(v or vm(), **args)


def cloud_config(data: cloudinit.CloudInitData) -> dict:
    assert data.user_data.startswith("#cloud-config\n")
    return yaml.safe_load(data.user_data) or {}


def test_plain_pod():
    data = make()
    assert data.image_type == "nocloud"
    assert data.meta_data == {"instance-id": "6f1c7d2e-uid", "local-hostname": "web-0"}
    assert data.user_data == "#cloud-config\n"
    assert data.network_config is None


def test_ssh_keys_go_to_meta_data_and_user_data():
    data = make(vm(VirtletSSHKeys=f"{KEY1}\n{KEY2}\n"))
    assert data.meta_data["public-keys"] == [KEY1, KEY2]
    assert cloud_config(data) == {"ssh_authorized_keys": [KEY1, KEY2]}


def test_ssh_keys_from_source_come_first_and_overwrite_drops_them():
    v = vm(VirtletSSHKeys=KEY1, VirtletSSHKeySource="secret/keys")
    assert make(v, source_ssh_keys=[KEY3, KEY1]).meta_data["public-keys"] == [KEY3, KEY1]
    v = vm(VirtletSSHKeys=KEY1, VirtletCloudInitUserDataOverwrite="true")
    data = make(v, source_ssh_keys=[KEY3])
    assert data.meta_data["public-keys"] == [KEY1]
    assert cloud_config(data)["ssh_authorized_keys"] == [KEY1]
    # overwrite without annotation keys keeps the source's keys (virtlet)
    v = vm(VirtletCloudInitUserDataOverwrite="true")
    assert make(v, source_ssh_keys=[KEY3]).meta_data["public-keys"] == [KEY3]


def test_meta_data_annotation_wins():
    data = make(vm(VirtletSSHKeys=KEY1,
                   VirtletCloudInitMetaData="instance-id: foobar\nextra: {a: 1}\npublic-keys: [mine]\n"))
    assert data.meta_data == {"instance-id": "foobar", "local-hostname": "web-0", "public-keys": ["mine"],
                              "extra": {"a": 1}}


def test_configdrive_meta_data_has_openstack_names():
    data = make(vm(VirtletCloudInitImageType="configdrive", VirtletSSHKeys=KEY1))
    assert data.image_type == "configdrive"
    assert data.meta_data == {
        "instance-id": "6f1c7d2e-uid", "uuid": "6f1c7d2e-uid",
        "local-hostname": "web-0", "hostname": "web-0", "name": "web-0",
        "public-keys": [KEY1], "public_keys": [KEY1],
    }


def test_configdrive_uuid_follows_an_overridden_instance_id():
    data = make(vm(VirtletCloudInitMetaData="instance-id: foobar\nlocal-hostname: other"),
                image_type="configdrive")
    assert data.meta_data["uuid"] == "foobar"
    assert data.meta_data["hostname"] == "other"


def test_env_file_exact():
    data = make(env={"MY_FOO_VAR": "foo", "A_PATH": "/usr/bin:/bin", "EMPTY": ""})
    assert cloud_config(data) == {"write_files": [{
        "path": "/etc/cloud/environment",
        "permissions": "0644",
        "content": "A_PATH=/usr/bin:/bin\nEMPTY=\nMY_FOO_VAR=foo\n",
    }]}


HOSTILE_ENV = {
    "QUOTES": "it's \"quoted\"",
    "SUBST": "$(touch /tmp/pwned) `id` ${HOME}",
    "MULTI": "line1\nline2\n",
    "BACKSLASH": "a\\b\\'c",
    "UNICODE": "héllo ✓",
    "SEMI": "x; rm -rf /",
    "SPACE": " padded ",
}


def test_env_file_quoting():
    content = cloudinit.env_file_content(HOSTILE_ENV)
    assert "QUOTES='it'\\''s \"quoted\"'\n" in content
    assert "SEMI='x; rm -rf /'\n" in content


def test_env_file_is_sourced_by_sh_to_the_same_values(tmp_path):
    path = tmp_path / "environment"
    path.write_text(cloudinit.env_file_content(HOSTILE_ENV))
    for name, value in HOSTILE_ENV.items():
        out = subprocess.run(["sh", "-c", f'. "$1" && printf %s "${name}"', "sh", str(path)],
                             capture_output=True, text=True, check=True, cwd=tmp_path)
        assert out.stdout == value, name
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("env", [{"my-var": "x"}, {"1X": "x"}, {"A=B": "x"}, {"": "x"}, {"A": "x\x00y"}])
def test_env_file_bad(env):
    with pytest.raises(CloudInitError):
        make(env=env)


def test_mounts_entries_and_script():
    mounts = [Mount("/var/lib/kubelet/pods/u/volumes/data", "/data"),
              Mount("/var/lib/kubelet/pods/u/volumes/cfg", "/etc/my app-cfg".replace(" ", "_"), read_only=True)]
    data = make(mounts=mounts)
    t0, t1 = mounts[0].tag, mounts[1].tag
    script = (
        "#!/bin/sh\n"
        f"if ! grep -qs '^{t0} ' /proc/mounts; then mkdir -p /data && mount -t virtiofs -o defaults {t0} /data; fi\n"
        f"if ! grep -qs '^{t1} ' /proc/mounts; then mkdir -p /etc/my_app-cfg && "
        f"mount -t virtiofs -o ro {t1} /etc/my_app-cfg; fi\n"
    )
    assert cloud_config(data) == {
        "mounts": [[t0, "/data", "virtiofs", "defaults,nofail", "0", "0"],
                   [t1, "/etc/my_app-cfg", "virtiofs", "ro,nofail", "0", "0"]],
        "write_files": [{"path": "/etc/cloud/mount-volumes.sh", "permissions": "0755", "content": script}],
    }


def test_mount_tag_is_stable_unique_and_short():
    a, b = Mount("/h1", "/a/data"), Mount("/h2", "/b/data")
    assert a.tag != b.tag
    assert a.tag == Mount("/elsewhere", "/a/data", read_only=True).tag
    assert len(a.tag) <= 31 and a.tag.isalnum()


def test_mount_script_quotes_paths():
    script = cloudinit.mount_script([Mount("/h", "/opt/it's$x")])
    assert "mkdir -p '/opt/it'\"'\"'s$x' && " in script
    assert script.rstrip().endswith(" '/opt/it'\"'\"'s$x'; fi")


# ---- the mount script run by a real shell, with only what a minimal guest has

def _guest_bin(tmp_path: Path) -> tuple[Path, Path]:
    """A PATH of the machine's busybox applets without `mountpoint` (Debian's busybox, as in the test
    image, has none; many guests lack it), and a `mount` that records its arguments instead of mounting."""
    busybox = shutil.which("busybox")
    require(busybox is not None, "busybox not installed (Debian: busybox-static)")
    bin_dir, calls = tmp_path / "bin", tmp_path / "mount-calls"
    bin_dir.mkdir()
    listed = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in set(listed) - {"mountpoint", "mount"}:
        (bin_dir / applet).symlink_to(busybox)
    (bin_dir / "mount").write_text(f'#!{busybox} sh\necho "$*" >> {calls}\n')
    (bin_dir / "mount").chmod(0o755)
    return bin_dir, calls


def _run_script(bin_dir: Path, script: Path, wrap: list[str] = ()) -> subprocess.CompletedProcess:
    # The host's /bin/sh, not busybox's: busybox sh runs its own applets before PATH (a real mount).
    argv = [*wrap, "env", "-i", f"PATH={bin_dir}", "/bin/sh", str(script)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def test_mount_script_needs_no_mountpoint_command():
    script = cloudinit.mount_script([Mount("/h", "/data"), Mount("/h2", "/etc/cfg", read_only=True)])
    assert "mountpoint" not in script


def test_mount_script_runs_in_a_guest_without_mountpoint(tmp_path):
    bin_dir, calls = _guest_bin(tmp_path)
    data, cfg = tmp_path / "guest" / "data", tmp_path / "guest" / "it's$cfg"
    mounts = [Mount("/h", str(data)), Mount("/h2", str(cfg), read_only=True)]
    script = tmp_path / "mount-volumes.sh"
    script.write_text(cloudinit.mount_script(mounts))
    done = _run_script(bin_dir, script)
    assert (done.returncode, done.stderr) == (0, "")
    assert data.is_dir() and cfg.is_dir()
    assert calls.read_text().splitlines() == [f"-t virtiofs -o defaults {mounts[0].tag} {data}",
                                              f"-t virtiofs -o ro {mounts[1].tag} {cfg}"]


def test_mount_script_skips_a_share_already_mounted(tmp_path):
    """Idempotent: a share whose tag is in /proc/mounts (cloud-init's fstab entry mounted it) is left alone.
    The "share" is a tmpfs named by the tag, in a private mount namespace."""
    require(os.geteuid() == 0 and shutil.which("unshare") is not None, "needs root and unshare (util-linux)")
    bin_dir, calls = _guest_bin(tmp_path)
    mounted, other = Mount("/h", str(tmp_path / "mounted")), Mount("/h2", str(tmp_path / "other"))
    Path(mounted.container_path).mkdir()
    script = tmp_path / "mount-volumes.sh"
    script.write_text(cloudinit.mount_script([mounted, other]))
    done = _run_script(bin_dir, script, wrap=[
        "unshare", "-m", "--propagation", "private", "sh", "-c",
        f'mount -t tmpfs {mounted.tag} {mounted.container_path} && exec "$@"', "sh"])
    assert (done.returncode, done.stderr) == (0, "")
    assert calls.read_text().splitlines() == [f"-t virtiofs -o defaults {other.tag} {other.container_path}"]


@pytest.mark.parametrize("host,container", [
    ("/h", "relative"), ("/h", "/"), ("/h", "/a/../etc"), ("/h", "/a//b"), ("/h", "/a/"), ("/h", "/with space"),
    ("/h", "/tab\there"), ("/h", "/nl\nx"), ("relative", "/data"), ("/h\x00", "/data"),
])
def test_mount_bad_paths(host, container):
    with pytest.raises(CloudInitError):
        Mount(host, container)


def test_duplicate_mount_paths_rejected():
    with pytest.raises(CloudInitError, match="share a container path"):
        make(mounts=[Mount("/h1", "/data"), Mount("/h2", "/data")])


def test_user_data_is_merged_like_virtlet():
    v = vm(VirtletSSHKeys=KEY1, VirtletCloudInitUserData="""
users:
- name: cloudy
ssh_authorized_keys: [mine]
write_files:
- path: /etc/foobar
  content: whatever
runcmd: [echo hi]
package_update: true
""")
    data = make(v, env={"foo": "bar"}, mounts=[Mount("/h", "/opt")])
    cfg = cloud_config(data)
    assert cfg["users"] == [{"name": "cloudy"}]
    assert cfg["ssh_authorized_keys"] == [KEY1, "mine"]  # lists concatenate, generated first
    assert [f["path"] for f in cfg["write_files"]] == [
        "/etc/cloud/mount-volumes.sh", "/etc/cloud/environment", "/etc/foobar"]
    assert cfg["runcmd"] == ["echo hi"]
    assert cfg["package_update"] is True
    assert len(cfg["mounts"]) == 1


def test_merge_user_data_rules():
    base = {"d": {"x": 1, "l": [1], "keep": True}, "l": [1, 2], "s": "base", "t": [1], "gone": 1}
    over = {"d": {"x": 2, "l": [3], "new": "n"}, "l": [3], "s": "over", "t": {"now": "dict"}, "gone": None,
            "absent": None}
    assert cloudinit.merge_user_data(base, over) == {
        "d": {"x": 2, "l": [1, 3], "keep": True, "new": "n"},
        "l": [1, 2, 3], "s": "over", "t": {"now": "dict"}, "absent": None,
    }
    assert base["l"] == [1, 2] and base["d"]["l"] == [1]  # inputs untouched


def test_null_in_user_data_deletes_a_generated_key():
    cfg = cloud_config(make(vm(VirtletSSHKeys=KEY1, VirtletCloudInitUserData="ssh_authorized_keys: null"),
                            env={"A": "b"}))
    assert "ssh_authorized_keys" not in cfg
    assert "write_files" in cfg


def test_overwrite_replaces_generated_keys_by_name():
    v = vm(VirtletSSHKeys=KEY1, VirtletCloudInitUserDataOverwrite="true",
           VirtletCloudInitUserData="write_files:\n- {path: /mine, content: x}\nusers: [{name: cloudy}]\n")
    cfg = cloud_config(make(v, env={"A": "b"}))
    assert cfg == {
        "write_files": [{"path": "/mine", "content": "x"}],  # the env file is gone: key replaced whole
        "users": [{"name": "cloudy"}],
        "ssh_authorized_keys": [KEY1],  # not named by the annotation: stays
    }


def test_source_user_data_layers_under_the_annotation():
    source = {"runcmd": ["from-source"], "bootcmd": ["b"], "final_message": "source"}
    v = vm(VirtletCloudInitUserData="runcmd: [from-annotation]\nfinal_message: annotation\n",
           VirtletCloudInitUserDataSource="configmap/ud")
    cfg = cloud_config(make(v, source_user_data=source))
    assert cfg == {"runcmd": ["from-source", "from-annotation"], "bootcmd": ["b"], "final_message": "annotation"}
    # with overwrite, the annotation replaces the source's data wholesale (virtlet)
    v = vm(VirtletCloudInitUserData="runcmd: [from-annotation]", VirtletCloudInitUserDataOverwrite="true")
    assert cloud_config(make(v, source_user_data=source)) == {"runcmd": ["from-annotation"]}
    # source alone
    assert cloud_config(make(vm(), source_user_data=source)) == source
    assert source == {"runcmd": ["from-source"], "bootcmd": ["b"], "final_message": "source"}


def test_source_user_data_is_checked():
    with pytest.raises(CloudInitError):
        make(source_user_data={"x": float("nan")})
    with pytest.raises(CloudInitError):
        make(source_user_data={"x": object()})
    with pytest.raises(CloudInitError):
        make(source_user_data={1: "x"})


@pytest.mark.parametrize("kwargs", [
    {"source_ssh_keys": ["not a key"]}, {"source_ssh_keys": KEY1}, {"source_ssh_keys": [1]},
    {"source_user_data_script": "echo \x00"}, {"source_user_data_script": "echo \ud800"},
    {"env": {"A": "\ud800"}},
])
def test_bad_resolved_data(kwargs):
    with pytest.raises(CloudInitError):
        make(**kwargs)


def test_user_data_script_with_placeholder():
    mounts = [Mount("/h", "/opt")]
    v = vm(VirtletCloudInitUserDataScript="#!/bin/sh\necho hi\n@virtlet-mount-script@\necho done\n",
           VirtletCloudInitUserData="users: [{name: ignored}]", VirtletSSHKeys=KEY1)
    data = make(v, mounts=mounts, env={"A": "b"})
    assert data.user_data == "#!/bin/sh\necho hi\n" + cloudinit.mount_script(mounts) + "\necho done\n"
    assert "ignored" not in data.user_data
    assert data.meta_data["public-keys"] == [KEY1]  # keys still reach the VM through meta-data


def test_user_data_script_placeholder_only_and_without_mounts():
    v = vm(VirtletCloudInitUserDataScript="@virtlet-mount-script@")
    mounts = [Mount("/h", "/opt")]
    assert make(v, mounts=mounts).user_data == cloudinit.mount_script(mounts)
    assert make(v).user_data == ""
    v = vm(VirtletCloudInitUserDataScript="#!/bin/sh\n@virtlet-mount-script@echo x\n")
    assert make(v).user_data == "#!/bin/sh\necho x\n"


def test_source_script_wins_over_annotation_script():
    v = vm(VirtletCloudInitUserDataScript="#!/bin/sh\necho annotation\n")
    assert make(v, source_user_data_script="#!/bin/sh\necho source\n").user_data == "#!/bin/sh\necho source\n"


def test_network_config_passes_through_as_a_copy():
    net = {"version": 2, "ethernets": {"eth0": {"dhcp4": True, "match": {"macaddress": "52:54:00:12:34:56"}}}}
    data = make(network_config=net)
    assert data.network_config == net
    data.network_config["ethernets"]["eth0"]["dhcp4"] = False
    assert net["ethernets"]["eth0"]["dhcp4"] is True


def test_output_is_deterministic_and_alias_free():
    a = make(vm(VirtletSSHKeys=f"{KEY1}\n{KEY2}", VirtletCloudInitUserData="b: [1]\na: {z: 1, y: 2}"),
             env={"Z": "1", "A": "2"}, mounts=[Mount("/h", "/opt")])
    b = make(vm(VirtletCloudInitUserData="a: {y: 2, z: 1}\nb: [1]", VirtletSSHKeys=f"{KEY1}\n{KEY2}"),
             env={"A": "2", "Z": "1"}, mounts=[Mount("/h", "/opt")])
    assert a == b
    assert "&id" not in a.user_data and "*id" not in a.user_data
    keys = [line.split(":")[0] for line in a.user_data.splitlines()[1:] if line and not line.startswith((" ", "-"))]
    assert keys == sorted(keys)


@pytest.mark.parametrize("kwargs", [
    {"hostname": ""}, {"hostname": "bad host"}, {"hostname": "-x"}, {"pod_uid": ""}, {"pod_uid": "a\nb"},
    {"pod_name": "x" * 300}, {"image_type": "iso"},
])
def test_bad_pod_facts(kwargs):
    with pytest.raises(CloudInitError):
        make(**kwargs)


def test_nocloud_iso_for_composed_data():
    v = vm(VirtletSSHKeys=KEY1, VirtletCloudInitUserData="users: [{name: cloudy}]")
    net = {"version": 1, "config": []}
    data = make(v, env={"A": "b"}, network_config=net)
    label, files = read_iso(cloudinit.build_iso_for(data))
    assert label == "cidata"
    assert sorted(files) == ["meta-data", "network-config", "user-data"]
    assert yaml.safe_load(files["meta-data"]) == data.meta_data
    assert files["user-data"].decode() == data.user_data
    assert yaml.safe_load(files["user-data"])["users"] == [{"name": "cloudy"}]
    assert yaml.safe_load(files["network-config"]) == net


def test_configdrive_iso_for_composed_data():
    v = vm(VirtletCloudInitImageType="configdrive", VirtletSSHKeys=KEY1,
           VirtletCloudInitUserDataScript="#!/bin/sh\necho hi\n")
    net = {"links": [], "networks": [], "services": []}
    data = make(v, network_config=net)
    label, files = read_iso(cloudinit.build_iso_for(data))
    assert label == "config-2"
    assert sorted(files) == ["openstack/latest/meta_data.json", "openstack/latest/network_data.json",
                             "openstack/latest/user_data"]
    meta = json.loads(files["openstack/latest/meta_data.json"])
    assert meta["uuid"] == "6f1c7d2e-uid" and meta["public_keys"] == [KEY1]
    assert files["openstack/latest/user_data"] == b"#!/bin/sh\necho hi\n"
    assert json.loads(files["openstack/latest/network_data.json"]) == net


def test_iso_for_unicode_user_data():
    data = make(vm(VirtletCloudInitUserData="final_message: héllo ✓"), env={"U": "ü"})
    _, files = read_iso(cloudinit.build_iso_for(data))
    assert yaml.safe_load(files["user-data"].decode("utf-8"))["final_message"] == "héllo ✓"


# --- resolver options: cloud-init's resolv_conf module, in vendor-data ---------------------------

def vendor_doc(data: cloudinit.CloudInitData) -> dict:
    assert data.vendor_data is not None and data.vendor_data.startswith("#cloud-config\n")
    return yaml.safe_load(data.vendor_data)


def test_resolv_conf_options_are_cloud_inits_mapping():
    assert cloudinit.resolv_conf_options(["ndots:5", "rotate", "timeout:2", "ndots:2"]) == {
        "ndots": 2, "rotate": True, "timeout": 2}  # a later option of the same name wins, as in the resolver
    assert cloudinit.resolv_conf_options([]) == {}


def test_resolver_options_go_to_vendor_data_with_servers_and_searches():
    dns = DNSSettings.of(["10.96.0.10", "not-an-ip"], ["ns1.svc.cluster.local", "svc.cluster.local"],
                         ["ndots:5", "edns0"])
    data = make(dns=dns)
    assert vendor_doc(data) == {"manage_resolv_conf": True, "resolv_conf": {
        "nameservers": ["10.96.0.10"], "searchdomains": ["ns1.svc.cluster.local", "svc.cluster.local"],
        "options": {"ndots": 5, "edns0": True}}}
    assert data.user_data == "#cloud-config\n"  # the user data is untouched
    # With a user-data script too (cloud-init applies vendor-data whatever the user data is).
    scripted = make(vm(VirtletCloudInitUserDataScript="#!/bin/sh\necho hi\n"), dns=dns)
    assert scripted.user_data == "#!/bin/sh\necho hi\n" and scripted.vendor_data == data.vendor_data


def test_no_options_no_vendor_data():
    assert make().vendor_data is None
    assert make(dns=DNSSettings.of(["10.96.0.10"], ["a.example"])).vendor_data is None  # DHCP carries those
    _, files = read_iso(cloudinit.build_iso_for(make()))
    assert "vendor-data" not in files


def test_the_pods_resolver_settings_go_to_vendor_data_not_network_config():
    pn = PodNetwork(sandbox_id="ab" * 32, binding="bridge", netns_name="n", netns_path="/run/netns/n",
                    host_bridge="vbabab", host_veth="vhabab", vm_mac="52:54:00:00:00:01", pod_ip="10.1.0.5",
                    prefixlen=24, vm_ip="10.1.0.5", vm_prefixlen=24,
                    dns=DNSSettings.of(["10.96.0.10"], ["a.example"], ["ndots:5"]))
    data = make(network_config=pn.network_config(), dns=pn.dns)  # as container_create passes them
    assert vendor_doc(data)["resolv_conf"] == {"nameservers": ["10.96.0.10"], "searchdomains": ["a.example"],
                                               "options": {"ndots": 5}}
    assert type(data.network_config) is dict and "options" not in yaml.safe_dump(data.network_config)
    # The network config alone carries no options: nothing for vendor-data.
    assert make(network_config=pn.network_config()).vendor_data is None


@pytest.mark.parametrize("option", ["", "ndots: 5", "ndots:5\nnameserver 6.6.6.6", "rotate #x", "a;b", "NDOTS:5",
                                    "ndots:five", "ndots:", ":5", "x" * 65, "ndots:1234567890", "ndots:5 rotate"])
def test_bad_resolver_options_are_refused(option):
    with pytest.raises(CloudInitError, match=r"resolver option \[1\]"):
        make(dns=DNSSettings.of(options=["rotate", option]))


def test_too_many_resolver_options_are_refused():
    with pytest.raises(CloudInitError, match="at most 32"):
        make(dns=DNSSettings.of(options=["rotate"] * 33))


def test_vendor_data_on_both_disk_formats():
    dns = DNSSettings.of(["10.96.0.10"], [], ["timeout:2"])
    data = make(dns=dns)
    label, files = read_iso(cloudinit.build_iso_for(data))
    assert label == "cidata" and sorted(files) == ["meta-data", "user-data", "vendor-data"]
    assert files["vendor-data"].decode() == data.vendor_data
    cd = make(vm(VirtletCloudInitImageType="configdrive"), dns=dns)
    label, files = read_iso(cloudinit.build_iso_for(cd))
    assert label == "config-2"
    # cloud-init's OpenStack reader takes the "cloud-init" member of vendor_data.json as the vendor-data.
    assert json.loads(files["openstack/latest/vendor_data.json"]) == {"cloud-init": cd.vendor_data}
    assert yaml.safe_load(cd.vendor_data)["resolv_conf"]["options"] == {"timeout": 2}


def _test_image_options(tmp_path: Path, text: str) -> str:
    """What the test image's resolv_conf.awk makes of a cloud-config (busybox awk, as in the guest)."""
    require(shutil.which("busybox") is not None, "busybox (busybox-static) is needed")
    f = tmp_path / "doc.yaml"
    f.write_text(text)
    awk = Path(__file__).parents[2] / "deploy/images/testvm/rootfs/etc/vmlet/resolv_conf.awk"
    return subprocess.run(["busybox", "awk", "-f", str(awk), str(f)], capture_output=True, text=True,
                          check=True).stdout


def test_the_test_images_mini_cloud_init_reads_vmlets_vendor_data(tmp_path):
    data = make(dns=DNSSettings.of(["10.96.0.10"], ["a.example"], ["ndots:5", "rotate", "timeout:2"]))
    assert _test_image_options(tmp_path, data.vendor_data) == "options ndots:5 rotate timeout:2\n"
    # cloud-init's rule: nothing without manage_resolv_conf; false flags dropped; junk items skipped.
    assert _test_image_options(tmp_path, data.vendor_data.replace("manage_resolv_conf: true",
                                                                  "manage_resolv_conf: false")) == ""
    assert _test_image_options(tmp_path, (
        "#cloud-config\nresolv_conf:\n  options:\n    rotate: false\n    evil: 'x; nameserver 6.6.6.6'\n"
        "    attempts: 3\n  nameservers: [1.2.3.4]\nmanage_resolv_conf: yes\n")) == "options attempts:3\n"


def test_the_test_image_reads_configdrives_vendor_data_json(tmp_path):
    """boot.sh: `json_get cloud-init vendor_data.json` (newlines flattened first, as there), then resolv_conf.awk."""
    require(shutil.which("busybox") is not None, "busybox (busybox-static) is needed")
    cd = make(vm(VirtletCloudInitImageType="configdrive"), dns=DNSSettings.of(["10.96.0.10"], [], ["ndots:3"]))
    _, files = read_iso(cloudinit.build_iso_for(cd))
    flat = files["openstack/latest/vendor_data.json"].decode().replace("\n", " ")
    awk = Path(__file__).parents[2] / "deploy/images/testvm/rootfs/etc/vmlet/json_get.awk"
    text = subprocess.run(["busybox", "awk", "-v", "k=cloud-init", "-f", str(awk)], input=flat, capture_output=True,
                          text=True, check=True).stdout
    assert text == cd.vendor_data + "\n"
    assert _test_image_options(tmp_path, text) == "options ndots:3\n"
