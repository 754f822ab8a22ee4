"""The policy file's model: every validation of parse_policy/check_policy (exact `file:line: key.path: why`),
what a SettingRule allows, which Rule matches a pod, and the PolicySet's digest."""

from __future__ import annotations

import hashlib
from fractions import Fraction
from pathlib import Path

import pytest

from criproxy.cri.context import PodInfo
from criproxy.policies.model import (
    DEFAULT_TIMEOUT_S,
    FailurePolicy,
    PolicySet,
    Rule,
    SettingRule,
    check_policy,
    parse_policy,
)
from criproxy.policies.source import SourceError

FILE = "p.yaml"
REPO_POLICIES = Path(__file__).resolve().parent.parent / "policies.yaml"
HEADER = "apiVersion: criproxy.io/v1alpha1\nkind: AnnotationPolicy\n"
#: A rule whose settings start on line 7.
ONE_RULE = HEADER + "rules:\n  - name: r\n    namespaces: [a]\n    settings:\n"
KNOWN_SETTINGS = ("runtime-handler, seccomp-profile, cpu-quota, cpu-period, cpu-shares, cpuset-cpus, cpuset-mems, "
                  "memory-limit, memory-swap, oom-score-adj, hugepages-*, unified.*")
RULE_KEYS = "name, namespaces, excludeNamespaces, podSelector, mode, settings"
SETTING_KEYS = "values, patterns, forbid, min, max, default, required, effective"


def error_of(text: str) -> str:
    with pytest.raises(SourceError) as info:
        parse_policy(text, FILE)
    return str(info.value)


def with_setting(line: str) -> str:
    return ONE_RULE + f"      {line}\n"


def setting(name: str, spec: str) -> SettingRule:
    policies = parse_policy(with_setting(f"{name}: {spec}"), FILE)
    return policies.rules[0].settings[name]


def pod(namespace: str = "a", labels: dict[str, str] | None = None) -> PodInfo:
    return PodInfo(namespace, "web", "uid-1", labels or {}, {})


# ------------------------------------------------------------------------------------------ the file's header


def test_the_smallest_policy_and_its_defaults() -> None:
    policies = parse_policy(HEADER, FILE)
    assert (policies.file, policies.mode, policies.drift, policies.rules, dict(policies.failure)) == (
        FILE, "enforce", "deny", (), {})
    assert policies.failure_policy("seccomp") == FailurePolicy("closed", DEFAULT_TIMEOUT_S) == FailurePolicy()
    assert policies.rule_for(pod()) is None
    assert policies.mode_of(None) == "enforce"


def test_header_values_are_read() -> None:
    policies = parse_policy(HEADER + "mode: dry-run\ndrift: ignore\ninterceptors:\n"
                            "  resources: {onError: open, timeoutSeconds: 0.5}\n  seccomp: {}\n"
                            "  runtime-handler: {timeoutSeconds: 60}\n", FILE)
    assert (policies.mode, policies.drift) == ("dry-run", "ignore")
    assert policies.failure_policy("resources") == FailurePolicy("open", 0.5)
    assert policies.failure_policy("seccomp") == FailurePolicy("closed", 1.0)
    assert policies.failure_policy("runtime-handler") == FailurePolicy("closed", 60.0)
    assert isinstance(policies.failure_policy("runtime-handler").timeout_seconds, float)
    assert policies.failure_policy("not-configured") == FailurePolicy()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("apiVersion: v1\nkind: AnnotationPolicy\n", "p.yaml:1: apiVersion: expected criproxy.io/v1alpha1, got 'v1'"),
        ("kind: AnnotationPolicy\n", "p.yaml:1: apiVersion: expected criproxy.io/v1alpha1, got None"),
        ("apiVersion: criproxy.io/v1alpha1\nkind: Pod\n", "p.yaml:2: kind: expected AnnotationPolicy, got 'Pod'"),
        ("apiVersion: criproxy.io/v1alpha1\n", "p.yaml:1: kind: expected AnnotationPolicy, got None"),
        (HEADER + "mode: strict\n", "p.yaml:3: mode: expected one of enforce, audit, dry-run, got 'strict'"),
        (HEADER + "mode: Enforce\n", "p.yaml:3: mode: expected one of enforce, audit, dry-run, got 'Enforce'"),
        (HEADER + "drift: 1\n", "p.yaml:3: drift: expected one of deny, audit, ignore, got 1"),
        (HEADER + "drift: null\n", "p.yaml:3: drift: expected one of deny, audit, ignore, got None"),
        (HEADER + "extra: 1\n",
         "p.yaml:3: extra: unknown key; known keys here: apiVersion, kind, mode, drift, interceptors, rules"),
        ("- a\n", "p.yaml:1: expected a mapping, got a list"),
        ("just text\n", "p.yaml:1: expected a mapping, got a string"),
        ("42\n", "p.yaml:1: expected a mapping, got int"),
    ],
    ids=["apiVersion", "apiVersion-missing", "kind", "kind-missing", "mode", "mode-case", "drift", "drift-null",
         "unknown-top-key", "top-list", "top-string", "top-int"],
)
def test_header_errors(text: str, message: str) -> None:
    assert error_of(text) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("interceptors: [a]\n", "p.yaml:3: interceptors: expected a mapping of interceptor names, got a list"),
        ("interceptors: 3\n", "p.yaml:3: interceptors: expected a mapping of interceptor names, got int"),
        ("interceptors:\n  seccomp: {onError: maybe}\n",
         "p.yaml:4: interceptors.seccomp.onError: expected one of closed, open, got 'maybe'"),
        ("interceptors:\n  seccomp: {timeoutSeconds: 0}\n",
         "p.yaml:4: interceptors.seccomp.timeoutSeconds: expected seconds, more than 0 and at most 60, got 0"),
        ("interceptors:\n  seccomp: {timeoutSeconds: -1}\n",
         "p.yaml:4: interceptors.seccomp.timeoutSeconds: expected seconds, more than 0 and at most 60, got -1"),
        ("interceptors:\n  seccomp: {timeoutSeconds: 60.001}\n",
         "p.yaml:4: interceptors.seccomp.timeoutSeconds: expected seconds, more than 0 and at most 60, got 60.001"),
        ("interceptors:\n  seccomp: {timeoutSeconds: 61}\n",
         "p.yaml:4: interceptors.seccomp.timeoutSeconds: expected seconds, more than 0 and at most 60, got 61"),
        ("interceptors:\n  seccomp: {timeoutSeconds: '1'}\n",
         "p.yaml:4: interceptors.seccomp.timeoutSeconds: expected seconds, more than 0 and at most 60, got '1'"),
        ("interceptors:\n  seccomp: {timeoutSeconds: true}\n",
         "p.yaml:4: interceptors.seccomp.timeoutSeconds: expected seconds, more than 0 and at most 60, got True"),
        ("interceptors:\n  seccomp: {timeoutSeconds: .nan}\n",
         "p.yaml:4: interceptors.seccomp.timeoutSeconds: expected seconds, more than 0 and at most 60, got nan"),
        ("interceptors:\n  seccomp: {timeoutSeconds: .inf}\n",
         "p.yaml:4: interceptors.seccomp.timeoutSeconds: expected seconds, more than 0 and at most 60, got inf"),
        ("interceptors:\n  seccomp: {retries: 3}\n",
         "p.yaml:4: interceptors.seccomp.retries: unknown key; known keys here: onError, timeoutSeconds"),
        ("interceptors:\n  seccomp: closed\n", "p.yaml:4: interceptors.seccomp: expected a mapping, got a string"),
    ],
    ids=["list", "int", "onError", "timeout-0", "timeout-negative", "timeout-over-60", "timeout-61",
         "timeout-string", "timeout-bool", "timeout-nan", "timeout-inf", "unknown-key", "not-a-mapping"],
)
def test_interceptor_errors(text: str, message: str) -> None:
    assert error_of(HEADER + text) == message


