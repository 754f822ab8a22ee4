"""The built-in interceptors called directly on CallContexts built from real CRI requests (no servers)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest

from criproxy.api.runtime.v1 import api_pb2
from criproxy.cri.adjust import NOTHING, Adjustment, Change, Denial
from criproxy.cri.annotations import Lookup
from criproxy.cri.context import (
    CREATE_CONTAINER,
    RUN_POD_SANDBOX,
    UPDATE_CONTAINER_RESOURCES,
    CallContext,
    PodInfo,
    RuntimeFacts,
)
from criproxy.interceptors import InvalidAnnotation
from criproxy.interceptors.resources import ResourcesConfig, ResourcesInterceptor
from criproxy.interceptors.runtime_handler import RuntimeHandlerConfig, RuntimeHandlerInterceptor
from criproxy.interceptors.seccomp import FIELD, SeccompConfig, SeccompInterceptor

NS, NAME, UID = "ns", "web", "uid-1"
WHO = "container 'app' of pod ns/web"
RES = "config.linux.resources."
Gi, Mi = 1 << 30, 1 << 20
#: What a kubelet sends for a container with a CPU request and no limits (quota 0 and memory 0: unlimited).
NO_LIMITS: dict[str, Any] = {"cpu_period": 100_000, "cpu_quota": 0, "cpu_shares": 1024, "oom_score_adj": -997}


# ---------------------------------------------------------------- builders: requests as the kubelet sends them

def sandbox_config(annotations: Mapping[str, str]) -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig(metadata=api_pb2.PodSandboxMetadata(name=NAME, namespace=NS, uid=UID),
                                    annotations=dict(annotations))


def pod(annotations: Mapping[str, str]) -> PodInfo:
    return PodInfo(NS, NAME, UID, {}, dict(annotations))


def resources(values: Mapping[str, Any]) -> api_pb2.LinuxContainerResources:
    values = dict(values)
    hugepages = values.pop("hugepage_limits", {})
    unified = values.pop("unified", {})
    res = api_pb2.LinuxContainerResources(unified=unified, **values)
    for size, limit in hugepages.items():
        res.hugepage_limits.add(page_size=size, limit=limit)
    return res


def run_pod(annotations: Mapping[str, str], handler: str = "", runtime: RuntimeFacts | None = None) -> CallContext:
    runtime = RuntimeFacts() if runtime is None else runtime
    request = api_pb2.RunPodSandboxRequest(config=sandbox_config(annotations), runtime_handler=handler)
    return CallContext(RUN_POD_SANDBOX, pod(request.config.annotations), None, request, runtime)


def create(annotations: Mapping[str, str], container: str = "app", kubelet: Mapping[str, Any] | None = None,
           seccomp: api_pb2.SecurityProfile | None = None) -> CallContext:
    config = api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name=container))
    config.linux.resources.CopyFrom(resources(NO_LIMITS if kubelet is None else kubelet))
    if seccomp is not None:
        config.linux.security_context.seccomp.CopyFrom(seccomp)
    request = api_pb2.CreateContainerRequest(pod_sandbox_id="sb1", config=config,
                                             sandbox_config=sandbox_config(annotations))
    return CallContext(CREATE_CONTAINER, pod(request.sandbox_config.annotations), container, request)


def update(annotations: Mapping[str, str], kubelet: Mapping[str, Any], container: str = "app") -> CallContext:
    request = api_pb2.UpdateContainerResourcesRequest(container_id="c1", linux=resources(kubelet))
    return CallContext(UPDATE_CONTAINER_RESOURCES, pod(annotations), container, request)


def handler(default: str = "", known: frozenset[str] = frozenset(), domain: str = "criproxy.io",
            override: bool = False) -> RuntimeHandlerInterceptor:
    return RuntimeHandlerInterceptor(
        RuntimeHandlerConfig(default=default, known=known, override_runtime_class=override), Lookup(domain))


def res_interceptor(loosen: frozenset[str] = frozenset(),
                    unified: frozenset[str] = frozenset({"memory.high", "pids.max", "memory.oom.group"}),
                    ) -> ResourcesInterceptor:
    return ResourcesInterceptor(ResourcesConfig(allow_loosening=loosen, unified_keys=unified), Lookup())


def invalid(interceptor: Any, ctx: CallContext) -> str:
    with pytest.raises(InvalidAnnotation) as err:
        interceptor.adjust(ctx)
    return str(err.value)


def loosen(key: str, raw: str, field: str, old: Any, new: Any) -> Adjustment:
    """The denial for annotation `key` (`<setting>.criproxy.io/...`) loosening `field` from `old` to `new`."""
    setting = key.partition(".criproxy.io")[0]
    return Denial(f"criproxy: {WHO}: annotation {key}={raw!r} would loosen {field} from {old!r} (set by the "
                  f"kubelet) to {new!r}; annotations may only tighten resources unless the resources interceptor's "
                  f"allow-loosening lists {setting}", grpc.StatusCode.PERMISSION_DENIED, setting, key,
                  raw).as_adjustment()


def test_events() -> None:
    assert handler().events == {RUN_POD_SANDBOX}
    assert SeccompInterceptor(SeccompConfig(), Lookup()).events == {RUN_POD_SANDBOX, CREATE_CONTAINER}
    assert res_interceptor().events == {CREATE_CONTAINER, UPDATE_CONTAINER_RESOURCES}


# ---------------------------------------------------------------- runtime-handler

RH = "runtime-handler.criproxy.io/pod"
RUNTIME = RuntimeFacts(frozenset({"runc", "kata"}), "Status.runtime_handlers")


@pytest.mark.parametrize(
    ("interceptor", "ctx", "expected"),
    [
        (handler(), run_pod({}, runtime=RUNTIME), NOTHING),
        (handler(), run_pod({"app.kubernetes.io/name": "web"}, handler="runc", runtime=RUNTIME), NOTHING),
        (handler(), run_pod({RH: "kata"}, runtime=RUNTIME), Adjustment(changes=(
            Change("runtime_handler", "kata", "runtime-handler", RH, "kata"),))),
        (handler(), run_pod({"runtime-handler.criproxy.io": "kata"}, runtime=RUNTIME), Adjustment(changes=(
            Change("runtime_handler", "kata", "runtime-handler", "runtime-handler.criproxy.io", "kata"),))),
        (handler(), run_pod({RH: "kata", "runtime-handler.criproxy.io": "runc"}, runtime=RUNTIME),
         Adjustment(changes=(Change("runtime_handler", "kata", "runtime-handler", RH, "kata"),))),
        (handler(), run_pod({RH: " kata "}, runtime=RUNTIME), Adjustment(changes=(
            Change("runtime_handler", "kata", "runtime-handler", RH, " kata "),))),
        (handler(), run_pod({RH: "kata"}, handler="kata", runtime=RUNTIME), NOTHING),
        (handler(), run_pod({RH: "kata"}, handler="runc", runtime=RUNTIME), Denial(
            f"criproxy: pod ns/web: annotation {RH}='kata' asks for runtime handler 'kata', but the pod's "
            "RuntimeClass chose 'runc'; an annotation does not override a RuntimeClass unless "
            "runtime-handler.override-runtime-class is true", grpc.StatusCode.PERMISSION_DENIED,
            "runtime-handler", RH, "kata").as_adjustment()),
        (handler(override=True), run_pod({RH: "kata"}, handler="runc", runtime=RUNTIME), Adjustment(changes=(
            Change("runtime_handler", "kata", "runtime-handler", RH, "kata"),))),
        (handler(known=frozenset({"kata"})), run_pod({RH: "kata"}), Adjustment(changes=(
            Change("runtime_handler", "kata", "runtime-handler", RH, "kata"),))),
        (handler(default="kata"), run_pod({}, runtime=RUNTIME), Adjustment(changes=(
            Change("runtime_handler", "kata", "runtime-handler", "", ""),))),
        (handler(default="kata"), run_pod({}, handler="runc", runtime=RUNTIME), NOTHING),
        (handler(default="kata"), run_pod({RH: "runc"}, runtime=RUNTIME), Adjustment(changes=(
            Change("runtime_handler", "runc", "runtime-handler", RH, "runc"),))),
        (handler(domain="example.com"), run_pod({RH: "kata", "runtime-handler.example.com/pod": "runc"},
                                                runtime=RUNTIME),
         Adjustment(changes=(Change("runtime_handler", "runc", "runtime-handler", "runtime-handler.example.com/pod",
                                    "runc"),))),
    ],
    ids=["no-annotation", "unrelated-annotation", "pod-key", "bare-key", "pod-key-beats-bare", "value-stripped",
         "already-requested", "runtime-class-not-overridden", "runtime-class-overridden-when-allowed",
         "known-from-config", "default-when-none-requested",
         "default-not-when-requested", "annotation-beats-default", "custom-domain"],
)
def test_runtime_handler(interceptor: RuntimeHandlerInterceptor, ctx: CallContext, expected: Adjustment) -> None:
    assert interceptor.adjust(ctx) == expected


ACCEPTED_HANDLER = "expected a runtime handler name (a DNS label: lower-case letters, digits and '-', at most 63)"


@pytest.mark.parametrize(
    ("interceptor", "ctx", "message"),
    [
        (handler(), run_pod({RH: "Kata!"}, runtime=RUNTIME), f"annotation {RH}='Kata!': {ACCEPTED_HANDLER}"),
        (handler(), run_pod({RH: "Kata"}, runtime=RUNTIME), f"annotation {RH}='Kata': {ACCEPTED_HANDLER}"),
        (handler(), run_pod({RH: ""}, runtime=RUNTIME), f"annotation {RH}='': {ACCEPTED_HANDLER}"),
        (handler(), run_pod({RH: "-kata"}, runtime=RUNTIME), f"annotation {RH}='-kata': {ACCEPTED_HANDLER}"),
        (handler(), run_pod({RH: "k" * 64}, runtime=RUNTIME), f"annotation {RH}='{'k' * 64}': {ACCEPTED_HANDLER}"),
        (handler(), run_pod({"runtime-handler.criproxy.io/container.b": "kata",
                             "runtime-handler.criproxy.io/container.a": "kata", RH: "kata"}, runtime=RUNTIME),
         "annotation runtime-handler.criproxy.io/container.a='kata': the runtime handler is chosen per pod; "
         "use runtime-handler.criproxy.io/pod"),
        (handler(domain="example.com"), run_pod({"runtime-handler.example.com/container.a": "kata"}),
         "annotation runtime-handler.example.com/container.a='kata': the runtime handler is chosen per pod; "
         "use runtime-handler.example.com/pod"),
        (handler(), run_pod({RH: "gvisor"}, runtime=RUNTIME),
         f"annotation {RH}='gvisor': the runtime has no handler 'gvisor'; known handlers: kata, runc "
         "(from Status.runtime_handlers)"),
        (handler(known=frozenset({"runc", "kata"})), run_pod({RH: "gvisor"}),
         f"annotation {RH}='gvisor': the runtime has no handler 'gvisor'; known handlers: kata, runc "
         "(from the runtime-handler interceptor's `known` list)"),
        (handler(known=frozenset({"gvisor"})), run_pod({RH: "gvisor"}, runtime=RuntimeFacts(frozenset({"runc"}),
                                                                                        "containerd config")),
         f"annotation {RH}='gvisor': the runtime has no handler 'gvisor'; known handlers: runc "
         "(from containerd config)"),
        (handler(), run_pod({RH: "kata"}, runtime=RuntimeFacts(frozenset(), "Status.runtime_handlers")),
         f"annotation {RH}='kata': the runtime has no handler 'kata'; known handlers: (none) "
         "(from Status.runtime_handlers)"),
    ],
    ids=["punctuation", "upper-case", "empty", "leading-dash", "64-chars", "container-scoped-refused-first-sorted",
         "container-scoped-custom-domain", "unknown-from-runtime", "unknown-from-config", "runtime-beats-config",
         "runtime-has-none"],
)
def test_runtime_handler_invalid(interceptor: RuntimeHandlerInterceptor, ctx: CallContext, message: str) -> None:
    assert invalid(interceptor, ctx) == message


def test_runtime_handler_unchecked_when_nothing_is_known_warns() -> None:
    assert handler().adjust(run_pod({RH: "kata"})) == Adjustment(
        changes=(Change("runtime_handler", "kata", "runtime-handler", RH, "kata"),),
        warnings=("runtime handler 'kata' for pod ns/web not checked: the runtime does not report its handlers and no "
                  "`known` list is configured for runtime-handler",))


def test_runtime_handler_unknown_default_is_failed_precondition() -> None:
    result = handler(default="gvisor").adjust(run_pod({}, runtime=RUNTIME))
    assert result == Denial("criproxy: pod ns/web: the configured default runtime handler 'gvisor' cannot be used: the "
                            "runtime has no handler 'gvisor'; known handlers: kata, runc (from "
                            "Status.runtime_handlers)", grpc.StatusCode.FAILED_PRECONDITION,
                            "runtime-handler", "", "gvisor").as_adjustment()


# ---------------------------------------------------------------- seccomp

SC = "seccomp-profile.criproxy.io/pod"
SC_APP = "seccomp-profile.criproxy.io/container.app"
LEGACY_POD = "seccomp.security.alpha.kubernetes.io/pod"
LEGACY_APP = "container.seccomp.security.alpha.kubernetes.io/app"
DEFAULT = {"profile_type": "RuntimeDefault"}
UNCONFINED = {"profile_type": "Unconfined"}
AUDIT = {"profile_type": "Localhost", "localhost_ref": "{root}/profiles/audit.json"}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A profile root with profiles/audit.json, a symlink inside it, one out of it and a directory."""
    root = tmp_path / "seccomp"
    (root / "profiles").mkdir(parents=True)
    (root / "profiles" / "audit.json").write_text('{"defaultAction": "SCMP_ACT_LOG"}')
    (tmp_path / "outside.json").write_text("{}")
    os.symlink(root / "profiles" / "audit.json", root / "inside-link.json")
    os.symlink(tmp_path / "outside.json", root / "escape.json")
    os.symlink(tmp_path, root / "up")
    return root


