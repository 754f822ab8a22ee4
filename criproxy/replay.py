"""`criproxy replay`: what a policy change would do to the calls the nodes actually saw.

Every record of a recording (`criproxy serve --record`, criproxy.observe.record) is decided again under the
new policy by the pipeline's own code: the record rebuilds the request it was decided on (the judged fields,
the pod's sandbox config), Pipeline.context() and Pipeline.decide() run unchanged, and Pipeline.apply() makes
the changes on the rebuilt request, exactly as `criproxy explain` does. The verdict is compared with what was
decided when the call was recorded (or, with a baseline policy, with that policy's verdict), and each call
whose verdict differs is reported under its pod, by kind:

- newly-denied: allowed before, denied (or failing) now; the gate: replay exits 1 when there is any
- no-longer-denied: denied (or failing) before, allowed now
- denied-differently: denied both times, with another message (the policy's own name and digest aside)
- adjusted-differently: allowed both times, the runtime getting other values (field, before, after)
- flagged-differently: the same changes, but other violations recorded by audit or dry-run

Fast enough for a fleet: the input is streamed (files in ranges, gzip and stdin in blocks), every core
works (`--jobs`, forked workers), and a verdict is memoised per distinct decision input. Decisions depend on
the method, the pod's namespace, labels and criproxy annotations, the container, the judged request fields,
the pinned annotations and the runtime's handlers, never on the pod's name or uid (they appear only in
messages): so the verdict is reached once per input with the pod's name left as a placeholder, and the
name is put into the messages where they are shown. A fleet runs few distinct inputs (the replicas of a
workload, the same DaemonSet on every node), and a line criproxy wrote puts what differs between replicas
first: most records cost a dictionary look-up of the rest of their line, without a JSON parse (Replayer).
Memory grows with the distinct pods (a set of their hashes), the distinct inputs (bounded memos) and the
pods reported, never with the records.
"""

from __future__ import annotations

import asyncio
import glob
import gzip
import io
import json
import multiprocessing
import os
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from criproxy.config import ServeConfig
from criproxy.cri.annotations import Lookup
from criproxy.cri.context import RUN_POD_SANDBOX, UPDATE_CONTAINER_RESOURCES, PodInfo
from criproxy.errors import ConfigError, CriProxyError
from criproxy.explain import Explained
from criproxy.interceptors import build
from criproxy.observe.record import (
    CONTAINER_ID,
    SANDBOX_ID,
    RecordError,
    change_dict,
    check,
    decision_dict,
    facts_of,
    parse,
    pinned_text,
    request_of,
)
from criproxy.pipeline import Pipeline
from criproxy.pipeline.index import ContainerInfo
from criproxy.policies import AUDITED, DRY_RUN, FAILED_OPEN, Policy

NEWLY_DENIED, NO_LONGER_DENIED = "newly-denied", "no-longer-denied"
DENIED_DIFFERENTLY, ADJUSTED_DIFFERENTLY, FLAGGED_DIFFERENTLY = (
    "denied-differently", "adjusted-differently", "flagged-differently")
KINDS = (NEWLY_DENIED, NO_LONGER_DENIED, DENIED_DIFFERENTLY, ADJUSTED_DIFFERENTLY, FLAGGED_DIFFERENTLY)
#: Decisions that record a violation without failing the call (audit, dry-run, an interceptor failing open).
FLAGGING = frozenset({AUDITED, DRY_RUN, FAILED_OPEN})
#: The pod's name while a verdict is reached: no Kubernetes name can hold these characters.
NAME = "\u27e8pod\u27e9"
#: The policy's identity in a message, for comparing messages of two versions of a policy.
POLICY = "\u27e8policy\u27e9"
#: Distinct decision inputs remembered per worker before the memo starts again.
MEMO_SIZE = 65_536
#: A plain file is read in ranges of about this many bytes (a gzip file or stdin in blocks of it).
BLOCK_BYTES = 4 << 20
#: Units of work waiting for a worker at most, per worker (stdin is read only as fast as it is replayed).
IN_FLIGHT_PER_JOB = 2
GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one policy decides for one distinct decision input, the pod's name left as NAME."""

    result: str
    status: str
    message: str
    changes: list[dict[str, Any]]
    decisions: list[dict[str, Any]]
    rule: str
    #: field -> the value the runtime gets
    changed: dict[str, Any]
    #: (action, setting, key, value) of the violations audit and dry-run let through
    flagged: frozenset[tuple[str, str, str, str]]
    #: the message with the policy's identity replaced by POLICY
    norm: str


