"""One exception class per gRPC status code that criproxy itself produces.

Code anywhere below the server raises these; the data plane's seam converts them to a gRPC
status at one boundary (criproxy.transport.plane). Errors that come from the runtime are not wrapped in these:
their code, details and trailing metadata travel back to the caller unchanged.
"""

from __future__ import annotations

from typing import ClassVar

import grpc


class CriProxyError(Exception):
    """A failure criproxy reports to its caller as a gRPC status with this message."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(CriProxyError):
    """The request (or an annotation on it) is malformed; retrying it unchanged cannot succeed."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class PermissionDenied(CriProxyError):
    """Policy forbids what the request asks for."""

    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(CriProxyError):
    """The request is well formed but the node is not in a state that allows it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceeded(CriProxyError):
    """criproxy's own work on the call ran past its deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(CriProxyError):
    """A bug or an unexpected state inside criproxy."""

    code = grpc.StatusCode.INTERNAL


class ConfigError(Exception):
    """Bad configuration, found before serving starts; the message names the input and the fix."""
