"""The relay: one generic gRPC handler that forwards every CRI call to the runtime.

Notes:
- Requests and responses are bytes: a method nobody intercepts is never parsed. Only methods
  in `Hooks.decoded` are decoded and handed to the hooks; a request they changed is re-encoded
  (unknown fields kept), one they did not change goes upstream as the caller's own bytes.
- Which methods are unary or server-streaming comes from the descriptors (criproxy.methods).
  A path the table does not know (a newer CRI, another service on the runtime's socket) is
  served as a bidirectional stream, a shape every gRPC call fits in. A caller that sends one
  request and half-closes (a unary or server-streaming call: every CRI method is one) is
  relayed as a unary-stream call, which carries either answer; only a truly streaming caller
  gets a streaming call upstream. (gRPC Python turns the status of a call into INTERNAL when
  a request written to it races the runtime's early answer, e.g. UNIMPLEMENTED.)
- Metadata goes upstream as received (traceparent included, user-agent excepted: the channel
  sets its own); the caller's remaining deadline becomes the upstream deadline; the runtime's
  initial metadata, status code, details and trailing metadata come back unchanged.
- A server stream is relayed by two parties: a reader task takes the runtime's messages into a
  queue of at most STREAM_READ_AHEAD messages, and the handler writes them to the caller. Reading
  the next message then overlaps writing the previous one (gRPC allows one read and one write in
  flight per call), instead of waiting for each in turn. A slow caller still slows the runtime's
  stream: once the queue is full the reader stops reading (context.write waits for the caller's
  flow control), so at most STREAM_READ_AHEAD + 1 messages are held per stream. The reader ends
  with the call: it is cancelled and awaited before the handler returns, whatever ends the call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import grpc.aio
from google.protobuf.message import DecodeError, Message

from criproxy.errors import CriProxyError, Internal, InvalidArgument
from criproxy.methods import API_VERSIONS, IMAGE_SERVICE, METHODS, Method, parse_cri_path
from criproxy.metrics import Metrics, NoMetrics
from criproxy.upstream import Upstream

log = logging.getLogger(__name__)

Metadata = Sequence[tuple[str, str | bytes]]
_DROPPED_METADATA = frozenset({"user-agent"})
#: How long an unknown method's caller may take to half-close after its first request and still be
#: relayed as a single-request call (unary or server-streaming; every CRI method is one of those).
SINGLE_REQUEST_WAIT_S = 0.05
#: How many of the runtime's stream messages the proxy reads ahead of the caller, at most (besides
#: the one the reader holds while the queue is full). bench/forwarding.py GetContainerEvents
#: (10,000 small events per stream), throughput vs direct, without read-ahead -> with 32, same runs:
#: 0.44x -> 0.54x and 0.38x -> 0.61x (full), 0.44x -> 0.75x (quick); proxy CPU per message 225 ->
#: 182 us and 223 -> 162 us (completions batch up). 4, 8 and 128 did as well as 32 within noise.
#: Memory per stream is bounded by this many messages (and gRPC's flow-control windows).
STREAM_READ_AHEAD = 32
#: The name of relay_stream's reader tasks.
READ_AHEAD_TASK = "criproxy-read-ahead"


@dataclass(slots=True)
class Call:
    """What the hooks learn about one intercepted call."""

    method: Method
    path: str
    metadata: Metadata
    #: Free-form per-call state a hook keeps between `before` and `after` (never on the hook object).
    state: dict[str, Any] = field(default_factory=dict)


class Hooks(Protocol):
    """The interception seam. The relay decodes only the methods in `decoded`."""

    decoded: frozenset[str]

    async def before(self, call: Call, request: Message) -> Message | None:
        """Return the request to send upstream (the same object, changed, or a new one), or None to send
        the caller's bytes unchanged; raise to refuse."""
        ...

    async def after(self, call: Call, request: Message, response: bytes) -> None:
        """Observe a successful response (it is forwarded unchanged)."""
        ...