@pytest.mark.parametrize("timeout", ["0.001", "1", "60", "60.0"])
def test_timeout_bounds_that_are_allowed(timeout: str) -> None:
    policies = parse_policy(HEADER + f"interceptors:\n  resources: {{timeoutSeconds: {timeout}}}\n", FILE)
    assert policies.failure_policy("resources").timeout_seconds == float(timeout)


# ------------------------------------------------------------------------------------------ rules


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rules: {a: 1}\n", "p.yaml:3: rules: expected a list of rules, got a mapping"),
        ("rules: x\n", "p.yaml:3: rules: expected a list of rules, got a string"),
        ("rules: [x]\n", "p.yaml:3: rules[0]: expected a mapping, got a string"),
        ("rules:\n  - namespaces: [a]\n", "p.yaml:4: rules[0].name: expected a non-empty string, got None"),
        ("rules:\n  - {name: '', namespaces: [a]}\n", "p.yaml:4: rules[0].name: expected a non-empty string, got ''"),
        ("rules:\n  - {name: 7, namespaces: [a]}\n", "p.yaml:4: rules[0].name: expected a non-empty string, got 7"),
        ("rules:\n  - name: r\n",
         "p.yaml:4: rules[0]: rule 'r' has no namespaces (use [\"*\"] for every namespace)"),
        ("rules:\n  - name: r\n    namespaces: []\n",
         "p.yaml:5: rules[0].namespaces: is empty: the rule would match no pod"),
        ("rules:\n  - name: r\n    namespaces: a\n", "p.yaml:5: rules[0].namespaces: expected a list, got a string"),
        ("rules:\n  - name: r\n    namespaces: [a, [b]]\n",
         "p.yaml:5: rules[0].namespaces[1]: expected a string or a number, got ['b']"),
        ("rules:\n  - name: r\n    namespaces: [a]\n    excludeNamespaces: b\n",
         "p.yaml:6: rules[0].excludeNamespaces: expected a list, got a string"),
        ("rules:\n  - {name: r, namespaces: [a]}\n  - {name: r, namespaces: [b]}\n",
         "p.yaml:5: rules[1].name: rule name 'r' is used twice"),
        ("rules:\n  - name: r\n    namespaces: [a]\n    selector: {}\n",
         f"p.yaml:6: rules[0].selector: unknown key; known keys here: {RULE_KEYS}"),
        ("rules:\n  - name: r\n    namespaces: [a]\n    mode: never\n",
         "p.yaml:6: rules[0].mode: expected one of enforce, audit, dry-run, got 'never'"),
        ("rules:\n  - name: r\n    namespaces: [a]\n    podSelector: tier=batch\n",
         "p.yaml:6: rules[0].podSelector: expected a mapping, got a string"),
        ("rules:\n  - name: r\n    namespaces: [a]\n    podSelector: {matchExpressions: []}\n",
         "p.yaml:6: rules[0].podSelector.matchExpressions: unknown key; known keys here: matchLabels"),
        ("rules:\n  - name: r\n    namespaces: [a]\n    podSelector: {matchLabels: [tier]}\n",
         "p.yaml:6: rules[0].podSelector.matchLabels: expected a mapping, got a list"),
        ("rules:\n  - name: r\n    namespaces: [a]\n    podSelector: {matchLabels: {tier: [a]}}\n",
         "p.yaml:6: rules[0].podSelector.matchLabels.tier: expected a string or a number, got ['a']"),
        ("rules:\n  - name: r\n    namespaces: [a]\n    podSelector: {matchLabels: {tier: true}}\n",
         "p.yaml:6: rules[0].podSelector.matchLabels.tier: expected a string or a number, got True"),
        ("rules:\n  - name: r\n    namespaces: [a]\n    podSelector: {matchLabels: {tier: null}}\n",
         "p.yaml:6: rules[0].podSelector.matchLabels.tier: expected a string or a number, got None"),
        ("rules:\n  - name: r\n    namespaces: [a]\n    settings: [cpu-quota]\n",
         "p.yaml:6: rules[0].settings: expected a mapping of setting names, got a list"),
    ],
    ids=["not-a-list", "string", "rule-not-a-mapping", "no-name", "empty-name", "number-name", "no-namespaces",
         "empty-namespaces", "namespaces-string", "namespace-list-item", "exclude-string", "duplicate-name",
         "unknown-key", "mode", "podSelector-string", "podSelector-key", "matchLabels-list", "matchLabels-value-list",
         "matchLabels-value-bool", "matchLabels-value-null", "settings-list"],
)
def test_rule_errors(text: str, message: str) -> None:
    assert error_of(HEADER + text) == message


