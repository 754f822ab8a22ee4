"""Recording what a real containerd's pods went through, and replaying it under other policies."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from criproxy.api.runtime.v1 import api_pb2
from tests.support.containerd import Containerd
from tests.support.cri import CriClient
from tests.support.pods import pod_config, remove_pod, run_pod, runtime, sleeper_config, wait_for
from tests.support.proxyproc import ROOT, ProxyProcess

pytestmark = pytest.mark.containerd
Mi = 1 << 20


def replay(*args: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run([sys.executable, "-m", "criproxy", "replay", "-o", "json", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120, check=False)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


@pytest.fixture(scope="module")
def recording(containerd: Containerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Three pods through a recording proxy under the repository's policies.yaml: one adjusted, one plain, one
    denied; the recording once the proxy has stopped (a stop writes out every record)."""
    workdir = tmp_path_factory.mktemp("recorded")
    policies, record = workdir / "policies.yaml", workdir / "record.jsonl"
    shutil.copy(ROOT / "policies.yaml", policies)
    policies.chmod(0o644)
    proxy = ProxyProcess(workdir / "criproxy.sock", "--runtime-endpoint", containerd.endpoint, "--policies",
                         str(policies), "--record", str(record), "--node-name", "e2e-node",
                         log=workdir / "criproxy.log")
    with proxy, CriClient(proxy.endpoint) as cri:
        config = pod_config("sized", workdir, {"memory-limit.criproxy.io/pod": "512Mi"}, namespace="criproxy-demo")
        pod_id = run_pod(cri, config)
        container = sleeper_config(containerd.busybox_image)
        container.linux.resources.memory_limit_in_bytes = 1024 * Mi
        container_id = runtime(cri, "CreateContainer", api_pb2.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=container, sandbox_config=config)).container_id
        runtime(cri, "StartContainer", api_pb2.StartContainerRequest(container_id=container_id))
        wait_for("the container to run", lambda: runtime(cri, "ContainerStatus", api_pb2.ContainerStatusRequest(
            container_id=container_id)).status.state == api_pb2.CONTAINER_RUNNING)
        remove_pod(cri, pod_id)
        remove_pod(cri, run_pod(cri, pod_config("plain", workdir, namespace="shop")))
        intruder = pod_config("intruder", workdir, {"runtime-handler.criproxy.io/pod": "runc-alt"}, namespace="shop")
        with pytest.raises(grpc.RpcError) as caught:
            run_pod(cri, intruder)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    yield {"policies": policies, "record": record, "dir": workdir}


def test_the_recording_holds_every_decided_call(recording: dict[str, Path]) -> None:
    records = [json.loads(line) for line in recording["record"].read_text().splitlines()]
    assert [(r["pod"], r["method"].split("/")[1], r["result"]) for r in records] == [
        ("sized", "RunPodSandbox", "allowed"), ("sized", "CreateContainer", "allowed"),
        ("plain", "RunPodSandbox", "allowed"), ("intruder", "RunPodSandbox", "denied")]
    sized = records[1]
    assert sized["node"] == "e2e-node" and sized["namespace"] == "criproxy-demo"
    assert sized["changes"][0]["field"] == "config.linux.resources.memory_limit_in_bytes"
    assert (sized["changes"][0]["from"], sized["changes"][0]["to"]) == (1024 * Mi, 512 * Mi)
    assert sized["runtime"] is not None and "runc-alt" in sized["runtime"]["handlers"], "containerd's handlers"
    assert "echo started" not in recording["record"].read_text(), "no command of the container"


def test_replay_under_the_same_policy_changes_nothing(recording: dict[str, Path]) -> None:
    code, report = replay("--policies", str(recording["policies"]), str(recording["record"]))
    assert (code, report["pods"], report["summary"]["calls"], report["summary"]["pods"]) == (0, [], 4, 3)


def test_replay_under_a_stricter_and_a_looser_policy(recording: dict[str, Path]) -> None:
    text = recording["policies"].read_text()
    stricter, looser = recording["dir"] / "stricter.yaml", recording["dir"] / "looser.yaml"
    stricter.write_text(text.replace("memory-limit: {min: 4Mi, max: 256Gi}", "memory-limit: {min: 4Mi, max: 256Mi}"))
    looser.write_text(text.replace("namespaces: [criproxy-demo]", "namespaces: [criproxy-demo, shop]"))
    code, report = replay("--policies", str(stricter), str(recording["record"]))
    assert code == 1
    (sized,) = report["pods"]
    assert (sized["name"], sized["node"]) == ("sized", "e2e-node")
    assert [(c["method"].split("/")[1], c["change"], c["rule"]) for c in sized["calls"]] == [
        ("RunPodSandbox", "newly-denied", "demo"), ("CreateContainer", "newly-denied", "demo")]
    assert sized["calls"][1]["now"]["message"].startswith(
        f"criproxy: container 'sleeper' of pod criproxy-demo/sized denied by policy rule 'demo' ({stricter}@")
    assert sized["calls"][1]["now"]["message"].endswith(
        "memory-limit.criproxy.io/pod='512Mi': '512Mi' is not allowed; allowed: 4Mi to 256Mi")
    code, report = replay("--policies", str(looser), str(recording["record"]))
    assert code == 0
    (intruder,) = report["pods"]
    assert [(c["change"], c["now"]["changes"][0]["to"]) for c in intruder["calls"]] == [
        ("no-longer-denied", "runc-alt")]
