"""The demo's two pods, the requests a kubelet would send for them, and what the runtime says it ran.

The pods are Deployments' pod templates (the same objects as docs/examples/criproxy-demo.yaml, so
`criproxy explain` predicts offline what the demo shows live). Their requests come from
criproxy.explain's `pod_requests`, the kubelet's own arithmetic for resources and seccomp; the demo
adds what a node adds: a uid, a log directory, the host's network (the private containerd has no
CNI network), a cgroup parent, the locally built image.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from criproxy.api.runtime.v1 import api_pb2
from criproxy.explain import Pod, pod_requests, pods_of

APPLIED = "criproxy.io/applied"
DEMO_NAMESPACE = "criproxy-demo"
#: The pod's container sleeps until the demo removes it (a day at most).
COMMAND = ["/bin/sh", "-c", "echo started; exec sleep 86400"]

#: Runs in criproxy-demo, where policies.yaml's rule `demo` allows every criproxy annotation.
WEB: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "web", "namespace": DEMO_NAMESPACE},
    "spec": {
        "replicas": 1,
        "selector": {"matchLabels": {"app": "web"}},
        "template": {
            "metadata": {
                "labels": {"app": "web"},
                "annotations": {
                    "runtime-handler.criproxy.io/pod": "runc-alt",
                    "seccomp-profile.criproxy.io/pod": "runtime/default",
                    "memory-limit.criproxy.io/container.app": "64Mi",
                },
            },
            "spec": {
                "containers": [{
                    "name": "app",
                    "image": "busybox:1.36",
                    "command": COMMAND,
                    "resources": {"requests": {"cpu": "100m", "memory": "32Mi"},
                                  "limits": {"cpu": "500m", "memory": "256Mi"}},
                }],
            },
        },
    },
}

#: Runs in batch-nightly, where the rule `batch-tighten-only` allows no unconfined seccomp.
REPORT: dict[str, Any] = {
    "apiVersion": "batch/v1",
    "kind": "CronJob",
    "metadata": {"name": "report", "namespace": "batch-nightly"},
    "spec": {
        "schedule": "0 3 * * *",
        "jobTemplate": {"spec": {"template": {
            "metadata": {"annotations": {"seccomp-profile.criproxy.io/pod": "unconfined"}},
            "spec": {
                "restartPolicy": "OnFailure",
                "containers": [{"name": "report", "image": "busybox:1.36", "command": COMMAND}],
            },
        }}},
    },
}


@dataclass
class PodPlan:
    """One pod as the kubelet would start it: the sandbox request, then each container's."""

    pod: Pod
    sandbox: api_pb2.RunPodSandboxRequest
    containers: list[api_pb2.CreateContainerRequest]

    @property
    def who(self) -> str:
        return f"{self.pod.namespace}/{self.pod.name}"


def demo_pods() -> list[Pod]:
    return pods_of([WEB, REPORT], "criproxy demo", "default")


def plan(pod: Pod, *, image: str, log_root: Path, cgroup_parent: str = "") -> PodPlan:
    """The requests a kubelet would send for ``pod`` on a node without CNI, with ``image`` for every container."""
    requests = list(pod_requests(pod))
    first = requests[0][2]
    assert isinstance(first, api_pb2.RunPodSandboxRequest)
    sandbox = api_pb2.RunPodSandboxRequest()
    sandbox.CopyFrom(first)
    config = sandbox.config
    uid = str(uuid.uuid4())
    config.metadata.uid = uid
    config.log_directory = str(log_root / f"{pod.namespace}_{pod.name}_{uid}")
    config.labels.update({"io.kubernetes.pod.name": pod.name, "io.kubernetes.pod.namespace": pod.namespace,
                          "io.kubernetes.pod.uid": uid})
    config.linux.security_context.namespace_options.network = api_pb2.NODE
    if cgroup_parent:
        config.linux.cgroup_parent = cgroup_parent
    containers = []
    for _, name, request in requests[1:]:
        assert isinstance(request, api_pb2.CreateContainerRequest) and name is not None
        create = api_pb2.CreateContainerRequest()
        create.CopyFrom(request)
        create.config.image.image = image
        create.config.log_path = f"{name}/0.log"
        create.config.labels.update({"io.kubernetes.container.name": name, "io.kubernetes.pod.name": pod.name,
                                     "io.kubernetes.pod.namespace": pod.namespace})
        create.config.linux.security_context.namespace_options.network = api_pb2.NODE
        containers.append(create)
    return PodPlan(pod, sandbox, containers)


def applied(annotations: Any) -> list[dict[str, Any]]:
    """The entries of the criproxy.io/applied annotation (none when it is absent or unreadable)."""
    raw = annotations.get(APPLIED) if hasattr(annotations, "get") else None
    if not raw:
        return []
    try:
        entries = json.loads(raw)
    except ValueError:
        return []
    return [entry for entry in entries if isinstance(entry, dict)] if isinstance(entries, list) else []
