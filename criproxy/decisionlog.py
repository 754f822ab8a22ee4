"""The decision log: one JSON line per decision, the audit trail a platform team hands to security.

Each line: time, pod, namespace, pod_uid, container, method, interceptor, rule, mode, action,
setting, annotation, value, the adjustment as a diff (field, from, to), reason, policy. Written
to a file rotated at a size bound (or to stderr). Only intercepted calls have decisions, and a
line holds annotation values and resource fields, never a request body: PullImage credentials
cannot reach it.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from criproxy.adjust import read_field
from criproxy.context import CallContext
from criproxy.policies import FAILED_OPEN, Decision


class DecisionLog:
    """A decision sink (criproxy.pipeline.DecisionSink) writing JSON lines."""

    def __init__(self, path: Path | None, *, max_bytes: int = 50 << 20, backups: int = 5,
                 policy: Callable[[], str] = lambda: "") -> None:
        self.policy = policy
        self.logger = logging.getLogger(f"criproxy.decisions.{id(self)}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        handler: logging.Handler
        if path is None:
            handler = logging.StreamHandler(sys.stderr)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups,
                                                           encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        self.handler = handler
        self.logger.addHandler(handler)

    def __call__(self, ctx: CallContext, decisions: Sequence[Decision]) -> None:
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        for d in decisions:
            self.logger.info(json.dumps(entry(ctx, d, now, self.policy()), separators=(",", ":"), default=str))

    def close(self) -> None:
        self.logger.removeHandler(self.handler)
        self.handler.close()


def entry(ctx: CallContext, d: Decision, now: str, policy: str) -> dict[str, Any]:
    interceptor = d.change.by if d.change else (d.setting if d.action == FAILED_OPEN else "")
    out: dict[str, Any] = {
        "time": now, "namespace": ctx.pod.namespace, "pod": ctx.pod.name, "pod_uid": ctx.pod.uid,
        "container": ctx.container, "method": ctx.method, "interceptor": interceptor,
        "rule": d.rule, "mode": d.mode, "action": d.action, "setting": d.setting, "annotation": d.key,
        "value": d.value, "reason": d.reason, "policy": policy}
    if d.change is not None:
        out["diff"] = {"field": d.change.path, "from": read_field(ctx.request, d.change.path), "to": d.change.value}
    return out
