"""Annotations through the proxy change what the real containerd runs: handler, seccomp, resources.

Checked where the change lands: the OCI spec containerd wrote (container status verbose info),
the cgroup files of the running container (cgroup v1), and the process's own seccomp mode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from criproxy.api.runtime.v1 import api_pb2
from tests.support.containerd import ALT_HANDLER, Containerd, remove_all_pods
from tests.support.cri import CriClient
from tests.support.pods import (
    container_state,
    pod_config,
    remove_pod,
    run_pod,
    runtime,
    sandbox_status,
    sleeper_config,
    wait_for,
)
from tests.support.proxyproc import ProxyProcess

pytestmark = pytest.mark.containerd
Mi = 1 << 20
CGROUP_ROOT = Path("/sys/fs/cgroup")


@pytest.fixture
def via_proxy(proxy: ProxyProcess) -> Any:
    """A CRI client through the proxy (default interceptors); removes any pods left at teardown."""
    with CriClient(proxy.endpoint) as client:
        yield client
        problems = remove_all_pods(client)
        assert not problems, "cleaning up pods failed:\n" + "\n".join(problems)


def kubelet_resources() -> api_pb2.LinuxContainerResources:
    """What a kubelet computes for a Burstable container with requests 250m/128Mi and limits 2 CPUs/256Mi."""
    return api_pb2.LinuxContainerResources(cpu_period=100_000, cpu_quota=200_000, cpu_shares=256,
                                           memory_limit_in_bytes=256 * Mi, memory_swap_limit_in_bytes=256 * Mi,
                                           oom_score_adj=900)


def start_container(cri: CriClient, containerd: Containerd, pod_id: str, config: api_pb2.PodSandboxConfig,
                    name: str = "sleeper") -> str:
    container = sleeper_config(containerd.busybox_image)
    container.metadata.name = name
    container.linux.resources.CopyFrom(kubelet_resources())
    create = api_pb2.CreateContainerRequest(pod_sandbox_id=pod_id, config=container, sandbox_config=config)
    container_id: str = runtime(cri, "CreateContainer", create).container_id
    runtime(cri, "StartContainer", api_pb2.StartContainerRequest(container_id=container_id))
    wait_for("the container to run", lambda: container_state(cri, container_id) == api_pb2.CONTAINER_RUNNING)
    return container_id


def verbose_info(cri: CriClient, container_id: str) -> dict[str, Any]:
    response = runtime(cri, "ContainerStatus", api_pb2.ContainerStatusRequest(container_id=container_id, verbose=True))
    info: dict[str, Any] = json.loads(response.info["info"])
    return info


def cgroup_file(info: dict[str, Any], controller: str, name: str) -> str:
    path = info["runtimeSpec"]["linux"]["cgroupsPath"].lstrip("/")
    return (CGROUP_ROOT / controller / path / name).read_text().strip()


def test_resources_and_seccomp_annotations_reach_the_cgroups(via_proxy: CriClient, containerd: Containerd,
                                                             tmp_path: Path) -> None:
    annotations = {
        "cpu-quota.criproxy.io/container.sleeper": "500m",
        "cpuset-cpus.criproxy.io/pod": "0",
        "memory-limit.criproxy.io/pod": "64Mi",
        "seccomp-profile.criproxy.io/container.sleeper": "runtime/default",
    }
    config = pod_config("annotated", tmp_path, annotations)
    pod_id = run_pod(via_proxy, config)
    container_id = start_container(via_proxy, containerd, pod_id, config)

    info = verbose_info(via_proxy, container_id)
    resources = info["runtimeSpec"]["linux"]["resources"]
    assert resources["cpu"]["quota"] == 50_000
    assert resources["cpu"]["period"] == 100_000
    assert resources["cpu"]["cpus"] == "0"
    assert resources["memory"]["limit"] == 64 * Mi
    assert resources["memory"]["swap"] == 64 * Mi  # no swap was allowed, and still is not
    assert cgroup_file(info, "cpu", "cpu.cfs_quota_us") == "50000"
    assert cgroup_file(info, "cpuset", "cpuset.cpus") == "0"
    assert cgroup_file(info, "memory", "memory.limit_in_bytes") == str(64 * Mi)

    assert info["runtimeSpec"]["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_ERRNO"
    status = Path(f"/proc/{info['pid']}/status").read_text()
    assert "Seccomp:\t2" in status, "the container process does not run under a seccomp filter"

    applied = json.loads(info["config"]["annotations"]["criproxy.io/applied"])
    assert {e["setting"] for e in applied} == {"cpu-quota", "cpuset-cpus", "memory-limit", "seccomp-profile"}

    # A kubelet resize to 512Mi does not undo the annotation; the update itself goes through.
    update = api_pb2.UpdateContainerResourcesRequest(container_id=container_id, linux=api_pb2.LinuxContainerResources(
        cpu_period=100_000, cpu_quota=200_000, cpu_shares=256, memory_limit_in_bytes=512 * Mi,
        memory_swap_limit_in_bytes=512 * Mi, cpuset_cpus="0-1"))
    runtime(via_proxy, "UpdateContainerResources", update)
    info = verbose_info(via_proxy, container_id)
    assert cgroup_file(info, "memory", "memory.limit_in_bytes") == str(64 * Mi)
    assert cgroup_file(info, "cpu", "cpu.cfs_quota_us") == "50000"
    assert cgroup_file(info, "cpuset", "cpuset.cpus") == "0"
    assert cgroup_file(info, "cpu", "cpu.shares") == "256"

    remove_pod(via_proxy, pod_id)


def test_plain_pod_is_what_the_kubelet_asked_for(via_proxy: CriClient, containerd: Containerd,
                                                 tmp_path: Path) -> None:
    config = pod_config("plain", tmp_path)
    pod_id = run_pod(via_proxy, config)
    container_id = start_container(via_proxy, containerd, pod_id, config)
    info = verbose_info(via_proxy, container_id)
    assert cgroup_file(info, "cpu", "cpu.cfs_quota_us") == "200000"
    assert cgroup_file(info, "memory", "memory.limit_in_bytes") == str(256 * Mi)
    assert "criproxy.io/applied" not in info["config"].get("annotations", {})
    remove_pod(via_proxy, pod_id)


def test_runtime_handler_annotation_selects_the_handler(via_proxy: CriClient, containerd: Containerd,
                                                        tmp_path: Path) -> None:
    config = pod_config("alt", tmp_path, {"runtime-handler.criproxy.io/pod": ALT_HANDLER})
    pod_id = run_pod(via_proxy, config)
    handler, info = sandbox_status(via_proxy, pod_id)
    assert handler == info["runtimeHandler"] == ALT_HANDLER
    assert (containerd.runc_root(ALT_HANDLER) / "k8s.io" / pod_id).is_dir()
    remove_pod(via_proxy, pod_id)


def listed_pods(cri: CriClient) -> set[str]:
    return {p.metadata.name for p in runtime(cri, "ListPodSandbox", api_pb2.ListPodSandboxRequest()).items}


def test_unknown_handler_is_refused_before_the_runtime(via_proxy: CriClient, tmp_path: Path) -> None:
    config = pod_config("kata-wanted", tmp_path, {"runtime-handler.criproxy.io/pod": "kata"})
    with pytest.raises(grpc.RpcError) as caught:
        runtime(via_proxy, "RunPodSandbox", api_pb2.RunPodSandboxRequest(config=config))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        "criproxy: pod criproxy-e2e/kata-wanted: annotation runtime-handler.criproxy.io/pod='kata': the runtime has "
        "no handler 'kata'; known handlers: runc, runc-alt (from the runtimes in containerd's config)")
    assert "kata-wanted" not in listed_pods(via_proxy)


def test_raising_a_limit_is_refused_before_the_runtime(via_proxy: CriClient, containerd: Containerd,
                                                       tmp_path: Path) -> None:
    config = pod_config("greedy", tmp_path, {"memory-limit.criproxy.io/pod": "4Gi"})
    pod_id = run_pod(via_proxy, config)
    container = sleeper_config(containerd.busybox_image)
    container.linux.resources.CopyFrom(kubelet_resources())
    create = api_pb2.CreateContainerRequest(pod_sandbox_id=pod_id, config=container, sandbox_config=config)
    with pytest.raises(grpc.RpcError) as caught:
        runtime(via_proxy, "CreateContainer", create)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    listed = runtime(via_proxy, "ListContainers", api_pb2.ListContainersRequest(
        filter=api_pb2.ContainerFilter(pod_sandbox_id=pod_id))).containers
    assert list(listed) == []
    remove_pod(via_proxy, pod_id)
