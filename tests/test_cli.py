"""`criproxy` as an operator runs it: a real process, flags, config file, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from criproxy import __version__
from tests.support.fakeruntime import FakeRuntime, Reply
from tests.support.proxyproc import wait_serving

ROOT = Path(__file__).resolve().parent.parent


def criproxy(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "criproxy", *args], check=False, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_version() -> None:
    done = criproxy("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"criproxy {__version__}"


def test_serve_help_names_every_flag() -> None:
    done = criproxy("serve", "--help")
    assert done.returncode == 0
    for flag in ("--listen", "--runtime-endpoint", "--image-endpoint", "--config", "--max-message-bytes",
                 "--socket-group", "--socket-mode", "--shutdown-grace-seconds", "--log-level"):
        assert flag in done.stdout
    assert "containerRuntimeEndpoint" in done.stdout


def test_no_command_prints_help_and_fails() -> None:
    done = criproxy()
    assert done.returncode == 2
    assert "serve" in done.stderr


def test_bad_flag_value_exits_2_naming_it(sockdir: Path) -> None:
    done = criproxy("serve", "--listen", f"unix://{sockdir}/p.sock", "--runtime-endpoint", "tcp://10.0.0.1:1")
    assert done.returncode == 2
    assert done.stderr.startswith("criproxy: --runtime-endpoint 'tcp://10.0.0.1:1': the tcp:// scheme")


def test_a_listen_path_too_long_for_a_socket_exits_2_naming_it(sockdir: Path) -> None:
    url = f"unix://{sockdir}/{'x' * 120}.sock"
    done = criproxy("serve", "--listen", url, "--runtime-endpoint", f"unix://{sockdir}/runtime.sock")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"criproxy: --listen {url!r}: the socket path is ")
    assert "Traceback" not in done.stderr and "use at most 95" in done.stderr


class Running:
    def __init__(self, proc: subprocess.Popen[str], socket: Path) -> None:
        self.proc = proc
        self.socket = socket
        self.target = f"unix://{socket}"


@pytest.fixture
def served(fake: FakeRuntime, sockdir: Path) -> Iterator[Running]:
    config = sockdir / "criproxy.yaml"
    socket = sockdir / "run" / "criproxy.sock"
    config.write_text(f"listen: unix://{socket}\nruntime-endpoint: unix://{sockdir}/runtime.sock\n"
                      "shutdown-grace-seconds: 5\nmetrics-address: 127.0.0.1:0\n")
    proc = subprocess.Popen([sys.executable, "-m", "criproxy", "serve", "--config", str(config)],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        wait_serving(proc, socket)
        yield Running(proc, socket)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


def test_sigterm_drains_in_flight_calls_then_removes_the_socket(served: Running, fake: FakeRuntime) -> None:
    fake.script("RuntimeService/StopContainer", Reply(messages=[b"\x0a\x02ok"], delay=1.5))
    outcome: dict[str, object] = {}

    def in_flight() -> None:
        with grpc.insecure_channel(served.target) as chan:
            try:
                outcome["reply"] = chan.unary_unary("/runtime.v1.RuntimeService/StopContainer")(b"", timeout=10)
            except grpc.RpcError as err:
                outcome["error"] = err

    worker = threading.Thread(target=in_flight)
    worker.start()
    deadline = time.monotonic() + 5
    while not fake.received("RuntimeService/StopContainer"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    served.proc.send_signal(signal.SIGTERM)
    worker.join(10)
    assert outcome.get("reply") == b"\x0a\x02ok", outcome
    assert served.proc.wait(10) == 0
    assert not served.socket.exists()
    assert served.proc.stderr is not None
    log = served.proc.stderr.read()
    assert "draining in-flight calls for up to 5.0 s" in log
    assert f"removed {served.socket}" in log


def test_sigterm_cuts_calls_that_outlast_the_grace_period(fake: FakeRuntime, sockdir: Path) -> None:
    socket = sockdir / "p.sock"
    fake.script("RuntimeService/ExecSync", Reply(hang=True))
    proc = subprocess.Popen([sys.executable, "-m", "criproxy", "serve", "--listen", f"unix://{socket}",
                             "--runtime-endpoint", f"unix://{sockdir}/runtime.sock",
                             "--shutdown-grace-seconds", "0.5", "--metrics-address", "off"],
                            stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        wait_serving(proc, socket)
        with grpc.insecure_channel(f"unix://{socket}") as chan:
            future = chan.unary_unary("/runtime.v1.RuntimeService/ExecSync").future(b"", timeout=30)
            while not fake.received("RuntimeService/ExecSync"):
                time.sleep(0.01)
            began = time.monotonic()
            proc.send_signal(signal.SIGINT)
            assert proc.wait(20) == 0
            assert time.monotonic() - began < 10  # bounded by the grace period, not by the call's 30 s
            with pytest.raises(grpc.RpcError):
                future.result(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_second_serve_on_a_live_socket_refuses_and_leaves_the_first(served: Running, sockdir: Path) -> None:
    inode = os.lstat(served.socket).st_ino
    done = criproxy("serve", "--listen", served.target, "--runtime-endpoint", f"unix://{sockdir}/runtime.sock",
                    "--metrics-address", "off")
    assert done.returncode == 2
    assert "another server is answering on this socket" in done.stderr
    assert os.lstat(served.socket).st_ino == inode
    with grpc.insecure_channel(served.target) as chan:
        assert chan.unary_unary("/runtime.v1.RuntimeService/Version")(b"", timeout=5) == (
            b'\n\x050.1.0\x12\x0cfake-runtime\x1a\x051.2.3"\x02v1')  # the fake's VERSION_REPLY
