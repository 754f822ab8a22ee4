"""runtime-handler: choose the pod's runtime handler (RunPodSandboxRequest.runtime_handler).

Pod scope only: `runtime-handler.criproxy.io/pod: kata` (or the bare `runtime-handler.criproxy.io`).
The value must be a handler the runtime has: the names in Status.runtime_handlers, or, for
containerd 1.6 which does not send those, the runtimes in its verbose Status config; when
the runtime tells neither, the `known` list of this interceptor's config. Only when none of
these is known does a handler pass unchecked, with a warning. An unknown handler is
INVALID_ARGUMENT naming the known ones, instead of a failure deep inside the runtime.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from criproxy.cri.adjust import NOTHING, Adjustment, Change, Denial
from criproxy.cri.annotations import Lookup
from criproxy.cri.context import RUN_POD_SANDBOX, CallContext
from criproxy.interceptors.base import InvalidAnnotation
from criproxy.interceptors.options import Options

SETTING = "runtime-handler"
_HANDLER = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
ACCEPTED = "expected a runtime handler name (a DNS label: lower-case letters, digits and '-', at most 63)"


def parse_handler(key: str, raw: str) -> str:
    value = raw.strip()
    if not _HANDLER.fullmatch(value):
        raise InvalidAnnotation(key, raw, ACCEPTED)
    return value


@dataclass(frozen=True, slots=True)
class RuntimeHandlerConfig:
    #: Handler for pods that ask for none (neither annotation nor RuntimeClass); '' keeps the runtime's default.
    default: str = ""
    #: Handlers to accept when the runtime does not report its own.
    known: frozenset[str] = frozenset()
    #: Whether an annotation may replace the handler the pod's RuntimeClass chose (normally a denial).
    override_runtime_class: bool = False

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str) -> RuntimeHandlerConfig:
        opts = Options(data, where, ("default", "known", "override-runtime-class"))
        default = opts.string("default", "")
        if default and not _HANDLER.fullmatch(default):
            raise opts.error("default", f"{default!r}: {ACCEPTED}")
        known = opts.string_list("known")
        for name in known:
            if not _HANDLER.fullmatch(name):
                raise opts.error("known", f"{name!r}: {ACCEPTED}")
        return cls(default=default, known=frozenset(known),
                   override_runtime_class=opts.boolean("override-runtime-class", False))


class RuntimeHandlerInterceptor:
    name = SETTING
    events = frozenset({RUN_POD_SANDBOX})

    def __init__(self, config: RuntimeHandlerConfig, lookup: Lookup) -> None:
        self.config = config
        self.lookup = lookup

    def adjust(self, ctx: CallContext) -> Adjustment:
        annotations = ctx.pod.annotations
        misplaced = self.lookup.container_scoped_keys(annotations, SETTING)
        if misplaced:
            raise InvalidAnnotation(misplaced[0], annotations[misplaced[0]],
                                    f"the runtime handler is chosen per pod; use {self.lookup.prefix(SETTING)}/pod")
        requested: str = getattr(ctx.request, "runtime_handler", "")
        found = self.lookup.find(annotations, SETTING, None)
        if found is not None:
            value, key, raw = parse_handler(found.key, found.value), found.key, found.value
        elif self.config.default and not requested:
            value, key, raw = self.config.default, "", ""
        else:
            return NOTHING
        if value == requested:
            return NOTHING
        if requested and key and not self.config.override_runtime_class:
            return Denial(
                f"criproxy: {ctx.who}: annotation {key}={raw!r} asks for runtime handler {value!r}, but the pod's "
                f"RuntimeClass chose {requested!r}; an annotation does not override a RuntimeClass unless "
                f"{SETTING}.override-runtime-class is true", grpc.StatusCode.PERMISSION_DENIED,
                setting=SETTING, key=key, value=raw).as_adjustment()
        known, source = self._known(ctx)
        if known is None:
            return Adjustment(changes=(Change("runtime_handler", value, SETTING, key, raw),), warnings=(
                f"runtime handler {value!r} for {ctx.who} not checked: the runtime does not report its handlers "
                f"and no `known` list is configured for {SETTING}",))
        if value not in known:
            names = ", ".join(sorted(known)) or "(none)"
            accepted = f"the runtime has no handler {value!r}; known handlers: {names} (from {source})"
            if key:
                raise InvalidAnnotation(key, raw, accepted)
            denial = Denial(f"criproxy: {ctx.who}: the configured default runtime handler {value!r} cannot be "
                            f"used: {accepted}", grpc.StatusCode.FAILED_PRECONDITION, setting=SETTING, value=value)
            return denial.as_adjustment()
        return Adjustment(changes=(Change("runtime_handler", value, SETTING, key, raw),))

    def _known(self, ctx: CallContext) -> tuple[frozenset[str] | None, str]:
        if ctx.runtime.handlers is not None:
            return ctx.runtime.handlers, ctx.runtime.handlers_source
        if self.config.known:
            return self.config.known, f"the {SETTING} interceptor's `known` list"
        return None, ""
