"""deploy/host/install.sh on a temporary root, with what it lays down serving a real containerd.

The installer builds criproxy's virtualenv from a wheel of this repository (offline: the wheel, plus
pip's own wheel; --system-site-packages lends the dependencies this Python already has), the proxy
runs from ROOT/opt/criproxy/current/bin/criproxy as criproxy.service would run it, and uninstall
must leave the root exactly as it found it. The upgrade test installs a second version beside the
first and hands the socket over with deploy/host/criproxy-takeover, the unit's ExecReload=, while
callers keep calling: no call may fail, the old process must exit 0, and the notifications a
systemd would read must leave it following the new process.
"""

from __future__ import annotations

import ensurepip
import hashlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml

import criproxy
from criproxy.api.runtime.v1 import api_pb2
from tests.support.containerd import Containerd
from tests.support.cri import CriClient
from tests.support.proxyproc import wait_serving

pytestmark = pytest.mark.containerd

REPO = Path(__file__).resolve().parent.parent.parent
INSTALL_SH = REPO / "deploy/host/install.sh"
TAKEOVER = REPO / "deploy/host/criproxy-takeover"
VERSION_PATH = "/runtime.v1.RuntimeService/Version"
KUBELET_CONFIG = """apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: {endpoint}
cgroupDriver: systemd
"""


def takeover_supported() -> bool:
    """True when `criproxy serve` has --takeover (the zero-downtime upgrade the unit's ExecReload uses)."""
    result = subprocess.run([sys.executable, "-m", "criproxy", "serve", "--help"], capture_output=True, text=True,
                            check=False, cwd=REPO)
    return "--takeover" in result.stdout


# ----------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This repository as a wheel, built from a copy (the work tree gets no build/ or egg-info), and
    pip's own wheel, which the installer runs pip from (the virtualenv is made without pip)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "criproxy", source / "criproxy",
                    ignore=shutil.ignore_patterns("__pycache__", "_native*.so"))
    shutil.copytree(REPO / "native", source / "native", ignore=shutil.ignore_patterns("target"))
    wheels = tmp_path_factory.mktemp("wheels")
    # The data plane is compiled into the wheel; the work tree's cargo cache makes that quick.
    env = {**os.environ, "CARGO_TARGET_DIR": str(REPO / "native" / "target")}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(wheels), str(source)], check=True, timeout=600, env=env)
    bundled = sorted((Path(ensurepip.__file__).parent / "_bundled").glob("pip-*.whl"))
    if bundled:  # else install.sh falls back to `python -m pip`, which --system-site-packages provides
        shutil.copy(bundled[-1], wheels)
    return wheels


@pytest.fixture
def sockdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cpi-", dir="/tmp"))  # unix socket paths are short
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Node:
    """A temporary root laid out like a node before criproxy, and the installer pointed at it."""

    root: Path
    config_dir: Path
    wheels: Path
    socket: Path
    runtime_endpoint: str

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    @property
    def config_file(self) -> Path:
        return self.root / "etc/criproxy/criproxy.yaml"

    def path(self, host_path: str) -> Path:
        return self.root / host_path.lstrip("/")

    def install(self, command: str, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["bash", str(INSTALL_SH), command, "--root", str(self.root), "--wheels", str(self.wheels),
             "--config-dir", str(self.config_dir), "--python", sys.executable, "--no-chroot",
             "--system-site-packages", "--no-systemd", *args],
            capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, f"install.sh {command} {' '.join(args)} failed:\n{result.stderr}"
        return result

    def serve(self, log: Path, **env: str) -> subprocess.Popen[str]:
        """`criproxy serve --config /etc/criproxy/criproxy.yaml` from the installed tree, as ExecStart= runs it."""
        with log.open("a") as stderr:
            proc = subprocess.Popen([str(self.path("/opt/criproxy/current/bin/criproxy")), "serve", "--config",
                                     str(self.config_file)], stdin=subprocess.DEVNULL, stdout=stderr,
                                    stderr=stderr, text=True, env={**os.environ, **env}, cwd="/")
        wait_serving(proc, self.socket)
        return proc


@pytest.fixture
def node(tmp_path: Path, sockdir: Path, wheelhouse: Path, containerd: Containerd) -> Node:
    root = tmp_path / "root"
    # What a node has before criproxy: units of its own, a local tool, the kubelet's config.
    (root / "etc/systemd/system/multi-user.target.wants").mkdir(parents=True)
    (root / "etc/systemd/system/containerd.service").write_text("[Service]\nExecStart=/usr/bin/containerd\n")
    (root / "etc/systemd/system/multi-user.target.wants/containerd.service").symlink_to(
        "/etc/systemd/system/containerd.service")
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "usr/local/bin/site-tool").write_text("#!/bin/sh\n")
    (root / "var/lib/kubelet").mkdir(parents=True)
    (root / "var/lib/kubelet/config.yaml").write_text(KUBELET_CONFIG.format(endpoint=containerd.endpoint))
    # The cluster's criproxy.yaml (the ConfigMap's), adapted to this sandbox: the test containerd,
    # a short socket path, an ephemeral metrics port; the policy is the shipped default.
    config_dir = tmp_path / "configmap"
    config_dir.mkdir()
    shipped = yaml.safe_load((REPO / "deploy/etc/criproxy/criproxy.yaml").read_text())
    shipped.update({"listen": f"unix://{sockdir / 'criproxy.sock'}", "runtime-endpoint": containerd.endpoint,
                    "policies": str(root / "etc/criproxy/policies.yaml"), "metrics-address": "127.0.0.1:0",
                    "decision-log": str(sockdir / "decisions.log")})
    (config_dir / "criproxy.yaml").write_text(yaml.safe_dump(shipped))
    return Node(root=root, config_dir=config_dir, wheels=wheelhouse, socket=sockdir / "criproxy.sock",
                runtime_endpoint=containerd.endpoint)


