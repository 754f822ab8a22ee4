"""Properties of policy files and their evaluation, over generated documents and pods.

For any document written with the real schema (plausible values, junk strings and wrong types mixed in):
parse_policy returns a PolicySet or raises SourceError, nothing else. For any policy that parses, and any pod
(criproxy keys of every scope with plausible or junk values, unrelated keys, labels) on RunPodSandbox and
CreateContainer: AnnotationPolicy.defaults and .review never raise, and the whole Pipeline.decide with the
default interceptors raises nothing but CriProxyError (a bad annotation, a denial, a conflict).
"""

from __future__ import annotations

import asyncio
import fnmatch
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from criproxy.api.runtime.v1 import api_pb2
from criproxy.cri.adjust import Change
from criproxy.cri.annotations import EFFECTIVE_SETTINGS, SETTING_FAMILIES, SETTING_KINDS, Lookup, setting_kind
from criproxy.cri.context import CREATE_CONTAINER, RUN_POD_SANDBOX, CallContext, RuntimeFacts
from criproxy.cri.quantity import parse_quantity
from criproxy.errors import CriProxyError, Internal
from criproxy.interceptors import build_interceptors
from criproxy.pipeline import Pipeline
from criproxy.pipeline.index import pod_info
from criproxy.policies import Review
from criproxy.policies.engine import SECCOMP_FIELD, AnnotationPolicy
from criproxy.policies.model import API_VERSION, DRIFT, KIND, MODES, ON_ERROR, PolicySet, parse_policy
from criproxy.policies.source import SourceError

FILE = "generated.yaml"
LOOKUP = Lookup()
INTERCEPTORS = build_interceptors(None, {}, LOOKUP, "test")
PROFILE_ROOT = "/var/lib/kubelet/seccomp"
REPO_POLICIES = Path(__file__).resolve().parent.parent / "policies.yaml"

# ------------------------------------------------------------------------------------------ strategies: values

#: Plausible annotation values per setting, right and wrong ones (what pods and policies would write).
SETTING_VALUES: dict[str, list[str]] = {
    "runtime-handler": ["runc", "kata", "gvisor", "", "RUNC", "kata-1", "runc*", "-bad-"],
    "seccomp-profile": ["runtime/default", "unconfined", "docker/default", "localhost/a.json", "localhost/",
                        "localhost//etc/passwd", "localhost/../x.json", "localhost/*"],
    "cpu-quota": ["500m", "1", "2", "1.5", "64", "disable", "0", "-1", "10m", "1e3"],
    "cpu-period": ["1000", "100000", "1000000", "999", "1e3", "1M"],
    "cpu-shares": ["2", "1024", "262144", "1", "262145"],
    "cpuset-cpus": ["0", "0-3", "0-3,8", "3-1", "99999", "a"],
    "cpuset-mems": ["0", "0-1", "1,3"],
    "memory-limit": ["4Mi", "512Mi", "1Gi", "2Gi", "3Mi", "1G", "1.5Gi", "100m"],
    "memory-swap": ["512Mi", "1Gi", "2Gi", "0"],
    "oom-score-adj": ["-1000", "0", "500", "1000", "1001", "-1001"],
    "hugepages-2mi": ["2Mi", "64Mi", "3Mi", "1Gi"],
    "hugepages-1gi": ["1Gi", "2Gi", "1Mi"],
    "unified.memory.high": ["max", "500000000", "1"],
    "unified.pids.max": ["max", "100"],
}
QUANTITIES = ["0", "1", "2", "16", "64", "10m", "100m", "500m", "1.5", "4Mi", "64Mi", "512Mi", "1Gi", "2Gi", "64Gi",
              "1000", "1000000", "262144", "-1000", "1e3", "1k", "0.5"]
JUNK = ["", " ", "lots", "inf", "-", "*", "1GiB", "1e", "0x10", "ü", "a b", "[", "(", "2001-13-45", "null", "~",
        "yes", "1_000", "\t", "%", "*/*", "é" * 3]

short_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=10)
junk = st.one_of(st.sampled_from(JUNK), short_text)
any_scalar = st.one_of(
    st.sampled_from(QUANTITIES), st.sampled_from([v for vs in SETTING_VALUES.values() for v in vs]), junk,
    st.integers(-(10**6), 10**12), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none())
wrong_type = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), short_text,
                       st.lists(st.integers(0, 2), max_size=2),
                       st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 2), max_size=2))


def once_in(draw: st.DrawFn, n: int) -> bool:
    """True about once in `n` draws. Not on 0 or a bound: Hypothesis draws those far more often than their share."""
    return draw(st.integers(0, n - 1)) == 1