def seccomp(root: Path, legacy: bool = False) -> SeccompInterceptor:
    return SeccompInterceptor(SeccompConfig(profile_root=root, legacy_annotations=legacy), Lookup())


def profile(change_value: dict[str, str], key: str, raw: str) -> Adjustment:
    return Adjustment(changes=(Change(FIELD, change_value, "seccomp-profile", key, raw),))


@pytest.mark.parametrize(
    ("legacy", "annotations", "on_pod", "expected"),
    [
        (False, {SC: "runtime/default"}, True, (SC, DEFAULT)),
        (False, {"seccomp-profile.criproxy.io": "unconfined"}, True, ("seccomp-profile.criproxy.io", UNCONFINED)),
        (False, {SC: " unconfined "}, True, (SC, UNCONFINED)),
        (False, {SC: "docker/default"}, True, (SC, DEFAULT)),
        (False, {SC: "localhost/profiles/audit.json"}, True, (SC, AUDIT)),
        (False, {SC: "localhost/inside-link.json"}, True,
         (SC, {"profile_type": "Localhost", "localhost_ref": "{root}/inside-link.json"})),
        (False, {SC: "runtime/default", SC_APP: "unconfined"}, False, (SC_APP, UNCONFINED)),
        (False, {SC: "runtime/default", "seccomp-profile.criproxy.io/container.db": "unconfined"}, False,
         (SC, DEFAULT)),
        (False, {SC: "runtime/default", SC_APP: "unconfined"}, True, (SC, DEFAULT)),
        (True, {LEGACY_POD: "docker/default"}, True, (LEGACY_POD, DEFAULT)),
        (True, {LEGACY_POD: "localhost/profiles/audit.json"}, False, (LEGACY_POD, AUDIT)),
        (True, {LEGACY_APP: "unconfined", SC: "runtime/default"}, False, (LEGACY_APP, UNCONFINED)),
        (True, {LEGACY_APP: "unconfined", SC_APP: "runtime/default"}, False, (SC_APP, DEFAULT)),
        (True, {LEGACY_POD: "unconfined", "seccomp-profile.criproxy.io": "runtime/default"}, True,
         ("seccomp-profile.criproxy.io", DEFAULT)),
        (True, {LEGACY_APP: "unconfined", LEGACY_POD: "runtime/default"}, True, (LEGACY_POD, DEFAULT)),
    ],
    ids=["sandbox-runtime-default", "sandbox-bare-unconfined", "value-stripped", "docker-default", "localhost",
         "localhost-symlink-inside-root", "container-beats-pod", "other-container-ignored", "sandbox-ignores-container",
         "legacy-pod-docker-default", "legacy-pod-applies-to-container", "legacy-container-beats-pod-key",
         "criproxy-container-beats-legacy-container", "criproxy-bare-beats-legacy-pod",
         "sandbox-ignores-legacy-container"],
)
def test_seccomp(root: Path, legacy: bool, annotations: dict[str, str], on_pod: bool,
                 expected: tuple[str, dict[str, str]]) -> None:
    """`expected`: the annotation key that wins and the SecurityProfile it sets."""
    key, value = expected
    ctx = run_pod(annotations) if on_pod else create(annotations)
    value = {k: v.format(root=root) for k, v in value.items()}
    assert seccomp(root, legacy).adjust(ctx) == profile(value, key, annotations[key])


