"""What the proxy reports about itself, behind one small interface with a no-op default.

The core (the transport's seam, pipeline, upstream, policy store) calls these methods; it never
imports a metrics library. Per-call series are counted by the data plane itself (lock-free, in
Rust) and served by criproxy.metrics.native. `criproxy serve` passes a PrometheusMetrics (criproxy.metrics.prometheus)
when --metrics-address is set; tests can pass their own recorder.
"""

from __future__ import annotations

from typing import Protocol


class Metrics(Protocol):
    def decision(self, interceptor: str, rule: str, action: str, setting: str) -> None: ...

    def policy_loaded(self, ok: bool, identity: str) -> None:
        """A policy (re)load ended; `identity` is 'file@digest' when ok, else the error."""

    def runtime_state(self, role: str, connected: bool) -> None: ...

    def runtime_api(self, role: str, apis: frozenset[str]) -> None: ...

    def log_records_dropped(self, log: str, count: int) -> None:
        """`count` more records of `log` ('main' or 'decisions') were dropped: its writer fell behind."""

    def background_task_failed(self, task: str) -> None:
        """The supervised background task `task` failed (and is being restarted)."""

    def record_dropped(self, count: int) -> None:
        """`count` more lines of the recording (serve --record) were dropped: its queue was full or the file
        could not be written."""

    def internal_error(self, where: str) -> None:
        """Something failed inside the proxy at `where` (e.g. 'after': observing an answer)."""


class NoMetrics:
    """Reports nothing, costs (almost) nothing."""

    def decision(self, interceptor: str, rule: str, action: str, setting: str) -> None:
        return None

    def policy_loaded(self, ok: bool, identity: str) -> None:
        return None

    def runtime_state(self, role: str, connected: bool) -> None:
        return None

    def runtime_api(self, role: str, apis: frozenset[str]) -> None:
        return None

    def log_records_dropped(self, log: str, count: int) -> None:
        return None

    def background_task_failed(self, task: str) -> None:
        return None

    def record_dropped(self, count: int) -> None:
        return None

    def internal_error(self, where: str) -> None:
        return None
