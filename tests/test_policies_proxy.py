"""Policies through the proxy, against the fake runtime: what the runtime receives, and what the kubelet hears."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from criproxy.api.runtime.v1 import api_pb2
from criproxy.config import ServeConfig, build_config
from criproxy.cri.adjust import NOTHING, Adjustment
from criproxy.cri.annotations import Lookup
from criproxy.cri.context import CREATE_CONTAINER, RUN_POD_SANDBOX, CallContext
from criproxy.pipeline import Pipeline
from criproxy.policies.engine import AnnotationPolicy
from criproxy.policies.model import parse_policy
from criproxy.server import Proxy, start_proxy
from tests.support.fakeruntime import FakeRuntime, Reply
from tests.support.loopthread import LoopThread
from tests.support.pods import wait_for

HEADER = "apiVersion: criproxy.io/v1alpha1\nkind: AnnotationPolicy\n"
Mi = 1 << 20


def policy_text(body: str) -> str:
    return HEADER + body


@pytest.fixture
def run(configured: Callable[[str], Proxy], sockdir: Path) -> Callable[..., Proxy]:
    """Start a proxy with this policy (and extra config-file text)."""
    def start(policy: str, extra: str = "") -> Proxy:
        policy_file = sockdir / "policies.yaml"
        policy_file.write_text(policy_text(policy))
        return configured(f"policies: {policy_file}\n{extra}")

    return start


def sandbox(namespace: str, annotations: dict[str, str], name: str = "web") -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig(metadata=api_pb2.PodSandboxMetadata(name=name, uid="u1", namespace=namespace),
                                    annotations=annotations)


def run_pod(namespace: str, annotations: dict[str, str], handler: str = "",
            seccomp: int | None = None) -> api_pb2.RunPodSandboxRequest:
    request = api_pb2.RunPodSandboxRequest(config=sandbox(namespace, annotations), runtime_handler=handler)
    if seccomp is not None:
        request.config.linux.security_context.seccomp.profile_type = seccomp  # type: ignore[assignment]
    return request


def create(namespace: str, annotations: dict[str, str], sandbox_id: str = "sb-1") -> api_pb2.CreateContainerRequest:
    return api_pb2.CreateContainerRequest(
        pod_sandbox_id=sandbox_id, sandbox_config=sandbox(namespace, annotations),
        config=api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name="app"),
            linux=api_pb2.LinuxContainerConfig(resources=api_pb2.LinuxContainerResources(
                cpu_period=100_000, cpu_quota=200_000, cpu_shares=1024, memory_limit_in_bytes=1 << 30))))


def call(proxy: Proxy, key: str, request: Any) -> bytes:
    with grpc.insecure_channel(proxy.config.listen.target) as chan:
        response: bytes = chan.unary_unary(f"/runtime.v1.{key}")(request.SerializeToString(), timeout=10)
        return response


def denied(proxy: Proxy, key: str, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(proxy, key, request)
    return caught.value


DEMO = """
rules:
  - name: demo
    namespaces: [demo]
    settings:
      memory-limit: {max: 512Mi}
      seccomp-profile: {values: [runtime/default]}