@pytest.mark.parametrize(
    "annotations",
    [{}, {LEGACY_POD: "unconfined"}, {LEGACY_APP: "unconfined"}, {"seccomp-profile.example.com/pod": "unconfined"},
     {"seccomp-profile.criproxy.io/container.db": "unconfined"}],
    ids=["none", "legacy-pod-disabled", "legacy-container-disabled", "other-domain", "other-container"],
)
def test_seccomp_nothing(root: Path, annotations: dict[str, str]) -> None:
    assert seccomp(root).adjust(create(annotations)) == NOTHING
    assert seccomp(root).adjust(run_pod(annotations)) == NOTHING


@pytest.mark.parametrize(
    ("raw", "accepted"),
    [
        ("bogus", "expected runtime/default, unconfined or localhost/<path>"),
        ("RuntimeDefault", "expected runtime/default, unconfined or localhost/<path>"),
        ("", "expected runtime/default, unconfined or localhost/<path>"),
        ("localhost/", "localhost/ must be followed by a profile file relative to {root}"),
        ("localhost//etc/passwd", "localhost/ must be followed by a profile file relative to {root}"),
        ("localhost/../outside.json", "'..' is not allowed; expected a profile file relative to {root}"),
        ("localhost/profiles/../../outside.json", "'..' is not allowed; expected a profile file relative to {root}"),
        ("localhost/escape.json", "the profile resolves outside {root}"),
        ("localhost/up/outside.json", "the profile resolves outside {root}"),
        ("localhost/missing.json", "no profile file {root}/missing.json on this node"),
        ("localhost/profiles", "no profile file {root}/profiles on this node"),
        ("localhost/a\x00b", "localhost/ must be followed by a profile file relative to {root}"),
    ],
    ids=["unknown", "enum-name", "empty", "empty-path", "absolute", "dot-dot", "dot-dot-inside", "symlink-escape",
         "dir-symlink-escape", "missing-file", "directory", "nul"],
)
def test_seccomp_invalid(root: Path, raw: str, accepted: str) -> None:
    assert invalid(seccomp(root), create({SC: raw})) == f"annotation {SC}={raw!r}: {accepted.format(root=root)}"


@pytest.mark.parametrize(
    ("kubelet", "raw", "expected"),
    [
        (api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.RuntimeDefault), "runtime/default", None),
        (api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.Unconfined), "unconfined", None),
        (api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.Localhost,
                                 localhost_ref="{root}/profiles/audit.json"), "localhost/profiles/audit.json", None),
        (api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.RuntimeDefault), "unconfined", UNCONFINED),
        (api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.Localhost, localhost_ref="/elsewhere/a.json"),
         "localhost/profiles/audit.json", AUDIT),
        (api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.Unconfined), "runtime/default", DEFAULT),
    ],
    ids=["same-runtime-default", "same-unconfined", "same-localhost", "different-type", "different-localhost-file",
         "unconfined-to-default"],
)
def test_seccomp_against_the_kubelets_profile(root: Path, kubelet: api_pb2.SecurityProfile, raw: str,
                                              expected: dict[str, str] | None) -> None:
    existing = api_pb2.SecurityProfile(profile_type=kubelet.profile_type,
                                       localhost_ref=kubelet.localhost_ref.format(root=root))
    result = seccomp(root).adjust(create({SC: raw}, seccomp=existing))
    if expected is None:
        assert result == NOTHING
    else:
        assert result == profile({k: v.format(root=root) for k, v in expected.items()}, SC, raw)


# ---------------------------------------------------------------- resources: parsing

