"""How `criproxy demo` words what happened: adjustments, the kubelet's view of a denial, metrics."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import grpc

from criproxy.explain import shown

Mi = 1 << 20
#: The /metrics series the demo quotes, in this order (a few lines, not the whole scrape).
METRIC_SERIES = ("criproxy_calls_total", "criproxy_decisions_total", "criproxy_proxy_duration_seconds_sum",
                 "criproxy_policy_info", "criproxy_runtime_up")
_METHODS = ("RunPodSandbox", "CreateContainer")


def go_code(code: grpc.StatusCode) -> str:
    """The code's name as Go's grpc prints it, which is what the kubelet's messages show: PermissionDenied."""
    if code is grpc.StatusCode.OK:
        return "OK"
    if code is grpc.StatusCode.CANCELLED:
        return "Canceled"
    return "".join(part.capitalize() for part in code.name.split("_"))


def kubelet_event(method: str, code: grpc.StatusCode, details: str) -> str:
    """The pod's event as `kubectl describe pod` shows it when the runtime (here: the proxy) fails ``method``.

    The kubelet words a failed RunPodSandbox as "Failed to create pod sandbox: " and the gRPC error
    as Go prints it; a failed CreateContainer as "Error: " and the status message."""
    if method == "RunPodSandbox":
        return f"Warning  FailedCreatePodSandBox  kubelet  Failed to create pod sandbox: rpc error: " \
               f"code = {go_code(code)} desc = {details}"
    return f"Warning  Failed  kubelet  Error: {details}"


def size(value: Any) -> str:
    """A byte count as the annotation would write it, when it is a whole number of MiB."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0 and value % Mi == 0:
        return f"{value} ({value // Mi}Mi)"
    return repr(value)


def _value(field: str, value: Any) -> str:
    if "memory" in field or "hugepage" in field:
        return size(value)
    return shown(value) if value is not None else "(unset)"


def applied_lines(entries: Iterable[Mapping[str, Any]]) -> list[str]:
    """One line per entry of criproxy.io/applied: field, was -> value, who and from which annotation."""
    lines = []
    for entry in entries:
        field = str(entry.get("field", "?"))
        source = f"from {entry['key']}" if entry.get("key") else "from criproxy's configuration"
        lines.append(f"{field}: {_value(field, entry.get('was'))} -> {_value(field, entry.get('value'))}  "
                     f"({entry.get('by', '?')}, {source})")
    return lines


def metrics_excerpt(text: str, limit: int = 12) -> list[str]:
    """A few lines of a /metrics scrape: the pod calls, the decisions, the time the proxy added, the policy."""
    chosen: list[str] = []
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    for series in METRIC_SERIES:
        for line in samples:
            name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line)
            if name is None or name.group(0) != series:
                continue
            if series in ("criproxy_calls_total", "criproxy_proxy_duration_seconds_sum") and not any(
                    f"/{method}\"" in line for method in _METHODS):
                continue
            chosen.append(line)
    return chosen[:limit]
