"""The policy in force: loaded at start, reloaded when the file changes or on SIGHUP.

A valid new version is swapped in whole between calls (the pipeline reads the policy once per
call, so no call sees half of one). Files are read and checked on a worker thread: the event
loop keeps serving calls meanwhile, with the old policy. An invalid one keeps the old policy in force and says why in
the log. A policy file that others than its owner (root or the proxy's user) can write is
refused: whoever can write it decides what every pod on the node may do.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from criproxy.annotations import Lookup
from criproxy.errors import ConfigError
from criproxy.policies.engine import AnnotationPolicy
from criproxy.policies.model import parse_policy
from criproxy.policies.source import SourceError

log = logging.getLogger(__name__)

#: Told of every reload attempt: (ok, policy identity or error text).
ReloadListener = Callable[[bool, str], None]


def file_problem(path: Path) -> str | None:
    """Why the file at `path` (after symlinks, as a ConfigMap mounts it) must not be trusted, or None."""
    real = Path(os.path.realpath(path))
    try:
        st = real.stat()
    except OSError as err:
        return f"cannot read it: {err.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"{real} is not a regular file"
    owners = {0, os.geteuid()}
    if st.st_uid not in owners:
        return f"{real} is owned by uid {st.st_uid}, not by root or the proxy's user; chown it"
    if st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and st.st_gid not in owners):
        return (f"{real} is writable by others than its owner (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"run chmod go-w {real}")
    return None


def load_policy(path: Path, lookup: Lookup) -> AnnotationPolicy:
    """Read, check and build the policy at `path`; ConfigError naming the file, line and key."""
    problem = file_problem(path)
    if problem is not None:
        raise ConfigError(f"policy file {path}: {problem}")
    try:
        text = path.read_bytes()
        return AnnotationPolicy(parse_policy(text, str(path)), lookup)
    except OSError as err:
        raise ConfigError(f"policy file {path}: cannot read it: {err.strerror}") from None
    except SourceError as err:
        raise ConfigError(str(err)) from None


class PolicyStore:
    """Holds the policy file's path and applies each good version to `apply` (e.g. the pipeline)."""

    def __init__(self, path: Path, lookup: Lookup, apply: Callable[[AnnotationPolicy], None]) -> None:
        self.path = path
        self.lookup = lookup
        self.apply = apply
        self.listeners: list[ReloadListener] = []
        self.current = load_policy(path, lookup)  # at start, a bad file is a start-up error
        self.generation = 1
        self.last_success = time.time()
        self.last_error: str | None = None
        apply(self.current)
        log.info("policy %s in force (%d rules)", self.current.identity, len(self.current.policies.rules))
        self._watcher: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[bool]] = set()

    def reload(self, reason: str) -> bool:
        """Load the file again; swap it in when valid; keep the old one (and say why) when not."""
        try:
            policy = load_policy(self.path, self.lookup)
        except ConfigError as err:
            self.last_error = str(err)
            log.error("policy reload (%s) failed; keeping %s in force: %s", reason, self.current.identity, err)
            for listener in self.listeners:
                listener(False, str(err))
            return False
        if policy.identity != self.current.identity:
            self.current, self.generation = policy, self.generation + 1
            self.apply(policy)
            log.info("policy reloaded (%s): %s in force (%d rules)", reason, policy.identity,
                     len(policy.policies.rules))
        self.last_success, self.last_error = time.time(), None
        for listener in self.listeners:
            listener(True, policy.identity)
        return True

    def start_watching(self) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="policy-watch")

    def reload_soon(self, reason: str) -> None:
        """Reload on a worker thread (a large file takes a while to check; calls must not wait for it)."""
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(self.reload, reason))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _watch(self) -> None:
        from watchfiles import awatch

        # The directory, not the file: editors and ConfigMap updates replace the file (rename or
        # a symlink swap), which a watch on the old file would miss.
        directory = self.path.parent
        async for _ in awatch(directory, debounce=200, step=50, recursive=False):
            await asyncio.to_thread(self.reload, "the file changed")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