class Choices:
    """The draws of one generated document, clean (meant to parse: the properties must then hold for the policy)
    or junky (wrong types, junk strings and impossible values now and then, to exercise every SourceError).
    (Weights are drawn by hand: st.one_of(*[good] * n, bad) drops the repeated branches.)"""

    def __init__(self, draw: st.DrawFn, junky: bool) -> None:
        self.draw, self.junky = draw, junky

    def pick(self, good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any], odds: int = 8) -> Any:
        return self.draw(bad) if self.rarely(odds) else self.draw(good)

    def rarely(self, odds: int) -> bool:
        return self.junky and once_in(self.draw, odds)


#: Names a rule's settings may have: every setting, both families, family members; and a few unknown names.
SETTING_NAMES = [*SETTING_KINDS, *(f"{family}*" for family in SETTING_FAMILIES), "hugepages-2mi", "unified.memory.high"]
UNKNOWN_SETTINGS = ["cpu", "hugepages-", "cpu-*", "Memory-Limit"]
GOOD_PATTERNS = ["localhost/team-[a-z]+/.*", "runtime/.*", "[0-9]+m?", ".*", "kata|runc", "(a|b)+", "x{2,3}",
                 "(?P<n>a)", "\\d+"]
bad_patterns = st.one_of(st.sampled_from(["[", "*x", "(?P<", "a{2,1}"]), st.text(alphabet="ab.*+?()[]{}|^$\\0-9",
                                                                               max_size=8))
NAMESPACE_GLOBS = ["a", "*", "*", "team-*", "team-?", "[ab]", "kube-system", "batch-*", "x*y", "[!a]*", "b", "a[", "?"]
namespace_globs = st.one_of(st.sampled_from(NAMESPACE_GLOBS), st.text(alphabet="abxyz-0*?[]!.", min_size=1, max_size=6))
NUMERIC = ("cpus", "bytes", "integer")


def plausible_values(name: str) -> list[str]:
    member = {"hugepages-*": "hugepages-2mi", "unified.*": "unified.memory.high"}.get(name, name)
    return [v for v in SETTING_VALUES.get(member, QUANTITIES) if v]


def draw_bounds(c: Choices, spec: dict[str, Any]) -> None:
    """min and/or max, in order when clean (swapped now and then when junky)."""
    low, high = sorted(c.draw(st.lists(st.sampled_from(QUANTITIES), min_size=2, max_size=2)), key=parse_quantity)
    if c.rarely(5):
        low, high = high, low
    for bound, value in (("min", low), ("max", high)):
        if c.draw(st.booleans()):
            spec[bound] = c.pick(st.just(value), any_scalar)


def draw_default(c: Choices, name: str, spec: dict[str, Any]) -> None:
    """A clean default is one of the listed values, and not forbidden: the rule allows it (a family has none)."""
    listed = spec.get("values") if isinstance(spec.get("values"), list) else []
    if not c.draw(st.booleans()) or not (c.junky or (listed and not name.endswith("*"))):
        return
    spec["default"] = c.pick(st.sampled_from(listed or plausible_values(name)), any_scalar, odds=3)
    if not c.junky:
        spec["forbid"] = [f for f in spec.get("forbid", []) if not fnmatch.fnmatchcase(spec["default"], f)]


@st.composite
def setting_specs(draw: st.DrawFn, name: str, junky: bool) -> Any:
    c = Choices(draw, junky)
    if c.rarely(16):
        return draw(wrong_type)
    values = st.sampled_from(plausible_values(name))
    wrong_list = st.one_of(wrong_type, st.lists(any_scalar, max_size=2))
    spec: dict[str, Any] = {}
    if draw(st.booleans()):
        spec["values"] = c.pick(st.lists(values, max_size=3), wrong_list)
    if once_in(draw, 4):
        spec["patterns"] = c.pick(st.lists(st.sampled_from(GOOD_PATTERNS), max_size=2),
                                  st.one_of(wrong_type, st.lists(bad_patterns, min_size=1, max_size=2)))
    if once_in(draw, 3):
        spec["forbid"] = c.pick(st.lists(values, max_size=2), wrong_list)
    if (setting_kind(name.rstrip("*")) or "string") in NUMERIC or c.rarely(10):
        draw_bounds(c, spec)
    draw_default(c, name, spec)
    if once_in(draw, 4):
        spec["required"] = c.pick(st.booleans(), wrong_type)
    if name in EFFECTIVE_SETTINGS or c.rarely(8):
        spec["effective"] = c.pick(st.booleans(), wrong_type)
    if c.rarely(21):
        spec["unknown"] = 1
    return spec