@dataclass(slots=True)
class Seen:
    """What one call's observation needs from its handler."""

    #: The metadata to send upstream (the caller's, with the proxy's trace context when tracing).
    metadata: Metadata
    #: Time spent waiting on the runtime (the rest of the call is the proxy's).
    runtime_seconds: float = 0.0
    key: str = ""


class CallTracer(Protocol):
    """Starts a call's span (criproxy.tracing.Tracing); None in Relay means tracing is off."""

    def start_call(self, path: str, metadata: Metadata) -> Any:
        ...


Handler = Callable[[Any, Any, Seen], Awaitable[Any]]
#: Handlers kept for reuse: every CRI path of both APIs fits many times over; unknown paths past it
#: are served with a handler made for the call.
MAX_CACHED_HANDLERS = 1024
#: The metrics label of paths the CRI table does not know (callers choose those names).
OTHER = "other"


def status_name(context: grpc.aio.ServicerContext[bytes, bytes]) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


class NoHooks:
    """The pure proxy: nothing decoded."""

    decoded: frozenset[str] = frozenset()

    async def before(self, call: Call, request: Message) -> Message | None:
        return None

    async def after(self, call: Call, request: Message, response: bytes) -> None:
        return None


def forwardable_metadata(context: grpc.aio.ServicerContext[Any, Any]) -> Metadata:
    return tuple((k, v) for k, v in context.invocation_metadata() or () if k not in _DROPPED_METADATA)


async def relay_error(context: grpc.aio.ServicerContext[Any, Any], err: grpc.aio.AioRpcError,
                      upstream: Upstream) -> None:
    """End the caller's call with the runtime's status; raises (as context.abort does)."""
    details = err.details() or ""
    if err.code() == grpc.StatusCode.UNAVAILABLE and not upstream.is_connected():
        # Not the runtime's answer: the proxy could not reach it. Say which socket, and why.
        details = (f"criproxy: {upstream.role} endpoint {upstream.endpoint} is not answering "
                   f"(is the runtime running?): {details}")
    trailing: Metadata = tuple(err.trailing_metadata() or ())  # type: ignore[arg-type]  # (key, value) pairs
    await context.abort(err.code(), details, trailing)


async def send_initial(context: grpc.aio.ServicerContext[Any, Any], call: Any) -> None:
    initial = await call.initial_metadata()
    if initial:
        await context.send_initial_metadata(initial)


