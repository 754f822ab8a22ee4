"""resources: CPU, memory, hugepage, OOM and cgroup v2 settings of a container, from annotations.

Applied on CreateContainer and again on every UpdateContainerResources (the kubelet's in-place
resize and CPU manager send those), so a kubelet update does not silently undo an annotation;
the update itself is still forwarded. Settings, all container- or pod-scoped:

| setting | value | CRI field (LinuxContainerResources) |
| --- | --- | --- |
| cpu-quota | CPUs as a quantity (`500m`, `2`), or `disable` | cpu_quota = CPUs x period (µs); disable = -1 |
| cpu-period | microseconds, 1000 to 1000000 | cpu_period |
| cpu-shares | 2 to 262144 | cpu_shares |
| cpuset-cpus / cpuset-mems | list syntax, e.g. `0-3,8` | cpuset_cpus / cpuset_mems |
| memory-limit | bytes as a quantity (`512Mi`), at least 4Mi | memory_limit_in_bytes (and swap, see below) |
| memory-swap | bytes (memory plus swap), at least the memory limit | memory_swap_limit_in_bytes |
| hugepages-<size> | bytes, a multiple of the page size; size lower case (`hugepages-2mi`) | hugepage_limits[<size>] |
| oom-score-adj | -1000 to 1000 | oom_score_adj |
| unified.<key> | the cgroup v2 file's value; key from `unified-keys` | unified[<key>] |

Where the kubelet allowed no swap (memory_swap_limit_in_bytes equal to the memory limit), a
memory-limit annotation moves the swap limit with it, so lowering memory does not grant swap.

By default an annotation may only tighten what the kubelet computed: lower a limit, narrow a
cpuset, raise oom_score_adj. `allow-loosening` lists the settings that may also loosen. On
CreateContainer a loosening annotation is a denial; on UpdateContainerResources the tighter of
the kubelet's new value and the annotation's wins (the kubelet may shrink a container below its
annotation), and a setting where the kubelet's value stood is a change to that same value whose
note says so (for the decision and the provenance stamp).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import grpc

from criproxy.cri.adjust import NOTHING, Adjustment, Change, Denial, message_at, read_field
from criproxy.cri.annotations import Found, Lookup, quote
from criproxy.cri.context import CREATE_CONTAINER, UPDATE_CONTAINER_RESOURCES, CallContext
from criproxy.cri.quantity import QuantityError, parse_bytes, parse_quantity
from criproxy.interceptors.base import InvalidAnnotation
from criproxy.interceptors.options import Options

BASES = {CREATE_CONTAINER: "config.linux.resources.", UPDATE_CONTAINER_RESOURCES: "linux."}
DEFAULT_PERIOD_US = 100_000
MIN_MEMORY = 4 * 2**20
MAX_CPU_ID = 8191
_CPULIST = re.compile(r"[0-9]{1,5}(-[0-9]{1,5})?(,[0-9]{1,5}(-[0-9]{1,5})?)*")
_HUGEPAGE_SETTING = re.compile(r"hugepages-([0-9]{1,7})(ki|mi|gi)")
_UNIFIED_KEY = re.compile(r"[a-z0-9]+(\.[a-z0-9-]+)+")
_PAGE_UNITS = {"ki": 2**10, "mi": 2**20, "gi": 2**30}
_PAGE_NAMES = ("KB", "MB", "GB", "TB", "PB")


def _integer(found: Found, low: int, high: int, what: str) -> int:
    text = found.value.strip()
    if not re.fullmatch(r"[+-]?[0-9]{1,10}", text) or not low <= int(text) <= high:
        raise InvalidAnnotation(found.key, found.value, f"expected {what}, an integer from {low} to {high}")
    return int(text)


def parse_cpu_period(found: Found) -> int:
    return _integer(found, 1000, 1_000_000, "the CFS period in microseconds")


def parse_cpu_shares(found: Found) -> int:
    return _integer(found, 2, 262_144, "CPU shares")


def parse_oom_score_adj(found: Found) -> int:
    return _integer(found, -1000, 1000, "an OOM score adjustment")


def parse_cpu_quota(found: Found, period: int) -> int:
    """CPUs as a quantity, times the period, in µs; `disable` is -1 (no quota). A period that is not
    positive (an unset or nonsensical kubelet value) counts as the kernel's default, 100 ms."""
    if found.value.strip() == "disable":
        return -1
    if period <= 0:
        period = DEFAULT_PERIOD_US
    accepted = "expected CPUs as a quantity (e.g. 500m, 1.5, 2) or disable"
    try:
        cpus = parse_quantity(found.value.strip())
    except QuantityError:
        raise InvalidAnnotation(found.key, found.value, accepted) from None
    quota = cpus * period
    if cpus <= 0 or quota < 1000:
        raise InvalidAnnotation(found.key, found.value,
                                f"{accepted}; at a {period} µs period the least is {Fraction(1000, period)} CPUs")
    if quota > 2**40:
        raise InvalidAnnotation(found.key, found.value, f"{accepted}; {cpus} CPUs is not a plausible limit")
    return int(quota)


