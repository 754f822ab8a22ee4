"""Escalation attempts through the proxy, with the repository's policies.yaml, against the fake runtime.

Layers, in the order a call meets them: an interceptor refuses an annotation it cannot use
(INVALID_ARGUMENT: a path out of the seccomp root) or one that would loosen what the kubelet
computed (PERMISSION_DENIED); then the policy refuses what no rule allows (PERMISSION_DENIED,
"no rule allows criproxy annotations in namespace ..."). Whichever refuses, the runtime never
receives the call. Each case below asserts the exact code, that the details name the annotation
key, which layer refused, and that the fake runtime's journal has nothing for the method.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import pytest

from bench.fuzz_targets import REPO_POLICY, make_profile_root
from criproxy.api.runtime.v1 import api_pb2
from criproxy.cri.context import CREATE_CONTAINER, RUN_POD_SANDBOX
from criproxy.server import Proxy
from tests.support.fakeruntime import FakeRuntime, Reply
from tests.support.loopthread import LoopThread

Gi, Mi = 1 << 30, 1 << 20
PULL_IMAGE = "ImageService/PullImage"
NO_RULE = "no rule allows criproxy annotations in namespace 'shop'"
LOOSEN = "would loosen"
TRAVERSAL = "localhost/../../etc/passwd"


@pytest.fixture
def start(configured: Callable[[str], Proxy], sockdir: Path, tmp_path: Path) -> Callable[..., Proxy]:
    """Start a proxy with a copy of the repository's policies.yaml (mode 0644) and the default interceptors."""
    def run(extra: str = "") -> Proxy:
        policies = sockdir / "policies.yaml"
        policies.write_bytes(REPO_POLICY.read_bytes())
        policies.chmod(0o644)
        root = tmp_path / "root"
        if not root.exists():
            root.mkdir()
            make_profile_root(root)
        return configured(
            f"policies: {policies}\n"
            "runtime-handler: {known: [runc, runc-alt, kata, gvisor]}\n"
            "resources: {unified-keys: [memory.high, pids.max]}\n"
            f"{extra or f'seccomp: {{profile-root: {root}/seccomp}}'}\n")

    return run


@pytest.fixture
def proxy(start: Callable[..., Proxy]) -> Proxy:
    return start()


def sandbox(namespace: str, annotations: dict[str, str]) -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig(metadata=api_pb2.PodSandboxMetadata(name="web", uid="uid-1", namespace=namespace),
                                    annotations=annotations)


def run_pod(namespace: str, annotations: dict[str, str]) -> bytes:
    return api_pb2.RunPodSandboxRequest(config=sandbox(namespace, annotations)).SerializeToString()


def create(namespace: str, annotations: dict[str, str]) -> bytes:
    """CreateContainer as a kubelet sends it for a Burstable container pinned to CPUs 0-1 (no hugepages)."""
    resources = api_pb2.LinuxContainerResources(
        cpu_period=100_000, cpu_quota=200_000, cpu_shares=1024, memory_limit_in_bytes=Gi,
        memory_swap_limit_in_bytes=Gi, oom_score_adj=500, cpuset_cpus="0-1", cpuset_mems="0")
    resources.hugepage_limits.add(page_size="2MB", limit=0)
    request = api_pb2.CreateContainerRequest(pod_sandbox_id="sb-1", sandbox_config=sandbox(namespace, annotations),
                                             config=api_pb2.ContainerConfig(
                                                 metadata=api_pb2.ContainerMetadata(name="app")))
    request.config.linux.resources.CopyFrom(resources)
    return request.SerializeToString()


BUILD = {RUN_POD_SANDBOX: run_pod, CREATE_CONTAINER: create}


def call(proxy: Proxy, key: str, request: bytes, target: str | None = None) -> bytes:
    with grpc.insecure_channel(target or proxy.config.listen.target) as channel:
        answer: bytes = channel.unary_unary(f"/runtime.v1.{key}")(request, timeout=10)
        return answer


