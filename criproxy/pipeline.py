"""The pipeline: runs the enabled interceptors on the calls they subscribe to, merges what they
propose, has policy review it, and applies it to the request before it goes upstream.

Notes:
- Only methods some interceptor subscribes to are decoded (plus RemoveContainer and
  RemovePodSandbox, to keep the container index, when an interceptor needs the index).
- Interceptors run in the configured order. Each returns an Adjustment; the pipeline records
  who proposed each change, and two interceptors setting the same field is a conflict that
  fails the call (FAILED_PRECONDITION) naming both: the configuration must decide.
- An annotation an interceptor cannot use fails the call with INVALID_ARGUMENT naming the pod,
  the key, the raw value and what is accepted; a denial fails it with the denial's code. A
  failed call is never sent to the runtime.
- An interceptor that raises anything else fails the call closed (INTERNAL): a request the
  proxy could not check is never forwarded.
- What was applied is stamped on the request as the `<domain>/applied` annotation (JSON), so
  `crictl inspectp` / `crictl inspect` show who changed which field, from what, to what.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import Message

from criproxy.adjust import Adjustment, Change, Denial, apply_change, provenance, read_field
from criproxy.annotations import Lookup
from criproxy.api.runtime.v1 import api_pb2
from criproxy.context import (
    CREATE_CONTAINER,
    RUN_POD_SANDBOX,
    UPDATE_CONTAINER_RESOURCES,
    CallContext,
    PodInfo,
    RuntimeFacts,
)
from criproxy.errors import CriProxyError, FailedPrecondition, Internal, InvalidArgument, PermissionDenied
from criproxy.interceptors.base import Interceptor, InvalidAnnotation
from criproxy.policies import AllowAll, Policy
from criproxy.relay import Call
from criproxy.state import Caller, ContainerIndex, ContainerInfo, discover_runtime_facts, pod_info

log = logging.getLogger(__name__)

REMOVE_CONTAINER = "RuntimeService/RemoveContainer"
REMOVE_POD_SANDBOX = "RuntimeService/RemovePodSandbox"
_ERRORS: dict[Any, type[CriProxyError]] = {e.code: e for e in (InvalidArgument, PermissionDenied, FailedPrecondition)}


class Pipeline:
    """The relay's Hooks for the enabled interceptors."""

    def __init__(self, interceptors: Sequence[Interceptor], *, lookup: Lookup, policy: Policy | None = None,
                 index: ContainerIndex | None = None, caller: Caller | None = None) -> None:
        self.interceptors = tuple(interceptors)
        self.lookup = lookup
        self.policy: Policy = policy if policy is not None else AllowAll()
        self.index = index if index is not None else ContainerIndex()
        self.caller = caller
        #: What the runtime told of itself; replaced (not mutated) on every reconnect.
        self.facts = RuntimeFacts()
        events = frozenset().union(*(i.events for i in self.interceptors))
        self.uses_index = UPDATE_CONTAINER_RESOURCES in events
        indexing = {CREATE_CONTAINER, RUN_POD_SANDBOX, REMOVE_CONTAINER, REMOVE_POD_SANDBOX}
        self.decoded: frozenset[str] = events | (indexing if self.uses_index else set())
        self._by_event = {e: tuple(i for i in self.interceptors if e in i.events) for e in events}
        self._applied_key = f"{lookup.domain}/applied"

    async def before(self, call: Call, request: Message) -> Message:
        key = call.method.key
        interceptors = self._by_event.get(key)
        if not interceptors:
            return request
        ctx = await self._context(key, request)
        if ctx is None:
            return request
        changes = self._merge(ctx, [(i, self._run(i, ctx)) for i in interceptors])
        review = self.policy.review(ctx, changes)
        if review.denial is not None:
            raise _denied(review.denial)
        if review.changes:
            self._apply(ctx, request, list(review.changes))
        return request

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
                               request, self.facts)
        if key == UPDATE_CONTAINER_RESOURCES:
            info = self.index.container(request.container_id)
            if info is None and self.caller is not None:
                info = await self.index.resolve(request.container_id, self.caller)
            if info is None:
                log.warning("UpdateContainerResources for unknown container %s: forwarded unchanged (the runtime "
                            "decides)", request.container_id)
                return None
            return CallContext(key, info.pod, info.name, request, self.facts)
        return CallContext(key, PodInfo("", "", ""), None, request, self.facts)

    def _run(self, interceptor: Interceptor, ctx: CallContext) -> Adjustment:
        try:
            return interceptor.adjust(ctx)
        except InvalidAnnotation as err:
            raise InvalidArgument(f"criproxy: {ctx.who}: {err}") from err
        except Exception as err:
            log.exception("interceptor %s failed on %s for %s", interceptor.name, ctx.method, ctx.who)
            raise Internal(f"criproxy: interceptor {interceptor.name} failed on {ctx.who}: {err!r}; the call was "
                           "not forwarded") from err

    def _merge(self, ctx: CallContext, results: list[tuple[Interceptor, Adjustment]]) -> list[Change]:
        owners: dict[str, Change] = {}
        for interceptor, adjustment in results:
            for warning in adjustment.warnings:
                log.warning("%s: %s", interceptor.name, warning)
            if adjustment.denial is not None:
                raise _denied(adjustment.denial)
            for change in adjustment.changes:
                mine = Change(change.path, change.value, change.setting, change.key, change.raw, interceptor.name)
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
        else:
            request.config.annotations[self._applied_key] = stamp
        log.info("%s %s: applied %s", ctx.method, ctx.who,
                 ", ".join(f"{c.path}={c.value!r} (by {c.by} from {c.key or 'config'})" for c in changes))


def _denied(denial: Denial) -> CriProxyError:
    return _ERRORS.get(denial.code, PermissionDenied)(denial.reason)
