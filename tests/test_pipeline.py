"""The interceptor pipeline through the proxy, against the fake runtime that journals what it receives."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from typing import Any

import grpc
import pytest

from criproxy.api.runtime.v1 import api_pb2
from criproxy.config import ServeConfig
from criproxy.cri.adjust import Adjustment, Change
from criproxy.cri.annotations import Lookup
from criproxy.cri.context import CREATE_CONTAINER, RUN_POD_SANDBOX, CallContext, RuntimeFacts
from criproxy.errors import FailedPrecondition, Internal
from criproxy.interceptors import build_interceptors
from criproxy.pipeline import Pipeline
from criproxy.pipeline.index import pod_info
from criproxy.policies.engine import AnnotationPolicy
from criproxy.policies.model import parse_policy
from criproxy.server import Proxy, start_proxy
from tests.support.fakeruntime import FakeRuntime, Reply
from tests.support.loopthread import LoopThread
from tests.support.pods import wait_for
from tests.support.waiting import eventually

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
    index = proxy.pipeline.index
    eventually(lambda: index.container("c-old") is None, "the index forgets a removed container")
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
    eventually(lambda: index.container("c-old") is None, "the index forgets a removed sandbox's containers")


# ---------------------------------------------------------------- every decision names what it is about

KINDS_POLICY = """\
apiVersion: criproxy.io/v1alpha1
kind: AnnotationPolicy
interceptors: {{broken: {{onError: {on_error}}}}}
rules:
  - name: demo
    namespaces: [demo]
    mode: {mode}
    settings:
      memory-limit: {{max: 512Mi}}
      runtime-handler: {{values: [kata, runc]}}
      seccomp-profile: {{forbid: [unconfined], effective: true}}
      cpu-shares: {{required: true}}