def _flagged(decisions: Iterable[Mapping[str, Any]]) -> frozenset[tuple[str, str, str, str]]:
    return frozenset((d["action"], d["setting"], d["key"], d["value"]) for d in decisions if d["action"] in FLAGGING)


def _norm(message: str, identity: str) -> str:
    return message.replace(identity, POLICY) if "@" in identity else message


def _verdict(result: str, status: str, message: str, *, changes: list[dict[str, Any]],
             decisions: list[dict[str, Any]], rule: str, identity: str) -> Verdict:
    return Verdict(result, status, message, changes, decisions, rule, {c["field"]: c["to"] for c in changes},
                   _flagged(decisions), _norm(message, identity))


def _ignore(*_: Any) -> None:
    return None


class Judge:
    """The configured interceptors under one policy, deciding recorded calls with the pipeline's own code."""

    def __init__(self, config: ServeConfig, policy: Policy) -> None:
        self.lookup = Lookup(config.annotation_domain)
        self.pipeline = Pipeline(build(config.interceptors, self.lookup), lookup=self.lookup, on_decisions=_ignore)
        self.pipeline.policy = policy
        self.identity = policy.identity
        self._pinned_key = f"{self.lookup.domain}/pinned"

    async def verdict(self, record: Mapping[str, Any]) -> Verdict:
        """The verdict on a checked record, its pod named NAME. The container index is told the sandbox (with
        its pinned annotations) and, for an update, the container, as the live index would know them."""
        pipeline, method = self.pipeline, record["method"]
        pipeline.facts = facts_of(record)
        request = request_of(record, NAME)
        pod = PodInfo(record["namespace"], NAME, record["uid"], record["labels"], record["annotations"])
        if method != RUN_POD_SANDBOX:
            pinned = pinned_text(record)
            pipeline.index.add_sandbox(SANDBOX_ID, PodInfo(pod.namespace, NAME, pod.uid, {}, {} if pinned is None
                                                          else {self._pinned_key: pinned}))
        if method == UPDATE_CONTAINER_RESOURCES:
            pipeline.index.add_container(CONTAINER_ID, ContainerInfo(SANDBOX_ID, record["container"], pod))
        ctx = await pipeline.context(method, request)
        assert ctx is not None, "the index knows the recorded container"
        rule = pipeline.policy.rule_of(ctx)[0]
        try:
            outcome = await pipeline.decide(ctx)
        except CriProxyError as err:
            return _verdict("error", err.code.name, err.message, changes=[], decisions=[], rule=rule,
                            identity=self.identity)
        decisions = [decision_dict(d) for d in outcome.decisions]
        if outcome.denial is not None:
            return _verdict("denied", outcome.denial.code.name, outcome.denial.reason, changes=[],
                            decisions=decisions, rule=rule, identity=self.identity)
        applied, _ = pipeline.apply(outcome, request)
        return _verdict("allowed", "OK", "", changes=[change_dict(c, before) for c, before in applied],
                        decisions=decisions, rule=rule, identity=self.identity)


def _frozen(value: Any) -> Any:
    if type(value) is dict:
        return tuple((k, _frozen(v)) for k, v in value.items())
    if type(value) is list:
        return tuple(_frozen(v) for v in value)
    return value


def decision_key(r: Mapping[str, Any]) -> tuple[Any, ...]:
    """Everything a decision depends on (not the pod's name, uid, node or time), hashable. Raises KeyError,
    TypeError or AttributeError for a record without the shape (which `check` then explains)."""
    request, pinned, runtime = r["request"], r["pinned"], r["runtime"]
    resources = request.get("resources")
    seccomp = request.get("seccomp")
    return (r["method"], r["namespace"], r["container"], tuple(r["labels"].items()), tuple(r["annotations"].items()),
            None if pinned is None else tuple(pinned.items()), request.get("runtime_handler"),
            None if seccomp is None else tuple(seccomp.items()),
            None if resources is None else tuple(resources.items()) if "hugepage_limits" not in resources
            and "unified" not in resources else _frozen(resources),
            None if runtime is None else (tuple(runtime["handlers"]), runtime.get("source")))


