"""The native data plane from the Python side: what no interceptor claims never waits on Python,
the seam fails closed, and ordinary grpcio clients are served."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message

from criproxy.api.runtime.v1 import api_pb2
from criproxy.config import ServeConfig
from criproxy.metrics import NoMetrics
from criproxy.seam import Call
from criproxy.server import Proxy, start_proxy
from tests.support.fakeruntime import FakeRuntime, Reply
from tests.support.loopthread import LoopThread
from tests.support.waiting import eventually

CREATE = "/runtime.v1.RuntimeService/CreateContainer"
VERSION = "/runtime.v1.RuntimeService/Version"


class ScriptedHooks:
    """Hooks on CreateContainer whose `before` does what the test says."""

    decoded = frozenset({"RuntimeService/CreateContainer"})

    def __init__(self) -> None:
        self.mode = "pass"
        self.entered = threading.Event()
        self.seen: list[Message] = []
        self.after_raises = False
        self.after_waits = True  # an `async def after`; False: a plain function, as Pipeline.after is
        self.observed: list[bytes] = []

    async def before(self, call: Call, request: Message) -> Message | None:
        self.seen.append(request)
        self.entered.set()
        if self.mode == "block":
            time.sleep(2.0)  # blocks the whole event loop, as a bad interceptor would
        elif self.mode == "hang":
            await threading_never()
        return None

    def after(self, call: Call, request: Message, response: bytes) -> Awaitable[None] | None:
        if self.after_waits:
            return self._after(response)
        self._observed(response)
        return None

    async def _after(self, response: bytes) -> None:
        await asyncio.sleep(0)
        self._observed(response)

    def _observed(self, response: bytes) -> None:
        self.observed.append(response)
        if self.after_raises:
            raise RuntimeError("the index broke")


class CountingMetrics(NoMetrics):
    def __init__(self) -> None:
        self.internal: list[str] = []

    def internal_error(self, where: str) -> None:
        self.internal.append(where)


async def threading_never() -> None:
    await asyncio.Event().wait()


@pytest.fixture
def hooks() -> ScriptedHooks:
    return ScriptedHooks()


@pytest.fixture
def own_fake(sockdir: Path) -> Iterator[FakeRuntime]:
    """A fake runtime on an event loop of its own: the proxy's loop may stall without stalling it."""
    thread = LoopThread()
    runtime = FakeRuntime()
    thread.run(runtime.start(str(sockdir / "runtime.sock")))
    yield runtime
    thread.run(runtime.stop())
    thread.close()


@pytest.fixture
def hooked(loop: LoopThread, own_fake: FakeRuntime, proxy_config: ServeConfig,
           hooks: ScriptedHooks) -> Iterator[Proxy]:
    proxy = loop.run(start_proxy(proxy_config, hooks))
    own_fake.journal.clear()
    yield proxy
    loop.run(proxy.stop(0))


def create_request() -> bytes:
    return api_pb2.CreateContainerRequest(
        pod_sandbox_id="pod1", config=api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name="app"))
    ).SerializeToString()


def test_a_blocked_event_loop_does_not_delay_passthrough_calls(hooked: Proxy, hooks: ScriptedHooks,
                                                               own_fake: FakeRuntime) -> None:
    hooks.mode = "block"
    with grpc.insecure_channel(hooked.config.listen.target) as chan:
        chan.unary_unary(VERSION)(b"", timeout=5)  # connected before the stall
        pending = chan.unary_unary(CREATE).future(create_request(), timeout=10)
        assert hooks.entered.wait(5), "the intercepted call never reached the hooks"
        began = time.monotonic()
        raw = chan.unary_unary(VERSION)(b"", timeout=5)
        took = time.monotonic() - began
        assert api_pb2.VersionResponse.FromString(raw).runtime_name == "fake-runtime"
        assert took < 1.0, f"a passthrough call waited {took:.2f} s on the stalled loop"
        assert not pending.done(), "the stall ended before the passthrough call: the test proved nothing"
        assert pending.result(timeout=10) == b""  # the intercepted call still completes after the stall


