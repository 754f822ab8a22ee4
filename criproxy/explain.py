"""`criproxy explain`: what the proxy would do to the pods of a Kubernetes manifest, offline.

The manifest's pods are turned into the RunPodSandbox and CreateContainer requests a kubelet
would send (see `pod_requests`; the resources follow the kubelet's own arithmetic, with the
approximations noted there), then run through the same pipeline `criproxy serve` runs: the
configured interceptors and the policy. Nothing is sent anywhere. The runtime's handlers are
not known offline, so the runtime-handler interceptor checks against its configured `known`
list only. A manifest may hold any number of documents, as `kubectl kustomize` and `helm
template` write them: objects of kinds that have no pods (Services, ConfigMaps, custom
resources) are listed as skipped (`read_manifests`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml
from google.protobuf.message import Message

from criproxy.api.runtime.v1 import api_pb2
from criproxy.cri.context import CREATE_CONTAINER, RUN_POD_SANDBOX
from criproxy.cri.quantity import QuantityError, parse_quantity
from criproxy.errors import ConfigError, CriProxyError
from criproxy.interceptors.resources import hugepage_size
from criproxy.pipeline import Pipeline

#: Workload kinds and where their pod template sits.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"), "StatefulSet": ("spec", "template"), "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"), "Job": ("spec", "template"), "ReplicationController": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}
KUBELET_SECCOMP_ROOT = "/var/lib/kubelet/seccomp"
CFS_PERIOD_US = 100_000


@dataclass
class Pod:
    """One pod template of the manifest."""

    source: str  # e.g. 'Deployment shop/web'
    namespace: str
    name: str
    metadata: Mapping[str, Any]
    spec: Mapping[str, Any]


@dataclass
class Skipped:
    """An object of the manifest with no pods to explain (a Service, a ConfigMap, a CRD, ...)."""

    source: str  # e.g. 'Service shop/web'
    where: str  # e.g. 'app.yaml (document 2)'
    kind: str


@dataclass
class Manifest:
    """What a manifest (or several) holds: the pods to explain, and the objects skipped."""

    pods: list[Pod] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def read_documents(documents: list[Any], where: str, namespace: str) -> Manifest:
    """The pods of a multi-document stream, as `kubectl kustomize` or `helm template` write it: objects of
    kinds without pods are skipped (listed), empty documents ignored, anything else not an object is an error."""
    out = Manifest()
    for i, doc in enumerate(documents):
        for item in (doc.get("items") or [] if isinstance(doc, dict) and doc.get("kind") == "List" else [doc]):
            if item is None:
                continue
            here = f"{where} (document {i + 1})"
            if isinstance(item, dict) and item.get("kind") not in (None, "Pod", *TEMPLATES):
                meta: dict[str, Any] = item["metadata"] if isinstance(item.get("metadata"), dict) else {}
                name = "/".join(str(n) for n in (meta.get("namespace"), meta.get("name", "?")) if n)
                out.skipped.append(Skipped(f"{item['kind']} {name}", here, str(item["kind"])))
                continue
            out.pods.append(_pod_of(item, here, namespace))
    return out


def no_pods_error(where: str, manifest: Manifest) -> ConfigError:
    skipped = "; skipped: " + ", ".join(s.source for s in manifest.skipped) if manifest.skipped else ""
    return ConfigError(f"{where}: no Pod or workload ({', '.join(TEMPLATES)}) found{skipped}")


def pods_of(documents: list[Any], where: str, namespace: str) -> list[Pod]:
    """The pods of these documents; an error when there is none."""
    manifest = read_documents(documents, where, namespace)
    if not manifest.pods:
        raise no_pods_error(where, manifest)
    return manifest.pods


def _pod_of(item: Any, where: str, namespace: str) -> Pod:
    if not isinstance(item, dict) or "kind" not in item:
        raise ConfigError(f"{where}: not a Kubernetes object (no kind)")
    kind, meta = item["kind"], item.get("metadata") or {}
    ns = meta.get("namespace") or namespace
    if kind == "Pod":
        template: Any = item
    elif kind in TEMPLATES:
        template = item
        for step in TEMPLATES[kind]:
            template = template.get(step) if isinstance(template, dict) else None
        if not isinstance(template, dict):
            raise ConfigError(f"{where}: {kind} {meta.get('name', '?')} has no {'.'.join(TEMPLATES[kind])}")
    else:
        raise ConfigError(f"{where}: kind {kind!r} has no pods; expected Pod or one of {', '.join(TEMPLATES)}")
    tmeta = template.get("metadata") or {}
    name = tmeta.get("name") or meta.get("name") or "unnamed"
    spec = template.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("containers"), list):
        raise ConfigError(f"{where}: {kind} {name} has no spec.containers")
    return Pod(f"{kind} {ns}/{meta.get('name', name)}", ns, name, tmeta, spec)


def _strings(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in (value or {}).items()}


def _seccomp(profile: Any) -> api_pb2.SecurityProfile:
    """The SecurityProfile a kubelet sends for a seccompProfile (none: Unconfined, the Kubernetes default)."""
    kind = (profile or {}).get("type", "Unconfined")
    if kind == "RuntimeDefault":
        return api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.RuntimeDefault)
    if kind == "Localhost":
        ref = f"{KUBELET_SECCOMP_ROOT}/{(profile or {}).get('localhostProfile', '')}"
        return api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.Localhost, localhost_ref=ref)
    return api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.Unconfined)


def _quantity(value: Any, where: str) -> Fraction:
    try:
        return parse_quantity(str(value))
    except QuantityError as err:
        raise ConfigError(f"{where}: {err}") from None


def container_resources(container: Mapping[str, Any], qos: str, where: str) -> api_pb2.LinuxContainerResources:
    """LinuxContainerResources as a kubelet computes them (cgroup v1, no swap). Approximation: a
    Burstable container's oom_score_adj depends on the node's memory, unknown here; 999 is used."""
    resources = container.get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    out = api_pb2.LinuxContainerResources(cpu_period=CFS_PERIOD_US, oom_score_adj={"Guaranteed": -997,
                                                                                     "BestEffort": 1000}.get(qos, 999))
    cpu_request = requests.get("cpu", limits.get("cpu"))
    out.cpu_shares = max(2, int(_quantity(cpu_request, where) * 1024)) if cpu_request is not None else 2
    if "cpu" in limits:
        out.cpu_quota = max(1000, int(_quantity(limits["cpu"], where) * CFS_PERIOD_US))
    if "memory" in limits:
        out.memory_limit_in_bytes = out.memory_swap_limit_in_bytes = int(_quantity(limits["memory"], where))
    for name, value in limits.items():
        page = hugepage_size(str(name).lower())
        if page is not None:
            out.hugepage_limits.add(page_size=page[0], limit=int(_quantity(value, where)))
    return out


def qos_class(containers: list[Mapping[str, Any]]) -> str:
    limits_all, any_set = True, False
    for c in containers:
        r = c.get("resources") or {}
        limits, requests = r.get("limits") or {}, r.get("requests") or {}
        any_set = any_set or bool(limits or requests)
        for res in ("cpu", "memory"):
            if res not in limits or str(requests.get(res, limits[res])) != str(limits[res]):
                limits_all = False
    if not any_set:
        return "BestEffort"
    return "Guaranteed" if limits_all else "Burstable"


def pod_requests(pod: Pod) -> Iterator[tuple[str, str | None, Message]]:
    """(method, container name, request) in the order a kubelet sends them."""
    security = pod.spec.get("securityContext") or {}
    sandbox = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=pod.name, namespace=pod.namespace, uid=f"explain-{pod.name}"),
        labels=_strings(pod.metadata.get("labels")), annotations=_strings(pod.metadata.get("annotations")))
    sandbox.linux.security_context.seccomp.CopyFrom(_seccomp(security.get("seccompProfile")))
    yield RUN_POD_SANDBOX, None, api_pb2.RunPodSandboxRequest(
        config=sandbox, runtime_handler=str(pod.spec.get("runtimeClassName") or ""))
    containers = [*(pod.spec.get("initContainers") or []), *pod.spec["containers"]]
    qos = qos_class(list(pod.spec["containers"]))
    for container in containers:
        name = str(container.get("name", ""))
        where = f"{pod.source} container {name}"
        config = api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name=name),
                                         image=api_pb2.ImageSpec(image=str(container.get("image", ""))),
                                         command=[str(c) for c in container.get("command") or []],
                                         args=[str(a) for a in container.get("args") or []])
        config.linux.resources.CopyFrom(container_resources(container, qos, where))
        profile = (container.get("securityContext") or {}).get("seccompProfile") or security.get("seccompProfile")
        config.linux.security_context.seccomp.CopyFrom(_seccomp(profile))
        yield CREATE_CONTAINER, name, api_pb2.CreateContainerRequest(pod_sandbox_id=f"explain-{pod.name}",
                                                                     config=config, sandbox_config=sandbox)


@dataclass
class Explained:
    method: str
    container: str | None
    result: str  # allowed | denied | error
    status: str = "OK"
    message: str = ""
    changes: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)


async def explain_pod(pod: Pod, pipeline: Pipeline) -> list[Explained]:
    """Each call the kubelet would make for `pod`, decided and applied by the pipeline's own code."""
    out = []
    for method, container, request in pod_requests(pod):
        ctx = await pipeline.context(method, request)
        assert ctx is not None, "RunPodSandbox and CreateContainer always have a context"
        try:
            outcome = await pipeline.decide(ctx)
        except CriProxyError as err:
            out.append(Explained(method, container, "error", err.code.name, err.message))
            continue
        decisions = [{"action": d.action, "rule": d.rule, "mode": d.mode, "interceptor": d.interceptor,
                      "setting": d.setting, "key": d.key, "value": d.value, "reason": d.reason}
                     for d in outcome.decisions]
        if outcome.denial is not None:
            out.append(Explained(method, container, "denied", outcome.denial.code.name, outcome.denial.reason,
                                 decisions=decisions))
            continue
        applied, _ = pipeline.apply(outcome, request)
        changes = [{"field": c.path, "from": before, "to": c.value, "by": c.by, "key": c.key or "(config)"}
                   for c, before in applied]
        out.append(Explained(method, container, "allowed", changes=changes, decisions=decisions))
    return out