@dataclass(slots=True)
class Side:
    """One side of a changed call, in `criproxy explain`'s shape, and its rule."""

    call: Explained
    rule: str


@dataclass(slots=True)
class Found:
    """A call whose verdict changed (the first one; `count` of the pod's calls alike)."""

    time: str
    method: str
    container: str | None
    kind: str
    was: Side
    now: Side
    fields: list[dict[str, Any]] = field(default_factory=list)
    count: int = 1


def _explained(record: Mapping[str, Any], verdict: Verdict | None, name: str) -> Explained:
    method, container = record["method"], record["container"]
    if verdict is None:  # as recorded
        return Explained(method, container, record["result"], record["status"], record["message"],
                         list(record["changes"]), list(record["decisions"]))
    return Explained(method, container, verdict.result, verdict.status, verdict.message.replace(NAME, name),
                     verdict.changes, [{**d, "reason": d["reason"].replace(NAME, name)} for d in verdict.decisions])


def field_changes(was: Sequence[Mapping[str, Any]], now: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The fields whose value for the runtime differs: before (was), after (now); a field one side leaves is
    the kubelet's value (the other side's `from`)."""
    before = {c["field"]: c for c in was}
    after = {c["field"]: c for c in now}
    out = []
    for name in sorted(before.keys() | after.keys()):
        b, a = before.get(name), after.get(name)
        kubelet = (b or a or {}).get("from")
        old, new = (b["to"] if b else kubelet), (a["to"] if a else kubelet)
        if old != new:
            out.append({"field": name, "before": old, "after": new, "by": (a or b or {}).get("by", "")})
    return out


def classify(was_result: str, was_norm: str, was_changed: Mapping[str, Any], *,
             was_flagged: frozenset[tuple[str, str, str, str]], now: Verdict, name: str) -> str | None:
    """The kind of change from one verdict (its result, message normalised, changes and flagged violations) to
    the other, or None when it is the same."""
    if was_result == "allowed":
        if now.result != "allowed":
            return NEWLY_DENIED
        if was_changed != now.changed:
            return ADJUSTED_DIFFERENTLY
        return FLAGGED_DIFFERENTLY if was_flagged != now.flagged else None
    if now.result == "allowed":
        return NO_LONGER_DENIED
    return DENIED_DIFFERENTLY if was_norm != now.norm.replace(NAME, name) else None


@dataclass
class Partial:
    """What replaying some records found; partials of every unit of work add up (`merge`)."""

    calls: int = 0
    pods: set[int] = field(default_factory=set)
    namespaces: set[str] = field(default_factory=set)
    nodes: set[str] = field(default_factory=set)
    #: calls per policy identity they were recorded under
    recorded: Counter[str] = field(default_factory=Counter)
    #: (node, namespace, pod, uid) -> (method, container, kind) -> the first such call
    changed: dict[tuple[str, str, str, str], dict[tuple[str, str | None, str], Found]] = field(default_factory=dict)
    #: calls per kind, and per (rule, kind)
    kinds: Counter[str] = field(default_factory=Counter)
    rules: Counter[tuple[str, str]] = field(default_factory=Counter)

    def merge(self, other: Partial) -> None:
        self.calls += other.calls
        self.pods |= other.pods
        self.namespaces |= other.namespaces
        self.nodes |= other.nodes
        self.recorded.update(other.recorded)
        self.kinds.update(other.kinds)
        self.rules.update(other.rules)
        for pod, calls in other.changed.items():
            mine = self.changed.setdefault(pod, {})
            for key, found in calls.items():
                if key not in mine:
                    mine[key] = found
                    continue
                kept = mine[key]
                first = found if found.time < kept.time else kept
                first.count = kept.count + found.count
                mine[key] = first


#: The start of a line as criproxy writes it: what differs between replicas first (criproxy.observe.record).
HEAD = '{"v":1,"time":"'


def split_head(line: str) -> tuple[str, str, str, str, str] | None:
    """(time, node, pod, uid, the rest of the line) of a line whose head is exactly as criproxy writes it, with
    no escape in it (so that no quote inside a value can be taken for the end of one); None otherwise."""
    if not line.startswith(HEAD):
        return None
    node = line.find('","node":"', 15)
    pod = line.find('","pod":"', node + 10)
    uid = line.find('","uid":"', pod + 9)
    end = line.find('",', uid + 9)
    if node < 0 or pod < 0 or uid < 0 or end < 0 or "\\" in line[:end]:
        return None
    return line[15:node], line[node + 10:pod], line[pod + 9:uid], line[uid + 9:end], line[end + 2:]


class Replayer:
    """Replays records under `new`, against the recorded decisions or against `baseline`.

    Two memos, both bounded: verdicts by decision input (decision_key), for every record; and, for lines
    written as criproxy writes them, what a line's rest (everything after the pod's uid) comes to: its
    namespace, method, container, the policy it was recorded under, and the kind of change. A rest seen
    before (a replica of a workload already replayed) is counted without parsing the line; its first
    occurrence was parsed and checked in full. A changed call is parsed where its pod is reported."""

    def __init__(self, config: ServeConfig, new: Policy, baseline: Policy | None = None) -> None:
        self.new = Judge(config, new)
        self.baseline = Judge(config, baseline) if baseline is not None else None
        self.memo: dict[tuple[Any, ...], tuple[Verdict, Verdict | None, str | None]] = {}
        self.rests: dict[str, tuple[str, str, str | None, str, str | None, str]] = {}
        self.misses = 0

    async def _judge(self, record: Mapping[str, Any]) -> tuple[Verdict, Verdict | None, str | None]:
        check(record)  # every distinct input is checked in full once
        new = await self.new.verdict(record)
        if self.baseline is None:
            return new, None, None
        base = await self.baseline.verdict(record)
        return new, base, classify(base.result, base.norm, base.changed, was_flagged=base.flagged, now=new, name=NAME)

    async def feed(self, text: str, out: Partial, where: Where) -> None:
        """Replay each line of `text` (whole lines) into `out`; BadRecording naming the first bad one."""
        rests, pods, namespaces, nodes, recorded, changed = (
            self.rests, out.pods, out.namespaces, out.nodes, out.recorded, out.changed)
        for index, line in enumerate(text.split("\n")):
            if not line or (line[0] in " \t\r" and not line.strip()):
                continue
            head = split_head(line)
            if head is not None:
                seen = rests.get(head[4])
                if seen is not None:
                    _, node, name, uid, _ = head
                    namespace, method, container, policy, kind, rule = seen
                    calls = changed.get((node, namespace, name, uid)) if kind is not None else None
                    if kind is None or (calls is not None and (method, container, kind) in calls):
                        out.calls += 1
                        pods.add(hash((namespace, name, uid)))
                        namespaces.add(namespace)
                        nodes.add(node)
                        recorded[policy] += 1
                        if calls is not None and kind is not None:
                            calls[(method, container, kind)].count += 1
                            out.kinds[kind] += 1
                            out.rules[(rule, kind)] += 1
                        continue
            try:
                record = parse(line)
                kind, rule = await self._replay(record, out)
            except RecordError as err:
                raise where.error(text, index, str(err)) from None
            if head is not None and record["result"] == "allowed":  # a denial names its pod: no other pod has it
                if len(rests) >= MEMO_SIZE:
                    rests.clear()
                rests[head[4]] = (record["namespace"], record["method"], record["container"], record["policy"], kind,
                                  rule)

    async def _replay(self, record: dict[str, Any], out: Partial) -> tuple[str | None, str]:
        """Count one parsed record into `out`; its kind of change (None: none) and the new policy's rule."""
        try:
            key = decision_key(record)
            entry = self.memo.get(key)
        except (KeyError, TypeError, AttributeError):
            check(record)
            raise RecordError("not a version-1 record") from None
        if entry is None:
            entry = await self._judge(record)
            self.misses += 1
            if len(self.memo) >= MEMO_SIZE:
                self.memo.clear()
            self.memo[key] = entry
        try:
            node, namespace, name, uid = record["node"], record["namespace"], record["pod"], record["uid"]
            if type(node) is not str or type(name) is not str or type(uid) is not str:
                raise TypeError
            policy = record["policy"]
            new, base, kind = entry
            if base is None:
                result, decisions = record["result"], record["decisions"]
                was_norm = _norm(record["message"], policy) if result != "allowed" else ""
                changes = record["changes"]
                was_changed = {c["field"]: c["to"] for c in changes} if changes else {}
                kind = classify(result, was_norm, was_changed, now=new, name=name,
                                was_flagged=_flagged(decisions) if decisions else frozenset())
        except (KeyError, TypeError, AttributeError):
            check(record)
            raise RecordError("not a version-1 record") from None
        out.calls += 1
        out.pods.add(hash((namespace, name, uid)))
        out.namespaces.add(namespace)
        out.nodes.add(node)
        out.recorded[policy] += 1
        if kind is not None:
            self._found(record, kind, new, base, out)
        return kind, new.rule

    @staticmethod
    def _found(record: dict[str, Any], kind: str, new: Verdict, base: Verdict | None, out: Partial) -> None:
        name = record["pod"]
        out.kinds[kind] += 1
        out.rules[(new.rule, kind)] += 1
        pod = (record["node"], record["namespace"], name, record["uid"])
        calls = out.changed.setdefault(pod, {})
        key = (record["method"], record["container"], kind)
        known = calls.get(key)
        if known is not None:
            known.count += 1
            return
        was = Side(_explained(record, base, name), record["rule"] if base is None else base.rule)
        now = Side(_explained(record, new, name), new.rule)
        fields = field_changes(was.call.changes, now.call.changes) if kind == ADJUSTED_DIFFERENTLY else []
        calls[key] = Found(record["time"], record["method"], record["container"], kind, was, now, fields)


