"""Real pods straight against the suite's containerd (no proxy): the baseline the proxy tests build on.

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

import grpc
import pytest
from google.protobuf.message import Message

from criproxy.api.runtime.v1 import api_pb2
from tests.support.containerd import ALT_HANDLER, DEFAULT_HANDLER, Containerd
from tests.support.cri import CriClient

pytestmark = pytest.mark.containerd

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


def pod_config(name: str, log_directory: Path) -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, uid=uuid.uuid4().hex, namespace="criproxy-e2e"),
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


def test_version_and_status(cri: CriClient) -> None:
    version = runtime(cri, "Version", api_pb2.VersionRequest())
    assert version.runtime_name == "containerd"
    assert version.runtime_api_version == "v1"

    conditions = {c.type: c for c in runtime(cri, "Status", api_pb2.StatusRequest()).status.conditions}
    assert conditions["RuntimeReady"].status
    # No CNI plugin is configured, so only host-network pods can run.
    assert not conditions["NetworkReady"].status


def test_images_are_imported(cri: CriClient, containerd: Containerd) -> None:
    tags = {tag for img in image(cri, "ListImages", api_pb2.ListImagesRequest()).images for tag in img.repo_tags}
    assert {containerd.busybox_image, containerd.pause_image} <= tags

    status = image(
        cri, "ImageStatus", api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=containerd.busybox_image))
    )
    assert status.image.id.startswith("sha256:")
    assert containerd.busybox_image in status.image.repo_tags


def test_pod_lifecycle(cri: CriClient, containerd: Containerd, tmp_path: Path) -> None:
    config = pod_config("lifecycle", tmp_path)
    pod_id = run_pod(cri, config)
    # Without runtime_handler containerd 1.6 uses default_runtime_name but reports the handler as "".
    handler, info = sandbox_status(cri, pod_id)
    assert handler == info["runtimeHandler"] == listed_handlers(cri)[pod_id] == ""
    assert info["runtimeType"] == "io.containerd.runc.v2"
    # The default handler is runc: the sandbox's runc state lives under that handler's root.
    assert (containerd.runc_root(DEFAULT_HANDLER) / "k8s.io" / pod_id).is_dir()

    create = api_pb2.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=sleeper_config(containerd.busybox_image), sandbox_config=config
    )
    container_id: str = runtime(cri, "CreateContainer", create).container_id
    assert container_state(cri, container_id) == api_pb2.CONTAINER_CREATED
    runtime(cri, "StartContainer", api_pb2.StartContainerRequest(container_id=container_id))
    wait_for("the container to run", lambda: container_state(cri, container_id) == api_pb2.CONTAINER_RUNNING)

    log_file = tmp_path / "sleeper.log"
    wait_for("the container's log line", lambda: log_file.exists() and "stdout F started" in log_file.read_text())

    execed = runtime(
        cri, "ExecSync", api_pb2.ExecSyncRequest(container_id=container_id, cmd=["echo", "hello"], timeout=10)
    )
    assert (execed.exit_code, execed.stdout, execed.stderr) == (0, b"hello\n", b"")

    listed = runtime(cri, "ListContainers", api_pb2.ListContainersRequest()).containers
    assert (container_id, pod_id) in {(c.id, c.pod_sandbox_id) for c in listed}

    # SIGTERM ends sleep (the pod's pause process, not sleep, is PID 1); SIGKILL would follow the grace period.
    stop = api_pb2.StopContainerRequest(container_id=container_id, timeout=STOP_GRACE_SECONDS)
    runtime(cri, "StopContainer", stop, timeout=STOP_GRACE_SECONDS + 30.0)
    assert container_state(cri, container_id) == api_pb2.CONTAINER_EXITED
    runtime(cri, "RemoveContainer", api_pb2.RemoveContainerRequest(container_id=container_id))
    listed = runtime(cri, "ListContainers", api_pb2.ListContainersRequest()).containers
    assert container_id not in {c.id for c in listed}

    remove_pod(cri, pod_id)


def test_runtime_handler_selects_runtime(cri: CriClient, containerd: Containerd, tmp_path: Path) -> None:
    config = pod_config("alt-handler", tmp_path)
    pod_id = run_pod(cri, config, runtime_handler=ALT_HANDLER)
    handler, info = sandbox_status(cri, pod_id)
    assert handler == info["runtimeHandler"] == listed_handlers(cri)[pod_id] == ALT_HANDLER
    assert info["runtimeOptions"]["root"] == str(containerd.runc_root(ALT_HANDLER))
    assert (containerd.runc_root(ALT_HANDLER) / "k8s.io" / pod_id).is_dir()
    assert not (containerd.runc_root(DEFAULT_HANDLER) / "k8s.io" / pod_id).exists()

    create = api_pb2.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=sleeper_config(containerd.busybox_image), sandbox_config=config
    )
    container_id: str = runtime(cri, "CreateContainer", create).container_id
    runtime(cri, "StartContainer", api_pb2.StartContainerRequest(container_id=container_id))
    wait_for("the container to run", lambda: container_state(cri, container_id) == api_pb2.CONTAINER_RUNNING)
    # Containers follow their sandbox's handler.
    assert (containerd.runc_root(ALT_HANDLER) / "k8s.io" / container_id).is_dir()

    remove_pod(cri, pod_id)


def test_unknown_runtime_handler_is_rejected(cri: CriClient, tmp_path: Path) -> None:
    request = api_pb2.RunPodSandboxRequest(config=pod_config("bad-handler", tmp_path), runtime_handler="no-such")
    with pytest.raises(grpc.RpcError) as caught:
        runtime(cri, "RunPodSandbox", request)
    assert "no-such" in str(caught.value)


def test_get_container_events_is_unimplemented(cri: CriClient) -> None:
    # containerd 1.6 predates the CRI container-events stream (added in 1.7).
    responses = cri.stream("RuntimeService", "GetContainerEvents", api_pb2.GetEventsRequest(), timeout=10.0)
    with pytest.raises(grpc.RpcError):
        next(iter(responses))
    assert responses.code() == grpc.StatusCode.UNIMPLEMENTED