def tree(root: Path) -> dict[str, str]:
    """Every path under `root` with its type and content (or link target), for before/after comparisons."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if path.is_symlink():
            found[relative] = f"link {os.readlink(path)}"
        elif path.is_dir():
            found[relative] = f"dir {path.stat().st_mode:o}"
        else:
            found[relative] = f"file {path.stat().st_mode:o} {hashlib.sha256(path.read_bytes()).hexdigest()}"
    return found


def stop(proc: subprocess.Popen[str], timeout: float = 20) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


def executable_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()


# ----------------------------------------------------------------------------------------- sd_notify

class NotifyListener:
    """What systemd's notification socket receives: (sender pid, fields), with the sender's pid
    from the kernel (SCM_CREDENTIALS), as systemd attributes messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[tuple[int, list[str]]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._running = True
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        credentials = struct.calcsize("3i")
        while self._running:
            try:
                data, ancillary, _, _ = self._sock.recvmsg(4096, socket.CMSG_SPACE(credentials))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:credentials])[0]
            self.messages.append((pid, data.decode().split("\n")))

    def close(self) -> None:
        self._running = False
        self._thread.join(5)
        self._sock.close()

    def systemd_view(self) -> tuple[int | None, str]:
        """The main pid and notify state a Type=notify, NotifyAccess=all service ends up with."""
        main, state = None, "none"
        for _, fields in self.messages:
            for item in fields:
                if item.startswith("MAINPID="):
                    main = int(item.removeprefix("MAINPID="))
            if "STOPPING=1" in fields:
                state = "stopping"
            elif "READY=1" in fields:
                state = "ready"
        return main, state


# ----------------------------------------------------------------------------------------- callers

@dataclass
class Callers:
    """Threads calling Version through the proxy's socket path until stopped: one on a channel kept
    open (as the kubelet does), one on a new connection per call (as crictl does)."""

    endpoint: str
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Callers:
        self._threads = [threading.Thread(target=self._run, args=(persistent,), daemon=True)
                         for persistent in (True, False)]
        for thread in self._threads:
            thread.start()
        return self

    def _call(self, channel: grpc.Channel, kind: str) -> None:
        started = time.monotonic()
        try:
            channel.unary_unary(VERSION_PATH)(b"", timeout=10)
            self.ok += 1
        except grpc.RpcError as error:
            self.failures.append(f"{kind} call {started:.3f}-{time.monotonic():.3f}: {error.code().name}: "
                                 f"{error.details()}")

    def _run(self, persistent: bool) -> None:
        channel = grpc.insecure_channel(self.endpoint) if persistent else None
        while not self._stop.is_set():
            if channel is not None:
                self._call(channel, "kept-open channel")
            else:
                with grpc.insecure_channel(self.endpoint) as fresh:
                    self._call(fresh, "new channel")
            time.sleep(0.002)
        if channel is not None:
            channel.close()

    def count_after(self, seconds: float) -> int:
        before = self.ok
        time.sleep(seconds)
        return self.ok - before

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


