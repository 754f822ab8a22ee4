"""What the proxy reports about itself, behind one small interface with a no-op default.

The core (relay, pipeline, upstream, policy store) calls these methods; it never imports a
metrics library. `criproxy serve` passes a PrometheusMetrics (criproxy.metrics.prometheus)
when --metrics-address is set; tests can pass their own recorder.
"""

from __future__ import annotations

from typing import Protocol


class Metrics(Protocol):
    def call_started(self, method: str) -> None:
        """A call of `method` (a version-neutral key such as 'RuntimeService/Version', or 'other') began."""

    def call_finished(self, method: str, code: str, seconds: float, runtime_seconds: float) -> None:
        """It ended with gRPC status `code` after `seconds`, of which `runtime_seconds` waiting on the runtime."""

    def stream_started(self, method: str) -> None: ...

    def stream_message(self, method: str) -> None: ...

    def stream_finished(self, method: str) -> None: ...

    def decision(self, interceptor: str, rule: str, action: str, setting: str) -> None: ...

    def policy_loaded(self, ok: bool, identity: str) -> None:
        """A policy (re)load ended; `identity` is 'file@digest' when ok, else the error."""

    def runtime_state(self, role: str, connected: bool) -> None: ...

    def runtime_api(self, role: str, apis: frozenset[str]) -> None: ...


class NoMetrics:
    """Reports nothing, costs (almost) nothing."""

    def call_started(self, method: str) -> None:
        return None

    def call_finished(self, method: str, code: str, seconds: float, runtime_seconds: float) -> None:
        return None

    def stream_started(self, method: str) -> None:
        return None

    def stream_message(self, method: str) -> None:
        return None

    def stream_finished(self, method: str) -> None:
        return None

    def decision(self, interceptor: str, rule: str, action: str, setting: str) -> None:
        return None

    def policy_loaded(self, ok: bool, identity: str) -> None:
        return None

    def runtime_state(self, role: str, connected: bool) -> None:
        return None

    def runtime_api(self, role: str, apis: frozenset[str]) -> None:
        return None
