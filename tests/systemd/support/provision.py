"""What the systemd tests boot and install, built on the host and cached between runs.

- A Debian root file system (debootstrap, variant minbase, with systemd as init and python3),
  kept as a tarball in the cache; each test session extracts a fresh copy (about a second).
- The wheelhouse `deploy/host/install.sh install --wheels DIR` installs from inside the
  container, which has no network: criproxy's wheel (built from this repository) and the wheels
  of its dependencies at the versions the installer image ships (deploy/image/constraints.txt),
  for the container's CPython 3.11.

Building needs the network of a Debian mirror (debootstrap) and of PyPI (pip download); that is
the only network these tests use, and only when the cache lacks what they need. The cache is
CACHE (default /var/cache/criproxy-tests; CRIPROXY_TEST_CACHE overrides it). To fill it ahead of
a run: `python3 -m tests.systemd.support.provision`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
CACHE = Path(os.environ.get("CRIPROXY_TEST_CACHE", "/var/cache/criproxy-tests"))
MIRROR_ENV = "CRIPROXY_TEST_DEBIAN_MIRROR"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

# Debian 12: its python3 is 3.11 (criproxy's minimum) and its glibc is the one the wheel is built
# against on a Debian 12 host.
SUITE = "bookworm"
PYTHON_VERSION = "3.11"
# systemd as PID 1, the D-Bus systemd-analyze and logind want, the node's python3, and procps
# (minbase has no /bin/kill, pgrep or ps without it).
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "procps")
ROOTFS_FORMAT = 1  # bump to rebuild every cached root file system

DEBOOTSTRAP_TIMEOUT = 900
PIP_TIMEOUT = 600
WHEEL_TIMEOUT = 900
LOCK_TIMEOUT = 1800


class ProvisionError(RuntimeError):
    """Building the root file system or the wheelhouse failed."""


@contextlib.contextmanager
def locked(path: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """An exclusive lock on `path` (two sessions must not build the same thing at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ProvisionError(f"{path} stayed locked for {timeout:.0f}s") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _run(command: list[str], what: str, timeout: float, log: Path | None = None, **kwargs: object) -> None:
    if log is None:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False,
                                **kwargs)
        output = result.stdout + result.stderr
    else:
        with log.open("w") as out:
            result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                                    check=False, **kwargs)
        output = log.read_text(errors="replace")
    if result.returncode != 0:
        tail = "\n".join(output.splitlines()[-30:])
        raise ProvisionError(f"{what} failed with status {result.returncode}: {' '.join(command)}\n{tail}")


# ----------------------------------------------------------------------------------------- root fs

def debian_mirror() -> str:
    """The Debian archive apt on this host uses (debootstrap needs one), or $CRIPROXY_TEST_DEBIAN_MIRROR."""
    if os.environ.get(MIRROR_ENV):
        return os.environ[MIRROR_ENV]
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for source in sources:
        try:
            text = source.read_text()
        except OSError:
            continue
        # deb822 (URIs: ...) and one-line (deb [opts] URI suite ...) formats.
        found = re.findall(r"^URIs:\s*(\S+)", text, re.M) + re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M)
        for uri in found:
            if uri.rstrip("/").endswith("/debian"):
                return uri.rstrip("/")
    return DEFAULT_MIRROR


def rootfs_key() -> str:
    return digest(str(ROOTFS_FORMAT), SUITE, platform.machine(), *PACKAGES)


def rootfs_tarball() -> Path:
    return CACHE / f"rootfs-{SUITE}-{rootfs_key()}.tar"


