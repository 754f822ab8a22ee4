"""The interceptor pipeline through the proxy, against the fake runtime that journals what it receives."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from criproxy.adjust import Adjustment, Change
from criproxy.annotations import Lookup
from criproxy.api.runtime.v1 import api_pb2
from criproxy.config import ServeConfig
from criproxy.context import CREATE_CONTAINER, RUN_POD_SANDBOX, CallContext
from criproxy.pipeline import Pipeline
from criproxy.server import Proxy, start_proxy
from tests.support.fakeruntime import FakeRuntime, Reply
from tests.support.loopthread import LoopThread

UNKNOWN_FIELD = b"\xba\x3e\x05hello"  # field 999: not in any CRI message
APPLIED = "criproxy.io/applied"


def call(proxy: Proxy, key: str, request: bytes) -> bytes:
    with grpc.insecure_channel(proxy.config.listen.target) as chan:
        response: bytes = chan.unary_unary(f"/runtime.v1.{key}")(request, timeout=10)
        return response


def pod_config(annotations: dict[str, str], namespace: str = "criproxy-demo",
               name: str = "web") -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, uid="uid-1", namespace=namespace),
        annotations=annotations)


def create_request(annotations: dict[str, str], container: str = "app", memory: int = 1 << 30) -> bytes:
    return api_pb2.CreateContainerRequest(
        pod_sandbox_id="pod-1",
        config=api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name=container),
            linux=api_pb2.LinuxContainerConfig(resources=api_pb2.LinuxContainerResources(
                cpu_period=100_000, cpu_quota=200_000, cpu_shares=2048, memory_limit_in_bytes=memory))),
        sandbox_config=pod_config(annotations)).SerializeToString()


def sent(fake: FakeRuntime, key: str, message: Any) -> Any:
    return message.FromString(fake.received(key)[-1].request)


def test_plain_pods_pass_byte_for_byte(configured: Any, fake: FakeRuntime) -> None:
    proxy = configured()
    run = api_pb2.RunPodSandboxRequest(config=pod_config({})).SerializeToString() + UNKNOWN_FIELD
    for key, request in ((RUN_POD_SANDBOX, run), (CREATE_CONTAINER, create_request({}) + UNKNOWN_FIELD)):
        call(proxy, key, request)
        assert fake.received(key)[-1].request == request


def test_annotations_are_applied_with_provenance_and_unknown_fields_kept(configured: Any, fake: FakeRuntime) -> None:
    proxy = configured()
    fake.script(CREATE_CONTAINER, Reply(messages=[api_pb2.CreateContainerResponse(
        container_id="c1").SerializeToString()]))
    annotations = {"memory-limit.criproxy.io/container.app": "512Mi", "cpu-quota.criproxy.io/pod": "500m",
                   "seccomp-profile.criproxy.io/pod": "runtime/default"}
    call(proxy, CREATE_CONTAINER, create_request(annotations) + UNKNOWN_FIELD)
    raw = fake.received(CREATE_CONTAINER)[-1].request
    assert UNKNOWN_FIELD in raw
    got = api_pb2.CreateContainerRequest.FromString(raw)
    resources = got.config.linux.resources
    assert resources.memory_limit_in_bytes == 512 << 20
    assert resources.cpu_quota == 50_000
    assert resources.cpu_shares == 2048  # untouched
    assert got.config.linux.security_context.seccomp.profile_type == api_pb2.SecurityProfile.RuntimeDefault
    applied = json.loads(got.config.annotations[APPLIED])
    # Configured order: seccomp before resources; within resources, the order it proposes them.
    assert [(e["by"], e["field"], e["value"], e["was"], e["key"]) for e in applied] == [
        ("seccomp", "config.linux.security_context.seccomp", {"profile_type": "RuntimeDefault"}, None,
         "seccomp-profile.criproxy.io/pod"),
        ("resources", "config.linux.resources.cpu_quota", 50_000, 200_000, "cpu-quota.criproxy.io/pod"),
        ("resources", "config.linux.resources.memory_limit_in_bytes", 512 << 20, 1 << 30,
         "memory-limit.criproxy.io/container.app"),
    ]


def test_bad_annotation_is_invalid_argument_and_never_reaches_the_runtime(configured: Any,
                                                                          fake: FakeRuntime) -> None:
    proxy = configured()
    with pytest.raises(grpc.RpcError) as caught:
        call(proxy, CREATE_CONTAINER, create_request({"memory-limit.criproxy.io/pod": "lots"}))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        "criproxy: container 'app' of pod criproxy-demo/web: annotation memory-limit.criproxy.io/pod='lots': "
        "expected a memory limit as a quantity of bytes (e.g. 512Mi, 2Gi), at least 4194304")
    assert fake.received(CREATE_CONTAINER) == []


def test_loosening_is_denied_and_never_reaches_the_runtime(configured: Any, fake: FakeRuntime) -> None:
    proxy = configured()
    with pytest.raises(grpc.RpcError) as caught:
        call(proxy, CREATE_CONTAINER, create_request({"memory-limit.criproxy.io/pod": "2Gi"}))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "would loosen memory_limit_in_bytes from 1073741824 (set by the kubelet) to 2147483648" in (
        caught.value.details())
    assert fake.received(CREATE_CONTAINER) == []


def test_loosening_allowed_by_config(configured: Any, fake: FakeRuntime) -> None:
    proxy = configured("resources:\n  allow-loosening: [memory-limit]\n")
    call(proxy, CREATE_CONTAINER, create_request({"memory-limit.criproxy.io/pod": "2Gi"}))
    got = sent(fake, CREATE_CONTAINER, api_pb2.CreateContainerRequest)
    assert got.config.linux.resources.memory_limit_in_bytes == 2 << 30


def test_disabled_interceptor_ignores_its_annotations(configured: Any, fake: FakeRuntime) -> None:
    proxy = configured("interceptors: [seccomp]\n")
    request = create_request({"memory-limit.criproxy.io/pod": "512Mi"})
    call(proxy, CREATE_CONTAINER, request)
    assert fake.received(CREATE_CONTAINER)[-1].request == request


def test_no_interceptors_decodes_nothing(configured: Any, fake: FakeRuntime) -> None:
    proxy = configured("interceptors: []\n")
    assert proxy.pipeline is None
    garbage = b"\x0a\xff\xff"  # not a valid CreateContainerRequest: only a pure relay passes it
    call(proxy, CREATE_CONTAINER, garbage)
    assert fake.received(CREATE_CONTAINER)[-1].request == garbage


def test_runtime_handler_is_checked_against_the_configured_list(configured: Any, fake: FakeRuntime) -> None:
    # The fake runtime reports no handlers, so the configured list is what is known.
    proxy = configured("runtime-handler:\n  known: [runc, kata]\n")
    request = api_pb2.RunPodSandboxRequest(config=pod_config({"runtime-handler.criproxy.io/pod": "gvisor"}))
    with pytest.raises(grpc.RpcError) as caught:
        call(proxy, RUN_POD_SANDBOX, request.SerializeToString())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        "criproxy: pod criproxy-demo/web: annotation runtime-handler.criproxy.io/pod='gvisor': the runtime has no "
        "handler 'gvisor'; known handlers: kata, runc (from the runtime-handler interceptor's `known` list)")
    request.config.annotations["runtime-handler.criproxy.io/pod"] = "kata"
    call(proxy, RUN_POD_SANDBOX, request.SerializeToString())
    assert sent(fake, RUN_POD_SANDBOX, api_pb2.RunPodSandboxRequest).runtime_handler == "kata"


def test_runtime_handlers_reported_by_the_runtime_win(configured: Any, fake: FakeRuntime) -> None:
    fake.script("RuntimeService/Status", Reply(messages=[api_pb2.StatusResponse(
        runtime_handlers=[api_pb2.RuntimeHandler(name="runc"), api_pb2.RuntimeHandler(name="youki")]
    ).SerializeToString()]))
    proxy = configured("runtime-handler:\n  known: [kata]\n")
    assert proxy.pipeline is not None
    assert proxy.pipeline.facts.handlers == {"runc", "youki"}
    request = api_pb2.RunPodSandboxRequest(config=pod_config({"runtime-handler.criproxy.io": "kata"}))
    with pytest.raises(grpc.RpcError) as caught:
        call(proxy, RUN_POD_SANDBOX, request.SerializeToString())
    assert "known handlers: runc, youki (from the runtime's Status.runtime_handlers)" in caught.value.details()


class Claims:
    """A test interceptor that sets one field to one value."""

    def __init__(self, name: str, path: str, value: Any) -> None:
        self.name, self.path, self.value = name, path, value
        self.events = frozenset({RUN_POD_SANDBOX})

    def adjust(self, ctx: CallContext) -> Adjustment:
        return Adjustment(changes=(Change(self.path, self.value, "test", f"{self.name}.criproxy.io/pod", "x"),))


def test_two_interceptors_setting_one_field_is_a_named_conflict(loop: LoopThread, fake: FakeRuntime,
                                                                proxy_config: ServeConfig) -> None:
    pipeline = Pipeline([Claims("first", "runtime_handler", "a"), Claims("second", "runtime_handler", "b")],
                        lookup=Lookup())
    proxy = loop.run(start_proxy(proxy_config, pipeline))
    try:
        fake.journal.clear()
        with pytest.raises(grpc.RpcError) as caught:
            call(proxy, RUN_POD_SANDBOX, api_pb2.RunPodSandboxRequest(config=pod_config({})).SerializeToString())
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert caught.value.details() == (
            "criproxy: pod criproxy-demo/web: interceptors first and second both set runtime_handler ('a' from "
            "first.criproxy.io/pod, 'b' from second.criproxy.io/pod); disable one of them or remove one annotation")
        assert fake.received(RUN_POD_SANDBOX) == []
    finally:
        loop.run(proxy.stop(0))


def test_interceptors_run_in_the_configured_order(loop: LoopThread, fake: FakeRuntime,
                                                  proxy_config: ServeConfig) -> None:
    pipeline = Pipeline([Claims("zeta", "config.hostname", "z"), Claims("alpha", "runtime_handler", "a")],
                        lookup=Lookup())
    proxy = loop.run(start_proxy(proxy_config, pipeline))
    try:
        call(proxy, RUN_POD_SANDBOX, api_pb2.RunPodSandboxRequest(config=pod_config({})).SerializeToString())
        got = sent(fake, RUN_POD_SANDBOX, api_pb2.RunPodSandboxRequest)
        assert [e["by"] for e in json.loads(got.config.annotations[APPLIED])] == ["zeta", "alpha"]
    finally:
        loop.run(proxy.stop(0))


def update_request(container_id: str, memory: int = 1 << 30) -> bytes:
    return api_pb2.UpdateContainerResourcesRequest(
        container_id=container_id,
        linux=api_pb2.LinuxContainerResources(cpu_period=100_000, cpu_quota=100_000, memory_limit_in_bytes=memory),
    ).SerializeToString()


def test_update_keeps_the_annotation_using_the_index(configured: Any, fake: FakeRuntime) -> None:
    proxy = configured()
    fake.script(CREATE_CONTAINER, Reply(messages=[api_pb2.CreateContainerResponse(
        container_id="c-42").SerializeToString()]))
    call(proxy, CREATE_CONTAINER, create_request({"memory-limit.criproxy.io/pod": "256Mi"}))
    # The kubelet resizes in place to 2Gi: the annotation still caps it.
    call(proxy, "RuntimeService/UpdateContainerResources", update_request("c-42", memory=2 << 30))
    got = sent(fake, "RuntimeService/UpdateContainerResources", api_pb2.UpdateContainerResourcesRequest)
    assert got.linux.memory_limit_in_bytes == 256 << 20
    assert got.linux.cpu_quota == 100_000
    assert json.loads(got.annotations[APPLIED])[0]["field"] == "linux.memory_limit_in_bytes"


def test_update_of_an_unknown_container_is_forwarded_unchanged(configured: Any, fake: FakeRuntime) -> None:
    proxy = configured()
    request = update_request("nobody")
    call(proxy, "RuntimeService/UpdateContainerResources", request)
    assert fake.received("RuntimeService/UpdateContainerResources")[-1].request == request


def listing(fake: FakeRuntime, annotations: dict[str, str]) -> None:
    """Make the fake runtime list one pod with one container, as after a proxy restart."""
    fake.script("RuntimeService/ListPodSandbox", Reply(messages=[api_pb2.ListPodSandboxResponse(items=[
        api_pb2.PodSandbox(id="pod-1", metadata=pod_config({}).metadata, annotations=annotations)
    ]).SerializeToString()]))
    fake.script("RuntimeService/ListContainers", Reply(messages=[api_pb2.ListContainersResponse(containers=[
        api_pb2.Container(id="c-old", pod_sandbox_id="pod-1", metadata=api_pb2.ContainerMetadata(name="app"))
    ]).SerializeToString()]))


def test_index_is_rebuilt_from_the_runtime_after_a_restart(configured: Any, fake: FakeRuntime) -> None:
    listing(fake, {"memory-limit.criproxy.io/container.app": "128Mi"})
    proxy = configured()
    assert proxy.pipeline is not None
    assert proxy.pipeline.index.container("c-old") is not None
    call(proxy, "RuntimeService/UpdateContainerResources", update_request("c-old"))
    got = sent(fake, "RuntimeService/UpdateContainerResources", api_pb2.UpdateContainerResourcesRequest)
    assert got.linux.memory_limit_in_bytes == 128 << 20


def test_remove_forgets_and_a_miss_is_looked_up_in_the_runtime(configured: Any, fake: FakeRuntime) -> None:
    listing(fake, {"memory-limit.criproxy.io/pod": "64Mi"})
    proxy = configured()
    assert proxy.pipeline is not None
    call(proxy, "RuntimeService/RemoveContainer",
         api_pb2.RemoveContainerRequest(container_id="c-old").SerializeToString())
    assert proxy.pipeline.index.container("c-old") is None
    fake.script("RuntimeService/PodSandboxStatus", Reply(messages=[api_pb2.PodSandboxStatusResponse(
        status=api_pb2.PodSandboxStatus(id="pod-1", metadata=pod_config({}).metadata,
                                        annotations={"memory-limit.criproxy.io/pod": "64Mi"})
    ).SerializeToString()]))
    # Not indexed any more, but the runtime still lists it (e.g. evicted from a full index): looked up.
    call(proxy, "RuntimeService/UpdateContainerResources", update_request("c-old"))
    got = sent(fake, "RuntimeService/UpdateContainerResources", api_pb2.UpdateContainerResourcesRequest)
    assert got.linux.memory_limit_in_bytes == 64 << 20
    call(proxy, "RuntimeService/RemovePodSandbox",
         api_pb2.RemovePodSandboxRequest(pod_sandbox_id="pod-1").SerializeToString())
    assert proxy.pipeline.index.container("c-old") is None
