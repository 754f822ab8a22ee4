"""AnnotationPolicy: defaults and review of real CRI calls (RunPodSandbox, CreateContainer) under a policy file:
rule matching, allowed values, required and effective settings, the three modes, and drift."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping

import grpc
import pytest

from criproxy.api.runtime.v1 import api_pb2
from criproxy.cri.adjust import Change
from criproxy.cri.annotations import Lookup
from criproxy.cri.context import CREATE_CONTAINER, RUN_POD_SANDBOX, CallContext
from criproxy.interceptors import Interceptor
from criproxy.interceptors.seccomp import SeccompConfig, SeccompInterceptor
from criproxy.pipeline import Outcome, Pipeline
from criproxy.pipeline.index import pod_info
from criproxy.policies import APPLIED, AUDITED, DENIED, DRY_RUN, Decision, Review
from criproxy.policies.engine import SECCOMP_FIELD, AnnotationPolicy, effective_value, pinned_annotations
from criproxy.policies.model import FailurePolicy, parse_policy

FILE = "p.yaml"
HEADER = "apiVersion: criproxy.io/v1alpha1\nkind: AnnotationPolicy\n"
RUNTIME_DEFAULT = api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.RuntimeDefault)
UNCONFINED = api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.Unconfined)
PROFILE_ROOT = "/var/lib/kubelet/seccomp"

RULES = """\
rules:
  - name: tenants
    namespaces: ["tenant-*"]
    excludeNamespaces: [tenant-legacy]
    settings:
      runtime-handler: {values: [kata], default: kata}
      seccomp-profile: {values: [runtime/default, "localhost/*"], default: runtime/default}
      memory-limit: {max: 1Gi}
  - name: batch
    namespaces: [batch]
    podSelector: {matchLabels: {tier: batch}}
    settings:
      cpu-quota: {max: "2"}
      memory-limit: {min: 64Mi, max: 8Gi, default: 1Gi}
  - name: plain
    namespaces: [batch, a]
    settings:
      memory-limit: {max: 1Gi}
      cpu-quota: {}
"""


def key(setting: str, scope: str = "pod") -> str:
    return f"{setting}.criproxy.io/{scope}" if scope else f"{setting}.criproxy.io"


def make_policy(rules: str = RULES, mode: str = "enforce", drift: str = "deny") -> AnnotationPolicy:
    return AnnotationPolicy(parse_policy(f"{HEADER}mode: {mode}\ndrift: {drift}\n{rules}", FILE), Lookup())


def sandbox_config(namespace: str, annotations: Mapping[str, str], labels: Mapping[str, str] | None = None,
                   seccomp: api_pb2.SecurityProfile | None = None) -> api_pb2.PodSandboxConfig:
    config = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name="web", uid="uid-1", namespace=namespace),
        annotations=dict(annotations), labels=dict(labels or {}))
    if seccomp is not None:
        config.linux.security_context.seccomp.CopyFrom(seccomp)
    return config


def run_ctx(namespace: str = "a", annotations: Mapping[str, str] | None = None, *,
            labels: Mapping[str, str] | None = None, handler: str = "",
            seccomp: api_pb2.SecurityProfile | None = None) -> CallContext:
    """A RunPodSandbox call, its context built the way the pipeline builds it."""
    request = api_pb2.RunPodSandboxRequest(
        config=sandbox_config(namespace, annotations or {}, labels, seccomp), runtime_handler=handler)
    c = request.config
    return CallContext(RUN_POD_SANDBOX, pod_info(c.metadata, c.labels, c.annotations), None, request)


def create_ctx(namespace: str = "a", annotations: Mapping[str, str] | None = None, *, container: str = "app",
               labels: Mapping[str, str] | None = None, seccomp: api_pb2.SecurityProfile | None = None,
               pinned: Mapping[str, str] | None = None) -> CallContext:
    """A CreateContainer call for `container`, with the sandbox's pinned annotations (None: not known)."""
    request = api_pb2.CreateContainerRequest(
        pod_sandbox_id="sandbox-1",
        config=api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name=container)),
        sandbox_config=sandbox_config(namespace, annotations or {}, labels))
    if seccomp is not None:
        request.config.linux.security_context.seccomp.CopyFrom(seccomp)
    s = request.sandbox_config
    return CallContext(CREATE_CONTAINER, pod_info(s.metadata, s.labels, s.annotations), container, request,
                       pinned=pinned)


def decide(policy: AnnotationPolicy, ctx: CallContext, *interceptors: Interceptor) -> Outcome:
    """The pipeline's own decision on the call under `policy`: its defaults merged in, the interceptors run,
    the review."""
    pipeline = Pipeline(interceptors, lookup=policy.lookup, policy=policy, on_decisions=lambda ctx, decisions: None)
    return asyncio.run(pipeline.decide(ctx))


