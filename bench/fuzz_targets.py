"""Fuzz targets: the invariants that tests/test_fuzz.py (hypothesis, seconds) and bench/fuzz.py (the
long run, 100,000+ inputs per target) check, and the material both build inputs from.

Each `check_*` function takes one input and returns a short outcome label ("Fraction/int",
"cpuset:InvalidAnnotation", "PolicySet", "INVALID_ARGUMENT", ...) when the input ended as documented:
in success, or in the target's documented error type (QuantityError, InvalidAnnotation,
SourceError; through the proxy, one of PROXY_CODES). Anything else raises Broken, naming the input
and what happened.

An exception that matches one of KNOWN_BUGS, by its type and by where it was raised (or, through
the proxy, by its status and details), is returned as the label "known-bug:<id>" instead of
raising: each such bug is pinned by a strict-xfail test in tests/test_fuzz.py or
tests/test_escalation.py, and the fast tests' generators are built not to aim at them, so the
random search stays green (and deterministic) while a known bug stands, and still fails on any
new one. Remove an entry together with its fix: its xfail test then passes and, being strict,
fails until the marker goes too.
"""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from criproxy.api.runtime.v1 import api_pb2
from criproxy.cri.adjust import Adjustment, apply_change
from criproxy.cri.annotations import POD, Found, Lookup
from criproxy.cri.context import (
    CREATE_CONTAINER,
    RUN_POD_SANDBOX,
    UPDATE_CONTAINER_RESOURCES,
    CallContext,
    PodInfo,
    RuntimeFacts,
)
from criproxy.cri.quantity import QuantityError, parse_bytes, parse_quantity
from criproxy.interceptors.base import InvalidAnnotation
from criproxy.interceptors.resources import (
    MAX_CPU_ID,
    ResourcesConfig,
    ResourcesInterceptor,
    cpuset_ids,
    hugepage_size,
    parse_cpu_period,
    parse_cpu_quota,
    parse_cpu_shares,
    parse_cpuset,
    parse_memory,
    parse_oom_score_adj,
)
from criproxy.interceptors.runtime_handler import RuntimeHandlerConfig, RuntimeHandlerInterceptor, parse_handler
from criproxy.interceptors.seccomp import SeccompConfig, SeccompInterceptor, parse_profile
from criproxy.policies.model import PolicySet, check_policy, parse_policy
from criproxy.policies.source import Document, SourceError, load

ROOT = Path(__file__).resolve().parent.parent
REPO_POLICY = ROOT / "policies.yaml"
DOMAIN = "criproxy.io"
Mi, Gi = 1 << 20, 1 << 30


class Broken(AssertionError):
    """An input that ended neither in success nor in the target's documented error."""

    def __init__(self, target: str, data: Any, what: str) -> None:
        shown = repr(data)
        if len(shown) > 600:
            shown = f"{shown[:600]}... ({len(shown)} characters)"
        super().__init__(f"{target}: {what}\n  input: {shown}")
        self.target, self.data, self.what = target, data, what


# ------------------------------------------------------------------------------------------ known bugs


@dataclass(frozen=True)
class KnownBug:
    """A bug the fuzzing found, recognised by exception type and origin, pinned by a strict-xfail test."""

    id: str
    summary: str
    xfail_test: str
    types: tuple[type[BaseException], ...] = ()
    #: Path suffixes: some frame of the traceback must be in one of these files...
    raised_in: tuple[str, ...] = ()
    #: ...and, when given, in this function.
    function: str | None = None
    #: Through the proxy: the status code and a regular expression on the details.
    status: str = ""
    details: str = ""


#: Bugs the fuzzing found and that are not fixed yet (each with a strict-xfail test). Empty: the
#: seven found so far (a YAML tag on an empty value, a malformed kubelet cpuset, a forged deep
#: pinned annotation, non-ASCII digits, legacy seccomp keys past policy, re-encoded plain pods,
#: unbounded quoting) are fixed, and their tests in tests/test_fuzz.py and tests/test_escalation.py
#: now guard against their return.
KNOWN_BUGS: tuple[KnownBug, ...] = ()


def _frames(err: BaseException) -> list[traceback.FrameSummary]:
    return list(traceback.extract_tb(err.__traceback__))


def known_bug(err: BaseException) -> KnownBug | None:
    """The known bug `err` is an instance of, or None."""
    frames = _frames(err)
    for bug in KNOWN_BUGS:
        if not bug.types or not isinstance(err, bug.types):
            continue
        for frame in frames:
            name = frame.filename.replace(os.sep, "/")
            if name.endswith(bug.raised_in) and (bug.function is None or frame.name == bug.function):
                return bug
    return None


def known_proxy_bug(code: str, details: str) -> KnownBug | None:
    return next((b for b in KNOWN_BUGS if b.status == code and re.search(b.details, details)), None)


def unexpected(target: str, data: Any, err: BaseException) -> str:
    """The label of a known bug, else Broken (raised from `err`)."""
    bug = known_bug(err)
    if bug is not None:
        return f"known-bug:{bug.id}"
    where = "".join(traceback.format_exception(err)[-3:]).strip()
    raise Broken(target, data, f"raised {type(err).__name__}: {err}\n{where}") from err


