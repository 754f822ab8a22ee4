"""The interceptor interface and the error an annotation parser raises."""

from __future__ import annotations

from typing import Protocol

from criproxy.cri.adjust import Adjustment
from criproxy.cri.annotations import quote
from criproxy.cri.context import CallContext


class InvalidAnnotation(ValueError):
    """An annotation value an interceptor cannot use. The pipeline turns it into INVALID_ARGUMENT,
    naming the pod, the key, the raw value and what is accepted."""

    def __init__(self, key: str, raw: str, accepted: str, *, setting: str = "") -> None:
        super().__init__(f"annotation {key}={quote(raw)}: {accepted}")
        self.key, self.raw, self.accepted = key, raw, accepted
        #: The setting the key stands for, when the key alone does not tell (keys outside criproxy's domain,
        #: e.g. the legacy seccomp annotations); '' means: read it from the key.
        self.setting = setting


class Interceptor(Protocol):
    """Reads a call's annotations and returns the adjustment it wants; pure and stateless per call."""

    #: The name used in the config file's `interceptors:` list and in provenance.
    name: str
    #: The CRI events (criproxy.cri.context.EVENTS) this interceptor wants to see.
    events: frozenset[str]

    def adjust(self, ctx: CallContext) -> Adjustment:
        ...
