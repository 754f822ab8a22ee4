"""What an interceptor is told about a call: the pod, the container, the request, the runtime."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from google.protobuf.message import Message

RUN_POD_SANDBOX = "RuntimeService/RunPodSandbox"
CREATE_CONTAINER = "RuntimeService/CreateContainer"
UPDATE_CONTAINER_RESOURCES = "RuntimeService/UpdateContainerResources"
#: The CRI events an interceptor may subscribe to.
EVENTS = frozenset({RUN_POD_SANDBOX, CREATE_CONTAINER, UPDATE_CONTAINER_RESOURCES})


@dataclass(frozen=True, slots=True)
class PodInfo:
    namespace: str
    name: str
    uid: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class RuntimeFacts:
    """What the proxy learnt of the runtime: the runtime handlers it has (None: not known)."""

    handlers: frozenset[str] | None = None
    #: Where `handlers` came from, for messages ('Status.runtime_handlers', 'containerd config', 'config').
    handlers_source: str = ""


@dataclass(frozen=True, slots=True)
class CallContext:
    """One intercepted call. `request` is the decoded request: interceptors read it, never change it."""

    method: str
    pod: PodInfo
    container: str | None
    request: Message
    runtime: RuntimeFacts = RuntimeFacts()
    #: Annotation keys in pod.annotations that policy added as defaults (the pod did not carry them).
    injected: frozenset[str] = frozenset()
    #: CreateContainer/UpdateContainerResources: the criproxy annotations the pod had when its sandbox
    #: was created (None when not known), to detect annotations changed since.
    pinned: Mapping[str, str] | None = None

    @property
    def who(self) -> str:
        """'pod ns/name' or 'container app of pod ns/name', for messages."""
        if self.container is None:
            return f"pod {self.pod.ref}"
        return f"container {self.container!r} of pod {self.pod.ref}"
