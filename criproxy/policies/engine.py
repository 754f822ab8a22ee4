"""Evaluating a PolicySet for one call.

Order of precedence: the first rule, in file order, whose namespaces match the pod's namespace,
whose excludeNamespaces do not, and whose podSelector labels the pod carries, decides. No rule
matching means no annotation has any effect there: a pod that carries one is a violation.

For the call's pod (RunPodSandbox: every criproxy annotation of the pod; CreateContainer and
UpdateContainerResources: those for the pod and for this container) every criproxy annotation
must be a setting the rule lists, with a value it allows. Settings the rule marks `required`
must be present (or get the rule's `default`); `effective` settings are checked on the value the
runtime will get, whoever set it. Violations then count by the rule's mode: enforce denies the
call (PERMISSION_DENIED), audit lets it pass and records them, dry-run changes nothing and
records what would have been done.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc

from criproxy.cri.adjust import Change, Denial, read_field
from criproxy.cri.annotations import Lookup, interceptor_of, quote, setting_of
from criproxy.cri.context import CREATE_CONTAINER, RUN_POD_SANDBOX, CallContext
from criproxy.policies import APPLIED, AUDITED, DENIED, DRY_RUN, Decision, Review, change_reason
from criproxy.policies.model import FailurePolicy, PolicySet, Rule

_SECCOMP = {"RuntimeDefault": "runtime/default", "Unconfined": "unconfined"}
SECCOMP_FIELD = "config.linux.security_context.seccomp"


@dataclass(frozen=True, slots=True)
class Violation:
    setting: str
    key: str
    value: str
    reason: str
    #: Its part of the denial message when not `key=value: reason` ('' for none: drift is said once).
    shown: str | None = None

    def decision(self, action: str, rule: str, mode: str) -> Decision:
        return Decision(action, rule, mode, self.setting, self.key, self.value, self.reason,
                        interceptor=interceptor_of(self.setting))


class AnnotationPolicy:
    """A loaded policies.yaml, as the pipeline's Policy."""

    def __init__(self, policies: PolicySet, lookup: Lookup) -> None:
        self.policies = policies
        self.lookup = lookup
        self.identity = f"{policies.file}@{policies.digest}"

    def failure(self, interceptor: str) -> FailurePolicy:
        return self.policies.failure_policy(interceptor)

    def rule_of(self, ctx: CallContext) -> tuple[str, str]:
        rule = self.policies.rule_for(ctx.pod)
        return (rule.name if rule is not None else ""), self.policies.mode_of(rule)

    def defaults(self, ctx: CallContext) -> Mapping[str, str]:
        rule = self.policies.rule_for(ctx.pod)
        if rule is None:
            return {}
        out: dict[str, str] = {}
        for name, setting in rule.settings.items():
            if setting.default is not None and self.lookup.find(ctx.pod.annotations, name, ctx.container) is None:
                out[f"{self.lookup.prefix(name)}/pod"] = setting.default
        return out

    def review(self, ctx: CallContext, changes: Sequence[Change]) -> Review:
        rule = self.policies.rule_for(ctx.pod)
        mode = self.policies.mode_of(rule)
        name = rule.name if rule is not None else ""
        violations = self._violations(ctx, rule, changes)
        drift = self._drift(ctx)
        if not drift or self.policies.drift == "ignore":
            return self._verdict(ctx, name, mode, changes, violations)
        if self.policies.drift == "deny":
            return self._verdict(ctx, name, mode, changes, [*violations, *drift])
        review = self._verdict(ctx, name, mode, changes, violations)  # drift: audit, whatever the mode
        noted = tuple(v.decision(AUDITED, name, mode) for v in drift)
        return replace(review, decisions=(*noted, *review.decisions))

    def _verdict(self, ctx: CallContext, rule: str, mode: str, changes: Sequence[Change],
                 violations: list[Violation]) -> Review:
        if violations and mode == "enforce":
            return Review(changes=(), denial=Denial(self._message(ctx, rule, violations),
                                                    grpc.StatusCode.PERMISSION_DENIED),
                          decisions=tuple(v.decision(DENIED, rule, mode) for v in violations))
        flagged = tuple(v.decision(AUDITED if mode == "audit" else DRY_RUN, rule, mode) for v in violations)
        action = DRY_RUN if mode == "dry-run" else APPLIED
        decisions = (*flagged, *(Decision(action, rule, mode, c.setting, c.key, c.raw, change_reason(ctx, c), c, c.by)
                                 for c in changes))
        if mode == "dry-run":
            return Review(changes=(), modify=False, decisions=decisions)
        return Review(changes=tuple(changes), decisions=decisions)

    def _message(self, ctx: CallContext, rule: str, violations: list[Violation]) -> str:
        where = f"policy rule {rule!r}" if rule else "policy"
        details = "; ".join(v.shown if v.shown is not None else f"{v.key}={quote(v.value)}: {v.reason}" if v.key
                            else v.reason for v in violations if v.shown != "")
        return f"criproxy: {ctx.who} denied by {where} ({self.identity}): {details}"

    def _present(self, ctx: CallContext) -> list[tuple[str, str, str]]:
        """(key, setting, value) of the criproxy annotations that bear on this call, by key: a denial lists its
        violations in this order, and the order of the pod's annotations is not the kubelet's to keep (a decoded
        protobuf map's order changes from one process to the next), so the message would not be either."""
        out = []
        for key, value in ctx.pod.annotations.items():
            parsed = setting_of(key, self.lookup.domain)  # None for <domain>/applied and other keys
            if parsed is None:
                continue
            setting, container = parsed
            if ctx.method == RUN_POD_SANDBOX or container is None or container == ctx.container:
                out.append((key, setting, value))
        out.sort()
        return out

    def _violations(self, ctx: CallContext, rule: Rule | None, changes: Sequence[Change]) -> list[Violation]:
        present = self._present(ctx)
        if rule is None:
            ns = ctx.pod.namespace
            foreign = [(c.key, c.setting, c.raw) for c in changes
                       if c.key and setting_of(c.key, self.lookup.domain) is None]
            return [Violation(s, k, v, f"no rule allows criproxy annotations in namespace {ns!r}")
                    for k, s, v in [*present, *foreign]]
        out = []
        for key, setting, value in present:
            allowed = rule.setting(setting)
            if allowed is None:
                out.append(Violation(setting, key, value, f"rule {rule.name!r} does not allow {setting}"))
            elif (why := allowed.refusal(value)) is not None:
                out.append(Violation(setting, key, value, why))
        out += self._foreign(rule, changes)
        out += self._required(ctx, rule)
        out += self._effective(ctx, rule, changes)
        return out

    def _foreign(self, rule: Rule, changes: Sequence[Change]) -> list[Violation]:
        """Changes an interceptor made from keys outside criproxy's domain (the legacy seccomp
        annotations): they need the rule's leave like criproxy's own keys."""
        out = []
        for c in changes:
            if not c.key or setting_of(c.key, self.lookup.domain) is not None:
                continue
            allowed = rule.setting(c.setting)
            if allowed is None:
                out.append(Violation(c.setting, c.key, c.raw, f"rule {rule.name!r} does not allow {c.setting}"))
            elif (why := allowed.refusal(c.raw)) is not None:
                out.append(Violation(c.setting, c.key, c.raw, why))
        return out

    def _required(self, ctx: CallContext, rule: Rule) -> list[Violation]:
        out = []
        for name, setting in rule.settings.items():
            if setting.required and not name.endswith("*") and not self._has(ctx, name):
                key = f"{self.lookup.prefix(name)}/pod"
                why = f"rule {rule.name!r} requires the annotation {key} (or a container-scope one)"
                out.append(Violation(name, key, "", why, shown=why))  # the key it lacks; the value is absent
        return out

    def _has(self, ctx: CallContext, setting: str) -> bool:
        """Whether the call's pod sets `setting`: for the container at hand, or (for the sandbox) for any."""
        if self.lookup.find(ctx.pod.annotations, setting, ctx.container) is not None:
            return True
        return ctx.method == RUN_POD_SANDBOX and bool(self.lookup.container_scoped_keys(ctx.pod.annotations, setting))

    def _effective(self, ctx: CallContext, rule: Rule, changes: Sequence[Change]) -> list[Violation]:
        out = []
        for name in ("runtime-handler", "seccomp-profile"):
            setting = rule.setting(name)
            if setting is None or not setting.effective:
                continue
            if any(c.setting == name and c.key for c in changes):
                continue  # set from an annotation: its value was checked as the annotation's
            value = effective_value(ctx, name, {c.path: c.value for c in changes})
            if value is not None and (why := setting.refusal(value)) is not None:
                out.append(Violation(name, "", value, f"the {name} the runtime would get is not allowed: {why}"))
        return out

    def _drift(self, ctx: CallContext) -> list[Violation]:
        """One violation per criproxy annotation changed since the sandbox was created (value: its value
        now, '' when removed); the denial message says them all once."""
        if ctx.pinned is None:  # a sandbox created without criproxy annotations (or before criproxy)
            return []
        now = {k: v for k, v in ctx.pod.annotations.items()
               if k not in ctx.injected and setting_of(k, self.lookup.domain) is not None}
        if now == dict(ctx.pinned):
            return []
        changed = sorted(set(now) ^ set(ctx.pinned) | {k for k in now if k in ctx.pinned and now[k] != ctx.pinned[k]})
        detail = ", ".join(f"{k}: {_shown(ctx.pinned.get(k))} -> {_shown(now.get(k))}" for k in changed)
        reason = (f"criproxy annotations changed since the pod's sandbox was created ({detail}); recreate the pod "
                  "for them to apply")
        out = []
        for i, key in enumerate(changed):
            parsed = setting_of(key, self.lookup.domain)
            out.append(Violation(parsed[0] if parsed else "", key, now.get(key, ""), reason,
                                 shown=reason if i == 0 else ""))
        return out