def memory_change(raw: str = "512Mi", scope: str = "pod") -> Change:
    return Change("config.linux.resources.memory_limit_in_bytes", 512 << 20, "memory-limit",
                  key("memory-limit", scope), raw, by="resources")


def denial_text(review: Review) -> str:
    assert review.denial is not None
    assert review.denial.code == grpc.StatusCode.PERMISSION_DENIED
    assert review.changes == ()
    return review.denial.reason


def denied_for(review: Review, prefix: str, *violations: str) -> bool:
    """Whether the denial is `prefix` and then the violations joined by '; ', in any order (it follows the pod's
    annotation map, whose order protobuf does not define)."""
    text = denial_text(review)
    return any(text == prefix + "; ".join(order) for order in itertools.permutations(violations))


def actions(review: Review) -> list[str]:
    return [d.action for d in review.decisions]


# ------------------------------------------------------------------------------------------ identity and failure


def test_identity_names_the_file_and_digest() -> None:
    policy = make_policy()
    assert policy.identity == f"p.yaml@{policy.policies.digest}"
    assert len(policy.policies.digest) == 16


def test_failure_policy_comes_from_the_file() -> None:
    policy = make_policy(rules="interceptors: {resources: {onError: open, timeoutSeconds: 0.25}}\n")
    assert policy.failure("resources") == FailurePolicy("open", 0.25)
    assert policy.failure("seccomp") == FailurePolicy("closed", 1.0)


# ------------------------------------------------------------------------------------------ defaults


def test_defaults_of_the_matching_rule_for_a_pod_without_annotations() -> None:
    policy = make_policy()
    expected = {key("runtime-handler"): "kata", key("seccomp-profile"): "runtime/default"}
    assert policy.defaults(run_ctx("tenant-a")) == expected
    assert policy.defaults(create_ctx("tenant-a")) == expected


@pytest.mark.parametrize("scope", ["pod", ""], ids=["pod-key", "short-key"])
def test_no_default_for_a_setting_the_pod_sets(scope: str) -> None:
    policy = make_policy()
    annotations = {key("runtime-handler", scope): "kata"}
    assert policy.defaults(run_ctx("tenant-a", annotations)) == {key("seccomp-profile"): "runtime/default"}


def test_a_container_scope_key_counts_for_its_own_container_only() -> None:
    policy = make_policy()
    annotations = {key("seccomp-profile", "container.app"): "localhost/app.json"}
    assert policy.defaults(create_ctx("tenant-a", annotations, container="app")) == {key("runtime-handler"): "kata"}
    assert policy.defaults(create_ctx("tenant-a", annotations, container="sidecar")) == {
        key("runtime-handler"): "kata", key("seccomp-profile"): "runtime/default"}
    # the sandbox has no container: a container-scope key does not stand for the pod
    assert policy.defaults(run_ctx("tenant-a", annotations)) == {
        key("runtime-handler"): "kata", key("seccomp-profile"): "runtime/default"}


def test_defaults_only_from_the_first_matching_rule() -> None:
    policy = make_policy()
    assert policy.defaults(run_ctx("batch", labels={"tier": "batch"})) == {key("memory-limit"): "1Gi"}
    assert policy.defaults(run_ctx("batch")) == {}  # the 'plain' rule: no defaults
    assert policy.defaults(run_ctx("tenant-legacy")) == {}  # no rule at all
    assert policy.defaults(run_ctx("elsewhere")) == {}


def test_defaults_in_another_annotation_domain() -> None:
    policy = AnnotationPolicy(parse_policy(HEADER + RULES, FILE), Lookup("example.com"))
    assert policy.defaults(run_ctx("tenant-a", {"runtime-handler.example.com": "kata"})) == {
        "seccomp-profile.example.com/pod": "runtime/default"}


# ------------------------------------------------------------------------------------------ review: no rule


def test_no_rule_and_no_criproxy_annotation_passes_every_change() -> None:
    policy = make_policy()
    ctx = run_ctx("elsewhere", {"app.kubernetes.io/name": "web", "criproxy.io/applied": "[]",
                                "criproxy.io/pinned": "{}"})
    change = Change("runtime_handler", "kata", "runtime-handler", by="runtime-handler")
    review = policy.review(ctx, [change])
    assert review == Review(changes=(change,), denial=None, decisions=(
        Decision(APPLIED, "", "enforce", "runtime-handler", "", "", "from criproxy's configuration", change,
                 "runtime-handler"),))
    assert review.modify


def test_no_rule_and_a_criproxy_annotation_is_denied() -> None:
    policy = make_policy()
    review = policy.review(run_ctx("ns", {key("memory-limit"): "512Mi"}), [memory_change()])
    assert denial_text(review) == (
        f"criproxy: pod ns/web denied by policy ({policy.identity}): memory-limit.criproxy.io/pod='512Mi': no rule "
        "allows criproxy annotations in namespace 'ns'")
    assert review.decisions == (Decision(DENIED, "", "enforce", "memory-limit", key("memory-limit"), "512Mi",
                                         "no rule allows criproxy annotations in namespace 'ns'",
                                         interceptor="resources"),)


