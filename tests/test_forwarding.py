"""Every CRI call crosses the proxy byte for byte, with its metadata, deadline and status."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import grpc
import pytest

from criproxy.api.runtime.v1 import api_pb2
from criproxy.config import ServeConfig
from criproxy.cri.methods import METHODS
from criproxy.server import Proxy, start_proxy
from tests.support.fakeruntime import FakeRuntime, Reply
from tests.support.loopthread import LoopThread

UNARY = sorted(k for k, m in METHODS.items() if not m.server_streaming)
STREAMS = sorted(k for k, m in METHODS.items() if m.server_streaming)


def sample_request(key: str) -> bytes:
    """A non-empty, distinctive request for any method: an unknown field the proxy must not touch."""
    # Field 999, length-delimited: not in any CRI message, so only a byte-exact relay keeps it.
    return b"\xba\x3e\x0b" + key.encode()[:11].ljust(11, b".")


def test_the_table_has_all_43_methods() -> None:
    assert len(METHODS) == 43
    assert len(STREAMS) == 7


@pytest.mark.parametrize("key", UNARY)
def test_unary_method_is_relayed_byte_for_byte(key: str, fake: FakeRuntime, channel: grpc.Channel) -> None:
    response = b"\x0a\x03abc" + sample_request(key)
    fake.script(key, Reply(messages=[response]))
    request = sample_request(key)
    got = channel.unary_unary(f"/runtime.v1.{key}")(request, timeout=5)
    assert got == response
    (seen,) = fake.received(key)
    assert seen.path == f"/runtime.v1.{key}"
    assert seen.request == request


@pytest.mark.parametrize("key", STREAMS)
def test_server_stream_is_relayed_message_by_message(key: str, fake: FakeRuntime, channel: grpc.Channel) -> None:
    messages = [sample_request(key) + bytes([i]) for i in range(5)]
    fake.script(key, Reply(messages=messages, trailing_metadata=(("x-end", "done"),)))
    call = channel.unary_stream(f"/runtime.v1.{key}")(sample_request(key), timeout=5)
    assert list(call) == messages
    assert call.code() == grpc.StatusCode.OK
    assert dict(call.trailing_metadata())["x-end"] == "done"
    (seen,) = fake.received(key)
    assert seen.request == sample_request(key)


def test_unknown_method_is_forwarded_not_refused(fake: FakeRuntime, channel: grpc.Channel) -> None:
    path = "/runtime.v1.RuntimeService/SomeFutureMethod"
    fake.add_path(path, "unary")
    fake.script(path, Reply(messages=[b"\x08\x2a"], trailing_metadata=(("x-new", "yes"),)))
    response, call = channel.unary_unary(path).with_call(b"\x08\x01", timeout=5)
    assert response == b"\x08\x2a"
    assert dict(call.trailing_metadata())["x-new"] == "yes"
    assert fake.received(path)[0].request == b"\x08\x01"


def test_unknown_server_stream_is_forwarded(fake: FakeRuntime, channel: grpc.Channel) -> None:
    path = "/runtime.v1.ImageService/StreamSomethingNew"
    fake.add_path(path, "server_stream")
    fake.script(path, Reply(messages=[b"a", b"bb", b"ccc"]))
    assert list(channel.unary_stream(path)(b"q", timeout=5)) == [b"a", b"bb", b"ccc"]


def test_unknown_service_outside_the_cri_is_forwarded(fake: FakeRuntime, channel: grpc.Channel) -> None:
    path = "/containerd.services.version.v1.Version/Version"
    fake.add_path(path, "unary")
    fake.script(path, Reply(messages=[b"\x0a\x01x"]))
    assert channel.unary_unary(path)(b"", timeout=5) == b"\x0a\x01x"


def test_method_the_runtime_lacks_answers_its_unimplemented(fake: FakeRuntime, channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary("/runtime.v1.RuntimeService/NoSuchMethod")(b"", timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNKNOWN])
def test_runtime_errors_come_back_unchanged(code: grpc.StatusCode, fake: FakeRuntime, channel: grpc.Channel) -> None:
    trailers = (("x-why", "because"), ("grpc-status-details-bin", b"\x08\x05\x12\x03nf!"))
    fake.script("RuntimeService/ContainerStatus",
                Reply(code=code, details=f"container \"abc\" {code.name}", trailing_metadata=trailers))
    with pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary("/runtime.v1.RuntimeService/ContainerStatus")(b"\x0a\x03abc", timeout=5)
    err = caught.value
    assert err.code() == code
    assert err.details() == f"container \"abc\" {code.name}"
    got = dict(err.trailing_metadata())
    assert got["x-why"] == "because"
    assert got["grpc-status-details-bin"] == b"\x08\x05\x12\x03nf!"


def test_stream_error_after_messages_comes_back(fake: FakeRuntime, channel: grpc.Channel) -> None:
    fake.script("RuntimeService/GetContainerEvents",
                Reply(messages=[b"\x0a\x01a"], code=grpc.StatusCode.INTERNAL, details="event bus broke",
                      trailing_metadata=(("x-t", "1"),)))
    call = channel.unary_stream("/runtime.v1.RuntimeService/GetContainerEvents")(b"", timeout=5)
    got = []
    with pytest.raises(grpc.RpcError):
        for message in call:
            got.append(message)
    assert got == [b"\x0a\x01a"]
    assert call.code() == grpc.StatusCode.INTERNAL
    assert call.details() == "event bus broke"
    assert dict(call.trailing_metadata())["x-t"] == "1"


def test_metadata_travels_both_ways(fake: FakeRuntime, channel: grpc.Channel) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    fake.script("RuntimeService/Version", Reply(messages=[b""], initial_metadata=(("x-runtime-initial", "i"),),
                                                trailing_metadata=(("x-runtime-trailer", "t"),)))
    _, call = channel.unary_unary("/runtime.v1.RuntimeService/Version").with_call(
        b"", timeout=5, metadata=(("traceparent", traceparent), ("x-bin", b"\x00\xff")))
    seen = fake.received("RuntimeService/Version")[-1]
    assert seen.metadata["traceparent"] == traceparent
    assert seen.metadata["x-bin"] == b"\x00\xff"
    assert dict(call.initial_metadata())["x-runtime-initial"] == "i"
    assert dict(call.trailing_metadata())["x-runtime-trailer"] == "t"


def test_callers_deadline_becomes_the_upstream_deadline(fake: FakeRuntime, channel: grpc.Channel) -> None:
    channel.unary_unary("/runtime.v1.RuntimeService/ListContainers")(b"", timeout=100)
    seen = fake.received("RuntimeService/ListContainers")[-1]
    assert seen.time_remaining is not None
    # gRPC rounds a deadline up when it encodes it (grpc-timeout), so each hop may add up to ~1 s.
    assert 90.0 < seen.time_remaining <= 102.0


def test_no_deadline_means_none_upstream(fake: FakeRuntime, channel: grpc.Channel) -> None:
    channel.unary_unary("/runtime.v1.RuntimeService/ListContainers")(b"")
    assert fake.received("RuntimeService/ListContainers")[-1].time_remaining is None


def test_hanging_runtime_gets_the_callers_deadline(fake: FakeRuntime, channel: grpc.Channel) -> None:
    fake.script("RuntimeService/StopContainer", Reply(hang=True))
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary("/runtime.v1.RuntimeService/StopContainer")(b"", timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 3


def test_a_10_mib_response_crosses(fake: FakeRuntime, channel: grpc.Channel) -> None:
    big = api_pb2.ListContainersResponse(
        containers=[api_pb2.Container(id=f"{i:064x}", labels={"k": "v" * 1000}) for i in range(10_000)]
    ).SerializeToString()
    assert len(big) > 10 * 1024 * 1024
    fake.script("RuntimeService/ListContainers", Reply(messages=[big]))
    got = channel.unary_unary("/runtime.v1.RuntimeService/ListContainers")(b"", timeout=30)
    assert got == big


def test_over_the_limit_is_resource_exhausted_and_the_proxy_keeps_serving(
        fake: FakeRuntime, channel: grpc.Channel) -> None:
    fake.script("RuntimeService/ListContainers", Reply(messages=[b"x" * (17 * 1024 * 1024)]))
    with pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary("/runtime.v1.RuntimeService/ListContainers")(b"", timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary("/runtime.v1.RuntimeService/ListContainers")(b"y" * (17 * 1024 * 1024), timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert channel.unary_unary("/runtime.v1.RuntimeService/Version")(b"", timeout=5)


def test_caller_cancelling_a_stream_cancels_it_upstream(fake: FakeRuntime, channel: grpc.Channel,
                                                        loop: object) -> None:
    fake.script("RuntimeService/GetContainerEvents", Reply(messages=[b"e"] * 1000, delay=0.05))
    call = channel.unary_stream("/runtime.v1.RuntimeService/GetContainerEvents")(b"", timeout=30)
    assert next(call) == b"e"
    call.cancel()
    deadline = time.monotonic() + 5
    while not fake.received("RuntimeService/GetContainerEvents")[-1].cancelled:
        assert time.monotonic() < deadline, "the runtime's stream was not cancelled"
        time.sleep(0.02)


def test_runtime_ending_a_stream_ends_it_for_the_caller(fake: FakeRuntime, channel: grpc.Channel) -> None:
    fake.script("ImageService/StreamImages", Reply(messages=[b"1", b"2"]))
    call = channel.unary_stream("/runtime.v1.ImageService/StreamImages")(b"", timeout=5)
    assert list(call) == [b"1", b"2"]
    assert call.code() == grpc.StatusCode.OK


def test_concurrent_calls_are_not_mixed_up(fake: FakeRuntime, channel: grpc.Channel) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(20):
                request = api_pb2.ContainerStatusRequest(container_id=f"c-{n}-{i}").SerializeToString()
                channel.unary_unary("/runtime.v1.RuntimeService/ContainerStatus")(request, timeout=5)
        except BaseException as err:  # collected and re-raised in the main thread
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    ids = sorted(api_pb2.ContainerStatusRequest.FromString(r.request).container_id
                 for r in fake.received("RuntimeService/ContainerStatus"))
    assert ids == sorted(f"c-{n}-{i}" for n in range(8) for i in range(20))


def test_proxy_fixture_is_what_serves(proxy: Proxy, fake: FakeRuntime, channel: grpc.Channel) -> None:
    raw = channel.unary_unary("/runtime.v1.RuntimeService/Version")(b"", timeout=5)
    assert api_pb2.VersionResponse.FromString(raw).runtime_name == "fake-runtime"
    assert proxy.runtime.api == "v1"


def test_unknown_streaming_caller_gets_a_stream_upstream(fake: FakeRuntime, channel: grpc.Channel) -> None:
    path = "/runtime.v1.RuntimeService/UploadSomethingNew"
    fake.add_path(path, "bidi")
    fake.script(path, Reply(messages=[b"ack"]))
    response = channel.stream_unary(path)(iter([b"one", b"two", b"three"]), timeout=5)
    assert response == b"ack"
    assert fake.received(path)[-1].requests == [b"one", b"two", b"three"]


def test_unknown_method_with_an_early_runtime_error_keeps_its_status(fake: FakeRuntime,
                                                                    channel: grpc.Channel) -> None:
    path = "/runtime.v1.RuntimeService/RejectedAtOnce"
    fake.add_path(path, "unary")
    fake.script(path, Reply(code=grpc.StatusCode.FAILED_PRECONDITION, details="not now"))
    for _ in range(20):  # the race this guards against was timing-dependent
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(path)(b"x", timeout=5)
        assert (caught.value.code(), caught.value.details()) == (grpc.StatusCode.FAILED_PRECONDITION, "not now")


def test_a_hung_runtime_cannot_make_the_proxy_queue_without_bound(loop: LoopThread, fake: FakeRuntime,
                                                                  proxy_config: ServeConfig) -> None:
    config = replace(proxy_config, max_concurrent_calls=4)
    proxy = loop.run(start_proxy(config))
    fake.script("RuntimeService/ExecSync", Reply(hang=True))
    try:
        with grpc.insecure_channel(proxy.config.listen.target) as chan:
            hung = [chan.unary_unary("/runtime.v1.RuntimeService/ExecSync").future(b"", timeout=30)
                    for _ in range(4)]
            deadline = time.monotonic() + 5
            while len(fake.received("RuntimeService/ExecSync")) < 4:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            began = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                chan.unary_unary("/runtime.v1.RuntimeService/Version")(b"", timeout=10)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() - began < 2, "the call over the limit must fail at once, not queue"
            for future in hung:
                future.cancel()
            deadline = time.monotonic() + 5
            while True:  # the slots free up as the hung calls are cancelled
                try:
                    chan.unary_unary("/runtime.v1.RuntimeService/Version")(b"", timeout=5)
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
    finally:
        loop.run(proxy.stop(0))


# Streams: the data plane holds no messages of its own; the HTTP/2 windows bound what is in flight.

EVENTS = "/runtime.v1.RuntimeService/GetContainerEvents"
BIG = 256 * 1024
#: HTTP/2 flow control lets the runtime->proxy and proxy->caller connections hold messages (the
#: windows on both sides of each hop, and gRPC's own buffers); 80 of these 256 KiB ones is 20 MiB.
TRANSPORT_SLACK = 80


class CountedMessages(list[bytes]):
    """A Reply's messages that know how many the fake runtime has taken, and whether its stream ended."""

    def __init__(self, messages: list[bytes]) -> None:
        super().__init__(messages)
        self.taken = 0
        self.ended = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            for message in list.__iter__(self):
                self.taken += 1
                yield message
        finally:  # the runtime's handler ended: every message sent, or its call cancelled
            self.ended = True


