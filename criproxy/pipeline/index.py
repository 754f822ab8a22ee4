"""What the proxy remembers about the node, all of it rebuilt from the runtime (nothing on disk).

- ContainerIndex: container id -> its pod and name. UpdateContainerResources carries only a
  container id, so the resources interceptor needs this to find the annotations that apply.
  Filled from CreateContainer results, emptied by RemoveContainer/RemovePodSandbox, rebuilt
  from ListPodSandbox + ListContainers at start and after every reconnect, and bounded: past
  `max_entries` (per table: containers, sandboxes) the least recently used entry goes, every lookup
  counting as a use. An evicted container or sandbox is looked up in the runtime when it is needed
  again (ListContainers, PodSandboxStatus), so eviction never turns a drift check off. Evictions
  are counted (`evictions`, per table; `on_evict`), logged at debug, and warned about rarely.
- RuntimeFacts: the runtime handlers the runtime has, read from its Status.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import Message

from criproxy.api.runtime.v1 import api_pb2
from criproxy.cri.context import PodInfo, RuntimeFacts

log = logging.getLogger(__name__)

#: Call a CRI method (by key, e.g. 'RuntimeService/Status') on the runtime as the proxy itself.
Caller = Callable[[str, Message], Awaitable[Any]]
DEFAULT_MAX_ENTRIES = 65_536


@dataclass(frozen=True, slots=True)
class ContainerInfo:
    sandbox_id: str
    name: str
    pod: PodInfo


def pod_info(metadata: Any, labels: Any, annotations: Any) -> PodInfo:
    return PodInfo(namespace=metadata.namespace, name=metadata.name, uid=metadata.uid, labels=dict(labels),
                   annotations=dict(annotations))


#: Told of every eviction: (table, id), table being 'container' or 'sandbox'.
EvictionListener = Callable[[str, str], None]


class ContainerIndex:
    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, *, on_evict: EvictionListener | None = None) -> None:
        self.max_entries = max_entries
        self._containers: OrderedDict[str, ContainerInfo] = OrderedDict()
        self._sandboxes: OrderedDict[str, PodInfo] = OrderedDict()
        #: Entries evicted so far because the table was full, per table ('container', 'sandbox').
        self.evictions: dict[str, int] = {"container": 0, "sandbox": 0}
        #: Called on every eviction (metrics subscribe here).
        self.on_evict = on_evict

    def __len__(self) -> int:
        return len(self._containers)

    def add_sandbox(self, sandbox_id: str, pod: PodInfo) -> None:
        self._put("sandbox", self._sandboxes, sandbox_id, pod)

    def add_container(self, container_id: str, info: ContainerInfo) -> None:
        self._put("container", self._containers, container_id, info)

    def _put(self, kind: str, table: OrderedDict[str, Any], key: str, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.max_entries:
            evicted, _ = table.popitem(last=False)
            self.evictions[kind] += 1
            log.debug("container index full: evicted %s %s (least recently used)", kind, evicted)
            if self.on_evict is not None:
                self.on_evict(kind, evicted)
            total = sum(self.evictions.values())
            if total in (1, 1000) or total % 100_000 == 0:
                log.warning("container index full (%d entries per table): evicted %d least recently used so far "
                            "(%s); evicted entries are looked up in the runtime when needed (--container-cache-size)",
                            self.max_entries, total, ", ".join(f"{n} {k}s" for k, n in self.evictions.items()))

    def container(self, container_id: str) -> ContainerInfo | None:
        info = self._containers.get(container_id)
        if info is not None:
            self._containers.move_to_end(container_id)
        return info

    def sandbox(self, sandbox_id: str) -> PodInfo | None:
        pod = self._sandboxes.get(sandbox_id)
        if pod is not None:
            self._sandboxes.move_to_end(sandbox_id)
        return pod

    def remove_container(self, container_id: str) -> None:
        self._containers.pop(container_id, None)

    def remove_sandbox(self, sandbox_id: str) -> None:
        self._sandboxes.pop(sandbox_id, None)
        for cid in [cid for cid, info in self._containers.items() if info.sandbox_id == sandbox_id]:
            del self._containers[cid]

    async def rebuild(self, call: Caller) -> None:
        """Replace the contents with what the runtime lists now."""
        sandboxes = await call("RuntimeService/ListPodSandbox", api_pb2.ListPodSandboxRequest())
        containers = await call("RuntimeService/ListContainers", api_pb2.ListContainersRequest())
        pods = {s.id: pod_info(s.metadata, s.labels, s.annotations) for s in sandboxes.items}
        self._sandboxes.clear()
        self._containers.clear()
        for sandbox_id, pod in pods.items():
            self.add_sandbox(sandbox_id, pod)
        for c in containers.containers:
            owner = pods.get(c.pod_sandbox_id)
            if owner is not None:
                self.add_container(c.id, ContainerInfo(c.pod_sandbox_id, c.metadata.name, owner))
        log.info("container index rebuilt from the runtime: %d pods, %d containers", len(pods), len(self))

    async def resolve(self, container_id: str, call: Caller) -> ContainerInfo | None:
        """The container's info, asking the runtime when it is not (or no longer) indexed."""
        info = self.container(container_id)
        if info is not None:
            return info
        try:
            listed = await call("RuntimeService/ListContainers", api_pb2.ListContainersRequest(
                filter=api_pb2.ContainerFilter(id=container_id)))
            container = next(iter(listed.containers), None)
            if container is None:
                return None
            sandbox = await call("RuntimeService/PodSandboxStatus",
                                 api_pb2.PodSandboxStatusRequest(pod_sandbox_id=container.pod_sandbox_id))
        except grpc.aio.AioRpcError as err:
            log.warning("cannot look up container %s in the runtime: %s: %s", container_id, err.code().name,
                        err.details())
            return None
        s = sandbox.status
        info = ContainerInfo(container.pod_sandbox_id, container.metadata.name,
                             pod_info(s.metadata, s.labels, s.annotations))
        self.add_container(container_id, info)
        return info


    async def resolve_sandbox(self, sandbox_id: str, call: Caller) -> PodInfo | None:
        """The sandbox's pod (with the annotations it was created with), asking the runtime when it is
        not (or no longer) indexed; None when the runtime does not know it either."""
        pod = self.sandbox(sandbox_id)
        if pod is not None:
            return pod
        try:
            status = (await call("RuntimeService/PodSandboxStatus",
                                 api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id))).status
        except grpc.aio.AioRpcError as err:
            log.warning("cannot look up pod sandbox %s in the runtime: %s: %s", sandbox_id, err.code().name,
                        err.details())
            return None
        pod = pod_info(status.metadata, status.labels, status.annotations)
        self.add_sandbox(sandbox_id, pod)
        return pod


async def discover_runtime_facts(call: Caller) -> RuntimeFacts:
    """The runtime handlers: Status.runtime_handlers, else containerd's verbose config; else unknown."""
    try:
        status = await call("RuntimeService/Status", api_pb2.StatusRequest(verbose=True))
    except grpc.aio.AioRpcError as err:
        log.warning("cannot read the runtime's Status: %s: %s", err.code().name, err.details())
        return RuntimeFacts()
    names = {h.name for h in status.runtime_handlers if h.name}
    if names:
        return RuntimeFacts(frozenset(names), "the runtime's Status.runtime_handlers")
    try:
        runtimes = json.loads(status.info.get("config", "{}")).get("containerd", {}).get("runtimes", {})
    except (ValueError, AttributeError):
        runtimes = {}
    if isinstance(runtimes, dict) and runtimes:
        return RuntimeFacts(frozenset(str(k) for k in runtimes), "the runtimes in containerd's config")
    return RuntimeFacts()