def _shown(value: str | None) -> str:
    """An annotation's value in a drift message: quoted, or (absent)."""
    return "(absent)" if value is None else quote(value)


def effective_value(ctx: CallContext, setting: str, changed: Mapping[str, Any]) -> str | None:
    """The value the runtime will get for an effective setting, in annotation form; None when this
    call does not carry it."""
    if setting == "runtime-handler":
        if ctx.method != RUN_POD_SANDBOX:
            return None
        return str(changed.get("runtime_handler", getattr(ctx.request, "runtime_handler", "")))
    if ctx.method not in (RUN_POD_SANDBOX, CREATE_CONTAINER):
        return None
    profile = changed.get(SECCOMP_FIELD) or read_field(ctx.request, SECCOMP_FIELD)
    if not profile:
        return "unconfined"  # no profile at all: the runtime runs the process unconfined
    kind = profile.get("profile_type", "RuntimeDefault")
    return _SECCOMP.get(kind) or f"localhost/{profile.get('localhost_ref', '')}"


def pinned_annotations(annotations: Mapping[str, str], domain: str) -> str:
    """The `<domain>/pinned` value: the pod's criproxy annotations when its sandbox was created."""
    keep = {k: v for k, v in annotations.items() if setting_of(k, domain) is not None}
    return json.dumps(keep, sort_keys=True, separators=(",", ":"))