# ------------------------------------------------------------------------------------------ quantity

#: The characters of the quantity grammar (digits, signs, point, suffix letters, exponent).
QUANTITY_ALPHABET = "0123456789+-.eEnumkMGTPEKi "
QUANTITY_SEEDS = ("0", "1", "500m", "1.5", ".5", "5.", "1e3", "1E-3", "1e999", "2Gi", "512Mi", "1Ei", "-1",
                  "+1", "1Ki", "1k", "1K", "1e", "e3", "1.5.5", "1ee3", "Mi", "", " 1", "1 ", "1e+999",
                  "9" * 64, "9" * 65, "0.000000001n", "1e-999")


def check_quantity(text: str) -> str:
    """parse_quantity -> Fraction or QuantityError; parse_bytes -> int >= 0 equal to it, or QuantityError."""
    value: Fraction | None = None
    try:
        value = parse_quantity(text)
        q = "Fraction"
        if not isinstance(value, Fraction):
            raise Broken("quantity", text, f"parse_quantity returned {value!r}, not a Fraction")
    except QuantityError:
        q = "QuantityError"
    except Broken:
        raise
    except Exception as err:
        return unexpected("quantity", text, err)
    try:
        number = parse_bytes(text)
        b = "int"
    except QuantityError:
        b = "QuantityError"
    except Exception as err:
        return unexpected("quantity", text, err)
    if b == "int" and (type(number) is not int or number < 0 or value is None or number != value):
        raise Broken("quantity", text, f"parse_bytes returned {number!r} for parse_quantity's {value!r}")
    return f"{q}/{b}"


# ------------------------------------------------------------------------------------------ annotations

#: Settings the interceptors read, with family members, bad family names and one unknown setting.
SETTINGS = ("runtime-handler", "seccomp-profile", "cpu-quota", "cpu-period", "cpu-shares", "cpuset-cpus",
            "cpuset-mems", "memory-limit", "memory-swap", "oom-score-adj", "hugepages-2mi", "hugepages-1gi",
            "hugepages-64ki", "hugepages-0mi", "hugepages-2Mi", "hugepages-", "hugepages-x", "unified.memory.high",
            "unified.pids.max", "unified.cpu.weight", "unified.", "unknown-setting")
SCOPES = ("", "/pod", "/container.app", "/container.other", "/container.", "/weird", "/pod/extra")
LEGACY_KEYS = ("seccomp.security.alpha.kubernetes.io/pod", "container.seccomp.security.alpha.kubernetes.io/app")
OTHER_KEYS = ("criproxy.io/applied", "criproxy.io/pinned", "kubernetes.io/config.source", "app", "")
LONG_VALUE = "9" * 10_000
#: Values worth trying for every setting: valid ones, boundaries, path tricks, unicode digits and spaces.
VALUES = ("", " ", "0", "1", "-1", "2", "+2", "1000", "999", "1000000", "1000001", "262144", "262145", "-1000",
          "-1001", "1001", "500m", "1.5", "0.001", "1e3", "1e999", "1E-999", "disable", " disable ", "4Mi",
          "4194303", "512Mi", "2Gi", "64Mi", "3Mi", "1Ei", "9Ei", "4611686018427387905", "0-3,8", "3-0", "0-8191",
          "0-8192", "99999-99999", "0,,1", "runc", "kata", "gvisor", "KATA", "-runc", "a" * 64, "runtime/default",
          "docker/default", "unconfined", "localhost/audit.json", "localhost/batch/job.json",
          "localhost/../../etc/passwd", "localhost//etc/passwd", "localhost/escape.json", "localhost/up/outside.json",
          "localhost/dir.json", "localhost/missing.json", "localhost/", "localhost/./audit.json",
          "localhost/audit.json\x00", "max", "max 100000", "100000 100000", "\u0665\u0661\u0662",
          "\uff15\uff11\uff12", "\u2003512Mi\u2003", "1\n2", "x" * 300, LONG_VALUE, "\U0001f600", "\ud7ff",
          "hugepages-2mi", "hugepages-1gi", "hugepages-64ki", "hugepages-9999999gi", "hugepages-0ki")


