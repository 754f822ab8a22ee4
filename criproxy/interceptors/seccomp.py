"""seccomp-profile: set the seccomp profile of a pod's sandbox or of a container.

Values: `runtime/default`, `unconfined`, `localhost/<path>` where <path> is relative to
the profile root (default /var/lib/kubelet/seccomp, the kubelet's own) and must name an
existing file inside it. Pod scope sets the sandbox's profile (RunPodSandbox) and the default
of every container; container scope sets one container's.

With `legacy-annotations: true` the annotations the kubelet stopped translating in 1.27 are
honoured too: `container.seccomp.security.alpha.kubernetes.io/<name>` (after criproxy's
container key) and `seccomp.security.alpha.kubernetes.io/pod` (after criproxy's pod keys),
including their old value `docker/default`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from criproxy.cri.adjust import NOTHING, Adjustment, Change, read_field
from criproxy.cri.annotations import CONTAINER, POD, Found, Lookup
from criproxy.cri.context import CREATE_CONTAINER, RUN_POD_SANDBOX, CallContext
from criproxy.interceptors.base import InvalidAnnotation
from criproxy.interceptors.options import Options

SETTING = "seccomp-profile"
FIELD = "config.linux.security_context.seccomp"
LEGACY_POD = "seccomp.security.alpha.kubernetes.io/pod"
LEGACY_CONTAINER = "container.seccomp.security.alpha.kubernetes.io/"
DEFAULT_ROOT = "/var/lib/kubelet/seccomp"


@dataclass(frozen=True, slots=True)
class SeccompConfig:
    profile_root: Path = Path(DEFAULT_ROOT)
    legacy_annotations: bool = False

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str) -> SeccompConfig:
        opts = Options(data, where, ("profile-root", "legacy-annotations"))
        root = opts.string("profile-root", DEFAULT_ROOT)
        if not os.path.isabs(root):
            raise opts.error("profile-root", f"{root!r} must be an absolute path")
        return cls(profile_root=Path(root), legacy_annotations=opts.boolean("legacy-annotations", False))


def parse_profile(found: Found, root: Path) -> dict[str, str]:
    """The SecurityProfile (as a dict) an annotation value names; InvalidAnnotation when it names none."""
    value = found.value.strip()
    if value in ("runtime/default", "docker/default"):
        return {"profile_type": "RuntimeDefault"}
    if value == "unconfined":
        return {"profile_type": "Unconfined"}
    if value.startswith("localhost/"):
        return {"profile_type": "Localhost", "localhost_ref": str(localhost_profile(found, value[10:], root))}
    raise InvalidAnnotation(found.key, found.value, "expected runtime/default, unconfined or localhost/<path>")


def localhost_profile(found: Found, relative: str, root: Path) -> Path:
    """`relative` resolved inside `root`: no absolute paths, no '..', no symlink out, an existing file."""
    where = f"a profile file relative to {root}"
    if not relative or relative.startswith("/") or "\x00" in relative:
        raise InvalidAnnotation(found.key, found.value, f"localhost/ must be followed by {where}")
    if ".." in Path(relative).parts:
        raise InvalidAnnotation(found.key, found.value, f"'..' is not allowed; expected {where}")
    path = root / relative
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise InvalidAnnotation(found.key, found.value, f"the profile resolves outside {root}")
    if not os.path.isfile(real):
        raise InvalidAnnotation(found.key, found.value, f"no profile file {path} on this node")
    return path


class SeccompInterceptor:
    name = "seccomp"
    events = frozenset({RUN_POD_SANDBOX, CREATE_CONTAINER})

    def __init__(self, config: SeccompConfig, lookup: Lookup) -> None:
        self.config = config
        self.lookup = lookup

    def find(self, annotations: Mapping[str, str], container: str | None) -> Found | None:
        """criproxy's keys and (when enabled) the legacy ones, container scope before pod scope."""
        keys = self.lookup.keys(SETTING, container)
        if self.config.legacy_annotations:
            legacy = [(LEGACY_CONTAINER + container, CONTAINER)] if container else []
            split = 1 if container else 0
            keys = [*keys[:split], *legacy, *keys[split:], (LEGACY_POD, POD)]
        for key, scope in keys:
            value = annotations.get(key)
            if value is not None:
                return Found(key, value, scope)
        return None

    def adjust(self, ctx: CallContext) -> Adjustment:
        found = self.find(ctx.pod.annotations, ctx.container)
        if found is None:
            return NOTHING
        try:
            profile = parse_profile(found, self.config.profile_root)
        except InvalidAnnotation as err:
            err.setting = SETTING  # a legacy key does not name the setting itself
            raise
        current = read_field(ctx.request, FIELD)
        if current is not None and current == {"localhost_ref": "", **profile}:
            return NOTHING  # the kubelet already asked for exactly this profile
        return Adjustment(changes=(Change(FIELD, profile, SETTING, found.key, found.value),))
