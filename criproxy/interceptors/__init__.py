"""The built-in interceptors, by the names the config file's `interceptors:` list uses."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from criproxy.cri.annotations import Lookup
from criproxy.cri.context import EVENTS
from criproxy.errors import ConfigError
from criproxy.interceptors.base import Interceptor, InvalidAnnotation
from criproxy.interceptors.resources import ResourcesConfig, ResourcesInterceptor
from criproxy.interceptors.runtime_handler import RuntimeHandlerConfig, RuntimeHandlerInterceptor
from criproxy.interceptors.seccomp import SeccompConfig, SeccompInterceptor

__all__ = ["BUILTIN", "DEFAULT_ORDER", "Interceptor", "InvalidAnnotation", "build_interceptors"]

Factory = Callable[[Any, str, Lookup], Interceptor]

BUILTIN: dict[str, Factory] = {
    "runtime-handler": lambda data, where, lookup: RuntimeHandlerInterceptor(
        RuntimeHandlerConfig.from_mapping(data, where), lookup),
    "seccomp": lambda data, where, lookup: SeccompInterceptor(SeccompConfig.from_mapping(data, where), lookup),
    "resources": lambda data, where, lookup: ResourcesInterceptor(ResourcesConfig.from_mapping(data, where), lookup),
}
#: What runs when the config names no interceptors.
DEFAULT_ORDER = ("runtime-handler", "seccomp", "resources")


def check_interceptor(interceptor: Interceptor) -> None:
    """An interceptor must subscribe to at least one event, and only to events the pipeline has."""
    events = getattr(interceptor, "events", None)
    if not events:
        raise ConfigError(f"interceptor {interceptor.name!r} subscribes to no CRI event")
    unknown = sorted(set(events) - EVENTS)
    if unknown:
        raise ConfigError(f"interceptor {interceptor.name!r} subscribes to {', '.join(unknown)}, which the pipeline "
                          f"does not intercept (supported: {', '.join(sorted(EVENTS))})")


def build_interceptors(names: Sequence[str] | None, sections: Mapping[str, Any], lookup: Lookup,
                       where: str) -> tuple[Interceptor, ...]:
    """The interceptors `names` lists, in that order, each configured from its section of the file."""
    chosen = list(DEFAULT_ORDER if names is None else names)
    unknown = [n for n in chosen if n not in BUILTIN]
    if unknown:
        raise ConfigError(f"{where}: interceptors: unknown interceptor(s) {', '.join(map(repr, unknown))}; "
                          f"known: {', '.join(BUILTIN)}")
    twice = sorted({n for n in chosen if chosen.count(n) > 1})
    if twice:
        raise ConfigError(f"{where}: interceptors: {', '.join(twice)} listed more than once")
    # Every section is checked, enabled or not, so a typo in a disabled one is not a surprise later.
    built = {name: factory(sections.get(name), f"{where}: {name}", lookup) for name, factory in BUILTIN.items()}
    result = tuple(built[name] for name in chosen)
    for interceptor in result:
        check_interceptor(interceptor)
    return result
