"""The client side: one gRPC channel per runtime endpoint, its health, and the CRI API it speaks.

Notes:
- gRPC's default reconnect backoff grows to two minutes; a node whose runtime restarted
  would then wait that long. The channel here retries every RECONNECT_MAX_MS at most, so the
  proxy serves again within a second of the runtime answering.
- Calls are not wait-for-ready: while the runtime is down they fail at once with UNAVAILABLE
  (the kubelet retries), instead of hanging until their deadline.
- Which API the runtime speaks is asked with Version at start and after every reconnect;
  v1 wins when the runtime speaks both.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

from criproxy import __version__
from criproxy.api.runtime.v1 import api_pb2
from criproxy.endpoints import Endpoint

log = logging.getLogger(__name__)

RECONNECT_INITIAL_MS = 100
RECONNECT_MAX_MS = 500
DETECT_TIMEOUT_S = 5.0

RawUnary = grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]
RawStream = grpc.aio.UnaryStreamMultiCallable[bytes, bytes]
RawBidi = grpc.aio.StreamStreamMultiCallable[bytes, bytes]


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_INITIAL_MS),
        ("grpc.min_reconnect_backoff_ms", RECONNECT_INITIAL_MS),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_MS),
        ("grpc.primary_user_agent", f"criproxy/{__version__}"),
        # No client-side retries: they buffer every request for a replay the kubelet does itself.
        ("grpc.enable_retries", 0),
    ]


class Upstream:
    """A runtime (or image service) endpoint: the channel to it and what the proxy knows of it."""

    def __init__(self, endpoint: Endpoint, *, max_message_bytes: int, role: str) -> None:
        self.endpoint = endpoint
        self.role = role
        self.channel = grpc.aio.insecure_channel(endpoint.target, options=channel_options(max_message_bytes))
        #: The CRI API the runtime speaks ("v1" or "v1alpha2"); v1 until told otherwise.
        self.api = "v1"
        self.runtime_version = ""
        self._unary: dict[str, RawUnary] = {}
        self._stream: dict[str, RawStream] = {}
        self._bidi: dict[str, RawBidi] = {}
        self._watcher: asyncio.Task[None] | None = None
        self.on_state_change: Callable[[Upstream, grpc.ChannelConnectivity], None] | None = None

    # Raw (bytes in, bytes out) callables, made once per path: making one costs more than a call.
    def unary(self, path: str) -> RawUnary:
        call = self._unary.get(path)
        if call is None:
            call = self._unary[path] = self.channel.unary_unary(path, None, None)
        return call

    def stream(self, path: str) -> RawStream:
        call = self._stream.get(path)
        if call is None:
            call = self._stream[path] = self.channel.unary_stream(path, None, None)
        return call

    def bidi(self, path: str) -> RawBidi:
        call = self._bidi.get(path)
        if call is None:
            call = self._bidi[path] = self.channel.stream_stream(path, None, None)
        return call

    def is_connected(self) -> bool:
        return self.channel.get_state(try_to_connect=False) == grpc.ChannelConnectivity.READY

    async def detect_api(self) -> str | None:
        """Ask Version on v1, then v1alpha2; remember and return the API that answered (None: no answer)."""
        request = api_pb2.VersionRequest(version="v1").SerializeToString()
        for api in ("v1", "v1alpha2"):
            try:
                raw = await self.unary(f"/runtime.{api}.RuntimeService/Version")(request, timeout=DETECT_TIMEOUT_S)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                    continue
                log.warning("%s endpoint %s: Version failed: %s: %s", self.role, self.endpoint, err.code().name,
                            err.details())
                return None
            reply = api_pb2.VersionResponse.FromString(raw)
            if api != self.api or reply.runtime_version != self.runtime_version:
                log.info("%s endpoint %s speaks CRI %s (%s %s)", self.role, self.endpoint, api,
                         reply.runtime_name, reply.runtime_version)
            self.api, self.runtime_version = api, reply.runtime_version
            return api
        log.error("%s endpoint %s answers neither runtime.v1 nor runtime.v1alpha2 Version; is it a CRI runtime?",
                  self.role, self.endpoint)
        return None

    async def detect_image_api(self, fallback: str) -> str:
        """An image-only endpoint has no Version: probe ImageFsInfo instead; keep `fallback` on doubt."""
        for api in ("v1", "v1alpha2"):
            try:
                await self.unary(f"/runtime.{api}.ImageService/ImageFsInfo")(b"", timeout=DETECT_TIMEOUT_S)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                    continue
                return fallback
            self.api = api
            return api
        return fallback

    def start_watching(self, on_ready: Callable[[], Any]) -> None:
        """Follow the channel's state; call on_ready (sync or async) each time it becomes READY again."""
        self._watcher = asyncio.get_running_loop().create_task(self._watch(on_ready), name=f"watch-{self.role}")

    async def _watch(self, on_ready: Callable[[], Any]) -> None:
        state = self.channel.get_state(try_to_connect=True)
        while True:
            await self.channel.wait_for_state_change(state)
            previous, state = state, self.channel.get_state(try_to_connect=True)
            if self.on_state_change is not None:
                self.on_state_change(self, state)
            if state == grpc.ChannelConnectivity.READY:
                log.info("%s endpoint %s connected", self.role, self.endpoint)
                result = on_ready()
                if asyncio.iscoroutine(result):
                    await result
            elif previous == grpc.ChannelConnectivity.READY:
                log.warning("%s endpoint %s lost (%s); reconnecting every %d ms at most", self.role, self.endpoint,
                            state.name, RECONNECT_MAX_MS)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await self.channel.close(None)