def big_messages(count: int) -> CountedMessages:
    """`count` messages of 256 KiB, eight distinct ones in turn (so order is checked, memory kept small)."""
    payloads = [bytes([i]) * BIG for i in range(8)]
    return CountedMessages([payloads[i % 8] for i in range(count)])


def settled(value: Callable[[], int], quiet: float = 0.3, timeout: float = 10.0) -> int:
    """`value()` once it stayed the same for `quiet` seconds (bounded)."""
    deadline = time.monotonic() + timeout
    last, since = value(), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "still changing"
        time.sleep(0.02)
        now = value()
        if now != last:
            last, since = now, time.monotonic()
    return last


def calls_in_flight(proxy: Proxy) -> int:
    """Calls the data plane is serving now, streams included."""
    return proxy.plane.native.in_flight()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_slow_caller_slows_the_runtimes_stream(fake: FakeRuntime, channel: grpc.Channel) -> None:
    messages = big_messages(200)  # 50 MiB: a relay that buffers without bound takes them all at once
    fake.script("RuntimeService/GetContainerEvents", Reply(messages=messages))
    call = channel.unary_stream(EVENTS)(b"", timeout=60)
    assert next(call) == messages[0]
    taken = settled(lambda: messages.taken)  # the caller reads no more: the runtime must stop
    # One read by the caller, the rest in flow-control windows: the proxy buffers nothing itself.
    assert taken <= 1 + TRANSPORT_SLACK < len(messages)
    count = 1
    for i, message in enumerate(call, start=1):  # the caller catches up: all of it, in order
        assert message == messages[i]
        count += 1
    assert count == len(messages)
    assert call.code() == grpc.StatusCode.OK


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_a_caller_leaving_a_stream_ends_it_in_the_proxy_and_at_the_runtime(
        how: str, proxy: Proxy, fake: FakeRuntime, channel: grpc.Channel) -> None:
    messages = big_messages(200)
    fake.script("RuntimeService/GetContainerEvents", Reply(messages=messages))
    call = channel.unary_stream(EVENTS)(b"", timeout=60 if how == "cancel" else 2)
    assert next(call) == messages[0]
    settled(lambda: messages.taken)  # the windows are full: the runtime waits
    assert calls_in_flight(proxy) == 1
    if how == "cancel":
        call.cancel()
    else:
        with pytest.raises(grpc.RpcError) as caught:
            for _ in call:
                time.sleep(1)  # a caller too slow for its own deadline
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: calls_in_flight(proxy) == 0, "the call outlived its caller in the proxy")
    wait_for(lambda: messages.ended, "the runtime's stream was not cancelled")
    assert messages.taken < len(messages)
    assert channel.unary_unary("/runtime.v1.RuntimeService/Version")(b"", timeout=5)