# ------------------------------------------------------------------------------------------ input


class BadRecording(Exception):
    """A bad line: the file, its line (or, in a range of a file, the byte offset it starts at) and why."""

    def __init__(self, path: str, line: int | None, offset: int | None, why: str) -> None:
        super().__init__(path, line, offset, why)
        self.path, self.line, self.offset, self.why = path, line, offset, why

    def located(self) -> str:
        line = self.line
        if line is None and self.offset is not None:
            line = _line_at(self.path, self.offset)
        return f"{self.path}:{line}: {self.why}"


def _line_at(path: str, offset: int) -> int:
    """The number of the line starting at byte `offset` of a plain file."""
    count, done = 1, 0
    with open(path, "rb") as f:
        while done < offset:
            block = f.read(min(BLOCK_BYTES, offset - done))
            if not block:
                break
            count += block.count(b"\n")
            done += len(block)
    return count


@dataclass(frozen=True, slots=True)
class Where:
    """Where a block of lines comes from: its file, and the number of its first line (`numbered`) or the byte
    offset it starts at (a range of a plain file: the line number is counted only for an error)."""

    path: str
    first: int
    numbered: bool

    def error(self, text: str, index: int, why: str) -> BadRecording:
        """The error for the line `index` of the block `text`."""
        if self.numbered:
            return BadRecording(self.path, self.first + index, None, why)
        before = "\n".join(text.split("\n")[:index])
        return BadRecording(self.path, None, self.first + (len(before.encode()) + 1 if index else 0), why)


