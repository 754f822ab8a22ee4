"""Fixtures for the systemd tests: a Debian node booted with systemd-nspawn (a real systemd as its
PID 1), the host's containerd as its runtime, and criproxy installed there by deploy/host/install.sh.

The node is booted once per test session from a root file system cached in
tests.systemd.support.provision.CACHE (/var/cache/criproxy-tests; built with debootstrap when
missing). What it sees of the host, by bind mounts:

  host                                  inside the node
  the test containerd's socket          /run/containerd/containerd.sock   (pods run on the host)
  SOCKDIR (a short /tmp directory)      /run/criproxy                     (the tests call criproxy there)
  deploy/ of this repository            /srv/criproxy/deploy              (read-only: the installer)
  the wheelhouse                        /srv/criproxy/dist                (read-only: --wheels)
  OUTDIR                                /srv/criproxy/out                 (what the stub kubelet records)

Skipped where systemd-nspawn (or debootstrap, for a missing cache) is not installed, but a failure
in CI (CI=true or CRIPROXY_REQUIRE_CONTAINERD=1), as tests/support/tools.py does for promtool.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.containerd import Containerd, containerd_available, remove_all_pods
from tests.support.cri import CriClient
from tests.support.tools import required_in_ci
from tests.systemd.support import provision
from tests.systemd.support.machine import Bind, Machine, MachineError, systemd_tools_missing

SUPPORT = Path(__file__).resolve().parent / "support"
DEPLOY = provision.REPO / "deploy"
INSTALLER = "/srv/criproxy/deploy/host/install.sh"
WHEELS = "/srv/criproxy/dist"
OUT = "/srv/criproxy/out"
RUNTIME_SOCKET = "/run/containerd/containerd.sock"
PROXY_SOCKET = "/run/criproxy/criproxy.sock"
KUBELET_CONFIG = f"""apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# The node's runtime, before criproxy.
containerRuntimeEndpoint: unix://{RUNTIME_SOCKET}
cgroupDriver: systemd
"""
# Paths of the node's file system that change by themselves (journal, systemd's state, bind-mount
# points, temporary files): left out of the before/after comparison of uninstall.
VOLATILE = ("proc", "sys", "dev", "run", "tmp", "var/tmp", "var/log/journal", "var/lib/systemd", "srv/criproxy",
            "var/cache", "var/lib/dbus", "etc/machine-id", "var/log/wtmp", "var/log/btmp", "var/log/lastlog")


def unavailable(reason: str) -> None:
    if required_in_ci():
        pytest.fail(f"the systemd tests cannot run: {reason} (required in CI)", pytrace=False)
    pytest.skip(f"the systemd tests cannot run: {reason}")


@pytest.fixture(scope="session")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """The host's containerd (the test one: tests/support/containerd.py), which the node's criproxy uses."""
    reason = containerd_available() or systemd_tools_missing()
    if reason is None and not provision.rootfs_tarball().is_file() and shutil.which("debootstrap") is None:
        reason = (f"no cached root file system ({provision.rootfs_tarball()}) and no debootstrap to build it "
                  "(Debian package debootstrap; .ci/install-system-deps installs it)")
    if reason is not None:
        unavailable(reason)
    with Containerd(tmp_path_factory.mktemp("ctrd")) as daemon:
        yield daemon


@dataclass
class Node:
    """The booted node, and where its bind-mounted directories are on the host."""

    machine: Machine
    sockdir: Path
    outdir: Path
    runtime: Containerd
    pristine: dict[str, str]

    @property
    def endpoint(self) -> str:
        """criproxy's socket as the host reaches it."""
        return f"unix://{self.sockdir / 'criproxy.sock'}"

    def install(self, command: str, *args: str, check: bool = True) -> str:
        """The installer, as an operator runs it on the node (from the repository's deploy/, offline wheels)."""
        result = self.machine.run(INSTALLER, command, "--wheels", WHEELS, *args, check=False, timeout=300)
        if check and result.returncode != 0:
            raise MachineError(f"install.sh {command} {' '.join(args)} failed with {result.returncode}:\n"
                               f"{result.stdout}{result.stderr}\n{self.journal_tail()}")
        return result.stdout + result.stderr

    def installed(self) -> bool:
        return self.machine.path("/var/lib/criproxy/manifest").is_file()

    def ensure_serving(self) -> None:
        """criproxy installed and active (the tests may run alone, or after uninstall)."""
        if not self.installed() or self.machine.systemctl("is-active", "criproxy.service", check=False
                                                          ).stdout.strip() != "active":
            self.install("install")

    def main_pid(self) -> int:
        return int(self.machine.show("criproxy.service", "MainPID")["MainPID"])

    def kubelet_records(self) -> list[dict[str, Any]]:
        path = self.outdir / "kubelet.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def journal_tail(self, lines: int = 40) -> str:
        return "journalctl -u criproxy:\n" + self.machine.journal("-u", "criproxy.service", "-n", str(lines))

    def tree(self) -> dict[str, str]:
        return tree(self.machine.root)


