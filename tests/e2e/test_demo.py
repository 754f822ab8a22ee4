"""`criproxy demo` end to end, as a user runs it: a subprocess on this machine's containerd package.

Checked: what it prints (the memory limit read back from the runtime and its cgroup, the denial as
the kubelet shows it, /metrics lines), and that after it exits nothing of its own remains: no
containerd, shim or proxy process, no mount, no socket, no file, no cgroup.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from criproxy.api.runtime.v1 import api_pb2
from criproxy.demo.containerd import Containerd
from criproxy.demo.cri import CriClient
from criproxy.demo.host import cgroup_mounts, mount_points_under, processes
from tests.e2e.conftest import require_containerd
from tests.support.proxyproc import ROOT
from tests.test_docs import README, is_shown_in_order, shown_blocks

pytestmark = pytest.mark.containerd
DEMO_TIMEOUT = 240
DENIAL = ("Warning  FailedCreatePodSandBox  kubelet  Failed to create pod sandbox: rpc error: code = PermissionDenied "
          "desc = criproxy: pod batch-nightly/report denied by policy rule 'batch-tighten-only' (")
MEMORY_FROM_CGROUP = re.compile(r"container app: cgroup /sys/fs/cgroup/\S+/memory\.(limit_in_bytes|max) = "
                                r"67108864 \(64Mi\)")


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Where the demo may make its directory (it must make and remove `demo` itself); short for socket paths."""
    require_containerd("criproxy demo")
    base = Path(tempfile.mkdtemp(prefix="cpd-", dir="/tmp"))
    yield base / "demo"
    shutil.rmtree(base, ignore_errors=True)


def demo(*args: str) -> list[str]:
    return [sys.executable, "-m", "criproxy", "demo", *args]


def assert_nothing_left(directory: Path) -> None:
    assert not directory.exists(), f"{directory} is still there: {sorted(p.name for p in directory.iterdir())}"
    mine = [" ".join(argv) for argv in (argv for _, argv in processes().values()) if any(str(directory) in a
                                                                                         for a in argv)]
    assert not mine, f"processes of the demo remain: {mine}"
    assert not mount_points_under(directory), f"mounts remain under {directory}"
    cgroups = [str(point / "criproxy-demo") for point, _, _ in cgroup_mounts() if (point / "criproxy-demo").exists()]
    assert not cgroups, f"the demo's cgroups remain: {cgroups}"


def test_demo_once_shows_the_adjusted_pod_the_denied_pod_and_metrics_and_leaves_nothing(workdir: Path) -> None:
    done = subprocess.run(demo("--once", "--workdir", str(workdir)), capture_output=True, text=True,
                          timeout=DEMO_TIMEOUT, check=False, cwd="/")
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    for step in range(1, 5):
        assert re.search(rf"^\[{step}/5\] .*\n(?:.*\n)*?      ok \(\d+\.\d s\)$", out, re.M), f"step {step}:\n{out}"
    # The adjustments, as criproxy.io/applied records them.
    assert "runtime_handler: '' -> 'runc-alt'  (runtime-handler, from runtime-handler.criproxy.io/pod)" in out
    assert ("config.linux.resources.memory_limit_in_bytes: 268435456 (256Mi) -> 67108864 (64Mi)  (resources, from "
            "memory-limit.criproxy.io/container.app)") in out
    # What the runtime runs: the OCI spec and the cgroup's own limit, the handler, the seccomp filter.
    assert "OCI spec linux.resources.memory.limit = 67108864 (64Mi); the kubelet asked for 268435456 (256Mi)" in out
    assert MEMORY_FROM_CGROUP.search(out), out
    assert "sandbox: runtime handler runc-alt (PodSandboxStatus)" in out
    assert re.search(r"OCI spec linux\.seccomp\.defaultAction = SCMP_ACT_ERRNO; /proc/\d+/status Seccomp: 2 "
                     r"\(filter\)", out), out
    # The denial, word for word as the kubelet reports it, and the runtime never saw the pod.
    assert DENIAL in out
    assert "'unconfined' is not allowed; allowed: runtime/default, localhost/batch/*" in out
    assert "the runtime never saw it: its ListPodSandbox has no pod batch-nightly/report" in out
    # A few lines of /metrics.
    assert 'criproxy_calls_total{code="PERMISSION_DENIED",method="RuntimeService/RunPodSandbox"} 1.0' in out
    assert ('criproxy_decisions_total{action="applied",interceptor="resources",rule="demo",setting="memory-limit"}'
            in out)
    assert "[5/5] Serving: skipped (--once)" in out
    assert re.search(r"^Cleaned up: removed 1 pod, stopped criproxy, stopped containerd, removed "
                     rf"{re.escape(str(workdir))} \(\d+\.\d s\)$", out, re.M), out
    assert_nothing_left(workdir)