def one(path: str, value: Any, setting: str, key: str, raw: str, *, base: str = RES) -> Adjustment:
    return Adjustment(changes=(Change(base + path, value, setting, key, raw),))


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        ({"cpu-quota.criproxy.io/pod": "500m"},
         one("cpu_quota", 50_000, "cpu-quota", "cpu-quota.criproxy.io/pod", "500m")),
        ({"cpu-quota.criproxy.io/pod": "1.5"},
         one("cpu_quota", 150_000, "cpu-quota", "cpu-quota.criproxy.io/pod", "1.5")),
        ({"cpu-quota.criproxy.io/pod": "10m"},
         one("cpu_quota", 1000, "cpu-quota", "cpu-quota.criproxy.io/pod", "10m")),
        ({"cpu-quota.criproxy.io/pod": "disable"},
         one("cpu_quota", -1, "cpu-quota", "cpu-quota.criproxy.io/pod", "disable")),
        ({"cpu-period.criproxy.io/pod": "50000"},
         one("cpu_period", 50_000, "cpu-period", "cpu-period.criproxy.io/pod", "50000")),
        ({"cpu-period.criproxy.io/pod": "1000000"},
         one("cpu_period", 1_000_000, "cpu-period", "cpu-period.criproxy.io/pod", "1000000")),
        ({"cpu-shares.criproxy.io/pod": "512"},
         one("cpu_shares", 512, "cpu-shares", "cpu-shares.criproxy.io/pod", "512")),
        ({"cpu-shares.criproxy.io/pod": " 2 "},
         one("cpu_shares", 2, "cpu-shares", "cpu-shares.criproxy.io/pod", " 2 ")),
        ({"cpuset-cpus.criproxy.io/pod": "0-3,8"},
         one("cpuset_cpus", "0-3,8", "cpuset-cpus", "cpuset-cpus.criproxy.io/pod", "0-3,8")),
        ({"cpuset-mems.criproxy.io": " 0 "},
         one("cpuset_mems", "0", "cpuset-mems", "cpuset-mems.criproxy.io", " 0 ")),
        ({"memory-limit.criproxy.io/pod": "512Mi"},
         one("memory_limit_in_bytes", 512 * Mi, "memory-limit", "memory-limit.criproxy.io/pod", "512Mi")),
        ({"memory-limit.criproxy.io/pod": "4Mi"},
         one("memory_limit_in_bytes", 4 * Mi, "memory-limit", "memory-limit.criproxy.io/pod", "4Mi")),
        ({"memory-limit.criproxy.io/pod": "1G"},
         one("memory_limit_in_bytes", 10**9, "memory-limit", "memory-limit.criproxy.io/pod", "1G")),
        ({"memory-swap.criproxy.io/pod": "1Gi"},
         one("memory_swap_limit_in_bytes", Gi, "memory-swap", "memory-swap.criproxy.io/pod", "1Gi")),
        ({"hugepages-2mi.criproxy.io/pod": "4Mi"},
         one("hugepage_limits[2MB]", 4 * Mi, "hugepages-2mi", "hugepages-2mi.criproxy.io/pod", "4Mi")),
        ({"hugepages-1gi.criproxy.io/container.app": "2Gi"},
         one("hugepage_limits[1GB]", 2 * Gi, "hugepages-1gi", "hugepages-1gi.criproxy.io/container.app", "2Gi")),
        ({"hugepages-64ki.criproxy.io/pod": "128Ki"},
         one("hugepage_limits[64KB]", 128 << 10, "hugepages-64ki", "hugepages-64ki.criproxy.io/pod", "128Ki")),
        ({"oom-score-adj.criproxy.io/pod": "500"},
         one("oom_score_adj", 500, "oom-score-adj", "oom-score-adj.criproxy.io/pod", "500")),
        ({"oom-score-adj.criproxy.io/pod": "-997"}, NOTHING),
        ({"unified.memory.high.criproxy.io/pod": " 1000000 "},
         one("unified[memory.high]", "1000000", "unified.memory.high", "unified.memory.high.criproxy.io/pod",
             " 1000000 ")),
        ({"unified.pids.max.criproxy.io": "max"},
         one("unified[pids.max]", "max", "unified.pids.max", "unified.pids.max.criproxy.io", "max")),
        ({"cpu-period.criproxy.io/pod": "100000"}, NOTHING),
        ({"cpu-shares.criproxy.io/pod": "1024"}, NOTHING),
    ],
    ids=["cpu-quota-500m", "cpu-quota-1.5", "cpu-quota-least", "cpu-quota-disable", "cpu-period", "cpu-period-max",
         "cpu-shares", "cpu-shares-stripped", "cpuset-cpus", "cpuset-mems-bare-stripped", "memory-limit",
         "memory-limit-least", "memory-limit-decimal", "memory-swap", "hugepages-2mi", "hugepages-1gi-container",
         "hugepages-64ki", "oom-score-adj", "oom-score-adj-same", "unified-memory-high", "unified-pids-max-bare",
         "cpu-period-same", "cpu-shares-same"],
)
def test_resources_each_setting(annotations: dict[str, str], expected: Adjustment) -> None:
    assert res_interceptor().adjust(create(annotations)) == expected


def test_resources_nothing_without_annotations() -> None:
    unrelated = {"app.kubernetes.io/name": "web", "runtime-handler.criproxy.io/pod": "kata",
                 "seccomp-profile.criproxy.io/pod": "unconfined", "memory-limit.example.com/pod": "1Gi"}
    assert res_interceptor().adjust(create({})) == NOTHING
    assert res_interceptor().adjust(create(unrelated)) == NOTHING
    assert res_interceptor().adjust(update({}, NO_LIMITS)) == NOTHING


def test_resources_cpu_quota_uses_the_annotated_period() -> None:
    annotations = {"cpu-quota.criproxy.io/pod": "2", "cpu-period.criproxy.io/pod": "50000"}
    assert res_interceptor().adjust(create(annotations)) == Adjustment(changes=(
        Change(RES + "cpu_period", 50_000, "cpu-period", "cpu-period.criproxy.io/pod", "50000"),
        Change(RES + "cpu_quota", 100_000, "cpu-quota", "cpu-quota.criproxy.io/pod", "2"),
    ))


def test_resources_cpu_quota_uses_the_kubelets_period() -> None:
    kubelet = {**NO_LIMITS, "cpu_period": 10_000}
    assert res_interceptor().adjust(create({"cpu-quota.criproxy.io/pod": "1"}, kubelet=kubelet)) == one(
        "cpu_quota", 10_000, "cpu-quota", "cpu-quota.criproxy.io/pod", "1")


def test_resources_several_settings_in_order() -> None:
    annotations = {"unified.pids.max.criproxy.io/pod": "100", "memory-limit.criproxy.io/pod": "1Gi",
                   "hugepages-2mi.criproxy.io/pod": "2Mi", "cpu-shares.criproxy.io/pod": "100"}
    assert [c.path for c in res_interceptor().adjust(create(annotations)).changes] == [
        RES + "cpu_shares", RES + "memory_limit_in_bytes", RES + "hugepage_limits[2MB]", RES + "unified[pids.max]"]


MEM_C, MEM_P = "memory-limit.criproxy.io/container.app", "memory-limit.criproxy.io/pod"