def parse_cpuset(found: Found) -> str:
    text = found.value.strip()
    accepted = f"expected a CPU/NUMA node list such as 0-3,8 (ascending ranges, ids up to {MAX_CPU_ID})"
    if not _CPULIST.fullmatch(text):
        raise InvalidAnnotation(found.key, found.value, accepted)
    for part in text.split(","):
        low, _, high = part.partition("-")
        if int(low) > MAX_CPU_ID or (high and not int(low) <= int(high) <= MAX_CPU_ID):
            raise InvalidAnnotation(found.key, found.value, accepted)
    return text


def cpuset_ids(text: str) -> set[int]:
    """The ids of a list such as 0-3,8; ValueError for anything else (a kubelet's value is checked too)."""
    if not _CPULIST.fullmatch(text):
        raise ValueError(f"not a CPU list: {text[:64]!r}")
    ids: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        if int(low) > MAX_CPU_ID or int(high or low) > MAX_CPU_ID or int(high or low) < int(low):
            raise ValueError(f"not a CPU list: {text[:64]!r}")
        ids.update(range(int(low), int(high or low) + 1))
    return ids


def parse_memory(found: Found, minimum: int, what: str) -> int:
    accepted = f"expected {what} as a quantity of bytes (e.g. 512Mi, 2Gi), at least {minimum}"
    try:
        value = parse_bytes(found.value.strip())
    except QuantityError:
        raise InvalidAnnotation(found.key, found.value, accepted) from None
    if value < minimum or value > 2**62:
        raise InvalidAnnotation(found.key, found.value, accepted)
    return value


def hugepage_size(setting: str) -> tuple[str, int] | None:
    """('2MB', 2097152) for 'hugepages-2mi'; None when `setting` is not a hugepages setting."""
    match = _HUGEPAGE_SETTING.fullmatch(setting)
    if match is None:
        return None
    size = int(match.group(1)) * _PAGE_UNITS[match.group(2)]
    if size == 0:
        return None
    # Named as the kubelet names page sizes for the runtime: the largest unit that divides evenly.
    number, unit = size // 1024, 0
    while number % 1024 == 0 and unit < len(_PAGE_NAMES) - 1:
        number, unit = number // 1024, unit + 1
    return f"{number}{_PAGE_NAMES[unit]}", size


