"""The README and docs/ against the code they describe: flags and config keys with their defaults,
interceptor and policy keys, metric series, the annotation table, the examples' output, the tests
the docs name, and every link. (The README's `criproxy demo` output: tests/e2e/test_demo.py.)"""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from criproxy import config
from criproxy.cli import build_parser
from criproxy.cri.annotations import SETTING_FAMILIES, SETTING_KINDS
from criproxy.demo import pods
from criproxy.errors import ConfigError
from criproxy.interceptors import BUILTIN
from criproxy.metrics import prometheus
from criproxy.pipeline.index import DEFAULT_MAX_ENTRIES
from criproxy.policies.model import check_policy

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
#: The pages this suite answers for (docs/record-replay.md has its own).
PAGES = [README, *sorted(p for p in DOCS.glob("*.md") if p.name != "record-replay.md")]
MiB = 1 << 20


def read(page: str) -> str:
    return (ROOT / page).read_text()


def table_rows(text: str, header: str) -> list[list[str]]:
    """The rows of the markdown table whose header line starts with ``header``, as stripped cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


# -- configuration.md ---------------------------------------------------------------------------


def expected_defaults() -> dict[str, str]:
    defaults = {f.name: f.default for f in dataclasses.fields(config.ServeConfig)}
    return {
        "listen": config.DEFAULT_LISTEN,
        "max-message-bytes": f"{config.DEFAULT_MAX_MESSAGE_BYTES // MiB}Mi",
        "socket-mode": f"0{defaults['socket_mode']:o}",
        "shutdown-grace-seconds": f"{defaults['shutdown_grace_seconds']:g}",
        "log-level": str(defaults["log_level"]).lower(),
        "annotation-domain": str(defaults["annotation_domain"]),
        "container-cache-size": str(DEFAULT_MAX_ENTRIES),
        "metrics-address": f"{config.DEFAULT_METRICS_HOST}:{config.DEFAULT_METRICS_PORT}",
        "decision-log-max-bytes": f"{int(defaults['decision_log_max_bytes']) // MiB}Mi",
        "max-concurrent-calls": str(defaults["max_concurrent_calls"]),
        "record-max-bytes": f"{int(defaults['record_max_bytes']) // MiB}Mi",
    }


def test_every_serve_setting_is_in_the_configuration_table_with_its_default() -> None:
    rows = {row[0]: row for row in table_rows(read("docs/configuration.md"), "| flag / config key |")}
    for setting in config.SETTINGS:
        name = f"`{setting.flag}` / `{setting.key}`"
        assert name in rows, f"docs/configuration.md has no row {name}"
    documented = {row[0].split("`")[1].removeprefix("--") for row in rows.values() if row[0].startswith("`--")}
    assert documented == {s.key for s in config.SETTINGS} | {"takeover", "config FILE"}
    for key, default in expected_defaults().items():
        cell = rows[f"`--{key}` / `{key}`"][1]
        assert cell.startswith(f"`{default}`"), f"--{key}: the code's default is {default}, the page says {cell}"


def options(parser: argparse.ArgumentParser) -> list[str]:
    return [opt for action in parser._actions for opt in action.option_strings if opt not in ("-h", "--help")]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", ["demo", "serve", "policy check", "explain", "replay"])
def test_every_flag_of_every_command_is_on_the_configuration_page(command: str) -> None:
    parser = build_parser()
    for word in command.split():
        parser = subcommands(parser)[word]
    page = read("docs/configuration.md")
    synopsis = next(line for line in page.splitlines() if line.startswith(f"criproxy {command} "))
    commands_block = page[page.index("## Commands"):page.index("## `criproxy serve`")]
    for option in options(parser):
        assert re.search(rf"[\[|] ?{re.escape(option)}[ \]|]", commands_block), (
            f"criproxy {command} {option} is not in docs/configuration.md's Commands")
    assert synopsis


@pytest.mark.parametrize("section", BUILTIN)
def test_every_interceptor_key_is_in_the_configuration_page(section: str, tmp_path: Path) -> None:
    file = tmp_path / "config.yaml"
    file.write_text(f"{section}: {{not-a-key: 1}}\n")
    with pytest.raises(ConfigError, match="known keys: ") as caught:
        config.build_config({}, file)
    known = str(caught.value).split("known keys: ")[1].split(", ")
    page = read("docs/configuration.md")
    block = page[page.index("## Interceptor configuration"):page.index("## The socket")]
    body = re.search(rf"^{re.escape(section)}:\n((?:  .*\n)+)", block, re.M)
    assert body is not None, f"docs/configuration.md has no {section}: section"
    listed = re.findall(r"^  ([a-z-]+):", body.group(1), re.M)
    assert listed == known, f"{section}: the code knows {known}, the page lists {listed}"
    assert f"interceptors: [{', '.join(BUILTIN)}]" in block


# -- policies.md ---------------------------------------------------------------------------------


HEAD = "apiVersion: criproxy.io/v1alpha1\nkind: AnnotationPolicy\n"
POLICY_PROBES = {
    "the file": HEAD + "zzz: 1\n",
    "interceptors": HEAD + "interceptors:\n  seccomp: {zzz: 1}\n",
    "a rule": HEAD + "rules:\n  - {name: a, namespaces: [x], zzz: 1}\n",
    "podSelector": HEAD + "rules:\n  - {name: a, namespaces: [x], podSelector: {zzz: 1}}\n",
    "a setting": HEAD + "rules:\n  - {name: a, namespaces: [x], settings: {memory-limit: {zzz: 1}}}\n",
}


@pytest.mark.parametrize("where", POLICY_PROBES)
def test_every_policy_key_is_in_the_policies_page(where: str) -> None:
    [problem] = check_policy(POLICY_PROBES[where].encode(), "p.yaml")
    known = str(problem).split("known keys here: ")[1].split(", ")
    page = read("docs/policies.md")
    example = page[page.index("## The file"):page.index("## Rules match pods")]
    for key in known:
        assert re.search(rf"\b{re.escape(key)}:", example), f"{where}: key {key} is not in docs/policies.md's example"
        assert re.search(rf"`[^`\n]*\b{re.escape(key)}\b[^`\n]*`", page), f"`{key}` is not explained"
    # The page's own example is a valid policy.
    block = re.search(r"```yaml\n(.*?)```", example, re.S)
    assert block is not None and check_policy(block.group(1).encode(), "docs/policies.md") == []


# -- metrics.md ----------------------------------------------------------------------------------


def test_the_metrics_page_lists_exactly_the_series_criproxy_exports() -> None:
    """The docstring table of criproxy/metrics/prometheus.py is checked against the exporter by
    tests/test_deploy.py; the page must list the same series, types and labels."""
    code = {m[0]: (m[1], m[2].strip()) for m in re.findall(r"^\| (criproxy_\w+) \| (\w+) \|([\w, ]*)\|",
                                                          prometheus.__doc__ or "", re.M)}
    page = {row[0].strip("`"): (row[1], row[2]) for row in table_rows(read("docs/metrics.md"), "| series |")}
    assert page == code


# -- annotations ---------------------------------------------------------------------------------


def test_the_annotation_table_is_one_table_with_every_setting() -> None:
    readme = table_rows(read("README.md"), "| setting | interceptor |")
    assert readme == table_rows(read("docs/annotations.md"), "| setting | interceptor |")
    names = {row[0].strip("`") for row in readme}
    expected = set(SETTING_KINDS) | {f"{family}{'<size>' if family == 'hugepages-' else '<key>'}"
                                     for family in SETTING_FAMILIES}
    assert names == expected


# -- examples -------------------------------------------------------------------------------------


EXPLAIN = "$ criproxy explain --policies policies.yaml docs/examples/criproxy-demo.yaml"


def code_blocks(text: str) -> list[list[str]]:
    """The lines of every fenced code block."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def prose(text: str) -> str:
    """``text`` without its fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return "\n".join(lines)


def shown_blocks(text: str, command: str) -> list[list[str]]:
    """The output lines of every code block that starts with ``command``."""
    return [block[1:] for block in code_blocks(text) if block and block[0] == command]


def is_shown_in_order(shown: list[str], real: list[str]) -> str | None:
    """None when every shown line (but `...`) is a line of ``real``, in the same order; else the first that is not."""
    position = 0
    for line in shown:
        if line.strip() == "...":
            continue
        try:
            position = real.index(line, position) + 1
        except ValueError:
            return line
    return None


@pytest.mark.parametrize("page", ["README.md", "docs/policies.md"])
def test_the_explain_example_is_what_explain_prints(page: str) -> None:
    blocks = shown_blocks(read(page), EXPLAIN)
    assert blocks, f"{page} has no `{EXPLAIN}` example"
    done = subprocess.run([sys.executable, "-m", "criproxy", *EXPLAIN.split()[2:]], capture_output=True, text=True,
                          timeout=60, check=False, cwd=ROOT)
    assert done.returncode == 1, done.stderr  # the CronJob's pod is denied
    def same(lines: list[str]) -> list[str]:  # the policy's digest changes with every edit of policies.yaml
        return [re.sub(r"@[0-9a-f]{16}\b", "@DIGEST", line) for line in lines]

    for block in blocks:
        missing = is_shown_in_order(same(block), same(done.stdout.splitlines()))
        assert missing is None, f"{page} shows a line explain does not print (in that order):\n{missing}"


def test_the_example_manifest_holds_the_demos_workloads() -> None:
    documents = list(yaml.safe_load_all(read("docs/examples/criproxy-demo.yaml")))
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    assert by_kind[("Deployment", "web")] == pods.WEB
    assert by_kind[("CronJob", "report")] == pods.REPORT
    namespaces = {d["metadata"]["name"] for d in documents if d["kind"] == "Namespace"}
    assert namespaces == {pods.WEB["metadata"]["namespace"], pods.REPORT["metadata"]["namespace"]}


def test_the_quick_start_is_what_ci_runs() -> None:
    rows = table_rows(read("README.md"), "| what | command |")
    assert [row[1] for row in rows] == ["`bash scripts/install`", "`criproxy demo`", "`python3 -m pytest`"]
    ci = read(".ci/run")
    assert "\nbash scripts/install " in ci and "\npython3 -m pytest " in ci
    assert "criproxy demo" in read("README.md").split("## Quick start")[1].split("### In front of")[0]


# -- links and named tests ------------------------------------------------------------------------


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of ``page``."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", prose(page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_leads_somewhere(page: Path) -> None:
    text = prose(page.read_text())
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        assert destination.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor:
            assert anchor in anchors(destination), f"{page.name} links to {target}: no such heading"


def named_tests(text: str) -> list[tuple[str, str]]:
    """(file, test) for every `tests/...py::test_x` and every bare `test_y` after one, in its file."""
    found = []
    for cell in re.findall(r"`(tests/[\w/]+\.py(?:::[\w\[\]\-]+)?|test_\w+(?:\[[\w\-]+\])?)`", text):
        if cell.startswith("tests/"):
            current, _, name = cell.partition("::")
        else:
            name = cell
        if name:
            found.append((current, name.split("[")[0]))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_tests_the_docs_name_exist(page: Path) -> None:
    for file, name in named_tests(page.read_text()):
        source = ROOT / file
        assert source.is_file(), f"{page.name} names {file}, which does not exist"
        assert re.search(rf"^(?:async )?def {name}\(", source.read_text(), re.M), (
            f"{page.name} names {file}::{name}, which is not a test there")