@pytest.mark.parametrize(
    ("annotations", "container", "expected"),
    [
        ({MEM_C: "256Mi", MEM_P: "512Mi"}, "app", one("memory_limit_in_bytes", 256 * Mi, "memory-limit", MEM_C,
                                                      "256Mi")),
        ({MEM_C: "256Mi", MEM_P: "512Mi"}, "db", one("memory_limit_in_bytes", 512 * Mi, "memory-limit", MEM_P,
                                                     "512Mi")),
        ({"memory-limit.criproxy.io/container.sidecar": "256Mi"}, "app", NOTHING),
        ({"memory-limit.criproxy.io/container.sidecar": "lots", "cpu-quota.criproxy.io/container.sidecar": "abc",
          "hugepages-2mi.criproxy.io/container.sidecar": "3Mi", "unified.io.max.criproxy.io/container.sidecar": "x",
          "oom-score-adj.criproxy.io/container.sidecar": "5000"}, "app", NOTHING),
        ({"hugepages-2mi.criproxy.io/container.app": "2Mi", "hugepages-2mi.criproxy.io/pod": "4Mi"}, "app",
         one("hugepage_limits[2MB]", 2 * Mi, "hugepages-2mi", "hugepages-2mi.criproxy.io/container.app", "2Mi")),
        ({"unified.pids.max.criproxy.io/container.app": "10", "unified.pids.max.criproxy.io/pod": "20"}, "app",
         one("unified[pids.max]", "10", "unified.pids.max", "unified.pids.max.criproxy.io/container.app", "10")),
    ],
    ids=["container-beats-pod", "pod-for-other-container", "other-container-ignored",
         "other-containers-invalid-values-ignored", "hugepages-container-beats-pod", "unified-container-beats-pod"],
)
def test_resources_scope(annotations: dict[str, str], container: str, expected: Adjustment) -> None:
    assert res_interceptor().adjust(create(annotations, container=container)) == expected


CPU_QUOTA = "expected CPUs as a quantity (e.g. 500m, 1.5, 2) or disable"
CPUSET = "expected a CPU/NUMA node list such as 0-3,8 (ascending ranges, ids up to 8191)"
MEMORY = "expected a memory limit as a quantity of bytes (e.g. 512Mi, 2Gi), at least 4194304"


@pytest.mark.parametrize(
    ("annotations", "kubelet", "message"),
    [
        ({"cpu-quota.criproxy.io/pod": "abc"}, NO_LIMITS, f"annotation cpu-quota.criproxy.io/pod='abc': {CPU_QUOTA}"),
        ({"cpu-quota.criproxy.io/pod": "0"}, NO_LIMITS,
         f"annotation cpu-quota.criproxy.io/pod='0': {CPU_QUOTA}; at a 100000 µs period the least is 1/100 CPUs"),
        ({"cpu-quota.criproxy.io/pod": "1m"}, NO_LIMITS,
         f"annotation cpu-quota.criproxy.io/pod='1m': {CPU_QUOTA}; at a 100000 µs period the least is 1/100 CPUs"),
        ({"cpu-quota.criproxy.io/pod": "-1"}, NO_LIMITS,
         f"annotation cpu-quota.criproxy.io/pod='-1': {CPU_QUOTA}; at a 100000 µs period the least is 1/100 CPUs"),
        ({"cpu-quota.criproxy.io/pod": "50m", "cpu-period.criproxy.io/pod": "10000"}, NO_LIMITS,
         f"annotation cpu-quota.criproxy.io/pod='50m': {CPU_QUOTA}; at a 10000 µs period the least is 1/10 CPUs"),
        ({"cpu-quota.criproxy.io/pod": "1e10"}, NO_LIMITS,
         f"annotation cpu-quota.criproxy.io/pod='1e10': {CPU_QUOTA}; 10000000000 CPUs is not a plausible limit"),
        ({"cpu-quota.criproxy.io/pod": "Disable"}, NO_LIMITS,
         f"annotation cpu-quota.criproxy.io/pod='Disable': {CPU_QUOTA}"),
        ({"cpu-period.criproxy.io/pod": "999"}, NO_LIMITS,
         "annotation cpu-period.criproxy.io/pod='999': expected the CFS period in microseconds, an integer from 1000 "
         "to 1000000"),
        ({"cpu-period.criproxy.io/pod": "1000001"}, NO_LIMITS, "annotation cpu-period.criproxy.io/pod='1000001': "
         "expected the CFS period in microseconds, an integer from 1000 to 1000000"),
        ({"cpu-period.criproxy.io/pod": "1e5"}, NO_LIMITS,
         "annotation cpu-period.criproxy.io/pod='1e5': expected the CFS period in microseconds, an integer from 1000 "
         "to 1000000"),
        ({"cpu-shares.criproxy.io/pod": "1"}, NO_LIMITS,
         "annotation cpu-shares.criproxy.io/pod='1': expected CPU shares, an integer from 2 to 262144"),
        ({"cpu-shares.criproxy.io/pod": "262145"}, NO_LIMITS,
         "annotation cpu-shares.criproxy.io/pod='262145': expected CPU shares, an integer from 2 to 262144"),
        ({"cpuset-cpus.criproxy.io/pod": "3-1"}, NO_LIMITS, f"annotation cpuset-cpus.criproxy.io/pod='3-1': {CPUSET}"),
        ({"cpuset-cpus.criproxy.io/pod": "a"}, NO_LIMITS, f"annotation cpuset-cpus.criproxy.io/pod='a': {CPUSET}"),
        ({"cpuset-cpus.criproxy.io/pod": ""}, NO_LIMITS, f"annotation cpuset-cpus.criproxy.io/pod='': {CPUSET}"),
        ({"cpuset-cpus.criproxy.io/pod": "8192"}, NO_LIMITS,
         f"annotation cpuset-cpus.criproxy.io/pod='8192': {CPUSET}"),
        ({"cpuset-cpus.criproxy.io/pod": "0-8192"}, NO_LIMITS,
         f"annotation cpuset-cpus.criproxy.io/pod='0-8192': {CPUSET}"),
        ({"cpuset-mems.criproxy.io/pod": "0,,1"}, NO_LIMITS,
         f"annotation cpuset-mems.criproxy.io/pod='0,,1': {CPUSET}"),
        ({"memory-limit.criproxy.io/pod": "1Mi"}, NO_LIMITS,
         f"annotation memory-limit.criproxy.io/pod='1Mi': {MEMORY}"),
        ({"memory-limit.criproxy.io/pod": "lots"}, NO_LIMITS,
         f"annotation memory-limit.criproxy.io/pod='lots': {MEMORY}"),
        ({"memory-limit.criproxy.io/pod": "0.5Gi1"}, NO_LIMITS,
         f"annotation memory-limit.criproxy.io/pod='0.5Gi1': {MEMORY}"),
        ({"memory-limit.criproxy.io/pod": "100.1Mi"}, NO_LIMITS,
         f"annotation memory-limit.criproxy.io/pod='100.1Mi': {MEMORY}"),
        ({"memory-limit.criproxy.io/pod": "5Ei"}, NO_LIMITS,
         f"annotation memory-limit.criproxy.io/pod='5Ei': {MEMORY}"),
        ({"memory-limit.criproxy.io/pod": "1Gi", "memory-swap.criproxy.io/pod": "512Mi"}, NO_LIMITS,
         "annotation memory-swap.criproxy.io/pod='512Mi': expected memory plus swap as a quantity of bytes "
         "(e.g. 512Mi, 2Gi), at least 1073741824"),
        ({"memory-swap.criproxy.io/pod": "1Gi"}, {**NO_LIMITS, "memory_limit_in_bytes": 2 * Gi},
         "annotation memory-swap.criproxy.io/pod='1Gi': expected memory plus swap as a quantity of bytes "
         "(e.g. 512Mi, 2Gi), at least 2147483648"),
        ({"memory-swap.criproxy.io/pod": "1Mi"}, NO_LIMITS,
         "annotation memory-swap.criproxy.io/pod='1Mi': expected memory plus swap as a quantity of bytes "
         "(e.g. 512Mi, 2Gi), at least 4194304"),
        ({"hugepages-2mi.criproxy.io/pod": "3Mi"}, NO_LIMITS,
         "annotation hugepages-2mi.criproxy.io/pod='3Mi': expected a multiple of the 2MB page size"),
        ({"hugepages-1gi.criproxy.io/pod": "1536Mi"}, NO_LIMITS,
         "annotation hugepages-1gi.criproxy.io/pod='1536Mi': expected a multiple of the 1GB page size"),
        ({"hugepages-2mi.criproxy.io/pod": "lots"}, NO_LIMITS,
         "annotation hugepages-2mi.criproxy.io/pod='lots': expected a 2MB hugepage limit as a quantity of bytes "
         "(e.g. 512Mi, 2Gi), at least 0"),
        ({"hugepages-2Mi.criproxy.io/pod": "4Mi"}, NO_LIMITS,
         "annotation hugepages-2Mi.criproxy.io/pod='4Mi': hugepages settings are named hugepages-<n>ki|mi|gi, "
         "lower case, e.g. hugepages-2mi"),
        ({"hugepages-2mb.criproxy.io/container.app": "4Mi"}, NO_LIMITS,
         "annotation hugepages-2mb.criproxy.io/container.app='4Mi': hugepages settings are named "
         "hugepages-<n>ki|mi|gi, lower case, e.g. hugepages-2mi"),
        ({"oom-score-adj.criproxy.io/pod": "2000"}, NO_LIMITS,
         "annotation oom-score-adj.criproxy.io/pod='2000': expected an OOM score adjustment, an integer from -1000 "
         "to 1000"),
        ({"oom-score-adj.criproxy.io/pod": "-1001"}, NO_LIMITS,
         "annotation oom-score-adj.criproxy.io/pod='-1001': expected an OOM score adjustment, an integer from -1000 "
         "to 1000"),
        ({"unified.memory.max.criproxy.io/pod": "1000"}, NO_LIMITS,
         "annotation unified.memory.max.criproxy.io/pod='1000': cgroup v2 key 'memory.max' is not allowed "
         "(resources.unified-keys: memory.high, memory.oom.group, pids.max)"),
        ({"unified.memory.high.criproxy.io/pod": "1\n2"}, NO_LIMITS,
         "annotation unified.memory.high.criproxy.io/pod='1\\n2': expected a single-line value of at most 256 bytes"),
        ({"unified.memory.high.criproxy.io/pod": "  "}, NO_LIMITS,
         "annotation unified.memory.high.criproxy.io/pod='  ': expected a single-line value of at most 256 bytes"),
        ({"unified.memory.high.criproxy.io/pod": "9" * 257}, NO_LIMITS,
         # quoted values are cut at 200 characters (the whole status must fit in gRPC trailers)
         f"annotation unified.memory.high.criproxy.io/pod='{'9' * 199}...(259 characters): expected a single-line "
         "value of at most 256 bytes"),
    ],
    ids=["cpu-quota-abc", "cpu-quota-0", "cpu-quota-1m-too-small", "cpu-quota-negative",
         "cpu-quota-too-small-at-annotated-period", "cpu-quota-implausible", "cpu-quota-Disable", "cpu-period-999",
         "cpu-period-too-big", "cpu-period-exponent", "cpu-shares-1", "cpu-shares-too-big", "cpuset-descending",
         "cpuset-letter", "cpuset-empty", "cpuset-id-too-big", "cpuset-range-too-big", "cpuset-mems-empty-item",
         "memory-limit-1Mi", "memory-limit-lots", "memory-limit-garbage", "memory-limit-fractional-bytes",
         "memory-limit-too-big", "memory-swap-below-annotated-memory", "memory-swap-below-kubelet-memory",
         "memory-swap-below-minimum", "hugepages-2mi-not-multiple", "hugepages-1gi-not-multiple", "hugepages-lots",
         "hugepages-upper-case-setting", "hugepages-bad-unit", "oom-2000", "oom-minus-1001", "unified-not-allowed",
         "unified-multi-line", "unified-blank", "unified-too-long"],
)
def test_resources_invalid(annotations: dict[str, str], kubelet: dict[str, Any], message: str) -> None:
    assert invalid(res_interceptor(), create(annotations, kubelet=kubelet)) == message