def refused(proxy: Proxy, key: str, request: bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(proxy, key, request)
    return caught.value


class Case(NamedTuple):
    id: str
    method: str
    key: str
    value: str
    code: str
    #: What the details say besides the key: which layer refused.
    says: str


ESCALATIONS = [Case(*c) for c in [
    ("runtime-handler", RUN_POD_SANDBOX, "runtime-handler.criproxy.io/pod", "kata", "PERMISSION_DENIED", NO_RULE),
    ("seccomp-unconfined-pod", RUN_POD_SANDBOX, "seccomp-profile.criproxy.io/pod", "unconfined",
     "PERMISSION_DENIED", NO_RULE),
    ("seccomp-unconfined-container", CREATE_CONTAINER, "seccomp-profile.criproxy.io/container.app", "unconfined",
     "PERMISSION_DENIED", NO_RULE),
    ("seccomp-traversal-pod", RUN_POD_SANDBOX, "seccomp-profile.criproxy.io/pod", TRAVERSAL, "INVALID_ARGUMENT",
     "'..' is not allowed"),
    ("seccomp-traversal-container", CREATE_CONTAINER, "seccomp-profile.criproxy.io/container.app", TRAVERSAL,
     "INVALID_ARGUMENT", "'..' is not allowed"),
    ("memory-limit-raise", CREATE_CONTAINER, "memory-limit.criproxy.io/container.app", "4Gi", "PERMISSION_DENIED",
     f"{LOOSEN} memory_limit_in_bytes from 1073741824 (set by the kubelet) to 4294967296"),
    ("hugepages-raise", CREATE_CONTAINER, "hugepages-2mi.criproxy.io/pod", "64Mi", "PERMISSION_DENIED",
     f"{LOOSEN} hugepage_limits[2MB] from 0"),
    ("unified-key", CREATE_CONTAINER, "unified.memory.high.criproxy.io/pod", "max", "PERMISSION_DENIED", NO_RULE),
    ("oom-score-adj-lowering", CREATE_CONTAINER, "oom-score-adj.criproxy.io/pod", "-1000", "PERMISSION_DENIED",
     f"{LOOSEN} oom_score_adj from 500"),
    ("cpuset-widening", CREATE_CONTAINER, "cpuset-cpus.criproxy.io", "0-63", "PERMISSION_DENIED",
     f"{LOOSEN} cpuset_cpus from '0-1'"),
    ("cpu-quota-raise", CREATE_CONTAINER, "cpu-quota.criproxy.io/pod", "8", "PERMISSION_DENIED", LOOSEN),
]]


def attempt(proxy: Proxy, fake: FakeRuntime, case: Case, namespace: str) -> str:
    """Send the case's annotation from `namespace`; assert it was refused as the case says, and never forwarded."""
    err = refused(proxy, case.method, BUILD[case.method](namespace, {case.key: case.value}))
    assert err.code().name == case.code, err.details()
    assert case.key in err.details()
    assert case.says in err.details()
    assert fake.received(case.method) == [], "the runtime received a refused call"
    return err.details()


@pytest.mark.parametrize("case", ESCALATIONS, ids=[c.id for c in ESCALATIONS])
def test_escalation_from_a_namespace_no_rule_allows(proxy: Proxy, fake: FakeRuntime, case: Case) -> None:
    details = attempt(proxy, fake, case, "shop")
    if case.says == NO_RULE:
        assert details.startswith("criproxy: ") and "denied by policy (" in details


TIGHTENING = [Case(*c, "PERMISSION_DENIED", NO_RULE) for c in [
    ("memory-lower", CREATE_CONTAINER, "memory-limit.criproxy.io/pod", "512Mi"),
    ("cpuset-narrow", CREATE_CONTAINER, "cpuset-cpus.criproxy.io/container.app", "0"),
    ("oom-raise", CREATE_CONTAINER, "oom-score-adj.criproxy.io", "1000"),
    ("seccomp-runtime-default", RUN_POD_SANDBOX, "seccomp-profile.criproxy.io/pod", "runtime/default"),
]]


@pytest.mark.parametrize("case", TIGHTENING, ids=[c.id for c in TIGHTENING])
def test_even_tightening_is_denied_where_no_rule_allows_annotations(proxy: Proxy, fake: FakeRuntime,
                                                                    case: Case) -> None:
    """The interceptors would accept these (they only tighten): the policy is what refuses them in 'shop'."""
    attempt(proxy, fake, case, "shop")


def test_system_namespaces_may_use_no_annotation(proxy: Proxy, fake: FakeRuntime) -> None:
    attempt(proxy, fake, Case("system", CREATE_CONTAINER, "memory-limit.criproxy.io/pod", "512Mi",
                              "PERMISSION_DENIED", "rule 'system' does not allow memory-limit"), "kube-system")


DEMO_REFUSALS = [Case(*c) for c in [
    ("seccomp-traversal", RUN_POD_SANDBOX, "seccomp-profile.criproxy.io/pod", TRAVERSAL, "INVALID_ARGUMENT",
     "'..' is not allowed"),
    ("seccomp-absolute", CREATE_CONTAINER, "seccomp-profile.criproxy.io/container.app", "localhost//etc/passwd",
     "INVALID_ARGUMENT", "localhost/ must be followed by a profile file relative to"),
    ("seccomp-symlink-out", RUN_POD_SANDBOX, "seccomp-profile.criproxy.io/pod", "localhost/escape.json",
     "INVALID_ARGUMENT", "the profile resolves outside"),
    ("seccomp-dir-symlink-out", RUN_POD_SANDBOX, "seccomp-profile.criproxy.io/pod", "localhost/up/outside.json",
     "INVALID_ARGUMENT", "the profile resolves outside"),
    ("memory-limit-raise", CREATE_CONTAINER, "memory-limit.criproxy.io/container.app", "4Gi", "PERMISSION_DENIED",
     f"{LOOSEN} memory_limit_in_bytes"),
    ("hugepages-raise", CREATE_CONTAINER, "hugepages-2mi.criproxy.io/pod", "64Mi", "PERMISSION_DENIED",
     f"{LOOSEN} hugepage_limits[2MB]"),
    ("oom-score-adj-lowering", CREATE_CONTAINER, "oom-score-adj.criproxy.io/pod", "-1000", "PERMISSION_DENIED",
     f"{LOOSEN} oom_score_adj"),
    ("cpuset-widening", CREATE_CONTAINER, "cpuset-cpus.criproxy.io/pod", "0-63", "PERMISSION_DENIED",
     f"{LOOSEN} cpuset_cpus"),
    ("unknown-handler", RUN_POD_SANDBOX, "runtime-handler.criproxy.io/pod", "runc-evil", "INVALID_ARGUMENT",
     "the runtime has no handler 'runc-evil'"),
]]


@pytest.mark.parametrize("case", DEMO_REFUSALS, ids=[c.id for c in DEMO_REFUSALS])
def test_the_demo_namespace_still_cannot_escape(proxy: Proxy, fake: FakeRuntime, case: Case) -> None:
    """criproxy-demo may use every annotation (the policy allows 'localhost/*', which a glob matches for
    '../..' too): the interceptors still refuse paths out of the profile root and loosening."""
    attempt(proxy, fake, case, "criproxy-demo")


def test_the_demo_namespace_is_served(proxy: Proxy, fake: FakeRuntime) -> None:
    """The control: the same proxy applies allowed, tightening annotations."""
    call(proxy, CREATE_CONTAINER, create("criproxy-demo", {"memory-limit.criproxy.io/container.app": "512Mi",
                                                           "cpuset-cpus.criproxy.io/pod": "1",
                                                           "seccomp-profile.criproxy.io/pod": "localhost/audit.json"}))
    got = api_pb2.CreateContainerRequest.FromString(fake.received(CREATE_CONTAINER)[-1].request)
    assert got.config.linux.resources.memory_limit_in_bytes == 512 * Mi
    assert got.config.linux.resources.cpuset_cpus == "1"
    assert got.config.linux.security_context.seccomp.localhost_ref.endswith("/seccomp/audit.json")
    plain = run_pod("shop", {"app": "web"})
    call(proxy, RUN_POD_SANDBOX, plain)
    assert fake.received(RUN_POD_SANDBOX)[-1].request == plain


@pytest.mark.parametrize(("method", "key"), [
    (RUN_POD_SANDBOX, "seccomp.security.alpha.kubernetes.io/pod"),
    (CREATE_CONTAINER, "container.seccomp.security.alpha.kubernetes.io/app")], ids=["pod", "container"])
def test_bug_legacy_seccomp_annotations_bypass_the_policy(start: Callable[..., Proxy], fake: FakeRuntime,
                                                          tmp_path: Path, method: str, key: str) -> None:
    root = make_profile_root(tmp_path / "legacy")
    proxy = start(f"seccomp: {{profile-root: {root}, legacy-annotations: true}}")
    request = BUILD[method]("shop", {key: "unconfined"})
    try:
        call(proxy, method, request)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        return
    message: Any = api_pb2.RunPodSandboxRequest if method == RUN_POD_SANDBOX else api_pb2.CreateContainerRequest
    got = message.FromString(fake.received(method)[-1].request)
    profile = got.config.linux.security_context.seccomp.profile_type
    assert profile != api_pb2.SecurityProfile.Unconfined, "an unlisted namespace got Unconfined past the policy"


# ------------------------------------------------------------------------------------------ secrets

SECRET = "s3cr3t-Pl4nted-7c1f"


def pull_request(garbage: bytes = b"") -> bytes:
    auth = api_pb2.AuthConfig(username="robot", password=SECRET, server_address="registry.example",
                              auth=base64.b64encode(f"robot:{SECRET}".encode()).decode(),
                              identity_token=SECRET, registry_token=SECRET)
    request = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image="registry.example/app:1"), auth=auth,
                                       sandbox_config=sandbox("shop", {"app": "web"}))
    return request.SerializeToString() + garbage


