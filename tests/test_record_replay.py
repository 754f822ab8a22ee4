"""Recording every decided call through the proxy (serve --record) and replaying it under other policies."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from criproxy.api.runtime.v1 import api_pb2
from criproxy.config import build_config
from criproxy.cri.annotations import Lookup
from criproxy.cri.context import CREATE_CONTAINER, RUN_POD_SANDBOX, UPDATE_CONTAINER_RESOURCES, CallContext, PodInfo
from criproxy.cri.methods import METHODS
from criproxy.errors import ConfigError
from criproxy.explain import Explained
from criproxy.explain import render_text as explain_text
from criproxy.observe import record as record_module
from criproxy.observe.record import Recorder, RecordError, check, parse
from criproxy.pipeline import Pipeline
from criproxy.policies import AllowAll
from criproxy.policies.store import load_policy
from criproxy.replay import (
    ADJUSTED_DIFFERENTLY,
    DENIED_DIFFERENTLY,
    NEWLY_DENIED,
    NO_LONGER_DENIED,
    BadRecording,
    Replayer,
    detail_lines,
    render_json,
    replay,
    verdict_line,
)
from criproxy.seam import Call
from criproxy.server import Proxy
from tests.support.fakeruntime import FakeRuntime, Reply
from tests.support.waiting import eventually

ROOT = Path(__file__).resolve().parent.parent
HEADER = "apiVersion: criproxy.io/v1alpha1\nkind: AnnotationPolicy\n"
Gi, Mi = 1 << 30, 1 << 20
SECRET = "s3cr3t-Planted-In-The-Request-7c1e"

OLD = HEADER + """
rules:
  - name: shop
    namespaces: [shop]
    settings:
      memory-limit: {max: 2Gi}
  - name: tenants
    namespaces: ["tenant-*"]
    settings:
      seccomp-profile: {values: [runtime/default]}
"""
#: shop's memory limit tightened from 2Gi to 1Gi.
STRICTER = OLD.replace("memory-limit: {max: 2Gi}", "memory-limit: {max: 1Gi}")
#: shop's limit loosened to 4Gi, and tenants get RuntimeDefault seccomp by default.
LOOSER = OLD.replace("memory-limit: {max: 2Gi}", "memory-limit: {max: 4Gi}").replace(
    "seccomp-profile: {values: [runtime/default]}",
    "seccomp-profile: {values: [runtime/default], default: runtime/default}")


def criproxy(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "criproxy", *args], capture_output=True, text=stdin is None,
                          input=stdin, cwd=ROOT, timeout=120, check=False)


def sandbox(namespace: str, name: str, annotations: dict[str, str] | None = None) -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace=namespace),
        labels={"app": name, "team": namespace}, annotations=annotations or {})


def resources(memory: int = 4 * Gi) -> api_pb2.LinuxContainerResources:
    return api_pb2.LinuxContainerResources(cpu_period=100_000, cpu_quota=200_000, cpu_shares=1024,
                                           memory_limit_in_bytes=memory, memory_swap_limit_in_bytes=memory,
                                           oom_score_adj=-997)


def call(proxy: Proxy, key: str, request: Any) -> grpc.StatusCode:
    with grpc.insecure_channel(proxy.config.listen.target) as chan:
        try:
            chan.unary_unary(f"/runtime.v1.{key}")(request.SerializeToString(), timeout=10)
        except grpc.RpcError as err:
            return err.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK


def start_pod(proxy: Proxy, fake: FakeRuntime, namespace: str, name: str, annotations: dict[str, str] | None = None,
              *, memory: int = 4 * Gi) -> list[grpc.StatusCode]:
    """The kubelet's calls for a one-container pod: RunPodSandbox, CreateContainer; each goes on whatever the
    one before got (as the kubelet retries, the recording sees both)."""
    config = sandbox(namespace, name, annotations)
    fake.script(RUN_POD_SANDBOX, Reply(messages=[api_pb2.RunPodSandboxResponse(
        pod_sandbox_id=f"sb-{name}").SerializeToString()]))
    fake.script(CREATE_CONTAINER, Reply(messages=[api_pb2.CreateContainerResponse(
        container_id=f"c-{name}").SerializeToString()]))
    container = api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name="app"),
                                        image=api_pb2.ImageSpec(image="registry.example/app:1"))
    container.linux.resources.CopyFrom(resources(memory))
    return [call(proxy, RUN_POD_SANDBOX, api_pb2.RunPodSandboxRequest(config=config)),
            call(proxy, CREATE_CONTAINER, api_pb2.CreateContainerRequest(
                pod_sandbox_id=f"sb-{name}", config=container, sandbox_config=config))]


def records(path: Path, count: int) -> list[dict[str, Any]]:
    """The recording's records once `count` are written (the writer is a background thread)."""
    def written() -> bool:
        return path.exists() and len(path.read_text().splitlines()) >= count

    eventually(written, f"{count} records in {path}")
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def recorded(configured: Callable[[str], Proxy], fake: FakeRuntime, sockdir: Path) -> Iterator[dict[str, Any]]:
    """Traffic of five pods through a proxy recording under OLD: what each call got, and the files."""
    policies, recording = sockdir / "old.yaml", sockdir / "record.jsonl"
    policies.write_text(OLD)
    proxy = configured(f"policies: {policies}\nrecord: {recording}\nnode-name: node-a\n")
    codes = {
        "web": start_pod(proxy, fake, "shop", "web", {"memory-limit.criproxy.io/pod": "1536Mi"}),
        "plain": start_pod(proxy, fake, "shop", "plain"),
        "big": start_pod(proxy, fake, "shop", "big", {"memory-limit.criproxy.io/pod": "3Gi"}),
        "api": start_pod(proxy, fake, "tenant-a", "api", {"seccomp-profile.criproxy.io/pod": "runtime/default"}),
        "bare": start_pod(proxy, fake, "tenant-a", "bare"),
    }
    update = api_pb2.UpdateContainerResourcesRequest(container_id="c-web", linux=resources(3 * Gi))
    codes["web"].append(call(proxy, UPDATE_CONTAINER_RESOURCES, update))
    yield {"proxy": proxy, "codes": codes, "policies": policies, "recording": recording,
           "records": records(recording, 11), "dir": sockdir}


