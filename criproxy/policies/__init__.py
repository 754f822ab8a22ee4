"""Policy: who may use which annotation and value. The pipeline asks it for defaults before the
interceptors run, and once per call to review the merged changes of every interceptor; it answers
which changes stand, or a denial, and records each decision."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from criproxy.cri.adjust import Change, Denial
from criproxy.cri.context import CallContext
from criproxy.policies.model import FailurePolicy

APPLIED, DENIED, AUDITED, DRY_RUN, FAILED_OPEN = "applied", "denied", "audited", "dry-run", "failed-open"


@dataclass(frozen=True, slots=True)
class Decision:
    """One thing decided about a call, for logs, metrics, traces and the decision log.

    Every decision names the rule and mode that judged the call and the interceptor it concerns (the
    one that proposed the change or refused the annotation, else the one that reads the setting;
    'policy' for a setting no interceptor has). `key` and `value` name the annotation, except where no
    annotation is involved: a change from criproxy's configuration, a value the kubelet set (an
    effective check), an interceptor that failed."""

    action: str  # applied | denied | audited | dry-run | failed-open
    rule: str  # the rule's name; '' only when no rule matched (or there is no policy file)
    mode: str  # enforce | audit | dry-run, or allow-all without a policy file
    setting: str = ""  # '' for a failed interceptor: it concerns no one setting
    key: str = ""
    value: str = ""
    reason: str = ""
    change: Change | None = None
    interceptor: str = ""


@dataclass(frozen=True, slots=True)
class Review:
    changes: tuple[Change, ...]
    denial: Denial | None = None
    decisions: tuple[Decision, ...] = ()
    #: False in dry-run: the request must reach the runtime exactly as the kubelet sent it.
    modify: bool = True


class Policy(Protocol):
    #: What is in force, for logs and metrics: 'allow-all' or '<file>@<digest>'.
    identity: str

    def rule_of(self, ctx: CallContext) -> tuple[str, str]:
        """(rule name, mode) judging this call: '' for no rule; the mode is enforce, audit, dry-run, or
        allow-all (which interceptors' own refusals fail like enforce)."""
        ...

    def defaults(self, ctx: CallContext) -> Mapping[str, str]:
        """Annotations to add to the pod for this call (the pod's own win)."""
        ...

    def review(self, ctx: CallContext, changes: Sequence[Change]) -> Review:
        ...

    def failure(self, interceptor: str) -> FailurePolicy:
        """What to do when `interceptor` fails or overruns its deadline."""
        ...


def change_reason(ctx: CallContext, change: Change) -> str:
    """Where a change's value comes from, for its decision."""
    if change.key in ctx.injected:
        why = "default of the rule"
    else:
        why = "from the pod's annotation" if change.key else "from criproxy's configuration"
    return f"{why}; {change.note}" if change.note else why


class AllowAll:
    """Every change an enabled interceptor proposes stands (what runs with no policies file)."""

    identity = "allow-all"

    def rule_of(self, ctx: CallContext) -> tuple[str, str]:
        return "", "allow-all"

    def defaults(self, ctx: CallContext) -> Mapping[str, str]:
        return {}

    def review(self, ctx: CallContext, changes: Sequence[Change]) -> Review:
        return Review(changes=tuple(changes), decisions=tuple(
            Decision(APPLIED, "", "allow-all", c.setting, c.key, c.raw, change_reason(ctx, c), c, c.by)
            for c in changes))

    def failure(self, interceptor: str) -> FailurePolicy:
        return FailurePolicy()