"""


def test_allowed_annotation_is_applied(run: Any, fake: FakeRuntime) -> None:
    proxy = run(DEMO)
    call(proxy, CREATE_CONTAINER, create("demo", {"memory-limit.criproxy.io/pod": "256Mi"}))
    got = api_pb2.CreateContainerRequest.FromString(fake.received(CREATE_CONTAINER)[-1].request)
    assert got.config.linux.resources.memory_limit_in_bytes == 256 * Mi


def test_value_outside_the_rule_is_denied_with_a_message_for_the_pods_owner(run: Any, fake: FakeRuntime) -> None:
    proxy = run(DEMO)
    err = denied(proxy, CREATE_CONTAINER, create("demo", {"memory-limit.criproxy.io/pod": "768Mi"}))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    digest = proxy.policies.current.policies.digest if proxy.policies else ""
    assert err.details() == (
        f"criproxy: container 'app' of pod demo/web denied by policy rule 'demo' ({proxy.config.policies}@{digest}): "
        "memory-limit.criproxy.io/pod='768Mi': '768Mi' is not allowed; allowed: at most 512Mi")
    assert fake.received(CREATE_CONTAINER) == []


def test_annotation_in_a_namespace_no_rule_matches_is_denied(run: Any, fake: FakeRuntime) -> None:
    proxy = run(DEMO)
    err = denied(proxy, RUN_POD_SANDBOX, run_pod("shop", {"seccomp-profile.criproxy.io/pod": "runtime/default"}))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "no rule allows criproxy annotations in namespace 'shop'" in err.details()
    assert fake.received(RUN_POD_SANDBOX) == []


def test_plain_pods_are_untouched_under_a_policy(run: Any, fake: FakeRuntime) -> None:
    proxy = run(DEMO)
    for ns in ("demo", "shop"):
        request = run_pod(ns, {"app": "x"})
        call(proxy, RUN_POD_SANDBOX, request)
        assert fake.received(RUN_POD_SANDBOX)[-1].request == request.SerializeToString()


def test_audit_lets_it_pass_and_applies(run: Any, fake: FakeRuntime, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="criproxy.pipeline")
    proxy = run(DEMO.replace("namespaces: [demo]", "namespaces: [demo]\n    mode: audit"))
    call(proxy, CREATE_CONTAINER, create("demo", {"memory-limit.criproxy.io/pod": "768Mi"}))
    got = api_pb2.CreateContainerRequest.FromString(fake.received(CREATE_CONTAINER)[-1].request)
    assert got.config.linux.resources.memory_limit_in_bytes == 768 * Mi
    assert any("audited memory-limit" in r.getMessage() for r in caplog.records)


def test_dry_run_sends_the_request_unmodified(run: Any, fake: FakeRuntime, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="criproxy.pipeline")
    proxy = run("mode: dry-run\n" + DEMO)
    request = create("demo", {"memory-limit.criproxy.io/pod": "256Mi"})
    call(proxy, CREATE_CONTAINER, request)
    assert fake.received(CREATE_CONTAINER)[-1].request == request.SerializeToString()
    assert any("dry-run memory-limit" in r.getMessage() and "config.linux.resources" not in r.getMessage()
               for r in caplog.records)


TENANTS = """
rules:
  - name: tenants
    namespaces: ["tenant-*"]
    settings:
      runtime-handler: {values: [runc-alt], default: runc-alt, effective: true}
      seccomp-profile: {values: [runtime/default], default: runtime/default, effective: true}