def test_resources_unified_with_no_keys_configured() -> None:
    ctx = create({"unified.memory.high.criproxy.io/pod": "1000"})
    assert invalid(res_interceptor(unified=frozenset()), ctx) == (
        "annotation unified.memory.high.criproxy.io/pod='1000': cgroup v2 key 'memory.high' is not allowed "
        "(resources.unified-keys: none are configured)")


# ---------------------------------------------------------------- resources: tightening only

ONE_CPU_1GI: dict[str, Any] = {
    "cpu_period": 100_000, "cpu_quota": 100_000, "cpu_shares": 1024, "memory_limit_in_bytes": Gi,
    "memory_swap_limit_in_bytes": Gi, "oom_score_adj": 500, "cpuset_cpus": "0-3", "cpuset_mems": "0",
    "hugepage_limits": {"2MB": 0, "1GB": 0}, "unified": {"memory.high": "1000000", "memory.oom.group": "1"},
}


def kubelet_with(**values: Any) -> dict[str, Any]:
    return {**ONE_CPU_1GI, **values}


def memory_and_swap(value: int, raw: str, base: str = RES) -> Adjustment:
    """A memory-limit annotation on a container the kubelet gave no swap (swap limit == memory limit)."""
    return Adjustment(changes=(Change(base + "memory_limit_in_bytes", value, "memory-limit", MEM_P, raw),
                               Change(base + "memory_swap_limit_in_bytes", value, "memory-limit", MEM_P, raw)))


