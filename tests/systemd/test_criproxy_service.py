"""criproxy.service under a real systemd: deploy/host/install.sh run on a booted Debian node (see
conftest.py), the unit started, reloaded, killed, booted and removed the way an operator and
systemd do it, with the host calling criproxy's socket throughout.

The tests share one node and run in file order, which is the order of a node's life (install,
policy changes, upgrades, crashes, reboots, uninstall); each one first makes sure criproxy is
installed and serving, so any of them also runs alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

import criproxy
from criproxy.api.runtime.v1 import api_pb2
from tests.support.cri import CriClient
from tests.support.pods import run_pod
from tests.systemd.conftest import KUBELET_CONFIG, PROXY_SOCKET, RUNTIME_SOCKET, SUPPORT, Node
from tests.systemd.support.load import Load

# containerd as well: these need a real containerd (the node's runtime), and `-m "not containerd"` is how
# the quick runs leave those out.
pytestmark = [pytest.mark.systemd, pytest.mark.containerd, pytest.mark.timeout(900)]

README = Path(__file__).resolve().parents[2] / "deploy/README.md"
UNIT = "criproxy.service"
PROXY_ENDPOINT = f"unix://{PROXY_SOCKET}"


def eventually(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout:.0f}s: {what}"
        time.sleep(0.1)


def version_through(endpoint: str) -> api_pb2.VersionResponse:
    """One Version call, no retry: the socket must answer now."""
    with CriClient(endpoint) as cri:
        response = cri.call("RuntimeService", "Version", api_pb2.VersionRequest(), timeout=5)
    assert isinstance(response, api_pb2.VersionResponse)
    return response


def timespan_seconds(value: str) -> float:
    """A systemd time span as `systemctl show` prints it ("1s", "100ms", "1min 30s")."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}
    parts = re.findall(r"([\d.]+)(us|ms|s|min|h)", value)
    assert parts, f"not a time span: {value!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def journal_of(node: Node, pid: int) -> str:
    return node.machine.journal("-u", UNIT, f"_PID={pid}", "-o", "cat")


# ----------------------------------------------------------------------------------------- install

def test_install_starts_the_service_only_once_it_answers(node: Node) -> None:
    if node.installed():
        node.install("uninstall")
    output = node.install("install")
    assert "systemctl start criproxy" in output, output
    # install.sh returns after `systemctl start`, which returns after READY=1: the socket answers now.
    direct = version_through(node.runtime.endpoint)
    assert version_through(node.endpoint) == direct

    state = node.machine.show(UNIT, "Type", "NotifyAccess", "ActiveState", "SubState", "StatusText", "MainPID",
                              "UnitFileState", "Result")
    assert state["Type"] == "notify" and state["NotifyAccess"] == "all", state
    assert (state["ActiveState"], state["SubState"], state["UnitFileState"]) == ("active", "running", "enabled")
    assert f"criproxy {criproxy.__version__}" in state["StatusText"], state
    assert PROXY_ENDPOINT in state["StatusText"], state
    status = node.machine.systemctl("status", UNIT, "--no-pager", "--lines=0").stdout
    assert f"criproxy {criproxy.__version__} serving {PROXY_ENDPOINT}" in status, status
    argv = node.machine.run("cat", f"/proc/{state['MainPID']}/cmdline").stdout.split("\0")
    assert argv[0] == f"/opt/criproxy/{criproxy.__version__}/bin/python", argv  # the installed virtualenv's

    # Every later start too: stopped (the socket goes), started, answering at once.
    for _ in range(3):
        node.machine.systemctl("stop", UNIT)
        assert not (node.sockdir / "criproxy.sock").exists(), (
            f"a stopped criproxy leaves no socket\n{node.journal_tail()}")
        node.machine.systemctl("start", UNIT)
        with CriClient(node.endpoint) as cri:
            images = cri.call("ImageService", "ListImages", api_pb2.ListImagesRequest(), timeout=5)
        assert isinstance(images, api_pb2.ListImagesResponse)
        assert node.runtime.pause_image in {tag for image in images.images for tag in image.repo_tags}

    # A stop right after `start` returned (READY=1 is sent before criproxy has finished starting) is a
    # clean stop too: it drains and removes the socket, not the signal's default action.
    cycles = node.machine.sh(
        f"for i in $(seq 10); do systemctl start {UNIT} && systemctl stop {UNIT} || exit 2; "
        f"if [ -e {PROXY_SOCKET} ]; then echo left; rm -f {PROXY_SOCKET}; else echo removed; fi; done", timeout=120)
    assert cycles.stdout.split() == ["removed"] * 10, f"{cycles.stdout}\n{node.journal_tail()}"
    node.machine.systemctl("start", UNIT)

    again = node.install("install")
    assert "criproxy.service is running and nothing changed" in again, again


