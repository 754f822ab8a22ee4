"""`criproxy serve`: wire the data plane, the pipeline, the upstreams and the listening socket together, and run."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry

from criproxy import __version__
from criproxy.config import STDERR, ServeConfig
from criproxy.cri.annotations import Lookup
from criproxy.errors import ConfigError
from criproxy.interceptors import build
from criproxy.metrics import Metrics, NoMetrics
from criproxy.metrics.prometheus import HttpEndpoint, PrometheusMetrics, health_app
from criproxy.observe.decisionlog import DecisionLog
from criproxy.observe.logqueue import background_logs
from criproxy.observe.record import Recorder
from criproxy.observe.tracing import observe_call, record_decisions, tracing_from_env
from criproxy.pipeline import DecisionSink, Pipeline, all_of, log_decisions, metrics_sink
from criproxy.pipeline.index import ContainerIndex
from criproxy.policies import Policy
from criproxy.policies.store import PolicyStore
from criproxy.seam import Hooks, NoHooks
from criproxy.supervise import Supervisor
from criproxy.transport.endpoints import WELL_KNOWN_RUNTIME_ENDPOINTS, Endpoint, parse_endpoint
from criproxy.transport.plane import NativePlane, PlaneSettings
from criproxy.transport.sdnotify import notify
from criproxy.transport.sockets import prepare_listen_path, probe_socket, publish, remove_if_ours, temporary_path
from criproxy.transport.tuning import release_start_up_memory
from criproxy.transport.upstream import Upstream, call_typed

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from criproxy.observe.tracing_sdk import Tracing

log = logging.getLogger(__name__)


#: How often a running proxy checks whether a successor took its socket path over.
SUCCESSOR_POLL_S = 1.0


#: Every caller connection is asked (HTTP/2 GOAWAY, gracefully: calls in flight finish, long streams
#: go on) to reconnect after this long. Reconnecting to the socket path is how callers move to a
#: successor after an upgrade without a call failing: stopping a gRPC server instead cancels calls
#: that race its shutdown.
CONNECTION_AGE_S = 10.0
#: gRPC spreads connection ages by up to 10% either way.
CONNECTION_AGE_JITTER = 0.1


def find_runtime_endpoint(listen: Endpoint) -> Endpoint:
    """The first well-known runtime socket that accepts a connection (never the proxy's own)."""
    tried = []
    for url in WELL_KNOWN_RUNTIME_ENDPOINTS:
        endpoint = parse_endpoint(url, what="well-known runtime endpoint")
        if endpoint.path == listen.path:
            continue
        tried.append(url)
        if probe_socket(endpoint.path):
            log.info("no --runtime-endpoint given; using %s, the first well-known runtime socket that answers", url)
            return endpoint
    raise ConfigError(
        f"no --runtime-endpoint given and none of the well-known runtime sockets answers ({', '.join(tried)}); "
        "start the runtime or pass --runtime-endpoint"
    )


@dataclass
class Proxy:
    """A running proxy: its gRPC server, upstreams and socket. Made by start_proxy, ended by stop()."""

    config: ServeConfig
    plane: NativePlane
    runtime: Upstream
    image: Upstream
    socket_inode: int
    pipeline: Pipeline | None = None
    policies: PolicyStore | None = None
    observability: Observability | None = None

    async def stop(self, grace: float | None = None) -> bool:
        """Refuse new calls, let in-flight ones finish for `grace` seconds, then close everything.
        True when the socket was removed (False: a successor owns the path now)."""
        grace = self.config.shutdown_grace_seconds if grace is None else grace
        if self.policies is not None:
            await self.policies.stop()
        # Unlink first: a new proxy (or the kubelet's reconnect) must not find a socket nobody serves.
        removed = remove_if_ours(self.config.listen.path, self.socket_inode)
        await self.plane.stop(grace)
        await self.runtime.close()
        if self.image is not self.runtime:
            await self.image.close()
        if self.observability is not None:
            self.observability.close()
        return removed


def build_pipeline(config: ServeConfig, runtime: Upstream) -> Pipeline | None:
    """The configured interceptors as the relay's hooks; None when none are enabled (a pure proxy)."""
    if not config.interceptors:
        return None

    async def caller(key: str, request: Message) -> Any:
        return await call_typed(runtime, key, request)

    lookup = Lookup(config.annotation_domain)
    return Pipeline(build(config.interceptors, lookup), lookup=lookup,
                    index=ContainerIndex(config.container_cache_size), caller=caller)


def load_policies(config: ServeConfig, pipeline: Pipeline | None) -> PolicyStore | None:
    """The policy store for --policies, applying each version to the pipeline; None without a file."""
    if config.policies is None:
        return None
    if pipeline is None:
        log.warning("--policies %s given, but no interceptor is enabled: the policy has nothing to govern",
                    config.policies)

    def apply(policy: Policy) -> None:
        if pipeline is not None:
            pipeline.policy = policy

    return PolicyStore(config.policies, Lookup(config.annotation_domain), apply)


@dataclass
class Observability:
    """Metrics, traces, the decision log and the health endpoint of one proxy."""

    metrics: Metrics
    tracing: Tracing | None = None
    decision_log: DecisionLog | None = None
    http: HttpEndpoint | None = None
    #: The recording (--record): every decided call, for `criproxy replay`.
    recorder: Recorder | None = None
    #: Runs the background tasks (runtime watchers, policy watcher and reloader); /readyz names failing ones.
    supervisor: Supervisor = field(default_factory=Supervisor)

    def close(self) -> None:
        if self.http is not None:
            self.http.stop()
        if self.tracing is not None:
            self.tracing.shutdown()
        if self.decision_log is not None:
            self.decision_log.close()
        if self.recorder is not None:
            self.recorder.close()


def build_observability(config: ServeConfig, registry: CollectorRegistry | None,
                        span_exporter: SpanExporter | None) -> Observability:
    tracing = tracing_from_env(os.environ, span_exporter)
    decision_log = None
    if config.decision_log is not None:
        path = None if config.decision_log == STDERR else config.decision_log
        try:
            decision_log = DecisionLog(path, max_bytes=config.decision_log_max_bytes)
        except OSError as err:
            raise ConfigError(f"--decision-log {config.decision_log}: cannot open it: {err.strerror}") from None
    recorder = None
    if config.record is not None:
        try:
            recorder = Recorder(config.record, node=config.node_name or socket.gethostname(),
                                domain=config.annotation_domain, max_bytes=config.record_max_bytes)
        except OSError as err:
            if decision_log is not None:
                decision_log.close()
            raise ConfigError(f"--record {config.record}: cannot open it: {err.strerror}") from None
    metrics: Metrics = NoMetrics()
    if config.metrics_address is not None or registry is not None:
        metrics = PrometheusMetrics(registry if registry is not None else CollectorRegistry())
    # Log records dropped because their writer fell behind (criproxy.observe.logqueue) are counted.
    for background in background_logs(logging.getLogger()):
        background.on_drop = metrics.log_records_dropped
    if decision_log is not None:
        decision_log.on_drop = metrics.log_records_dropped
    if recorder is not None:
        recorder.on_drop = metrics.record_dropped
    return Observability(metrics, tracing, decision_log, recorder=recorder,
                         supervisor=Supervisor(metrics.background_task_failed))


def start_http(config: ServeConfig, obs: Observability, ready: Callable[[], tuple[bool, str]]) -> None:
    if config.metrics_address is None or not isinstance(obs.metrics, PrometheusMetrics):
        return
    host, port = config.metrics_address

    def checked() -> tuple[bool, str]:
        failing = obs.supervisor.failing()
        if failing:
            return False, "background task failing: " + "; ".join(f"{name}: {why}" for name, why in failing.items())
        return ready()

    try:
        # The port is shared only with the proxy being taken over (--takeover); otherwise in use is an error.
        obs.http = HttpEndpoint(host, port, health_app(obs.metrics.registry, checked), share=config.takeover)
    except OSError as err:
        raise ConfigError(f"--metrics-address {host}:{port}: cannot listen: {err.strerror}") from None
    obs.http.start()


def wire_pipeline(pipeline: Pipeline, obs: Observability, policies: PolicyStore | None) -> None:
    """Send the pipeline's decisions to the log, the decision log, metrics and traces, and every decided call to
    the recording."""
    sinks: list[DecisionSink] = [log_decisions, metrics_sink(obs.metrics)]
    if obs.decision_log is not None:
        if policies is not None:
            obs.decision_log.policy = lambda: policies.current.identity
        sinks.append(obs.decision_log)
    if obs.tracing is not None:
        sinks.append(record_decisions)
        pipeline.on_context = observe_call
    pipeline.on_decisions = all_of(*sinks)
    if obs.recorder is not None:
        pipeline.on_decided = obs.recorder
    if policies is not None:
        obs.metrics.policy_loaded(True, policies.current.identity)
        policies.listeners.append(obs.metrics.policy_loaded)


def build_upstreams(config: ServeConfig, runtime_endpoint: Endpoint) -> tuple[Upstream, Upstream]:
    runtime = Upstream(runtime_endpoint, max_message_bytes=config.max_message_bytes, role="runtime")
    if config.image_endpoint is None or config.image_endpoint.path == runtime_endpoint.path:
        return runtime, runtime
    return runtime, Upstream(config.image_endpoint, max_message_bytes=config.max_message_bytes, role="image")


async def connect(runtime: Upstream, image: Upstream, pipeline: Pipeline | None, metrics: Metrics,
                  plane: NativePlane, *, supervisor: Supervisor | None = None) -> None:
    """Learn the runtime now, and again on every reconnect (API versions, handlers, the index), and
    tell the data plane which APIs to route callers to. The watchers run under `supervisor`; a runtime
    that does not answer is said so now, and again every NOT_ANSWERING_REPEAT_S until it does."""
    def on_state(upstream: Upstream, state: grpc.ChannelConnectivity) -> None:
        metrics.runtime_state(upstream.role, state == grpc.ChannelConnectivity.READY)

    def routes() -> None:
        plane.set_apis(runtime.apis, image.apis)

    async def on_connect() -> None:
        if await runtime.detect_api() is not None:
            metrics.runtime_api(runtime.role, runtime.apis)
            routes()
            if pipeline is not None:
                await pipeline.refresh()

    async def on_image_connect() -> None:
        await image.detect_image_api()
        routes()

    runtime.on_state_change = image.on_state_change = on_state
    await on_connect()
    metrics.runtime_state(runtime.role, runtime.is_connected())
    runtime.start_watching(on_connect, supervisor)
    if image is not runtime:
        await on_image_connect()
        image.start_watching(on_image_connect, supervisor)


async def start_proxy(config: ServeConfig, hooks: Hooks | None = None, *, registry: CollectorRegistry | None = None,
                      span_exporter: SpanExporter | None = None) -> Proxy:
    """Connect to the runtime, bind the socket and start serving; raises ConfigError on bad setup
    (having released whatever it had opened).

    `hooks` replaces the pipeline built from the configured interceptors; `registry` and
    `span_exporter` replace the Prometheus registry and the OTEL_* exporter (tests use them)."""
    runtime_endpoint = config.runtime_endpoint or find_runtime_endpoint(config.listen)
    if runtime_endpoint.path == config.listen.path:
        raise ConfigError(f"--runtime-endpoint {runtime_endpoint} is the proxy's own --listen socket")
    if prepare_listen_path(config.listen.path, takeover=config.takeover):
        log.info("--takeover: a running server answers on %s; its socket will be replaced by this process's",
                 config.listen)
    obs = build_observability(config, registry, span_exporter)
    runtime, image = build_upstreams(config, runtime_endpoint)
    try:
        return await _start(config, hooks, obs, runtime, image)
    except BaseException:
        obs.close()
        await runtime.close()
        if image is not runtime:
            await image.close()
        raise


async def _start(config: ServeConfig, hooks: Hooks | None, obs: Observability, runtime: Upstream,
                 image: Upstream) -> Proxy:
    pipeline = build_pipeline(config, runtime) if hooks is None else None
    policies = load_policies(config, pipeline)
    if pipeline is not None:
        wire_pipeline(pipeline, obs, policies)

    def ready() -> tuple[bool, str]:
        if not runtime.is_connected():
            return False, f"runtime endpoint {runtime.endpoint} is not connected"
        return True, f"ready: runtime {runtime.endpoint}, policy {policies.current.identity if policies else 'none'}"

    start_http(config, obs, ready)
    chosen: Hooks = hooks if hooks is not None else pipeline if pipeline is not None else NoHooks()
    plane = NativePlane(PlaneSettings(
        runtime_endpoint=f"unix://{runtime.endpoint.path}", image_endpoint=f"unix://{image.endpoint.path}",
        max_message_bytes=config.max_message_bytes, max_concurrent_calls=config.max_concurrent_calls,
        connection_age_seconds=CONNECTION_AGE_S), chosen, obs.metrics, obs.tracing)
    if isinstance(obs.metrics, PrometheusMetrics):
        obs.metrics.count_calls(plane.native.snapshot)
    temp = temporary_path(config.listen.path)
    try:
        plane.start(temp)
    except OSError as err:
        raise ConfigError(f"--listen {config.listen}: cannot bind a socket in {os.path.dirname(temp)}: {err}") from None
    inode = publish(temp, config.listen.path, config.socket_mode, config.socket_group)
    # Serving from here on: tell systemd now (under an upgrade it must learn the new main pid before
    # the old process, which sees the rename, exits), not after the runtime answered.
    notify(f"MAINPID={os.getpid()}", "READY=1", f"STATUS=criproxy {__version__} serving {config.listen}")
    try:
        await connect(runtime, image, pipeline, obs.metrics, plane, supervisor=obs.supervisor)
    except BaseException:
        await plane.stop(0)
        raise
    # Say only what was learned: before the runtime answered, which CRI API it speaks is unknown.
    apis = f"CRI {' and '.join(sorted(runtime.apis))}" if runtime.learned else "its CRI API not known yet"
    log.info("criproxy %s serving %s -> runtime %s (%s), images %s; interceptors: %s", __version__,
             config.listen, runtime.endpoint, apis, image.endpoint,
             ", ".join(i.name for i in pipeline.interceptors) if pipeline is not None else "none")
    if policies is not None:
        policies.start_watching(obs.supervisor)
    return Proxy(config=config, plane=plane, runtime=runtime, image=image, socket_inode=inode,
                 pipeline=pipeline, policies=policies, observability=obs)


async def serve(config: ServeConfig, hooks: Hooks | None = None) -> None:
    """Serve until SIGTERM or SIGINT, or until a successor takes the socket over (--takeover); then
    drain for the grace period and remove the socket (unless it is the successor's)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Before start_proxy, which tells systemd READY=1: a SIGTERM right after it (`systemctl stop` as
    # soon as `start` returned) must drain and remove the socket too, not end the process by default.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        proxy = await start_proxy(config, hooks)
    except BaseException:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        raise
    log.debug("%s", release_start_up_memory())
    if proxy.policies is not None:
        loop.add_signal_handler(signal.SIGHUP, proxy.policies.reload_soon, "SIGHUP")
    watcher = loop.create_task(watch_for_successor(config.listen.path, proxy.socket_inode, stop))
    try:
        await stop.wait()
        log.info("stopping: draining in-flight calls for up to %.1f s", config.shutdown_grace_seconds)
        if not watcher.done() or not watcher.result():
            notify("STOPPING=1")  # not on a handover: systemd follows the successor, the service goes on
    finally:
        watcher.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        removed = await proxy.stop()
    log.info("stopped; %s", f"removed {config.listen.path}" if removed else
             f"left {config.listen.path} to the process that took it over")


async def watch_for_successor(path: str, inode: int, stop: asyncio.Event) -> bool:
    """Set `stop` (and return True) when the socket path names another socket: a newer criproxy took
    it over."""
    while not stop.is_set():
        await asyncio.sleep(SUCCESSOR_POLL_S)
        try:
            current = os.lstat(path).st_ino
        except FileNotFoundError:
            continue  # removed by hand: keep serving the connections we have; systemd decides
        if current != inode:
            # New connections reach the successor already; the callers connected here move over as
            # their connections reach CONNECTION_AGE_S. Serve them until then, then stop.
            wait = CONNECTION_AGE_S * (1 + CONNECTION_AGE_JITTER) + 1
            log.info("%s was taken over by a newer criproxy; handing over: callers move as their connections "
                     "age, stopping in %.0f s", path, wait)
            await asyncio.sleep(wait)
            stop.set()
            return True
    return False
