"""`criproxy serve` as a real child process, the way a node runs it (`criproxy demo`, the tests)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO

import grpc

LOG_TAIL_LINES = 40


def wait_serving(proc: subprocess.Popen[str], socket: Path, timeout: float = 20, log: Path | None = None) -> None:
    """Wait (bounded) until the proxy at `socket` answers Version; fail with its stderr (or log) if it died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else _tail(log) if log is not None else ""
            raise AssertionError(f"criproxy exited with {proc.returncode}: {err}")
        if socket.exists():
            with grpc.insecure_channel(f"unix://{socket}") as chan:
                try:
                    chan.unary_unary("/runtime.v1.RuntimeService/Version", request_serializer=bytes,
                                     response_deserializer=bytes)(b"", timeout=2)
                    return
                except grpc.RpcError:
                    pass
        time.sleep(0.05)
    raise AssertionError(f"criproxy did not start serving on {socket} within {timeout:.0f}s")


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"(log {path} unreadable: {error})"


class ProxyProcess:
    """Runs `python -m criproxy serve --listen unix://SOCKET ARGS...` until stopped (SIGTERM, then SIGKILL).

    The metrics endpoint listens on an ephemeral port unless ARGS name --metrics-address."""

    def __init__(self, socket: Path, *args: str, log: Path | None = None, cwd: Path | None = None,
                 start_timeout: float = 20) -> None:
        self.socket = socket
        self.endpoint = f"unix://{socket}"
        self.args = args
        self.log = log
        self.cwd = cwd
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[str] | None = None

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "criproxy", "serve", "--listen", self.endpoint, *self.args,
                *(() if "--metrics-address" in self.args else ("--metrics-address", "127.0.0.1:0"))]

    def start(self) -> ProxyProcess:
        stderr: IO[str] | int = self.log.open("a") if self.log is not None else subprocess.PIPE
        try:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stderr=stderr, text=True,
                                         cwd=self.cwd, start_new_session=True)
        finally:
            if not isinstance(stderr, int):
                stderr.close()  # the child has its own copy
        try:
            wait_serving(self.proc, self.socket, self.start_timeout, self.log)
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return _tail(self.log, lines) if self.log is not None else "(no log file)"

    def _logged(self, pattern: str, what: str, timeout: float) -> str:
        assert self.log is not None, f"{what} needs a log file"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log.read_text())
            if match:
                return match.group(1)
            time.sleep(0.05)
        raise AssertionError(f"no {what} in {self.log}")

    def metrics_url(self, timeout: float = 10) -> str:
        """The /metrics URL the proxy logged at start (it listens on an ephemeral port by default)."""
        return self._logged(r"metrics and health on (http://\S+/metrics)", "metrics address", timeout)

    def policy_identity(self, timeout: float = 10) -> str:
        """The `file@digest` of the policy the proxy logged as in force."""
        return self._logged(r"policy (\S+@[0-9a-f]+) in force", "policy in force", timeout)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

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
