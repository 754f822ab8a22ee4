"""The policy in force: loaded at start, reloaded when the file changes or on SIGHUP.

A valid new version is swapped in whole between calls (the pipeline reads the policy once per
call, so no call sees half of one). Files are read and checked on a worker thread: the event
loop keeps serving calls meanwhile, with the old policy. An invalid one keeps the old policy in force and says why in
the log. A policy file that others than its owner (root or the proxy's user) can write is
refused: whoever can write it decides what every pod on the node may do.

Reloads are serialised: one reloader task takes the requests (the watcher's, SIGHUP's) one at a
time, and requests made while a reload runs become one more reload after it, which reads the file
then; so the newest content is the last applied, never an older read. The swap (and the reload
listeners) run on the event loop. The watcher reacts only to the policy file: its path, the
symlinks it resolves through (a ConfigMap's `..data`) and the file it ends at, and only when the
content (or the reason to refuse it) changed; other events are counted in `watch_events`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from criproxy.cri.annotations import Lookup
from criproxy.errors import ConfigError
from criproxy.policies.engine import AnnotationPolicy
from criproxy.policies.model import parse_policy
from criproxy.policies.source import SourceError
from criproxy.supervise import Supervisor, stop_tasks

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
    _, loaded = _load(path, lookup)
    if isinstance(loaded, ConfigError):
        raise loaded
    return loaded


def _load(path: Path, lookup: Lookup) -> tuple[str, AnnotationPolicy | ConfigError]:
    """(what was read, as content_key names it; the policy built from it, or why there is none)."""
    problem = file_problem(path)
    if problem is not None:
        return f"refused: {problem}", ConfigError(f"policy file {path}: {problem}")
    try:
        text = path.read_bytes()
    except OSError as err:
        return f"unreadable: {err.strerror}", ConfigError(f"policy file {path}: cannot read it: {err.strerror}")
    key = hashlib.sha256(text).hexdigest()
    try:
        return key, AnnotationPolicy(parse_policy(text, str(path)), lookup)
    except SourceError as err:
        return key, ConfigError(str(err))


def content_key(path: Path) -> str:
    """What a reload of `path` would read: the content's digest, or why it would be refused."""
    problem = file_problem(path)
    if problem is not None:
        return f"refused: {problem}"
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as err:
        return f"unreadable: {err.strerror}"


#: The kernel's own bound on symlinks followed in one lookup.
_MAX_SYMLINKS = 40


