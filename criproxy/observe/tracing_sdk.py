"""The OpenTelemetry SDK half of tracing: turning the data plane's span records into SDK spans and
exporting them (criproxy.observe.tracing says what tracing does and how it is configured).

Imported only once tracing is on (criproxy.observe.tracing.tracing_from_env imports it when an
exporter is configured): the SDK, its exporters and their threads cost a proxy with tracing off
nothing, not even their memory.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind, Status, StatusCode

from criproxy import __version__
from criproxy.errors import ConfigError

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


def build_tracing(service_name: str, exporter: SpanExporter, sampler: str, ratio: float) -> Tracing:
    """Tracing exporting through `exporter` in batches, its spans from service `service_name`."""
    provider = TracerProvider(resource=Resource.create({"service.name": service_name,
                                                        "service.version": __version__}))
    processor = BatchSpanProcessor(exporter)
    provider.add_span_processor(processor)
    return Tracing(provider, processor, sampler, ratio)


def exporter_named(name: str) -> SpanExporter:
    """The exporter an OTEL_TRACES_EXPORTER value (other than none) names."""
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