def test_no_rule_in_an_excluded_namespace() -> None:
    policy = make_policy()
    review = policy.review(create_ctx("tenant-legacy", {key("cpu-quota", ""): "1"}), [])
    assert denial_text(review) == (
        f"criproxy: container 'app' of pod tenant-legacy/web denied by policy ({policy.identity}): "
        "cpu-quota.criproxy.io='1': no rule allows criproxy annotations in namespace 'tenant-legacy'")


def test_no_rule_with_a_policy_file_in_audit_mode_passes_and_records() -> None:
    policy = make_policy(mode="audit")
    review = policy.review(run_ctx("ns", {key("memory-limit"): "512Mi"}), [memory_change()])
    assert review.denial is None
    assert review.changes == (memory_change(),)
    assert actions(review) == [AUDITED, APPLIED]


# ------------------------------------------------------------------------------------------ review: a rule


def test_allowed_annotations_pass_with_applied_decisions() -> None:
    policy = make_policy()
    change = memory_change("512Mi")
    review = policy.review(create_ctx("a", {key("memory-limit"): "512Mi", "other/key": "x"}), [change])
    assert review == Review(changes=(change,), decisions=(
        Decision(APPLIED, "plain", "enforce", "memory-limit", key("memory-limit"), "512Mi",
                 "from the pod's annotation", change, "resources"),))


def test_a_setting_the_rule_does_not_list_is_denied() -> None:
    policy = make_policy()
    review = policy.review(run_ctx("a", {key("runtime-handler"): "kata"}), [])
    assert denial_text(review) == (
        f"criproxy: pod a/web denied by policy rule 'plain' ({policy.identity}): runtime-handler.criproxy.io/pod="
        "'kata': rule 'plain' does not allow runtime-handler")


def test_an_unknown_setting_of_the_domain_is_denied_too() -> None:
    policy = make_policy()
    review = policy.review(run_ctx("a", {"no-such-setting.criproxy.io/pod": "1"}), [])
    assert denial_text(review).endswith("no-such-setting.criproxy.io/pod='1': rule 'plain' does not allow "
                                        "no-such-setting")


def test_a_refused_value_is_denied() -> None:
    policy = make_policy()
    review = policy.review(create_ctx("a", {key("memory-limit", "container.app"): "2Gi"}), [memory_change()])
    assert denial_text(review) == (
        f"criproxy: container 'app' of pod a/web denied by policy rule 'plain' ({policy.identity}): "
        "memory-limit.criproxy.io/container.app='2Gi': '2Gi' is not allowed; allowed: at most 1Gi")
    assert review.decisions == (Decision(DENIED, "plain", "enforce", "memory-limit",
                                         key("memory-limit", "container.app"), "2Gi",
                                         "'2Gi' is not allowed; allowed: at most 1Gi", interceptor="resources"),)


def test_every_violation_is_in_the_denial() -> None:
    policy = make_policy()
    annotations = {key("memory-limit"): "2Gi", key("cpu-quota"): "anything", key("seccomp-profile"): "unconfined"}
    review = policy.review(run_ctx("a", annotations), [])
    assert denied_for(review, f"criproxy: pod a/web denied by policy rule 'plain' ({policy.identity}): ",
                      "memory-limit.criproxy.io/pod='2Gi': '2Gi' is not allowed; allowed: at most 1Gi",
                      "seccomp-profile.criproxy.io/pod='unconfined': rule 'plain' does not allow seccomp-profile")
    assert actions(review) == [DENIED, DENIED]


def test_the_rule_is_chosen_by_labels_too() -> None:
    policy = make_policy()
    annotations = {key("memory-limit"): "4Gi"}
    assert policy.review(run_ctx("batch", annotations, labels={"tier": "batch"}), []).denial is None
    assert "rule 'plain'" in denial_text(policy.review(run_ctx("batch", annotations), []))


def test_a_family_rule_covers_its_members() -> None:
    policy = make_policy("rules:\n  - name: r\n    namespaces: [a]\n    settings:\n      hugepages-*: {max: 1Gi}\n"
                         "      unified.*: {values: ['max', '[0-9]*']}\n")
    assert policy.review(run_ctx("a", {key("hugepages-2mi"): "64Mi", key("unified.pids.max"): "max"}), []).denial \
        is None
    review = policy.review(run_ctx("a", {key("hugepages-1gi"): "2Gi", key("unified.memory.high"): "lots"}), [])
    assert denied_for(review, f"criproxy: pod a/web denied by policy rule 'r' ({policy.identity}): ",
                      "hugepages-1gi.criproxy.io/pod='2Gi': '2Gi' is not allowed; allowed: at most 1Gi",
                      "unified.memory.high.criproxy.io/pod='lots': 'lots' is not allowed; allowed: max, [0-9]*")