# ----------------------------------------------------------------------------------------- tests

def test_install_serve_configure_uninstall(node: Node, containerd: Containerd, tmp_path: Path) -> None:
    before = tree(node.root)
    installed = node.install("install")
    assert f"criproxy {criproxy.__version__} installed" in installed.stderr
    version_dir = f"/opt/criproxy/{criproxy.__version__}"
    assert os.readlink(node.path("/opt/criproxy/current")) == criproxy.__version__
    assert node.path("/usr/local/bin/criproxy").resolve() == node.path(f"{version_dir}/bin/criproxy")
    assert node.path("/etc/systemd/system/criproxy.service").read_bytes() == (
        REPO / "deploy/systemd/criproxy.service").read_bytes()
    assert node.path("/etc/systemd/system/kubelet.service.d/20-criproxy.conf").is_file()
    assert node.path("/etc/systemd/system/multi-user.target.wants/criproxy.service").is_symlink()
    assert node.path("/etc/criproxy/policies.yaml").read_bytes() == (
        REPO / "deploy/etc/criproxy/policies.yaml").read_bytes()
    assert node.path(f"{version_dir}/libexec/criproxy-takeover").resolve().read_bytes() == TAKEOVER.read_bytes()
    # Idempotent: a second run changes nothing.
    settled = tree(node.root)
    again = node.install("install")
    assert "already holds" in again.stderr
    assert tree(node.root) == settled

    notify = NotifyListener(tmp_path / "notify.sock")
    proc = node.serve(tmp_path / "criproxy.log", NOTIFY_SOCKET=str(notify.path))
    try:
        # The installed copy serves, not this repository's: its interpreter is the virtualenv's.
        assert executable_of(proc.pid) == str(node.path(f"{version_dir}/bin/python"))
        with CriClient(node.endpoint) as through, CriClient(containerd.endpoint) as direct:
            request = api_pb2.VersionRequest()
            assert through.call("RuntimeService", "Version", request) == direct.call(
                "RuntimeService", "Version", request)
            images = api_pb2.ListImagesRequest()
            listed = through.call("ImageService", "ListImages", images)
            expected = direct.call("ImageService", "ListImages", images)
            assert isinstance(listed, api_pb2.ListImagesResponse)
            assert isinstance(expected, api_pb2.ListImagesResponse)
            by_id = sorted(listed.images, key=lambda image: image.id)  # the runtime's order is a map's
            assert by_id == sorted(expected.images, key=lambda image: image.id)
            tags = {tag for image in listed.images for tag in image.repo_tags}
            assert {containerd.pause_image, containerd.busybox_image} <= tags
        deadline = time.monotonic() + 10
        while notify.systemd_view() != (proc.pid, "ready") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert notify.systemd_view() == (proc.pid, "ready"), f"Type=notify needs READY=1: {notify.messages}"

        # Switching the kubelet: only once the proxy answers and forwards to the kubelet's runtime.
        kubelet = node.path("/var/lib/kubelet/config.yaml")
        original = kubelet.read_text()
        node.install("configure-kubelet")
        switched = yaml.safe_load(kubelet.read_text())
        assert switched["containerRuntimeEndpoint"] == node.endpoint
        assert switched["imageServiceEndpoint"] == node.endpoint
    finally:
        notify.close()
        status = stop(proc)
    assert status == 0, (tmp_path / "criproxy.log").read_text()

    # Uninstall points the kubelet back first, then removes exactly what was added.
    node.install("uninstall")
    assert kubelet.read_text() == original
    assert tree(node.root) == before