"""
UPDATE = "RuntimeService/UpdateContainerResources"
MEM = "memory-limit.criproxy.io/pod"
SHARES = {"cpu-shares.criproxy.io/pod": "512"}  # what the rule requires


class Raises:
    name, events = "broken", frozenset({RUN_POD_SANDBOX, CREATE_CONTAINER})

    def adjust(self, ctx: CallContext) -> Adjustment:
        raise RuntimeError("boom")


def kinds_ctx(method: str, annotations: dict[str, str], *, handler: str = "", memory: int = 1 << 30,
              pinned: dict[str, str] | None = None, seccomp: int = api_pb2.SecurityProfile.RuntimeDefault
              ) -> CallContext:
    """A call of pod demo/web (container app) as the pipeline sees it."""
    if method == RUN_POD_SANDBOX:
        run = api_pb2.RunPodSandboxRequest(config=pod_config(annotations, namespace="demo"), runtime_handler=handler)
        run.config.linux.security_context.seccomp.profile_type = seccomp  # type: ignore[assignment]
        return CallContext(method, pod_info(run.config.metadata, {}, run.config.annotations), None, run,
                           RuntimeFacts(frozenset({"runc", "kata"}), "test"))
    if method == CREATE_CONTAINER:
        create = api_pb2.CreateContainerRequest.FromString(create_request(annotations, memory=memory))
        create.sandbox_config.metadata.namespace = "demo"
        create.config.linux.security_context.seccomp.profile_type = seccomp  # type: ignore[assignment]
        s = create.sandbox_config
        return CallContext(method, pod_info(s.metadata, {}, s.annotations), "app", create, pinned=pinned)
    update = api_pb2.UpdateContainerResourcesRequest.FromString(update_request("c1", memory=memory))
    metadata = api_pb2.PodSandboxMetadata(name="web", uid="uid-1", namespace="demo")
    return CallContext(method, pod_info(metadata, {}, annotations), "app", update, pinned=pinned)


#: kind: (mode, the broken interceptor's onError or None, call, the action expected among the call's decisions,
#: the fields that may be '' there: only where nothing of the kind exists)
DECISION_KINDS: dict[str, tuple[str, str | None, CallContext, str, frozenset[str]]] = {
    "applied": ("enforce", None, kinds_ctx(CREATE_CONTAINER, {**SHARES, MEM: "256Mi"}), "applied", frozenset()),
    "applied-kubelet-tighter-on-update": (
        "enforce", None, kinds_ctx(UPDATE, {**SHARES, MEM: "256Mi"}, memory=128 << 20), "applied", frozenset()),
    "denied-loosening": (
        "enforce", None, kinds_ctx(CREATE_CONTAINER, {**SHARES, MEM: "256Mi"}, memory=128 << 20), "denied",
        frozenset()),
    "denied-invalid-annotation": (
        "enforce", None, kinds_ctx(CREATE_CONTAINER, {**SHARES, MEM: "lots"}), "denied", frozenset()),
    "denied-runtime-class": (
        "enforce", None, kinds_ctx(RUN_POD_SANDBOX, {**SHARES, "runtime-handler.criproxy.io": "kata"}, handler="runc"),
        "denied", frozenset()),
    "denied-unknown-handler": (
        "enforce", None, kinds_ctx(RUN_POD_SANDBOX, {**SHARES, "runtime-handler.criproxy.io": "gvisor"}), "denied",
        frozenset()),
    "denied-value": ("enforce", None, kinds_ctx(CREATE_CONTAINER, {**SHARES, MEM: "768Mi"}), "denied", frozenset()),
    "denied-unlisted-setting": (
        "enforce", None, kinds_ctx(CREATE_CONTAINER, {**SHARES, "cpu-quota.criproxy.io/pod": "500m"}), "denied",
        frozenset()),
    "denied-required": ("enforce", None, kinds_ctx(CREATE_CONTAINER, {}), "denied", frozenset()),
    "denied-drift": ("enforce", None, kinds_ctx(CREATE_CONTAINER, {**SHARES, MEM: "256Mi"}, pinned={
        **SHARES, MEM: "128Mi", "cpu-quota.criproxy.io/pod": "1"}), "denied", frozenset()),
    # the kubelet's value, not an annotation's: no annotation to name
    "denied-effective": (
        "enforce", None, kinds_ctx(RUN_POD_SANDBOX, SHARES, seccomp=api_pb2.SecurityProfile.Unconfined), "denied",
        frozenset({"key"})),
    "audited-value": ("audit", None, kinds_ctx(CREATE_CONTAINER, {**SHARES, MEM: "768Mi"}), "audited", frozenset()),
    "audited-loosening": (
        "audit", None, kinds_ctx(CREATE_CONTAINER, {**SHARES, MEM: "256Mi"}, memory=128 << 20), "audited",
        frozenset()),
    "dry-run-change": ("dry-run", None, kinds_ctx(CREATE_CONTAINER, {**SHARES, MEM: "256Mi"}), "dry-run", frozenset()),
    "dry-run-invalid-annotation": (
        "dry-run", None, kinds_ctx(CREATE_CONTAINER, {**SHARES, MEM: "lots"}), "dry-run", frozenset()),
    # an interceptor that failed: no setting and no annotation is to blame
    "dry-run-failing-closed": ("dry-run", "closed", kinds_ctx(RUN_POD_SANDBOX, SHARES), "dry-run",
                               frozenset({"setting", "key"})),
    # (failed-open, like failing closed, concerns the interceptor, not one of its settings)
    "failed-open": ("enforce", "open", kinds_ctx(RUN_POD_SANDBOX, SHARES), "failed-open",
                    frozenset({"setting", "key"})),
}


@pytest.mark.parametrize("kind", list(DECISION_KINDS))
def test_every_decision_names_its_interceptor_rule_mode_setting_and_annotation(kind: str) -> None:
    mode, broken, ctx, action, may_be_empty = DECISION_KINDS[kind]
    policy = AnnotationPolicy(parse_policy(KINDS_POLICY.format(mode=mode, on_error=broken or "closed"), "p.yaml"),
                              Lookup())
    interceptors: list[Any] = [*([Raises()] if broken else []), *build_interceptors(None, {}, Lookup(), "test")]
    outcome = asyncio.run(Pipeline(interceptors, lookup=Lookup(), policy=policy).decide(ctx))
    assert action in [d.action for d in outcome.decisions], outcome.decisions
    for d in outcome.decisions:
        fields = {"interceptor": d.interceptor, "rule": d.rule, "mode": d.mode, "setting": d.setting, "key": d.key}
        assert [name for name, value in fields.items() if not value and name not in may_be_empty] == [], d
        assert (d.rule, d.mode) == ("demo", mode), d
        assert d.interceptor in ("resources", "seccomp", "runtime-handler", "broken"), d
        assert d.reason, d


def test_a_kubelet_shrinking_below_the_annotation_on_update_wins_and_is_recorded(
        configured: Any, fake: FakeRuntime, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="criproxy.pipeline")
    proxy = configured()
    fake.script(CREATE_CONTAINER, Reply(messages=[api_pb2.CreateContainerResponse(
        container_id="c-7").SerializeToString()]))
    call(proxy, CREATE_CONTAINER, create_request({"memory-limit.criproxy.io/pod": "64Mi"}))
    assert proxy.pipeline is not None
    index = proxy.pipeline.index
    wait_for("c-7 indexed", lambda: index.container("c-7") is not None)  # once the runtime has answered
    call(proxy, UPDATE, update_request("c-7", memory=32 << 20))
    got = sent(fake, UPDATE, api_pb2.UpdateContainerResourcesRequest)
    assert got.linux.memory_limit_in_bytes == 32 << 20
    assert [(e["field"], e["value"], e["was"]) for e in json.loads(got.annotations[APPLIED])] == [
        ("linux.memory_limit_in_bytes", 32 << 20, 32 << 20)]
    assert any(r.getMessage().startswith(f"{UPDATE} container 'app' of pod criproxy-demo/web: applied memory-limit ")
               and "the kubelet's memory_limit_in_bytes 33554432 is tighter than the annotation's 67108864 and stands"
               in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("mode", ["dry-run", "audit", "enforce"])
def test_in_dry_run_not_even_a_conflict_or_a_closed_failure_fails_the_call(mode: str) -> None:
    policy = AnnotationPolicy(parse_policy(KINDS_POLICY.format(mode=mode, on_error="closed"), "p.yaml"), Lookup())
    ctx = kinds_ctx(RUN_POD_SANDBOX, SHARES)
    conflicting = Pipeline([Claims("first", "runtime_handler", "a"), Claims("second", "runtime_handler", "b")],
                           lookup=Lookup(), policy=policy)
    failing = Pipeline([Raises()], lookup=Lookup(), policy=policy)
    if mode != "dry-run":  # a configuration problem and a failing interceptor are not violations audit lets pass
        with pytest.raises(FailedPrecondition):
            asyncio.run(conflicting.decide(ctx))
        with pytest.raises(Internal):
            asyncio.run(failing.decide(ctx))
        return
    outcome = asyncio.run(conflicting.decide(ctx))
    assert (outcome.denial, outcome.changes, outcome.modify) == (None, (), False)
    (conflict,) = [d for d in outcome.decisions if d.interceptor == "second"]
    assert (conflict.action, conflict.setting, conflict.key) == ("dry-run", "test", "second.criproxy.io/pod")
    assert conflict.reason.startswith("enforce would fail the call (FAILED_PRECONDITION): criproxy: pod demo/web: "
                                      "interceptors first and second both set runtime_handler")
    outcome = asyncio.run(failing.decide(ctx))
    assert (outcome.denial, outcome.modify) == (None, False)
    assert [(d.action, d.interceptor, d.reason) for d in outcome.decisions] == [
        ("dry-run", "broken", "enforce would fail the call (INTERNAL): criproxy: interceptor broken failed on pod "
         "demo/web: RuntimeError('boom'); the call was not forwarded")]


class Carries:
    """A test interceptor proposing one change with every field of Change set."""

    def __init__(self) -> None:
        self.name = "carrier"
        self.events = frozenset({RUN_POD_SANDBOX})
        self.change = Change(**{f.name: f"the {f.name}" for f in dataclasses.fields(Change)})

    def adjust(self, ctx: CallContext) -> Adjustment:
        return Adjustment(changes=(self.change,))


def test_a_change_reaches_the_policy_whole_with_its_interceptors_name() -> None:
    carrier = Carries()
    seen: list[tuple[Change, ...]] = []

    class Recording(AnnotationPolicy):
        def review(self, ctx: CallContext, changes: Any) -> Any:
            seen.append(tuple(changes))
            return super().review(ctx, changes)

    policy = Recording(parse_policy(KINDS_POLICY.format(mode="enforce", on_error="closed"), "p.yaml"), Lookup())
    pipeline = Pipeline([carrier], lookup=Lookup(), policy=policy)
    asyncio.run(pipeline.decide(kinds_ctx(RUN_POD_SANDBOX, SHARES)))
    assert seen == [(dataclasses.replace(carrier.change, by="carrier"),)]