@dataclass(frozen=True, slots=True)
class Unit:
    """A unit of work: whole files (`paths`: gzip ones, and plain ones too small to split, grouped so that a
    unit is worth sending to a worker), a byte range of one plain file, or a block of stdin's lines."""

    path: str = ""
    start: int = 0
    end: int | None = None  # None: to the end
    lines: str | None = None  # stdin: the block's text (whole lines)
    first_line: int = 1
    paths: tuple[str, ...] = ()


def _decode(data: bytes, where: Where) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        text = data[:err.start].decode("utf-8")
        raise where.error(text + "\n", text.count("\n"), "not UTF-8 text") from None


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def _read_range(path: str, start: int, end: int | None) -> Iterator[tuple[bytes, int]]:
    """(whole lines, offset of the first) of the lines starting in [start, end); the file's last line may lack
    its newline."""
    with open(path, "rb") as f:
        if start:
            f.seek(start - 1)
            f.readline()  # the line holding byte start-1 belongs to the range before
        position = f.tell()
        while end is None or position < end:
            want = BLOCK_BYTES if end is None else min(BLOCK_BYTES, end - position)
            data = f.read(want)
            if not data:
                return
            data += f.readline() if not data.endswith(b"\n") else b""
            yield data, position
            position += len(data)


def _read_stream(stream: _Readable) -> Iterator[tuple[bytes, int]]:
    """(whole lines, number of the first) of a stream, in blocks; its last line may lack its newline."""
    line, rest = 1, b""
    while True:
        data = stream.read(BLOCK_BYTES)
        if not data:
            if rest:
                yield rest, line
            return
        data = rest + data
        cut = data.rfind(b"\n") + 1
        rest = data[cut:]
        if cut:
            yield data[:cut], line
            line += data.count(b"\n", 0, cut)