def draw_selector(c: Choices) -> Any:
    labels = st.dictionaries(st.sampled_from(["tier", "app", "v"]), st.sampled_from(["batch", "web", "1"]), max_size=2)
    bad_labels = st.one_of(wrong_type, st.dictionaries(st.just("tier"), any_scalar, min_size=1))
    return c.pick(st.fixed_dictionaries({}, optional={"matchLabels": labels}),
                  st.one_of(wrong_type, st.fixed_dictionaries({"matchLabels": bad_labels})))


def draw_settings(c: Choices) -> Any:
    names = c.draw(st.lists(st.sampled_from(SETTING_NAMES), max_size=4, unique=True))
    if c.rarely(10):
        names.append(c.draw(st.sampled_from(UNKNOWN_SETTINGS)))
    return c.pick(st.just({name: c.draw(setting_specs(name, c.junky)) for name in names}), wrong_type, odds=20)


@st.composite
def rules(draw: st.DrawFn, index: int, junky: bool) -> Any:
    c = Choices(draw, junky)
    if c.rarely(26):
        return draw(wrong_type)
    rule: dict[str, Any] = {}
    if not c.rarely(26):
        rule["name"] = c.pick(st.just(f"r{index}"), st.one_of(st.sampled_from(["r0", "r1", "r2"]), any_scalar))
    if not c.rarely(26):
        rule["namespaces"] = c.pick(st.lists(namespace_globs, min_size=1, max_size=3),
                                    st.one_of(st.just([]), wrong_type, st.lists(any_scalar, min_size=1, max_size=2)))
    if draw(st.booleans()):
        rule["excludeNamespaces"] = c.pick(st.lists(namespace_globs, max_size=2), wrong_type)
    if once_in(draw, 4):
        rule["podSelector"] = draw_selector(c)
    if once_in(draw, 4):
        rule["mode"] = c.pick(st.sampled_from(MODES), any_scalar)
    if not once_in(draw, 7):
        rule["settings"] = draw_settings(c)
    if c.rarely(31):
        rule["selector"] = {}
    return rule


@st.composite
def failure_specs(draw: st.DrawFn, junky: bool) -> Any:
    c = Choices(draw, junky)
    spec: dict[str, Any] = {}
    if draw(st.booleans()):
        spec["onError"] = c.pick(st.sampled_from(ON_ERROR), any_scalar)
    if draw(st.booleans()):
        spec["timeoutSeconds"] = c.pick(st.sampled_from([0.001, 0.5, 1, 60]), any_scalar)
    return c.pick(st.just(spec), wrong_type)


@st.composite
def documents(draw: st.DrawFn, junky: bool | None = None) -> dict[str, Any]:
    junky = draw(st.booleans()) if junky is None else junky
    c = Choices(draw, junky)
    doc: dict[str, Any] = {"apiVersion": c.pick(st.just(API_VERSION), any_scalar, odds=30),
                           "kind": c.pick(st.just(KIND), any_scalar, odds=30)}
    if draw(st.booleans()):
        doc["mode"] = c.pick(st.sampled_from(MODES), any_scalar)
    if draw(st.booleans()):
        doc["drift"] = c.pick(st.sampled_from(DRIFT), any_scalar)
    if once_in(draw, 4):
        names = draw(st.lists(st.sampled_from(["resources", "seccomp", "runtime-handler", "other"]), max_size=3,
                              unique=True))
        doc["interceptors"] = {name: draw(failure_specs(junky)) for name in names}
        if c.rarely(10):
            doc["interceptors"] = draw(wrong_type)
    doc["rules"] = [draw(rules(i, junky)) for i in range(draw(st.integers(0, 4)))]
    if c.rarely(20):
        doc["rules"] = draw(wrong_type)
    if c.rarely(41):
        doc["extra"] = 1
    return doc


# ------------------------------------------------------------------------------------------ strategies: pods and calls

ANNOTATED_SETTINGS = [*SETTING_VALUES, "no-such-setting"]
SCOPES = ["/pod", "", "/container.app", "/container.other", "/odd"]


@st.composite
def annotations(draw: st.DrawFn) -> dict[str, str]:
    out: dict[str, str] = {}
    for _ in range(draw(st.integers(0, 4))):
        setting = draw(st.sampled_from(ANNOTATED_SETTINGS))
        key = f"{setting}.criproxy.io{draw(st.sampled_from(SCOPES))}"
        plausible = st.sampled_from(SETTING_VALUES.get(setting, ["1"]))
        out[key] = draw(junk) if once_in(draw, 5) else draw(plausible)
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(["app.kubernetes.io/name", "criproxy.io/applied", "criproxy.io/pinned",
                                    "seccomp.security.alpha.kubernetes.io/pod", "example.com/x"]))
        out[key] = draw(junk)
    return out