#: Values each parser accepts (so that random search also reaches the code past the parse).
GOOD_VALUES: dict[str, tuple[str, ...]] = {
    "cpu-quota": ("500m", "1.5", "2", "disable", "0.01", "64"),
    "cpu-period": ("1000", "50000", "1000000", " 100000 "),
    "cpu-shares": ("2", "512", "262144"),
    "cpuset": ("0", "0-1", "0-3,8", "8191", "1"),
    "memory": ("4Mi", "512Mi", "1Gi", "2Gi", "4611686018427387904"),
    "oom-score-adj": ("-1000", "0", "999", "1000"),
    "hugepage-size": ("hugepages-2mi", "hugepages-1gi", "hugepages-64ki"),
    "runtime-handler": ("runc", "kata", "gvisor", "a" * 63),
    "seccomp-profile": ("runtime/default", "docker/default", "unconfined", "localhost/audit.json",
                        "localhost/batch/job.json"),
}
#: The settings of each interceptor, with values worth trying for each.
SETTING_VALUES: dict[str, dict[str, tuple[str, ...]]] = {
    "resources": {
        "cpu-quota": GOOD_VALUES["cpu-quota"], "cpu-period": GOOD_VALUES["cpu-period"],
        "cpu-shares": GOOD_VALUES["cpu-shares"], "cpuset-cpus": GOOD_VALUES["cpuset"],
        "cpuset-mems": GOOD_VALUES["cpuset"], "memory-limit": GOOD_VALUES["memory"],
        "memory-swap": GOOD_VALUES["memory"], "oom-score-adj": GOOD_VALUES["oom-score-adj"],
        "hugepages-2mi": ("2Mi", "64Mi", "3Mi"), "hugepages-1gi": ("1Gi", "0"), "hugepages-2Mi": ("2Mi",),
        "unified.memory.high": ("100000", "max", "2000000"), "unified.pids.max": ("100", "max"),
        "unified.cpu.weight": ("100",)},
    "seccomp": {"seccomp-profile": GOOD_VALUES["seccomp-profile"] + (
        "localhost/../../etc/passwd", "localhost/escape.json", "localhost/up/outside.json", "localhost//etc/passwd")},
    "runtime-handler": {"runtime-handler": GOOD_VALUES["runtime-handler"] + ("Kata", "unknown-handler")},
}


def interceptor_of(variant: str) -> str:
    return next(name for name in SETTING_VALUES if variant.startswith(name))


def annotation_key(setting: str, scope: str) -> str:
    return f"{setting}.{DOMAIN}{scope}"


def make_profile_root(base: Path) -> Path:
    """A seccomp profile root with files, a directory, and symlinks out of it (absolute and '..'); a profile
    file outside it (base/outside.json)."""
    root = base / "seccomp"
    (root / "batch").mkdir(parents=True)
    (base / "outside.json").write_text("{}")
    (root / "audit.json").write_text("{}")
    (root / "batch" / "job.json").write_text("{}")
    (root / "dir.json").mkdir()
    (root / "escape.json").symlink_to("/etc/passwd")
    (root / "up").symlink_to("..")
    return root


def _inside(root: Path, path: str) -> bool:
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    return os.path.commonpath([real_root, real]) == real_root and os.path.isfile(real)


def check_annotation_parser(parser: str, value: str, root: Path, number: int = 100_000) -> str:
    """One annotation parser on `value` -> a value within its documented range, or InvalidAnnotation
    naming the key and the raw value. `number` is the CFS period (cpu-quota) or the minimum (memory)."""
    found = Found(annotation_key(parser, "/pod"), value, POD)
    try:
        result, ok = _PARSE[parser](found, root, number)
    except InvalidAnnotation as err:
        if err.key != found.key or err.raw != value:
            raise Broken(f"parser {parser}", value, f"InvalidAnnotation names {err.key!r}={err.raw!r}") from err
        return f"{parser}:InvalidAnnotation"
    except Exception as err:
        return unexpected(f"parser {parser}", (value, number), err)
    if not ok:
        raise Broken(f"parser {parser}", (value, number), f"returned {result!r}, outside what it documents")
    return f"{parser}:{'None' if result is None else 'value'}"


def _quota(found: Found, root: Path, number: int) -> tuple[Any, bool]:
    quota = parse_cpu_quota(found, number)
    return quota, quota == -1 or (type(quota) is int and 1000 <= quota <= 2**40)


def _integer(fn: Callable[[Found], int], low: int, high: int) -> Callable[[Found, Path, int], tuple[Any, bool]]:
    def parse(found: Found, root: Path, number: int) -> tuple[Any, bool]:
        result = fn(found)
        return result, type(result) is int and low <= result <= high
    return parse


def _cpuset(found: Found, root: Path, number: int) -> tuple[Any, bool]:
    text = parse_cpuset(found)
    ids = cpuset_ids(text)
    return text, bool(ids) and max(ids) <= MAX_CPU_ID


def _memory(found: Found, root: Path, number: int) -> tuple[Any, bool]:
    limit = parse_memory(found, number, "a memory limit")
    return limit, type(limit) is int and number <= limit <= 2**62


def _page(found: Found, root: Path, number: int) -> tuple[Any, bool]:
    page = hugepage_size(found.value)  # no error type: None for what is not a hugepages setting
    return page, page is None or (page[1] > 0 and page[1] % 1024 == 0 and page[0][-2:] in _PAGE_UNITS)


