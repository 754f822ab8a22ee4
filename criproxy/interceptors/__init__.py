"""The built-in interceptors, by the names the config file's `interceptors:` list uses.

Two steps, so that a config stays plain data: `read_interceptors` checks the config file's
`interceptors:` list and sections and returns what it chose as `InterceptorSpec`s (a name and its
settings, immutable values); `build` makes the Interceptor objects from those, wherever they run
(the server's pipeline, `criproxy explain`, `criproxy replay`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from criproxy.cri.annotations import Lookup
from criproxy.cri.context import EVENTS
from criproxy.errors import ConfigError
from criproxy.interceptors.base import Interceptor, InvalidAnnotation
from criproxy.interceptors.resources import ResourcesConfig, ResourcesInterceptor
from criproxy.interceptors.runtime_handler import RuntimeHandlerConfig, RuntimeHandlerInterceptor
from criproxy.interceptors.seccomp import SeccompConfig, SeccompInterceptor

__all__ = ["BUILTIN", "DEFAULT_ORDER", "Interceptor", "InterceptorSpec", "InvalidAnnotation", "Settings", "build",
           "build_interceptors", "read_interceptors"]

#: An interceptor's settings, as read from its config section (frozen dataclasses: values, not objects).
Settings = RuntimeHandlerConfig | SeccompConfig | ResourcesConfig


@dataclass(frozen=True, slots=True)
class Builtin:
    """One built-in interceptor: how its config section is read, and how it is made from what was read."""

    #: The section (None when the file has none) and how messages name it, to its settings; ConfigError if bad.
    parse: Callable[[Any, str], Settings]
    #: The settings and the annotation lookup, to the interceptor.
    make: Callable[[Any, Lookup], Interceptor]


BUILTIN: dict[str, Builtin] = {
    "runtime-handler": Builtin(RuntimeHandlerConfig.from_mapping, RuntimeHandlerInterceptor),
    "seccomp": Builtin(SeccompConfig.from_mapping, SeccompInterceptor),
    "resources": Builtin(ResourcesConfig.from_mapping, ResourcesInterceptor),
}
#: What runs when the config names no interceptors.
DEFAULT_ORDER = ("runtime-handler", "seccomp", "resources")


@dataclass(frozen=True, slots=True)
class InterceptorSpec:
    """One interceptor to run: its name (a BUILTIN key) and its checked settings."""

    name: str
    settings: Settings


def check_interceptor(interceptor: Interceptor) -> None:
    """An interceptor must subscribe to at least one event, and only to events the pipeline has."""
    events = getattr(interceptor, "events", None)
    if not events:
        raise ConfigError(f"interceptor {interceptor.name!r} subscribes to no CRI event")
    unknown = sorted(set(events) - EVENTS)
    if unknown:
        raise ConfigError(f"interceptor {interceptor.name!r} subscribes to {', '.join(unknown)}, which the pipeline "
                          f"does not intercept (supported: {', '.join(sorted(EVENTS))})")


def read_interceptors(names: Sequence[str] | None, sections: Mapping[str, Any],
                      where: str) -> tuple[InterceptorSpec, ...]:
    """The interceptors `names` lists, in that order, each with the settings of its section of the file."""
    chosen = list(DEFAULT_ORDER if names is None else names)
    unknown = [n for n in chosen if n not in BUILTIN]
    if unknown:
        raise ConfigError(f"{where}: interceptors: unknown interceptor(s) {', '.join(map(repr, unknown))}; "
                          f"known: {', '.join(BUILTIN)}")
    twice = sorted({n for n in chosen if chosen.count(n) > 1})
    if twice:
        raise ConfigError(f"{where}: interceptors: {', '.join(twice)} listed more than once")
    # Every section is checked, enabled or not, so a typo in a disabled one is not a surprise later.
    settings = {name: kind.parse(sections.get(name), f"{where}: {name}") for name, kind in BUILTIN.items()}
    return tuple(InterceptorSpec(name, settings[name]) for name in chosen)


def build(specs: Iterable[InterceptorSpec], lookup: Lookup) -> tuple[Interceptor, ...]:
    """New interceptor objects for `specs`, in order, reading annotations through `lookup`."""
    result = tuple(BUILTIN[spec.name].make(spec.settings, lookup) for spec in specs)
    for interceptor in result:
        check_interceptor(interceptor)
    return result


def build_interceptors(names: Sequence[str] | None, sections: Mapping[str, Any], lookup: Lookup,
                       where: str) -> tuple[Interceptor, ...]:
    """`read_interceptors` then `build`: the interceptors of a config file's list and sections, at once."""
    return build(read_interceptors(names, sections, where), lookup)