class Relay(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Serves every method path by forwarding it to the runtime or image upstream."""

    def __init__(self, runtime: Upstream, image: Upstream, hooks: Hooks | None = None, *,
                 metrics: Metrics | None = None, tracing: CallTracer | None = None) -> None:
        self.runtime = runtime
        self.image = image
        self.hooks: Hooks = hooks if hooks is not None else NoHooks()
        self.metrics: Metrics = metrics if metrics is not None else NoMetrics()
        self.tracing = tracing
        self._handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {}
        self._pumps: set[asyncio.Task[None]] = set()  # request copiers of unknown methods, kept alive

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes]:
        path: str = handler_call_details.method
        handler = self._handlers.get(path)
        if handler is None:
            handler = self._make_handler(path)
            if len(self._handlers) < MAX_CACHED_HANDLERS:  # callers choose paths: keep the cache bounded
                self._handlers[path] = handler
        return handler

    def _make_handler(self, path: str) -> grpc.RpcMethodHandler[bytes, bytes]:
        parsed = parse_cri_path(path)
        method = METHODS.get(parsed.key) if parsed is not None else None
        upstream = self.image if parsed is not None and parsed.service == IMAGE_SERVICE else self.runtime

        if parsed is None:
            def target() -> str:
                return path
        else:
            caller_api, paths = parsed.api, {api: parsed.with_api(api) for api in API_VERSIONS}

            def target() -> str:
                # The runtime's APIs can change on reconnect, so the upstream path is chosen per call.
                return paths[upstream.api_for(caller_api)]

        key = method.key if method is not None else OTHER
        if method is None:
            return grpc.stream_stream_rpc_method_handler(self._observed(key, path, self._bidi(upstream, target)))
        if method.server_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._observed(key, path, self._server_stream(upstream, target)))
        if method.key in self.hooks.decoded:
            return grpc.unary_unary_rpc_method_handler(
                self._observed(key, path, self._intercepted(upstream, target, method, path)))
        return grpc.unary_unary_rpc_method_handler(self._observed(key, path, self._unary(upstream, target)))

    def _observed(self, key: str, path: str, handle: Handler) -> Callable[[Any, Any], Awaitable[Any]]:
        """The handler, counted in metrics and traced (the span continues the caller's trace)."""
        metrics, tracing = self.metrics, self.tracing

        async def observed(request: Any, context: grpc.aio.ServicerContext[bytes, bytes]) -> Any:
            seen = Seen(forwardable_metadata(context), key=key)
            span = tracing.start_call(path, seen.metadata) if tracing is not None else None
            if span is not None:
                seen.metadata = span.metadata
            metrics.call_started(key)
            started, code = time.perf_counter(), "UNKNOWN"
            try:
                result = await handle(request, context, seen)
                code = "OK"
                return result
            except grpc.aio.AbortError:
                code = status_name(context)
                raise
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            finally:
                metrics.call_finished(key, code, time.perf_counter() - started, seen.runtime_seconds)
                if span is not None:
                    span.finish(code)

        return observed

    def _unary(self, upstream: Upstream, target: Callable[[], str]) -> Handler:
        async def handle(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes], seen: Seen) -> bytes:
            started = time.perf_counter()
            try:
                return await forward_unary(upstream, target(), request, context, seen.metadata)
            finally:
                seen.runtime_seconds = time.perf_counter() - started

        return handle

    def _intercepted(self, upstream: Upstream, target: Callable[[], str], method: Method, path: str) -> Handler:
        hooks = self.hooks

        async def handle(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes], seen: Seen) -> bytes:
            call = Call(method=method, path=path, metadata=seen.metadata)
            try:
                try:
                    message = method.request_type.FromString(request)
                except DecodeError as err:
                    raise InvalidArgument(f"criproxy: cannot decode the {method.key} request: {err}") from err
                changed = await hooks.before(call, message)
                if changed is not None:
                    message, request = changed, changed.SerializeToString()
                started = time.perf_counter()
                try:
                    response = await forward_unary(upstream, target(), request, context, call.metadata)
                finally:
                    seen.runtime_seconds = time.perf_counter() - started
                await hooks.after(call, message, response)
                return response
            except CriProxyError as err:
                await context.abort(err.code, err.message)
            except grpc.aio.AbortError:
                raise
            except Exception as err:  # a bug in a hook must not pass its call unchecked
                log.exception("criproxy: %s failed inside the proxy", method.key)
                await context.abort(Internal.code, f"criproxy: internal error handling {method.key}: {err!r}")
            raise AssertionError("unreachable: context.abort raises")

        return handle

    def _server_stream(self, upstream: Upstream, target: Callable[[], str]) -> Handler:
        async def handle(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes], seen: Seen) -> None:
            call = upstream.stream(target())(request, metadata=seen.metadata, timeout=context.time_remaining())
            await self._stream(upstream, call, context, seen)

        return handle

    async def _stream(self, upstream: Upstream, call: Any, context: grpc.aio.ServicerContext[bytes, bytes],
                      seen: Seen) -> None:
        key = seen.key
        self.metrics.stream_started(key)
        started = time.perf_counter()
        try:
            await relay_stream(upstream, call, context, self.metrics, key)
        finally:
            seen.runtime_seconds = time.perf_counter() - started  # a stream's time is the runtime's
            self.metrics.stream_finished(key)

    def _bidi(self, upstream: Upstream, target: Callable[[], str]) -> Handler:
        pumps = self._pumps

        async def handle(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes],
                         seen: Seen) -> None:
            metadata, timeout = seen.metadata, context.time_remaining()
            first, rest = await read_single_request(requests)
            if rest is None and first is not None:
                # One request, then the caller half-closed: a unary or server-streaming call. A
                # unary-stream call upstream carries both shapes and sends the request in one step.
                await self._stream(upstream, upstream.stream(target())(first, metadata=metadata, timeout=timeout),
                                   context, seen)
                return
            call = upstream.bidi(target())(metadata=metadata, timeout=timeout)  # type: ignore[call-arg]
            # A streaming caller: its requests are copied upstream by a task of ours, never cancelled
            # (cancelling a pending read fails the caller's whole call in gRPC core); it ends with the call.
            pump = asyncio.get_running_loop().create_task(copy_requests(first, rest, call))
            pumps.add(pump)
            pump.add_done_callback(pumps.discard)
            await self._stream(upstream, call, context, seen)

        return handle


