"""Run a private, throw-away containerd (with its CRI plugin): `criproxy demo` and the end-to-end tests.

Everything containerd writes lives under one work directory: content and snapshots
(``root``), runtime state (``state``), the runc state directories of both runtime handlers,
the sockets, the config and the log. It uses cgroupfs (no systemd needed) and the settings
this machine needs, found out by :mod:`criproxy.demo.host` (AppArmor, oom_score_adj,
snapshotter). It has two runtime handlers, ``runc`` (the default) and ``runc-alt``, both runc
with their own state directory, so a runtime-handler annotation has something to select. The
pause and busybox images are built locally (see :mod:`criproxy.demo.ociimage`) and imported with
``ctr``: no registry is needed. There is no CNI network: pods use the host's network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

import grpc

from criproxy.demo.cri import CriClient
from criproxy.demo.host import HostSettings, detect, kill_leftovers, unmount_all_under
from criproxy.demo.ociimage import BUSYBOX_BINARY, OciArchive, busybox_image, elf_interpreter_problem, pause_image

PAUSE_IMAGE = "criproxy.test/pause:1"
BUSYBOX_IMAGE = "criproxy.test/busybox:1"
DEFAULT_HANDLER = "runc"
ALT_HANDLER = "runc-alt"

REQUIRED_COMMANDS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "gcc")
LOG_TAIL_LINES = 40
# sizeof(sockaddr_un.sun_path) minus the terminating NUL.
_MAX_SOCKET_PATH = 107

__all__ = [
    "ALT_HANDLER", "BUSYBOX_IMAGE", "DEFAULT_HANDLER", "LOG_TAIL_LINES", "PAUSE_IMAGE", "REQUIRED_COMMANDS",
    "Containerd", "ContainerdError", "containerd_available", "import_archive", "kill_leftovers", "remove_all_pods",
    "remove_image_name", "remove_pods", "unmount_all_under",
]


class ContainerdError(RuntimeError):
    """Starting, using or stopping the private containerd failed."""


def containerd_available() -> str | None:
    """Why a private containerd cannot be run here, or None when everything needed is present."""
    missing = [command for command in REQUIRED_COMMANDS if shutil.which(command) is None]
    if missing:
        return f"missing commands: {', '.join(missing)} (bash scripts/install installs them)"
    if not BUSYBOX_BINARY.exists():
        return f"{BUSYBOX_BINARY} is missing (install busybox-static)"
    problem = elf_interpreter_problem(BUSYBOX_BINARY)
    if problem is not None:
        return problem
    if os.geteuid() != 0:
        return "containerd and runc need root"
    return None


def _toml_string(value: str) -> str:
    # A JSON string of printable text is also a valid TOML basic string.
    return json.dumps(value)


def remove_all_pods(client: CriClient, timeout: float = 60.0) -> list[str]:
    """Stop and remove every pod sandbox (and so its containers); returns error descriptions, if any."""
    pb = client.pb
    try:
        response = client.call("RuntimeService", "ListPodSandbox", pb.ListPodSandboxRequest(), timeout=timeout)
    except grpc.RpcError as error:
        return [f"ListPodSandbox failed: {error}"]
    assert isinstance(response, pb.ListPodSandboxResponse)
    return remove_pods(client, [pod.id for pod in response.items], timeout)


def remove_pods(client: CriClient, pod_ids: list[str], timeout: float = 60.0) -> list[str]:
    """Stop and remove these pod sandboxes (and so their containers); returns error descriptions, if any."""
    pb = client.pb
    errors: list[str] = []
    for pod_id in pod_ids:
        for method, request_type in (("StopPodSandbox", pb.StopPodSandboxRequest),
                                     ("RemovePodSandbox", pb.RemovePodSandboxRequest)):
            try:
                client.call("RuntimeService", method, request_type(pod_sandbox_id=pod_id), timeout=timeout)
            except grpc.RpcError as error:
                errors.append(f"{method} {pod_id} failed: {error}")
    return errors


def _ctr(socket_path: Path, args: list[str], timeout: float) -> str | None:
    """Run ``ctr`` against containerd's k8s.io namespace; the failure (the command, and why), or None."""
    command = ["ctr", "--address", str(socket_path), "-n", "k8s.io", *args]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"{' '.join(command)} timed out after {timeout:.0f}s"
    except OSError as error:
        return f"{' '.join(command)}: {error}"
    if result.returncode != 0:
        return f"{' '.join(command)} failed with status {result.returncode}:\n{result.stderr}"
    return None


