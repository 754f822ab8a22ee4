"""deploy/: Kubernetes manifests, systemd units, host scripts, image, monitoring, all checked offline.

Manifests are validated against the Kubernetes OpenAPI schemas that kubernetes-validate ships
(strict: an unknown field is an error); units with systemd-analyze where it exists; alert rules
and the dashboard against the series criproxy really exports; the host scripts by running them
on temporary roots (the full install with a real virtualenv and containerd is
tests/e2e/test_install_containerd.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from prometheus_client import CollectorRegistry

import criproxy
from criproxy._native import DataPlane
from criproxy.config import build_config
from criproxy.metrics import prometheus as metrics_module
from criproxy.metrics.prometheus import PrometheusMetrics
from criproxy.policies.model import check_policy
from criproxy.transport.plane import METHOD_TABLE
from tests.support.tools import tool

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
MONITORING = DEPLOY / "monitoring"
HOST = DEPLOY / "host"
INSTALL_SH = HOST / "install.sh"
POLICY_SYNC = HOST / "policy-sync.sh"
TAKEOVER = HOST / "criproxy-takeover"
#: The oldest Kubernetes these manifests claim (containerRuntimeEndpoint in the kubelet's config file
#: is 1.27+) and a recent one; kubernetes-validate ships the schemas, so this runs offline.
K8S_VERSIONS = ("1.29.0", "1.33.0")
#: Series that are not criproxy's but that the rules and the dashboard may use.
FOREIGN_SERIES = {"up"}
#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job", "node"}


# ----------------------------------------------------------------------------------------- helpers

def yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kubernetes_objects() -> list[tuple[Path, dict[str, Any]]]:
    """Every object under deploy/kubernetes (the base and uninstall/), kustomizations excluded."""
    objects = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml_documents(path):
            if doc.get("kind") != "Kustomization":
                objects.append((path, doc))
    return objects


def daemonset(name: str = "criproxy-installer") -> dict[str, Any]:
    for _, doc in kubernetes_objects():
        if doc["kind"] == "DaemonSet" and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no DaemonSet {name}")


def exported_series() -> dict[str, set[str]]:
    """Sample names criproxy exports (histograms as their _bucket/_sum/_count series) -> label names.

    Names come from a real PrometheusMetrics on a fresh registry; labels from the documented table
    in criproxy/metrics/prometheus.py, which must list exactly the same series."""
    registry = CollectorRegistry()
    # The per-call series come from the data plane's counters (a real one, never started).
    plane = DataPlane(runtime_endpoint="unix:///run/none.sock", image_endpoint="unix:///run/none.sock",
                      methods=METHOD_TABLE, max_message_bytes=4 << 20, max_concurrent_calls=1,
                      connection_age_seconds=10)
    PrometheusMetrics(registry).count_calls(plane.snapshot)
    families = {family.name: family.type for family in registry.collect()}
    documented: dict[str, tuple[str, set[str]]] = {}
    for match in re.finditer(r"^\| (criproxy_\w+) \| (\w+) \|([\w, ]*)\|", metrics_module.__doc__ or "", re.M):
        labels = {label.strip() for label in match.group(3).split(",") if label.strip()}
        documented[match.group(1)] = (match.group(2), labels)
    samples: dict[str, set[str]] = {}
    for name, kind in families.items():
        sample = f"{name}_total" if kind == "counter" else name
        assert sample in documented, f"{sample} is exported but not in the table of criproxy/metrics/prometheus.py"
        assert documented[sample][0] == kind, f"{sample}: documented as {documented[sample][0]}, exported as {kind}"
        labels = documented[sample][1]
        if kind == "histogram":
            samples[f"{name}_bucket"] = labels | {"le"}
            samples[f"{name}_sum"] = labels
            samples[f"{name}_count"] = labels
        else:
            samples[sample] = labels
    assert len(documented) == len(families), "the documented table lists series that are not exported"
    return samples


PROMQL_FUNCTIONS_AND_KEYWORDS = {
    "sum", "min", "max", "avg", "count", "rate", "increase", "irate", "histogram_quantile", "time", "by",
    "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool",
    "label_values", "topk", "bottomk", "abs", "clamp_min", "clamp_max", "delta", "deriv", "vector", "scalar",
}


def _name_problems(stripped: str, series: dict[str, set[str]]) -> list[str]:
    problems = []
    for name in re.findall(r"(?<![\w$])([a-zA-Z_:][\w:]*)\s*(?=\{|\)|\s|$|\[|,)", stripped):
        if name in PROMQL_FUNCTIONS_AND_KEYWORDS or name in FOREIGN_SERIES:
            continue
        grouping = rf"(by|on|without|ignoring)\s*\([^)]*\b{name}\b"
        if name.startswith("criproxy_") and name not in series:
            problems.append(f"{name}: criproxy exports no such series")
        elif not name.startswith("criproxy_") and not re.search(grouping, stripped):
            problems.append(f"{name}: not a criproxy series")
    return problems


def _label_problems(expr: str, series: dict[str, set[str]]) -> list[str]:
    problems = []
    for name, matchers in re.findall(r"(criproxy_\w+)\{([^}]*)\}", expr):
        for label in re.findall(r"(\w+)\s*[=!~]", matchers):
            if name in series and label not in series[name] | TARGET_LABELS:
                problems.append(f"{name}{{{label}=...}}: no such label (has {sorted(series[name])})")
    used = {name for name in re.findall(r"criproxy_\w+", expr) if name in series}
    known = set().union(*(series[name] for name in used)) | TARGET_LABELS
    for group in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expr):
        for label in (part.strip() for part in group.split(",")):
            if label and label not in known:
                problems.append(f"by/on ({label}): none of {sorted(used)} has that label")
    return problems


def promql_problems(expr: str, series: dict[str, set[str]]) -> list[str]:
    """Series and labels in `expr` that criproxy does not export (a light PromQL reading, enough for
    the shapes used here: selectors, `by (...)`, `on (...)`, Grafana's label_values())."""
    problems = []
    for name, label in re.findall(r"label_values\((\w+),\s*(\w+)\)", expr):
        if name in series and label not in series[name] | TARGET_LABELS:
            problems.append(f"label_values({name}, {label}): no such label")
    expr = re.sub(r"label_values\((\w+),\s*\w+\)", r"\1", expr)
    stripped = re.sub(r'"[^"]*"', '""', expr)  # label values and strings
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)  # range selectors
    return [*_name_problems(stripped, series), *_label_problems(expr, series)]