def test_a_rule_is_read_whole() -> None:
    policies = parse_policy(HEADER + "mode: audit\nrules:\n  - name: batch\n    namespaces: [batch-*, 7]\n"
                            "    excludeNamespaces: [batch-legacy]\n"
                            "    podSelector: {matchLabels: {tier: batch, version: 2}}\n"
                            "    mode: enforce\n    settings:\n      memory-limit: {max: 1Gi}\n", FILE)
    (rule,) = policies.rules
    assert (rule.name, rule.line, rule.namespaces, rule.exclude_namespaces, dict(rule.match_labels), rule.mode) == (
        "batch", 5, ("batch-*", "7"), ("batch-legacy",), {"tier": "batch", "version": "2"}, "enforce")
    assert list(rule.settings) == ["memory-limit"]
    assert policies.mode_of(rule) == "enforce"
    assert policies.mode_of(None) == "audit"


# ------------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("cpu: {}", f"p.yaml:7: rules[0].settings.cpu: unknown setting; known: {KNOWN_SETTINGS} (or one member of a "
                    "family, e.g. hugepages-2mi, unified.memory.high)"),
        ("hugepages-: {}", f"p.yaml:7: rules[0].settings.hugepages-: unknown setting; known: {KNOWN_SETTINGS} (or "
                           "one member of a family, e.g. hugepages-2mi, unified.memory.high)"),
        ("cpu-*: {}", f"p.yaml:7: rules[0].settings.cpu-*: unknown setting; known: {KNOWN_SETTINGS} (or one member "
                      "of a family, e.g. hugepages-2mi, unified.memory.high)"),
        ("cpu-quota: {maximum: 1}",
         f"p.yaml:7: rules[0].settings.cpu-quota.maximum: unknown key; known keys here: {SETTING_KEYS}"),
        ("runtime-handler: any", "p.yaml:7: rules[0].settings.runtime-handler: expected a mapping, got a string"),
        ("runtime-handler: [kata]", "p.yaml:7: rules[0].settings.runtime-handler: expected a mapping, got a list"),
        ("runtime-handler: {values: kata}", "p.yaml:7: rules[0].settings.runtime-handler.values: expected a list, "
                                            "got a string"),
        ("cpu-quota: {values: 1}", "p.yaml:7: rules[0].settings.cpu-quota.values: expected a list, got int"),
        ("cpu-quota: {values: [[1]]}",
         "p.yaml:7: rules[0].settings.cpu-quota.values[0]: expected a string or a number, got [1]"),
        ("runtime-handler: {values: [kata, true]}",
         "p.yaml:7: rules[0].settings.runtime-handler.values[1]: expected a string or a number, got True"),
        ("runtime-handler: {values: ['']}",
         "p.yaml:7: rules[0].settings.runtime-handler.values[0]: expected a string or a number, got ''"),
        ("runtime-handler: {values: [null]}",
         "p.yaml:7: rules[0].settings.runtime-handler.values[0]: expected a string or a number, got None"),
        ("seccomp-profile: {patterns: x}",
         "p.yaml:7: rules[0].settings.seccomp-profile.patterns: expected a list, got a string"),
        ("seccomp-profile: {patterns: [{a: 1}]}",
         "p.yaml:7: rules[0].settings.seccomp-profile.patterns[0]: expected a string or a number, got {'a': 1}"),
        ("seccomp-profile: {patterns: [ok, '(']}", "p.yaml:7: rules[0].settings.seccomp-profile.patterns[1]: not a "
                                                   "valid regular expression: missing ), unterminated subpattern at "
                                                   "position 0"),
        ("seccomp-profile: {patterns: ['*x']}", "p.yaml:7: rules[0].settings.seccomp-profile.patterns[0]: not a "
                                                "valid regular expression: nothing to repeat at position 0"),
        ("seccomp-profile: {forbid: {a: 1}}",
         "p.yaml:7: rules[0].settings.seccomp-profile.forbid: expected a list, got a mapping"),
        ("seccomp-profile: {forbid: [false]}",
         "p.yaml:7: rules[0].settings.seccomp-profile.forbid[0]: expected a string or a number, got False"),
        ("seccomp-profile: {min: 1}",
         "p.yaml:7: rules[0].settings.seccomp-profile.min: seccomp-profile values are not numbers; use values or "
         "patterns"),
        ("runtime-handler: {max: 1}",
         "p.yaml:7: rules[0].settings.runtime-handler.max: runtime-handler values are not numbers; use values or "
         "patterns"),
        ("cpuset-cpus: {max: 3}",
         "p.yaml:7: rules[0].settings.cpuset-cpus.max: cpuset-cpus values are not numbers; use values or patterns"),
        ("unified.*: {max: 1}",
         "p.yaml:7: rules[0].settings.unified.*.max: unified.* values are not numbers; use values or patterns"),
        ("unified.memory.high: {min: 1}", "p.yaml:7: rules[0].settings.unified.memory.high.min: unified.memory.high "
                                          "values are not numbers; use values or patterns"),
        ("memory-limit: {min: 2Gi, max: 1Gi}",
         "p.yaml:7: rules[0].settings.memory-limit.min: min '2Gi' is above max '1Gi'"),
        ("cpu-shares: {min: 10, max: 5}", "p.yaml:7: rules[0].settings.cpu-shares.min: min 10 is above max 5"),
        ("cpu-quota: {min: '1', max: 500m}",
         "p.yaml:7: rules[0].settings.cpu-quota.min: min '1' is above max '500m'"),
        ("memory-limit: {max: lots}", "p.yaml:7: rules[0].settings.memory-limit.max: 'lots' is not a Kubernetes "
                                      "quantity (e.g. 500m, 2, 1.5, 512Mi, 2Gi, 1e3)"),
        ("memory-limit: {min: 1GiB}", "p.yaml:7: rules[0].settings.memory-limit.min: '1GiB' is not a Kubernetes "
                                      "quantity (e.g. 500m, 2, 1.5, 512Mi, 2Gi, 1e3)"),
        ("cpu-quota: {max: .inf}", "p.yaml:7: rules[0].settings.cpu-quota.max: 'inf' is not a Kubernetes quantity "
                                   "(e.g. 500m, 2, 1.5, 512Mi, 2Gi, 1e3)"),
        ("memory-limit: {max: true}",
         "p.yaml:7: rules[0].settings.memory-limit.max: expected a string or a number, got True"),
        ("memory-limit: {max: '" + "1" * 70 + "'}",
         "p.yaml:7: rules[0].settings.memory-limit.max: '" + "1" * 64 + "'... is too long for a quantity"),
        ("cpu-quota: {effective: true}",
         "p.yaml:7: rules[0].settings.cpu-quota.effective: only runtime-handler, seccomp-profile have an effective "
         "value to check"),
        ("unified.*: {effective: true}",
         "p.yaml:7: rules[0].settings.unified.*.effective: only runtime-handler, seccomp-profile have an effective "
         "value to check"),
        ("runtime-handler: {effective: yes please}",
         "p.yaml:7: rules[0].settings.runtime-handler.effective: expected true or false, got 'yes please'"),
        ("runtime-handler: {required: 1}",
         "p.yaml:7: rules[0].settings.runtime-handler.required: expected true or false, got 1"),
        ("runtime-handler: {values: [kata], default: runc}",
         "p.yaml:7: rules[0].settings.runtime-handler.default: the default is not allowed by this rule itself: "
         "'runc' is not allowed; allowed: kata"),
        ("runtime-handler: {forbid: [runc], default: runc}",
         "p.yaml:7: rules[0].settings.runtime-handler.default: the default is not allowed by this rule itself: "
         "'runc' is forbidden (runc)"),
        ("memory-limit: {max: 1Gi, default: 2Gi}",
         "p.yaml:7: rules[0].settings.memory-limit.default: the default is not allowed by this rule itself: "
         "'2Gi' is not allowed; allowed: at most 1Gi"),
        ("cpu-quota: {max: '1', default: disable}",
         "p.yaml:7: rules[0].settings.cpu-quota.default: the default is not allowed by this rule itself: "
         "'disable' is not allowed; allowed: at most 1"),
        ("hugepages-*: {default: 1Gi}",
         "p.yaml:7: rules[0].settings.hugepages-*.default: a family (name ending in *) cannot have a default"),
        ("unified.*: {default: '1'}",
         "p.yaml:7: rules[0].settings.unified.*.default: a family (name ending in *) cannot have a default"),
        ("runtime-handler: {default: [a]}",
         "p.yaml:7: rules[0].settings.runtime-handler.default: expected a string or a number, got ['a']"),
        ("runtime-handler: {default: ''}",
         "p.yaml:7: rules[0].settings.runtime-handler.default: expected a string or a number, got ''"),
    ],
    ids=["unknown-setting", "bare-family-prefix", "unknown-family", "unknown-key", "spec-string", "spec-list",
         "values-string", "values-int", "values-item-list", "values-item-bool", "values-item-empty",
         "values-item-null", "patterns-string", "patterns-item-mapping", "patterns-invalid-regex",
         "patterns-nothing-to-repeat", "forbid-mapping", "forbid-item-bool", "min-on-string-setting",
         "max-on-string-setting", "max-on-cpuset", "max-on-unified-family", "min-on-unified-member", "min-above-max",
         "min-above-max-numbers", "min-above-max-cpus", "bad-quantity", "bad-quantity-suffix", "infinite-quantity",
         "bool-quantity", "long-quantity", "effective-on-cpu-quota", "effective-on-family", "effective-not-bool",
         "required-not-bool", "default-not-in-values", "default-forbidden", "default-above-max", "default-disable",
         "default-on-hugepages-family", "default-on-unified-family", "default-list", "default-empty"],
)
def test_setting_errors(line: str, message: str) -> None:
    assert error_of(with_setting(line)) == message


