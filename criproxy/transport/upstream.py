"""The proxy's own connection to the runtime (grpcio): what it speaks, its health, and the calls
the proxy makes itself (Version to learn the API, Status for the runtime's handlers, the
container index's ListPodSandbox/ListContainers). Callers' calls never pass here: the data plane
(criproxy.transport.plane) has its own connection and carries them.

Notes:
- gRPC's default reconnect backoff grows to two minutes; a node whose runtime restarted
  would then wait that long. The channel here retries every RECONNECT_MAX_MS at most, so the
  proxy re-learns the runtime within a second of it answering (the data plane redials as fast).
- Calls are not wait-for-ready: while the runtime is down they fail at once with UNAVAILABLE
  instead of hanging until their deadline.
- Which APIs the runtime speaks is asked with Version at start and after every reconnect, and
  told to the data plane: a caller is served in its own API when the runtime has it, and bridged
  to the other one when not (v1alpha2 kubelet -> v1-only runtime, v1 kubelet -> v1alpha2-only).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import Message

from criproxy import __version__
from criproxy.api.runtime.v1 import api_pb2
from criproxy.cri.methods import API_VERSIONS, METHODS
from criproxy.supervise import Supervisor, stop_tasks
from criproxy.transport.endpoints import Endpoint

log = logging.getLogger(__name__)

RECONNECT_INITIAL_MS = 100
RECONNECT_MAX_MS = 500
DETECT_TIMEOUT_S = 5.0
#: While an endpoint does not answer, the log says so at once and again this often, until it answers.
NOT_ANSWERING_REPEAT_S = 30.0

RawUnary = grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]


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
        # Left at gRPC's defaults, measured with bench/forwarding.py (Version, ListContainers of ~1 MB;
        # on this channel, and on the server where it applies): grpc.enable_channelz=0,
        # grpc.http2.bdp_probe=0, grpc.http2.max_frame_size=1 MiB, grpc.http2.lookahead_bytes=4 MiB,
        # grpc.optimization_target=latency|throughput, grpc.experimental.tcp_(min_)read_chunk_size=256 KiB
        # and the server's grpc.http2.write_buffer_size=1 MiB changed p50 and proxy CPU/call by less
        # than run-to-run noise (+-5%). grpc.minimal_stack=1 saved ~8% CPU on Version but drops the
        # message-size and deadline filters the proxy relies on.
    ]


class Upstream:
    """A runtime (or image service) endpoint: the channel to it and what the proxy knows of it."""

    def __init__(self, endpoint: Endpoint, *, max_message_bytes: int, role: str) -> None:
        self.endpoint = endpoint
        self.role = role
        self.channel = grpc.aio.insecure_channel(endpoint.target, options=channel_options(max_message_bytes))
        #: The CRI APIs the runtime speaks, and the one to use for a caller's API it lacks (v1 preferred).
        self.apis: frozenset[str] = frozenset(API_VERSIONS)
        self.api = "v1"
        self.runtime_version = ""
        #: True once the endpoint said which APIs it speaks (until then `apis` is a guess: both).
        self.learned = False
        self._unary: dict[str, RawUnary] = {}
        self._watcher: asyncio.Task[None] | None = None
        self.on_state_change: Callable[[Upstream, grpc.ChannelConnectivity], None] | None = None
        #: time.monotonic() when the log last said the endpoint is not answering; None: since it answers.
        self._not_answering_said: float | None = None
        #: An on_ready call began and has not finished (it failed: the restarted watcher calls it again).
        self._ready_pending = False

    # Raw (bytes in, bytes out) callables, made once per path: making one costs more than a call.
    def unary(self, path: str) -> RawUnary:
        call = self._unary.get(path)
        if call is None:
            call = self._unary[path] = self.channel.unary_unary(path, None, None)
        return call

    def is_connected(self) -> bool:
        return self.channel.get_state(try_to_connect=False) == grpc.ChannelConnectivity.READY

    def api_for(self, caller_api: str) -> str:
        """The API to address for a caller speaking `caller_api`: its own when the runtime has it."""
        return caller_api if caller_api in self.apis else self.api

    async def detect_api(self) -> str | None:
        """Ask Version on v1 and v1alpha2; remember which the runtime speaks. None: no answer at all."""
        request = api_pb2.VersionRequest(version="v1").SerializeToString()
        spoken: list[str] = []
        reply = api_pb2.VersionResponse()
        for api in API_VERSIONS:
            try:
                raw = await self.unary(f"/runtime.{api}.RuntimeService/Version")(request, timeout=DETECT_TIMEOUT_S)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                    continue
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    self.say_not_answering(err.details() or "")
                    return None
                log.warning("%s endpoint %s: Version failed: %s: %s", self.role, self.endpoint, err.code().name,
                            err.details())
                return None
            spoken.append(api)
            if len(spoken) == 1:
                reply = api_pb2.VersionResponse.FromString(raw)
        if not spoken:
            log.error("%s endpoint %s answers neither runtime.v1 nor runtime.v1alpha2 Version; is it a CRI "
                      "runtime?", self.role, self.endpoint)
            return None
        self._learned(spoken, f"{reply.runtime_name} {reply.runtime_version}")
        self.runtime_version = reply.runtime_version
        return self.api

    def _learned(self, spoken: list[str], what: str) -> None:
        apis = frozenset(spoken)
        if apis != self.apis or not self.learned:
            log.info("%s endpoint %s (%s) speaks CRI %s", self.role, self.endpoint, what, " and ".join(spoken))
        self.apis, self.api, self.learned = apis, spoken[0], True

    async def detect_image_api(self) -> None:
        """An image-only endpoint has no Version: probe ImageFsInfo on each API instead."""
        spoken: list[str] = []
        for api in API_VERSIONS:
            try:
                await self.unary(f"/runtime.{api}.ImageService/ImageFsInfo")(b"", timeout=DETECT_TIMEOUT_S)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    self.say_not_answering(err.details() or "")
                if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                    return
                continue
            spoken.append(api)
        if spoken:
            self._learned(spoken, "image service")

    def not_answering(self) -> str:
        """What the log says while the endpoint does not answer: what a call failing meanwhile says."""
        return f"{self.role} endpoint {self.endpoint} is not answering (is the runtime running?)"

    def say_not_answering(self, detail: str = "") -> None:
        self._not_answering_said = time.monotonic()
        log.warning("%s; calls fail at once with UNAVAILABLE until it answers (retried every %d ms)%s",
                    self.not_answering(), RECONNECT_MAX_MS, f": {detail}" if detail else "")

    def start_watching(self, on_ready: Callable[[], Any], supervisor: Supervisor | None = None) -> None:
        """Follow the channel's state; call on_ready (sync or async) each time it becomes READY again.
        The watcher runs under `supervisor` (a private one when None): a failure restarts it."""
        supervisor = supervisor if supervisor is not None else Supervisor()
        self._watcher = supervisor.start(f"watch-{self.role}", lambda: self._watch(on_ready))

    async def _watch(self, on_ready: Callable[[], Any]) -> None:
        state = self.channel.get_state(try_to_connect=True)
        if self.on_state_change is not None:
            self.on_state_change(self, state)  # (re)started: report where the channel stands
        if state == grpc.ChannelConnectivity.READY and self._ready_pending:
            await self._call(on_ready)  # the last watcher failed in it
        while True:
            if state != grpc.ChannelConnectivity.READY:
                said = self._not_answering_said
                if said is None or time.monotonic() - said >= NOT_ANSWERING_REPEAT_S:
                    self.say_not_answering()
                said = self._not_answering_said or time.monotonic()
                try:
                    # Bounded: the reminder is due even when the state does not change. asyncio.timeout,
                    # not wait_for: Python 3.11's wait_for drops a cancellation that comes as the state
                    # changes, and close() then waited for this loop until the next reminder (30 s).
                    async with asyncio.timeout(max(0.01, said + NOT_ANSWERING_REPEAT_S - time.monotonic())):
                        await self.channel.wait_for_state_change(state)
                except TimeoutError:
                    continue
            else:
                await self.channel.wait_for_state_change(state)
            previous, state = state, self.channel.get_state(try_to_connect=True)
            if self.on_state_change is not None:
                self.on_state_change(self, state)
            if state == grpc.ChannelConnectivity.READY:
                log.info("%s endpoint %s connected", self.role, self.endpoint)
                self._not_answering_said = None
                await self._call(on_ready)
            elif previous == grpc.ChannelConnectivity.READY:
                self.say_not_answering(f"the connection was lost ({state.name})")

    async def _call(self, on_ready: Callable[[], Any]) -> None:
        self._ready_pending = True
        result = on_ready()
        if asyncio.iscoroutine(result):
            await result
        self._ready_pending = False

    async def close(self) -> None:
        await stop_tasks([self._watcher], f"{self.role} endpoint {self.endpoint}")
        await self.channel.close(None)


async def call_typed(upstream: Upstream, key: str, request: Message, timeout: float = DETECT_TIMEOUT_S) -> Message:
    """Call a CRI method as the proxy itself (not on a caller's behalf), in the API the runtime speaks."""
    method = METHODS[key]
    raw = await upstream.unary(method.path(upstream.api))(request.SerializeToString(), timeout=timeout)
    return method.response_type.FromString(raw)