def _handler(found: Found, root: Path, number: int) -> tuple[Any, bool]:
    handler = parse_handler(found.key, found.value)
    return handler, bool(re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", handler))


def _profile(found: Found, root: Path, number: int) -> tuple[Any, bool]:
    profile = parse_profile(found, root)
    if profile.get("profile_type") == "Localhost":  # the security property: a file inside the root, always
        return profile, _inside(root, profile["localhost_ref"])
    return profile, profile.get("profile_type") in ("RuntimeDefault", "Unconfined")


_PAGE_UNITS = ("KB", "MB", "GB", "TB", "PB")
_PARSE: dict[str, Callable[[Found, Path, int], tuple[Any, bool]]] = {
    "cpu-quota": _quota,
    "cpu-period": _integer(parse_cpu_period, 1000, 1_000_000),
    "cpu-shares": _integer(parse_cpu_shares, 2, 262_144),
    "cpuset": _cpuset,
    "memory": _memory,
    "oom-score-adj": _integer(parse_oom_score_adj, -1000, 1000),
    "hugepage-size": _page,
    "runtime-handler": _handler,
    "seccomp-profile": _profile,
}
PARSERS = tuple(_PARSE)


# ------------------------------------------------------------------------------------------ adjust()

#: What a kubelet may send as a container's resources (valid values only: see the kubelet-cpuset bug).
KUBELET_CHOICES: dict[str, tuple[Any, ...]] = {
    "cpu_period": (0, 100_000, 50_000, 1000, 1_000_000),
    "cpu_quota": (0, -1, 200_000, 50_000, 1000),
    "cpu_shares": (0, 2, 1024, 262_144),
    "memory_limit_in_bytes": (0, 4 * Mi, Gi, 2**62),
    "memory_swap_limit_in_bytes": (0, Gi, 2 * Gi, -1),
    "oom_score_adj": (-997, -1000, 0, 500, 1000),
    "cpuset_cpus": ("", "0-1", "0-3,8", "0"),
    "cpuset_mems": ("", "0", "0-1"),
    "hugepage_limits": ({}, {"2MB": 0}, {"2MB": 64 * Mi, "1GB": 0}),
    "unified": ({}, {"memory.high": "1000000"}, {"pids.max": "max"}, {"memory.high": "max"}),
}
INTERCEPTOR_VARIANTS = ("resources", "resources-loose", "seccomp", "seccomp-legacy", "runtime-handler",
                        "runtime-handler-known", "runtime-handler-override")
_EVENTS = {"resources": (CREATE_CONTAINER, UPDATE_CONTAINER_RESOURCES), "seccomp": (RUN_POD_SANDBOX, CREATE_CONTAINER),
           "runtime-handler": (RUN_POD_SANDBOX,)}
#: The events each variant's interceptor subscribes to (AdjustCase.event indexes these).
EVENTS_OF = {v: _EVENTS[interceptor_of(v)] for v in INTERCEPTOR_VARIANTS}
HANDLER_FACTS = (RuntimeFacts(), RuntimeFacts(frozenset({"runc", "kata"}), "the runtime's Status.runtime_handlers"))


def build_interceptors(root: Path) -> dict[str, Any]:
    lookup = Lookup(DOMAIN)
    unified = frozenset({"memory.high", "pids.max"})
    return {
        "resources": ResourcesInterceptor(ResourcesConfig(unified_keys=unified), lookup),
        "resources-loose": ResourcesInterceptor(ResourcesConfig(frozenset({"*"}), unified), lookup),
        "seccomp": SeccompInterceptor(SeccompConfig(root), lookup),
        "seccomp-legacy": SeccompInterceptor(SeccompConfig(root, legacy_annotations=True), lookup),
        "runtime-handler": RuntimeHandlerInterceptor(RuntimeHandlerConfig(), lookup),
        "runtime-handler-known": RuntimeHandlerInterceptor(RuntimeHandlerConfig(known=frozenset({"runc", "kata"})),
                                                           lookup),
        "runtime-handler-override": RuntimeHandlerInterceptor(
            RuntimeHandlerConfig(default="kata", override_runtime_class=True), lookup),
    }


@dataclass
class AdjustCase:
    """One interceptor call: which interceptor, which event, the pod's annotations, the kubelet's request."""

    variant: str
    event: int  # index into EVENTS_OF[the variant's interceptor]
    annotations: dict[str, str]
    container: str = "app"
    kubelet: dict[str, Any] = field(default_factory=dict)
    handler: str = ""  # RunPodSandboxRequest.runtime_handler (what the RuntimeClass chose)
    seccomp: int | None = None  # the kubelet's SecurityProfile.profile_type, None: unset
    facts: int = 0  # index into HANDLER_FACTS


def kubelet_resources(values: Mapping[str, Any]) -> api_pb2.LinuxContainerResources:
    values = dict(values)
    hugepages = values.pop("hugepage_limits", {})
    res = api_pb2.LinuxContainerResources(**values)
    for size, limit in hugepages.items():
        res.hugepage_limits.add(page_size=size, limit=limit)
    return res


def sandbox_config(namespace: str, annotations: Mapping[str, str], name: str = "web") -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig(metadata=api_pb2.PodSandboxMetadata(name=name, uid="uid-1", namespace=namespace),
                                    annotations=dict(annotations))


def build_request(case: AdjustCase, namespace: str = "ns") -> tuple[str, Any]:
    events = EVENTS_OF[case.variant]
    method = events[case.event % len(events)]
    resources = kubelet_resources(case.kubelet)
    if method == RUN_POD_SANDBOX:
        request: Any = api_pb2.RunPodSandboxRequest(config=sandbox_config(namespace, case.annotations),
                                                    runtime_handler=case.handler)
        if case.seccomp is not None:
            request.config.linux.security_context.seccomp.profile_type = case.seccomp
    elif method == CREATE_CONTAINER:
        request = api_pb2.CreateContainerRequest(
            pod_sandbox_id="sb-1", sandbox_config=sandbox_config(namespace, case.annotations),
            config=api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name=case.container)))
        request.config.linux.resources.CopyFrom(resources)
        if case.seccomp is not None:
            request.config.linux.security_context.seccomp.profile_type = case.seccomp
    else:
        request = api_pb2.UpdateContainerResourcesRequest(container_id="c-1", linux=resources)
    return method, request