@pytest.mark.parametrize(
    ("name", "kind"),
    [("runtime-handler", "string"), ("seccomp-profile", "string"), ("cpu-quota", "cpus"), ("cpu-period", "integer"),
     ("cpu-shares", "integer"), ("cpuset-cpus", "string"), ("cpuset-mems", "string"), ("memory-limit", "bytes"),
     ("memory-swap", "bytes"), ("oom-score-adj", "integer"), ("hugepages-*", "bytes"), ("hugepages-2mi", "bytes"),
     ("unified.*", "string"), ("unified.memory.high", "string")],
)
def test_every_setting_and_family_is_accepted_with_its_kind(name: str, kind: str) -> None:
    rule = setting(name, "{}")
    assert (rule.setting, rule.kind, rule.constrained) == (name, kind, False)


def test_a_setting_written_with_no_value_allows_anything() -> None:
    rule = parse_policy(with_setting("cpuset-cpus:"), FILE).rules[0].settings["cpuset-cpus"]
    assert rule.refusal("0-3") is None
    assert rule.describe() == "any value"


def test_a_setting_is_read_whole() -> None:
    rule = setting("runtime-handler", "{values: [runc, kata], default: kata, effective: true, forbid: [runc-old], "
                   "required: true, patterns: ['gvisor-.*']}")
    assert (rule.values, rule.forbid, [p.pattern for p in rule.patterns], rule.default, rule.required,
            rule.effective) == (("runc", "kata"), ("runc-old",), ["gvisor-.*"], "kata", True, True)
    bounds = setting("cpu-quota", "{min: 10m, max: 2, default: 0.5}")
    assert (bounds.minimum, bounds.maximum, bounds.default) == (Fraction(1, 100), Fraction(2), "0.5")
    assert setting("memory-limit", "{default: 512Mi}").default == "512Mi"


