"""A small synchronous CRI client (`criproxy demo`, the tests), driven entirely by the generated descriptors.

Every RPC is looked up by name in ``api_pb2.DESCRIPTOR``; the request/response
classes and the wire path (``/runtime.v1.RuntimeService/Version``) come from the
method descriptor, so there are no per-method wrappers to keep in sync with the
protos.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Literal

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

ApiVersion = Literal["v1", "v1alpha2"]
Service = Literal["RuntimeService", "ImageService"]
Metadata = Sequence[tuple[str, str]]

DEFAULT_TIMEOUT = 30.0


def api_module(api: ApiVersion) -> ModuleType:
    """The generated ``api_pb2`` module of one CRI API version."""
    return importlib.import_module(f"criproxy.api.runtime.{api}.api_pb2")


class CriClient:
    """Calls CRI methods on ``endpoint`` (e.g. ``unix:///run/containerd/containerd.sock``)."""

    def __init__(self, endpoint: str, api: ApiVersion = "v1") -> None:
        self.endpoint = endpoint
        self.api = api
        self.pb = api_module(api)
        self._channel = grpc.insecure_channel(endpoint)

    def method(self, service: Service, name: str) -> MethodDescriptor:
        """The descriptor of ``service``/``name``; KeyError names what is missing."""
        services = self.pb.DESCRIPTOR.services_by_name
        if service not in services:
            raise KeyError(f"CRI {self.api} has no service {service!r}")
        methods = services[service].methods_by_name
        if name not in methods:
            raise KeyError(f"CRI {self.api} {service} has no method {name!r}")
        method: MethodDescriptor = methods[name]
        return method

    def _checked(self, service: Service, name: str, request: Message, *, streaming: bool) -> MethodDescriptor:
        method = self.method(service, name)
        if method.client_streaming:
            raise TypeError(f"{method.full_name} is client-streaming, which this client does not support")
        if method.server_streaming != streaming:
            other = "stream" if method.server_streaming else "call"
            raise TypeError(
                f"{method.full_name} is {'' if method.server_streaming else 'not '}server-streaming; "
                f"use CriClient.{other}()"
            )
        if request.DESCRIPTOR is not method.input_type:
            raise TypeError(
                f"{method.full_name} takes {method.input_type.full_name}, not {request.DESCRIPTOR.full_name}"
            )
        return method

    @staticmethod
    def _path(method: MethodDescriptor) -> str:
        return f"/{method.containing_service.full_name}/{method.name}"

    def call(
        self,
        service: Service,
        name: str,
        request: Message,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        metadata: Metadata = (),
    ) -> Message:
        """Invoke a unary method and return its response (raises ``grpc.RpcError`` on failure)."""
        method = self._checked(service, name, request, streaming=False)
        response_class = message_factory.GetMessageClass(method.output_type)
        rpc = self._channel.unary_unary(
            self._path(method),
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        response: Message = rpc(request, timeout=timeout, metadata=tuple(metadata))
        return response

    def stream(
        self,
        service: Service,
        name: str,
        request: Message,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        metadata: Metadata = (),
    ) -> grpc.CallIterator[Message]:
        """Invoke a server-streaming method; iterating raises ``grpc.RpcError`` on failure.

        The result is also a ``grpc.Call``: ``.cancel()`` ends the stream early, ``.code()`` tells how it ended.
        """
        method = self._checked(service, name, request, streaming=True)
        response_class = message_factory.GetMessageClass(method.output_type)
        rpc = self._channel.unary_stream(
            self._path(method),
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        responses: grpc.CallIterator[Message] = rpc(request, timeout=timeout, metadata=tuple(metadata))
        return responses

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
