"""The native data plane's Python face: starting and stopping it, telling it what the runtime
speaks and what the pipeline intercepts, and the Python half of the interception seam.

Notes:
- The data plane (criproxy._native, Rust on tokio threads) carries every call. A call no hook
  subscribes to never enters Python: no GIL, no event loop, no allocation here.
- An intercepted call arrives as an InterceptedCall on this process's asyncio loop: the data
  plane rings a doorbell the loop watches (a socket pair, `loop.add_reader`) and the loop takes
  every job waiting (`_take_jobs`); no thread of the data plane ever takes the GIL. Its one
  request message is decoded with the CRI v1 types (v1alpha2 has the same wire format), given
  to `Hooks.before`, and answered exactly once: `forward(bytes | None)` or
  `fail(code, message)`. A CriProxyError becomes its own status; any other exception fails the
  call closed with INTERNAL, naming the method. The call is never forwarded unchecked.
- The runtime's answer comes back through `_on_done`; when OK, `Hooks.after` observes it. The
  caller already has its answer by then: what `after` does (or fails to do) never changes it. A
  failure there is logged and counted (`criproxy_internal_errors_total{where="after"}`).
- If the loop does not answer within the caller's deadline the data plane ends the call
  DEADLINE_EXCEEDED by itself; a late answer here is then ignored.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import context as otel_context
from opentelemetry import trace

from criproxy._native import DataPlane, InterceptedCall
from criproxy.cri.methods import API_VERSIONS, METHODS
from criproxy.errors import CriProxyError
from criproxy.metrics import Metrics
from criproxy.seam import Call, Hooks

if TYPE_CHECKING:
    from criproxy.observe.tracing_sdk import Tracing

log = logging.getLogger(__name__)

#: The method table the data plane counts and routes by: every CRI v1 method, in table order.
METHOD_TABLE: list[tuple[str, bool]] = [(key, m.server_streaming) for key, m in METHODS.items()]


def code_number(code: grpc.StatusCode) -> int:
    number: int = code.value[0]
    return number


@dataclass(frozen=True, slots=True)
class PlaneSettings:
    """What the data plane is built with (from ServeConfig)."""

    runtime_endpoint: str
    image_endpoint: str
    max_message_bytes: int
    max_concurrent_calls: int
    connection_age_seconds: float


class NativePlane:
    """One proxy's data plane and its seam to `hooks`."""

    def __init__(self, settings: PlaneSettings, hooks: Hooks, metrics: Metrics, tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.hooks = hooks
        self.metrics = metrics
        self.tracing = tracing
        self._exporter: threading.Thread | None = None
        self._doorbell: int | None = None
        self.native = DataPlane(
            runtime_endpoint=settings.runtime_endpoint, image_endpoint=settings.image_endpoint,
            methods=METHOD_TABLE, max_message_bytes=settings.max_message_bytes,
            max_concurrent_calls=settings.max_concurrent_calls,
            connection_age_seconds=settings.connection_age_seconds)
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, listen_path: str) -> None:
        """Bind `listen_path` and serve (OSError when it cannot be bound). Call on the event loop
        that is to run the hooks."""
        if self.hooks.decoded:
            self._doorbell = self.native.set_control()
            asyncio.get_running_loop().add_reader(self._doorbell, self._take_jobs)
        self.set_apis(API_VERSIONS, API_VERSIONS)
        if self.tracing is not None:
            self.native.set_tracing(self.tracing.sampler, self.tracing.ratio)
        self.native.start(listen_path)
        if self.tracing is not None:
            self._exporter = threading.Thread(target=self._export_spans, args=(self.tracing,),
                                              name="criproxy-spans", daemon=True)
            self._exporter.start()

    def _export_spans(self, tracing: Tracing) -> None:
        """The span exporter thread: the data plane's finished spans, to OpenTelemetry."""
        while (records := self.native.take_spans(0.5)) is not None:
            for record in records:
                try:
                    tracing.export(record)
                except Exception:  # an exporter's bug must not end tracing for good
                    log.exception("criproxy: exporting a span failed")

    def set_apis(self, runtime_apis: frozenset[str] | tuple[str, ...],
                 image_apis: frozenset[str] | tuple[str, ...]) -> None:
        """What each upstream speaks (learnt by asking it); callers are served or bridged accordingly."""
        self.native.set_routes(sorted(runtime_apis), sorted(image_apis), sorted(self.hooks.decoded))

    def is_connected(self, role: str = "runtime") -> bool:
        return self.native.is_connected(role)

    async def stop(self, grace: float) -> bool:
        """Refuse new connections, let calls in flight finish for `grace` seconds, end the rest.
        True when every connection finished in time."""
        loop = asyncio.get_running_loop()
        if self._doorbell is not None:
            loop.remove_reader(self._doorbell)
            self._doorbell = None
        drained = await loop.run_in_executor(None, self.native.stop, grace)
        if self._exporter is not None:
            await loop.run_in_executor(None, self._exporter.join, 5.0)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1.0)
        return drained

    # The seam (see the module notes). All of it runs on the event loop.

    def _take_jobs(self) -> None:
        for kind, call, code, response in self.native.take_jobs():
            if kind == 0:
                self._on_call(call)
            else:
                self._on_done(call, code, response)

    def _on_call(self, call: InterceptedCall) -> None:
        task = asyncio.get_running_loop().create_task(self._decide(call), name=f"criproxy-call {call.method}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _decide(self, call: InterceptedCall) -> None:
        token = None
        if self.tracing is not None and call.span is not None:
            # The pipeline's notes (pod attributes, decision events) go on the call's span.
            token = otel_context.attach(trace.set_span_in_context(self.tracing.notes_for(*call.span)))
        try:
            method = METHODS[call.method]
            try:
                request = method.request_type.FromString(call.message)
            except DecodeError as err:
                call.fail(code_number(grpc.StatusCode.INVALID_ARGUMENT),
                          f"criproxy: cannot decode the {call.method} request: {err}")
                return
            hooked = Call(method=method, path=call.path, metadata=tuple(call.metadata))
            changed = await self.hooks.before(hooked, request)
            sent = changed if changed is not None else request
            call.state = (hooked, sent)
            call.forward(changed.SerializeToString() if changed is not None else None)
        except CriProxyError as err:
            call.fail(code_number(err.code), err.message)
        except asyncio.CancelledError:
            call.fail(code_number(grpc.StatusCode.UNAVAILABLE), "criproxy: the proxy is stopping")
            raise
        except Exception as err:  # a bug in a hook must not pass its call unchecked
            log.exception("criproxy: %s failed inside the proxy", call.method)
            self.metrics.internal_error("before")
            call.fail(code_number(grpc.StatusCode.INTERNAL),
                      f"criproxy: internal error handling {call.method}: {err!r}; the call was not forwarded")
        finally:
            if token is not None:
                otel_context.detach(token)

    def _on_done(self, call: InterceptedCall, code: int, response: bytes | None) -> None:
        if code != 0 or response is None or call.state is None:
            return
        hooked, request = call.state
        try:
            pending = self.hooks.after(hooked, request, response)
        except Exception:  # observation only: the caller has its answer already
            self._after_failed(hooked)
            return
        if pending is None:
            return
        task = asyncio.get_running_loop().create_task(self._observe(hooked, pending),
                                                      name=f"criproxy-after {call.method}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _observe(self, hooked: Call, pending: Awaitable[None]) -> None:
        try:
            await pending
        except Exception:
            self._after_failed(hooked)

    def _after_failed(self, hooked: Call) -> None:
        log.exception("criproxy: observing the answer to %s failed (the caller's answer is unchanged)",
                      hooked.method.key)
        self.metrics.internal_error("after")