def test_every_setting_of_a_rule_is_checked_on_its_own() -> None:
    text = ONE_RULE + "      cpu: {}\n      memory-limit: {max: lots}\n      cpu-quota: {effective: true}\n"
    assert [str(e) for e in check_policy(text, FILE)] == [
        f"p.yaml:7: rules[0].settings.cpu: unknown setting; known: {KNOWN_SETTINGS} (or one member of a family, "
        "e.g. hugepages-2mi, unified.memory.high)",
        "p.yaml:8: rules[0].settings.memory-limit.max: 'lots' is not a Kubernetes quantity (e.g. 500m, 2, 1.5, "
        "512Mi, 2Gi, 1e3)",
        "p.yaml:9: rules[0].settings.cpu-quota.effective: only runtime-handler, seccomp-profile have an effective "
        "value to check",
    ]
    assert error_of(text) == str(check_policy(text, FILE)[0])


@pytest.mark.parametrize("pattern", ["a{4294967296}", "(" * 1500 + ")" * 1500], ids=["huge-repeat", "deep-groups"])
def test_every_bad_regular_expression_is_a_source_error(pattern: str) -> None:
    try:
        message = error_of(with_setting(f"seccomp-profile: {{patterns: ['{pattern}']}}"))
    except (OverflowError, RecursionError) as err:
        raise type(err)(str(err)) from None  # a short traceback: pytest takes seconds to render the deep one
    assert message.startswith("p.yaml:7: rules[0].settings.seccomp-profile.patterns[0]: not a valid regular "
                              "expression: ")


# ------------------------------------------------------------------------------------------ check_policy


CHECKED = """\
apiVersion: criproxy.io/v1
kind: AnnotationPolicy
rules:
  - name: a
    namespaces: []
  - name: b
    namespaces: [x]
    settings:
      cpu: {}
      memory-limit: {max: lots}
      runtime-handler: {values: [kata], default: runc}
  - name: b
    namespaces: [y]
  - name: c
    namespaces: [z]
    podSelector: {matchLabels: [a]}
mode: strict
drift: never
interceptors: {seccomp: {timeoutSeconds: 99}}
"""


def test_check_policy_lists_every_problem_in_line_order() -> None:
    assert [str(e) for e in check_policy(CHECKED, FILE)] == [
        "p.yaml:1: apiVersion: expected criproxy.io/v1alpha1, got 'criproxy.io/v1'",
        "p.yaml:5: rules[0].namespaces: is empty: the rule would match no pod",
        f"p.yaml:9: rules[1].settings.cpu: unknown setting; known: {KNOWN_SETTINGS} (or one member of a family, "
        "e.g. hugepages-2mi, unified.memory.high)",
        "p.yaml:10: rules[1].settings.memory-limit.max: 'lots' is not a Kubernetes quantity (e.g. 500m, 2, 1.5, "
        "512Mi, 2Gi, 1e3)",
        "p.yaml:11: rules[1].settings.runtime-handler.default: the default is not allowed by this rule itself: "
        "'runc' is not allowed; allowed: kata",
        "p.yaml:12: rules[2].name: rule name 'b' is used twice",
        "p.yaml:16: rules[3].podSelector.matchLabels: expected a mapping, got a list",
        "p.yaml:17: mode: expected one of enforce, audit, dry-run, got 'strict'",
        "p.yaml:18: drift: expected one of deny, audit, ignore, got 'never'",
        "p.yaml:19: interceptors.seccomp.timeoutSeconds: expected seconds, more than 0 and at most 60, got 99",
    ]