def parse_manifest(text: str, where: str, namespace: str) -> Manifest:
    """The pods and skipped objects of one manifest file's text (any number of YAML documents)."""
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None
    return read_documents(documents, where, namespace)


def read_manifests(paths: list[Path], namespace: str) -> Manifest:
    """The pods and skipped objects of every file; an error when a file cannot be read or none has a pod."""
    out = Manifest()
    for path in paths:
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"{path}: cannot read it: {err.strerror}") from None
        manifest = parse_manifest(text, str(path), namespace)
        out.pods += manifest.pods
        out.skipped += manifest.skipped
    if not out.pods:
        raise no_pods_error(", ".join(str(p) for p in paths), out)
    return out


def shown(value: Any) -> str:
    """A field's value for people: a SecurityProfile as its type (and profile), anything else as Python writes it."""
    if isinstance(value, Mapping) and "profile_type" in value:
        ref = value.get("localhost_ref")
        return str(value["profile_type"]) + (f" {ref}" if ref else "")
    return repr(value)


def render_text(results: list[tuple[Pod, list[Explained]]], policy: str, skipped: list[Skipped] | None = None) -> str:
    lines = [f"policy: {policy}"]
    for pod, calls in results:
        lines.append(f"\n{pod.source} (pod {pod.namespace}/{pod.name})")
        for call in calls:
            what = "pod sandbox" if call.container is None else f"container {call.container}"
            lines.append(f"  {what} [{call.method.split('/')[1]}]: {call.result.upper()}"
                         + (f" {call.status}: {call.message}" if call.result != "allowed" else ""))
            lines += [f"    set {c['field']}: {shown(c['from'])} -> {shown(c['to'])} (by {c['by']}, from {c['key']})"
                      for c in call.changes]
            lines += [f"    {d['action']}: {d['setting'] or 'call'}{' ' + d['key'] if d['key'] else ''}"
                      f" (rule {d['rule'] or '-'}, {d['mode'] or '-'}): {d['reason']}"
                      for d in call.decisions if d["action"] != "applied"]
            if not call.changes and call.result == "allowed":
                lines.append("    unchanged")
    if skipped:
        lines.append("\nskipped (no pods): " + ", ".join(s.source for s in skipped))
    return "\n".join(lines) + "\n"


def render_json(results: list[tuple[Pod, list[Explained]]], policy: str, skipped: list[Skipped] | None = None) -> str:
    return json.dumps({"policy": policy, "pods": [
        {"source": pod.source, "namespace": pod.namespace, "name": pod.name,
         "calls": [call.__dict__ for call in calls]} for pod, calls in results],
        "skipped": [s.__dict__ for s in skipped or []]}, indent=2, default=str) + "\n"
