"""Programs some tests need (promtool, prometheus): a skip where they are missing, a failure in CI."""

from __future__ import annotations

import os
import shutil

import pytest


def required_in_ci() -> bool:
    """CI (CI=true, or CRIPROXY_REQUIRE_CONTAINERD=1 as .ci/run sets) installs every tool: missing is a failure."""
    return os.environ.get("CRIPROXY_REQUIRE_CONTAINERD") == "1" or os.environ.get("CI", "") not in ("", "0", "false")


def tool(name: str, package: str) -> str:
    """The path of program `name`; skipped when it is missing, except in CI, where that fails."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian package {package}; .ci/install-system-deps installs it)"
        if required_in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path