"""


def test_defaults_are_injected(run: Any, fake: FakeRuntime) -> None:
    proxy = run(TENANTS, "runtime-handler: {known: [runc, runc-alt]}\n")
    call(proxy, RUN_POD_SANDBOX, run_pod("tenant-a", {}))
    got = api_pb2.RunPodSandboxRequest.FromString(fake.received(RUN_POD_SANDBOX)[-1].request)
    assert got.runtime_handler == "runc-alt"
    assert got.config.linux.security_context.seccomp.profile_type == api_pb2.SecurityProfile.RuntimeDefault
    applied = json.loads(got.config.annotations["criproxy.io/applied"])
    assert {e["key"] for e in applied} == {"runtime-handler.criproxy.io/pod", "seccomp-profile.criproxy.io/pod"}
    assert "criproxy.io/pinned" not in got.config.annotations  # the pod itself carried none


def test_kubelet_set_unconfined_is_denied_without_any_annotation(run: Any, fake: FakeRuntime) -> None:
    proxy = run(TENANTS.replace(", default: runtime/default", ""), "runtime-handler: {known: [runc, runc-alt]}\n")
    err = denied(proxy, RUN_POD_SANDBOX, run_pod("tenant-a", {}, seccomp=api_pb2.SecurityProfile.Unconfined))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert ("the seccomp-profile the runtime would get is not allowed: 'unconfined' is not allowed; allowed: "
            "runtime/default") in err.details()
    assert fake.received(RUN_POD_SANDBOX) == []


def test_drift_after_the_sandbox_was_created_is_denied(run: Any, fake: FakeRuntime) -> None:
    proxy = run(DEMO)
    fake.script(RUN_POD_SANDBOX, Reply(messages=[api_pb2.RunPodSandboxResponse(
        pod_sandbox_id="sb-9").SerializeToString()]))
    call(proxy, RUN_POD_SANDBOX, run_pod("demo", {"memory-limit.criproxy.io/pod": "256Mi"}))
    pinned = api_pb2.RunPodSandboxRequest.FromString(fake.received(RUN_POD_SANDBOX)[-1].request)
    assert json.loads(pinned.config.annotations["criproxy.io/pinned"]) == {"memory-limit.criproxy.io/pod": "256Mi"}
    call(proxy, CREATE_CONTAINER, create("demo", {"memory-limit.criproxy.io/pod": "256Mi"}, "sb-9"))
    err = denied(proxy, CREATE_CONTAINER, create("demo", {"memory-limit.criproxy.io/pod": "128Mi"}, "sb-9"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert ("criproxy annotations changed since the pod's sandbox was created (memory-limit.criproxy.io/pod: "
            "'256Mi' -> '128Mi'); recreate the pod for them to apply") in err.details()


class Broken:
    """An interceptor that raises, or hangs (async), on RunPodSandbox."""

    def __init__(self, name: str, hang: bool) -> None:
        self.name, self.hang = name, hang
        self.events = frozenset({RUN_POD_SANDBOX})

    def adjust(self, ctx: CallContext) -> Any:
        if not self.hang:
            raise RuntimeError("boom")

        async def forever() -> Adjustment:
            await asyncio.sleep(3600)
            return NOTHING

        return forever()


@pytest.mark.parametrize(("hang", "on_error", "code"), [
    (False, "closed", grpc.StatusCode.INTERNAL), (True, "closed", grpc.StatusCode.DEADLINE_EXCEEDED),
    (False, "open", None), (True, "open", None)], ids=["raises-closed", "hangs-closed", "raises-open", "hangs-open"])
def test_failing_interceptor(loop: LoopThread, fake: FakeRuntime, proxy_config: ServeConfig, *, hang: bool,
                             on_error: str, code: grpc.StatusCode | None) -> None:
    policy = parse_policy(policy_text(f"interceptors:\n  broken: {{onError: {on_error}, timeoutSeconds: 0.2}}\n"
                                      "rules: []\n"), "p.yaml")
    pipeline = Pipeline([Broken("broken", hang)], lookup=Lookup(), policy=AnnotationPolicy(policy, Lookup()))
    proxy = loop.run(start_proxy(proxy_config, pipeline))
    try:
        fake.journal.clear()
        request = run_pod("demo", {})
        if code is None:
            call(proxy, RUN_POD_SANDBOX, request)
            assert fake.received(RUN_POD_SANDBOX)[-1].request == request.SerializeToString()
        else:
            err = denied(proxy, RUN_POD_SANDBOX, request)
            assert err.code() == code
            assert err.details().startswith("criproxy: interceptor broken ")
            assert fake.received(RUN_POD_SANDBOX) == []
    finally:
        loop.run(proxy.stop(0))


def wait_for_generation(proxy: Proxy, generation: int, timeout: float = 10) -> None:
    assert proxy.policies is not None
    deadline = time.monotonic() + timeout
    while proxy.policies.generation < generation:
        assert time.monotonic() < deadline, "the policy file change was not picked up"
        time.sleep(0.05)


def rewrite(path: Path, text: str) -> None:
    """Replace the file as editors and ConfigMaps do: write aside, rename over."""
    aside = path.with_suffix(".new")
    aside.write_text(text)
    os.rename(aside, path)


def test_reload_valid_then_invalid_keeps_the_last_good(run: Any, fake: FakeRuntime) -> None:
    proxy = run(DEMO)
    assert proxy.policies is not None and proxy.config.policies is not None
    before = proxy.policies.current.identity
    rewrite(proxy.config.policies, policy_text(DEMO.replace("max: 512Mi", "max: 1Gi")))
    wait_for_generation(proxy, 2)
    assert proxy.policies.current.identity != before
    call(proxy, CREATE_CONTAINER, create("demo", {"memory-limit.criproxy.io/pod": "768Mi"}))  # allowed now
    good = proxy.policies.current.identity
    rewrite(proxy.config.policies, policy_text("rules: [oops"))
    deadline = time.monotonic() + 10
    while proxy.policies.last_error is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert proxy.policies.current.identity == good
    assert "not valid YAML" in proxy.policies.last_error
    call(proxy, CREATE_CONTAINER, create("demo", {"memory-limit.criproxy.io/pod": "768Mi"}))  # still the good one


def test_sighup_style_reload_reports(run: Any) -> None:
    proxy = run(DEMO)
    assert proxy.policies is not None
    assert proxy.policies.reload("SIGHUP") is True
    assert proxy.policies.generation == 1  # same content: nothing swapped


def versioned(memory: str, shares: str) -> str:
    return policy_text(f"""
rules:
  - name: v
    namespaces: [demo]
    settings:
      memory-limit: {{default: {memory}}}
      cpu-shares: {{default: "{shares}"}}