@pytest.mark.parametrize(
    ("setting", "raw", "kubelet", "field", "value"),
    [
        ("memory-limit", "512Mi", kubelet_with(memory_swap_limit_in_bytes=0), "memory_limit_in_bytes", 512 * Mi),
        ("memory-limit", "8Gi", kubelet_with(memory_limit_in_bytes=0, memory_swap_limit_in_bytes=0),
         "memory_limit_in_bytes", 8 * Gi),
        ("memory-swap", "1Gi", kubelet_with(memory_swap_limit_in_bytes=2 * Gi), "memory_swap_limit_in_bytes", Gi),
        ("memory-swap", "4Gi", kubelet_with(memory_swap_limit_in_bytes=-1), "memory_swap_limit_in_bytes", 4 * Gi),
        ("cpu-quota", "500m", ONE_CPU_1GI, "cpu_quota", 50_000),
        ("cpu-quota", "16", kubelet_with(cpu_quota=0), "cpu_quota", 1_600_000),
        ("cpu-quota", "disable", kubelet_with(cpu_quota=0), "cpu_quota", -1),
        ("cpu-quota", "500m", kubelet_with(cpu_period=50_000, cpu_quota=50_000), "cpu_quota", 25_000),
        ("cpu-period", "200000", ONE_CPU_1GI, "cpu_period", 200_000),
        ("cpu-shares", "512", ONE_CPU_1GI, "cpu_shares", 512),
        ("cpuset-cpus", "1-2", ONE_CPU_1GI, "cpuset_cpus", "1-2"),
        ("cpuset-cpus", "0,3", ONE_CPU_1GI, "cpuset_cpus", "0,3"),
        ("cpuset-cpus", "0-63", kubelet_with(cpuset_cpus=""), "cpuset_cpus", "0-63"),
        ("cpuset-mems", "0-1", kubelet_with(cpuset_mems=""), "cpuset_mems", "0-1"),
        ("oom-score-adj", "900", ONE_CPU_1GI, "oom_score_adj", 900),
        ("oom-score-adj", "1000", ONE_CPU_1GI, "oom_score_adj", 1000),
        ("hugepages-2mi", "4Mi", kubelet_with(hugepage_limits={"2MB": 8 * Mi}), "hugepage_limits[2MB]", 4 * Mi),
        ("hugepages-2mi", "4Mi", kubelet_with(hugepage_limits={}), "hugepage_limits[2MB]", 4 * Mi),
        ("unified.memory.high", "500000", ONE_CPU_1GI, "unified[memory.high]", "500000"),
        ("unified.memory.high", "500000", kubelet_with(unified={"memory.high": "max"}), "unified[memory.high]",
         "500000"),
        ("unified.pids.max", "100", ONE_CPU_1GI, "unified[pids.max]", "100"),
    ],
    ids=["memory-lower", "memory-kubelet-unlimited", "swap-lower", "swap-kubelet-unlimited", "quota-lower",
         "quota-kubelet-unlimited", "disable-kubelet-unlimited", "quota-at-kubelet-period", "period-longer",
         "shares-lower", "cpuset-subset", "cpuset-subset-list", "cpuset-kubelet-all", "mems-kubelet-all", "oom-higher",
         "oom-max", "hugepages-lower", "hugepages-size-kubelet-did-not-send", "unified-high-lower",
         "unified-high-from-max", "unified-added"],
)
def test_resources_tightening_is_a_change(setting: str, raw: str, kubelet: dict[str, Any], field: str,
                                          value: Any) -> None:
    key = f"{setting}.criproxy.io/pod"
    assert res_interceptor().adjust(create({key: raw}, kubelet=kubelet)) == one(field, value, setting, key, raw)


@pytest.mark.parametrize(
    ("setting", "raw", "kubelet", "loosened"),
    [
        ("memory-limit", "2Gi", ONE_CPU_1GI, ("memory_limit_in_bytes", Gi, 2 * Gi)),
        ("memory-swap", "2Gi", ONE_CPU_1GI, ("memory_swap_limit_in_bytes", Gi, 2 * Gi)),
        ("cpu-quota", "2", ONE_CPU_1GI, ("cpu_quota", 100_000, 200_000)),
        ("cpu-quota", "disable", ONE_CPU_1GI, ("cpu_quota", 100_000, -1)),
        ("cpu-period", "50000", ONE_CPU_1GI, ("cpu_period", 100_000, 50_000)),
        ("cpu-shares", "2048", ONE_CPU_1GI, ("cpu_shares", 1024, 2048)),
        ("cpuset-cpus", "0-7", ONE_CPU_1GI, ("cpuset_cpus", "0-3", "0-7")),
        ("cpuset-cpus", "4", ONE_CPU_1GI, ("cpuset_cpus", "0-3", "4")),
        ("cpuset-mems", "0-1", ONE_CPU_1GI, ("cpuset_mems", "0", "0-1")),
        ("oom-score-adj", "100", ONE_CPU_1GI, ("oom_score_adj", 500, 100)),
        ("oom-score-adj", "-1000", ONE_CPU_1GI, ("oom_score_adj", 500, -1000)),
        ("hugepages-2mi", "4Mi", ONE_CPU_1GI, ("hugepage_limits[2MB]", 0, 4 * Mi)),
        ("hugepages-1gi", "2Gi", kubelet_with(hugepage_limits={"1GB": Gi}), ("hugepage_limits[1GB]", Gi, 2 * Gi)),
        ("unified.memory.high", "2000000", ONE_CPU_1GI, ("unified[memory.high]", "1000000", "2000000")),
        ("unified.memory.high", "max", ONE_CPU_1GI, ("unified[memory.high]", "1000000", "max")),
        ("unified.memory.oom.group", "0", ONE_CPU_1GI, ("unified[memory.oom.group]", "1", "0")),
    ],
    ids=["memory-higher", "swap-higher", "quota-higher", "disable-when-kubelet-has-quota", "period-shorter",
         "shares-higher", "cpuset-superset", "cpuset-disjoint", "mems-superset", "oom-lower", "oom-min",
         "hugepages-vs-kubelet-0", "hugepages-higher", "unified-high-higher", "unified-high-to-max",
         "unified-other-key-changed"],
)
def test_resources_loosening_is_denied(setting: str, raw: str, kubelet: dict[str, Any],
                                       loosened: tuple[str, Any, Any]) -> None:
    key = f"{setting}.criproxy.io/pod"
    result = res_interceptor().adjust(create({key: raw}, kubelet=kubelet))
    assert result == loosen(key, raw, *loosened)
    assert result.denial is not None and result.denial.code == grpc.StatusCode.PERMISSION_DENIED


def test_resources_loosening_denial_exact_reason() -> None:
    result = res_interceptor().adjust(create({MEM_P: "2Gi"}, kubelet=ONE_CPU_1GI))
    assert result.changes == ()
    assert result.denial == Denial(
        "criproxy: container 'app' of pod ns/web: annotation memory-limit.criproxy.io/pod='2Gi' would loosen "
        "memory_limit_in_bytes from 1073741824 (set by the kubelet) to 2147483648; annotations may only tighten "
        "resources unless the resources interceptor's allow-loosening lists memory-limit",
        grpc.StatusCode.PERMISSION_DENIED, "memory-limit", MEM_P, "2Gi")


@pytest.mark.parametrize(
    ("allowed", "annotations", "expected"),
    [
        (frozenset({"memory-limit"}), {MEM_P: "2Gi"}, memory_and_swap(2 * Gi, "2Gi")),
        (frozenset({"*"}), {"cpu-quota.criproxy.io/pod": "disable"},
         one("cpu_quota", -1, "cpu-quota", "cpu-quota.criproxy.io/pod", "disable")),
        (frozenset({"hugepages-2mi"}), {"hugepages-2mi.criproxy.io/pod": "4Mi"},
         one("hugepage_limits[2MB]", 4 * Mi, "hugepages-2mi", "hugepages-2mi.criproxy.io/pod", "4Mi")),
        (frozenset({"cpu-quota"}), {MEM_P: "2Gi"},
         loosen(MEM_P, "2Gi", "memory_limit_in_bytes", Gi, 2 * Gi)),
    ],
    ids=["memory-limit-allowed", "star-allows-all", "hugepages-allowed", "other-setting-allowed-only"],
)
def test_resources_allow_loosening(allowed: frozenset[str], annotations: dict[str, str],
                                   expected: Adjustment) -> None:
    assert res_interceptor(loosen=allowed).adjust(create(annotations, kubelet=ONE_CPU_1GI)) == expected