def test_every_decided_call_is_recorded_with_what_its_decision_was_made_from(recorded: dict[str, Any]) -> None:
    ok, denied = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED
    assert recorded["codes"] == {"web": [ok, ok, ok], "plain": [ok, ok], "big": [denied, denied], "api": [ok, ok],
                                 "bare": [ok, ok]}
    lines = recorded["records"]
    assert len(lines) == 11
    assert [(r["pod"], r["method"].split("/")[1], r["result"]) for r in lines] == [
        ("web", "RunPodSandbox", "allowed"), ("web", "CreateContainer", "allowed"),
        ("plain", "RunPodSandbox", "allowed"), ("plain", "CreateContainer", "allowed"),
        ("big", "RunPodSandbox", "denied"), ("big", "CreateContainer", "denied"),
        ("api", "RunPodSandbox", "allowed"), ("api", "CreateContainer", "allowed"),
        ("bare", "RunPodSandbox", "allowed"), ("bare", "CreateContainer", "allowed"),
        ("web", "UpdateContainerResources", "allowed")]
    digest = recorded["proxy"].policies.current.policies.digest
    for r in lines:
        check(r)  # the reader's own check of every field
        assert list(r)[:3] == ["v", "time", "node"] and (r["v"], r["node"]) == (1, "node-a")
        assert r["policy"] == f"{recorded['policies']}@{digest}"
    create = lines[1]
    assert create["namespace"] == "shop" and create["uid"] == "uid-web" and create["container"] == "app"
    assert create["labels"] == {"app": "web", "team": "shop"}
    assert create["annotations"] == {"memory-limit.criproxy.io/pod": "1536Mi"}
    assert create["pinned"] == {"memory-limit.criproxy.io/pod": "1536Mi"}
    assert create["request"] == {"seccomp": None, "resources": {
        "cpu_period": 100000, "cpu_quota": 200000, "cpu_shares": 1024, "memory_limit_in_bytes": 4 * Gi,
        "oom_score_adj": -997, "memory_swap_limit_in_bytes": 4 * Gi}}
    assert (create["rule"], create["mode"], create["status"], create["message"]) == ("shop", "enforce", "OK", "")
    assert create["changes"] == [
        {"field": "config.linux.resources.memory_limit_in_bytes", "from": 4 * Gi, "to": 1536 * Mi,
         "by": "resources", "key": "memory-limit.criproxy.io/pod"},
        {"field": "config.linux.resources.memory_swap_limit_in_bytes", "from": 4 * Gi, "to": 1536 * Mi,
         "by": "resources", "key": "memory-limit.criproxy.io/pod"}]
    assert [d["action"] for d in create["decisions"]] == ["applied", "applied"]
    big = lines[4]
    assert big["status"] == "PERMISSION_DENIED" and big["changes"] == []
    assert big["message"] == (f"criproxy: pod shop/big denied by policy rule 'shop' ({recorded['policies']}@{digest}): "
                              "memory-limit.criproxy.io/pod='3Gi': '3Gi' is not allowed; allowed: at most 2Gi")
    sandbox_record = lines[0]
    assert sandbox_record["container"] is None
    assert sandbox_record["request"] == {"runtime_handler": "", "seccomp": None}
    # The update carries only a container id: the record holds the pod as the container index resolved it.
    update = lines[10]
    assert (update["namespace"], update["pod"], update["uid"], update["container"]) == ("shop", "web", "uid-web", "app")
    assert update["request"]["resources"]["memory_limit_in_bytes"] == 3 * Gi
    assert update["pinned"] == {"memory-limit.criproxy.io/pod": "1536Mi"}


