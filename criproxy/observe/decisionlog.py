"""The decision log: one JSON line per decision, the audit trail a platform team hands to security.

Each line: time, pod, namespace, pod_uid, container, method, interceptor, rule, mode, action,
setting, annotation, value, the adjustment as a diff (field, from, to), reason, policy. Written
to a file rotated at a size bound (or to stderr). Only intercepted calls have decisions, and a
line holds annotation values and resource fields, never a request body: PullImage credentials
cannot reach it.
"""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from criproxy.cri.adjust import read_field
from criproxy.cri.context import CallContext
from criproxy.observe.logqueue import DEFAULT_CAPACITY, BackgroundLog, DropListener
from criproxy.policies import Decision


class DecisionLog:
    """A decision sink (criproxy.pipeline.DecisionSink) writing JSON lines.

    Lines are written, and the file rotated, by a background thread (criproxy.observe.logqueue): a call
    never waits for the disk. Past `capacity` waiting lines, lines are dropped and counted
    (`dropped`, and `on_drop`). The file and its rotations are created 0600: they name every pod
    and what it asked for, like the socket they are private to the node's administrator."""

    def __init__(self, path: Path | None, *, max_bytes: int = 50 << 20, backups: int = 5,
                 policy: Callable[[], str] = lambda: "", capacity: int = DEFAULT_CAPACITY) -> None:
        self.policy = policy
        self.logger = logging.getLogger(f"criproxy.decisions.{id(self)}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        handler: logging.Handler
        if path is None:
            handler = logging.StreamHandler(sys.stderr)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = PrivateRotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        #: The handler that writes (on the background thread).
        self.handler = handler
        self.background = BackgroundLog("decisions", handler, capacity=capacity)
        self.logger.addHandler(self.background.handler)

    @property
    def dropped(self) -> int:
        return self.background.dropped

    @property
    def on_drop(self) -> DropListener | None:
        return self.background.on_drop

    @on_drop.setter
    def on_drop(self, listener: DropListener | None) -> None:
        self.background.on_drop = listener

    def __call__(self, ctx: CallContext, decisions: Sequence[Decision]) -> None:
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        for d in decisions:
            self.logger.info(json.dumps(entry(ctx, d, now, self.policy()), separators=(",", ":"), default=str))

    def close(self) -> None:
        """Write out every line logged so far, then close the file."""
        self.logger.removeHandler(self.background.handler)
        self.background.stop()


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A RotatingFileHandler whose files are created mode 0600 (the rotated ones are renamed from them).
    Always appends (a RotatingFileHandler with a size bound does)."""

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


def entry(ctx: CallContext, d: Decision, now: str, policy: str) -> dict[str, Any]:
    interceptor = d.interceptor or (d.change.by if d.change is not None else "")
    out: dict[str, Any] = {
        "time": now, "namespace": ctx.pod.namespace, "pod": ctx.pod.name, "pod_uid": ctx.pod.uid,
        "container": ctx.container, "method": ctx.method, "interceptor": interceptor,
        "rule": d.rule, "mode": d.mode, "action": d.action, "setting": d.setting, "annotation": d.key,
        "value": d.value, "reason": d.reason, "policy": policy}
    if d.change is not None:
        out["diff"] = {"field": d.change.path, "from": read_field(ctx.request, d.change.path), "to": d.change.value}
    return out
