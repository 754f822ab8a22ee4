"""The one annotation lookup every interceptor uses, and Kubernetes annotation-key rules.

A setting `S` in domain `D` (default criproxy.io) is read from these keys, first match wins:

    S.D/container.<container name>   the named container only        (container scope)
    S.D/pod                          every container of the pod      (pod scope)
    S.D                              same as pod scope, shorter form

For a pod-level decision (RunPodSandbox) only the last two apply. This is the precedence
containerd's NRI plugins use. Each key is a valid Kubernetes annotation key: the part
before the slash (`S.D`) is a DNS subdomain, so setting names are lower case
(`hugepages-2mi`, not `hugepages-2Mi`), and the part after it is at most 63 characters, so
a container-scope key exists only for container names of at most 53 characters.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_DOMAIN = "criproxy.io"
#: Longest part of a value quoted in an error: the status travels in gRPC trailers, which many
#: clients cap at 8-16 KiB (a longer one would turn INVALID_ARGUMENT into RESOURCE_EXHAUSTED).
QUOTE_LIMIT = 200


def quote(value: object) -> str:
    """repr() of a value for a message, cut to QUOTE_LIMIT characters."""
    text = repr(value)
    return text if len(text) <= QUOTE_LIMIT else f"{text[:QUOTE_LIMIT]}...({len(text)} characters)"
POD, CONTAINER = "pod", "container"

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
MAX_PREFIX, MAX_NAME = 253, 63


def annotation_key_problem(key: str) -> str | None:
    """Why `key` is not a valid Kubernetes annotation key, or None when it is."""
    prefix, slash, name = key.rpartition("/")
    problems = [
        (bool(slash) and not prefix, "the prefix before '/' is empty"),
        (len(prefix) > MAX_PREFIX, f"the prefix is longer than {MAX_PREFIX} characters"),
        (bool(prefix) and not _DNS_SUBDOMAIN.fullmatch(prefix),
         f"the prefix {prefix!r} is not a DNS subdomain (lower-case letters, digits, '-' and '.')"),
        (not name, "the name is empty"),
        (len(name) > MAX_NAME, f"the name {name!r} is longer than {MAX_NAME} characters"),
        (bool(name) and not _NAME.fullmatch(name),
         f"the name {name!r} must be letters, digits, '-', '_' or '.', starting and ending alphanumeric"),
    ]
    return next((why for failed, why in problems if failed), None)


@dataclass(frozen=True, slots=True)
class Found:
    """An annotation that answered a lookup."""

    key: str
    value: str
    scope: str  # POD or CONTAINER


@dataclass(frozen=True, slots=True)
class Lookup:
    """Annotation keys for one domain."""

    domain: str = DEFAULT_DOMAIN

    def prefix(self, setting: str) -> str:
        return f"{setting}.{self.domain}"

    def keys(self, setting: str, container: str | None) -> list[tuple[str, str]]:
        """(key, scope) in precedence order; `container` None asks for the pod-level decision."""
        prefix = self.prefix(setting)
        keys = [(f"{prefix}/container.{container}", CONTAINER)] if container else []
        return [*keys, (f"{prefix}/pod", POD), (prefix, POD)]

    def find(self, annotations: Mapping[str, str], setting: str, container: str | None) -> Found | None:
        for key, scope in self.keys(setting, container):
            value = annotations.get(key)
            if value is not None:
                return Found(key, value, scope)
        return None

    def container_scoped_keys(self, annotations: Mapping[str, str], setting: str) -> list[str]:
        """Keys that address `setting` to some container (to refuse them for pod-only settings)."""
        start = f"{self.prefix(setting)}/container."
        return sorted(k for k in annotations if k.startswith(start))



#: Every setting criproxy's interceptors read, with how policy compares its values:
#: 'cpus', 'bytes' and 'integer' values are quantities (min/max apply); the rest are strings.
SETTING_KINDS: dict[str, str] = {
    "runtime-handler": "string",
    "seccomp-profile": "string",
    "cpu-quota": "cpus",
    "cpu-period": "integer",
    "cpu-shares": "integer",
    "cpuset-cpus": "string",
    "cpuset-mems": "string",
    "memory-limit": "bytes",
    "memory-swap": "bytes",
    "oom-score-adj": "integer",
}
#: Families of settings named by a prefix: hugepages-<size> (bytes) and unified.<cgroup key> (strings).
SETTING_FAMILIES: dict[str, str] = {"hugepages-": "bytes", "unified.": "string"}
#: Settings whose effective value (whoever set it: an annotation or the kubelet) policy can check.
EFFECTIVE_SETTINGS = ("runtime-handler", "seccomp-profile")


def setting_kind(setting: str) -> str | None:
    """How policy compares values of `setting`; None when criproxy has no such setting."""
    kind = SETTING_KINDS.get(setting)
    if kind is not None:
        return kind
    return next((k for prefix, k in SETTING_FAMILIES.items() if setting.startswith(prefix) and
                 len(setting) > len(prefix)), None)


_READ_BY = {"runtime-handler": "runtime-handler", "seccomp-profile": "seccomp"}


def interceptor_of(setting: str) -> str:
    """The built-in interceptor that reads `setting` ('policy' for a setting criproxy does not have)."""
    if setting_kind(setting) is None:
        return "policy"
    return _READ_BY.get(setting, "resources")


def setting_of(key: str, domain: str) -> tuple[str, str | None] | None:
    """(setting, container name or None for pod scope) for a key of `domain`; None for other keys."""
    prefix, slash, name = key.partition("/")
    suffix = "." + domain
    if not prefix.endswith(suffix):
        return None
    setting = prefix[: -len(suffix)]
    if not slash or name == "pod":
        return setting, None
    if name.startswith("container.") and len(name) > len("container."):
        return setting, name[len("container."):]
    return setting, ""  # a key of the domain with an unknown scope: '' names no container