# ------------------------------------------------------------------------------------------ required


REQUIRED = "rules:\n  - name: r\n    namespaces: [a]\n    settings:\n      seccomp-profile: {required: true}\n" \
           "      hugepages-*: {required: true}\n"


def test_a_required_setting_missing_is_denied() -> None:
    policy = make_policy(REQUIRED)
    review = policy.review(run_ctx("a"), [])
    assert denial_text(review) == (
        f"criproxy: pod a/web denied by policy rule 'r' ({policy.identity}): rule 'r' requires the annotation "
        "seccomp-profile.criproxy.io/pod (or a container-scope one)")  # a family is never required
    assert review.decisions == (Decision(DENIED, "r", "enforce", "seccomp-profile", key("seccomp-profile"), "",
                                         "rule 'r' requires the annotation seccomp-profile.criproxy.io/pod (or a "
                                         "container-scope one)", interceptor="seccomp"),)


@pytest.mark.parametrize(
    ("annotations", "container"),
    [
        ({key("seccomp-profile"): "runtime/default"}, "app"),
        ({key("seccomp-profile", ""): "runtime/default"}, "app"),
        ({key("seccomp-profile", "container.app"): "runtime/default"}, "app"),
    ],
    ids=["pod-key", "short-key", "container-key"],
)
def test_a_required_setting_present_passes(annotations: dict[str, str], container: str) -> None:
    assert make_policy(REQUIRED).review(create_ctx("a", annotations, container=container), []).denial is None


def test_a_required_setting_of_another_container_does_not_count() -> None:
    policy = make_policy(REQUIRED)
    review = policy.review(create_ctx("a", {key("seccomp-profile", "container.app"): "x"}, container="sidecar"), [])
    assert "requires the annotation seccomp-profile.criproxy.io/pod" in denial_text(review)


def test_a_default_satisfies_required() -> None:
    policy = make_policy("rules:\n  - name: r\n    namespaces: [a]\n    settings:\n"
                         "      seccomp-profile: {required: true, default: runtime/default}\n")
    outcome = decide(policy, run_ctx("a"), SeccompInterceptor(SeccompConfig(), Lookup()))
    assert outcome.ctx.injected == {key("seccomp-profile")}
    assert outcome.ctx.pod.annotations == {key("seccomp-profile"): "runtime/default"}
    change = Change(SECCOMP_FIELD, {"profile_type": "RuntimeDefault"}, "seccomp-profile", key("seccomp-profile"),
                    "runtime/default", by="seccomp")
    assert (outcome.denial, outcome.changes) == (None, (change,))
    assert outcome.decisions == (Decision(APPLIED, "r", "enforce", "seccomp-profile", key("seccomp-profile"),
                                          "runtime/default", "default of the rule", change, "seccomp"),)


# ------------------------------------------------------------------------------------------ effective values


EFFECTIVE = """\
rules:
  - name: handlers
    namespaces: [h]
    settings:
      runtime-handler: {forbid: [runc], effective: true}
  - name: kata-only
    namespaces: [k]
    settings:
      runtime-handler: {values: [kata], effective: true}
  - name: confined
    namespaces: [s]
    settings:
      seccomp-profile: {forbid: [unconfined], effective: true}
  - name: default-only
    namespaces: [d]
    settings:
      seccomp-profile: {values: [runtime/default], effective: true}
  - name: not-effective
    namespaces: [n]
    settings:
      runtime-handler: {forbid: [runc]}
      seccomp-profile: {forbid: [unconfined]}
"""


def test_a_kubelet_set_runtime_handler_is_checked_without_any_annotation() -> None:
    policy = make_policy(EFFECTIVE)
    review = policy.review(run_ctx("h", handler="runc"), [])
    assert denial_text(review) == (
        f"criproxy: pod h/web denied by policy rule 'handlers' ({policy.identity}): the runtime-handler the runtime "
        "would get is not allowed: 'runc' is forbidden (runc)")
    assert review.decisions == (Decision(DENIED, "handlers", "enforce", "runtime-handler", "", "runc",
                                         "the runtime-handler the runtime would get is not allowed: 'runc' is "
                                         "forbidden (runc)", interceptor="runtime-handler"),)
    assert policy.review(run_ctx("h", handler="kata"), []).denial is None
    assert policy.review(run_ctx("h"), []).denial is None  # the runtime's default handler: '' is not forbidden