# ----------------------------------------------------------------------------------------- hardening

def probe_sandbox(node: Node) -> dict[str, object]:
    """Run support/sandbox-probe.py as ExecStartPre= of criproxy.service (a drop-in, removed again)."""
    token = uuid.uuid4().hex[:12]
    (node.outdir / "sandbox-probe.py").write_bytes((SUPPORT / "sandbox-probe.py").read_bytes())
    dropin_dir = node.machine.path("/etc/systemd/system/criproxy.service.d")
    dropin_dir.mkdir()
    try:
        (dropin_dir / "50-sandbox-probe.conf").write_text(
            f"[Service]\nExecStartPre=/usr/bin/python3 /srv/criproxy/out/sandbox-probe.py {token}\n")
        node.machine.systemctl("daemon-reload")
        node.machine.systemctl("restart", UNIT)
    finally:
        for dropin in dropin_dir.iterdir():
            dropin.unlink()
        dropin_dir.rmdir()
        node.machine.systemctl("daemon-reload")
        node.machine.systemctl("restart", UNIT)
    lines = [line for line in node.machine.journal("-u", UNIT, "-o", "cat").splitlines()
             if line.startswith("criproxy-sandbox-probe: ") and token in line]
    assert lines, f"the probe did not report\n{node.journal_tail()}"
    found: dict[str, object] = json.loads(lines[-1].removeprefix("criproxy-sandbox-probe: "))
    found["token"] = token
    return found


def test_sandbox_confines_the_service(serving: Node) -> None:
    probe = probe_sandbox(serving)
    token = probe["token"]
    writes = probe["write"]
    assert isinstance(writes, dict)
    writable = {path for path, outcome in writes.items() if outcome == "ok"}
    assert writable == {f"/run/criproxy/probe-{token}", f"/var/log/criproxy/probe-{token}", f"/tmp/probe-{token}"}, (
        f"only the runtime and logs directories (and a private /tmp) are writable: {writes}")
    # Outside the service's own mount namespace none of it is there: the probe removed what it could
    # write, and its /tmp is private.
    reached = [path for path in writes if serving.machine.run("test", "-e", path, check=False).returncode == 0]
    assert not reached, f"reached the node's file system: {reached}"
    assert probe["new_file_mode"] == "0o600", "UMask=0077"
    status = probe["status"]
    assert isinstance(status, dict)
    # CAP_CHOWN (bit 0) and CAP_DAC_READ_SEARCH (bit 2), nothing else; no new privileges; a seccomp filter.
    assert status == {"CapBnd": "0000000000000005", "CapEff": "0000000000000005", "CapPrm": "0000000000000005",
                      "CapAmb": "0000000000000000", "NoNewPrivs": "1", "Seccomp": "2"}, status
    assert probe["unshare_user"] == "EPERM", "RestrictNamespaces="
    assert probe["ptrace_traceme"] == "EPERM", "SystemCallFilter=@system-service"
    assert probe["socket"] == {"AF_UNIX": "ok", "AF_INET": "ok", "AF_NETLINK": "EAFNOSUPPORT",
                               "AF_PACKET": "EAFNOSUPPORT"}, "RestrictAddressFamilies="
    assert probe["connect_runtime"] == "ok", "a read-only /run still lets it connect to the runtime's socket"
    assert probe["kmsg"] != "ok", "ProtectKernelLogs="
    devices = probe["dev"]
    assert isinstance(devices, list)
    assert set(devices) <= {"null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm", "mqueue",
                            "hugepages", "stdin", "stdout", "stderr", "fd", "core", "log", "console", "char"}, devices
    # Not checked: ProtectProc=invisible, which hides nothing from a service whose group is root's (the
    # kernel lets group 0 see every process: deploy/README.md), and ProtectKernelTunables=, ProtectClock=,
    # which the container this runs in does not let systemd apply observably.

    # The serving process itself has the same confinement.
    pid = serving.main_pid()
    proc_status = serving.machine.run("cat", f"/proc/{pid}/status").stdout
    assert re.search(r"^CapBnd:\s+0000000000000005$", proc_status, re.M), proc_status
    assert re.search(r"^NoNewPrivs:\s+1$", proc_status, re.M), proc_status
    assert re.search(r"^Seccomp:\s+2$", proc_status, re.M), proc_status