namespaces = st.one_of(st.sampled_from(["a", "b", "team-a", "team-", "kube-system", "batch-x", "x", "xay", ""]),
                       st.text(alphabet="abcxyz-", max_size=8))
pod_labels = st.dictionaries(st.sampled_from(["tier", "app", "v"]), st.sampled_from(["batch", "web", "1", ""]),
                             max_size=3)
PROFILES: list[api_pb2.SecurityProfile | None] = [
    None,
    api_pb2.SecurityProfile(),
    api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.Unconfined),
    api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.Localhost, localhost_ref=f"{PROFILE_ROOT}/a.json"),
]
facts = st.sampled_from([RuntimeFacts(), RuntimeFacts(frozenset({"runc", "kata"}), "test")])


def sandbox_config(namespace: str, labels: Mapping[str, str], annotations: Mapping[str, str],
                   profile: api_pb2.SecurityProfile | None) -> api_pb2.PodSandboxConfig:
    config = api_pb2.PodSandboxConfig(metadata=api_pb2.PodSandboxMetadata(name="web", uid="uid-1",
                                                                          namespace=namespace),
                                      labels=dict(labels), annotations=dict(annotations))
    if profile is not None:
        config.linux.security_context.seccomp.CopyFrom(profile)
    return config


def pod_calls(namespace: str, labels: Mapping[str, str], notes: Mapping[str, str], *, runtime: RuntimeFacts,
              handler: str = "", sandbox_profile: api_pb2.SecurityProfile | None = None, container: str = "app",
              memory: int = 1 << 30, quota: int = 200_000, profile: api_pb2.SecurityProfile | None = None,
              pinned: Mapping[str, str] | None = None) -> list[CallContext]:
    """One pod, as its RunPodSandbox and as a CreateContainer of `container`, the contexts built as the pipeline
    builds them from the real requests."""
    run = api_pb2.RunPodSandboxRequest(config=sandbox_config(namespace, labels, notes, sandbox_profile),
                                       runtime_handler=handler)
    create = api_pb2.CreateContainerRequest(
        pod_sandbox_id="sandbox-1",
        config=api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name=container),
            linux=api_pb2.LinuxContainerConfig(resources=api_pb2.LinuxContainerResources(
                cpu_period=100_000, cpu_quota=quota, cpu_shares=1024, memory_limit_in_bytes=memory,
                memory_swap_limit_in_bytes=memory, oom_score_adj=-997))),
        sandbox_config=sandbox_config(namespace, labels, notes, None))
    if profile is not None:
        create.config.linux.security_context.seccomp.CopyFrom(profile)
    c, s = run.config, create.sandbox_config
    return [
        CallContext(RUN_POD_SANDBOX, pod_info(c.metadata, c.labels, c.annotations), None, run, runtime),
        CallContext(CREATE_CONTAINER, pod_info(s.metadata, s.labels, s.annotations), container, create, runtime,
                    pinned=pinned),
    ]


@st.composite
def calls(draw: st.DrawFn) -> list[CallContext]:
    notes = draw(annotations())
    criproxy_keys = {k: v for k, v in notes.items() if ".criproxy.io" in k}
    pinned = draw(st.one_of(st.none(), st.just(criproxy_keys), st.dictionaries(
        st.sampled_from([*criproxy_keys, "memory-limit.criproxy.io/pod"]), st.sampled_from(["1Gi", "x"]),
        max_size=2)))
    return pod_calls(
        draw(namespaces), draw(pod_labels), notes, runtime=draw(facts),
        handler=draw(st.sampled_from(["", "runc", "kata", "gvisor"])), sandbox_profile=draw(st.sampled_from(PROFILES)),
        container=draw(st.sampled_from(["app", "other", "app2"])),
        memory=draw(st.sampled_from([0, 1 << 30, 256 << 20])), quota=draw(st.sampled_from([0, 200_000])),
        profile=draw(st.sampled_from(PROFILES)), pinned=pinned)


