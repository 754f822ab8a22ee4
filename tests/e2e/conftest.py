"""Fixtures for end-to-end tests against a real containerd started by the suite."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.containerd import Containerd, containerd_available, remove_all_pods
from tests.support.cri import CriClient
from tests.support.proxyproc import ProxyProcess

REQUIRE_ENV = "CRIPROXY_REQUIRE_CONTAINERD"


def require_containerd(what: str) -> None:
    """Skip the test when containerd cannot run here, or fail it under CRIPROXY_REQUIRE_CONTAINERD=1
    (as in CI), naming `what` could not run and why."""
    reason = containerd_available()
    if reason is not None:
        message = f"cannot run {what}: {reason}"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{message} ({REQUIRE_ENV}=1)", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """A started containerd with the pause and busybox test images imported.

    Skipped when something it needs is missing, unless CRIPROXY_REQUIRE_CONTAINERD=1
    (as in CI), where a missing dependency is a failure.
    """
    require_containerd("a real containerd")
    # A short base name keeps the socket paths well inside the unix socket limit.
    with Containerd(tmp_path_factory.mktemp("ctrd")) as daemon:
        yield daemon


@pytest.fixture(scope="session")
def proxy(containerd: Containerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """`criproxy serve` in front of the test containerd, as a real process."""
    workdir = tmp_path_factory.mktemp("proxy")
    with ProxyProcess(workdir / "criproxy.sock", "--runtime-endpoint", containerd.endpoint,
                      log=workdir / "criproxy.log") as running:
        yield running
    assert running.proc is not None and running.proc.returncode == 0, (
        f"criproxy did not stop cleanly; see {workdir / 'criproxy.log'}")


@pytest.fixture(params=["direct", "proxy"])
def cri(request: pytest.FixtureRequest, containerd: Containerd) -> Iterator[CriClient]:
    """A CRI v1 client, straight to the test containerd or through criproxy: every test runs both ways,
    so the proxy must be indistinguishable from the runtime. Removes any pods left at teardown."""
    endpoint = containerd.endpoint if request.param == "direct" else request.getfixturevalue("proxy").endpoint
    with CriClient(endpoint) as client:
        yield client
        problems = remove_all_pods(client)
        assert not problems, "cleaning up pods failed:\n" + "\n".join(problems)