def test_security_exposure_is_the_one_deploy_readme_records(serving: Node) -> None:
    result = serving.machine.run("systemd-analyze", "security", UNIT, "--no-pager")
    found = re.search(r"Overall exposure level for criproxy\.service: ([\d.]+) (\w+)", result.stdout)
    assert found, result.stdout
    exposure, rating = float(found.group(1)), found.group(2)
    readme = README.read_text()
    recorded = re.search(r"`systemd-analyze security criproxy\.service`[^*]*?\*\*([\d.]+) (\w+)\*\*", readme)
    assert recorded, "deploy/README.md records no `systemd-analyze security criproxy.service` result (**N.N RATING**)"
    assert (exposure, rating) == (float(recorded.group(1)), recorded.group(2)), result.stdout
    assert rating in ("OK", "SAFE"), result.stdout
    # Each remaining exposure is explained in deploy/README.md.
    remaining = re.findall(r"^✗ (\S+)", result.stdout, re.M)
    assert remaining, result.stdout
    unexplained = [name for name in remaining if f"`{name}`" not in readme]
    assert not unexplained, f"deploy/README.md does not explain these exposures: {unexplained}"


# ----------------------------------------------------------------------------------------- policy

def test_policy_file_change_is_hot_reloaded(serving: Node, tmp_path: Path) -> None:
    policy = serving.machine.path("/etc/criproxy/policies.yaml")
    shipped = policy.read_bytes()
    granting = shipped + b"\n  - name: shop\n    namespaces: [shop]\n    settings:\n" \
                         b"      runtime-handler: {values: [runc-alt]}\n"
    pid = serving.main_pid()
    config = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name="alt", uid=uuid.uuid4().hex, namespace="shop"),
        annotations={"runtime-handler.criproxy.io/pod": "runc-alt"}, log_directory=str(tmp_path),
        linux=api_pb2.LinuxPodSandboxConfig(security_context=api_pb2.LinuxSandboxSecurityContext(
            namespace_options=api_pb2.NamespaceOption(network=api_pb2.NODE))))

    def replace(content: bytes) -> None:
        """As policy-sync does: a new file beside it, renamed over it (on the node's /etc, from the host)."""
        temporary = policy.with_name(".policies.yaml.test")
        temporary.write_bytes(content)
        temporary.chmod(0o644)
        os.replace(temporary, policy)
        digest = hashlib.sha256(content).hexdigest()[:16]

        def in_force() -> bool:
            lines = [line for line in journal_of(serving, pid).splitlines() if " in force " in line]
            return bool(lines) and f"/etc/criproxy/policies.yaml@{digest}" in lines[-1]

        eventually(f"criproxy reports policy {digest} in force", in_force)

    def denied() -> bool:
        with CriClient(serving.endpoint) as cri:
            try:
                run_pod(cri, config)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
                return True
        return False

    assert denied(), "the shipped policy grants no annotation"
    try:
        replace(granting)
        with CriClient(serving.endpoint) as cri:
            pod_id = run_pod(cri, config)
            status = cri.call("RuntimeService", "PodSandboxStatus", api_pb2.PodSandboxStatusRequest(
                pod_sandbox_id=pod_id))
        assert isinstance(status, api_pb2.PodSandboxStatusResponse)
        assert status.status.runtime_handler == "runc-alt"
    finally:
        replace(shipped)
    assert denied(), "back to the shipped policy"
    assert serving.main_pid() == pid, "a policy change needs no restart"