@pytest.mark.parametrize("code", [None, grpc.StatusCode.INTERNAL])
@pytest.mark.parametrize("path", [EVENTS, "/runtime.v1.RuntimeService/StreamSomethingNew"])
def test_a_long_stream_keeps_order_metadata_and_status(
        code: grpc.StatusCode | None, path: str, proxy: Proxy, fake: FakeRuntime, channel: grpc.Channel) -> None:
    if path != EVENTS:
        fake.add_path(path, "server_stream")  # unknown to the proxy: relayed through its fallback
    messages = [b"\x0a\x02" + i.to_bytes(2, "big") for i in range(101)]
    fake.script(path, Reply(messages=messages, code=code, details="event bus broke" if code else "",
                            initial_metadata=(("x-first", "1"),), trailing_metadata=(("x-last", "2"),)))
    call = channel.unary_stream(path)(b"", timeout=10)
    got: list[bytes] = []
    if code is None:
        got.extend(call)
    else:
        with pytest.raises(grpc.RpcError):
            got.extend(call)
    assert got == messages
    assert call.code() == (code or grpc.StatusCode.OK)
    if code is not None:
        assert call.details() == "event bus broke"
    assert dict(call.initial_metadata())["x-first"] == "1"
    assert dict(call.trailing_metadata())["x-last"] == "2"
    wait_for(lambda: calls_in_flight(proxy) == 0, "the call outlived its stream in the proxy")


def test_many_distinct_unknown_paths_count_as_one_label(proxy: Proxy, fake: FakeRuntime,
                                                        channel: grpc.Channel) -> None:
    for i in range(300):
        with pytest.raises(grpc.RpcError) as caught:  # the fake runtime has none of them
            channel.unary_unary(f"/runtime.v1.RuntimeService/Made_Up_{i}")(b"", timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    calls = proxy.plane.native.snapshot()["calls"]
    assert [(method, code, count) for method, code, count, *_ in calls] == [("other", "UNIMPLEMENTED", 300)]
    raw = channel.unary_unary("/runtime.v1.RuntimeService/Version")(b"", timeout=5)
    assert api_pb2.VersionResponse.FromString(raw).runtime_name == "fake-runtime"