def test_parse_policy_raises_the_first_problem_it_finds() -> None:
    assert error_of(CHECKED) == "p.yaml:1: apiVersion: expected criproxy.io/v1alpha1, got 'criproxy.io/v1'"


def test_check_policy_reports_a_file_it_cannot_read_as_one_problem() -> None:
    assert [str(e) for e in check_policy("a: [\n", FILE)] == [
        "p.yaml:2: not valid YAML: expected the node content, but found '<stream end>'"]
    assert [str(e) for e in check_policy("- x\n", FILE)] == ["p.yaml:1: expected a mapping, got a list"]
    assert [str(e) for e in check_policy("a: 1\na: 2\n", FILE)] == ["p.yaml:2: a: appears twice"]


def test_a_good_policy_has_no_problems() -> None:
    assert check_policy(HEADER, FILE) == []


def test_the_repository_policies_yaml_is_valid() -> None:
    text = REPO_POLICIES.read_bytes()
    assert check_policy(text, str(REPO_POLICIES)) == []
    policies = parse_policy(text, "policies.yaml")
    assert [r.name for r in policies.rules] == ["system", "demo", "batch-tighten-only"]
    assert (policies.mode, policies.drift) == ("enforce", "deny")
    assert {name: policies.failure_policy(name) for name in ("runtime-handler", "seccomp", "resources")} == {
        name: FailurePolicy("closed", 1.0) for name in ("runtime-handler", "seccomp", "resources")}
    system, demo, batch = policies.rules
    assert dict(system.settings) == {}
    assert system.matches(pod("kube-system"))
    assert demo.setting("hugepages-2mi") is demo.settings["hugepages-*"]
    assert demo.setting("unified.memory.high") is demo.settings["unified.*"]
    assert policies.rule_for(pod("batch-jobs")) is batch
    assert policies.rule_for(pod("batch-legacy")) is None
    assert batch.settings["cpu-quota"].refusal("16") is None
    assert batch.settings["cpu-quota"].refusal("17") == "'17' is not allowed; allowed: at most 16"


# ------------------------------------------------------------------------------------------ SettingRule.refusal


