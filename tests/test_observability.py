"""Metrics over HTTP, traces that join the caller's, the decision log, health, and no leaked credentials."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from criproxy.api.runtime.v1 import api_pb2
from criproxy.config import ServeConfig, build_config
from criproxy.server import Proxy, start_proxy
from tests.conftest import config_with
from tests.support.fakeruntime import FakeRuntime, Reply
from tests.support.loopthread import LoopThread
from tests.support.waiting import eventually

ROOT = Path(__file__).resolve().parent.parent
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
SECRET = "s3cr3t-Planted-Cr3dential-9f2c"


@pytest.fixture
def observed(loop: LoopThread, fake: FakeRuntime, proxy_config: ServeConfig,
             sockdir: Path) -> Iterator[tuple[Proxy, InMemorySpanExporter, Path]]:
    exporter = InMemorySpanExporter()
    log_file = sockdir / "decisions.jsonl"
    config = build_config({"listen": proxy_config.listen.url, "runtime-endpoint": f"unix://{sockdir}/runtime.sock",
                           "metrics-address": "127.0.0.1:0", "decision-log": str(log_file)}, None)
    proxy = loop.run(start_proxy(config, registry=CollectorRegistry(), span_exporter=exporter))
    fake.journal.clear()
    yield proxy, exporter, log_file
    loop.run(proxy.stop(0))


def http_get(proxy: Proxy, path: str) -> tuple[int, str]:
    assert proxy.observability is not None and proxy.observability.http is not None
    url = f"http://127.0.0.1:{proxy.observability.http.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text format (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{re.escape(name)}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == want:
            return float(match.group(2))
    return 0.0


def exported_spans(proxy: Proxy, exporter: InMemorySpanExporter, count: int = 1) -> tuple[ReadableSpan, ...]:
    """The spans exported once `count` arrived: the data plane queues a finished call's span and
    the exporter thread takes it from there, so it lands just after the call returns."""
    assert proxy.observability is not None and proxy.observability.tracing is not None
    tracing = proxy.observability.tracing

    def arrived() -> bool:
        tracing.provider.force_flush()
        return len(exporter.get_finished_spans()) >= count

    eventually(arrived, f"{count} span(s) exported")
    return tuple(exporter.get_finished_spans())


def test_metrics_count_calls_by_method_and_code(observed: tuple[Proxy, InMemorySpanExporter, Path],
                                                fake: FakeRuntime) -> None:
    proxy = observed[0]
    fake.script("RuntimeService/ContainerStatus", Reply(code=grpc.StatusCode.NOT_FOUND, details="gone"))
    fake.script("ImageService/StreamImages", Reply(messages=[b"a", b"b", b"c"]))
    with grpc.insecure_channel(proxy.config.listen.target) as chan:
        for _ in range(3):
            chan.unary_unary("/runtime.v1.RuntimeService/Version")(b"", timeout=5)
        with pytest.raises(grpc.RpcError):
            chan.unary_unary("/runtime.v1.RuntimeService/ContainerStatus")(b"", timeout=5)
        assert len(list(chan.unary_stream("/runtime.v1.ImageService/StreamImages")(b"", timeout=5))) == 3
        fake.add_path("/runtime.v1.RuntimeService/Brand_New_Method", "unary")
        chan.unary_unary("/runtime.v1.RuntimeService/Brand_New_Method")(b"", timeout=5)
    status, text = http_get(proxy, "/metrics")
    assert status == 200
    version = {"method": "RuntimeService/Version", "code": "OK"}
    assert sample(text, "criproxy_calls_total", **version) == 3
    assert sample(text, "criproxy_call_duration_seconds_count", **version) == 3
    assert sample(text, "criproxy_calls_total", method="RuntimeService/ContainerStatus", code="NOT_FOUND") == 1
    assert sample(text, "criproxy_calls_total", method="ImageService/StreamImages", code="OK") == 1
    assert sample(text, "criproxy_stream_messages_total", method="ImageService/StreamImages") == 3
    assert sample(text, "criproxy_streams_active", method="ImageService/StreamImages") == 0
    assert sample(text, "criproxy_calls_total", method="other", code="OK") == 1
    assert "Brand_New_Method" not in text  # callers' method names never become label values
    assert sample(text, "criproxy_calls_in_flight", method="RuntimeService/Version") == 0
    runtime = sample(text, "criproxy_runtime_duration_seconds_sum", method="RuntimeService/Version")
    added = sample(text, "criproxy_proxy_duration_seconds_sum", method="RuntimeService/Version")
    total = sample(text, "criproxy_call_duration_seconds_sum", **version)
    assert runtime > 0 and added > 0
    assert abs(runtime + added - total) < 1e-6
    assert sample(text, "criproxy_runtime_up", role="runtime") == 1
    assert sample(text, "criproxy_runtime_cri_api_info", role="runtime", api="v1") == 1


def test_health_and_readiness(observed: tuple[Proxy, InMemorySpanExporter, Path], fake: FakeRuntime,
                              loop: LoopThread) -> None:
    proxy = observed[0]
    assert http_get(proxy, "/healthz") == (200, "ok\n")
    status, text = http_get(proxy, "/readyz")
    assert status == 200 and text.startswith("ready: runtime unix://")
    loop.run(fake.stop())
    deadline = time.monotonic() + 5
    while http_get(proxy, "/readyz")[0] != 503:
        assert time.monotonic() < deadline, "/readyz still says ready with the runtime gone"
        time.sleep(0.05)
    assert http_get(proxy, "/readyz")[1].endswith("is not connected\n")
    assert http_get(proxy, "/healthz")[0] == 200
    status, text = http_get(proxy, "/metrics")
    assert sample(text, "criproxy_runtime_up", role="runtime") == 0


def test_the_trace_runs_caller_proxy_runtime(observed: tuple[Proxy, InMemorySpanExporter, Path],
                                             fake: FakeRuntime) -> None:
    proxy, exporter, _ = observed
    traceparent = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
    with grpc.insecure_channel(proxy.config.listen.target) as chan:
        chan.unary_unary("/runtime.v1.RuntimeService/ListContainers")(
            b"", timeout=5, metadata=(("traceparent", traceparent),))
    (span,) = exported_spans(proxy, exporter)
    assert span.name == "runtime.v1.RuntimeService/ListContainers"
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == CALLER_SPAN
    assert span.attributes is not None
    assert dict(span.attributes) == {"rpc.system": "grpc", "rpc.service": "runtime.v1.RuntimeService",
                                     "rpc.method": "ListContainers", "rpc.grpc.status_code": 0}
    upstream = fake.received("RuntimeService/ListContainers")[-1].metadata["traceparent"]
    assert isinstance(upstream, str)
    _, trace_id, parent_id, _ = upstream.split("-")
    assert trace_id == TRACE_ID
    assert parent_id == format(span.context.span_id, "016x"), "the runtime's parent must be the proxy's span"


def test_intercepted_call_span_has_the_pod_and_a_decision_event(observed: tuple[Proxy, InMemorySpanExporter, Path],
                                                                fake: FakeRuntime) -> None:
    proxy, exporter, log_file = observed
    request = api_pb2.CreateContainerRequest(
        pod_sandbox_id="sb", config=api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name="app")),
        sandbox_config=api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name="web", namespace="shop", uid="uid-7"),
            annotations={"oom-score-adj.criproxy.io/pod": "1000"}))
    with grpc.insecure_channel(proxy.config.listen.target) as chan:
        chan.unary_unary("/runtime.v1.RuntimeService/CreateContainer")(request.SerializeToString(), timeout=5)
    (span,) = exported_spans(proxy, exporter)
    assert span.attributes is not None
    assert span.attributes["k8s.namespace.name"] == "shop"
    assert span.attributes["k8s.pod.name"] == "web"
    assert span.attributes["k8s.pod.uid"] == "uid-7"
    assert span.attributes["k8s.container.name"] == "app"
    (event,) = span.events
    assert event.name == "criproxy.decision"
    assert event.attributes is not None and event.attributes["criproxy.action"] == "applied"
    assert event.attributes["criproxy.field"] == "config.linux.resources.oom_score_adj"
    assert event.attributes["criproxy.interceptor"] == "resources"
    # The decision log is written by a background thread: the line lands just after the call.
    eventually(lambda: log_file.exists() and log_file.read_text().endswith("\n"), "the decision line written")
    (line,) = log_file.read_text().splitlines()
    entry = json.loads(line)
    assert {k: entry[k] for k in ("namespace", "pod", "pod_uid", "container", "method", "interceptor", "action",
                                  "setting", "annotation", "value")} == {
        "namespace": "shop", "pod": "web", "pod_uid": "uid-7", "container": "app",
        "method": "RuntimeService/CreateContainer", "interceptor": "resources", "action": "applied",
        "setting": "oom-score-adj", "annotation": "oom-score-adj.criproxy.io/pod", "value": "1000"}
    assert entry["diff"] == {"field": "config.linux.resources.oom_score_adj", "from": 0, "to": 1000}
    _, text = http_get(proxy, "/metrics")
    assert sample(text, "criproxy_decisions_total", interceptor="resources", rule="", action="applied",
                  setting="oom-score-adj") == 1


def test_tracing_is_off_without_otel_configuration(loop: LoopThread, fake: FakeRuntime,
                                                   proxy_config: ServeConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    proxy = loop.run(start_proxy(proxy_config))
    try:
        assert proxy.observability is not None
        assert proxy.observability.tracing is None
        assert proxy.plane.tracing is None
    finally:
        loop.run(proxy.stop(0))


def test_pull_image_credentials_appear_nowhere(observed: tuple[Proxy, InMemorySpanExporter, Path],
                                              fake: FakeRuntime, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    proxy, exporter, log_file = observed
    auth = api_pb2.AuthConfig(username=f"user-{SECRET}", password=SECRET, auth=SECRET, server_address="registry",
                              identity_token=SECRET, registry_token=SECRET)
    request = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image="registry/app:1"), auth=auth)
    fake.script("ImageService/PullImage", Reply(code=grpc.StatusCode.UNAUTHENTICATED, details="bad credentials"))
    with grpc.insecure_channel(proxy.config.listen.target) as chan:
        with pytest.raises(grpc.RpcError) as caught:
            chan.unary_unary("/runtime.v1.ImageService/PullImage")(request.SerializeToString(), timeout=5)
        chan.unary_unary("/runtime.v1.ImageService/PullImage")  # the path alone, for completeness
    assert SECRET not in (caught.value.details() or "")
    assert fake.received("ImageService/PullImage")[-1].request == request.SerializeToString()  # still delivered
    exported = exported_spans(proxy, exporter)  # the PullImage call's span, with everything it carries
    spans = json.dumps([json.loads(s.to_json()) for s in exported])
    assert "PullImage" in spans and SECRET not in spans
    assert SECRET not in caplog.text
    assert not log_file.exists() or SECRET not in log_file.read_text()
    assert SECRET not in http_get(proxy, "/metrics")[1]


def test_metrics_address_in_use_is_a_clear_error(loop: LoopThread, fake: FakeRuntime,
                                                 proxy_config: ServeConfig) -> None:
    import socket

    from criproxy.errors import ConfigError

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        with pytest.raises(ConfigError) as caught:
            loop.run(start_proxy(config_with(proxy_config, metrics_address=("127.0.0.1", port)),
                                 registry=CollectorRegistry()))
        assert str(caught.value) == f"--metrics-address 127.0.0.1:{port}: cannot listen: Address already in use"
    finally:
        holder.close()


def test_a_sampler_that_samples_nothing_costs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from criproxy.observe.tracing import tracing_from_env

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")  # the SDK reads the sampler from the environment
    assert tracing_from_env(os.environ) is None
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_off")
    on = tracing_from_env(os.environ)
    assert on is not None  # a caller's sampled trace is still continued
    on.shutdown()


#: Run in a fresh interpreter: build what `criproxy serve` builds for observation (metrics off, so
#: nothing listens), then print whether tracing is on and which OpenTelemetry SDK modules are loaded.
SERVE_IMPORTS = """
import sys
import criproxy.cli
from criproxy.config import build_config
from criproxy.server import build_observability
config = build_config({"listen": "unix:///nonexistent/px.sock", "runtime-endpoint": "unix:///nonexistent/rt.sock",
                       "metrics-address": "off"}, None)
obs = build_observability(config, None, None)
print(type(obs.tracing).__name__)
obs.close()
print(",".join(sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk"))))
"""


def serve_imports(**otel: str) -> tuple[str, list[str]]:
    """What SERVE_IMPORTS prints under only the OTEL_* variables given: (Tracing's type name, SDK modules)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | otel
    done = subprocess.run([sys.executable, "-c", SERVE_IMPORTS], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    tracing, sdk = done.stdout.splitlines()
    return tracing, [m for m in sdk.split(",") if m]


def test_tracing_off_never_loads_the_opentelemetry_sdk() -> None:
    tracing, sdk = serve_imports()
    assert tracing == "NoneType"
    assert sdk == []  # the SDK (and its memory) stays out of a proxy that does not trace


def test_tracing_on_loads_the_sdk_and_builds_tracing() -> None:
    tracing, sdk = serve_imports(OTEL_TRACES_EXPORTER="console")
    assert tracing == "Tracing"
    assert "opentelemetry.sdk.trace" in sdk
