"""The interception seam's types, below both the transport and the pipeline.

The data plane (criproxy.transport) hands an intercepted call to `Hooks.before` as a typed
message and its runtime's answer to `Hooks.after`; the pipeline (criproxy.pipeline) implements
Hooks. Neither imports the other.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from google.protobuf.message import Message

from criproxy.cri.methods import Method

Metadata = Sequence[tuple[str, str | bytes]]


@dataclass(slots=True)
class Call:
    """What the hooks learn about one intercepted call."""

    method: Method
    path: str
    metadata: Metadata
    #: Free-form per-call state a hook keeps between `before` and `after` (never on the hook object).
    state: dict[str, Any] = field(default_factory=dict)


class Hooks(Protocol):
    """The interception seam. Only the methods in `decoded` reach the hooks; every other call
    passes the data plane as bytes and never enters Python."""

    decoded: frozenset[str]

    async def before(self, call: Call, request: Message) -> Message | None:
        """Return the request to send upstream (the same object, changed, or a new one), or None to send
        the caller's bytes unchanged; raise a CriProxyError to refuse with its status."""
        ...

    def after(self, call: Call, request: Message, response: bytes) -> Awaitable[None] | None:
        """Observe a successful response (already on its way to the caller, unchanged). Called on the
        event loop as the answer arrives: what needs no waiting is done at once and None returned; an
        awaitable returned (an `async def after`) is run as a task of its own."""
        ...


class NoHooks:
    """The pure proxy: nothing decoded."""

    decoded: frozenset[str] = frozenset()

    async def before(self, call: Call, request: Message) -> Message | None:
        return None

    def after(self, call: Call, request: Message, response: bytes) -> None:
        return None