""")


def test_calls_during_reloads_never_fail_nor_see_a_mix(run: Any, fake: FakeRuntime) -> None:
    proxy = run(versioned("512Mi", "512")[len(HEADER):])
    assert proxy.config.policies is not None and proxy.policies is not None
    errors: list[BaseException] = []
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            try:
                call(proxy, CREATE_CONTAINER, create("demo", {}))
            except BaseException as err:  # collected for the assertion below
                errors.append(err)
                return

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for generation, (memory, shares) in enumerate([("256Mi", "256"), ("512Mi", "512")] * 3, start=2):
            rewrite(proxy.config.policies, versioned(memory, shares))
            wait_for_generation(proxy, generation)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors
    seen = set()
    for received in fake.received(CREATE_CONTAINER):
        r = api_pb2.CreateContainerRequest.FromString(received.request).config.linux.resources
        seen.add((r.memory_limit_in_bytes, r.cpu_shares))
    assert seen <= {(512 * Mi, 512), (256 * Mi, 256)}, f"a call saw a mix of two policies: {seen}"
    assert len(seen) == 2


def test_policy_file_writable_by_others_is_refused(loop: LoopThread, fake: FakeRuntime, sockdir: Path) -> None:
    from criproxy.errors import ConfigError

    policy_file = sockdir / "policies.yaml"
    policy_file.write_text(policy_text(DEMO))
    policy_file.chmod(0o666)
    config = build_config({"listen": f"unix://{sockdir}/p.sock", "runtime-endpoint": f"unix://{sockdir}/runtime.sock",
                           "policies": str(policy_file)}, None)
    with pytest.raises(ConfigError) as caught:
        loop.run(start_proxy(config))
    assert str(caught.value) == (f"policy file {policy_file}: {policy_file} is writable by others than its owner "
                                 f"(mode 0666); run chmod go-w {policy_file}")



@pytest.mark.parametrize("via_symlink", [False, True], ids=["file", "symlink-to-it"])
def test_policy_file_owned_by_another_user_is_refused(sockdir: Path, via_symlink: bool) -> None:
    from criproxy.errors import ConfigError
    from criproxy.policies.store import load_policy

    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    target = sockdir / "theirs.yaml"
    target.write_text(policy_text(DEMO))
    os.chown(target, 12345, 12345)
    path = target
    if via_symlink:  # as a ConfigMap mounts files: the link may be fine, what it points at decides
        path = sockdir / "policies.yaml"
        path.symlink_to(target)
    with pytest.raises(ConfigError) as caught:
        load_policy(path, Lookup())
    assert str(caught.value) == (f"policy file {path}: {target} is owned by uid 12345, not by root or the proxy's "
                                 "user; chown it")


# ---------------------------------------------------------------- interceptor-level rejections, by mode

EVERYTHING = """
rules:
  - name: demo
    namespaces: [demo]
    mode: {mode}
    settings:
      memory-limit: {{}}
      runtime-handler: {{}}
      seccomp-profile: {{}}
