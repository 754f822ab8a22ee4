"""An in-process fake CRI runtime on a unix socket that journals every call it receives.

It answers every method of the CRI table (and any scripted extra path) with a scripted
Reply: messages, an error status with details and trailers, metadata, a delay, or a hang.
Unscripted methods answer one empty message (valid for every CRI response type) and
Version answers a fixed VersionResponse. `apis` limits which CRI versions it speaks; the
others answer UNIMPLEMENTED, as a real runtime does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from criproxy.api.runtime.v1 import api_pb2
from criproxy.cri.methods import METHODS, V1ALPHA2_KEYS, parse_cri_path

Metadata = tuple[tuple[str, str | bytes], ...]


@dataclass
class Reply:
    """What the fake answers to one method."""

    messages: list[bytes] = field(default_factory=lambda: [b""])
    code: grpc.StatusCode | None = None
    details: str = ""
    initial_metadata: Metadata = ()
    trailing_metadata: Metadata = ()
    delay: float = 0.0
    hang: bool = False


@dataclass
class Received:
    """One journal entry: a call as the runtime saw it."""

    path: str
    requests: list[bytes]
    metadata: dict[str, str | bytes]
    time_remaining: float | None
    cancelled: bool = False

    @property
    def request(self) -> bytes:
        (only,) = self.requests
        return only


VERSION_REPLY = api_pb2.VersionResponse(
    version="0.1.0", runtime_name="fake-runtime", runtime_version="1.2.3", runtime_api_version="v1"
).SerializeToString()


class FakeRuntime(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    def __init__(self, apis: Iterable[str] = ("v1", "v1alpha2")) -> None:
        self.apis = frozenset(apis)
        self.replies: dict[str, Reply] = {}
        self.extra_paths: dict[str, str] = {}
        self.journal: list[Received] = []
        self.server: grpc.aio.Server | None = None
        self.calls = asyncio.Event()

    def script(self, name: str, reply: Reply) -> None:
        """Script a reply by full path ('/runtime.v1.RuntimeService/Version') or key ('RuntimeService/Version')."""
        self.replies[name] = reply

    def add_path(self, path: str, kind: str) -> None:
        """Serve a path the CRI table does not have; kind is unary, server_stream or bidi."""
        self.extra_paths[path] = kind

    def received(self, name: str) -> list[Received]:
        """Journal entries whose path is `name` or ends with '.'+`name` (a key such as 'RuntimeService/Version')."""
        return [r for r in self.journal if r.path == name or r.path.endswith("." + name)]

    def _reply_for(self, path: str, key: str | None) -> Reply:
        reply = self.replies.get(path) or (self.replies.get(key) if key else None)
        if reply is not None:
            return reply
        if key == "RuntimeService/Version":
            return Reply(messages=[VERSION_REPLY])
        return Reply()

    def service(self, details: grpc.HandlerCallDetails) -> Any:
        path: str = details.method
        kind = self.extra_paths.get(path)
        parsed = parse_cri_path(path)
        key = parsed.key if parsed else None
        if kind is None:
            method = METHODS.get(key) if key else None
            if method is None or parsed is None or parsed.api not in self.apis:
                return None  # grpc answers UNIMPLEMENTED
            if parsed.api == "v1alpha2" and parsed.key not in V1ALPHA2_KEYS:
                return None
            kind = "server_stream" if method.server_streaming else "unary"
        if kind == "unary":
            return grpc.unary_unary_rpc_method_handler(self._unary(path, key))
        if kind == "server_stream":
            return grpc.unary_stream_rpc_method_handler(self._stream(path, key))
        return grpc.stream_stream_rpc_method_handler(self._bidi(path, key))

    def _record(self, path: str, requests: list[bytes], context: Any) -> Received:
        entry = Received(path=path, requests=requests, metadata=dict(context.invocation_metadata() or ()),
                         time_remaining=context.time_remaining())
        self.journal.append(entry)
        return entry

    async def _answer_start(self, reply: Reply, context: Any, entry: Received) -> None:
        if reply.hang:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                entry.cancelled = True
                raise
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.initial_metadata:
            await context.send_initial_metadata(reply.initial_metadata)

    async def _answer_end(self, reply: Reply, context: Any) -> None:
        if reply.code is not None:
            await context.abort(reply.code, reply.details, reply.trailing_metadata)
        if reply.trailing_metadata:
            context.set_trailing_metadata(reply.trailing_metadata)

    def _unary(self, path: str, key: str | None) -> Any:
        async def handle(request: bytes, context: Any) -> bytes:
            entry = self._record(path, [request], context)
            reply = self._reply_for(path, key)
            await self._answer_start(reply, context, entry)
            await self._answer_end(reply, context)
            return reply.messages[0]

        return handle

    def _stream(self, path: str, key: str | None) -> Any:
        async def handle(request: bytes, context: Any) -> AsyncIterator[bytes]:
            entry = self._record(path, [request], context)
            reply = self._reply_for(path, key)
            await self._answer_start(reply, context, entry)
            try:
                for message in reply.messages:
                    yield message
                    if reply.delay:
                        await asyncio.sleep(reply.delay)
            except asyncio.CancelledError:
                entry.cancelled = True
                raise
            await self._answer_end(reply, context)

        return handle

    def _bidi(self, path: str, key: str | None) -> Any:
        async def handle(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
            entry = self._record(path, [], context)
            async for request in requests:
                entry.requests.append(request)
            reply = self._reply_for(path, key)
            await self._answer_start(reply, context, entry)
            for message in reply.messages:
                yield message
            await self._answer_end(reply, context)

        return handle

    async def start(self, socket_path: str) -> None:
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20),
                                               ("grpc.max_send_message_length", 64 << 20)])
        self.server.add_generic_rpc_handlers((self,))
        if self.server.add_insecure_port("unix://" + socket_path) == 0:
            raise RuntimeError(f"fake runtime: cannot bind {socket_path}")
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)
            self.server = None


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    """Poll `predicate` on the loop until it is true (bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
