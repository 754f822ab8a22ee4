"""What this machine lets a private containerd do, found out rather than assumed, and the host's
bookkeeping a clean stop needs: processes, mounts and cgroups under a directory.

A fresh Debian machine (a VM, a CI runner, a container with extra privileges) differs from a
kubelet's node in ways that make containerd's default configuration fail to run a pod:

- root may lack CAP_SYS_RESOURCE, so no process can lower its ``oom_score_adj``; containerd asks
  -998 for a pod's sandbox and runc then fails with "can't get final child's PID from pipe".
  ``restrict_oom_score_adj`` makes containerd ask no lower than its own value.
- the kernel may have no AppArmor (or no ``apparmor_parser`` to load containerd's profile).
- the directory may not take an overlay mount (overlay on overlay): the native snapshotter then.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_MNT_DETACH = 2
_CAP_SYS_RESOURCE = 24
_OOM_SCORE_ADJ_MIN = -1000
APPARMOR_ENABLED = Path("/sys/module/apparmor/parameters/enabled")


@dataclass(frozen=True)
class HostSettings:
    """The containerd settings this machine needs, each with the reason it was chosen."""

    apparmor: bool
    restrict_oom_score_adj: bool
    snapshotter: str
    reasons: tuple[str, ...]


def detect(probe_dir: Path) -> HostSettings:
    """Find out what a containerd rooted under ``probe_dir`` (an existing directory) can use here."""
    apparmor, apparmor_reason = apparmor_usable()
    lowers, oom_reason = can_lower_oom_score_adj()
    overlay_problem = overlay_mount_problem(probe_dir)
    snapshotter = "overlayfs" if overlay_problem is None else "native"
    snapshot_reason = (f"snapshotter overlayfs (an overlay mount works in {probe_dir})" if overlay_problem is None
                       else f"snapshotter native (an overlay mount fails in {probe_dir}: {overlay_problem})")
    return HostSettings(apparmor=apparmor, restrict_oom_score_adj=not lowers, snapshotter=snapshotter,
                        reasons=(apparmor_reason, oom_reason, snapshot_reason))


def apparmor_usable(enabled_file: Path = APPARMOR_ENABLED) -> tuple[bool, str]:
    """Whether containerd can apply its default AppArmor profile here, and why (or why not)."""
    try:
        enabled = enabled_file.read_text().strip()
    except OSError:
        return False, "AppArmor off (not in this kernel)"
    if not enabled.startswith("Y"):
        return False, "AppArmor off (disabled in this kernel)"
    if shutil.which("apparmor_parser") is None:
        return False, "AppArmor off (in the kernel, but apparmor_parser, which loads containerd's profile, is missing)"
    return True, "AppArmor on (containerd's default profile)"


def _has_capability(bit: int) -> bool | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


def can_lower_oom_score_adj(timeout: float = 10.0) -> tuple[bool, str]:
    """Whether a child of this process may lower its oom_score_adj (what runc does for a pod), and why."""
    try:
        current = int(Path("/proc/self/oom_score_adj").read_text())
    except (OSError, ValueError):
        return False, "restrict_oom_score_adj = true (this process's oom_score_adj is unreadable)"
    if current <= _OOM_SCORE_ADJ_MIN:
        return True, "restrict_oom_score_adj = false (oom_score_adj is already the lowest)"
    # A child tries, so this process keeps its own value.
    probe = ["sh", "-c", f"echo {current - 1} > /proc/self/oom_score_adj"]
    try:
        lowered = subprocess.run(probe, capture_output=True, check=False, timeout=timeout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        lowered = False
    if lowered:
        return True, "restrict_oom_score_adj = false (root may lower an oom_score_adj here)"
    why = "root lacks CAP_SYS_RESOURCE" if _has_capability(_CAP_SYS_RESOURCE) is False else "the kernel refuses it"
    return False, (f"restrict_oom_score_adj = true (no process here may lower its oom_score_adj: {why}; "
                   "without it runc fails: \"can't get final child's PID from pipe\")")


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def overlay_mount_problem(directory: Path) -> str | None:
    """Why an overlay mount fails in ``directory`` (what containerd's overlayfs snapshotter needs), or None."""
    probe = directory / "overlay-probe"
    parts = {name: probe / name for name in ("lower", "upper", "work", "merged")}
    try:
        for path in parts.values():
            path.mkdir(parents=True, exist_ok=True)
        options = f"lowerdir={parts['lower']},upperdir={parts['upper']},workdir={parts['work']}"
        libc = _libc()
        if libc.mount(b"overlay", os.fsencode(parts["merged"]), b"overlay", 0, options.encode()) != 0:
            return os.strerror(ctypes.get_errno())
        if libc.umount2(os.fsencode(parts["merged"]), 0) != 0:
            libc.umount2(os.fsencode(parts["merged"]), _MNT_DETACH)
        return None
    except OSError as error:
        return str(error)
    finally:
        if not mount_points_under(probe):
            shutil.rmtree(probe, ignore_errors=True)


# -- mounts --------------------------------------------------------------------------------------


def _mountinfo() -> list[tuple[str, str, str]]:
    """(mount point, file system type, super options) of every mount in this mount namespace."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        parts, rest = fields.split(" "), tail.split(" ")
        # Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
        point = parts[4].encode().decode("unicode_escape")
        out.append((point, rest[0], rest[2] if len(rest) > 2 else ""))
    return out


def mount_points_under(directory: Path) -> list[Path]:
    """Mount points at or below ``directory`` in this mount namespace, deepest first."""
    prefix = str(directory)
    points = [Path(point) for point, _, _ in _mountinfo() if point == prefix or point.startswith(prefix + "/")]
    return sorted(points, key=lambda path: len(path.parts), reverse=True)


def unmount_all_under(directory: Path) -> list[str]:
    """Unmount everything mounted below ``directory`` (lazily when busy); returns failures."""
    libc = _libc()
    failures: list[str] = []
    for point in mount_points_under(directory):
        encoded = os.fsencode(point)
        if libc.umount2(encoded, 0) == 0 or libc.umount2(encoded, _MNT_DETACH) == 0:
            continue
        failures.append(f"umount {point}: {os.strerror(ctypes.get_errno())}")
    return failures


# -- processes -----------------------------------------------------------------------------------


def processes() -> dict[int, tuple[int, list[str]]]:
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


def _with_descendants(table: dict[int, tuple[int, list[str]]], roots: set[int]) -> set[int]:
    doomed = set(roots)
    for _ in range(len(table)):  # each round adds a generation; no tree is deeper than the table is long
        children = {pid for pid, (ppid, _) in table.items() if ppid in doomed} - doomed
        if not children:
            break
        doomed |= children
    return doomed


def kill_processes(roots: Iterable[int], table: dict[int, tuple[int, list[str]]] | None = None) -> list[str]:
    """SIGKILL ``roots`` and all their descendants (never this process); returns what was killed."""
    table = processes() if table is None else table
    killed: list[str] = []
    for pid in sorted(_with_descendants(table, set(roots)) - {os.getpid()}):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(f"{pid} ({' '.join(table.get(pid, (0, ['?']))[1]).strip()})")
    return killed


def kill_leftovers(directory: Path) -> list[str]:
    """SIGKILL containerd shims whose command line mentions ``directory``, and all their descendants."""
    prefix = str(directory)
    table = processes()
    shims = {
        pid
        for pid, (_, argv) in table.items()
        if "containerd-shim" in Path(argv[0]).name and any(prefix in arg for arg in argv)
    }
    return kill_processes(shims, table)


# -- cgroups -------------------------------------------------------------------------------------


def cgroup_mounts() -> list[tuple[Path, str, str]]:
    """(mount point, cgroup or cgroup2, super options) of the cgroup hierarchies mounted here."""
    return [(Path(point), kind, options) for point, kind, options in _mountinfo() if kind in ("cgroup", "cgroup2")]


def memory_limit_file(pid: int) -> Path | None:
    """The memory limit file of the cgroup ``pid`` runs in: memory.limit_in_bytes (v1) or memory.max (v2)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    memberships = [line.split(":", 2) for line in lines if line.count(":") >= 2]
    mounts = cgroup_mounts()
    # cgroup v1 (or the hybrid layout, whose cgroup2 hierarchy has no memory controller) first.
    for _, controllers, path in memberships:
        if "memory" in controllers.split(","):
            for point, kind, options in mounts:
                if kind == "cgroup" and "memory" in options.split(","):
                    return point / path.lstrip("/") / "memory.limit_in_bytes"
    for _, controllers, path in memberships:
        if controllers == "":
            for point, kind, _ in mounts:
                if kind == "cgroup2":
                    return point / path.lstrip("/") / "memory.max"
    return None


def remove_cgroups(name: str, timeout: float = 5.0) -> list[str]:
    """Remove the cgroup tree ``/<name>`` from every hierarchy, deepest first; returns what stayed.

    A cgroup with processes in it cannot be removed (EBUSY): processes just killed take a moment
    to leave, so removal is retried until ``timeout``."""
    trees = [point / name for point, _, _ in cgroup_mounts() if (point / name).is_dir()]
    deadline = time.monotonic() + timeout
    left: list[str] = []
    for _ in range(int(timeout / 0.1) + 1):
        left = []
        for tree in trees:
            for directory in sorted((p for p in [tree, *tree.rglob("*")] if p.is_dir()),
                                    key=lambda p: len(p.parts), reverse=True):
                try:
                    directory.rmdir()
                except FileNotFoundError:
                    pass
                except OSError as error:
                    left.append(f"cgroup {directory}: {error.strerror}")
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return left
