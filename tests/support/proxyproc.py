"""`criproxy serve` as a real child process, the way a node runs it."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import grpc

ROOT = Path(__file__).resolve().parent.parent.parent


def wait_serving(proc: subprocess.Popen[str], socket: Path, timeout: float = 20) -> None:
    """Wait (bounded) until the proxy at `socket` answers Version; fail with its stderr if it died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"criproxy exited with {proc.returncode}: {err}")
        if socket.exists():
            with grpc.insecure_channel(f"unix://{socket}") as chan:
                try:
                    chan.unary_unary("/runtime.v1.RuntimeService/Version")(b"", timeout=2)
                    return
                except grpc.RpcError:
                    pass
        time.sleep(0.05)
    raise AssertionError(f"criproxy did not start serving on {socket} within {timeout:.0f}s")


class ProxyProcess:
    """Runs `python -m criproxy serve --listen unix://SOCKET ARGS...` until stopped (SIGTERM, then SIGKILL)."""

    def __init__(self, socket: Path, *args: str, log: Path | None = None) -> None:
        self.socket = socket
        self.endpoint = f"unix://{socket}"
        self.args = args
        self.log = log
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> ProxyProcess:
        stderr = self.log.open("a") if self.log is not None else subprocess.PIPE
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "criproxy", "serve", "--listen", self.endpoint, *self.args,
             *(() if "--metrics-address" in self.args else ("--metrics-address", "127.0.0.1:0"))],
            stderr=stderr, text=True, cwd=ROOT)
        try:
            wait_serving(self.proc, self.socket)
        except BaseException:
            self.stop()
            raise
        return self

    def metrics_url(self, timeout: float = 10) -> str:
        """The /metrics URL the proxy logged at start (it listens on an ephemeral port in tests)."""
        assert self.log is not None, "metrics_url needs a log file"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"metrics and health on (http://\S+/metrics)", self.log.read_text())
            if match:
                return match.group(1)
            time.sleep(0.05)
        raise AssertionError(f"no metrics address in {self.log}")

    def stop(self, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self.proc.stderr:
            self.proc.stderr.close()
        return self.proc.returncode

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
