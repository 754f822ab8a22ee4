"""`criproxy policy check` and `criproxy explain`, run as an operator would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def criproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "criproxy", *args], check=False, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def test_the_repository_policy_checks_clean() -> None:
    done = criproxy("policy", "check", "policies.yaml")
    assert (done.returncode, done.stdout, done.stderr) == (0, "policies.yaml: ok\n", "")


def test_check_lists_every_problem_with_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: criproxy.io/v1alpha1\nkind: AnnotationPolicy\nmode: strict\nrules:\n"
                   "  - name: a\n    namespaces: [x]\n    settings:\n      memory-limt: {}\n"
                   "      cpu-quota: {max: lots}\n")
    good = tmp_path / "good.yaml"
    good.write_text("apiVersion: criproxy.io/v1alpha1\nkind: AnnotationPolicy\n")
    done = criproxy("policy", "check", str(good), str(bad))
    assert done.returncode == 1
    assert done.stdout == f"{good}: ok\n{bad}: invalid, 3 problem(s)\n"
    lines = done.stderr.splitlines()
    assert lines[0] == f"{bad}:3: mode: expected one of enforce, audit, dry-run, got 'strict'"
    assert lines[1].startswith(f"{bad}:8: rules[0].settings.memory-limt: unknown setting; known: runtime-handler,")
    assert lines[2] == (f"{bad}:9: rules[0].settings.cpu-quota.max: 'lots' is not a Kubernetes quantity "
                        "(e.g. 500m, 2, 1.5, 512Mi, 2Gi, 1e3)")


def test_check_of_a_missing_file(tmp_path: Path) -> None:
    done = criproxy("policy", "check", str(tmp_path / "nope.yaml"))
    assert done.returncode == 1
    assert done.stderr == f"{tmp_path / 'nope.yaml'}: cannot read it: No such file or directory\n"


MANIFEST = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: criproxy-demo}
spec:
  template:
    metadata:
      annotations:
        memory-limit.criproxy.io/container.app: 256Mi
    spec:
      containers:
        - name: app
          image: nginx
          resources: {limits: {cpu: "1", memory: 1Gi}}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly}
spec:
  jobTemplate:
    spec:
      template:
        metadata:
          annotations: {seccomp-profile.criproxy.io/pod: unconfined}
        spec:
          containers: [{name: job, image: busybox}]
"""


def test_explain_shows_adjustments_and_denials_with_their_rule(tmp_path: Path) -> None:
    manifest = tmp_path / "app.yaml"
    manifest.write_text(MANIFEST)
    done = criproxy("explain", "--policies", "policies.yaml", "-o", "json", str(manifest))
    assert done.returncode == 1, done.stderr  # the CronJob's pod would be denied
    report = json.loads(done.stdout)
    web, nightly = report["pods"]
    assert (web["source"], web["namespace"]) == ("Deployment criproxy-demo/web", "criproxy-demo")
    sandbox, app = web["calls"]
    assert sandbox["result"] == "allowed" and sandbox["changes"] == []
    assert app["result"] == "allowed"
    assert [(c["field"], c["from"], c["to"], c["by"]) for c in app["changes"]] == [
        ("config.linux.resources.memory_limit_in_bytes", 1 << 30, 256 << 20, "resources"),
        ("config.linux.resources.memory_swap_limit_in_bytes", 1 << 30, 256 << 20, "resources")]
    assert {(d["rule"], d["interceptor"]) for d in app["decisions"]} == {("demo", "resources")}
    assert nightly["source"] == "CronJob default/nightly"
    assert [c["result"] for c in nightly["calls"]] == ["denied", "denied"]
    assert nightly["calls"][0]["status"] == "PERMISSION_DENIED"
    assert "no rule allows criproxy annotations in namespace 'default'" in nightly["calls"][0]["message"]


def test_explain_text_and_namespace_flag(tmp_path: Path) -> None:
    manifest = tmp_path / "pod.yaml"
    manifest.write_text("apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations:\n"
                        "    cpu-quota.criproxy.io/pod: 500m\nspec:\n  containers: [{name: c, image: x, resources: "
                        "{limits: {cpu: '2'}}}]\n")
    done = criproxy("explain", "--policies", "policies.yaml", "-n", "criproxy-demo", str(manifest))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Pod criproxy-demo/p (pod criproxy-demo/p)" in done.stdout
    assert ("    set config.linux.resources.cpu_quota: 200000 -> 50000 (by resources, from "
            "cpu-quota.criproxy.io/pod)") in done.stdout