def import_archive(socket_path: Path, archive: Path, timeout: float) -> str | None:
    """``ctr images import`` of an OCI archive into containerd's k8s.io namespace; the failure, or None."""
    return _ctr(socket_path, ["images", "import", str(archive)], timeout)


def remove_image_name(socket_path: Path, ref: str, timeout: float) -> str | None:
    """``ctr images rm``: remove the name ``ref`` only (what ``import_archive`` added; other names of the same
    image stay, unlike CRI RemoveImage, which removes the image with all its names); the failure, or None."""
    return _ctr(socket_path, ["images", "rm", "--sync", ref], timeout)


class Containerd:
    """A containerd rooted in ``workdir``; use as a context manager or call start()/stop().

    start() is prepare(), build_images(), launch() and import_images() in turn; `criproxy demo`
    calls them one by one to time them as steps."""

    def __init__(self, workdir: Path, *, start_timeout: float = 30.0, stop_timeout: float = 30.0,
                 pause_image: str = PAUSE_IMAGE, busybox_image: str = BUSYBOX_IMAGE,
                 settings: HostSettings | None = None) -> None:
        self.workdir = workdir.resolve()
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.socket_path = self.workdir / "containerd.sock"
        self.endpoint = f"unix://{self.socket_path}"
        self.config_path = self.workdir / "config.toml"
        self.log_path = self.workdir / "containerd.log"
        self.cni_conf_dir = self.workdir / "cni" / "net.d"
        self.cni_bin_dir = self.workdir / "cni" / "bin"
        self.images_dir = self.workdir / "images"
        self.pause_image = pause_image
        self.busybox_image = busybox_image
        self.settings = settings
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def runc_root(self, handler: str) -> Path:
        """The runc state directory of a runtime handler; a container's state appears in ``<root>/k8s.io/<id>``."""
        return self.workdir / "runc" / handler

    # -- diagnostics -------------------------------------------------------

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as error:
            return f"(log {self.log_path} unreadable: {error})"
        return "\n".join(text.splitlines()[-lines:])

    def error(self, what: str) -> ContainerdError:
        """An error for ``what`` that points at the log and quotes its tail."""
        return ContainerdError(
            f"{what}\ncontainerd log: {self.log_path} (last {LOG_TAIL_LINES} lines follow)\n{self.log_tail()}"
        )

    # -- configuration -----------------------------------------------------

    def config_toml(self) -> str:
        if self.settings is None:
            raise ContainerdError("config_toml() before prepare(): the host's settings are not known yet")
        q = _toml_string
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        runtimes = "\n".join(
            f"""
[{cri}.containerd.runtimes."{handler}"]
runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes."{handler}".options]
SystemdCgroup = false
Root = {q(str(self.runc_root(handler)))}
"""
            for handler in (DEFAULT_HANDLER, ALT_HANDLER)
        )
        return f"""\
version = 2
root = {q(str(self.workdir / "root"))}
state = {q(str(self.workdir / "state"))}
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
address = {q(str(self.socket_path))}

[ttrpc]
address = {q(str(self.socket_path) + ".ttrpc")}

[plugins."io.containerd.internal.v1.opt"]
path = {q(str(self.workdir / "opt"))}

[{cri}]
sandbox_image = {q(self.pause_image)}
restrict_oom_score_adj = {str(self.settings.restrict_oom_score_adj).lower()}
disable_apparmor = {str(not self.settings.apparmor).lower()}
stream_server_address = "127.0.0.1"
stream_server_port = "0"

[{cri}.containerd]
snapshotter = {q(self.settings.snapshotter)}
default_runtime_name = {q(DEFAULT_HANDLER)}
{runtimes}
[{cri}.cni]
bin_dir = {q(str(self.cni_bin_dir))}
conf_dir = {q(str(self.cni_conf_dir))}
"""

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        if self._process is not None:
            raise ContainerdError("this Containerd is already started")
        self.prepare()
        archives = self.build_images()
        self.launch()
        self.import_images(archives)

    def prepare(self) -> None:
        """Make the directories, find out the host's settings (unless given) and write the config."""
        if len(str(self.socket_path)) + len(".ttrpc") > _MAX_SOCKET_PATH:
            raise ContainerdError(f"socket path {self.socket_path} is too long for a unix socket; use a shorter dir")
        for directory in (self.workdir, self.cni_conf_dir, self.cni_bin_dir):
            directory.mkdir(parents=True, exist_ok=True)
        if self.settings is None:
            (self.workdir / "root").mkdir(exist_ok=True)
            self.settings = detect(self.workdir / "root")
        self.config_path.write_text(self.config_toml())

    def build_images(self) -> list[OciArchive]:
        """The pause and busybox images as OCI archives under ``images/``."""
        return [
            pause_image(self.images_dir / "pause.tar", self.pause_image, self.images_dir / "pause-build"),
            busybox_image(self.images_dir / "busybox.tar", self.busybox_image),
        ]

    def launch(self) -> None:
        """Start containerd and wait until its CRI answers; on failure stop what was started and raise."""
        if self._process is not None:
            raise ContainerdError("containerd is already running")
        self._launch()
        self._cleanup_on_failure(self._wait_for_cri)

    def import_images(self, archives: list[OciArchive]) -> None:
        """Import the archives and wait until the CRI lists them; on failure stop containerd and raise."""

        def run() -> None:
            for archive in archives:
                self._import(archive.path)
                self._wait_for_image(archive.ref)

        self._cleanup_on_failure(run)

    def _cleanup_on_failure(self, action: Callable[[], None]) -> None:
        try:
            action()
        except BaseException as error:
            try:
                self.stop()
            except ContainerdError as cleanup:
                error.add_note(f"cleaning up after the failed start failed too: {cleanup}")
            raise

    def _launch(self) -> None:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                ["containerd", "--config", str(self.config_path), "--log-level", "info"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def crash(self) -> None:
        """SIGKILL containerd alone, as a crash would: its shims and containers live on."""
        if self._process is None:
            raise ContainerdError("containerd is not running")
        self._process.kill()
        self._process.wait(timeout=self.stop_timeout)
        self._process = None

    def revive(self) -> None:
        """Start containerd again on the same state, as systemd restarts it; wait until the CRI answers."""
        if self._process is not None:
            raise ContainerdError("containerd is already running")
        self._launch()
        self._wait_for_cri()

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _cri_client(self) -> CriClient:
        return CriClient(self.endpoint)

    def _poll(self, what: str, attempt: Iterator[str | None]) -> None:
        """Drive ``attempt`` (which yields None on success, else the latest failure) until success or timeout."""
        deadline = time.monotonic() + self.start_timeout
        last = "no attempt made"
        for outcome in attempt:
            if outcome is None:
                return
            last = outcome
            if self._process is not None and self._process.poll() is not None:
                raise self.error(f"containerd exited with status {self._process.returncode} while {what}")
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        raise self.error(f"timed out after {self.start_timeout:.0f}s {what}; last failure: {last}")

    def _wait_for_cri(self) -> None:
        def attempts() -> Iterator[str | None]:
            # Dialling before the socket exists would push gRPC into its (seconds-long) reconnect backoff.
            while not self.socket_path.exists():
                yield f"{self.socket_path} does not exist yet"
            with self._cri_client() as client:
                while True:
                    try:
                        client.call("RuntimeService", "Version", client.pb.VersionRequest(), timeout=1.0)
                    except grpc.RpcError as error:
                        yield f"Version: {error}"
                    else:
                        yield None

        self._poll(f"waiting for the CRI to answer on {self.endpoint}", attempts())

    def _import(self, archive: Path) -> None:
        problem = import_archive(self.socket_path, archive, self.start_timeout)
        if problem is not None:
            raise self.error(problem)

    def _wait_for_image(self, ref: str) -> None:
        def attempts() -> Iterator[str | None]:
            with self._cri_client() as client:
                request = client.pb.ImageStatusRequest(image=client.pb.ImageSpec(image=ref))
                while True:
                    try:
                        found = client.call("ImageService", "ImageStatus", request, timeout=5.0).HasField("image")
                    except grpc.RpcError as error:
                        yield f"ImageStatus: {error}"
                    else:
                        yield None if found else "ImageStatus does not know the image yet"

        self._poll(f"waiting for the CRI to list the imported image {ref}", attempts())

    def stop(self) -> None:
        """Remove all pods, stop containerd, then kill and unmount whatever is left; raise if anything failed."""
        process, self._process = self._process, None
        problems: list[str] = []
        if process is not None and process.poll() is None:
            with self._cri_client() as client:
                problems += remove_all_pods(client, timeout=self.stop_timeout)
            process.terminate()
            try:
                process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                problems.append(f"containerd ignored SIGTERM for {self.stop_timeout:.0f}s; killed it")
                process.kill()
                process.wait(timeout=self.stop_timeout)
        problems += [f"killed leftover process {victim}" for victim in kill_leftovers(self.workdir)]
        problems += unmount_all_under(self.workdir)
        if problems:
            raise self.error("stopping containerd did not go cleanly:\n  " + "\n  ".join(problems))

    def __enter__(self) -> Containerd:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