def test_a_call_with_no_decision_is_recorded_too(recorded: dict[str, Any]) -> None:
    plain = [r for r in recorded["records"] if r["pod"] == "plain"]
    assert [(r["result"], r["changes"], r["decisions"], r["annotations"]) for r in plain] == [
        ("allowed", [], [], {}), ("allowed", [], [], {})]


def replay_cli(*args: str, stdin: bytes | None = None) -> tuple[int, dict[str, Any]]:
    done = criproxy("replay", "-o", "json", *args, stdin=stdin)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def changes_of(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [(pod["name"], c["method"].split("/")[1], c["change"], c["rule"]) for pod in report["pods"]
            for c in pod["calls"]]


def test_replay_under_the_same_policy_changes_nothing(recorded: dict[str, Any]) -> None:
    code, report = replay_cli("--policies", str(recorded["policies"]), str(recorded["recording"]))
    assert code == 0
    assert report["pods"] == []
    summary = report["summary"]
    assert (summary["calls"], summary["pods"], summary["namespaces"], summary["nodes"]) == (11, 5, 2, 1)
    assert summary["changed"] == {"calls": 0, "pods": 0}
    # The same policy under another name (a checkout of the nodes' file): denials name the file, and are the same.
    copy = recorded["dir"] / "copy-of-old.yaml"
    copy.write_text(recorded["policies"].read_text())
    code, report = replay_cli("--policies", str(copy), str(recorded["recording"]))
    assert (code, report["pods"]) == (0, [])
    text = criproxy("replay", "--policies", str(recorded["policies"]), str(recorded["recording"]))
    assert text.returncode == 0, text.stderr
    assert "summary: 11 calls, 5 pods, 2 namespaces, 1 node; 0 calls of 0 pods would change" in text.stdout


def test_replay_under_a_stricter_policy_names_the_newly_denied_pods_and_exits_1(recorded: dict[str, Any]) -> None:
    stricter = recorded["dir"] / "stricter.yaml"
    stricter.write_text(STRICTER)
    code, report = replay_cli("--policies", str(stricter), str(recorded["recording"]))
    assert code == 1
    assert changes_of(report) == [("big", "RunPodSandbox", DENIED_DIFFERENTLY, "shop"),
                                  ("big", "CreateContainer", DENIED_DIFFERENTLY, "shop"),
                                  ("web", "RunPodSandbox", NEWLY_DENIED, "shop"),
                                  ("web", "CreateContainer", NEWLY_DENIED, "shop"),
                                  ("web", "UpdateContainerResources", NEWLY_DENIED, "shop")]
    digest = load_policy(stricter, Lookup()).policies.digest
    big, web = report["pods"]
    assert big["calls"][0]["now"]["message"].endswith("'3Gi' is not allowed; allowed: at most 1Gi")
    assert big["calls"][0]["was"]["message"].endswith("'3Gi' is not allowed; allowed: at most 2Gi")
    assert (web["node"], web["namespace"], web["uid"]) == ("node-a", "shop", "uid-web")
    messages = [c["now"]["message"] for c in web["calls"]]
    violation = "memory-limit.criproxy.io/pod='1536Mi': '1536Mi' is not allowed; allowed: at most 1Gi"
    container = f"criproxy: container 'app' of pod shop/web denied by policy rule 'shop' ({stricter}@{digest})"
    assert messages == [f"criproxy: pod shop/web denied by policy rule 'shop' ({stricter}@{digest}): {violation}",
                        f"{container}: {violation}", f"{container}: {violation}"]
    assert web["calls"][1]["was"]["result"] == "allowed" and web["calls"][1]["now"]["status"] == "PERMISSION_DENIED"
    assert report["summary"]["kinds"][NEWLY_DENIED] == {"calls": 3, "pods": 1}
    assert report["summary"]["kinds"][DENIED_DIFFERENTLY] == {"calls": 2, "pods": 1}
    assert report["summary"]["rules"] == {"shop": {DENIED_DIFFERENTLY: 2, NEWLY_DENIED: 3}}
    text = criproxy("replay", "--policies", str(stricter), str(recorded["recording"]))
    assert text.returncode == 1
    assert "pod shop/web (node node-a, uid uid-web)\n  pod sandbox [RunPodSandbox]: newly denied (rule 'shop')\n" \
        "    was: ALLOWED\n      unchanged\n    now: DENIED PERMISSION_DENIED: criproxy: pod shop/web denied by " \
        in text.stdout
    assert "  newly denied: 3 calls, 1 pod\n" in text.stdout


def test_replay_under_a_looser_policy(recorded: dict[str, Any]) -> None:
    looser = recorded["dir"] / "looser.yaml"
    looser.write_text(LOOSER)
    code, report = replay_cli("--policies", str(looser), str(recorded["recording"]))
    assert code == 0, "nothing newly denied"
    assert changes_of(report) == [("big", "RunPodSandbox", NO_LONGER_DENIED, "shop"),
                                  ("big", "CreateContainer", NO_LONGER_DENIED, "shop"),
                                  ("bare", "RunPodSandbox", ADJUSTED_DIFFERENTLY, "tenants"),
                                  ("bare", "CreateContainer", ADJUSTED_DIFFERENTLY, "tenants")]
    big, bare = report["pods"]
    assert big["calls"][1]["now"]["changes"][0]["to"] == 3 * Gi
    assert big["calls"][1]["was"]["status"] == "PERMISSION_DENIED"
    assert bare["calls"][1]["fields"] == [{"field": "config.linux.security_context.seccomp", "before": None,
                                           "after": {"profile_type": "RuntimeDefault"}, "by": "seccomp"}]


def test_replay_against_a_baseline_policy_instead_of_the_recorded_decisions(recorded: dict[str, Any]) -> None:
    stricter, looser = recorded["dir"] / "stricter.yaml", recorded["dir"] / "looser.yaml"
    stricter.write_text(STRICTER)
    looser.write_text(LOOSER)
    # From looser to stricter: web and big newly denied.
    code, report = replay_cli("--policies", str(stricter), "--baseline", str(looser), str(recorded["recording"]))
    assert code == 1
    assert report["baseline"].startswith(f"{looser}@")
    kinds = {(name, method): kind for name, method, kind, _ in changes_of(report)}
    assert kinds[("web", "CreateContainer")] == NEWLY_DENIED
    assert kinds[("big", "CreateContainer")] == NEWLY_DENIED  # 3Gi: allowed under looser
    assert kinds[("bare", "CreateContainer")] == ADJUSTED_DIFFERENTLY
    code, same = replay_cli("--policies", str(looser), "--baseline", str(looser), str(recorded["recording"]))
    assert (code, same["pods"]) == (0, [])


def test_replay_reads_gzip_globs_and_stdin_alike(recorded: dict[str, Any]) -> None:
    stricter = recorded["dir"] / "stricter.yaml"
    stricter.write_text(STRICTER)
    data = recorded["recording"].read_bytes()
    zipped = recorded["dir"] / "record.jsonl.1.gz"
    zipped.write_bytes(gzip.compress(data))
    _, plain = replay_cli("--policies", str(stricter), str(recorded["recording"]))
    _, piped = replay_cli("--policies", str(stricter), "-", stdin=gzip.compress(data))
    _, both = replay_cli("--policies", str(stricter), str(recorded["dir"] / "record.jsonl*"))
    assert changes_of(piped) == changes_of(plain)
    assert both["summary"]["calls"] == 22 and both["summary"]["pods"] == 5
    assert both["summary"]["kinds"][NEWLY_DENIED] == {"calls": 6, "pods": 1}
    assert [c["count"] for c in both["pods"][1]["calls"]] == [2, 2, 2]


def test_the_recording_holds_no_environment_command_mount_image_or_credential(
        configured: Callable[[str], Proxy], fake: FakeRuntime, sockdir: Path) -> None:
    recording = sockdir / "record.jsonl"
    proxy = configured(f"record: {recording}\n")
    config = sandbox("shop", "web", {"memory-limit.criproxy.io/pod": "512Mi",
                                     "kubectl.kubernetes.io/last-applied-configuration": f'{{"env":"{SECRET}"}}'})
    config.hostname = f"host-{SECRET}"
    config.log_directory = f"/var/log/{SECRET}"
    config.dns_config.servers.append(SECRET)
    assert call(proxy, RUN_POD_SANDBOX, api_pb2.RunPodSandboxRequest(config=config)) == grpc.StatusCode.OK
    container = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="app"), image=api_pb2.ImageSpec(image=f"registry/{SECRET}:1"),
        command=["/bin/sh", "-c", f"echo {SECRET}"], args=[SECRET], working_dir=f"/{SECRET}",
        envs=[api_pb2.KeyValue(key="PASSWORD", value=SECRET.encode())],
        mounts=[api_pb2.Mount(container_path=f"/run/{SECRET}", host_path=f"/etc/{SECRET}")],
        devices=[api_pb2.Device(host_path=f"/dev/{SECRET}")], labels={"x": SECRET}, annotations={"y": SECRET},
        log_path=f"{SECRET}.log")
    container.linux.resources.CopyFrom(resources())
    assert call(proxy, CREATE_CONTAINER, api_pb2.CreateContainerRequest(
        pod_sandbox_id="sb-1", config=container, sandbox_config=config)) == grpc.StatusCode.OK
    auth = api_pb2.AuthConfig(username=SECRET, password=SECRET, auth=SECRET, identity_token=SECRET)
    call(proxy, "ImageService/PullImage", api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image="x"), auth=auth,
                                                                   sandbox_config=config))
    run, create = records(recording, 2)
    assert (run["pod"], create["container"]) == ("web", "app")
    assert create["changes"][0]["to"] == 512 * Mi
    assert SECRET not in recording.read_text()
    assert len(recording.read_text().splitlines()) == 2, "PullImage is never decoded, so never recorded"