def test_explain_rejects_what_has_no_pods(tmp_path: Path) -> None:
    manifest = tmp_path / "svc.yaml"
    manifest.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: s}\n")
    done = criproxy("explain", str(manifest))
    assert done.returncode == 2
    assert done.stderr == (f"criproxy: {manifest}: no Pod or workload (Deployment, StatefulSet, DaemonSet, ReplicaSet, "
                           "Job, ReplicationController, CronJob) found; skipped: Service s\n")


#: What `kubectl kustomize` writes (kinds sorted as it sorts them, a List from a generator) and `helm
#: template` appends (`# Source:` comments, an empty document): workloads among objects without pods.
KUSTOMIZED = """\
apiVersion: v1
kind: Namespace
metadata:
  name: criproxy-demo
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: web
  namespace: criproxy-demo
---
apiVersion: v1
data:
  nginx.conf: |
    events {}
kind: ConfigMap
metadata:
  name: web-config-5h2f8k9d7m
  namespace: criproxy-demo
---
apiVersion: v1
kind: Service
metadata:
  labels: {app: web}
  name: web
  namespace: criproxy-demo
spec:
  ports:
  - port: 80
  selector: {app: web}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: criproxy-demo
spec:
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      annotations:
        memory-limit.criproxy.io/container.app: 64Mi
      labels: {app: web}
    spec:
      containers:
      - image: nginx:1.27
        name: app
        resources:
          limits: {cpu: "1", memory: 256Mi}
      serviceAccountName: web
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: web
  namespace: criproxy-demo
spec:
  maxReplicas: 3
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: web}
---
apiVersion: v1
kind: List
items:
- apiVersion: policy/v1
  kind: PodDisruptionBudget
  metadata: {name: web, namespace: criproxy-demo}
  spec:
    minAvailable: 1
- apiVersion: v1
  kind: Pod
  metadata: {name: debug, namespace: criproxy-demo}
  spec:
    containers: [{name: shell, image: busybox}]
---
# Source: web/templates/servicemonitor.yaml
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: web
spec:
  endpoints: [{port: http}]
---
# Source: web/templates/empty.yaml
---
"""


def test_explain_takes_a_kustomize_or_helm_stream_and_lists_what_it_skipped(tmp_path: Path) -> None:
    manifest = tmp_path / "kustomized.yaml"
    manifest.write_text(KUSTOMIZED)
    done = criproxy("explain", "--policies", "policies.yaml", str(manifest))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Deployment criproxy-demo/web (pod criproxy-demo/web)" in done.stdout
    assert ("    set config.linux.resources.memory_limit_in_bytes: 268435456 -> 67108864 (by resources, from "
            "memory-limit.criproxy.io/container.app)") in done.stdout
    assert "Pod criproxy-demo/debug (pod criproxy-demo/debug)" in done.stdout
    assert done.stdout.endswith(
        "\nskipped (no pods): Namespace criproxy-demo, ServiceAccount criproxy-demo/web, ConfigMap "
        "criproxy-demo/web-config-5h2f8k9d7m, Service criproxy-demo/web, HorizontalPodAutoscaler criproxy-demo/web, "
        "PodDisruptionBudget criproxy-demo/web, ServiceMonitor web\n")
    report = json.loads(criproxy("explain", "--policies", "policies.yaml", "-o", "json", str(manifest)).stdout)
    assert [pod["source"] for pod in report["pods"]] == ["Deployment criproxy-demo/web", "Pod criproxy-demo/debug"]
    assert [(s["kind"], s["where"]) for s in report["skipped"]] == [
        ("Namespace", f"{manifest} (document 1)"), ("ServiceAccount", f"{manifest} (document 2)"),
        ("ConfigMap", f"{manifest} (document 3)"), ("Service", f"{manifest} (document 4)"),
        ("HorizontalPodAutoscaler", f"{manifest} (document 6)"), ("PodDisruptionBudget", f"{manifest} (document 7)"),
        ("ServiceMonitor", f"{manifest} (document 8)")]


def test_explain_still_refuses_what_is_not_a_kubernetes_object(tmp_path: Path) -> None:
    manifest = tmp_path / "odd.yaml"
    manifest.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: s}\n---\njust: a mapping\n")
    done = criproxy("explain", str(manifest))
    assert done.returncode == 2
    assert done.stderr == f"criproxy: {manifest} (document 2): not a Kubernetes object (no kind)\n"