def test_the_runtime_default_handler_is_not_an_allowed_value() -> None:
    policy = make_policy(EFFECTIVE)
    assert denial_text(policy.review(run_ctx("k"), [])).endswith(
        "the runtime-handler the runtime would get is not allowed: '' is not allowed; allowed: kata")


def test_a_change_of_the_runtime_handler_wins_over_the_request() -> None:
    policy = make_policy(EFFECTIVE)
    to_kata = Change("runtime_handler", "kata", "runtime-handler", key("runtime-handler"), "kata")
    assert policy.review(run_ctx("k", {key("runtime-handler"): "kata"}, handler="runc"), [to_kata]).denial is None
    to_runc = Change("runtime_handler", "runc", "runtime-handler", by="runtime-handler")  # e.g. a configured default
    assert "'runc' is forbidden" in denial_text(policy.review(run_ctx("h", handler="kata"), [to_runc]))


def test_the_runtime_handler_is_not_checked_on_create_container() -> None:
    policy = make_policy(EFFECTIVE)
    assert policy.review(create_ctx("k"), []).denial is None


def test_a_kubelet_set_unconfined_profile_is_denied_without_any_annotation() -> None:
    policy = make_policy(EFFECTIVE)
    for ctx, who in ((run_ctx("s", seccomp=UNCONFINED), "pod s/web"),
                     (create_ctx("s", seccomp=UNCONFINED), "container 'app' of pod s/web")):
        assert denial_text(policy.review(ctx, [])) == (
            f"criproxy: {who} denied by policy rule 'confined' ({policy.identity}): the seccomp-profile the runtime "
            "would get is not allowed: 'unconfined' is forbidden (unconfined)")
    assert policy.review(run_ctx("s", seccomp=RUNTIME_DEFAULT), []).denial is None


def test_no_seccomp_profile_at_all_is_unconfined() -> None:
    policy = make_policy(EFFECTIVE)
    assert "'unconfined' is forbidden (unconfined)" in denial_text(policy.review(run_ctx("s"), []))
    assert "'unconfined' is not allowed; allowed: runtime/default" in denial_text(
        policy.review(create_ctx("d"), []))


def test_without_effective_only_annotations_are_checked() -> None:
    policy = make_policy(EFFECTIVE)
    assert policy.review(run_ctx("n", handler="runc", seccomp=UNCONFINED), []).denial is None
    assert "'unconfined' is forbidden" in denial_text(
        policy.review(run_ctx("n", {key("seccomp-profile"): "unconfined"}), []))


def test_a_seccomp_change_wins_over_the_request() -> None:
    policy = make_policy(EFFECTIVE)
    confine = Change(SECCOMP_FIELD, {"profile_type": "RuntimeDefault"}, "seccomp-profile", key("seccomp-profile"),
                     "runtime/default")
    assert policy.review(create_ctx("s", {key("seccomp-profile"): "runtime/default"}, seccomp=UNCONFINED),
                         [confine]).denial is None
    unconfine = Change(SECCOMP_FIELD, {"profile_type": "Unconfined"}, "seccomp-profile", by="seccomp")  # no key
    review = policy.review(run_ctx("d", seccomp=RUNTIME_DEFAULT), [unconfine])
    assert "the seccomp-profile the runtime would get is not allowed: 'unconfined' is not allowed" in \
        denial_text(review)


@pytest.mark.parametrize(
    ("profile", "value"),
    [
        (None, "unconfined"),
        (api_pb2.SecurityProfile(), "runtime/default"),
        (RUNTIME_DEFAULT, "runtime/default"),
        (UNCONFINED, "unconfined"),
        (api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.Localhost,
                                 localhost_ref=f"{PROFILE_ROOT}/audit.json"), f"localhost/{PROFILE_ROOT}/audit.json"),
        (api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.Localhost), "localhost/"),
    ],
    ids=["unset", "empty-message", "runtime-default", "unconfined", "localhost", "localhost-no-ref"],
)
def test_effective_seccomp_value_forms(profile: api_pb2.SecurityProfile | None, value: str) -> None:
    assert effective_value(run_ctx("s", seccomp=profile), "seccomp-profile", {}) == value
    assert effective_value(create_ctx("s", seccomp=profile), "seccomp-profile", {}) == value


@pytest.mark.parametrize(
    ("changed", "value"),
    [
        ({"profile_type": "Unconfined"}, "unconfined"),
        ({"profile_type": "RuntimeDefault"}, "runtime/default"),
        ({"profile_type": "Localhost", "localhost_ref": f"{PROFILE_ROOT}/a.json"}, f"localhost/{PROFILE_ROOT}/a.json"),
    ],
)
def test_effective_seccomp_value_of_a_change(changed: dict[str, str], value: str) -> None:
    ctx = run_ctx("s", seccomp=RUNTIME_DEFAULT if changed["profile_type"] != "RuntimeDefault" else UNCONFINED)
    assert effective_value(ctx, "seccomp-profile", {SECCOMP_FIELD: changed}) == value