changes = st.lists(st.one_of(
    st.builds(lambda v: Change("runtime_handler", v, "runtime-handler", by="runtime-handler"),
              st.sampled_from(["", "runc", "kata"])),
    st.builds(lambda p: Change(SECCOMP_FIELD, p, "seccomp-profile", "seccomp-profile.criproxy.io/pod", "x",
                               by="seccomp"),
              st.sampled_from([{"profile_type": "RuntimeDefault"}, {"profile_type": "Unconfined"},
                               {"profile_type": "Localhost", "localhost_ref": f"{PROFILE_ROOT}/a.json"}])),
    st.builds(lambda raw: Change("config.linux.resources.memory_limit_in_bytes", 1 << 29, "memory-limit",
                                 "memory-limit.criproxy.io/pod", raw, by="resources"), junk)), max_size=3)


# ------------------------------------------------------------------------------------------ the properties


def parse(doc: Any) -> PolicySet | None:
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    try:
        return parse_policy(text, FILE)
    except SourceError:
        return None


def with_defaults(ctx: CallContext, defaults: Mapping[str, str]) -> CallContext:
    added = {k: v for k, v in defaults.items() if k not in ctx.pod.annotations}
    return replace(ctx, pod=replace(ctx.pod, annotations={**ctx.pod.annotations, **added}), injected=frozenset(added))


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    running = asyncio.new_event_loop()
    yield running
    running.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                  HealthCheck.function_scoped_fixture])
@given(doc=documents(), pods=st.lists(calls(), min_size=1, max_size=2), proposed=changes)
@example(doc=yaml.safe_load(REPO_POLICIES.read_text()), proposed=[], pods=[
    pod_calls("criproxy-demo", {}, {"memory-limit.criproxy.io/pod": "512Mi", "cpu-quota.criproxy.io/container.app":
                                    "500m", "runtime-handler.criproxy.io": "kata"},
              runtime=RuntimeFacts(frozenset({"runc", "kata"}), "test"), pinned={}),
    pod_calls("batch-jobs", {}, {"seccomp-profile.criproxy.io/pod": "unconfined", "oom-score-adj.criproxy.io": "-5"},
              runtime=RuntimeFacts())])
def test_generated_policies_and_pods(loop: asyncio.AbstractEventLoop, doc: Any, pods: list[list[CallContext]],
                                     proposed: list[Change]) -> None:
    policies = parse(doc)  # SourceError is the only failure allowed (anything else propagates and fails)
    if policies is None:
        return
    policy = AnnotationPolicy(policies, LOOKUP)
    pipeline = Pipeline(INTERCEPTORS, lookup=LOOKUP, policy=policy, on_decisions=lambda ctx, decisions: None)
    for ctx in (c for pair in pods for c in pair):
        defaults = policy.defaults(ctx)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in defaults.items())
        for reviewed in (ctx, with_defaults(ctx, defaults)):
            review = policy.review(reviewed, proposed)
            assert isinstance(review, Review)
            assert review.denial is None or review.changes == ()
            assert review.modify or review.changes == ()
        try:
            outcome = loop.run_until_complete(pipeline.decide(ctx))
        except CriProxyError as err:
            assert not isinstance(err, Internal), f"an interceptor crashed: {err}"
            continue
        assert outcome.denial is None or outcome.changes == ()


@settings(max_examples=100, deadline=None)
@given(doc=documents(junky=False))
def test_clean_generated_policies_always_parse(doc: dict[str, Any]) -> None:
    """Every document drawn without junk is valid (so the property above runs on real policies, not only on
    SourceErrors), and it reads back as written."""
    policies = parse(doc)
    assert policies is not None, yaml.safe_dump(doc, sort_keys=False)
    assert [r.name for r in policies.rules] == [r["name"] for r in doc["rules"]]
    assert policies.mode == doc.get("mode", "enforce")
    for rule, written in zip(policies.rules, doc["rules"], strict=True):
        assert list(rule.settings) == list(written.get("settings", {}))
        assert rule.namespaces == tuple(written["namespaces"])


@settings(max_examples=50, deadline=None, database=None, report_multiple_bugs=False)
@given(text=st.sampled_from([
    "max: " + "9" * 5000, "values: [2001-13-45]", "default: !!int x", "values: [!!bool maybe]",
    "default: !!timestamp never", "patterns: ['a{4294967296}']", "patterns: ['" + "(" * 1200 + ")" * 1200 + "']"]))
@example(text="values: [2001-02-30]")
def test_hostile_setting_values_are_source_errors(text: str) -> None:
    document = ("apiVersion: criproxy.io/v1alpha1\nkind: AnnotationPolicy\nrules:\n  - name: r\n    namespaces: [a]\n"
                f"    settings:\n      memory-limit: {{{text}}}\n")
    try:
        parse_policy(document, FILE)
    except SourceError:
        pass
    except RecursionError as err:
        raise RecursionError(str(err)) from None  # a short traceback: pytest takes seconds to render the deep one