def test_resources_quota_and_period_judged_together() -> None:
    # 1 CPU at a 50 ms period is the kubelet's 1 CPU at 100 ms: not looser, so both change.
    annotations = {"cpu-quota.criproxy.io/pod": "1", "cpu-period.criproxy.io/pod": "50000"}
    assert res_interceptor().adjust(create(annotations, kubelet=ONE_CPU_1GI)) == Adjustment(changes=(
        Change(RES + "cpu_period", 50_000, "cpu-period", "cpu-period.criproxy.io/pod", "50000"),
        Change(RES + "cpu_quota", 50_000, "cpu-quota", "cpu-quota.criproxy.io/pod", "1"),
    ))


def test_resources_unchanged_value_is_not_a_change() -> None:
    annotations = {MEM_P: "1Gi", "cpuset-cpus.criproxy.io/pod": "0-3", "hugepages-2mi.criproxy.io/pod": "0"}
    assert res_interceptor().adjust(create(annotations, kubelet=ONE_CPU_1GI)) == NOTHING


@pytest.mark.parametrize(
    ("ctx", "base"),
    [
        (create({MEM_P: "512Mi"}, kubelet=ONE_CPU_1GI), "config.linux.resources."),
        (update({MEM_P: "512Mi"}, ONE_CPU_1GI), "linux."),
    ],
    ids=["create-container", "update-container-resources"],
)
def test_resources_base_path_per_method(ctx: CallContext, base: str) -> None:
    assert res_interceptor().adjust(ctx) == memory_and_swap(512 * Mi, "512Mi", base=base)


def test_memory_limit_leaves_swap_the_kubelet_allowed() -> None:
    # The kubelet allowed 1Gi of swap on top of 1Gi of memory: lowering memory keeps that swap limit.
    kubelet = kubelet_with(memory_swap_limit_in_bytes=2 * Gi)
    assert res_interceptor().adjust(create({MEM_P: "512Mi"}, kubelet=kubelet)) == one(
        "memory_limit_in_bytes", 512 * Mi, "memory-limit", MEM_P, "512Mi")


def test_memory_swap_annotation_wins_over_following() -> None:
    annotations = {MEM_P: "512Mi", "memory-swap.criproxy.io/pod": "768Mi"}
    assert res_interceptor().adjust(create(annotations, kubelet=ONE_CPU_1GI)) == Adjustment(changes=(
        Change(RES + "memory_limit_in_bytes", 512 * Mi, "memory-limit", MEM_P, "512Mi"),
        Change(RES + "memory_swap_limit_in_bytes", 768 * Mi, "memory-swap", "memory-swap.criproxy.io/pod", "768Mi")))


def kept(field: str, value: Any, setting: str, key: str, raw: str, *, annotation: Any) -> Change:
    """On an update, the kubelet's tighter `value` standing against the annotation's."""
    return Change("linux." + field, value, setting, key, raw, note=(
        f"the kubelet's {field} {value!r} is tighter than the annotation's {annotation!r} and stands (on an update "
        "the tighter of the two wins)"))


def test_update_below_the_annotation_keeps_the_kubelets_tighter_value() -> None:
    # The kubelet shrinks the container to 32Mi; the annotation says 64Mi: the kubelet's 32Mi wins, and says so.
    resized = kubelet_with(memory_limit_in_bytes=32 * Mi, memory_swap_limit_in_bytes=32 * Mi)
    assert res_interceptor().adjust(update({MEM_P: "64Mi"}, resized)) == Adjustment(changes=(
        kept("memory_limit_in_bytes", 32 * Mi, "memory-limit", MEM_P, "64Mi", annotation=64 * Mi),
        kept("memory_swap_limit_in_bytes", 32 * Mi, "memory-limit", MEM_P, "64Mi", annotation=64 * Mi)))
    # Only the looser settings yield: a tighter annotation still applies beside them.
    annotations = {MEM_P: "512Mi", "cpu-shares.criproxy.io/pod": "512", "cpu-quota.criproxy.io/pod": "2"}
    assert res_interceptor().adjust(update(annotations, kubelet_with(memory_limit_in_bytes=256 * Mi))) == Adjustment(
        changes=(kept("cpu_quota", 100_000, "cpu-quota", "cpu-quota.criproxy.io/pod", "2", annotation=200_000),
                 Change("linux.cpu_shares", 512, "cpu-shares", "cpu-shares.criproxy.io/pod", "512"),
                 kept("memory_limit_in_bytes", 256 * Mi, "memory-limit", MEM_P, "512Mi", annotation=512 * Mi)))


def test_create_below_the_annotation_is_still_a_loosening() -> None:
    resized = kubelet_with(memory_limit_in_bytes=32 * Mi, memory_swap_limit_in_bytes=32 * Mi)
    assert res_interceptor().adjust(create({MEM_P: "64Mi"}, kubelet=resized)) == loosen(
        MEM_P, "64Mi", "memory_limit_in_bytes", 32 * Mi, 64 * Mi)


def test_update_container_resources_judges_against_the_update() -> None:
    hugepages = {"hugepages-2mi.criproxy.io/pod": "2Mi", "unified.pids.max.criproxy.io/pod": "64"}
    assert res_interceptor().adjust(update(hugepages, kubelet_with(hugepage_limits={"2MB": 4 * Mi}))) == Adjustment(
        changes=(Change("linux.hugepage_limits[2MB]", 2 * Mi, "hugepages-2mi", "hugepages-2mi.criproxy.io/pod", "2Mi"),
                 Change("linux.unified[pids.max]", "64", "unified.pids.max", "unified.pids.max.criproxy.io/pod",
                        "64")))


# ---------------------------------------------------------------- inputs that once slipped through (regressions)

def test_bug_cpu_quota_exa_suffix_is_an_invalid_annotation() -> None:
    assert invalid(res_interceptor(), create({"cpu-quota.criproxy.io/pod": "1E"})) == (
        f"annotation cpu-quota.criproxy.io/pod='1E': {CPU_QUOTA}; 1000000000000000000 CPUs is not a plausible limit")


def test_bug_zero_page_size_is_an_invalid_annotation() -> None:
    with pytest.raises(InvalidAnnotation) as err:
        res_interceptor().adjust(create({"hugepages-0mi.criproxy.io/pod": "0"}))
    assert err.value.key == "hugepages-0mi.criproxy.io/pod"


def test_bug_hugepage_size_spelling_does_not_bypass_the_kubelets_limit() -> None:
    ctx = create({"hugepages-2048ki.criproxy.io/pod": "2Mi"}, kubelet=ONE_CPU_1GI)
    result = res_interceptor().adjust(ctx)
    assert result.changes == ()
    assert result.denial is not None and result.denial.code == grpc.StatusCode.PERMISSION_DENIED


def test_bug_cpuset_with_non_ascii_digits_is_invalid() -> None:
    raw = "\u0660-\u0663"  # Arabic-Indic 0-3
    assert invalid(res_interceptor(), create({"cpuset-cpus.criproxy.io/pod": raw})) == (
        f"annotation cpuset-cpus.criproxy.io/pod={raw!r}: {CPUSET}")


def test_bug_unified_superscript_digit_is_a_loosening() -> None:
    key = "unified.memory.high.criproxy.io/pod"
    result = res_interceptor().adjust(create({key: "\u00b2"}, kubelet=ONE_CPU_1GI))
    assert result == loosen(key, "\u00b2", "unified[memory.high]", "1000000", "\u00b2")
