"""Policy: who may use which annotation and value. The pipeline asks it once per call, with the
merged changes of every interceptor; it answers which changes stand, or a denial."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from criproxy.adjust import Change, Denial
from criproxy.context import CallContext


@dataclass(frozen=True, slots=True)
class Review:
    changes: tuple[Change, ...]
    denial: Denial | None = None


class Policy(Protocol):
    def review(self, ctx: CallContext, changes: Sequence[Change]) -> Review:
        ...


class AllowAll:
    """Every change an enabled interceptor proposes stands (what runs with no policies file)."""

    def review(self, ctx: CallContext, changes: Sequence[Change]) -> Review:
        return Review(changes=tuple(changes))
