"""Prometheus metrics for criproxy, and the HTTP endpoint that serves them with /healthz and /readyz.

Series (all prefixed criproxy_, base units, never a pod name, uid or container id as a label):

| series | type | labels | meaning |
| --- | --- | --- | --- |
| criproxy_calls_total | counter | method, code | CRI calls finished, by gRPC status code |
| criproxy_calls_in_flight | gauge | method | calls being served now |
| criproxy_call_duration_seconds | histogram | method, code | whole call, as the kubelet sees it |
| criproxy_runtime_duration_seconds | histogram | method | time waiting on the runtime |
| criproxy_proxy_duration_seconds | histogram | method | time the proxy added (call minus runtime) |
| criproxy_streams_active | gauge | method | server streams open now |
| criproxy_stream_messages_total | counter | method | messages relayed on server streams |
| criproxy_decisions_total | counter | interceptor, rule, action, setting | interceptor/policy decisions |
| criproxy_policy_reloads_total | counter | result | policy loads: ok or error |
| criproxy_policy_info | gauge | file, digest | 1 for the policy in force |
| criproxy_policy_last_reload_success_timestamp_seconds | gauge | | when a policy last loaded |
| criproxy_runtime_up | gauge | role | 1 when the runtime (or image) endpoint is connected |
| criproxy_runtime_reconnects_total | counter | role | times the endpoint came back |
| criproxy_runtime_cri_api_info | gauge | role, api | 1 for each CRI API the endpoint speaks |

`method` is a version-neutral CRI method ('RuntimeService/Version') or 'other' for paths the
CRI table does not know (their names are chosen by callers: no unbounded label values).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, make_wsgi_app

log = logging.getLogger(__name__)

#: From 0.5 ms (a passthrough call) to 2 minutes (a slow image pull or a hung runtime).
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class PrometheusMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        # The *_created series double every counter's lines and no dashboard here reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry
        r = registry
        self.calls = Counter("criproxy_calls", "CRI calls finished, by gRPC status code", ["method", "code"],
                             registry=r)
        self.in_flight = Gauge("criproxy_calls_in_flight", "CRI calls being served now", ["method"], registry=r)
        self.duration = Histogram("criproxy_call_duration_seconds", "Whole CRI call, as the caller sees it",
                                  ["method", "code"], buckets=BUCKETS, registry=r)
        self.runtime = Histogram("criproxy_runtime_duration_seconds", "Time a call waited on the runtime",
                                 ["method"], buckets=BUCKETS, registry=r)
        self.proxy = Histogram("criproxy_proxy_duration_seconds", "Time the proxy added to a call",
                               ["method"], buckets=BUCKETS, registry=r)
        self.streams = Gauge("criproxy_streams_active", "Server streams open now", ["method"], registry=r)
        self.stream_messages = Counter("criproxy_stream_messages", "Messages relayed on server streams", ["method"],
                                       registry=r)
        self.decisions = Counter("criproxy_decisions", "Interceptor and policy decisions",
                                 ["interceptor", "rule", "action", "setting"], registry=r)
        self.reloads = Counter("criproxy_policy_reloads", "Policy loads by result", ["result"], registry=r)
        self.policy_info = Gauge("criproxy_policy_info", "1 for the policy in force", ["file", "digest"], registry=r)
        self.policy_success = Gauge("criproxy_policy_last_reload_success_timestamp_seconds",
                                    "When a policy last loaded successfully", registry=r)
        self.up = Gauge("criproxy_runtime_up", "1 when the endpoint is connected", ["role"], registry=r)
        self.reconnects = Counter("criproxy_runtime_reconnects", "Times the endpoint came back", ["role"],
                                  registry=r)
        self.api_info = Gauge("criproxy_runtime_cri_api_info", "1 for each CRI API the endpoint speaks",
                              ["role", "api"], registry=r)
        # Children by label values, made once: .labels() costs more than the observation itself.
        self._per_method: dict[str, tuple[Any, Any, Any]] = {}
        self._per_code: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._connected: dict[str, bool] = {}
        self._stream_children: dict[str, Any] = {}

    def _method(self, method: str) -> tuple[Any, Any, Any]:
        children = self._per_method.get(method)
        if children is None:
            children = (self.in_flight.labels(method), self.runtime.labels(method), self.proxy.labels(method))
            self._per_method[method] = children
        return children

    def call_started(self, method: str) -> None:
        self._method(method)[0].inc()

    def call_finished(self, method: str, code: str, seconds: float, runtime_seconds: float) -> None:
        in_flight, runtime, proxy = self._method(method)
        in_flight.dec()
        per_code = self._per_code.get((method, code))
        if per_code is None:
            per_code = self._per_code[(method, code)] = (self.calls.labels(method, code),
                                                         self.duration.labels(method, code))
        per_code[0].inc()
        per_code[1].observe(seconds)
        if runtime_seconds > 0:
            runtime.observe(runtime_seconds)
        proxy.observe(max(0.0, seconds - runtime_seconds))

    def stream_started(self, method: str) -> None:
        self.streams.labels(method).inc()

    def stream_message(self, method: str) -> None:  # once per relayed message: the child is cached
        child = self._stream_children.get(method)
        if child is None:
            child = self._stream_children[method] = self.stream_messages.labels(method)
        child.inc()

    def stream_finished(self, method: str) -> None:
        self.streams.labels(method).dec()

    def decision(self, interceptor: str, rule: str, action: str, setting: str) -> None:
        self.decisions.labels(interceptor, rule, action, setting).inc()

    def policy_loaded(self, ok: bool, identity: str) -> None:
        self.reloads.labels("ok" if ok else "error").inc()
        if ok:
            file, _, digest = identity.rpartition("@")
            self.policy_info.clear()
            self.policy_info.labels(file, digest).set(1)
            self.policy_success.set(time.time())

    def runtime_state(self, role: str, connected: bool) -> None:
        if connected and self._connected.get(role) is False:
            self.reconnects.labels(role).inc()
        self._connected[role] = connected
        self.up.labels(role).set(1 if connected else 0)

    def runtime_api(self, role: str, apis: frozenset[str]) -> None:
        for api in ("v1", "v1alpha2"):
            self.api_info.labels(role, api).set(1 if api in apis else 0)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self) -> None:
        # An upgrade (serve --takeover) starts the new proxy while the old one still holds the port;
        # both may listen on it until the old one exits (Linux allows this to the same user only).
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # one line per scrape would drown the log
        return None


Wsgi = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def health_app(registry: CollectorRegistry, ready: Callable[[], tuple[bool, str]]) -> Wsgi:
    """/metrics (Prometheus text), /healthz (the process answers) and /readyz (`ready()`)."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            ok, why = ready()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [(why + "\n").encode()]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"criproxy serves /metrics, /healthz and /readyz\n"]

    return app


class HttpEndpoint:
    """The metrics and health HTTP server, on its own thread (scrapes never wait on the event loop)."""

    def __init__(self, host: str, port: int, app: Wsgi) -> None:
        self.server = make_server(host, port, app, server_class=_Server, handler_class=_QuietHandler)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> None:
        self.thread.start()
        log.info("metrics and health on http://%s:%d/metrics, /healthz, /readyz", self.server.server_address[0],
                 self.port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
