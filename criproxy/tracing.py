"""OpenTelemetry traces that join the kubelet's: one server span per CRI call.

The kubelet (KubeletTracing) sends a W3C `traceparent` in the call's gRPC metadata; containerd
and CRI-O read it. The proxy extracts it, makes its own span a child of it, and replaces it
upstream with its own span's context, so one trace runs kubelet -> criproxy -> runtime.

Configured by the standard OpenTelemetry environment variables: OTEL_TRACES_EXPORTER
(`otlp`, `console`, or `none`, the default: tracing off, and then nothing here runs),
OTEL_EXPORTER_OTLP_ENDPOINT and friends, OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG,
OTEL_SERVICE_NAME (default criproxy). `otlp` needs the `otlp` extra.

Spans carry the OpenTelemetry RPC and Kubernetes attributes, and one event per decision;
never a request body, so never PullImage credentials.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import get_global_textmap
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, Status, StatusCode

from criproxy import __version__
from criproxy.context import CallContext
from criproxy.errors import ConfigError
from criproxy.policies import Decision

log = logging.getLogger(__name__)
_PROPAGATION_KEYS = frozenset({"traceparent", "tracestate", "baggage"})
Metadata = Sequence[tuple[str, str | bytes]]


class _MetadataGetter(Getter[Metadata]):
    def get(self, carrier: Metadata, key: str) -> list[str] | None:
        values = [v if isinstance(v, str) else v.decode("latin-1") for k, v in carrier if k == key]
        return values or None

    def keys(self, carrier: Metadata) -> list[str]:
        return [k for k, _ in carrier]


_GETTER = _MetadataGetter()


class CallSpan:
    """One call's span, made current for the call's task until finish()."""

    def __init__(self, span: trace.Span, token: object, metadata: Metadata) -> None:
        self.span = span
        self._token = token
        #: The metadata to send upstream: the caller's, with the proxy span's trace context.
        self.metadata = metadata

    def finish(self, code: str, message: str = "") -> None:
        self.span.set_attribute("rpc.grpc.status_code", _CODES.get(code, 2))
        if code != "OK":
            self.span.set_status(Status(StatusCode.ERROR, f"{code}: {message}"[:256]))
        self.span.end()
        otel_context.detach(self._token)  # type: ignore[arg-type]


class Tracing:
    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("criproxy", __version__)
        self.propagator = get_global_textmap()

    def start_call(self, path: str, metadata: Metadata) -> CallSpan:
        parent = self.propagator.extract(metadata, getter=_GETTER)
        service, _, method = path[1:].partition("/")
        span = self.tracer.start_span(path[1:], context=parent, kind=SpanKind.SERVER, attributes={
            "rpc.system": "grpc", "rpc.service": service, "rpc.method": method})
        current = trace.set_span_in_context(span, parent)
        token = otel_context.attach(current)
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=current)
        outgoing = [(k, v) for k, v in metadata if k not in _PROPAGATION_KEYS] + list(carrier.items())
        return CallSpan(span, token, outgoing)

    def shutdown(self) -> None:
        self.provider.shutdown()


def observe_call(ctx: CallContext) -> None:
    """Put what the pipeline learnt of the pod on the current call's span."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    attributes = {"k8s.namespace.name": ctx.pod.namespace, "k8s.pod.name": ctx.pod.name,
                  "k8s.pod.uid": ctx.pod.uid}
    if ctx.container is not None:
        attributes["k8s.container.name"] = ctx.container
    span.set_attributes(attributes)


def record_decisions(ctx: CallContext, decisions: Sequence[Decision]) -> None:
    """One span event per decision on the current call's span."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    for d in decisions:
        attributes: dict[str, Any] = {"criproxy.action": d.action, "criproxy.rule": d.rule,
                                      "criproxy.mode": d.mode, "criproxy.setting": d.setting,
                                      "criproxy.annotation": d.key, "criproxy.reason": d.reason}
        if d.change is not None:
            attributes["criproxy.field"] = d.change.path
            attributes["criproxy.value"] = repr(d.change.value)
        span.add_event("criproxy.decision", attributes)


def tracing_from_env(env: Mapping[str, str], exporter: SpanExporter | None = None) -> Tracing | None:
    """The Tracing the OTEL_* variables ask for; None when tracing is off (the default)."""
    if exporter is None:
        name = env.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
        if name in ("", "none"):
            return None
        exporter = _exporter(name)
    provider = TracerProvider(resource=Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "criproxy"),
                                                        "service.version": __version__}))
    if provider.sampler is ALWAYS_OFF:
        # Nothing would ever be recorded: skip the per-call work (extract, span, inject). The
        # caller's traceparent still reaches the runtime, unchanged, with the rest of its metadata.
        log.info("OTEL_TRACES_SAMPLER=always_off: no spans are made; trace context passes through unchanged")
        provider.shutdown()
        return None
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider)


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter,
            )
        except ImportError:
            raise ConfigError("OTEL_TRACES_EXPORTER=otlp needs the OTLP exporter: "
                              "pip install 'criproxy[otlp]'") from None
        return OTLPSpanExporter()  # type: ignore[no-any-return]
    raise ConfigError(f"OTEL_TRACES_EXPORTER={name!r}: criproxy supports otlp, console and none")


_CODES = {code: i for i, code in enumerate((
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
    "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"))}
