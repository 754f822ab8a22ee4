"""The pipeline: runs the enabled interceptors on the calls they subscribe to, merges what they
propose, has policy review it, and applies it to the request before it goes upstream.

Notes:
- Only methods some interceptor subscribes to are decoded, plus RunPodSandbox, CreateContainer,
  RemoveContainer and RemovePodSandbox to keep the container index (UpdateContainerResources
  carries only a container id; drift checks need the sandbox's pinned annotations).
- Policy first adds its defaults to the pod's annotations (the pod's own win). Interceptors then
  run in the configured order; each returns an Adjustment. The pipeline records who proposed
  each change; two interceptors setting the same field is a conflict that fails the call
  (FAILED_PRECONDITION) naming both: the configuration must decide.
- An annotation an interceptor cannot use is a rejection with INVALID_ARGUMENT naming the pod,
  the key, the raw value and what is accepted; an interceptor's denial is one with its own code.
  Rejections count by the mode of the rule that matches the pod, like policy's violations:
  enforce (and no policy file) fails the call with that code, and a failed call is never sent to
  the runtime; audit records them and goes on without the rejecting interceptor's adjustment;
  dry-run records them ("enforce would fail the call ...") and changes nothing.
- An interceptor that raises anything else, or runs past its deadline, fails the call closed
  (INTERNAL / DEADLINE_EXCEEDED) unless policy says that interceptor fails open (then its
  adjustment is skipped and the skip recorded). A synchronous interceptor cannot be stopped
  while it runs: its overrun is judged when it returns. One that may block must be async.
  In dry-run nothing fails the call: failing closed and conflicts are recorded instead.
- Policy reviews the merged changes once, with the pod and the rule that matches it.
- What was applied is stamped on the request as the `<domain>/applied` annotation (JSON), so
  `crictl inspectp` / `crictl inspect` show who changed which field, from what, to what. A
  sandbox whose pod carries criproxy annotations also gets `<domain>/pinned`: those annotations
  as they were, so later changes to them (drift) can be told apart.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import Message

from criproxy.api.runtime.v1 import api_pb2
from criproxy.cri.adjust import NOTHING, Adjustment, Change, Denial, apply_change, provenance, read_field
from criproxy.cri.annotations import Lookup, setting_of
from criproxy.cri.context import (
    CREATE_CONTAINER,
    RUN_POD_SANDBOX,
    UPDATE_CONTAINER_RESOURCES,
    CallContext,
    RuntimeFacts,
)
from criproxy.errors import (
    CriProxyError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    PermissionDenied,
)
from criproxy.interceptors.base import Interceptor, InvalidAnnotation
from criproxy.metrics import Metrics
from criproxy.pipeline.index import Caller, ContainerIndex, ContainerInfo, discover_runtime_facts, pod_info
from criproxy.policies import AUDITED, DENIED, DRY_RUN, FAILED_OPEN, AllowAll, Decision, Policy
from criproxy.policies.engine import pinned_annotations
from criproxy.policies.model import FailurePolicy
from criproxy.seam import Call

log = logging.getLogger(__name__)

REMOVE_CONTAINER = "RuntimeService/RemoveContainer"
REMOVE_POD_SANDBOX = "RuntimeService/RemovePodSandbox"
_ERRORS: dict[Any, type[CriProxyError]] = {e.code: e for e in (InvalidArgument, PermissionDenied, FailedPrecondition)}
#: Modes in which what an interceptor rejects is recorded instead of failing the call.
LENIENT = frozenset({"audit", "dry-run"})

#: Receives every call's decisions (the decision log and metrics subscribe here).
DecisionSink = Callable[[CallContext, Sequence[Decision]], None]
#: Told of every decided call, whether it had decisions or not (the recording subscribes here): the context
#: as the call brought it (before policy defaults), what was decided (the Outcome, or the CriProxyError that
#: failed the call), and the policy that decided it.
CallSink = Callable[[CallContext, "Outcome | CriProxyError", Policy], None]


def all_of(*sinks: DecisionSink) -> DecisionSink:
    """One sink that hands the decisions to each of `sinks` in turn."""
    def send(ctx: CallContext, decisions: Sequence[Decision]) -> None:
        for sink in sinks:
            sink(ctx, decisions)
    return send


def metrics_sink(metrics: Metrics) -> DecisionSink:
    def count(ctx: CallContext, decisions: Sequence[Decision]) -> None:
        for d in decisions:
            metrics.decision(d.interceptor or "policy", d.rule, d.action, d.setting)
    return count


def log_decisions(ctx: CallContext, decisions: Sequence[Decision]) -> None:
    """One main-log line per call, its decisions in order, separated by "; " (a call's decisions are
    read together, and one record per call keeps the event loop's logging cost flat)."""
    if not decisions or not log.isEnabledFor(logging.INFO):
        return
    log.info("%s %s: %s", ctx.method, ctx.who, "; ".join(
        f"{d.action} {d.setting or 'call'}{f' {d.key}={d.value!r}' if d.key else ''} (rule {d.rule or '-'}, "
        f"{d.mode} mode): {d.reason}" for d in decisions))


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the pipeline decided for one call: the context as interceptors saw it (with policy
    defaults), the changes to apply, a denial, and every decision."""

    ctx: CallContext
    changes: tuple[Change, ...]
    denial: Denial | None
    decisions: tuple[Decision, ...]
    modify: bool = True

    @property
    def effective(self) -> tuple[Change, ...]:
        """The changes the runtime gets, those `Pipeline.apply` makes: none when denied or in dry-run."""
        return self.changes if self.modify and self.denial is None else ()


class Pipeline:
    """The relay's Hooks for the enabled interceptors."""

    def __init__(self, interceptors: Sequence[Interceptor], *, lookup: Lookup, policy: Policy | None = None,
                 index: ContainerIndex | None = None, caller: Caller | None = None,
                 on_decisions: DecisionSink = log_decisions,
                 on_context: Callable[[CallContext], None] | None = None,
                 on_decided: CallSink | None = None) -> None:
        self.interceptors = tuple(interceptors)
        self.lookup = lookup
        #: The policy in force; replaced whole (never mutated) on reload, read once per call.
        self.policy: Policy = policy if policy is not None else AllowAll()
        self.index = index if index is not None else ContainerIndex()
        self.caller = caller
        self.on_decisions = on_decisions
        #: Told of every intercepted call's context (tracing puts the pod on the call's span).
        self.on_context = on_context
        #: Told of every decided call and its outcome (the recording); must not raise.
        self.on_decided = on_decided
        #: What the runtime told of itself; replaced (not mutated) on every reconnect.
        self.facts = RuntimeFacts()
        events = frozenset().union(*(i.events for i in self.interceptors))
        self.uses_index = bool(events)
        indexing = {CREATE_CONTAINER, RUN_POD_SANDBOX, REMOVE_CONTAINER, REMOVE_POD_SANDBOX}
        self.decoded: frozenset[str] = events | (indexing if self.uses_index else set())
        self._by_event = {e: tuple(i for i in self.interceptors if e in i.events) for e in events}
        self._applied_key = f"{lookup.domain}/applied"
        self._pinned_key = f"{lookup.domain}/pinned"

    async def before(self, call: Call, request: Message) -> Message | None:
        if call.method.key not in self._by_event:
            return None
        ctx = await self.context(call.method.key, request)
        if ctx is None:
            return None
        if self.on_context is not None:
            self.on_context(ctx)
        policy = self.policy  # the one decide() reads: nothing is awaited in between
        try:
            outcome = await self.decide(ctx)
        except CriProxyError as err:
            if self.on_decided is not None:
                self.on_decided(ctx, err, policy)
            raise
        if self.on_decided is not None:
            self.on_decided(ctx, outcome, policy)
        if outcome.decisions:
            self.on_decisions(outcome.ctx, outcome.decisions)
        if outcome.denial is not None:
            raise _denied(outcome.denial)
        _, changed = self.apply(outcome, request)
        return request if changed else None

    def apply(self, outcome: Outcome, request: Any) -> tuple[list[tuple[Change, Any]], bool]:
        """Make `request` what `outcome` decided (nothing in dry-run: the runtime gets exactly what
        the kubelet sent): a sandbox's pinned annotations, the changes, and the `applied` stamp.
        Returns each change applied with the value it replaced, and whether the request changed.
        `criproxy explain` shows a manifest's calls through this same code."""
        if not outcome.modify or outcome.denial is not None:
            return [], False
        changed = self._pin(outcome.ctx, request) if outcome.ctx.method == RUN_POD_SANDBOX else False
        if not outcome.effective:
            return [], changed
        return self._apply(outcome.ctx, request, list(outcome.effective)), True

    async def decide(self, ctx: CallContext) -> Outcome:
        """Everything the pipeline decides about one call, without changing the request.
        Raises CriProxyError for what fails the call outside policy (bad annotations, conflicts,
        interceptors failing closed)."""
        policy = self.policy  # one policy for the whole call, even if a reload lands meanwhile
        defaults = policy.defaults(ctx)
        if defaults:
            added = {k: v for k, v in defaults.items() if k not in ctx.pod.annotations}
            ctx = replace(ctx, pod=replace(ctx.pod, annotations={**ctx.pod.annotations, **added}),
                          injected=frozenset(added))
        judged = _Judged(ctx, *policy.rule_of(ctx))
        results = await self._run_all(judged, policy)
        if isinstance(results, Outcome):
            return results
        try:
            changes = self._merge(ctx, results)
        except _Conflict as err:
            if judged.mode != "dry-run":
                raise
            judged.would_fail(err.change.by, err, err.change.setting, err.change.key, err.change.raw)
            changes = []
        review = policy.review(ctx, changes)
        return Outcome(ctx, review.changes, review.denial, (*judged.noted, *review.decisions), review.modify)

    async def _run_all(self, judged: _Judged, policy: Policy) -> list[tuple[Interceptor, Adjustment]] | Outcome:
        """Every subscribed interceptor's adjustment, in order, without those that rejected the call in
        audit and dry-run; the Outcome denying the call for a rejection in enforce."""
        ctx, results = judged.ctx, []
        first: tuple[Interceptor, Denial] | None = None
        for interceptor in self._by_event.get(ctx.method, ()):
            try:
                adjustment = await self._run(interceptor, judged, policy.failure(interceptor.name))
            except InvalidAnnotation as err:  # the pod's fault, not the interceptor's: never fails open
                parsed = setting_of(err.key, self.lookup.domain)
                denial = Denial(f"criproxy: {ctx.who}: {err}", grpc.StatusCode.INVALID_ARGUMENT,
                                err.setting or (parsed[0] if parsed else ""), err.key, err.raw)
                if judged.mode not in LENIENT:
                    return judged.deny(interceptor, denial)  # at once: later interceptors do not run
                adjustment = denial.as_adjustment()
            if adjustment.denial is None:
                results.append((interceptor, adjustment))
            elif judged.mode in LENIENT:
                judged.let_through(interceptor, adjustment.denial)
            elif first is None:
                first = interceptor, adjustment.denial
        return judged.deny(*first) if first is not None else results

    async def refresh(self) -> None:
        """Re-learn the runtime (handlers) and the node (container index); called on every (re)connect."""
        if self.caller is None:
            return
        self.facts = await discover_runtime_facts(self.caller)
        if self.uses_index:
            try:
                await self.index.rebuild(self.caller)
            except grpc.aio.AioRpcError as err:
                log.warning("cannot rebuild the container index: %s: %s; containers will be looked up on demand",
                            err.code().name, err.details())

    def after(self, call: Call, request: Message, response: bytes) -> None:
        """Index what the runtime created and forget what it removed (nothing here waits)."""
        if not self.uses_index:
            return
        key = call.method.key
        if key == RUN_POD_SANDBOX:
            assert isinstance(request, api_pb2.RunPodSandboxRequest)
            sandbox_id = api_pb2.RunPodSandboxResponse.FromString(response).pod_sandbox_id
            c = request.config
            self.index.add_sandbox(sandbox_id, pod_info(c.metadata, c.labels, c.annotations))
        elif key == CREATE_CONTAINER:
            assert isinstance(request, api_pb2.CreateContainerRequest)
            container_id = api_pb2.CreateContainerResponse.FromString(response).container_id
            s = request.sandbox_config
            self.index.add_container(container_id, ContainerInfo(
                request.pod_sandbox_id, request.config.metadata.name, pod_info(s.metadata, s.labels, s.annotations)))
        elif key == REMOVE_CONTAINER:
            self.index.remove_container(getattr(request, "container_id", ""))
        elif key == REMOVE_POD_SANDBOX:
            self.index.remove_sandbox(getattr(request, "pod_sandbox_id", ""))

    async def context(self, key: str, request: Any) -> CallContext | None:
        """What the interceptors see of one decoded request; None: nothing to decide (an update of
        a container the index and the runtime do not know)."""
        if key == RUN_POD_SANDBOX:
            c = request.config
            return CallContext(key, pod_info(c.metadata, c.labels, c.annotations), None, request, self.facts)
        if key == CREATE_CONTAINER:
            s = request.sandbox_config
            return CallContext(key, pod_info(s.metadata, s.labels, s.annotations), request.config.metadata.name,
                               request, self.facts, pinned=await self._pinned(request.pod_sandbox_id))
        assert key == UPDATE_CONTAINER_RESOURCES
        info = self.index.container(request.container_id)
        if info is None and self.caller is not None:
            info = await self.index.resolve(request.container_id, self.caller)
        if info is None:
            log.warning("UpdateContainerResources for unknown container %s: forwarded unchanged (the runtime "
                        "decides)", request.container_id)
            return None
        return CallContext(key, info.pod, info.name, request, self.facts, pinned=await self._pinned(info.sandbox_id))

    async def _pinned(self, sandbox_id: str) -> dict[str, str] | None:
        """The criproxy annotations pinned on the sandbox at its creation; a sandbox the index no longer
        holds (evicted from a full one) is looked up in the runtime, so its drift check stays on."""
        sandbox = self.index.sandbox(sandbox_id)
        if sandbox is None and self.caller is not None and sandbox_id:
            sandbox = await self.index.resolve_sandbox(sandbox_id, self.caller)
        text = sandbox.annotations.get(self._pinned_key) if sandbox is not None else None
        if text is None:
            return None
        try:
            pinned = json.loads(text)
        except (ValueError, RecursionError):
            return None
        return {str(k): str(v) for k, v in pinned.items()} if isinstance(pinned, dict) else None

    @staticmethod
    async def _run(interceptor: Interceptor, judged: _Judged, failure: FailurePolicy) -> Adjustment:
        """The interceptor's adjustment; InvalidAnnotation passes through. One that raises or overruns
        fails the call closed, or is skipped (failing open; in dry-run)."""
        ctx = judged.ctx
        started = time.monotonic()
        try:
            result: Any = interceptor.adjust(ctx)
            if inspect.isawaitable(result):
                # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a cancellation that comes
                # as the awaitable finishes.
                async with asyncio.timeout(failure.timeout_seconds):
                    result = await result
            elif time.monotonic() - started > failure.timeout_seconds:
                raise TimeoutError
            assert isinstance(result, Adjustment), f"{interceptor.name} returned {result!r}, not an Adjustment"
            return result
        except InvalidAnnotation:
            raise
        except TimeoutError as err:
            why = f"ran past its {failure.timeout_seconds:g} s deadline"
            error: CriProxyError = DeadlineExceeded(
                f"criproxy: interceptor {interceptor.name} {why} on {ctx.who}; the call was not forwarded")
            cause: Exception = err
        except Exception as err:
            log.exception("interceptor %s failed on %s for %s", interceptor.name, ctx.method, ctx.who)
            why = f"failed: {err!r}"
            error = Internal(f"criproxy: interceptor {interceptor.name} failed on {ctx.who}: {err!r}; the call was "
                             "not forwarded")
            cause = err
        if failure.on_error == "open":
            log.warning("interceptor %s %s on %s for %s; failing open (its adjustment is skipped)", interceptor.name,
                        why, ctx.method, ctx.who)
            judged.noted.append(Decision(FAILED_OPEN, judged.rule, judged.mode, "", "", "",
                                         f"interceptor {why}", interceptor=interceptor.name))
            return NOTHING
        if judged.mode == "dry-run":
            judged.would_fail(interceptor.name, error)
            return NOTHING
        raise error from cause

    def _merge(self, ctx: CallContext, results: list[tuple[Interceptor, Adjustment]]) -> list[Change]:
        owners: dict[str, Change] = {}
        for interceptor, adjustment in results:
            for warning in adjustment.warnings:
                log.warning("%s: %s", interceptor.name, warning)
            for change in adjustment.changes:
                # What dataclasses.replace(change, by=...) makes, at a fraction of its cost.
                mine = Change(path=change.path, value=change.value, setting=change.setting, key=change.key,
                              raw=change.raw, by=interceptor.name, note=change.note)
                other = owners.get(change.path)
                if other is not None:
                    raise _Conflict(
                        f"criproxy: {ctx.who}: interceptors {other.by} and {interceptor.name} both set "
                        f"{change.path} ({other.value!r} from {other.key or 'config'}, {change.value!r} from "
                        f"{change.key or 'config'}); disable one of them or remove one annotation", mine)
                owners[change.path] = mine
        return list(owners.values())

    def _apply(self, ctx: CallContext, request: Any, changes: list[Change]) -> list[tuple[Change, Any]]:
        before = {c.path: read_field(request, c.path) for c in changes}
        for change in changes:
            apply_change(request, change)
        stamp = provenance(changes, before)
        if ctx.method == UPDATE_CONTAINER_RESOURCES:
            request.annotations[self._applied_key] = stamp
        else:
            request.config.annotations[self._applied_key] = stamp
        return [(c, before[c.path]) for c in changes]

    def _pin(self, ctx: CallContext, request: Any) -> bool:
        """Record on the sandbox the criproxy annotations its pod has now, replacing whatever the pod
        itself wrote under criproxy's reserved keys (<domain>/pinned, <domain>/applied): those are
        criproxy's to write. A pod with neither stays untouched. True when the request changed."""
        annotations = request.config.annotations
        forged = [key for key in (self._pinned_key, self._applied_key) if key in annotations]
        for key in forged:
            del annotations[key]
        pinned = pinned_annotations({k: v for k, v in ctx.pod.annotations.items() if k not in ctx.injected},
                                    self.lookup.domain)
        if pinned != "{}":
            annotations[self._pinned_key] = pinned
        return bool(forged) or pinned != "{}"


def _denied(denial: Denial) -> CriProxyError:
    return _ERRORS.get(denial.code, PermissionDenied)(denial.reason)


class _Conflict(FailedPrecondition):
    """Two interceptors set one field; `change` is the second one's."""

    def __init__(self, message: str, change: Change) -> None:
        super().__init__(message)
        self.change = change


@dataclass(slots=True)
class _Judged:
    """One call being decided: its context, the rule and mode judging it, and the decisions noted so
    far (failed-open skips, and what audit and dry-run let through)."""

    ctx: CallContext
    rule: str
    mode: str
    noted: list[Decision] = field(default_factory=list)

    def deny(self, interceptor: Interceptor, denial: Denial) -> Outcome:
        denied = Decision(DENIED, self.rule, self.mode, denial.setting, denial.key, denial.value, denial.reason,
                          interceptor=interceptor.name)
        return Outcome(self.ctx, (), denial, (*self.noted, denied))

    def let_through(self, interceptor: Interceptor, denial: Denial) -> None:
        """Record a rejection that audit or dry-run does not fail the call for."""
        if self.mode == "dry-run":
            action, reason = DRY_RUN, f"enforce would fail the call ({denial.code.name}): {denial.reason}"
        else:
            action, reason = AUDITED, (f"{denial.reason} (enforce would fail the call, {denial.code.name}; it goes "
                                       f"on without the {interceptor.name} adjustment)")
        self.noted.append(Decision(action, self.rule, self.mode, denial.setting, denial.key, denial.value, reason,
                                   interceptor=interceptor.name))

    def would_fail(self, interceptor: str, error: CriProxyError, setting: str = "", key: str = "",
                   value: str = "") -> None:
        """Record, in dry-run, what would have failed the call in enforce."""
        self.noted.append(Decision(DRY_RUN, self.rule, self.mode, setting, key, value,
                                   f"enforce would fail the call ({error.code.name}): {error.message}",
                                   interceptor=interceptor))