@pytest.mark.parametrize(
    ("name", "spec", "value", "why"),
    [
        # values: exact strings and globs, compared after stripping whitespace
        ("runtime-handler", "{values: [kata, 'runc*']}", "kata", None),
        ("runtime-handler", "{values: [kata, 'runc*']}", " kata\n", None),
        ("runtime-handler", "{values: [kata, 'runc*']}", "runc-alt", None),
        ("runtime-handler", "{values: [kata, 'runc*']}", "runc", None),
        ("runtime-handler", "{values: [kata, 'runc*']}", "Kata", "'Kata' is not allowed; allowed: kata, runc*"),
        ("runtime-handler", "{values: [kata, 'runc*']}", "kata2", "'kata2' is not allowed; allowed: kata, runc*"),
        ("runtime-handler", "{values: [kata, 'runc*']}", "", "'' is not allowed; allowed: kata, runc*"),
        ("runtime-handler", "{values: ['gvisor-?']}", "gvisor-1", None),
        ("runtime-handler", "{values: ['gvisor-?']}", "gvisor-12", "'gvisor-12' is not allowed; allowed: gvisor-?"),
        ("seccomp-profile", "{values: ['localhost/*']}", "localhost/a/b.json", None),
        ("seccomp-profile", "{values: ['localhost/*']}", "localhost", "'localhost' is not allowed; allowed: "
                                                                      "localhost/*"),
        # patterns: regular expressions matching the whole value
        ("seccomp-profile", "{patterns: ['localhost/team-[a-z]+/.*']}", "localhost/team-a/x.json", None),
        ("seccomp-profile", "{patterns: ['localhost/team-[a-z]+/.*']}", "xlocalhost/team-a/x",
         "'xlocalhost/team-a/x' is not allowed; allowed: /localhost/team-[a-z]+/.*/"),
        ("seccomp-profile", "{patterns: ['localhost/team-[a-z]+']}", "localhost/team-a/extra",
         "'localhost/team-a/extra' is not allowed; allowed: /localhost/team-[a-z]+/"),
        ("seccomp-profile", "{patterns: ['r.*'], values: [unconfined]}", "unconfined", None),
        ("seccomp-profile", "{patterns: ['r.*'], values: [unconfined]}", "runtime/default", None),
        # forbid beats everything
        ("runtime-handler", "{forbid: [runc]}", "runc", "'runc' is forbidden (runc)"),
        ("runtime-handler", "{forbid: [runc]}", "kata", None),
        ("runtime-handler", "{values: ['*'], forbid: ['runc*', gvisor]}", "runc-alt",
         "'runc-alt' is forbidden (runc*, gvisor)"),
        ("runtime-handler", "{values: [runc], forbid: [runc]}", "runc", "'runc' is forbidden (runc)"),
        ("seccomp-profile", "{patterns: ['.*'], forbid: [unconfined]}", " unconfined ",
         "'unconfined' is forbidden (unconfined)"),
        ("cpu-quota", "{max: '4', forbid: ['1']}", "1", "'1' is forbidden (1)"),
        # min/max: Kubernetes quantities, per kind
        ("cpu-quota", "{max: '1'}", "500m", None),
        ("cpu-quota", "{max: '1'}", "1", None),
        ("cpu-quota", "{max: '1'}", "1000m", None),
        ("cpu-quota", "{max: '1'}", "1001m", "'1001m' is not allowed; allowed: at most 1"),
        ("cpu-quota", "{max: '1'}", "2", "'2' is not allowed; allowed: at most 1"),
        ("cpu-quota", "{max: '1'}", "disable", "'disable' is not allowed; allowed: at most 1"),
        ("cpu-quota", "{max: '1'}", "a lot", "'a lot' is not allowed; allowed: at most 1"),
        ("cpu-quota", "{max: 64}", "64", None),
        ("cpu-quota", "{min: 10m, max: 0.5}", "5m", "'5m' is not allowed; allowed: 10m to 0.5"),
        ("cpu-quota", "{min: 10m, max: 0.5}", "0.25", None),
        ("cpu-quota", "{values: [disable], max: '1'}", "disable", None),
        ("memory-limit", "{max: 1Gi}", "2Gi", "'2Gi' is not allowed; allowed: at most 1Gi"),
        ("memory-limit", "{max: 1Gi}", "1Gi", None),
        ("memory-limit", "{max: 1Gi}", "1024Mi", None),
        ("memory-limit", "{max: 1Gi}", "1073741824", None),
        ("memory-limit", "{max: 1Gi}", "1073741825", "'1073741825' is not allowed; allowed: at most 1Gi"),
        ("memory-limit", "{max: 1Gi}", "1G", None),
        ("memory-limit", "{max: 1G}", "1Gi", "'1Gi' is not allowed; allowed: at most 1G"),
        ("memory-limit", "{min: 4Mi}", "3Mi", "'3Mi' is not allowed; allowed: at least 4Mi"),
        ("memory-swap", "{min: 1Gi, max: 2Gi}", "1.5Gi", None),
        ("hugepages-*", "{max: 64Gi}", "65Gi", "'65Gi' is not allowed; allowed: at most 64Gi"),
        ("hugepages-2mi", "{max: 64Mi}", "32Mi", None),
        ("cpu-period", "{min: 1000, max: 1000000}", "1e3", None),
        ("cpu-period", "{min: 1000, max: 1000000}", "1M", None),
        ("cpu-period", "{min: 1000, max: 1000000}", "1Mi", "'1Mi' is not allowed; allowed: 1000 to 1000000"),
        ("cpu-period", "{min: 1000, max: 1000000}", "999", "'999' is not allowed; allowed: 1000 to 1000000"),
        ("oom-score-adj", "{min: -10, max: 10}", "-10", None),
        ("oom-score-adj", "{min: -10, max: 10}", "-11", "'-11' is not allowed; allowed: -10 to 10"),
        ("cpu-shares", "{min: 2}", "1", "'1' is not allowed; allowed: at least 2"),
        # union: a listed value OR a number within min..max
        ("memory-limit", "{values: [4Gi], min: 1Gi, max: 2Gi}", "4Gi", None),
        ("memory-limit", "{values: [4Gi], min: 1Gi, max: 2Gi}", "1536Mi", None),
        ("memory-limit", "{values: [4Gi], min: 1Gi, max: 2Gi}", "4096Mi",
         "'4096Mi' is not allowed; allowed: 4Gi, 1Gi to 2Gi"),
        ("memory-limit", "{values: [4Gi], min: 1Gi, max: 2Gi}", "3Gi",
         "'3Gi' is not allowed; allowed: 4Gi, 1Gi to 2Gi"),
        ("cpu-quota", "{patterns: ['[0-9]+'], max: 500m}", "8", None),
        ("cpu-quota", "{patterns: ['[0-9]+'], max: 500m}", "0.75", "'0.75' is not allowed; allowed: /[0-9]+/, "
                                                                   "at most 500m"),
        # {} (and forbid alone) allow any value
        ("seccomp-profile", "{}", "anything at all", None),
        ("cpu-quota", "{}", "disable", None),
        ("memory-limit", "{}", "not a quantity", None),
        ("seccomp-profile", "{forbid: [unconfined]}", "runtime/default", None),
    ],
)
def test_refusal(name: str, spec: str, value: str, why: str | None) -> None:
    assert setting(name, spec).refusal(value) == why


@pytest.mark.parametrize(
    ("name", "spec", "text"),
    [
        ("runtime-handler", "{values: [runc, kata]}", "runc, kata"),
        ("seccomp-profile", "{values: [runtime/default], patterns: ['localhost/.*']}",
         "runtime/default, /localhost/.*/"),
        ("cpu-quota", "{min: 10m, max: '64'}", "10m to 64"),
        ("cpu-quota", "{min: 100m}", "at least 100m"),
        ("cpu-quota", "{min: 0}", "at least 0"),
        ("memory-limit", "{max: 1Gi}", "at most 1Gi"),
        ("oom-score-adj", "{min: -1000, max: 1000}", "-1000 to 1000"),
        ("cpu-quota", "{values: [disable], max: 1}", "disable, at most 1"),
        ("seccomp-profile", "{}", "any value"),
        ("seccomp-profile", "{forbid: [unconfined]}", "any value"),
    ],
)
def test_describe(name: str, spec: str, text: str) -> None:
    assert setting(name, spec).describe() == text


