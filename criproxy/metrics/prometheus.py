"""Prometheus metrics for criproxy, and the HTTP endpoint that serves them with /healthz and /readyz.

Series (all prefixed criproxy_, base units, never a pod name, uid or container id as a label; the
per-call ones, calls to stream messages, are counted by the data plane: criproxy.metrics.native):

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
| criproxy_log_records_dropped_total | counter | log | log lines dropped (main, decisions): the writer fell behind |
| criproxy_background_task_failures_total | counter | task | unexpected failures of a background task (restarted) |
| criproxy_record_dropped_total | counter | | recording lines dropped (serve --record): queue full, file unwritable |
| criproxy_internal_errors_total | counter | where | failures inside the proxy (after: observing a sent answer) |

`method` is a version-neutral CRI method ('RuntimeService/Version') or 'other' for paths the
CRI table does not know (their names are chosen by callers: no unbounded label values).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, make_wsgi_app

from criproxy.metrics.native import NativeCallCollector

log = logging.getLogger(__name__)

class PrometheusMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        # The *_created series double every counter's lines and no dashboard here reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry
        r = registry
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
        self.log_drops = Counter("criproxy_log_records_dropped", "Log records dropped: their writer fell behind",
                                 ["log"], registry=r)
        for log_name in ("main", "decisions"):
            self.log_drops.labels(log_name)
        self.task_failures = Counter("criproxy_background_task_failures",
                                     "Unexpected failures of a supervised background task", ["task"], registry=r)
        self.record_drops = Counter("criproxy_record_dropped", "Recording lines dropped (serve --record): the queue "
                                    "was full or the file could not be written", registry=r)
        self.internal_errors = Counter("criproxy_internal_errors", "Failures inside the proxy, by where they "
                                       "happened (after: observing an answer the caller already has)", ["where"],
                                       registry=r)
        self._connected: dict[str, bool] = {}
        self._decision_series: dict[tuple[str, str, str, str], Any] = {}

    def count_calls(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        """Serve the data plane's per-call series (criproxy.metrics.native) from this registry."""
        self.registry.register(NativeCallCollector(snapshot))

    def internal_error(self, where: str) -> None:
        self.internal_errors.labels(where).inc()

    def decision(self, interceptor: str, rule: str, action: str, setting: str) -> None:
        # Every intercepted call counts a few decisions: the series' children are kept by their
        # labels (the same set Counter keeps), which skips labels()'s checks and lock on each.
        key = (interceptor, rule, action, setting)
        child = self._decision_series.get(key)
        if child is None:
            child = self._decision_series[key] = self.decisions.labels(*key)
        child.inc()

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

    def log_records_dropped(self, log: str, count: int) -> None:
        self.log_drops.labels(log).inc(count)

    def background_task_failed(self, task: str) -> None:
        self.task_failures.labels(task).inc()

    def record_dropped(self, count: int) -> None:
        self.record_drops.inc(count)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self) -> None:
        # An upgrade (serve --takeover) starts the new proxy while the old one still holds the port;
        # both listen on it until the old one exits (Linux allows this to the same user only, and only
        # when both sockets have SO_REUSEPORT: so every proxy's socket has it). Who may share is decided
        # before the bind (HttpEndpoint): only a --takeover successor.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def refuse_if_in_use(host: str, port: int) -> None:
    """OSError (EADDRINUSE) when something listens on host:port: a bind without SO_REUSEPORT conflicts
    with every listener, a criproxy's included."""
    if port == 0:
        return
    with socket.socket(_Server.address_family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed connection's TIME_WAIT is no user
        probe.bind((host, port))


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
    """The metrics and health HTTP server, on its own thread (scrapes never wait on the event loop).

    The port is shared with another listener only when `share` (serve --takeover: the proxy being
    replaced still holds it); otherwise a port in use is an OSError. stop() returns at once: it wakes
    the accept loop by shutting the listening socket down (no poll interval to wait out) and frees the
    port; requests already accepted finish on their own threads."""

    #: The accept loop's poll interval: only a backstop, stop() wakes it at once. Each poll wakes the
    #: thread and takes the GIL: at 0.05 s that was 20 wake-ups and 2.3 ms of CPU a second, over half
    #: of an idle proxy's CPU (4.1 ms/s measured; about 1.8 ms/s now, most of it gRPC's own threads).
    POLL_S = 5.0

    def __init__(self, host: str, port: int, app: Wsgi, *, share: bool = False) -> None:
        if not share:
            refuse_if_in_use(host, port)
        self.server = make_server(host, port, app, server_class=_Server, handler_class=_QuietHandler)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, args=(self.POLL_S,), name="metrics-http",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()
        log.info("metrics and health on http://%s:%d/metrics, /healthz, /readyz", self.server.server_address[0],
                 self.port)

    def stop(self) -> None:
        if self.thread.is_alive():
            with contextlib.suppress(OSError):
                self.server.socket.shutdown(socket.SHUT_RDWR)  # wakes the select() in serve_forever now
            self.server.shutdown()
        self.server.server_close()
