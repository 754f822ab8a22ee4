"""The policy file's model: frozen dataclasses, built once from a checked document.

    apiVersion: criproxy.io/v1alpha1
    kind: AnnotationPolicy
    mode: enforce            # enforce | audit | dry-run (default enforce)
    drift: deny              # deny | audit | ignore (default deny)
    interceptors:            # what happens when an interceptor fails or runs past its deadline
      resources: {onError: open, timeoutSeconds: 0.5}     # default: closed, 1 second
    rules:                   # first rule that matches the pod decides
      - name: demo
        namespaces: [criproxy-demo, "team-*"]    # names or globs
        excludeNamespaces: [team-legacy]
        podSelector: {matchLabels: {tier: batch}}
        mode: audit          # this rule's mode (default: the file's)
        settings:
          runtime-handler: {values: [runc, kata], default: kata, effective: true, forbid: [runc]}
          memory-limit: {min: 64Mi, max: 8Gi}
          seccomp-profile: {patterns: ["localhost/team-[a-z]+/.*"], values: [runtime/default]}
          hugepages-*: {}    # a family: every hugepages-<size>; {} allows any value

Every unknown key, wrong type and impossible value is a SourceError naming file:line and key.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from criproxy.cri.annotations import EFFECTIVE_SETTINGS, SETTING_FAMILIES, SETTING_KINDS, setting_kind
from criproxy.cri.context import PodInfo
from criproxy.cri.quantity import QuantityError, parse_quantity
from criproxy.policies.source import Document, Path_, SourceError, load

API_VERSION = "criproxy.io/v1alpha1"
KIND = "AnnotationPolicy"
MODES = ("enforce", "audit", "dry-run")
DRIFT = ("deny", "audit", "ignore")
ON_ERROR = ("closed", "open")
DEFAULT_TIMEOUT_S = 1.0
MATCH_CACHE_SIZE = 4096


def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern))


def _globs(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """One expression matching any of the globs."""
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


@dataclass(frozen=True, slots=True)
class SettingRule:
    """What one rule allows for one setting."""

    setting: str
    kind: str
    values: tuple[str, ...] = ()
    patterns: tuple[re.Pattern[str], ...] = ()
    forbid: tuple[str, ...] = ()
    minimum: Fraction | None = None
    maximum: Fraction | None = None
    #: The bounds as the file wrote them (512Mi, 500m), for messages.
    bounds_text: tuple[str, str] = ("", "")
    default: str | None = None
    required: bool = False
    effective: bool = False
    _value_globs: tuple[re.Pattern[str], ...] = field(default=(), repr=False, compare=False)
    _forbid_globs: tuple[re.Pattern[str], ...] = field(default=(), repr=False, compare=False)

    @property
    def constrained(self) -> bool:
        return bool(self.values or self.patterns or self.minimum is not None or self.maximum is not None)

    def refusal(self, value: str) -> str | None:
        """Why `value` is not allowed, or None when it is: not forbidden, and (when the rule constrains
        values at all) matching a value, a pattern, or within min..max."""
        text = value.strip()
        if any(g.fullmatch(text) for g in self._forbid_globs):
            return f"{text!r} is forbidden ({', '.join(self.forbid)})"
        if not self.constrained:
            return None
        if any(g.fullmatch(text) for g in self._value_globs) or any(p.fullmatch(text) for p in self.patterns):
            return None
        if self.minimum is not None or self.maximum is not None:
            if self.kind == "cpus" and text == "disable" and self.maximum is None:
                return None  # no quota is above any minimum
            number = _number(text, self.kind)
            if number is not None and self._in_range(number):
                return None
        return f"{text!r} is not allowed; allowed: {self.describe()}"

    def _in_range(self, number: Fraction) -> bool:
        return (self.minimum is None or number >= self.minimum) and (self.maximum is None or number <= self.maximum)

    def describe(self) -> str:
        parts = [*self.values, *(f"/{p.pattern}/" for p in self.patterns)]
        low, high = self.bounds_text
        if low and high:
            parts.append(f"{low} to {high}")
        elif low:
            parts.append(f"at least {low}")
        elif high:
            parts.append(f"at most {high}")
        return ", ".join(parts) or "any value"


def _number(text: str, kind: str) -> Fraction | None:
    if kind not in ("cpus", "bytes", "integer"):
        return None
    if text == "disable":
        return None  # no quota: above any maximum
    try:
        return parse_quantity(text)
    except QuantityError:
        return None


@dataclass(frozen=True, slots=True)
class FailurePolicy:
    on_error: str = "closed"
    timeout_seconds: float = DEFAULT_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    line: int | None
    namespaces: tuple[str, ...]
    exclude_namespaces: tuple[str, ...] = ()
    match_labels: Mapping[str, str] = field(default_factory=dict)
    mode: str | None = None
    settings: Mapping[str, SettingRule] = field(default_factory=dict)
    _include: re.Pattern[str] | None = field(default=None, repr=False, compare=False)
    _exclude: re.Pattern[str] | None = field(default=None, repr=False, compare=False)

    def matches(self, pod: PodInfo) -> bool:
        ns = pod.namespace
        if self._include is None or not self._include.fullmatch(ns):
            return False
        if self._exclude is not None and self._exclude.fullmatch(ns):
            return False
        return not self.match_labels or all(pod.labels.get(k) == v for k, v in self.match_labels.items())

    def setting(self, setting: str) -> SettingRule | None:
        """The rule for `setting`: by its name, else by its family (`hugepages-*`, `unified.*`)."""
        found = self.settings.get(setting)
        if found is not None:
            return found
        return next((r for name, r in self.settings.items() if name.endswith("*") and setting.startswith(name[:-1])),
                    None)


@dataclass(frozen=True, slots=True)
class PolicySet:
    file: str
    digest: str
    mode: str = "enforce"
    drift: str = "deny"
    failure: Mapping[str, FailurePolicy] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    #: Matching is memoised per namespace (and labels, when a rule selects by labels): every call of
    #: a pod asks the same question, and a node runs few distinct namespaces. Bounded; per version.
    _matches: dict[Any, Rule | None] = field(default_factory=dict, repr=False, compare=False)
    _by_labels: bool = field(default=False, repr=False, compare=False)

    def rule_for(self, pod: PodInfo) -> Rule | None:
        """The first rule, in file order, that matches the pod."""
        key: Any = pod.namespace
        if self._by_labels:
            key = (pod.namespace, tuple(sorted(pod.labels.items())))
        try:
            return self._matches[key]
        except KeyError:
            pass
        rule = next((rule for rule in self.rules if rule.matches(pod)), None)
        if len(self._matches) >= MATCH_CACHE_SIZE:
            self._matches.clear()
        self._matches[key] = rule
        return rule

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_labels", any(rule.match_labels for rule in self.rules))

    def failure_policy(self, interceptor: str) -> FailurePolicy:
        return self.failure.get(interceptor, FailurePolicy())

    def mode_of(self, rule: Rule | None) -> str:
        return rule.mode if rule is not None and rule.mode is not None else self.mode

    def denied_wherever(self, setting: str) -> list[str]:
        """Where an annotation of `setting` is a violation whatever its value, for messages: namespaces
        no rule matches (unless a rule matches every namespace), and the rules that do not list it."""
        where = []
        if not any("*" in r.namespaces and not r.exclude_namespaces and not r.match_labels for r in self.rules):
            where.append("in namespaces no rule matches (no rule here matches every namespace)")
        silent = [r.name for r in self.rules if r.setting(setting) is None]
        if silent:
            where.append(f"under the rules that do not list {setting}: {', '.join(silent)}")
        return where


# ------------------------------------------------------------------------------------------ parsing


class _Reader:
    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.errors: list[SourceError] = []

    @contextlib.contextmanager
    def collecting(self) -> Iterator[None]:
        """Record a problem and go on with the next part, so that a check lists them all."""
        try:
            yield
        except SourceError as err:
            self.errors.append(err)

    def mapping(self, value: Any, path: Path_, known: tuple[str, ...]) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.doc.error(path, f"expected a mapping, got {_type(value)}")
        for key in value:
            if key not in known:
                raise self.doc.error((*path, key), f"unknown key; known keys here: {', '.join(known)}")
        return value

    def string(self, value: Any, path: Path_) -> str:
        if not isinstance(value, str) or not value:
            raise self.doc.error(path, f"expected a non-empty string, got {value!r}")
        return value

    def scalar_string(self, value: Any, path: Path_) -> str:
        """A value written as a string or a number (quantities like 2 or 0.5 parse as numbers)."""
        if isinstance(value, bool) or not isinstance(value, str | int | float) or value == "":
            raise self.doc.error(path, f"expected a string or a number, got {value!r}")
        return str(value)

    def strings(self, value: Any, path: Path_) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.doc.error(path, f"expected a list, got {_type(value)}")
        return tuple(self.scalar_string(v, (*path, i)) for i, v in enumerate(value))

    def choice(self, value: Any, path: Path_, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.doc.error(path, f"expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    def boolean(self, value: Any, path: Path_) -> bool:
        if not isinstance(value, bool):
            raise self.doc.error(path, f"expected true or false, got {value!r}")
        return value


_TYPE_NAMES: dict[type, str] = {dict: "a mapping", list: "a list", str: "a string"}


def _type(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def parse_policy(text: str | bytes, file: str) -> PolicySet:
    """Check and build a PolicySet; raises the first problem as a SourceError (check_policy lists all)."""
    policies, errors = _build(text, file)
    if errors:
        raise errors[0]
    assert policies is not None
    return policies


def check_policy(text: str | bytes, file: str) -> list[SourceError]:
    """Every problem of the file (each rule and each setting checked on its own), in file order."""
    try:
        _, errors = _build(text, file)
    except SourceError as err:
        return [err]
    return sorted(errors, key=lambda e: e.line or 0)


def _build(text: str | bytes, file: str) -> tuple[PolicySet | None, list[SourceError]]:
    doc = load(text, file)
    r = _Reader(doc)
    top = r.mapping(doc.data, (), ("apiVersion", "kind", "mode", "drift", "interceptors", "rules"))
    header: dict[str, Any] = {}
    with r.collecting():
        if top.get("apiVersion") != API_VERSION:
            raise doc.error(("apiVersion",), f"expected {API_VERSION}, got {top.get('apiVersion')!r}")
    with r.collecting():
        if top.get("kind") != KIND:
            raise doc.error(("kind",), f"expected {KIND}, got {top.get('kind')!r}")
    with r.collecting():
        header["mode"] = r.choice(top.get("mode", "enforce"), ("mode",), MODES)
    with r.collecting():
        header["drift"] = r.choice(top.get("drift", "deny"), ("drift",), DRIFT)
    with r.collecting():
        header["failure"] = _failures(r, top.get("interceptors", {}))
    rules: list[Rule] = []
    raw_rules = top.get("rules", [])
    if not isinstance(raw_rules, list):
        r.errors.append(doc.error(("rules",), f"expected a list of rules, got {_type(raw_rules)}"))
        raw_rules = []
    for i, item in enumerate(raw_rules):
        with r.collecting():
            rule = _rule(r, item, ("rules", i))
            if any(rule.name == other.name for other in rules):
                raise doc.error(("rules", i, "name"), f"rule name {rule.name!r} is used twice")
            rules.append(rule)
    if r.errors:
        return None, r.errors
    raw = text.encode() if isinstance(text, str) else text
    return PolicySet(file=file, digest=hashlib.sha256(raw).hexdigest()[:16], rules=tuple(rules), **header), []


def _failures(r: _Reader, value: Any) -> dict[str, FailurePolicy]:
    out: dict[str, FailurePolicy] = {}
    if not isinstance(value, dict):
        raise r.doc.error(("interceptors",), f"expected a mapping of interceptor names, got {_type(value)}")
    for name, item in value.items():
        path: Path_ = ("interceptors", name)
        spec = r.mapping(item, path, ("onError", "timeoutSeconds"))
        timeout = spec.get("timeoutSeconds", DEFAULT_TIMEOUT_S)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 60:
            raise r.doc.error((*path, "timeoutSeconds"),
                              f"expected seconds, more than 0 and at most 60, got {timeout!r}")
        out[name] = FailurePolicy(r.choice(spec.get("onError", "closed"), (*path, "onError"), ON_ERROR),
                                  float(timeout))
    return out


def _rule(r: _Reader, item: Any, path: Path_) -> Rule:
    spec = r.mapping(item, path, ("name", "namespaces", "excludeNamespaces", "podSelector", "mode", "settings"))
    name = r.string(spec.get("name"), (*path, "name"))
    if "namespaces" not in spec:
        raise r.doc.error(path, f"rule {name!r} has no namespaces (use [\"*\"] for every namespace)")
    namespaces = r.strings(spec["namespaces"], (*path, "namespaces"))
    if not namespaces:
        raise r.doc.error((*path, "namespaces"), "is empty: the rule would match no pod")
    exclude = r.strings(spec.get("excludeNamespaces", []), (*path, "excludeNamespaces"))
    labels: dict[str, str] = {}
    if "podSelector" in spec:
        selector = r.mapping(spec["podSelector"], (*path, "podSelector"), ("matchLabels",))
        raw_labels = selector.get("matchLabels", {})
        if not isinstance(raw_labels, dict):
            raise r.doc.error((*path, "podSelector", "matchLabels"), f"expected a mapping, got {_type(raw_labels)}")
        labels = {k: r.scalar_string(v, (*path, "podSelector", "matchLabels", k)) for k, v in raw_labels.items()}
    mode = r.choice(spec["mode"], (*path, "mode"), MODES) if "mode" in spec else None
    raw_settings = spec.get("settings", {})
    if not isinstance(raw_settings, dict):
        raise r.doc.error((*path, "settings"), f"expected a mapping of setting names, got {_type(raw_settings)}")
    settings: dict[str, SettingRule] = {}
    for key, value in raw_settings.items():
        with r.collecting():
            settings[key] = _setting(r, key, value, (*path, "settings", key))
    return Rule(name=name, line=r.doc.line(path), namespaces=namespaces, exclude_namespaces=exclude,
                match_labels=labels, mode=mode, settings=settings,
                _include=_globs(namespaces), _exclude=_globs(exclude) if exclude else None)


_SETTING_KEYS = ("values", "patterns", "forbid", "min", "max", "default", "required", "effective")


def _setting(r: _Reader, setting: str, value: Any, path: Path_) -> SettingRule:
    kind = setting_kind(setting)
    if setting.endswith("*") and setting[:-1] in SETTING_FAMILIES:
        kind = SETTING_FAMILIES[setting[:-1]]
    if kind is None:
        known = [*SETTING_KINDS, *(f"{family}*" for family in SETTING_FAMILIES)]
        raise r.doc.error(path, f"unknown setting; known: {', '.join(known)} (or one member of a family, "
                          "e.g. hugepages-2mi, unified.memory.high)")
    spec = r.mapping({} if value is None else value, path, _SETTING_KEYS)
    values = r.strings(spec.get("values", []), (*path, "values"))
    forbid = r.strings(spec.get("forbid", []), (*path, "forbid"))
    patterns = tuple(_pattern(r, p, (*path, "patterns", i))
                     for i, p in enumerate(r.strings(spec.get("patterns", []), (*path, "patterns"))))
    bounds = _bounds(r, setting, kind, spec, path)
    effective = r.boolean(spec.get("effective", False), (*path, "effective"))
    if effective and setting not in EFFECTIVE_SETTINGS:
        raise r.doc.error((*path, "effective"), f"only {', '.join(EFFECTIVE_SETTINGS)} have an effective value to "
                          "check")
    rule = SettingRule(
        setting=setting, kind=kind, values=values, patterns=patterns, forbid=forbid,
        minimum=bounds.get("min"), maximum=bounds.get("max"),
        bounds_text=(str(spec.get("min", "")) if "min" in bounds else "", str(spec.get("max", "")) if "max" in bounds
                     else ""),
        default=r.scalar_string(spec["default"], (*path, "default")) if "default" in spec else None,
        required=r.boolean(spec.get("required", False), (*path, "required")), effective=effective,
        _value_globs=tuple(map(_glob, values)), _forbid_globs=tuple(map(_glob, forbid)))
    if rule.default is not None:
        if setting.endswith("*"):
            raise r.doc.error((*path, "default"), "a family (name ending in *) cannot have a default")
        why = rule.refusal(rule.default)
        if why is not None:
            raise r.doc.error((*path, "default"), f"the default is not allowed by this rule itself: {why}")
    return rule


def _bounds(r: _Reader, setting: str, kind: str, spec: Mapping[str, Any], path: Path_) -> dict[str, Fraction]:
    bounds = {}
    for bound in ("min", "max"):
        if bound in spec:
            if kind not in ("cpus", "bytes", "integer"):
                raise r.doc.error((*path, bound), f"{setting} values are not numbers; use values or patterns")
            text = r.scalar_string(spec[bound], (*path, bound))
            try:
                bounds[bound] = parse_quantity(text)
            except QuantityError as err:
                raise r.doc.error((*path, bound), str(err)) from None
    if "min" in bounds and "max" in bounds and bounds["min"] > bounds["max"]:
        raise r.doc.error((*path, "min"), f"min {spec['min']!r} is above max {spec['max']!r}")
    return bounds


def _pattern(r: _Reader, text: str, path: Path_) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except (re.error, OverflowError, RecursionError) as err:
        raise r.doc.error(path, f"not a valid regular expression: {err}") from None
