"""The interceptors a config file chooses and configures; every bad value names the file, section and key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from criproxy.config import ServeConfig, build_config
from criproxy.cri.annotations import Lookup, annotation_key_problem
from criproxy.errors import ConfigError
from criproxy.interceptors.resources import ResourcesConfig
from criproxy.interceptors.runtime_handler import RuntimeHandlerConfig
from criproxy.interceptors.seccomp import SeccompConfig
from criproxy.server import build_pipeline

REPO = Path(__file__).resolve().parent.parent
HANDLER_NAME = "expected a runtime handler name (a DNS label: lower-case letters, digits and '-', at most 63)"
RESOURCES_SETTINGS = ("cpu-quota, cpu-period, cpu-shares, cpuset-cpus, cpuset-mems, memory-limit, memory-swap, "
                      "oom-score-adj, hugepages-<size>, unified.<key>, *")


@pytest.fixture
def file(tmp_path: Path) -> Path:
    return tmp_path / "criproxy.yaml"


def load(file: Path, text: str, **flags: object) -> ServeConfig:
    file.write_text(text)
    return build_config(flags, file)


def error(file: Path, text: str, **flags: object) -> str:
    with pytest.raises(ConfigError) as err:
        load(file, text, **flags)
    return str(err.value)


def names(config: ServeConfig) -> list[str]:
    return [i.name for i in config.interceptors]


def served(config: ServeConfig) -> list[Any]:
    """The interceptors `criproxy serve` runs with `config` (the runtime is only called during calls)."""
    pipeline = build_pipeline(config, runtime=None)  # type: ignore[arg-type]
    assert pipeline is not None and pipeline.lookup == Lookup(config.annotation_domain)
    return list(pipeline.interceptors)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ["runtime-handler", "seccomp", "resources"]),
        ("log-level: info\n", ["runtime-handler", "seccomp", "resources"]),
        ("interceptors:\n", ["runtime-handler", "seccomp", "resources"]),
        ("interceptors: [resources, seccomp, runtime-handler]\n", ["resources", "seccomp", "runtime-handler"]),
        ("interceptors: [seccomp]\n", ["seccomp"]),
        ("interceptors: []\n", []),
    ],
    ids=["empty-file", "no-interceptors-key", "interceptors-null", "custom-order", "one", "none"],
)
def test_interceptor_order(file: Path, text: str, expected: list[str]) -> None:
    assert names(load(file, text)) == expected


def test_defaults_without_a_file() -> None:
    config = build_config({}, None)
    assert names(config) == ["runtime-handler", "seccomp", "resources"]
    assert [i.lookup for i in served(config)] == [Lookup()] * 3


def test_sections_configure_their_interceptor(file: Path) -> None:
    config = load(file, (
        "runtime-handler: {default: kata, known: [runc, kata]}\n"
        "seccomp: {profile-root: /opt/seccomp, legacy-annotations: true}\n"
        "resources:\n  allow-loosening: [memory-limit, hugepages-2mi, unified.pids.max, '*']\n"
        "  unified-keys: [memory.high, pids.max]\n"))
    by_name = {i.name: i.settings for i in config.interceptors}
    assert by_name == {
        "runtime-handler": RuntimeHandlerConfig(default="kata", known=frozenset({"runc", "kata"})),
        "seccomp": SeccompConfig(profile_root=Path("/opt/seccomp"), legacy_annotations=True),
        "resources": ResourcesConfig(allow_loosening=frozenset({"memory-limit", "hugepages-2mi", "unified.pids.max",
                                                                "*"}),
                                     unified_keys=frozenset({"memory.high", "pids.max"})),
    }


def test_empty_sections_take_the_defaults(file: Path) -> None:
    config = load(file, "runtime-handler:\nseccomp: {}\nresources:\n")
    assert [i.settings for i in config.interceptors] == [
        RuntimeHandlerConfig(), SeccompConfig(), ResourcesConfig()]
    assert SeccompConfig().profile_root == Path("/var/lib/kubelet/seccomp")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("interceptors: [seccomp, apparmor, cgroups]\n",
         "interceptors: unknown interceptor(s) 'apparmor', 'cgroups'; known: runtime-handler, seccomp, resources"),
        ("interceptors: [Seccomp]\n",
         "interceptors: unknown interceptor(s) 'Seccomp'; known: runtime-handler, seccomp, resources"),
        ("interceptors: [seccomp, resources, seccomp, resources]\n",
         "interceptors: resources, seccomp listed more than once"),
        ("interceptors: seccomp\n", "interceptors: expected a list of interceptor names, got 'seccomp'"),
        ("interceptors: [seccomp, 1]\n", "interceptors: expected a list of interceptor names, got ['seccomp', 1]"),
        ("seccomp: true\n", "seccomp: expected a mapping, got bool"),
        ("resources: [memory-limit]\n", "resources: expected a mapping, got list"),
        ("seccomp: {profile-root: seccomp}\n", "seccomp.profile-root: 'seccomp' must be an absolute path"),
        ("seccomp: {profile-root: 7}\n", "seccomp.profile-root: expected a string, got 7"),
        ("seccomp: {legacy-annotations: 'yes please'}\n",
         "seccomp.legacy-annotations: expected true or false, got 'yes please'"),
        ("interceptors: [resources]\nseccomp: {profile-root: relative/dir}\n",
         "seccomp.profile-root: 'relative/dir' must be an absolute path"),
        ("resources: {allow-loosening: [memory]}\n",
         f"resources.allow-loosening: 'memory' is not a resources setting; known: {RESOURCES_SETTINGS}"),
        ("resources: {allow-loosening: [hugepages-2Mi]}\n",
         f"resources.allow-loosening: 'hugepages-2Mi' is not a resources setting; known: {RESOURCES_SETTINGS}"),
        ("resources: {allow-loosening: memory-limit}\n",
         "resources.allow-loosening: expected a list of strings, got 'memory-limit'"),
        ("resources: {unified-keys: [Memory.High]}\n",
         "resources.unified-keys: 'Memory.High' is not a cgroup v2 file name usable in an annotation key "
         "(lower-case letters, digits, '-' and '.', e.g. memory.high)"),
        ("resources: {unified-keys: [memory]}\n",
         "resources.unified-keys: 'memory' is not a cgroup v2 file name usable in an annotation key "
         "(lower-case letters, digits, '-' and '.', e.g. memory.high)"),
        ("resources: {unified-keys: [memory.numa_stat]}\n",
         "resources.unified-keys: 'memory.numa_stat' is not a cgroup v2 file name usable in an annotation key "
         "(lower-case letters, digits, '-' and '.', e.g. memory.high)"),
        ("runtime-handler: {default: Kata}\n", f"runtime-handler.default: 'Kata': {HANDLER_NAME}"),
        ("runtime-handler: {known: [runc, kata_v2]}\n", f"runtime-handler.known: 'kata_v2': {HANDLER_NAME}"),
        ("runtime-handler: {known: runc}\n", "runtime-handler.known: expected a list of strings, got 'runc'"),
    ],
    ids=["unknown-names", "names-are-case-sensitive", "duplicates-sorted", "interceptors-not-a-list",
         "interceptors-non-string", "section-not-mapping", "section-is-list", "profile-root-relative",
         "profile-root-not-string", "legacy-not-bool", "disabled-section-still-checked", "allow-loosening-unknown",
         "allow-loosening-upper-case-hugepages", "allow-loosening-not-a-list", "unified-key-upper-case",
         "unified-key-no-dot", "unified-key-underscore", "default-handler-invalid", "known-handler-invalid",
         "known-not-a-list"],
)
def test_bad_interceptor_config(file: Path, text: str, message: str) -> None:
    assert error(file, text) == f"config file {file}: {message}"


@pytest.mark.parametrize(
    ("text", "known"),
    [
        ("seccomp: {profile_root: /x}\n", ("profile-root", "legacy-annotations")),
        ("resources: {allow_loosening: [memory-limit]}\n", ("allow-loosening", "unified-keys")),
        ("runtime-handler: {defaults: kata}\n", ("default", "known", "override-runtime-class")),
    ],
    ids=["seccomp", "resources", "runtime-handler"],
)
def test_unknown_key_in_a_section_names_file_and_section(file: Path, text: str, known: tuple[str, ...]) -> None:
    section, _, rest = text.partition(": {")
    key = rest.partition(":")[0]
    assert error(file, text) == f"config file {file}: {section}: unknown key(s) {key}; known keys: {', '.join(known)}"


_PROBE = """
import sys
from criproxy.interceptors import BUILTIN
for name in BUILTIN:
    try:
        BUILTIN[name].parse({"x": 1}, name)
    except Exception as err:
        print(err)
