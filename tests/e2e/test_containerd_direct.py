"""Real pods straight against the suite's containerd (no proxy): the baseline the proxy tests build on.

Every pod uses the host network (NamespaceOption network=NODE) because the test
containerd has no CNI plugin configured.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from criproxy.api.runtime.v1 import api_pb2
from tests.support.containerd import ALT_HANDLER, DEFAULT_HANDLER, Containerd
from tests.support.cri import CriClient
from tests.support.pods import (
    STOP_GRACE_SECONDS,
    container_state,
    image,
    listed_handlers,
    pod_config,
    remove_pod,
    run_pod,
    runtime,
    sandbox_status,
    sleeper_config,
    wait_for,
)

pytestmark = pytest.mark.containerd

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
