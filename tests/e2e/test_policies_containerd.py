"""The repository's policies.yaml in front of the real containerd: denied pods never reach it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from criproxy.api.runtime.v1 import api_pb2
from tests.support.containerd import Containerd, remove_all_pods
from tests.support.cri import CriClient
from tests.support.pods import container_state, pod_config, remove_pod, run_pod, runtime, sleeper_config, wait_for
from tests.support.proxyproc import ROOT, ProxyProcess

pytestmark = pytest.mark.containerd


@pytest.fixture(scope="module")
def policed(containerd: Containerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    workdir = tmp_path_factory.mktemp("policed")
    policies = workdir / "policies.yaml"
    shutil.copy(ROOT / "policies.yaml", policies)
    policies.chmod(0o644)
    with ProxyProcess(workdir / "criproxy.sock", "--runtime-endpoint", containerd.endpoint, "--policies",
                      str(policies), log=workdir / "criproxy.log") as running:
        yield running


@pytest.fixture
def client(policed: ProxyProcess) -> Iterator[CriClient]:
    with CriClient(policed.endpoint) as cri:
        yield cri
        assert not remove_all_pods(cri)


def pod_names(cri: CriClient) -> set[str]:
    return {p.metadata.name for p in runtime(cri, "ListPodSandbox", api_pb2.ListPodSandboxRequest()).items}


def test_denied_pod_never_reaches_the_runtime(client: CriClient, tmp_path: Path) -> None:
    config = pod_config("intruder", tmp_path, {"runtime-handler.criproxy.io/pod": "runc-alt"}, namespace="shop")
    with pytest.raises(grpc.RpcError) as caught:
        runtime(client, "RunPodSandbox", api_pb2.RunPodSandboxRequest(config=config))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "no rule allows criproxy annotations in namespace 'shop'" in caught.value.details()
    assert "intruder" not in pod_names(client)


def test_allowed_pod_runs_as_adjusted(client: CriClient, containerd: Containerd, tmp_path: Path) -> None:
    config = pod_config("welcome", tmp_path, {"runtime-handler.criproxy.io/pod": "runc-alt",
                                              "oom-score-adj.criproxy.io/pod": "1000"}, namespace="criproxy-demo")
    pod_id = run_pod(client, config)
    status = runtime(client, "PodSandboxStatus", api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
    assert status.status.runtime_handler == "runc-alt"
    container = sleeper_config(containerd.busybox_image)
    container.linux.resources.oom_score_adj = 900
    create = api_pb2.CreateContainerRequest(pod_sandbox_id=pod_id, config=container, sandbox_config=config)
    container_id = runtime(client, "CreateContainer", create).container_id
    runtime(client, "StartContainer", api_pb2.StartContainerRequest(container_id=container_id))
    wait_for("the container to run", lambda: container_state(client, container_id) == api_pb2.CONTAINER_RUNNING)
    verbose = runtime(client, "ContainerStatus", api_pb2.ContainerStatusRequest(container_id=container_id,
                                                                                verbose=True))
    pid = json.loads(verbose.info["info"])["pid"]
    assert Path(f"/proc/{pid}/oom_score_adj").read_text().strip() == "1000"
    remove_pod(client, pod_id)


def test_plain_pods_run_anywhere(client: CriClient, tmp_path: Path) -> None:
    pod_id = run_pod(client, pod_config("plain", tmp_path, namespace="shop"))
    assert "plain" in pod_names(client)
    remove_pod(client, pod_id)