def check_adjust(interceptors: Mapping[str, Any], case: AdjustCase, root: Path) -> str:
    """interceptor.adjust() -> an Adjustment whose changes apply to the request (and, for resources without
    allow-loosening, only tighten; for seccomp, name a profile inside the root), or InvalidAnnotation."""
    interceptor = interceptors[case.variant]
    method, request = build_request(case)
    container = None if method == RUN_POD_SANDBOX else case.container
    annotations = dict(case.annotations)
    ctx = CallContext(method, PodInfo("ns", "web", "uid-1", {}, annotations), container, request,
                      HANDLER_FACTS[case.facts % len(HANDLER_FACTS)])
    target = f"adjust {case.variant} {method}"
    before = request.SerializeToString()
    try:
        adjustment = interceptor.adjust(ctx)
    except InvalidAnnotation as err:
        if annotations.get(err.key) != err.raw:
            raise Broken(target, case, f"InvalidAnnotation names {err.key!r}={err.raw!r}, not an annotation "
                         "of the pod") from err
        return f"{case.variant}:InvalidAnnotation"
    except Exception as err:
        return unexpected(target, case, err)
    if not isinstance(adjustment, Adjustment):
        raise Broken(target, case, f"returned {adjustment!r}, not an Adjustment")
    if request.SerializeToString() != before:
        raise Broken(target, case, "adjust() changed the request it was given")
    if adjustment.denial is not None:
        return f"{case.variant}:denial:{adjustment.denial.code.name}"
    _check_changes(target, case, method=method, request=request, adjustment=adjustment, root=root)
    return f"{case.variant}:{'changes' if adjustment.changes else 'nothing'}"


def _check_changes(target: str, case: AdjustCase, *, method: str, request: Any, adjustment: Adjustment,
                   root: Path) -> None:
    changed = type(request)()
    changed.CopyFrom(request)
    for change in adjustment.changes:
        try:
            apply_change(changed, change)
        except Exception as err:
            raise Broken(target, case, f"the change {change!r} does not apply: {err!r}") from err
        if change.key and case.annotations.get(change.key) != change.raw:
            raise Broken(target, case, f"the change {change!r} names an annotation the pod does not have")
        value = change.value
        if isinstance(value, Mapping) and value.get("profile_type") == "Localhost" and not _inside(
                root, value.get("localhost_ref", "")):
            raise Broken(target, case, f"seccomp profile outside {root}: {value!r}")
    changed.SerializeToString()
    if case.variant == "resources" and adjustment.changes:
        base = "config.linux.resources" if method == CREATE_CONTAINER else "linux"
        old, new = request, changed
        for part in base.split("."):
            old, new = getattr(old, part), getattr(new, part)
        why = loosened(old, new)
        if why is not None:
            raise Broken(target, case, f"an annotation loosened the kubelet's resources: {why}")


def _ids(cpus: str) -> set[int]:
    """The ids of a CPU list; an empty set for what is not one (the kubelet's values are not checked here)."""
    if not re.fullmatch(r"[0-9]{1,5}(-[0-9]{1,5})?(,[0-9]{1,5}(-[0-9]{1,5})?)*", cpus):
        return set()
    return cpuset_ids(cpus)


def _cpu_ratio(res: Any) -> Fraction | None:
    return Fraction(res.cpu_quota, res.cpu_period or 100_000) if res.cpu_quota > 0 else None


def _unified_limit(value: str) -> float:
    first = value.split(maxsplit=1)[0] if value.strip() else ""
    return float(first) if first.isascii() and first.isdigit() else float("inf")


def loosened(old: Any, new: Any) -> str | None:
    """Why `new` grants more than `old` (the kubelet's LinuxContainerResources), or None: an independent
    statement of 'annotations only tighten' (0 or less means no limit where the CRI says so)."""
    problems = [*_loosened_scalars(old, new), *_loosened_maps(old, new)]
    return "; ".join(problems) or None