def test_explain_over_several_files_needs_a_pod_in_one_of_them(tmp_path: Path) -> None:
    (tmp_path / "svc.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: {name: s}\n")
    (tmp_path / "pod.yaml").write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n"
                                       "  containers: [{name: c, image: x}]\n")
    done = criproxy("explain", str(tmp_path / "svc.yaml"), str(tmp_path / "pod.yaml"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("\nskipped (no pods): Service s\n")


POLICY = "apiVersion: criproxy.io/v1alpha1\nkind: AnnotationPolicy\nrules: []\n"


def test_check_refuses_what_serve_refuses_a_file_writable_by_others(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    policy.chmod(0o666)
    done = criproxy("policy", "check", str(policy))
    assert (done.returncode, done.stdout) == (1, f"{policy}: invalid, 1 problem(s)\n")
    assert done.stderr == (f"{policy}: criproxy serve would refuse it: {policy} is writable by others than its owner "
                           f"(mode 0666); run chmod go-w {policy}\n")


@pytest.mark.parametrize(("uid", "gid", "mode", "refused"), [
    (12345, 0, 0o644, "is owned by uid 12345, not by root or the proxy's user; chown it"),
    (0, 12345, 0o664, "is writable by others than its owner (mode 0664); run chmod go-w"),
    (0, 0, 0o664, None),  # group-writable, but the group is root's: accepted, as by serve
], ids=["another-owner", "group-writable-by-another-group", "group-writable-by-roots-group"])
def test_check_judges_owner_and_group_as_serve_does(tmp_path: Path, uid: int, gid: int, mode: int,
                                                    refused: str | None) -> None:
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    target = tmp_path / "theirs.yaml"
    target.write_text(POLICY)
    os.chown(target, uid, gid)
    target.chmod(mode)
    link = tmp_path / "policies.yaml"  # as a ConfigMap mounts it: what the link points at is judged
    link.symlink_to(target)
    done = criproxy("policy", "check", str(link))
    if refused is None:
        assert (done.returncode, done.stdout, done.stderr) == (0, f"{link}: ok\n", "")
    else:
        assert done.returncode == 1
        assert done.stderr.startswith(f"{link}: criproxy serve would refuse it: {target} {refused}"), done.stderr


def legacy_config(tmp_path: Path, legacy: bool, interceptors: str = "") -> Path:
    config = tmp_path / "criproxy.yaml"
    config.write_text(f"{interceptors}seccomp: {{legacy-annotations: {'true' if legacy else 'false'}}}\n")
    return config


LEGACY_NOTE = (
    "policies.yaml: note: seccomp.legacy-annotations is true in {config}: the legacy seccomp annotations "
    "(seccomp.security.alpha.kubernetes.io/pod, container.seccomp.security.alpha.kubernetes.io/<name>) count as "
    "seccomp-profile annotations, so a pod carrying one is a violation (denied in enforce mode) in namespaces no "
    "rule matches (no rule here matches every namespace) and under the rules that do not list seccomp-profile: "
    "system\n")


def test_check_with_legacy_seccomp_on_notes_which_pods_it_puts_under_the_policy(tmp_path: Path) -> None:
    config = legacy_config(tmp_path, True)
    done = criproxy("policy", "check", "--config", str(config), "policies.yaml")
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == "policies.yaml: ok\n" + LEGACY_NOTE.format(config=config)


@pytest.mark.parametrize(("legacy", "interceptors"), [(False, ""), (True, "interceptors: [resources]\n")],
                         ids=["legacy-off", "seccomp-disabled"])
def test_check_without_legacy_seccomp_has_no_note(tmp_path: Path, legacy: bool, interceptors: str) -> None:
    done = criproxy("policy", "check", "--config", str(legacy_config(tmp_path, legacy, interceptors)), "policies.yaml")
    assert (done.returncode, done.stdout, done.stderr) == (0, "policies.yaml: ok\n", "")


def test_check_with_legacy_seccomp_and_a_rule_for_every_namespace_has_no_note(tmp_path: Path) -> None:
    policy = tmp_path / "all.yaml"
    policy.write_text(POLICY.replace("rules: []", "rules:\n  - name: all\n    namespaces: ['*']\n    settings:\n"
                                     "      seccomp-profile: {values: [runtime/default, docker/default]}\n"))
    done = criproxy("policy", "check", "--config", str(legacy_config(tmp_path, True)), str(policy))
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{policy}: ok\n", "")