def _opened(path: str) -> io.BufferedIOBase:
    raw = open(path, "rb")  # noqa: SIM115 (closed by the caller)
    if raw.read(2) == GZIP_MAGIC:
        raw.seek(0)
        return gzip.GzipFile(fileobj=raw, mode="rb")  # closes with the caller's file below
    raw.seek(0)
    return raw


async def _work_unit(replayer: Replayer, unit: Unit) -> Partial:
    out = Partial()
    if unit.lines is not None:
        await replayer.feed(unit.lines, out, Where(unit.path, unit.first_line, True))
        return out
    if unit.path:
        for data, offset in _read_range(unit.path, unit.start, unit.end):
            where = Where(unit.path, offset, False)
            await replayer.feed(_decode(data, where), out, where)
        return out
    for path in unit.paths:
        await _work_file(replayer, path, out)
    return out


async def _work_file(replayer: Replayer, path: str, out: Partial) -> None:
    try:
        stream = _opened(path)
    except OSError as err:
        raise BadRecording(path, None, None, f"cannot read it: {err.strerror}") from None
    with stream:
        try:
            for data, first in _read_stream(stream):
                where = Where(path, first, True)
                await replayer.feed(_decode(data, where), out, where)
        except (OSError, EOFError, gzip.BadGzipFile) as err:
            raise BadRecording(path, None, None, f"cannot read it: {err}") from None


#: The replayer of a forked worker (inherited from the parent).
_FORKED: dict[str, Replayer] = {}


def _loop() -> asyncio.AbstractEventLoop:
    """This process's event loop for replaying (one for every unit: asyncio.run per unit would cost more than
    the unit's records, restoring SIGINT's handler included)."""
    key = f"loop-{os.getpid()}"
    if key not in _LOOPS:
        _LOOPS[key] = asyncio.new_event_loop()
    return _LOOPS[key]


_LOOPS: dict[str, asyncio.AbstractEventLoop] = {}


def _work(unit: Unit) -> Partial:
    return _loop().run_until_complete(_work_unit(_FORKED["replayer"], unit))


def expand(patterns: Sequence[str]) -> list[str]:
    """The recordings named: files, globs (sorted), '-' for stdin; ConfigError naming what matches nothing."""
    out: list[str] = []
    for pattern in patterns:
        if pattern == "-":
            out.append("-")
        elif glob.has_magic(pattern):
            found = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            if not found:
                raise ConfigError(f"{pattern}: no recording matches")
            out += found
        elif not os.path.isfile(pattern):
            raise ConfigError(f"{pattern}: no such recording")
        else:
            out.append(pattern)
    return out