def run(args: list[str | os.PathLike[str]], *, env: dict[str, str] | None = None,
        timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], check=False, capture_output=True, text=True, timeout=timeout,
                            env=None if env is None else {**os.environ, **env})
    if check:
        assert result.returncode == 0, f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def criproxy_command(directory: Path) -> Path:
    """An executable that runs this repository's criproxy (scripts take one command, not `python -m`)."""
    wrapper = directory / "criproxy"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m criproxy "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


# ----------------------------------------------------------------------------------------- Kubernetes

@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", sorted(K8S.rglob("*.yaml")), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates_against_the_kubernetes_schemas(path: Path, version: str) -> None:
    docs = [doc for doc in yaml_documents(path) if doc.get("kind") != "Kustomization"]
    if path.name == "kustomization.yaml":
        assert not docs
        return
    assert docs, f"{path} holds no Kubernetes object"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']} at {where}: {error.message}")


def test_kustomization_lists_exactly_the_manifests_of_the_base() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    files = {p.name for p in K8S.iterdir() if p.is_file() and p.suffix == ".yaml" and p.name != "kustomization.yaml"}
    assert set(listed) == files
    for name in listed:
        assert yaml_documents(K8S / name), f"{name} loads as no object"


def test_kustomize_build_renders_every_resource() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it carries kustomize)")
    result = run([kubectl, "kustomize", K8S], timeout=60)
    if result.returncode != 0 and "unknown command" in result.stderr:
        pytest.skip(f"this kubectl has no kustomize: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    rendered = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(result.stdout) if d}
    expected = {(d["kind"], d["metadata"]["name"]) for p, d in kubernetes_objects() if p.parent == K8S}
    assert rendered == expected


def test_objects_live_in_the_criproxy_namespace() -> None:
    for path, doc in kubernetes_objects():
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == "criproxy-system"
            assert doc["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
        else:
            assert doc["metadata"].get("namespace") == "criproxy-system", f"{path.name}: {doc['kind']}"


def test_no_rbac_and_no_token() -> None:
    kinds = {doc["kind"] for _, doc in kubernetes_objects()}
    assert not kinds & {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}, "the installer needs no API access"
    accounts = [doc for _, doc in kubernetes_objects() if doc["kind"] == "ServiceAccount"]
    assert [a["metadata"]["name"] for a in accounts] == ["criproxy-installer"]
    assert accounts[0]["automountServiceAccountToken"] is False


def all_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


@pytest.mark.parametrize("name", ["criproxy-installer", "criproxy-uninstall"])
def test_daemonset_runs_everywhere_first_and_last(name: str) -> None:
    ds = daemonset(name)
    pod = ds["spec"]["template"]["spec"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert not pod.get("hostPID"), "no nsenter design: the host is reached through its file system"
    assert pod["serviceAccountName"] == "criproxy-installer"
    assert pod["automountServiceAccountToken"] is False
    images = {c["image"] for c in all_containers(pod)}
    assert len(images) == 1
    assert next(iter(images)).endswith(f":{criproxy.__version__}"), "the image tag follows criproxy's version"
    volumes = {v["name"] for v in pod["volumes"]}
    for container in all_containers(pod):
        requests = container["resources"]["requests"]
        assert {"cpu", "memory"} <= requests.keys(), container["name"]
        assert "memory" in container["resources"]["limits"], container["name"]
        assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes


def test_installer_privileges_are_where_they_are_needed() -> None:
    pod = daemonset()["spec"]["template"]["spec"]
    (install,) = pod["initContainers"]
    (sync,) = pod["containers"]
    assert install["securityContext"]["privileged"] is True
    assert {m["mountPath"] for m in install["volumeMounts"]} == {"/host", "/etc/criproxy-config"}
    host = next(v for v in pod["volumes"] if v["name"] == "host")
    assert host["hostPath"]["path"] == "/"
    # policy-sync: uid 0 (criproxy only trusts root-owned policy files) and nothing else.
    context = sync["securityContext"]
    assert "privileged" not in context
    assert context["capabilities"]["drop"] == ["ALL"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    host_mounts = {m["mountPath"]: m.get("readOnly", False) for m in sync["volumeMounts"]
                   if m["name"].startswith("host")}
    # /etc/criproxy to write the policy; the node's criproxy logs (the recording) only to be read.
    assert host_mounts == {"/host/etc/criproxy": False, "/host/var/log/criproxy": True}
    logs = next(v for v in pod["volumes"] if v["name"] == "host-var-log-criproxy")
    assert logs["hostPath"]["path"] == "/var/log/criproxy"
    assert sync["readinessProbe"]["exec"]["command"] == ["criproxy-policy-sync", "--ready"]
    assert "install --root /host" in install["args"][0]
    assert "configure-kubelet --root /host" in install["args"][0]
    config_volume = next(v for v in pod["volumes"] if v["name"] == "config")
    assert config_volume["configMap"]["name"] == "criproxy-config"


def test_configmap_is_the_shipped_configuration() -> None:
    (configmap,) = [d for _, d in kubernetes_objects() if d["kind"] == "ConfigMap"]
    assert configmap["metadata"]["name"] == "criproxy-config"
    for name in ("criproxy.yaml", "policies.yaml"):
        assert configmap["data"][name] == (DEPLOY / "etc/criproxy" / name).read_text(), (
            f"deploy/kubernetes/configmap.yaml's {name} differs from deploy/etc/criproxy/{name}")
    assert check_policy(configmap["data"]["policies.yaml"].encode(), "policies.yaml") == []


def test_shipped_config_file_is_what_the_unit_and_the_probes_expect() -> None:
    config = build_config({}, DEPLOY / "etc/criproxy/criproxy.yaml")
    assert config.listen.url == "unix:///run/criproxy/criproxy.sock"
    assert config.runtime_endpoint is not None
    assert config.runtime_endpoint.path == "/run/containerd/containerd.sock"
    assert config.policies == Path("/etc/criproxy/policies.yaml")
    assert config.metrics_address == ("127.0.0.1", 9808)
    assert config.decision_log is not None and config.decision_log.parent == Path("/var/log/criproxy")
    assert config.record is not None and config.record.parent == Path("/var/log/criproxy")  # the unit's LogsDirectory
    assert config.record_max_bytes == 20 << 20
    probe = daemonset()["spec"]["template"]["spec"]["containers"][0]
    assert probe["ports"][0]["containerPort"] == config.metrics_address[1]
    env = dict(line.split("=", 1) for line in (DEPLOY / "etc/criproxy/criproxy.env").read_text().splitlines()
               if line and not line.startswith("#"))
    assert env["CRIPROXY_CONFIG"] == "/etc/criproxy/criproxy.yaml"
    assert set(env) == {"CRIPROXY_CONFIG", "CRIPROXY_ARGS"}


# ----------------------------------------------------------------------------------------- systemd

def unit_settings(path: Path) -> dict[str, list[str]]:
    """`Section.Key` -> every value, in order (systemd allows keys to repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


def test_unit_is_a_hardened_notify_service_before_the_kubelet() -> None:
    unit = unit_settings(DEPLOY / "systemd/criproxy.service")
    one = {key: values[-1] for key, values in unit.items()}
    assert one["Service.Type"] == "notify"
    assert one["Service.NotifyAccess"] == "all"
    assert one["Service.Restart"] == "always"
    assert one["Unit.StartLimitIntervalSec"] == "0"
    assert "kubelet.service" in one["Unit.Before"].split()
    assert "Requires" not in " ".join(unit), "the proxy must start without the runtime; it reconnects"
    assert one["Service.EnvironmentFile"] == "-/etc/criproxy/criproxy.env"
    assert one["Service.ExecStart"].split()[:2] == ["/opt/criproxy/current/bin/criproxy", "serve"]
    assert one["Service.ExecReload"] == "/opt/criproxy/current/libexec/criproxy-takeover"
    assert one["Install.WantedBy"] == "multi-user.target"
    # The sandbox leaves writable exactly what criproxy writes: the socket's and the log's directories.
    config = build_config({}, DEPLOY / "etc/criproxy/criproxy.yaml")
    assert one["Service.ProtectSystem"] == "strict"
    assert Path(config.listen.path).parent == Path("/run") / one["Service.RuntimeDirectory"]
    assert config.decision_log is not None
    assert config.decision_log.parent == Path("/var/log") / one["Service.LogsDirectory"]
    assert one["Service.RuntimeDirectoryPreserve"] == "yes"
    assert one["Service.NoNewPrivileges"] == "yes"
    assert set(one["Service.CapabilityBoundingSet"].split()) == {"CAP_CHOWN", "CAP_DAC_READ_SEARCH"}
    assert "AF_UNIX" in one["Service.RestrictAddressFamilies"].split()


def test_kubelet_dropin_only_orders_and_wants() -> None:
    dropin = unit_settings(DEPLOY / "systemd/kubelet-criproxy.conf")
    assert dropin == {"Unit.Wants": ["criproxy.service"], "Unit.After": ["criproxy.service"]}


@pytest.fixture
def verifiable_units(tmp_path: Path) -> Path:
    """The unit and drop-in as systemd-analyze sees them, with the installed executables stubbed
    (verify insists that ExecStart= names an executable file), beside a stand-in kubelet.service."""
    stub = tmp_path / "stub"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    units = tmp_path / "units"
    (units / "kubelet.service.d").mkdir(parents=True)
    unit = (DEPLOY / "systemd/criproxy.service").read_text()
    unit = unit.replace("/opt/criproxy/current/bin/criproxy", str(stub))
    unit = unit.replace("/opt/criproxy/current/libexec/criproxy-takeover", str(stub))
    (units / "criproxy.service").write_text(unit)
    shutil.copy(DEPLOY / "systemd/kubelet-criproxy.conf", units / "kubelet.service.d/20-criproxy.conf")
    (units / "kubelet.service").write_text(f"[Unit]\nDescription=kubelet\n[Service]\nExecStart={stub}\n")
    return units


def test_units_pass_systemd_analyze_verify(verifiable_units: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    result = run([analyze, "verify", verifiable_units / "criproxy.service", verifiable_units / "kubelet.service"],
                 env={"SYSTEMD_LOG_COLOR": "0"})
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), (
        f"systemd-analyze verify: {result.returncode}\n{result.stdout}{result.stderr}")


def test_unit_exposure_is_low(verifiable_units: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    result = run([analyze, "security", "--offline=yes", "--no-pager", verifiable_units / "criproxy.service"])
    match = re.search(r"Overall exposure level for criproxy\.service: ([\d.]+)", result.stdout)
    if match is None:
        pytest.skip(f"this systemd-analyze cannot assess units offline: {result.stderr.strip()[:200]}")
    assert float(match.group(1)) <= 3.0, result.stdout


# ----------------------------------------------------------------------------------------- monitoring

EXPECTED_ALERTS = {"CriproxyDown", "CriproxyRuntimeUnreachable", "CriproxyProxyLatencyHigh",
                   "CriproxyDenialsSpike", "CriproxyPolicyReloadFailing"}


def alert_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load((MONITORING / "criproxy.rules.yaml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def test_alert_rules_are_the_expected_alerts() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} == EXPECTED_ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    by_name = {r["alert"]: r for r in rules}
    assert by_name["CriproxyRuntimeUnreachable"]["expr"].strip() == "criproxy_runtime_up == 0"
    assert by_name["CriproxyRuntimeUnreachable"]["for"] == "1m"
    assert by_name["CriproxyDown"]["expr"].startswith("up{")
    assert "histogram_quantile" in by_name["CriproxyProxyLatencyHigh"]["expr"]
    assert "criproxy_proxy_duration_seconds_bucket" in by_name["CriproxyProxyLatencyHigh"]["expr"]
    assert 'action="denied"' in by_name["CriproxyDenialsSpike"]["expr"]
    reload_expr = by_name["CriproxyPolicyReloadFailing"]["expr"]
    assert 'criproxy_policy_reloads_total{result="error"}' in reload_expr
    assert "criproxy_policy_last_reload_success_timestamp_seconds" in reload_expr


def test_alert_rules_use_only_exported_series() -> None:
    series = exported_series()
    problems = {r["alert"]: promql_problems(r["expr"], series) for r in alert_rules()}
    assert not {k: v for k, v in problems.items() if v}


def test_prometheusrule_holds_the_same_rules() -> None:
    (rule,) = yaml_documents(MONITORING / "prometheusrule.yaml")
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((MONITORING / "criproxy.rules.yaml").read_text())


def test_podmonitor_scrapes_the_installer_pods_as_job_criproxy() -> None:
    (monitor,) = yaml_documents(MONITORING / "podmonitor.yaml")
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    labels = daemonset()["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert labels[monitor["spec"]["jobLabel"]] == "criproxy"
    ports = {p["name"] for c in daemonset()["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((MONITORING / "criproxy-dashboard.json").read_text())
    queries = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [(v["name"], v["definition"]) for v in dashboard["templating"]["list"] if "definition" in v]
    return queries


def test_dashboard_is_grafana_json_over_exported_series() -> None:
    dashboard = json.loads((MONITORING / "criproxy-dashboard.json").read_text())
    assert dashboard["uid"] == "criproxy" and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    series = exported_series()
    problems = {title: promql_problems(expr, series) for title, expr in dashboard_queries()}
    assert not {k: v for k, v in problems.items() if v}
    used = " ".join(expr for _, expr in dashboard_queries())
    for name in ("criproxy_calls_total", "criproxy_call_duration_seconds_bucket",
                 "criproxy_proxy_duration_seconds_bucket", "criproxy_calls_in_flight", "criproxy_streams_active",
                 "criproxy_decisions_total", "criproxy_policy_reloads_total", "criproxy_policy_info",
                 "criproxy_runtime_up"):
        assert name in used, f"the dashboard shows nothing of {name}"


def test_promql_parses_with_promtool(tmp_path: Path) -> None:
    promtool = tool("promtool", "prometheus")
    run([promtool, "check", "rules", MONITORING / "criproxy.rules.yaml"], check=True)
    records = [{"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "5m")
                .replace("$instance", ".*")} for i, (_, expr) in enumerate(dashboard_queries())
               if not expr.startswith("label_values")]
    (tmp_path / "dashboard.rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": records}]}))
    run([promtool, "check", "rules", tmp_path / "dashboard.rules.yaml"], check=True)


def test_every_alert_fires_and_stays_quiet_in_promtool_unit_tests() -> None:
    promtool = tool("promtool", "prometheus")
    tests = yaml.safe_load((MONITORING / "criproxy.rules.test.yaml").read_text())
    assert tests["rule_files"] == ["criproxy.rules.yaml"]
    evaluations = [e for case in tests["tests"] for e in case["alert_rule_test"]]
    for alert in EXPECTED_ALERTS:
        mine = [e for e in evaluations if e["alertname"] == alert]
        assert any(e["exp_alerts"] for e in mine), f"no unit test shows {alert} firing"
        assert any(not e["exp_alerts"] for e in mine), f"no unit test shows {alert} quiet"
    done = run([promtool, "test", "rules", MONITORING / "criproxy.rules.test.yaml"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


# ----------------------------------------------------------------------------------------- image

def test_containerfile_is_pinned_and_ships_what_the_manifests_run() -> None:
    text = (DEPLOY / "image/Containerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base is not None
    assert re.fullmatch(r"(docker\.io/library/)?python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base.group(1))
    assert "latest" not in text
    assert re.search(r"^USER 65532:65532$", text, re.M), "the image's default user is not root"
    for source in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert (REPO / source).exists(), f"COPY {source}: no such path in the repository"
    assert "--no-index" in text
    # The commands the DaemonSets run exist in the image.
    for command in ("criproxy-install", "criproxy-policy-sync"):
        assert f"/usr/local/bin/{command}" in text


def test_constraints_pin_every_runtime_dependency_within_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (DEPLOY / "image/constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            pins[requirement.name.lower().replace("_", "-")] = spec.version
    for dependency in project["dependencies"]:
        requirement = Requirement(dependency)
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in deploy/image/constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {dependency}"
    assert "pip" in pins


# ----------------------------------------------------------------------------------------- scripts

@pytest.mark.parametrize("script", [INSTALL_SH, POLICY_SYNC, TAKEOVER], ids=lambda p: p.name)
def test_shell_script_parses(script: Path) -> None:
    first = script.read_text().splitlines()[0]
    shell = "bash" if "bash" in first else "sh"
    assert os.access(script, os.X_OK), f"{script} is not executable"
    run([shell, "-n", script], check=True)
    if shell == "sh" and shutil.which("dash"):
        run(["dash", "-n", script], check=True)  # POSIX, not bash
    if shutil.which("shellcheck"):
        run(["shellcheck", "-x", script], check=True)


def test_readme_explains_every_deploy_file() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.name != "README.md":
            relative = str(path.relative_to(DEPLOY))
            assert relative in readme, f"deploy/README.md does not mention {relative}"


# ----------------------------------------------------------------------------------------- policy-sync

@pytest.fixture
def sync_env(tmp_path: Path) -> dict[str, Any]:
    root = tmp_path / "host"
    (root / "etc/criproxy").mkdir(parents=True)
    source = tmp_path / "configmap" / "policies.yaml"
    source.parent.mkdir()
    source.write_bytes((DEPLOY / "etc/criproxy/policies.yaml").read_bytes())
    command = [POLICY_SYNC, "--root", root, "--source", source, "--status-dir", tmp_path / "status"]
    return {"root": root, "source": source, "command": command,
            "env": {"CRIPROXY_BIN": str(criproxy_command(tmp_path))}}


def test_policy_sync_installs_a_valid_policy_atomically(sync_env: dict[str, Any]) -> None:
    node_file = sync_env["root"] / "etc/criproxy/policies.yaml"
    first = run([*sync_env["command"], "--once"], env=sync_env["env"], check=True)
    assert "installed policies.yaml" in first.stderr
    assert node_file.read_bytes() == sync_env["source"].read_bytes()
    assert stat.S_IMODE(node_file.stat().st_mode) == 0o644
    assert sorted(p.name for p in node_file.parent.iterdir()) == ["policies.yaml"], "no temporary file left"
    inode = node_file.stat().st_ino
    again = run([*sync_env["command"], "--once"], env=sync_env["env"], check=True)
    assert again.stderr == "" and node_file.stat().st_ino == inode, "an unchanged policy is not rewritten"
    run([*sync_env["command"], "--ready", "--readyz-url", ""], env=sync_env["env"], check=True)


def test_policy_sync_refuses_an_invalid_policy_loudly(sync_env: dict[str, Any]) -> None:
    node_file = sync_env["root"] / "etc/criproxy/policies.yaml"
    run([*sync_env["command"], "--once"], env=sync_env["env"], check=True)
    good = node_file.read_bytes()
    sync_env["source"].write_text("apiVersion: criproxy.io/v1alpha1\nkind: AnnotationPolicy\nmode: strict\n")
    refused = run([*sync_env["command"], "--once"], env=sync_env["env"])
    assert refused.returncode == 1
    assert "ERROR: REFUSING policies.yaml" in refused.stderr
    assert f"{sync_env['source']}:3: mode: expected one of enforce, audit, dry-run" in refused.stderr
    assert node_file.read_bytes() == good, "the node keeps the policy it had"
    ready = run([*sync_env["command"], "--ready", "--readyz-url", ""], env=sync_env["env"])
    assert ready.returncode == 1 and "refused" in ready.stdout
    sync_env["source"].write_bytes(good)
    run([*sync_env["command"], "--once"], env=sync_env["env"], check=True)
    run([*sync_env["command"], "--ready", "--readyz-url", ""], env=sync_env["env"], check=True)


def test_policy_sync_loop_follows_changes_and_stops_on_sigterm(sync_env: dict[str, Any]) -> None:
    node_file = sync_env["root"] / "etc/criproxy/policies.yaml"
    loop = subprocess.Popen([str(a) for a in [*sync_env["command"], "--interval", "0.2"]],
                            env={**os.environ, **sync_env["env"]}, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(node_file.exists, "the first sync")
        changed = sync_env["source"].read_text().replace("mode: enforce", "mode: audit")
        sync_env["source"].write_text(changed)
        wait_until(lambda: node_file.read_text() == changed, "the changed policy on the node")
    finally:
        loop.send_signal(signal.SIGTERM)
        assert loop.wait(10) == 0


def wait_until(condition: Any, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ----------------------------------------------------------------------------------------- takeover helper

FAKE_CRIPROXY = """#!/bin/sh
# Stands in for criproxy: --version answers; serve records its pid and arguments, then serves
# (sleeps) until SIGTERM, or exits at once with $FAKE_EXIT.
case "$1" in --version) echo "criproxy 9.9.9"; exit 0 ;; esac
echo "$$ $*" > "$FAKE_RECORD"
[ -z "${FAKE_EXIT:-}" ] || exit "$FAKE_EXIT"
trap 'exit 0' TERM
while :; do sleep 0.05; done
"""


@pytest.fixture
def fake_takeover(tmp_path: Path) -> Iterator[dict[str, Any]]:
    fake = tmp_path / "bin" / "criproxy"
    fake.parent.mkdir()
    fake.write_text(FAKE_CRIPROXY)
    fake.chmod(0o755)
    old = subprocess.Popen(["sleep", "60"])
    reaper = threading.Thread(target=old.wait, daemon=True)  # systemd reaps its main process too
    reaper.start()
    record = tmp_path / "record"
    env = {"CRIPROXY_BIN": str(fake), "CRIPROXY_CONFIG": "/etc/criproxy/test.yaml",
           "CRIPROXY_ARGS": "--log-level debug", "FAKE_RECORD": str(record), "MAINPID": str(old.pid),
           "CRIPROXY_TAKEOVER_TIMEOUT": "20"}
    env.pop("NOTIFY_SOCKET", None)
    state = {"old": old, "record": record, "env": env}
    yield state
    old.kill()
    if record.exists():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(record.read_text().split()[0]), signal.SIGTERM)


def run_takeover(env: dict[str, str], log: Path) -> tuple[int, str]:
    """The helper with its output in a file, as systemd gives it the journal: the new process inherits
    that stream and outlives the helper, so a pipe would never reach end-of-file."""
    with log.open("w") as out:
        status = subprocess.run([str(TAKEOVER)], check=False, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                timeout=30, env={**os.environ, **env}).returncode
    return status, log.read_text()


def test_takeover_helper_waits_for_the_old_process_to_hand_over(fake_takeover: dict[str, Any],
                                                                 tmp_path: Path) -> None:
    old = fake_takeover["old"]
    threading.Timer(1.0, old.terminate).start()  # the old proxy drains and exits after the takeover
    started = time.monotonic()
    status, log = run_takeover(fake_takeover["env"], tmp_path / "takeover.log")
    assert status == 0, log
    assert time.monotonic() - started >= 0.9, "it returned before the old process had exited"
    pid, *args = fake_takeover["record"].read_text().split()
    assert args == ["serve", "--config", "/etc/criproxy/test.yaml", "--log-level", "debug", "--takeover"]
    os.kill(int(pid), 0)  # the new process outlives the helper
    assert f"pid {old.pid} has handed over and exited; pid {pid} serves" in log


def test_takeover_helper_fails_when_the_new_process_dies_first(fake_takeover: dict[str, Any],
                                                               tmp_path: Path) -> None:
    status, log = run_takeover({**fake_takeover["env"], "FAKE_EXIT": "2"}, tmp_path / "takeover.log")
    assert status == 1
    assert "exited with status 2 before the hand-over" in log
    assert fake_takeover["old"].poll() is None, "the old process keeps serving"


def test_takeover_helper_needs_a_process_to_take_over(fake_takeover: dict[str, Any], tmp_path: Path) -> None:
    status, log = run_takeover({**fake_takeover["env"], "MAINPID": ""}, tmp_path / "takeover.log")
    assert status == 1 and "MAINPID is unset" in log
    assert not fake_takeover["record"].exists(), "nothing was started"


# ----------------------------------------------------------------------------------------- kubelet switch

KUBELET_CONFIG = """apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: systemd
containerRuntimeEndpoint: "unix:///run/containerd/containerd.sock"
# keep this comment
clusterDNS:
  - 10.96.0.10
"""
KUBEADM_FLAGS = ('KUBELET_KUBEADM_ARGS="--container-runtime-endpoint=unix:///var/run/containerd/containerd.sock '
                 '--pod-infra-container-image=registry.k8s.io/pause:3.9"\n')
PROXY = "unix:///run/criproxy/criproxy.sock"


@pytest.fixture
def kubelet_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "var/lib/kubelet").mkdir(parents=True)
    (root / "var/lib/kubelet/config.yaml").write_text(KUBELET_CONFIG)
    (root / "var/lib/kubelet/kubeadm-flags.env").write_text(KUBEADM_FLAGS)
    (root / "etc/criproxy").mkdir(parents=True)
    shutil.copy(DEPLOY / "etc/criproxy/criproxy.yaml", root / "etc/criproxy/criproxy.yaml")
    (root / "opt/criproxy/current").mkdir(parents=True)  # "installed"; no proxy runs, hence --force below
    return root


def installer(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run(["bash", INSTALL_SH, *args, "--root", root, "--python", sys.executable, "--no-chroot",
                "--no-systemd"], timeout=60)


def test_configure_and_restore_kubelet_round_trip(kubelet_root: Path) -> None:
    config = kubelet_root / "var/lib/kubelet/config.yaml"
    flags = kubelet_root / "var/lib/kubelet/kubeadm-flags.env"
    configured = installer(kubelet_root, "configure-kubelet", "--force")
    assert configured.returncode == 0, configured.stderr
    doc = yaml.safe_load(config.read_text())
    assert doc["containerRuntimeEndpoint"] == PROXY and doc["imageServiceEndpoint"] == PROXY
    assert doc["clusterDNS"] == ["10.96.0.10"] and "# keep this comment" in config.read_text()
    assert f"--container-runtime-endpoint={PROXY} " in flags.read_text(), "a flag wins over the file"
    assert "restart the kubelet yourself" in configured.stderr
    again = installer(kubelet_root, "configure-kubelet", "--force")
    assert again.returncode == 0 and "already uses" in again.stderr
    restored = installer(kubelet_root, "restore-kubelet")
    assert restored.returncode == 0, restored.stderr
    assert config.read_text() == KUBELET_CONFIG, "an untouched file comes back byte for byte"
    assert flags.read_text() == KUBEADM_FLAGS
    assert not (kubelet_root / "var/lib/criproxy/kubelet.state").exists()


def test_restore_keeps_changes_made_after_configure(kubelet_root: Path) -> None:
    config = kubelet_root / "var/lib/kubelet/config.yaml"
    assert installer(kubelet_root, "configure-kubelet", "--force").returncode == 0
    config.write_text(config.read_text() + "maxPods: 250\n")  # e.g. a kubeadm upgrade rewrote the file
    restored = installer(kubelet_root, "restore-kubelet")
    assert restored.returncode == 0, restored.stderr
    doc = yaml.safe_load(config.read_text())
    assert doc["containerRuntimeEndpoint"] == "unix:///run/containerd/containerd.sock"
    assert "imageServiceEndpoint" not in doc
    assert doc["maxPods"] == 250


def test_configure_refuses_to_switch_the_runtime(kubelet_root: Path) -> None:
    criproxy_yaml = kubelet_root / "etc/criproxy/criproxy.yaml"
    criproxy_yaml.write_text(criproxy_yaml.read_text().replace("/run/containerd/containerd.sock",
                                                               "/run/crio/crio.sock"))
    refused = installer(kubelet_root, "configure-kubelet")
    assert refused.returncode == 1
    assert "switching would change the runtime" in refused.stderr
    assert (kubelet_root / "var/lib/kubelet/config.yaml").read_text() == KUBELET_CONFIG


def test_configure_refuses_when_the_proxy_does_not_answer(kubelet_root: Path) -> None:
    # The "installed" criproxy here is an empty directory: nothing can answer Version.
    refused = installer(kubelet_root, "configure-kubelet")
    assert refused.returncode == 1
    assert "does not answer" in refused.stderr and "the kubelet was not changed" in refused.stderr
    assert (kubelet_root / "var/lib/kubelet/config.yaml").read_text() == KUBELET_CONFIG


def test_restore_without_a_record_points_the_kubelet_at_the_runtime(kubelet_root: Path) -> None:
    config = kubelet_root / "var/lib/kubelet/config.yaml"
    config.write_text(KUBELET_CONFIG.replace('"unix:///run/containerd/containerd.sock"', PROXY))
    restored = installer(kubelet_root, "restore-kubelet")
    assert restored.returncode == 0, restored.stderr
    assert yaml.safe_load(config.read_text())["containerRuntimeEndpoint"] == "unix:///run/containerd/containerd.sock"