# ------------------------------------------------------------------------------------ bad recordings


def good_line(recorded: dict[str, Any]) -> str:
    return recorded["recording"].read_text().splitlines()[1]


@pytest.mark.parametrize(("bad", "why"), [
    (lambda good: good[: len(good) // 2], "truncated: the line ends inside its record (a partly written line?)"),
    (lambda good: good.replace('"v":1', '"v":2', 1), "recording format version 2; this criproxy reads version 1"),
    (lambda good: "criproxy was here", "not JSON: Expecting value (column 1)"),
    (lambda good: "[1, 2]", "not a record: a JSON list, not an object"),
    (lambda good: '{"time": "x"}', 'not a criproxy recording: no format version ("v")'),
    (lambda good: good.replace('"labels":{', '"labels":{"n":7,', 1),
     'field labels: expected an object of strings, got {"n": 7, "app": "web", "team": "shop"}'),
    (lambda good: good.replace('"namespace":"shop",', "", 1), "missing field(s) namespace"),
    (lambda good: good.replace('"cpu_period":', '"cpu_perdiod":', 1),
     "field request.resources.cpu_perdiod: not a field of LinuxContainerResources"),
])
def test_a_bad_recording_is_refused_naming_the_file_and_line(recorded: dict[str, Any], tmp_path: Path,
                                                             bad: Callable[[str], str], why: str) -> None:
    good = good_line(recorded)
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n{good}\n{bad(good)}\n{good}\n")
    done = criproxy("replay", "--policies", str(recorded["policies"]), str(path))
    assert done.returncode == 2
    assert done.stderr == f"criproxy: {path}:3: {why}\n"
    zipped = tmp_path / "bad.gz"
    zipped.write_bytes(gzip.compress(path.read_bytes()))
    done = criproxy("replay", "--policies", str(recorded["policies"]), str(zipped))
    assert (done.returncode, done.stderr) == (2, f"criproxy: {zipped}:3: {why}\n")


def test_a_cut_last_line_is_truncated_and_a_missing_file_is_named(recorded: dict[str, Any], tmp_path: Path) -> None:
    good = good_line(recorded)
    path = tmp_path / "cut.jsonl"
    path.write_text(f"{good}\n{good[:-40]}")
    done = criproxy("replay", "--policies", str(recorded["policies"]), str(path))
    assert (done.returncode, done.stderr) == (2, f"criproxy: {path}:2: truncated: the line ends inside its record "
                                                 "(a partly written line?)\n")
    done = criproxy("replay", "--policies", str(recorded["policies"]), str(tmp_path / "none-*.jsonl"))
    assert (done.returncode, done.stderr) == (2, f"criproxy: {tmp_path}/none-*.jsonl: no recording matches\n")
    done = criproxy("replay", "--policies", str(recorded["policies"]), "-", stdin=f"{good}\n{{\n".encode())
    assert (done.returncode, done.stderr) == (2, b"criproxy: -:2: truncated: the line ends inside its record "
                                                 b"(a partly written line?)\n")


def test_ranges_of_a_large_file_on_every_core_find_what_one_core_finds(recorded: dict[str, Any], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from criproxy import replay as replay_module

    monkeypatch.setattr(replay_module, "BLOCK_BYTES", 2048)  # ranges and blocks of a few lines
    lines = recorded["recording"].read_text().splitlines()
    path = tmp_path / "big.jsonl"
    with path.open("w") as f:
        for i in range(40):
            for line in lines:
                f.write(line.replace('"uid":"uid-', f'"uid":"{i}-uid-').replace('"node":"node-a"',
                                                                                  f'"node":"node-{i % 7}"') + "\n")
    config = build_config({}, None)
    lookup = Lookup()
    stricter = tmp_path / "stricter.yaml"
    stricter.write_text(STRICTER)

    def run(jobs: int) -> dict[str, Any]:
        total = replay(Replayer(config, load_policy(stricter, lookup)), [str(path)], jobs)
        return json.loads(render_json(total, "p", None))

    one, two = run(1), run(2)
    assert one == two
    assert one["summary"]["calls"] == 440 and one["summary"]["pods"] == 200 and one["summary"]["nodes"] == 7
    assert one["summary"]["kinds"][NEWLY_DENIED] == {"calls": 120, "pods": 40}
    # A bad line deep in a range is named by its line number.
    text = path.read_text().splitlines()
    text[333] = text[333][:50]
    path.write_text("\n".join(text) + "\n")
    for jobs in (1, 2):
        with pytest.raises(BadRecording) as caught:
            run(jobs)
        assert caught.value.located() == f"{path}:334: truncated: the line ends inside its record (a partly written " \
            "line?)"


def test_verdicts_shared_by_pods_of_one_template_name_each_pod(recorded: dict[str, Any], tmp_path: Path) -> None:
    template = json.loads(good_line(recorded))  # web's CreateContainer
    path = tmp_path / "replicas.jsonl"
    with path.open("w") as f:
        for name in ("web-1", "web-2", "web-3"):
            f.write(json.dumps({**template, "pod": name, "uid": f"uid-{name}"}) + "\n")
    stricter = tmp_path / "stricter.yaml"
    stricter.write_text(STRICTER)
    replayer = Replayer(build_config({}, None), load_policy(stricter, Lookup()))
    report = json.loads(render_json(replay(replayer, [str(path)], 1), "p", None))
    assert replayer.misses == 1, "one verdict for the three replicas"
    assert [(p["name"], p["calls"][0]["now"]["message"].split(" denied")[0]) for p in report["pods"]] == [
        (f"web-{i}", f"criproxy: container 'app' of pod shop/web-{i}") for i in (1, 2, 3)]


def test_lines_written_in_another_key_order_replay_alike(recorded: dict[str, Any], tmp_path: Path) -> None:
    """Replay recognises the rest of a line criproxy wrote without parsing it again; a line another tool wrote
    (keys sorted, spaces) is parsed in full: both come to the same report."""
    lines = recorded["recording"].read_text().splitlines()
    ours, theirs = tmp_path / "ours.jsonl", tmp_path / "theirs.jsonl"
    replicas = [line.replace('"uid":"uid-', f'"uid":"{i}-uid-') for i in range(5) for line in lines]
    ours.write_text("\n".join(replicas) + "\n")
    theirs.write_text("\n".join(json.dumps(json.loads(line), sort_keys=True) for line in replicas) + "\n")
    stricter = tmp_path / "stricter.yaml"
    stricter.write_text(STRICTER)
    reports, rests = [], []
    for path in (ours, theirs):
        replayer = Replayer(build_config({}, None), load_policy(stricter, Lookup()))
        reports.append(json.loads(render_json(replay(replayer, [str(path)], 1), "p", None)))
        rests.append(len(replayer.rests))
    assert reports[0] == reports[1]
    assert rests == [9, 0], "the allowed calls' rests are remembered; sorted lines have none"
    assert reports[0]["summary"]["pods"] == 25 and reports[0]["summary"]["kinds"][NEWLY_DENIED]["pods"] == 5


def test_replay_renders_calls_as_explain_does() -> None:
    from criproxy.explain import Pod

    calls = [Explained(CREATE_CONTAINER, "app", "allowed", changes=[
                 {"field": "f", "from": 1, "to": 2, "by": "resources", "key": "k"}], decisions=[
                 {"action": "audited", "rule": "r", "mode": "audit", "interceptor": "resources",
                  "setting": "memory-limit", "key": "k", "value": "v", "reason": "why"}]),
             Explained(RUN_POD_SANDBOX, None, "denied", "PERMISSION_DENIED", "no"),
             Explained(RUN_POD_SANDBOX, None, "allowed")]
    pod = Pod("Pod ns/p", "ns", "p", {}, {"containers": []})
    shown = explain_text([(pod, calls)], "x").splitlines()[3:]
    ours = []
    for c in calls:
        ours.append(f"  {'container app' if c.container else 'pod sandbox'} [{c.method.split('/')[1]}]: "
                    f"{verdict_line(c)}")
        ours += detail_lines(c, "    ")
    assert shown == ours


# ------------------------------------------------------------------------------ writing, and its failures


def test_config_keys_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"record: {tmp_path}/r.jsonl\nrecord-max-bytes: 10Mi\nnode-name: worker-7\n")
    config = build_config({}, path)
    assert (config.record, config.record_max_bytes, config.node_name) == (tmp_path / "r.jsonl", 10 * Mi, "worker-7")
    assert build_config({"node-name": "n2"}, path).node_name == "n2"
    with pytest.raises(ConfigError, match="record-max-bytes: expected a size from 1Mi to 100Gi"):
        build_config({"record-max-bytes": "1k"}, None)
    with pytest.raises(ConfigError, match="--node-name: expected a node name"):
        build_config({"node-name": "a b"}, None)


def test_a_recording_that_cannot_be_opened_stops_the_start(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    done = criproxy("serve", "--listen", f"unix://{tmp_path}/p.sock", "--runtime-endpoint",
                    f"unix://{tmp_path}/none.sock", "--record", str(tmp_path / "file" / "r.jsonl"))
    assert done.returncode == 2
    assert done.stderr.startswith(f"criproxy: --record {tmp_path}/file/r.jsonl: cannot open it: ")


def test_a_full_disk_drops_records_counts_them_and_says_so_once(configured: Callable[[str], Proxy],
                                                                 fake: FakeRuntime,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="criproxy.observe.record")
    proxy = configured("record: /dev/full\n")
    for i in range(3):
        assert start_pod(proxy, fake, "shop", f"p{i}") == [grpc.StatusCode.OK] * 2, "calls never fail"
    assert proxy.observability is not None and proxy.observability.recorder is not None
    recorder = proxy.observability.recorder
    eventually(lambda: recorder.dropped == 6, "6 records dropped")
    assert proxy.observability.http is not None
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.observability.http.port}/metrics", timeout=5) as r:
        assert "criproxy_record_dropped_total 6.0" in r.read().decode()
    said = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert said == ["recording /dev/full: 1 record(s) dropped (cannot write /dev/full: No space left on device); "
                    "criproxy_record_dropped_total counts every one; this is said at most once a minute"]


def test_a_full_queue_drops_records_and_never_waits(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "r.jsonl", node="n", domain="criproxy.io", capacity=2)
    dropped: list[int] = []
    recorder.on_drop = dropped.append
    gate = threading.Event()
    emit = recorder.file.emit
    recorder.file.emit = lambda record: (gate.wait(10), emit(record))  # type: ignore[method-assign]
    ctx = CallContext(RUN_POD_SANDBOX, record_pod(), None, api_pb2.RunPodSandboxRequest(config=sandbox("ns", "p")))
    outcome = asyncio.run(Pipeline([], lookup=Lookup()).decide(ctx))
    started = time.monotonic()
    for _ in range(10):
        recorder(ctx, outcome, AllowAll())
    assert time.monotonic() - started < 1.0, "taking a record never waits for the writer"
    gate.set()
    recorder.close()
    assert sum(dropped) == recorder.dropped >= 7  # at most the queue's 2 and the one being written
    written = (tmp_path / "r.jsonl").read_text().splitlines()
    assert len(written) == 10 - recorder.dropped
    assert all(parse(line)["pod"] == "p" for line in written)


def record_pod() -> Any:
    from criproxy.pipeline.index import pod_info

    s = sandbox("ns", "p")
    return pod_info(s.metadata, s.labels, s.annotations)


def test_the_recording_rotates_at_its_bound_and_never_cuts_a_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    recorder = Recorder(path, node="n", domain="criproxy.io", max_bytes=4000, backups=2)
    ctx = CallContext(RUN_POD_SANDBOX, record_pod(), None, api_pb2.RunPodSandboxRequest(config=sandbox("ns", "p")))
    outcome = asyncio.run(Pipeline([], lookup=Lookup()).decide(ctx))
    for _ in range(40):
        recorder(ctx, outcome, AllowAll())
    recorder.close()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["r.jsonl", "r.jsonl.1", "r.jsonl.2"]
    for f in files:
        assert f.stat().st_size <= 4000 and f.stat().st_mode & 0o777 == 0o600
        assert all(parse(line)["v"] == 1 for line in f.read_text().splitlines())


def test_a_call_failing_outside_policy_is_recorded_as_an_error(tmp_path: Path) -> None:
    class Broken:
        name, events = "broken", frozenset({RUN_POD_SANDBOX})

        def adjust(self, ctx: CallContext) -> Any:
            raise RuntimeError("boom")

    path = tmp_path / "r.jsonl"
    recorder = Recorder(path, node="n", domain="criproxy.io")
    pipeline = Pipeline([Broken()], lookup=Lookup(), on_decided=recorder, on_decisions=lambda *_: None)
    request = api_pb2.RunPodSandboxRequest(config=sandbox("ns", "p"))
    with pytest.raises(Exception, match="interceptor broken failed"):
        asyncio.run(pipeline.before(Call(METHODS[RUN_POD_SANDBOX], "/runtime.v1." + RUN_POD_SANDBOX, ()), request))
    recorder.close()
    (line,) = path.read_text().splitlines()
    record = parse(line)
    assert (record["result"], record["status"]) == ("error", "INTERNAL")
    assert record["message"].startswith("criproxy: interceptor broken failed on pod ns/p: RuntimeError('boom')")


def test_parse_refuses_what_is_not_a_version_1_record() -> None:
    with pytest.raises(RecordError, match="version 0"):
        parse('{"v": 0}')
    with pytest.raises(RecordError, match="version True"):
        parse('{"v": true}')
    assert record_module.read_by_criproxy("cpu-quota.criproxy.io/pod", "criproxy.io")
    assert record_module.read_by_criproxy("seccomp.security.alpha.kubernetes.io/pod", "criproxy.io")
    assert not record_module.read_by_criproxy("criproxy.io/pinned", "criproxy.io")
    assert not record_module.read_by_criproxy("kubectl.kubernetes.io/last-applied-configuration", "criproxy.io")


# --------------------------------------------------------------------------------- docs/record-replay.md

PAGE = ROOT / "docs/record-replay.md"
EXAMPLE = ROOT / "docs/examples/record-replay"


def page_output(command: str) -> str:
    """What docs/record-replay.md shows `$ command` printing (up to the next command or the end of its block)."""
    text = PAGE.read_text()
    start = text.index(f"$ {command}\n") + len(command) + 3
    ends = [i for i in (text.find("\n$ ", start - 1), text.find("```", start)) if i >= 0]
    return text[start:min(ends)].rstrip("\n") + "\n"


def test_the_worked_example_prints_what_the_page_shows() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "criproxy", "replay", *args], capture_output=True, text=True,
                              cwd=EXAMPLE, timeout=60, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})

    done = run("--policies", "new-policies.yaml", "record.jsonl")
    assert (done.returncode, done.stderr) == (1, "")
    assert done.stdout == page_output("criproxy replay --policies new-policies.yaml record.jsonl")
    assert page_output("echo $?") == "1\n"
    report = json.loads(run("--policies", "new-policies.yaml", "-o", "json", "record.jsonl").stdout)
    shown = "".join(json.dumps({"pod": f"{p['namespace']}/{p['name']}", "calls": [
        {"method": c["method"], "change": c["change"], "rule": c["rule"]} for c in p["calls"]]},
        separators=(",", ":")) + "\n" for p in report["pods"])
    assert shown == page_output("criproxy replay --policies new-policies.yaml -o json record.jsonl | jq -c "
                                "'.pods[] | {pod: \"\\(.namespace)/\\(.name)\", calls: [.calls[] | {method, change, "
                                "rule}]}'")
    same = run("--policies", "policies.yaml", "record.jsonl")
    assert same.returncode == 0
    assert "".join(same.stdout.splitlines(True)[-6:]) == page_output(
        "criproxy replay --policies policies.yaml record.jsonl | tail -6")
    lines = (EXAMPLE / "record.jsonl").read_text().splitlines()
    for line in lines:
        check(parse(line))
    text = PAGE.read_text()
    block = text[text.index("```json\n") + 8:]
    record = json.loads(block[:block.index("```")])
    assert record == {**json.loads(lines[1]), "decisions": ["..."]}