@dataclass(frozen=True, slots=True)
class ResourcesConfig:
    #: Settings whose annotation may also loosen what the kubelet set ('*' for all).
    allow_loosening: frozenset[str] = frozenset()
    #: cgroup v2 files `unified.<key>` may set (none by default; cgroup v1 nodes have none).
    unified_keys: frozenset[str] = frozenset()

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str) -> ResourcesConfig:
        opts = Options(data, where, ("allow-loosening", "unified-keys"))
        loosening = opts.string_list("allow-loosening")
        for name in loosening:
            if name != "*" and name not in FIXED_SETTINGS and not hugepage_size(name) and not name.startswith(
                    "unified."):
                raise opts.error("allow-loosening", f"{name!r} is not a resources setting; known: "
                                 f"{', '.join(FIXED_SETTINGS)}, hugepages-<size>, unified.<key>, *")
        keys = opts.string_list("unified-keys")
        for key in keys:
            if not _UNIFIED_KEY.fullmatch(key):
                raise opts.error("unified-keys", f"{key!r} is not a cgroup v2 file name usable in an annotation key "
                                 "(lower-case letters, digits, '-' and '.', e.g. memory.high)")
        return cls(allow_loosening=frozenset(loosening), unified_keys=frozenset(keys))

    def may_loosen(self, setting: str) -> bool:
        return "*" in self.allow_loosening or setting in self.allow_loosening


def _limit_tighter(old: int, new: int) -> bool:
    """For limits where 0 (or less) means none: a new limit is tighter when it is no higher."""
    return old <= 0 or 0 < new <= old


FIXED_SETTINGS = ("cpu-quota", "cpu-period", "cpu-shares", "cpuset-cpus", "cpuset-mems", "memory-limit",
                  "memory-swap", "oom-score-adj")


@dataclass(frozen=True, slots=True)
class _Proposal:
    setting: str
    field: str
    value: Any
    found: Found


