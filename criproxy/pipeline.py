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
- An annotation an interceptor cannot use fails the call with INVALID_ARGUMENT naming the pod,
  the key, the raw value and what is accepted; a denial fails it with the denial's code. A
  failed call is never sent to the runtime.
- An interceptor that raises anything else, or runs past its deadline, fails the call closed
  (INTERNAL / DEADLINE_EXCEEDED) unless policy says that interceptor fails open (then its
  adjustment is skipped and the skip recorded). A synchronous interceptor cannot be stopped
  while it runs: its overrun is judged when it returns. One that may block must be async.
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
from dataclasses import dataclass, replace
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import Message

from criproxy.adjust import NOTHING, Adjustment, Change, Denial, apply_change, provenance, read_field
from criproxy.annotations import Lookup
from criproxy.api.runtime.v1 import api_pb2
from criproxy.context import (
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
from criproxy.policies import DENIED, FAILED_OPEN, AllowAll, Decision, Policy
from criproxy.policies.engine import pinned_annotations
from criproxy.relay import Call
from criproxy.state import Caller, ContainerIndex, ContainerInfo, discover_runtime_facts, pod_info

log = logging.getLogger(__name__)

REMOVE_CONTAINER = "RuntimeService/RemoveContainer"
REMOVE_POD_SANDBOX = "RuntimeService/RemovePodSandbox"
_ERRORS: dict[Any, type[CriProxyError]] = {e.code: e for e in (InvalidArgument, PermissionDenied, FailedPrecondition)}

#: Receives every call's decisions (the decision log and metrics subscribe here).
DecisionSink = Callable[[CallContext, Sequence[Decision]], None]


def all_of(*sinks: DecisionSink) -> DecisionSink:
    """One sink that hands the decisions to each of `sinks` in turn."""
    def send(ctx: CallContext, decisions: Sequence[Decision]) -> None:
        for sink in sinks:
            sink(ctx, decisions)
    return send


def metrics_sink(metrics: Metrics) -> DecisionSink:
    def count(ctx: CallContext, decisions: Sequence[Decision]) -> None:
        for d in decisions:
            by = d.change.by if d.change is not None else (d.setting if d.action == FAILED_OPEN else "policy")
            metrics.decision(by, d.rule, d.action, d.setting)
    return count


def log_decisions(ctx: CallContext, decisions: Sequence[Decision]) -> None:
    for d in decisions:
        log.info("%s %s: %s %s%s (rule %s, %s mode): %s", ctx.method, ctx.who, d.action, d.setting or "call",
                 f" {d.key}={d.value!r}" if d.key else "", d.rule or "-", d.mode, d.reason)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the pipeline decided for one call: the context as interceptors saw it (with policy
    defaults), the changes to apply, a denial, and every decision."""

    ctx: CallContext
    changes: tuple[Change, ...]
    denial: Denial | None
    decisions: tuple[Decision, ...]
    modify: bool = True


class Pipeline:
    """The relay's Hooks for the enabled interceptors."""

    def __init__(self, interceptors: Sequence[Interceptor], *, lookup: Lookup, policy: Policy | None = None,
                 index: ContainerIndex | None = None, caller: Caller | None = None,
                 on_decisions: DecisionSink = log_decisions,
                 on_context: Callable[[CallContext], None] | None = None) -> None:
        self.interceptors = tuple(interceptors)
        self.lookup = lookup
        #: The policy in force; replaced whole (never mutated) on reload, read once per call.
        self.policy: Policy = policy if policy is not None else AllowAll()
        self.index = index if index is not None else ContainerIndex()
        self.caller = caller
        self.on_decisions = on_decisions
        #: Told of every intercepted call's context (tracing puts the pod on the call's span).
        self.on_context = on_context
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
        ctx = await self._context(call.method.key, request)
        if ctx is None:
            return None
        if self.on_context is not None:
            self.on_context(ctx)
        outcome = await self.decide(ctx)
        if outcome.decisions:
            self.on_decisions(outcome.ctx, outcome.decisions)
        if outcome.denial is not None:
            raise _denied(outcome.denial)
        if not outcome.modify:
            return None  # dry-run: the runtime gets exactly what the kubelet sent
        changed = False
        if ctx.method == RUN_POD_SANDBOX:
            changed = self._pin(outcome.ctx, request)
        if outcome.changes:
            self._apply(outcome.ctx, request, list(outcome.changes))
            changed = True
        return request if changed else None

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
        skipped: list[Decision] = []
        results = [(i, await self._run(i, ctx, policy, skipped)) for i in self._by_event.get(ctx.method, ())]
        for interceptor, adjustment in results:
            if adjustment.denial is not None:
                denied = Decision(DENIED, "", "", interceptor.name, "", "", adjustment.denial.reason)
                return Outcome(ctx, (), adjustment.denial, (*skipped, denied))
        changes = self._merge(ctx, results)
        review = policy.review(ctx, changes)
        return Outcome(ctx, review.changes, review.denial, (*skipped, *review.decisions), review.modify)

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

    async def after(self, call: Call, request: Message, response: bytes) -> None:
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

    async def _context(self, key: str, request: Any) -> CallContext | None:
        if key == RUN_POD_SANDBOX:
            c = request.config
            return CallContext(key, pod_info(c.metadata, c.labels, c.annotations), None, request, self.facts)
        if key == CREATE_CONTAINER:
            s = request.sandbox_config
            return CallContext(key, pod_info(s.metadata, s.labels, s.annotations), request.config.metadata.name,
                               request, self.facts, pinned=self._pinned(request.pod_sandbox_id))
        assert key == UPDATE_CONTAINER_RESOURCES
        info = self.index.container(request.container_id)
        if info is None and self.caller is not None:
            info = await self.index.resolve(request.container_id, self.caller)
        if info is None:
            log.warning("UpdateContainerResources for unknown container %s: forwarded unchanged (the runtime "
                        "decides)", request.container_id)
            return None
        return CallContext(key, info.pod, info.name, request, self.facts, pinned=self._pinned(info.sandbox_id))

    def _pinned(self, sandbox_id: str) -> dict[str, str] | None:
        sandbox = self.index.sandbox(sandbox_id)
        text = sandbox.annotations.get(self._pinned_key) if sandbox is not None else None
        if text is None:
            return None
        try:
            pinned = json.loads(text)
        except (ValueError, RecursionError):
            return None
        return {str(k): str(v) for k, v in pinned.items()} if isinstance(pinned, dict) else None

    async def _run(self, interceptor: Interceptor, ctx: CallContext, policy: Policy,
                   skipped: list[Decision]) -> Adjustment:
        failure = policy.failure(interceptor.name)
        started = time.monotonic()
        try:
            result: Any = interceptor.adjust(ctx)
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, failure.timeout_seconds)
            elif time.monotonic() - started > failure.timeout_seconds:
                raise TimeoutError
            assert isinstance(result, Adjustment), f"{interceptor.name} returned {result!r}, not an Adjustment"
            return result
        except InvalidAnnotation as err:  # the pod's fault, not the interceptor's: never fails open
            raise InvalidArgument(f"criproxy: {ctx.who}: {err}") from err
        except TimeoutError as err:
            why = f"ran past its {failure.timeout_seconds:g} s deadline"
            if failure.on_error == "open":
                return self._failed_open(interceptor, ctx, why, skipped)
            raise DeadlineExceeded(f"criproxy: interceptor {interceptor.name} {why} on {ctx.who}; the call was "
                                   "not forwarded") from err
        except Exception as err:
            log.exception("interceptor %s failed on %s for %s", interceptor.name, ctx.method, ctx.who)
            if failure.on_error == "open":
                return self._failed_open(interceptor, ctx, f"failed: {err!r}", skipped)
            raise Internal(f"criproxy: interceptor {interceptor.name} failed on {ctx.who}: {err!r}; the call was "
                           "not forwarded") from err

    @staticmethod
    def _failed_open(interceptor: Interceptor, ctx: CallContext, why: str, skipped: list[Decision]) -> Adjustment:
        log.warning("interceptor %s %s on %s for %s; failing open (its adjustment is skipped)", interceptor.name,
                    why, ctx.method, ctx.who)
        skipped.append(Decision(FAILED_OPEN, "", "", interceptor.name, "", "", f"interceptor {why}"))
        return NOTHING

    def _merge(self, ctx: CallContext, results: list[tuple[Interceptor, Adjustment]]) -> list[Change]:
        owners: dict[str, Change] = {}
        for interceptor, adjustment in results:
            for warning in adjustment.warnings:
                log.warning("%s: %s", interceptor.name, warning)
            for change in adjustment.changes:
                mine = replace(change, by=interceptor.name)
                other = owners.get(change.path)
                if other is not None:
                    raise FailedPrecondition(
                        f"criproxy: {ctx.who}: interceptors {other.by} and {interceptor.name} both set "
                        f"{change.path} ({other.value!r} from {other.key or 'config'}, {change.value!r} from "
                        f"{change.key or 'config'}); disable one of them or remove one annotation")
                owners[change.path] = mine
        return list(owners.values())

    def _apply(self, ctx: CallContext, request: Any, changes: list[Change]) -> None:
        before = {c.path: read_field(request, c.path) for c in changes}
        for change in changes:
            apply_change(request, change)
        stamp = provenance(changes, before)
        if ctx.method == UPDATE_CONTAINER_RESOURCES:
            request.annotations[self._applied_key] = stamp
            return
        request.config.annotations[self._applied_key] = stamp

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