def test_a_denial_lists_its_violations_in_one_order_whatever_the_order_of_the_annotations() -> None:
    """A decoded protobuf map's order changes from one process to the next: a denial's message must not, or
    replay would find every pod denied for two annotations 'denied differently'."""
    from criproxy.policies.engine import AnnotationPolicy
    from criproxy.policies.model import parse_policy

    lookup = Lookup()
    pipeline = Pipeline([], lookup=lookup, on_decisions=lambda *_: None)
    pipeline.policy = AnnotationPolicy(parse_policy(OLD, "p.yaml"), lookup)
    keys = ["cpu-quota.criproxy.io/pod", "memory-limit.criproxy.io/pod", "oom-score-adj.criproxy.io/pod"]
    messages = set()
    for order in (keys, keys[::-1], keys[1:] + keys[:1]):
        values = {"memory-limit.criproxy.io/pod": "3Gi"}  # over shop's 2Gi; the other two it does not allow
        annotations = {key: values.get(key, "1") for key in order}  # in this order, as a decoded map has its own
        ctx = CallContext(RUN_POD_SANDBOX, PodInfo("shop", "p", "u", {}, annotations), None,
                          api_pb2.RunPodSandboxRequest(config=sandbox("shop", "p", annotations)))
        outcome = asyncio.run(pipeline.decide(ctx))
        assert outcome.denial is not None
        messages.add(outcome.denial.reason)
    (message,) = messages
    assert message.index("cpu-quota") < message.index("memory-limit") < message.index("oom-score-adj")
