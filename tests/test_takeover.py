"""Zero-downtime upgrade: a new criproxy takes the socket over while calls keep coming; none fails."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc

from tests.support.fakeruntime import FakeRuntime, Reply
from tests.support.proxyproc import ROOT, wait_serving


def serve(sockdir: Path, socket: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "criproxy", "serve", "--listen", f"unix://{socket}", "--runtime-endpoint",
         f"unix://{sockdir}/runtime.sock", "--metrics-address", "off", "--shutdown-grace-seconds", "5", *extra],
        stderr=subprocess.PIPE, text=True, cwd=ROOT)


class Traffic:
    """Kubelet-like callers, without pause, until stopped: Version on one long-lived connection, Version on a new
    connection each time, and a slow ExecSync that is in flight when the takeover happens."""

    def __init__(self, socket: Path) -> None:
        self.target = f"unix://{socket}"
        self.failures: list[str] = []
        self.done: Counter[str] = Counter()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(method, fresh)) for method, fresh in (
            ("Version", False), ("Version", True), ("ExecSync", False))]

    def _loop(self, method: str, fresh: bool) -> None:
        chan = grpc.insecure_channel(self.target)
        try:
            while not self.stop.is_set():
                if fresh:
                    chan.close()
                    chan = grpc.insecure_channel(self.target)
                try:
                    chan.unary_unary(f"/runtime.v1.RuntimeService/{method}")(b"", timeout=10)
                    self.done[method] += 1
                except grpc.RpcError as err:
                    self.failures.append(f"{method}: {err.code()}: {err.details()}")
        finally:
            chan.close()

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(20)


def test_takeover_refuses_no_call(fake: FakeRuntime, sockdir: Path) -> None:
    socket = sockdir / "run" / "criproxy.sock"
    fake.script("RuntimeService/ExecSync", Reply(messages=[b"\x0a\x02ok"], delay=0.5))
    old = serve(sockdir, socket)
    new: subprocess.Popen[str] | None = None
    try:
        wait_serving(old, socket)
        old_inode = os.lstat(socket).st_ino
        with Traffic(socket) as traffic:
            time.sleep(0.5)
            new = serve(sockdir, socket, "--takeover")
            assert old.wait(40) == 0, "the old proxy did not hand over and exit cleanly"
            time.sleep(0.5)  # calls keep going, to the new one
        assert traffic.failures == []
        assert traffic.done["Version"] > 50 and traffic.done["ExecSync"] >= 2
        assert os.lstat(socket).st_ino != old_inode
        assert new.poll() is None, "the new proxy is not running"
        assert old.stderr is not None
        assert "was taken over by a newer criproxy; handing over" in old.stderr.read()
    finally:
        for proc in (old, new):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(20)
    assert not socket.exists(), "the last proxy to stop removes the socket"


def test_second_serve_without_takeover_is_refused(fake: FakeRuntime, sockdir: Path) -> None:
    socket = sockdir / "p.sock"
    first = serve(sockdir, socket)
    try:
        wait_serving(first, socket)
        second = serve(sockdir, socket)
        assert second.wait(20) == 2
        assert second.stderr is not None
        assert "replace it without downtime with --takeover" in second.stderr.read()
        assert first.poll() is None
    finally:
        first.terminate()
        first.wait(20)