def tree(root: Path) -> dict[str, str]:
    """Every path of the node's file system (but the VOLATILE ones) with its type, mode and content."""
    found: dict[str, str] = {}
    skip = tuple(f"{part}/" for part in VOLATILE)

    def walk(directory: Path) -> None:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            path = Path(entry.path)
            relative = str(path.relative_to(root))
            if relative in VOLATILE or relative.startswith(skip) or "/__pycache__" in f"/{relative}":
                continue
            mode = f"{path.lstat().st_mode:o}"
            if entry.is_symlink():
                found[relative] = f"link {os.readlink(path)}"
            elif entry.is_dir():
                found[relative] = f"dir {mode}"
                walk(path)
            elif entry.is_file():
                found[relative] = f"file {mode} {hashlib.sha256(path.read_bytes()).hexdigest()}"
            else:
                found[relative] = f"special {mode}"

    walk(root)
    return found


def prepare_node(root: Path) -> None:
    """What the node has before criproxy: a kubelet (the stand-in) on the runtime, enabled."""
    units = root / "etc/systemd/system"
    shutil.copy(SUPPORT / "kubelet.service", units / "kubelet.service")
    (units / "multi-user.target.wants/kubelet.service").symlink_to("/etc/systemd/system/kubelet.service")
    libexec = root / "usr/local/libexec"
    libexec.mkdir(parents=True, exist_ok=True)
    shutil.copy(SUPPORT / "stub-kubelet.py", libexec / "stub-kubelet")
    (root / "var/lib/kubelet").mkdir(parents=True, exist_ok=True)
    (root / "var/lib/kubelet/config.yaml").write_text(KUBELET_CONFIG)
    # The mount points of the bind mounts, so that the tree compared before and after is the same.
    for inside in ("srv/criproxy/deploy", "srv/criproxy/dist", "srv/criproxy/out", "run/criproxy"):
        (root / inside).mkdir(parents=True, exist_ok=True)


@pytest.fixture(scope="session")
def node(runtime: Containerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """The booted node, criproxy not installed yet (`pristine` is its file system at that point)."""
    try:
        tarball = provision.build_rootfs()
        wheels = provision.wheelhouse(tmp_path_factory.mktemp("wheelhouse"))
    except provision.ProvisionError as error:
        pytest.fail(str(error), pytrace=False)
    base = Path(tempfile.mkdtemp(prefix="criproxy-systemd-", dir="/var/tmp"))
    sockdir = Path(tempfile.mkdtemp(prefix="cps-", dir="/tmp"))  # unix socket paths are short
    outdir = base / "out"
    outdir.mkdir()
    root = base / "root"
    machine = Machine(root, f"criproxy-test-{os.getpid()}", [
        Bind(runtime.socket_path, RUNTIME_SOCKET),
        Bind(sockdir, "/run/criproxy"),
        Bind(DEPLOY, "/srv/criproxy/deploy", read_only=True),
        Bind(wheels, WHEELS, read_only=True),
        Bind(outdir, OUT),
    ], log=base / "console.log")
    problems: list[str] = []
    try:
        provision.extract_rootfs(tarball, root)
        prepare_node(root)
        machine.boot()
        yield Node(machine=machine, sockdir=sockdir, outdir=outdir, runtime=runtime, pristine=tree(root))
    finally:
        try:
            machine.poweroff()
        except MachineError as error:
            problems.append(str(error))
        problems += machine.remove()
        if not problems:
            shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(sockdir, ignore_errors=True)
    assert not problems, "tearing the node down did not go cleanly:\n" + "\n".join(problems)


@pytest.fixture
def serving(node: Node) -> Iterator[Node]:
    """The node with criproxy installed and active; pods left on the runtime are removed afterwards."""
    node.ensure_serving()
    yield node
    with CriClient(node.runtime.endpoint) as direct:
        problems = remove_all_pods(direct)
    assert not problems, "cleaning up pods failed:\n" + "\n".join(problems)
