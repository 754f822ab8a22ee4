"""The recording (`criproxy serve --record FILE`): one JSON line per decided call, holding what the decision
was made from and what was decided, so that `criproxy replay` can decide the same calls again under
another policy, offline, with the pipeline's own code.

Format version 1 (docs/record-replay.md documents every field). One JSON object per line, keys in this
order, no other data of the request:

    v          1
    time       when the call was decided, UTC, e.g. "2026-11-28T11:20:03.512Z"
    node       the node's name (serve's node-name, default the host name)
    pod, uid   the pod's name and uid (from the sandbox config; for UpdateContainerResources as the container
               index resolved it)
    namespace  the pod's namespace
    method     RuntimeService/RunPodSandbox, RuntimeService/CreateContainer or
               RuntimeService/UpdateContainerResources
    container  the container's name (null for RunPodSandbox)
    labels     every label of the pod (policy rules select by label)
    annotations  the pod's annotations criproxy reads: keys of its annotation domain, and the legacy seccomp
               keys; no other annotation (kubectl's last-applied-configuration, for one, can hold a pod's
               environment)
    pinned     the criproxy annotations pinned on the pod's sandbox at its creation (drift), or null
    request    the request fields interceptors and policy judge: RunPodSandbox {runtime_handler, seccomp},
               CreateContainer {seccomp, resources}, UpdateContainerResources {resources}; seccomp is the
               SecurityProfile ({profile_type, localhost_ref}) or null when the kubelet sent none, resources
               the LinuxContainerResources the kubelet computed (fields it set)
    runtime    the runtime handlers the runtime reported, {handlers, source}, or null when not known
    policy     the policy in force, file@digest, or allow-all; rule and mode: the rule that judged the pod
               ('' for none) and its mode
    result     allowed, denied or error; status (the gRPC code, OK when allowed), message (what the pod's
               owner reads: the denial, or the error), changes (what the runtime got: field, from, to, by,
               key) and decisions (action, rule, mode, interceptor, setting, key, value, reason): the shapes
               `criproxy explain -o json` prints

Environment values, commands, mounts, image names, credentials and every other field of the request are
never read into a record. Records are encoded, and the file written and rotated, on a background thread
(criproxy.observe.logqueue): a call only takes a snapshot (the fields above as they are, the two judged
messages serialized) and never waits. Past the queue's capacity, and when the file cannot be written
(a full disk), records are dropped, counted and said in the log at most once a minute; a line is written
whole or not at all, so a full disk leaves no half record behind.

What differs between the calls of a workload's replicas (time, node, pod, uid) comes first, so that the rest
of the line is the same text for all of them: replay recognises a rest it has seen without parsing it again
(criproxy.replay; a line written otherwise is parsed in full, to the same effect).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from criproxy.api.runtime.v1 import api_pb2
from criproxy.cri.adjust import Change, Denial, read_field
from criproxy.cri.context import (
    CREATE_CONTAINER,
    RUN_POD_SANDBOX,
    UPDATE_CONTAINER_RESOURCES,
    CallContext,
    RuntimeFacts,
)
from criproxy.errors import CriProxyError
from criproxy.interceptors.seccomp import LEGACY_CONTAINER, LEGACY_POD
from criproxy.observe.logqueue import DEFAULT_CAPACITY, BackgroundLog
from criproxy.policies import Decision, Policy

log = logging.getLogger(__name__)

VERSION = 1
METHODS = (RUN_POD_SANDBOX, CREATE_CONTAINER, UPDATE_CONTAINER_RESOURCES)
RESULTS = ("allowed", "denied", "error")
#: The request fields a record holds, per method.
REQUEST_FIELDS: dict[str, tuple[str, ...]] = {
    RUN_POD_SANDBOX: ("runtime_handler", "seccomp"), CREATE_CONTAINER: ("seccomp", "resources"),
    UPDATE_CONTAINER_RESOURCES: ("resources",)}
DEFAULT_MAX_BYTES = 50 << 20
DEFAULT_BACKUPS = 5
#: Dropped records are said in the log at most this often.
DROP_LOG_INTERVAL_S = 60.0
SECCOMP_FIELD = "config.linux.security_context.seccomp"
_INT_RESOURCES = ("cpu_period", "cpu_quota", "cpu_shares", "memory_limit_in_bytes", "oom_score_adj",
                  "memory_swap_limit_in_bytes")
_STR_RESOURCES = ("cpuset_cpus", "cpuset_mems")
_PROFILE_TYPES = tuple(api_pb2.SecurityProfile.ProfileType.keys())
_JSON = json.JSONEncoder(separators=(",", ":"), default=str)


# ------------------------------------------------------------------------------------------- writing


class Decided(Protocol):
    """What the pipeline decided about a call (criproxy.pipeline.Outcome)."""

    @property
    def denial(self) -> Denial | None: ...

    @property
    def decisions(self) -> tuple[Decision, ...]: ...

    @property
    def effective(self) -> tuple[Change, ...]: ...


def read_by_criproxy(key: str, domain: str) -> bool:
    """Whether criproxy's interceptors or policy read the annotation `key` (the keys a record keeps)."""
    prefix = key.partition("/")[0]
    return prefix.endswith("." + domain) or key == LEGACY_POD or key.startswith(LEGACY_CONTAINER)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """One call as the recording takes it on the call's path: references to what nothing changes later, and
    the two judged messages serialized (the request itself is adjusted right after)."""

    time: float
    ctx: CallContext
    fields: tuple[Any, ...]
    result: Decided | CriProxyError
    policy: str
    rule: str
    mode: str