# ----------------------------------------------------------------------------------------- reload

def test_reload_hands_over_without_a_failed_call(serving: Node, tmp_path: Path) -> None:
    machine = serving.machine
    old = serving.main_pid()
    old_inode = (serving.sockdir / "criproxy.sock").stat().st_ino
    with Load(serving.endpoint, tmp_path) as load:
        load.wait_for_calls(3)
        started = time.monotonic()
        machine.systemctl("reload", UNIT, timeout=150)
        took = time.monotonic() - started
        load.wait_for_calls(3)
    failures = load.failures()
    assert not failures, (f"{len(failures)} of {len(load.outcomes)} calls failed during the reload "
                          f"({took:.1f}s): {[str(f) for f in failures[:5]]}")
    assert load.ok("pods") >= 6, "pods were started and removed through the reload"

    new = serving.main_pid()
    assert new not in (0, old), "systemd follows the new process (MAINPID=)"
    assert machine.run("test", "-e", f"/proc/{old}", check=False).returncode != 0, "the old process has exited"
    assert "--takeover" in machine.run("cat", f"/proc/{new}/cmdline").stdout.split("\0")
    assert machine.run("cat", f"/proc/{new}/cgroup").stdout.strip().endswith("/system.slice/criproxy.service")
    assert (serving.sockdir / "criproxy.sock").stat().st_ino != old_inode
    journal = machine.journal("-u", UNIT, "-o", "cat")
    assert f"pid {old} has handed over and exited; pid {new} serves" in journal, serving.journal_tail()
    assert "could not re-send" not in journal, serving.journal_tail()
    # Nothing queued during the reload (a STOPPING=1) stops the unit afterwards.
    time.sleep(3)
    state = machine.show(UNIT, "ActiveState", "SubState", "MainPID", "StatusText")
    assert (state["ActiveState"], state["SubState"], state["MainPID"]) == ("active", "running", str(new)), state
    assert f"criproxy {criproxy.__version__}" in state["StatusText"], state
    version_through(serving.endpoint)


# ----------------------------------------------------------------------------------------- crash

def test_kill_9_is_restarted_and_refused_only_while_down(serving: Node, tmp_path: Path) -> None:
    machine = serving.machine
    with CriClient(serving.endpoint) as cri:  # a pod for the new process's index to find
        run_pod(cri, api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name="survivor", uid=uuid.uuid4().hex, namespace="criproxy-systemd"),
            log_directory=str(tmp_path), linux=api_pb2.LinuxPodSandboxConfig(
                security_context=api_pb2.LinuxSandboxSecurityContext(
                    namespace_options=api_pb2.NamespaceOption(network=api_pb2.NODE)))))
    before = machine.show(UNIT, "MainPID", "NRestarts", "RestartUSec")
    old, restart_sec = int(before["MainPID"]), timespan_seconds(before["RestartUSec"])
    with Load(serving.endpoint, tmp_path, kinds=("version-new", "version-kept", "list-containers")) as load:
        load.wait_for_calls(3)
        killed = time.monotonic()
        machine.run("kill", "-9", str(old))
        deadline = killed + restart_sec + 30
        while True:
            state = machine.show(UNIT, "MainPID", "ActiveState", "NRestarts")
            if state["MainPID"] not in ("0", str(old)) and state["ActiveState"] == "active":
                break
            assert time.monotonic() < deadline, f"not restarted: {state}\n{serving.journal_tail()}"
            time.sleep(0.02)
        back = time.monotonic()
        load.wait_for_calls(5)
    new = int(state["MainPID"])
    assert int(state["NRestarts"]) == int(before["NRestarts"]) + 1, state
    assert restart_sec <= back - killed <= restart_sec + 5, f"down for {back - killed:.1f}s (RestartSec={restart_sec}s)"
    failures = load.failures()
    assert failures, "the callers saw no refusal at all: the measurement missed the downtime"
    assert {f.code for f in failures} == {grpc.StatusCode.UNAVAILABLE}, [str(f) for f in failures[:5]]
    late = [str(f) for f in failures if f.ended < killed or f.started > back + 0.5]
    assert not late, f"calls failed outside the {back - killed:.1f}s criproxy was down: {late[:5]}"

    with CriClient(serving.runtime.endpoint) as direct:
        listed = direct.call("RuntimeService", "ListPodSandbox", api_pb2.ListPodSandboxRequest())
    assert isinstance(listed, api_pb2.ListPodSandboxResponse)
    rebuilt = f"container index rebuilt from the runtime: {len(listed.items)} pods"
    eventually("the new process rebuilds its container index", lambda: rebuilt in journal_of(serving, new))
    assert "status=9/KILL" in machine.journal("-u", UNIT, "-o", "cat")