def test_effective_runtime_handler_values() -> None:
    assert effective_value(run_ctx("h"), "runtime-handler", {}) == ""
    assert effective_value(run_ctx("h", handler="runc"), "runtime-handler", {}) == "runc"
    assert effective_value(run_ctx("h", handler="runc"), "runtime-handler", {"runtime_handler": "kata"}) == "kata"
    assert effective_value(create_ctx("h"), "runtime-handler", {}) is None


def test_effective_value_reads_the_request_without_changing_it() -> None:
    ctx = run_ctx("s")
    before = ctx.request.SerializeToString()
    effective_value(ctx, "seccomp-profile", {})
    assert ctx.request.SerializeToString() == before
    assert not ctx.request.config.HasField("linux")


def test_an_allowed_localhost_annotation_passes_its_own_effective_check() -> None:
    policy = make_policy("rules:\n  - name: batch\n    namespaces: [b]\n    settings:\n"
                         "      seccomp-profile: {values: [runtime/default, 'localhost/batch/*'], effective: true}\n")
    annotations = {key("seccomp-profile"): "localhost/batch/a.json"}
    change = Change(SECCOMP_FIELD, {"profile_type": "Localhost", "localhost_ref": f"{PROFILE_ROOT}/batch/a.json"},
                    "seccomp-profile", key("seccomp-profile"), "localhost/batch/a.json", by="seccomp")
    review = policy.review(run_ctx("b", annotations), [change])
    assert review.denial is None, review.denial


# ------------------------------------------------------------------------------------------ modes


def test_audit_mode_keeps_the_changes_and_records_the_violations() -> None:
    policy = make_policy(mode="audit")
    change = memory_change("2Gi")
    review = policy.review(run_ctx("a", {key("memory-limit"): "2Gi"}), [change])
    assert review == Review(changes=(change,), denial=None, modify=True, decisions=(
        Decision(AUDITED, "plain", "audit", "memory-limit", key("memory-limit"), "2Gi",
                 "'2Gi' is not allowed; allowed: at most 1Gi", interceptor="resources"),
        Decision(APPLIED, "plain", "audit", "memory-limit", key("memory-limit"), "2Gi", "from the pod's annotation",
                 change, "resources")))


def test_dry_run_changes_nothing_and_records_what_would_have_been_done() -> None:
    policy = make_policy(mode="dry-run")
    memory = memory_change("2Gi")
    configured = Change("runtime_handler", "kata", "runtime-handler", by="runtime-handler")
    review = policy.review(run_ctx("a", {key("memory-limit"): "2Gi"}), [memory, configured])
    assert review == Review(changes=(), denial=None, modify=False, decisions=(
        Decision(DRY_RUN, "plain", "dry-run", "memory-limit", key("memory-limit"), "2Gi",
                 "'2Gi' is not allowed; allowed: at most 1Gi", interceptor="resources"),
        Decision(DRY_RUN, "plain", "dry-run", "memory-limit", key("memory-limit"), "2Gi", "from the pod's annotation",
                 memory, "resources"),
        Decision(DRY_RUN, "plain", "dry-run", "runtime-handler", "", "", "from criproxy's configuration",
                 configured, "runtime-handler")))


def test_dry_run_without_violations_still_changes_nothing() -> None:
    policy = make_policy(mode="dry-run")
    review = policy.review(run_ctx("a", {key("memory-limit"): "512Mi"}), [memory_change()])
    assert (review.changes, review.denial, review.modify, actions(review)) == ((), None, False, [DRY_RUN])


def test_a_rule_mode_overrides_the_file_mode() -> None:
    rules = ("rules:\n  - name: audited\n    namespaces: [x]\n    mode: audit\n    settings: {memory-limit: {max: 1}}\n"
             "  - name: enforced\n    namespaces: [y]\n    mode: enforce\n    settings: {memory-limit: {max: 1}}\n"
             "  - name: dry\n    namespaces: [z]\n    mode: dry-run\n    settings: {memory-limit: {max: 1}}\n"
             "  - name: inherits\n    namespaces: [w]\n    settings: {memory-limit: {max: 1}}\n")
    annotations = {key("memory-limit"): "2Gi"}
    for mode in ("enforce", "audit", "dry-run"):
        policy = make_policy(rules, mode=mode)
        audited = policy.review(run_ctx("x", annotations), [memory_change()])
        assert (audited.denial, actions(audited)) == (None, [AUDITED, APPLIED])
        enforced = policy.review(run_ctx("y", annotations), [memory_change()])
        assert "denied by policy rule 'enforced'" in denial_text(enforced)
        dry = policy.review(run_ctx("z", annotations), [memory_change()])
        assert (dry.denial, dry.modify, actions(dry)) == (None, False, [DRY_RUN, DRY_RUN])
        inherited = policy.review(run_ctx("w", annotations), [memory_change()])
        assert {d.mode for d in inherited.decisions} == {mode}