def _loosened_scalars(old: Any, new: Any) -> list[str]:
    problems = [f"{name} {getattr(old, name)} -> {getattr(new, name)}"
                for name in ("memory_limit_in_bytes", "memory_swap_limit_in_bytes", "cpu_shares")
                if getattr(old, name) > 0 and not 0 < getattr(new, name) <= getattr(old, name)]
    if new.oom_score_adj < old.oom_score_adj:
        problems.append(f"oom_score_adj {old.oom_score_adj} -> {new.oom_score_adj}")
    problems += [f"{name} {getattr(old, name)!r} -> {getattr(new, name)!r}" for name in ("cpuset_cpus", "cpuset_mems")
                 if getattr(old, name) and getattr(new, name) != getattr(old, name) and not _ids(getattr(new, name))
                 <= _ids(getattr(old, name))]
    ratio_old, ratio_new = _cpu_ratio(old), _cpu_ratio(new)
    if ratio_old is not None and (ratio_new is None or ratio_new > ratio_old):
        problems.append(f"cpu quota/period {old.cpu_quota}/{old.cpu_period} -> {new.cpu_quota}/{new.cpu_period}")
    return problems


def _loosened_maps(old: Any, new: Any) -> list[str]:
    pages = {h.page_size: h.limit for h in old.hugepage_limits}
    problems = [f"hugepage_limits[{h.page_size}] {pages[h.page_size]} -> {h.limit}" for h in new.hugepage_limits
                if h.page_size in pages and h.limit > pages[h.page_size]]
    for key, value in new.unified.items():
        was = old.unified.get(key)
        if was is not None and value != was and not (
                key.endswith((".max", ".high")) and _unified_limit(value) <= _unified_limit(was)):
            problems.append(f"unified[{key}] {was!r} -> {value!r}")
    return problems


# ------------------------------------------------------------------------------------------ policies


class _Bug(Exception):
    """Carries a known bug's label out of a stage."""


def _stage(data: str | bytes, fn: Callable[[], Any]) -> tuple[Any, SourceError | None]:
    """Run one stage of the loader: its result, or the SourceError it raised; anything else is a known bug
    (raised as _Bug) or Broken."""
    try:
        return fn(), None
    except SourceError as err:
        return None, err
    except Exception as err:
        raise _Bug(unexpected("policy", data, err)) from err


def check_policy_text(data: str | bytes, *, with_load: bool = True) -> str:
    """load -> Document or SourceError; parse_policy -> PolicySet or SourceError; check_policy -> a list of
    SourceError, empty exactly when parse_policy succeeds, and holding the error parse_policy raised."""
    try:
        if with_load:
            document, _ = _stage(data, lambda: load(data, "fuzz.yaml"))
            if document is not None and not isinstance(document, Document):
                raise Broken("policy", data, f"load returned {document!r}")
        policies, raised = _stage(data, lambda: parse_policy(data, "fuzz.yaml"))
        problems, _ = _stage(data, lambda: check_policy(data, "fuzz.yaml"))
    except _Bug as bug:
        return str(bug)
    if raised is None and not isinstance(policies, PolicySet):
        raise Broken("policy", data, f"parse_policy returned {policies!r}")
    if not isinstance(problems, list) or not all(isinstance(p, SourceError) for p in problems):
        raise Broken("policy", data, f"check_policy returned {problems!r}")
    if (raised is None) != (not problems):
        raise Broken("policy", data, f"parse_policy {'raised ' + str(raised) if raised else 'succeeded'} but "
                     f"check_policy found {len(problems)} problem(s)")
    if raised is not None and str(raised) not in {str(p) for p in problems}:
        raise Broken("policy", data, f"parse_policy raised {raised} which check_policy does not list")
    return "PolicySet" if raised is None else "SourceError"


def nested(depth: int, kind: str) -> str:
    """A policy document whose `rules` value is nested `depth` levels deep (block-map costs depth**2 bytes)."""
    header = "apiVersion: criproxy.io/v1alpha1\nkind: AnnotationPolicy\nrules:"
    if kind == "flow-list":
        return f"{header} {'[' * depth}{']' * depth}\n"
    if kind == "flow-map":
        return f"{header} {'{a: ' * depth}1{'}' * depth}\n"
    if kind == "block-map":
        return header + "\n" + "".join(f"{'  ' * (i + 1)}a{i}:\n" for i in range(depth)) + "  " * (depth + 1) + "1\n"
    assert kind == "block-list", kind
    return f"{header}\n  {'- ' * depth}1\n"  # compact nested sequences: '- - - 1'


def alias_bomb(width: int, levels: int) -> str:
    """The billion-laughs shape: each level lists the previous one `width` times."""
    lines = ["apiVersion: criproxy.io/v1alpha1", "kind: AnnotationPolicy", "x0: &x0 [lol]"]
    for i in range(1, levels + 1):
        lines.append(f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * width)}]")
    lines.append(f"rules: *x{levels}")
    return "\n".join(lines) + "\n"


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True) or [""]


def _line_op(change: Callable[[list[str], int, int], None]) -> Callable[[str, int, int, str], str]:
    def apply(text: str, a: int, b: int, payload: str) -> str:
        lines = _lines(text)
        change(lines, a % len(lines), b % len(lines))
        return "".join(lines)
    return apply


def _delete(lines: list[str], i: int, j: int) -> None:
    del lines[i]


def _swap(lines: list[str], i: int, j: int) -> None:
    lines[i], lines[j] = lines[j], lines[i]


def _set(lines: list[str], i: int, value: str) -> None:
    lines[i] = value


