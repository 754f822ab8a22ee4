"""The CRI method table, read from the compiled descriptors (never written out by hand).

Notes:
- A CRI path is /runtime.<api>.<Service>/<Method>. v1 and v1alpha2 carry the same messages
  on the wire (only KeyValue.value differs, string vs bytes, which is the same wire type), so
  the proxy moves a call between API versions by renaming the path's package alone.
- Requests are decoded with the v1 types whatever API the caller speaks: v1's bytes field
  accepts anything v1alpha2's string field can carry.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from criproxy.api.runtime.v1 import api_pb2 as v1_pb2
from criproxy.api.runtime.v1alpha2 import api_pb2 as v1alpha2_pb2

API_VERSIONS = ("v1", "v1alpha2")
IMAGE_SERVICE = "ImageService"


@dataclass(frozen=True, slots=True)
class Method:
    """One CRI method, independent of the API version a caller uses for it."""

    service: str
    name: str
    server_streaming: bool
    client_streaming: bool
    request_type: type[Message]
    response_type: type[Message]

    @property
    def key(self) -> str:
        """Version-neutral name, e.g. 'RuntimeService/CreateContainer'."""
        return f"{self.service}/{self.name}"

    def path(self, api: str) -> str:
        return f"/runtime.{api}.{self.service}/{self.name}"


def _methods_of(service: ServiceDescriptor) -> list[Method]:
    return [
        Method(
            service=service.name,
            name=m.name,
            server_streaming=m.server_streaming,
            client_streaming=m.client_streaming,
            request_type=GetMessageClass(m.input_type),
            response_type=GetMessageClass(m.output_type),
        )
        for m in service.methods
    ]


def _build_table() -> dict[str, Method]:
    table: dict[str, Method] = {}
    for service in v1_pb2.DESCRIPTOR.services_by_name.values():
        for method in _methods_of(service):
            table[method.key] = method
    return table


#: Every v1 method by key ('RuntimeService/Version'). v1alpha2's methods are a subset of v1's.
METHODS: dict[str, Method] = _build_table()

#: The keys v1alpha2 has (for callers of that API; the rest answer UNIMPLEMENTED upstream).
V1ALPHA2_KEYS: frozenset[str] = frozenset(
    f"{svc.name}/{m.name}" for svc in v1alpha2_pb2.DESCRIPTOR.services_by_name.values() for m in svc.methods
)


@dataclass(frozen=True, slots=True)
class CriPath:
    """A parsed /runtime.<api>.<Service>/<Method> path."""

    api: str
    service: str
    method: str

    @property
    def key(self) -> str:
        return f"{self.service}/{self.method}"

    def with_api(self, api: str) -> str:
        return f"/runtime.{api}.{self.service}/{self.method}"


def parse_cri_path(path: str) -> CriPath | None:
    """Split a CRI method path; None when the path is not /runtime.<known api>.<Service>/<Method>."""
    if not path.startswith("/runtime."):
        return None
    qualified, sep, method = path[1:].partition("/")
    if not sep or not method or "/" in method:
        return None
    parts = qualified.split(".")
    if len(parts) != 3 or parts[1] not in API_VERSIONS:
        return None
    return CriPath(api=parts[1], service=parts[2], method=method)