@pytest.mark.skipif(not takeover_supported(), reason="criproxy serve has no --takeover yet (criproxy/server.py)")
def test_upgrade_hands_the_socket_over_without_a_failed_call(node: Node, tmp_path: Path) -> None:
    before = tree(node.root)
    node.install("install", "--version", "a")
    notify = NotifyListener(tmp_path / "notify.sock")
    old = node.serve(tmp_path / "a.log", NOTIFY_SOCKET=str(notify.path))
    reaper = threading.Thread(target=old.wait, daemon=True)  # systemd reaps its main process at once
    reaper.start()
    old_inode = node.socket.stat().st_ino
    callers = Callers(node.endpoint).start()
    new_pid = None
    try:
        assert callers.count_after(0.5) > 0
        node.install("upgrade", "--version", "b")  # same code, another version directory
        assert os.readlink(node.path("/opt/criproxy/current")) == "b"
        assert os.readlink(node.path("/opt/criproxy/previous")) == "a"

        # What `systemctl reload criproxy` runs, with what systemd gives ExecReload=.
        helper_log = tmp_path / "takeover.log"
        handover = time.monotonic()
        with helper_log.open("w") as out:
            helper = subprocess.run(
                [str(node.path("/opt/criproxy/current/libexec/criproxy-takeover"))], stdin=subprocess.DEVNULL,
                stdout=out, stderr=out, timeout=120, check=False,
                env={**os.environ, "MAINPID": str(old.pid), "NOTIFY_SOCKET": str(notify.path),
                     "CRIPROXY_BIN": str(node.path("/opt/criproxy/current/bin/criproxy")),
                     "CRIPROXY_CONFIG": str(node.config_file), "CRIPROXY_ARGS": ""})
        log = helper_log.read_text()
        handover_done = time.monotonic()
        assert helper.returncode == 0, f"{log}\n{(tmp_path / 'a.log').read_text()}"
        reaper.join(30)
        assert old.returncode == 0, f"the old criproxy exited with {old.returncode}"
        assert callers.count_after(0.5) > 0, "calls go on after the hand-over"

        new_pid, state = notify.systemd_view()
        assert new_pid is not None and new_pid != old.pid, notify.messages
        assert state == "ready", f"systemd would stop the unit after this reload: {notify.messages}"
        assert f"pid {new_pid} serves" in log
        assert executable_of(new_pid) == str(node.path("/opt/criproxy/b/bin/python"))
        assert node.socket.stat().st_ino != old_inode
    finally:
        callers.stop()
        notify.close()
        successor = new_pid or notify.systemd_view()[0]
        if successor is not None and successor != old.pid:
            terminate(successor)
        stop(old)
    node.install("rollback")
    assert os.readlink(node.path("/opt/criproxy/current")) == "a"
    assert os.readlink(node.path("/opt/criproxy/previous")) == "b"
    node.install("uninstall")
    assert tree(node.root) == before

    assert not callers.failures, (
        f"{len(callers.failures)} of {callers.ok + len(callers.failures)} calls failed: {callers.failures[:5]} "
        f"(the takeover ran {handover:.3f}-{handover_done:.3f})")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.skipif(not takeover_supported(), reason="criproxy serve has no --takeover yet (criproxy/server.py)")
def test_takeover_keeps_a_fixed_metrics_address(containerd: Containerd, sockdir: Path, tmp_path: Path) -> None:
    """As deployed: both processes are configured with the same metrics address, as they read the same
    /etc/criproxy/criproxy.yaml, and the readiness probe reads /readyz there."""
    port = free_port()
    sock = sockdir / "m.sock"
    args = ["serve", "--listen", f"unix://{sock}", "--runtime-endpoint", containerd.endpoint,
            "--metrics-address", f"127.0.0.1:{port}"]
    wrapper = tmp_path / "criproxy"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m criproxy "$@"\n')
    wrapper.chmod(0o755)
    with (tmp_path / "old.log").open("w") as log:
        old = subprocess.Popen([str(wrapper), *args], stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO)
    reaper = threading.Thread(target=old.wait, daemon=True)
    reaper.start()
    try:
        wait_serving(old, sock)
        with (tmp_path / "takeover.log").open("w") as log:
            helper = subprocess.run([str(TAKEOVER), "--old-pid", str(old.pid), "--", *args[1:]],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=120, check=False,
                                    env={**os.environ, "CRIPROXY_BIN": str(wrapper), "CRIPROXY_CONFIG": "/dev/null"})
        assert helper.returncode == 0, (tmp_path / "takeover.log").read_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as ready:
            assert ready.status == 200
    finally:
        log_text = (tmp_path / "takeover.log").read_text() if (tmp_path / "takeover.log").exists() else ""
        for line in log_text.splitlines():
            if line.startswith("criproxy-takeover: started"):
                terminate(int(line.split(" as pid ")[1].split()[0]))
        stop(old)


def terminate(pid: int, timeout: float = 20) -> None:
    """Stop a process that is not our child (the helper started it) and wait until it is gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