#: op name -> (text, a, b, payload) -> text; a and b are taken modulo the text's lines or characters.
MUTATIONS: dict[str, Callable[[str, int, int, str], str]] = {
    "delete-line": _line_op(_delete),
    "duplicate-line": _line_op(lambda lines, i, j: lines.insert(i, lines[i])),
    "swap-lines": _line_op(_swap),
    "indent-line": _line_op(lambda lines, i, j: _set(lines, i, "  " + lines[i])),
    "dedent-line": _line_op(lambda lines, i, j: _set(lines, i, lines[i].removeprefix("  "))),
    "replace-char": lambda t, a, b, p: t[: a % (len(t) + 1)] + p + t[a % (len(t) + 1) + 1:],
    "insert": lambda t, a, b, p: t[: a % (len(t) + 1)] + p + t[a % (len(t) + 1):],
    "delete-chars": lambda t, a, b, p: t[: a % (len(t) + 1)] + t[a % (len(t) + 1) + 1 + b % 16:],
}


def mutate(text: str, ops: Sequence[tuple[str, int, int, str]]) -> str:
    """`text` after each (op, a, b, payload) of `ops` in turn (see MUTATIONS)."""
    for op, a, b, payload in ops:
        text = MUTATIONS[op](text, a, b, payload)
    return text


def policy_seeds() -> list[str]:
    """The repository's policies.yaml, as is and without its comment lines."""
    text = REPO_POLICY.read_text()
    bare = "".join(line for line in text.splitlines(keepends=True) if not line.lstrip().startswith("#"))
    return [text, bare]


#: Tokens a YAML-aware mutation inserts (the bench's mutator; the tests draw from the same list).
YAML_TOKENS = ("\n", "\n- ", ": ", "- ", "[", "]", "{", "}", ",", "&a ", "*a", "<<: ", "? ", "|\n", ">\n", "'", '"',
               "#", "\t", "---\n", "...\n", "%YAML 1.1\n", "!x ", "! ", "~", "null", "true", "0x1F", "1e3", "64Gi",
               "*", "enforce", "dry-run", "rules", "settings", "namespaces", "values", "patterns", "(", "\\")
#: The explicit-tag tokens that reach the yaml-explicit-tag bug; only the bench's mutator uses them.
YAML_TAG_TOKENS = ("!!int ", "!!float ", "!!bool ", "!!timestamp ", "!!binary ", "!!str ", "!!null ",
                   "!!python/name:os.system ")


# ------------------------------------------------------------------------------------------ through the proxy

#: What a call to an intercepted method may end with (the documented failures, and OK).
PROXY_CODES = frozenset({"OK", "INVALID_ARGUMENT", "PERMISSION_DENIED", "FAILED_PRECONDITION"})
#: The decoded methods and their request types.
DECODED: dict[str, Any] = {
    RUN_POD_SANDBOX: api_pb2.RunPodSandboxRequest,
    CREATE_CONTAINER: api_pb2.CreateContainerRequest,
    UPDATE_CONTAINER_RESOURCES: api_pb2.UpdateContainerResourcesRequest,
    "RuntimeService/RemoveContainer": api_pb2.RemoveContainerRequest,
    "RuntimeService/RemovePodSandbox": api_pb2.RemovePodSandboxRequest,
}
SANDBOX_ID, CONTAINER_ID = "sb-1", "c-1"
PROXY_CONFIG = """listen: unix://{sockdir}/proxy.sock
runtime-endpoint: unix://{sockdir}/runtime.sock
shutdown-grace-seconds: 0
metrics-address: "off"
seccomp: {{profile-root: {root}}}
runtime-handler: {{known: [runc, kata]}}
resources: {{unified-keys: [memory.high, pids.max]}}
"""


def proxy_config_text(sockdir: Path, root: Path, policies: Path | None = None) -> str:
    text = PROXY_CONFIG.format(sockdir=sockdir, root=root)
    return text + (f"policies: {policies}\n" if policies is not None else "")


def script_fake(fake: Any) -> None:
    """The fake runtime answers RunPodSandbox and CreateContainer with ids, as a runtime does."""
    from tests.support.fakeruntime import Reply

    fake.script(RUN_POD_SANDBOX, Reply(messages=[api_pb2.RunPodSandboxResponse(
        pod_sandbox_id=SANDBOX_ID).SerializeToString()]))
    fake.script(CREATE_CONTAINER, Reply(messages=[api_pb2.CreateContainerResponse(
        container_id=CONTAINER_ID).SerializeToString()]))


