"""OpenTelemetry traces that join the kubelet's: one server span per CRI call.

The kubelet (KubeletTracing) sends a W3C `traceparent` in the call's gRPC metadata; containerd
and CRI-O read it. The data plane (native/src/trace.rs) decides whether a call is sampled, makes
the proxy's span a child of the caller's, and sends the proxy span's context upstream, so one
trace runs kubelet -> criproxy -> runtime. It times the span and queues the finished record;
this module turns records into OpenTelemetry spans and exports them, on a thread of its own, off
every call's path.

Configured by the standard OpenTelemetry environment variables: OTEL_TRACES_EXPORTER
(`otlp`, `console`, or `none`, the default: tracing off, and then nothing here runs),
OTEL_EXPORTER_OTLP_ENDPOINT and friends, OTEL_TRACES_SAMPLER (always_on, traceidratio and their
parentbased_ forms; always_off turns tracing off) / OTEL_TRACES_SAMPLER_ARG, OTEL_SERVICE_NAME
(default criproxy). `otlp` needs the `otlp` extra.

Spans carry the OpenTelemetry RPC attributes; an intercepted call's span also the Kubernetes
ones and one event per decision (SpanNotes, collected while the pipeline decides). Never a
request body, so never PullImage credentials.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind, Status, StatusCode

from criproxy import __version__
from criproxy.cri.context import CallContext
from criproxy.errors import ConfigError
from criproxy.policies import Decision

log = logging.getLogger(__name__)


#: OTEL_TRACES_SAMPLER values the data plane implements (always_off turns tracing off instead).
SAMPLERS = ("always_on", "traceidratio", "parentbased_always_on", "parentbased_always_off",
            "parentbased_traceidratio")
#: Notes kept for spans whose record has not arrived yet, at most (older ones are dropped).
MAX_PENDING_NOTES = 10_000


class SpanNotes(trace.Span):
    """What the pipeline says about an intercepted call's span (attributes and decision events),
    kept until the data plane's record of that span arrives. Current for the call's task while
    the pipeline decides, so observe_call and record_decisions write here."""

    def __init__(self, context: trace.SpanContext) -> None:
        self.context = context
        self.attributes: dict[str, Any] = {}
        self.events: list[Event] = []

    def get_span_context(self) -> trace.SpanContext:
        return self.context

    def is_recording(self) -> bool:
        return True

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        self.attributes.update(attributes)

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None,
                  timestamp: int | None = None) -> None:
        self.events.append(Event(name, attributes, timestamp if timestamp is not None else time.time_ns()))

    def end(self, end_time: int | None = None) -> None:
        return None

    def update_name(self, name: str) -> None:
        return None

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        return None

    def record_exception(self, exception: BaseException, attributes: Mapping[str, Any] | None = None,
                         timestamp: int | None = None, escaped: bool = False) -> None:
        return None


#: One finished span from the data plane: trace id, span id, parent span id, path, start and end
#: (ns since the epoch), gRPC status code.
SpanRecord = tuple[bytes, bytes, bytes | None, str, int, int, int]


class Tracing:
    def __init__(self, provider: TracerProvider, processor: SpanProcessor, sampler: str = "parentbased_always_on",
                 ratio: float = 1.0) -> None:
        self.provider = provider
        self.processor = processor
        self.sampler = sampler
        self.ratio = ratio
        self.scope = InstrumentationScope("criproxy", __version__)
        self.notes: OrderedDict[bytes, SpanNotes] = OrderedDict()

    def notes_for(self, trace_id: bytes, span_id: bytes) -> SpanNotes:
        """Notes for the span of an intercepted call (attach them as the current span)."""
        context = trace.SpanContext(int.from_bytes(trace_id, "big"), int.from_bytes(span_id, "big"),
                                    is_remote=False, trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))
        notes = self.notes[span_id] = SpanNotes(context)
        while len(self.notes) > MAX_PENDING_NOTES:
            self.notes.popitem(last=False)
        return notes

    def export(self, record: SpanRecord) -> None:
        trace_id, span_id, parent_id, path, start, end, code = record
        flags = trace.TraceFlags(trace.TraceFlags.SAMPLED)
        context = trace.SpanContext(int.from_bytes(trace_id, "big"), int.from_bytes(span_id, "big"), False, flags)
        parent = (trace.SpanContext(context.trace_id, int.from_bytes(parent_id, "big"), True, flags)
                  if parent_id is not None else None)
        service, _, method = path[1:].partition("/")
        attributes: dict[str, Any] = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method,
                                      "rpc.grpc.status_code": code}
        notes = self.notes.pop(span_id, None)
        events: list[Event] = []
        if notes is not None:
            attributes.update(notes.attributes)
            events = notes.events
        status = Status(StatusCode.UNSET) if code == 0 else Status(StatusCode.ERROR, _NAMES[code]
                                                                   if code < len(_NAMES) else str(code))
        span = ReadableSpan(path[1:], context=context, parent=parent, resource=self.provider.resource,
                            attributes=attributes, events=events, kind=SpanKind.SERVER, status=status,
                            start_time=start, end_time=end, instrumentation_scope=self.scope)
        self.processor.on_end(span)

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
                                      "criproxy.mode": d.mode, "criproxy.interceptor": d.interceptor,
                                      "criproxy.setting": d.setting,
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
    sampler = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower() or "parentbased_always_on"
    if sampler == "always_off":
        # Nothing would ever be recorded: no per-call work at all. The caller's traceparent still
        # reaches the runtime, unchanged, with the rest of its metadata.
        log.info("OTEL_TRACES_SAMPLER=always_off: no spans are made; trace context passes through unchanged")
        return None
    if sampler not in SAMPLERS:
        raise ConfigError(f"OTEL_TRACES_SAMPLER={sampler!r}: criproxy supports {', '.join(SAMPLERS)} and always_off")
    raw_ratio = env.get("OTEL_TRACES_SAMPLER_ARG", "1.0").strip() or "1.0"
    try:
        ratio = float(raw_ratio)
    except ValueError:
        raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG={raw_ratio!r}: expected a ratio from 0 to 1") from None
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG={raw_ratio!r}: expected a ratio from 0 to 1")
    provider = TracerProvider(resource=Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "criproxy"),
                                                        "service.version": __version__}))
    processor = BatchSpanProcessor(exporter)
    provider.add_span_processor(processor)
    return Tracing(provider, processor, sampler, ratio)


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


_NAMES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
    "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")
