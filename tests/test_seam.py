"""The interception seam: decoded methods reach a hook as typed messages; nothing else is decoded."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.message import Message

from criproxy.api.runtime.v1 import api_pb2
from criproxy.config import ServeConfig
from criproxy.errors import PermissionDenied
from criproxy.seam import Call
from criproxy.server import Proxy, start_proxy
from tests.support.fakeruntime import FakeRuntime, Reply
from tests.support.loopthread import LoopThread
from tests.support.waiting import eventually

UNKNOWN_FIELD = b"\xba\x3e\x05hello"  # field 999, length-delimited: no CRI message has it


class RecordingHooks:
    decoded = frozenset({"RuntimeService/CreateContainer"})

    def __init__(self) -> None:
        self.seen: list[tuple[str, Message]] = []
        self.responses: list[bytes] = []
        self.fail_with: Exception | None = None

    async def before(self, call: Call, request: Message) -> Message:
        self.seen.append((call.method.key, request))
        if self.fail_with is not None:
            raise self.fail_with
        assert isinstance(request, api_pb2.CreateContainerRequest)
        request.config.annotations["criproxy.io/applied"] = "test"
        return request

    async def after(self, call: Call, request: Message, response: bytes) -> None:
        self.responses.append(response)


@pytest.fixture
def hooks() -> RecordingHooks:
    return RecordingHooks()


@pytest.fixture
def hooked(loop: LoopThread, fake: FakeRuntime, proxy_config: ServeConfig, hooks: RecordingHooks) -> Iterator[Proxy]:
    proxy = loop.run(start_proxy(proxy_config, hooks))
    fake.journal.clear()
    yield proxy
    loop.run(proxy.stop(0))


def call(proxy: Proxy, path: str, request: bytes) -> bytes:
    with grpc.insecure_channel(proxy.config.listen.target) as chan:
        result: bytes = chan.unary_unary(path)(request, timeout=5)
        return result


def create_request() -> bytes:
    request = api_pb2.CreateContainerRequest(
        pod_sandbox_id="pod1", config=api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name="app")))
    return request.SerializeToString() + UNKNOWN_FIELD


def test_decoded_method_is_changed_and_keeps_unknown_fields(hooked: Proxy, fake: FakeRuntime,
                                                            hooks: RecordingHooks) -> None:
    fake.script("RuntimeService/CreateContainer", Reply(messages=[b"\x0a\x03cid"]))
    for api in ("v1", "v1alpha2"):
        assert call(hooked, f"/runtime.{api}.RuntimeService/CreateContainer", create_request()) == b"\x0a\x03cid"
        sent = fake.received("RuntimeService/CreateContainer")[-1].request
        assert sent.endswith(UNKNOWN_FIELD) or UNKNOWN_FIELD in sent
        got = api_pb2.CreateContainerRequest.FromString(sent)
        assert got.config.annotations["criproxy.io/applied"] == "test"
        assert got.config.metadata.name == "app"
    assert [key for key, _ in hooks.seen] == ["RuntimeService/CreateContainer"] * 2
    # `after` observes the answer as it goes to the caller: it may land just after the call returns.
    eventually(lambda: hooks.responses == [b"\x0a\x03cid"] * 2, "after() saw both responses")


def test_other_methods_are_not_decoded(hooked: Proxy, fake: FakeRuntime, hooks: RecordingHooks) -> None:
    # Not a valid ListContainersRequest: a relay that decoded it would fail.
    garbage = b"\xff\xff\xff"
    call(hooked, "/runtime.v1.RuntimeService/ListContainers", garbage)
    assert fake.received("RuntimeService/ListContainers")[-1].request == garbage
    assert hooks.seen == []


def test_undecodable_request_is_invalid_argument_and_not_forwarded(hooked: Proxy, fake: FakeRuntime) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call(hooked, "/runtime.v1.RuntimeService/CreateContainer", b"\x0a\xff\xff")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("criproxy: cannot decode the RuntimeService/CreateContainer request: ")
    assert fake.received("RuntimeService/CreateContainer") == []


def test_hook_refusal_becomes_its_status_and_nothing_is_forwarded(hooked: Proxy, fake: FakeRuntime,
                                                                   hooks: RecordingHooks) -> None:
    hooks.fail_with = PermissionDenied("criproxy: pod default/x may not use runtime handler kata")
    with pytest.raises(grpc.RpcError) as caught:
        call(hooked, "/runtime.v1.RuntimeService/CreateContainer", create_request())
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == "criproxy: pod default/x may not use runtime handler kata"
    assert fake.received("RuntimeService/CreateContainer") == []


def test_a_bug_in_a_hook_fails_closed(hooked: Proxy, fake: FakeRuntime, hooks: RecordingHooks) -> None:
    hooks.fail_with = KeyError("oops")
    with pytest.raises(grpc.RpcError) as caught:
        call(hooked, "/runtime.v1.RuntimeService/CreateContainer", create_request())
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "internal error handling RuntimeService/CreateContainer" in caught.value.details()
    assert fake.received("RuntimeService/CreateContainer") == []


def test_runtime_error_on_a_decoded_method_comes_back_unchanged(hooked: Proxy, fake: FakeRuntime,
                                                                 hooks: RecordingHooks) -> None:
    fake.script("RuntimeService/CreateContainer",
                Reply(code=grpc.StatusCode.NOT_FOUND, details="sandbox pod1 not found",
                      trailing_metadata=(("x-a", "b"),)))
    with pytest.raises(grpc.RpcError) as caught:
        call(hooked, "/runtime.v1.RuntimeService/CreateContainer", create_request())
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "sandbox pod1 not found"
    assert dict(caught.value.trailing_metadata())["x-a"] == "b"
    assert hooks.responses == []