class ResourcesInterceptor:
    name = "resources"
    events = frozenset(BASES)

    def __init__(self, config: ResourcesConfig, lookup: Lookup) -> None:
        self.config = config
        self.lookup = lookup

    def adjust(self, ctx: CallContext) -> Adjustment:
        base = BASES[ctx.method]
        annotations, container = ctx.pod.annotations, ctx.container

        def find(setting: str) -> Found | None:
            return self.lookup.find(annotations, setting, container)

        resources = message_at(ctx.request, base[:-1])  # resolved once: read a dozen times below

        def current(name: str) -> Any:
            return read_field(resources, name) if "[" in name else getattr(resources, name)

        proposals = self._fixed(find, current) + self._variable(annotations, find)
        if not proposals:
            return NOTHING
        if ctx.method == UPDATE_CONTAINER_RESOURCES:
            # The kubelet resizes (in place, the CPU manager): the tighter of its value and the
            # annotation's wins, so a container can still be shrunk below what its annotation says.
            looser = self._looser(proposals, current)
            return Adjustment(changes=tuple(
                _kept(base, p, current(p.field)) if p in looser else
                Change(base + p.field, p.value, p.setting, p.found.key, p.found.value)
                for p in proposals if p in looser or current(p.field) != p.value))
        denial = self._loosening(ctx, proposals, current)
        if denial is not None:
            return denial.as_adjustment()
        return Adjustment(changes=tuple(
            Change(base + p.field, p.value, p.setting, p.found.key, p.found.value) for p in proposals
            if current(p.field) != p.value))

    def _fixed(self, find: Callable[[str], Found | None], current: Callable[[str], Any]) -> list[_Proposal]:
        out = self._cpu(find, current)
        for setting, field in (("cpuset-cpus", "cpuset_cpus"), ("cpuset-mems", "cpuset_mems")):
            if (found := find(setting)) is not None:
                out.append(_Proposal(setting, field, parse_cpuset(found), found))
        out += self._memory(find, current)
        if (found := find("oom-score-adj")) is not None:
            out.append(_Proposal("oom-score-adj", "oom_score_adj", parse_oom_score_adj(found), found))
        return out

    @staticmethod
    def _cpu(find: Callable[[str], Found | None], current: Callable[[str], Any]) -> list[_Proposal]:
        out: list[_Proposal] = []
        period = current("cpu_period") if current("cpu_period") > 0 else DEFAULT_PERIOD_US
        if (found := find("cpu-period")) is not None:
            period = parse_cpu_period(found)
            out.append(_Proposal("cpu-period", "cpu_period", period, found))
        if (found := find("cpu-quota")) is not None:
            out.append(_Proposal("cpu-quota", "cpu_quota", parse_cpu_quota(found, period), found))
        if (found := find("cpu-shares")) is not None:
            out.append(_Proposal("cpu-shares", "cpu_shares", parse_cpu_shares(found), found))
        return out

    @staticmethod
    def _memory(find: Callable[[str], Found | None], current: Callable[[str], Any]) -> list[_Proposal]:
        out: list[_Proposal] = []
        memory = current("memory_limit_in_bytes")
        if (limit := find("memory-limit")) is not None:
            memory = parse_memory(limit, MIN_MEMORY, "a memory limit")
            out.append(_Proposal("memory-limit", "memory_limit_in_bytes", memory, limit))
        if (found := find("memory-swap")) is not None:
            swap = parse_memory(found, max(memory, MIN_MEMORY), "memory plus swap")
            out.append(_Proposal("memory-swap", "memory_swap_limit_in_bytes", swap, found))
        elif limit is not None:
            # The swap limit counts memory plus swap. Where the kubelet allowed no swap (equal limits),
            # or the new memory limit would exceed it (runc refuses that), it follows the memory limit.
            old_memory, old_swap = current("memory_limit_in_bytes"), current("memory_swap_limit_in_bytes")
            if old_swap > 0 and (old_swap == old_memory or old_swap < memory):
                out.append(_Proposal("memory-limit", "memory_swap_limit_in_bytes", memory, limit))
        return out

    def _variable(self, annotations: Mapping[str, str], find: Callable[[str], Found | None]) -> list[_Proposal]:
        out: list[_Proposal] = []
        for setting in self._variable_settings(annotations):
            found = find(setting)
            if found is None:
                continue  # addressed to another container
            page = hugepage_size(setting)
            if page is not None:
                limit = parse_memory(found, 0, f"a {page[0]} hugepage limit")
                if limit % page[1]:
                    raise InvalidAnnotation(found.key, found.value, f"expected a multiple of the {page[0]} page size")
                out.append(_Proposal(setting, f"hugepage_limits[{page[0]}]", limit, found))
                continue
            key = setting[len("unified."):]
            if key not in self.config.unified_keys:
                allowed = ", ".join(sorted(self.config.unified_keys)) or "none are configured"
                raise InvalidAnnotation(found.key, found.value,
                                        f"cgroup v2 key {key!r} is not allowed (resources.unified-keys: {allowed})")
            value = found.value.strip()
            if not value or len(value) > 256 or any(c in value for c in "\n\r\x00"):
                raise InvalidAnnotation(found.key, found.value, "expected a single-line value of at most 256 bytes")
            out.append(_Proposal(setting, f"unified[{key}]", value, found))
        return out

    def _variable_settings(self, annotations: Mapping[str, str]) -> list[str]:
        suffix = "." + self.lookup.domain
        names = set()
        for key in annotations:
            prefix = key.partition("/")[0]
            if prefix.endswith(suffix):
                setting = prefix[: -len(suffix)]
                if setting.startswith("unified.") or hugepage_size(setting) or setting.startswith("hugepages-"):
                    names.add(setting)
        bad = sorted(n for n in names if n.startswith("hugepages-") and hugepage_size(n) is None)
        if bad:
            key = next(k for k in annotations if k.startswith(f"{bad[0]}{suffix}"))
            raise InvalidAnnotation(key, annotations[key], "hugepages settings are named hugepages-<n>ki|mi|gi, "
                                    "lower case, e.g. hugepages-2mi")
        return sorted(names)

    def _looser(self, proposals: list[_Proposal], current: Callable[[str], Any]) -> list[_Proposal]:
        """The proposals that would loosen what the kubelet set (and allow-loosening does not let loosen)."""
        return [p for p in proposals if not self.config.may_loosen(p.setting)
                and not self._tighter(p, current(p.field), proposals, current)]

    def _loosening(self, ctx: CallContext, proposals: list[_Proposal],
                   current: Callable[[str], Any]) -> Denial | None:
        """On creation, annotations only tighten: the first loosening proposal denies the call."""
        looser = self._looser(proposals, current)
        if not looser:
            return None
        p, old = looser[0], current(looser[0].field)
        return Denial(
            f"criproxy: {ctx.who}: annotation {p.found.key}={quote(p.found.value)} would loosen "
            f"{p.field} from {quote(old)} (set by the kubelet) to {quote(p.value)}; annotations may only tighten "
            f"resources unless the resources interceptor's allow-loosening lists {p.setting}",
            grpc.StatusCode.PERMISSION_DENIED, setting=p.setting, key=p.found.key, value=p.found.value)

    def _tighter(self, p: _Proposal, old: Any, proposals: list[_Proposal], current: Callable[[str], Any]) -> bool:
        if p.setting in ("cpu-quota", "cpu-period"):
            return _cpu_ratio_tighter(proposals, current)
        rule = _TIGHTER.get(p.setting)
        if rule is None:
            rule = _hugepage_tighter if p.field.startswith("hugepage_limits[") else _unified_tighter(p.field)
        return rule(old, p.value)


