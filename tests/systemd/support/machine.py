"""A Debian container booted with `systemd-nspawn -b`: a real systemd as its PID 1, on this host.

systemd is installed here but is not PID 1, and the host has no system bus, so the container runs
with --keep-unit --register=no, in the background (its own session, so that it survives nothing
of the test's terminal), with its console copied to a log file. Commands run inside through
`nsenter -t <container PID 1> -a`. The container has its own network namespace (loopback only:
the tests use no network) and sees the host's paths it is given as bind mounts.

Limits of this kind of host, which the tests must not depend on: cgroup memory, pids and CPU
limits are not applied inside (the host's cgroup v1 hierarchies are read-only there),
CAP_SYS_RESOURCE is absent (a negative OOMScoreAdjust= and a large LimitNOFILE= are clamped),
and ProtectKernelTunables= / ProtectClock= cannot be observed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.containerd import unmount_all_under

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INSIDE_ENV = ("PATH=" + PATH, "LANG=C.UTF-8", "TERM=dumb", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0",
              "SYSTEMD_LOG_COLOR=0", "HOME=/root")
BOOT_TIMEOUT = 90.0
POWEROFF_TIMEOUT = 30.0
COMMAND_TIMEOUT = 120.0


class MachineError(RuntimeError):
    """Booting, using or stopping the container failed."""


@dataclass(frozen=True)
class Bind:
    """A host path seen inside the container at `inside`."""

    host: Path
    inside: str
    read_only: bool = False

    def option(self) -> str:
        return f"--bind{'-ro' if self.read_only else ''}={self.host}:{self.inside}"


def _status_field(pid: int, name: str) -> str | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _alive(pid: int) -> bool:
    state = _status_field(pid, "State")
    return state is not None and not state.startswith(("Z", "X"))


class Machine:
    """The container rooted at `root` (an extracted root file system); boot() it, then run() in it."""

    def __init__(self, root: Path, name: str, binds: Sequence[Bind], log: Path) -> None:
        self.root = root
        self.name = name
        self.binds = tuple(binds)
        self.log = log
        self.boots = 0
        self._nspawn: subprocess.Popen[bytes] | None = None
        self._leader: int | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def leader(self) -> int:
        """The host pid of the container's PID 1 (systemd)."""
        if self._leader is None:
            raise MachineError(f"container {self.name} is not running")
        return self._leader

    def boot(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Start the container and wait until its systemd reports the system running; returns the seconds it took."""
        if self._nspawn is not None:
            raise MachineError(f"container {self.name} is already running")
        started = time.monotonic()
        command = ["systemd-nspawn", "--quiet", f"--directory={self.root}", f"--machine={self.name}", "--boot",
                   "--keep-unit", "--register=no", "--console=read-only", "--private-network",
                   "--system-call-filter=bpf", *(bind.option() for bind in self.binds)]
        env = {"PATH": os.environ.get("PATH", PATH), "LANG": "C.UTF-8", "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",
               "SYSTEMD_LOG_COLOR": "0"}
        with self.log.open("ab") as console:
            console.write(f"\n===== boot {self.boots + 1}: {' '.join(command)}\n".encode())
            console.flush()
            self._nspawn = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=console,
                                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.boots += 1
        try:
            self._leader = self._find_leader(started + timeout)
            self._wait_running(started + timeout)
        except BaseException:
            self.kill()
            raise
        return time.monotonic() - started

    def _find_leader(self, deadline: float) -> int:
        assert self._nspawn is not None
        while time.monotonic() < deadline:
            if self._nspawn.poll() is not None:
                raise MachineError(f"systemd-nspawn exited with status {self._nspawn.returncode}\n"
                                   f"{self.console_tail()}")
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                pid = int(entry.name)
                if _status_field(pid, "PPid") == str(self._nspawn.pid):
                    nspid = (_status_field(pid, "NSpid") or "").split()
                    if len(nspid) >= 2 and nspid[-1] == "1":
                        return pid
            time.sleep(0.05)
        raise MachineError(f"no container PID 1 under systemd-nspawn (pid {self._nspawn.pid})\n{self.console_tail()}")

    def _wait_running(self, deadline: float) -> None:
        last = ""
        while time.monotonic() < deadline:
            remaining = max(1.0, deadline - time.monotonic())
            result = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=remaining)
            last = result.stdout.strip()
            if last == "running":
                return
            # "offline" (or nothing) while PID 1 does not answer yet: ask again.
            if last in ("degraded", "maintenance", "stopping"):
                failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
                raise MachineError(f"container {self.name} booted {last}; failed units:\n{failed}\n"
                                   f"{self.console_tail()}")
            time.sleep(0.2)
        raise MachineError(f"container {self.name} not running after boot (last state {last!r})\n{self.console_tail()}")

    def poweroff(self, timeout: float = POWEROFF_TIMEOUT) -> None:
        """A clean shutdown (systemctl poweroff inside); kills the container if that does not end it in time."""
        process = self._nspawn
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(MachineError, subprocess.TimeoutExpired):
                self.run("systemctl", "poweroff", "--no-block", check=False, timeout=10)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise MachineError(f"container {self.name} did not power off within {timeout:.0f}s; killed it\n"
                                   f"{self.console_tail()}") from None
        self._nspawn = None
        self._leader = None

    def kill(self) -> None:
        """End the container now: SIGKILL its PID 1 (which ends its whole PID namespace) and systemd-nspawn."""
        process, leader = self._nspawn, self._leader
        self._nspawn = self._leader = None
        if leader is not None and _alive(leader):
            with contextlib.suppress(ProcessLookupError):
                os.kill(leader, signal.SIGKILL)
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(POWEROFF_TIMEOUT)

    def reboot(self) -> float:
        """Power off and boot again on the same root file system; returns the seconds the boot took."""
        self.poweroff()
        return self.boot()

    def remove(self) -> list[str]:
        """After poweroff/kill: delete the root file system (only once nothing is mounted below it); problems."""
        problems: list[str] = []
        if self._nspawn is not None:
            problems.append(f"container {self.name} still running at removal; killed it")
            self.kill()
        problems += unmount_all_under(self.root)
        leftovers = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                     if f" {self.root}/" in line or f" {self.root} " in line]
        if leftovers:
            problems.append(f"still mounted under {self.root}, not removing it: {leftovers}")
            return problems
        shutil.rmtree(self.root, ignore_errors=True)
        # systemd-nspawn's per-machine directory for propagating mounts, normally removed by itself.
        with contextlib.suppress(OSError):
            Path(f"/run/systemd/nspawn/propagate/{self.name}").rmdir()
        return problems

    # -- inside ----------------------------------------------------------------------------------

    def run(self, *argv: str, check: bool = True, timeout: float = COMMAND_TIMEOUT,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """`argv` inside the container (all its namespaces, a clean environment) as root."""
        command = ["nsenter", "-t", str(self.leader), "-a", "--", "env", "-i", *INSIDE_ENV, *argv]
        process = subprocess.Popen(command, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise MachineError(f"{' '.join(argv)} in {self.name} did not finish within {timeout:.0f}s") from None
        result = subprocess.CompletedProcess(list(argv), process.returncode, stdout, stderr)
        if check and result.returncode != 0:
            raise MachineError(f"{' '.join(argv)} in {self.name} failed with status {result.returncode}:\n"
                               f"{stdout}{stderr}")
        return result

    def sh(self, script: str, check: bool = True, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return self.run("/bin/sh", "-c", script, check=check, timeout=timeout)

    def systemctl(self, *args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT
                  ) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", *args, check=check, timeout=timeout)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """`systemctl show UNIT -p P...` as a dict."""
        out = self.systemctl("show", unit, *(f"--property={name}" for name in properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> str:
        return self.run("journalctl", "--no-pager", "--quiet", *args, check=False).stdout

    def path(self, inside: str) -> Path:
        """Where the container's path `inside` is in the host's file system (not for bind-mounted paths)."""
        return self.root / inside.lstrip("/")

    def console_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return f"console ({self.log}), last {lines} lines:\n" + "\n".join(text.splitlines()[-lines:])


def systemd_tools_missing() -> str | None:
    """Why a container cannot be booted here, or None."""
    missing = [tool for tool in ("systemd-nspawn", "nsenter", "tar") if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (Debian packages systemd-container, util-linux; " \
               f".ci/install-system-deps installs them)"
    if os.geteuid() != 0:
        return "booting a container with systemd-nspawn needs root"
    return None
