"""Faults on the real thing: containerd crashes under load, the proxy is SIGKILLed under load."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from criproxy.api.runtime.v1 import api_pb2
from tests.support.containerd import Containerd, remove_all_pods
from tests.support.cri import CriClient
from tests.support.pods import container_state, pod_config, run_pod, runtime, sleeper_config, wait_for
from tests.support.proxyproc import ProxyProcess

pytestmark = pytest.mark.containerd
Mi = 1 << 20


class Load:
    """Kubelet-like polling through the proxy until stopped, recording when each call ended and how."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.outcomes: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with grpc.insecure_channel(self.endpoint) as chan:
            methods = [chan.unary_unary(f"/runtime.v1.RuntimeService/{m}") for m in ("Version", "ListContainers",
                                                                                      "ListPodSandbox", "Status")]
            i = 0
            while not self.stop.is_set():
                try:
                    methods[i % len(methods)](b"", timeout=5)
                    code = "OK"
                except grpc.RpcError as err:
                    code = err.code().name
                self.outcomes.append((time.monotonic(), code))
                i += 1
                time.sleep(0.005)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def start_sleeper(cri: CriClient, containerd: Containerd, tmp_path: Path, annotations: dict[str, str],
                  name: str) -> tuple[str, str]:
    config = pod_config(name, tmp_path, annotations, namespace="faults")
    pod_id = run_pod(cri, config)
    container = sleeper_config(containerd.busybox_image)
    container.linux.resources.CopyFrom(api_pb2.LinuxContainerResources(
        cpu_period=100_000, cpu_quota=100_000, cpu_shares=512, memory_limit_in_bytes=256 * Mi,
        memory_swap_limit_in_bytes=256 * Mi))
    create = api_pb2.CreateContainerRequest(pod_sandbox_id=pod_id, config=container, sandbox_config=config)
    container_id: str = runtime(cri, "CreateContainer", create).container_id
    runtime(cri, "StartContainer", api_pb2.StartContainerRequest(container_id=container_id))
    wait_for("the container to run", lambda: container_state(cri, container_id) == api_pb2.CONTAINER_RUNNING)
    return pod_id, container_id


@pytest.fixture
def own_proxy(containerd: Containerd, tmp_path: Path) -> Iterator[ProxyProcess]:
    with ProxyProcess(tmp_path / "p.sock", "--runtime-endpoint", containerd.endpoint,
                      log=tmp_path / "criproxy.log") as running:
        yield running


def test_runtime_crash_under_load(own_proxy: ProxyProcess, containerd: Containerd, tmp_path: Path) -> None:
    with CriClient(own_proxy.endpoint) as cri:
        pod_id, container_id = start_sleeper(cri, containerd, tmp_path, {}, "survivor")
        try:
            with Load(own_proxy.endpoint) as load:
                time.sleep(0.5)
                down = time.monotonic()
                containerd.crash()
                time.sleep(1.5)
                containerd.revive()  # returns once containerd's CRI answers again
                back = time.monotonic()
                deadline = back + 10
                while not load.outcomes or load.outcomes[-1][1] != "OK" or load.outcomes[-1][0] < back:
                    assert time.monotonic() < deadline, "the proxy did not recover"
                    time.sleep(0.01)
                time.sleep(0.5)
            outcomes = load.outcomes
            failures = [(t, code) for t, code in outcomes if code != "OK"]
            assert failures, "the crash was not noticed at all"
            assert {code for _, code in failures} == {"UNAVAILABLE"}, failures
            assert all(down <= t for t, _ in failures), "a call failed before the runtime went down"
            recovered = next(t for t, code in outcomes if code == "OK" and t > back)
            assert recovered - back < 1.0, f"serving again {recovered - back:.2f} s after the runtime answered"
            assert all(code == "OK" for t, code in outcomes if t > recovered)
            # Nothing lost, nothing doubled: the pod and its container are there, once.
            pods = runtime(cri, "ListPodSandbox", api_pb2.ListPodSandboxRequest()).items
            assert [p.id for p in pods if p.metadata.name == "survivor"] == [pod_id]
            containers = runtime(cri, "ListContainers", api_pb2.ListContainersRequest()).containers
            assert [c.id for c in containers if c.pod_sandbox_id == pod_id] == [container_id]
            assert container_state(cri, container_id) == api_pb2.CONTAINER_RUNNING
        finally:
            assert not remove_all_pods(cri)


def test_proxy_sigkill_under_load_keeps_applying_annotations(containerd: Containerd, tmp_path: Path) -> None:
    socket = tmp_path / "p.sock"
    first = ProxyProcess(socket, "--runtime-endpoint", containerd.endpoint, log=tmp_path / "first.log").start()
    second: ProxyProcess | None = None
    try:
        with CriClient(first.endpoint) as cri:
            _, container_id = start_sleeper(cri, containerd, tmp_path, {"memory-limit.criproxy.io/pod": "64Mi"},
                                            "capped")
            with Load(first.endpoint) as load:
                time.sleep(0.3)
                assert first.proc is not None
                first.proc.kill()  # SIGKILL: no draining, the socket file stays behind
                first.proc.wait(10)
                second = ProxyProcess(socket, "--runtime-endpoint", containerd.endpoint,
                                      log=tmp_path / "second.log").start()  # replaces the stale socket
                back = time.monotonic()
                time.sleep(0.5)
            assert any(code == "OK" and t > back for t, code in load.outcomes), "the client did not reconnect"
            # The new proxy rebuilt its index from the runtime: a kubelet resize to 512Mi stays capped at 64Mi.
            update = api_pb2.UpdateContainerResourcesRequest(container_id=container_id, linux=(
                api_pb2.LinuxContainerResources(cpu_period=100_000, cpu_quota=100_000, cpu_shares=512,
                                                memory_limit_in_bytes=512 * Mi, memory_swap_limit_in_bytes=512 * Mi)))
            runtime(cri, "UpdateContainerResources", update)
            info = json.loads(runtime(cri, "ContainerStatus", api_pb2.ContainerStatusRequest(
                container_id=container_id, verbose=True)).info["info"])
            cgroup = Path("/sys/fs/cgroup/memory") / info["runtimeSpec"]["linux"]["cgroupsPath"].lstrip("/")
            assert (cgroup / "memory.limit_in_bytes").read_text().strip() == str(64 * Mi)
            assert "container index rebuilt from the runtime: 1 pods, 1 containers" in (
                tmp_path / "second.log").read_text()
            assert not remove_all_pods(cri)
    finally:
        first.stop()
        if second is not None:
            second.stop()
