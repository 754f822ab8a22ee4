"""The demo's one private directory: claimed under a lock (a second demo is refused), cleaned of what
an earlier demo that was killed left behind, and removed at the end, leaving nothing.

Everything the demo makes lives in it: containerd's root, state, sockets, config and log, the
runc state of both handlers, the images, the pods' logs, the proxy's socket and logs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

from criproxy.demo.host import kill_leftovers, kill_processes, mount_points_under, processes, unmount_all_under

LOCK = "demo.lock"
_CLAIM_ATTEMPTS = 5


class Refused(Exception):
    """The directory cannot be the demo's: another demo holds it, or it is not a demo's directory."""


class WorkDir:
    """A claimed demo directory; ``release()`` removes it (or empties it, when it existed before and was empty)."""

    def __init__(self, path: Path, fd: int, created: bool) -> None:
        self.path = path
        self._fd: int | None = fd
        self._remove_dir = created

    @classmethod
    def claim(cls, path: Path) -> WorkDir:
        """Lock ``path`` for this process (creating it, mode 0700), or raise Refused saying who holds it."""
        path = path.absolute()
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise Refused(f"{path} exists and is not a directory; choose another --workdir")
        created = not path.exists()
        for _ in range(_CLAIM_ATTEMPTS):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock = path / LOCK
            ours = lock.exists()
            if not ours and any(path.iterdir()):
                raise Refused(f"{path} is not empty and is not a criproxy demo's directory (it has no {LOCK}); "
                              "choose another --workdir")
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise Refused(f"another criproxy demo (pid {holder}) is running in {path}; stop it first (Ctrl-C "
                              f"where it runs, or kill -TERM {holder}), or give this one another --workdir") from None
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the demo that held it removed it meanwhile: claim the new one
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return cls(path, fd, created or ours)
            os.close(fd)
        raise Refused(f"could not lock {path / LOCK} (it was removed and made again {_CLAIM_ATTEMPTS} times)")

    def leftovers(self) -> list[str]:
        """What is in the directory besides the lock: an earlier demo that could not clean up."""
        return sorted(entry.name for entry in self.path.iterdir() if entry.name != LOCK)

    def clean_leftovers(self) -> list[str]:
        """Kill the processes an earlier demo left (its containerd, criproxy, shims), unmount, empty the directory.

        Returns what was done. Only containerd, its shims and `criproxy serve` processes naming this
        directory are killed, never anything else that mentions it."""
        done = [f"killed {victim}" for victim in self.kill_processes()]
        done += [f"killed {victim}" for victim in kill_leftovers(self.path)]
        failures = unmount_all_under(self.path)
        done += failures
        if not failures:
            self.empty()
        return done

    def kill_processes(self) -> list[str]:
        table = processes()
        prefix = str(self.path) + "/"
        roots = set()
        for pid, (_, argv) in table.items():
            if not any(prefix in arg for arg in argv):
                continue
            proxy = "serve" in argv and any(Path(arg).name == "criproxy" for arg in argv[:3])
            if Path(argv[0]).name == "containerd" or proxy:
                roots.add(pid)
        return kill_processes(roots, table)

    def empty(self) -> list[str]:
        """Remove everything but the lock, unless something is still mounted below (then nothing)."""
        mounted = mount_points_under(self.path)
        if mounted:
            return [f"left {self.path} in place: {mounted[0]} is still mounted"]
        problems = []
        for entry in self.path.iterdir():
            if entry.name == LOCK:
                continue
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except OSError as error:
                problems.append(f"cannot remove {entry}: {error}")
        return problems

    def release(self) -> list[str]:
        """Empty and remove the directory (or leave it empty when it existed before), then unlock."""
        problems = self.empty()
        if not problems:
            with contextlib.suppress(FileNotFoundError):
                (self.path / LOCK).unlink()
            if self._remove_dir:
                try:
                    self.path.rmdir()
                except OSError as error:
                    problems.append(f"cannot remove {self.path}: {error.strerror}")
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        return problems