# ------------------------------------------------------------------------------------------ scopes


def test_container_scope_keys_of_other_containers_are_ignored_on_create_container() -> None:
    policy = make_policy()
    annotations = {key("memory-limit", "container.sidecar"): "100Gi", key("runtime-handler", "container.sidecar"): "x"}
    assert policy.review(create_ctx("a", annotations, container="app"), []).denial is None
    assert "memory-limit.criproxy.io/container.sidecar='100Gi'" in denial_text(
        policy.review(create_ctx("a", annotations, container="sidecar"), []))


def test_every_container_scope_key_is_checked_on_run_pod_sandbox() -> None:
    policy = make_policy()
    annotations = {key("memory-limit", "container.sidecar"): "100Gi", key("memory-limit", "container.app"): "1Gi"}
    assert denial_text(policy.review(run_ctx("a", annotations), [])) == (
        f"criproxy: pod a/web denied by policy rule 'plain' ({policy.identity}): "
        "memory-limit.criproxy.io/container.sidecar='100Gi': '100Gi' is not allowed; allowed: at most 1Gi")


def test_a_key_of_the_domain_with_an_unknown_scope() -> None:
    policy = make_policy()
    annotations = {"memory-limit.criproxy.io/nonsense": "100Gi"}
    assert "memory-limit.criproxy.io/nonsense='100Gi'" in denial_text(policy.review(run_ctx("a", annotations), []))
    assert policy.review(create_ctx("a", annotations), []).denial is None


# ------------------------------------------------------------------------------------------ drift


DRIFT_RULES = "rules:\n  - name: r\n    namespaces: [a]\n    settings:\n      memory-limit: {max: 4Gi}\n" \
              "      cpu-quota: {}\n"


def drift_reason(detail: str) -> str:
    return (f"criproxy annotations changed since the pod's sandbox was created ({detail}); recreate the pod for them "
            "to apply")


def test_pinned_equal_to_current_is_no_drift() -> None:
    policy = make_policy(DRIFT_RULES)
    annotations = {key("memory-limit"): "1Gi", "other/key": "changed freely"}
    review = policy.review(create_ctx("a", annotations, pinned={key("memory-limit"): "1Gi"}), [memory_change()])
    assert (review.denial, actions(review)) == (None, [APPLIED])


def test_no_pinned_annotations_means_no_drift_check() -> None:
    policy = make_policy(DRIFT_RULES)
    assert policy.review(create_ctx("a", {key("memory-limit"): "1Gi"}, pinned=None), []).denial is None


@pytest.mark.parametrize(
    ("pinned", "now", "detail"),
    [
        ({key("memory-limit"): "1Gi"}, {key("memory-limit"): "2Gi"}, "memory-limit.criproxy.io/pod: '1Gi' -> '2Gi'"),
        ({key("memory-limit"): "1Gi"}, {key("memory-limit"): "1Gi", key("cpu-quota"): "1"},
         "cpu-quota.criproxy.io/pod: (absent) -> '1'"),
        ({key("memory-limit"): "1Gi", key("cpu-quota"): "1"}, {key("memory-limit"): "1Gi"},
         "cpu-quota.criproxy.io/pod: '1' -> (absent)"),
        ({}, {key("cpu-quota", "container.app"): "1"}, "cpu-quota.criproxy.io/container.app: (absent) -> '1'"),
        ({key("memory-limit"): "1Gi", key("cpu-quota"): "1"}, {key("memory-limit"): "2Gi", key("cpu-quota", ""): "1"},
         "cpu-quota.criproxy.io: (absent) -> '1', cpu-quota.criproxy.io/pod: '1' -> (absent), "
         "memory-limit.criproxy.io/pod: '1Gi' -> '2Gi'"),
        ({key("memory-limit"): "None"}, {}, "memory-limit.criproxy.io/pod: 'None' -> (absent)"),
    ],
    ids=["changed", "added", "removed", "from-none", "several-sorted", "the-value-None-is-not-absent"],
)
def test_drift_is_denied_in_enforce_mode(pinned: dict[str, str], now: dict[str, str], detail: str) -> None:
    policy = make_policy(DRIFT_RULES)
    review = policy.review(create_ctx("a", now, pinned=pinned), [memory_change()])
    assert denial_text(review) == (
        f"criproxy: container 'app' of pod a/web denied by policy rule 'r' ({policy.identity}): {drift_reason(detail)}")
    # One decision per changed annotation, each naming it (its value now; '' when removed) and the whole drift.
    changed = sorted(set(now) ^ set(pinned) | {k for k in now if k in pinned and now[k] != pinned[k]})
    assert review.decisions == tuple(
        Decision(DENIED, "r", "enforce", k.partition(".")[0], k, now.get(k, ""), drift_reason(detail),
                 interceptor="resources") for k in changed)


