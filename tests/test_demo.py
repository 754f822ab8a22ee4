"""`criproxy demo`'s parts that need no containerd: its wording, its directory lock, the containerd
configuration it writes for the host's settings, the pods it sends. (tests/e2e/test_demo.py runs it.)"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import grpc
import pytest

from criproxy.api.runtime.v1 import api_pb2
from criproxy.demo import containerd as demo_containerd
from criproxy.demo import host, pods, run, show
from criproxy.demo.containerd import Containerd
from criproxy.demo.host import HostSettings
from criproxy.demo.workdir import LOCK, Refused, WorkDir

Mi = 1 << 20


@pytest.mark.parametrize(("code", "go"), [
    (grpc.StatusCode.PERMISSION_DENIED, "PermissionDenied"), (grpc.StatusCode.INVALID_ARGUMENT, "InvalidArgument"),
    (grpc.StatusCode.CANCELLED, "Canceled"), (grpc.StatusCode.OK, "OK"), (grpc.StatusCode.UNAVAILABLE, "Unavailable"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "DeadlineExceeded"),
])
def test_status_codes_are_named_as_go_prints_them(code: grpc.StatusCode, go: str) -> None:
    assert show.go_code(code) == go


def test_a_denial_reads_as_the_kubelets_event() -> None:
    assert show.kubelet_event("RunPodSandbox", grpc.StatusCode.PERMISSION_DENIED, "criproxy: pod a/b denied") == (
        "Warning  FailedCreatePodSandBox  kubelet  Failed to create pod sandbox: rpc error: code = PermissionDenied "
        "desc = criproxy: pod a/b denied")
    assert show.kubelet_event("CreateContainer", grpc.StatusCode.INVALID_ARGUMENT, "criproxy: bad") == (
        "Warning  Failed  kubelet  Error: criproxy: bad")


def test_applied_entries_read_as_field_was_value_by_and_from() -> None:
    entries = [
        {"field": "runtime_handler", "value": "runc-alt", "was": "", "by": "runtime-handler",
         "setting": "runtime-handler", "key": "runtime-handler.criproxy.io/pod"},
        {"field": "config.linux.resources.memory_limit_in_bytes", "value": 64 * Mi, "was": 256 * Mi,
         "by": "resources", "setting": "memory-limit", "key": "memory-limit.criproxy.io/container.app"},
        {"field": "config.linux.security_context.seccomp", "value": {"profile_type": "RuntimeDefault"},
         "was": {"profile_type": "Unconfined"}, "by": "seccomp", "setting": "seccomp-profile", "key": ""},
    ]
    assert show.applied_lines(entries) == [
        "runtime_handler: '' -> 'runc-alt'  (runtime-handler, from runtime-handler.criproxy.io/pod)",
        "config.linux.resources.memory_limit_in_bytes: 268435456 (256Mi) -> 67108864 (64Mi)  (resources, from "
        "memory-limit.criproxy.io/container.app)",
        "config.linux.security_context.seccomp: Unconfined -> RuntimeDefault  (seccomp, from criproxy's "
        "configuration)",
    ]


def test_pods_read_their_applied_annotation() -> None:
    assert pods.applied({"criproxy.io/applied": '[{"field": "f"}]'}) == [{"field": "f"}]
    assert pods.applied({}) == [] and pods.applied({"criproxy.io/applied": "not json"}) == []


def test_the_metrics_excerpt_is_the_pod_calls_decisions_and_policy_in_order() -> None:
    scrape = "\n".join([
        "# HELP criproxy_calls_total CRI calls", "# TYPE criproxy_calls_total counter",
        'criproxy_calls_total{code="OK",method="RuntimeService/Version"} 3.0',
        'criproxy_calls_total{code="OK",method="RuntimeService/RunPodSandbox"} 1.0',
        'criproxy_policy_info{digest="d",file="/p"} 1.0',
        'criproxy_decisions_total{action="denied",interceptor="seccomp",rule="r",setting="seccomp-profile"} 1.0',
        'criproxy_calls_total_other 1.0',
        'criproxy_proxy_duration_seconds_bucket{le="0.1",method="RuntimeService/RunPodSandbox"} 1.0',
        'criproxy_proxy_duration_seconds_sum{method="RuntimeService/RunPodSandbox"} 0.002',
    ])
    assert show.metrics_excerpt(scrape) == [
        'criproxy_calls_total{code="OK",method="RuntimeService/RunPodSandbox"} 1.0',
        'criproxy_decisions_total{action="denied",interceptor="seccomp",rule="r",setting="seccomp-profile"} 1.0',
        'criproxy_proxy_duration_seconds_sum{method="RuntimeService/RunPodSandbox"} 0.002',
        'criproxy_policy_info{digest="d",file="/p"} 1.0',
    ]


# -- the directory and its lock -----------------------------------------------------------------


def test_a_second_claim_of_a_claimed_directory_is_refused_naming_the_holder(tmp_path: Path) -> None:
    first = WorkDir.claim(tmp_path / "demo")
    try:
        assert (tmp_path / "demo" / LOCK).read_text() == f"{os.getpid()}\n"
        with pytest.raises(Refused, match=rf"another criproxy demo \(pid {os.getpid()}\) is running in "):
            WorkDir.claim(tmp_path / "demo")
    finally:
        assert first.release() == []
    assert not (tmp_path / "demo").exists()
    WorkDir.claim(tmp_path / "demo").release()  # free again


def test_release_removes_what_is_inside_but_keeps_a_directory_that_was_there(tmp_path: Path) -> None:
    claimed = WorkDir.claim(tmp_path)
    (tmp_path / "containerd" / "root").mkdir(parents=True)
    (tmp_path / "criproxy.log").write_text("x")
    assert claimed.release() == []
    assert tmp_path.is_dir() and list(tmp_path.iterdir()) == []


def test_a_directory_that_is_not_a_demos_is_refused_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(Refused, match="is not empty and is not a criproxy demo's directory"):
        WorkDir.claim(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    with pytest.raises(Refused, match="is not a directory"):
        WorkDir.claim(tmp_path / "precious.txt")


def test_what_an_earlier_demo_left_is_found_and_removed(tmp_path: Path) -> None:
    claimed = WorkDir.claim(tmp_path / "demo")
    (tmp_path / "demo" / "criproxy.sock").write_text("")
    assert claimed._fd is not None
    os.close(claimed._fd)  # the earlier demo died: its lock went with it, its files stayed
    claimed._fd = None
    again = WorkDir.claim(tmp_path / "demo")
    assert again.leftovers() == ["criproxy.sock"]
    assert again.clean_leftovers() == []
    assert again.leftovers() == []
    assert again.release() == []


# -- the containerd configuration ----------------------------------------------------------------


@pytest.mark.parametrize("settings", [
    HostSettings(apparmor=False, restrict_oom_score_adj=True, snapshotter="overlayfs", reasons=()),
    HostSettings(apparmor=True, restrict_oom_score_adj=False, snapshotter="native", reasons=()),
])
def test_the_config_follows_the_hosts_settings(tmp_path: Path, settings: HostSettings) -> None:
    config = tomllib.loads(Containerd(tmp_path, settings=settings).config_toml())
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["disable_apparmor"] is not settings.apparmor
    assert cri["restrict_oom_score_adj"] is settings.restrict_oom_score_adj
    assert cri["containerd"]["snapshotter"] == settings.snapshotter
    assert sorted(cri["containerd"]["runtimes"]) == ["runc", "runc-alt"]
    assert all(r["options"]["SystemdCgroup"] is False for r in cri["containerd"]["runtimes"].values())
    everything = [config["root"], config["state"], config["grpc"]["address"], cri["cni"]["conf_dir"],
                  *(r["options"]["Root"] for r in cri["containerd"]["runtimes"].values())]
    assert all(Path(path).is_relative_to(tmp_path) for path in everything)


def test_apparmor_is_used_only_when_the_kernel_has_it_and_its_profile_can_be_loaded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    enabled = tmp_path / "enabled"
    assert host.apparmor_usable(enabled) == (False, "AppArmor off (not in this kernel)")
    enabled.write_text("N\n")
    assert host.apparmor_usable(enabled)[0] is False
    enabled.write_text("Y\n")
    monkeypatch.setattr(host.shutil, "which", lambda name: None)
    assert host.apparmor_usable(enabled)[1].startswith("AppArmor off (in the kernel, but apparmor_parser")
    monkeypatch.setattr(host.shutil, "which", lambda name: f"/sbin/{name}")
    assert host.apparmor_usable(enabled) == (True, "AppArmor on (containerd's default profile)")


def test_the_oom_score_adj_probe_agrees_with_the_capability() -> None:
    lowers, reason = host.can_lower_oom_score_adj()
    status = Path("/proc/self/status").read_text()
    effective = int(next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1], 16)
    if os.geteuid() == 0 and not effective >> 24 & 1:  # root without CAP_SYS_RESOURCE
        assert not lowers and "root lacks CAP_SYS_RESOURCE" in reason
    assert reason.startswith(f"restrict_oom_score_adj = {str(not lowers).lower()} (")


def test_the_tests_and_the_demo_share_one_containerd_module() -> None:
    from tests.support import containerd as support_containerd
    from tests.support import ociimage as support_ociimage

    assert support_containerd.Containerd is demo_containerd.Containerd
    assert Path(demo_containerd.__file__).with_name("pause.c") == support_ociimage.PAUSE_SOURCE
    assert support_ociimage.PAUSE_SOURCE.is_file()
    assert not (Path(support_containerd.__file__).parent / "pause.c").exists()


# -- the pods ------------------------------------------------------------------------------------


def test_the_demo_pods_are_what_a_kubelet_sends_on_a_node_without_cni(tmp_path: Path) -> None:
    web, report = pods.demo_pods()
    plan = pods.plan(web, image="criproxy.demo/busybox:1", log_root=tmp_path, cgroup_parent="/criproxy-demo")
    config = plan.sandbox.config
    assert (config.metadata.namespace, config.metadata.name, plan.who) == ("criproxy-demo", "web", "criproxy-demo/web")
    assert dict(config.annotations) == web.metadata["annotations"]
    assert config.linux.security_context.namespace_options.network == api_pb2.NODE
    assert config.linux.cgroup_parent == "/criproxy-demo"
    assert config.log_directory.startswith(f"{tmp_path}/criproxy-demo_web_")
    [app] = plan.containers
    assert app.config.image.image == "criproxy.demo/busybox:1"
    assert list(app.config.command) == pods.COMMAND
    resources = app.config.linux.resources
    assert (resources.memory_limit_in_bytes, resources.cpu_quota, resources.cpu_shares) == (256 * Mi, 50_000, 102)
    assert app.config.linux.security_context.seccomp.profile_type == api_pb2.SecurityProfile.Unconfined
    assert app.config.linux.security_context.namespace_options.network == api_pb2.NODE
    denied = pods.plan(report, image="x", log_root=tmp_path)
    assert denied.who == "batch-nightly/report" and not denied.sandbox.config.linux.cgroup_parent


def test_demo_is_refused_without_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(run.os, "geteuid", lambda: 1000)
    assert run.run_demo(run.Options(workdir=tmp_path / "demo", once=True)) == 2
    assert capsys.readouterr().err == ("criproxy demo: it runs containerd and runc, which need root: run it as root "
                                       "(sudo criproxy demo)\n")
    assert not (tmp_path / "demo").exists()
