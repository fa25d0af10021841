"""`python -m image_service` as a process: restarts keep the store and metadata, a crash mid-download leaves
nothing behind, a bad translation config stops it with a clear message, the socket is 0660."""

import signal
import stat
import subprocess
import sys
import threading
import time

import grpc

from .conftest import REPO, rules


def snapshot(client):
    images = sorted((i.id, tuple(i.repo_tags), tuple(i.repo_digests), i.size) for i in client.list())
    refs = ("virtlet.cloud/srv/small.qcow2", "virtlet.cloud/srv/disk.raw:v1")
    statuses = {ref: str(client.status(ref).image) for ref in refs}
    return images, statuses


def test_restart_keeps_store_and_metadata(service_process, image_server, small, raw_disk):
    image_server.serve_file("/disk.raw", raw_disk)
    proc = service_process()
    client = proc.start()
    assert stat.S_IMODE(proc.socket.stat().st_mode) == 0o660
    small_ref = client.pull("virtlet.cloud/srv/small.qcow2")
    client.pull("virtlet.cloud/srv/disk.raw:v1")
    before = snapshot(client)
    files = client.leftovers()
    client.close()
    assert proc.stop() == 0

    client = proc.start()  # same state dir, same socket
    try:
        assert snapshot(client) == before
        assert client.leftovers() == files
        assert client.pull("virtlet.cloud/srv/small.qcow2") == small_ref
        assert len(client.list()) == 2
    finally:
        client.close()
        proc.stop()


def test_crash_during_a_download_leaves_nothing_after_restart(service_process, image_server, small):
    proc = service_process()
    client = proc.start()
    ref = client.pull("virtlet.cloud/srv/small.qcow2")
    image_server.slow("/slow.qcow2", small, delay_per_4k=0.05)
    failed = []
    puller = threading.Thread(target=lambda: _expect_failure(client, failed))
    puller.start()
    deadline = time.monotonic() + 10
    while not list((client.store / "tmp").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert list((client.store / "tmp").iterdir()), "the download never started"
    proc.stop(signal.SIGKILL)
    puller.join()
    client.close()
    assert failed == [grpc.StatusCode.UNAVAILABLE]

    client = proc.start()
    try:
        assert client.leftovers() == [f"sha256/{ref.removeprefix('sha256:')}"]
        assert [i.id for i in client.list()] == [ref]
    finally:
        client.close()
        proc.stop()


def _expect_failure(client, failed):
    try:
        client.pull("virtlet.cloud/srv/slow.qcow2")
    except grpc.RpcError as e:
        failed.append(e.code())


def test_sigterm_during_a_download_stops_promptly_and_cleans_up(service_process, image_server, small):
    proc = service_process()
    client = proc.start()
    image_server.slow("/slow.qcow2", small, delay_per_4k=0.05)
    failed = []
    puller = threading.Thread(target=lambda: _expect_failure(client, failed))
    puller.start()
    deadline = time.monotonic() + 10
    while not list((client.store / "tmp").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)
    start = time.monotonic()
    assert proc.stop(signal.SIGTERM) == 0
    assert time.monotonic() - start < 5
    puller.join()
    client.close()
    assert failed and list((client.store / "tmp").iterdir()) == []


def test_bad_translation_config_is_refused_at_start(tmp_path, image_server):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("translations:\n- name: plain\n  url: http://mirror.example/plain.img\n"
                   "- regexp: 'broken/('\n  url: https://x/$1\n")
    proc = subprocess.run([sys.executable, "-m", "image_service", "--socket", str(tmp_path / "s"), "--state-dir",
                           str(tmp_path / "state"), "--translations", str(cfg)],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "bad.yaml" in proc.stderr and "'broken/('" in proc.stderr and "does not compile" in proc.stderr


def test_http_rule_without_allow_http_is_refused_at_start(tmp_path, service_process, image_server):
    docs = rules(image_server)
    docs[0]["transports"]["local"]["allowHTTP"] = False
    proc = service_process(docs)
    result = subprocess.run(proc.command(), cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "plain http is not allowed" in result.stderr and "srv/(.+)" in result.stderr


def test_a_request_that_is_not_valid_protobuf_is_invalid_argument(service_process):
    """The standalone service refuses undecodable bytes the way the shim's socket does, never with INTERNAL."""
    proc = service_process()
    client = proc.start()
    channel = grpc.insecure_channel(f"unix://{proc.socket}")
    try:
        # ImageStatusRequest{image: ImageSpec{image: <an encoded lone surrogate: not UTF-8>}}
        inner = b"\x0a\x03\xed\xa0\x80"
        payload = b"\x0a" + bytes([len(inner)]) + inner
        call = channel.unary_unary("/runtime.v1.ImageService/ImageStatus")
        try:
            call(payload, timeout=10)
            raise AssertionError("an undecodable request was accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
            assert "image.image" in e.details() and "UTF-8" in e.details(), e.details()
    finally:
        channel.close()
        client.close()
        proc.stop()