"""


def test_unknown_key_message_is_the_same_in_every_process() -> None:
    outputs = set()
    for seed in range(8):
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        run = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                             check=True, timeout=60)
        outputs.add(run.stdout)
    assert len(outputs) == 1, outputs


def test_default_handler_with_trailing_newline_is_refused(file: Path) -> None:
    assert error(file, 'runtime-handler: {default: "kata\\n"}\n') == (
        f"config file {file}: runtime-handler.default: 'kata\\n': {HANDLER_NAME}")


@pytest.mark.parametrize(
    ("flags", "text", "message"),
    [
        ({"annotation-domain": "Bad_Domain"}, "",
         "--annotation-domain: 'Bad_Domain' is not a DNS domain such as criproxy.io or example.com"),
        ({"annotation-domain": "localhost"}, "",
         "--annotation-domain: 'localhost' is not a DNS domain such as criproxy.io or example.com"),
        ({"annotation-domain": "example.com/x"}, "",
         "--annotation-domain: 'example.com/x' is not a DNS domain such as criproxy.io or example.com"),
        ({"annotation-domain": "   "}, "", "--annotation-domain: expected a non-empty string, got '   '"),
        ({}, "annotation-domain: Example.COM\n",
         "config file {file}: annotation-domain: 'Example.COM' is not a DNS domain such as criproxy.io or example.com"),
        ({}, "annotation-domain: 42\n", "config file {file}: annotation-domain: expected a non-empty string, got 42"),
        ({"container-cache-size": "50"}, "",
         "--container-cache-size: expected a whole number from 100 to 10000000, got '50'"),
        ({"container-cache-size": "lots"}, "",
         "--container-cache-size: expected a whole number from 100 to 10000000, got 'lots'"),
        ({}, "container-cache-size: 10000001\n",
         "config file {file}: container-cache-size: expected a whole number from 100 to 10000000, got 10000001"),
        ({}, "container-cache-size: -200\n",
         "config file {file}: container-cache-size: expected a whole number from 100 to 10000000, got -200"),
        ({}, "container-cache-size: true\n",
         "config file {file}: container-cache-size: expected a whole number from 100 to 10000000, got True"),
    ],
    ids=["domain-underscore-upper", "domain-without-dot", "domain-with-slash", "domain-blank", "domain-in-file",
         "domain-not-string", "cache-too-small", "cache-not-a-number", "cache-too-big", "cache-negative",
         "cache-bool"],
)
def test_bad_domain_and_cache_size(file: Path, flags: dict[str, object], text: str, message: str) -> None:
    assert error(file, text, **flags) == message.format(file=file)


@pytest.mark.parametrize(
    ("flags", "text", "domain", "cache"),
    [
        ({}, "annotation-domain: example.com\ncontainer-cache-size: 100\n", "example.com", 100),
        ({"annotation-domain": "corp.example", "container-cache-size": "10000000"},
         "annotation-domain: example.com\ncontainer-cache-size: 100\n", "corp.example", 10_000_000),
        ({"annotation-domain": " criproxy.example.org "}, "", "criproxy.example.org", 65_536),
    ],
    ids=["from-file", "flags-win", "flag-stripped"],
)
def test_domain_reaches_every_interceptor(file: Path, flags: dict[str, object], text: str, domain: str,
                                          cache: int) -> None:
    config = load(file, text, **flags)
    assert (config.annotation_domain, config.container_cache_size) == (domain, cache)
    assert [i.lookup for i in served(config)] == [Lookup(domain)] * 3


def test_domain_too_long_for_the_documented_keys_is_refused() -> None:
    domain = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 59])  # 251 characters
    assert annotation_key_problem(f"runtime-handler.{domain}/pod") == "the prefix is longer than 253 characters"
    with pytest.raises(ConfigError) as err:
        build_config({"annotation-domain": domain}, None)
    assert str(err.value).startswith("--annotation-domain: ")
