"""Building blocks for end-to-end pod tests: CRI calls, pod and container configs, bounded waits.

Every pod uses the host network (NamespaceOption network=NODE) because the test
containerd has no CNI plugin configured.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import Message

from criproxy.api.runtime.v1 import api_pb2
from tests.support.cri import CriClient

WAIT_TIMEOUT = 20.0
STOP_GRACE_SECONDS = 2


def runtime(cri: CriClient, method: str, request: Message, timeout: float = 30.0) -> Any:
    """A RuntimeService call; the response class depends on ``method``, hence Any."""
    return cri.call("RuntimeService", method, request, timeout=timeout)


def image(cri: CriClient, method: str, request: Message) -> Any:
    """An ImageService call; the response class depends on ``method``, hence Any."""
    return cri.call("ImageService", method, request)


def wait_for(what: str, check: Callable[[], bool], timeout: float = WAIT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def pod_config(name: str, log_directory: Path, annotations: dict[str, str] | None = None,
               namespace: str = "criproxy-e2e") -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, uid=uuid.uuid4().hex, namespace=namespace),
        annotations=annotations or {},
        log_directory=str(log_directory),
        labels={"criproxy.test/suite": "e2e-direct"},
        linux=api_pb2.LinuxPodSandboxConfig(
            security_context=api_pb2.LinuxSandboxSecurityContext(
                namespace_options=api_pb2.NamespaceOption(network=api_pb2.NODE),
            ),
        ),
    )


def sleeper_config(image_ref: str) -> api_pb2.ContainerConfig:
    return api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="sleeper"),
        image=api_pb2.ImageSpec(image=image_ref),
        command=["/bin/sh", "-c", "echo started; exec sleep 3600"],
        log_path="sleeper.log",
        linux=api_pb2.LinuxContainerConfig(
            security_context=api_pb2.LinuxContainerSecurityContext(
                namespace_options=api_pb2.NamespaceOption(network=api_pb2.NODE),
            ),
        ),
    )


def run_pod(cri: CriClient, config: api_pb2.PodSandboxConfig, runtime_handler: str = "") -> str:
    request = api_pb2.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler)
    pod_id: str = runtime(cri, "RunPodSandbox", request, timeout=60.0).pod_sandbox_id
    assert pod_id
    return pod_id


def sandbox_status(cri: CriClient, pod_id: str) -> tuple[str, dict[str, Any]]:
    """The runtime handler PodSandboxStatus reports for a ready pod, and the decoded verbose ``info``."""
    response = runtime(cri, "PodSandboxStatus", api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True))
    assert response.status.state == api_pb2.SANDBOX_READY
    info: dict[str, Any] = json.loads(response.info["info"])
    handler: str = response.status.runtime_handler
    return handler, info


def listed_handlers(cri: CriClient) -> dict[str, str]:
    """Pod id -> runtime handler, as ListPodSandbox reports them."""
    return {
        pod.id: pod.runtime_handler for pod in runtime(cri, "ListPodSandbox", api_pb2.ListPodSandboxRequest()).items
    }


def container_state(cri: CriClient, container_id: str) -> int:
    response = runtime(cri, "ContainerStatus", api_pb2.ContainerStatusRequest(container_id=container_id))
    state: int = response.status.state
    return state


def remove_pod(cri: CriClient, pod_id: str) -> None:
    runtime(cri, "StopPodSandbox", api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=60.0)
    runtime(cri, "RemovePodSandbox", api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=60.0)
    listed = runtime(cri, "ListPodSandbox", api_pb2.ListPodSandboxRequest()).items
    assert pod_id not in {pod.id for pod in listed}