class Lines:
    """A child's stdout, read by a thread so that waiting for a line is bounded."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        stdout = proc.stdout

        def pump() -> None:
            for line in stdout:
                self._queue.put(line)
            self._queue.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r} within {timeout:.0f}s; output so far:\n{''.join(self.seen)}")


def test_demo_serves_for_crictl_refuses_a_second_demo_and_stops_on_sigterm(workdir: Path) -> None:
    proc = subprocess.Popen(demo("--workdir", str(workdir)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd="/")
    try:
        lines = Lines(proc)
        crictl = lines.wait_for("crictl --runtime-endpoint", DEMO_TIMEOUT)
        socket = workdir / "criproxy.sock"
        assert crictl.split() == ["crictl", "--runtime-endpoint", f"unix://{socket}", "--image-endpoint",
                                  f"unix://{socket}", "pods"]
        lines.wait_for("Ctrl-C (or SIGTERM) stops it", 10)
        # What crictl would list through the proxy: the adjusted pod, under its new handler.
        with CriClient(f"unix://{socket}") as cri:
            pods = cri.call("RuntimeService", "ListPodSandbox", api_pb2.ListPodSandboxRequest()).items
            assert [(p.metadata.namespace, p.metadata.name, p.runtime_handler) for p in pods] == [
                ("criproxy-demo", "web", "runc-alt")]
        second = subprocess.run(demo("--once", "--workdir", str(workdir)), capture_output=True, text=True,
                                timeout=60, check=False)
        assert second.returncode == 2, second.stdout + second.stderr
        assert second.stderr == (f"criproxy demo: refused: another criproxy demo (pid {proc.pid}) is running in "
                                 f"{workdir}; stop it first (Ctrl-C where it runs, or kill -TERM {proc.pid}), or "
                                 "give this one another --workdir\n")
        assert socket.exists(), "the refused demo touched the running one's directory"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, "".join(lines.seen)
        lines.wait_for("Cleaned up: removed 1 pod, stopped criproxy, stopped containerd", 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert_nothing_left(workdir)
    # The README shows this output (trimmed, from a run in /run/criproxy-demo of a clone in /root/criproxy).
    real = [normalized(line.rstrip("\n"), workdir) for line in lines.seen]
    [shown] = shown_blocks(README.read_text(), "$ criproxy demo")
    missing = is_shown_in_order([normalized(line, workdir) for line in shown], real)
    assert missing is None, f"the README shows a line criproxy demo does not print (in that order):\n{missing}"


def normalized(line: str, workdir: Path) -> str:
    """A line of demo output with what differs from run to run (and machine to machine) made the same."""
    line = line.removeprefix("^C").replace(str(workdir), "/run/criproxy-demo").replace(str(ROOT), "/root/criproxy")
    line = line.replace("      SIGTERM: stopping", "      SIGINT: stopping")
    for pattern, same in ((r"\b[0-9a-f]{12,64}\b", "ID"), (r"\(\d+\.\d s\)", "(T s)"), (r"pid \d+", "pid N"),
                          (r"/proc/\d+/", "/proc/N/"), (r"127\.0\.0\.1:\d+", "127.0.0.1:PORT"),
                          (r"\} [0-9.e+-]+$", "} V"), (r"\(\d+ bytes\)", "(N bytes)"),
                          # What this machine needs, found out: another machine may need otherwise.
                          (r"^( +)(AppArmor|restrict_oom_score_adj|snapshotter) .*", r"\1\2 ..."),
                          (r"; (overlayfs|native) snapshotter;", "; S snapshotter;")):
        line = re.sub(pattern, same, line)
    return line.rstrip()


def test_demo_in_front_of_a_running_containerd_leaves_its_pods_and_images_alone(workdir: Path,
                                                                                 containerd: Containerd) -> None:
    with CriClient(containerd.endpoint) as cri:
        def state() -> tuple[list[str], list[str]]:
            images = cri.call("ImageService", "ListImages", api_pb2.ListImagesRequest()).images
            pods = cri.call("RuntimeService", "ListPodSandbox", api_pb2.ListPodSandboxRequest()).items
            return sorted(t for i in images for t in i.repo_tags), sorted(p.id for p in pods)

        before = state()
        done = subprocess.run(demo("--once", "--workdir", str(workdir), "--runtime-endpoint", containerd.endpoint),
                              capture_output=True, text=True, timeout=DEMO_TIMEOUT, check=False, cwd=ROOT)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"[1/5] The runtime at {containerd.endpoint}" in done.stdout
        assert "criproxy.demo/busybox:1" in done.stdout and MEMORY_FROM_CGROUP.search(done.stdout)
        assert DENIAL in done.stdout
        assert "Cleaned up: removed 1 pod and image criproxy.demo/busybox:1, stopped criproxy, removed" in done.stdout
        assert state() == before  # the test images (the same content under other names) are still there
    assert not workdir.exists()


def test_a_step_that_fails_says_what_and_cleans_up(workdir: Path) -> None:
    nothing = workdir.parent / "nothing.sock"
    done = subprocess.run(demo("--once", "--workdir", str(workdir), "--runtime-endpoint", f"unix://{nothing}"),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert re.search(rf"^\[1/5\] The runtime at unix://{re.escape(str(nothing))}\n      FAILED after \d+\.\d s: "
                     rf"nothing answers CRI calls on unix://{re.escape(str(nothing))} \(is the runtime running\?\): "
                     "UNAVAILABLE: ", done.stdout, re.M), done.stdout
    assert "[2/5]" not in done.stdout
    assert done.stderr.startswith("criproxy demo: step 1 failed: nothing answers CRI calls on")
    assert_nothing_left(workdir)


def test_a_runtime_that_does_not_start_is_reported_with_its_log_tail(workdir: Path) -> None:
    fake = workdir.parent / "bin"
    fake.mkdir()
    (fake / "containerd").write_text('#!/bin/sh\necho \'level=fatal msg="failed to load plugins: disk on fire"\'\n'
                                     "exit 1\n")
    (fake / "containerd").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    done = subprocess.run(demo("--once", "--workdir", str(workdir)), capture_output=True, text=True, timeout=60,
                          check=False, env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"^      FAILED after \d+\.\d s: containerd exited with status 1 while waiting for the CRI to "
                     r"answer on unix://", done.stdout, re.M), done.stdout
    assert re.search(r'^      containerd log:\n        level=fatal msg="failed to load plugins: disk on fire"$',
                     done.stdout, re.M), done.stdout
    assert "[2/5]" not in done.stdout
    assert_nothing_left(workdir)