def _kept(base: str, p: _Proposal, old: Any) -> Change:
    """An update where the kubelet's own value is tighter than the annotation's: it stands, and says so."""
    return Change(base + p.field, old, p.setting, p.found.key, p.found.value, note=(
        f"the kubelet's {p.field} {quote(old)} is tighter than the annotation's {quote(p.value)} and stands (on an "
        "update the tighter of the two wins)"))


def _subset(old: str, new: str) -> bool:
    if not old:
        return True
    try:
        return cpuset_ids(new) <= cpuset_ids(old)
    except ValueError:
        return False  # the kubelet's set cannot be read: nothing proves the new one is narrower


def _hugepage_tighter(old: int | None, new: int) -> bool:
    return old is None or new <= old  # the kubelet sets 0 (none) for sizes a pod did not request


def _unified_tighter(field: str) -> Callable[[Any, Any], bool]:
    """A value the kubelet did not set may be added; a `.max`/`.high` limit may be lowered ('max' is
    unlimited); any other change of the kubelet's own value is loosening."""
    key = field[len("unified["):-1]

    def rule(old: str | None, new: str) -> bool:
        if old is None or new == old:
            return True
        return key.endswith((".max", ".high")) and _unified_limit(new) <= _unified_limit(old)

    return rule


_TIGHTER: dict[str, Callable[[Any, Any], bool]] = {
    "memory-limit": _limit_tighter,
    "memory-swap": _limit_tighter,
    "cpu-shares": lambda old, new: old <= 0 or new <= old,
    "oom-score-adj": lambda old, new: new >= old,  # a higher score is killed sooner
    "cpuset-cpus": _subset,
    "cpuset-mems": _subset,
}


def _unified_limit(value: str) -> float:
    first = value.split(maxsplit=1)[0] if value.strip() else ""
    return float(first) if first.isascii() and first.isdigit() else float("inf")


def _cpu_ratio_tighter(proposals: list[_Proposal], current: Callable[[str], Any]) -> bool:
    """Quota and period together: the CPU time per period after must not exceed what it was."""
    values = {p.field: p.value for p in proposals}
    old_q, old_p = current("cpu_quota"), current("cpu_period")
    old_p = old_p if old_p > 0 else DEFAULT_PERIOD_US
    new_q, new_p = values.get("cpu_quota", old_q), values.get("cpu_period", old_p)
    if old_q <= 0:
        return True
    return bool(new_q > 0 and Fraction(new_q, new_p) <= Fraction(old_q, old_p))