def build_rootfs(log: Path | None = None) -> Path:
    """The cached root file system tarball; made with debootstrap when missing (a few minutes)."""
    tarball = rootfs_tarball()
    if tarball.is_file():
        return tarball
    with locked(CACHE / "rootfs.lock"):
        if tarball.is_file():
            return tarball
        CACHE.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix="rootfs-build-", dir=CACHE))
        try:
            root = build / "root"
            _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root),
                  debian_mirror()], "debootstrap", DEBOOTSTRAP_TIMEOUT, log or build / "debootstrap.log")
            # The apt lists and the downloaded packages are of no use without a network.
            shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
            (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
            for cached in (root / "var/cache/apt/archives").glob("*.deb"):
                cached.unlink()
            partial = build / "rootfs.tar"
            _run(["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf", str(partial), "."], "tar",
                 DEBOOTSTRAP_TIMEOUT)
            os.replace(partial, tarball)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return tarball


def extract_rootfs(tarball: Path, root: Path) -> None:
    root.mkdir(mode=0o755, parents=True)
    _run(["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-xpf", str(tarball)], "extracting the root fs",
         300)


# ----------------------------------------------------------------------------------------- wheels

def _dependencies() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"])


def _target_platforms() -> list[str]:
    """Platform tags the container's glibc (2.36) accepts, for pip download --platform: the manylinux
    ones of the dependencies, and plain linux_ARCH, the tag of criproxy's own wheel (pip download
    resolves the dependencies of that wheel, and refuses it unless its tag is among these)."""
    arch = platform.machine()
    return [f"manylinux_2_{minor}_{arch}" for minor in range(17, 37)] + [f"manylinux2014_{arch}", f"linux_{arch}"]


def dependency_wheels(wheel: Path) -> Path:
    """Wheels of the dependencies of criproxy's `wheel` (pinned by the installer image's constraints) and
    of pip, for CPython 3.11 on this architecture; downloaded once from PyPI into the cache. This is
    deploy/README.md's `pip download` (with the target interpreter spelled out)."""
    constraints = (REPO / "deploy/image/constraints.txt").read_text()
    deps = _dependencies()
    directory = CACHE / f"wheels-py{PYTHON_VERSION}-{digest(constraints, *deps, *_target_platforms())}"
    if (directory / ".complete").is_file():
        return directory
    with locked(CACHE / "wheels.lock"):
        if (directory / ".complete").is_file():
            return directory
        shutil.rmtree(directory, ignore_errors=True)
        partial = Path(tempfile.mkdtemp(prefix="wheels-", dir=CACHE))
        try:
            platforms = [arg for tag in _target_platforms() for arg in ("--platform", tag)]
            _run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                  "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp",
                  "--abi", f"cp{PYTHON_VERSION.replace('.', '')}", "--abi", "abi3", "--abi", "none", *platforms,
                  "--constraint", str(REPO / "deploy/image/constraints.txt"), "--dest", str(partial),
                  str(wheel), "pip"],
                 "pip download of criproxy's dependencies", PIP_TIMEOUT, env={**os.environ, "PIP_FIND_LINKS": ""})
            for copied in partial.glob("criproxy-*.whl"):  # the wheel itself: per source, not per dependency set
                copied.unlink()
            (partial / ".complete").write_text("")
            os.replace(partial, directory)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return directory


def _source_files() -> list[Path]:
    files = [REPO / "pyproject.toml", REPO / "README.md"]
    for top in ("criproxy", "native"):
        for path in sorted((REPO / top).rglob("*")):
            relative = path.relative_to(REPO).parts
            if path.is_file() and "target" not in relative and "__pycache__" not in relative \
                    and not path.name.startswith("_native."):
                files.append(path)
    return files


def criproxy_wheel() -> Path:
    """This repository as a wheel (the data plane compiled in), built from a copy of the sources as
    tests/e2e/test_install_containerd.py does, and cached by the digest of those sources."""
    files = _source_files()
    key = digest(*(str(path.relative_to(REPO)) for path in files), *(path.read_bytes() for path in files))
    directory = CACHE / f"criproxy-wheel-{key}"
    found = sorted(directory.glob("criproxy-*.whl"))
    if len(found) == 1:
        return found[0]
    with locked(CACHE / "criproxy-wheel.lock"):
        found = sorted(directory.glob("criproxy-*.whl"))
        if len(found) == 1:
            return found[0]
        for stale in CACHE.glob("criproxy-wheel-*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix="criproxy-wheel-build-", dir=CACHE))
        try:
            source = work / "source"
            for path in files:
                target = source / path.relative_to(REPO)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
            out = work / "out"
            # The work tree's cargo cache makes the data plane's build quick.
            env = {**os.environ, "CARGO_TARGET_DIR": str(REPO / "native" / "target"), "PIP_FIND_LINKS": ""}
            _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                  "--wheel-dir", str(out), str(source)], "building criproxy's wheel", WHEEL_TIMEOUT, env=env)
            built = sorted(out.glob("criproxy-*.whl"))
            if len(built) != 1:
                raise ProvisionError(f"pip wheel made {[p.name for p in built]}, not one criproxy wheel")
            partial = CACHE / f".{directory.name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            shutil.copy2(built[0], partial / built[0].name)
            os.replace(partial, directory)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return directory / built[0].name


def wheelhouse(directory: Path) -> Path:
    """`directory` filled as install.sh's --wheels wants it: one criproxy wheel, its dependencies, pip."""
    directory.mkdir(parents=True, exist_ok=True)
    wheel = criproxy_wheel()
    for path in [wheel, *sorted(dependency_wheels(wheel).glob("*.whl"))]:
        shutil.copy2(path, directory / path.name)
    return directory


def main() -> int:
    started = time.monotonic()
    print(f"root file system: {build_rootfs()}")
    wheel = criproxy_wheel()
    print(f"criproxy wheel: {wheel}")
    print(f"dependency wheels: {dependency_wheels(wheel)}")
    print(f"ready in {time.monotonic() - started:.0f}s (cache {CACHE})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
