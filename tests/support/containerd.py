"""Run a private, throw-away containerd (with its CRI plugin) for end-to-end tests.

Everything containerd writes lives under one work directory: content and
snapshots (``root``), runtime state (``state``), the runc state directories of
both runtime handlers, the sockets, and the log.  The pause and busybox images
are built locally (see :mod:`tests.support.ociimage`) and imported with ``ctr``,
because the tests must not depend on any registry.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import grpc

from tests.support.cri import CriClient
from tests.support.ociimage import BUSYBOX_BINARY, busybox_image, elf_interpreter_problem, pause_image

PAUSE_IMAGE = "criproxy.test/pause:1"
BUSYBOX_IMAGE = "criproxy.test/busybox:1"
DEFAULT_HANDLER = "runc"
ALT_HANDLER = "runc-alt"

REQUIRED_COMMANDS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "gcc")
LOG_TAIL_LINES = 40
# sizeof(sockaddr_un.sun_path) minus the terminating NUL.
_MAX_SOCKET_PATH = 107
_MNT_DETACH = 2


class ContainerdError(RuntimeError):
    """Starting, using or stopping the test containerd failed."""


def containerd_available() -> str | None:
    """Why a real containerd cannot be run here, or None when everything needed is present."""
    missing = [command for command in REQUIRED_COMMANDS if shutil.which(command) is None]
    if missing:
        return f"missing commands: {', '.join(missing)} (run .ci/install-system-deps)"
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
    errors: list[str] = []
    try:
        response = client.call("RuntimeService", "ListPodSandbox", pb.ListPodSandboxRequest(), timeout=timeout)
    except grpc.RpcError as error:
        return [f"ListPodSandbox failed: {error}"]
    assert isinstance(response, pb.ListPodSandboxResponse)
    for pod in response.items:
        for method, request_type in (
            ("StopPodSandbox", pb.StopPodSandboxRequest),
            ("RemovePodSandbox", pb.RemovePodSandboxRequest),
        ):
            try:
                client.call("RuntimeService", method, request_type(pod_sandbox_id=pod.id), timeout=timeout)
            except grpc.RpcError as error:
                errors.append(f"{method} {pod.id} ({pod.metadata.name}) failed: {error}")
    return errors


def _mount_points_under(directory: Path) -> list[Path]:
    """Mount points at or below ``directory`` in this mount namespace, deepest first."""
    points: list[Path] = []
    prefix = str(directory)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
        raw = line.split(" ")[4]
        point = raw.encode().decode("unicode_escape")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(Path(point))
    return sorted(points, key=lambda path: len(path.parts), reverse=True)


def unmount_all_under(directory: Path) -> list[str]:
    """Unmount everything mounted below ``directory`` (lazily when busy); returns failures."""
    libc = ctypes.CDLL(None, use_errno=True)
    failures: list[str] = []
    for point in _mount_points_under(directory):
        encoded = os.fsencode(point)
        if libc.umount2(encoded, 0) == 0 or libc.umount2(encoded, _MNT_DETACH) == 0:
            continue
        failures.append(f"umount {point}: {os.strerror(ctypes.get_errno())}")
    return failures


def _processes() -> dict[int, tuple[int, list[str]]]:
    """pid -> (parent pid, argv) of every process still readable in /proc."""
    table: dict[int, tuple[int, list[str]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            # The command name in /proc/PID/stat is parenthesised and may hold spaces: split after it.
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        table[int(entry.name)] = (ppid, argv)
    return table


def kill_leftovers(directory: Path) -> list[str]:
    """SIGKILL containerd shims whose command line mentions ``directory``, and all their descendants."""
    prefix = str(directory)
    table = _processes()
    doomed = {
        pid
        for pid, (_, argv) in table.items()
        if "containerd-shim" in Path(argv[0]).name and any(prefix in arg for arg in argv)
    }
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in table.items() if ppid in doomed} - doomed
        doomed |= children
        grew = bool(children)
    killed: list[str] = []
    for pid in sorted(doomed - {os.getpid()}):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(f"{pid} ({' '.join(table[pid][1]).strip()})")
    return killed


class Containerd:
    """A containerd rooted in ``workdir``; use as a context manager or call start()/stop()."""

    def __init__(self, workdir: Path, *, start_timeout: float = 30.0, stop_timeout: float = 30.0) -> None:
        self.workdir = workdir.resolve()
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.socket_path = self.workdir / "containerd.sock"
        self.endpoint = f"unix://{self.socket_path}"
        self.config_path = self.workdir / "config.toml"
        self.log_path = self.workdir / "containerd.log"
        self.cni_conf_dir = self.workdir / "cni" / "net.d"
        self.cni_bin_dir = self.workdir / "cni" / "bin"
        self.pause_image = PAUSE_IMAGE
        self.busybox_image = BUSYBOX_IMAGE
        self._process: subprocess.Popen[bytes] | None = None

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
sandbox_image = {q(PAUSE_IMAGE)}
restrict_oom_score_adj = true
disable_apparmor = true
stream_server_address = "127.0.0.1"
stream_server_port = "0"

[{cri}.containerd]
snapshotter = "overlayfs"
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
        if len(str(self.socket_path)) + len(".ttrpc") > _MAX_SOCKET_PATH:
            raise ContainerdError(f"socket path {self.socket_path} is too long for a unix socket; use a shorter dir")
        for directory in (self.workdir, self.cni_conf_dir, self.cni_bin_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_toml())
        images = self.workdir / "images"
        archives = [
            pause_image(images / "pause.tar", PAUSE_IMAGE, images / "pause-build"),
            busybox_image(images / "busybox.tar", BUSYBOX_IMAGE),
        ]
        self._launch()
        try:
            self._wait_for_cri()
            for archive in archives:
                self._import(archive.path)
                self._wait_for_image(archive.ref)
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
        command = ["ctr", "--address", str(self.socket_path), "-n", "k8s.io", "images", "import", str(archive)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=self.start_timeout)
        except subprocess.TimeoutExpired:
            raise self.error(f"{' '.join(command)} timed out after {self.start_timeout:.0f}s") from None
        if result.returncode != 0:
            raise self.error(f"{' '.join(command)} failed with status {result.returncode}:\n{result.stderr}")

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
