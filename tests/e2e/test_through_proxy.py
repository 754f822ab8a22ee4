"""The proxy in front of the real containerd answers exactly what containerd answers."""

from __future__ import annotations

import grpc
import pytest

from criproxy.api.runtime.v1 import api_pb2
from tests.support.containerd import BUSYBOX_IMAGE, Containerd
from tests.support.proxyproc import ProxyProcess

pytestmark = pytest.mark.containerd


def raw_unary(endpoint: str, path: str, request: bytes) -> bytes:
    with grpc.insecure_channel(endpoint) as chan:
        response: bytes = chan.unary_unary(path)(request, timeout=30)
        return response


def outcome(endpoint: str, path: str, request: bytes, streaming: bool) -> tuple[grpc.StatusCode, str, list[bytes]]:
    with grpc.insecure_channel(endpoint) as chan:
        try:
            if streaming:
                call = chan.unary_stream(path)(request, timeout=30)
                return grpc.StatusCode.OK, "", list(call)
            return grpc.StatusCode.OK, "", [chan.unary_unary(path)(request, timeout=30)]
        except grpc.RpcError as err:
            return err.code(), err.details(), []


def test_same_images_as_containerd(containerd: Containerd, proxy: ProxyProcess) -> None:
    def images(endpoint: str) -> list[bytes]:
        raw = raw_unary(endpoint, "/runtime.v1.ImageService/ListImages", b"")
        # containerd lists in no fixed order; compare the entries, each byte for byte.
        return sorted(image.SerializeToString() for image in api_pb2.ListImagesResponse.FromString(raw).images)

    assert images(proxy.endpoint) == images(containerd.endpoint)
    assert len(images(proxy.endpoint)) == 2


@pytest.mark.parametrize(("path", "request_bytes"), [
    ("/runtime.v1.RuntimeService/Version", api_pb2.VersionRequest(version="v1").SerializeToString()),
    ("/runtime.v1.ImageService/ImageStatus",
     api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=BUSYBOX_IMAGE)).SerializeToString()),
    ("/runtime.v1alpha2.RuntimeService/Version", b""),
])
def test_same_bytes_as_containerd(containerd: Containerd, proxy: ProxyProcess, path: str,
                                  request_bytes: bytes) -> None:
    assert raw_unary(proxy.endpoint, path, request_bytes) == raw_unary(containerd.endpoint, path, request_bytes)


@pytest.mark.parametrize(("path", "streaming"), [
    ("/runtime.v1.RuntimeService/GetContainerEvents", True),
    ("/runtime.v1.RuntimeService/StreamPodSandboxes", True),
    ("/runtime.v1.ImageService/StreamImages", True),
    ("/runtime.v1.RuntimeService/RuntimeConfig", False),
    ("/runtime.v1.RuntimeService/MethodFromTheFuture", False),
    ("/runtime.v1.RuntimeService/ContainerStatus", False),  # NOT_FOUND for an empty id
])
def test_same_status_as_containerd(containerd: Containerd, proxy: ProxyProcess, path: str, streaming: bool) -> None:
    direct = outcome(containerd.endpoint, path, b"", streaming)
    proxied = outcome(proxy.endpoint, path, b"", streaming)
    assert proxied == direct
    assert direct[0] != grpc.StatusCode.OK or path.endswith("RuntimeConfig")
