"""`criproxy serve` as a real child process, run from the repository's root. One copy serves the
tests and `criproxy demo`: criproxy/demo/proxyproc.py."""

from __future__ import annotations

from pathlib import Path

from criproxy.demo import proxyproc
from criproxy.demo.proxyproc import wait_serving

ROOT = Path(__file__).resolve().parent.parent.parent

__all__ = ["ROOT", "ProxyProcess", "wait_serving"]


class ProxyProcess(proxyproc.ProxyProcess):
    """criproxy.demo.proxyproc.ProxyProcess started in the repository's root (relative paths in ARGS work)."""

    def __init__(self, socket: Path, *args: str, log: Path | None = None, cwd: Path | None = ROOT) -> None:
        super().__init__(socket, *args, log=log, cwd=cwd)