def _judged(ctx: CallContext) -> tuple[Any, ...]:
    """The request's judged fields, as they are before the pipeline applies anything."""
    request: Any = ctx.request
    if ctx.method == UPDATE_CONTAINER_RESOURCES:
        return (request.linux.SerializeToString(),)
    security = request.config.linux.security_context
    seccomp = security.seccomp.SerializeToString() if security.HasField("seccomp") else None
    if ctx.method == RUN_POD_SANDBOX:
        return request.runtime_handler, seccomp
    return seccomp, request.config.linux.resources.SerializeToString()


def _seccomp_dict(profile: api_pb2.SecurityProfile) -> dict[str, Any]:
    # The shape read_field (and so a change's `from`) gives a SecurityProfile.
    return MessageToDict(profile, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def resources_dict(resources: api_pb2.LinuxContainerResources) -> dict[str, Any]:
    """The fields the kubelet set, by proto name: numbers, strings, hugepage_limits [{page_size, limit}],
    unified {key: value}."""
    out: dict[str, Any] = {}
    for descriptor, value in resources.ListFields():
        if descriptor.name == "hugepage_limits":
            out["hugepage_limits"] = [{"page_size": h.page_size, "limit": h.limit} for h in value]
        elif descriptor.name == "unified":
            out["unified"] = dict(sorted(value.items()))
        else:
            out[descriptor.name] = value
    return out


def _request_dict(method: str, fields: tuple[Any, ...]) -> dict[str, Any]:
    def seccomp(data: bytes | None) -> dict[str, Any] | None:
        return None if data is None else _seccomp_dict(api_pb2.SecurityProfile.FromString(data))

    def resources(data: bytes) -> dict[str, Any]:
        return resources_dict(api_pb2.LinuxContainerResources.FromString(data))

    if method == RUN_POD_SANDBOX:
        return {"runtime_handler": fields[0], "seccomp": seccomp(fields[1])}
    if method == CREATE_CONTAINER:
        return {"seccomp": seccomp(fields[0]), "resources": resources(fields[1])}
    return {"resources": resources(fields[0])}


def _sorted(mapping: Mapping[str, str]) -> dict[str, str]:
    return dict(sorted(mapping.items()))


def decision_dict(d: Decision) -> dict[str, str]:
    """A decision as `criproxy explain -o json` shows it."""
    return {"action": d.action, "rule": d.rule, "mode": d.mode, "interceptor": d.interceptor, "setting": d.setting,
            "key": d.key, "value": d.value, "reason": d.reason}


def change_dict(change: Change, before: Any) -> dict[str, Any]:
    """A change applied, as `criproxy explain -o json` shows it."""
    return {"field": change.path, "from": before, "to": change.value, "by": change.by, "key": change.key or "(config)"}


def _timestamp(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode(snapshot: _Snapshot, node: str, domain: str) -> str:
    """The record's line (without its newline)."""
    ctx, pod = snapshot.ctx, snapshot.ctx.pod
    record: dict[str, Any] = {
        "v": VERSION, "time": _timestamp(snapshot.time), "node": node, "pod": pod.name, "uid": pod.uid,
        "namespace": pod.namespace, "method": ctx.method, "container": ctx.container,
        "labels": _sorted(pod.labels),
        "annotations": {k: v for k, v in sorted(pod.annotations.items()) if read_by_criproxy(k, domain)},
        "pinned": None if ctx.pinned is None else _sorted(ctx.pinned),
        "request": _request_dict(ctx.method, snapshot.fields),
        "runtime": None if ctx.runtime.handlers is None else {
            "handlers": sorted(ctx.runtime.handlers), "source": ctx.runtime.handlers_source},
        "policy": snapshot.policy, "rule": snapshot.rule, "mode": snapshot.mode}
    result = snapshot.result
    if isinstance(result, CriProxyError):
        record.update(result="error", status=result.code.name, message=result.message, changes=[], decisions=[])
    elif result.denial is not None:
        record.update(result="denied", status=result.denial.code.name, message=result.denial.reason, changes=[],
                      decisions=[decision_dict(d) for d in result.decisions])
    else:
        request = request_of(record)  # the judged fields as they were: what each change replaced
        record.update(result="allowed", status="OK", message="",
                      changes=[change_dict(c, read_field(request, c.path)) for c in result.effective],
                      decisions=[decision_dict(d) for d in result.decisions])
    return _JSON.encode(record)


class _Line:
    """A record waiting in the queue; encoded (str) on the writer thread."""

    __slots__ = ("snapshot", "writer")

    def __init__(self, writer: Recorder, snapshot: _Snapshot) -> None:
        self.writer, self.snapshot = writer, snapshot

    def __str__(self) -> str:
        return encode(self.snapshot, self.writer.node, self.writer.domain)


class RecordFile(logging.Handler):
    """Appends each record's line to `path` with one write(2), rotating the file past `max_bytes` (`backups`
    old files kept, FILE.1 the newest); created 0600, like the decision log. A line that cannot be written
    whole is taken back (the file cut where it began) and reported to `failed`, which also hears of lines
    that cannot be encoded; after a failure the file is opened again for the next line. The first open
    happens here, so a path that cannot be opened at all is an OSError at start."""

    def __init__(self, path: Path, *, max_bytes: int, backups: int, failed: Callable[[str], None]) -> None:
        super().__init__()
        self.path, self.max_bytes, self.backups, self.failed = path, max_bytes, backups, failed
        self._fd: int | None = None
        self._rotates = False
        self._open()

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._fd, self._rotates = fd, stat.S_ISREG(os.fstat(fd).st_mode)  # /dev/full, a pipe: never rotated
        return fd

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)

    def _rotate(self) -> int:
        self._close()
        for i in range(self.backups - 1, 0, -1):
            older = Path(f"{self.path}.{i}")
            if older.exists():
                os.replace(older, f"{self.path}.{i + 1}")
        if self.backups > 0:
            os.replace(self.path, f"{self.path}.1")
        else:
            os.truncate(self.path, 0)
        return self._open()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (str(record.msg) + "\n").encode()
        except Exception as err:  # a bug in the encoding: this record is lost, the next ones are not
            log.exception("the recording cannot encode a record")
            self.failed(f"a record could not be encoded: {err!r}")
            return
        try:
            fd = self._fd if self._fd is not None else self._open()
            start = os.lseek(fd, 0, os.SEEK_END)
            if self._rotates and start and start + len(data) > self.max_bytes:
                fd = self._rotate()
                start = 0
            written = os.write(fd, data)
            if written != len(data):
                if self._rotates:
                    os.ftruncate(fd, start)  # no half line: replay would refuse the file
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
        except OSError as err:
            self._close()
            self.failed(f"cannot write {self.path}: {err.strerror or err}")

    def close(self) -> None:
        self._close()
        super().close()


class Drops:
    """Counts dropped records for metrics (`listener`, told of every drop) and says so in the log at most once a
    DROP_LOG_INTERVAL_S (the first drop at once; the count since the last line in each line). Thread-safe."""

    def __init__(self, where: str, *, interval: float = DROP_LOG_INTERVAL_S) -> None:
        self.where, self.interval = where, interval
        self.total = 0
        self.listener: Callable[[int], None] | None = None
        self._lock = threading.Lock()
        self._pending = 0
        self._last = -math.inf

    def add(self, count: int, why: str) -> None:
        now = time.monotonic()
        with self._lock:
            self.total += count
            self._pending += count
            due = now - self._last >= self.interval
            if due:
                said, self._pending, self._last = self._pending, 0, now
            listener = self.listener
        if listener is not None:
            listener(count)
        if due:
            self._say(said, why)

    def flush(self) -> None:
        """Say what was dropped since the last line (at stop)."""
        with self._lock:
            said, self._pending = self._pending, 0
        if said:
            self._say(said, "before the stop")

    def _say(self, count: int, why: str) -> None:
        log.warning("recording %s: %d record(s) dropped (%s); criproxy_record_dropped_total counts every one; "
                    "this is said at most once a minute", self.where, count, why)


class Recorder:
    """The pipeline's CallSink writing the recording (`criproxy serve --record FILE`). Never raises into a
    call: a record it cannot take is dropped and counted like one the queue has no room for."""

    def __init__(self, path: Path, *, node: str, domain: str, max_bytes: int = DEFAULT_MAX_BYTES,
                 backups: int = DEFAULT_BACKUPS, capacity: int = DEFAULT_CAPACITY) -> None:
        self.path, self.node, self.domain = path, node, domain
        self.drops = Drops(str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = RecordFile(path, max_bytes=max_bytes, backups=backups,
                               failed=lambda why: self.drops.add(1, why))
        self.background = BackgroundLog("record", self.file, capacity=capacity)
        self.background.on_drop = lambda name, count: self.drops.add(
            count, "its queue is full: the file is written slower than calls come")

    @property
    def dropped(self) -> int:
        return self.drops.total

    @property
    def on_drop(self) -> Callable[[int], None] | None:
        return self.drops.listener

    @on_drop.setter
    def on_drop(self, listener: Callable[[int], None] | None) -> None:
        self.drops.listener = listener

    def __call__(self, ctx: CallContext, result: Decided | CriProxyError, policy: Policy) -> None:
        try:
            rule, mode = policy.rule_of(ctx)
            snapshot = _Snapshot(time.time(), ctx, _judged(ctx), result, policy.identity, rule, mode)
            self.background.submit(_Line(self, snapshot))
        except Exception as err:  # never the call's business
            log.exception("the recording cannot take a record of %s for %s", ctx.method, ctx.who)
            self.drops.add(1, f"a record could not be taken: {err!r}")

    def close(self) -> None:
        """Write out every record taken so far, then close the file."""
        self.background.stop()
        self.drops.flush()


# ------------------------------------------------------------------------------------------- reading


class RecordError(ValueError):
    """A line that is not a version-1 record; the message says why (the reader adds file and line)."""


def parse(text: str) -> dict[str, Any]:
    """The record on one line (without its newline), with its version checked; RecordError when the line is
    not JSON, not an object, or of another version. The fields are checked by `check` (replay checks each
    distinct one once)."""
    try:
        record = json.loads(text)
    except ValueError as err:
        stripped = text.rstrip()
        if stripped.startswith("{") and not stripped.endswith("}"):
            raise RecordError("truncated: the line ends inside its record (a partly written line?)") from None
        raise RecordError(f"not JSON: {getattr(err, 'msg', err)} (column {getattr(err, 'colno', '?')})") from None
    if type(record) is not dict:
        raise RecordError(f"not a record: a JSON {type(record).__name__}, not an object")
    version = record.get("v")
    if version != VERSION or type(version) is not int:
        if "v" not in record:
            raise RecordError("not a criproxy recording: no format version (\"v\")")
        raise RecordError(f"recording format version {version!r}; this criproxy reads version {VERSION}")
    return record


def _expect(ok: bool, field: str, what: str, value: Any) -> None:
    if not ok:
        shown = json.dumps(value, default=str)
        raise RecordError(f"field {field}: expected {what}, got {shown if len(shown) <= 80 else shown[:77] + '...'}")


def _strings(value: Any, field: str) -> None:
    _expect(type(value) is dict and all(type(k) is str and type(v) is str for k, v in value.items()), field,
            "an object of strings", value)


def _check_seccomp(value: Any, field: str) -> None:
    if value is None:
        return
    _expect(type(value) is dict and value.get("profile_type") in _PROFILE_TYPES
            and type(value.get("localhost_ref", "")) is str and set(value) <= {"profile_type", "localhost_ref"},
            field, f"null or {{profile_type: {'|'.join(_PROFILE_TYPES)}, localhost_ref}}", value)


def _check_resources(value: Any, field: str) -> None:
    _expect(type(value) is dict, field, "an object", value)
    for key, item in value.items():
        where = f"{field}.{key}"
        if key in _INT_RESOURCES:
            _expect(type(item) is int, where, "an integer", item)
        elif key in _STR_RESOURCES:
            _expect(type(item) is str, where, "a string", item)
        elif key == "hugepage_limits":
            _expect(type(item) is list and all(type(h) is dict and set(h) == {"page_size", "limit"}
                                               and type(h["page_size"]) is str and type(h["limit"]) is int
                                               for h in item), where, "a list of {page_size, limit}", item)
        elif key == "unified":
            _strings(item, where)
        else:
            raise RecordError(f"field {where}: not a field of LinuxContainerResources")


def _check_list(value: Any, field: str, keys: frozenset[str]) -> None:
    _expect(type(value) is list and all(type(i) is dict and keys <= i.keys() for i in value), field,
            f"a list of objects with {', '.join(sorted(keys))}", value)


_CHANGE_KEYS = frozenset({"field", "to", "by", "key"})
_DECISION_KEYS = frozenset({"action", "rule", "mode", "setting", "key", "value", "reason"})
_STRING_FIELDS = ("time", "node", "namespace", "pod", "uid", "policy", "rule", "mode", "status", "message")


def check(record: Mapping[str, Any]) -> None:
    """RecordError naming the first field of a parsed record that is missing or of the wrong shape."""
    missing = [f for f in ("time", "node", "method", "namespace", "pod", "uid", "container", "labels",
                           "annotations", "pinned", "request", "runtime", "policy", "rule", "mode", "result",
                           "status", "message", "changes", "decisions") if f not in record]
    if missing:
        raise RecordError(f"missing field(s) {', '.join(missing)}")
    method = record["method"]
    _expect(method in METHODS, "method", "one of " + ", ".join(METHODS), method)
    for name in _STRING_FIELDS:
        _expect(type(record[name]) is str, name, "a string", record[name])
    container = record["container"]
    if method == RUN_POD_SANDBOX:
        _expect(container is None, "container", "null for RunPodSandbox", container)
    else:
        _expect(type(container) is str and container != "", "container", "a container name", container)
    _strings(record["labels"], "labels")
    _strings(record["annotations"], "annotations")
    if record["pinned"] is not None:
        _strings(record["pinned"], "pinned")
    request = record["request"]
    fields = REQUEST_FIELDS[method]
    _expect(type(request) is dict and set(request) == set(fields), "request",
            f"an object of {', '.join(fields)} for {method.split('/')[1]}", request)
    if "runtime_handler" in request:
        _expect(type(request["runtime_handler"]) is str, "request.runtime_handler", "a string",
                request["runtime_handler"])
    if "seccomp" in request:
        _check_seccomp(request["seccomp"], "request.seccomp")
    if "resources" in request:
        _check_resources(request["resources"], "request.resources")
    runtime = record["runtime"]
    _expect(runtime is None or (type(runtime) is dict and type(runtime.get("handlers")) is list
                                and all(type(h) is str for h in runtime["handlers"])
                                and type(runtime.get("source", "")) is str),
            "runtime", "null or {handlers: [names], source}", runtime)
    _expect(record["result"] in RESULTS, "result", "one of " + ", ".join(RESULTS), record["result"])
    _check_list(record["changes"], "changes", _CHANGE_KEYS)
    _check_list(record["decisions"], "decisions", _DECISION_KEYS)


def _pod_config(record: Mapping[str, Any], name: str) -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, namespace=record["namespace"], uid=record["uid"]),
        labels=record["labels"], annotations=record["annotations"])