_END = object()


async def read_single_request(requests: AsyncIterator[bytes]) -> tuple[bytes | None, AsyncIterator[bytes] | None]:
    """The caller's first request, and None when it then half-closed (at once, or within
    SINGLE_REQUEST_WAIT_S); else the iterator holding the rest, the second request first."""
    iterator = aiter(requests)
    first = await anext(iterator, None)
    if first is None:
        return None, None
    second = asyncio.ensure_future(anext(iterator, _END))
    await asyncio.wait([second], timeout=SINGLE_REQUEST_WAIT_S)
    if second.done() and second.result() is _END:
        return first, None

    async def rest() -> AsyncIterator[bytes]:
        message = await second
        if message is _END:
            return
        assert isinstance(message, bytes)
        yield message
        async for more in iterator:
            yield more

    return first, rest()


async def copy_requests(first: bytes | None, rest: AsyncIterator[bytes] | None, call: Any) -> None:
    """Write a streaming caller's requests upstream, then half-close."""
    try:
        if first is not None:
            await call.write(first)
        if rest is not None:
            async for request in rest:
                await call.write(request)
        await call.done_writing()
    except Exception as err:  # the runtime ended the call first: the caller hears the runtime's status
        log.debug("request stream ended early: %r", err)


async def relay_stream(upstream: Upstream, call: Any, context: grpc.aio.ServicerContext[bytes, bytes],
                       metrics: Metrics, key: str) -> None:
    """Write the runtime's stream to the caller, then its status and trailers; read ahead of the
    caller by STREAM_READ_AHEAD messages at most (see the module's notes)."""
    queue: asyncio.Queue[Any] = asyncio.Queue(STREAM_READ_AHEAD)
    reader = asyncio.get_running_loop().create_task(read_ahead(call, queue), name=READ_AHEAD_TASK)
    try:
        await send_initial(context, call)
        while isinstance(message := await queue.get(), bytes):
            await context.write(message)  # returns once the caller's flow control took it
            metrics.stream_message(key)
        if message is not _END:
            raise message  # the runtime's status (AioRpcError), after every message before it; else a bug
        trailing = await call.trailing_metadata()
        if trailing:
            context.set_trailing_metadata(trailing)
    except grpc.aio.AioRpcError as err:
        await relay_error(context, err, upstream)
    finally:
        call.cancel()  # the caller went away (or the stream ended: then a no-op)
        if not reader.done():
            reader.cancel()
            await asyncio.wait((reader,))  # the reader never outlives the call


async def read_ahead(call: Any, queue: asyncio.Queue[Any]) -> None:
    """Put the call's messages (bytes) into the queue, waiting while it is full, then one last item:
    _END after the runtime's OK, or the exception that ended the stream (AioRpcError: its status)."""
    last: object = _END
    try:
        async for message in call:
            await queue.put(message)
    except Exception as err:  # AioRpcError: the runtime's status; anything else: relayed as a bug
        last = err
    await queue.put(last)


async def forward_unary(upstream: Upstream, path: str, request: bytes,
                        context: grpc.aio.ServicerContext[bytes, bytes], metadata: Metadata | None = None) -> bytes:
    """Send one request upstream and hand back the response, metadata and status of the runtime."""
    call = upstream.unary(path)(request, metadata=metadata if metadata is not None else forwardable_metadata(context),
                                timeout=context.time_remaining())
    try:
        response: bytes = await call
    except grpc.aio.AioRpcError as err:
        await relay_error(context, err, upstream)
        raise  # not reached: abort raises
    await send_initial(context, call)
    trailing = await call.trailing_metadata()
    if trailing:
        context.set_trailing_metadata(trailing)
    return response