def plan(paths: Sequence[str], jobs: int) -> list[Unit]:
    """Units of work for the files (stdin is read as it is replayed), of about `size` bytes each, enough for
    every worker to have several: a large plain file in ranges, other files whole and grouped."""
    units: list[Unit] = []
    sizes = {p: os.path.getsize(p) for p in paths if p != "-"}
    total = sum(sizes.values())
    size = max(BLOCK_BYTES, min(16 * BLOCK_BYTES, total // max(1, jobs * 4)))
    group: list[str] = []
    grouped = 0
    for path in paths:
        if path == "-":
            continue
        with open(path, "rb") as f:
            gz = f.read(2) == GZIP_MAGIC
        if not gz and sizes[path] > size and jobs > 1:
            units += [Unit(path, start, min(start + size, sizes[path])) for start in range(0, sizes[path], size)]
            continue
        group.append(path)
        grouped += sizes[path] * (8 if gz else 1)  # a gzip file holds several times its size
        if grouped >= size:
            units.append(Unit(paths=tuple(group)))
            group, grouped = [], 0
    if group:
        units.append(Unit(paths=tuple(group)))
    return units


def _stdin_units(stream: IO[bytes]) -> Iterator[Unit]:
    readable: _Readable = stream
    if isinstance(stream, io.BufferedReader) and stream.peek(2)[:2] == GZIP_MAGIC:
        readable = gzip.GzipFile(fileobj=stream, mode="rb")
    for data, first in _read_stream(readable):
        yield Unit("-", lines=_decode(data, Where("-", first, True)), first_line=first)


def replay(replayer: Replayer, paths: Sequence[str], jobs: int, stdin: IO[bytes] | None = None) -> Partial:
    """Replay every recording with `jobs` processes; BadRecording for the first bad line found."""
    units: Iterator[Unit] = iter(plan(paths, jobs))
    if "-" in paths:
        units = _chain(units, _stdin_units(stdin if stdin is not None else sys.stdin.buffer))
    total = Partial()
    if jobs <= 1:
        loop = _loop()
        for unit in units:
            total.merge(loop.run_until_complete(_work_unit(replayer, unit)))
        return total
    _FORKED["replayer"] = replayer  # the forked workers inherit it (and each keeps its own memo)
    room = threading.BoundedSemaphore(jobs * IN_FLIGHT_PER_JOB)
    stopping = threading.Event()

    def bounded() -> Iterator[Unit]:
        for unit in units:
            while not room.acquire(timeout=0.1):
                if stopping.is_set():
                    return
            yield unit

    pool = multiprocessing.get_context("fork").Pool(jobs)
    try:
        for partial in pool.imap_unordered(_work, bounded()):
            room.release()
            total.merge(partial)
    finally:
        stopping.set()
        pool.terminate()
        pool.join()
        _FORKED.clear()
    return total


def _chain(*iterators: Iterator[Unit]) -> Iterator[Unit]:
    for iterator in iterators:
        yield from iterator


# ------------------------------------------------------------------------------------------ output

_TITLES = {NEWLY_DENIED: "newly denied", NO_LONGER_DENIED: "no longer denied", DENIED_DIFFERENTLY:
           "denied differently", ADJUSTED_DIFFERENTLY: "adjusted differently", FLAGGED_DIFFERENTLY:
           "flagged differently"}


def call_name(method: str, container: str | None) -> str:
    """As `criproxy explain` names a call: 'pod sandbox [RunPodSandbox]', 'container app [CreateContainer]'."""
    what = "pod sandbox" if container is None else f"container {container}"
    return f"{what} [{method.split('/')[1]}]"


def verdict_line(call: Explained) -> str:
    """As `criproxy explain` shows a verdict: 'ALLOWED', 'DENIED PERMISSION_DENIED: <message>'."""
    return call.result.upper() + (f" {call.status}: {call.message}" if call.result != "allowed" else "")


def detail_lines(call: Explained, indent: str) -> list[str]:
    """As `criproxy explain` shows what a verdict did: its changes, the decisions that are not changes."""
    lines = [f"{indent}set {c['field']}: {c['from']!r} -> {c['to']!r} (by {c['by']}, from {c['key']})"
             for c in call.changes]
    lines += [f"{indent}{d['action']}: {d['setting'] or 'call'}{' ' + d['key'] if d['key'] else ''}"
              f" (rule {d['rule'] or '-'}, {d['mode'] or '-'}): {d['reason']}"
              for d in call.decisions if d["action"] != "applied"]
    if not call.changes and call.result == "allowed":
        lines.append(f"{indent}unchanged")
    return lines


def _pods(total: Partial) -> list[tuple[tuple[str, str, str, str], list[Found]]]:
    return [(pod, sorted(total.changed[pod].values(), key=lambda f: (f.time, f.method, f.container or "")))
            for pod in sorted(total.changed, key=lambda p: (p[1], p[2], p[0], p[3]))]


def _pods_per_kind(total: Partial) -> Counter[str]:
    return Counter(kind for calls in total.changed.values() for kind in {k for _, _, k in calls})


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _rule(name: str) -> str:
    return f"rule {name!r}" if name else "no rule"


def _baseline_text(baseline: str | None, total: Partial) -> str:
    if baseline is not None:
        return baseline
    under = ", ".join(f"{identity} ({_n(count, 'call')})" for identity, count in total.recorded.most_common())
    return f"the decisions recorded (under {under or 'no policy'})"


def render_text(total: Partial, policy: str, baseline: str | None) -> str:
    lines = [f"policy: {policy}", f"compared with: {_baseline_text(baseline, total)}"]
    for (node, namespace, name, uid), calls in _pods(total):
        lines.append(f"\npod {namespace}/{name} (node {node}, uid {uid or '-'})")
        for found in calls:
            rule = _rule(found.now.rule) + (f"; was {_rule(found.was.rule)}" if found.was.rule != found.now.rule
                                             else "")
            times = f", {_n(found.count, 'call')}" if found.count > 1 else ""
            lines.append(f"  {call_name(found.method, found.container)}: {_TITLES[found.kind]} ({rule}{times})")
            if found.kind == ADJUSTED_DIFFERENTLY:
                lines += [f"    {f['field']}: {f['before']!r} -> {f['after']!r} (by {f['by']})" for f in found.fields]
                continue
            for label, side in (("was", found.was), ("now", found.now)):
                lines.append(f"    {label}: {verdict_line(side.call)}")
                if found.kind != DENIED_DIFFERENTLY:
                    lines += detail_lines(side.call, "      ")
    summary = summarize(total)
    changed = summary["changed"]
    lines.append(f"\nsummary: {_n(summary['calls'], 'call')}, {_n(summary['pods'], 'pod')}, "
                 f"{_n(summary['namespaces'], 'namespace')}, {_n(summary['nodes'], 'node')}; "
                 f"{_n(changed['calls'], 'call')} of {_n(changed['pods'], 'pod')} would change")
    for kind in KINDS:
        counts = summary["kinds"][kind]
        lines.append(f"  {_TITLES[kind]}: {_n(counts['calls'], 'call')}, {_n(counts['pods'], 'pod')}")
    if summary["rules"]:
        lines.append("  by rule:")
        for rule, kinds in summary["rules"].items():
            lines.append(f"    {rule or '(no rule)'}: " + ", ".join(f"{_TITLES[k]} {n}" for k, n in kinds.items()))
    return "\n".join(lines) + "\n"


def summarize(total: Partial) -> dict[str, Any]:
    pods = _pods_per_kind(total)
    rules: dict[str, dict[str, int]] = {}
    for (rule, kind), count in sorted(total.rules.items()):
        rules.setdefault(rule, {})[kind] = count
    return {"calls": total.calls, "pods": len(total.pods), "namespaces": len(total.namespaces),
            "nodes": len(total.nodes),
            "changed": {"calls": sum(total.kinds.values()), "pods": len(total.changed)},
            "kinds": {kind: {"calls": total.kinds[kind], "pods": pods[kind]} for kind in KINDS},
            "rules": rules, "recorded_under": dict(total.recorded.most_common())}


def render_json(total: Partial, policy: str, baseline: str | None) -> str:
    """One JSON document; each pod on a line of its own (a fleet's report can hold many)."""
    encode = json.JSONEncoder(default=str).encode
    pods = [encode({"node": node, "namespace": namespace, "name": name, "uid": uid, "calls": [
        {"method": f.method, "container": f.container, "time": f.time, "count": f.count, "change": f.kind,
         "rule": f.now.rule, "was_rule": f.was.rule, "was": f.was.call.__dict__, "now": f.now.call.__dict__,
         "fields": f.fields} for f in calls]}) for (node, namespace, name, uid), calls in _pods(total)]
    head = {"policy": policy, "baseline": baseline if baseline is not None else "recorded"}
    return (json.dumps(head)[:-1] + ', "pods": [' + ("\n" + ",\n".join(pods) + "\n" if pods else "")
            + '], "summary": ' + json.dumps(summarize(total), indent=2) + "}\n")