def _set_seccomp(security: Any, profile: Mapping[str, Any] | None) -> None:
    if profile is not None:
        security.seccomp.SetInParent()
        security.seccomp.profile_type = api_pb2.SecurityProfile.ProfileType.Value(profile["profile_type"])
        security.seccomp.localhost_ref = profile.get("localhost_ref", "")


def _resources(value: Mapping[str, Any]) -> api_pb2.LinuxContainerResources:
    plain = {k: v for k, v in value.items() if k not in ("hugepage_limits", "unified")}
    out = api_pb2.LinuxContainerResources(**plain, unified=value.get("unified", {}))
    for limit in value.get("hugepage_limits", ()):
        out.hugepage_limits.add(page_size=limit["page_size"], limit=limit["limit"])
    return out


#: The ids a rebuilt request carries: replay's container index knows its pod by these (criproxy.replay).
SANDBOX_ID = CONTAINER_ID = "recorded"


def request_of(record: Mapping[str, Any], name: str | None = None) -> Message:
    """The request a (checked) record was decided on, rebuilt with what it holds: the pod's sandbox config
    (metadata, labels, the annotations kept) and the judged fields; `name` replaces the pod's name."""
    method, request = record["method"], record["request"]
    pod_name = record["pod"] if name is None else name
    if method == RUN_POD_SANDBOX:
        sandbox = _pod_config(record, pod_name)
        _set_seccomp(sandbox.linux.security_context, request["seccomp"])
        return api_pb2.RunPodSandboxRequest(config=sandbox, runtime_handler=request["runtime_handler"])
    if method == CREATE_CONTAINER:
        config = api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name=record["container"]))
        config.linux.resources.CopyFrom(_resources(request["resources"]))
        _set_seccomp(config.linux.security_context, request["seccomp"])
        return api_pb2.CreateContainerRequest(pod_sandbox_id=SANDBOX_ID, config=config,
                                              sandbox_config=_pod_config(record, pod_name))
    return api_pb2.UpdateContainerResourcesRequest(container_id=CONTAINER_ID, linux=_resources(request["resources"]))


def facts_of(record: Mapping[str, Any]) -> RuntimeFacts:
    runtime = record["runtime"]
    if runtime is None:
        return RuntimeFacts()
    return RuntimeFacts(frozenset(runtime["handlers"]), runtime.get("source", ""))


def pinned_text(record: Mapping[str, Any]) -> str | None:
    """The record's pinned annotations as the sandbox carries them (`<domain>/pinned`), or None."""
    pinned = record["pinned"]
    return None if pinned is None else json.dumps(pinned, sort_keys=True, separators=(",", ":"))