def test_constrained_means_values_patterns_or_bounds() -> None:
    assert not setting("seccomp-profile", "{forbid: [unconfined], default: runtime/default}").constrained
    assert setting("seccomp-profile", "{values: [unconfined]}").constrained
    assert setting("seccomp-profile", "{patterns: [x]}").constrained
    assert setting("cpu-shares", "{min: 2}").constrained
    assert setting("cpu-shares", "{max: 2}").constrained


# ------------------------------------------------------------------------------------------ Rule and PolicySet


def rules_of(body: str) -> PolicySet:
    return parse_policy(HEADER + "rules:\n" + body, FILE)


@pytest.mark.parametrize(
    ("namespaces", "namespace", "matches"),
    [
        ("[team-a]", "team-a", True),
        ("[team-a]", "team-ab", False),
        ("['team-*']", "team-", True),
        ("['team-*']", "team-x", True),
        ("['team-*']", "team", False),
        ("['team-*']", "my-team-x", False),
        ("['*']", "anything", True),
        ("['*']", "", True),
        ("['kube-?ystem']", "kube-system", True),
        ("['kube-?ystem']", "kube-ssystem", False),
        ("['ns-[0-9]']", "ns-7", True),
        ("['ns-[0-9]']", "ns-x", False),
        ("[a, b]", "b", True),
        ("['a.b']", "axb", False),
        ("['Team-A']", "team-a", False),
    ],
)
def test_rule_namespace_globs(namespaces: str, namespace: str, matches: bool) -> None:
    (rule,) = rules_of(f"  - name: r\n    namespaces: {namespaces}\n").rules
    assert rule.matches(pod(namespace)) is matches


def test_exclude_namespaces_win_over_namespaces() -> None:
    (rule,) = rules_of("  - name: r\n    namespaces: ['batch-*']\n    excludeNamespaces: [batch-legacy, 'batch-x*']\n"
                       ).rules
    assert rule.matches(pod("batch-jobs"))
    assert not rule.matches(pod("batch-legacy"))
    assert not rule.matches(pod("batch-xyz"))
    assert not rule.matches(pod("other"))


def test_pod_selector_needs_every_label() -> None:
    (rule,) = rules_of("  - name: r\n    namespaces: ['*']\n    podSelector: {matchLabels: {tier: batch, v: 2}}\n"
                       ).rules
    assert rule.matches(pod("a", {"tier": "batch", "v": "2", "other": "x"}))
    assert not rule.matches(pod("a", {"tier": "batch"}))
    assert not rule.matches(pod("a", {"tier": "web", "v": "2"}))
    assert not rule.matches(pod("a", {}))
    (everyone,) = rules_of("  - name: r\n    namespaces: ['*']\n    podSelector: {}\n").rules
    assert everyone.matches(pod("a", {}))


def test_the_first_matching_rule_in_file_order_wins() -> None:
    policies = rules_of("  - name: labelled\n    namespaces: ['team-*']\n"
                        "    podSelector: {matchLabels: {tier: batch}}\n"
                        "  - name: team-a\n    namespaces: [team-a]\n"
                        "  - name: teams\n    namespaces: ['team-*']\n    excludeNamespaces: [team-z]\n"
                        "  - name: everyone\n    namespaces: ['*']\n")
    names = [r.name for r in policies.rules]
    assert names == ["labelled", "team-a", "teams", "everyone"]

    def rule_name(namespace: str, labels: dict[str, str] | None = None) -> str | None:
        rule = policies.rule_for(pod(namespace, labels))
        return None if rule is None else rule.name

    assert rule_name("team-a", {"tier": "batch"}) == "labelled"
    assert rule_name("team-a") == "team-a"
    assert rule_name("team-b") == "teams"
    assert rule_name("team-z") == "everyone"
    assert rule_name("default") == "everyone"
    assert rules_of("  - name: only\n    namespaces: [x]\n").rule_for(pod("y")) is None


def test_rule_setting_by_name_then_by_family() -> None:
    (rule,) = rules_of("  - name: r\n    namespaces: [a]\n    settings:\n      hugepages-*: {max: 1Gi}\n"
                       "      hugepages-2mi: {max: 64Mi}\n      unified.*: {}\n").rules
    assert rule.setting("hugepages-2mi") is rule.settings["hugepages-2mi"]
    assert rule.setting("hugepages-1gi") is rule.settings["hugepages-*"]
    assert rule.setting("unified.pids.max") is rule.settings["unified.*"]
    assert rule.setting("memory-limit") is None
    assert rule.setting("hugepages") is None


def test_a_rule_line_is_where_it_starts() -> None:
    policies = rules_of("  - name: a\n    namespaces: [a]\n\n  # comment\n  - name: b\n    namespaces: [b]\n")
    assert [r.line for r in policies.rules] == [4, 8]
    assert isinstance(policies.rules[0], Rule)


def test_digest_is_of_the_file_text() -> None:
    text = HEADER + "mode: audit\n"
    policies = parse_policy(text, FILE)
    assert policies.digest == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert parse_policy(text.encode(), FILE).digest == policies.digest
    assert parse_policy(text, "other.yaml").digest == policies.digest
    assert parse_policy(text + "# a comment\n", FILE).digest != policies.digest
    assert parse_policy(text.replace("audit", "enforce"), FILE).digest != policies.digest
    assert len(policies.digest) == 16