def test_hooks_that_never_answer_fail_the_call_closed_at_its_deadline(hooked: Proxy, hooks: ScriptedHooks,
                                                                      own_fake: FakeRuntime) -> None:
    hooks.mode = "hang"
    with grpc.insecure_channel(hooked.config.listen.target) as chan:
        began = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            chan.unary_unary(CREATE)(create_request(), timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - began < 3
        assert own_fake.received("RuntimeService/CreateContainer") == [], "an unanswered call must not be forwarded"
        raw = chan.unary_unary(VERSION)(b"", timeout=5)
        assert api_pb2.VersionResponse.FromString(raw).runtime_name == "fake-runtime"


@pytest.mark.parametrize("waits", [True, False], ids=["async-after", "plain-after"])
def test_a_failing_after_never_changes_the_callers_answer(hooked: Proxy, hooks: ScriptedHooks,
                                                         own_fake: FakeRuntime, waits: bool) -> None:
    hooks.after_raises, hooks.after_waits = True, waits
    metrics = hooked.plane.metrics = CountingMetrics()
    own_fake.script("RuntimeService/CreateContainer", Reply(messages=[b"\x0a\x03cid"]))
    with grpc.insecure_channel(hooked.config.listen.target) as chan:
        assert chan.unary_unary(CREATE)(create_request(), timeout=5) == b"\x0a\x03cid"
    eventually(lambda: hooks.observed == [b"\x0a\x03cid"], "after() observed the answer")
    eventually(lambda: metrics.internal == ["after"], "the failure counted as an internal error in after")
    assert len(own_fake.received("RuntimeService/CreateContainer")) == 1


def test_a_compressed_intercepted_request_is_judged_decompressed(hooked: Proxy, hooks: ScriptedHooks,
                                                                 own_fake: FakeRuntime) -> None:
    with grpc.insecure_channel(hooked.config.listen.target, compression=grpc.Compression.Gzip) as chan:
        assert chan.unary_unary(CREATE)(create_request(), timeout=5) == b""
    (seen,) = hooks.seen
    assert isinstance(seen, api_pb2.CreateContainerRequest)
    assert seen.config.metadata.name == "app"
    (received,) = own_fake.received("RuntimeService/CreateContainer")
    assert api_pb2.CreateContainerRequest.FromString(received.request).pod_sandbox_id == "pod1"


def test_a_grpcio_client_with_default_options_is_served(proxy: Proxy, fake: FakeRuntime) -> None:
    # grpcio sends the socket path, percent-encoded, as :authority: h2 alone would refuse every call.
    with grpc.insecure_channel(proxy.config.listen.target) as chan:
        for _ in range(3):  # later calls refer to the first one's headers through the HPACK table
            raw = chan.unary_unary(VERSION)(b"", timeout=5)
            assert api_pb2.VersionResponse.FromString(raw).runtime_name == "fake-runtime"
    assert len(fake.received("RuntimeService/Version")) == 3


def test_the_data_plane_counts_calls_by_method_and_code(proxy: Proxy, fake: FakeRuntime) -> None:
    fake.script("RuntimeService/ContainerStatus", Reply(code=grpc.StatusCode.NOT_FOUND, details="gone"))
    with grpc.insecure_channel(proxy.config.listen.target) as chan:
        chan.unary_unary(VERSION)(b"", timeout=5)
        with pytest.raises(grpc.RpcError):
            chan.unary_unary("/runtime.v1.RuntimeService/ContainerStatus")(b"", timeout=5)
    eventually(lambda: proxy.plane.native.in_flight() == 0, "both calls ended")
    calls = {(m, c): n for m, c, n, *_ in proxy.plane.native.snapshot()["calls"]}
    assert calls == {("RuntimeService/Version", "OK"): 1, ("RuntimeService/ContainerStatus", "NOT_FOUND"): 1}