# ----------------------------------------------------------------------------------------- boot

def test_boot_starts_criproxy_before_the_kubelet(serving: Node) -> None:
    machine = serving.machine
    serving.install("configure-kubelet")
    assert serving.kubelet_records()[-1]["endpoint"] == PROXY_ENDPOINT
    assert serving.kubelet_records()[-1]["version"] == "ok", serving.kubelet_records()[-1]
    machine.poweroff()
    # /run is a fresh tmpfs at every boot; the host directory bound there is not.
    for leftover in serving.sockdir.iterdir():
        leftover.unlink()
    shutdown = time.monotonic()
    machine.boot()
    at_boot = [record for record in serving.kubelet_records() if record["monotonic"] > shutdown]
    assert len(at_boot) == 1, at_boot
    assert at_boot[0]["endpoint"] == PROXY_ENDPOINT and at_boot[0]["version"] == "ok", (
        f"the kubelet's first call at boot went through criproxy: {at_boot[0]}\n{serving.journal_tail()}")
    proxy = machine.show(UNIT, "ActiveState", "ActiveEnterTimestampMonotonic", "UnitFileState")
    kubelet = machine.show("kubelet.service", "ActiveState", "ExecMainStartTimestampMonotonic", "After", "Wants")
    assert proxy["ActiveState"] == kubelet["ActiveState"] == "active"
    assert proxy["UnitFileState"] == "enabled"
    assert "criproxy.service" in kubelet["After"].split() and "criproxy.service" in kubelet["Wants"].split()
    assert 0 < int(proxy["ActiveEnterTimestampMonotonic"]) <= int(kubelet["ExecMainStartTimestampMonotonic"]), (
        proxy, kubelet)


# ----------------------------------------------------------------------------------------- uninstall

def test_uninstall_restores_the_kubelet_first_then_removes_everything(serving: Node) -> None:
    machine = serving.machine
    serving.install("configure-kubelet")
    seen = len(serving.kubelet_records())
    output = machine.run("criproxy-install", "uninstall", timeout=300).stderr
    restarted = serving.kubelet_records()[seen:]
    assert len(restarted) == 1, (restarted, output)
    assert restarted[0]["endpoint"] == f"unix://{RUNTIME_SOCKET}" and restarted[0]["version"] == "ok", restarted
    assert restarted[0]["criproxy"] == "active", "the kubelet was back on the runtime before criproxy stopped"
    assert machine.path("/var/lib/kubelet/config.yaml").read_text() == KUBELET_CONFIG

    unit = machine.show(UNIT, "LoadState", "ActiveState", "UnitFileState")
    assert (unit["LoadState"], unit["ActiveState"]) == ("not-found", "inactive"), unit
    kubelet = machine.show("kubelet.service", "ActiveState", "DropInPaths", "Wants")
    assert kubelet["ActiveState"] == "active" and not kubelet["DropInPaths"], kubelet
    assert "criproxy.service" not in kubelet["Wants"].split()
    assert not list(serving.sockdir.iterdir()), "the socket is gone with the service"

    after = serving.tree()
    added = sorted(set(after) - set(serving.pristine))
    removed = sorted(set(serving.pristine) - set(after))
    changed = sorted(path for path in set(after) & set(serving.pristine) if after[path] != serving.pristine[path])
    # The service's logs stay unless `uninstall --purge` (deploy/README.md, "Uninstall").
    kept_logs = [path for path in added if path == "var/log/criproxy" or path.startswith("var/log/criproxy/")]
    assert (sorted(set(added) - set(kept_logs)), removed, changed) == ([], [], []), output