def base_requests(namespace: str = "criproxy-demo") -> dict[str, list[bytes]]:
    """Valid encodings, with criproxy annotations, to truncate and flip bits in."""
    annotations = {annotation_key("memory-limit", "/container.app"): "512Mi",
                   annotation_key("cpu-quota", "/pod"): "500m", annotation_key("seccomp-profile", "/pod"):
                   "localhost/audit.json", annotation_key("hugepages-2mi", "/pod"): "2Mi",
                   annotation_key("oom-score-adj", ""): "1000", annotation_key("runtime-handler", "/pod"): "kata",
                   "kubernetes.io/config.source": "api"}
    kubelet = {"cpu_period": 100_000, "cpu_quota": 200_000, "cpu_shares": 1024, "memory_limit_in_bytes": Gi,
               "memory_swap_limit_in_bytes": Gi, "oom_score_adj": 500, "hugepage_limits": {"2MB": 64 * Mi}}
    run = api_pb2.RunPodSandboxRequest(config=sandbox_config(namespace, annotations))
    run.config.linux.security_context.seccomp.profile_type = api_pb2.SecurityProfile.RuntimeDefault
    create = api_pb2.CreateContainerRequest(
        pod_sandbox_id=SANDBOX_ID, sandbox_config=sandbox_config(namespace, annotations),
        config=api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name="app")))
    create.config.linux.resources.CopyFrom(kubelet_resources(kubelet))
    update = api_pb2.UpdateContainerResourcesRequest(container_id=CONTAINER_ID, linux=kubelet_resources(kubelet))
    plain = api_pb2.RunPodSandboxRequest(config=sandbox_config(namespace, {"app": "x"}))
    return {RUN_POD_SANDBOX: [run.SerializeToString(), plain.SerializeToString()],
            CREATE_CONTAINER: [create.SerializeToString()],
            UPDATE_CONTAINER_RESOURCES: [update.SerializeToString()]}


def annotated_request(key: str, annotations: Mapping[str, str], namespace: str = "criproxy-demo",
                      kubelet: Mapping[str, Any] | None = None) -> bytes:
    """A valid request of method `key` whose pod carries `annotations`."""
    resources = kubelet_resources(kubelet or {"cpu_period": 100_000, "cpu_quota": 200_000,
                                              "memory_limit_in_bytes": Gi, "oom_score_adj": 500})
    if key == RUN_POD_SANDBOX:
        return api_pb2.RunPodSandboxRequest(config=sandbox_config(namespace, annotations)).SerializeToString()
    if key == CREATE_CONTAINER:
        request = api_pb2.CreateContainerRequest(
            pod_sandbox_id=SANDBOX_ID, sandbox_config=sandbox_config(namespace, annotations),
            config=api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name="app")))
        request.config.linux.resources.CopyFrom(resources)
        return request.SerializeToString()
    # UpdateContainerResources carries no annotations: they come from the indexed pod of CONTAINER_ID.
    return api_pb2.UpdateContainerResourcesRequest(container_id=CONTAINER_ID, linux=resources,
                                                   annotations=dict(annotations)).SerializeToString()


def truncate(data: bytes, at: int) -> bytes:
    return data[: at % (len(data) + 1)]


def flip_bits(data: bytes, positions: Sequence[int]) -> bytes:
    out = bytearray(data)
    for position in positions:
        if out:
            bit = position % (len(out) * 8)
            out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


class ProxyHarness:
    """Sends raw bytes to the proxy and checks what the fake runtime received for each call."""

    def __init__(self, target: str, journal: list[Any]) -> None:
        import grpc

        self.grpc = grpc
        # The kubelet is a Go program: its metadata limit is 16 MiB, not C-core's 8 KiB (see
        # tests/test_fuzz.py::test_bug_long_annotation_values_make_the_status_unreadable).
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_metadata_size", 16 << 20),
                                                              ("grpc.absolute_max_metadata_size", 16 << 20)])
        self.journal = journal

    def close(self) -> None:
        self.channel.close()

    def call(self, key: str, payload: bytes, api: str = "v1") -> str:
        """One call -> its status code name, checked: one of PROXY_CODES; a failed call reached the runtime
        not at all, an OK one exactly once and decodable (the proxy never forwards what it could not check)."""
        grpc = self.grpc
        path = f"/runtime.{api}.{key}"
        start = len(self.journal)
        try:
            self.channel.unary_unary(path)(payload, timeout=30)
            code, details = "OK", ""
        except grpc.RpcError as err:
            code, details = err.code().name, err.details() or ""
        received = [r for r in self.journal[start:] if r.path.endswith("." + key)]
        data = (path, payload)
        if code not in PROXY_CODES:
            bug = known_proxy_bug(code, details)
            if bug is None:
                raise Broken("proxy", data, f"ended {code}: {details}")
            code = f"known-bug:{bug.id}"
        if code != "OK" and received:
            raise Broken("proxy", data, f"the call failed ({code}: {details}) yet the runtime received it")
        if code == "OK":
            if len(received) != 1:
                raise Broken("proxy", data, f"OK, but the runtime received the call {len(received)} times")
            request_type = DECODED.get(key)
            if request_type is not None:
                try:
                    request_type.FromString(received[0].request)
                except Exception as err:
                    raise Broken("proxy", data, f"the runtime received an undecodable request: {err!r}") from err
        return code

    def version_answers(self) -> bool:
        from criproxy.api.runtime.v1 import api_pb2 as pb

        answer = self.channel.unary_unary("/runtime.v1.RuntimeService/Version")(
            pb.VersionRequest().SerializeToString(), timeout=10)
        return pb.VersionResponse.FromString(answer).runtime_name == "fake-runtime"