def resolution_chain(path: Path) -> frozenset[str]:
    """The names resolving `path` goes through below its directory: the path, every symlink followed
    on the way (a ConfigMap mount's `policies.yaml -> ..data/policies.yaml`, `..data -> ..<timestamp>`)
    and each path that leads to, ending at the file itself. Symlinks above the directory are not
    followed: the watcher names events by the directory as given."""
    directory = os.path.dirname(os.path.abspath(path))
    names: set[str] = set()
    pending = os.path.abspath(path)
    for _ in range(_MAX_SYMLINKS):
        names.add(pending)
        parts = pending.split("/")
        for i in range(2, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if directory.startswith(prefix) and len(prefix) <= len(directory):
                continue  # the directory and its parents: as given
            if os.path.islink(prefix):
                names.add(prefix)
                target = os.readlink(prefix)
                pending = os.path.normpath(os.path.join(os.path.dirname(prefix), target, *parts[i:]))
                break
        else:
            break
    return frozenset(names)


def watched_directories(path: Path, chain: Iterable[str]) -> tuple[str, ...]:
    """The policy file's directory, then (sorted) each existing directory outside it that holds a
    name on its resolution chain: a symlink to /srv/policies/prod.yaml makes /srv/policies watched."""
    own = os.path.dirname(os.path.abspath(path))
    outside = {os.path.dirname(name) for name in chain if not name.startswith(own + "/")}
    return (own, *sorted(d for d in outside if d != own and os.path.isdir(d)))


def touches(event_path: str, chain: Iterable[str]) -> bool:
    """Whether a change to `event_path` can change what the chain resolves to (it is on it, or holds it)."""
    return any(name == event_path or name.startswith(event_path + "/") for name in chain)


class PolicyStore:
    """Holds the policy file's path and applies each good version to `apply` (e.g. the pipeline)."""

    def __init__(self, path: Path, lookup: Lookup, apply: Callable[[AnnotationPolicy], None]) -> None:
        self.path = path
        self.lookup = lookup
        self.apply = apply
        self.listeners: list[ReloadListener] = []
        key, loaded = _load(path, lookup)
        if isinstance(loaded, ConfigError):
            raise loaded  # at start, a bad file is a start-up error
        self.current = loaded
        #: What the last reload read (content_key): an event that leaves it the same is no reason to reload.
        self._seen = key
        self.generation = 1
        self.last_success = time.time()
        self.last_error: str | None = None
        apply(self.current)
        log.info("policy %s in force (%d rules)", self.current.identity, len(self.current.policies.rules))
        #: Watcher events: 'reloaded' (the content changed), 'unchanged' (the policy file's, same content),
        #: 'ignored' (other files in its directory).
        self.watch_events: Counter[str] = Counter()
        self._chain = resolution_chain(path)
        self._watcher: asyncio.Task[None] | None = None
        self._reloader: asyncio.Task[None] | None = None
        self._wanted: asyncio.Event | None = None
        self._reasons: list[str] = []

    def reload(self, reason: str) -> bool:
        """Load the file again now, on the caller's thread; swap it in when valid; keep the old one (and
        say why) when not. The watcher and SIGHUP use reload_soon (off the loop, serialised)."""
        self._seen, loaded = _load(self.path, self.lookup)
        return self._settle(loaded, reason)

    def _settle(self, loaded: AnnotationPolicy | ConfigError, reason: str) -> bool:
        if isinstance(loaded, ConfigError):
            self.last_error = str(loaded)
            log.error("policy reload (%s) failed; keeping %s in force: %s", reason, self.current.identity, loaded)
            for listener in self.listeners:
                listener(False, str(loaded))
            return False
        policy = loaded
        if policy.identity != self.current.identity:
            self.current, self.generation = policy, self.generation + 1
            self.apply(policy)
            log.info("policy reloaded (%s): %s in force (%d rules)", reason, policy.identity,
                     len(policy.policies.rules))
        self.last_success, self.last_error = time.time(), None
        for listener in self.listeners:
            listener(True, policy.identity)
        return True

    def start_watching(self, supervisor: Supervisor | None = None) -> None:
        """Start the watcher and the reloader, under `supervisor` (a private one when None)."""
        supervisor = supervisor if supervisor is not None else Supervisor()
        self._start_reloader(supervisor)
        self._watcher = supervisor.start("policy-watch", self._watch)

    def _start_reloader(self, supervisor: Supervisor) -> None:
        self._wanted = asyncio.Event()
        self._reloader = supervisor.start("policy-reload", self._reload_forever)

    def reload_soon(self, reason: str) -> None:
        """Ask for a reload (on the event loop's thread). It runs after the one running now, if any; requests
        made meanwhile are one reload, which reads the file after all of them."""
        if self._reloader is None:
            self._start_reloader(Supervisor())
        assert self._wanted is not None
        if reason not in self._reasons:
            self._reasons.append(reason)
        self._wanted.set()

    async def _reload_forever(self) -> None:
        assert self._wanted is not None
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            reason, self._reasons = ", ".join(self._reasons), []
            # Read and check on a worker thread (a large file takes a while); swap on the loop.
            key, loaded = await asyncio.to_thread(_load, self.path, self.lookup)
            self._seen = key
            self._settle(loaded, reason)

    async def _watch(self) -> None:
        from watchfiles import awatch

        # Directories, not the file: editors and ConfigMap updates replace the file (rename or a
        # symlink swap), which a watch on the old file would miss. The file's own directory, and
        # each directory outside it that its symlinks lead to, watched again whenever that changes.
        while True:
            directories = watched_directories(self.path, self._chain)
            async for changes in awatch(*directories, debounce=200, step=50, recursive=False):
                if not any(touches(changed, self._chain) for _, changed in changes):
                    self.watch_events["ignored"] += 1
                    continue
                self._chain, key = await asyncio.to_thread(
                    lambda: (resolution_chain(self.path), content_key(self.path)))
                if key == self._seen:
                    self.watch_events["unchanged"] += 1
                    log.debug("policy file %s: changed on disk, same content; not reloaded", self.path)
                else:
                    self.watch_events["reloaded"] += 1
                    self.reload_soon("the file changed")
                now = watched_directories(self.path, self._chain)
                if now != directories:
                    log.info("policy file %s now resolves through %s; watching there", self.path, ", ".join(now))
                    break

    async def stop(self) -> None:
        await stop_tasks([self._watcher, self._reloader], f"policy file {self.path}")