def test_keys_added_by_defaults_are_not_drift() -> None:
    policy = make_policy("rules:\n  - name: r\n    namespaces: [a]\n    settings:\n"
                         "      memory-limit: {max: 4Gi, default: 1Gi}\n")
    outcome = decide(policy, create_ctx("a", {}, pinned={}))
    assert outcome.ctx.pod.annotations == {key("memory-limit"): "1Gi"}
    assert outcome.ctx.injected == {key("memory-limit")}
    assert (outcome.denial, outcome.decisions) == (None, ())


def test_drift_audit_lets_the_call_pass_with_an_audited_decision() -> None:
    policy = make_policy(DRIFT_RULES, drift="audit")
    change = memory_change("2Gi")
    review = policy.review(create_ctx("a", {key("memory-limit"): "2Gi"}, pinned={key("memory-limit"): "1Gi"}),
                           [change])
    detail = drift_reason("memory-limit.criproxy.io/pod: '1Gi' -> '2Gi'")
    # The drift is audited; the call itself is judged in the rule's own mode (enforce), and passes.
    assert review == Review(changes=(change,), denial=None, decisions=(
        Decision(AUDITED, "r", "enforce", "memory-limit", key("memory-limit"), "2Gi", detail, interceptor="resources"),
        Decision(APPLIED, "r", "enforce", "memory-limit", key("memory-limit"), "2Gi", "from the pod's annotation",
                 change, "resources")))


def test_drift_deny_in_audit_mode_is_audited() -> None:
    policy = make_policy(DRIFT_RULES, mode="audit")
    review = policy.review(create_ctx("a", {key("memory-limit"): "2Gi"}, pinned={key("memory-limit"): "1Gi"}), [])
    assert (review.denial, actions(review)) == (None, [AUDITED])


def test_drift_deny_in_dry_run_mode_changes_nothing() -> None:
    policy = make_policy(DRIFT_RULES, mode="dry-run")
    review = policy.review(create_ctx("a", {key("memory-limit"): "2Gi"}, pinned={key("memory-limit"): "1Gi"}),
                           [memory_change("2Gi")])
    assert (review.denial, review.changes, review.modify, actions(review)) == (None, (), False, [DRY_RUN, DRY_RUN])


def test_drift_ignore() -> None:
    policy = make_policy(DRIFT_RULES, drift="ignore")
    review = policy.review(create_ctx("a", {key("memory-limit"): "2Gi"}, pinned={key("memory-limit"): "1Gi"}),
                           [memory_change("2Gi")])
    assert (review.denial, actions(review)) == (None, [APPLIED])


def test_drift_and_a_violation_are_both_in_the_denial() -> None:
    policy = make_policy(DRIFT_RULES)
    review = policy.review(create_ctx("a", {key("memory-limit"): "8Gi"}, pinned={key("memory-limit"): "1Gi"}), [])
    assert denial_text(review) == (
        f"criproxy: container 'app' of pod a/web denied by policy rule 'r' ({policy.identity}): "
        "memory-limit.criproxy.io/pod='8Gi': '8Gi' is not allowed; allowed: at most 4Gi; "
        + drift_reason("memory-limit.criproxy.io/pod: '1Gi' -> '8Gi'"))


def test_drift_audit_does_not_let_other_violations_pass() -> None:
    policy = make_policy(DRIFT_RULES, drift="audit")
    review = policy.review(create_ctx("a", {key("memory-limit"): "8Gi"}, pinned={key("memory-limit"): "1Gi"}),
                           [memory_change("8Gi")])
    assert review.denial is not None
    assert "'8Gi' is not allowed" in review.denial.reason


def test_pinned_annotations_keep_only_criproxy_keys() -> None:
    annotations = {key("memory-limit"): "1Gi", key("cpu-quota", "container.app"): "1", "other/key": "x",
                   "criproxy.io/applied": "[]", "criproxy.io/pinned": "{}"}
    assert pinned_annotations(annotations, "criproxy.io") == (
        '{"cpu-quota.criproxy.io/container.app":"1","memory-limit.criproxy.io/pod":"1Gi"}')
    assert pinned_annotations({"other/key": "x"}, "criproxy.io") == "{}"


def test_a_required_setting_set_per_container_lets_the_sandbox_start() -> None:
    policy = make_policy("rules:\n  - name: r\n    namespaces: [a]\n    settings:\n"
                         "      memory-limit: {required: true}\n")
    annotations = {key("memory-limit", "container.app"): "512Mi"}
    assert policy.review(create_ctx("a", annotations, container="app"), []).denial is None
    review = policy.review(run_ctx("a", annotations), [])
    assert review.denial is None, review.denial