def everything_logged(caplog: pytest.LogCaptureFixture) -> str:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(formatter.format(record) for record in caplog.records)


def test_pull_image_secrets_reach_no_log_and_no_error(proxy: Proxy, fake: FakeRuntime, loop: LoopThread,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    encoded = base64.b64encode(SECRET.encode()).decode()
    # 1. Served: forwarded byte for byte (PullImage is never decoded), malformed or not.
    for request in (pull_request(), pull_request(b"\xba\x3e\x05hello"), pull_request(b"\xff\xff\xff")):
        call(proxy, PULL_IMAGE, request)
        assert fake.received(PULL_IMAGE)[-1].request == request
    # 2. The runtime refuses: its status comes back as it was, the secret nowhere in it.
    fake.script(PULL_IMAGE, Reply(code=grpc.StatusCode.UNAUTHENTICATED, details="pull access denied"))
    err = refused(proxy, PULL_IMAGE, pull_request())
    assert (err.code(), err.details()) == (grpc.StatusCode.UNAUTHENTICATED, "pull access denied")
    details = [err.details()]
    # 3. The runtime is gone: the proxy writes the details itself.
    loop.run(fake.stop())
    err = refused(proxy, PULL_IMAGE, pull_request())
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    details.append(err.details())
    logged = everything_logged(caplog)
    assert caplog.records, "nothing was logged at all: the check below would prove nothing"
    for text in (logged, *details):
        assert SECRET not in text and encoded not in text


def test_annotation_values_of_a_denied_pod_are_quoted_by_design(proxy: Proxy, fake: FakeRuntime,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """Annotation values are not secrets: pod authors read denials in `kubectl describe`, so the details
    quote the key and the value, and the decision log line at INFO does too. (Only PullImage
    credentials are kept out of every output: the test above.)"""
    caplog.set_level(logging.DEBUG)
    key = "unified.memory.high.criproxy.io/pod"
    err = refused(proxy, CREATE_CONTAINER, create("shop", {key: SECRET}))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"{key}='{SECRET}'" in err.details()
    assert SECRET in everything_logged(caplog)
    assert fake.received(CREATE_CONTAINER) == []
