"""The console → CRI log copier, on real files and threads (no VM needed)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from cri_shim import console_log
from cri_shim.console_log import ConsoleCopier, format_lines

CRI = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z stdout ([FP]) (.*)$")


def parsed(path: Path) -> list[tuple[str, bytes]]:
    out = []
    for line in path.read_bytes().splitlines():
        m = CRI.match(line)
        assert m, line
        out.append((m.group(1).decode(), m.group(2)))
    return out


def wait_until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met")


def test_format_lines_full_partial_and_long():
    records, rest = format_lines(b"one\r\ntwo\nthr", final=False)
    assert [CRI.match(r.rstrip(b"\n")).groups() for r in records] == [(b"F", b"one"), (b"F", b"two")]
    assert rest == b"thr"
    records, rest = format_lines(rest, final=True)
    assert CRI.match(records[0].rstrip(b"\n")).groups() == (b"P", b"thr") and rest == b""
    long = b"x" * (console_log.MAX_LINE + 10) + b"\n"
    records, rest = format_lines(long, final=False)
    kinds = [CRI.match(r.rstrip(b"\n")).group(1) for r in records]
    assert kinds == [b"P", b"F"] and rest == b""


def test_copier_follows_appends_partial_lines_and_reports_progress(tmp_path):
    src, dst = tmp_path / "console.log", tmp_path / "pods" / "vm" / "0.log"
    offsets = []
    copier = ConsoleCopier(src, dst, 0, offsets.append).start()
    try:
        src.write_bytes(b"hello\n")
        wait_until(lambda: dst.exists() and parsed(dst) == [("F", b"hello")])
        with open(src, "ab") as f:
            f.write(b"login: ")
        wait_until(lambda: parsed(dst)[-1] == ("P", b"login: "), timeout=3)
        wait_until(lambda: offsets and offsets[-1] == len(b"hello\nlogin: "), timeout=3)
    finally:
        copier.stop()


def test_copier_resumes_from_offset_and_reopens_after_rotation(tmp_path):
    src, dst = tmp_path / "console.log", tmp_path / "0.log"
    src.write_bytes(b"old line\nnew line\n")
    copier = ConsoleCopier(src, dst, offset=len(b"old line\n")).start()
    try:
        wait_until(lambda: dst.exists() and parsed(dst) == [("F", b"new line")])
        # The kubelet rotates the CRI log, then asks for a reopen.
        os.rename(dst, tmp_path / "0.log.1")
        copier.reopen()
        with open(src, "ab") as f:
            f.write(b"after rotate\n")
        wait_until(lambda: dst.exists() and parsed(dst) == [("F", b"after rotate")])
        # virtlogd rotates the console file: the rest of the old one, then the new one from 0.
        with open(src, "ab") as f:
            f.write(b"last of old\n")
        os.rename(src, tmp_path / "console.log.0")
        src.write_bytes(b"first of new\n")
        wait_until(lambda: [l for _, l in parsed(dst)][-2:] == [b"last of old", b"first of new"])
    finally:
        copier.stop()