"""
SECCOMP_POD = {"seccomp-profile.criproxy.io/pod": "runtime/default"}
#: What each interceptor rejects: the call, the annotation, and the status enforce mode fails it with.
REJECTED = {
    "invalid-value": (CREATE_CONTAINER, None, "memory-limit.criproxy.io/pod", "lots",
                      grpc.StatusCode.INVALID_ARGUMENT, "expected a memory limit as a quantity of bytes"),
    "loosening": (CREATE_CONTAINER, None, "memory-limit.criproxy.io/pod", "2Gi", grpc.StatusCode.PERMISSION_DENIED,
                  "would loosen memory_limit_in_bytes from 1073741824 (set by the kubelet) to 2147483648"),
    "unknown-handler": (RUN_POD_SANDBOX, None, "runtime-handler.criproxy.io/pod", "gvisor",
                        grpc.StatusCode.INVALID_ARGUMENT, "the runtime has no handler 'gvisor'"),
    "runtime-class-override": (RUN_POD_SANDBOX, "runc", "runtime-handler.criproxy.io/pod", "kata",
                               grpc.StatusCode.PERMISSION_DENIED, "but the pod's RuntimeClass chose 'runc'"),
}


def rejected_request(case: str, annotations: dict[str, str]) -> tuple[str, Any]:
    method, handler, key, value, _, _ = REJECTED[case]
    annotations = {key: value, **annotations}
    if method == CREATE_CONTAINER:
        return method, create("demo", annotations)
    return method, run_pod("demo", annotations, handler=handler or "")


def decision_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "criproxy.pipeline" and "(rule " in r.getMessage()]


@pytest.mark.parametrize("case", list(REJECTED))
def test_enforce_fails_what_an_interceptor_rejects(run: Any, fake: FakeRuntime, case: str) -> None:
    proxy = run(EVERYTHING.format(mode="enforce"), "runtime-handler: {known: [runc, kata]}\n")
    method, request = rejected_request(case, {})
    err = denied(proxy, method, request)
    assert err.code() == REJECTED[case][4]
    assert REJECTED[case][5] in err.details()
    assert fake.received(method) == []


@pytest.mark.parametrize("case", list(REJECTED))
def test_dry_run_forwards_what_an_interceptor_rejects_unchanged_and_records_it(
        run: Any, fake: FakeRuntime, caplog: pytest.LogCaptureFixture, case: str) -> None:
    caplog.set_level(logging.INFO, logger="criproxy.pipeline")
    proxy = run(EVERYTHING.format(mode="dry-run"), "runtime-handler: {known: [runc, kata]}\n")
    method, request = rejected_request(case, SECCOMP_POD)
    call(proxy, method, request)
    assert fake.received(method)[-1].request == request.SerializeToString()
    _, _, key, value, code, why = REJECTED[case]
    lines = decision_lines(caplog)
    assert any(line.startswith(f"{method} ") and f": dry-run {key.partition('.')[0]} {key}={value!r} (rule demo, "
               "dry-run mode): " in line and why in line and code.name in line for line in lines), lines


@pytest.mark.parametrize("case", list(REJECTED))
def test_audit_forwards_what_an_interceptor_rejects_minus_its_adjustment(
        run: Any, fake: FakeRuntime, caplog: pytest.LogCaptureFixture, case: str) -> None:
    caplog.set_level(logging.INFO, logger="criproxy.pipeline")
    proxy = run(EVERYTHING.format(mode="audit"), "runtime-handler: {known: [runc, kata]}\n")
    method, request = rejected_request(case, SECCOMP_POD)
    call(proxy, method, request)
    got = type(request).FromString(fake.received(method)[-1].request)
    seccomp = got.config.linux.security_context.seccomp
    assert seccomp.profile_type == api_pb2.SecurityProfile.RuntimeDefault  # the other interceptor's change stands
    if method == CREATE_CONTAINER:
        assert got.config.linux.resources.memory_limit_in_bytes == 1 << 30  # the kubelet's: the violation is dropped
    else:
        assert got.runtime_handler == request.runtime_handler
    _, _, key, value, code, why = REJECTED[case]
    lines = decision_lines(caplog)
    assert any(f": audited {key.partition('.')[0]} {key}={value!r} (rule demo, audit mode): " in line
               and why in line and code.name in line for line in lines), lines


def test_drift_is_still_checked_after_the_sandbox_left_a_full_index(run: Any, fake: FakeRuntime) -> None:
    proxy = run(DEMO)
    assert proxy.pipeline is not None
    index = proxy.pipeline.index
    index.max_entries = 1  # (--container-cache-size is at least 100)
    # The index is filled once the runtime has answered: wait for it (and a lookup counts as a use).
    for sandbox_id, name, indexed in (("sb-1", "web", lambda: index.sandbox("sb-1") is not None),
                                      ("sb-2", "other", lambda: index.evictions["sandbox"] == 1)):
        fake.script(RUN_POD_SANDBOX, Reply(messages=[api_pb2.RunPodSandboxResponse(
            pod_sandbox_id=sandbox_id).SerializeToString()]))
        request = run_pod("demo", {"memory-limit.criproxy.io/pod": "256Mi"})
        request.config.metadata.name = name
        call(proxy, RUN_POD_SANDBOX, request)  # the second evicts the first
        wait_for(f"{sandbox_id} indexed", indexed)
    assert index.sandbox("sb-1") is None
    first = api_pb2.RunPodSandboxRequest.FromString(fake.received(RUN_POD_SANDBOX)[0].request).config
    fake.script("RuntimeService/PodSandboxStatus", Reply(messages=[api_pb2.PodSandboxStatusResponse(
        status=api_pb2.PodSandboxStatus(id="sb-1", metadata=first.metadata, annotations=first.annotations)
    ).SerializeToString()]))
    err = denied(proxy, CREATE_CONTAINER, create("demo", {"memory-limit.criproxy.io/pod": "128Mi"}, "sb-1"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "criproxy annotations changed since the pod's sandbox was created" in err.details()
    assert [api_pb2.PodSandboxStatusRequest.FromString(r.request).pod_sandbox_id
            for r in fake.received("RuntimeService/PodSandboxStatus")] == ["sb-1"]
