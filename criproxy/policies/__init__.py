"""Policy: who may use which annotation and value. The pipeline asks it for defaults before the
interceptors run, and once per call to review the merged changes of every interceptor; it answers
which changes stand, or a denial, and records each decision."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from criproxy.adjust import Change, Denial
from criproxy.context import CallContext
from criproxy.policies.model import FailurePolicy

APPLIED, DENIED, AUDITED, DRY_RUN, FAILED_OPEN = "applied", "denied", "audited", "dry-run", "failed-open"


@dataclass(frozen=True, slots=True)
class Decision:
    """One thing policy decided about a call, for logs, metrics and the decision log."""

    action: str  # applied | denied | audited | dry-run | failed-open
    rule: str  # the rule's name; '' when no rule matched
    mode: str
    setting: str = ""
    key: str = ""
    value: str = ""
    reason: str = ""
    change: Change | None = None


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

    def defaults(self, ctx: CallContext) -> Mapping[str, str]:
        """Annotations to add to the pod for this call (the pod's own win)."""
        ...

    def review(self, ctx: CallContext, changes: Sequence[Change]) -> Review:
        ...

    def failure(self, interceptor: str) -> FailurePolicy:
        """What to do when `interceptor` fails or overruns its deadline."""
        ...


class AllowAll:
    """Every change an enabled interceptor proposes stands (what runs with no policies file)."""

    identity = "allow-all"

    def defaults(self, ctx: CallContext) -> Mapping[str, str]:
        return {}

    def review(self, ctx: CallContext, changes: Sequence[Change]) -> Review:
        return Review(changes=tuple(changes), decisions=tuple(
            Decision(APPLIED, "", "allow-all", c.setting, c.key, c.raw, change=c) for c in changes))

    def failure(self, interceptor: str) -> FailurePolicy:
        return FailurePolicy()
