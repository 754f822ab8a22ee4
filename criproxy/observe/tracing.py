"""OpenTelemetry traces that join the kubelet's: one server span per CRI call.

The kubelet (KubeletTracing) sends a W3C `traceparent` in the call's gRPC metadata; containerd
and CRI-O read it. The data plane (native/src/trace.rs) decides whether a call is sampled, makes
the proxy's span a child of the caller's, and sends the proxy span's context upstream, so one
trace runs kubelet -> criproxy -> runtime. It times the span and queues the finished record;
Tracing (criproxy.observe.tracing_sdk) turns records into OpenTelemetry spans and exports them, on
a thread of its own, off every call's path.

Configured by the standard OpenTelemetry environment variables: OTEL_TRACES_EXPORTER
(`otlp`, `console`, or `none`, the default: tracing off, and then nothing here runs),
OTEL_EXPORTER_OTLP_ENDPOINT and friends, OTEL_TRACES_SAMPLER (always_on, traceidratio and their
parentbased_ forms; always_off turns tracing off) / OTEL_TRACES_SAMPLER_ARG, OTEL_SERVICE_NAME
(default criproxy). `otlp` needs the `otlp` extra.

Spans carry the OpenTelemetry RPC attributes; an intercepted call's span also the Kubernetes
ones and one event per decision (SpanNotes, collected while the pipeline decides). Never a
request body, so never PullImage credentials.

This module needs only the OpenTelemetry API. What needs the SDK (Tracing, the span notes, the
exporters) is in criproxy.observe.tracing_sdk, imported only when tracing is on: with tracing off
the SDK is never loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from criproxy.cri.context import CallContext
from criproxy.errors import ConfigError
from criproxy.policies import Decision

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from criproxy.observe.tracing_sdk import Tracing

log = logging.getLogger(__name__)


#: OTEL_TRACES_SAMPLER values the data plane implements (always_off turns tracing off instead).
SAMPLERS = ("always_on", "traceidratio", "parentbased_always_on", "parentbased_always_off",
            "parentbased_traceidratio")


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
        from criproxy.observe.tracing_sdk import exporter_named

        exporter = exporter_named(name)
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
    from criproxy.observe.tracing_sdk import build_tracing

    return build_tracing(env.get("OTEL_SERVICE_NAME", "criproxy"), exporter, sampler, ratio)
